"""Issue 22: each recipe's data checker on a good file (exact counts and token lengths, counted here with the
real tokenizer independently of the checker) and on bad files (the one-line error, exit code 2)."""
import json

import pytest
from conftest import run_in_process

from tuning.data_check import percentile

LONG = "Once upon a time a cat lived by the sea and went out fishing every single morning before the sun rose."
CHATGLM_ROWS = [
    {"context": "Instruction: 你好\nAnswer: ", "target": "你好！有什么可以帮你？"},
    {"context": "Instruction: Name three colors.\nAnswer: ", "target": "Red, green and blue."},
    {"context": "Instruction: 1+1=?\nAnswer: ", "target": "2"},
    {"context": "Instruction: Tell a story.\nAnswer: ", "target": LONG},  # truncated at 24
    {"context": "Instruction: nothing\nAnswer: ", "target": ""},  # empty target: dropped
    {"context": f"Instruction: {LONG}\nAnswer: ", "target": "OK"},  # prompt fills the row: dropped
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def figures(lengths):
    lengths = sorted(lengths)
    return f"p50 {percentile(lengths, 50)}, p95 {percentile(lengths, 95)}, max {lengths[-1]}"


def test_percentile_is_nearest_rank():
    assert [percentile([1, 2, 3, 4], p) for p in (50, 95, 100)] == [2, 4, 4]
    assert percentile(list(range(1, 101)), 95) == 95 and percentile([], 50) == 0


def test_chatglm_lora_check_only_counts_and_lengths(tmp_path, tiny_model):
    from chatglm_lora.tokenize_dataset_rows import main
    from model_hub.loader import load_tokenizer

    folder = tiny_model("chatglm-6b")
    path = write_jsonl(tmp_path / "rows.jsonl", CHATGLM_ROWS)
    code, out, err = run_in_process(main, ["--check_only", "true", "--jsonl_path", path, "--max_seq_length", 24,
                                           "--chatglm_path", folder, "--save_path", str(tmp_path / "never")])
    assert code == 0, err
    tokenizer = load_tokenizer(folder)  # the transformers tokenizer, one text at a time
    lengths = [len(tokenizer.encode(r["context"])) + len(tokenizer.encode(r["target"], add_special_tokens=False)) + 1
               for r in CHATGLM_ROWS[:4]]
    assert lengths[3] > 24 and max(lengths[:3]) <= 24
    assert out.splitlines() == [
        f"{path}: rows read 6, kept 4, dropped 2, truncated 1 (at --max_seq_length=24)",
        "  dropped (empty target): 1",
        "  dropped (prompt fills --max_seq_length, no target left): 1",
        f"  tokens per kept row (before the cut): {figures(lengths)}"]
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("line, expected", [
    ('{"context": "x"}', "rows.jsonl:2: target: "),
    ('{"context": 3, "target": "y"}', "rows.jsonl:2: context: "),
    ("not json", "rows.jsonl:2: "),
])
def test_chatglm_lora_check_only_bad_rows(tmp_path, tiny_model, line, expected):
    from chatglm_lora.tokenize_dataset_rows import main

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(CHATGLM_ROWS[0]) + "\n" + line + "\n", encoding="utf-8")
    code, out, err = run_in_process(main, ["--check_only", "true", "--jsonl_path", path,
                                           "--chatglm_path", tiny_model("chatglm-6b")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


NER_INSTRUCT = "你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名。"


def test_llama_ner_check_data_counts_and_lengths(tmp_path, tiny_model):
    from llama_ner.check_data import main
    from llama_ner.dataset import build_source
    from model_hub.loader import load_tokenizer

    rows = [{"instruct": NER_INSTRUCT, "query": "文本：张三在北京。", "answer": "张三_人名\n北京_地名"},
            {"instruct": NER_INSTRUCT, "query": "文本：今天天气好。", "answer": "没有"},
            {"instruct": NER_INSTRUCT, "query": "文本：" + "中国人民银行" * 3, "answer": "中国人民银行_机构名" * 8},
            {"instruct": NER_INSTRUCT, "query": "文本：" + "很长的句子" * 40, "answer": "没有"}]
    path = write_jsonl(tmp_path / "train.txt", rows)
    folder = tiny_model("chinese-alpaca-7b")
    tokenizer = load_tokenizer(folder)
    sources = [len(tokenizer(build_source(r["instruct"], r["query"]), add_special_tokens=False)["input_ids"])
               for r in rows]
    targets = [len(tokenizer(f"<s>{r['answer']}</s>", add_special_tokens=False)["input_ids"]) for r in rows]
    limit = sources[0] + targets[0] + 6  # rows 1, 2 fit; row 3's answer is cut short; row 4's prompt fills it
    assert sources[2] + 1 < limit < sources[2] + targets[2] and sources[3] >= limit - 1
    code, out, err = run_in_process(main, ["--data", path, "--model_dir", folder, "--max_seq_length", limit])
    assert code == 0, err
    assert out.splitlines() == [
        f"{path}: rows read 4, kept 3, dropped 1, truncated 1 (at --max_seq_length={limit})",
        "  dropped (answer cut away by --max_seq_length): 1",
        f"  tokens per kept row (before the cut): {figures([s + t for s, t in zip(sources[:3], targets[:3])])}"]

    bad = tmp_path / "bad.txt"
    bad.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n" + '{"instruct": "x", "query": "y", "answer": ""}')
    code, out, err = run_in_process(main, ["--data", bad, "--model_dir", folder])
    assert code == 2 and err.strip() == f"error: {bad}:2: answer: empty answer; expected 'entity_type' lines or '没有'"


def test_glm4_check_data_counts_and_lengths(tmp_path, glm4_tokenizer):
    from glm4_finetune.check_data import main
    from model_hub.make_tiny import tiny_dir

    def conversation(question, answer):
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    train = [conversation("类型#裙*颜色#绿色", "这条连衣裙以绿色为主色调。"), conversation("你好", "你好！"),
             conversation("写一段很长的广告词", "非常好看的裙子，" * 40)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "dev.jsonl", train[:2])
    lengths = [len(glm4_tokenizer.apply_chat_template(c["messages"], tokenize=True, return_dict=False)) + 1
               for c in train]  # combine: True, the template + the <|user|> the recipe appends
    config = "glm4_finetune/configs/tiny/lora.yaml"  # max_input_length 64 + max_output_length 64 + 1
    code, out, err = run_in_process(main, [tmp_path, tiny_dir("glm-4-9b-chat"), config])
    assert code == 0, err
    assert lengths[2] > 129 >= max(lengths[:2])
    assert out.splitlines() == [
        (f"{tmp_path}/train.jsonl: rows read 3, kept 3, dropped 0, truncated 1 "
         "(at max_input_length + max_output_length + 1=129)"),
        f"  tokens per kept row (before the cut): {figures(lengths)}",
        "  conversations per split: train 3, validation 2, test 2"]

    write_jsonl(tmp_path / "dev.jsonl", [{"messages": [{"role": "user", "content": "只有问题"}]}])
    code, out, err = run_in_process(main, [tmp_path, tiny_dir("glm-4-9b-chat"), config])
    assert code == 2 and f"{tmp_path}/dev.jsonl:1: messages: no assistant message" in err, err
