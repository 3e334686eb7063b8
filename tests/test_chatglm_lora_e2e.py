"""chatglm_lora end to end on the tiny ChatGLM-6B: tokenize real alpaca rows, train LoRA, checkpoints are
PEFT adapters, resume is exact, batched inference equals one-by-one."""
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from folder_state import snapshot
from conftest import REPO, run_in_process, run_script

pytestmark = pytest.mark.slow


def run(script, *args):
    return run_script(os.path.join("chatglm_lora", script), *args, check=True)


TRAIN = ["--chatglm_path", "tiny:chatglm-6b", "--lora_rank", "8", "--per_device_train_batch_size", "4", "--max_steps",
         "6", "--save_steps", "3", "--learning_rate", "5e-3", "--logging_steps", "1", "--use_cpu", "--seed", "0",
         "--dataloader_num_workers", "0", "--report_to", "none"]


def train(dataset, out, *extra):
    """The fixture's run: finetune.py as a user types it (a new process; its torch threads = this worker's)."""
    return run("finetune.py", "--dataset_path", dataset, "--output_dir", out, *TRAIN, *extra)


def train_in_process(dataset, out, *extra) -> tuple[str, str]:
    """Later runs (resume, a finished run) in this process: the CLI path is the fixture's run (issue 32)."""
    from chatglm_lora.finetune import main

    code, stdout, stderr = run_in_process(main, ["--dataset_path", dataset, "--output_dir", out, *TRAIN, *extra],
                                          script="chatglm_lora/finetune.py")
    assert code == 0, stderr[-3000:]
    return stdout, stderr


