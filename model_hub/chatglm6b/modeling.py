"""ChatGLM-6B (GLM) for transformers 5, state-dict compatible with THUDM's `modeling_chatglm.py`.

Computation follows the original step by step (2-D rotary with fp16-rounded inverse frequencies, residuals that add
alpha * the LayerNorm OUTPUT with alpha = sqrt(2 * 28), the layer-scaled attention with the -10000 fill and an fp32
softmax, GELU-tanh MLP, tied lm_head). The KV cache is a transformers `Cache` (DynamicCache) holding keys and values
as [batch, heads, seq, head_dim]; the P-tuning v2 prefix is written into it before the prompt.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration import ChatGLMConfig
from .generation import ChatGLMGenerationMixin
from .masks import build_attention_mask, build_position_ids

logger = logging.get_logger(__name__)

# The original builds every GLMBlock with its default num_layers=28, whatever config.num_layers says.
RESIDUAL_ALPHA = (2 * 28) ** 0.5

QUANTIZED_MESSAGE = (
    "quantized ChatGLM-6B checkpoints (config quantization_bit={bits}) need THUDM's CUDA kernels (cpm_kernels) and "
    "are not supported. Load the fp16 checkpoint (THUDM/chatglm-6b) instead; to save memory on a GPU, quantize it at "
    "load time with bitsandbytes: from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), "
    "device_map='auto'). On CPU use bf16 or fp32.")


def rotary_tables(positions: torch.Tensor, dim: int, dtype: torch.dtype):
    """cos/sin [B, L, 1, dim] for integer positions [B, L]: GPT-NeoX style, inverse frequencies rounded to fp16."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    inv_freq = inv_freq.half().float()
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


