"""Our ChatGLM-6B against the ORIGINAL's golden vectors (tests/golden/chatglm6b_model): masks, positions, logits,
losses and greedy generations, plain and with the P-tuning v2 prefix."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import model_hub  # noqa: F401  (registers the chatglm classes)
from model_hub.chatglm6b import ChatGLMForConditionalGeneration, ChatGLMTokenizer

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "chatglm6b_model")
with open(os.path.join(GOLDEN, "cases.json"), encoding="utf-8") as _f:
    GOLD = json.load(_f)
CASES = {case["name"]: case for case in GOLD["cases"]}
GENERATION_CASES = [name for name, case in CASES.items() if "greedy_generate_8" in case]
VARIANTS = ["plain", "ptuning"]


@pytest.fixture(scope="module")
def models():
    plain = ChatGLMForConditionalGeneration.from_pretrained(GOLDEN, dtype=torch.float32).eval()
    ptuning = ChatGLMForConditionalGeneration.from_pretrained(
        GOLDEN, dtype=torch.float32, pre_seq_len=GOLD["pre_seq_len"], prefix_projection=GOLD["prefix_projection"])
    missing, unexpected = ptuning.load_state_dict(load_file(os.path.join(GOLDEN, "ptuning_prefix_encoder.safetensors")),
                                                  strict=False)
    assert not unexpected and all("prefix_encoder" not in key for key in missing)
    return {"plain": plain, "ptuning": ptuning.eval()}


@pytest.fixture(scope="module")
def gold_logits():
    return load_file(os.path.join(GOLDEN, "logits.safetensors"))


def model_inputs(case):
    inputs = {"input_ids": torch.tensor(case["input_ids"])}
    if "attention_mask" in case:  # the left-padded batch comes with the tokenizer's mask and positions
        inputs["attention_mask"] = torch.tensor(case["attention_mask"])
        inputs["position_ids"] = torch.tensor(case["position_ids"])
    return inputs


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if "attention_mask_built_by_model" in c])
def test_masks_and_positions_built_by_model(models, name):
    case = CASES[name]
    ids = torch.tensor(case["input_ids"])
    model = models["plain"]
    assert model.get_masks(ids).tolist() == case["attention_mask_built_by_model"]
    assert model.get_position_ids(ids).tolist() == case["position_ids_built_by_model"]


def test_left_padding_built_by_tokenizer():
    """The golden batch was padded by the original `_pad` with the tiny special ids; ours must pad it the same."""
    case = CASES["left_padded_batch"]
    special = GOLD["special_ids"]

    class TinyIdsTokenizer(ChatGLMTokenizer):
        bos_token_id = special["sop_bos"]
        mask_token_id = special["mask"]
        gmask_token_id = special["gmask"]
        pad_token_id = special["pad"]

    tokenizer = TinyIdsTokenizer.from_pretrained(model_hub.tokenizer_files("chatglm-6b"))
    batch = tokenizer.pad({"input_ids": case["unpadded_prompts"]}, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == case["input_ids"]
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].tolist() == case["attention_mask"]
    assert batch["position_ids"].tolist() == case["position_ids"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(CASES))
def test_logits(models, gold_logits, name, variant):
    case = CASES[name]
    with torch.no_grad():
        logits = models[variant](**model_inputs(case)).logits
    expected = gold_logits[case["logits_key" if variant == "plain" else "ptuning_logits_key"]]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_loss(models, variant):
    case = CASES["train_batch"]
    with torch.no_grad():
        loss = models[variant](input_ids=torch.tensor(case["input_ids"]), labels=torch.tensor(case["labels"])).loss
    expected = case["loss" if variant == "plain" else "ptuning_loss"]
    assert abs(loss.item() - expected) <= 1e-5


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", GENERATION_CASES)
def test_greedy_generation(models, name, variant, use_cache):
    case = CASES[name]
    out = models[variant].generate(**model_inputs(case), max_new_tokens=8, do_sample=False, num_beams=1,
                                   use_cache=use_cache)
    assert out.tolist() == case["greedy_generate_8" if variant == "plain" else "ptuning_greedy_generate_8"]


def test_residual_alpha_ignores_num_layers(models):
    """The original's GLMBlock always uses its default num_layers=28 for alpha, also in these 2-layer models."""
    from model_hub.chatglm6b.modeling import RESIDUAL_ALPHA

    assert models["plain"].config.num_layers == 2
    assert RESIDUAL_ALPHA == pytest.approx(56 ** 0.5)


def test_lm_head_tied(models):
    model = models["plain"]
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_ptuning_freezes_base(models):
    trainable = [n for n, p in models["ptuning"].named_parameters() if p.requires_grad]
    assert trainable == ["transformer.prefix_encoder.embedding.weight"]


def test_one_dimensional_positions():
    """position_encoding_2d=False (no released checkpoint uses it): a [gMASK] prompt keeps counting, a [MASK]
    prompt repeats the mask position; a cached decoding step uses the mask position (as the original)."""
    from model_hub.chatglm6b import tiny_config
    from model_hub.chatglm6b.masks import build_position_ids, next_position_ids

    config = tiny_config(position_encoding_2d=False)
    gmask = torch.tensor([[5, 74874, 130001, 130004, 9]])
    mask = torch.tensor([[5, 130000, 7, 130004, 9]])
    assert build_position_ids(gmask, config).tolist() == [[0, 1, 2, 3, 4]]
    assert build_position_ids(mask, config).tolist() == [[0, 1, 2, 1, 1]]
    assert next_position_ids(gmask, config).tolist() == [[2]]
    model = ChatGLMForConditionalGeneration(config).eval()
    assert model.generate(input_ids=gmask, max_new_tokens=2, do_sample=False).shape == (1, 7)
