"""llama_ner data path: NerCollate vs the original's golden vectors (three tokenizers), process.py vs the
vendored dev.txt, config_utils semantics, and one-line errors for bad data."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from llama_ner.config_utils import ConfigParser, judge_type
from llama_ner.dataset import NerCollate, drop_cut_rows, length_report, load_data
from llama_ner.process import process_msra
from model_hub.llama.tokenizer import load_llama_tokenizer
from tuning.errors import UserError
from conftest import REPO

DATA = os.path.join(REPO, "data")
GOLDEN = {"chinese-alpaca-7b": "chinese_alpaca_7b", "chinese-llama-7b": "chinese_llama_7b",
          "llama-7b": "llama_original"}
COLUMNS = dict(instruct_column="instruct", query_column="query", response_column="answer")


def _golden(name):
    with open(os.path.join(REPO, "tests", "golden", "llama", GOLDEN[name] + ".json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def alpaca_tokenizer():
    return load_llama_tokenizer("chinese-alpaca-7b")


@pytest.mark.parametrize("name", list(GOLDEN))
def test_ner_collate_equals_golden(name):
    golden = _golden(name)
    tokenizer = load_llama_tokenizer(name)
    if tokenizer.pad_token_id is None:  # as the golden pad_note says: "[PAD]" added for the two pad-less ones
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    assert tokenizer.pad_token_id == golden["pad_token_id"]
    for batch in golden["ner_collate"]:
        collate = NerCollate(SimpleNamespace(max_seq_length=batch["max_seq_length"], **COLUMNS), tokenizer)
        # the golden rows are dicts (predict.py passes dicts); load_data gives JSON strings: both must agree
        for rows in (batch["rows"], [json.dumps(r, ensure_ascii=False) for r in batch["rows"]]):
            out = collate.collate_fn(rows)
            assert out["input_ids"].tolist() == batch["input_ids"]
            assert out["labels"].tolist() == batch["labels"]
            assert set(out) == {"input_ids", "labels"}


def test_process_train_mode_is_the_vendored_dev_file(tmp_path):
    ori = os.path.join(DATA, "llama_ner_msra", "ori_data", "msra_1000.txt")
    vendored = os.path.join(DATA, "llama_ner_msra", "instruct_data", "dev.txt")
    assert process_msra(ori, str(tmp_path / "train.txt"), "train") == 1000
    # byte for byte, with the final newline the original left out (Deviations: an appended row stays a row)
    assert (tmp_path / "train.txt").read_bytes() == open(vendored, "rb").read() + b"\n"
    # dev mode (what the original's __main__ would write as dev.txt) = the 344 positives = the first 344 lines
    assert process_msra(ori, str(tmp_path / "dev.txt"), "dev") == 344
    dev_lines = (tmp_path / "dev.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert dev_lines == open(vendored, encoding="utf-8").read().split("\n")[:344]
    assert all(json.loads(line)["answer"] != "没有" for line in dev_lines)


def test_process_creates_the_output_folder(tmp_path):
    """Issue 33.3: the README's "your own data" command wrote into build/my/ and failed on a fresh checkout."""
    from llama_ner.process import process_msra

    out = tmp_path / "build" / "my" / "train.txt"
    rows = process_msra(os.path.join(REPO, "data", "llama_ner_msra", "ori_data", "msra_1000.txt"), str(out))
    text = out.read_text(encoding="utf-8")
    assert rows > 0 and text.endswith("\n") and len(text.rstrip("\n").split("\n")) == rows


def test_process_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text('{"text": "a", "entity_list": []}\n{"text": "b", "entity_list": [{"entity_type": "PER"}]}\n',
                   encoding="utf-8")
    out = tmp_path / "out.txt"
    with pytest.raises(UserError, match=r"bad.txt:2: entity_list\[0\].entity: expected a non-empty string"):
        process_msra(str(bad), str(out))
    assert not out.exists()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "llama_ner", "process.py"), "--in_file", str(bad),
                           "--out_file", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "bad.txt:2:" in proc.stderr
    assert not out.exists()


def test_config_parser_semantics():
    config = {"model_dir": "m", "lora_r": 8, "lr": 1e-5, "flag": False, "local_rank": -1, "opt": {"adam": {"b": 1}},
              "tags": None}
    args = ConfigParser(config, ["--lora_r=16", "-lr=3e-4", "--flag=True", "--local_rank=0", "--opt_adam_b=2",
                                 "--model_dir=a=b", "--tags=[1, 'x']"]).parse_main()
    assert (args.lora_r, args.lr, args.flag, args.local_rank, args.opt_adam_b) == (16, 3e-4, True, 0, 2)
    assert args.model_dir == "a=b" and args.tags == [1, "x"]
    assert vars(ConfigParser(config, ["--local_rank=-1"]).parse_main())["local_rank"] == -1
    assert judge_type("12") == 12 and judge_type("-1.5") == -1.5 and judge_type("TRUE") is True
    assert judge_type("false") is False and judge_type("__import__('os')") == "__import__('os')"
    with pytest.raises(UserError, match="参数【nope】不在配置中"):
        ConfigParser(config, ["--nope=1"]).parse_main()
    with pytest.raises(UserError, match="lora_r: expected an integer"):
        ConfigParser(config, ["--lora_r=abc"]).parse_main()
    with pytest.raises(UserError, match="expected --key=value"):
        ConfigParser(config, ["--lora_r"]).parse_main()


