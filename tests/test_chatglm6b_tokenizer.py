"""ChatGLMTokenizer against the ORIGINAL's golden vectors (tests/golden/chatglm6b_tokenizer) and on transformers 5's
batch encode / pad / save / reload paths."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import model_hub
from model_hub.chatglm6b import ChatGLMTokenizer

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "chatglm6b_tokenizer",
                      "chatglm6b_tokenizer.json")
with open(GOLDEN, encoding="utf-8") as _f:
    GOLD = json.load(_f)
STRINGS = {repr(s["text"])[1:-1][:40] or "<empty>": s for s in GOLD["strings"]}
FILES = model_hub.tokenizer_files("chatglm-6b")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(FILES)


def test_auto_tokenizer_gives_ours(tokenizer):
    assert isinstance(tokenizer, ChatGLMTokenizer)
    assert tokenizer.padding_side == "left"
    assert tokenizer.vocab_size == len(tokenizer) == 130344
    special = GOLD["special"]
    assert (tokenizer.gmask_token_id, tokenizer.mask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id, tokenizer.unk_token_id) == (special["gmask"], special["mask"], special["sop_bos"],
                                                                special["eop_eos"], special["pad"], special["unk"])


@pytest.mark.parametrize("name", list(STRINGS))
def test_string(tokenizer, name):
    case = STRINGS[name]
    text = case["text"]
    assert tokenizer.tokenize(text) == case["tokens"]
    assert tokenizer.encode(text) == case["ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == case["ids_no_special"]
    assert tokenizer.decode(case["ids"]) == case["decode"]
    assert tokenizer.decode(case["ids_no_special"]) == case["decode_no_special"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decode_skip_special"]


@pytest.mark.parametrize("index", range(len(GOLD["build_inputs_with_special_tokens"])))
def test_build_inputs_with_special_tokens(tokenizer, index):
    case = GOLD["build_inputs_with_special_tokens"][index]
    assert tokenizer.encode(case["a"], add_special_tokens=False) == case["ids_a"]
    assert tokenizer.encode(case["b"], add_special_tokens=False) == case["ids_b"]
    assert tokenizer.build_inputs_with_special_tokens(case["ids_a"]) == case["single"]
    assert tokenizer.build_inputs_with_special_tokens(case["ids_a"], case["ids_b"]) == case["pair"]
    assert tokenizer(case["a"], case["b"])["input_ids"] == case["tokenizer_call_pair"]


@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
def test_batch_padding(tokenizer, return_tensors):
    case = GOLD["batch_padding"]
    batch = tokenizer(case["texts"], padding=True, return_tensors=return_tensors)
    assert set(batch) == {"input_ids", "attention_mask", "position_ids"}
    assert np.asarray(batch["input_ids"]).tolist() == case["input_ids"]
    assert np.asarray(batch["attention_mask"]).dtype == np.bool_
    assert np.asarray(batch["attention_mask"]).tolist() == case["attention_mask"]
    assert np.asarray(batch["position_ids"]).tolist() == case["position_ids"]
    if return_tensors == "pt":
        assert batch["attention_mask"].shape == (2, 1, 9, 9) and batch["attention_mask"].dtype == torch.bool
        assert batch["position_ids"].shape == (2, 2, 9) and batch["position_ids"].dtype == torch.long


def test_padding_side_argument_and_max_length(tokenizer):
    batch = tokenizer(["你好"], padding="max_length", max_length=6, padding_side="left", return_tensors="pt")
    assert batch["input_ids"].tolist() == [[3, 3, 5, 74874, 130001, 130004]]
    assert batch["position_ids"].tolist() == [[[0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 1]]]
    assert batch["attention_mask"][0, 0].tolist()[-1] == [True, True, False, False, False, False]
    with pytest.raises(ValueError, match="left only"):
        tokenizer(["你好", "a b c"], padding=True, padding_side="right")


def test_no_padding_returns_ids_only(tokenizer):
    """As the original: without a padding length no mask or positions are built (the model builds them)."""
    assert dict(tokenizer("你好")) == {"input_ids": [5, 74874, 130001, 130004]}
    assert tokenizer(["你好"], return_tensors="pt")["input_ids"].tolist() == [[5, 74874, 130001, 130004]]


def test_tokenizer_pad_prefers_mask_over_gmask(tokenizer):
    """The original `_pad` takes [MASK] if present, else [gMASK] (the model prefers [gMASK])."""
    ids = [5, 130000, 7, 130001, 130004]
    batch = tokenizer.pad({"input_ids": [ids]}, padding=True)
    assert np.asarray(batch["position_ids"]).tolist() == [[[0, 1, 2, 3, 1], [0, 0, 0, 0, 1]]]


def test_whitespace_around_special_tokens_is_stripped(tokenizer):
    # transformers 4.27 stripped both sides of a special token found in the text.
    assert tokenizer.encode("你好  <sop>  再见", add_special_tokens=False) == (
        tokenizer.encode("你好", add_special_tokens=False) + [130004]
        + tokenizer.encode("再见", add_special_tokens=False))


def test_long_blank_runs(tokenizer):
    assert tokenizer.encode("a" + " " * 85 + "b", add_special_tokens=False) == [104, 130087, 130012, 178]
    text = "x" + " " * 161 + "y"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_text_without_dummy_prefix(tokenizer):
    assert tokenizer.encode_text("你好") == [5, 74874]
    assert tokenizer.encode_text("你好", add_dummy_prefix=False) == [74874]


def test_image_token_offset():
    """The first checkpoint's layout: 20000 image tokens before the text ids."""
    tokenizer = ChatGLMTokenizer(os.path.join(FILES, "ice_text.model"), num_image_tokens=20000)
    ids = tokenizer.encode("你好")
    assert ids == [20005, 94874, 150001, 150004]
    assert tokenizer.pad_token_id == 20003
    assert tokenizer.decode([17] + ids) == "你好"


def test_out_of_vocabulary_embedding_rows_decode(tokenizer):
    # Rows 130344-130527 of the embedding are padding; a random model can emit them.
    assert tokenizer.decode([5, 74874, 130400]) == "你好 ⁇ "


def test_save_and_reload_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "ice_text.model").is_file()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(reloaded, ChatGLMTokenizer)
    assert reloaded.all_special_tokens == tokenizer.all_special_tokens
    assert (reloaded.gmask_token, reloaded.end_token) == ("[gMASK]", "</s>")
    for case in GOLD["strings"]:
        assert reloaded.encode(case["text"]) == case["ids"]
        assert reloaded.decode(case["ids"]) == case["decode"]
