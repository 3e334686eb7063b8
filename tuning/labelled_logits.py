"""Opt-in: compute the LM head and the cross-entropy only at positions whose next token is a trained label.

A causal LM's loss only reads the logits of positions i with labels[i + 1] != -100; every other row of
`lm_head(hidden)` is computed and thrown away. With a 49,954-word vocabulary on hidden 512 the LM head is half of
a small decoder's FLOPs, and in an instruction row (long prompt, short answer) only a few percent of the positions
are trained, so skipping the rest saves close to half the work. Loss and gradients are the same as the full
computation (tests/test_labelled_logits.py); only `outputs.logits` changes shape: [1, n_labels, vocab].

Works for transformers' causal LMs whose loss is `ForCausalLMLoss` and for models whose forward takes shift_labels
(`accepts_shift_labels`): a forward pre-hook on the model the training loop calls (PeftModel, DDP or DeepSpeed call
it through __call__) passes the already shifted labels of the kept positions as `shift_labels`, and a pre-hook on
the LM head keeps only those positions. Calls without labels (evaluation, generation) are untouched.
"""
import torch


def compute_logits_only_at_labels(model):
    """Install the hooks on `model` (a transformers causal LM or a peft model around one); returns the model."""
    if getattr(model, "_logits_only_at_labels", False):
        return model
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.get_output_embeddings()
    # transformers' causal LMs take shift_labels through loss_function; a model with its own loss says so.
    takes_shift_labels = getattr(causal_lm, "accepts_shift_labels", None)
    if takes_shift_labels is None:
        takes_shift_labels = getattr(causal_lm, "loss_function", None) is not None
    if head is None or not takes_shift_labels:
        raise ValueError(f"{type(causal_lm).__name__} has no transformers LM head / loss function to narrow")
    pending = []  # the positions to keep, from the model call to its LM head call

    def before_model(module, args, kwargs):
        labels = kwargs.get("labels")
        pending.clear()
        if labels is None or kwargs.get("shift_labels") is not None:
            return None
        targets = labels[..., 1:]
        keep = torch.nn.functional.pad(targets != -100, (0, 1), value=False)
        pending.append(keep)
        kwargs["shift_labels"] = targets[keep[..., :-1]].unsqueeze(0)
        return args, kwargs

    def before_head(module, args):
        if not pending:
            return None
        keep = pending.pop()
        hidden = args[0]
        if hidden.shape[:2] != keep.shape:
            raise RuntimeError(f"LM head input {tuple(hidden.shape)} does not match the labels {tuple(keep.shape)}")
        return (hidden[keep].unsqueeze(0),)

    model.register_forward_pre_hook(before_model, with_kwargs=True)
    head.register_forward_pre_hook(before_head)
    model._logits_only_at_labels = True
    return model
