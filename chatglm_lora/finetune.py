"""ChatGLM-Tuning's finetune.py: LoRA on ChatGLM-6B over the rows made by tokenize_dataset_rows.py.

Same arguments as the original (FinetuneArguments + transformers' TrainingArguments), e.g. the README's run:

    python chatglm_lora/finetune.py --dataset_path data/alpaca --lora_rank 8 --per_device_train_batch_size 6 \
        --gradient_accumulation_steps 1 --max_steps 52000 --save_steps 1000 --save_total_limit 2 \
        --learning_rate 1e-4 --fp16 --remove_unused_columns false --logging_steps 50 --output_dir output \
        --chatglm_path model_path/chatglm

Every output_dir/checkpoint-N/ is a loadable PEFT adapter (adapter_config.json + adapter_model.safetensors) with
the Trainer state; `--resume_from_checkpoint PATH|N|last` resumes exactly; the final adapter, TensorBoard logs
(output_dir/runs/) and loss.png land in output_dir. On CPU use fp32 or --bf16 (fp16 is refused).
Several processes: `torchrun --nproc_per_node N chatglm_lora/finetune.py ...` (DDP) or `deepspeed --num_gpus N
chatglm_lora/finetune.py ... --deepspeed glm4_finetune/configs/ds_zero_2.json` (see README.md, Distributed
training); 8-bit base weights work with DDP and ZeRO-1/2, not with ZeRO-3.
QLoRA: `--quantization_bit 4` loads the base in nf4 (bitsandbytes, double quantization, bf16 compute; CPU too),
`--quantization_bit 8` = `--load_in_8bit true`; the adapter is a normal PEFT adapter of the full-precision base.
"""
import dataclasses
import os
from dataclasses import dataclass, field


import tuning  # noqa: F401  (first: silences library lines no user can act on, before those load)
import torch
from transformers import HfArgumentParser, TrainingArguments

from model_hub.loader import quantization_bits, resolve_model_path
from model_hub.prompt_format import record_prompt_format
from model_hub.registry import get_family, packed_layout
from tuning import distributed
from tuning.checkpoints import AtomicTrainer, save_pretrained_atomically
from tuning.errors import UserError, run_main
from tuning.labelled_logits import compute_logits_only_at_labels
from tuning.methods import apply_lora
from tuning.packing import less_padding
from tuning.run_plan import (Spelling, add_method, check_combination, claim_output, plan_run, prepare_base,
                             training_callbacks)

# How this script's user says things, for tuning.run_plan's messages.
SPELLING = Spelling(with_deepspeed="pass the same --deepspeed CONFIG again", without_deepspeed="leave out --deepspeed")


