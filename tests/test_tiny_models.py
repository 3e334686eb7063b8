"""Every tiny model builds from its real config and tokenizer, loads offline through the Auto classes,
runs a forward pass on real text, and trains LoRA: the loss is finite, LoRA weights move, the base does not."""
import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import model_hub  # noqa: F401  (registers our classes)
from model_hub.loader import load_model_and_tokenizer, pick_dtype
from model_hub.make_tiny import build_tiny, tiny_dir
from model_hub.registry import MODELS
from tuning.errors import UserError

def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


TEXT = "你好，请把这句话翻译成英文：白日依山尽，黄河入海流。\nHello world"


@pytest.mark.parametrize("name", list(MODELS))
def test_tiny_model_loads_and_trains_lora(name):
    path = tiny_dir(name)
    spec = MODELS[name]
    config, real = (_read_json(os.path.join(d, "config.json")) for d in (path, model_hub.tokenizer_files(spec.files)))
    assert config["vocab_size"] == (real.get("padded_vocab_size") or real["vocab_size"])  # the real vocab, unshrunk

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = tokenizer([TEXT], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == config["vocab_size"] and torch.isfinite(logits).all()

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                                   target_modules=list(spec.lora_targets)))
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(peft_model.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trainable.items() if "lora_B" in n)
    assert all(torch.equal(params[n], before) for n, before in frozen.items())


def test_same_seed_builds_identical_weights(tmp_path):
    from safetensors.torch import load_file

    a = load_file(os.path.join(build_tiny("llama-7b", str(tmp_path / "a")), "model.safetensors"))
    b = load_file(os.path.join(tiny_dir("llama-7b"), "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loader_resolves_tiny_names_and_picks_dtypes():
    model, tokenizer = load_model_and_tokenizer("tiny:chinese-alpaca-7b", dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16 and tokenizer.pad_token_id == 49953
    assert pick_dtype(None, torch.device("cpu")) == torch.float32
    with pytest.raises(UserError, match="fp16 on CPU"):
        pick_dtype("fp16", torch.device("cpu"))
    with pytest.raises(UserError, match="model folder not found"):
        load_model_and_tokenizer("/nonexistent/model")
    with pytest.raises(UserError, match="unknown tiny model"):
        load_model_and_tokenizer("tiny:gpt-5")
