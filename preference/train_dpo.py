"""Preference training after SFT (DPO, IPO and TRL's other pairwise losses; KTO on unpaired data; the
reference-free ORPO and SimPO) with TRL 1.x, for the three recipes' models, with the prompts they were trained on.

    python preference/train_dpo.py --adapter=build/llama-ner/train_trainer/adapter_model \\
        --train_path=build/preference/msra_ner_pairs.jsonl --save_dir=build/preference/llama-ner-dpo
    python preference/train_dpo.py --model_dir=tiny:glm-4-9b-chat --train_path=pairs.jsonl --save_dir=out \\
        --loss_type=ipo --beta=0.1
    python preference/train_dpo.py --model_dir=tiny:chinese-alpaca-7b --train_path=pairs.jsonl --save_dir=out \\
        --loss_type=orpo --quantization_bit=4          (or --loss_type=simpo --simpo_gamma=0.5; --finetuning_type=full)
    python preference/train_dpo.py --model_dir=tiny:glm-4-9b-chat --train_path=pairs.jsonl --check_only=true

Start: --adapter=SFT_LORA_FOLDER (a recipe's LoRA output; its base from adapter_config.json, or --model_dir) keeps
training that adapter and the reference is the SFT model itself (TRL keeps a frozen copy of the adapter, "ref": the
adapter's size, not a second copy of the weights); or --model_dir alone: a new LoRA (the recipe's targets, alpha,
dropout; r = --lora_r) and the reference is the base (the adapter disabled). The prompt format is the one the
adapter recorded (prompt_format.json), else the family's (serving's rule), else --prompt_format.
--quantization_bit=4/8: QLoRA, the base in 4/8 bits (frozen), as the SFT recipes. --finetuning_type=full: every
weight trains and the DPO/KTO reference is a frozen copy of the start weights (an --adapter is merged first).
ORPO and SimPO need no reference at all (preference/methods.py). Deviation from TRL's ORPO: its NLL term scores the
answer only, not the prompt too (the SFT recipes' and the DPO path's scored tokens; preference/reference_free.py).

Data: {"prompt" | "messages", "chosen", "rejected"} JSON/JSONL (--loss_type=kto: {"prompt" | "messages",
"completion", "label"}), tokenized exactly as the SFT recipe tokenizes (preference/pairs.py). --check_only=true
validates and tokenizes the file (tokenizer only, no model, nothing written): counts, drops by reason, lengths.
Bad data: one line `file:line: field: expected …`, exit code 2, nothing written.

Output (--save_dir): a PEFT adapter (adapter_config.json + adapter_model.safetensors; --finetuning_type=full: the
whole model's config.json + model.safetensors), the tokenizer, prompt_format.json, loss.png and margins.png; checkpoints save_dir/checkpoint-N written atomically
(--resume_from_checkpoint=last resumes). Serve it like any adapter: python -m serving.api --adapter SAVE_DIR.

Several processes, as the SFT recipes (tuning.distributed; GPUs: NCCL, CPUs: gloo): `torchrun --nproc_per_node N
preference/train_dpo.py ...` trains with DDP; `deepspeed --num_gpus N preference/train_dpo.py ...
--deepspeed=glm4_finetune/configs/ds_zero_2.json` (or ds_zero_3.json, any ZeRO-1/2/3 config; torchrun with --deepspeed
works too) with DeepSpeed. --train_batch_size is per process. ZeRO-3: the LoRA is gathered from every rank before it
is written; full fine-tuning's DPO/KTO reference copy is partitioned by DeepSpeed as the policy (TRL's
prepare_deepspeed). A 4/8-bit base cannot be partitioned by ZeRO-3 (refused: use ZeRO-1/2).
"""
import argparse
import os
import sys

import tuning  # noqa: F401  (first: silences library lines no user can act on, before those load)
import torch

from tuning import distributed
from tuning.errors import UserError, parse_bool, run_main
from tuning.run_plan import Spelling

