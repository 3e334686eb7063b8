"""Preference training after SFT (DPO, IPO and TRL's other pairwise losses; KTO on unpaired data) with TRL 1.x, for
the three recipes' models, with the prompts they were trained on.

    python preference/train_dpo.py --adapter=build/llama-ner/train_trainer/adapter_model \\
        --train_path=build/preference/msra_ner_pairs.jsonl --save_dir=build/preference/llama-ner-dpo
    python preference/train_dpo.py --model_dir=tiny:glm-4-9b-chat --train_path=pairs.jsonl --save_dir=out \\
        --loss_type=ipo --beta=0.1
    python preference/train_dpo.py --model_dir=tiny:glm-4-9b-chat --train_path=pairs.jsonl --check_only=true

Start: --adapter=SFT_LORA_FOLDER (a recipe's LoRA output; its base from adapter_config.json, or --model_dir) keeps
training that adapter and the reference is the SFT model itself (TRL keeps a frozen copy of the adapter, "ref": the
adapter's size, not a second copy of the weights); or --model_dir alone: a new LoRA (the recipe's targets, alpha,
dropout; r = --lora_r) and the reference is the base (the adapter disabled). The prompt format is the one the
adapter recorded (prompt_format.json), else the family's (serving's rule), else --prompt_format.

Data: {"prompt" | "messages", "chosen", "rejected"} JSON/JSONL (--loss_type=kto: {"prompt" | "messages",
"completion", "label"}), tokenized exactly as the SFT recipe tokenizes (preference/pairs.py). --check_only=true
validates and tokenizes the file (tokenizer only, no model, nothing written): counts, drops by reason, lengths.
Bad data: one line `file:line: field: expected …`, exit code 2, nothing written.

Output (--save_dir): a PEFT adapter (adapter_config.json + adapter_model.safetensors), the tokenizer,
prompt_format.json, loss.png and margins.png; checkpoints save_dir/checkpoint-N written atomically
(--resume_from_checkpoint=last resumes). Serve it like any adapter: python -m serving.api --adapter SAVE_DIR.
"""
import argparse
import os

import tuning  # noqa: F401  (first: silences library lines no user can act on, before those load)
import torch

