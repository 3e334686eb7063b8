"""--prefetch_dropout_masks (tuning/dropout_masks.py): LoRA dropout masks drawn on a helper thread give the same
masks, losses, gradients, trained weights and generator state as ordinary dropout, bit for bit; refused where that
could not hold."""
import copy

import pytest
import torch

from model_hub.registry import get_family

LORA_TARGETS, LORA_DROPOUT = get_family("llama").lora_targets, get_family("llama").lora_dropout
from tuning.dropout_masks import PrefetchedDropout, prefetch_dropout_masks, refuse_off_cpu
from tuning.errors import UserError
from tuning.methods import apply_lora

# (batch, length) per step: new shapes after the first (recorded) forward, and a repeated one
SHAPES = [(4, 37), (4, 37), (2, 50), (3, 21), (4, 37)]


@pytest.fixture(scope="module")
def lora_model():
    from model_hub.loader import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny:chinese-alpaca-7b", dtype="fp32")
    model.config.use_cache = False
    torch.manual_seed(0)
    return apply_lora(model, LORA_TARGETS, r=8, alpha=32, dropout=LORA_DROPOUT)


def train(model, bf16: bool):
    """Steps over SHAPES from a fixed generator state; losses, LoRA weights and the generator state after."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(1)
    torch.manual_seed(42)
    losses = []
    for batch, length in SHAPES:
        ids = torch.randint(3, 40000, (batch, length), generator=data)
        labels = ids.clone()
        labels[:, : length // 2] = -100
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, lora, torch.get_rng_state()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_masks_drawn_ahead_train_bit_identically(lora_model, bf16):
    plain = copy.deepcopy(lora_model)
    ahead = copy.deepcopy(lora_model)
    layers = ahead.get_base_model().config.num_hidden_layers
    assert prefetch_dropout_masks(ahead) == len(LORA_TARGETS) * layers
    assert sum(isinstance(m, PrefetchedDropout) for m in ahead.modules()) == len(LORA_TARGETS) * layers

    losses, weights, rng = train(plain, bf16)
    losses_ahead, weights_ahead, rng_ahead = train(ahead, bf16)
    assert losses_ahead == losses and len(set(losses)) == len(losses)
    assert weights.keys() == weights_ahead.keys() and weights
    for name, value in weights.items():
        assert torch.equal(weights_ahead[name], value), name
    assert torch.equal(rng_ahead, rng)  # the generator moved exactly as far
    plan = next(m.plan for m in ahead.modules() if isinstance(m, PrefetchedDropout))
    assert plan.calls is not None and len(plan.calls) == len(LORA_TARGETS) * layers  # later steps drew ahead


def test_evaluation_is_untouched(lora_model):
    ahead = copy.deepcopy(lora_model)
    prefetch_dropout_masks(ahead)
    ids = torch.randint(3, 40000, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ahead.eval()(input_ids=ids).logits, lora_model.eval()(input_ids=ids).logits)


def test_refused_where_the_masks_would_differ(lora_model):
    with pytest.raises(UserError, match="prefetch_dropout_masks: is for CPU training"):
        refuse_off_cpu("cuda")  # what the recipes check before loading anything, and the model's device here
    refuse_off_cpu("cpu")

    checkpointed = copy.deepcopy(lora_model)
    checkpointed.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    with pytest.raises(UserError, match="gradient checkpointing"):
        prefetch_dropout_masks(checkpointed)

    attention_dropout = copy.deepcopy(lora_model)
    attention_dropout.get_base_model().config.attention_dropout = 0.1
    with pytest.raises(UserError, match=r"attention_dropout=0\.1"):
        prefetch_dropout_masks(attention_dropout)

    other_dropout = copy.deepcopy(lora_model)
    other_dropout.get_base_model().model.layers[0].extra = torch.nn.Dropout(0.2)
    with pytest.raises(UserError, match=r"a dropout of its own .*layers\.0\.extra"):
        prefetch_dropout_masks(other_dropout)
