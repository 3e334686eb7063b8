"""Writing outputs so that a failure or a kill never leaves half of them: a file is written to a temporary sibling
and renamed into place, flushed to disk first (`fsync_tree`: a rename is only durable after its contents are), with
the permissions a plain write gives (`follow_umask`). A write that fails for a reason about the place (full disk,
permissions) is one line (`write_error`), not a traceback."""
import contextlib
import errno
import os
import tempfile

from .exceptions import UserError


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


def fsync_tree(folder: str) -> None:
    """Flush every file and folder under `folder` to disk (a rename is only durable after its contents are)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