from tuning.errors import UserError, parse_bool, run_main

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "apo_zero", "apo_down", "discopop", "sigmoid_norm")
NOT_YET = {"orpo": "ORPO is in trl.experimental.orpo (reference-free, its own trainer): not wired here yet",
           "simpo": "SimPO is CPOTrainer(loss_type='simpo') in trl.experimental.cpo: not wired here yet"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model_dir", default=None, help="base model folder or tiny:NAME (default with --adapter: its base)")
    add("--adapter", default=None, help="a recipe's LoRA output folder to continue from (the SFT model)")
    add("--prompt_format", default=None, help="override the recorded prompt format (model_hub.prompt_format)")
    add("--train_path", required=True, help="preference data, .jsonl or .json (see above)")
    add("--save_dir", default=None, help="output folder: adapter, tokenizer, checkpoints (required unless "
                                         "--check_only)")
    add("--check_only", type=parse_bool, default=False, help="true: check and count the data, load no model")
    add("--loss_type", default="sigmoid", help=f"DPO losses of TRL 1.16: {', '.join(DPO_LOSSES)}; or kto "
                                               "(unpaired data, KTOTrainer)")
    add("--beta", type=float, default=0.1, help="strength of the pull to the reference (IPO: its tau)")
    add("--max_length", type=int, default=512, help="prompt + answer tokens; longer rows are cut at the end")
    add("--lora_r", type=int, default=8, help="rank of a new LoRA (with --model_dir alone)")
    add("--learning_rate", type=float, default=5e-6)
    add("--train_batch_size", type=int, default=4, help="pairs per step and device")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--num_train_epochs", type=float, default=1.0)
    add("--max_steps", type=int, default=-1, help="> 0: stop after this many optimizer steps")
    add("--save_steps", type=int, default=100)
    add("--log_steps", type=int, default=10)
    add("--save_total_limit", type=int, default=2)
    add("--seed", type=int, default=42)
    add("--bf16", type=parse_bool, default=False, help="true: bf16 mixed precision (CPU: ~2x faster than fp32)")
    add("--quantization_bit", type=int, default=None, help="4 or 8: QLoRA base weights (bitsandbytes)")
    add("--resume_from_checkpoint", default=None, help="a checkpoint path, a step N, or last")
    add("--overwrite_output_dir", type=parse_bool, default=False, help="true: write into a foreign non-empty folder")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    if args.loss_type in NOT_YET:
        raise UserError(NOT_YET[args.loss_type], field="loss_type")
    if args.loss_type not in (*DPO_LOSSES, "kto"):
        raise UserError(f"expected one of {', '.join(DPO_LOSSES)}, kto; got {args.loss_type!r}", field="loss_type")
    for key in ("max_length", "lora_r", "train_batch_size", "gradient_accumulation_steps", "save_steps",
                "log_steps"):
        if getattr(args, key) < 1:
            raise UserError(f"expected a whole number >= 1, got {getattr(args, key)}", field=key)
    if not (args.beta > 0 and args.learning_rate > 0):
        raise UserError("expected positive numbers", field="beta" if args.beta <= 0 else "learning_rate")
    if not args.model_dir and not args.adapter:
        raise UserError("give --model_dir (a base model or tiny:NAME) or --adapter (a recipe's LoRA output)",
                        field="model_dir")
    if not args.check_only and not args.save_dir:
        raise UserError("give --save_dir (the output folder), or --check_only=true", field="save_dir")


def choose_prompt_format(args, model_dir: str) -> tuple[str, str]:
    """(family, prompt format): the adapter's record, else the family's default for an adapter / a base model."""
    from model_hub.loader import load_model_config, resolve_model_path
    from model_hub.prompt_format import detect_prompt_format
    from model_hub.registry import FAMILIES, family_of_config

    family = family_of_config(load_model_config(model_dir))
    if family not in FAMILIES:
        raise UserError(f"not a LLaMA, GLM-4 or ChatGLM-6B model ({family})", path=model_dir, field="model_dir")
    folder = None if model_dir.startswith("tiny:") else resolve_model_path(model_dir)
    return family, detect_prompt_format(family, folder, args.adapter, args.prompt_format)


def base_model_dir(args) -> str:
    from model_hub.loader import base_of_adapter
    from tuning.publish import read_adapter_folder

    if args.adapter:
        config = read_adapter_folder(args.adapter)
        if config.get("peft_type") != "LORA":
            raise UserError(f"expected a LoRA adapter, got {config.get('peft_type')}: preference training continues "
                            "LoRA adapters (P-tuning v2 is not wired here)", path=args.adapter)
    return args.model_dir or base_of_adapter(args.adapter, "--model_dir")


def read_pairs(args, tokenizer, prompt_format: str):
    from preference.pairs import AnswerEncoder, tokenize_file

    rows, report = tokenize_file(args.train_path, AnswerEncoder(prompt_format, tokenizer), args.max_length,
                                 unpaired=args.loss_type == "kto")
    report.print()
    if not rows:
        raise UserError("no usable record left (see the drops above)", path=args.train_path)
    return rows, report


def load_policy(args, model_dir: str, bits):
    """(model, tokenizer, peft_config): a recipe's LoRA made trainable again, or the base and a new LoRA's config
    (TRL wraps it, so the reference is the base with the adapter disabled)."""
    from model_hub.loader import load_adapted
    from model_hub.registry import family_of_config, get_family
    from peft import LoraConfig, TaskType
    from tuning.distributed import local_device
    from tuning.methods import prepare_quantized_base

    model, tokenizer = load_adapted(model_dir, args.adapter, dtype="fp32", device=str(local_device()),
                                    quantization_bit=bits, base_flag="--model_dir")
    model.train()
    model.config.use_cache = False
    if args.adapter:
        model.peft_config["default"].inference_mode = False
        for name, param in model.named_parameters():
            param.requires_grad_(".lora_" in name and ".default." in name)
        return model, tokenizer, None
    if bits:
        prepare_quantized_base(model)
    lora = get_family(family_of_config(model.config)).lora()
    return model, tokenizer, LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_r, lora_alpha=lora["alpha"],
                                        lora_dropout=lora["dropout"], target_modules=list(lora["target_modules"]))


