"""The finetune_demo YAML config → FinetuningConfig, read as data (yaml.safe_load) and checked key by key.

    data_config: {train_file, val_file, test_file, num_proc}   # names relative to DATA_DIR, .jsonl
    max_input_length: int ; max_output_length: int ; combine: bool ; freezeV: bool (GLM-4V only, ignored)
    train_first_answer_token: bool (not in the original; default true): with combine, also train the token right
        after the last <|assistant|> (a tool call's function name); false = the original's labels
    training_args: Seq2SeqTrainingArguments keywords, with generation_config: GenerationConfig keywords
    peft_config: peft keywords (peft_type LORA or PREFIX_TUNING); absent = full fine-tuning
    quantization_bit: 4 or 8 (not in the original; LLaMA-Factory's key): the base model's linear layers frozen in
        nf4 / int8 (bitsandbytes), the adapter on top (QLoRA); LoRA or P-tuning v2 only, not with ZeRO-3
    weights_dtype: bf16 or fp32 (not in the original): the dtype the model is loaded in. Absent = as the original:
        bf16, or fp32 master weights under training_args.bf16 / fp16 (autocast). fp32 with both off trains in plain
        fp32: for CPUs without native bf16 matmuls (AVX2 only), where a bf16 matmul runs up to ~100x slower

Every mistake is one line `config.yaml:LINE: field: what was expected`. Numbers follow YAML 1.2 as in the
original's ruamel loader: `5e-4` is a float (plain PyYAML would read it as the string "5e-4").
"""
import dataclasses
import os
import re
import types

import yaml

from tuning.errors import UserError
from tuning.files import read_json, read_text

TOP_KEYS = {"data_config", "max_input_length", "max_output_length", "combine", "train_first_answer_token", "freezeV",
            "training_args", "peft_config", "quantization_bit", "weights_dtype"}
WEIGHTS_DTYPES = ("bf16", "fp32")
DATA_KEYS = {"train_file", "val_file", "test_file", "num_proc"}
PEFT_TYPES = ("LORA", "PREFIX_TUNING")
# Keys transformers 5 removed, with what replaced them (old configs and the June-2024 demo use some of them).
RENAMED = {"evaluation_strategy": "eval_strategy", "no_cuda": "use_cpu",
           "overwrite_output_dir": "nothing (outputs are always written over)",
           "logging_dir": "nothing (set the TENSORBOARD_LOGGING_DIR environment variable)",
           "save_safetensors": "nothing (always safetensors)"}


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader (data only) that also reads 1e-4 / 5E+3 as floats (YAML 1.2, like ruamel), and refuses
    aliases (*name): nine lines of nested aliases expand to billions of values (an "alias bomb"), and a config
    never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config; write the "
                                              "value out", self.peek_event().start_mark)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


@dataclasses.dataclass
class DataConfig:
    train_file: str
    val_file: str | None = None
    test_file: str | None = None
    num_proc: int | None = None

    @property
    def data_files(self) -> dict[str, str]:
        names = {"train": self.train_file, "validation": self.val_file, "test": self.test_file}
        return {split: name for split, name in names.items() if name is not None}


@dataclasses.dataclass
class FinetuningConfig:
    data_config: DataConfig
    max_input_length: int
    max_output_length: int
    combine: bool
    training_args: object            # Seq2SeqTrainingArguments
    peft_config: object | None       # peft PeftConfig, None = full fine-tuning
    freezeV: bool = True
    quantization_bit: int | None = None  # 4 / 8: QLoRA base (bitsandbytes)
    weights_dtype: str | None = None     # bf16 / fp32; None = as the original (see glm4_finetune.finetune)
    # combine: train the token right after the last <|assistant|> (a tool call's function name); false = the original
    train_first_answer_token: bool = True
    path: str = ""
    lines: dict = dataclasses.field(default_factory=dict, repr=False)

    def error(self, field: str, message: str) -> UserError:
        return UserError(message, path=self.path, line=self.lines.get(field), field=field)


