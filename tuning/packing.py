"""Less padding, the same loss: the opt-in `--group_by_length` and `--packing` of all three recipes.

- Length grouping (`LengthGroupedSampler`): every epoch the rows are shuffled (seed + epoch), cut into megabatches
  of 64 batches, each megabatch sorted by length and cut into batches; the batches are shuffled, the longest one
  first (an out-of-memory error shows at step 1, not hours in). Every row exactly once per epoch; a batch holds
  rows of similar length, so padding it to its longest row wastes little.
- Packing (`pack_rows` + `PackedRows` + `PackingCollator`): rows are packed once (best fit, longest first) into
  training rows of at most `capacity` tokens. Nothing leaks across a boundary: each packed sequence has its own
  positions, restarting at 0, and block-diagonal attention.
  * transformers' models (LLaMA, GLM-4) get `position_ids` and no attention_mask: transformers 5 derives the
    block-diagonal causal mask from positions that restart (masking_utils.find_packed_sequence_indices), for SDPA,
    eager and flash attention alike. This needs `use_cache=False` while training (a cache turns that off).
  * our ChatGLM-6B gets its own bool mask [B, 1, L, L] (True = masked) and 2-D positions [B, 2, L], each sequence's
    built exactly as unpacked (model_hub.chatglm6b.masks): bidirectional prompt, causal answer.
  The first label of every packed sequence is -100: unpacked it is never a target (labels are shifted by one
  inside the model), packed it would be predicted from the sequence before it. Padding (to the longest packed row
  of the batch) has label -100 and forms its own block.
Same rows in, same loss out (token mean and sum) and the same gradients: tests/test_packing.py.
"""
import bisect
import random

import torch
from torch.utils.data import Dataset, Sampler

from .distributed import say

