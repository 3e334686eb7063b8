"""preference/train_dpo.py resumes exactly (issue 34): a 4-step DPO run on the tiny Chinese-Alpaca (new LoRA, 6 MSRA
pairs, 2 per step: the resumed steps cross an epoch) is started as a real process and SIGKILLed once checkpoint-2 is
on disk; --resume_from_checkpoint=last (in-process) then ends with the adapter of an uninterrupted run bit for bit,
and the same loss and reward-margin log for steps 3-4."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from preference import make_demo_pairs, train_dpo
from test_crash_safety import CHILD_ENV, kill_when

pytestmark = pytest.mark.slow

ARGS = ["--model_dir=tiny:chinese-alpaca-7b", "--prompt_format=llama_ner", "--max_steps=4", "--save_steps=2",
        "--log_steps=1", "--train_batch_size=2", "--max_length=256", "--learning_rate=2e-2", "--save_total_limit=2"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume_pairs")
    make_demo_pairs.main(["--out_dir", str(folder), "--ner_pairs", "6", "--tool_pairs", "1"])
    return str(folder / "msra_ner_pairs.jsonl")


def logged(out, checkpoint="checkpoint-4") -> dict:
    with open(os.path.join(out, checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    return {e["step"]: (e["loss"], e["rewards/margins"]) for e in history if "loss" in e}


def test_killed_after_a_checkpoint_and_resumed_equals_an_uninterrupted_run(pairs, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    argv = [*ARGS, f"--train_path={pairs}"]
    train_dpo.main([*argv, f"--save_dir={full}"])

    # the same thread count as the in-process runs: a bit-identical comparison needs the same reduction order
    env = {**CHILD_ENV, "PYTHONPATH": REPO, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen([sys.executable, os.path.join(REPO, "preference", "train_dpo.py"), *argv,
                              f"--save_dir={resumed}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    kill_when(child, lambda _: (resumed / "checkpoint-2").is_dir())  # checkpoints appear whole (atomic rename)
    assert not (resumed / "checkpoint-4").exists() and not (resumed / "adapter_model.safetensors").exists()

    train_dpo.main([*argv, f"--save_dir={resumed}", "--resume_from_checkpoint=last"])
    a, b = logged(full), logged(resumed)
    assert sorted(a) == [1, 2, 3, 4] and [b[s] for s in (3, 4)] == [a[s] for s in (3, 4)]
    first, again = (load_file(os.path.join(out, "adapter_model.safetensors")) for out in (full, resumed))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(k.endswith("lora_B.weight") and first[k].abs().sum() > 0 for k in first)  # it trained
