"""Distributed training on CPU with 2 processes (gloo): every training entry point under torchrun and under the
deepspeed launcher, against single-process runs with the same global batch (2 ranks × 2 rows = 1 process ×
2 rows × 2 accumulation steps: the same micro-batches in the same order).

Tolerance of the loss comparisons: 1e-5 relative (measured differences are reported in the assertion messages).
fp32 all-reduce sums the two ranks' gradients in another order than one process accumulating them, matmuls run
with 1 thread per rank instead of 2, and Adam then carries these ~1e-7 relative differences into the next
steps; a real mistake (a wrong batch, a lost rank, a mis-scaled gradient, a differently initialised adapter)
changes the losses at 1e-3 or more from step 2 on. LoRA dropout is off in these comparisons (see
distributed_runner.py: with it, rank 1 draws rank 0's masks, so the runs differ by design).

Every job has a free MASTER_PORT and a timeout after which every rank dumps its stacks and the launcher and all
ranks are killed (a hang fails the test instead of blocking CI).
The first DeepSpeed job on a machine JIT-compiles the CPU comm op (~60 s) and the offload test cpu_adam
(~70 s); both are cached in TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_glm4_e2e import PEFT as GLM4_E2E_PEFT
from test_llama_ner_e2e import data as ner_data  # noqa: F401  (the same 40 MSRA rows as the e2e test; a fixture)
from conftest import REPO, run_in_process

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RUNNER = os.path.join(REPO, "tests", "distributed_runner.py")
BIN = os.path.dirname(sys.executable)
ZERO_2 = os.path.join(REPO, "glm4_finetune", "configs", "ds_zero_2.json")
ZERO_2_OFFLOAD = os.path.join(REPO, "glm4_finetune", "configs", "ds_zero_2_offload.json")
ZERO_3 = os.path.join(REPO, "glm4_finetune", "configs", "ds_zero_3.json")
RELATIVE_TOLERANCE = 1e-5
JOB_TIMEOUT = 300  # seconds; a first run also JIT-compiles DeepSpeed's CPU ops


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, *args: str, processes: int = 2) -> str:
    """Run RUNNER ARGS under `torchrun` or `deepspeed`; returns the output."""
    if launcher == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    else:
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(processes), "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.monotonic()
    proc = subprocess.Popen([*cmd, RUNNER, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_job(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"{launcher} job hung for {JOB_TIMEOUT} s and was killed:\n{out[-3000:]}")
    assert proc.returncode == 0, f"{launcher} job failed (exit {proc.returncode}):\n{out[-5000:]}"
    print(f"{launcher} job: {time.monotonic() - started:.1f} s")
    return out


def in_process(module, *argv: str) -> None:
    """The single-process reference run of a recipe's main(), in this process, LoRA dropout off as in the runner."""
    from distributed_runner import lora_without_dropout

    from tuning.errors import run_main

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [module.__file__, *argv])
        patch.setattr(module, "apply_lora", lora_without_dropout(module.apply_lora))
        run_main(module.main)


def kill_job(launcher_pid: int) -> None:
    """Every rank prints its Python stacks (faulthandler on SIGUSR1, see distributed_runner.py), so the output
    shows where it hung; then the launcher and every process below it are killed (torchrun starts the ranks in
    sessions of their own: killing the launcher's process group alone would leave them running)."""
    import psutil

    launcher = psutil.Process(launcher_pid)
    processes = [launcher, *launcher.children(recursive=True)]
    for process in processes[1:]:
        try:
            if RUNNER in " ".join(process.cmdline()):
                process.send_signal(signal.SIGUSR1)
        except psutil.Error:
            pass
    time.sleep(3)
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass


def trainer_losses(checkpoint) -> list[float]:
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        return [e["loss"] for e in json.load(f)["log_history"] if "loss" in e]


def assert_same_losses(reference: list[float], other: list[float], what: str) -> float:
    """Equal within RELATIVE_TOLERANCE; returns the largest relative difference."""
    assert len(reference) == len(other) and reference, (what, reference, other)
    worst = max(abs(a - b) / abs(a) for a, b in zip(reference, other))
    assert worst <= RELATIVE_TOLERANCE, f"{what}: max relative loss difference {worst:.2e}\n{reference}\n{other}"
    print(f"{what}: max relative loss difference {worst:.2e}")
    return worst


