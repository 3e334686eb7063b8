"""Trainer glue of the GLM-4 recipe: tokenised datasets with counts, the collator, and the Seq2SeqTrainer whose
evaluation generates an answer per example and scores it (as finetune_demo's finetune.py)."""
import json
import uuid

import torch
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

from tuning.checkpoints import AtomicCheckpoints
from tuning.training import data_note

from .data import process_batch, process_batch_eval

UNLIMITED = 10**9


def _train_map(batch, tokenizer, max_input_length, max_output_length, combine, train_first_answer_token=True):
    """process_batch, recording each row's untruncated length so truncation can be reported."""
    conversations = {"messages": [json.loads(m) for m in batch["messages"]]}
    full = process_batch(conversations, tokenizer, UNLIMITED, 0, combine, train_first_answer_token)
    limit = max_input_length + max_output_length + 1  # the original's cut, applied after measuring
    return {"input_ids": [ids[:limit] for ids in full["input_ids"]],
            "labels": [labels[:limit] for labels in full["labels"]],
            "full_length": [len(ids) for ids in full["input_ids"]]}


def _eval_map(batch, tokenizer, max_input_length, max_output_length, combine):
    """process_batch_eval per conversation, recording how many assistant turns gave no example."""
    out = {"input_ids": [], "output_ids": [], "skipped_turns": []}
    for text in batch["messages"]:
        conversation = json.loads(text)
        rows = process_batch_eval({"messages": [conversation]}, tokenizer, max_input_length, max_output_length,
                                  combine)
        turns = 1 if combine else sum(m["role"] == "assistant" for m in conversation)
        for i, (input_ids, output_ids) in enumerate(zip(rows["input_ids"], rows["output_ids"])):
            out["input_ids"].append(input_ids)
            out["output_ids"].append(output_ids)
            out["skipped_turns"].append(turns - len(rows["input_ids"]) if i == 0 else 0)
        if not rows["input_ids"]:  # a placeholder row that only carries the count; removed below
            out["input_ids"].append([])
            out["output_ids"].append([])
            out["skipped_turns"].append(turns)
    return out


def tokenize_split(conversations, split: str, tokenizer, cfg) -> "datasets.Dataset":
    """Messages → ids with the original functions (via datasets.map, num_proc); prints what was cut or dropped."""
    from datasets import Dataset

    raw = Dataset.from_dict({"messages": [json.dumps(c, ensure_ascii=False) for c in conversations]})
    train = split == "train"
    kwargs = dict(tokenizer=tokenizer, max_input_length=cfg.max_input_length,
                  max_output_length=cfg.max_output_length, combine=cfg.combine)
    if train:
        kwargs["train_first_answer_token"] = cfg.train_first_answer_token
    num_proc = cfg.data_config.num_proc if (cfg.data_config.num_proc or 1) > 1 else None  # 1 would still fork
    mapped = raw.map(_train_map if train else _eval_map, batched=True, fn_kwargs=kwargs, remove_columns=["messages"],
                     num_proc=num_proc, desc=f"tokenizing {split}",
                     new_fingerprint=f"glm4-{split}-{uuid.uuid4().hex}")  # hashing the tokenizer takes seconds
    if train:
        limit = cfg.max_input_length + cfg.max_output_length + 1
        lengths = mapped["full_length"]
        truncated = sum(n > limit for n in lengths)
        keep = [i for i, labels in enumerate(mapped["labels"]) if any(t != -100 for t in labels)]
        data_note(f"{split}: {len(mapped)} rows; {truncated} cut to {limit} tokens "
                  f"(max_input_length + max_output_length + 1); {len(mapped) - len(keep)} dropped because the cut "
                  "removed every label")
        return mapped.select(keep).remove_columns(["full_length"])
    skipped = sum(mapped["skipped_turns"])
    keep = [i for i, ids in enumerate(mapped["input_ids"]) if ids]
    data_note(f"{split}: {len(keep)} examples from {len(conversations)} conversations; {skipped} assistant turns "
              f"without an example (history already at max_input_length = {cfg.max_input_length})")
    return mapped.select(keep).remove_columns(["skipped_turns"])


class DataCollator(DataCollatorForSeq2Seq):
    """The stock seq2seq collator (inputs padded on the tokenizer's side, left for GLM-4; labels with -100), plus
    evaluation references `output_ids` padded on the right with the pad id to the longest in the batch."""

    def __call__(self, features, return_tensors=None):
        if features and "output_ids" in features[0]:
            longest = max(len(f["output_ids"]) for f in features)
            if self.pad_to_multiple_of:
                longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
            pad = self.tokenizer.pad_token_id
            features = [{**f, "output_ids": list(f["output_ids"]) + [pad] * (longest - len(f["output_ids"]))}
                        for f in features]
        batch = super().__call__(features, return_tensors)
        if batch.get("labels") is None:  # the stock collator adds labels=None, which reads as "has labels"
            batch.pop("labels", None)
        return batch


def train_rows(features) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of tokenised training rows, for --packing."""
    return [(list(f["input_ids"]), list(f["labels"])) for f in features]


class GenerationTrainer(AtomicCheckpoints, Seq2SeqTrainer):
    """Evaluation = generate from input_ids, keep only the new tokens, compare them with output_ids.
    Checkpoints are written atomically (tuning/checkpoints.py)."""

    resume_hint = "yes as the 4th argument (AUTO_RESUME_FROM_CHECKPOINT)"

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        with torch.no_grad():
            output_ids = inputs.pop("output_ids", None)
            prompt_length = inputs["input_ids"].size(1)
            loss, generated, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys,
                                                         **gen_kwargs)
            if generated is not None:
                generated = generated[:, prompt_length:]
        return loss, generated, output_ids

