"""How the recipes tune a model: LoRA (`apply_lora`; P-tuning v2 and full fine-tuning go through peft and the
Trainer directly), what a quantized (QLoRA) base allows, and the originals' "trainable params" line."""
from typing import TYPE_CHECKING

from .distributed import say

if TYPE_CHECKING:  # annotations only: peft loads when an adapter is made
    from peft import PeftModel


def trainable_summary(model) -> str:
    def size(p):  # a ZeRO-3 partitioned parameter is empty here; ds_numel is its full size
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def apply_lora(model, target_modules, r: int, alpha: int, dropout: float,
               modules_to_save=None) -> "PeftModel":
    """Wrap `model` with a causal-LM LoRA adapter; the base is frozen."""
    # peft (and bitsandbytes with it) loads here, not at import: the entry points' --help and checks answer at once
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=r, lora_alpha=alpha,
                        lora_dropout=dropout, target_modules=list(target_modules), modules_to_save=modules_to_save)
    return get_peft_model(model, config)


def quantized_bits(model) -> int | None:
    """4 or 8 when the base weights were loaded through bitsandbytes, None for a full-precision model."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if getattr(base, "is_loaded_in_4bit", False):
        return 4
    if getattr(base, "is_loaded_in_8bit", False):
        return 8
    return None


def prepare_quantized_base(model):
    """Before an adapter goes on a 4/8-bit base (QLoRA): freeze every base parameter. The unquantized parts
    (embeddings, output layer, norms, biases) stay in the dtype they were loaded in: peft's
    prepare_model_for_kbit_training would upcast them to fp32, which on a GPU costs more memory than the
    quantization saves on the embeddings of a 130k–150k vocabulary. LoRA weights are fp32 either way (peft)."""
    bits = quantized_bits(model)
    if bits is None:
        raise ValueError("prepare_quantized_base expects a model loaded with quantization_bit 4 or 8")
    for param in model.parameters():
        param.requires_grad_(False)
    kind = "4-bit NF4" if bits == 4 else "8-bit int8"
    say(f"base model: {kind} weights (bitsandbytes, quantization_bit {bits}), frozen; the adapter on top trains in "
        "fp32 (QLoRA)")
    return model


def quantization_conflict(bits: int | None, method: str, zero_stage: int = 0) -> str | None:
    """Why a quantized base cannot train this way, or None. `method`: lora, ptuning or full. Full fine-tuning
    would train the 4/8-bit weights (they have no gradients); ZeRO-3 partitions 16/32-bit weights, not
    bitsandbytes' packed ones."""
    if not bits:
        return None
    if method == "full":
        return (f"full fine-tuning cannot train {bits}-bit base weights; use LoRA or P-tuning v2 on the quantized "
                "base, or drop quantization_bit")
    if zero_stage == 3:
        return (f"{bits}-bit base weights (bitsandbytes) cannot be partitioned by ZeRO-3; use a ZeRO-1/2 DeepSpeed "
                "config or drop quantization_bit")
    return None
