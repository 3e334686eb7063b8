"""The data files chatglm_lora trains on → (line, context, target) rows; every record checked.

Accepted (one file, any mix of the record kinds in a JSON-lines file):
- `{"context", "target"}` JSON lines, ChatGLM-Tuning's own format (context is the whole prompt);
- alpaca records `{"instruction", "input", "output"}`, as a JSON list (alpaca_data.json itself) or JSON lines:
  formatted exactly as cover_alpaca2jsonl.py does ("Instruction: …\\n[Input: …\\n]Answer: " → output);
- the March-2023 `{"text": "### Instruction:…### Response:…END"}` lines of the repository's committed jsonl;
- multi-turn: any of the above with `"history": [[question, answer], ...]` (earlier turns). The prompt is
  ChatGLM-6B's own P-tuning / chat() format, `[Round 0]\\n问：q0\\n答：a0\\n…[Round N]\\n问：QUERY\\n答：`, where
  QUERY is the row's context, or its instruction (+ "\\n" + input) for an alpaca record; the target is the last
  answer only, so only that answer is trained (the earlier answers are prompt). An empty or null history is a
  single-turn row, as chat() builds it.
"""
import json
import random
import re

from model_hub.chatglm6b.prompts import format_example
from model_hub.chatglm6b.text import build_prompt
from tuning.errors import UserError
from tuning.files import list_record, read_jsonl, read_text, require_str

# The March-2023 format of ChatGLM-Tuning's committed data/alpaca_data.jsonl (Input block optional).
OLD_TEXT = re.compile(r"\A### Instruction:\n(?P<instruction>.*?)(?:\n\n### Input:\n(?P<input>.*?))?"
                      r"\n\n### Response:\n(?P<output>.*)\nEND\n?\Z", re.S)
FORMATS = 'expected the fields "context" and "target", or alpaca "instruction", "input", "output" (or the old "text")'


def _history(record: dict, path: str, line) -> list[tuple[str, str]]:
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise UserError("expected a list of [question, answer] pairs", path=path, line=line, field="history")
    for i, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise UserError("expected a [question, answer] pair of strings", path=path, line=line,
                            field=f"history[{i}]")
    return [tuple(turn) for turn in history]


def _alpaca(record: dict, path: str, line) -> tuple[str, str, str]:
    """(single-turn context, multi-turn query, target) of an alpaca record."""
    instruction = require_str(record, "instruction", path, line)
    output = require_str(record, "output", path, line, allow_empty=True)
    extra = record.get("input")
    if extra is not None:
        require_str(record, "input", path, line, allow_empty=True)
    example = format_example({"instruction": instruction, "input": extra, "output": output})
    return example["context"], instruction + (f"\n{extra}" if extra else ""), output


def record_row(record: dict, path: str, line) -> tuple[str, str]:
    """(context, target) of one record of any accepted kind."""
    history = _history(record, path, line)
    if "context" in record or "target" in record:
        context = require_str(record, "context", path, line)
        query, target = context, require_str(record, "target", path, line, allow_empty=True)
    elif "instruction" in record:
        context, query, target = _alpaca(record, path, line)
    elif "text" in record:
        match = OLD_TEXT.match(require_str(record, "text", path, line))
        if not match:
            raise UserError('expected "### Instruction:\\n…\\n\\n### Response:\\n…\\nEND"', path=path,
                            line=line, field="text")
        context, query, target = _alpaca({k: v or "" for k, v in match.groupdict().items()}, path, line)
    else:
        raise UserError(FORMATS, path=path, line=line)
    return (build_prompt(query, history) if history else context), target


def _json_list(path: str):
    """The records of a file holding one JSON list (alpaca_data.json), or None for a JSON-lines file."""
    with open(path, "rb") as f:
        if not f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            return None
    try:
        data = json.loads(read_text(path))
    except ValueError:
        return None  # a JSON-lines file whose first line is a list: read_jsonl says which line is wrong
    return data if isinstance(data, list) else None


def read_rows(path: str) -> list[tuple[int, str, str]]:
    """(line or record number, context, target) for every record; the first bad one raises a one-line error."""
    read_text(path)  # a missing or unreadable file: its one-line error
    records = _json_list(path)
    if records is None:
        return [(line, *record_row(record, path, line)) for line, record in read_jsonl(path)]
    rows = []
    for i, record in enumerate(records):
        where = list_record(path, i)
        if not isinstance(record, dict):
            raise UserError(f"expected an object, got {type(record).__name__}", path=where)
        rows.append((i + 1, *record_row(record, where, None)))
    return rows


def held_out(n_rows: int, fraction: float, seed: int) -> set[int]:
    """Indices of the dev rows: round(fraction * n) of them (at least 1), drawn with a fixed seed. The tokenizer
    step leaves them out of training with the same --eval_fraction and --seed, evaluate.py scores them."""
    if not 0 < fraction < 1:
        raise UserError(f"expected a fraction between 0 and 1, got {fraction}", field="eval_fraction")
    count = max(1, round(fraction * n_rows))
    if count >= n_rows:
        raise UserError(f"{n_rows} rows: holding out {count} leaves nothing to train on", field="eval_fraction")
    return set(random.Random(seed).sample(range(n_rows), count))
