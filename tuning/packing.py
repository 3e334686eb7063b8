"""Less padding, the same loss: the opt-in `--group_by_length` and `--packing` of all three recipes.

- Length grouping (`LengthGroupedSampler`): every epoch the rows are shuffled (seed + epoch), cut into megabatches
  of 64 batches, each megabatch sorted by length and cut into batches; the batches are shuffled, the longest one
  first (an out-of-memory error shows at step 1, not hours in). Every row exactly once per epoch; a batch holds
  rows of similar length, so padding it to its longest row wastes little.
- Packing (`pack_rows` + `PackedRows` + `PackingCollator`): rows are packed once (best fit, longest first) into
  training rows of at most `capacity` tokens. Nothing leaks across a boundary: each packed sequence has its own
  positions, restarting at 0, and block-diagonal attention.
  * transformers' own models get `position_ids` and no attention_mask (`RestartingPositions`): transformers 5
    derives the block-diagonal causal mask from positions that restart.
  * a model with its own masks and positions brings a layout that builds each sequence's exactly as unpacked
    (model_hub.registry.packed_layout finds it for a config).
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


class RestartingPositions:
    """The packed layout of models that build their own masks: 1-D positions restarting at 0 per sequence.

    transformers 5 derives the block-diagonal causal mask from positions that restart
    (masking_utils.find_packed_sequence_indices), for SDPA, eager and flash attention alike; this needs
    `use_cache=False` while training. Padding continues as a sequence of its own. A model with its own mask and
    positions brings its own layout (the same three methods; model_hub.registry.packed_layout finds it).
    """

    def empty(self, rows: int, length: int) -> dict:
        return {"position_ids": torch.zeros((rows, length), dtype=torch.long)}

    def place(self, batch: dict, row: int, start: int, ids: torch.Tensor) -> None:
        batch["position_ids"][row, start:start + len(ids)] = torch.arange(len(ids))

    def pad(self, batch: dict, row: int, start: int) -> None:
        batch["position_ids"][row, start:] = torch.arange(batch["position_ids"].shape[1] - start)


class PackingCollator:
    """Batches of packed rows -> model inputs with per-sequence positions and block-diagonal attention.

    `rows_fn(features)` turns a list of dataset rows into [(input_ids, labels)] without padding (the recipe's own
    tokenisation and labels); `layout` builds the positions (and mask, where the model needs one) of every packed
    sequence: `RestartingPositions()` unless the model brings its own.
    """

    def __init__(self, rows_fn, pad_token_id: int, layout=None, unpacked=None):
        self.rows_fn, self.pad_token_id = rows_fn, pad_token_id
        self.layout = layout if layout is not None else RestartingPositions()
        self.unpacked = unpacked  # the recipe's collator, for plain rows (evaluation batches)

    def __call__(self, packs: list[list]) -> dict:
        if packs and not isinstance(packs[0], list) and self.unpacked is not None:
            return self.unpacked(packs)
        rows = self.rows_fn([row for pack in packs for row in pack])
        groups, start = [], 0
        for pack in packs:
            groups.append(rows[start:start + len(pack)])
            start += len(pack)
        return pack_batch(groups, self.pad_token_id, self.layout)


def pack_batch(groups: list[list[tuple[list[int], list[int]]]], pad_token_id: int, layout=None) -> dict:
    """One packed training row per group of (input_ids, labels) sequences, right-padded to the longest."""
    layout = layout if layout is not None else RestartingPositions()
    longest = max(sum(len(ids) for ids, _ in group) for group in groups)
    input_ids = torch.full((len(groups), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(groups), longest), IGNORE_INDEX, dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels, **layout.empty(len(groups), longest)}
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
            layout.place(batch, r, start, seq)
            start = end
        if start < longest:  # padding: its own block, never seen by the sequences before it
            layout.pad(batch, r, start)
    return batch


def padding_fraction(batches_of_lengths: list[list[int]], padded_lengths: list[int] | None = None) -> float:
    """Pad tokens / all tokens for batches padded to their longest row (or to the given per-batch lengths)."""
    real = sum(sum(b) for b in batches_of_lengths)
    if padded_lengths is None:
        padded_lengths = [max(b) for b in batches_of_lengths]
    total = sum(n * len(b) for n, b in zip(padded_lengths, batches_of_lengths))
    return 1 - real / total if total else 0.0


class TrainingRows:
    """What `less_padding` hands a training loop: the rows, their collator and, with --group_by_length, the sampler.

    `trainer_inputs()` are the keyword arguments of a tuning.checkpoints Trainer (which installs the sampler);
    a raw loop reads the three fields."""

    def __init__(self, rows, collator, sampler=None):
        self.rows, self.collator, self.sampler = rows, collator, sampler

    def __iter__(self):  # rows, collator, sampler = less_padding(...)
        return iter((self.rows, self.collator, self.sampler))

    def trainer_inputs(self) -> dict:
        return {"train_dataset": self.rows, "data_collator": self.collator, "train_sampler": self.sampler}


def less_padding(rows, lengths, *, rows_fn, collator, pad_token_id: int, packed_layout=None, packing: bool,
                 group_by_length: bool, capacity: int | None, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1) -> TrainingRows:
    """The recipes' `--packing` / `--group_by_length`.

    Both off: the rows and the recipe's own collator, untouched. `packing`: PackedRows + PackingCollator over
    bins of at most `capacity` tokens, laid out by `packed_layout` (RestartingPositions unless the model brings
    its own; `capacity` None: the longest row). `group_by_length`: a LengthGroupedSampler over the (packed) rows.
    `lengths`: the token count of each row, or a function giving them (called only when one of the two is on).
    """
    if not (packing or group_by_length):
        return TrainingRows(rows, collator)
    lengths = lengths() if callable(lengths) else lengths
    sampler = None
    if packing:
        capacity = max(lengths, default=0) if capacity is None else capacity
        bins = pack_rows(lengths, capacity)
        say(packing_report(lengths, bins, capacity))
        rows = PackedRows(rows, bins)
        lengths = rows.lengths(lengths)
        collator = PackingCollator(rows_fn, pad_token_id, packed_layout, collator)
    if group_by_length:
        sampler = LengthGroupedSampler(lengths, batch_size, seed, rank, world)
    return TrainingRows(rows, collator, sampler)
