"""What test.py and predict.py share: their config (train_args.json + overrides), loading base + adapter, the
original's teacher-forced decoding, and what the original lacked: free generation, entity parsing and the F1
report (tuning.ner_metrics)."""
import json
import os
import random
import sys

import numpy as np
import torch

from llama_ner.common import BASE_CONFIG, EXTRA_CONFIG, load_train_args
from llama_ner.config_utils import ConfigParser
from llama_ner.process import ordered_types
from tuning.errors import UserError
from tuning.files import atomic_file
from tuning.generation import generate_batched
from tuning.ner_metrics import format_table, ner_scores, parse_entities

DEFAULT_TRAIN_ARGS = "./checkpoint/msra/train_trainer/adapter_model/train_args.json"


def parse_eval_args(extra: dict, help_text: str, argv=None):
    """train_args.json (as the original: written by training) + this script's keys, overridden by --key=value.

    --train_args=PATH picks another run's train_args.json (the original had the path hard-coded).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    path = DEFAULT_TRAIN_ARGS
    for arg in argv:
        if arg.startswith("--train_args="):
            path = arg.split("=", 1)[1]
    wants_help = any(a in ("-h", "--help") for a in argv)
    trained = {**BASE_CONFIG, **EXTRA_CONFIG} if wants_help and not os.path.isfile(path) else load_train_args(path)
    config = {**{k: v for k, v in {**BASE_CONFIG, **EXTRA_CONFIG}.items() if k not in trained}, **trained,
              "train_args": path, **{k: v for k, v in extra.items() if k not in trained}}
    return ConfigParser(config, argv, help_text=help_text).parse_main()


def find_adapter(save_dir: str) -> str:
    """save_dir/adapter_model (train_trainer.py), or save_dir itself (train_deepspeed.py saves there)."""
    for folder in (os.path.join(save_dir, "adapter_model"), save_dir):
        if os.path.isfile(os.path.join(folder, "adapter_config.json")):
            return folder
    raise UserError("no adapter found (expected adapter_model/adapter_config.json); train first",
                    path=save_dir, field="save_dir")


def load_model(args):
    """Base model + the trained LoRA, in eval mode (bf16 if the run used it, fp16/bf16 on a GPU, else fp32; the
    base in 4/8 bits if the run was QLoRA, unless --quantization_bit=0)."""
    from model_hub.loader import load_adapted

    adapter = find_adapter(args.save_dir)
    if os.path.isfile(args.train_args) and load_train_args(args.train_args).get("model_dir") == args.model_dir:
        from model_hub.loader import resolve_recorded_model_path

        resolve_recorded_model_path(args.model_dir, f"model_dir in {args.train_args}", "--model_dir=PATH")
    model, tokenizer = load_adapted(args.model_dir, adapter, dtype="bf16" if getattr(args, "bf16", False) else "auto",
                                    quantization_bit=getattr(args, "quantization_bit", None), base_flag="--model_dir")
    print(f"model: {args.model_dir} + adapter {adapter}")
    return model, tokenizer


def decode_teacher_forced(argmax_ids, labels, tokenizer) -> tuple[list[str], list[str]]:
    """The original's lines: next-token argmax at every answer position (prediction t+1 from position t),
    everything else replaced by pad, decoded without special tokens."""
    argmax_ids, labels = np.asarray(argmax_ids), np.asarray(labels)
    preds, labels = argmax_ids[:, :-1], labels[:, 1:]
    preds = np.where(labels != -100, preds, tokenizer.pad_token_id)
    labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
    return (tokenizer.batch_decode(preds, skip_special_tokens=True),
            tokenizer.batch_decode(labels, skip_special_tokens=True))


@torch.no_grad()
def teacher_forced(model, collate, rows, batch_size: int, shuffle: bool = False, seed: int = 42):
    """(decoded predictions, decoded labels) of one teacher-forced forward pass per batch, as the original."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(rows, batch_size=batch_size, shuffle=shuffle, drop_last=False,
                        collate_fn=collate.collate_fn, generator=generator)
    device = next(model.parameters()).device
    all_preds, all_trues = [], []
    for batch in tqdm(loader, desc="teacher-forced", unit="batch"):
        logits = model(input_ids=batch["input_ids"].to(device)).logits
        preds, trues = decode_teacher_forced(logits.argmax(-1).cpu().numpy(), batch["labels"].numpy(),
                                             collate.tokenizer)
        all_preds.extend(preds)
        all_trues.extend(trues)
    return all_preds, all_trues


def generate_answers(model, tokenizer, collate, rows, batch_size: int, max_new_tokens: int, desc="generating"):
    """Free greedy generation from the training prompt + "<s>", up to "</s>"."""
    prompts = [collate.prompt_ids(row) for row in rows]
    outputs = generate_batched(model, prompts, pad_id=tokenizer.pad_token_id, stop_ids=[tokenizer.eos_token_id],
                               batch_size=batch_size, desc=desc, max_new_tokens=max_new_tokens, do_sample=False)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]


def pick_rows(rows: list[str], n: int, seed: int) -> list[str]:
    """All rows (n <= 0), or n of them chosen with a fixed seed, kept in file order."""
    if n <= 0 or n >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def score_split(name: str, path: str, rows, predictions, response_column: str) -> dict:
    references = [json.loads(r)[response_column] for r in rows]
    # a row per type of the gold answers (MSRA's three always, as before); a type only predicted gets one too
    found = {kind for answer in references for _, kind in parse_entities(answer).entities}
    scores = ner_scores(predictions, references, ordered_types(found))
    print(format_table(scores, f"== {name}: {path} ({len(rows)} rows, free generation) =="))
    return {"path": path, "rows": len(rows), "scores": scores,
            "predictions": [{"query": json.loads(r).get("query"), "answer": ref, "prediction": pred}
                            for r, ref, pred in zip(rows, references, predictions)]}


def write_report(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as f:
        json.dump(report, f, ensure_ascii=False, indent=2)
    print(f"report: {path}")
