"""Publishing an output in one step, and finishing (or explaining) a publish that was interrupted.

- `swap_in(staged, final)`: a finished folder takes the place of an older one with a single rename
  (renameat2 RENAME_EXCHANGE on Linux), so a Ctrl-C or a kill leaves either the old or the new folder at `final`,
  never none; the old one is then removed. Where the exchange is unavailable the two renames run with SIGINT and
  SIGTERM held back, and `recover_replaced` puts a folder left aside by a kill back in place.
- `replace_files(staged, folder)`: the files of a finished save replace their namesakes in a folder that holds
  other files too (an adapter beside checkpoints). A journal written first lists them; `finish_publish` (called
  before the folder is read or written again) moves the rest in, so an adapter's weights and config always
  come from the same save.
- `read_adapter_folder`: the checks every adapter loader makes first (finished publish, adapter_config.json a
  JSON object, a weights file present: peft would otherwise take the path for a Hub repo id).
"""
import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal

from .errors import UserError

JOURNAL = ".publishing.json"
OLD = ".tuning-old-"  # prefix of a replaced folder on its way out (sibling of the output)
STAGING = ".saving-"  # prefix of the folder a save is written into before its files move in (a direct child)
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the names `a` and `b`; False where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), b)


@contextlib.contextmanager
def signals_held():
    """SIGINT/SIGTERM are delivered after the block, not inside it."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def old_name(final: str) -> str:
    parent, name = os.path.split(os.path.normpath(os.path.abspath(final)))
    return os.path.join(parent, f"{OLD}{name}")


def swap_in(staged: str, final: str) -> None:
    """Put the folder `staged` at `final` in one step, replacing (then deleting) an older folder there."""
    if not os.path.lexists(final):
        os.replace(staged, final)
        return
    if _exchange(staged, final):  # `staged` now names the old folder
        shutil.rmtree(staged, ignore_errors=True)
        return
    old = old_name(final)
    shutil.rmtree(old, ignore_errors=True)
    with signals_held():
        os.replace(final, old)
        os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_replaced(final: str) -> None:
    """A folder moved aside by `swap_in`'s fallback and then a kill: back in place if nothing took it, else
    removed (the new folder is complete)."""
    old = old_name(final)
    if not os.path.isdir(old):
        return
    if os.path.lexists(final):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, final)
        print(f"note: {final} was put back from {old} (a replacement was interrupted)")


def _move_in(staged: str, folder: str, names: list[str]) -> None:
    for name in names:
        source, target = os.path.join(staged, name), os.path.join(folder, name)
        if not os.path.lexists(source):
            continue  # moved before an interruption
        if os.path.isdir(source) and os.path.isdir(target) and not os.path.islink(target):
            swap_in(source, target)
        else:
            os.replace(source, target)


def replace_files(staged: str, folder: str) -> None:
    """Move every file/folder of the finished folder `staged` (inside `folder`) into `folder`, each replacing its
    namesake; a journal makes the whole move finishable after an interruption (`finish_publish`). The callers
    remove `staged` afterwards."""
    from .durable import atomic_file, follow_umask, fsync_dir, fsync_tree

    follow_umask(staged)
    fsync_tree(staged)
    names = sorted(os.listdir(staged))
    with atomic_file(os.path.join(folder, JOURNAL)) as f:
        json.dump({"staged": os.path.relpath(staged, folder), "names": names}, f)
    _move_in(staged, folder, names)
    fsync_dir(folder)
    os.remove(os.path.join(folder, JOURNAL))


def publish_pending(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, JOURNAL))


def _plain_name(value) -> bool:
    """A single entry name: no folder separator, not "." or "..", not empty."""
    return (isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and os.sep not in value
            and "\0" not in value)


def _journal_refused(folder: str, why: str) -> UserError:
    return UserError(f"refused: {JOURNAL} here {why}; this code only ever stages into a {STAGING}… folder directly "
                     f"inside the output, so the file was not written by it. Nothing was moved or deleted: look at "
                     f"the folder and remove {JOURNAL} yourself", path=folder)


def read_journal(folder: str) -> tuple[str, list[str]]:
    """(staged folder, names) of an interrupted publish, checked before anything is trusted: the staged folder must
    be a direct child named like the ones `save_pretrained_atomically` stages (never a link), every name a plain
    entry name. A journal that says otherwise (a crafted or corrupted file) is refused in one line."""
    from .readers import read_json

    info = read_json(os.path.join(folder, JOURNAL))
    if not isinstance(info, dict):
        raise _journal_refused(folder, f"is a JSON {type(info).__name__}, not an object")
    staged, names = info.get("staged"), info.get("names", [])
    if not (_plain_name(staged) and staged.startswith(STAGING)):
        raise _journal_refused(folder, f"names {str(staged)[:120]!r} as its staged folder")
    if not isinstance(names, list) or not all(_plain_name(n) and n != JOURNAL for n in names):
        raise _journal_refused(folder, "lists names that are not plain file names of the folder")
    path = os.path.join(folder, staged)
    if os.path.islink(path):
        raise _journal_refused(folder, f"names {staged}, which is a symbolic link")
    return path, names


def finish_publish(folder: str) -> None:
    """If a publish into `folder` was interrupted, move the rest of its files in (or explain in one line)."""
    journal = os.path.join(folder, JOURNAL)
    if not os.path.isfile(journal):
        return
    staged, names = read_journal(folder)
    if not os.path.isdir(staged):
        raise UserError(f"a save into this folder was interrupted and its staged files are gone ({JOURNAL} is "
                        "left): its files may come from two saves; save again or restore them", path=folder)
    _move_in(staged, folder, names)
    shutil.rmtree(staged, ignore_errors=True)
    os.remove(journal)
    print(f"note: finished an interrupted save into {folder}")


WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter_folder(folder: str) -> dict:
    """adapter_config.json of a PEFT adapter folder, once the folder is known to hold a whole adapter."""
    from .consent import stay_offline
    from .readers import read_json

    stay_offline()  # peft would otherwise look a missing path up on the Hub
    if os.path.isdir(folder):
        finish_publish(folder)
    config_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise UserError("not a PEFT adapter folder (no adapter_config.json)", path=folder)
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise UserError(f"expected a JSON object (a PEFT adapter config), got {type(config).__name__}",
                        path=config_path)
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHTS):
        raise UserError(f"adapter_config.json is here but no adapter weights ({WEIGHTS[0]}); the save that wrote "
                        "this folder did not finish, or the weights were moved", path=folder)
    return config
