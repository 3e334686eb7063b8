"""Crash safety of the training recipes (tuning/checkpoints.py): real SIGKILLs from outside, at two points.

For LoRA on chatglm_lora and llama_ner (Trainer) and P-tuning v2 on glm4_finetune, a 6-step run saving every 2
steps is started as a real process and
  A. killed mid-step: when its log shows step 3 done, i.e. while step 4 computes (checkpoint-2 is on disk);
  B. resumed with "last" and killed mid-save: the moment the staging folder .saving-checkpoint-4 appears;
     the kill must leave that staging folder behind (proof it hit the save) and no checkpoint-4;
  C. resumed with "last" again (in-process) to the end.
The final weights must be bit-identical to an uninterrupted run (in-process, one per recipe). For chatglm_lora,
between B and C, a resume under a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG) must
fail the save of checkpoint-4 with one line naming checkpoint-2 as the last good one, exit 1 and leave no trace
of checkpoint-4; C then shows that resuming from checkpoint-2 still reaches the same final weights.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuning.errors import run_main
from conftest import REPO

pytestmark = pytest.mark.slow
CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- the three recipes: how to start a run, where its checkpoints and final weights are ---------------------

def chatglm_argv(data, out, resume=None):
    argv = ["--dataset_path", str(data / "chatglm_ds"), "--chatglm_path", "tiny:chatglm-6b", "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "2",
            "--learning_rate", "5e-3", "--logging_steps", "1", "--use_cpu", "--seed", "0",
            "--dataloader_num_workers", "0", "--report_to", "none", "--disable_tqdm", "true"]
    return argv + (["--resume_from_checkpoint", resume] if resume else [])


def llama_argv(data, out, resume=None):
    argv = ["--model_dir=tiny:chinese-alpaca-7b", f"--train_path={data / 'ner_train.txt'}", f"--save_dir={out}/",
            "--train_batch_size=2", "--max_steps=6", "--save_steps=2", "--log_steps=1", "--learning_rate=1e-2",
            "--save_total_limit=2", "--num_train_epochs=1"]
    return argv + ([f"--resume_from_checkpoint={resume}"] if resume else [])


def glm4_argv(data, out, resume=None):
    config = {
        "data_config": {"train_file": "train.jsonl", "num_proc": 1}, "combine": True, "max_input_length": 32,
        "max_output_length": 32, "weights_dtype": "fp32",
        "training_args": {"output_dir": str(out), "max_steps": 6, "learning_rate": 3e-1,
                          "per_device_train_batch_size": 2, "dataloader_num_workers": 0,
                          "remove_unused_columns": False, "save_strategy": "steps", "save_steps": 2,
                          "save_total_limit": 2, "logging_steps": 1, "bf16": False, "use_cpu": True,
                          "report_to": "none", "seed": 42, "disable_tqdm": True, "predict_with_generate": True,
                          "generation_config": {"max_new_tokens": 8}},
        "peft_config": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8,
                        "num_attention_heads": 2, "token_dim": 32},
    }
    path = f"{out}.yaml"
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    return [str(data / "glm4"), "tiny:glm-4-9b-chat", path] + (["yes" if resume == "last" else resume] if resume else [])


RECIPES = {
    "chatglm_lora": ("chatglm_lora/finetune.py", chatglm_argv, "adapter_model.safetensors"),
    "llama_ner": ("llama_ner/train_trainer.py", llama_argv, "adapter_model/adapter_model.safetensors"),
    "glm4_ptuning": ("glm4_finetune/finetune.py", glm4_argv, "adapter_model.safetensors"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny datasets for the three recipes (8 alpaca rows, 16 NER rows, 4 AdvertiseGen conversations)."""
    from chatglm_lora.cover_alpaca2jsonl import format_example
    from llama_ner.process import process_msra

    root = tmp_path_factory.mktemp("crash_data")
    with open(os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json"), encoding="utf-8") as f:
        rows = [format_example(e) for e in json.load(f)[:8]]
    with open(root / "rows.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", ["x", "--jsonl_path", str(root / "rows.jsonl"), "--save_path", str(root / "chatglm_ds"),
                                 "--max_seq_length", "48", "--chatglm_path", "tiny:chatglm-6b"])
        from chatglm_lora import tokenize_dataset_rows

        run_main(tokenize_dataset_rows.main)
    finally:
        mp.undo()
    process_msra(os.path.join(REPO, "data", "llama_ner_msra", "ori_data", "msra_1000.txt"), str(root / "all.txt"))
    lines = (root / "all.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    (root / "ner_train.txt").write_text("\n".join(lines[:12] + lines[-4:]), encoding="utf-8")
    (root / "glm4").mkdir()
    with open(os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen", "xl.jsonl"), encoding="utf-8") as f:
        (root / "glm4" / "train.jsonl").write_text("".join(f.readlines()[:4]), encoding="utf-8")
    from model_hub.make_tiny import tiny_dir

    for name in ("chatglm-6b", "chinese-alpaca-7b", "glm-4-9b-chat"):
        tiny_dir(name)
    return root


def run_in_process(recipe, argv):
    script, _, _ = RECIPES[recipe]
    module = {"chatglm_lora": "chatglm_lora.finetune", "llama_ner": "llama_ner.train_trainer",
              "glm4_ptuning": "glm4_finetune.finetune"}[recipe]
    import importlib

    main = importlib.import_module(module)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", [script, *argv])
        try:
            run_main(getattr(main, "app", None) or main.main)
        except SystemExit as exc:
            assert exc.code in (0, None), f"{recipe} exited with {exc.code}"
    finally:
        mp.undo()


def start(recipe, argv, preexec_fn=None):
    script = RECIPES[recipe][0]
    # The child computes with as many threads as this process's in-process runs (read now, not at import: conftest
    # pins 1 per worker under `make test`): a bit-identical comparison needs the same reduction order.
    env = {**CHILD_ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}

    def lowest_priority_then(setup=None):
        # The child runs at nice 19, so on a loaded machine this process (and its output reader) gets the core the
        # moment a line arrives: a kill meant for step 4's ~0.2 s landed after the run had ended (CI, 2 busy cores).
        os.nice(19)
        if setup:
            setup()

    return subprocess.Popen([sys.executable, os.path.join(REPO, script), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: lowest_priority_then(preexec_fn))


def kill_when(proc, condition, timeout=300) -> str:
    """SIGKILL `proc` the moment condition(output so far) holds; the run must not have ended on its own."""
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if condition("".join(lines)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and time.time() >= deadline:
            proc.kill()
        proc.wait()
        reader.join(timeout=10)
    output = "".join(lines)
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself ({proc.returncode}):\n{output[-3000:]}"
    return output


def weights(path):
    return load_file(str(path))


def assert_identical(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def checkpoints(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run per recipe (in-process), run on first use."""
    done = {}

    def get(recipe):
        if recipe not in done:
            out = tmp_path_factory.mktemp(f"ref_{recipe}") / "run"
            run_in_process(recipe, RECIPES[recipe][1](data, out))
            done[recipe] = weights(out / RECIPES[recipe][2])
        return done[recipe]

    return get


def steps_logged(output: str) -> int:
    return output.count("'loss'")


def limit_file_size(limit=20_000):  # default: chatglm tiny's optimizer.pt (37 kB) fails
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit raise OSError(EFBIG) instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def out_of_space_save(data, out):
    """Resume under a file-size limit: the save of checkpoint-4 fails; checkpoint-2 stays the good one."""
    good = (out / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    proc = start("chatglm_lora", chatglm_argv(data, out, "last"), preexec_fn=limit_file_size)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1] == (
        "error: saving checkpoint-4 failed (a file write failed: disk full or over a file-size limit); nothing of "
        f"it was kept. {out}/checkpoint-2 is the last good checkpoint; free space and resume with "
        "--resume_from_checkpoint last")
    assert checkpoints(out) == ["checkpoint-2"] and not (out / ".saving-checkpoint-4").exists()
    assert (out / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == good


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_killed_mid_step_and_mid_save_resumes_bit_identical(recipe, data, reference, tmp_path):
    _, argv_for, final = RECIPES[recipe]
    out = tmp_path / "run"
    # A. killed while step 4 computes (step 3 logged; checkpoint-2 written)
    kill_when(start(recipe, argv_for(data, out)), lambda output: steps_logged(output) >= 3)
    assert checkpoints(out) == ["checkpoint-2"]
    assert os.path.isfile(out / "checkpoint-2" / "trainer_state.json")
    # B. resumed from the newest checkpoint, killed in the middle of saving checkpoint-4
    staging = out / ".saving-checkpoint-4"
    kill_when(start(recipe, argv_for(data, out, "last")), lambda output: staging.exists())
    assert staging.exists(), "the kill did not land inside the save"
    assert checkpoints(out) == ["checkpoint-2"], "a half-written checkpoint-4 must never be visible"
    if recipe == "chatglm_lora":  # B2. (one recipe) a save that runs out of space
        out_of_space_save(data, out)
    # C. resumed again: from checkpoint-2 (the staging leftovers are cleared), to the end
    run_in_process(recipe, argv_for(data, out, "last"))
    assert not staging.exists() and checkpoints(out) == ["checkpoint-4", "checkpoint-6"]
    assert_identical(weights(out / final), reference(recipe))


def test_a_final_save_that_runs_out_of_space_keeps_the_previous_files(data, tmp_path):
    """glm4_finetune's final trainer.save_model() under a 1 MB file-size limit (tokenizer.json is 20 MB): one line,
    exit 1, and the adapter and tokenizer files of the earlier run in output_dir are left as they were."""
    out = tmp_path / "run"
    argv = glm4_argv(data, out)
    with open(argv[2], encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config["training_args"].update(max_steps=2, save_strategy="no")
    with open(argv[2], "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    first = start("glm4_ptuning", argv)
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output[-3000:]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("loss.png", ".tuning-run.lock")}
    assert "adapter_model.safetensors" in before and "tokenizer.json" in before

    config["training_args"]["seed"] = 7  # another run: other weights would be written
    with open(argv[2], "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    second = start("glm4_ptuning", argv, preexec_fn=lambda: limit_file_size(1_000_000))
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1] == (
        f"error: saving the final weights into {out} failed (a file write failed: disk full or over a file-size "
        "limit); the files there before were kept")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("loss.png", ".tuning-run.lock")} == before
