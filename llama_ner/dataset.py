"""Data for the LLaMA NER recipe, as the original dataset.py: `load_data` (JSON-string lines), the Alpaca
`PROMPT_TEMPLATE`, and `NerCollate(args, tokenizer).collate_fn(lines)`.

Each row becomes   source = PROMPT_TEMPLATE(instruct + "\\n" + query)   target = "<s>" + answer + "</s>",
both tokenized without added special tokens ("<s>"/"</s>" in the text become the special ids 1/2);
input_ids = (source + target)[:max_seq_length], labels = ([-100]*len(source) + target)[:max_seq_length], both
right-padded to exactly max_seq_length with the pad id (labels with -100). No attention mask, as the original:
padding only ever follows the real tokens, so causal attention never sees it.

What the original lacked: `load_data` validates every line (JSON object, instruct/query/answer strings, a
non-empty answer) with file:line:field errors, and `length_report` finds rows whose answer would be cut away
entirely by max_seq_length (they would train on nothing but -100 labels): the recipes drop and report them.
"""
import json

import torch

from model_hub.llama.prompts import NER_TEMPLATE as PROMPT_TEMPLATE, build_source  # noqa: F401  (original names)
from tuning.errors import UserError
from tuning.files import parse_json_object, read_text

IGNORE_INDEX = -100
COLUMNS = ("instruct_column", "query_column", "response_column")


def load_data(path: str, columns=("instruct", "query", "answer")) -> list[str]:
    """The non-blank lines of `path` (JSON strings, parsed again by the collator), each one checked."""
    lines = []
    for line_no, line in enumerate(read_text(path).strip().split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        validate_row(line, path, line_no, columns)
        lines.append(line)
    return lines


def validate_row(line: str, path: str, line_no: int, columns) -> dict:
    row = parse_json_object(line, path, line_no)
    instruct, query, answer = columns
    for field, nullable in ((instruct, False), (query, True), (answer, False)):
        if field not in row:
            raise UserError("missing field; expected a string", path=path, line=line_no, field=field)
        value = row[field]
        if value is None and nullable:
            continue
        if not isinstance(value, str):
            raise UserError(f"expected a string, got {type(value).__name__}", path=path, line=line_no, field=field)
    if not row[answer].strip():
        raise UserError("empty answer; expected 'entity_type' lines or '没有'", path=path, line=line_no, field=answer)
    if not row[instruct].strip():
        raise UserError("empty instruction", path=path, line=line_no, field=instruct)
    return row


class NerCollate:
    def __init__(self, args, tokenizer):
        self.instruct_column = args.instruct_column
        self.query_column = args.query_column
        self.response_column = args.response_column
        self.max_seq_length = args.max_seq_length
        self.tokenizer = tokenizer
        self.pad_to_longest = False  # True with --group_by_length
        self.pad_to_multiple_of = 1  # with pad_to_longest: round the batch length up to a multiple of this
        if tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has no pad token; the recipe pads with it (Chinese-Alpaca: [PAD] 49953). "
                            "Use the Chinese-Alpaca tokenizer or add one", field="tokenizer")

    def _row(self, example) -> dict:
        return json.loads(example) if isinstance(example, str) else example

    def sources_and_targets(self, batch) -> tuple[list[list[int]], list[list[int]]]:
        sources, targets = [], []
        for example in map(self._row, batch):
            sources.append(build_source(example[self.instruct_column], example[self.query_column]))
            targets.append(f"{self.tokenizer.bos_token}{example[self.response_column]}{self.tokenizer.eos_token}")
        s = self.tokenizer(sources, return_attention_mask=False, add_special_tokens=False)["input_ids"]
        t = self.tokenizer(targets, return_attention_mask=False, add_special_tokens=False)["input_ids"]
        return s, t

    def rows(self, batch) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per row, cut to max_seq_length, unpadded."""
        n = self.max_seq_length
        return [((s + t)[:n], ([IGNORE_INDEX] * len(s) + t)[:n]) for s, t in zip(*self.sources_and_targets(batch))]

    def collate_fn(self, batch) -> dict:
        rows = self.rows(batch)
        # The original pads to max_seq_length; --group_by_length pads to the longest row of the batch instead
        # (the same loss: no attention mask is used and padding only ever follows the real tokens).
        n = self.max_seq_length
        if self.pad_to_longest:
            multiple = self.pad_to_multiple_of
            n = min(n, -(-max(len(ids) for ids, _ in rows) // multiple) * multiple)
        all_input_ids, all_labels = [], []
        for input_ids, labels in rows:
            all_input_ids.append(input_ids + [self.tokenizer.pad_token_id] * (n - len(input_ids)))
            all_labels.append(labels + [IGNORE_INDEX] * (n - len(labels)))
        return {"input_ids": torch.tensor(all_input_ids, dtype=torch.long),
                "labels": torch.tensor(all_labels, dtype=torch.long)}

    def lengths(self, lines: list[str], chunk: int = 256) -> list[int]:
        """Each row's token count after the max_seq_length cut."""
        return [len(ids) for start in range(0, len(lines), chunk) for ids, _ in self.rows(lines[start:start + chunk])]

    def prompt_ids(self, example) -> list[int]:
        """What generation starts from: the source tokens and the "<s>" that opens every trained answer."""
        example = self._row(example)
        source = build_source(example[self.instruct_column], example[self.query_column])
        return self.tokenizer(source, add_special_tokens=False)["input_ids"] + [self.tokenizer.bos_token_id]


def length_report(lines: list[str], collate: NerCollate, batch_size: int = 256) -> dict:
    """Which rows lose their whole answer (only "<s>" or nothing left) or their "</s>" to max_seq_length."""
    cut, truncated = [], []
    for start in range(0, len(lines), batch_size):
        chunk = lines[start:start + batch_size]
        for i, (s, t) in enumerate(zip(*collate.sources_and_targets(chunk))):
            room = collate.max_seq_length - len(s)
            if room <= 1:
                cut.append(start + i)
            elif room < len(t):
                truncated.append(start + i)
    return {"rows": len(lines), "answer_cut": cut, "answer_truncated": truncated}


def drop_cut_rows(lines: list[str], collate: NerCollate, path: str) -> list[str]:
    """Drop (and report) rows that would train on nothing; report rows whose answer loses its end."""
    from tuning.training import data_note  # (tuning.training loads the Trainer callbacks: load_data needs none)

    report = length_report(lines, collate)
    n = collate.max_seq_length
    if report["answer_truncated"]:
        data_note(f"{path}: {len(report['answer_truncated'])} of {len(lines)} rows have their answer truncated at "
              f"max_seq_length={n} (the end and </s> are not trained; kept, as the original)")
    if report["answer_cut"]:
        rows = ", ".join(str(i + 1) for i in report["answer_cut"][:10])
        data_note(f"{path}: dropped {len(report['answer_cut'])} of {len(lines)} rows whose answer max_seq_length={n} "
              f"cuts away entirely (rows {rows}{', ...' if len(report['answer_cut']) > 10 else ''}); "
              "raise max_seq_length to keep them")
    dropped = set(report["answer_cut"])
    kept = [line for i, line in enumerate(lines) if i not in dropped]
    if not kept:
        raise UserError(f"every row's answer is cut away by max_seq_length={n}; raise it", path=path,
                        field="max_seq_length")
    return kept
