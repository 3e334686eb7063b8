"""A training run's output folder: one run at a time, and checkpoints deleted or replaced only when this run
wrote them (or resumed from them).

- `lock_output_dir`: an exclusive lock (flock on OUTPUT/.tuning-run.lock) for the life of the process; the
  kernel releases it on any exit, even a kill, so a lock left by a dead process never blocks. A second run into
  the same folder stops with one line naming the process that holds it.
- `claim_checkpoints`: before training, every checkpoint-N (or global_stepN) folder already there must belong
  to the run being resumed: a fresh run refuses a folder that holds checkpoints (it would replace or rotate
  them away), a resumed run refuses one that is incomplete or was written by another run. Each checkpoint this
  code publishes carries a small marker naming its run; rotation only ever removes this run's checkpoints.
"""
import datetime
import fcntl
import json
import os
import socket
import uuid

from .exceptions import UserError

LOCK_FILE = ".tuning-run.lock"
RUN_MARKER = ".tuning-checkpoint.json"
_locks: dict[str, int] = {}


def lock_output_dir(path: str) -> None:
    """Take the exclusive lock of the output folder `path` (created if needed) until this process ends."""
    real = os.path.realpath(path)
    if real in _locks:
        return
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        # The lock file is read back from a folder anyone may write: shown as one line of printable text.
        text = os.read(fd, 300).decode("utf-8", "replace")
        holder = "".join(c if c.isprintable() else " " for c in text).strip()[:200] or "another process"
        os.close(fd)
        raise UserError(f"another run is writing to this output folder ({holder}); wait for it to end or give "
                        "another output folder", path=path) from None
    os.ftruncate(fd, 0)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode())
    _locks[real] = fd


def release_locks() -> None:
    """Release every lock this process holds (run_main does when the command ends; so does any exit)."""
    while _locks:
        os.close(_locks.popitem()[1])


class Claim:
    """The checkpoints of one run folder this run may replace or rotate away."""

    def __init__(self, run_id: str, owned: set[str]):
        self.run_id, self.owned = run_id, owned

    def mark(self, staged: str) -> None:
        """Write the run marker into a checkpoint folder about to be published as one of ours."""
        with open(os.path.join(staged, RUN_MARKER), "w", encoding="utf-8") as f:
            json.dump({"run": self.run_id}, f)
        self.owned.add(os.path.basename(staged))

    def check_replace(self, final: str) -> None:
        if os.path.exists(final) and os.path.basename(final) not in self.owned:
            raise UserError("not replaced: this checkpoint folder was not written by this run", path=final)


def is_earlier_run(folder: str) -> bool:
    """`folder` was the output of a run of this code: it holds the run lock, or a checkpoint with its run marker
    (checkpoint-N/ of the Trainer, or checkpoints/global_stepN/ of the raw DeepSpeed loop)."""
    if os.path.isfile(os.path.join(folder, LOCK_FILE)):
        return True
    for parent in (folder, os.path.join(folder, "checkpoints")):
        if os.path.isdir(parent) and any(os.path.isfile(os.path.join(parent, name, RUN_MARKER))
                                         for name in os.listdir(parent)):
            return True
    return False


def run_of(checkpoint: str) -> str | None:
    try:
        with open(os.path.join(checkpoint, RUN_MARKER), encoding="utf-8") as f:
            return json.load(f).get("run")
    except (OSError, ValueError, AttributeError):
        return None


def claim_checkpoints(root: str, resume: str | None, checkpoints, hint: str) -> Claim:
    """Check the checkpoint folders under `root` before training; returns the claim that publishing and rotation
    consult. `checkpoints`: how the loop names them and knows one is complete (tuning.training.CheckpointNames);
    `hint`: how the user resumes. One line (UserError) when a folder is not this run's to touch. Read-only: the
    recipes call it early (before anything is written) and the Trainer again when training starts."""
    complete = checkpoints.complete
    names = sorted((n for n in (os.listdir(root) if os.path.isdir(root) else [])
                    if checkpoints.step_of(n) is not None), key=checkpoints.step_of)
    if resume is None:
        if names:
            shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
            raise UserError(f"already holds {shown} from an earlier run, which a new run would replace or rotate "
                            f"away: resume with {hint}, or give another output folder", path=root)
        return Claim(uuid.uuid4().hex, set())
    lineage = run_of(resume)
    for name in names:
        path = os.path.join(root, name)
        if not complete(path):
            raise UserError(f"{name} is not a complete checkpoint written by this code; move it out of the output "
                            "folder before resuming", path=root)
        if run_of(path) != lineage:
            raise UserError(f"{name} was written by another run than {os.path.basename(resume)}; move it out of "
                            "the output folder before resuming", path=root)
    return Claim(lineage or uuid.uuid4().hex, set(names))
