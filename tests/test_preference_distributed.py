"""preference/train_dpo.py with 2 processes on CPU (gloo), as the SFT recipes' tests/test_distributed.py: DPO with a new
LoRA under torchrun (DDP) and under the deepspeed launcher with ZeRO-3, and full fine-tuning with its reference copy
under ZeRO-3 (torchrun + --deepspeed), each against a single-process run with the same global batch (2 ranks × 2
pairs = 1 process × 2 pairs × 2 accumulation steps), on tiny:chinese-alpaca-7b and the MSRA demonstration pairs.

Same tolerance and reasons as tests/test_distributed.py (its helpers are used here). Dropout, LoRA's included, is off
in every run without the runner's --no-lora-dropout: TRL's preference trainers disable it (disable_dropout=True).
Adapters and weights are compared to 1e-4 absolute: Adam divides each gradient by its own running size, so the
~1e-7 differences of the summation order move near-zero-gradient entries by up to ~1e-5 at these learning rates
(measured: DDP bit-equal, ZeRO-3 — DeepSpeed's AdamW from ds_zero_3.json — 1.1e-5 on weights of size up to 0.14).
The launches get PYTHONPATH=REPO, so the ranks import this checkout's code (from /work/main or any worktree alike).
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_in_process
from test_distributed import ZERO_3, assert_same_losses, launch, trainer_losses

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = os.path.join(REPO, "preference", "train_dpo.py")
LLAMA = "tiny:chinese-alpaca-7b"
STEPS = 3


def dpo_arguments(pairs, *extra) -> list[str]:
    return [f"--model_dir={LLAMA}", "--prompt_format=llama_ner", f"--train_path={pairs}", f"--max_steps={STEPS}",
            "--train_batch_size=2", "--max_length=256", "--log_steps=1", f"--save_steps={STEPS}", *extra]


WEIGHT_TOLERANCE = 1e-4


def assert_close_weights(tensors: dict, reference: dict, what: str) -> None:
    assert tensors.keys() == reference.keys() and all(t.numel() > 0 for t in tensors.values()), what
    assert all(t.shape == reference[k].shape for k, t in tensors.items()), what
    worst = max(float((t.float() - reference[k].float()).abs().max()) for k, t in tensors.items())
    assert worst <= WEIGHT_TOLERANCE, f"{what}: max absolute weight difference {worst:.2e}"


def single_process(pairs, save_dir, *extra) -> None:
    """The reference run in this process: 2 pairs × 2 accumulation steps per optimizer step."""
    from preference import train_dpo

    code, _, err = run_in_process(train_dpo.main, dpo_arguments(pairs, *extra, "--gradient_accumulation_steps=2",
                                                                f"--save_dir={save_dir}"))
    assert code == 0, err[-3000:]


def two_processes(launcher, pairs, save_dir, *extra) -> str:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", REPO)
        return launch(launcher, "script", SCRIPT, *dpo_arguments(pairs, *extra, f"--save_dir={save_dir}"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from preference import make_demo_pairs

    folder = tmp_path_factory.mktemp("pairs")
    make_demo_pairs.main(["--out_dir", str(folder), "--ner_pairs", "12", "--tool_pairs", "1"])
    return str(folder / "msra_ner_pairs.jsonl")


@pytest.fixture(scope="module")
def lora_runs(pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_lora")
    single_process(pairs, root / "single", "--learning_rate=2e-2")
    two_processes("torchrun", pairs, root / "ddp", "--learning_rate=2e-2")
    out = two_processes("deepspeed", pairs, root / "zero3", "--learning_rate=2e-2", f"--deepspeed={ZERO_3}")
    assert out.count("adapter: ") == 1  # rank 0 alone prints
    return root


def test_dpo_lora_ddp_and_zero3_equal_single_process_and_the_adapter_loads(lora_runs):
    from model_hub.loader import load_adapted

    single = trainer_losses(lora_runs / "single" / f"checkpoint-{STEPS}")
    assert_same_losses(single, trainer_losses(lora_runs / "ddp" / f"checkpoint-{STEPS}"), "DPO LoRA DDP vs 1 process")
    assert_same_losses(single, trainer_losses(lora_runs / "zero3" / f"checkpoint-{STEPS}"),
                       "DPO LoRA ZeRO-3 vs 1 process")
    adapters = {run: load_file(lora_runs / run / "adapter_model.safetensors") for run in ("single", "ddp", "zero3")}
    assert len(adapters["single"]) == 28  # q/k/v/o/gate/up/down × A/B × 2 layers: the "ref" copy is not saved
    assert any(t.abs().sum() > 0 for k, t in adapters["single"].items() if "lora_B" in k)  # it trained
    for run in ("ddp", "zero3"):  # ZeRO-3: gathered from both ranks' shards, none empty
        assert_close_weights(adapters[run], adapters["single"], f"{run} adapter")
    assert (lora_runs / "zero3" / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()
    model, _ = load_adapted(LLAMA, str(lora_runs / "zero3"))
    loaded = {n.replace(".default.", "."): p for n, p in model.named_parameters() if ".lora_" in n}
    assert all(torch.equal(loaded[k], t) for k, t in adapters["zero3"].items())


def test_full_dpo_under_zero3_partitions_the_reference_copy_and_saves_the_whole_model(pairs, tmp_path):
    """Full fine-tuning: the reference, a frozen copy of the start weights, partitioned by DeepSpeed as the policy
    (TRL's prepare_deepspeed); losses from step 2 on depend on it. The consolidated weights reload."""
    from transformers import AutoModelForCausalLM

    single_process(pairs, tmp_path / "single", "--finetuning_type=full", "--learning_rate=1e-3")
    two_processes("torchrun", pairs, tmp_path / "zero3", "--finetuning_type=full", "--learning_rate=1e-3",
                  f"--deepspeed={ZERO_3}")
    assert_same_losses(trainer_losses(tmp_path / "single" / f"checkpoint-{STEPS}"),
                       trainer_losses(tmp_path / "zero3" / f"checkpoint-{STEPS}"), "full DPO ZeRO-3 vs 1 process")
    weights = load_file(tmp_path / "zero3" / "model.safetensors")
    assert_close_weights(weights, load_file(tmp_path / "single" / "model.safetensors"), "full ZeRO-3 weights")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3")
    assert all(torch.equal(reloaded.state_dict()[k], weights[k].to(reloaded.dtype)) for k in weights)


def test_refusals_are_one_line_exit_2_and_write_nothing(pairs, lora_runs, tmp_path):
    from preference import train_dpo

    code, _, err = run_in_process(train_dpo.main, dpo_arguments(pairs, "--quantization_bit=4", f"--deepspeed={ZERO_3}",
                                                                f"--save_dir={tmp_path / 'q4'}"))
    assert (code, err.strip().splitlines()) == (2, [
        "error: quantization_bit: 4-bit base weights (bitsandbytes) cannot be partitioned by ZeRO-3; use a ZeRO-1/2 "
        "DeepSpeed config or drop quantization_bit"])
    assert not (tmp_path / "q4").exists()
    before = sorted(os.listdir(lora_runs / "zero3"))
    code, _, err = run_in_process(train_dpo.main, dpo_arguments(pairs, "--max_steps=4", f"--save_dir={lora_runs}/zero3",
                                                                "--resume_from_checkpoint=last"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].endswith("pass the same --deepspeed=CONFIG again"), err
    assert sorted(os.listdir(lora_runs / "zero3")) == before
