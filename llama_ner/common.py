"""What train_trainer.py, train_deepspeed.py, test.py and predict.py share: the original's config keys, the
LoRA settings, train_args.json, loading validated data, saving the adapter next to train_args.json, and the
DeepSpeed config adapted to the device."""
import json
import os
from pprint import pprint

from tuning.errors import UserError
from tuning.run_plan import Spelling, check_combination, prepare_base
from tuning.files import atomic_file, default_input, read_json
from model_hub.prompt_format import record_prompt_format

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# deepspeed.json's optimizer (the Trainer path sets the same betas / eps / weight decay on its AdamW).
RECIPE_ADAM = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 5e-4}

# The original config dict (train_trainer.py), paths adapted to this repository's data layout.
BASE_CONFIG = {
    "data_name": "msra",
    "model_dir": "./model_hub/chinese-alpaca-7b",
    "lora_r": 8,
    "max_seq_length": 128 + 64,
    "instruct_column": "instruct",
    "query_column": "query",
    "response_column": "answer",
    "train_path": "build/llama-ner/instruct_data/train.txt",
    "dev_path": "data/llama_ner_msra/instruct_data/dev.txt",
    "train_batch_size": 12,
    "gradient_accumulation_steps": 1,
    "save_dir": "./checkpoint/msra/train_trainer/",
    "num_train_epochs": 1,
    "local_rank": -1,
    "log_steps": 10,
    "save_steps": 400,
}
# Keys the original lacked (defaults keep its behaviour).
EXTRA_CONFIG = {
    "learning_rate": None,     # None: deepspeed.json's optimizer lr (1e-5), as the original
    "max_steps": -1,           # > 0: stop after this many optimizer steps (CPU smoke runs)
    "bf16": False,             # CPU: bf16 autocast (~2x faster than fp32); GPU keeps deepspeed.json's fp16
    "seed": 42,
    "save_total_limit": 1,
    "resume_from_checkpoint": None,  # a checkpoint path, a step N, or "last" (checkpoints under save_dir)
    "group_by_length": False,  # opt-in: batches of similar length, padded to their longest row
    "packing": False,          # opt-in: several rows per training row, own positions/attention (same loss)
    "lm_head_on_labels_only": False,  # opt-in: LM head + loss only where a label is trained (same loss/grads)
    "pad_to_multiple_of": 1,   # with group_by_length: round the batch length up (fewer shapes, less RSS growth)
    "prefetch_dropout_masks": False,  # opt-in, CPU: LoRA dropout masks drawn on a helper thread (bit-identical)
    "quantization_bit": None,  # 4 (QLoRA, nf4) or 8: base weights through bitsandbytes, CPU or GPU
    "overwrite_output_dir": False,  # true: train into a save_dir that holds other files (never ~, . or the data's)
}
HELP = {
    "model_dir": "LLaMA folder (Chinese-Alpaca-7B), or tiny:chinese-alpaca-7b for a CPU smoke run",
    "train_path": "instruction rows made by llama_ner/process.py",
    "save_dir": "checkpoints go here; the adapter and train_args.json in save_dir/adapter_model",
    "local_rank": "set by the deepspeed launcher; != -1 means DeepSpeed",
    "learning_rate": "None: the lr of deepspeed.json (1e-5)",
    "resume_from_checkpoint": "path, step number or last",
    "overwrite_output_dir": "true: allow a save_dir that is not empty and not an earlier training output (its "
                            "README.md, loss.png, adapter files may be replaced); never the home folder, the "
                            "current folder or a folder that holds the data",
    "group_by_length": "batches of rows of similar length, padded to the batch's longest row (not to max_seq_length)",
    "packing": "pack rows into training rows of max_seq_length tokens, each row with its own positions and "
               "attention: same loss, far less padding, fewer steps per epoch",
    "lm_head_on_labels_only": "compute the LM head and the loss only at trained positions: same loss and "
                              "gradients, about half the FLOPs of a small LLaMA on NER rows",
    "pad_to_multiple_of": "with --group_by_length, pad each batch to its longest row rounded up to a multiple of "
                          "this (at most max_seq_length): same loss; on a CPU, 16 keeps the allocator reusing "
                          "the same few tensor sizes, so peak memory does not creep up over the epoch",
    "prefetch_dropout_masks": "CPU: draw each step's LoRA dropout masks on a helper thread while the model "
                              "computes (PyTorch draws CPU random numbers on one core); the same masks in the "
                              "same order: bit-identical losses. Not with gradient checkpointing",
    "quantization_bit": "4: QLoRA (base linear weights in nf4, double quantization, bf16 compute; bitsandbytes, "
                        "CPU or GPU); 8: LLM.int8; test.py/predict.py load the base the same way (0: full "
                        "precision). The adapter is a normal PEFT adapter of the full-precision base",
}