def trainer_config(args, on_gpu: bool):
    from trl import DPOConfig, KTOConfig

    from tuning import distributed

    common = dict(
        output_dir=args.save_dir, learning_rate=args.learning_rate, per_device_train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps, save_strategy="steps", save_steps=args.save_steps, logging_steps=args.log_steps,
        save_total_limit=args.save_total_limit, seed=args.seed, bf16=args.bf16, fp16=False, use_cpu=not on_gpu,
        beta=args.beta, max_length=args.max_length, activation_checkpointing=False, report_to=["tensorboard"],
        dataloader_num_workers=0, pad_to_multiple_of=None,
    )
    common = distributed.trainer_arguments(common)
    if args.loss_type == "kto":
        return KTOConfig(**common, train_sampling_strategy="sequential")  # the KL rows are built per batch
    return DPOConfig(**common, loss_type=[args.loss_type])


def save_result(trainer, model, tokenizer, args, prompt_format: str) -> None:
    """The adapter (TRL's frozen "ref" copy left out), tokenizer and prompt record into save_dir, each file whole."""
    from model_hub.prompt_format import record_prompt_format
    from tuning.checkpoints import save_pretrained_atomically
    from tuning.distributed import is_main

    if is_main():
        save_pretrained_atomically(lambda folder: (model.save_pretrained(folder, selected_adapters=["default"]),
                                                   tokenizer.save_pretrained(folder)), args.save_dir)
        record_prompt_format(args.save_dir, prompt_format, "preference")


def main(argv=None):
    args = parse_args(argv)
    from model_hub.loader import has_tokenizer, load_tokenizer, quantization_bits, tokenizer_from_folder

    model_dir = base_model_dir(args)
    family, prompt_format = choose_prompt_format(args, model_dir)
    # as load_adapted: the adapter's tokenizer when it carries one (glm4_finetune saves it), else the base's
    tokenizer = (tokenizer_from_folder(args.adapter) if args.adapter and has_tokenizer(args.adapter)
                 else load_tokenizer(model_dir))
    print(f"{family} model {model_dir}{' + adapter ' + args.adapter if args.adapter else ''}; prompt format "
          f"{prompt_format}; loss {args.loss_type}")
    rows, _ = read_pairs(args, tokenizer, prompt_format)
    if args.check_only:
        return None

    from datasets import Dataset

    from tuning.checkpoints import claim_run_folder
    from tuning.training import DataNotesAtEnd, LossPlot, NanGuard, check_precision, resolve_resume, stop_if_finished
    from preference.trainers import MarginPlot, PreferenceDPOTrainer, PreferenceKTOTrainer

    on_gpu = torch.cuda.is_available()
    check_precision(fp16=False, bf16=args.bf16, use_cpu=not on_gpu)
    bits = quantization_bits(args.quantization_bit)
    resume = resolve_resume(args.resume_from_checkpoint, args.save_dir)
    stop_if_finished(resume, args.max_steps, args.num_train_epochs, "--max_steps=N")
    claim_run_folder(args.save_dir, resume, "--resume_from_checkpoint=last", model_dir if not model_dir.startswith(
        "tiny:") else None, inputs=[args.train_path], overwrite=args.overwrite_output_dir,
        flag="--overwrite_output_dir=true")

    model, tokenizer, peft_config = load_policy(args, model_dir, bits)
    dataset = Dataset.from_list(rows)
    if args.loss_type == "kto":
        dataset = dataset.shuffle(seed=args.seed)  # KTO reads in order (its KL rows are built per batch)
    trainer_class = PreferenceKTOTrainer if args.loss_type == "kto" else PreferenceDPOTrainer
    trainer = trainer_class(model=model, args=trainer_config(args, on_gpu), train_dataset=dataset,
                            processing_class=tokenizer, peft_config=peft_config,
                            callbacks=[LossPlot(), MarginPlot(), DataNotesAtEnd()])
    trainer.add_callback(NanGuard(trainer.model))
    trainer.resume_hint = "--resume_from_checkpoint=last"
    trainer.train(resume_from_checkpoint=resume)
    save_result(trainer, trainer.model, tokenizer, args, prompt_format)
    print(f"adapter: {args.save_dir}")
    print(f"loss curve: {os.path.join(args.save_dir, 'loss.png')}, reward margins: "
          f"{os.path.join(args.save_dir, 'margins.png')}")
    return trainer


if __name__ == "__main__":
    run_main(main)
