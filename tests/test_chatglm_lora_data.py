"""chatglm_lora data steps against the ORIGINAL's golden rows and labels (tests/golden/chatglm6b_tokenizer)."""
import json
import os

import pytest

from chatglm_lora.cover_alpaca2jsonl import format_example
from chatglm_lora.finetune import DataCollator
from chatglm_lora.tokenize_dataset_rows import OLD_TEXT, fit_rows, read_rows, tokenize_rows
from conftest import REPO, run_script

ALPACA = os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json")
OLD_JSONL = os.path.join(REPO, "data", "chatglm_tuning", "alpaca_data.jsonl")


@pytest.fixture(scope="module")
def golden(golden_dir):
    with open(os.path.join(golden_dir, "chatglm6b_tokenizer", "chatglm6b_tokenizer.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def chatglm_tokenizer():
    import model_hub
    from model_hub.loader import load_tokenizer

    return load_tokenizer(model_hub.tokenizer_files("chatglm-6b"))


def run(script, *args):
    return run_script(os.path.join("chatglm_lora", script), *args)


def test_format_example_equals_golden_contexts(golden):
    for block in golden["chatglm_tuning_tokenize_dataset_rows"]:
        for row in block["rows"]:
            assert format_example(row["alpaca"]) == {"context": row["context"], "target": row["target"]}


def test_cover_alpaca2jsonl_writes_the_original_format_for_all_rows(tmp_path):
    out = tmp_path / "alpaca_data.jsonl"
    result = run("cover_alpaca2jsonl.py", "--data_path", ALPACA, "--save_path", str(out))
    assert result.returncode == 0, result.stderr
    with open(ALPACA, encoding="utf-8") as f:
        examples = json.load(f)
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(examples) + 1
    # ensure_ascii=True and key order context, target: non-ASCII text is escaped exactly as json.dumps does
    for example, line in zip(examples, lines):
        context = "Instruction: " + example["instruction"] + "\n"
        if example["input"]:
            context += "Input: " + example["input"] + "\n"
        expected = '{"context": ' + json.dumps(context + "Answer: ") + ', "target": ' + json.dumps(example["output"]) + "}"
        assert line == expected.encode("ascii")
    assert "28 rows have an empty output" in result.stdout


def test_old_text_format_reads_as_context_target(tmp_path):
    with open(OLD_JSONL, encoding="utf-8") as f:
        old_lines = [next(f) for _ in range(200)]
    with open(ALPACA, encoding="utf-8") as f:
        examples = json.load(f)[:200]
    path = tmp_path / "old.jsonl"
    path.write_text("".join(old_lines), encoding="utf-8")
    rows = read_rows(str(path))
    assert [(c, t) for _, c, t in rows] == [tuple(format_example(e).values()) for e in examples]
    assert all(OLD_TEXT.match(json.loads(line)["text"]) for line in old_lines)


@pytest.mark.parametrize("block_index", [0, 1])
def test_rows_equal_golden(golden, chatglm_tokenizer, block_index):
    block = golden["chatglm_tuning_tokenize_dataset_rows"][block_index]
    max_len, rows = block["max_seq_length"], block["rows"]
    out = tokenize_rows(chatglm_tokenizer, 130005, [r["context"] for r in rows], [r["target"] for r in rows], max_len)
    # The original's rows, untruncated, for every row (fits or not) ...
    assert [list(ids) for ids, _ in out] == [r["input_ids"] for r in rows]
    assert [n for _, n in out] == [r["seq_len"] for r in rows]
    # ... and the same rows kept / dropped with --skip_overlength true.
    kept, counts = fit_rows(out, max_len, skip_overlength=True)
    assert [k["input_ids"] for k in kept] == [r["input_ids"] for r in rows if not r["skipped_if_skip_overlength"]]
    assert counts["skipped_overlength"] == sum(r["skipped_if_skip_overlength"] for r in rows)
    # Without skipping, over-long rows are cut to max_seq_length (the original let them grow to 2*max+1).
    kept, counts = fit_rows(out, max_len, skip_overlength=False)
    assert all(len(k["input_ids"]) <= max_len for k in kept)
    assert len(kept) + counts["dropped_no_target"] == len(rows)


def test_collator_equals_golden(golden):
    collate = DataCollator(pad_token_id=3)
    for case in golden["chatglm_tuning_data_collator"]:
        out = collate(case["features"])
        assert out["input_ids"].tolist() == case["input_ids"]
        assert out["labels"].tolist() == case["labels"]


@pytest.mark.parametrize("content, message", [
    (b'{"context": "a"}\n', "bad.jsonl:1: target: missing field"),
    (b'{"context": "a", "target": "b"}\n{"context": null, "target": "b"}\n', "bad.jsonl:2: context: expected a string"),
    (b'{"prompt": "a"}\n', 'bad.jsonl:1: expected the fields "context" and "target"'),
    (b'{"text": "no template"}\n', "bad.jsonl:1: text: expected"),
])
def test_tokenize_rows_cli_rejects_bad_lines(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    result = run("tokenize_dataset_rows.py", "--jsonl_path", str(tmp_path / "bad.jsonl"),
                 "--save_path", str(tmp_path / "out"), "--chatglm_path", "tiny:chatglm-6b")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_tokenize_rows_cli_v2_and_bool_flags(tmp_path):
    result = run("tokenize_dataset_rows.py", "--version", "v2")
    assert result.returncode == 2 and "not supported: no ChatGLM2" in result.stderr
    result = run("tokenize_dataset_rows.py", "--skip_overlength", "maybe")
    assert result.returncode == 2 and "expected true or false" in result.stderr
