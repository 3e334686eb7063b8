"""--lm_head_on_labels_only (tuning/labelled_logits.py): the LM head and loss computed only at trained positions give
the loss and gradients of the full computation (fp32, tiny LLaMA with the real Chinese-Alpaca vocabulary, LoRA as
llama_ner and full fine-tuning), and calls without labels are untouched."""
import os
from types import SimpleNamespace

import pytest
import torch

from tuning.labelled_logits import compute_logits_only_at_labels
from tuning.methods import apply_lora
from conftest import REPO



@pytest.fixture(scope="module")
def ner_batch():
    from llama_ner.dataset import NerCollate, load_data
    from model_hub.loader import load_tokenizer

    tokenizer = load_tokenizer("tiny:chinese-alpaca-7b")
    args = SimpleNamespace(instruct_column="instruct", query_column="query", response_column="answer",
                           max_seq_length=192)
    lines = load_data(os.path.join(REPO, "data", "llama_ner_msra", "instruct_data", "dev.txt"))[:4]
    return NerCollate(args, tokenizer).collate_fn(lines)


def fresh_model(lora: bool):
    from model_hub.loader import load_model_and_tokenizer
    from model_hub.registry import get_family

    LORA_TARGETS = get_family("llama").lora_targets

    model, _ = load_model_and_tokenizer("tiny:chinese-alpaca-7b", dtype="fp32")
    model.config.use_cache = False
    if lora:
        torch.manual_seed(0)
        model = apply_lora(model, LORA_TARGETS, r=8, alpha=32, dropout=0.0)
        with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    return model


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad()
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_same_loss_and_gradients_as_the_full_lm_head(ner_batch, lora):
    model = fresh_model(lora)
    n_items = (ner_batch["labels"][:, 1:] != -100).sum()
    reductions = ({}, {"num_items_in_batch": n_items})  # the token mean, and the Trainer's sum / items
    full = [loss_and_grads(model, ner_batch, **kwargs) for kwargs in reductions]
    narrow = compute_logits_only_at_labels(model)
    for kwargs, (full_loss, full_grads) in zip(reductions, full):
        loss, grads = loss_and_grads(narrow, ner_batch, **kwargs)
        assert abs(loss - full_loss) <= 1e-5 * abs(full_loss)
        assert grads.keys() == full_grads.keys() and grads
        for name, grad in full_grads.items():
            assert (grads[name] - grad).abs().max().item() <= 1e-5 * grad.abs().max().item() + 1e-12, name
    with torch.no_grad():
        assert narrow(**ner_batch).logits.shape[:2] == (1, int(n_items))  # really narrowed


def test_calls_without_labels_are_untouched(ner_batch):
    model = fresh_model(lora=True).eval()
    ids = ner_batch["input_ids"][:2, :40]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        after = compute_logits_only_at_labels(model)(input_ids=ids).logits
    assert torch.equal(before, after)
