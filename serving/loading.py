"""Load what a recipe produced for serving: a base folder, `tiny:NAME`, a LoRA / P-tuning v2 adapter (its base
from adapter_config.json unless given) or an exported (merged) model, for the three families.

The engine runs forwards on the transformers model itself (`core`): LoRA layers live inside it, and a P-tuning v2
prefix becomes the first keys/values of every request's cache (`prefix`), with the text numbered from 0 as the
recipe trained it (model_hub/glm4/prefix_positions.py).
"""
import os
from dataclasses import dataclass

import torch

from model_hub.loader import base_of_adapter, load_adapted, resolve_model_path
from model_hub.registry import FAMILIES, family_of_config
from tuning.errors import UserError

from .prompts import detect_prompt_format, stop_ids_of_family


@dataclass
class LoadedModel:
    core: torch.nn.Module            # the transformers model the engine calls (adapter layers inside)
    tokenizer: object
    family: str                      # llama | glm4 | chatglm6b
    prompt_format: str               # serving/prompts.py
    stop_ids: tuple[int, ...]
    context_length: int
    name: str                        # what /v1/models lists
    prefix: list | None = None       # P-tuning v2: per layer (key, value) [1, heads, n, head_dim]

    @property
    def device(self) -> torch.device:
        return next(self.core.parameters()).device


def _context_length(config) -> int:
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 2048


def _prefix_cache(peft_model) -> list:
    """The adapter's virtual-token keys/values for one request, as (key, value) per layer."""
    prompt = peft_model.get_prompt(batch_size=1)
    if hasattr(prompt, "layers"):
        return [(layer.keys.detach(), layer.values.detach()) for layer in prompt.layers]
    return [(k.detach(), v.detach()) for k, v in prompt]


def wrap_loaded(model, tokenizer, prompt_format: str, name: str = "local") -> LoadedModel:
    """An already loaded model (plain, or a PEFT LoRA / P-tuning model) for the engine (the recipes' CLIs)."""
    from peft import PeftModel

    prefix, core = None, model
    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            with torch.no_grad():
                prefix = _prefix_cache(model)
        core = model.get_base_model()
    family = family_of_config(core.config)
    return LoadedModel(core=core.eval(), tokenizer=tokenizer, family=family, prompt_format=prompt_format,
                       stop_ids=stop_ids_of_family(family), context_length=_context_length(core.config),
                       name=name, prefix=prefix)


def load_for_serving(model: str | None, adapter: str | None = None, *, dtype: str | None = None,
                     device: str | None = None, prompt_format: str | None = None,
                     served_name: str | None = None) -> LoadedModel:
    """`model`: a folder or tiny:NAME (None with an adapter: the adapter's base). `adapter`: a PEFT folder."""
    if adapter is not None:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise UserError("not a LoRA / P-tuning adapter folder (adapter_config.json missing)", path=adapter,
                            field="adapter")
        if model is None:  # the base recorded at training time: a moved base names where the path came from
            model = base_of_adapter(adapter, "--model")
    if model is None:
        raise UserError("give --model (a model folder or tiny:NAME) or --adapter", field="model")
    path = resolve_model_path(model)
    # The engine numbers a P-tuning prefix's text positions itself (left-padded batches): no family hook.
    loaded, tokenizer = load_adapted(path, adapter, dtype=dtype, device=device, family_hooks=False)
    base = loaded.get_base_model() if adapter is not None else loaded
    family = family_of_config(base.config)
    if family not in FAMILIES:
        raise UserError(f"model type {base.config.model_type!r} is not served here (LLaMA, GLM-4, ChatGLM-6B)",
                        path=path)
    if getattr(base.config, "pre_seq_len", None):
        raise UserError("ChatGLM-6B's built-in P-tuning prefix is not served; merge or use a PEFT adapter", path=path)
    prefix, core = None, base
    if adapter is not None:
        peft_model = loaded
        if peft_model.active_peft_config.is_prompt_learning:
            if peft_model.active_peft_config.peft_type != "PREFIX_TUNING":
                raise UserError(f"{peft_model.active_peft_config.peft_type} adapters are not served (LoRA and "
                                "P-tuning v2 are)", path=adapter)
            if not FAMILIES[family].serves_prefix:
                raise UserError(f"a PEFT P-tuning prefix is not served on {family} models", path=adapter)
            with torch.no_grad():
                prefix = _prefix_cache(peft_model)
    core.eval()
    # A short name (the folder's), as vLLM lists its adapters; never a local path (issue 33.7, 29.11).
    name = served_name or (model if model.startswith("tiny:") and not adapter
                           else os.path.basename(os.path.normpath(adapter or model)))
    fmt = detect_prompt_format(family, None if model.startswith("tiny:") else path, adapter, prompt_format)
    return LoadedModel(core=core, tokenizer=tokenizer, family=family, prompt_format=fmt,
                       stop_ids=stop_ids_of_family(family), context_length=_context_length(base.config),
                       name=name, prefix=prefix)
