"""Fine-tune GLM-4-9B-chat with LoRA, P-tuning v2 or full SFT (THUDM/GLM-4 finetune_demo/finetune.py).

\b
    python glm4_finetune/finetune.py DATA_DIR MODEL_DIR CONFIG_FILE [AUTO_RESUME_FROM_CHECKPOINT]

DATA_DIR holds the messages-format .jsonl files named in the config's data_config; MODEL_DIR is a native GLM-4
folder (convert an original glm-4-9b-chat once with `python -m model_hub.convert_glm4_to_hf`) or
`tiny:glm-4-9b-chat`; CONFIG_FILE is a YAML such as glm4_finetune/configs/lora.yaml (peft_config absent = full
fine-tuning). AUTO_RESUME_FROM_CHECKPOINT: empty or `no` = start fresh, `yes` = the newest checkpoint-N in
output_dir (fresh when there is none), `N` = output_dir/checkpoint-N.

Checkpoints (adapter or full weights, with the tokenizer) go to output_dir/checkpoint-N; the final model or
adapter to output_dir itself; evaluation generates every answer and logs ROUGE-1/2/L and BLEU-4; the test split
is scored at the end (output_dir/test_results.json, test_predictions.jsonl). Multi-GPU: launch with torchrun.
"""
import json
import os
import sys


from typing import Annotated

import typer

from glm4_finetune.config import load_config, method_of
from glm4_finetune.data import process_batch, process_batch_eval  # noqa: F401  (the original's API)
from glm4_finetune.validate import read_conversations
from model_hub import REPO_DIR
from model_hub.registry import get_family, get_spec
from model_hub.prompt_format import record_prompt_format
from tuning import distributed
from tuning.errors import UserError, run_main
from tuning.run_plan import (RunPlan, Spelling, add_method, claim_output, plan_run, prepare_base,
                             training_callbacks)

MODEL_NAME = "glm-4-9b-chat"  # model_hub/registry.py: stop ids, pad id, LoRA targets

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def resolve_auto_resume(value: str, output_dir: str) -> str | None:
    """The original's yes / no / N (no checkpoint saved yet with `yes`: a fresh start, as the original); a typo is an
    error (the original silently skipped training)."""
    from tuning.training import resolve_resume  # (tuning.training loads the Trainer callbacks: --help needs none)

    return resolve_resume(value, output_dir, field="AUTO_RESUME_FROM_CHECKPOINT", paths=False,
                          fresh_when_none_saved=True)


# How this script's user says things, for tuning.run_plan's messages.
SPELLING = Spelling(option=lambda key: f"training_args.{key}: true", resume="AUTO_RESUME_FROM_CHECKPOINT yes",
                    resume_field="AUTO_RESUME_FROM_CHECKPOINT", max_steps="training_args.max_steps",
                    with_deepspeed="set training_args.deepspeed in the config again",
                    without_deepspeed="remove training_args.deepspeed from the config")


def plan(cfg, auto_resume_from_checkpoint: str, data_dir: str, overwrite_output_dir: bool) -> RunPlan:
    """The run the config describes (its method × quantization × ZeRO × precision were checked by load_config)."""
    args = cfg.training_args
    zero_stage = distributed.zero_stage(args.deepspeed) if args.deepspeed else None
    return plan_run(output_dir=args.output_dir, method=method_of(cfg.peft_config),
                    bits=cfg.quantization_bit, zero_stage=zero_stage, resume=auto_resume_from_checkpoint,
                    max_steps=args.max_steps, num_train_epochs=args.num_train_epochs, seed=args.seed, inputs=[data_dir],
                    overwrite=overwrite_output_dir, spelling=SPELLING, resolve=resolve_auto_resume)


def check_method_fits(cfg, model_config) -> None:
    """Refuse a peft config that does not fit the model before any weight is loaded."""
    peft, args = cfg.peft_config, cfg.training_args
    gc_set = "training_args.gradient_checkpointing" in cfg.lines
    if peft is not None and peft.peft_type == "PREFIX_TUNING":
        if gc_set and args.gradient_checkpointing:
            raise cfg.error("training_args.gradient_checkpointing", "peft prefix tuning does not work with gradient "
                                                                     "checkpointing; remove it or set false")
        groups, head_dim = model_config.num_key_value_heads, model_config.head_dim
        if peft.num_attention_heads != groups:
            raise cfg.error("peft_config.num_attention_heads", f"{peft.num_attention_heads} does not fit this model: "
                            f"the prefix is stored per key/value group; expected num_key_value_heads = {groups}")
        if peft.token_dim != groups * head_dim:
            raise cfg.error("peft_config.token_dim", f"{peft.token_dim} does not fit this model: expected "
                            f"key/value groups × head_dim = {groups} × {head_dim} = {groups * head_dim}")
        if peft.num_layers not in (None, model_config.num_hidden_layers):
            raise cfg.error("peft_config.num_layers", f"expected {model_config.num_hidden_layers} or nothing")
    elif peft is not None and isinstance(peft.target_modules, (list, set)):
        family = get_family(get_spec(MODEL_NAME).family)
        unknown = sorted(set(peft.target_modules) - set(family.linear_modules))
        if unknown:
            raise cfg.error("peft_config.target_modules", f"{unknown[0]!r} is not a layer of the native GLM-4 model; "
                            f"use {sorted(family.linear_modules)} (the original query_key_value = "
                            f"{', '.join(family.lora_targets)})")
    if not gc_set:  # the original enabled it when resuming only; we keep training identical either way
        args.gradient_checkpointing = peft is None or peft.peft_type != "PREFIX_TUNING"
    if args.remove_unused_columns:
        raise cfg.error("training_args.remove_unused_columns", "must be false: evaluation reads output_ids")


