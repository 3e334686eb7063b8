"""Check a file of instruction rows before training on it: the same validation and tokenization as
train_trainer.py, nothing written, no model loaded.

Prints rows read, kept, dropped (rows whose answer max_seq_length cuts away entirely, which training drops),
truncated (answer cut short, kept as the original) and the token-length distribution (p50 / p95 / max, before
the cut) with the real tokenizer. A bad row is one line `file:line: field: expected …` and exit code 2.

    python -m llama_ner.check_data --data build/llama-ner/instruct_data/train.txt \
        --model_dir tiny:chinese-alpaca-7b --max_seq_length 192
"""
import argparse
from types import SimpleNamespace

from llama_ner.common import BASE_CONFIG as CONFIG
from tuning.data_check import DataReport
from tuning.errors import UserError, run_main
from tuning.files import read_text


def check_answers(lines: list[str], path: str, column: str) -> None:
    """Every answer line is "entity_type" (what process.py writes and the F1 report parses) or 没有; anything else would
    train the model on answers the metrics can never count (issue 33.4)."""
    import json

    from llama_ner.process import NO_ENTITY

    numbers = [n for n, line in enumerate(read_text(path).strip().split("\n"), start=1) if line.strip()]
    for line_no, line in zip(numbers, lines):
        for part in json.loads(line)[column].split("\n"):
            entity, _, kind = part.rpartition("_")
            if part != NO_ENTITY and not (entity.strip() and kind.strip()):
                raise UserError(f"answer line {part!r} is not 'entity_type' (e.g. 北京_地名) or {NO_ENTITY}",
                                path=path, line=line_no, field=column)


def check_file(path: str, model_dir: str, max_seq_length: int, columns=("instruct", "query", "answer")) -> DataReport:
    from llama_ner.dataset import NerCollate, length_report, load_data
    from model_hub.loader import load_tokenizer

    lines = load_data(path, columns)  # every row validated before the tokenizer loads
    check_answers(lines, path, columns[2])
    args = SimpleNamespace(instruct_column=columns[0], query_column=columns[1], response_column=columns[2],
                           max_seq_length=max_seq_length)
    collate = NerCollate(args, load_tokenizer(model_dir))
    cuts = length_report(lines, collate)
    cut, truncated = set(cuts["answer_cut"]), set(cuts["answer_truncated"])
    report = DataReport(path, max_seq_length, "--max_seq_length")
    report.rows_read = len(lines)
    report.drop("answer cut away by --max_seq_length", len(cut))
    for start in range(0, len(lines), 256):
        sources, targets = collate.sources_and_targets(lines[start:start + 256])
        for i, (s, t) in enumerate(zip(sources, targets), start=start):
            if i not in cut:
                report.keep(len(s) + len(t), i in truncated)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="instruction rows (JSON lines with instruct, query, answer)")
    parser.add_argument("--model_dir", default=CONFIG["model_dir"],
                        help="the model whose tokenizer training uses, or tiny:chinese-alpaca-7b (default: %(default)s)")
    parser.add_argument("--max_seq_length", type=int, default=CONFIG["max_seq_length"], help="default: %(default)s")
    args = parser.parse_args()
    if args.max_seq_length < 1:
        raise UserError(f"must be a positive integer, got {args.max_seq_length}", field="max_seq_length")
    report = check_file(args.data, args.model_dir, args.max_seq_length)
    report.print()
    if not report.kept:
        raise UserError(f"every row's answer is cut away by max_seq_length={args.max_seq_length}; raise it",
                        path=args.data, field="max_seq_length")


if __name__ == "__main__":
    run_main(main)