@pytest.mark.parametrize("content, expected", [
    ('{"instruct": "i", "query": "q", "answer": "a"}\nnot json', r"x.txt:2: invalid JSON"),
    ('{"instruct": "i", "query": "q"}', r"x.txt:1: answer: missing field"),
    ('{"instruct": "i", "query": 3, "answer": "a"}', r"x.txt:1: query: expected a string, got int"),
    ('{"instruct": "i", "query": "q", "answer": " "}', r"x.txt:1: answer: empty answer"),
    ('[1, 2]', r"x.txt:1: expected a JSON object"),
])
def test_load_data_errors(tmp_path, content, expected):
    path = tmp_path / "x.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=expected):
        load_data(str(path))


def test_load_data_returns_json_lines_and_missing_file(tmp_path):
    lines = load_data(os.path.join(DATA, "llama_ner_msra", "instruct_data", "dev.txt"))
    assert len(lines) == 1000 and all(isinstance(line, str) for line in lines)
    with pytest.raises(UserError, match="file not found"):
        load_data(str(tmp_path / "missing.txt"))


def test_rows_whose_answer_is_cut_are_reported_and_dropped(alpaca_tokenizer, capsys):
    rows = [json.dumps({"instruct": "识别实体", "query": "文本：" + "很长" * n, "answer": "北京_地名"}, ensure_ascii=False)
            for n in (1, 10, 200)]  # source 42 / 60 / 440 tokens, target 6
    collate = NerCollate(SimpleNamespace(max_seq_length=64, **COLUMNS), alpaca_tokenizer)
    report = length_report(rows, collate)
    assert report["answer_cut"] == [2] and report["answer_truncated"] == [1] and report["rows"] == 3
    kept = drop_cut_rows(rows, collate, "train.txt")
    assert kept == rows[:2]
    out = capsys.readouterr().out
    assert "dropped 1 of 3 rows" in out and "1 of 3 rows have their answer truncated" in out
    batch = collate.collate_fn(kept)
    assert ((batch["labels"] != -100).sum(dim=1) > 1).all()  # every kept row trains on answer tokens
    with pytest.raises(UserError, match="every row's answer is cut away"):
        drop_cut_rows(rows[2:], collate, "train.txt")


@pytest.mark.parametrize("name", list(GOLDEN))
def test_teacher_forced_decoding_and_chat_prompts_equal_golden(name):
    from llama_ner.chat_ner import generate_prompt, prompt_ids
    from llama_ner.evaluation import decode_teacher_forced

    golden = _golden(name)
    tokenizer = load_llama_tokenizer(name)
    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    for case in golden["test_predict_decoding"]:
        preds, labels = decode_teacher_forced(case["argmax_ids"], case["labels"], tokenizer)
        assert preds == case["decoded_preds"] and labels == case["decoded_labels"]
    for case in golden["chat_ner_prompts"]:  # the original template, behind --original_prompt
        assert generate_prompt(case["instruction"], case["input"]) == case["prompt"]
        ids, _ = prompt_ids(tokenizer, case["instruction"], case["input"], with_prompt=True, original_prompt=True)
        assert ids == case["input_ids"]


def test_training_prompt_for_generation_is_the_trained_prefix(alpaca_tokenizer):
    from llama_ner.chat_ner import prompt_ids

    row = {"instruct": "识别实体", "query": "文本：北京欢迎你", "answer": "北京_地名"}
    collate = NerCollate(SimpleNamespace(max_seq_length=192, **COLUMNS), alpaca_tokenizer)
    batch = collate.collate_fn([row])
    first_label = int((batch["labels"][0] != -100).nonzero()[0])
    trained_prefix = batch["input_ids"][0, :first_label + 1].tolist()  # the prompt and the "<s>" that opens the answer
    assert collate.prompt_ids(row) == trained_prefix
    ids, _ = prompt_ids(alpaca_tokenizer, row["instruct"], row["query"], with_prompt=True, original_prompt=False)
    assert ids == trained_prefix


def test_deepspeed_json_fp16_dropped_on_cpu_is_said_once(capsys):
    """Issue 23: on a CPU deepspeed.json's fp16 was turned off without a word."""
    from llama_ner.common import deepspeed_config, find_deepspeed_json

    args = SimpleNamespace(train_batch_size=2, gradient_accumulation_steps=1, learning_rate=None, bf16=False)
    path = find_deepspeed_json("deepspeed.json")
    config = deepspeed_config(path, args, on_gpu=False)
    assert config["fp16"] == {"enabled": False} and config["bf16"] == {"enabled": False}
    assert capsys.readouterr().out == (f"note: {path} asks for fp16, which a CPU cannot run fast; training in fp32 "
                                       "(--bf16=true for bf16) instead\n")
    deepspeed_config(path, SimpleNamespace(**{**vars(args), "bf16": True}), on_gpu=False)
    assert capsys.readouterr().out.count("training in bf16 instead") == 1
    deepspeed_config(path, args, on_gpu=True)  # a GPU runs the original's fp16: nothing to say
    assert capsys.readouterr().out == ""
