"""Model knowledge as data, one entry per model: where its real files are, what its tiny twin looks like,
which modules LoRA targets, which ids stop generation. Recipes read these instead of repeating them."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    name: str                      # the name users and `make_tiny` use
    family: str                    # "llama" | "glm4" | "chatglm6b"
    files: str                     # folder under model_hub/tokenizer_files/
    lora_targets: tuple[str, ...]  # the original recipe's LoRA target modules on our layout
    stop_ids: tuple[int, ...]      # generation stops at any of these
    pad_id: int | None
    tiny: dict = field(default_factory=dict)  # size overrides applied to the real config for the tiny model


# Tiny sizes: real vocab and special ids, everything else shrunk so a model builds and trains in seconds.
_TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)
_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

MODELS = {
    spec.name: spec
    for spec in [
        ModelSpec("llama-7b", "llama", "llama-7b", _LLAMA_LORA, (2,), None, _TINY_LLAMA),
        ModelSpec("chinese-llama-7b", "llama", "chinese-llama-7b", _LLAMA_LORA, (2,), None, _TINY_LLAMA),
        ModelSpec("chinese-alpaca-7b", "llama", "chinese-alpaca-7b", _LLAMA_LORA, (2,), 49953, _TINY_LLAMA),
        # native GlmForCausalLM: the original's query_key_value is split into q/k/v_proj.
        ModelSpec("glm-4-9b-chat", "glm4", "glm-4-9b-chat", ("q_proj", "k_proj", "v_proj"),
                  (151329, 151336, 151338), 151329,
                  dict(hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4,
                       multi_query_group_num=2, kv_channels=16)),
        ModelSpec("chatglm-6b", "chatglm6b", "chatglm-6b", ("query_key_value",), (130005,), 3,
                  dict(hidden_size=64, inner_hidden_size=256, num_layers=2, num_attention_heads=4)),
    ]
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def family_of_config(config) -> str:
    """The family of a loaded transformers config (our ChatGLM-6B, native GLM-4, or LLaMA)."""
    model_type = getattr(config, "model_type", "")
    return {"chatglm": "chatglm6b", "glm": "glm4", "llama": "llama"}.get(model_type, model_type)
