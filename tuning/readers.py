"""Reading user files with one-line errors: every reader names the file, the line (or record) and the field in its
error, as a `UserError` (exit code 2)."""
import json
import os

from .exceptions import UserError


def read_text(path: str) -> str:
    """The whole file as text: UTF-8 (a BOM is accepted and dropped), CRLF line ends accepted."""
    if not os.path.exists(path):
        raise UserError("file not found", path=path)
    if os.path.isdir(path):
        raise UserError("is a directory; expected a file", path=path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8",
                        path=path, line=line) from None
    if not text.strip():
        raise UserError("file is empty", path=path)
    return text


TOO_DEEP = "invalid JSON: nested too deeply (hundreds of levels of [ or {); expected a flat record or config"


def read_json(path: str):
    """A JSON document (alpaca-style list, config, ...)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=exc.lineno) from None
    except RecursionError:
        raise UserError(TOO_DEEP, path=path) from None


def default_input(value: str, default: str, root: str, flag: str, how: str) -> str:
    """An input path as given; left at its `default` (a file of the repository at `root`), the repository's file
    wherever the command is run from. A missing default is one line: where it was looked for, how to make it, and
    the flag that points elsewhere."""
    if value != default or os.path.isabs(value):
        return value
    path = os.path.join(root, default)
    if not os.path.exists(path):
        raise UserError(f"file not found (the default of {flag}); {how}, or pass {flag}", path=path)
    return path


def parse_json_object(line: str, path: str, line_no: int) -> dict:
    """One jsonl line as a JSON object, or a UserError naming file and line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=line_no) from None
    except RecursionError:
        raise UserError(TOO_DEEP, path=path, line=line_no) from None
    if not isinstance(obj, dict):
        raise UserError(f"expected a JSON object per line, got {type(obj).__name__}", path=path, line=line_no)
    return obj


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; each line must be one JSON object."""
    return [(line_no, parse_json_object(line, path, line_no))
            for line_no, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]


def list_record(path: str, index: int) -> str:
    """Where a record of a JSON-list file is, for an error line: numbered from 1 as JSON-lines lines are, and named
    as a record of the list (a JSON list has no line per record)."""
    return f"{path}: JSON list record {index + 1}"


def require_str(record: dict, field: str, path: str, line: int | None, *, allow_empty: bool = False) -> str:
    """`record[field]` as a string; a clear error when it is missing, not a string, or empty."""
    if field not in record:
        raise UserError("missing field; expected a string", path=path, line=line, field=field)
    value = record[field]
    if not isinstance(value, str):
        raise UserError(f"expected a string, got {type(value).__name__}", path=path, line=line, field=field)
    if not allow_empty and not value.strip():
        raise UserError("empty string; expected text", path=path, line=line, field=field)
    return value
