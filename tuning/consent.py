"""What runs or connects only with the user's consent: a model folder's own Python code (`--trust_remote_code`)
and the network (the Hugging Face Hub, only when HF_HUB_OFFLINE=0 is set by the user).

`--trust_remote_code` is understood by every command (run_main takes it off the command line, as `--debug`);
the model loaders read `remote_code_allowed()` and pass it to transformers explicitly, so transformers never
prompts "run the custom code? [y/N]" and never runs a folder's code on a "y".
"""
REMOTE_CODE_FLAG = "--trust_remote_code"
_state = {"remote_code": False}


def take_flags(argv: list[str]) -> None:
    """Remove --trust_remote_code from `argv` (in place) and remember whether it was there."""
    _state["remote_code"] = REMOTE_CODE_FLAG in argv
    argv[:] = [a for a in argv if a != REMOTE_CODE_FLAG]


def remote_code_allowed() -> bool:
    return _state["remote_code"]


def remote_code_refusal(path: str, what: str = "model folder"):
    """The one-line error for a folder that needs its own code (auto_map) while the user did not allow it."""
    from .errors import UserError

    return UserError(f"this {what} needs its own Python code (auto_map in its config); it is not run unless you "
                     f"pass {REMOTE_CODE_FLAG} (read the folder's .py files first)", path=path)
