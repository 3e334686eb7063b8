"""Preference training (preference/, issue 34) on tiny models with the real tokenizers and the demonstration pairs
built from MSRA and AdvertiseGen: the ids and masks TRL trains on equal the SFT recipes' rows, a few DPO steps raise
the reward margin, the LoRA reference is the base (adapter disabled) or the SFT adapter it continues, only the
adapter trains, bad data is one line with exit code 2, and the result loads and serves like any adapter."""
import json
import os

import pytest
import torch

from conftest import run_in_process

from preference import make_demo_pairs, train_dpo
from preference.pairs import AnswerEncoder, tokenize_file

LLAMA, GLM4 = "tiny:chinese-alpaca-7b", "tiny:glm-4-9b-chat"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    make_demo_pairs.main(["--out_dir", str(folder), "--ner_pairs", "8", "--tool_pairs", "7"])
    return {"ner": str(folder / "msra_ner_pairs.jsonl"), "tools": str(folder / "glm4_tool_pairs.jsonl")}


def scored(batch) -> torch.Tensor:
    """The labels TRL's DPO loss scores (DPOTrainer._compute_loss: input_ids where completion_mask is 1)."""
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)


def collated(trainer, rows):
    return trainer.data_collator([{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in rows])


def sequence_logps(model, batch) -> torch.Tensor:
    """Sum of log p(token) over the scored tokens of each row (a plain forward, no fused head)."""
    labels = scored(batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(dim=1)


@pytest.fixture(scope="module")
def ner_run(pairs, tmp_path_factory):
    """DPO from the base with a new LoRA, llama_ner's prompt, 8 MSRA pairs, 4 steps; the base's log-probs first."""
    from model_hub.loader import load_adapted

    out = str(tmp_path_factory.mktemp("ner") / "dpo")
    base, tokenizer = load_adapted(LLAMA)
    rows, _ = tokenize_file(pairs["ner"], AnswerEncoder("llama_ner", tokenizer), 256)
    trainer = train_dpo.main(["--model_dir", LLAMA, "--prompt_format", "llama_ner", "--train_path", pairs["ner"],
                              "--save_dir", out, "--max_steps", "4", "--train_batch_size", "4", "--max_length", "256",
                              "--learning_rate", "2e-2", "--beta", "0.1", "--log_steps", "1", "--save_steps", "4"])
    batch = collated(trainer, rows)
    return {"out": out, "base": base, "tokenizer": tokenizer, "rows": rows, "trainer": trainer, "batch": batch,
            "base_logps": sequence_logps(base, batch), "pairs": pairs["ner"]}


def test_ner_rows_are_the_sft_rows_and_only_the_answer_is_scored(ner_run):
    """prompt + chosen = llama_ner's SFT input ids; scored = its trained labels after the "<s>" that ends the prompt."""
    from types import SimpleNamespace

    from llama_ner.dataset import NerCollate

    args = SimpleNamespace(instruct_column="instruct", query_column="query", response_column="answer",
                           max_seq_length=256)
    records = [json.loads(line) for line in open(ner_run["pairs"], encoding="utf-8")]
    batch, n = ner_run["batch"], len(records)
    labels = scored(batch)
    for i, record in enumerate(records):
        instruct, query = record["prompt"].split("\n文本：", 1)
        for half, answer in ((0, record["chosen"]), (n, record["rejected"])):
            sft_ids, sft_labels = NerCollate(args, ner_run["tokenizer"]).rows(
                [{"instruct": instruct, "query": "文本：" + query, "answer": answer}])[0]
            row = batch["input_ids"][half + i][batch["attention_mask"][half + i] == 1].tolist()
            assert row == sft_ids
            trained = [t for t in sft_labels if t != -100]
            assert trained[0] == ner_run["tokenizer"].bos_token_id
            assert [t for t in labels[half + i].tolist() if t != -100] == trained[1:]
            prompt_len = len(ner_run["rows"][i]["prompt_ids"])
            assert (labels[half + i][:prompt_len] == -100).all()



def test_a_few_dpo_steps_raise_the_margin_and_the_chosen_over_rejected_gap(ner_run):
    """On the training pairs: the policy's log p(chosen) − log p(rejected) grows against the base's (= the
    reference's), i.e. the DPO reward margin beta·(Δpolicy − Δreference) turns positive."""
    trainer, batch, n = ner_run["trainer"], ner_run["batch"], len(ner_run["rows"])
    policy = sequence_logps(trainer.model, batch)
    base = ner_run["base_logps"]
    gap_before = base[:n] - base[n:]
    gap_after = policy[:n] - policy[n:]
    margin = 0.1 * (gap_after - gap_before)
    assert margin.mean() > 0, margin
    assert (gap_after > gap_before).float().mean() >= 0.75, (gap_before, gap_after)
    logged = [e["rewards/margins"] for e in trainer.state.log_history if "rewards/margins" in e]
    assert len(logged) == 4 and logged[-1] > logged[0], logged


def test_the_lora_reference_is_the_base_with_the_adapter_disabled(ner_run):
    """TRL was given the base and a LoRA config (ref_model None): no reference copy; with the trained adapter
    disabled the policy gives exactly the base's logits, so the reference TRL computes is the base."""
    trainer, batch = ner_run["trainer"], ner_run["batch"]
    assert trainer.ref_model is None and set(trainer.model.peft_config) == {"default"}
    with torch.no_grad(), trainer.model.disable_adapter():
        disabled = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = ner_run["base"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        enabled = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(disabled, base)
    assert not torch.allclose(enabled, base)


def test_only_the_lora_weights_changed(ner_run):
    base_state = ner_run["base"].state_dict()
    trained = dict(ner_run["trainer"].model.named_parameters())
    lora_b = [p for name, p in trained.items() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it moved
    frozen = {name.replace("base_model.model.", "").replace(".base_layer", ""): p for name, p in trained.items()
              if "lora_" not in name}
    assert frozen and all(not p.requires_grad for p in frozen.values())
    for name, param in frozen.items():
        assert torch.equal(param, base_state[name]), name


def test_the_output_is_an_adapter_that_loads_with_its_prompt_format(ner_run):
    from model_hub.loader import load_adapted
    from model_hub.prompt_format import read_prompt_format

    out = ner_run["out"]
    names = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.model", "prompt_format.json",
            "loss.png", "margins.png", "checkpoint-4"} <= names and "ref" not in names
    assert read_prompt_format(out) == "llama_ner"
    loaded, _ = load_adapted(None, out)
    batch = ner_run["batch"]
    with torch.no_grad():
        expected = ner_run["trainer"].model(input_ids=batch["input_ids"][:2]).logits
        assert torch.allclose(loaded(input_ids=batch["input_ids"][:2]).logits, expected, atol=1e-5)


def test_bad_preference_data_is_one_line_exit_2_and_nothing_written(pairs, tmp_path):
    good = open(pairs["ner"], encoding="utf-8").read().splitlines()
    record = json.loads(good[1])
    del record["rejected"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good[0], json.dumps(record, ensure_ascii=False), *good[2:]]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    code, stdout, stderr = run_in_process(train_dpo.main, ["--model_dir", LLAMA, "--train_path", bad,
                                                           "--save_dir", out])
    assert code == 2
    assert stderr.strip().splitlines() == [f"error: {bad}:2: rejected: missing; expected the preferred (chosen) "
                                           "and the dispreferred (rejected) answer"]
    assert not out.exists()
    listed = tmp_path / "bad.json"
    listed.write_text(json.dumps([json.loads(good[0]), {**json.loads(good[2]), "chosen": 3}]), encoding="utf-8")
    code, _, stderr = run_in_process(train_dpo.main, ["--model_dir", LLAMA, "--train_path", listed,
                                                      "--check_only", "true"])
    assert (code, stderr.strip()) == (2, f"error: {listed}: record 2.chosen: expected a string or an assistant "
                                         "message object, got int")


def test_check_only_counts_drops_and_lengths_without_a_model(pairs, tmp_path):
    from model_hub.loader import load_tokenizer

    rows = [json.loads(line) for line in open(pairs["ner"], encoding="utf-8")]
    rows.append({**rows[0], "rejected": rows[0]["chosen"]})  # no preference: dropped
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    encoder = AnswerEncoder("llama_ner", load_tokenizer(LLAMA))
    lengths = sorted((len(encoder.prompt_ids([{"role": "user", "content": r["prompt"]}])),
                      max(len(encoder.answer_ids({"role": "assistant", "content": r[k]})) for k in ("chosen", "rejected")))
                     for r in rows[:-1])
    limit = lengths[2][0]  # the two shortest prompts fit, the others fill max_length
    kept = [(prompt, answer) for prompt, answer in lengths if prompt < limit]
    truncated = sum(prompt + answer > limit for prompt, answer in kept)
    code, stdout, _ = run_in_process(train_dpo.main, ["--model_dir", LLAMA, "--prompt_format", "llama_ner",
                                                      "--train_path", path, "--check_only", "true",
                                                      "--max_length", limit])
    assert code == 0
    report = [line for line in stdout.splitlines() if "rows read" in line][0]
    assert f"rows read {len(rows)}, kept {len(kept)}, dropped {len(rows) - len(kept)}, truncated {truncated}" in report
    assert "dropped (chosen equals rejected): 1" in stdout
    assert f"dropped (prompt fills max_length): {len(rows) - 1 - len(kept)}" in stdout
    assert "tokens per kept row (before the cut): p50" in stdout


@pytest.fixture(scope="module")
def glm4_run(pairs, tmp_path_factory):
    """An SFT LoRA on tiny GLM-4 (random, saved as glm4_finetune saves: adapter, tokenizer, prompt record), then 1
    DPO step on 2 tool-call pairs continuing it."""
    from peft import LoraConfig, get_peft_model

    from model_hub.loader import load_adapted
    from model_hub.prompt_format import record_prompt_format
    from model_hub.registry import get_family

    folder = tmp_path_factory.mktemp("glm4")
    sft = str(folder / "sft")
    base, tokenizer = load_adapted(GLM4)
    torch.manual_seed(0)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=list(get_family("glm4").lora_targets),
                      init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    record_prompt_format(sft, "glm4_chat", "glm4_finetune")
    sft_model, _ = load_adapted(None, sft)
    lines = open(pairs["tools"], encoding="utf-8").read().splitlines()
    records = [lines[0], lines[3]]  # a single-turn call and a multi-turn one (earlier call + observation + answer)
    train = folder / "tools.jsonl"
    train.write_text("\n".join(records) + "\n", encoding="utf-8")
    out = str(folder / "dpo")
    trainer = train_dpo.main(["--adapter", sft, "--train_path", str(train), "--save_dir", out, "--max_steps", "1",
                              "--train_batch_size", "2", "--max_length", "1024", "--learning_rate", "1e-2",
                              "--log_steps", "1", "--save_steps", "1"])
    rows, _ = tokenize_file(str(train), AnswerEncoder("glm4_chat", tokenizer), 1024)
    return {"sft": sft, "sft_model": sft_model, "tokenizer": tokenizer, "trainer": trainer, "out": out,
            "records": [json.loads(r) for r in records], "rows": rows, "batch": collated(trainer, rows)}


def test_glm4_multi_turn_scores_only_the_final_assistant_turn_as_sft(glm4_run):
    """prompt + chosen = glm4_finetune's SFT row (combine: false) of the whole conversation; the scored tokens are
    exactly that row's labels of the final assistant turn (its call and the <|user|> after it); the earlier
    assistant turns, trained by SFT, are not scored."""
    from glm4_finetune.data import ASSISTANT, process_batch

    batch, records, n = glm4_run["batch"], glm4_run["records"], len(glm4_run["records"])
    labels = scored(batch)
    multi_turn = 0
    for i, record in enumerate(records):
        for half, answer in ((0, record["chosen"]), (n, record["rejected"])):
            sft = process_batch({"messages": [[*record["messages"], answer]]}, glm4_run["tokenizer"], 10 ** 6, 0,
                                combine=False)
            sft_ids, sft_labels = sft["input_ids"][0], sft["labels"][0]
            row = batch["input_ids"][half + i][batch["attention_mask"][half + i] == 1].tolist()
            assert row == sft_ids
            last = len(sft_ids) - 1 - sft_ids[::-1].index(ASSISTANT)
            final_turn = [t if k > last else -100 for k, t in enumerate(sft_labels)]
            assert labels[half + i][:len(row)].tolist() == final_turn
            multi_turn += any(t != -100 for t in sft_labels[:last])
    assert multi_turn == 2  # the multi-turn pair (earlier call + observation + answer): its chosen and rejected


def test_continuing_an_sft_adapter_keeps_it_as_the_reference(glm4_run):
    """From a recipe's LoRA: TRL keeps a frozen copy of it ("ref") as the reference — its log-probs equal the SFT
    model's — while the adapter itself trains."""
    trainer, batch = glm4_run["trainer"], glm4_run["batch"]
    assert trainer.ref_model is None and set(trainer.model.peft_config) == {"default", "ref"}
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    sft = sequence_logps(glm4_run["sft_model"], batch)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), sft, atol=1e-3), (ref_chosen, sft)
    policy = sequence_logps(trainer.model, batch)
    assert not torch.allclose(policy, sft, atol=1e-3)
    trained = {n: p for n, p in trainer.model.named_parameters()}
    assert all(p.requires_grad == (".default." in n) for n, p in trained.items() if "lora_" in n)


def test_the_glm4_result_serves_with_tools_like_any_adapter(glm4_run):
    from serving.engine import Engine, Finished
    from serving.loading import load_for_serving
    from serving.sampling import SamplingParams

    out = glm4_run["out"]
    assert "ref" not in os.listdir(out)  # the frozen reference copy is not part of the result
    engine = Engine(load_for_serving(None, out), max_batch=2)
    try:
        assert engine.loaded.prompt_format == "glm4_chat"
        record = glm4_run["records"][0]
        from preference.pairs import openai_shape

        messages, tools = openai_shape(record["messages"])
        assert engine.prompt_ids(messages, tools) == glm4_run["rows"][0]["prompt_ids"]
        events = list(engine.generate(messages, SamplingParams(max_tokens=4, temperature=0), tools=tools))
        assert isinstance(events[-1], Finished) and events[-1].completion_tokens >= 1
    finally:
        engine.close()
