"""Compile DeepSpeed's CPU ops once, ahead of the first training run (`make deepspeed-ops`).

    python -m tuning.deepspeed_ops            # the comm op, FusedAdam and cpu_adam (offload), one compiler job
    python -m tuning.deepspeed_ops --jobs 2

DeepSpeed JIT-compiles these on first use: on a 2-core CPU the first DeepSpeed run otherwise pauses ~60 s for the
comm op, and ~70 s more for cpu_adam with offload. Built ops are cached in TORCH_EXTENSIONS_DIR (torch's default:
~/.cache/torch_extensions); an op already there loads in a moment, so running this again costs nothing.
"""
import argparse
import os
import sys
import time

# The ops DeepSpeed on a CPU builds: gloo/shm all-reduce, FusedAdam (DeepSpeed's default optimizer), cpu_adam (offload).
OPS = ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder")


def build(names=OPS, jobs: int = 1, verbose: bool = False) -> None:
    """Each op compiled (or loaded from the cache); a compiler error is raised as DeepSpeed reports it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a CUDA machine builds its ops with DS_BUILD_OPS at install
    os.environ["MAX_JOBS"] = str(jobs)
    from deepspeed.accelerator import get_accelerator

    for name in names:
        started = time.monotonic()
        get_accelerator().create_op_builder(name).load(verbose=verbose)
        if verbose:
            print(f"{name}: {time.monotonic() - started:.0f} s", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1,
                        help="parallel compiler jobs (default 1: each takes ~1.5 GB of memory)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: expected a number ≥ 1, got {args.jobs}")
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    print(f"DeepSpeed CPU ops → {where} (first time: about 2-3 min on 2 cores)", flush=True)
    build(jobs=args.jobs, verbose=True)


if __name__ == "__main__":
    sys.exit(main())
