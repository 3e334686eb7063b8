"""Loading ChatGLM-6B with the Auto classes and trust_remote_code left off: our own saved folders, the unmodified
THUDM layout (auto_map config, original state-dict names, sharded fp16 `.bin`), and what must be refused."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

import model_hub
from model_hub.chatglm6b import (ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer, TINY_SIZES,
                                 tiny_config)

FILES = model_hub.tokenizer_files("chatglm-6b")
GOLDEN_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "chatglm6b_model")
IDS = torch.tensor([[5, 74874, 64286, 12, 130001, 130004, 5, 74874]])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ChatGLMForConditionalGeneration(tiny_config()).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tiny_config_shrinks_the_real_config():
    with open(os.path.join(FILES, "config.json"), encoding="utf-8") as f:
        real = json.load(f)
    config = tiny_config(num_layers=3)
    assert (config.hidden_size, config.num_attention_heads, config.inner_hidden_size, config.num_layers) == (
        TINY_SIZES["hidden_size"], TINY_SIZES["num_attention_heads"], TINY_SIZES["inner_hidden_size"], 3)
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id",
                "position_encoding_2d", "layernorm_epsilon", "max_sequence_length"):
        assert getattr(config, key) == real[key], key
    assert config.dtype == torch.float32


def test_auto_classes_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    ChatGLMTokenizer.from_pretrained(FILES).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ChatGLMConfig)
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path), ChatGLMTokenizer)
    for auto in (AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(tmp_path).eval()
        assert type(model) is ChatGLMForConditionalGeneration  # AutoModel gives the LM head, as the original's
        assert model.lm_head.weight is model.transformer.word_embeddings.weight
        assert torch.equal(logits(model), logits(tiny))


def write_thudm_folder(model, folder):
    """The unmodified THUDM/chatglm-6b layout: its config.json (auto_map, torch_dtype float16; sizes shrunk), its
    tokenizer files, and fp16 weights under the original names in sharded .bin files with an index."""
    os.makedirs(folder)
    with open(os.path.join(FILES, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.update(TINY_SIZES)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer_config.json", "ice_text.model"):
        shutil.copy(os.path.join(FILES, name), folder)
    state = {k: v.detach().clone().half() for k, v in model.state_dict().items()}
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    inv_freq = (1.0 / 10000 ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))).half()
    for i in range(model.config.num_layers):
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
    names = sorted(state)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for number, keys in enumerate(shards, 1):
        filename = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in keys}, os.path.join(folder, filename))
        weight_map.update(dict.fromkeys(keys, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return state


def test_unmodified_thudm_folder_loads_without_remote_code(tiny, tmp_path):
    folder = tmp_path / "chatglm-6b"
    state = write_thudm_folder(tiny, folder)
    assert "auto_map" in AutoConfig.from_pretrained(folder).to_dict()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, ChatGLMTokenizer) and tokenizer.encode("你好") == [5, 74874, 130001, 130004]

    reference = ChatGLMForConditionalGeneration(tiny.config)
    reference.load_state_dict({k: v.float() for k, v in state.items() if "inv_freq" not in k})
    for auto in (AutoModel, AutoModelForCausalLM):
        model, info = auto.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        assert type(model) is ChatGLMForConditionalGeneration
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert model.lm_head.weight is model.transformer.word_embeddings.weight
        assert torch.equal(logits(model.eval()), logits(reference.eval()))
        batch = tokenizer(["你好", "Hello world"], padding=True, return_tensors="pt")
        assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape == (2, batch["input_ids"].shape[1] + 2)


def test_golden_safetensors_with_original_names_load_cleanly():
    _, info = ChatGLMForConditionalGeneration.from_pretrained(GOLDEN_MODEL, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


class CodeRunningPickle:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("auto", [AutoModel, AutoModelForCausalLM], ids=["AutoModel", "AutoModelForCausalLM"])
def test_bin_that_would_run_code_is_refused(tmp_path, auto):
    tiny_config().save_pretrained(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"transformer.word_embeddings.weight": torch.zeros(2), "payload": CodeRunningPickle(str(marker))},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        auto.from_pretrained(tmp_path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only=True only"):
        auto.from_pretrained(tmp_path, weights_only=False)
    assert not marker.exists()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_checkpoints_get_a_clear_error(tmp_path, bits):
    tiny_config(quantization_bit=bits).save_pretrained(tmp_path)
    save_file({"transformer.word_embeddings.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(NotImplementedError, match="bitsandbytes") as error:
        AutoModel.from_pretrained(tmp_path)
    assert f"quantization_bit={bits}" in str(error.value) and "load_in_8bit" in str(error.value)
    with pytest.raises(NotImplementedError, match="bitsandbytes"):
        ChatGLMForConditionalGeneration(tiny_config(quantization_bit=bits))