# ---------------------------------------------------------------- llama_ner: Trainer (DDP, ZeRO-2, resume)

NER_MODEL = "tiny:chinese-alpaca-7b"
NER_TRAIN = ["--model_dir=" + NER_MODEL, "--train_batch_size=2", "--max_steps=6", "--save_steps=3", "--log_steps=1",
             "--learning_rate=1e-2", "--save_total_limit=2", "--num_train_epochs=1"]


@pytest.fixture(scope="module")
def ner_runs(ner_data, tmp_path_factory):
    """train_trainer.py alone (2 rows × 2 accumulation), under torchrun (DDP) and under deepspeed (ZeRO-2)."""
    from llama_ner import train_trainer

    root = tmp_path_factory.mktemp("ner_runs")
    in_process(train_trainer, *NER_TRAIN, f"--train_path={ner_data / 'train.txt'}", "--gradient_accumulation_steps=2",
               f"--save_dir={root / 'single'}/")
    script = ["--no-lora-dropout", "script", os.path.join(REPO, "llama_ner", "train_trainer.py"), *NER_TRAIN,
              f"--train_path={ner_data / 'train.txt'}"]
    launch("torchrun", *script, f"--save_dir={root / 'ddp'}/")
    launch("deepspeed", *script, f"--deepspeed_jaon_path={ZERO_2}", f"--save_dir={root / 'zero2'}/")
    return root


def test_llama_ner_trainer_ddp_and_zero2_equal_single_process(ner_runs):
    single = trainer_losses(ner_runs / "single" / "checkpoint-6")
    assert_same_losses(single, trainer_losses(ner_runs / "ddp" / "checkpoint-6"), "llama_ner DDP vs 1 process")
    assert_same_losses(single, trainer_losses(ner_runs / "zero2" / "checkpoint-6"), "llama_ner ZeRO-2 vs 1 process")
    checkpoint = ner_runs / "zero2" / "checkpoint-6"
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert (checkpoint / "global_step6").is_dir()  # DeepSpeed's own partitioned optimizer state
    adapters = [load_file(ner_runs / run / "adapter_model" / "adapter_model.safetensors") for run in
                ("single", "ddp", "zero2")]
    assert all(t.abs().sum() > 0 for k, t in adapters[0].items() if "lora_B" in k)  # lora_B starts at 0: it trained
    for other in adapters[1:]:
        assert other.keys() == adapters[0].keys()
        assert all(torch.allclose(other[k], adapters[0][k], rtol=1e-4, atol=1e-6) for k in other)


