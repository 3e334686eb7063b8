"""A training run's output folder (issue 25, items 3 and 4): checkpoints are only ever replaced or rotated away
by the run that wrote them (or resumed from them), and one run at a time writes into a folder."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from llama_ner import train_trainer
from conftest import REPO
from test_nan_guard import train_path  # noqa: F401  (the fixture: 8 real MSRA rows)
from test_output_folders import run  # a script's main in-process: (exit code, stderr)

pytestmark = pytest.mark.slow  # tiny training runs
TRAIN = ["--model_dir=tiny:chinese-alpaca-7b", "--train_batch_size=2", "--save_steps=1", "--log_steps=1",
         "--learning_rate=1e-3", "--num_train_epochs=1"]


@pytest.fixture(scope="module")
def rows(train_path):
    return str(train_path)  # 8 real MSRA instruction rows


def train(rows, out, *extra, monkeypatch) -> tuple[int, str]:
    return run(train_trainer, [*TRAIN, f"--train_path={rows}", f"--save_dir={out}/", *extra], monkeypatch)


def checkpoints(out):
    return sorted((p for p in os.listdir(out) if p.startswith("checkpoint-")), key=lambda p: int(p.split("-")[1]))


def test_a_fresh_run_never_replaces_a_folder_named_like_its_checkpoint(rows, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "my_results.txt").write_text("mine")
    code, stderr = train(rows, out, "--max_steps=1", monkeypatch=monkeypatch)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: {out}/: already holds checkpoint-1 from an earlier run, which a new run would replace or rotate "
        "away: resume with --resume_from_checkpoint=last, or give another output folder")
    assert (out / "checkpoint-1" / "my_results.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == ["checkpoint-1"], "refused before anything was written"


def test_resume_rotates_only_its_own_checkpoints_and_refuses_another_runs(rows, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert train(rows, out, "--max_steps=2", "--save_total_limit=5", monkeypatch=monkeypatch)[0] == 0
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    other = tmp_path / "other"  # another run's checkpoint-7, copied in by hand
    assert train(rows, other, "--max_steps=1", monkeypatch=monkeypatch)[0] == 0
    shutil.copytree(other / "checkpoint-1", out / "checkpoint-7")
    code, stderr = train(rows, out, "--max_steps=4", "--save_total_limit=2", "--resume_from_checkpoint=2",
                         monkeypatch=monkeypatch)
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        f"error: {out}/: checkpoint-7 was written by another run than checkpoint-2; move it out of the output "
        "folder before resuming")
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-7"]
    shutil.move(out / "checkpoint-7", tmp_path / "kept-7")
    code, stderr = train(rows, out, "--max_steps=4", "--save_total_limit=2", "--resume_from_checkpoint=2",
                         monkeypatch=monkeypatch)
    assert code == 0, stderr
    assert checkpoints(out) == ["checkpoint-3", "checkpoint-4"]  # its own lineage rotated (1 and 2 were its own)


def test_rotation_leaves_another_runs_checkpoints(tmp_path):
    from tuning.checkpoints import rotate

    for step in (1, 2, 3, 7):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
        time.sleep(0.01)
    rotate(str(tmp_path), 1, {str(tmp_path / "checkpoint-3")}, {"checkpoint-1", "checkpoint-2", "checkpoint-3"})
    assert checkpoints(tmp_path) == ["checkpoint-3", "checkpoint-7"]


HOLD = "import sys, time; from tuning.run_folder import lock_output_dir; lock_output_dir(sys.argv[1]); " \
       "print('locked', flush=True); time.sleep(300)"


def test_a_second_run_into_a_locked_folder_names_the_holder_and_a_dead_holder_does_not_block(rows, tmp_path,
                                                                                            monkeypatch):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, stderr = train(rows, out, "--max_steps=1", monkeypatch=monkeypatch)
        assert code == 2 and "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {out}/: another run is writing to this output folder (pid {holder.pid} on ")
        assert os.listdir(out) == [".tuning-run.lock"], "the second run wrote nothing"
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without cleaning up: its lock file stays behind
        holder.wait()
    assert os.path.exists(out / ".tuning-run.lock")
    code, stderr = train(rows, out, "--max_steps=1", monkeypatch=monkeypatch)
    assert code == 0, stderr
    assert checkpoints(out) == ["checkpoint-1"]
