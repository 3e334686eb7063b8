"""Model knowledge as data, the one source of per-model facts: where each model's real files are, what its tiny
twin looks like, its linear layers and the modules the original recipe's LoRA targets, the LoRA defaults, which
ids stop generation and pad, and how packed training rows are laid out. Recipes, the memory estimator and the
tests read these instead of repeating them. Light: no torch, no transformers."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str                        # "llama" | "glm4" | "chatglm6b"
    model_type: str                  # config.json's model_type
    linear_modules: tuple[str, ...]  # the linear layers of one decoder layer, in order (our layout's names)
    lora_targets: tuple[str, ...]    # the original recipe's LoRA target modules on our layout, in its order
    lora_alpha: int = 32             # all three originals: alpha 32, dropout 0.1
    lora_dropout: float = 0.1
    packed_layout: str | None = None  # "module:Class" of a model that builds its own packed masks/positions
    padded_vocab: bool = False       # the embedding has more rows than the tokenizer has tokens (by design)
    prefix_hook: str | None = None   # "module:function" applied to a P-tuning v2 PeftModel when it is loaded
    decode_layout: str | None = None  # "module:Class" of a model that decodes from a cache with its own positions
    serves_prefix: bool = True       # a PEFT P-tuning v2 prefix can be served (its KV cache put before the prompt)
    sequence_first: bool = False     # the backbone's hidden states are [seq, batch, hidden] (the original's layout)

    def lora(self) -> dict:
        """Keyword arguments of tuning.methods.apply_lora for the original recipe's LoRA (r is the user's)."""
        return {"target_modules": self.lora_targets, "alpha": self.lora_alpha, "dropout": self.lora_dropout}


@dataclass(frozen=True)
class ModelSpec:
    name: str                      # the name users and `make_tiny` use
    family: str                    # a key of FAMILIES
    files: str                     # folder under model_hub/tokenizer_files/
    stop_ids: tuple[int, ...]      # generation stops at any of these
    pad_id: int | None
    tiny: dict = field(default_factory=dict)  # size overrides applied to the real config for the tiny model

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return FAMILIES[self.family].lora_targets


FAMILIES = {
    family.name: family
    for family in [
        # Chinese-LLaMA-Alpaca-LoRA-Tuning's list and order.
        Family("llama", "llama",
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
               ("q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj")),
        # Native GlmForCausalLM: the original's fused query_key_value is split into q/k/v_proj (same placement).
        Family("glm4", "glm",
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
               ("q_proj", "k_proj", "v_proj"), padded_vocab=True,
               prefix_hook="model_hub.glm4.prefix_positions:number_text_from_zero"),
        # ChatGLM-Tuning named no targets: PEFT's default for model_type chatglm.
        Family("chatglm6b", "chatglm",
               ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
               ("query_key_value",),
               packed_layout="model_hub.chatglm6b.packing:ChatGLMBlocks", padded_vocab=True,
               decode_layout="model_hub.chatglm6b.decoding:ChatGLMDecoding", serves_prefix=False,
               sequence_first=True),
    ]
}

# Tiny sizes: real vocab and special ids, everything else shrunk so a model builds and trains in seconds.
_TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)

MODELS = {
    spec.name: spec
    for spec in [
        ModelSpec("llama-7b", "llama", "llama-7b", (2,), None, _TINY_LLAMA),
        ModelSpec("chinese-llama-7b", "llama", "chinese-llama-7b", (2,), None, _TINY_LLAMA),
        ModelSpec("chinese-alpaca-7b", "llama", "chinese-alpaca-7b", (2,), 49953, _TINY_LLAMA),
        ModelSpec("glm-4-9b-chat", "glm4", "glm-4-9b-chat", (151329, 151336, 151338), 151329,
                  dict(hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4,
                       multi_query_group_num=2, kv_channels=16)),
        ModelSpec("chatglm-6b", "chatglm6b", "chatglm-6b", (130005,), 3,
                  dict(hidden_size=64, inner_hidden_size=256, num_layers=2, num_attention_heads=4)),
    ]
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(config) -> str:
    """The family of a transformers config (our ChatGLM-6B, native GLM-4, or LLaMA), loaded or as config.json's dict."""
    model_type = config.get("model_type", "") if isinstance(config, dict) else getattr(config, "model_type", "")
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family.name
    return model_type


def is_sequence_first(config) -> bool:
    """Whether a model's backbone returns hidden states as [seq, batch, hidden] (ChatGLM-6B, as the original)."""
    family = FAMILIES.get(family_of_config(config))
    return bool(family and family.sequence_first)


def load_hook(reference: str):
    """The object a "module:name" reference of the registry names."""
    import importlib

    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def _layout(config, kind: str):
    """The family's `kind` layout class (a "module:Class" field of Family) built for `config`, or None."""
    family = FAMILIES.get(family_of_config(config))
    reference = getattr(family, kind, None)
    return None if reference is None else load_hook(reference)(config)


def packed_layout(config):
    """The tuning.packing layout for a model config: the family's own, or None (positions restarting at 0)."""
    return _layout(config, "packed_layout")


def decode_layout(config):
    """serving.kv_batch's decoding inputs for a model config: the family's own, or None (1-D positions, a 0/1
    attention mask, logits of the last position only)."""
    return _layout(config, "decode_layout")
