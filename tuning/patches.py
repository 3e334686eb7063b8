"""Every place the training library reaches into a third-party library's internals, one small named piece each.

Each says what it changes, why no public way does it, the library version it was written for, and what breaks if
the internal moves; tests/test_patches.py checks each internal still exists in the installed version, so an upgrade
that moves one fails there, by name, instead of somewhere deep in a run. Nothing here runs at import: each piece
runs when called. Public alternatives are used elsewhere wherever they exist (e.g. DeepSpeed checkpoints are read
under TORCH_FORCE_WEIGHTS_ONLY_LOAD + torch.serialization.safe_globals, tuning.checkpoints).
"""
import contextlib
import sys

WRITTEN_FOR = {"torch": "2.13.0", "tqdm": "4.70.1", "huggingface_hub": "2.4.0", "datasets": "5.2.0",
               "accelerate": "1.15.0", "transformers": "5.23.0", "trl": "1.16.0"}


@contextlib.contextmanager
def forward_replaced(module, forward):
    """While inside, `module(...)` runs `forward` instead of its class's forward, on this one instance.

    How: an instance attribute `forward` shadows the class method; torch 2.13's nn.Module.__call__ (`_call_impl`)
    looks `self.forward` up at each call, so the module's hooks still run around it. Why: a faster kernel choice for
    the vocabulary projection while generating (tuning.generation) without swapping the module out of the model
    (which would drop its hooks and tied weights). If torch ever binds forward at construction, the replacement is
    silently not used: generation stays correct, only slower; test_patches checks the lookup still happens."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def open_progress_bars() -> list:
    """The tqdm bars still open in this process (tqdm 4.70: the class-level WeakSet `tqdm.tqdm._instances`; there
    is no public list). Why: an error line printed under a half-drawn bar is glued to it. Read only if tqdm is
    loaded already; if the attribute moves this returns [] and errors are printed as before, only less tidily."""
    tqdm = sys.modules.get("tqdm")
    return list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()))


def switch_loaded_hub_libraries_offline() -> None:
    """huggingface_hub 2.4 (`constants.HF_HUB_OFFLINE`, which its `is_offline_mode()` returns) and datasets 5.2
    (`config.HF_HUB_OFFLINE`, `config.HF_DATASETS_OFFLINE`) read HF_HUB_OFFLINE into module constants when first
    imported, and our commands import them (through transformers) before `run_main` sets the variable: the copies
    of modules already loaded are set too. Modules loaded later read the environment (tuning.consent). There is no
    public setter. If these names move, a library call outside our loader (which passes local_files_only=True) could
    reach the network: test_patches and tests/test_offline.py fail first."""
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def reset_accelerate_state_unless_deepspeed() -> None:
    """Forget an accelerate state an earlier run in this process left behind (its own backend, not DeepSpeed), so
    the next DeepSpeed TrainingArguments can make its gloo state. accelerate 1.15 has no public reset and no way to
    ask whether a state exists without creating one: `PartialState._shared_state` (empty until made) and
    `AcceleratorState._reset_state(reset_partial_state=True)` are what transformers 5.23's TrainingArguments itself
    uses for the same purpose (training_args.py, `_setup_devices`). If they move, a second in-process DeepSpeed run
    (tests, notebooks) keeps the old state and fails to start; a first run in a fresh process is unaffected."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    if PartialState._shared_state and PartialState().distributed_type != DistributedType.DEEPSPEED:
        AcceleratorState._reset_state(reset_partial_state=True)


def fused_lm_head_scores_answer_positions_only_on_cpu() -> None:
    """TRL 1.16's fused LM head (trl.trainer.utils.add_fused_lm_head; DPO and KTO score through it) projects only the
    positions whose label is scored when Triton runs its kernel, but every position elsewhere: its reason is Neuron,
    where each new count of scored positions would recompile the kernel. A CPU runs the kernel's torch fallback
    eagerly, so nothing recompiles, and scoring every position there means the whole prompt goes through the
    vocabulary projection too: the NER recipe's ~200-token instruction for a ~15-token answer (measured: 4 DPO steps
    on its tiny model 22 s → 1.4 s, losses and adapter bit-identical; each position's log-prob is computed on its
    own). The choice is `compact = _use_triton(device)` inside the fused forward, which looks `_use_triton` up in
    trl.trainer.utils' globals at each call (imported there from trl.kernels.chunked_logprob); it is rebound in that
    module only, so the kernel module's own `_use_triton` still picks the torch fallback on a CPU. No public option
    exists. If TRL moves the name, training stays correct and only slower: test_patches fails first."""
    import trl.trainer.utils as fused

    choice = fused._use_triton
    if getattr(choice, "compact_on_cpu", False):
        return

    def compact_on_cpu(device) -> bool:
        return device.type == "cpu" or choice(device)

    compact_on_cpu.compact_on_cpu = True
    fused._use_triton = compact_on_cpu


class TrainerCheckpointHooks:
    """Mix into a transformers Trainer class (before it) to redirect its checkpoint save (transformers 5.23).

    Trainer._save_checkpoint(model, trial) writes checkpoint-N (weights, optimizer, scheduler, RNG, state) under
    Trainer._get_output_dir(trial); no public hook lets a subclass write it somewhere else first, which an atomic
    save needs (tuning.checkpoints stages it and renames it into place). Subclasses implement
    `save_checkpoint(model, trial)` and use `trainer_run_dir(trial)` and `trainer_save_checkpoint(model, trial,
    into)`. If the Trainer renames either method, checkpoints would be written non-atomically straight into the run
    folder (no error): test_patches checks both names and their signatures."""

    _checkpoint_root = None

    def _get_output_dir(self, trial):
        return self._checkpoint_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        self.save_checkpoint(model, trial)

    def save_checkpoint(self, model, trial):
        self.trainer_save_checkpoint(model, trial, into=None)

    def trainer_run_dir(self, trial) -> str:
        """The folder the Trainer puts checkpoint-N folders in (output_dir, or a trial's folder)."""
        return super()._get_output_dir(trial)

    def trainer_save_checkpoint(self, model, trial, into: str | None) -> None:
        """The Trainer's own checkpoint save, writing checkpoint-N under `into` instead of the run folder."""
        self._checkpoint_root = into
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_root = None

    @property
    def saving_checkpoint(self) -> bool:
        """Inside `trainer_save_checkpoint(..., into=FOLDER)`."""
        return self._checkpoint_root is not None
