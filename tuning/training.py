"""Trainer glue the recipes share: resume-path resolution, the loss-curve PNG, the NaN/Inf guard, and the
CPU precision rules. Plain callbacks and functions: the recipes keep using transformers' Trainer as is."""
import math
import os
import re
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from .distributed import say
from .errors import NothingToDo, TrainingStopped, UserError



@dataclass(frozen=True)
class CheckpointNames:
    """How a training loop names its checkpoint folders and knows one is complete."""
    prefix: str          # the folder name before the step number
    marker: str | None   # a file the writer puts in last; None: the folder is published whole (renamed into place)
    kind: str            # for messages

    def step_of(self, name: str) -> int | None:
        match = re.fullmatch(re.escape(self.prefix) + r"(\d+)", name)
        return int(match.group(1)) if match else None

    def complete(self, path: str) -> bool:
        return os.path.isdir(path) and (self.marker is None or os.path.isfile(os.path.join(path, self.marker)))


# The Trainer writes trainer_state.json last, so a save that was killed midway is never picked for resuming.
TRAINER_CHECKPOINTS = CheckpointNames("checkpoint-", "trainer_state.json", "Trainer checkpoint")
# The raw DeepSpeed loop stages .saving-global_stepN and renames it when every rank's part is on disk.
DEEPSPEED_CHECKPOINTS = CheckpointNames("global_step", None, "DeepSpeed checkpoint")
NO_WORDS = ("", "no", "false", "none")
LAST_WORDS = ("last", "latest", "yes", "true")


def list_checkpoints(output_dir: str, names: CheckpointNames = TRAINER_CHECKPOINTS) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step, path = names.step_of(name), os.path.join(output_dir, name)
        if step is not None and names.complete(path):
            found.append((step, path))
    return sorted(found)


def resolve_resume(value, output_dir: str, *, names: CheckpointNames = TRAINER_CHECKPOINTS,
                   field: str = "resume_from_checkpoint", paths: bool = True,
                   fresh_when_none_saved: bool = False) -> str | None:
    """The one resume grammar of every entry point: `value` → a checkpoint folder, or None to start fresh.

    no / false / empty: fresh. last / latest / yes / true: the newest complete checkpoint in output_dir (none saved:
    an error, or a fresh start with `fresh_when_none_saved`, as some originals did). A step N > 0: output_dir/<prefix>N.
    A path (when `paths`): that folder. A step or path that is missing or incomplete is one line that lists the
    saved steps.
    """
    text = "" if value is None or value is False else str(value).strip()
    if text.lower() in NO_WORDS:
        return None
    found = list_checkpoints(output_dir, names)
    saved = f"saved steps: {', '.join(str(step) for step, _ in found) or 'none'}"
    if text.lower() in LAST_WORDS:
        if found:
            return found[-1][1]
        if fresh_when_none_saved:
            say(f"no {names.prefix}N in {output_dir}: training from scratch")
            return None
        raise UserError(f"no complete {names.prefix}N to resume from", path=output_dir, field=field)
    if text.isdigit() and int(text) > 0:
        path = os.path.join(output_dir, f"{names.prefix}{int(text)}")
    elif paths and not text.lstrip("+-").isdigit():
        path = text.rstrip("/") or text
    else:
        also = ", or a checkpoint folder" if paths else ""
        raise UserError(f"expected yes, no, or a checkpoint step N > 0{also}, got {value!r}", field=field)
    if not os.path.isdir(path):
        raise UserError(f"does not exist ({saved})", path=path, field=field)
    named = names.marker is not None or names.step_of(os.path.basename(path)) is not None
    if not named or not names.complete(path):
        missing = f" (no {names.marker}: its save did not finish)" if names.marker else ""
        raise UserError(f"not a complete {names.kind} {names.prefix}N{missing} ({saved})", path=path, field=field)
    return path


def stop_if_finished(checkpoint: str | None, max_steps: int, num_train_epochs: float | None = None,
                     flag: str = "--max_steps") -> None:
    """Resuming a run that already reached its end changes nothing: NothingToDo (exit 0) says so.

    Why: given a checkpoint at global_step == max_steps, the Trainer skips the trained batches and then runs one
    more step (it checks max_steps only after a step), writing checkpoint-(N+1) and rotating a good one away.
    A raised max_steps trains exactly up to it. With max_steps <= 0 (epochs), the checkpoint is finished when it
    reached the max_steps its run computed for the same num_train_epochs."""
    if not checkpoint:
        return
    state = _read_state(checkpoint)
    step = int(state.get("global_step", 0))
    if max_steps > 0:
        stop_at_end(checkpoint, step, max_steps, flag)
    elif num_train_epochs is not None and state.get("num_train_epochs") == num_train_epochs and state.get("max_steps"):
        stop_at_end(checkpoint, step, int(state["max_steps"]), flag,
                    f"the end of its {num_train_epochs:g} epoch(s)")


def stop_at_end(checkpoint: str, step: int, end: int, flag: str = "--max_steps", what: str | None = None) -> None:
    """NothingToDo when a checkpoint at `step` has reached the run's last step `end`."""
    if step >= end:
        raise NothingToDo(f"{checkpoint} is already at step {step} ({what or f'max_steps {end}'}): nothing to "
                          f"train, nothing was changed; raise {flag} to train further")


