"""Issue 22: chatglm_lora evaluation. The dev split the tokenizer step held out (same fraction and seed) is
generated greedily in batches and scored with the glm4 recipe's metric code; scores and predictions land in JSON."""
import json
import os

import pytest
from conftest import REPO, run_in_process

from chatglm_lora.data_formats import held_out

N_ROWS = 12


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model):
    """A real PEFT LoRA adapter on the tiny ChatGLM-6B (finetune.py's settings, random B so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from model_hub.loader import load_model_and_tokenizer

    folder = tmp_path_factory.mktemp("adapter")
    model, _ = load_model_and_tokenizer(tiny_model("chatglm-6b"))
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    with open(os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json"), encoding="utf-8") as f:
        records = [r for r in json.load(f)[:40] if r["output"].strip()][:N_ROWS]
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path), records


@pytest.mark.slow
def test_held_out_rows_are_left_out_of_training_and_scored(tmp_path, adapter, alpaca_file, tiny_model,
                                                            glm4_tokenizer):
    from datasets import load_from_disk

    from chatglm_lora.cover_alpaca2jsonl import format_example
    from chatglm_lora.evaluate import main as evaluate_main
    from chatglm_lora.tokenize_dataset_rows import main as tokenize_main
    from tuning.text_metrics import generation_metrics, score_corpus

    path, records = alpaca_file
    folder = tiny_model("chatglm-6b")
    code, out, err = run_in_process(tokenize_main, ["--jsonl_path", path, "--save_path", tmp_path / "rows",
                                                    "--max_seq_length", 96, "--chatglm_path", folder,
                                                    "--eval_fraction", 0.25, "--seed", 1])
    assert code == 0, err
    dev = sorted(held_out(N_ROWS, 0.25, 1))
    assert len(dev) == 3 and "held out 3 rows for evaluation" in out
    assert len(load_from_disk(str(tmp_path / "rows"))) == N_ROWS - 3

    output = tmp_path / "eval.json"
    code, out, err = run_in_process(evaluate_main, ["--chatglm_path", folder, "--lora_path", adapter, "--data_path",
                                                    path, "--eval_fraction", 0.25, "--seed", 1, "--batch_size", 2,
                                                    "--max_length", 96, "--output", output])
    assert code == 0, err
    result = json.loads(output.read_text(encoding="utf-8"))
    assert [p["line"] for p in result["predictions"]] == [i + 1 for i in dev]
    assert [p["prompt"] for p in result["predictions"]] == [format_example(records[i])["context"] for i in dev]
    assert [p["reference"] for p in result["predictions"]] == [records[i]["output"] for i in dev]
    assert set(result["scores"]) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
    assert out.splitlines()[0].startswith("metric") and f"scores and predictions: {output}" in out
    for name in result["scores"]:
        assert any(line.split()[:1] == [name] for line in out.splitlines())

    # The glm4 recipe's own metric path (token ids → decoded texts → scores) on the same texts gives the same numbers.
    predictions = [p["prediction"] for p in result["predictions"]]
    references = [p["reference"] for p in result["predictions"]]
    def encode(texts):
        return [glm4_tokenizer.encode(t, add_special_tokens=False) for t in texts]

    glm4_scores = generation_metrics(glm4_tokenizer, encode(predictions), encode([r.strip() for r in references]))
    assert glm4_scores == pytest.approx(result["scores"], abs=1e-9)
    assert result["scores"]["bleu-4"] > 0  # the tiny model says something; the match above is not 0 == 0 only
    half_right = [references[0], references[1][: len(references[1]) // 2], predictions[2]]
    assert generation_metrics(glm4_tokenizer, encode(half_right), encode(references)) == pytest.approx(
        score_corpus(half_right, references), abs=1e-9)
    assert 0 < score_corpus(half_right, references)["rouge-1"] < 100


@pytest.mark.slow
def test_eval_file_with_multi_turn_rows_and_one_line_errors(tmp_path, adapter, tiny_model):
    from chatglm_lora.evaluate import main as evaluate_main

    folder = tiny_model("chatglm-6b")
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"history": [["你好", "你好！"]], "context": "1+1等于几", "target": "2"}, ensure_ascii=False)
                   + "\n" + json.dumps({"instruction": "说一个颜色", "output": "红色"}, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    code, out, err = run_in_process(evaluate_main, ["--chatglm_path", folder, "--lora_path", adapter,
                                                    "--eval_file", dev, "--max_length", 64])
    assert code == 0, err
    with open(os.path.join(adapter, "eval_results.json"), encoding="utf-8") as f:
        result = json.load(f)
    assert result["rows"] == 2
    assert result["predictions"][0]["prompt"] == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：1+1等于几\n答："

    code, out, err = run_in_process(evaluate_main, ["--chatglm_path", folder, "--lora_path", adapter])
    assert code == 2 and "eval_file: give --eval_file, or --data_path with --eval_fraction" in err
    dev.write_text('{"context": "q"}\n', encoding="utf-8")
    code, out, err = run_in_process(evaluate_main, ["--chatglm_path", folder, "--lora_path", adapter,
                                                    "--eval_file", dev])
    assert code == 2 and err.strip().endswith("dev.jsonl:1: target: missing field; expected a string"), err
