"""Reading user files with one-line errors, and writing outputs atomically.

Every reader names the file, the line (or record) and the field in its error, as a `UserError` (exit code 2).
Every writer writes to a temporary sibling and renames it into place, so a failure never leaves half a file.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import tempfile

from .errors import UserError


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


# Write failures that are about the place, not the program: reported in one line, not as a traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT}


def require_output_parent(path: str, kind: str = "file") -> None:
    """`path` can be written as a `kind` ("file" or "folder"): its parent folder exists and is writable, and
    it is not already something of the other kind."""
    if kind == "file" and os.path.isdir(path):
        raise UserError("is a folder; expected the path of a file to write", path=path)
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise UserError("is a file; expected the path of a folder to write", path=path)
    parent = os.path.dirname(os.path.normpath(path)) or "."
    if not os.path.exists(parent):
        raise UserError("output folder does not exist", path=parent)
    if not os.path.isdir(parent):
        raise UserError(f"is a file, not a folder: cannot write {os.path.basename(path)} inside it", path=parent)
    if not os.access(parent, os.W_OK):
        raise UserError("output folder is not writable", path=parent)


def write_error(exc: BaseException, path: str) -> UserError | None:
    """A one-line error for an OSError that is about the place written to (full disk, permissions), else None."""
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return UserError(f"cannot write: {exc.strerror} (nothing was written)", path=path)
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(folder: str) -> None:
    """Every file under `folder` gets the permissions a plain write gives (0666 less the umask). safetensors and
    torch write weights owner-only (0600), so a teammate or a serving user could not read a run's adapter."""
    mode = 0o666 & ~_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary sibling of `path` for writing; rename it onto `path` only if the block succeeds."""
    require_output_parent(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(os.path.abspath(path)))
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the output gets the usual permissions
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        error = write_error(exc, path)
        if error:
            raise error from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str, kind: str, *, inputs=(), overwrite: bool = False, flag: str = "--overwrite"):
    """Yield a temporary sibling folder; it replaces `path` only if the block succeeds, and only when `path` is
    new, empty or an earlier output of `kind` (tuning.outputs.check_output_folder; `overwrite` = the user's
    explicit `flag` allows a foreign folder). `inputs`: the run's input files, never inside `path`."""
    from .outputs import check_output_folder
    from .publish import recover_replaced, swap_in

    require_output_parent(path, "folder")
    recover_replaced(path)
    check_output_folder(path, kind, inputs=inputs, overwrite=overwrite, flag=flag)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.normpath(path))}.",
                           dir=os.path.dirname(os.path.abspath(path)))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output folder gets the usual permissions
    try:
        yield tmp
        follow_umask(tmp)
        swap_in(tmp, path)  # one step: `path` is the old folder or the new one, never missing
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_error(exc, path)
        if error:
            raise error from None
        raise


def pickle_refusal(exc: Exception, path: str) -> UserError:
    """The one-line error for a .bin/.pth/.pt that torch.load(weights_only=True) refused: it holds code or
    arbitrary objects (or is not a torch file at all), and we never unpickle those."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f" ({found.group(1)})" if found else ""
    return UserError(f"refused to load: a pickled file here holds code or objects{what}, not only tensors; files are "
                     "read with torch.load(weights_only=True) only. Convert it to safetensors where you trust it",
                     path=path)


@contextlib.contextmanager
def refuse_pickled_code(path: str):
    """Around a load that may meet a .bin: an unsafe pickle becomes the one-line `pickle_refusal` error."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as exc:
        raise pickle_refusal(exc, path) from None