def _key_lines(node, prefix="") -> dict[str, int]:
    """'training_args.learning_rate' → 1-based line, from the YAML node tree (safe_load forgets lines)."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = f"{prefix}{key.value}"
            lines[name] = key.start_mark.line + 1
            lines.update(_key_lines(value, name + "."))
    return lines


def _resolve_deepspeed(value: str, config_path: str) -> str:
    """configs/ds_zero_3.json as the shipped YAMLs write it: from the working folder, else next to configs/."""
    if os.path.isabs(value) or os.path.exists(value):
        return value
    for base in (os.path.dirname(os.path.dirname(os.path.abspath(config_path))),
                 os.path.dirname(os.path.abspath(config_path))):
        if os.path.exists(os.path.join(base, value)):
            return os.path.join(base, value)
    return value


def _check_deepspeed(ds_path: str, peft: dict | None, fail) -> int:
    """The DeepSpeed config exists and, for ZeRO-3 with an adapter, gathers its weights on save; its ZeRO stage."""
    from tuning.distributed import read_deepspeed_config, zero_stage

    if not os.path.isfile(ds_path):
        fail("training_args.deepspeed", f"DeepSpeed config not found: {ds_path}")
    ds = read_deepspeed_config(ds_path)
    stage = zero_stage(ds_path)
    if stage == 3 and isinstance(peft, dict) and peft.get("peft_type") != "PREFIX_TUNING" and \
            not ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False):
        fail("training_args.deepspeed", f"{ds_path}: ZeRO-3 with an adapter needs zero_optimization."
                                        "stage3_gather_16bit_weights_on_model_save: true (else the saved adapter "
                                        "is empty)")
    return stage


def method_of(peft) -> str:
    """tuning.run_plan's method name for a peft_config (the YAML mapping or the PeftConfig; none: full)."""
    if peft is None:
        return "full"
    kind = peft.get("peft_type") if isinstance(peft, dict) else peft.peft_type
    return "ptuning" if kind == "PREFIX_TUNING" else "lora"


def _check_combination(raw: dict, training: dict, stage: int | None, fail) -> int | None:
    """quantization_bit (4, 8 or null) × method × ZeRO stage × precision, by tuning.run_plan's one rule set, before
    any process group or weight exists; each refusal at the line of the key it names."""
    from tuning.run_plan import Spelling, check_combination

    bits = raw.get("quantization_bit")
    if bits not in (None, 4, 8) or isinstance(bits, bool):
        fail("quantization_bit", f"expected 4, 8 or null, got {bits!r}")
    keys = {"fp16": "training_args.fp16", "bf16": "training_args.bf16", "deepspeed": "training_args.deepspeed"}
    try:
        check_combination(method=method_of(raw.get("peft_config")), bits=bits, zero_stage=stage,
                          fp16=bool(training.get("fp16")), bf16=bool(training.get("bf16")),
                          use_cpu=bool(training.get("use_cpu")),
                          spelling=Spelling(option=lambda key: f"training_args.{key}: true"))
    except UserError as exc:
        fail(keys.get(exc.field, exc.field), exc.message)
    return bits


