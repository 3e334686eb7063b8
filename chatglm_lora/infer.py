"""ChatGLM-Tuning's inference (the tutorial's infer.py / infer.ipynb): base model + LoRA adapter, alpaca prompts
through `format_example`, greedy decoding with max_length 150, answer printed next to the reference.

    python chatglm_lora/infer.py --chatglm_path model_path/chatglm --lora_path output          # first 3 alpaca rows
    python chatglm_lora/infer.py --chatglm_path tiny:chatglm-6b --lora_path output --batch_size 8 --num 16
    python chatglm_lora/infer.py --chatglm_path model_path/chatglm --lora_path output --interactive
"""
import argparse
import os


import tuning  # noqa: F401  (first: silences library lines no user can act on, before those load)
import torch

from chatglm_lora.cover_alpaca2jsonl import ALPACA_JSON, alpaca_path, format_example, read_alpaca
from model_hub.chatglm6b.text import build_prompt
from model_hub.chatglm6b.prompts import clean_tuning_answer
from tuning.errors import UserError, run_main
from tuning.files import read_json

DEFAULT_BASE = "model_path/chatglm"  # the tutorial's
clean_answer = clean_tuning_answer  # the tutorial's post-processing (one definition, shared with serving)


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[str], max_length: int = 150, batch_size: int = 1) -> list[list[int]]:
    """Greedy answer ids (up to eos); batches are left-padded with GLM's 2-D positions and give the same tokens
    as one by one. As the original, `max_length` counts prompt + answer tokens of each prompt on its own, so
    every row of a batch is cut to its own budget."""
    eos = tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = tokenizer(chunk, padding=True, return_tensors="pt").to(model.device)
        # Prompt lengths without the left padding (<pad> is a control piece: text never produces it).
        lengths = (batch["input_ids"] != tokenizer.pad_token_id).sum(dim=1).tolist()
        width = batch["input_ids"].shape[1]
        budget = max_length - min(lengths)
        if budget <= 0:
            answers.extend([] for _ in chunk)
            continue
        out = model.generate(**batch, max_new_tokens=budget, do_sample=False, num_beams=1)
        for row, n in zip(out, lengths):
            new = row[width:width + max(0, max_length - n)].tolist()
            answers.append(new[:new.index(eos)] if eos in new else new)
    return answers


def generate_answers(model, tokenizer, prompts: list[str], max_length: int = 150, batch_size: int = 1) -> list[str]:
    return [clean_answer(tokenizer.decode(ids, skip_special_tokens=True))
            for ids in generate_ids(model, tokenizer, prompts, max_length, batch_size)]


def check_adapter_args(chatglm_path: str, lora_path: str) -> None:
    """One-line errors for an adapter folder that is not one and a default base folder that is not there."""
    if not os.path.isfile(os.path.join(lora_path, "adapter_config.json")):
        raise UserError("not a PEFT adapter folder (no adapter_config.json); give finetune.py's output_dir "
                        "or one of its checkpoint-N folders", path=lora_path)
    if chatglm_path == DEFAULT_BASE and not os.path.isdir(DEFAULT_BASE):
        recorded = read_json(os.path.join(lora_path, "adapter_config.json")).get("base_model_name_or_path")
        raise UserError("model folder not found (the default of --chatglm_path); pass --chatglm_path PATH" +
                        (f" (the adapter was trained on {recorded})" if recorded else ""), path=DEFAULT_BASE)


def load_with_adapter(chatglm_path: str, lora_path: str, bf16: bool = False, quantization_bit: int | None = None):
    """(base ChatGLM-6B, quantized with `quantization_bit`, + the LoRA adapter in eval mode, tokenizer)."""
    from model_hub.loader import load_adapted

    return load_adapted(chatglm_path, lora_path, dtype="bf16" if bf16 else None, quantization_bit=quantization_bit,
                        base_flag="--chatglm_path")


def interactive(model, tokenizer, max_length: int = 2048, max_new_tokens: int | None = None):
    print("ChatGLM-6B + LoRA. Type a message; 'clear' forgets the history, 'exit' quits.")
    history = []
    while True:
        try:
            query = input("\n用户/User: ").strip()
        except EOFError:
            break
        if query in ("exit", "quit", "stop"):
            break
        if query == "clear":
            history = []
            continue
        if not query:
            continue
        printed = 0
        limits = {"max_length": None, "max_new_tokens": max_new_tokens} if max_new_tokens else {"max_length": max_length}
        print("ChatGLM: ", end="", flush=True)
        length = len(tokenizer(build_prompt(query, history))["input_ids"])
        if not max_new_tokens and length >= max_length:
            print(f"[the conversation is {length} tokens, over --chat_max_length {max_length}; type 'clear']")
            continue
        for response, history in model.stream_chat(tokenizer, query, history=history, **limits):
            print(response[printed:], end="", flush=True)
            printed = len(response)
        print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chatglm_path", default=DEFAULT_BASE, help="base ChatGLM-6B folder or tiny:chatglm-6b")
    parser.add_argument("--lora_path", default="output", help="PEFT adapter folder (finetune.py's output_dir)")
    parser.add_argument("--data_path", default=ALPACA_JSON,
                        help="alpaca JSON whose first rows are asked (default: %(default)s, the repository's)")
    parser.add_argument("--num", type=int, default=3, help="how many alpaca rows to ask (the tutorial: 3)")
    parser.add_argument("--max_length", type=int, default=150, help="prompt + answer tokens, as the tutorial")
    parser.add_argument("--batch_size", type=int, default=1, help="prompts per generate call (left-padded)")
    parser.add_argument("--interactive", action="store_true", help="multi-turn chat with history, streamed")
    parser.add_argument("--chat_max_length", type=int, default=2048,
                        help="--interactive: prompt + history + answer tokens (the original chat's default)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="--interactive: cap each answer instead")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (CPU or GPU)")
    parser.add_argument("--quantization_bit", type=int, choices=[4, 8], default=None,
                        help="load the base in 4 (nf4) or 8 bits (bitsandbytes), the LoRA on top")
    args = parser.parse_args()

    if not os.path.isfile(os.path.join(args.lora_path, "adapter_config.json")):
        check_adapter_args(args.chatglm_path, args.lora_path)  # a wrong adapter folder is said before bad data
    examples = None if args.interactive else read_alpaca(alpaca_path(args.data_path))[:args.num]
    check_adapter_args(args.chatglm_path, args.lora_path)
    if args.batch_size < 1 or args.num < 1:
        raise UserError("must be at least 1", field="batch_size" if args.batch_size < 1 else "num")
    model, tokenizer = load_with_adapter(args.chatglm_path, args.lora_path, args.bf16, args.quantization_bit)
    if args.interactive:
        return interactive(model, tokenizer, args.chat_max_length, args.max_new_tokens)

    prompts = [format_example(e)["context"] for e in examples]
    answers = generate_answers(model, tokenizer, prompts, args.max_length, args.batch_size)
    for i, (example, prompt, answer) in enumerate(zip(examples, prompts, answers), start=1):
        print(f"### {i}\n{prompt}{answer}")  # the prompt ends with "Answer: "
        print(f"Reference: {example['output']}\n")


if __name__ == "__main__":
    run_main(main)
