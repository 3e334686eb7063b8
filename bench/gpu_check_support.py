"""Helpers of bench/gpu_check.py: the card's peaks, real-size models built on the device, the seams through which
the recipes' own training code runs on those models, step timing, FLOPs, memory and the estimator's figure.

The recipes load weights from a folder; a 6–9B checkpoint cannot travel to the GPU machine (no internet there),
so `recipe_seams` hands the recipe the model built here instead of what its loader would read, and leaves the
rest of the recipe (argument checks, data, LoRA / P-tuning, collator, Trainer, callbacks, saving) as it is.
"""
import contextlib
import dataclasses
import gc
import json
import os
import resource
import sys
import time
from unittest import mock

import torch

from bench.common import REPO

# bf16 dense peak (no sparsity) and HBM bandwidth, by the name torch.cuda.get_device_name gives. The H100 SXM
# reports itself as "H100 80GB HBM3"; PCIe and NVL boards have other peaks and are not guessed at.
CARDS = (
    (("H200",), {"card": "H200", "bf16_peak_flops": 989e12, "hbm_bytes_per_s": 4.8e12}),
    (("H100", "HBM3"), {"card": "H100 SXM", "bf16_peak_flops": 989e12, "hbm_bytes_per_s": 3.35e12}),
    (("H100", "SXM"), {"card": "H100 SXM", "bf16_peak_flops": 989e12, "hbm_bytes_per_s": 3.35e12}),
)
MIB = 2**20
PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "bitsandbytes", "datasets",
            "deepspeed", "typer")


def card_info(device: torch.device) -> dict:
    """Name, bf16 peak FLOP/s and HBM bandwidth of the device, or None for each with the reason why."""
    if device.type != "cuda":
        from bench.common import cpu_model, matmul_peak_gflops

        # The dry run still computes an MFU, against the fp32 matmul peak measured now (1024², 2 threads).
        return {"card": cpu_model(), "peak_flops": matmul_peak_gflops("float32", size=1024, repeats=3) * 1e9,
                "peak_kind": "fp32 matmul measured now (CPU dry run)", "hbm_bytes_per_s": None,
                "bandwidth_reason": "CPU dry run: no HBM bandwidth on file"}
    name = torch.cuda.get_device_name(device)
    for words, values in CARDS:
        if all(word in name for word in words):
            return {"card": values["card"], "device_name": name, "peak_flops": values["bf16_peak_flops"],
                    "peak_kind": "bf16 dense, datasheet", "hbm_bytes_per_s": values["hbm_bytes_per_s"]}
    reason = f"unknown card {name!r}: no bf16 peak or bandwidth on file (bench/gpu_check_support.py CARDS)"
    return {"card": name, "device_name": name, "peak_flops": None, "peak_reason": reason,
            "hbm_bytes_per_s": None, "bandwidth_reason": reason}


def versions() -> dict:
    from bench.common import package_version

    out = {name: package_version(name) for name in PACKAGES}
    out["cuda"] = torch.version.cuda
    out["python"] = ".".join(map(str, sys.version_info[:3]))
    return out


def project_pins() -> dict:
    """name → version pinned in requirements/*.txt (what the project is tested with)."""
    pins = {}
    folder = os.path.join(REPO, "requirements")
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:
                spec = line.split("#")[0].strip()
                if "==" in spec:
                    package, version = spec.split("==", 1)
                    pins[package.strip().lower()] = version.strip()
    return pins


def build_model(name: str, device: torch.device, real: bool):
    """(model, tokenizer) of a registered model with random weights, created on `device`.

    real: the real config's sizes, bf16, every tensor allocated and initialised on the device (no CPU copy);
    otherwise the registry's tiny sizes in fp32 (the dry run). Built by model_hub.make_tiny's own builders.
    """
    from model_hub import tokenizer_files
    from model_hub.make_tiny import BUILDERS, SEED
    from model_hub.registry import get_spec

    spec = get_spec(name)
    if real:
        with open(os.path.join(tokenizer_files(spec.files), "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        # The tiny sizes are exactly the keys the builders shrink: put the real values back.
        spec = dataclasses.replace(spec, tiny={key: config[key] for key in spec.tiny if key in config})
    dtype = torch.bfloat16 if real else torch.float32
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model, tokenizer = BUILDERS[spec.family](spec)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype), tokenizer


def quantize_nf4(model) -> int:
    """Swap the decoder's linear layers for bitsandbytes nf4 ones (double quantization, bf16 compute) in place,
    quantized where they lie, as model_hub.loader's quantization_bit 4 loads them; returns how many."""
    import bitsandbytes as bnb

    compute = torch.bfloat16 if next(model.parameters()).dtype == torch.bfloat16 else torch.float32
    swapped = 0
    for layer_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or "layers." not in f"{layer_name}.":
                continue
            device = child.weight.device
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute, compress_statistics=True, quant_type="nf4",
                                          device="meta")
            quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, quantized.to(device))  # .to quantizes the weight on its device
            swapped += 1
    model.is_loaded_in_4bit = True  # what transformers sets; tuning.methods.quantized_bits reads it
    return swapped


