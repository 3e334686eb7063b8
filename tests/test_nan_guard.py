"""A non-finite loss stops training at once, names the step and the likely cause, leaves the weights of that step
untouched and the last good checkpoint/adapter usable: in a Trainer recipe (llama_ner/train_trainer.py) and in
the raw DeepSpeed loop (llama_ner/train_deepspeed.py). The NaN is forced by a learning rate of 1e30: step 1
throws the LoRA weights to ~1e30, so step 2's loss overflows."""
import io
import os
import sys
from contextlib import redirect_stderr

import pytest
import torch
from safetensors.torch import load_file

from llama_ner import train_trainer
from tuning.errors import run_main
from conftest import REPO

pytestmark = pytest.mark.slow
ARGS = ["--model_dir=tiny:chinese-alpaca-7b", "--train_batch_size=2", "--max_steps=4", "--save_steps=1",
        "--log_steps=1", "--learning_rate=1e30", "--num_train_epochs=1"]


@pytest.fixture(scope="module")
def train_path(tmp_path_factory):
    from llama_ner.process import process_msra

    root = tmp_path_factory.mktemp("nan_data")
    process_msra(os.path.join(REPO, "data", "llama_ner_msra", "ori_data", "msra_1000.txt"), str(root / "all.txt"))
    lines = (root / "all.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    (root / "train.txt").write_text("\n".join(lines[:8]), encoding="utf-8")
    return root / "train.txt"


def finite(folder):
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    return all(torch.isfinite(t).all() for t in tensors.values())


def test_trainer_recipe_stops_at_the_first_non_finite_step(train_path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train_trainer.py", *ARGS, f"--train_path={train_path}", f"--save_dir={out}/"])
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        run_main(train_trainer.main)
    assert exit_info.value.code == 1
    assert err.getvalue().strip().splitlines()[-1] == (
        "error: non-finite loss/gradients at step 2; lower the learning rate or check the data. Weights were not "
        f"updated; the last good checkpoint is {out}/checkpoint-1")
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1"]
    assert finite(out / "checkpoint-1")


def test_raw_deepspeed_loop_stops_at_the_first_non_finite_step(train_path, tmp_path):
    import subprocess

    out = tmp_path / "run"
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29631", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, os.path.join(REPO, "llama_ner", "train_deepspeed.py"), *ARGS,
                             f"--train_path={train_path}", f"--save_dir={out}/"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: non-finite loss at step 2; lower the learning rate or check the data. Weights were not updated; "
        f"the adapter saved at step 1 in {out}/ is intact")
    assert finite(out)
