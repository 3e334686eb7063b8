"""model_hub.convert_glm4_to_hf: the original glm-4-9b-chat layout → native GlmForCausalLM, checked against the
original code's logits, losses and greedy tokens (tests/golden/glm4_model), and P-tuning v2 with text positions
from 0 (model_hub.glm4.prefix_positions) against the original's peft prefix tuning."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from model_hub.convert_glm4_to_hf import convert, main
from tuning.errors import UserError, run_main
from model_hub.glm4.prefix_positions import number_text_from_zero


@pytest.fixture(scope="module")
def golden(golden_dir):
    folder = os.path.join(golden_dir, "glm4_model")
    with open(os.path.join(folder, "cases.json"), encoding="utf-8") as f:
        cases = {c["name"]: c for c in json.load(f)["cases"]}
    return folder, cases, load_file(os.path.join(folder, "logits.safetensors"))


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("glm4") / "native")
    convert(golden[0], out, max_shard_gb=0.01)  # small shards: exercises the index writer too
    return out


@pytest.fixture(scope="module")
def native(converted):
    from transformers import GlmForCausalLM

    return GlmForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


def compare(logits, logits_key, vectors, valid):
    probe = vectors["probe_ids"]
    assert (logits[..., probe] - vectors[f"{logits_key}.logits_probe"])[valid].abs().max() < 1e-4
    assert (logits.logsumexp(-1) - vectors[f"{logits_key}.logsumexp"])[valid].abs().max() < 1e-4
    assert torch.equal(logits.topk(5).indices[valid], vectors[f"{logits_key}.top5_ids"][valid])


def test_layout_and_files(converted):
    names = sorted(os.listdir(converted))
    assert "model.safetensors.index.json" in names and "config.json" in names and "tokenizer.json" in names
    with open(os.path.join(converted, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["model_type"] == "glm" and config["head_dim"] == 16 and config["num_key_value_heads"] == 2
    assert config["rope_parameters"]["rope_theta"] == 5_000_000 and config["hidden_size"] == 32


@pytest.mark.parametrize("name", ["chat_prompt", "train_batch", "left_padded_batch"])
def test_logits_and_loss_equal_the_original(golden, native, name):
    _, cases, vectors = golden
    case = cases[name]
    inputs = {k: torch.tensor(case[k]) for k in case["called_with"]}
    valid = torch.tensor(case["attention_mask"]).bool()
    with torch.no_grad():
        out = native(**inputs)
    compare(out.logits, case["logits_key"], vectors, valid)
    assert (out.logits[:, -1] - vectors[f"{name}.last_logits"]).abs().max() < 1e-4
    if "loss" in case:
        assert out.loss.item() == pytest.approx(case["loss"], abs=1e-5)
    if "no_position_ids_logits_key" in case:
        with torch.no_grad():
            plain = native(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        compare(plain, case["no_position_ids_logits_key"], vectors, valid)
    if "greedy_generate_8" in case:
        with torch.no_grad():
            tokens = native.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                     max_new_tokens=8, do_sample=False, eos_token_id=[151329, 151336, 151338],
                                     pad_token_id=151329)
        assert tokens.tolist() == case["greedy_generate_8"]


@pytest.fixture(scope="module")
def ptuned(golden, converted):
    from peft import PeftModel
    from transformers import GlmForCausalLM

    base = GlmForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, os.path.join(golden[0], "ptuning_adapter"))
    return number_text_from_zero(model)


@pytest.mark.parametrize("name", ["chat_prompt", "train_batch", "left_padded_batch"])
def test_ptuning_with_text_positions_from_zero_equals_the_original(golden, ptuned, name):
    _, cases, vectors = golden
    case = cases[name]
    inputs = {k: torch.tensor(case[k]) for k in case["called_with"] if k != "position_ids"}
    with torch.no_grad():
        out = ptuned(**inputs)
    compare(out.logits, case["ptuning_logits_key"], vectors, torch.tensor(case["attention_mask"]).bool())
    if "ptuning_loss" in case:
        assert out.loss.item() == pytest.approx(case["ptuning_loss"], abs=1e-5)
    if "ptuning_greedy_full_forward_8" in case:
        # cached generation with positions L, L+1, ... = re-running the whole text each step (the original's
        # own cached decode reused position 0 and matched only its first token: ptuning_greedy_generate_8)
        with torch.no_grad():
            tokens = ptuned.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                     max_new_tokens=8, do_sample=False, eos_token_id=[151329, 151336, 151338],
                                     pad_token_id=151329)
        assert tokens.tolist() == case["ptuning_greedy_full_forward_8"]
        assert tokens.tolist() != case["ptuning_greedy_generate_8"]


def test_peft_alone_numbers_the_text_after_the_prefix(golden, converted):
    """Why the fix exists: peft 0.21 + native GLM put the text at positions n… and the logits move by whole units."""
    from peft import PeftModel
    from transformers import GlmForCausalLM

    _, cases, vectors = golden
    base = GlmForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, os.path.join(golden[0], "ptuning_adapter"))
    case = cases["chat_prompt"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(case["input_ids"])).logits
    assert (logits[..., vectors["probe_ids"]] - vectors["chat_prompt.ptuning.logits_probe"]).abs().max() > 1


def test_bin_shards_with_index_convert_to_the_same_tensors(golden, converted, tmp_path):
    source = tmp_path / "orig_bin"
    source.mkdir()
    state = load_file(os.path.join(golden[0], "model.safetensors"))
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in halves.items():
        torch.save({k: state[k] for k in keys}, source / shard)
    (source / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}))
    (source / "config.json").write_text(open(os.path.join(golden[0], "config.json"), encoding="utf-8").read())
    out = str(tmp_path / "native_from_bin")
    convert(str(source), out, with_tokenizer=False)
    from_bin = load_file(os.path.join(out, "model.safetensors"))
    index = json.load(open(os.path.join(converted, "model.safetensors.index.json"), encoding="utf-8"))
    from_safetensors = {}
    for shard in set(index["weight_map"].values()):
        from_safetensors.update(load_file(os.path.join(converted, shard)))
    assert sorted(from_bin) == sorted(from_safetensors)
    assert all(torch.equal(from_bin[k], from_safetensors[k]) for k in from_bin)


def test_bad_checkpoints_are_one_line_errors(golden, tmp_path, capsys, monkeypatch):
    source = tmp_path / "bad"
    source.mkdir()
    (source / "config.json").write_text(open(os.path.join(golden[0], "config.json"), encoding="utf-8").read())
    with pytest.raises(UserError, match="no weights found"):
        convert(str(source), str(tmp_path / "out"), with_tokenizer=False)
    state = load_file(os.path.join(golden[0], "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if "layers.1.mlp" not in k}, str(source / "model.safetensors"))
    with pytest.raises(UserError, match="incomplete: 2 native tensors missing"):
        convert(str(source), str(tmp_path / "out"), with_tokenizer=False)
    assert not (tmp_path / "out").exists()  # nothing half-written
    save_file({**state, "transformer.extra.weight": torch.zeros(1)}, str(source / "model.safetensors"))
    with pytest.raises(UserError, match="transformer.extra.weight: unexpected tensor"):
        convert(str(source), str(tmp_path / "out"), with_tokenizer=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["convert_glm4_to_hf.py", golden[0], str(tmp_path / "busy")])
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {tmp_path / 'busy'}: already exists and is not empty "
                                                    "(use --force to replace it)"]
