"""Process setup every training entry point shares, for `torchrun --nproc_per_node N` (DDP) and
`deepspeed --num_gpus N`, on GPUs (NCCL) and on CPUs (gloo) with no code change between them.

- rank / world size / local device read from the launcher's environment (torchrun and deepspeed set the same
  RANK, LOCAL_RANK, WORLD_SIZE; LOCAL_WORLD_SIZE vs LOCAL_SIZE for the processes on this machine);
- torch threads per rank, so N ranks on N cores do not each start N threads;
- the HF Trainer on CPU: accelerate finds no GPU and would run DeepSpeed as one process while DeepSpeed itself
  joined N ranks; the process state is created first on gloo (STACK_ON_CPU.md §1), DDP gets use_cpu + gloo;
- ZeRO-3: trainable parameters are gathered on every rank before rank 0 writes them (else the files are empty);
- rank-0-only printing and writing, barriers.
"""
import contextlib
import json
import os

import torch

from .errors import UserError

if not torch.cuda.is_available():  # DeepSpeed would probe for accelerators and warn that it settled on the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Processes on this machine: torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size())


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True under torchrun / the deepspeed launcher (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def drop_local_rank_argument(argv: list[str]) -> None:
    """The deepspeed launcher appends --local_rank=N; a script without that option reads LOCAL_RANK instead."""
    argv[:] = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]


def backend() -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device() -> torch.device:
    """This rank's device: its own GPU (not cuda:0 for every rank), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def say(*args, **kwargs) -> None:
    """print() on rank 0 only (once per job, like the Trainer's own logs)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def limit_threads() -> int:
    """torch threads per rank: OMP_NUM_THREADS if set, else the cores divided among this machine's ranks."""
    processes = local_world_size()
    if processes <= 1:
        return torch.get_num_threads()
    given = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(given) if given.isdigit() and int(given) > 0 else max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    return threads


def single_process_env() -> None:
    """DeepSpeed without a launcher goes looking for MPI; a plain `python script.py` becomes rank 0 of 1."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def cap_dataloader_workers(kwargs: dict) -> dict:
    """dataloader_num_workers beyond the cores this process may use (some original configs ask for 16) is
    lowered to them, with one note instead of torch's warning at every epoch."""
    asked = kwargs.get("dataloader_num_workers") or 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if asked <= cores:
        return kwargs
    say(f"note: dataloader_num_workers {asked} lowered to {cores}, the CPU cores this process can use")
    return {**kwargs, "dataloader_num_workers": cores}


def trainer_arguments(kwargs: dict) -> dict:
    """TrainingArguments keywords plus what this launch needs; call it before building TrainingArguments.

    GPU: nothing (transformers and accelerate pick NCCL). CPU: use_cpu; with DeepSpeed (kwargs["deepspeed"]) the
    accelerate state is created here on gloo as a DeepSpeed state and the Trainer told to use it; DDP on gloo.
    Either way, more dataloader workers than cores are lowered to the cores (`cap_dataloader_workers`).
    """
    limit_threads()
    kwargs = cap_dataloader_workers(kwargs)
    if torch.cuda.is_available():
        return dict(kwargs)
    extra = {"use_cpu": True}
    if kwargs.get("deepspeed"):
        single_process_env()
        if launched():  # (WORLD_SIZE alone, without a rank: nothing to join; TrainingArguments decides as usual)
            _deepspeed_state_on_gloo()
            extra["accelerator_config"] = {**(kwargs.get("accelerator_config") or {}), "use_configured_state": True}
    elif world_size() > 1:
        extra["ddp_backend"] = "gloo"
    return {**kwargs, **extra}


def _deepspeed_state_on_gloo() -> None:
    from accelerate.state import PartialState

    from .patches import reset_accelerate_state_unless_deepspeed

    reset_accelerate_state_unless_deepspeed()  # an earlier in-process run left its own
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets while it makes the state
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def init_process_group() -> None:
    """The raw DeepSpeed loop's process group (NCCL or gloo from the device)."""
    import deepspeed

    limit_threads()
    deepspeed.init_distributed(dist_backend=backend())


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank (collective), so all ranks take the same branch."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=local_device() if backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def read_deepspeed_config(config) -> dict:
    """A DeepSpeed config given as a dict or a JSON path (None → {})."""
    if not config:
        return {}
    if isinstance(config, dict):
        return config
    if not os.path.isfile(config):
        raise UserError("DeepSpeed config not found", path=str(config), field="deepspeed")
    with open(config, encoding="utf-8") as f:
        try:
            loaded = json.load(f)
        except json.JSONDecodeError as exc:
            raise UserError(f"invalid JSON: {exc.msg}", path=str(config), line=exc.lineno) from None
        except RecursionError:
            from .readers import TOO_DEEP

            raise UserError(TOO_DEEP, path=str(config)) from None
    if not isinstance(loaded, dict):
        raise UserError(f"expected a JSON object (a DeepSpeed config), got {type(loaded).__name__}", path=str(config))
    return loaded


def zero_stage(config) -> int:
    """The ZeRO stage of a DeepSpeed config (0 without DeepSpeed or without zero_optimization)."""
    where = config if isinstance(config, str) else None
    zero = read_deepspeed_config(config).get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"expected an object, got {type(zero).__name__}", path=where, field="zero_optimization")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"expected 0, 1, 2 or 3, got {stage!r}", path=where, field="zero_optimization.stage")
    return int(stage)


@contextlib.contextmanager
def gathered(params):
    """Inside the block every parameter in `params` holds its full data on every rank (ZeRO-3 all-gathers
    partitioned ones; a no-op otherwise). Collective under ZeRO-3: every rank must enter it."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def save_trainable(model, write) -> None:
    """Collective save of a PEFT adapter (or any model whose trainable parameters are what gets written):
    ZeRO-3 shards are gathered on every rank, rank 0 calls `write(model)`, the others wait for it."""
    with gathered([p for p in model.parameters() if p.requires_grad]):
        if is_main():
            write(model)
    barrier()
