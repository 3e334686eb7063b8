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
