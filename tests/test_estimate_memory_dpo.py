"""model_hub.estimate_memory's preference rows (issue 34): the DPO / ORPO / KTO arithmetic on the real configs, the
table of the three real models, and a DPO row checked against the measured peak of a few DPO steps on a tiny model.

The measured check: full fine-tuning with a frozen reference copy (the row whose parts are all arithmetic on the
weights: reference copy, gradients, AdamW moments, the fused head's fp32 output-layer gradient) on a GLM-4 twin with
the real 151,552-token vocabulary, in fp32 on the CPU, in a child process (not timed). The growth of its resident
memory over a baseline taken before the reference copy is made must be within 15% of the estimate without the
policy's weights (already resident) and without the CUDA context — the tolerance of the SFT rows (bench 6).
"""
import json
import os
import subprocess
import sys

import pytest

from model_hub import estimate_memory as em
from conftest import REPO

MIB = 2**20
TOLERANCE = 0.15
SIZES = dict(hidden_size=256, ffn_hidden_size=512, num_layers=2, num_attention_heads=4, multi_query_group_num=2,
             kv_channels=64)
PAIRS, SEQ, STEPS = 1, 32, 3

# VmHWM of this process (not getrusage's ru_maxrss, which Linux carries over exec from the parent, the big pytest).
MEASURE = r"""
import copy, json, sys
import torch
import model_hub, trl  # noqa: F401  (module code before the baseline)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig
from preference.trainers import PreferenceDPOTrainer

def status(key):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024

folder, out, pairs, seq, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
torch.manual_seed(0)
torch.set_num_threads(1)
loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
model = copy.deepcopy(loaded)  # weights in anonymous memory: the loaded ones map the file and count only once read
del loaded
tokenizer = AutoTokenizer.from_pretrained(folder)
half = seq // 2  # every row exactly seq tokens: half prompt, half answer
rows = [{"prompt_ids": list(range(100 + i, 100 + i + half)), "chosen_ids": list(range(2000, 2000 + half)),
         "rejected_ids": list(range(3000, 3000 + half))} for i in range(pairs * steps)]
dataset = Dataset.from_list(rows)
config = DPOConfig(output_dir=out, per_device_train_batch_size=pairs, max_steps=steps, learning_rate=1e-5,
                   use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, max_length=seq,
                   activation_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True)
baseline = status("VmRSS")
reference = copy.deepcopy(model).eval().requires_grad_(False)
trainer = PreferenceDPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                               processing_class=tokenizer)
trainer.train()
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "optimizer": type(trainer.optimizer).__name__,
                  "attention": model.config._attn_implementation, "config": model.config.to_dict()}))
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from model_hub.make_tiny import build_tiny

    folder = tmp_path_factory.mktemp("dpo_memory")
    model = build_tiny("glm-4-9b-chat", str(folder / "model"), seed=0, sizes=SIZES)
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", MEASURE, model, str(folder / "out"), str(PAIRS), str(SEQ),
                           str(STEPS)], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_full_dpo_row_is_within_15_percent_of_the_measured_peak(measured):
    arch = em.arch_from_config(measured["config"], "tiny GLM-4 config")
    result = em.estimate(arch, "sft", objective="dpo", dtype="fp32", batch_size=PAIRS, seq_len=SEQ,
                         optimizer_states="model", attention=measured["attention"], overhead_mib=0)
    expected = result["total"] - result["parts"]["weights"]  # the policy's weights are in the baseline
    grew = measured["peak"] - measured["baseline"]
    print(f"estimate {expected / MIB:.0f} MiB, measured growth {grew / MIB:.0f} MiB ({measured['optimizer']}), "
          f"parts {({k: round(v / MIB) for k, v in result['parts'].items()})}")
    assert result["parts"]["reference_weights"] == result["parts"]["weights"] > 100 * MIB
    assert abs(grew / expected - 1) <= TOLERANCE


@pytest.mark.parametrize("name", em.REAL_MODELS)
def test_preference_rows_of_the_real_models(name):
    """DPO: chosen + rejected in one batch = the SFT activations of 2·b rows; LoRA/QLoRA reference = the adapter
    disabled (no bytes); full = a frozen second copy of the weights (no gradients or optimizer states for it)."""
    arch, _ = em.load_arch(name)
    settings = dict(dtype="bf16", batch_size=2, seq_len=1024, gradient_checkpointing=True)
    for method, bits in (("lora", None), ("lora", 4), ("sft", None)):
        sft = em.estimate(arch, method, quantization_bit=bits, **settings)["parts"]
        dpo = em.estimate(arch, method, quantization_bit=bits, objective="dpo", **settings)["parts"]
        twice = em.estimate(arch, method, quantization_bit=bits, **{**settings, "batch_size": 4})["parts"]
        assert dpo["activations"] == twice["activations"]
        assert {k: dpo[k] for k in ("weights", "gradients", "optimizer_states")} == \
               {k: sft[k] for k in ("weights", "gradients", "optimizer_states")}
        assert dpo["reference_weights"] == (sft["weights"] if method == "sft" else 0)
        assert dpo["logits_and_loss"] < sft["logits_and_loss"]  # the fused head: no b·s·V logits
    orpo = em.estimate(arch, "sft", objective="orpo", **settings)["parts"]
    assert orpo["reference_weights"] == 0 and orpo["logits_and_loss"] == 2 * 2 * 4 * 1024 * arch.vocab * 3 // 2
    kto = em.estimate(arch, "lora", objective="kto", **settings)["parts"]
    assert kto["activations"] == em.estimate(arch, "lora", **settings)["parts"]["activations"]


def test_the_fused_head_bytes_by_hand():
    """GLM-4-9B, bf16, 1 pair × 1024 tokens: a 2,048 × 32,768 bf16 tile, the 2,048 scored hidden states (bf16) and
    their fp32 gradient; full fine-tuning adds the output layer's fp32 gradient accumulator."""
    arch, _ = em.load_arch("glm-4-9b-chat")
    lora = em.estimate(arch, "lora", objective="dpo", seq_len=1024)["parts"]["logits_and_loss"]
    assert lora == 2048 * 32768 * 2 + 2048 * 4096 * (2 + 4)
    full = em.estimate(arch, "sft", objective="dpo", seq_len=1024)["parts"]["logits_and_loss"]
    assert full == lora + 4 * 151552 * 4096


def test_cli_table_of_the_three_real_models(capsys):
    rows = em.main(["all", "--objective", "dpo", "--seq_len", "1024", "--gradient_checkpointing", "true"])
    out = capsys.readouterr().out
    assert [(r["model"], r["method"]) for r in rows] == [(m, k) for m in em.REAL_MODELS
                                                         for k in ("LoRA", "QLoRA 4-bit", "full")]
    assert "| glm-4-9b-chat | QLoRA 4-bit |" in out and "reference_weights" in out
    full_glm4 = rows[-1]
    assert full_glm4["reference_weights"] == full_glm4["weights"]


@pytest.mark.parametrize("argv,message", [
    (["chatglm-6b", "ptuning_v2", "--objective", "dpo"], "not P-tuning v2"),
    (["chatglm-6b", "lora", "--objective", "simpo"], "invalid choice: 'simpo'"),
    (["chatglm-6b", "--objective", "dpo"], "METHOD: give METHOD"),
])
def test_bad_preference_input_is_one_line_exit_2(argv, message, capsys):
    from tuning.errors import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(lambda: em.main(argv), argv=list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err