def losses(out):
    with open(os.path.join(out, "checkpoint-6", "trainer_state.json"), encoding="utf-8") as f:
        return [e["loss"] for e in json.load(f)["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("chatglm_lora")
    with open(os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json"), encoding="utf-8") as f:
        examples = json.load(f)[:8]
    json.dump(examples, open(work / "alpaca.json", "w", encoding="utf-8"))
    run("cover_alpaca2jsonl.py", "--data_path", str(work / "alpaca.json"), "--save_path", str(work / "rows.jsonl"))
    run("tokenize_dataset_rows.py", "--jsonl_path", str(work / "rows.jsonl"), "--save_path", str(work / "alpaca"),
        "--max_seq_length", "64", "--chatglm_path", "tiny:chatglm-6b")
    result = train(str(work / "alpaca"), str(work / "full"))
    (work / "train.stderr").write_text(result.stderr, encoding="utf-8")
    return work


def adapter_logits(adapter_dir, input_ids):
    from peft import PeftModel

    from model_hub.loader import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny:chatglm-6b")
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_training_writes_adapter_checkpoints_and_loss_falls(workdir):
    full = workdir / "full"
    history = losses(str(full))
    assert len(history) == 6 and history[-1] < history[0]
    for step in (3, 6):
        ckpt = full / f"checkpoint-{step}"
        assert (ckpt / "adapter_config.json").exists() and (ckpt / "adapter_model.safetensors").exists()
    assert (full / "adapter_model.safetensors").exists() and (full / "loss.png").exists()
    # Issue 23 (Also): a run prints no library warnings a user cannot act on (transformers' deprecated
    # gradient_checkpointing_enable, peft's is_gradient_checkpointing, DeepSpeed's accelerator probe).
    stderr = (workdir / "train.stderr").read_text(encoding="utf-8")
    assert "Warning" not in stderr and "[WARNING]" not in stderr, stderr[-2000:]
    # The last checkpoint and the final adapter are the same weights: identical logits.
    ids = torch.tensor([[5, 74874, 130001, 130004, 5, 100, 200]])
    assert torch.equal(adapter_logits(str(full / "checkpoint-6"), ids), adapter_logits(str(full), ids))
    # ... and training changed the output of the base model.
    assert not torch.equal(adapter_logits(str(full / "checkpoint-3"), ids), adapter_logits(str(full), ids))


def test_resume_reproduces_the_uninterrupted_run(workdir):
    from safetensors.torch import load_file

    resumed = str(workdir / "resumed")
    train_in_process(str(workdir / "alpaca"), resumed, "--resume_from_checkpoint", str(workdir / "full" / "checkpoint-3"))
    assert losses(resumed)[3:] == losses(str(workdir / "full"))[3:]
    a = load_file(os.path.join(resumed, "adapter_model.safetensors"))
    b = load_file(str(workdir / "full" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_changes_nothing(workdir, tmp_path):
    """Issue 23.2: the same command again with --resume_from_checkpoint last must not train a 7th step (which
    wrote checkpoint-7); a raised --max_steps trains exactly up to it."""
    run_dir = tmp_path / "finished"
    shutil.copytree(workdir / "full", run_dir)
    before = snapshot(run_dir)
    stdout, _ = train_in_process(str(workdir / "alpaca"), str(run_dir), "--resume_from_checkpoint", "last")
    assert f"{run_dir}/checkpoint-6 is already at step 6 (max_steps 6): nothing to train, nothing was changed; " \
           "raise --max_steps to train further" in stdout
    assert snapshot(run_dir) == before

    _, stderr = train_in_process(str(workdir / "alpaca"), str(run_dir), "--resume_from_checkpoint", "last",
                                 "--max_steps", "8")
    # No library lines on a resume either: in this process pytest records Python's warnings itself, so this catches
    # the libraries' logging lines; the fixture's CLI run checks both on a fresh start.
    assert "Warning" not in stderr and "[WARNING]" not in stderr, stderr[-2000:]
    assert sorted(os.listdir(run_dir / "checkpoint-8")) == sorted(os.listdir(run_dir / "checkpoint-6"))
    assert not [p for p in os.listdir(run_dir) if p.startswith("checkpoint-") and p not in
                ("checkpoint-3", "checkpoint-6", "checkpoint-8")]
    with open(run_dir / "checkpoint-8" / "trainer_state.json", encoding="utf-8") as f:
        state = json.load(f)
    assert state["global_step"] == 8 and [e["step"] for e in state["log_history"] if "loss" in e][-3:] == [6, 7, 8]


def test_batched_inference_equals_one_by_one(workdir):
    from peft import PeftModel

    from chatglm_lora.cover_alpaca2jsonl import format_example
    from chatglm_lora.infer import generate_ids
    from model_hub.loader import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny:chatglm-6b")
    model = PeftModel.from_pretrained(model, str(workdir / "full")).eval()
    with open(os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json"), encoding="utf-8") as f:
        prompts = [format_example(e)["context"] for e in json.load(f)[:5]]
    one_by_one = generate_ids(model, tokenizer, prompts, max_length=60, batch_size=1)
    batched = generate_ids(model, tokenizer, prompts, max_length=60, batch_size=5)
    assert batched == one_by_one
    assert len({tuple(ids) for ids in one_by_one}) > 1 and all(one_by_one)  # real, differing generations


def test_infer_cli_prints_answers_next_to_references(workdir):
    from chatglm_lora.infer import main

    code, stdout, stderr = run_in_process(main, [
        "--chatglm_path", "tiny:chatglm-6b", "--lora_path", workdir / "full", "--data_path",
        os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json"), "--num", "2", "--max_length", "40"])
    assert code == 0, stderr[-2000:]
    assert stdout.count("\nAnswer: ") == 2 and stdout.count("### ") == 2 and "Reference: 1.Eat a balanced diet" in stdout


def test_readme_inference_command_finds_the_shipped_alpaca(workdir, tmp_path):
    """Issue 23.4: the README's `infer.py --chatglm_path … --lora_path output` (no --data_path) failed with
    `data/alpaca_data.json: file not found`; the default is the repository's alpaca file, from any folder."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "chatglm_lora", "infer.py"), "--chatglm_path",
                             "tiny:chatglm-6b", "--lora_path", str(workdir / "full"), "--num", "1", "--max_length",
                             "40"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "### 1\nInstruction: Give three tips for staying healthy." in result.stdout


def test_fp16_on_cpu_is_refused(workdir):
    from chatglm_lora.finetune import main

    code, _, stderr = run_in_process(main, ["--dataset_path", workdir / "alpaca", "--output_dir", workdir / "x",
                                            "--fp16", "--use_cpu"], script="chatglm_lora/finetune.py")
    assert code == 2 and "fp16 is not supported on CPU" in stderr


def test_infer_interactive_chat_keeps_history(workdir, monkeypatch):
    from chatglm_lora.infer import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n再说一遍\nclear\nexit\n"))
    code, stdout, stderr = run_in_process(main, ["--chatglm_path", "tiny:chatglm-6b", "--lora_path", workdir / "full",
                                                 "--interactive", "--max_new_tokens", "8"])
    assert code == 0, stderr[-2000:]
    assert stdout.count("ChatGLM: ") == 2 and "'clear' forgets the history" in stdout


def test_trained_checkpoint_exports_to_the_same_model(workdir):
    """A Trainer checkpoint-N of the recipe, merged by `python -m model_hub.export` (issue 19)."""
    from transformers import AutoModelForCausalLM

    out = workdir / "merged"
    from model_hub.export import main

    code, _, stderr = run_in_process(main, [workdir / "full" / "checkpoint-6", out, "--dtype", "fp32"],
                                     script="python -m model_hub.export")
    assert code == 0, stderr[-3000:]
    ids = torch.tensor([[5, 74874, 130001, 130004, 5, 100, 200]])
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
    assert (logits - adapter_logits(str(workdir / "full" / "checkpoint-6"), ids)).abs().max() <= 1e-4
