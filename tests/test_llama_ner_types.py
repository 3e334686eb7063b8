"""Issue 22: llama_ner's entity types come from the data. MSRA gives exactly the original prompt; a dataset with
other types gets a prompt listing its own types in a stable order, trains, and is scored with a row per type."""
import json
import os

import pytest
from conftest import REPO, run_in_process

from llama_ner.process import convert
from llama_ner.process import main as process_main

ORIGINAL_PROMPT = ("你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名，如果存在结果，返回'实体_实体类型'，"
                   "不同实体间用\n分隔。如果没有结果，回答'没有'。")
# Two types MSRA does not have, listed in a stable order (sorted), whatever order the rows give them in.
OWN_PROMPT = ("你现在是一个实体识别模型，你需要提取文本里面的产品、疾病，如果存在结果，返回'实体_实体类型'，"
              "不同实体间用\n分隔。如果没有结果，回答'没有'。")
SENTENCES = [("他得了感冒，吃了阿司匹林。", [("感冒", "疾病"), ("阿司匹林", "产品")]),
             ("糖尿病患者要少吃蛋糕。", [("糖尿病", "疾病"), ("蛋糕", "产品")]),
             ("新款手机卖得很好。", [("手机", "产品")]),
             ("今天天气很好。", []),
             ("高血压和感冒都很常见。", [("高血压", "疾病"), ("感冒", "疾病")]),
             ("我买了一台电脑。", [("电脑", "产品")])]


def write_raw(path, sentences=SENTENCES):
    with open(path, "w", encoding="utf-8") as f:
        for text, entities in sentences:
            items = [{"entity_index": {"begin": text.index(e), "end": text.index(e) + len(e)}, "entity_type": t,
                      "entity": e} for e, t in entities]
            f.write(json.dumps({"text": text, "entity_list": items}, ensure_ascii=False) + "\n")
    return str(path)


def test_msra_gives_exactly_the_original_prompt(tmp_path):
    has_entity, no_entity, _ = convert(os.path.join(REPO, "data", "llama_ner_msra", "ori_data", "msra_1000.txt"))
    assert {row["instruct"] for row in has_entity + no_entity} == {ORIGINAL_PROMPT}
    # a piece of MSRA with persons only still gets the original prompt (the same model, the same question)
    has_entity, _, _ = convert(write_raw(tmp_path / "per_only.txt", [("张三来了。", [("张三", "PER")])]))
    assert has_entity[0]["instruct"] == ORIGINAL_PROMPT


def test_other_types_get_their_own_prompt_in_a_stable_order(tmp_path):
    has_entity, no_entity, _ = convert(write_raw(tmp_path / "a.txt"))
    assert {row["instruct"] for row in has_entity + no_entity} == {OWN_PROMPT}
    assert has_entity[0]["answer"] == "感冒_疾病\n阿司匹林_产品" and no_entity[0]["answer"] == "没有"
    reordered, _, _ = convert(write_raw(tmp_path / "b.txt", SENTENCES[::-1]))
    assert reordered[0]["instruct"] == OWN_PROMPT
    mixed, _, _ = convert(write_raw(tmp_path / "c.txt", [("张三买了手机。", [("张三", "PER"), ("手机", "产品")])]))
    assert "提取文本里面的人名、产品，" in mixed[0]["instruct"]  # MSRA's first, in their order, then the rest


def test_entity_types_option_fixes_the_list_and_refuses_a_missing_type(tmp_path):
    dev = write_raw(tmp_path / "dev.txt", SENTENCES[2:4])  # only 产品 here
    code, out, err = run_in_process(process_main, ["--in_file", dev, "--out_file", tmp_path / "dev_rows.txt",
                                                   "--mode", "train", "--entity_types", "疾病,产品"])
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "dev_rows.txt").read_text(encoding="utf-8").splitlines()]
    assert {row["instruct"] for row in rows} == {OWN_PROMPT}
    assert "entity types in the instruction: 产品、疾病" in out
    code, out, err = run_in_process(process_main, ["--in_file", write_raw(tmp_path / "all.txt"), "--out_file",
                                                   tmp_path / "x.txt", "--entity_types", "产品"])
    assert code == 2 and "entity_types: the data has entity types the instruction would not name: 疾病" in err
    assert not (tmp_path / "x.txt").exists()


def test_report_has_a_row_per_type_of_the_data(capsys):
    from llama_ner.evaluation import score_split

    rows = [json.dumps({"query": "q", "answer": a}, ensure_ascii=False)
            for a in ("感冒_疾病\n阿司匹林_产品", "手机_产品", "没有")]
    result = score_split("dev", "dev.txt", rows, ["感冒_疾病", "手机_产品\n电脑_产品", "没有"], "answer")
    per_type = result["scores"]["per_type"]
    assert list(per_type) == ["产品", "疾病"]
    assert (per_type["产品"]["tp"], per_type["产品"]["fp"], per_type["产品"]["fn"]) == (1, 1, 1)
    assert (per_type["疾病"]["tp"], per_type["疾病"]["fp"], per_type["疾病"]["fn"]) == (1, 0, 0)
    table = capsys.readouterr().out
    assert "产品" in table and "疾病" in table and "人名" not in table
    msra = score_split("dev", "dev.txt", [json.dumps({"answer": "张三_人名"}, ensure_ascii=False)], ["没有"], "answer")
    assert list(msra["scores"]["per_type"]) == ["人名", "地名", "机构名"]  # MSRA's table, as before


@pytest.mark.slow
def test_train_and_report_on_a_dataset_with_two_other_types(tmp_path, tiny_model):
    from llama_ner import test as ner_test
    from llama_ner import train_trainer

    raw = write_raw(tmp_path / "raw.txt")
    assert run_in_process(process_main, ["--in_file", raw, "--out_file", tmp_path / "train.txt"])[0] == 0
    tiny_model("chinese-alpaca-7b")
    save_dir = tmp_path / "run"
    code, out, err = run_in_process(train_trainer.main, [
        "--model_dir=tiny:chinese-alpaca-7b", f"--train_path={tmp_path / 'train.txt'}",
        f"--dev_path={tmp_path / 'train.txt'}", f"--save_dir={save_dir}/", "--train_batch_size=2", "--max_steps=2",
        "--save_steps=2", "--log_steps=1", "--learning_rate=1e-2", "--num_train_epochs=1", "--max_seq_length=96"])
    assert code == 0, err[-2000:]
    report_path = tmp_path / "report.json"
    code, out, err = run_in_process(ner_test.main, [
        f"--train_args={save_dir / 'adapter_model' / 'train_args.json'}", "--test_path=", "--max_new_tokens=4",
        f"--report_path={report_path}", "--eval_batch_size=3"])
    assert code == 0, err[-2000:]
    scores = json.loads(report_path.read_text(encoding="utf-8"))["splits"]["dev"]["scores"]
    assert list(scores["per_type"])[:2] == ["产品", "疾病"] and "人名" not in list(scores["per_type"])[:2]
    gold = {"产品": 4, "疾病": 4}  # entities of each type in the data
    for kind, n in gold.items():
        assert scores["per_type"][kind]["tp"] + scores["per_type"][kind]["fn"] == n