def _read_state(checkpoint: str) -> dict:
    import json

    path = os.path.join(checkpoint, "trainer_state.json")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable Trainer state ({exc})", path=path, field="resume_from_checkpoint") from None
    if not isinstance(state, dict):
        raise UserError("expected a JSON object", path=path, field="resume_from_checkpoint")
    return state


def written_under_deepspeed(checkpoint: str) -> bool | None:
    """True for a Trainer checkpoint whose optimizer/scheduler DeepSpeed wrote (global_stepN/, named by the file
    `latest`), False for one the plain Trainer wrote (optimizer.pt), None when it holds neither (weights only)."""
    names = os.listdir(checkpoint)
    if "latest" in names or any(name.startswith("global_step") and os.path.isdir(os.path.join(checkpoint, name))
                                for name in names):
        return True
    return False if "optimizer.pt" in names else None


def check_resume_launcher(checkpoint: str | None, deepspeed: bool, with_deepspeed: str, without_deepspeed: str,
                          field: str = "resume_from_checkpoint") -> None:
    """Refuse to resume a DeepSpeed checkpoint without DeepSpeed, or the converse: the optimizer and scheduler
    state would silently start over (plain Trainer) or not load at all (DeepSpeed). `with_deepspeed` /
    `without_deepspeed` say how to relaunch this recipe to resume it exactly."""
    if not checkpoint:
        return
    written = written_under_deepspeed(checkpoint)
    if written and not deepspeed:
        raise UserError("written under DeepSpeed (its optimizer and scheduler state are in global_stepN/, which "
                        f"only DeepSpeed reads); to resume it exactly, {with_deepspeed}", path=checkpoint,
                        field=field)
    if written is False and deepspeed:
        raise UserError("written without DeepSpeed (optimizer.pt, which DeepSpeed does not read); to resume it "
                        f"exactly, {without_deepspeed}", path=checkpoint, field=field)


def check_precision(fp16: bool, bf16: bool, use_cpu: bool, option=lambda key: f"--{key}") -> None:
    """fp16 on CPU is refused: 0.3 GFLOP/s there and overflow-prone; bf16 is ~2x faster than fp32.
    `option(key)` is how the recipe's user sets fp16/bf16 (a flag, or a YAML key)."""
    on_cpu = use_cpu or not torch.cuda.is_available()
    if fp16 and on_cpu:
        raise UserError("fp16 is not supported on CPU (no fast fp16 kernels; losses overflow); use "
                        f"{option('bf16')} or fp32", field="fp16")
    if fp16 and bf16:
        raise UserError(f"choose one of {option('fp16')} and {option('bf16')}", field="bf16")


class NanGuard(TrainerCallback):
    """Stops training at the first step whose gradients are NaN/Inf, before the optimizer touches the weights.

    The last saved checkpoint stays the last good one; the message names the step and the likely cause.
    """

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()):
            if args.fp16:
                hint = "fp16 overflow is the usual cause: use bf16 (or fp32)"
            elif args.bf16:
                hint = "lower the learning rate, check the data, or try fp32"
            else:
                hint = "lower the learning rate or check the data"
            raise TrainingStopped(f"non-finite loss/gradients at step {state.global_step + 1}; {hint}. "
                                  f"Weights were not updated; {last_good(args.output_dir)}")


def last_good(output_dir: str) -> str:
    """Which checkpoint is still good, for the message of a run that has to stop."""
    found = list_checkpoints(output_dir)
    return f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint was saved yet"


# What the data steps dropped or cut, printed when found and again when training ends (where it is seen).
DATA_NOTES: list[str] = []


def data_note(message: str) -> None:
    """Print a count of dropped/truncated rows now (rank 0) and keep it for `print_data_notes` at the end."""
    from .distributed import say

    say(message)
    DATA_NOTES.append(message)


def print_data_notes() -> None:
    """Repeat the data notes of this run once, at its end (rank 0), then forget them. Through tqdm.write: the
    Trainer's progress bar is still open when training ends (its callback closes it after ours), and a plain print
    ran on at the end of the bar's line (issue 33.1)."""
    from tqdm import tqdm

    from .distributed import is_main

    if DATA_NOTES and is_main():
        tqdm.write("\n".join(["data notes (rows dropped or cut before training):",
                               *(f"  {message}" for message in DATA_NOTES)]))
    DATA_NOTES.clear()


class DataNotesAtEnd(TrainerCallback):
    """`print_data_notes` when training ends."""

    def on_train_end(self, args, state, control, **kwargs):
        print_data_notes()


class LossPlot(TrainerCallback):
    """Writes OUTPUT_DIR/loss.png (training loss per logged step) when training ends."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_loss_plot(state.log_history, os.path.join(args.output_dir, "loss.png"))


def save_loss_plot(log_history: list[dict], path: str) -> str | None:
    return save_step_plot(log_history, path, {"loss": None}, ylabel="training loss")


def save_step_plot(log_history: list[dict], path: str, series: dict, ylabel: str | None = None) -> str | None:
    """A PNG of logged values per step (atomically written): `series` maps a log key to its legend label (None: no
    legend); the first key decides whether there is anything to plot. None when there is not."""
    lines = {key: [(e["step"], e[key]) for e in log_history if key in e and math.isfinite(e[key])] for key in series}
    first = next(iter(series))
    if not lines[first]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .durable import atomic_file

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for i, (key, label) in enumerate(series.items()):
        if lines[key]:
            ax.plot(*zip(*lines[key]), marker="." if len(lines[key]) < 50 else None, linestyle="-" if i == 0 else "--",
                    label=label)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if any(series.values()):
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
