"""The original's config mechanism: a (possibly nested) dict of defaults, overridden by `--key=value` arguments.

    config = {"model_dir": "...", "optimizer": {"adam": {"lr": 1e-5}}}
    args = ConfigParser(config).parse_main()      # python x.py --model_dir=/m --optimizer_adam_lr=3e-4
    args.model_dir, args.optimizer_adam_lr

Semantics kept from the original: nested keys are joined with "_"; every argument is `--key=value` (or
`-key=value`); values are typed by `judge_type` (digits → int, a number → float, true/false → bool, a Python
literal → that literal, anything else → the text); an unknown key is refused with the original message.
Fixed: "True"/"TRUE" now mean True (the original compared with "true" only, so they became False); a value may
contain "=" (split on the first one); a value whose type contradicts the default (`--train_batch_size=abc`) is a
one-line error instead of a crash later. Values are parsed as data (`ast.literal_eval`), never evaluated.
"""
import ast
import re
import sys
from types import SimpleNamespace

from tuning.errors import UserError

_NUMBER = re.compile(r"^-?\d+\.?\d*$")


def judge_type(value: str):
    """Type a command-line value the way the original did (with the True/TRUE fix)."""
    if value.isdigit():
        return int(value)
    if _NUMBER.match(value):
        return float(value)
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def flatten(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a_b": 1}"""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}_{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _coerce(key: str, value, default, raw: str):
    """Check an override against the type of its default (None and lists/dicts accept anything)."""
    if default is None or isinstance(default, (list, tuple, dict)):
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise UserError(f"expected true or false, got {raw!r}", field=key)
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # "-1" is typed as the float -1.0
            return int(value)
        raise UserError(f"expected an integer, got {raw!r}", field=key)
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"expected a number, got {raw!r}", field=key)
    if isinstance(default, str):
        return raw  # a path or a name stays text even if it looks like a number ("--data_name=1")
    return value


class ConfigParser:
    """`ConfigParser(config).parse_main()` → an object with one attribute per flattened key."""

    def __init__(self, config: dict, argv: list[str] | None = None, help_text: str = "", help_keys: dict | None = None):
        if not isinstance(config, dict):
            raise TypeError("config must be a dict")
        self.config = config
        self.args = list(sys.argv[1:] if argv is None else argv)
        self.help_text, self.help_keys = help_text, help_keys or {}

    def get_args(self) -> dict:
        """`--key=value` arguments → {key: raw text}."""
        parsed = {}
        for arg in self.args:
            if "=" not in arg or not arg.startswith("-"):
                raise UserError(f"expected --key=value, got {arg!r} (see --help)", field="arguments")
            name, value = arg.split("=", 1)
            name = name.lstrip("-")
            if not name:
                raise UserError(f"expected --key=value, got {arg!r}", field="arguments")
            parsed[name] = value
        return parsed

    def print_help(self, flat: dict) -> None:
        print(self.help_text.strip() + "\n" if self.help_text else "", end="")
        print("\nOptions (--key=value; defaults shown):")
        width = max(len(k) for k in flat) + 2
        for key, value in flat.items():
            note = self.help_keys.get(key, "")
            print(f"  --{key:<{width}} {value!r}" + (f"   {note}" if note else ""))

    def parse_main(self) -> SimpleNamespace:
        flat = flatten(self.config)
        if any(a in ("-h", "--help") for a in self.args):
            self.print_help(flat)
            sys.exit(0)
        for key, raw in self.get_args().items():
            if key not in flat:
                raise UserError(f"参数【{key}】不在配置中，请检查！ (unknown key; see --help)", field=key)
            flat[key] = _coerce(key, judge_type(raw), flat[key], raw)
        return SimpleNamespace(**flat)
