"""P-tuning v2 (peft prefix tuning) with the text numbered from position 0, as the original GLM-4 code did.

With a prefix cache of n virtual tokens, transformers' native models number the text from n (cache length), and
peft 0.21 also shifts any given position_ids by n. The original glm-4-9b-chat code gave the text positions 0…L−1
(peft dropped position_ids and its model ignored the cache length). The prefix keys carry no rotary phase, so the
absolute numbering changes every score against them (measured up to 9 logits in tests/golden/glm4_model).

`number_text_from_zero(peft_model)` makes every forward through the base model use positions
(cache length − n) … (cache length − n + L − 1): 0…L−1 in training and at the generation prefill, then L, L+1, …
for each decoded token — the original's training positions, without its decode bug (it reused position 0 for
every generated token). Positions are the same for every row (not pad-aware), as in the original.
"""
import torch


def number_text_from_zero(peft_model):
    """Install the position fix on a peft prefix-tuning model (idempotent); returns the model."""
    config = peft_model.active_peft_config
    if getattr(config, "peft_type", None) != "PREFIX_TUNING":
        return peft_model
    base = peft_model.base_model
    if getattr(base, "_text_positions_from_zero", False):
        return peft_model
    n_virtual = config.num_virtual_tokens

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        if cache is None or tokens is None:
            return None
        start = cache.get_seq_length() - n_virtual
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        kwargs["position_ids"] = positions.unsqueeze(0).expand(tokens.shape[0], -1)
        return args, kwargs

    base.register_forward_pre_hook(hook, with_kwargs=True)
    base._text_positions_from_zero = True
    return peft_model
