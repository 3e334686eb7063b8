"""Issue 22: chatglm_lora reads alpaca JSON / JSON lines directly and multi-turn rows with a `history`
(ChatGLM-6B's "[Round N]\\n问：…\\n答：" format, loss only on the last answer)."""
import json
import os

import pytest
from conftest import REPO, run_in_process

from chatglm_lora.cover_alpaca2jsonl import format_example
from chatglm_lora.data_formats import read_rows

ALPACA = os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json")


@pytest.fixture(scope="module")
def alpaca_records():
    with open(ALPACA, encoding="utf-8") as f:
        return json.load(f)[:40]


def test_alpaca_list_and_lines_give_the_converted_rows(tmp_path, alpaca_records):
    assert any(r["input"] for r in alpaca_records) and any(not r["input"] for r in alpaca_records)
    listed = tmp_path / "alpaca.json"
    listed.write_text(json.dumps(alpaca_records, ensure_ascii=False, indent=2), encoding="utf-8")
    lines = tmp_path / "alpaca.jsonl"
    lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in alpaca_records), encoding="utf-8")
    converted = [format_example(r) for r in alpaca_records]  # what cover_alpaca2jsonl.py writes
    expected = [(i + 1, row["context"], row["target"]) for i, row in enumerate(converted)]
    assert read_rows(str(listed)) == expected
    assert read_rows(str(lines)) == expected


def test_multi_turn_rows_in_the_round_format_train_only_the_last_answer(tmp_path, tiny_model):
    from datasets import load_from_disk

    from chatglm_lora.finetune import DataCollator
    from chatglm_lora.tokenize_dataset_rows import main
    from model_hub.loader import load_tokenizer

    rows = [{"history": [["你好", "你好！有什么可以帮你？"], ["1+1等于几", "2"]], "context": "再见", "target": "再见！"},
            {"history": [["写一首诗", "春眠不觉晓"]], "instruction": "翻译成英文", "input": "处处闻啼鸟",
             "output": "Birds sing everywhere."},
            {"history": [], "context": "单轮", "target": "好的"}]
    prompts = ["[Round 0]\n问：你好\n答：你好！有什么可以帮你？\n[Round 1]\n问：1+1等于几\n答：2\n[Round 2]\n问：再见\n答：",
               "[Round 0]\n问：写一首诗\n答：春眠不觉晓\n[Round 1]\n问：翻译成英文\n处处闻啼鸟\n答：",
               "单轮"]  # an empty history is a single-turn row, as chat() builds it
    answers = ["再见！", "Birds sing everywhere.", "好的"]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    folder = tiny_model("chatglm-6b")
    code, out, err = run_in_process(main, ["--jsonl_path", data, "--save_path", tmp_path / "rows",
                                           "--max_seq_length", 128, "--chatglm_path", folder])
    assert code == 0, err
    saved = load_from_disk(str(tmp_path / "rows"))
    tokenizer = load_tokenizer(folder)
    eop = tokenizer.convert_tokens_to_ids("<eop>")
    for row, prompt, answer in zip(saved, prompts, answers):
        prompt_ids = tokenizer.encode(prompt)  # ends with [gMASK] <sop>
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        assert row["input_ids"] == prompt_ids + answer_ids + [eop]
        assert row["seq_len"] == len(prompt_ids)
        _, labels = DataCollator.rows([row])[0]
        trained = [t for t in labels if t != -100]
        assert trained == [tokenizer.convert_tokens_to_ids("<sop>")] + answer_ids + [eop]  # the last answer only


@pytest.mark.parametrize("record, expected", [
    ({"history": "你好", "context": "q", "target": "a"}, "rows.jsonl:1: history: expected a list of [question, answer] pairs"),
    ({"history": [["q"]], "context": "q", "target": "a"}, "rows.jsonl:1: history[0]: expected a [question, answer] pair"),
    ({"instruction": "", "output": "a"}, "rows.jsonl:1: instruction: empty string"),
    ({"instruction": "q", "input": 3, "output": "a"}, "rows.jsonl:1: input: expected a string, got int"),
    ({"question": "q"}, 'rows.jsonl:1: expected the fields "context" and "target", or alpaca "instruction"'),
])
def test_bad_records_are_one_line(tmp_path, record, expected):
    from chatglm_lora.tokenize_dataset_rows import main

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    code, out, err = run_in_process(main, ["--check_only", "true", "--jsonl_path", path])
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_bad_record_in_an_alpaca_list_names_the_record(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]), encoding="utf-8")
    with pytest.raises(Exception, match=r"alpaca.json: JSON list record 2: output: missing field"):
        read_rows(str(path))
