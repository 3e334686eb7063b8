"""Test helpers for the vLLM hand-off: vLLM's venv (`make vllm-setup`, built on first use, reused after), tiny models
whose shapes vLLM's CPU attention accepts (head_dim 32; the suite's tiny models have 16), adapters and exports made
by the project's own code, and a `python -m serving.vllm` server on 127.0.0.1 (bounded start)."""
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from serving_support import WEATHER_CALL, WEATHER_QUESTION, WEATHER_TOOLS, Server

VLLM_PYTHON = os.path.join(REPO, "build", "vllm-venv", "bin", "python")
WORK = os.path.join(REPO, "build", "vllm-test")
VERSION = "1"  # bump to rebuild the cached models
SIZES = {"chinese-alpaca-7b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4),
         "glm-4-9b-chat": dict(hidden_size=128, ffn_hidden_size=256, num_layers=2, num_attention_heads=4,
                               multi_query_group_num=2, kv_channels=32)}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


def vllm_python() -> str:
    """vLLM's venv, made by `make vllm-setup` when it is not there yet (~5 min on 2 cores, once per machine)."""
    with open(os.path.join(REPO, "build", ".vllm-setup.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(["make", "vllm-setup"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        pytest.fail(f"make vllm-setup failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return VLLM_PYTHON


def cached(name: str, build) -> str:
    """WORK/name, built once by `build(folder)` (under a lock, stamped with VERSION)."""
    out = os.path.join(WORK, name)
    os.makedirs(WORK, exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = os.path.join(WORK, f"{name}.version")
        if not (os.path.exists(out) and os.path.isfile(stamp) and open(stamp).read() == VERSION):
            shutil.rmtree(out, ignore_errors=True)
            build(out)
            with open(stamp, "w") as f:
                f.write(VERSION)
    return out


def base_model(name: str) -> str:
    from model_hub.make_tiny import build_tiny

    return cached(f"base-{name}", lambda out: build_tiny(name, out, sizes=SIZES[name]))


def lora_adapter(base: str, name: str, seed: int, prompt_format: str, recipe: str) -> str:
    """A LoRA adapter with non-zero weights (PEFT, as the recipes save it) and the recipe's prompt record."""
    def build(out):
        import torch
        from peft import LoraConfig, get_peft_model

        from model_hub.loader import load_model_and_tokenizer
        from model_hub.prompt_format import record_prompt_format
        from model_hub.registry import family_of_config, get_family

        torch.manual_seed(seed)
        model, _ = load_model_and_tokenizer(base, dtype="fp32")
        targets = list(get_family(family_of_config(model.config)).lora_targets)
        config = LoraConfig(r=8, lora_alpha=32, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
        get_peft_model(model, config).save_pretrained(out)
        record_prompt_format(out, prompt_format, recipe)

    return cached(name, build)


def glm4_tool_call_sft(base: str) -> str:
    """The tool-call fixture of serving_support at vLLM's shapes: glm4_finetune (full SFT) on one tool-call
    conversation and one plain chat until greedy decoding emits the call."""
    def build(out):
        import yaml

        from glm4_finetune.finetune import finetune

        work = out + ".building"
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(os.path.join(work, "data"))
        rows = [{"messages": [{"role": "system", "content": "", "tools": WEATHER_TOOLS},
                              {"role": "user", "content": WEATHER_QUESTION},
                              {"role": "assistant", "metadata": WEATHER_CALL["name"],
                               "content": json.dumps(WEATHER_CALL["arguments"], ensure_ascii=False)}]}]
        with open(os.path.join(work, "data", "train.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        config = {"data_config": {"train_file": "train.jsonl", "num_proc": 1}, "combine": False, "freezeV": True,
                  "weights_dtype": "fp32", "max_input_length": 512, "max_output_length": 32,
                  "training_args": {"output_dir": os.path.join(work, "model"), "max_steps": 8, "learning_rate": 5e-3,
                                    "bf16": False, "per_device_train_batch_size": 1, "dataloader_num_workers": 0,
                                    "remove_unused_columns": False, "save_strategy": "no", "logging_steps": 8,
                                    "use_cpu": True, "report_to": "none", "seed": 42, "log_level": "warning",
                                    "disable_tqdm": True, "generation_config": {"max_new_tokens": 32}}}
        with open(os.path.join(work, "sft.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, allow_unicode=True)
        finetune(os.path.join(work, "data"), base, os.path.join(work, "sft.yaml"))
        os.replace(os.path.join(work, "model"), out)
        shutil.rmtree(work, ignore_errors=True)

    return cached("glm4-tool-call-sft", build)


def dpo_adapter(base: str) -> str:
    """A LoRA trained by preference/train_dpo.py (DPO, 4 steps, llama_ner's prompt) on the MSRA pairs of
    preference/make_demo_pairs.py, on `base`: the preference step's output as a user gets it."""
    def build(out):
        import tempfile

        from preference import make_demo_pairs, train_dpo

        with tempfile.TemporaryDirectory() as folder:
            make_demo_pairs.main(["--out_dir", folder, "--ner_pairs", "8", "--tool_pairs", "1"])
            train_dpo.main(["--model_dir", base, "--prompt_format", "llama_ner", "--train_path",
                            os.path.join(folder, "msra_ner_pairs.jsonl"), "--save_dir", out, "--max_steps", "4",
                            "--save_steps", "4", "--train_batch_size", "2", "--max_length", "256",
                            "--learning_rate", "5e-2"])
    return cached("llama-ner-dpo", build)


def exported(src: str, name: str) -> str:
    from model_hub.export import export

    return cached(name, lambda out: export(src, out))


class VllmServer(Server):
    """`python -m serving.vllm FOLDER…` on a free 127.0.0.1 port; waits (bounded) until /health answers."""

    def __init__(self, *folders: str, startup_seconds: float = 400, compiled: bool = False):
        """compiled=False adds --enforce-eager: vLLM's torch.compile of a new model costs ~35 s of a cold start on
        this CPU (57 s vs 23 s measured); one server of the suite keeps vLLM's default, compiled path."""
        python = vllm_python()
        eager = [] if compiled else ["--enforce-eager"]
        self.start(lambda port: [sys.executable, "-m", "serving.vllm", *folders, "--port", str(port), "--vllm_python",
                                 python, "--", "--max-model-len", "1024", "--max-num-seqs", "8", *eager],
                   "vllm-test", ENV, startup_seconds, poll=1)
