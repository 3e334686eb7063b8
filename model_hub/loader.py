"""The one loader every recipe uses: a model folder or `tiny:NAME` → (model, tokenizer).

- `tiny:NAME` (e.g. `tiny:chatglm-6b`) builds the tiny random-weight twin on first use (model_hub.make_tiny).
- dtype follows the device: fp32 on CPU unless bf16 is asked for; never fp16 on CPU (0.3 GFLOP/s there);
  on a GPU "auto" means bf16 where supported, else fp16.
- `trust_remote_code` stays off unless the user passed --trust_remote_code (tuning.consent): our own classes
  cover ChatGLM-6B, GLM-4 and LLaMA; a folder that needs its own code is refused in one line, never prompted for.
- `quantization_bit` 4 or 8 (QLoRA): the linear layers of the decoder load through bitsandbytes (4: nf4 with
  double quantization, bf16 compute; 8: LLM.int8), on the CPU as on a GPU; everything else stays in `dtype`.
"""
import contextlib
import os

import torch

from tuning.consent import remote_code_allowed, remote_code_refusal, stay_offline
from tuning.errors import UserError
from tuning.files import read_json, refuse_pickled_code
from tuning.publish import recover_replaced

from .make_tiny import tiny_dir
from .registry import FAMILIES, MODELS, family_of_config, load_hook

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """A folder path, or `tiny:NAME` for a tiny test model (built on demand)."""
    if name_or_path.startswith("tiny:"):
        name = name_or_path[len("tiny:"):]
        if name not in MODELS:
            raise UserError(f"unknown tiny model {name!r}; known: {', '.join(MODELS)}", field="model")
        return tiny_dir(name)
    recover_replaced(name_or_path)  # a converter's replacement of this folder killed midway: put back
    if not os.path.isdir(name_or_path):
        raise UserError("model folder not found (give a folder with config.json, or tiny:NAME, NAME one of "
                        f"{', '.join(MODELS)})", path=name_or_path)
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise UserError("not a model folder: config.json is missing", path=name_or_path)
    _refuse_unsupported_layout(name_or_path)
    return name_or_path


def resolve_recorded_model_path(name_or_path: str, recorded_in: str, override: str) -> str:
    """`resolve_model_path` for a base-model path read from a file written at training time (an adapter's
    adapter_config.json, a run's train_args.json): when it is not there, the error says where the path came from
    and how to point at the base model's new place."""
    try:
        return resolve_model_path(name_or_path)
    except UserError as exc:
        raise UserError(f"{exc.message}; this path comes from {recorded_in} (written at training time): if the base "
                        f"model moved, pass {override}", path=exc.path, field=exc.field) from None


def _refuse_unsupported_layout(path: str) -> None:
    config = read_json(os.path.join(path, "config.json"))
    if not isinstance(config, dict):
        raise UserError(f"expected a JSON object (a model config), got {type(config).__name__}",
                        path=os.path.join(path, "config.json"))
    if config.get("model_type") == "chatglm" and "padded_vocab_size" in config:
        raise UserError("this is an original-layout GLM-4 checkpoint (remote code); convert it once with "
                        f"`python -m model_hub.convert_glm4_to_hf {path} OUT_DIR` and load OUT_DIR",
                        path=os.path.join(path, "config.json"))


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 by default on CPU; bf16 (or fp16 without bf16 support) by default on a GPU; fp16 refused on CPU."""
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype in (None, "auto"):
        if device.type == "cuda":
            chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            chosen = torch.float32
    elif dtype in DTYPES:
        chosen = DTYPES[dtype]
    else:
        raise UserError(f"unknown dtype {dtype!r}; expected one of auto, fp32, bf16, fp16", field="dtype")
    if chosen == torch.float16 and device.type == "cpu":
        raise UserError("fp16 on CPU is unusably slow and numerically fragile; use bf16 (--bf16) or fp32",
                        field="dtype")
    return chosen


@contextlib.contextmanager
def remote_code_refused(path: str, what: str = "model folder"):
    """transformers' refusal of a folder that needs its own code (trust_remote_code off) → one line."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc) and "custom code" not in str(exc):
            raise
        raise remote_code_refusal(path, what) from None


def _trust(trust_remote_code: bool | None) -> bool:
    stay_offline()  # every load: no network unless the user set HF_HUB_OFFLINE=0
    return remote_code_allowed() if trust_remote_code is None else trust_remote_code


