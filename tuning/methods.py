"""The three ways the recipes tune a model: LoRA, P-tuning v2 (prefix tuning) and full fine-tuning.
Each returns the model to train and prints what is trainable, as the originals did."""
from peft import LoraConfig, PeftModel, TaskType, get_peft_model


def trainable_summary(model) -> str:
    def size(p):  # a ZeRO-3 partitioned parameter is empty here; ds_numel is its full size
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def apply_lora(model, target_modules, r: int = 8, alpha: int = 32, dropout: float = 0.1,
               modules_to_save=None) -> PeftModel:
    """Wrap `model` with a causal-LM LoRA adapter; the base is frozen."""
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=r, lora_alpha=alpha,
                        lora_dropout=dropout, target_modules=list(target_modules), modules_to_save=modules_to_save)
    return get_peft_model(model, config)


def freeze_all_but(model, predicate) -> None:
    """Full fine-tuning of a subset (or `lambda name: True` for everything)."""
    for name, param in model.named_parameters():
        param.requires_grad_(bool(predicate(name)))


def frozen_linear_weights_to_bf16(model) -> int:
    """Store every frozen nn.Linear weight in bf16 (trainable ones, e.g. LoRA, stay fp32). Under bf16 autocast a
    linear layer casts its fp32 weight to bf16 at every forward and keeps that copy for the backward; a weight
    already in bf16 gives the same bf16 values, so losses and gradients are bit-identical, without the per-step
    cast or the second copy. A weight shared with a non-Linear module (tied embeddings) is left alone: the
    embedding must stay fp32. Returns the number of weights converted."""
    import torch

    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(False)}
    converted = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and weight is not None and not weight.requires_grad \
                and weight.dtype == torch.float32 and id(weight) not in shared:
            weight.data = weight.data.to(torch.bfloat16)
            converted += 1
    return converted
