"""Default input paths name the repository's files wherever a script is run from, and a missing default is one
line that says where it was looked for, how to make it and which flag points elsewhere (issue 23.4 and 23.8)."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tuning.errors import UserError
from tuning.files import default_input
from conftest import REPO



def test_default_input(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text("[]")
    assert default_input("data/a.json", "data/a.json", str(tmp_path), "--data_path", "x") == str(tmp_path / "data/a.json")
    assert default_input("mine.json", "data/a.json", str(tmp_path), "--data_path", "x") == "mine.json"  # as given
    with pytest.raises(UserError) as exc:
        default_input("data/b.json", "data/b.json", str(tmp_path), "--data_path", "run make_b.py")
    assert str(exc.value) == f"{tmp_path}/data/b.json: file not found (the default of --data_path); run make_b.py, " \
                             "or pass --data_path"


def test_llama_ner_missing_default_says_run_process_first(tmp_path, monkeypatch):
    from llama_ner import common

    monkeypatch.setattr(common, "REPO", str(tmp_path))
    args = SimpleNamespace(train_path=common.BASE_CONFIG["train_path"])
    with pytest.raises(UserError) as exc:
        common.resolve_data_paths(args, common.BASE_CONFIG, ("train_path",))
    assert str(exc.value) == (f"{tmp_path}/build/llama-ner/instruct_data/train.txt: file not found (the default of "
                              "--train_path); run `python llama_ner/process.py` first (it writes "
                              "build/llama-ner/instruct_data/), or pass --train_path")


@pytest.mark.slow
def test_llama_ner_run_from_inside_its_folder(tmp_path):
    """`cd llama_ner && python process.py && python train_trainer.py`, as the original's layout invites: the
    training script finds the rows process.py wrote (it stops only at the model folder, which is not there)."""
    folder = os.path.join(REPO, "llama_ner")
    env = {**os.environ, "PYTHONPATH": REPO}
    made = subprocess.run([sys.executable, "process.py"], cwd=folder, capture_output=True, text=True, env=env,
                          timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    trained = subprocess.run([sys.executable, "train_trainer.py", "--model_dir=/nonexistent/model",
                              f"--save_dir={tmp_path}/run/"], cwd=folder, capture_output=True, text=True, env=env,
                             timeout=300)
    assert trained.returncode == 2
    assert trained.stderr.strip().splitlines()[-1].startswith("error: /nonexistent/model: model folder not found")
    assert not os.path.exists(tmp_path / "run")
