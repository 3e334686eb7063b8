"""Generate with a LLaMA base (+ a LoRA): interactive chat or a file of instructions (the original's chat_ner.py).

    python llama_ner/chat_ner.py --base_model ./model_hub/chinese-alpaca-7b --lora_model ./checkpoint/msra/train_trainer/adapter_model \\
        --tokenizer_path ./model_hub/chinese-alpaca-7b --with_prompt --interactive
    python llama_ner/chat_ner.py --base_model tiny:chinese-alpaca-7b --with_prompt --data_file rows.txt --only_cpu

--data_file: one instruction per line; a line holding a JSON object with "instruct" (and "query") — a row of
the instruction data — is read as that instruction and input. Without --data_file and --interactive one example
is run. Answers go to --predictions_file as [{"Input", "Output"}] with generation_config.json beside it.
Generation as the original: sampling, temperature 0.2, top_k 40, top_p 0.9, repetition_penalty 1.3, up to 400
new tokens. --with_prompt wraps the input in the TRAINING prompt (instruction + "\\n" + input, then "<s>" opens
the answer), so a LoRA trained by train_trainer.py sees what it was trained on; --original_prompt uses the
original chat_ner.py template instead ("### Instruction:\\n\\n…\\n\\n### Response:\\n\\n", BOS first), which
differs from training.
"""
import argparse
import json
import os


from tuning.errors import UserError, run_main
from tuning.files import atomic_file, parse_json_object, read_text, refuse_pickled_code, require_output_parent

ORIGINAL_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n\n{instruction}\n\n### Response:\n\n")
GENERATION_CONFIG = dict(temperature=0.2, top_k=40, top_p=0.9, do_sample=True, num_beams=1,
                         repetition_penalty=1.3, max_new_tokens=400)
DEFAULT_EXAMPLES = ["为什么要减少污染，保护环境？"]


def generate_prompt(instruction: str, input: str | None = None) -> str:
    """The original chat_ner.py prompt (kept behind --original_prompt)."""
    if input:
        instruction = instruction + "\n" + input
    return ORIGINAL_TEMPLATE.format_map({"instruction": instruction})


def prompt_ids(tokenizer, instruction: str, input: str | None, with_prompt: bool, original_prompt: bool):
    """(input ids, how to cut the response out of the decoded output)."""
    from llama_ner.dataset import build_source

    if not with_prompt:
        return tokenizer(instruction)["input_ids"], "whole"
    if original_prompt:
        return tokenizer(generate_prompt(instruction, input))["input_ids"], "split"
    ids = tokenizer(build_source(instruction, input), add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.bos_token_id], "new"


def read_examples(path: str) -> list[tuple[str, str | None, str]]:
    """(instruction, input, shown text) per non-blank line."""
    examples = []
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            row = parse_json_object(line, path, line_no)
            if not isinstance(row.get("instruct"), str) or not row["instruct"]:
                got = type(row.get("instruct")).__name__
                raise UserError(f"expected a non-empty string, got {got}", path=path, line=line_no, field="instruct")
            if row.get("query") is not None and not isinstance(row["query"], str):
                raise UserError(f"expected a string, got {type(row['query']).__name__}", path=path, line=line_no,
                                field="query")
            examples.append((row["instruct"], row.get("query"), row["instruct"] + (row.get("query") or "")))
        else:
            examples.append((line.strip(), None, line.strip()))
    return examples


def respond(model, tokenizer, args, instruction, input=None) -> str:
    import torch

    ids, cut = prompt_ids(tokenizer, instruction, input, args.with_prompt, args.original_prompt)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **GENERATION_CONFIG)[0]
    if cut == "new":
        return tokenizer.decode(out[len(ids):], skip_special_tokens=True).strip()
    output = tokenizer.decode(out, skip_special_tokens=True)
    return output.split("### Response:")[1].strip() if cut == "split" else output


def _is_model(path: str) -> bool:
    return path.startswith("tiny:") or os.path.isfile(os.path.join(path, "config.json"))


def _has_tokenizer(path: str) -> bool:
    return _is_model(path) or any(os.path.isfile(os.path.join(path, f))
                                  for f in ("tokenizer.model", "tokenizer_config.json"))


