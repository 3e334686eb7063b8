"""GLM-4's original (remote-code) config → transformers' native GlmConfig (glm-4-9b-chat-hf layout).

The mapping is the one verified in tests/golden/glm4_model/README.md; the weight converter
(convert_glm4_to_hf.py) and the tiny-model factory both build their config here.
"""
from transformers import GlmConfig

# Keys whose original value the native architecture hard-codes: a checkpoint with other values is not GLM-4.
REQUIRED = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
    "fp32_residual_connection": False,
}


def native_config_from_original(orig: dict, **overrides) -> GlmConfig:
    """Build a GlmConfig from the fields of an original glm-4-9b-chat config.json (`orig`)."""
    for key, want in REQUIRED.items():
        if orig.get(key, want) != want:
            raise ValueError(f"config.json: {key}={orig.get(key)!r} is not supported (GLM-4 needs {want!r})")
    heads = orig["num_attention_heads"]
    groups = orig["multi_query_group_num"] if orig.get("multi_query_attention", False) else heads
    head_dim = orig["kv_channels"]
    if heads % groups or head_dim % 4:
        raise ValueError(f"config.json: heads {heads} must be divisible by groups {groups}, kv_channels {head_dim} by 4")
    fields = dict(
        vocab_size=orig["padded_vocab_size"],
        hidden_size=orig["hidden_size"],
        intermediate_size=orig["ffn_hidden_size"],
        num_hidden_layers=orig["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=head_dim,  # need not equal hidden_size / heads
        rms_norm_eps=orig["layernorm_epsilon"],
        attention_bias=orig.get("add_qkv_bias", True),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * orig.get("rope_ratio", 1),
            "partial_rotary_factor": 0.5,
        },
        max_position_embeddings=orig["seq_length"],
        hidden_act="silu",
        tie_word_embeddings=orig.get("tie_word_embeddings", False),
        attention_dropout=orig.get("attention_dropout", 0.0),
        eos_token_id=orig.get("eos_token_id"),
        pad_token_id=orig.get("pad_token_id"),
        architectures=["GlmForCausalLM"],
    )
    fields.update(overrides)
    return GlmConfig(**fields)


def _rope(native: dict) -> dict:
    return native.get("rope_parameters") or {"rope_theta": native.get("rope_theta", 10000.0),
                                             "partial_rotary_factor": native.get("partial_rotary_factor", 0.5)}


# The inverse of native_config_from_original: {original key: its value from the native config dict}.
ORIGINAL_FROM_NATIVE = {
    "padded_vocab_size": lambda n: n["vocab_size"],
    "hidden_size": lambda n: n["hidden_size"],
    "ffn_hidden_size": lambda n: n["intermediate_size"],
    "num_layers": lambda n: n["num_hidden_layers"],
    "num_hidden_layers": lambda n: n["num_hidden_layers"],
    "num_attention_heads": lambda n: n["num_attention_heads"],
    "multi_query_group_num": lambda n: n["num_key_value_heads"],
    "kv_channels": lambda n: n.get("head_dim") or n["hidden_size"] // n["num_attention_heads"],
    "layernorm_epsilon": lambda n: n["rms_norm_eps"],
    "add_qkv_bias": lambda n: n.get("attention_bias", True),
    "rope_ratio": lambda n: _rope(n)["rope_theta"] / 10000.0,
    "seq_length": lambda n: n["max_position_embeddings"],
    "tie_word_embeddings": lambda n: n.get("tie_word_embeddings", False),
    "attention_dropout": lambda n: n.get("attention_dropout", 0.0),
    "eos_token_id": lambda n: n.get("eos_token_id"),
    "pad_token_id": lambda n: n.get("pad_token_id"),
}
# The ones llama.cpp's convert_hf_to_gguf.py reads for GlmForCausalLM before (or instead of) the native names:
# without them it writes rms eps 1e-5, rope base 10,000 and context length = hidden size (README: llama.cpp).
LLAMA_CPP_KEYS = ("padded_vocab_size", "ffn_hidden_size", "num_layers", "multi_query_group_num", "kv_channels",
                  "layernorm_epsilon", "rope_ratio", "seq_length")


def original_values(native: dict) -> dict:
    """The original config's architecture keys, from a native GlmForCausalLM config.json (as a dict)."""
    if native.get("model_type") != "glm":
        raise ValueError(f"model_type {native.get('model_type')!r}: not a native GLM-4 (glm) config")
    if _rope(native).get("partial_rotary_factor", 0.5) != 0.5 or native.get("hidden_act", "silu") != "silu":
        raise ValueError("partial_rotary_factor must be 0.5 and hidden_act silu for THUDM's original GLM-4 code")
    return {**_mapped(native), "multi_query_attention": True}


def _mapped(native: dict) -> dict:
    values = {key: fn(native) for key, fn in ORIGINAL_FROM_NATIVE.items()}
    if values["rope_ratio"] == int(values["rope_ratio"]):
        values["rope_ratio"] = int(values["rope_ratio"])  # 500, as THUDM's config.json writes it
    return values


def with_llama_cpp_keys(native: dict) -> dict:
    """The native config plus the original key names llama.cpp's converter reads, with the same values: both
    transformers (which ignores them) and convert_hf_to_gguf.py then read the same model."""
    values = _mapped(native)
    return {**native, **{key: values[key] for key in LLAMA_CPP_KEYS}}


def original_config(native: dict, template: dict, dtype: str | None) -> dict:
    """THUDM's config.json for the model `native` describes: the keys of `template` (the original config.json of
    the same model), architecture values from `native`; a value that disagrees means another model (ValueError)."""
    values = original_values(native)
    config = {k: v for k, v in template.items() if k != "_name_or_path"}
    for key, value in values.items():
        if key in config and config[key] != value:
            raise ValueError(f"{key} is {config[key]!r} in the original config.json, {value!r} in the exported model")
        config[key] = value
    if dtype:
        config["torch_dtype"] = dtype
    return config