IGNORE_INDEX = -100
MEGABATCH = 64  # batches per sorted megabatch: enough to find similar lengths, still well shuffled


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of row indices, every row exactly once, rows of similar length together; the longest batch first."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = MEGABATCH * batch_size
    batches = []
    for start in range(0, len(order), size):
        mega = sorted(order[start:start + size], key=lambda i: -lengths[i])
        batches += [mega[i:i + batch_size] for i in range(0, len(mega), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    partial = [b for b in batches if len(b) < batch_size]  # at most one: it must stay last for the DataLoader
    rng.shuffle(full)
    if full:
        longest = max(range(len(full)), key=lambda i: max(lengths[j] for j in full[i]))
        full[0], full[longest] = full[longest], full[0]
    return full + partial


class LengthGroupedSampler(Sampler):
    """Row indices in length-grouped batches of `batch_size` (the DataLoader's batch size), new order each epoch.

    Under a raw multi-process loop give `rank`/`world`: every process computes the same batches and takes every
    world-th one (all the same count). Under the HF Trainer leave them: accelerate hands batches out to processes.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 42, rank: int = 0, world: int = 1):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer (through accelerate) and by raw loops
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        batches = length_grouped_batches(self.lengths, self.batch_size, self.seed + self.epoch)
        if self.world > 1:
            usable = len(batches) // self.world * self.world
            batches = batches[self.rank:usable:self.world]
        return batches

    def __iter__(self):
        return iter([i for batch in self.batches() for i in batch])

    def __len__(self) -> int:
        if self.world > 1:
            return sum(len(b) for b in self.batches())
        return len(self.lengths)


def use_train_sampler(trainer, sampler) -> None:
    """Make a transformers Trainer draw its training rows from `sampler` (its documented override point is the
    `_get_train_sampler` method; the recipes keep the stock Trainer classes)."""
    trainer._get_train_sampler = lambda *args, **kwargs: sampler


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of row indices whose lengths add up to at most `capacity` (best fit, longest first); each bin keeps
    its rows in index order. Deterministic; the training sampler shuffles the bins."""
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit the packing capacity {capacity}")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin number), sorted: the best fit is the first with enough
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at < len(room):
            free, b = room.pop(at)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(room, (free - lengths[i], b))
    return [sorted(b) for b in bins]


class PackedRows(Dataset):
    """A dataset whose item i is the list of rows of bin i (for `PackingCollator`)."""

    def __init__(self, rows, bins: list[list[int]]):
        self.rows, self.bins = rows, bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> list:
        return [self.rows[j] for j in self.bins[i]]

    def lengths(self, row_lengths: list[int]) -> list[int]:
        return [sum(row_lengths[j] for j in b) for b in self.bins]


def packing_report(row_lengths: list[int], bins: list[list[int]], capacity: int) -> str:
    tokens = sum(row_lengths)
    return (f"packing: {len(row_lengths)} rows -> {len(bins)} packed rows of at most {capacity} tokens "
            f"({100 * tokens / max(1, len(bins) * capacity):.1f}% filled)")


class PackingCollator:
    """Batches of packed rows -> model inputs with per-sequence positions and block-diagonal attention.

    `rows_fn(features)` turns a list of dataset rows into [(input_ids, labels)] without padding (the recipe's own
    tokenisation and labels); `family` is "chatglm6b" (own mask and 2-D positions, needs `config`) or anything
    transformers builds masks for ("llama", "glm4"): position_ids only.
    """

    def __init__(self, rows_fn, pad_token_id: int, family: str, config=None, unpacked=None):
        if family == "chatglm6b" and config is None:
            raise ValueError("ChatGLM-6B packing needs the model config (special ids, 2-D positions)")
        self.rows_fn, self.pad_token_id, self.family, self.config = rows_fn, pad_token_id, family, config
        self.unpacked = unpacked  # the recipe's collator, for plain rows (evaluation batches)

    def __call__(self, packs: list[list]) -> dict:
        if packs and not isinstance(packs[0], list) and self.unpacked is not None:
            return self.unpacked(packs)
        rows = self.rows_fn([row for pack in packs for row in pack])
        groups, start = [], 0
        for pack in packs:
            groups.append(rows[start:start + len(pack)])
            start += len(pack)
        return pack_batch(groups, self.pad_token_id, self.family, self.config)


def pack_batch(groups: list[list[tuple[list[int], list[int]]]], pad_token_id: int, family: str,
               config=None) -> dict:
    """One packed training row per group of (input_ids, labels) sequences, right-padded to the longest."""
    longest = max(sum(len(ids) for ids, _ in group) for group in groups)
    input_ids = torch.full((len(groups), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(groups), longest), IGNORE_INDEX, dtype=torch.long)
    chatglm = family == "chatglm6b"
    if chatglm:
        from model_hub.chatglm6b.masks import build_attention_mask, build_position_ids

        position_ids = torch.zeros((len(groups), 2, longest), dtype=torch.long)
        masked = torch.ones((len(groups), 1, longest, longest), dtype=torch.bool)
    else:
        position_ids = torch.zeros((len(groups), longest), dtype=torch.long)
    for r, group in enumerate(groups):
        start = 0
        for ids, row_labels in group:
            if len(ids) != len(row_labels):
                raise ValueError("input_ids and labels differ in length")
            end = start + len(ids)
            seq = torch.tensor(ids, dtype=torch.long)
            input_ids[r, start:end] = seq
            labels[r, start:end] = torch.tensor(row_labels, dtype=torch.long)
            labels[r, start] = IGNORE_INDEX
            if chatglm:
                position_ids[r, :, start:end] = build_position_ids(seq[None], config)[0]
                masked[r, 0, start:end, start:end] = build_attention_mask(seq[None], config.bos_token_id)[0, 0]
            else:
                position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        if start < longest:  # padding: its own block, never seen by the sequences before it
            pad = longest - start
            if chatglm:
                masked[r, 0, start:, start:] = ~torch.eye(pad, dtype=torch.bool)
            else:
                position_ids[r, start:] = torch.arange(pad)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if chatglm:
        batch["attention_mask"] = masked
    return batch


def padding_fraction(batches_of_lengths: list[list[int]], padded_lengths: list[int] | None = None) -> float:
    """Pad tokens / all tokens for batches padded to their longest row (or to the given per-batch lengths)."""
    real = sum(sum(b) for b in batches_of_lengths)
    if padded_lengths is None:
        padded_lengths = [max(b) for b in batches_of_lengths]
    total = sum(n * len(b) for n, b in zip(padded_lengths, batches_of_lengths))
    return 1 - real / total if total else 0.0


def less_padding(rows, lengths: list[int], *, rows_fn, collator, pad_token_id: int, model_config, packing: bool,
                 group_by_length: bool, capacity: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """The recipes' `--packing` / `--group_by_length`: (training rows, collator, sampler or None).

    Both off: the rows and the recipe's own collator, untouched. `packing`: PackedRows + PackingCollator over
    bins of at most `capacity` tokens. `group_by_length`: a LengthGroupedSampler over the (packed) rows.
    """
    sampler = None
    if packing:
        from model_hub.registry import family_of_config

        bins = pack_rows(lengths, capacity)
        say(packing_report(lengths, bins, capacity))
        rows = PackedRows(rows, bins)
        lengths = rows.lengths(lengths)
        collator = PackingCollator(rows_fn, pad_token_id, family_of_config(model_config), model_config, collator)
    if group_by_length:
        sampler = LengthGroupedSampler(lengths, batch_size, seed, rank, world)
    return rows, collator, sampler
