"""--packing and --group_by_length (tuning/packing.py): for each recipe's model family, real rows through the
recipe's own row code, the packed batch gives the loss (token mean and sum) and the gradients of the recipe's
original padded batch in fp32 (loss to 1e-5 relative, every gradient to 1e-5 of its largest entry); no token sees
another packed sequence; length grouping yields every row exactly once per epoch."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from model_hub.registry import packed_layout
from tuning.packing import (LengthGroupedSampler, PackedRows, PackingCollator, length_grouped_batches, pack_batch,
                            pack_rows, padding_fraction)
from conftest import REPO

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5  # of the largest |gradient| entry of each parameter


def _llama():
    from llama_ner.dataset import NerCollate, load_data
    from model_hub.loader import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny:chinese-alpaca-7b", dtype="fp32")
    args = SimpleNamespace(instruct_column="instruct", query_column="query", response_column="answer",
                           max_seq_length=192)
    collate = NerCollate(args, tokenizer)
    lines = load_data(os.path.join(REPO, "data", "llama_ner_msra", "instruct_data", "dev.txt"))[:4]
    return model, tokenizer.pad_token_id, lines, collate.rows, collate.collate_fn


def _chatglm():
    from chatglm_lora.finetune import DataCollator
    from chatglm_lora.tokenize_dataset_rows import fit_rows, read_rows, tokenize_rows
    from model_hub.loader import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny:chatglm-6b", dtype="fp32")
    rows = read_rows(os.path.join(REPO, "data", "chatglm_tuning", "alpaca_data.jsonl"))[:4]
    tokenized = tokenize_rows(tokenizer, 130005, [r[1] for r in rows], [r[2] for r in rows], 64)
    features, _ = fit_rows(tokenized, 64, skip_overlength=False)
    collator = DataCollator(tokenizer.pad_token_id)
    return model, tokenizer.pad_token_id, features, collator.rows, collator


def _glm4():
    from glm4_finetune.data import process_batch
    from glm4_finetune.trainer import DataCollator, train_rows
    from model_hub.loader import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny:glm-4-9b-chat", dtype="fp32")
    tokenizer.padding_side = "left"  # as the recipe
    with open(os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen", "xl.jsonl"), encoding="utf-8") as f:
        conversations = [json.loads(next(f))["messages"] for _ in range(4)]
    out = process_batch({"messages": conversations}, tokenizer, 32, 32, combine=True)
    features = [{"input_ids": i, "labels": la} for i, la in zip(out["input_ids"], out["labels"])]
    return model, tokenizer.pad_token_id, features, train_rows, DataCollator(tokenizer, padding="longest",
                                                                               return_tensors="pt")


FAMILIES = {"llama": _llama, "chatglm6b": _chatglm, "glm4": _glm4}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model, pad_id, rows, rows_fn, original = FAMILIES[request.param]()
    model.config.use_cache = False  # as the recipes while training
    return SimpleNamespace(name=request.param, model=model.eval(), pad_id=pad_id, rows=rows, rows_fn=rows_fn,
                           original=original)


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    return loss.item(), targets, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_loss_and_gradients_equal_the_original_batch(family):
    lengths = [len(ids) for ids, _ in family.rows_fn(family.rows)]
    bins = pack_rows(lengths, max(lengths) * 2)
    assert len(bins) < len(lengths)  # some rows really share a training row
    packed = PackedRows(family.rows, bins)
    collate = PackingCollator(family.rows_fn, family.pad_id, packed_layout(family.model.config))
    packed_batch = collate([packed[i] for i in range(len(packed))])
    assert packed_batch["input_ids"].shape[0] == len(bins)

    loss_u, n_u, grads_u = loss_and_grads(family.model, family.original(family.rows))
    loss_p, n_p, grads_p = loss_and_grads(family.model, packed_batch)
    assert n_p == n_u  # the same targets: no label is gained or lost at a sequence boundary
    assert abs(loss_p - loss_u) <= LOSS_RTOL * abs(loss_u)  # token mean
    assert abs(loss_p * n_p - loss_u * n_u) <= LOSS_RTOL * abs(loss_u * n_u)  # token sum
    assert grads_u.keys() == grads_p.keys() and grads_u
    for name, grad in grads_u.items():
        scale = grad.abs().max().item()
        assert (grads_p[name] - grad).abs().max().item() <= GRAD_RTOL * scale + 1e-12, name


def test_no_token_sees_another_packed_sequence(family):
    sequences = family.rows_fn(family.rows)[:3]
    config = family.model.config
    special = {151329, 151331, 151333, 151336, 151337, family.pad_id}  # + the GLM-4 template ids
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "gmask_token_id"):
        value = getattr(config, key, None)
        special |= set(value) if isinstance(value, list) else {value}

    def logits(groups):
        with torch.no_grad():
            return family.model(**pack_batch([groups], family.pad_id, packed_layout(config)), use_cache=False).logits[0]

    base = logits(sequences)
    bounds, start = [], 0
    for ids, _ in sequences:
        bounds.append((start, start + len(ids)))
        start += len(ids)
    for k, (ids, labels) in enumerate(sequences):
        changed = list(ids)
        spots = [i for i, t in enumerate(ids) if t not in special][:3]
        for i in spots:
            changed[i] = ids[i] + 1 if ids[i] + 1 not in special else ids[i] - 1
        groups = list(sequences)
        groups[k] = (changed, labels)
        out = logits(groups)
        s, e = bounds[k]
        assert not torch.allclose(out[s:e], base[s:e])  # the perturbation matters to its own sequence
        for j, (s2, e2) in enumerate(bounds):
            if j != k:
                torch.testing.assert_close(out[s2:e2], base[s2:e2], rtol=0, atol=1e-6)


def test_length_grouping_yields_every_row_once_per_epoch():
    lengths = [int(x) for x in torch.randint(5, 300, (1003,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(lengths))) and len(sampler) == len(lengths)
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]
    sampler.set_epoch(0)
    assert list(sampler) == orders[0]  # an epoch's order is reproducible (exact resume)
    batches = [[lengths[i] for i in orders[0][s:s + 8]] for s in range(0, len(lengths), 8)]
    assert max(batches[0]) == max(lengths)  # longest batch first: out-of-memory shows at step 1
    shuffled = [[lengths[i] for i in range(s, min(s + 8, len(lengths)))] for s in range(0, len(lengths), 8)]
    assert padding_fraction(batches) < 0.05 < padding_fraction(shuffled)


def test_length_grouping_shares_batches_between_processes():
    lengths = list(range(1, 101))
    shares = [list(LengthGroupedSampler(lengths, batch_size=4, seed=0, rank=r, world=3)) for r in range(3)]
    assert len({len(s) for s in shares}) == 1
    assert not set(shares[0]) & set(shares[1]) and not set(shares[1]) & set(shares[2])
    every = {i for batch in length_grouped_batches(lengths, 4, 0) for i in batch}
    assert set().union(*shares) <= every


def test_pack_rows_places_every_row_once_within_capacity():
    lengths = [int(x) for x in torch.randint(1, 200, (2000,), generator=torch.Generator().manual_seed(1))]
    bins = pack_rows(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert sum(lengths) / (256 * len(bins)) > 0.97
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([10, 300], 256)


def test_packed_rows_with_the_lm_head_on_labels_only_give_the_original_loss_and_gradients(family):
    """--packing with --lm_head_on_labels_only (the fastest chatglm_lora / llama_ner combination): the narrowed
    head on packed rows gives the original batch's loss and gradients through the full head."""
    from tuning.labelled_logits import compute_logits_only_at_labels

    model, *_ = FAMILIES[family.name]()  # a model of its own: the hooks stay on it
    model.config.use_cache = False
    model.eval()
    lengths = [len(ids) for ids, _ in family.rows_fn(family.rows)]
    packed = PackedRows(family.rows, pack_rows(lengths, max(lengths) * 2))
    collate = PackingCollator(family.rows_fn, family.pad_id, packed_layout(model.config))
    packed_batch = collate([packed[i] for i in range(len(packed))])

    loss_u, n_u, grads_u = loss_and_grads(model, family.original(family.rows))
    narrow = compute_logits_only_at_labels(model)
    loss_p, n_p, grads_p = loss_and_grads(narrow, packed_batch)
    with torch.no_grad():
        assert narrow(**packed_batch, use_cache=False).logits.shape[:2] == (1, n_u)  # really narrowed
    assert n_p == n_u and abs(loss_p - loss_u) <= LOSS_RTOL * abs(loss_u)
    assert grads_u.keys() == grads_p.keys() and grads_u
    for name, grad in grads_u.items():
        assert (grads_p[name] - grad).abs().max().item() <= GRAD_RTOL * grad.abs().max().item() + 1e-12, name