def weights_dtype(cfg) -> str:
    """bf16 weights as the original ("Must use BFloat 16"), unless mixed precision keeps fp32 master weights or the
    YAML's weights_dtype says which (fp16 on a CPU was refused by load_config, at its line of the YAML)."""
    if cfg.weights_dtype:
        return cfg.weights_dtype
    return "fp32" if (cfg.training_args.bf16 or cfg.training_args.fp16) else "bf16"


# Not in git: data/prepare.py builds it from the shipped xl.jsonl (a fresh clone has no train.jsonl yet).
SHIPPED_TRAIN_FILE = os.path.join(REPO_DIR, "data", "glm4_finetune_demo", "AdvertiseGen", "train.jsonl")


def read_data(cfg, data_dir: str) -> dict:
    """split → validated conversations. A missing dev/test file names its config key (it may simply be removed)."""
    conversations = {}
    for split, name in cfg.data_config.data_files.items():
        path = os.path.join(data_dir, name)
        if split != "train" and not os.path.exists(path):
            key, used = {"validation": ("val_file", "evaluation during training"),
                         "test": ("test_file", "the test scores at the end")}[split]
            raise cfg.error(f"data_config.{key}", f"{path}: file not found; add it to the data folder, or remove "
                                                  f"data_config.{key} from the config (it is only needed for {used})")
        if not os.path.exists(path) and os.path.abspath(path) == SHIPPED_TRAIN_FILE:
            raise UserError("file not found; the shipped AdvertiseGen train.jsonl is made by `python data/prepare.py` "
                            "(or `make data`)", path=path)
        conversations[split] = read_conversations(path)
    return conversations


def finetune(data_dir: str, model_dir: str, config_file: str, auto_resume_from_checkpoint: str = "",
             group_by_length: bool = False, packing: bool = False, overwrite_output_dir: bool = False):
    """The whole recipe; returns the Trainer (its model is the trained one)."""
    # 1. Config, data and resume point: every user mistake surfaces here, before any weight is loaded.
    cfg = load_config(config_file)  # (method × quantization × ZeRO stage × precision checked there, at their lines)
    args = cfg.training_args
    if not os.path.isdir(data_dir):
        raise UserError("data folder not found", path=data_dir)
    conversations = read_data(cfg, data_dir)
    run = plan(cfg, auto_resume_from_checkpoint, data_dir, overwrite_output_dir)
    if packing and run.method == "ptuning":
        raise UserError("packing does not work with P-tuning v2 (the prefix cache turns off the per-row "
                        "attention); use --group_by_length", field="packing")

    from model_hub.loader import load_model_and_tokenizer, load_model_config, resolve_model_path

    model_path = resolve_model_path(model_dir)
    check_method_fits(cfg, load_model_config(model_path))
    claim_output(run, model_path)

    # 2. Tokenizer and model (QLoRA: a frozen 4/8-bit base on this rank's device; left padding, as the original),
    # then the data.
    model, tokenizer = load_model_and_tokenizer(model_path, dtype=weights_dtype(cfg), use_cache=False,
                                                device="cpu" if args.deepspeed and not run.bits
                                                else distributed.local_device(), quantization_bit=run.bits)
    tokenizer.padding_side = "left"
    from glm4_finetune.trainer import tokenize_split

    splits = {split: tokenize_split(rows, split, tokenizer, cfg) for split, rows in conversations.items()}
    for split, dataset in splits.items():
        if len(dataset) == 0:
            raise UserError(f"no {split} examples left after tokenisation",
                            path=os.path.join(data_dir, cfg.data_config.data_files[split]))

    # 3. The tuning method: LoRA / P-tuning v2 through peft, or every weight (gradient checkpointing on the base,
    # done here: the Trainer must not redo it).
    prepare_base(run, model, gradient_checkpointing=args.gradient_checkpointing)
    args.gradient_checkpointing = False
    model = add_method(run, model, None if cfg.peft_config is None else lambda base: peft_model(base, cfg))

    # 4. Generation for evaluation: greedy, stop at <|endoftext|>, <|user|> or <|observation|>.
    spec = get_spec(MODEL_NAME)
    generation = args.generation_config
    generation.pad_token_id, generation.eos_token_id = spec.pad_id, list(spec.stop_ids)
    (model.get_base_model() if cfg.peft_config is not None else model).generation_config = generation
    trainer = build_trainer(model, tokenizer, cfg, splits, group_by_length, packing)

    # 5. Train, save the final weights (the original kept only checkpoint-N), score the test split.
    trainer.train(resume_from_checkpoint=run.resume)
    trainer.save_model()
    if trainer.is_world_process_zero():  # serving/ reads it to build GLM-4's chat prompt
        record_prompt_format(args.output_dir, "glm4_chat", "glm4_finetune")
    if "test" in splits:
        result = trainer.predict(splits["test"])
        trainer.log_metrics("test", result.metrics)
        trainer.save_metrics("test", result.metrics)
        if trainer.is_world_process_zero():
            write_predictions(tokenizer, result, os.path.join(args.output_dir, "test_predictions.jsonl"))
    return trainer


