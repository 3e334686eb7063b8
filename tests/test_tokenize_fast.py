"""The fast tokenize path (one SentencePiece call, rows written with pyarrow) gives exactly the rows and the saved
folder of the one-row-at-a-time path through the transformers ChatGLMTokenizer (the original's design)."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from chatglm_lora.cover_alpaca2jsonl import format_example
from chatglm_lora import tokenize_dataset_rows
from chatglm_lora.tokenize_dataset_rows import fit_rows, tokenize_rows, tokenize_rows_fast
from model_hub.chatglm6b.text import ChatGLMTextEncoder
from tuning.datasets_folder import SHARD
from conftest import REPO

ALPACA = os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json")
EOS = 130005  # ChatGLM-6B's <eop>, the eos of its config (model_hub.registry)
LONG = "The quick brown fox jumps over the lazy dog near the river bank, twice. " * 40  # ~700 tokens
EDGE_CASES = [  # (context, target)
    ("Instruction: say nothing\nAnswer: ", ""),                               # empty target
    ("Instruction: " + LONG + "\nAnswer: ", "Short answer."),               # prompt alone over 384
    ("Instruction: repeat\nAnswer: ", LONG),                                 # target alone over 384
    ("Instruction: " + LONG + "\nAnswer: ", LONG),                          # both over
    ("Instruction: spaces  and   runs" + " " * 170 + "end\tand\ttabs\n\n\nAnswer: ", "  leading and trailing  "),
    ("Instruction: specials <sop> and <eop> inside\nAnswer: ", "a <pad> b [MASK] c <unk> d"),
    ("Instruction: not special: [gMASK] </s> <n> <|tab|>\nAnswer: ", "<image_5> [sMASK]"),
    ("Instruction: 你好，世界！写一首关于春天的诗。\nAnswer: ", "春眠不觉晓，处处闻啼鸟。😀 𠀀 ｆｕｌｌｗｉｄｔｈ ＡＢＣ ①"),
    ("Instruction: x\nAnswer: ", "\n"),
    ("Instruction: café naïve Ångström ﬁ ligature\r\nAnswer: ", "Zero\u200bwidth and\u3000ideographic space"),
]


@pytest.fixture(scope="module")
def folder():
    import model_hub

    return model_hub.tokenizer_files("chatglm-6b")


@pytest.fixture(scope="module")
def tokenizer(folder):
    from model_hub.loader import load_tokenizer

    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def encoder(folder):
    return ChatGLMTextEncoder(folder)


@pytest.fixture(scope="module")
def rows(golden_dir):
    """~550 real alpaca rows (the first 300 and 200 drawn from the rest), the golden rows and the edge cases."""
    with open(ALPACA, encoding="utf-8") as f:
        examples = json.load(f)
    picked = examples[:300] + random.Random(0).sample(examples[300:], 200)
    pairs = [tuple(format_example(e).values()) for e in picked]
    with open(os.path.join(golden_dir, "chatglm6b_tokenizer", "chatglm6b_tokenizer.json"), encoding="utf-8") as f:
        golden = json.load(f)
    for block in golden["chatglm_tuning_tokenize_dataset_rows"]:
        pairs += [(r["context"], r["target"]) for r in block["rows"]]
    return pairs + EDGE_CASES


def test_encoder_special_ids_match_the_tokenizer(encoder, tokenizer):
    assert (encoder.gmask_id, encoder.bos_id, encoder.eos_id) == (tokenizer.gmask_token_id, tokenizer.bos_token_id,
                                                                   tokenizer.eos_token_id) == (130001, 130004, EOS)


def test_encoder_ids_equal_the_tokenizer_for_every_text(encoder, tokenizer, rows):
    texts = [t for pair in rows for t in pair]
    fast = encoder.encode(texts, num_threads=2)
    for text, ids in zip(texts, fast):
        if ids is None:  # special-token strings: the caller uses the transformers tokenizer
            assert encoder.has_special(text)
        else:
            assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert sum(ids is None for ids in fast) == 2  # only the "<sop>"/"<pad>" edge case texts


@pytest.mark.parametrize("max_seq_length", [16, 128, 384])
def test_fast_rows_equal_one_row_at_a_time_rows(encoder, tokenizer, rows, max_seq_length):
    contexts, targets = [c for c, _ in rows], [t for _, t in rows]
    one_row = tokenize_rows(tokenizer, EOS, contexts, targets, max_seq_length)
    fast = tokenize_rows_fast(encoder, contexts, targets, max_seq_length, num_threads=2)
    assert fast == one_row
    assert tokenize_rows_fast(encoder, contexts, targets, max_seq_length, num_threads=2, chunk_rows=100) == one_row
    for skip in (True, False):
        assert fit_rows(fast, max_seq_length, skip) == fit_rows(one_row, max_seq_length, skip)
    kept, counts = fit_rows(fast, max_seq_length, skip_overlength=False)
    if max_seq_length == 384:  # the over-long edge cases really are cut (and the prompt-only one dropped)
        assert counts["truncated"] >= 2 and counts["dropped_no_target"] >= 1
    assert all(len(r["input_ids"]) <= max_seq_length for r in kept)


def test_fast_rows_equal_golden_rows(encoder, golden_dir):
    with open(os.path.join(golden_dir, "chatglm6b_tokenizer", "chatglm6b_tokenizer.json"), encoding="utf-8") as f:
        blocks = json.load(f)["chatglm_tuning_tokenize_dataset_rows"]
    for block in blocks:
        out = tokenize_rows_fast(encoder, [r["context"] for r in block["rows"]], [r["target"] for r in block["rows"]],
                                 block["max_seq_length"], num_threads=1)
        assert [ids for ids, _ in out] == [r["input_ids"] for r in block["rows"]]
        assert [n for _, n in out] == [r["seq_len"] for r in block["rows"]]


def test_encoder_follows_remove_space_and_lower_case(tmp_path, folder, rows):
    from model_hub.chatglm6b import ChatGLMTokenizer

    shutil.copy(os.path.join(folder, "ice_text.model"), tmp_path / "ice_text.model")
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.update(remove_space=True, do_lower_case=True, max_blank_length=10)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    slow = ChatGLMTokenizer(vocab_file=str(tmp_path / "ice_text.model"), remove_space=True, do_lower_case=True,
                            max_blank_length=10, num_image_tokens=0)
    texts = [t for pair in rows[:50] + EDGE_CASES for t in pair]
    for text, ids in zip(texts, ChatGLMTextEncoder(str(tmp_path)).encode(texts)):
        if ids is not None:
            assert ids == slow(text, add_special_tokens=False)["input_ids"], text


def run_tokenize(tmp_path, monkeypatch, capsys, jsonl, name, *args):
    """The script's main() in this process (the tokenizer and torch are already imported here)."""
    out = tmp_path / name
    monkeypatch.setattr(sys, "argv", ["tokenize_dataset_rows.py", "--jsonl_path", str(jsonl), "--save_path", str(out),
                                      *args])
    tokenize_dataset_rows.main()
    return out, capsys.readouterr().out.replace(str(out), "OUT")