def test_llama_ner_batches_padded_to_the_longest_row_or_a_multiple_give_the_original_loss():
    """llama_ner --group_by_length pads to the batch's longest row, --pad_to_multiple_of rounds that up (never past
    max_seq_length); the original pads to max_seq_length. Same targets, same loss and gradients."""
    from llama_ner.dataset import load_data

    model, pad_id, _, _, collate_fn = _llama()
    collate = collate_fn.__self__
    lines = load_data(os.path.join(REPO, "data", "llama_ner_msra", "instruct_data", "dev.txt"))[:40]
    lines = [line for line, (ids, _) in zip(lines, collate.rows(lines)) if len(ids) < 150][:4]
    longest = max(len(ids) for ids, _ in collate.rows(lines))
    original = collate_fn(lines)
    collate.pad_to_longest = True
    try:
        exact = collate_fn(lines)
        collate.pad_to_multiple_of = 16
        rounded = collate_fn(lines)
        collate.pad_to_multiple_of = 1000
        capped = collate_fn(lines)
    finally:
        collate.pad_to_longest, collate.pad_to_multiple_of = False, 1
    assert original["input_ids"].shape[1] == 192 and exact["input_ids"].shape[1] == longest < 192
    assert rounded["input_ids"].shape[1] == -(-longest // 16) * 16 > longest and capped["input_ids"].shape[1] == 192
    model.config.use_cache = False
    loss_o, n_o, grads_o = loss_and_grads(model.train(), original)
    for batch in (exact, rounded):
        loss, n, grads = loss_and_grads(model, batch)
        assert n == n_o and abs(loss - loss_o) <= LOSS_RTOL * abs(loss_o)
        for name, grad in grads_o.items():
            assert (grads[name] - grad).abs().max().item() <= GRAD_RTOL * grad.abs().max().item() + 1e-12, name
