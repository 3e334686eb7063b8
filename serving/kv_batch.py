"""The running batch's key/value cache: rows join and leave between decoding steps (continuous batching).

Every row's cache is left-padded to the batch's width; the attention mask hides the padding and each row carries
its own positions, so a row's tokens do not depend on its neighbours (tests/test_serving_engine.py checks the
greedy tokens). Requests that arrive together are prefilled together: LLaMA / GLM-4 prompts in one left-padded
forward (`prefill_together`, groups of similar length within a token budget); ChatGLM-6B (its prefix-LM mask) and a
P-tuning prefix (it sits in front of the padding) one at a time. The new rows' cache is then padded in. When rows
leave, the columns that are padding in every remaining row are cut off.

Two layouts: transformers' LLaMA / GLM-4 (2-D 0/1 mask, [B, L] positions counting the text from 0, also after a
P-tuning prefix) and our ChatGLM-6B (bool mask True = hidden, 2-D [position, block] positions after <sop>).
"""
import contextlib
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from model_hub.registry import decode_layout
from tuning.generation import vocab_projection_as_tall_matmul

SPARE_COLUMNS = 64
PREFILL_TOKENS = 2048        # padded prompt tokens per batched prefill forward (bounds its activations)


@dataclass
class RowState:
    pad: int = 0                 # left padding columns in the batch cache
    length: int = 0              # cache entries of this row (prefix + text so far)
    next_position: int = 0       # LLaMA / GLM-4: the text position of the next input token
    marks: dict = field(default_factory=dict)  # what a family's decode layout keeps of the prompt (ChatGLM-6B's)


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
        # narrow + copy_: the same in-place write as slice assignment, with less Python per call (8 layers a step)
        self._keys.narrow(2, self.length, end - self.length).copy_(keys)
        self._values.narrow(2, self.length, end - self.length).copy_(values)
        self.length = end
        self.keys, self.values = self._keys.narrow(2, 0, end), self._values.narrow(2, 0, end)

    def update(self, key_states, value_states, *args, **kwargs):
        self._write(key_states, value_states)
        return self.keys, self.values


def prefill_groups(lengths: list[int], budget: int = PREFILL_TOKENS) -> list[list[int]]:
    """Indices of prompts to prefill together: similar lengths side by side (little padding), at most `budget`
    padded tokens per group (a prompt longer than that goes alone)."""
    groups, group = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if group and (len(group) + 1) * lengths[i] > budget:
            groups.append(group)
            group = []
        group.append(i)
    return groups + ([group] if group else [])


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
        self.decoding = decode_layout(loaded.core.config)  # the family's own (registry), else None: the standard
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
        if self.decoding:  # the model builds its own prefill positions and mask
            out = self.model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True)
            state = RowState(length=len(ids), marks=self.decoding.row_marks(ids))
        else:
            n_prefix = self.prefix[0][0].shape[2] if self.prefix else 0
            cache = _cache_of(self.prefix) if self.prefix else DynamicCache()
            out = self.model(input_ids=input_ids, position_ids=torch.arange(len(ids), device=device)[None],
                             attention_mask=torch.ones(1, n_prefix + len(ids), dtype=torch.long, device=device),
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            state = RowState(length=n_prefix + len(ids), next_position=len(ids))
        return out.logits[0, -1].float(), _layers_of(out.past_key_values), state

    @property
    def prefills_together(self) -> bool:
        return self.decoding is None and not self.prefix  # a family's own layout prefills one prompt at a time

    @torch.no_grad()
    def prefill_together(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list, list[RowState]]:
        """Run several prompts in one forward, left-padded to the longest: (last logits [k, vocab], cache layers
        [k, heads, longest, head_dim], their states). The padding is masked and every row is numbered from 0, so each
        row gets what `prefill` gives it alone (tests/test_serving_engine.py)."""
        device = next(self.model.parameters()).device
        width = max(len(ids) for ids in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        position_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        states = []
        for row, ids in enumerate(prompts):
            pad = width - len(ids)
            input_ids[row, pad:] = torch.tensor(ids)
            attention_mask[row, pad:] = 1
            position_ids[row, pad:] = torch.arange(len(ids))
            states.append(RowState(pad=pad, length=len(ids), next_position=len(ids)))
        out = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         position_ids=position_ids.to(device), past_key_values=DynamicCache(), use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1].float(), _layers_of(out.past_key_values), states

    def add(self, layers: list, states: list[RowState]) -> None:
        """Append new rows (their cache [k, heads, w, head_dim], left-padded among themselves as `states` say):
        the narrower of the batch and the new block is left-padded to the other's width."""
        new_width = layers[0][0].shape[2]
        grow = max(0, new_width - self.width)
        if self.cache is None:
            self.cache = _cache_of(layers)
        else:
            extra = self.width + grow - new_width
            self.cache = _cache_of(
                [(torch.cat((_left_pad(k, grow), _left_pad(key, extra)), dim=0),
                  torch.cat((_left_pad(v, grow), _left_pad(value, extra)), dim=0))
                 for (k, v), (key, value) in zip(self.layers, layers)])
            for row in self.rows:
                row.pad += grow
            for state in states:
                state.pad += extra
        self.rows.extend(states)

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
        padded = any(row.pad for row in self.rows)
        if self.decoding or padded:
            columns = torch.arange(width + 1, device=device)[None]
            pads = torch.tensor([row.pad for row in self.rows], device=device)[:, None]
            visible = columns >= pads   # [B, width + 1]: the new token's column is always visible
        if self.decoding:  # (its forward has no logits_to_keep)
            inputs = self.decoding.step_inputs(self.rows, visible)
        else:
            inputs = {"position_ids": torch.tensor([[row.next_position] for row in self.rows], device=device),
                      "logits_to_keep": 1}
            if padded:  # without padding the mask is all ones, which transformers drops anyway (same SDPA call)
                inputs["attention_mask"] = visible.long()
        # Several rows: a faster CPU gemm for the vocab projection. One row: the same speed and bits without it.
        with vocab_projection_as_tall_matmul(self.model) if batch > 1 else contextlib.nullcontext():
            out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, **inputs)
        for row in self.rows:
            row.length += 1
            row.next_position += 1
        assert self.width == width + 1 and batch == self.cache.layers[0].keys.shape[0]
        return out.logits[:, -1].float()
