"""Training our ChatGLM-6B on a tiny random model: LoRA (default target query_key_value) and P-tuning v2,
gradient checkpointing with enable_input_require_grads, bf16 on CPU."""
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import model_hub  # noqa: F401
from model_hub.chatglm6b import ChatGLMForConditionalGeneration, tiny_config

GMASK, SOP, EOP, PAD = 130001, 130004, 130005, 3


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ChatGLMForConditionalGeneration(tiny_config(**overrides))


def chatglm_tuning_batch():
    """Rows as ChatGLM-Tuning builds them: prompt + [gMASK, <sop>] + answer + [<eop>], right-padded, labels from <sop>."""
    rows = [[5, 74874, 64286, 12, GMASK, SOP, 5, 74874, 35, EOP], [19316, 398, GMASK, SOP, 932, EOP]]
    longest = max(map(len, rows))
    ids, labels = [], []
    for row in rows:
        context = row.index(SOP)
        ids.append(row + [PAD] * (longest - len(row)))
        labels.append([-100] * context + row[context:] + [-100] * (longest - len(row)))
    return torch.tensor(ids), torch.tensor(labels)


def train_steps(model, steps=3, lr=1e-2):
    ids, labels = chatglm_tuning_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def snapshot(model, trainable):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


def test_lora_trains_saves_and_reloads(tmp_path):
    base = make_model()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0))
    assert model.peft_config["default"].target_modules == {"query_key_value"}
    trainable = snapshot(model, True)
    frozen = snapshot(model, False)
    assert trainable and all("lora_" in n for n in trainable)

    losses = train_steps(model)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if "lora_B" in n)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    ids, _ = chatglm_tuning_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_lora_generate_on_left_padded_batch():
    model = get_peft_model(make_model(), LoraConfig(task_type="CAUSAL_LM", r=4)).eval()
    tokenizer = model_hub.chatglm6b.ChatGLMTokenizer.from_pretrained(model_hub.tokenizer_files("chatglm-6b"))
    batch = tokenizer(["你好", "Instruction: Say hi\nAnswer: "], padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, :batch["input_ids"].shape[1]], batch["input_ids"])


def lora_grads(checkpointing: bool):
    model = make_model()
    if checkpointing:
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.0))
    model.train()
    ids, labels = chatglm_tuning_batch()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    layers = model.base_model.model.transformer.layers
    assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients():
    loss, grads = lora_grads(False)
    loss_gc, grads_gc = lora_grads(True)
    assert loss_gc == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_gc.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_gc[name], atol=1e-7), name


@pytest.mark.parametrize("prefix_projection", [False, True], ids=["embedding", "projection"])
def test_ptuning_trains_only_the_prefix_encoder(prefix_projection):
    model = make_model(pre_seq_len=4, prefix_projection=prefix_projection)
    trainable = snapshot(model, True)
    frozen = snapshot(model, False)
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    assert "lm_head.weight" in frozen or model.lm_head.weight is model.transformer.word_embeddings.weight
    losses = train_steps(model, steps=2)
    assert all(math.isfinite(x) for x in losses)
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_ptuning_from_pretrained_base_keeps_the_base_frozen(tmp_path):
    make_model().save_pretrained(tmp_path)
    model = ChatGLMForConditionalGeneration.from_pretrained(tmp_path, pre_seq_len=4, prefix_projection=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)


def test_ptuning_with_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        model = make_model(pre_seq_len=4)
        model.transformer.dropout.p = 0.0
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        ids, labels = chatglm_tuning_batch()
        model(input_ids=ids, labels=labels).loss.backward()
        grads.append(model.transformer.prefix_encoder.embedding.weight.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_bf16_lora_step_and_generate():
    model = get_peft_model(make_model().to(torch.bfloat16), LoraConfig(task_type="CAUSAL_LM", r=4))
    losses = train_steps(model, steps=2, lr=1e-3)
    assert all(math.isfinite(x) for x in losses)
    model.eval()
    ids = torch.tensor([[5, 74874, GMASK, SOP]])
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 7)
