"""The three ways the recipes tune a model: LoRA, P-tuning v2 (prefix tuning) and full fine-tuning.
Each returns the model to train and prints what is trainable, as the originals did."""
from peft import LoraConfig, PeftModel, TaskType, get_peft_model


def trainable_summary(model) -> str:
    def size(p):  # a ZeRO-3 partitioned parameter is empty here; ds_numel is its full size
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def apply_lora(model, target_modules, r: int, alpha: int, dropout: float,
               modules_to_save=None) -> PeftModel:
    """Wrap `model` with a causal-LM LoRA adapter; the base is frozen."""
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=r, lora_alpha=alpha,
                        lora_dropout=dropout, target_modules=list(target_modules), modules_to_save=modules_to_save)
    return get_peft_model(model, config)


def freeze_all_but(model, predicate) -> None:
    """Full fine-tuning of a subset (or `lambda name: True` for everything)."""
    for name, param in model.named_parameters():
        param.requires_grad_(bool(predicate(name)))
