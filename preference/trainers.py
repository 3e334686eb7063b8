"""TRL's DPOTrainer / KTOTrainer with the recipes' atomic checkpoints, fed our pre-tokenized rows, and a plot of the
reward margin beside loss.png.

TRL 1.16 tokenizes text itself in `_prepare_dataset` (the prompt rendered by the tokenizer's chat template, "prompt +
answer" tokenized together). Our rows are already token ids, rendered by the recipe's PromptFormat and tokenized as
its SFT step (preference/pairs.py), so that step is replaced: the rows go to TRL's own collators unchanged.
"""
import os

from transformers import TrainerCallback
from trl import DPOTrainer, KTOTrainer

from tuning.checkpoints import AtomicCheckpoints
from tuning.training import save_step_plot

PAIRED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")


def _require_columns(dataset, columns) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"expected pre-tokenized rows (preference.pairs), missing {missing}")


class SequenceFirstBackbone:
    """TRL's fused LM head (DPOTrainer, KTOTrainer) runs `model.base_model(...)` and reads its last_hidden_state as
    [batch, seq, hidden]. A sequence-first backbone (the registry's `sequence_first`: ChatGLM-6B, as the original)
    returns [seq, batch, hidden]; during a fused call only, its output is transposed. Other families are left as
    they are."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for model in (self.model, self.ref_model):
            if model is not None:
                batch_first_for_fused_head(model.get_base_model() if hasattr(model, "get_base_model") else model)


def batch_first_for_fused_head(model) -> None:
    from model_hub.registry import is_sequence_first

    if not is_sequence_first(model.config):
        return
    fused_forward = model.forward  # TRL's, set on the instance by add_fused_lm_head

    def transpose(module, inputs, output):
        output.last_hidden_state = output.last_hidden_state.transpose(0, 1)
        return output

    def forward(*args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return fused_forward(*args, **kwargs)
        hook = model.base_model.register_forward_hook(transpose)
        try:
            return fused_forward(*args, fused_lm_head=True, **kwargs)
        finally:
            hook.remove()

    model.forward = forward


class PreferenceDPOTrainer(AtomicCheckpoints, SequenceFirstBackbone, DPOTrainer):
    """DPOTrainer over rows {prompt_ids, chosen_ids, rejected_ids}; checkpoints staged and renamed."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        _require_columns(dataset, PAIRED_COLUMNS)
        return dataset  # rows whose prompt fills max_length were dropped (and counted) by preference.pairs


class PreferenceKTOTrainer(AtomicCheckpoints, SequenceFirstBackbone, KTOTrainer):
    """KTOTrainer over rows {prompt_ids, completion_ids, label}. The KL term's mismatched completions are built as
    TRL builds them: each batch's completions rotated by one."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        _require_columns(dataset, UNPAIRED_COLUMNS)
        if not self.calculate_KL:
            return dataset

        def rotate(batch):
            completions = batch["completion_ids"]
            return {"KL_completion_ids": completions[-1:] + completions[:-1]}

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)


class MarginPlot(TrainerCallback):
    """OUTPUT/margins.png at the end: the logged reward margin (chosen − rejected) and reward accuracy per step."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_margin_plot(state.log_history, os.path.join(args.output_dir, "margins.png"))


def save_margin_plot(log_history: list[dict], path: str) -> str | None:
    return save_step_plot(log_history, path, {"rewards/margins": "reward margin (chosen - rejected)",
                                              "rewards/accuracies": "reward accuracy"})
