"""One-line errors for bad user input: `file:line: field: what was expected`, exit code 2, no traceback."""
import os
import sys
import traceback

from .exceptions import OUT_OF_MEMORY, NothingToDo, TrainingStopped, UserError  # noqa: F401  (imported from here)

EXIT_USAGE = 2


def parse_bool(value: str) -> bool:
    """An argparse `type` for true/false flags (argparse's type=bool, as some originals used, turns "False" into
    True)."""
    import argparse

    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _end_progress_bars() -> None:
    """Close open tqdm bars so the error starts on its own line, not glued to a half-drawn bar."""
    from .patches import open_progress_bars

    for bar in open_progress_bars():
        bar.close()


def run_main(main, argv: list[str] | None = None):
    """Run a script's `main()`; a UserError becomes `error: ...` on stderr and exit code 2.

    `--debug` anywhere on the command line (removed before `main` sees it) shows the traceback instead;
    so does the environment variable TUNING_DEBUG=1. `--trust_remote_code` (also removed) lets the model loaders
    run a model folder's own code (tuning.consent).
    """
    from .consent import stay_offline, take_flags

    args = sys.argv if argv is None else argv
    take_flags(args)
    stay_offline()  # no network unless the user set HF_HUB_OFFLINE=0
    debug = "--debug" in args or os.environ.get("TUNING_DEBUG") == "1"
    if "--debug" in args:
        args[:] = [a for a in args if a != "--debug"]
    try:
        return main()
    except NothingToDo as exc:
        if os.environ.get("RANK", "0") == "0":
            print(exc, flush=True)
        return None
    except UserError as exc:
        _end_progress_bars()
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except TrainingStopped as exc:
        _end_progress_bars()
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except MemoryError as exc:  # Python's (host RAM); CUDA's is handled below
        _end_progress_bars()
        if debug:
            traceback.print_exc()
        print(f"error: {OUT_OF_MEMORY}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA/accelerator memory)
            raise
        _end_progress_bars()
        if debug:
            traceback.print_exc()
        print(f"error: {OUT_OF_MEMORY} ({str(exc).strip().splitlines()[0][:160]})", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        _end_progress_bars()  # "interrupted" on its own line, not glued to a bar
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        from .run_folder import release_locks

        release_locks()  # the output folders this command locked (tuning.run_folder)