# How this script's user says things, for tuning.run_plan's messages (the NER recipe's --key=value style).
SPELLING = Spelling(resume="--resume_from_checkpoint=last", max_steps="--max_steps=N",
                    overwrite="--overwrite_output_dir=true", with_deepspeed="pass the same --deepspeed=CONFIG again",
                    without_deepspeed="leave out --deepspeed")

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "apo_zero", "apo_down", "discopop", "sigmoid_norm")
METHODS = (*DPO_LOSSES, "kto", "orpo", "simpo")


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
    add("--loss_type", default="sigmoid", help=f"DPO losses of TRL 1.16: {', '.join(DPO_LOSSES)}; kto (unpaired "
                                               "data, KTOTrainer); orpo or simpo (reference-free: no reference model; "
                                               "trl.experimental's ORPOTrainer and CPOTrainer(loss_type=simpo))")
    add("--beta", type=float, default=None, help="DPO/KTO: strength of the pull to the reference (IPO: its tau); "
                                                 "ORPO: the weight lambda of its odds-ratio term; SimPO: the reward "
                                                 "scale. Default 0.1, SimPO 2.0 (its paper's)")
    add("--simpo_gamma", type=float, default=0.5, help="SimPO: the target reward margin gamma (TRL's default)")
    add("--finetuning_type", default="lora", help="lora (default; QLoRA with --quantization_bit) or full: every "
                                                  "weight trains, the DPO/KTO reference is a frozen copy of the start "
                                                  "weights (twice the weights in memory; with --adapter, the SFT "
                                                  "adapter merged into its base first); ORPO/SimPO keep no reference")
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
    add("--quantization_bit", type=int, default=None, help="4 or 8: QLoRA, the base in 4/8 bits (bitsandbytes), "
                                                           "frozen, a LoRA on top; not with --finetuning_type=full")
    add("--resume_from_checkpoint", default=None, help="a checkpoint path, a step N, or last")
    add("--overwrite_output_dir", type=parse_bool, default=False, help="true: write into a foreign non-empty folder")
    add("--deepspeed", default=None, help="a DeepSpeed config (JSON; ZeRO-1/2/3, e.g. glm4_finetune/configs/"
                                          "ds_zero_2.json): train with DeepSpeed under deepspeed or torchrun")
    argv = list(sys.argv[1:] if argv is None else argv)
    distributed.drop_local_rank_argument(argv)  # the deepspeed launcher's --local_rank; LOCAL_RANK says the same
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    from preference.methods import check_method

    if args.loss_type not in METHODS:
        raise UserError(f"expected one of {', '.join(METHODS)}; got {args.loss_type!r}", field="loss_type")
    check_method(args)
    for key in ("max_length", "lora_r", "train_batch_size", "gradient_accumulation_steps", "save_steps",
                "log_steps"):
        if getattr(args, key) < 1:
            raise UserError(f"expected a whole number >= 1, got {getattr(args, key)}", field=key)
    for key in ("beta", "learning_rate", "simpo_gamma"):
        if not getattr(args, key) > 0:
            raise UserError(f"expected a positive number, got {getattr(args, key)}", field=key)
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
    distributed.say("\n".join(report.lines()))
    if not rows:
        raise UserError("no usable record left (see the drops above)", path=args.train_path)
    return rows, report


def main(argv=None):
    args = parse_args(argv)
    from model_hub.loader import has_tokenizer, load_tokenizer, quantization_bits, tokenizer_from_folder

    model_dir = base_model_dir(args)
    family, prompt_format = choose_prompt_format(args, model_dir)
    # as load_adapted: the adapter's tokenizer when it carries one (glm4_finetune saves it), else the base's
    tokenizer = (tokenizer_from_folder(args.adapter) if args.adapter and has_tokenizer(args.adapter)
                 else load_tokenizer(model_dir))
    distributed.say(f"{family} model {model_dir}{' + adapter ' + args.adapter if args.adapter else ''}; prompt format "
                    f"{prompt_format}; loss {args.loss_type}")
    rows, _ = read_pairs(args, tokenizer, prompt_format)
    if args.check_only:
        return None

    from datasets import Dataset

    from transformers import set_seed

    from tuning.run_plan import claim_output, plan_run, training_callbacks
    from preference.methods import build_trainer, load_policy, save_result
    from preference.trainers import MarginPlot

    on_gpu = torch.cuda.is_available()  # (method × quantization × precision were checked with the arguments)
    run = plan_run(output_dir=args.save_dir, method=args.finetuning_type, bits=quantization_bits(args.quantization_bit),
                   zero_stage=args.zero_stage, resume=args.resume_from_checkpoint, max_steps=args.max_steps,
                   num_train_epochs=args.num_train_epochs, seed=args.seed, inputs=[args.train_path],
                   overwrite=args.overwrite_output_dir, spelling=SPELLING)
    claim_output(run, model_dir if not model_dir.startswith("tiny:") else None)

    model, tokenizer, peft_config = load_policy(args, model_dir, run.bits)
    dataset = Dataset.from_list(rows)
    if args.loss_type == "kto":
        dataset = dataset.shuffle(seed=args.seed)  # KTO reads in order (its KL rows are built per batch)
    set_seed(run.seed)  # a new LoRA is initialised next (by TRL or by us), before the Trainer seeds: same seed, same run
    trainer = build_trainer(args, model, tokenizer, peft_config, dataset, on_gpu, [MarginPlot()])
    for callback in training_callbacks(trainer.model):  # the recipes' NaN guard (on the model TRL wrapped), loss.png,
        trainer.add_callback(callback)                   # the data notes at the end
    trainer.resume_hint = SPELLING.resume
    trainer.train(resume_from_checkpoint=run.resume)
    save_result(trainer, tokenizer, args, prompt_format)
    distributed.say(f"{'model' if args.finetuning_type == 'full' else 'adapter'}: {args.save_dir}")
    distributed.say(f"loss curve: {os.path.join(args.save_dir, 'loss.png')}, reward margins: "
          f"{os.path.join(args.save_dir, 'margins.png')}")
    return trainer


if __name__ == "__main__":
    run_main(main)