def tokenizer_from_folder(folder: str, trust_remote_code: bool | None = None):
    """AutoTokenizer of a folder that holds tokenizer files only (an adapter's, a --tokenizer_path)."""
    from transformers import AutoTokenizer

    from . import register_with_transformers

    register_with_transformers()

    if _names_llama_sentencepiece(folder):
        # Folders the project writes declare transformers' generic sentencepiece class (plain transformers reads the
        # original ids with it), an older export LlamaTokenizer (whose tokenizer.json reading differs): ours decodes
        # and handles special-token text as the original did.
        from .llama.tokenizer import load_llama_tokenizer

        return load_llama_tokenizer(folder)
    with remote_code_refused(folder, "tokenizer folder"):
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=_trust(trust_remote_code), local_files_only=True)


def _names_llama_sentencepiece(folder: str) -> bool:
    from .llama.tokenizer import names_llama_sentencepiece

    config_path = os.path.join(folder, "tokenizer_config.json")
    if not (os.path.isfile(config_path) and os.path.isfile(os.path.join(folder, "tokenizer.model"))):
        return False
    config = read_json(config_path)
    return isinstance(config, dict) and names_llama_sentencepiece(config)


def load_tokenizer(name_or_path: str, trust_remote_code: bool | None = None):
    return tokenizer_from_folder(resolve_model_path(name_or_path), trust_remote_code)


def load_model_config(name_or_path: str, trust_remote_code: bool | None = None):
    """The AutoConfig of a model folder (or tiny:NAME), without loading weights."""
    from transformers import AutoConfig

    from . import register_with_transformers

    register_with_transformers()

    path = resolve_model_path(name_or_path)
    with remote_code_refused(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=_trust(trust_remote_code), local_files_only=True)


ADAPTER_CONFIG = "adapter_config.json"


# transformers applies any PEFT adapter it finds inside a model folder (left there by a run whose output folder
# was the model folder): silently another model. from_pretrained's documented `adapter_kwargs` go to that lookup
# (find_adapter_config_file, transformers 5.23); its `subfolder` pointed into config.json, a file
# (resolve_model_path checks it), means no adapter_config.json can ever be found there.
NO_ADAPTER_LOOKUP = {"subfolder": "config.json"}


def adapter_inside_ignored(path: str) -> dict:
    """from_pretrained arguments that leave a PEFT adapter inside the model folder `path` unapplied; the user is told
    and loads it by passing the folder as the adapter."""
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        print(f"note: {path} also holds a PEFT adapter ({ADAPTER_CONFIG}); it is NOT applied to the base model. To "
              "use it, give this folder as the adapter (e.g. --lora_path / --lora_model / inference.py MODEL_DIR), "
              "and move it out of the model folder")
    return {"adapter_kwargs": dict(NO_ADAPTER_LOOKUP)}


def load_model_and_tokenizer(name_or_path: str, *, dtype=None, device: str | None = None,
                             trust_remote_code: bool | None = None, load_in_8bit: bool = False,
                             quantization_bit: int | None = None, **model_kwargs):
    """Load (model, tokenizer) for training or inference; the model is on `device` in the chosen dtype (its decoder
    linear layers in 4 or 8 bits with `quantization_bit`; `load_in_8bit` = `quantization_bit=8`).
    `trust_remote_code` None: as the user's --trust_remote_code flag (off by default)."""
    from transformers import AutoModelForCausalLM

    from . import register_with_transformers

    register_with_transformers()
    trust_remote_code = _trust(trust_remote_code)
    path = resolve_model_path(name_or_path)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    bits = quantization_bits(quantization_bit, load_in_8bit)
    if bits:
        model_kwargs["quantization_config"] = bitsandbytes_config(bits, dev)
        model_kwargs.setdefault("device_map", "auto" if dev.type == "cuda" else {"": dev})
    model_kwargs.update(adapter_inside_ignored(path))
    with refuse_pickled_code(path), remote_code_refused(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     local_files_only=True, **model_kwargs)
    if not bits:
        model = model.to(dev)  # (bitsandbytes placed a quantized model through device_map)
    return model, tokenizer


def quantization_bits(quantization_bit, load_in_8bit: bool = False) -> int | None:
    """4, 8 or None (full precision) from a recipe's `quantization_bit` (None/0 = off) and `load_in_8bit`."""
    bits = quantization_bit or None
    if bits not in (None, 4, 8) or isinstance(bits, bool):
        raise UserError(f"expected 4, 8 or nothing (full precision), got {quantization_bit!r}",
                        field="quantization_bit")
    if load_in_8bit and bits == 4:
        raise UserError("load_in_8bit and quantization_bit 4 contradict each other; give one of them",
                        field="quantization_bit")
    return 8 if load_in_8bit else bits