# Left at their defaults, the data paths name the repository's files wherever a script is run from (process.py
# writes build/llama-ner/instruct_data/ under the repository; `cd llama_ner && python train_trainer.py` must find it).
PROCESS_FIRST = "run `python llama_ner/process.py` first (it writes build/llama-ner/instruct_data/)"
MAKES_DEFAULT_DATA = {"train_path": PROCESS_FIRST, "test_path": PROCESS_FIRST,
                      "dev_path": "it ships with the repository: restore data/llama_ner_msra/"}


def resolve_data_paths(args, defaults: dict, keys: tuple[str, ...]) -> None:
    """args.<key> for each key: a default relative path becomes the repository's file (or one clear line)."""
    for key in keys:
        value = getattr(args, key, None)
        if value and key in defaults:
            setattr(args, key, default_input(value, defaults[key], REPO, f"--{key}", MAKES_DEFAULT_DATA[key]))


def show_args(args) -> None:
    from tuning.distributed import is_main

    if is_main():
        pprint(vars(args))


def adapter_dir(args) -> str:
    return os.path.join(args.save_dir, "adapter_model")


def write_train_args(args, folder: str) -> str:
    """train_args.json, read back by test.py / predict.py (written before training, as the original)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "train_args.json")
    with atomic_file(path) as f:
        json.dump(vars(args), f, ensure_ascii=False, indent=2)
    record_prompt_format(folder, "llama_ner", "llama_ner")  # beside the adapter, for serving/
    return path


def load_train_args(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError("train_args.json not found; train first (train_trainer.py writes it) or pass "
                        "--train_args=PATH", path=path)
    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError("expected a JSON object", path=path)
    return config


def collate_for(args, tokenizer):
    from llama_ner.dataset import NerCollate

    return NerCollate(args, tokenizer)


POSITIVE_INTEGERS = ("train_batch_size", "lora_r", "gradient_accumulation_steps", "max_seq_length", "save_steps",
                     "log_steps", "num_train_epochs")


def check_values(args) -> None:
    """Numbers that must be positive, checked before anything is loaded or written (train_args.json included)."""
    import math

    for key in POSITIVE_INTEGERS:
        value = getattr(args, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"expected a whole number >= 1, got {value!r}", field=key)
    rate = args.learning_rate
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate)
                             or rate <= 0):
        raise UserError(f"expected a positive number (e.g. 2e-4), or None for deepspeed.json's lr; got {rate!r}",
                        field="learning_rate")


def check_speed_flags(args, on_gpu: bool) -> None:
    """The opt-in speed-up flags, checked before anything is loaded or written."""
    if args.pad_to_multiple_of < 1:
        raise UserError(f"expected a whole number >= 1, got {args.pad_to_multiple_of}", field="pad_to_multiple_of")
    if args.prefetch_dropout_masks:
        from tuning.dropout_masks import refuse_off_cpu

        refuse_off_cpu("cuda" if on_gpu else "cpu")


# How these scripts' users say things, for tuning.run_plan's messages.
SPELLING = Spelling(resume="--resume_from_checkpoint=last", max_steps="--max_steps=N",
                    overwrite="--overwrite_output_dir=true",
                    with_deepspeed="relaunch with `deepspeed llama_ner/train_trainer.py …`",
                    without_deepspeed="relaunch with `python` (or `torchrun`), not `deepspeed`")


def check_settings(args, ds_config: dict | None, on_gpu: bool) -> tuple[int | None, int | None]:
    """(quantization bits 4/8/None, ZeRO stage or None without DeepSpeed = `ds_config` None): LoRA × quantization ×
    ZeRO stage × precision checked by tuning.run_plan's rules, before anything is loaded or written."""
    from model_hub.loader import quantization_bits
    from tuning.distributed import zero_stage

    bits = quantization_bits(args.quantization_bit)
    stage = None if ds_config is None else zero_stage(ds_config)
    check_combination(method="lora", bits=bits, zero_stage=stage, bf16=args.bf16, use_cpu=not on_gpu,
                      spelling=SPELLING)
    return bits, stage


