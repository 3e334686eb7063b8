"""End to end on the tiny GLM-4 (real tokenizer, random weights) and real AdvertiseGen rows: LoRA, P-tuning v2
and full SFT train (loss falls), evaluate with the four metrics, save a final model that reloads with identical
logits, and resume from checkpoint-3 (`yes` and `N`) to exactly the uninterrupted run."""
import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuning.errors import NothingToDo

from folder_state import snapshot
from glm4_finetune.finetune import finetune
from glm4_finetune.inference import load_for_inference
from conftest import REPO

ADVERTISEGEN = os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen")
MODEL = "tiny:glm-4-9b-chat"
PEFT = {
    "lora": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1,
             "target_modules": ["q_proj", "k_proj", "v_proj"]},
    "ptuning": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8,
                "num_attention_heads": 2, "token_dim": 32},
    "sft": None,
}
LEARNING_RATE = {"lora": 5e-2, "ptuning": 3e-1, "sft": 3e-3}
WEIGHTS = {"lora": "adapter_model.safetensors", "ptuning": "adapter_model.safetensors", "sft": "model.safetensors"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two training rows (one batch: every step sees the same rows, so the loss must fall) and two dev rows."""
    folder = tmp_path_factory.mktemp("advertisegen")
    for name, source in (("train.jsonl", "xl.jsonl"), ("dev.jsonl", "dev.jsonl")):
        with open(os.path.join(ADVERTISEGEN, source), encoding="utf-8") as f:
            (folder / name).write_text("".join(f.readlines()[:2]), encoding="utf-8")
    return str(folder)


def write_config(path, method, output_dir, evaluate=True):
    config = {
        "data_config": {"train_file": "train.jsonl", "num_proc": 1,
                        **({"val_file": "dev.jsonl", "test_file": "dev.jsonl"} if evaluate else {})},
        "combine": True, "freezeV": True, "weights_dtype": "fp32", "max_input_length": 32, "max_output_length": 32,
        "training_args": {
            "output_dir": str(output_dir), "max_steps": 6, "learning_rate": LEARNING_RATE[method],
            "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "dataloader_num_workers": 0,
            "remove_unused_columns": False, "save_strategy": "steps", "save_steps": 3, "logging_steps": 1,
            "eval_strategy": "steps", "eval_steps": 6, "bf16": False, "use_cpu": True, "report_to": "none",
            "seed": 42, "log_level": "warning", "disable_tqdm": True, "predict_with_generate": True,
            "generation_config": {"max_new_tokens": 8},
        },
    }
    if PEFT[method]:
        config["peft_config"] = PEFT[method]
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return str(path)


def losses(trainer):
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("method, resume_modes", [("lora", ["yes", "3"]), ("ptuning", ["3"]), ("sft", ["yes"])])
def test_train_evaluate_reload_resume(method, resume_modes, data_dir, tmp_path):
    out = tmp_path / "run"
    trainer = finetune(data_dir, MODEL, write_config(tmp_path / "full.yaml", method, out))
    history = losses(trainer)
    assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1][1] < history[0][1] - 0.05, history

    # evaluation during training and on the test split: the four metrics, from generated answers
    evals = [e for e in trainer.state.log_history if "eval_rouge-1" in e]
    assert evals and {"eval_rouge-2", "eval_rouge-l", "eval_bleu-4"} <= set(evals[-1])
    with open(out / "test_results.json", encoding="utf-8") as f:
        assert {"test_rouge-1", "test_rouge-2", "test_rouge-l", "test_bleu-4"} <= set(json.load(f))
    assert len((out / "test_predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 2

    # the final model/adapter in output_dir reloads (as inference.py does) with identical logits
    ids = torch.tensor([[151331, 151333, 151336, 198, 2, 113180, 2, 104082, 151337]])
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()  # no autocast
    reloaded, _ = load_for_inference(str(out), dtype="fp32")
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, reloaded(input_ids=ids).logits)

    # resuming the finished run changes nothing (issue 23.2: it trained a 7th step and wrote checkpoint-7)
    before = snapshot(out)
    with pytest.raises(NothingToDo, match=f"^{out}/checkpoint-6 is already at step 6 \\(max_steps 6\\): nothing "
                                          "to train, nothing was changed; raise training_args.max_steps"):
        finetune(data_dir, MODEL, str(tmp_path / "full.yaml"), "yes")
    assert snapshot(out) == before

    # resuming from checkpoint-3 gives the uninterrupted run: same losses, same final weights
    final = load_file(str(out / WEIGHTS[method]))
    for mode in resume_modes:
        resumed_out = tmp_path / f"resume-{mode}"
        shutil.copytree(out / "checkpoint-3", resumed_out / "checkpoint-3")
        config = write_config(tmp_path / f"resume-{mode}.yaml", method, resumed_out, evaluate=False)
        resumed = finetune(data_dir, MODEL, config, mode)
        assert losses(resumed) == history
        again = load_file(str(resumed_out / WEIGHTS[method]))
        assert sorted(again) == sorted(final) and all(torch.equal(again[k], final[k]) for k in final)
