"""Registers our ChatGLM-6B with transformers' Auto classes (model_hub imports this once transformers is loaded)."""
import json
import os

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from .configuration import ChatGLMConfig
from .modeling import ChatGLMForConditionalGeneration
from .tokenization import ChatGLMTokenizer
from ..registry import get_spec

AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM):  # the original's auto_map also named Seq2SeqLM
    _auto.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(ChatGLMConfig, tokenizer_class=ChatGLMTokenizer, exist_ok=True)

TINY_SIZES = dict(get_spec("chatglm-6b").tiny)  # the registry holds the tiny sizes


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
