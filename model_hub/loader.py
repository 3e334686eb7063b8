"""The one loader every recipe uses: a model folder or `tiny:NAME` → (model, tokenizer).

- `tiny:NAME` (e.g. `tiny:chatglm-6b`) builds the tiny random-weight twin on first use (model_hub.make_tiny).
- dtype follows the device: fp32 on CPU unless bf16 is asked for; never fp16 on CPU (0.3 GFLOP/s there);
  on a GPU "auto" means bf16 where supported, else fp16.
- `trust_remote_code` stays off unless the caller passes it: our own classes cover ChatGLM-6B, GLM-4 and LLaMA.
- `quantization_bit` 4 or 8 (QLoRA): the linear layers of the decoder load through bitsandbytes (4: nf4 with
  double quantization, bf16 compute; 8: LLM.int8), on the CPU as on a GPU; everything else stays in `dtype`.
"""
import json
import os

import torch

from tuning.errors import UserError
from tuning.files import refuse_pickled_code

from .make_tiny import tiny_dir
from .registry import MODELS

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """A folder path, or `tiny:NAME` for a tiny test model (built on demand)."""
    if name_or_path.startswith("tiny:"):
        name = name_or_path[len("tiny:"):]
        if name not in MODELS:
            raise UserError(f"unknown tiny model {name!r}; known: {', '.join(MODELS)}", field="model")
        return tiny_dir(name)
    if not os.path.isdir(name_or_path):
        raise UserError("model folder not found (give a folder with config.json, or tiny:NAME, NAME one of "
                        f"{', '.join(MODELS)})", path=name_or_path)
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise UserError("not a model folder: config.json is missing", path=name_or_path)
    _refuse_unsupported_layout(name_or_path)
    return name_or_path


def _refuse_unsupported_layout(path: str) -> None:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
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


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    import model_hub  # noqa: F401  (registers our tokenizer classes)

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)


def load_model_and_tokenizer(name_or_path: str, *, dtype=None, device: str | None = None,
                             trust_remote_code: bool = False, load_in_8bit: bool = False,
                             quantization_bit: int | None = None, **model_kwargs):
    """Load (model, tokenizer) for training or inference; the model is on `device` in the chosen dtype
    (its decoder linear layers in 4 or 8 bits with `quantization_bit`; `load_in_8bit` = `quantization_bit=8`)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    bits = quantization_bits(quantization_bit, load_in_8bit)
    if bits:
        model_kwargs["quantization_config"] = bitsandbytes_config(bits, dev)
        model_kwargs.setdefault("device_map", "auto" if dev.type == "cuda" else {"": dev})
    with refuse_pickled_code(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **model_kwargs)
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