def test_llama_ner_trainer_resumes_under_deepspeed(ner_runs, ner_data):
    """ZeRO-2 from checkpoint-3 (model, DeepSpeed optimizer partitions, scheduler, both ranks' RNG) = the
    uninterrupted run. (train_trainer.py uses DeepSpeed under the deepspeed launcher, DDP under torchrun.)"""
    import shutil

    resumed = ner_runs / "zero2_resumed"
    resumed.mkdir()
    shutil.copytree(ner_runs / "zero2" / "checkpoint-3", resumed / "checkpoint-3")
    launch("deepspeed", "--no-lora-dropout", "script", os.path.join(REPO, "llama_ner", "train_trainer.py"),
           *NER_TRAIN, f"--train_path={ner_data / 'train.txt'}", f"--deepspeed_jaon_path={ZERO_2}",
           f"--save_dir={resumed}/", "--resume_from_checkpoint=last")
    full = trainer_losses(ner_runs / "zero2" / "checkpoint-6")
    again = trainer_losses(resumed / "checkpoint-6")
    assert again[3:] == full[3:], (full, again)
    a = load_file(ner_runs / "zero2" / "adapter_model" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- llama_ner: the raw DeepSpeed engine loop

RAW_TRAIN = ["--model_dir=" + NER_MODEL, "--train_batch_size=2", "--gradient_accumulation_steps=2", "--max_steps=4",
             "--log_steps=1", "--save_steps=2", "--learning_rate=1e-2", "--save_total_limit=2"]


def raw_losses(output: str) -> dict[int, float]:
    found = {}
    for piece in output.replace("\r", "\n").split("\n"):
        if "loss:" in piece and "global_step:" in piece:
            loss, step = piece.split("loss:")[1].split(", global_step:")
            found[int(step.split("/")[0])] = float(loss)
    return found


def test_raw_engine_loop_trains_saves_and_resumes(ner_data, tmp_path):
    """torchrun, ZeRO-1 (deepspeed.json), 2 processes: adapter + DeepSpeed checkpoints at steps 2 and 4; the
    deepspeed launcher resumes from step 2 and logs the same losses for steps 3 and 4."""
    script = ["script", os.path.join(REPO, "llama_ner", "train_deepspeed.py"), *RAW_TRAIN,
              f"--train_path={ner_data / 'train.txt'}"]
    full = raw_losses(launch("torchrun", *script, f"--save_dir={tmp_path / 'full'}/"))
    assert sorted(full) == [1, 2, 3, 4]
    saved = tmp_path / "full"
    assert {"adapter_config.json", "adapter_model.safetensors", "train_args.json"} <= set(os.listdir(saved))
    b = [v for k, v in load_file(saved / "adapter_model.safetensors").items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)  # lora_B starts at zero: the optimizer really stepped
    for step in (2, 4):
        files = set(os.listdir(saved / "checkpoints" / f"global_step{step}"))
        assert {"rng_state_0.pth", "rng_state_1.pth", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files

    import shutil

    shutil.copytree(saved / "checkpoints", tmp_path / "resumed" / "checkpoints",
                    ignore=shutil.ignore_patterns("global_step4"))
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("global_step2")
    out = launch("deepspeed", *script, f"--save_dir={tmp_path / 'resumed'}/", "--resume_from_checkpoint=last")
    assert "at step 2" in out
    again = raw_losses(out)
    assert again == {3: full[3], 4: full[4]}, (full, again)
    a, b = load_file(saved / "adapter_model.safetensors"), load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- chatglm_lora: DDP and ZeRO-2

GLM6B_TRAIN = ["--chatglm_path", "tiny:chatglm-6b", "--lora_rank", "8", "--per_device_train_batch_size", "2",
               "--max_steps", "4", "--save_steps", "4", "--learning_rate", "5e-3", "--logging_steps", "1",
               "--seed", "0", "--dataloader_num_workers", "0", "--report_to", "none"]


@pytest.fixture(scope="module")
def chatglm_rows(tmp_path_factory):
    """16 alpaca rows tokenised by the recipe's own tokenize_dataset_rows.py."""
    from chatglm_lora.cover_alpaca2jsonl import format_example

    work = tmp_path_factory.mktemp("chatglm_rows")
    with open(os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json"), encoding="utf-8") as f:
        examples = json.load(f)[:16]
    with open(work / "rows.jsonl", "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(format_example(example), ensure_ascii=False) + "\n")
    subprocess.run([sys.executable, os.path.join(REPO, "chatglm_lora", "tokenize_dataset_rows.py"), "--jsonl_path",
                    str(work / "rows.jsonl"), "--save_path", str(work / "alpaca"), "--max_seq_length", "48",
                    "--chatglm_path", "tiny:chatglm-6b"], check=True, capture_output=True, cwd=REPO)
    return work / "alpaca"


def test_chatglm_lora_ddp_and_zero2_equal_single_process(chatglm_rows, tmp_path):
    script = ["--no-lora-dropout", "script", os.path.join(REPO, "chatglm_lora", "finetune.py"), *GLM6B_TRAIN,
              "--dataset_path", str(chatglm_rows)]
    from chatglm_lora import finetune

    in_process(finetune, *GLM6B_TRAIN, "--dataset_path", str(chatglm_rows), "--gradient_accumulation_steps", "2",
               "--output_dir", str(tmp_path / "single"))
    launch("torchrun", *script, "--output_dir", str(tmp_path / "ddp"))
    launch("deepspeed", *script, "--deepspeed", ZERO_2, "--output_dir", str(tmp_path / "zero2"))
    single = trainer_losses(tmp_path / "single" / "checkpoint-4")
    assert_same_losses(single, trainer_losses(tmp_path / "ddp" / "checkpoint-4"), "chatglm_lora DDP vs 1 process")
    assert_same_losses(single, trainer_losses(tmp_path / "zero2" / "checkpoint-4"), "chatglm_lora ZeRO-2 vs 1 process")
    for run in ("ddp", "zero2"):
        assert (tmp_path / run / "adapter_model.safetensors").is_file() and (tmp_path / run / "loss.png").is_file()


def test_chatglm_lora_refuses_8bit_with_zero3(chatglm_rows, tmp_path):
    """A config refusal: checked in this process, without a launch (issue 32)."""
    from chatglm_lora import finetune

    code, _, stderr = run_in_process(finetune.main, [*GLM6B_TRAIN, "--dataset_path", str(chatglm_rows), "--output_dir",
                                                     str(tmp_path / "out"), "--load_in_8bit", "true", "--deepspeed",
                                                     ZERO_3], script="chatglm_lora/finetune.py")
    assert code == 2
    assert stderr.strip().splitlines() == ["error: load_in_8bit: 8-bit base weights (bitsandbytes) cannot be "
                                                "partitioned by ZeRO-3; use a ZeRO-1/2 config (e.g. glm4_finetune/"
                                                "configs/ds_zero_2.json) or --load_in_8bit false"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- glm4_finetune: DDP, ZeRO-3 LoRA / SFT, offload

GLM4_MODEL = "tiny:glm-4-9b-chat"
GLM4_PEFT = {**GLM4_E2E_PEFT, "lora": {**GLM4_E2E_PEFT["lora"], "lora_dropout": 0.0}}


@pytest.fixture(scope="module")
def glm4_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("advertisegen")
    source = os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen", "xl.jsonl")
    with open(source, encoding="utf-8") as f:
        (folder / "train.jsonl").write_text("".join(f.readlines()[:8]), encoding="utf-8")
    return str(folder)


def glm4_config(folder, method, *, deepspeed=None, accumulation=1, steps=4, bf16=False):
    """bf16: autocast on fp32 master weights (what DeepSpeed's bf16 path is tested with); otherwise plain fp32, where
    precision is not the subject (a bf16 matmul is up to ~100x slower on a CPU without native bf16, AVX2 only)."""
    config = {
        "data_config": {"train_file": "train.jsonl", "num_proc": 1},
        "combine": True, "freezeV": True, "max_input_length": 32, "max_output_length": 32,
        "training_args": {
            "output_dir": str(folder), "max_steps": steps, "learning_rate": 3e-3 if method == "sft" else 5e-2,
            "per_device_train_batch_size": 2, "gradient_accumulation_steps": accumulation,
            "dataloader_num_workers": 0, "remove_unused_columns": False, "save_strategy": "steps",
            "save_steps": steps, "logging_steps": 1, "bf16": bf16, "report_to": "none", "seed": 42,
            "log_level": "warning", "disable_tqdm": True, "predict_with_generate": True,
            "generation_config": {"max_new_tokens": 4},
        },
    }
    if not bf16:
        config["weights_dtype"] = "fp32"
    if deepspeed:
        config["training_args"]["deepspeed"] = deepspeed
    if GLM4_PEFT[method]:
        config["peft_config"] = GLM4_PEFT[method]
    path = f"{os.path.normpath(folder)}.yaml"  # beside the output folder: a new run's folder holds only its output
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    return path


def test_glm4_lora_ddp_equals_single_process(glm4_data, tmp_path):
    """fp32 in both."""
    from glm4_finetune.finetune import finetune

    single = finetune(glm4_data, GLM4_MODEL, glm4_config(tmp_path / "single", "lora", accumulation=2))
    reference = [e["loss"] for e in single.state.log_history if "loss" in e]
    launch("torchrun", "glm4", str(tmp_path / "ddp.pt"), glm4_data, GLM4_MODEL, glm4_config(tmp_path / "ddp", "lora"))
    assert_same_losses(reference, trainer_losses(tmp_path / "ddp" / "checkpoint-4"), "glm4 LoRA DDP vs 1 process")


def test_glm4_zero3_lora_saves_the_gathered_adapter(glm4_data, tmp_path):
    """deepspeed launcher, ZeRO-3 (configs/ds_zero_3.json): the adapter in output_dir and in checkpoint-4 holds
    exactly the LoRA tensors gathered from both ranks' shards at the end of training, none empty."""
    out = tmp_path / "zero3"
    launch("deepspeed", "glm4", str(tmp_path / "dump.pt"), glm4_data, GLM4_MODEL,
           glm4_config(out, "lora", deepspeed=ZERO_3))
    gathered = torch.load(tmp_path / "dump.pt")["trainable"]
    assert gathered and all(t.numel() > 0 for t in gathered.values())
    for folder in (out, out / "checkpoint-4"):
        saved = load_file(folder / "adapter_model.safetensors")
        assert len(saved) == len(gathered) == 12  # q/k/v × A/B × 2 layers
        for name, tensor in gathered.items():
            key = name.replace(".default.", ".")
            assert saved[key].shape == tensor.shape and saved[key].numel() > 0
            assert torch.equal(saved[key], tensor.to(saved[key].dtype)), key
    assert any(t.abs().sum() > 0 for k, t in gathered.items() if "lora_B" in k)  # it trained


def test_glm4_zero3_full_sft_reloads_with_identical_logits(glm4_data, tmp_path):
    """torchrun, ZeRO-3 full SFT: the consolidated weights in output_dir (stage3_gather_16bit_weights_on_model_save)
    are exactly the parameters gathered from both ranks at the end of training, from_pretrained loads every one of
    them, and the reloaded model's logits equal those of a model built from the gathered parameters. The ZeRO-3
    forward inside the run (DeepSpeed's own linear function, bf16) agrees to bf16 rounding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distributed_runner import PROBE_IDS

    out = tmp_path / "sft"
    launch("torchrun", "glm4", str(tmp_path / "dump.pt"), glm4_data, GLM4_MODEL,
           glm4_config(out, "sft", deepspeed=ZERO_3, bf16=True))
    dump = torch.load(tmp_path / "dump.pt")
    gathered, run_logits = dump["trainable"], dump["logits"]
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == gathered.keys() and len(weights) == 25
    assert all(torch.equal(weights[k], gathered[k]) and weights[k].numel() > 0 for k in weights)
    dtype = next(iter(weights.values())).dtype  # DeepSpeed trained (and saved) in bf16
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    assert all(torch.equal(reloaded.state_dict()[k], gathered[k]) for k in gathered)
    built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=dtype).eval()
    built.load_state_dict(gathered)
    ids = torch.tensor(PROBE_IDS)
    with torch.no_grad():
        logits, expected = reloaded(input_ids=ids).logits.float(), built(input_ids=ids).logits.float()
    assert torch.equal(logits, expected)
    assert (logits - run_logits).abs().max() < 0.05, (logits - run_logits).abs().max()  # bf16: 1 ulp at |x|≈8


def test_glm4_zero2_offload_optimizer_trains(glm4_data, tmp_path):
    """torchrun + ZeRO-2 with offload_optimizer (DeepSpeedCPUAdam, JIT-compiled once)."""
    out = tmp_path / "offload"
    launch("torchrun", "glm4", str(tmp_path / "dump.pt"), glm4_data, GLM4_MODEL,
           glm4_config(out, "lora", deepspeed=ZERO_2_OFFLOAD, bf16=True))
    losses = trainer_losses(out / "checkpoint-4")
    assert len(losses) == 4 and all(loss == loss for loss in losses) and losses[-1] < losses[0]
    assert (out / "adapter_model.safetensors").is_file()


def test_glm4_refuses_zero3_with_ptuning(glm4_data, tmp_path):
    """A config refusal: checked in this process, without a launch (issue 32)."""
    from glm4_finetune import finetune

    code, _, stderr = run_in_process(finetune.app, [glm4_data, GLM4_MODEL, glm4_config(tmp_path / "pt", "ptuning",
                                                                                      deepspeed=ZERO_3)],
                                     script="glm4_finetune/finetune.py")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "training_args.deepspeed: ZeRO-3 with P-tuning v2" \
        in lines[0] and lines[0].endswith("use configs/ds_zero_2.json"), stderr
    assert not (tmp_path / "pt").exists()
