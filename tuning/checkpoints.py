"""Atomic Trainer checkpoints: a checkpoint-N folder either exists complete or does not exist at all.

Why (transformers 5.23, Trainer._save_checkpoint): the files of checkpoint-N are written straight into the
final folder — weights, optimizer, scheduler, RNG state (one file per rank), then trainer_state.json. That
last file is written without a temporary file, so a kill while it is written leaves a truncated
trainer_state.json that looks like a finished checkpoint; under DDP/DeepSpeed rank 0 writes it without waiting
for the other ranks' RNG/optimizer files; nothing is fsync'ed; and rotation (save_total_limit) deletes old
folders with a plain rmtree, so a kill there can leave a half-deleted folder that still has its state file.

What this does instead (`AtomicCheckpoints`, mixed into the recipes' Trainer classes):
1. every rank writes checkpoint-N into OUTPUT/.saving-checkpoint-N/checkpoint-N (the Trainer's own save code,
   pointed at a staging folder);
2. all ranks agree that their part succeeded (all_reduce of a failure flag), then wait at a barrier;
3. the saving rank (should_save: rank 0, or each node's local rank 0 with save_on_each_node) fsyncs the files
   and renames the folder to OUTPUT/checkpoint-N in one step, then rotates old checkpoints by renaming each to
   .deleting-… before removing it; a second barrier keeps the other ranks from racing ahead.
A save that fails (disk full, file-size limit, ...) removes its staging folder, keeps every older checkpoint,
and stops training with one line naming the last good checkpoint and how to resume (exit code 1).
Before training the run locks its output folder and claims its checkpoints (tuning.run_folder): only the
checkpoints this run wrote or resumed from are ever replaced or rotated away.
"""
import contextlib
import os
import shutil

from transformers import Trainer

from .errors import TrainingStopped
from .durable import fsync_dir, fsync_tree  # noqa: F401  (also imported from here)
from .publish import STAGING, finish_publish, publish_pending, replace_files, swap_in
from .patches import TrainerCheckpointHooks
from .run_folder import claim_checkpoints, lock_output_dir
from .safe_loading import refuse_pickled_code
from .training import TRAINER_CHECKPOINTS, list_checkpoints

DELETING, REPLACED = ".deleting-", ".replaced-"


def remove_leftovers(run_dir: str) -> None:
    """Staging/deleting folders of a run that was killed; never a checkpoint-N itself."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        if name.startswith((STAGING, DELETING, REPLACED)) and ("checkpoint-" in name or "global_step" in name):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def publish(staged: str, final: str) -> None:
    """Rename the finished folder `staged` to `final` in one step, replacing an older folder of that name."""
    from .durable import follow_umask

    follow_umask(staged)
    fsync_tree(staged)
    swap_in(staged, final)
    fsync_dir(os.path.dirname(final))


def claim_run_folder(output_dir: str, resume: str | None, hint: str = "--resume_from_checkpoint last",
                     model_dir: str | None = None, *, inputs=(), overwrite: bool = False,
                     flag: str = "--overwrite_output_dir"):
    """Before anything is written: refuse an output folder inside the base `model_dir` or one that holds the user's
    own files (tuning.outputs.check_training_folder: `inputs`, `overwrite` = `flag` given), lock `output_dir`
    (main process) and check that every checkpoint-N in it is this run's to replace or rotate (tuning.run_folder).
    Called early by the recipes and again by the Trainer."""
    from .distributed import is_main
    from .outputs import check_training_folder, refuse_output_in_model
    from .run_folder import is_earlier_run

    refuse_output_in_model(output_dir, model_dir)
    claim_checkpoints(output_dir, resume, TRAINER_CHECKPOINTS, hint)  # refused: nothing written
    check_training_folder(output_dir, inputs=inputs, overwrite=overwrite, flag=flag, earlier_run=is_earlier_run)
    if is_main():
        lock_output_dir(output_dir)
        finish_publish(output_dir)  # a final save interrupted while its files moved in
    return claim_checkpoints(output_dir, resume, TRAINER_CHECKPOINTS, hint)  # again, under the lock


def rotate(run_dir: str, limit: int | None, keep: set[str], owned: set[str]) -> None:
    """Keep the `limit` most recently written complete checkpoints of this run (`owned` names; and those in
    `keep`); another run's checkpoints are never removed."""
    found = [path for _, path in list_checkpoints(run_dir) if os.path.basename(path) in owned]
    found.sort(key=lambda p: (os.path.getmtime(os.path.join(p, "trainer_state.json")), p))
    rotate_folders(run_dir, found, limit, keep)