class ColumnRows(list):
    """Rows as a list of dicts that also answers rows["column"], the part of datasets.Dataset the recipes use
    (the GPU image has no `datasets`, and the check needs no Arrow files)."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self]
        return super().__getitem__(key)


class StepRecorder:
    """Times every optimizer step (device synchronised) and counts its tokens; stops training at the deadline."""

    def __init__(self, pad_token_id: int, deadline: float, device: torch.device):
        self.pad, self.deadline, self.device = pad_token_id, deadline, device
        self.batches, self.seconds = [], []
        self._start = None
        self.stopped_at_deadline = False

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def count(self, inputs: dict) -> None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        real = (mask.bool() if mask is not None and mask.dim() == 2 else ids != self.pad).sum(1)
        labels = inputs.get("labels")
        supervised = int((labels[:, 1:] != -100).sum()) if labels is not None else int(real.sum())
        self.batches.append({"row_lengths": real.tolist(), "padded_length": int(ids.shape[1]),
                             "supervised": supervised})

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class StepTimes(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                recorder._sync()
                recorder._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                recorder._sync()
                recorder.seconds.append(time.perf_counter() - recorder._start)
                if time.monotonic() > recorder.deadline:
                    recorder.stopped_at_deadline = True
                    control.should_training_stop = True
        return StepTimes()


def measured(trainer_class, recorder: StepRecorder):
    """The recipe's Trainer class, timing and counting every step; nothing is reported to TensorBoard (not on the
    GPU image, and not what is measured)."""

    class Measured(trainer_class):
        def __init__(self, *args, **kwargs):
            kwargs["args"].report_to = []
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), recorder.callback()]
            super().__init__(*args, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            recorder.count(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    Measured.__name__ = f"Measured{trainer_class.__name__}"
    return Measured


@contextlib.contextmanager
def recipe_seams(model, tokenizer, recorder: StepRecorder, seen: dict):
    """While inside: the recipes' loaders return `model` and `tokenizer` (the dtype and device they asked for
    land in `seen`), their Trainers are measured, and the loss plot (matplotlib, not on the GPU image) is skipped.
    Without `datasets`, glm4_finetune's tokenize_split runs its own row function over plain lists."""
    import chatglm_lora.finetune as chatglm_finetune
    import glm4_finetune.trainer as glm4_trainer
    import model_hub.loader as loader
    import tuning.checkpoints as checkpoints
    import tuning.training as training

    def load_model_and_tokenizer(path, *, dtype=None, device=None, quantization_bit=None, use_cache=None, **_):
        seen.update(asked_dtype=str(dtype), asked_device=str(device), quantization_bit=quantization_bit)
        if quantization_bit:
            seen["quantized_linear_layers"] = quantize_nf4(model)
        if use_cache is not None:
            model.config.use_cache = use_cache
        return model, tokenizer

    patches = [mock.patch.object(loader, "load_model_and_tokenizer", load_model_and_tokenizer),
               mock.patch.object(loader, "load_model_config", lambda *a, **k: model.config),
               mock.patch.object(training, "save_loss_plot", lambda *a, **k: None),
               mock.patch.object(chatglm_finetune, "AtomicTrainer", measured(chatglm_finetune.AtomicTrainer, recorder)),
               # train_trainer imports AtomicTrainer when main runs (its --help loads no Trainer): patched at the source
               mock.patch.object(checkpoints, "AtomicTrainer", measured(checkpoints.AtomicTrainer, recorder)),
               mock.patch.object(glm4_trainer, "GenerationTrainer", measured(glm4_trainer.GenerationTrainer, recorder))]
    if not has_module("datasets"):
        patches.append(mock.patch.object(glm4_trainer, "tokenize_split", tokenize_split_without_datasets))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def tokenize_split_without_datasets(conversations, split, tokenizer, cfg):
    """glm4_finetune.trainer.tokenize_split's training path on plain lists: its own batched row function over all
    rows, rows whose cut removed every label dropped, as tokenize_split does."""
    from glm4_finetune import trainer

    mapped = trainer._train_map({"messages": [json.dumps(c, ensure_ascii=False) for c in conversations]},
                                tokenizer=tokenizer, max_input_length=cfg.max_input_length,
                                max_output_length=cfg.max_output_length, combine=cfg.combine,
                                train_first_answer_token=cfg.train_first_answer_token)
    columns = [key for key in mapped if key != "full_length"]
    rows = [dict(zip(columns, values)) for values in zip(*(mapped[key] for key in columns))]
    return ColumnRows(row for row in rows if any(t != -100 for t in row["labels"]))