def load_config(path: str) -> FinetuningConfig:
    text = read_text(path)
    try:
        lines = _key_lines(yaml.compose(text, Loader=_Loader))  # first: an alias is refused before any expansion
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise UserError("invalid YAML: nested too deeply (hundreds of levels); expected a flat config",
                        path=path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(f"invalid YAML: {getattr(exc, 'problem', exc)}", path=path,
                        line=mark.line + 1 if mark else None) from None

    def fail(field, message):
        raise UserError(message, path=path, line=lines.get(field), field=field)

    if not isinstance(raw, dict):
        fail(None, "expected a mapping of data_config, max_input_length, ..., training_args")
    for key in raw:
        if key not in TOP_KEYS:
            fail(key, f"unknown key; expected one of {', '.join(sorted(TOP_KEYS))}")

    data = _data_config(raw.get("data_config"), fail)

    for key in ("max_input_length", "max_output_length"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(key, f"expected a positive integer, got {value!r}")
    for key in ("combine", "freezeV", "train_first_answer_token"):
        if key in raw and not isinstance(raw[key], bool):
            fail(key, f"expected true or false, got {raw[key]!r}")
    if raw.get("weights_dtype", "bf16") not in WEIGHTS_DTYPES:
        fail("weights_dtype", f"expected {' or '.join(WEIGHTS_DTYPES)}, got {raw['weights_dtype']!r}")
    if "combine" not in raw:
        fail("combine", "missing; expected true (train only the last assistant turn, as the shipped configs) "
                        "or false (train every assistant turn)")

    if not isinstance(raw.get("training_args"), dict):
        fail("training_args", "missing or not a mapping; expected Seq2SeqTrainingArguments keywords")
    training = dict(raw["training_args"])
    generation = training.pop("generation_config", None)
    if not isinstance(generation, dict):
        fail("training_args.generation_config", "missing or not a mapping; expected e.g. {max_new_tokens: 512}")
    training.setdefault("output_dir", "./output")
    stage = None
    if training.get("deepspeed"):
        training["deepspeed"] = _resolve_deepspeed(training["deepspeed"], path)
        if isinstance(training["deepspeed"], str):
            if not isinstance(read_json(training["deepspeed"]), dict):
                raise UserError("expected a JSON object (a DeepSpeed config)", path=training["deepspeed"])
        stage = _check_deepspeed(training["deepspeed"], raw.get("peft_config"), fail)
    _check_training_keys(training, generation, fail)
    bits = _check_combination(raw, training, stage, fail)
    from tuning.distributed import trainer_arguments

    args = _training_args(trainer_arguments(training), generation, fail)  # torchrun / deepspeed, GPU or CPU

    if not args.do_eval or data.get("val_file") is None:  # the original's __post_init__
        from transformers.trainer_utils import IntervalStrategy

        args.do_eval, args.eval_strategy, data["val_file"] = False, IntervalStrategy.NO, None
    else:
        args.per_device_eval_batch_size = args.per_device_eval_batch_size or args.per_device_train_batch_size
    if (args.do_eval or data.get("test_file")) and not args.predict_with_generate:
        fail("training_args.predict_with_generate", "must be true: evaluation generates answers and scores them")

    peft = _peft_config(raw.get("peft_config"), fail)
    return FinetuningConfig(DataConfig(**data), raw["max_input_length"], raw["max_output_length"], raw["combine"],
                            args, peft, raw.get("freezeV", True), bits, raw.get("weights_dtype"),
                            raw.get("train_first_answer_token", True), path, lines)


def _data_config(data, fail) -> dict:
    if not isinstance(data, dict):
        fail("data_config", "missing or not a mapping; expected {train_file, val_file, test_file, num_proc}")
    for key, value in data.items():
        if key not in DATA_KEYS:
            fail(f"data_config.{key}", f"unknown key; expected one of {', '.join(sorted(DATA_KEYS))}")
        if key != "num_proc" and value is not None and not (isinstance(value, str) and value.endswith(".jsonl")):
            fail(f"data_config.{key}", f"expected a .jsonl file name (relative to DATA_DIR), got {value!r}")
    if not data.get("train_file"):
        fail("data_config.train_file", "missing; expected a .jsonl file name relative to DATA_DIR")
    num_proc = data.get("num_proc")
    if num_proc is not None and (not isinstance(num_proc, int) or isinstance(num_proc, bool) or num_proc < 1):
        fail("data_config.num_proc", f"expected a positive integer or null, got {num_proc!r}")
    return data


def _check_training_keys(training: dict, generation: dict, fail) -> None:
    """Every training_args / generation_config key known to transformers 5, with the type its field declares."""
    from transformers import GenerationConfig, Seq2SeqTrainingArguments

    fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    for key in training:
        if key in RENAMED:
            fail(f"training_args.{key}", f"removed in transformers 5; use {RENAMED[key]}")
        if key not in fields:
            fail(f"training_args.{key}", "unknown Seq2SeqTrainingArguments keyword")
    _check_types(training, fail)
    known = set(GenerationConfig().__dict__)
    for key in generation:
        if key not in known:
            fail(f"training_args.generation_config.{key}", "unknown GenerationConfig keyword")


def _training_args(training: dict, generation: dict, fail):
    from transformers import GenerationConfig, Seq2SeqTrainingArguments

    try:
        args = Seq2SeqTrainingArguments(**training)
        args.generation_config = GenerationConfig(**generation)
    except (ValueError, TypeError) as exc:
        fail("training_args", str(exc).splitlines()[0])
    return args


def _type_name(kind) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list",
            dict: "a mapping", type(None): "null"}.get(kind, getattr(kind, "__name__", str(kind)))


def _check_types(training: dict, fail) -> None:
    """Each training_args value has the type its Seq2SeqTrainingArguments field declares (`learning_rate: fast`
    would otherwise pass through and crash inside the optimizer, after the model is loaded)."""
    import typing

    from transformers import Seq2SeqTrainingArguments

    hints = typing.get_type_hints(Seq2SeqTrainingArguments)
    for key, value in training.items():
        hint = hints.get(key)
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        allowed = tuple(typing.get_origin(a) or a for a in allowed)
        if not all(isinstance(a, type) for a in allowed) or not allowed:
            continue
        if any(a not in (bool, int, float, str, list, dict, type(None)) for a in allowed):
            continue  # enums, paths, configs: transformers checks those itself
        ok = any(isinstance(value, a) and not (a in (int, float) and isinstance(value, bool)) for a in allowed)
        ok = ok or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            expected = " or ".join(_type_name(a) for a in allowed)
            fail(f"training_args.{key}", f"expected {expected}, got {value!r}")


def _peft_config(peft: dict | None, fail):
    if peft is None:
        return None
    if not isinstance(peft, dict):
        fail("peft_config", "expected a mapping with peft_type (LORA or PREFIX_TUNING), or no peft_config at all")
    if peft.get("peft_type") not in PEFT_TYPES:
        fail("peft_config.peft_type", f"expected one of {', '.join(PEFT_TYPES)}, got {peft.get('peft_type')!r}")
    from peft import get_peft_config

    try:
        return get_peft_config(dict(peft))
    except (TypeError, ValueError) as exc:
        fail("peft_config", str(exc).splitlines()[0])
