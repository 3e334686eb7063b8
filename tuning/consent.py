"""What runs or connects only with the user's consent: a model folder's own Python code (`--trust_remote_code`)
and the network (the Hugging Face Hub, only when HF_HUB_OFFLINE=0 is set by the user).

`--trust_remote_code` is understood by every command (run_main takes it off the command line, as `--debug`);
the model loaders read `remote_code_allowed()` and pass it to transformers explicitly, so transformers never
prompts "run the custom code? [y/N]" and never runs a folder's code on a "y".

`stay_offline()` (run_main and every model loader call it) turns on the offline switches of huggingface_hub,
transformers and datasets unless the user set HF_HUB_OFFLINE themselves: HF_HUB_OFFLINE=0 is how to ask for
downloads (e.g. --push_to_hub). A path that does not exist is then never taken for a Hub repo id.
"""
import os

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
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
    from .exceptions import UserError

    return UserError(f"this {what} needs its own Python code (auto_map in its config); it is not run unless you "
                     f"pass {REMOTE_CODE_FLAG} (read the folder's .py files first)", path=path)


def network_allowed() -> bool:
    """The user asked for the network: HF_HUB_OFFLINE is set to a false value (0/false/no)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no", "off")


def stay_offline() -> None:
    """The Hugging Face libraries work offline unless the user set HF_HUB_OFFLINE=0 (see module docstring)."""
    if network_allowed():
        return
    for name in OFFLINE_SWITCHES:
        os.environ[name] = "1"
    from .patches import switch_loaded_hub_libraries_offline

    switch_loaded_hub_libraries_offline()  # their copies of the variable, read when they were imported
