"""ChatGLM-6B configuration: the field names and defaults of THUDM's `configuration_chatglm.py`.

The class defaults describe the first (150528-vocab) checkpoint, exactly like the original; the current checkpoint's
config.json (vendored in model_hub/tokenizer_files/chatglm-6b) overrides them with vocab 130528 and ids 130000+.
"""
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class ChatGLMConfig(PreTrainedConfig):
    model_type = "chatglm"
    # Generic code (the v5 cache, peft) asks for the standard names.
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "max_sequence_length",
                     "layer_norm_eps": "layernorm_epsilon"}
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 150528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    layernorm_epsilon: float = 1e-5
    use_cache: bool = False
    bos_token_id: int | None = 150004
    eos_token_id: int | list[int] | None = 150005
    mask_token_id: int = 150000
    gmask_token_id: int = 150001
    pad_token_id: int | None = 0
    max_sequence_length: int = 2048
    inner_hidden_size: int | None = 16384
    position_encoding_2d: bool = True
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    # The original config never sets it, so the transformers default (True) tied lm_head to the word embeddings.
    tie_word_embeddings: bool = True

    def validate_architecture(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        rotary_dim = self.hidden_size // self.num_attention_heads // (2 if self.position_encoding_2d else 1)
        if rotary_dim % 2:
            raise ValueError(f"the rotary embedding needs an even dimension, got {rotary_dim} "
                             "(head_dim / 2 with position_encoding_2d)")
