"""LLaMA / Chinese-LLaMA / Chinese-Alpaca tokenizers against the golden vectors of the original
(transformers 4.28.1 slow LlamaTokenizer): tests/golden/llama/*.json."""
import json
import os
import pickle
import sys
from functools import lru_cache

import pytest
import torch

import model_hub
from model_hub.llama.tokenizer import LlamaSentencePieceTokenizer, load_llama_tokenizer
from model_hub.loader import tokenizer_from_folder as load_tokenizer
from transformers import AutoTokenizer

from plain_transformers import run_plain_probe

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "llama")
# golden file -> vendored folder
FILES = {"llama_original": "llama-7b", "chinese_llama_7b": "chinese-llama-7b",
         "chinese_alpaca_7b": "chinese-alpaca-7b"}
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response: ")


@lru_cache(maxsize=None)
def golden(name):
    with open(os.path.join(GOLDEN, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def load(name, with_golden_pad=True):
    """The tokenizer as the golden process had it: AutoTokenizer, plus `[PAD]` where pad_note says it was added."""
    tok = AutoTokenizer.from_pretrained(model_hub.tokenizer_files(FILES[name]))
    if with_golden_pad and golden(name)["pad_note"]:
        tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


@lru_cache(maxsize=None)
def shared(name):
    return load(name)


STRING_CASES = [pytest.param(name, i, id=f"{name}-{i}-{s['text'][:24]!r}")
                for name in FILES for i, s in enumerate(golden(name)["strings"])]


@pytest.mark.parametrize("name,index", STRING_CASES)
def test_golden_string(name, index):
    tok, case = shared(name), golden(name)["strings"][index]
    text = case["text"]
    assert tok.tokenize(text) == case["tokens"]
    assert tok(text).input_ids == case["ids_with_bos"]
    assert tok.encode(text) == case["ids_with_bos"]
    assert tok(text, add_special_tokens=False).input_ids == case["ids_without_bos"]
    assert tok.decode(case["ids_with_bos"]) == case["decode_with_bos"]
    assert tok.decode(case["ids_with_bos"], skip_special_tokens=True) == case["decode_with_bos_skip_special"]
    assert tok.decode(case["ids_without_bos"]) == case["decode_without_bos"]


@pytest.mark.parametrize("name", FILES)
def test_header(name):
    tok, g = shared(name), golden(name)
    assert type(tok) is LlamaSentencePieceTokenizer
    assert (tok.vocab_size, len(tok)) == (g["vocab_size"], g["len_tokenizer"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == \
        (g["bos_token_id"], g["eos_token_id"], g["unk_token_id"], g["pad_token_id"])
    assert tok.padding_side == "right"


def test_pad_tokens_as_shipped():
    # llama-7b and Chinese-LLaMA ship without a pad token; Chinese-Alpaca's [PAD] is the real piece 49953.
    assert load("llama_original", with_golden_pad=False).pad_token is None
    assert load("chinese_llama_7b", with_golden_pad=False).pad_token is None
    alpaca = load("chinese_alpaca_7b", with_golden_pad=False)
    assert (alpaca.pad_token, alpaca.pad_token_id, len(alpaca)) == ("[PAD]", 49953, 49954)
    with pytest.raises(ValueError):
        load("llama_original", with_golden_pad=False)(["a", "b c"], padding=True)


def _ner_instruction(row):
    if isinstance(row, str):
        row = json.loads(row)
    query = row.get("query")
    return row["instruct"] + ("\n" + query if query else ""), row["answer"]


@pytest.mark.parametrize("name", FILES)
def test_ner_collate_ids(name):
    """Prompt and "<s>{answer}</s>" tokenised without special tokens: the <s>/</s> text becomes ids 1/2 and the
    answer gets the dummy-prefix "▁" (the NerCollate input_ids and labels of the original repo)."""
    tok = shared(name)
    for batch in golden(name)["ner_collate"]:
        n = batch["max_seq_length"]
        for row, want_ids, want_labels, n_real in zip(batch["rows"], batch["input_ids"], batch["labels"],
                                                      batch["n_non_pad"]):
            instruction, answer = _ner_instruction(row)
            src = tok(PROMPT.format(instruction=instruction), add_special_tokens=False).input_ids
            tgt = tok("<s>" + answer + "</s>", add_special_tokens=False).input_ids
            assert tgt[0] == 1 and tgt[-1] == 2 and tok.convert_ids_to_tokens(tgt[1]).startswith("▁")
            ids, labels = (src + tgt)[:n], ([-100] * len(src) + tgt)[:n]
            assert len(ids) == n_real
            assert ids + [tok.pad_token_id] * (n - len(ids)) == want_ids
            assert labels + [-100] * (n - len(labels)) == want_labels


@pytest.mark.parametrize("name", FILES)
def test_predict_decoding(name):
    tok = shared(name)
    for case in golden(name)["test_predict_decoding"]:
        preds, labels = [], []
        for pred, label in zip(case["argmax_ids"], case["labels"]):
            pred, label = pred[:-1], label[1:]
            preds.append([p if lab != -100 else tok.pad_token_id for p, lab in zip(pred, label)])
            labels.append([lab if lab != -100 else tok.pad_token_id for lab in label])
        assert tok.batch_decode(preds, skip_special_tokens=True) == case["decoded_preds"]
        assert tok.batch_decode(torch.tensor(labels), skip_special_tokens=True) == case["decoded_labels"]


@pytest.mark.parametrize("name", FILES)
def test_chat_ner_prompts(name):
    tok = shared(name)
    for case in golden(name)["chat_ner_prompts"]:
        assert tok(case["prompt"]).input_ids == case["input_ids"]


def test_whitespace_next_to_special_token_text():
    # transformers 4.28: llama-7b's special tokens are AddedTokens without strip flags, so the space before "<s>"
    # stays (29871); the Chinese models declare them as plain strings in special_tokens_map.json, and plain-string
    # special tokens strip the whitespace on both sides.
    text = "Response: <s> answer</s>"
    assert shared("llama_original")(text, add_special_tokens=False).input_ids == \
        [13291, 29901, 29871, 1, 29871, 1234, 2]
    assert shared("chinese_alpaca_7b")(text, add_special_tokens=False).input_ids == [13291, 29901, 1, 1234, 2]
    # The [PAD] added with add_special_tokens as a string strips too, and is never split.
    assert shared("llama_original")("a [PAD] b", add_special_tokens=False).input_ids == [263, 32000, 289]
    assert shared("llama_original").decode([1, 263, 2, 32000]) == "<s> a</s> [PAD]"


@pytest.mark.parametrize("name", FILES)
def test_save_and_reload(name, tmp_path):
    tok = shared(name)
    tok.save_pretrained(tmp_path)
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as f:
        config = json.load(f)
    # declared for plain transformers (test_plain_transformers_reads_saved_folders_to_the_original_ids)
    assert (config["tokenizer_class"], config["special_tokens_pattern"]) == ("SentencePieceBackend", "bos")
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)
    again = load_tokenizer(str(tmp_path))
    assert type(again) is LlamaSentencePieceTokenizer
    assert len(again) == len(tok) and again.pad_token_id == tok.pad_token_id
    texts = [s["text"] for s in golden(name)["strings"]] + ["Response: answer</s> [PAD] x", "<s>北京_地名</s>"]
    assert [again(t).input_ids for t in texts] == [tok(t).input_ids for t in texts]
    for case in golden(name)["strings"]:
        assert again.decode(case["ids_with_bos"]) == case["decode_with_bos"]
    # "<s>" after a prompt's trailing space, as a chat template renders it: the trained ids (prompt, then "<s>")
    prompt = PROMPT.format(instruction="你好")
    assert again(prompt + "<s>", add_special_tokens=False).input_ids == \
        tok(prompt, add_special_tokens=False).input_ids + [tok.bos_token_id]


def test_plain_transformers_reads_saved_folders_to_the_original_ids(tmp_path):
    """Every LLaMA folder the project writes (save_pretrained: tiny models, adapters' tokenizers, full-SFT outputs,
    exports) is read by plain transformers, without `import model_hub`, to the original's ids — all golden strings of
    the three tokenizers — and its chat template renders the prompt llama_ner trains and serves."""
    from model_hub.prompt_format import get_prompt_format, record_prompt_format

    folders = {}
    for name, folder in FILES.items():
        out = tmp_path / folder
        shared(name).save_pretrained(out)
        record_prompt_format(str(out), "llama_ner", "llama_ner")
        folders[str(out)] = name
    bad, prompts = run_plain_probe(sys.executable, folders)
    assert bad == []
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "文本：2008年1月，北京 99999 元。"}]
    for folder, name in folders.items():
        assert prompts[folder] == get_prompt_format("llama_ner").prompt_ids(shared(name), chat)


def test_add_eos_token_survives_save(tmp_path):
    tok = load("chinese_alpaca_7b")
    tok.add_eos_token = True
    assert tok("你好").input_ids == [1] + tok("你好", add_special_tokens=False).input_ids + [2]
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.add_eos_token is True and again("你好").input_ids == tok("你好").input_ids
    plain = AutoTokenizer.from_pretrained(tmp_path)  # transformers' own class: special_tokens_pattern "bos_eos"
    assert plain("你好").input_ids == tok("你好").input_ids


@pytest.mark.parametrize("name", FILES)
def test_batch_padding(name):
    tok = shared(name)
    batch = tok(["你好", "Hello world"], padding=True, return_tensors="pt")
    one, two = tok("你好").input_ids, tok("Hello world").input_ids
    width = max(len(one), len(two))
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [one + [pad] * (width - len(one)), two + [pad] * (width - len(two))]
    assert batch["attention_mask"].tolist() == [[1] * len(one) + [0] * (width - len(one)),
                                                [1] * len(two) + [0] * (width - len(two))]
    assert set(batch) == {"input_ids", "attention_mask"}


def test_load_llama_tokenizer_by_name_and_dir():
    by_name = load_llama_tokenizer("chinese-llama-7b")
    by_dir = load_llama_tokenizer(model_hub.tokenizer_files("chinese-llama-7b"))
    assert type(by_name) is type(by_dir) is LlamaSentencePieceTokenizer
    text = "白日依山尽，黄河入海流。"
    want = [1, 39226, 30325, 33282, 30329, 32555, 30214, 37693, 30752, 30581, 31151, 30267]
    assert by_name(text).input_ids == by_dir(text).input_ids == want
    assert load_llama_tokenizer("llama-7b")("Hello world").input_ids == [1, 15043, 3186]


def test_pickle_round_trip():
    tok = shared("chinese_alpaca_7b")
    again = pickle.loads(pickle.dumps(tok))
    assert again("你好 <s> x [PAD]").input_ids == tok("你好 <s> x [PAD]").input_ids