def peft_model(model, cfg):
    """LoRA / P-tuning v2 from the config's peft_config; P-tuning's text positions 0…L−1 as the original."""
    from peft import get_peft_model

    from model_hub.glm4.prefix_positions import number_text_from_zero

    try:
        model = get_peft_model(model, cfg.peft_config)
    except ValueError as exc:
        raise cfg.error("peft_config", str(exc).splitlines()[0]) from None
    number_text_from_zero(model)  # (no-op for LoRA)
    return model


def build_trainer(model, tokenizer, cfg, splits: dict, group_by_length: bool, packing: bool):
    """The generating Seq2SeqTrainer over the training rows (less padding when asked), with the recipes' callbacks."""
    from glm4_finetune.trainer import DataCollator, GenerationTrainer, train_rows
    from model_hub.registry import packed_layout
    from tuning.packing import less_padding
    from tuning.text_metrics import generation_metrics

    args = cfg.training_args
    training_rows = less_padding(
        splits["train"], lambda: [len(ids) for ids in splits["train"]["input_ids"]], rows_fn=train_rows,
        collator=DataCollator(tokenizer, padding="longest", return_tensors="pt"),
        pad_token_id=tokenizer.pad_token_id, packed_layout=packed_layout(model.config), packing=packing,
        group_by_length=group_by_length, capacity=cfg.max_input_length + cfg.max_output_length + 1,
        batch_size=args.per_device_train_batch_size, seed=args.seed)
    return GenerationTrainer(
        model=model, args=args, eval_dataset=splits.get("validation"), processing_class=tokenizer,
        compute_metrics=lambda p: generation_metrics(tokenizer, p.predictions, p.label_ids),
        callbacks=training_callbacks(model), **training_rows.trainer_inputs())


def write_predictions(tokenizer, result, path: str) -> None:
    from tuning.files import atomic_file
    from tuning.text_metrics import decode_rows

    predictions, references = decode_rows(tokenizer, result.predictions), decode_rows(tokenizer, result.label_ids)
    with atomic_file(path) as f:
        for prediction, reference in zip(predictions, references):
            f.write(json.dumps({"prediction": prediction, "reference": reference}, ensure_ascii=False) + "\n")


@app.command(help=__doc__)
def main(
    data_dir: Annotated[str, typer.Argument(help="folder with the .jsonl files named in data_config")],
    model_dir: Annotated[str, typer.Argument(help="native GLM-4 model folder, or tiny:glm-4-9b-chat")],
    config_file: Annotated[str, typer.Argument(help="YAML config, e.g. glm4_finetune/configs/lora.yaml")],
    auto_resume_from_checkpoint: Annotated[str, typer.Argument(
        help="empty/no = fresh; yes = newest checkpoint-N in output_dir; N = checkpoint-N")] = "",
    group_by_length: Annotated[bool, typer.Option(
        "--group_by_length", help="opt-in: batches of rows of similar length (less padding)")] = False,
    packing: Annotated[bool, typer.Option(
        "--packing", help="opt-in: several rows per training row, each with its own positions and attention "
                          "(same loss, far less padding; LoRA and full fine-tuning)")] = False,
    overwrite_output_dir: Annotated[bool, typer.Option(
        "--overwrite_output_dir", help="allow an output_dir that is not empty and not an earlier training output "
                                       "(its README.md, loss.png, model files may be replaced); never the home "
                                       "folder, the current folder or the data's folder")] = False,
):
    finetune(data_dir, model_dir, config_file, auto_resume_from_checkpoint, group_by_length, packing,
             overwrite_output_dir)


if __name__ == "__main__":
    distributed.drop_local_rank_argument(sys.argv)  # the deepspeed launcher's; LOCAL_RANK says the same
    run_main(app)
