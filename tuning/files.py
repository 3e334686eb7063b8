"""Reading user files with one-line errors, and writing outputs atomically: the names the project imports from here.

Readers (tuning.readers), durable writes (tuning.durable), safe loading (tuning.safe_loading); `atomic_dir`, which
replaces a whole output folder in one step, lives here on top of them and of tuning.publish.
"""
import contextlib
import os
import shutil
import tempfile

from .durable import (WRITE_ERRNOS, _umask, atomic_file, follow_umask, require_output_parent,  # noqa: F401
                      write_error)
from .outputs import check_output_folder
from .publish import recover_replaced, swap_in
from .readers import (TOO_DEEP, default_input, parse_json_object, read_json, read_jsonl, read_text,  # noqa: F401
                      require_str)
from .safe_loading import pickle_refusal, refuse_pickled_code  # noqa: F401


@contextlib.contextmanager
def atomic_dir(path: str, kind: str, *, inputs=(), overwrite: bool = False, flag: str = "--overwrite"):
    """Yield a temporary sibling folder; it replaces `path` only if the block succeeds, and only when `path` is
    new, empty or an earlier output of `kind` (tuning.outputs.check_output_folder; `overwrite` = the user's
    explicit `flag` allows a foreign folder). `inputs`: the run's input files, never inside `path`."""
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