@dataclass
class FinetuneArguments:
    dataset_path: str = field(default="data/alpaca", metadata={"help": "folder written by tokenize_dataset_rows.py"})
    model_path: str = field(default="output", metadata={"help": "unused (kept from the original)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA r (alpha 32, dropout 0.1, target query_key_value)"})
    chatglm_path: str = field(default="model_path/chatglm", metadata={"help": "ChatGLM-6B folder or tiny:chatglm-6b"})
    load_in_8bit: bool | None = field(default=None, metadata={
        "help": "8-bit base weights (bitsandbytes); default: on when a GPU and bitsandbytes are present, as the "
                "original, off otherwise"})
    quantization_bit: int | None = field(default=None, metadata={
        "help": "4: QLoRA, base weights in nf4 (bitsandbytes; CPU or GPU); 8: the same as --load_in_8bit true"})
    gradient_checkpointing_base: bool = field(default=True, metadata={
        "help": "gradient checkpointing on the base model, as the original always did"})
    group_by_length: bool = field(default=False, metadata={
        "help": "opt-in: batches of rows of similar length (less padding; every row once per epoch)"})
    packing: bool = field(default=False, metadata={
        "help": "opt-in: pack several rows into each training row (own positions and attention per row; "
                "same loss as unpacked, far less padding; fewer, fuller steps per epoch)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "allow an output_dir that is not empty and not an earlier training output (its README.md, loss.png, "
                "adapter files may be replaced); never the home folder, the current folder or the data's folder"})
    lm_head_on_labels_only: bool = field(default=False, metadata={
        "help": "opt-in: compute the LM head and the loss only at trained positions (the answer tokens): same loss "
                "and gradients, far less work with ChatGLM's 130k vocabulary"})


@dataclass
class DataCollator:
    """The original collator: longest row first, right padding with pad id, labels from <sop> on."""
    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        ordered = sorted(features, key=lambda f: -len(f["input_ids"]))  # stable, as the original's sort
        input_ids, labels = [], []
        for ids, row_labels in self.rows(ordered):
            pad = longest - len(ids)
            labels.append(row_labels + [-100] * pad)
            input_ids.append(ids + [self.pad_token_id] * pad)
        return {"input_ids": torch.LongTensor(input_ids), "labels": torch.LongTensor(labels)}

    @staticmethod
    def rows(features: list[dict]) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per row, unpadded."""
        out = []
        for f in features:
            ids, seq_len = list(f["input_ids"]), f["seq_len"]
            out.append((ids, [-100] * (seq_len - 1) + ids[seq_len - 1:]))
        return out


def load_rows(path: str):
    from datasets import load_from_disk

    from tuning.publish import recover_replaced

    recover_replaced(path)  # a replacement of this folder killed midway: the old folder is put back
    if not os.path.isdir(path):
        raise UserError("dataset folder not found; make it with tokenize_dataset_rows.py", path=path)
    try:
        dataset = load_from_disk(path)
    except Exception as exc:  # datasets raises several types for a folder that is not a saved dataset
        raise UserError(f"not a saved `datasets` folder ({type(exc).__name__}); make it with "
                        "tokenize_dataset_rows.py", path=path) from None
    missing = {"input_ids", "seq_len"} - set(dataset.column_names)
    if missing:
        raise UserError(f"missing columns {sorted(missing)}; expected input_ids and seq_len", path=path)
    if len(dataset) == 0:
        raise UserError("dataset is empty", path=path)
    check_rows(dataset, path)
    return dataset


def check_rows(dataset, path: str) -> None:
    """Every row: integer input_ids with 1 <= seq_len < len(input_ids), i.e. at least one target token to learn
    (the collator would otherwise train on nothing, or index out of the row). Checked on the Arrow columns."""
    import numpy as np
    import pyarrow.compute as pc

    ids, seq_len = str(dataset.features["input_ids"]), str(dataset.features["seq_len"])
    if not (ids.startswith(("List(", "Sequence(", "LargeList(")) and "int" in ids):
        raise UserError(f"expected a list of integers, got {ids}", path=path, field="input_ids")
    if not (seq_len.startswith("Value(") and "int" in seq_len):
        raise UserError(f"expected an integer, got {seq_len}", path=path, field="seq_len")
    lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False)
    starts = dataset.data.column("seq_len").to_numpy()
    bad = np.flatnonzero((starts < 1) | (starts >= lengths))
    if len(bad):
        i = int(bad[0])
        raise UserError(f"row {i}: seq_len {int(starts[i])} must be between 1 and len(input_ids) - 1 = "
                        f"{int(lengths[i]) - 1} ({len(bad)} such rows); rebuild with tokenize_dataset_rows.py",
                        path=path, field="seq_len")


def parse_arguments(argv: list[str] | None = None) -> tuple[FinetuneArguments, TrainingArguments]:
    """The original's two dataclasses from the command line, with the launch setup of tuning.distributed added
    before TrainingArguments is built (it creates the process state: torchrun DDP or DeepSpeed, GPU or CPU)."""
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(f"unknown arguments {unknown}", field="arguments")
    values = vars(namespace)
    finetune_args = FinetuneArguments(**{f.name: values.pop(f.name) for f in dataclasses.fields(FinetuneArguments)})
    bits = quantization_bits(finetune_args.quantization_bit, bool(finetune_args.load_in_8bit))  # 4/8, no contradiction
    stage = distributed.zero_stage(values["deepspeed"]) if values.get("deepspeed") else None
    eight_bit_flag = dict(quantized_by="load_in_8bit", zero3_advice="use a ZeRO-1/2 config (e.g. glm4_finetune/"
                          "configs/ds_zero_2.json) or --load_in_8bit false") if finetune_args.load_in_8bit else {}
    check_combination(method="lora", bits=bits, zero_stage=stage, fp16=values["fp16"], bf16=values["bf16"],
                      use_cpu=values["use_cpu"], **eight_bit_flag)
    if stage == 3 and finetune_args.load_in_8bit is None:
        finetune_args.load_in_8bit = False  # the GPU default would be 8-bit; ZeRO-3 shards 16-bit weights
    try:
        training_args = TrainingArguments(**distributed.trainer_arguments(values))
    except ValueError as exc:  # TrainingArguments rejects inconsistent flags in __post_init__
        raise UserError(str(exc).splitlines()[0], field="arguments") from None
    return finetune_args, training_args


def main():
    finetune_args, training_args = parse_arguments()  # method × quantization × ZeRO stage × precision checked there
    training_args.remove_unused_columns = False  # the collator needs seq_len (the README had to say so)
    if not training_args.report_to or training_args.report_to in ("none", ["none"]):
        training_args.report_to = ["tensorboard"]
    load_in_8bit = finetune_args.load_in_8bit
    if load_in_8bit is None:  # the original's 8-bit default on a GPU, unless 4 bits were asked for
        load_in_8bit = distributed.local_device().type == "cuda" and _has_bitsandbytes() and \
            not finetune_args.quantization_bit
    run = plan_run(output_dir=training_args.output_dir, method="lora",
                   bits=quantization_bits(finetune_args.quantization_bit, load_in_8bit),
                   zero_stage=distributed.zero_stage(training_args.deepspeed) if training_args.deepspeed else None,
                   resume=training_args.resume_from_checkpoint, max_steps=training_args.max_steps,
                   num_train_epochs=training_args.num_train_epochs, seed=training_args.seed,
                   inputs=[finetune_args.dataset_path], overwrite=finetune_args.overwrite_output_dir,
                   spelling=SPELLING)
    dataset = load_rows(finetune_args.dataset_path)  # validate data before loading the model
    distributed.say(f"train rows: {len(dataset)}")  # the original printed the bare number
    claim_output(run, resolve_model_path(finetune_args.chatglm_path))  # a wrong path: one line, nothing written

    device = distributed.local_device()
    dtype = "bf16" if training_args.bf16 else ("fp16" if training_args.fp16 else ("auto" if device.type == "cuda"
                                                                                  else "fp32"))
    # 8-bit: the original's device_map="auto" alone; one whole copy per GPU under a launcher (DDP / ZeRO-1/2).
    placement = {"device_map": {"": device}} if run.bits and distributed.world_size() > 1 else {}
    from model_hub.loader import load_model_and_tokenizer  # (looked up now: bench.gpu_check measures through it)

    model, tokenizer = load_model_and_tokenizer(finetune_args.chatglm_path, dtype=dtype, quantization_bit=run.bits,
                                                device=None if run.bits else device, **placement)
    prepare_base(run, model, gradient_checkpointing=finetune_args.gradient_checkpointing_base)
    model = add_method(run, model, lambda base: apply_lora(base, r=finetune_args.lora_rank,
                                                           **get_family("chatglm6b").lora()))
    if finetune_args.lm_head_on_labels_only:
        compute_logits_only_at_labels(model)

    collator = DataCollator(tokenizer.pad_token_id)
    training_rows = less_padding(
        dataset, lambda: [len(ids) for ids in dataset["input_ids"]], rows_fn=collator.rows, collator=collator,
        pad_token_id=tokenizer.pad_token_id, packed_layout=packed_layout(model.config),
        packing=finetune_args.packing, group_by_length=finetune_args.group_by_length, capacity=None,
        batch_size=training_args.per_device_train_batch_size, seed=training_args.seed)
    trainer = AtomicTrainer(model=model, args=training_args, callbacks=training_callbacks(model),
                            **training_rows.trainer_inputs())
    trainer.train(resume_from_checkpoint=run.resume)
    # Collective: under ZeRO-3 the LoRA shards are gathered on every rank, rank 0 writes.
    distributed.save_trainable(model, lambda trained: save_pretrained_atomically(trained.save_pretrained,
                                                                                 training_args.output_dir))
    if distributed.is_main():  # serving/ reads it to build the prompt this adapter was trained on
        record_prompt_format(training_args.output_dir, "chatglm_tuning", "chatglm_lora")
    distributed.say(f"adapter: {training_args.output_dir}")
    distributed.say(f"tensorboard: {os.path.join(training_args.output_dir, 'runs')}")
    distributed.say(f"loss curve: {os.path.join(training_args.output_dir, 'loss.png')}")
    return trainer


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken CUDA setup raises more than ImportError
        return False
    return True


if __name__ == "__main__":
    run_main(main)