def rotate_folders(run_dir: str, oldest_first: list[str], limit: int | None, keep: set[str] = frozenset()) -> None:
    """Remove the oldest folders beyond `limit` (never one in `keep`); each is renamed to .deleting-… first, so it
    is no longer a checkpoint the moment its deletion starts."""
    if not limit or limit <= 0:
        return
    keep = {os.path.abspath(p) for p in keep}
    excess = len(oldest_first) - max(limit, len(keep))
    for path in oldest_first:
        if excess <= 0:
            break
        if os.path.abspath(path) in keep:
            continue
        doomed = os.path.join(run_dir, DELETING + os.path.basename(path))
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        excess -= 1


def save_checkpoint_staged(run_dir: str, name: str, write, claim, rotate_after, is_saver: bool, device=None,
                           before_publish=None) -> BaseException | None:
    """The one way a checkpoint is saved, by the Trainer recipes and the raw DeepSpeed loop alike: every rank's
    `write(staging)` fills run_dir/.saving-NAME/NAME; when that worked on every rank, the saver checks with
    `claim()` (tuning.run_folder.Claim) that NAME is this run's to replace, marks it as this run's, renames it to
    run_dir/NAME in one step (`publish`) and calls `rotate_after(final, claim)`. Returns the error of a failed write
    (nothing published, older checkpoints untouched), else None."""
    staging = os.path.join(run_dir, STAGING + name)
    if is_saver:
        os.makedirs(run_dir, exist_ok=True)
        remove_leftovers(run_dir)

    def finish():
        final = os.path.join(run_dir, name)
        if before_publish is not None:
            before_publish(os.path.join(staging, name))
        owner = claim()
        owner.check_replace(final)
        owner.mark(os.path.join(staging, name))
        publish(os.path.join(staging, name), final)
        rotate_after(final, owner)

    return save_collectively(lambda: write(staging), staging, finish, is_saver, device)


def save_failed(name: str, error: BaseException, last_good: str | None, resume_hint: str) -> str:
    """The one line a failed checkpoint save stops training with."""
    good = (f"{last_good} is the last good checkpoint; free space and resume with {resume_hint}" if last_good
            else "there is no earlier checkpoint; free space and start again")
    return f"saving {name} failed ({failure_reason(error)}); nothing of it was kept. {good}"


def save_pretrained_atomically(save, folder: str) -> None:
    """`save(tmp)` writes a model/adapter into a temporary folder; its files then replace those in `folder` one
    by one (each file whole or not at all). One process only; collective saves use `save_collectively`."""
    os.makedirs(folder, exist_ok=True)
    finish_publish(folder)  # an earlier save interrupted midway is completed first
    tmp = os.path.join(folder, STAGING + "final")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        replace_files(tmp, folder)
    finally:
        if not publish_pending(folder):  # interrupted while moving in: kept for finish_publish
            shutil.rmtree(tmp, ignore_errors=True)


def save_collectively(write, staging: str, finish, is_saver: bool, device=None) -> BaseException | None:
    """A save that every rank takes part in: `write()` (all ranks) fills `staging`; when it worked on every rank,
    the saver runs `finish()` (e.g. publish/replace_files) while the others wait. Returns the error of a failed
    write (any rank; its staging folder removed, nothing published), else None."""
    from .distributed import barrier

    if is_saver:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    error = None
    try:
        write()
    except Exception as exc:  # disk full, file-size limit, ... (any rank)
        error = exc
    if _any_rank(error is not None, device):
        if is_saver:
            shutil.rmtree(staging, ignore_errors=True)
        return error or RuntimeError("the save failed on another process")
    barrier()
    if is_saver:
        finish()
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    return None


def _any_rank(flag: bool, device=None) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    if device is None:
        from .distributed import local_device

        device = local_device() if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value)
    return bool(value.item())


