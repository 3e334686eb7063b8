"""Reading user files with one-line errors, and writing outputs atomically: the names the project imports from here.

Readers (tuning.readers), durable writes (tuning.durable), safe loading (tuning.safe_loading); `atomic_dir`, which
replaces a whole output folder in one step, lives here on top of them and of tuning.publish.
"""
import contextlib
import json
import os
import re
import shutil
import socket
import tempfile

from .durable import (WRITE_ERRNOS, _umask, atomic_file, follow_umask, require_output_parent,  # noqa: F401
                      write_error)
from .outputs import check_output_folder
from .publish import recover_replaced, swap_in
from .readers import (TOO_DEEP, default_input, list_record, parse_json_object, read_json, read_jsonl,  # noqa: F401
                      read_text, require_str)
from .safe_loading import pickle_refusal, refuse_pickled_code  # noqa: F401


STAGING_OWNER = ".staging-owner.json"  # inside a staging folder while its process writes it


def staging_prefix(path: str) -> str:
    return f".{os.path.basename(os.path.normpath(path))}."


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or not a pid we can judge: leave its folder alone
    return True


def remove_stale_staging(path: str) -> None:
    """Staging folders a killed run left beside `path` (a 9B export's is ~18 GB): removed when this machine's
    process that wrote it is gone, else named. Only direct siblings named as `atomic_dir` names them (the prefix
    and mkdtemp's 8 characters), never a link; what the owner file says only decides whether, never what."""
    parent, prefix = os.path.dirname(os.path.abspath(path)), staging_prefix(path)
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}\Z")
    for name in sorted(os.listdir(parent)):
        folder = os.path.join(parent, name)
        if not pattern.match(name) or os.path.islink(folder) or not os.path.isdir(folder):
            continue
        try:
            with open(os.path.join(folder, STAGING_OWNER), encoding="utf-8") as f:
                owner = json.load(f)
            stale = owner["host"] == socket.gethostname() and not _alive(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            stale = False
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"note: removed {folder}, the staging folder of an interrupted run")
        else:
            print(f"note: {folder} looks like the staging folder of another or an older run; remove it if no "
                  "export or conversion is writing it")


@contextlib.contextmanager
def atomic_dir(path: str, kind: str, *, inputs=(), overwrite: bool = False, flag: str = "--overwrite"):
    """Yield a temporary sibling folder; it replaces `path` only if the block succeeds, and only when `path` is
    new, empty or an earlier output of `kind` (tuning.outputs.check_output_folder; `overwrite` = the user's
    explicit `flag` allows a foreign folder). `inputs`: the run's input files, never inside `path`."""
    require_output_parent(path, "folder")
    recover_replaced(path)
    check_output_folder(path, kind, inputs=inputs, overwrite=overwrite, flag=flag)
    remove_stale_staging(path)
    tmp = tempfile.mkdtemp(prefix=staging_prefix(path), dir=os.path.dirname(os.path.abspath(path)))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output folder gets the usual permissions
    owner = os.path.join(tmp, STAGING_OWNER)
    try:
        with open(owner, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        yield tmp
        os.remove(owner)
        follow_umask(tmp)
        swap_in(tmp, path)  # one step: `path` is the old folder or the new one, never missing
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_error(exc, path)
        if error:
            raise error from None
        raise
