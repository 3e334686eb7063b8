"""The opt-in --group_by_length / --packing flags wired into the three recipes (tiny models, real rows, 2 steps):
the Trainer trains on packed rows drawn by the length-grouped sampler; P-tuning refuses packing. That packing and
grouping keep the loss is proven in tests/test_packing.py."""
import json
import os
import sys

import pytest
import torch
import yaml

from tuning.errors import UserError, run_main
from tuning.packing import LengthGroupedSampler, PackedRows
from conftest import REPO



def check_trainer(trainer, packed_key):
    assert isinstance(trainer.train_dataset, PackedRows)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    batch = next(iter(trainer.get_train_dataloader()))
    assert packed_key in batch and (batch["labels"] != -100).any()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_llama_ner_trains_packed_and_grouped(tmp_path, monkeypatch):
    from llama_ner import train_trainer

    lines = open(os.path.join(REPO, "data", "llama_ner_msra", "instruct_data", "dev.txt"), encoding="utf-8")
    (tmp_path / "train.txt").write_text("".join(lines.readlines()[:12]), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", [
        "x", "--model_dir=tiny:chinese-alpaca-7b", f"--train_path={tmp_path / 'train.txt'}", "--train_batch_size=4",
        "--max_steps=2", "--log_steps=1", "--save_steps=100", "--learning_rate=1e-3", f"--save_dir={tmp_path}/run/",
        "--max_seq_length=384", "--packing=true", "--group_by_length=true", "--lm_head_on_labels_only=true"])
    check_trainer(run_main(train_trainer.main), "position_ids")


def test_chatglm_lora_trains_packed_and_grouped(tmp_path, monkeypatch, capsys):
    from datasets import Dataset

    from chatglm_lora import finetune
    from chatglm_lora.tokenize_dataset_rows import fit_rows, read_rows, tokenize_rows
    from model_hub.loader import load_tokenizer

    tokenizer = load_tokenizer("tiny:chatglm-6b")
    rows = read_rows(os.path.join(REPO, "data", "chatglm_tuning", "alpaca_data.jsonl"))[:16]
    kept, _ = fit_rows(tokenize_rows(tokenizer, 130005, [r[1] for r in rows], [r[2] for r in rows], 64), 64, False)
    Dataset.from_list(kept).save_to_disk(str(tmp_path / "alpaca"))
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "x", "--dataset_path", str(tmp_path / "alpaca"), "--chatglm_path", "tiny:chatglm-6b", "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "100", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--use_cpu", "--report_to", "none", "--packing", "--group_by_length",
        "--lm_head_on_labels_only"])
    run_main(finetune.main)
    assert f"packing: {len(kept)} rows -> " in capsys.readouterr().out
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]


def write_config(path, out, peft):
    config = {"data_config": {"train_file": "train.jsonl", "num_proc": 1}, "combine": True, "freezeV": True,
              "weights_dtype": "fp32", "max_input_length": 64, "max_output_length": 64,
              "training_args": {"output_dir": str(out), "max_steps": 2, "learning_rate": 1e-3,
                                "per_device_train_batch_size": 2, "dataloader_num_workers": 0,
                                "remove_unused_columns": False, "save_strategy": "no", "logging_steps": 1,
                                "use_cpu": True, "report_to": "none", "seed": 42, "disable_tqdm": True,
                                "predict_with_generate": True, "generation_config": {"max_new_tokens": 8}},
              "peft_config": peft}
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_glm4_trains_packed_and_grouped_and_ptuning_refuses_packing(tmp_path):
    from glm4_finetune.finetune import finetune

    with open(os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen", "xl.jsonl"), encoding="utf-8") as f:
        (tmp_path / "train.jsonl").write_text("".join(f.readlines()[:10]), encoding="utf-8")
    lora = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1,
            "target_modules": ["q_proj", "k_proj", "v_proj"]}
    config = write_config(tmp_path / "lora.yaml", tmp_path / "run", lora)
    trainer = finetune(str(tmp_path), "tiny:glm-4-9b-chat", config, group_by_length=True, packing=True)
    check_trainer(trainer, "position_ids")
    prefix = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8,
              "num_attention_heads": 2, "token_dim": 32}
    with pytest.raises(UserError, match="P-tuning"):
        finetune(str(tmp_path), "tiny:glm-4-9b-chat", write_config(tmp_path / "pt.yaml", tmp_path / "pt", prefix),
                 packing=True)