def load_for_lora(args, run, dtype: str):
    """(model, tokenizer) ready for the LoRA adapter: full precision on this rank's device, or a frozen
    quantized base (QLoRA), no KV cache."""
    from model_hub.loader import load_model_and_tokenizer
    from tuning.distributed import local_device

    model, tokenizer = load_model_and_tokenizer(args.model_dir, dtype=dtype, device=local_device(),
                                                quantization_bit=run.bits)
    prepare_base(run, model, gradient_checkpointing=False)
    return model, tokenizer


def training_inputs(args, tokenizer, model, rows: list[str], rank: int = 0, world: int = 1):
    """tuning.packing.TrainingRows (rows, collate function, sampler or None) for the training loop, with the opt-in
    speed-ups applied (--group_by_length, --pad_to_multiple_of, --packing, --lm_head_on_labels_only,
    --prefetch_dropout_masks; all off: the original's rows and collate_fn)."""
    from model_hub.registry import packed_layout
    from tuning.packing import less_padding

    collate = collate_for(args, tokenizer)
    collate.pad_to_longest = bool(args.group_by_length)
    collate.pad_to_multiple_of = args.pad_to_multiple_of
    if args.lm_head_on_labels_only:
        from tuning.labelled_logits import compute_logits_only_at_labels

        compute_logits_only_at_labels(model)
    if args.prefetch_dropout_masks:
        from tuning.dropout_masks import prefetch_dropout_masks

        prefetch_dropout_masks(model)
    return less_padding(rows, lambda: collate.lengths(rows), rows_fn=collate.rows, collator=collate.collate_fn,
                        pad_token_id=tokenizer.pad_token_id, packed_layout=packed_layout(model.config),
                        packing=args.packing,
                        group_by_length=args.group_by_length, capacity=args.max_seq_length,
                        batch_size=args.train_batch_size, seed=args.seed, rank=rank, world=world)


def load_training_rows(args, tokenizer) -> list[str]:
    """Validated JSON lines; rows that max_seq_length would leave without answer are dropped and reported."""
    from llama_ner.dataset import drop_cut_rows, load_data

    lines = load_data(args.train_path, (args.instruct_column, args.query_column, args.response_column))
    return drop_cut_rows(lines, collate_for(args, tokenizer), args.train_path)


def save_adapter(model, folder: str) -> None:
    """The adapter files into `folder` (next to train_args.json), each replaced whole or not at all.
    Call it on every rank: ZeRO-3 gathers the LoRA shards collectively, rank 0 writes."""
    from tuning.checkpoints import save_pretrained_atomically
    from tuning.distributed import save_trainable

    save_trainable(model, lambda trained: save_pretrained_atomically(trained.save_pretrained, folder))


def find_deepspeed_json(path: str) -> str:
    """The path as given (relative to the working directory, as the original), else next to this recipe."""
    if os.path.isfile(path):
        return path
    beside = os.path.join(HERE, path)
    if os.path.isfile(beside):
        return beside
    raise UserError("DeepSpeed config not found", path=path, field="deepspeed_jaon_path")


def deepspeed_config(path: str, args, on_gpu: bool) -> dict:
    """deepspeed.json with the run's batch size / accumulation / lr, and the precision the device supports."""
    from tuning.distributed import zero_stage

    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError("expected a JSON object", path=path)
    zero_stage(path)  # a stage that is not 0-3 is one line here, not a DeepSpeed traceback later
    config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    # A config without an optimizer (e.g. a ZeRO-2/3 file written for the Trainer) gets the recipe's.
    optimizer = config.setdefault("optimizer", {"type": "Adam", "params": dict(RECIPE_ADAM)})
    optimizer.setdefault("params", {})["lr"] = learning_rate(args, config)
    if not on_gpu:
        # No fp16 on CPU (0.3 GFLOP/s); bf16 if asked. Optimizer offload to "cpu" is moot on a CPU and would
        # JIT-compile DeepSpeedCPUAdam; torch's Adam does the same maths.
        if config.get("fp16", {}).get("enabled"):
            from tuning.distributed import say

            say(f"note: {path} asks for fp16, which a CPU cannot run fast; training in "
                f"{'bf16' if args.bf16 else 'fp32 (--bf16=true for bf16)'} instead")
        config["fp16"] = {"enabled": False}
        config["bf16"] = {"enabled": bool(args.bf16)}
        config.get("zero_optimization", {}).pop("offload_optimizer", None)
        optimizer["params"]["torch_adam"] = True
    return config


def learning_rate(args, ds_config: dict | None = None) -> float:
    if args.learning_rate is not None:
        return float(args.learning_rate)
    if ds_config is None:
        ds_config = read_json(find_deepspeed_json("deepspeed.json"))
    return float(ds_config.get("optimizer", {}).get("params", {}).get("lr", 1e-5))