@pytest.mark.parametrize("max_len,skip", [("128", "true"), ("16", "false")])
def test_cli_fast_folder_equals_one_row_folder(tmp_path, monkeypatch, capsys, folder, rows, max_len, skip):
    import pyarrow as pa
    from datasets import load_from_disk

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in rows), encoding="utf-8")
    common = ["--chatglm_path", folder, "--max_seq_length", max_len, "--skip_overlength", skip]
    slow_dir, slow_out = run_tokenize(tmp_path, monkeypatch, capsys, jsonl, "one_row", *common,
                                      "--one_row_at_a_time", "true")
    fast_dir, fast_out = run_tokenize(tmp_path, monkeypatch, capsys, jsonl, "fast", *common)
    assert fast_out == slow_out  # same kept / dropped / truncated counts
    assert "rows with an empty target" in fast_out and ("skipped overlength" in fast_out) == (skip == "true")
    slow, fast = load_from_disk(str(slow_dir)), load_from_disk(str(fast_dir))
    assert fast.features == slow.features and len(fast) == len(slow) > 0
    assert fast[:] == slow[:]
    assert sorted(os.listdir(fast_dir)) == sorted(os.listdir(slow_dir)) == [SHARD, "dataset_info.json", "state.json"]
    assert (fast_dir / "dataset_info.json").read_text() == (slow_dir / "dataset_info.json").read_text()
    states = [json.loads((d / "state.json").read_text()) for d in (fast_dir, slow_dir)]
    for state in states:
        assert len(state.pop("_fingerprint")) == 16
    assert states[0] == states[1]
    schemas = [pa.ipc.open_stream(str(d / SHARD)).schema for d in (fast_dir, slow_dir)]
    assert schemas[0].equals(schemas[1], check_metadata=True)
    again, _ = run_tokenize(tmp_path, monkeypatch, capsys, jsonl, "fast_again", *common)
    for name in os.listdir(fast_dir):  # deterministic: the same input gives the same bytes
        assert (again / name).read_bytes() == (fast_dir / name).read_bytes()


def test_cli_help_names_both_paths():
    result = subprocess.run([sys.executable, os.path.join(REPO, "chatglm_lora", "tokenize_dataset_rows.py"), "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "--one_row_at_a_time" in result.stdout and "(default)" in result.stdout