def load(args):
    import torch
    from peft import PeftModel
    import model_hub  # noqa: F401  (registers the LLaMA tokenizer with the original's ids)
    from model_hub.loader import load_model_and_tokenizer, load_tokenizer, tokenizer_from_folder

    on_gpu = torch.cuda.is_available()
    tokenizer = load_tokenizer(args.tokenizer_path) if _is_model(args.tokenizer_path) else \
        tokenizer_from_folder(args.tokenizer_path)
    model, _ = load_model_and_tokenizer(args.base_model, dtype="fp16" if on_gpu else "fp32",
                                        quantization_bit=args.quantization_bit)
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != vocab:
        if len(tokenizer) < vocab:
            raise UserError(f"the tokenizer has {len(tokenizer)} tokens, fewer than the model's {vocab}; wrong "
                            "--tokenizer_path?", field="tokenizer_path")
        print(f"resizing the model's vocabulary {vocab} -> {len(tokenizer)} to match the tokenizer")
        model.resize_token_embeddings(len(tokenizer))
    if args.lora_model:
        with refuse_pickled_code(args.lora_model):
            model = PeftModel.from_pretrained(model, args.lora_model)
    model.eval()
    return model, tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", required=True, help="LLaMA folder (or tiny:chinese-alpaca-7b)")
    parser.add_argument("--lora_model", default=None, help="LoRA adapter folder; none: the base alone")
    parser.add_argument("--tokenizer_path", default=None, help="default: --lora_model if given, else --base_model")
    parser.add_argument("--data_file", default=None, help="instructions, one per line (or JSON rows)")
    parser.add_argument("--with_prompt", action="store_true", help="wrap inputs in the instruction prompt")
    parser.add_argument("--original_prompt", action="store_true",
                        help="with --with_prompt: the original chat_ner.py template, not the training one")
    parser.add_argument("--interactive", action="store_true", help="chat on the terminal (single turn)")
    parser.add_argument("--predictions_file", default="./predictions.json", help="where batch answers are written")
    parser.add_argument("--gpus", default="0", help="CUDA_VISIBLE_DEVICES")
    parser.add_argument("--only_cpu", action="store_true", help="run on the CPU")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: not fixed, as the original)")
    parser.add_argument("--quantization_bit", type=int, choices=[4, 8], default=None,
                        help="load the base in 4 (nf4) or 8 bits (bitsandbytes), the LoRA on top")
    args = parser.parse_args()
    if args.only_cpu:
        args.gpus = ""
    os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus
    if not _is_model(args.base_model):
        raise UserError("model folder not found (a folder with config.json, or tiny:chinese-alpaca-7b)",
                        path=args.base_model, field="base_model")
    if args.tokenizer_path is None:  # the original: the LoRA's tokenizer (ymcui's LoRAs carry one), else the base's
        args.tokenizer_path = args.lora_model if args.lora_model and _has_tokenizer(args.lora_model) \
            else args.base_model
    if not _has_tokenizer(args.tokenizer_path):
        raise UserError("no tokenizer here (expected tokenizer.model or tokenizer_config.json)",
                        path=args.tokenizer_path, field="tokenizer_path")
    if args.lora_model and not os.path.isfile(os.path.join(args.lora_model, "adapter_config.json")):
        raise UserError("not a LoRA folder (adapter_config.json missing)", path=args.lora_model)
    if args.lora_model:
        from tuning.publish import read_adapter_folder

        read_adapter_folder(args.lora_model)  # whole (an interrupted save finished), weights there: no Hub lookup
    examples = read_examples(args.data_file) if args.data_file else [(e, None, e) for e in DEFAULT_EXAMPLES]
    if not args.interactive:
        require_output_parent(args.predictions_file)

    model, tokenizer = load(args)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    if args.interactive:
        print("=" * 60 + "\n单轮问答，不保留历史；空行退出。 Single-turn answers, no history; an empty line quits.\n"
              + "=" * 60)
        while True:
            try:
                raw = input("Input:")
            except EOFError:  # Ctrl-D or the end of piped input: quit quietly, as an empty line does
                print()
                break
            if not raw.strip():
                break
            print("Response: ", respond(model, tokenizer, args, raw))
            print("\n")
        return
    results = []
    for i, (instruction, input_, shown) in enumerate(examples):
        response = respond(model, tokenizer, args, instruction, input_)
        print(f"======={i}=======")
        print(f"Input: {shown}\n")
        print(f"Output: {response}\n")
        results.append({"Input": shown, "Output": response})
    with atomic_file(args.predictions_file) as f:
        json.dump(results, f, ensure_ascii=False, indent=2)
    folder = os.path.dirname(os.path.abspath(args.predictions_file))
    with atomic_file(os.path.join(folder, "generation_config.json")) as f:
        json.dump(GENERATION_CONFIG, f, ensure_ascii=False, indent=2)
    print(f"predictions: {args.predictions_file}")


if __name__ == "__main__":
    run_main(main)
