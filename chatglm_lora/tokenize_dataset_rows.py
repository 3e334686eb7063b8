"""ChatGLM-Tuning's tokenizer step: {"context","target"} jsonl → a `datasets` folder of (input_ids, seq_len) rows.

Row layout (ChatGLM-6B, --version v1):  [prompt ids][gMASK][<sop>][target ids][<eop>],  seq_len = len(prompt + 2).
Also reads alpaca records (JSON list or lines), multi-turn rows with a `history`, and the older
{"text": "### Instruction:…### Response:…END"} lines (chatglm_lora/data_formats.py). `--check_only true` prints
what training would get from the file (rows kept, dropped, truncated, token lengths) and writes nothing.
By default all texts go through SentencePiece in one multi-threaded call and the rows are written with pyarrow
(no torch, no `datasets` import); `--one_row_at_a_time true` is the original's row-by-row design. Both give the
same rows and the same saved folder (tests/test_tokenize_fast.py).

    python chatglm_lora/tokenize_dataset_rows.py --jsonl_path data/alpaca_data.jsonl --save_path data/alpaca \
        --max_seq_length 384 --chatglm_path tiny:chatglm-6b
"""
import argparse
import contextlib
import gc
import os

from chatglm_lora.data_formats import OLD_TEXT, held_out, read_rows  # noqa: F401  (OLD_TEXT: tests and benchmarks)
from model_hub.chatglm6b.text import VOCAB_FILE, ChatGLMTextEncoder
from tuning.data_check import DataReport
from tuning.datasets_folder import save_table, token_rows_table
from tuning.errors import UserError, parse_bool, run_main
from tuning.files import atomic_dir, require_output_parent
from tuning.outputs import check_output_folder


def tokenize_rows(tokenizer, eos_id: int, contexts, targets, max_seq_length: int):
    """The original preprocess(), one row at a time through the transformers tokenizer: prompt and target are
    truncated separately, then eos appended. Returns (input_ids, seq_len) per row."""
    rows = []
    for context, target in zip(contexts, targets):
        prompt_ids = tokenizer.encode(context, max_length=max_seq_length, truncation=True)
        target_ids = tokenizer.encode(target, max_length=max_seq_length, truncation=True, add_special_tokens=False)
        rows.append((prompt_ids + target_ids + [eos_id], len(prompt_ids)))
    return rows


def tokenizer_folder(chatglm_path: str) -> str:
    """The folder holding ice_text.model; a ready folder is used as is, without importing torch (model_hub)."""
    if not chatglm_path.startswith("tiny:") and os.path.isfile(os.path.join(chatglm_path, VOCAB_FILE)):
        return chatglm_path
    from model_hub.loader import resolve_model_path

    folder = resolve_model_path(chatglm_path)  # builds tiny:NAME on first use; one-line errors for bad paths
    if not os.path.isfile(os.path.join(folder, VOCAB_FILE)):
        raise UserError(f"no {VOCAB_FILE}: not a ChatGLM-6B tokenizer folder", path=folder)
    return folder