class PrefixEncoder(nn.Module):
    """P-tuning v2: per prefix token, keys and values for every layer ([pre_seq_len, num_layers * 2 * hidden])."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        out_dim = config.num_layers * config.hidden_size * 2
        self.prefix_projection = config.prefix_projection
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, out_dim))
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, out_dim)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        out = self.embedding(prefix)
        return self.trans(out) if self.prefix_projection else out


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.position_encoding_2d = config.position_encoding_2d
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def _rotate(self, x, rotary):
        if not self.position_encoding_2d:
            return apply_rotary(x, *rotary)
        cos0, sin0, cos1, sin1 = rotary
        half = x.shape[-1] // 2  # first half: token positions, second half: block positions
        return torch.cat((apply_rotary(x[..., :half], cos0, sin0), apply_rotary(x[..., half:], cos1, sin1)), -1)

    def forward(self, hidden_states, rotary, attention_mask, prefix_key=None, prefix_value=None,
                past_key_values=None, output_attentions=False):
        batch, length, _ = hidden_states.shape
        # The fused weight is laid out per head: [h0.q, h0.k, h0.v, h1.q, ...].
        mixed = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = mixed.split(self.head_dim, dim=-1)
        query = self._rotate(query, rotary).transpose(1, 2)
        key = self._rotate(key, rotary).transpose(1, 2)
        value = value.transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_id)
        elif prefix_key is not None:
            key = torch.cat((prefix_key, key), dim=2)
            value = torch.cat((prefix_value, value), dim=2)

        # The layer coefficient only guards fp16 against overflow; kept for bit-closeness with the original.
        coeff = float(self.layer_id + 1)
        query = query / (math.sqrt(self.head_dim) * coeff)
        scores = torch.matmul(query, key.transpose(-1, -2))
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, -10000.0)
        dtype = scores.dtype
        probs = F.softmax(scores.float() * coeff, dim=-1).to(dtype)
        context = torch.matmul(probs, value).transpose(1, 2).reshape(batch, length, self.hidden_size)
        return self.dense(context), (probs if output_attentions else None)


class GLU(nn.Module):
    """The MLP (not gated, despite the original's class name)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        inner = config.inner_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, inner)
        self.dense_4h_to_h = nn.Linear(inner, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(x)))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)

    def forward(self, hidden_states, rotary, attention_mask, prefix_key=None, prefix_value=None,
                past_key_values=None, output_attentions=False):
        attention_input = self.input_layernorm(hidden_states)
        attention_output, probs = self.attention(attention_input, rotary, attention_mask, prefix_key, prefix_value,
                                                 past_key_values=past_key_values,
                                                 output_attentions=output_attentions)
        hidden_states = attention_input * RESIDUAL_ALPHA + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * RESIDUAL_ALPHA + self.mlp(mlp_input), probs


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    # The original checkpoint stores the rotary inverse frequencies; they are recomputed, never read.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    # The loss is the mean over the batch's labelled tokens, as in the original (no num_items_in_batch scaling).
    accepts_loss_kwargs = False
    # forward(shift_labels=...) takes labels aligned with the logits, as transformers' causal-LM loss does.
    accepts_shift_labels = True

    def __init__(self, config: ChatGLMConfig, *inputs, **kwargs):
        if getattr(config, "quantization_bit", 0):
            raise NotImplementedError(QUANTIZED_MESSAGE.format(bits=config.quantization_bit))
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, weights_only: bool = True, **kwargs):
        """Loads `.bin` checkpoints only through torch.load(weights_only=True), never arbitrary pickles."""
        if not weights_only:
            raise ValueError("ChatGLM-6B checkpoints are loaded with weights_only=True only; convert a checkpoint that "
                             "needs full unpickling to safetensors in a trusted environment")
        loaded = super().from_pretrained(*args, weights_only=True, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a pair
        base = getattr(model, model.base_model_prefix, model)
        if isinstance(base, ChatGLMModel):
            base.freeze_for_prefix()
        return loaded

    def quantize(self, bits, *args, **kwargs):
        raise NotImplementedError(QUANTIZED_MESSAGE.format(bits=bits))

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PrefixEncoder):  # torch's own defaults, which the original's prefix encoder starts from
            init.normal_(module.embedding.weight, mean=0.0, std=1.0)
            if module.prefix_projection:
                for linear in (module.trans[0], module.trans[2]):
                    init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                    bound = 1 / math.sqrt(linear.in_features)
                    init.uniform_(linear.bias, -bound, bound)

    def get_masks(self, input_ids, device=None):
        return build_attention_mask(input_ids.to(device) if device else input_ids, self.config.bos_token_id)

    def get_position_ids(self, input_ids, mask_positions=None, device=None, use_gmasks=None):
        return build_position_ids(input_ids.to(device) if device else input_ids, self.config,
                                  mask_positions=mask_positions, use_gmasks=use_gmasks)


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The GLM transformer. Like the original, its outputs are sequence-first: [seq, batch, hidden]."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.pre_seq_len = config.pre_seq_len
        if config.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(config)
            self.dropout = nn.Dropout(0.1)
            self.freeze_for_prefix()
        self.post_init()

    def freeze_for_prefix(self):
        """With P-tuning v2 only the prefix encoder trains: every base parameter is frozen."""
        if self.pre_seq_len is None:
            return
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith("prefix_encoder."))

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def get_prompt(self, batch_size: int, device, dtype):
        """Per layer (key, value) of the prefix, each [B, heads, pre_seq_len, head_dim] (no rotary applied)."""
        config = self.config
        prefix = torch.arange(self.pre_seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        kv = self.prefix_encoder(prefix).to(dtype)
        kv = kv.view(batch_size, self.pre_seq_len, config.num_layers * 2, config.num_attention_heads,
                     config.hidden_size // config.num_attention_heads)
        kv = self.dropout(kv).permute(2, 0, 3, 1, 4)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(config.num_layers)]

    def _rotary(self, position_ids, dtype):
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        if self.config.position_encoding_2d:
            return (*rotary_tables(position_ids[:, 0], head_dim // 2, dtype),
                    *rotary_tables(position_ids[:, 1], head_dim // 2, dtype))
        return rotary_tables(position_ids, head_dim, dtype)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else config.use_cache
        return_dict = return_dict if return_dict is not None else config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch = inputs_embeds.shape[0]
        if self.training and use_cache and any(layer.gradient_checkpointing for layer in self.layers):
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; setting use_cache=False")
            use_cache = False
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError("past_key_values must be a transformers Cache (e.g. DynamicCache); legacy tuples of "
                            "(key, value) are not supported")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        if attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.dim() != 4):
            # The original only understands its bool [B, 1, q, k] GLM mask and drops other masks in generation.
            logger.warning_once(f"attention mask of dtype {attention_mask.dtype} and shape "
                                f"{tuple(attention_mask.shape)} is not the bool GLM mask: ignored, the GLM mask is "
                                "built from input_ids")
            attention_mask = None

        prefix = None
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            if input_ids is None and (attention_mask is None or position_ids is None):
                raise ValueError("without input_ids, pass the GLM attention_mask and position_ids")
            if attention_mask is None:
                attention_mask = build_attention_mask(input_ids, config.bos_token_id)
            if position_ids is None:
                position_ids = build_position_ids(input_ids, config)
            if self.pre_seq_len is not None:
                prefix = self.get_prompt(batch, inputs_embeds.device, inputs_embeds.dtype)
                if past_key_values is not None:
                    for i, (key, value) in enumerate(prefix):
                        past_key_values.update(key, value, i)
                    prefix = None
        elif position_ids is None:
            raise ValueError("position_ids are required when continuing from a non-empty cache")
        if self.pre_seq_len is not None and attention_mask is not None:
            # Every position (pads included) sees the whole prefix; positions do not count it.
            visible = attention_mask.new_zeros((*attention_mask.shape[:3], self.pre_seq_len))
            attention_mask = torch.cat((visible, attention_mask), dim=3)
        # An all-False mask is skipped entirely, as in the original.
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device)
            if not attention_mask.any():
                attention_mask = None

        rotary = self._rotary(position_ids.to(inputs_embeds.device), inputs_embeds.dtype)
        hidden_states = inputs_embeds
        all_hidden, all_attentions = (), ()
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden += (hidden_states.transpose(0, 1),)
            prefix_key, prefix_value = prefix[i] if prefix is not None else (None, None)
            hidden_states, probs = layer(hidden_states, rotary, attention_mask, prefix_key, prefix_value,
                                         past_key_values=past_key_values, output_attentions=output_attentions)
            if output_attentions:
                all_attentions += (probs,)
        hidden_states = self.final_layernorm(hidden_states).transpose(0, 1)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        out = BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                      past_key_values=past_key_values if use_cache else None,
                                      hidden_states=all_hidden if output_hidden_states else None,
                                      attentions=all_attentions if output_attentions else None)
        return out if return_dict else out.to_tuple()


class ChatGLMForConditionalGeneration(ChatGLMGenerationMixin, ChatGLMPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.max_sequence_length = config.max_sequence_length
        self.position_encoding_2d = config.position_encoding_2d
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.transformer(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                               return_dict=True)
        hidden_states = out.last_hidden_state.transpose(0, 1)
        logits = self.lm_head(hidden_states)
        loss = None
        shift_labels = kwargs.get("shift_labels")
        if labels is not None or shift_labels is not None:
            # fp32 logits; labels are shifted by one (logits[:, :-1] predict labels[:, 1:]), shift_labels are
            # already aligned with the logits (tuning/labelled_logits.py keeps only the trained positions).
            logits = logits.float()
            scored, targets = (logits, shift_labels) if shift_labels is not None else (logits[:, :-1], labels[:, 1:])
            loss = F.cross_entropy(scored.reshape(-1, logits.shape[-1]), targets.to(logits.device).reshape(-1),
                                   ignore_index=-100)
            logits, loss = logits.to(hidden_states.dtype), loss.to(hidden_states.dtype)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()