@contextlib.contextmanager
def deepspeed_reads_weights_only():
    """Inside, every torch.load reads weights only, DeepSpeed's own checkpoint reader included: DeepSpeed 0.19
    calls torch.load(weights_only=False) (TorchCheckpointEngine.load), so resuming a DeepSpeed checkpoint could run
    pickled code. torch's public switches do it: TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 (wins over an explicit
    weights_only=False) and torch.serialization.safe_globals, allowing only the DeepSpeed classes its optimizer
    states hold (found on ZeRO-1/2/3 checkpoints: the loss scaler, the ZeRO stage enum, fragment addresses).
    Used around every DeepSpeed resume."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if before is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before


FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class AtomicCheckpoints(TrainerCheckpointHooks):
    """Mix into a transformers Trainer class (before it): checkpoints are staged and renamed (module docstring).

    `resume_hint` is how the recipe's user resumes, shown when a save fails. `train_sampler` (from
    tuning.packing.less_padding, --group_by_length) replaces the Trainer's random sampler."""

    resume_hint = "--resume_from_checkpoint last"
    _claim = None

    def __init__(self, *args, train_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_sampler = train_sampler

    def _get_train_sampler(self, *args, **kwargs):  # the Trainer's documented override point
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(*args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """As Trainer.train; a checkpoint file that holds pickled code is refused in one line (DeepSpeed's
        own checkpoint files included)."""
        if resume_from_checkpoint is True:
            found = list_checkpoints(self.args.output_dir)
            resume_from_checkpoint = found[-1][1] if found else None
        self._claim = claim_run_folder(self.args.output_dir, resume_from_checkpoint or None, self.resume_hint)
        resuming_deepspeed = resume_from_checkpoint and getattr(self, "is_deepspeed_enabled", False)
        with deepspeed_reads_weights_only() if resuming_deepspeed else contextlib.nullcontext(), \
                refuse_pickled_code(str(resume_from_checkpoint or self.args.output_dir)):
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_checkpoint(self, model, trial):
        run_dir = self.trainer_run_dir(trial)
        name = f"checkpoint-{self.state.global_step}"

        def write(staging):
            self.trainer_save_checkpoint(model, trial, into=staging)

        def best_model_renamed(staged):  # a best checkpoint named by its staging path gets its final name
            best = self.state.best_model_checkpoint
            if best and best.startswith(os.path.dirname(staged)):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))

        def rotate_after(final, claim):
            best = self.state.best_model_checkpoint
            rotate(run_dir, self.args.save_total_limit, {final} | ({best} if best else set()), claim.owned)

        error = save_checkpoint_staged(run_dir, name, write,
                                       lambda: self._claim or claim_run_folder(run_dir, None, self.resume_hint),
                                       rotate_after, self.args.should_save, self.args.device, best_model_renamed)
        if error is not None:
            found = list_checkpoints(run_dir)
            raise TrainingStopped(save_failed(name, error, found[-1][1] if found else None,
                                              self.resume_hint)) from error

    def save_model(self, output_dir=None, _internal_call=False):
        """The final weights (a call from the recipe, not from a checkpoint save, which is staged already) go to
        a staging folder first; their files then replace those in output_dir, each whole or not at all."""
        if _internal_call or self.saving_checkpoint:
            return super().save_model(output_dir, _internal_call)
        folder = output_dir or self.args.output_dir
        staging = os.path.join(folder, STAGING + "final")
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            finish_publish(folder)
        error = save_collectively(lambda: super(AtomicCheckpoints, self).save_model(staging, _internal_call=True),
                                  staging, lambda: replace_files(staging, folder), self.args.should_save,
                                  self.args.device)
        if error is not None:
            found = list_checkpoints(folder)
            kept = f"; {found[-1][1]} is the last good checkpoint" if found else ""
            raise TrainingStopped(f"saving the final weights into {folder} failed ({failure_reason(error)}); the "
                                  f"files there before were kept{kept}") from error
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

class AtomicTrainer(AtomicCheckpoints, Trainer):
    """transformers.Trainer whose checkpoints are written atomically."""


def failure_reason(error: BaseException) -> str:
    """A short reason for a failed save: the OS error if there is one; torch and safetensors report a failed
    write in their own words, which are translated."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(error).strip()
    if any(sign in text for sign in ("file write failed", "unexpected pos", "os error 27", "os error 28")):
        return "a file write failed: disk full or over a file-size limit"
    return text.splitlines()[0][:200] if text else type(error).__name__