def has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def parameter_counts(model) -> dict:
    """Counts bench_2_training.flops needs: non-embedding parameters (lm_head included), lm_head, trainable."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    params = {id(p): p for n, p in model.named_parameters() if "lora_" not in n and "prompt_encoder" not in n}
    total = sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1) for p in params.values())
    tied = head is embed
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = base.config
    return {"n_non_embedding": total - embed.numel() + (head.numel() if tied else 0), "n_head": head.numel(),
            "n_lora": trainable, "layers": getattr(config, "num_hidden_layers", None) or config.num_layers,
            "hidden": config.hidden_size, "total": total}


def throughput(recorder: StepRecorder, counts: dict, peak_flops: float | None, peak_reason: str | None,
               gradient_checkpointing: bool) -> dict:
    """tokens/s and MFU over the steps after the first (which pays for allocation and kernel selection)."""
    from bench.bench_2_training import flops

    timed = min(len(recorder.seconds), len(recorder.batches))
    if timed < 2:
        raise RuntimeError(f"only {timed} step(s) ran before the section's time budget ran out; need 2")
    batches, seconds = recorder.batches[1:timed], sum(recorder.seconds[1:timed])
    real = sum(sum(b["row_lengths"]) for b in batches)
    padded = sum(b["padded_length"] * len(b["row_lengths"]) for b in batches)
    model_flops, executed = flops({**counts, "batches": batches}, "lora", gradient_checkpointing, False)
    out = {"steps": len(recorder.seconds), "timed_steps": len(batches), "step_s_mean": seconds / len(batches),
           "tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
           "batch_size": len(batches[0]["row_lengths"]), "seq_len": max(b["padded_length"] for b in batches),
           "model_tflops_per_s": model_flops / seconds / 1e12,
           "stopped_at_time_budget": recorder.stopped_at_deadline}
    if peak_flops:
        out["mfu_pct"], out["hfu_pct"] = 100 * model_flops / seconds / peak_flops, 100 * executed / seconds / peak_flops
    else:
        out["mfu_pct"], out["mfu_reason"] = None, peak_reason
    return out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
                "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB}
    # CPU: the process's high-water RSS so far (it never goes down, so later sections show the largest so far)
    return {"peak_rss_mib_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def estimator_figure(model, method: str, *, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                     dtype: str, quantization_bit=None, prefix_length: int = 0) -> dict:
    """model_hub.estimate_memory for the settings that ran (its arch read from the model's own config)."""
    from model_hub.estimate_memory import MIB as EST_MIB, arch_from_config, estimate

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.to_dict()
    attention = getattr(base.config, "_attn_implementation", None)
    arch = arch_from_config(config, "model config")
    result = estimate(arch, method, dtype=dtype, batch_size=batch_size, seq_len=seq_len,
                      gradient_checkpointing=gradient_checkpointing, quantization_bit=quantization_bit,
                      prefix_length=prefix_length or 128,
                      attention=attention if attention in ("eager", "sdpa") else None)
    return {"estimate_mib": result["total"] / EST_MIB,
            "estimate_parts_mib": {k: round(v / EST_MIB, 1) for k, v in result["parts"].items()},
            "estimate_settings": {"method": method, "dtype": dtype, "batch_size": batch_size, "seq_len": seq_len,
                                  "gradient_checkpointing": gradient_checkpointing,
                                  "quantization_bit": quantization_bit, "attention": attention,
                                  **({"prefix_length": prefix_length} if prefix_length else {})}}


def release(device: torch.device) -> None:
    """Free what a section left behind before the next builds its model."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
