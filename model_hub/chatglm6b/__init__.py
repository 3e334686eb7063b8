"""Our ChatGLM-6B (THUDM/chatglm-6b) for transformers 5: config, model and tokenizer, registered with the Auto classes.

After `import model_hub`, `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained(DIR)`
load an unmodified THUDM/chatglm-6b folder with `trust_remote_code` left off. As with the original's auto_map,
`AutoModel` gives the model WITH the LM head (`ChatGLMForConditionalGeneration`).
"""
import json
import os

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer)

from .configuration import ChatGLMConfig
from .modeling import ChatGLMForConditionalGeneration, ChatGLMModel, ChatGLMPreTrainedModel
from .tokenization import ChatGLMTokenizer

__all__ = ["ChatGLMConfig", "ChatGLMModel", "ChatGLMForConditionalGeneration", "ChatGLMPreTrainedModel",
           "ChatGLMTokenizer", "tiny_config", "TINY_SIZES"]

AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM):  # the original's auto_map also named Seq2SeqLM
    _auto.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(ChatGLMConfig, tokenizer_class=ChatGLMTokenizer, exist_ok=True)

TINY_SIZES = dict(hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256)


def tiny_config(**overrides) -> ChatGLMConfig:
    """The real chatglm-6b config.json shrunk to TINY_SIZES (full 130528 vocab, real special ids), in fp32."""
    from .. import tokenizer_files

    with open(os.path.join(tokenizer_files("chatglm-6b"), "config.json"), encoding="utf-8") as f:
        values = json.load(f)
    values.pop("_name_or_path", None)
    values.pop("torch_dtype", None)
    values.update(TINY_SIZES, dtype="float32")
    values.update(overrides)
    return ChatGLMConfig(**values)