def bitsandbytes_config(bits: int, device: torch.device):
    """QLoRA's base: nf4 with double quantization and bf16 compute (fp32 on a GPU without bf16), or LLM.int8.
    bitsandbytes 0.50 runs both on the CPU too (slowly: no int8/nf4 kernels there; tested, not fast)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken CUDA setup raises more than ImportError
        raise UserError(f"{bits}-bit loading needs bitsandbytes ({type(exc).__name__}: {exc}); "
                        "pip install -r requirements/base.txt", field="quantization_bit") from None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer_config.json", "tokenizer.model"))


def _match_vocabulary(model, tokenizer, family: str, tokenizer_path: str | None) -> None:
    """A tokenizer with more tokens than the embedding (Chinese-LLaMA's extended vocabulary on a LLaMA base): the
    embedding grows to match, as the original chat_ner.py. Fewer tokens is normal where the family pads its
    vocabulary (GLM); elsewhere it means the wrong tokenizer was given."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        print(f"resizing the model's vocabulary {vocab} -> {len(tokenizer)} to match the tokenizer")
        model.resize_token_embeddings(len(tokenizer))
    elif len(tokenizer) < vocab and tokenizer_path and not getattr(FAMILIES.get(family), "padded_vocab", True):
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, fewer than the model's {vocab}; wrong "
                        "tokenizer folder?", path=tokenizer_path, field="tokenizer_path")


def base_of_adapter(adapter: str, base_flag: str = "--model") -> str:
    """The base model `adapter` was trained on (base_model_name_or_path in its adapter_config.json), resolved; an
    empty entry or a path that is gone is one line saying where the path came from and naming `base_flag`."""
    recorded = os.path.join(adapter, ADAPTER_CONFIG)
    base = read_json(recorded).get("base_model_name_or_path")
    if not base:
        raise UserError(f"base_model_name_or_path is empty; pass {base_flag}", path=recorded)
    return resolve_recorded_model_path(base, f"base_model_name_or_path in {recorded}", f"{base_flag} PATH")


def load_adapted(model: str | None, adapter: str | None = None, *, dtype=None, device: str | None = None,
                 quantization_bit: int | None = None, tokenizer_path: str | None = None,
                 base_flag: str = "--model", family_hooks: bool = True):
    """The one way to load a base model with (or without) a PEFT adapter on it → (model, tokenizer), eval mode.

    `model`: a model folder or tiny:NAME; None with an `adapter`: the base its adapter_config.json names (a path that
    is gone is one line naming `base_flag`). The adapter folder is checked first (an interrupted save finished,
    config and weights present: tuning.publish.read_adapter_folder) and read with pickles refused. The tokenizer
    comes from `tokenizer_path`, else the adapter when it carries one (glm4_finetune saves it there), else the base.
    A tokenizer larger than the embedding grows it. `family_hooks`: the registry's per-family hook for a P-tuning v2
    adapter (GLM-4: its text numbered from 0, as trained) — off for the serving engine, which numbers positions
    itself. The base in 4/8 bits with `quantization_bit`."""
    if adapter is not None:
        from tuning.publish import read_adapter_folder

        read_adapter_folder(adapter)
        if model is None:
            model = base_of_adapter(adapter, base_flag)
    if model is None:
        raise UserError(f"give {base_flag} (a model folder or tiny:NAME) or an adapter folder", field="model")
    base, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device, quantization_bit=quantization_bit)
    family = family_of_config(base.config)
    tokenizer_path = tokenizer_path or (adapter if adapter and has_tokenizer(adapter) else None)
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path.startswith("tiny:") or os.path.isfile(
            os.path.join(tokenizer_path, "config.json")) else tokenizer_from_folder(tokenizer_path)
    _match_vocabulary(base, tokenizer, family, tokenizer_path)
    if adapter is None:
        return base.eval(), tokenizer
    from peft import PeftModel

    with refuse_pickled_code(adapter):
        adapted = PeftModel.from_pretrained(base, adapter)
    hook = getattr(FAMILIES.get(family), "prefix_hook", None)
    if family_hooks and hook and adapted.active_peft_config.is_prompt_learning:
        load_hook(hook)(adapted)
    return adapted.eval(), tokenizer
