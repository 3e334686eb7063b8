"""The running batch's key/value cache: rows join and leave between decoding steps (continuous batching).

Every row's cache is left-padded to the batch's width; the attention mask hides the padding and each row carries
its own positions, so a row's tokens do not depend on its neighbours (tests/test_serving_engine.py checks the
greedy tokens). A new request is prefilled alone (batch 1, no padding), then its cache is padded in. When rows
leave, the columns that are padding in every remaining row are cut off.

Two layouts: transformers' LLaMA / GLM-4 (2-D 0/1 mask, [B, L] positions counting the text from 0, also after a
P-tuning prefix) and our ChatGLM-6B (bool mask True = hidden, 2-D [position, block] positions after <sop>).
"""
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tuning.generation import vocab_projection_as_tall_matmul

SPARE_COLUMNS = 64


@dataclass
class RowState:
    pad: int = 0                 # left padding columns in the batch cache
    length: int = 0              # cache entries of this row (prefix + text so far)
    next_position: int = 0       # LLaMA / GLM-4: the text position of the next input token
    mask_position: int = 0       # ChatGLM-6B: index of [gMASK]
    context_length: int = 0      # ChatGLM-6B: index of <sop>


class BufferLayer(DynamicLayer):
    """A cache layer over buffers with spare columns: a decoding step writes its key/value in place, where
    DynamicLayer concatenates (a copy of the whole batch cache at every step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.length = 0
        self._keys = self._values = None
        self._grow(keys.shape, keys.shape[2] + SPARE_COLUMNS)
        self._write(keys, values)

    def _grow(self, shape, capacity: int) -> None:
        old = (self._keys, self._values)
        shape = (shape[0], shape[1], capacity, shape[3])
        self._keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._values = torch.empty(shape, dtype=self.dtype, device=self.device)
        if old[0] is not None:
            self._keys[:, :, :self.length] = old[0][:, :, :self.length]
            self._values[:, :, :self.length] = old[1][:, :, :self.length]

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self.length + keys.shape[2]
        if end > self._keys.shape[2]:
            self._grow(self._keys.shape, 2 * end)
        self._keys[:, :, self.length:end] = keys
        self._values[:, :, self.length:end] = values
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]

    def update(self, key_states, value_states, *args, **kwargs):
        self._write(key_states, value_states)
        return self.keys, self.values


def _cache_of(layers) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [BufferLayer(key, value) for key, value in layers]
    return cache


def _layers_of(cache) -> list:
    return [[layer.keys, layer.values] for layer in cache.layers]


def _left_pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[2] = columns
    return torch.cat((tensor.new_zeros(shape), tensor), dim=2)


class KVBatch:
    def __init__(self, loaded):
        self.model = loaded.core
        self.glm6b = loaded.family == "chatglm6b"
        self.config = loaded.core.config
        self.prefix = loaded.prefix
        self.cache: DynamicCache | None = None   # per layer [B, heads, width, head_dim], rows left-padded
        self.rows: list[RowState] = []

    @property
    def layers(self) -> list | None:
        return None if self.cache is None else _layers_of(self.cache)

    @property
    def width(self) -> int:
        return 0 if self.cache is None else self.cache.layers[0].keys.shape[2]

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, list, RowState]:
        """Run one prompt alone: (last logits [vocab], its cache layers, its state)."""
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        if self.glm6b:
            out = self.model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True)
            gmask = self.config.gmask_token_id if self.config.gmask_token_id in ids else self.config.mask_token_id
            state = RowState(length=len(ids), mask_position=ids.index(gmask),
                             context_length=ids.index(self.config.bos_token_id))
        else:
            n_prefix = self.prefix[0][0].shape[2] if self.prefix else 0
            cache = _cache_of(self.prefix) if self.prefix else DynamicCache()
            out = self.model(input_ids=input_ids, position_ids=torch.arange(len(ids), device=device)[None],
                             attention_mask=torch.ones(1, n_prefix + len(ids), dtype=torch.long, device=device),
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            state = RowState(length=n_prefix + len(ids), next_position=len(ids))
        return out.logits[0, -1].float(), _layers_of(out.past_key_values), state

    def add(self, layers: list, state: RowState) -> None:
        """Pad the new row's cache (or the batch's) to a common width and append the row."""
        grow = max(0, state.length - self.width)
        if self.cache is None:
            self.cache = _cache_of(layers)
        else:
            state.pad = self.width + grow - state.length
            self.cache = _cache_of(
                [(torch.cat((_left_pad(k, grow), _left_pad(key, state.pad)), dim=0),
                  torch.cat((_left_pad(v, grow), _left_pad(value, state.pad)), dim=0))
                 for (k, v), (key, value) in zip(self.layers, layers)])
            for row in self.rows:
                row.pad += grow
        self.rows.append(state)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order), then drop the columns that are padding in all of them."""
        if not indices:
            self.cache, self.rows = None, []
            return
        layers = self.layers
        changed = indices != list(range(len(self.rows)))
        if changed:
            index = torch.tensor(indices, device=layers[0][0].device)
            layers = [[k.index_select(0, index), v.index_select(0, index)] for k, v in layers]
            self.rows = [self.rows[i] for i in indices]
        cut = min(row.pad for row in self.rows)
        if cut:
            layers = [[k[:, :, cut:], v[:, :, cut:]] for k, v in layers]
            for row in self.rows:
                row.pad -= cut
        if changed or cut:
            self.cache = _cache_of(layers)

    @torch.no_grad()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; the logits [B, vocab] of the next token of every row."""
        device = self.cache.layers[0].keys.device
        batch, width = len(self.rows), self.width
        input_ids = torch.tensor(tokens, device=device)[:, None]
        columns = torch.arange(width + 1, device=device)[None]
        pads = torch.tensor([row.pad for row in self.rows], device=device)[:, None]
        visible = columns >= pads   # [B, width + 1]: the new token's column is always visible
        if self.glm6b:
            position_ids = torch.tensor([[row.mask_position, row.length - row.context_length + 1]
                                         for row in self.rows], device=device)[:, :, None]
            attention_mask = (~visible)[:, None, None, :]
        else:
            position_ids = torch.tensor([[row.next_position] for row in self.rows], device=device)
            attention_mask = visible.long()
        with vocab_projection_as_tall_matmul(self.model):  # a faster CPU gemm for a few rows x the vocab
            out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                             past_key_values=self.cache, use_cache=True,
                             **({} if self.glm6b else {"logits_to_keep": 1}))
        for row in self.rows:
            row.length += 1
            row.next_position += 1
        assert self.width == width + 1 and batch == self.cache.layers[0].keys.shape[0]
        return out.logits[:, -1].float()