@contextlib.contextmanager
def cyclic_gc_paused():
    """Token rows are acyclic lists of ints; with 100k+ of them alive the cyclic collector only re-scans them
    (≈ 0.5 CPU-s of a 52k-row run), so it is paused while they are built."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tokenize_rows_fast(encoder: ChatGLMTextEncoder, contexts, targets, max_seq_length: int, num_threads: int,
                       chunk_rows: int = 4096):
    """The same rows as tokenize_rows, with SentencePiece called once per chunk of rows instead of per text.

    The transformers tokenizer's truncation is reproduced: the prompt keeps its first max_seq_length - 2 ids,
    then [gMASK] <sop>; the target keeps its first max_seq_length ids. Chunks run on `num_threads` threads:
    SentencePiece releases the GIL, so one chunk's encoding overlaps another's Python work. The rare row with a
    special-token string ("<sop>", "<pad>", ...) goes through the transformers tokenizer, which splits those out.
    Returns (input_ids, seq_len) per row; the eos id is the tokenizer's <eop>, as in the model's config.
    """
    from concurrent.futures import ThreadPoolExecutor

    contexts, targets = list(contexts), list(targets)
    special, eos = [encoder.gmask_id, encoder.bos_id], [encoder.eos_id]

    def chunk(start: int) -> list:
        size = min(chunk_rows, len(contexts) - start)
        encoded = encoder.encode(contexts[start:start + size] + targets[start:start + size], num_threads=1)
        rows = []
        for prompt, target in zip(encoded[:size], encoded[size:]):
            if prompt is None or target is None:
                rows.append(None)  # done below, with the transformers tokenizer
                continue
            prompt = prompt[:max_seq_length - 2] + special
            rows.append((prompt + target[:max_seq_length] + eos, len(prompt)))
        return rows

    with cyclic_gc_paused(), ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        rows = [row for part in pool.map(chunk, range(0, len(contexts), chunk_rows)) for row in part]
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        from model_hub.loader import load_tokenizer

        tokenizer = load_tokenizer(encoder.folder)
        for i, row in zip(missing, tokenize_rows(tokenizer, encoder.eos_id, [contexts[i] for i in missing],
                                                 [targets[i] for i in missing], max_seq_length)):
            rows[i] = row
    return rows


def fit_row(input_ids: list[int], seq_len: int, max_seq_length: int, skip_overlength: bool):
    """(the row's ids cut to max_seq_length, or None when dropped; what happened: None, "truncated" or a drop)."""
    if len(input_ids) <= max_seq_length:
        return input_ids, None
    if skip_overlength:
        return None, "skipped_overlength"
    if max_seq_length <= seq_len:  # the prompt fills the row: nothing left to learn
        return None, "dropped_no_target"
    return input_ids[:max_seq_length], "truncated"


@cyclic_gc_paused()
def fit_rows(tokenized, max_seq_length: int, skip_overlength: bool):
    """Keep, truncate or skip each row by length; returns (kept rows, counts)."""
    kept, counts = [], {"truncated": 0, "skipped_overlength": 0, "dropped_no_target": 0}
    for input_ids, seq_len in tokenized:
        input_ids, what = fit_row(input_ids, seq_len, max_seq_length, skip_overlength)
        if what:
            counts[what] += 1
        if input_ids is not None:
            kept.append({"input_ids": input_ids, "seq_len": seq_len})
    return kept, counts


def check_rows(path: str, contexts, targets, empty: int, encoder, args) -> None:
    """--check_only: the training step's counts and the full (uncut) token lengths, nothing written.

    The rows are tokenized without a length limit; cutting them afterwards classifies every row exactly as
    tokenizing at max_seq_length does (a row is over length, or its prompt fills the row, in both or neither).
    """
    report = DataReport(path, args.max_seq_length, "--max_seq_length")
    report.rows_read = len(contexts) + empty
    report.drop("empty target", empty)
    reasons = {"skipped_overlength": "over --max_seq_length, --skip_overlength true",
               "dropped_no_target": "prompt fills --max_seq_length, no target left"}
    for input_ids, seq_len in tokenize_rows_fast(encoder, contexts, targets, 10 ** 9, args.num_proc):
        kept, what = fit_row(input_ids, seq_len, args.max_seq_length, args.skip_overlength)
        if kept is None:
            report.drop(reasons[what])
        else:
            report.keep(len(input_ids), what == "truncated")
    report.print()
    if not report.kept:
        raise UserError("no rows left to train on", path=path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl_path", type=str, default="data/alpaca_data.jsonl")
    parser.add_argument("--save_path", type=str, default="data/alpaca", help="output `datasets` folder")
    parser.add_argument("--max_seq_length", type=int, default=384)
    parser.add_argument("--skip_overlength", type=parse_bool, default=False,
                        help="true: drop rows longer than max_seq_length; false (default): truncate them")
    parser.add_argument("--chatglm_path", type=str, default="model_path/chatglm",
                        help="ChatGLM-6B folder, or tiny:chatglm-6b")
    parser.add_argument("--version", type=str, default="v1", choices=["v1", "v2"],
                        help="v1 = ChatGLM-6B; v2 = ChatGLM2-6B (not supported here)")
    parser.add_argument("--num_proc", type=int, default=min(2, os.cpu_count() or 1),
                        help="threads of the fast path's SentencePiece call (default: up to 2)")
    parser.add_argument("--one_row_at_a_time", type=parse_bool, default=False,
                        help="true: the original's design, every row through the transformers tokenizer one at a "
                             "time and saved with `datasets` (kept for the benchmark and the identity test); "
                             "false (default): the fast path, one multi-threaded SentencePiece call for all texts "
                             "and the rows written with pyarrow: identical rows and saved folder "
                             "(tests/test_tokenize_fast.py), about 10x faster")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --save_path even when it is a non-empty folder that is not an earlier output "
                             "of this command (its files are deleted); an earlier output is replaced without it")
    parser.add_argument("--check_only", type=parse_bool, default=False,
                        help="true: validate and tokenize --jsonl_path as training would and print rows read, kept, "
                             "dropped (by reason), truncated and the token-length distribution; write nothing")
    parser.add_argument("--eval_fraction", type=float, default=0.0,
                        help="> 0: leave this fraction of the rows out of training (drawn with --seed); "
                             "evaluate.py --eval_fraction with the same values scores exactly those rows")
    parser.add_argument("--seed", type=int, default=42, help="seed of --eval_fraction's draw (default: 42)")
    return parser


def check_args(args) -> None:
    if args.version == "v2":
        raise UserError("not supported: no ChatGLM2-6B tokenizer/model here; use --version v1 (ChatGLM-6B)",
                        field="version")
    if args.max_seq_length < 4:
        raise UserError("must be at least 4 (prompt + [gMASK] <sop> + eos)", field="max_seq_length")
    if args.num_proc < 1:
        raise UserError(f"must be at least 1, got {args.num_proc}", field="num_proc")
    if not args.check_only:
        require_output_parent(args.save_path, "folder")
        check_output_folder(args.save_path, "datasets", inputs=[args.jsonl_path, args.chatglm_path],
                            overwrite=args.overwrite)


def tokenize(args, contexts: list[str], targets: list[str]) -> list[dict]:
    """The original's design (--one_row_at_a_time: the transformers tokenizer row by row) or the fast path."""
    if args.one_row_at_a_time:
        from model_hub.loader import load_tokenizer
        from model_hub.registry import get_spec

        tokenizer = load_tokenizer(args.chatglm_path)
        return tokenize_rows(tokenizer, get_spec("chatglm-6b").stop_ids[0], contexts, targets, args.max_seq_length)
    encoder = ChatGLMTextEncoder(tokenizer_folder(args.chatglm_path))
    return tokenize_rows_fast(encoder, contexts, targets, args.max_seq_length, args.num_proc)


def save(args, kept: list[dict]) -> None:
    inputs = [args.jsonl_path, args.chatglm_path]
    if args.one_row_at_a_time:
        from datasets import Dataset

        with atomic_dir(args.save_path, "datasets", inputs=inputs, overwrite=args.overwrite) as tmp:
            Dataset.from_list(kept).save_to_disk(tmp)
    else:
        save_table(token_rows_table([r["input_ids"] for r in kept], [r["seq_len"] for r in kept]), args.save_path,
                   inputs, args.overwrite)


def main():
    args = build_parser().parse_args()
    check_args(args)
    rows = read_rows(args.jsonl_path)  # validate the whole file before loading anything heavy
    if args.eval_fraction:
        dev = held_out(len(rows), args.eval_fraction, args.seed)
        rows = [row for i, row in enumerate(rows) if i not in dev]
        print(f"held out {len(dev)} rows for evaluation (--eval_fraction {args.eval_fraction}, --seed {args.seed})")
    empty = [line for line, _, target in rows if not target.strip()]
    rows = [row for row in rows if row[2].strip()]
    if args.check_only:
        encoder = ChatGLMTextEncoder(tokenizer_folder(args.chatglm_path))
        return check_rows(args.jsonl_path, [r[1] for r in rows], [r[2] for r in rows], len(empty), encoder, args)
    if not rows:  # (not a length problem: raising --max_seq_length would not help)
        raise UserError("every row's target is empty: nothing to train on", path=args.jsonl_path, field="target")
    kept, counts = fit_rows(tokenize(args, [r[1] for r in rows], [r[2] for r in rows]), args.max_seq_length,
                            args.skip_overlength)
    if not kept:
        raise UserError("no rows left after length filtering; raise --max_seq_length", path=args.jsonl_path)
    save(args, kept)
    print(f"saved {len(kept)} rows to {args.save_path} (max_seq_length {args.max_seq_length})")
    if empty:
        print(f"dropped {len(empty)} rows with an empty target (lines {', '.join(map(str, empty[:10]))}"
              f"{', …' if len(empty) > 10 else ''})")
    for what, n in counts.items():
        if n:
            print(f"{what.replace('_', ' ')}: {n}")


if __name__ == "__main__":
    run_main(main)
