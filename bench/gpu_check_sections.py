"""The sections of bench/gpu_check.py. Each takes the run's Context and its deadline and returns a dict of
figures; bench/gpu_check.py records whatever it raises instead and goes on with the next.

Training sections run a recipe's own entry point (chatglm_lora/finetune.py main(), llama_ner/train_trainer.py
main(), glm4_finetune.finetune.finetune()) with its real batch size and sequence length, on the model
gpu_check_support.build_model made (real config, random bf16 weights on the GPU; tiny fp32 on the CPU dry run).
"""
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from bench import gpu_check_support as support
from bench.common import REPO

MSRA_ROWS = os.path.join(REPO, "data", "llama_ner_msra", "instruct_data", "dev.txt")
# Long enough that every truncation below is reached: rows are as long as the recipe allows.
FILLER = "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。" * 120


@dataclass
class Context:
    device: torch.device
    real: bool                       # real configs in bf16 (GPU) or tiny fp32 (dry run)
    card: dict
    steps: int                       # optimizer steps per training section (the first is not timed)
    decode_tokens: int               # new tokens per serving request
    notes: list = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.real else "fp32"


@contextmanager
def argv(*args):
    saved = sys.argv
    sys.argv = [str(a) for a in args]
    try:
        yield
    finally:
        sys.argv = saved


def train(ctx: Context, deadline: float, name: str, run_recipe, *, method: str, gradient_checkpointing: bool,
          quantization_bit=None, prefix_length: int = 0) -> dict:
    """Build `name`, run the recipe through the seams, and gather speed, memory and the estimator's figure."""
    model, tokenizer = support.build_model(name, ctx.device, ctx.real)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1
    recorder = support.StepRecorder(pad, deadline, ctx.device)
    seen = {}
    support.reset_peak_memory(ctx.device)
    with support.recipe_seams(model, tokenizer, recorder, seen), tempfile.TemporaryDirectory() as tmp:
        trainer = run_recipe(tmp, tokenizer)
    memory = support.peak_memory(ctx.device)
    counts = support.parameter_counts(trainer.model)
    out = {"model": name, "weights_dtype": ctx.dtype_name, **seen,
           **support.throughput(recorder, counts, ctx.card.get("peak_flops"), ctx.card.get("peak_reason"),
                                gradient_checkpointing),
           **memory, "parameters": counts["total"], "trainable": counts["n_lora"],
           "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None)}
    out.update(support.estimator_figure(trainer.model, method, batch_size=out["batch_size"], seq_len=out["seq_len"],
                                        gradient_checkpointing=gradient_checkpointing, dtype=ctx.dtype_name,
                                        quantization_bit=quantization_bit, prefix_length=prefix_length))
    measured = memory.get("peak_reserved_mib")
    if measured:
        out["measured_over_estimate"] = measured / out["estimate_mib"]
    del trainer, model
    return out


def chatglm_lora(ctx: Context, deadline: float) -> dict:
    """ChatGLM-Tuning's README run: LoRA r 8 on query_key_value, batch 6, rows of 385 tokens (prompt and answer each
    cut at 192 by the recipe's own tokenize_rows), gradient checkpointing on the base (the recipe's default)."""
    import chatglm_lora.finetune as recipe
    from chatglm_lora.tokenize_dataset_rows import tokenize_rows

    batch, half = (6, 192) if ctx.real else (2, 16)

    def run(tmp, tokenizer):
        rows = tokenize_rows(tokenizer, tokenizer.eos_token_id, [FILLER], [FILLER], half)
        data = support.ColumnRows([{"input_ids": ids, "seq_len": n} for ids, n in rows] * (batch * ctx.steps))
        os.makedirs(os.path.join(tmp, "rows"))
        flags = ["--bf16"] if ctx.real else []
        with argv("finetune.py", "--dataset_path", os.path.join(tmp, "rows"), "--chatglm_path", "tiny:chatglm-6b",
                  "--lora_rank", 8, "--per_device_train_batch_size", batch, "--max_steps", ctx.steps,
                  "--learning_rate", "1e-4", "--load_in_8bit", "false", "--logging_steps", 1, "--save_strategy",
                  "no", "--output_dir", os.path.join(tmp, "out"), "--seed", 42, *flags), \
                _patched(recipe, "load_rows", lambda path: data):
            return recipe.main()
    return train(ctx, deadline, "chatglm-6b", run, method="lora", gradient_checkpointing=True)


def _llama_ner(ctx: Context, deadline: float, quantization_bit=None) -> dict:
    import llama_ner.train_trainer as recipe

    batch, length = (12, 192) if ctx.real else (2, 192)  # shorter rows would cut every MSRA answer away

    def run(tmp, tokenizer):
        extra = [f"--quantization_bit={quantization_bit}"] if quantization_bit else []
        train_path = os.path.join(tmp, "train.txt")  # the first rows of the real file: enough for the steps run
        with open(MSRA_ROWS, encoding="utf-8") as src, open(train_path, "w", encoding="utf-8") as dst:
            dst.writelines(line for _, line in zip(range(max(64, 2 * batch * ctx.steps)), src))
        with argv("train_trainer.py", "--model_dir=tiny:chinese-alpaca-7b", f"--train_path={train_path}",
                  f"--train_batch_size={batch}", f"--max_seq_length={length}", f"--max_steps={ctx.steps}",
                  "--learning_rate=1e-4", f"--bf16={'true' if ctx.real or quantization_bit else 'false'}",
                  "--log_steps=1", "--save_steps=1000000", f"--save_dir={tmp}/out/", "--seed=42", *extra):
            return recipe.main()
    return train(ctx, deadline, "chinese-alpaca-7b", run, method="lora", gradient_checkpointing=False,
                 quantization_bit=quantization_bit)


def llama_ner_lora(ctx: Context, deadline: float) -> dict:
    """Chinese-LLaMA-Alpaca NER: LoRA r 8 on q/k/v/o/gate/up/down, batch 12, every row padded to 192 (the
    recipe's max_seq_length) over the real MSRA rows, bf16 autocast, plain Trainer (no DeepSpeed on the image)."""
    return _llama_ner(ctx, deadline)


def qlora(ctx: Context, deadline: float) -> dict:
    """The llama_ner run with --quantization_bit=4: the decoder's linear weights in nf4 (bitsandbytes)."""
    if not support.has_module("bitsandbytes"):
        return {"skipped": "bitsandbytes is not importable here (its CUDA wheel does not fit the 64 MiB the "
                           "GPU machine receives), so QLoRA 4-bit was not run"}
    return _llama_ner(ctx, deadline, quantization_bit=4)


def _glm4(ctx: Context, deadline: float, config_name: str) -> dict:
    import yaml

    from glm4_finetune.finetune import finetune

    with open(os.path.join(REPO, "glm4_finetune", "configs", config_name), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    ptuning = config["peft_config"]["peft_type"] == "PREFIX_TUNING"
    if not ctx.real:
        config.update(max_input_length=32, max_output_length=32)
        config["training_args"]["per_device_train_batch_size"] = 2
        if ptuning:
            config["peft_config"]["num_virtual_tokens"] = 16

    def run(tmp, tokenizer):
        from model_hub.loader import load_model_config

        if ptuning:  # the prefix is stored per key/value group (the YAML's 2 x 128 on the real model)
            model_config = load_model_config("")
            config["peft_config"].update(num_attention_heads=model_config.num_key_value_heads,
                                         token_dim=model_config.num_key_value_heads * model_config.head_dim)
        batch = config["training_args"]["per_device_train_batch_size"]
        config["data_config"] = {"train_file": "train.jsonl", "num_proc": 1}
        config["training_args"].update(output_dir=os.path.join(tmp, "out"), max_steps=ctx.steps, save_strategy="no",
                                       eval_strategy="no", logging_steps=1, dataloader_num_workers=0,
                                       report_to="none", seed=42)
        data_dir = os.path.join(tmp, "data")  # apart from output_dir: the recipe refuses an output inside its data
        os.makedirs(data_dir)
        # The question fills max_input_length (a longer one would leave no answer inside the cut), the answer
        # runs past the cut: every row is max_input_length + max_output_length + 1 tokens.
        question = tokenizer.decode(tokenizer.encode(FILLER, add_special_tokens=False)[:config["max_input_length"] - 8])
        with open(os.path.join(data_dir, "train.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(batch * ctx.steps):
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": FILLER}]
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, allow_unicode=True)
        return finetune(data_dir, "tiny:glm-4-9b-chat", path)
    return train(ctx, deadline, "glm-4-9b-chat", run, method="ptuning_v2" if ptuning else "lora",
                 gradient_checkpointing=not ptuning,
                 prefix_length=config["peft_config"]["num_virtual_tokens"] if ptuning else 0)


def glm4_lora(ctx: Context, deadline: float) -> dict:
    """GLM-4 finetune_demo configs/lora.yaml: LoRA r 8 on q/k/v, batch 1, 512 + 512 tokens (rows of 1025), bf16
    weights, gradient checkpointing (the recipe's default for LoRA)."""
    return _glm4(ctx, deadline, "lora.yaml")


def glm4_ptuning(ctx: Context, deadline: float) -> dict:
    """configs/ptuning_v2.yaml: P-tuning v2 with 512 virtual tokens, batch 4, 512 + 512 tokens, no checkpointing."""
    return _glm4(ctx, deadline, "ptuning_v2.yaml")


def serving(ctx: Context, deadline: float) -> dict:
    """serving/engine.py on GLM-4-9B: time to first token, batch-1 and batch-8 greedy decode tok/s against the
    HBM limit (every weight read once per step)."""
    from serving.engine import Engine
    from serving.loading import wrap_loaded

    model, tokenizer = support.build_model("glm-4-9b-chat", ctx.device, ctx.real)
    loaded = wrap_loaded(model.eval(), tokenizer, "glm4_chat", name="gpu-check")
    loaded.stop_ids = ()  # random weights may pick a stop id early: every request decodes its full length
    engine = Engine(loaded, max_batch=8)
    try:
        prompt = engine.prompt_ids([{"role": "user", "content": FILLER[:120]}])
        wave(engine, [prompt], 2, deadline)  # warm-up: kernels, allocator
        first = [wave(engine, [prompt], 1, deadline) for _ in range(3)]
        first8 = wave(engine, [prompt] * 8, 1, deadline)
        one = wave(engine, [prompt], ctx.decode_tokens, deadline)
        eight = wave(engine, [prompt] * 8, ctx.decode_tokens, deadline)
    finally:
        engine.close()
    embed = model.get_input_embeddings().weight
    step_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()
    ttft = sorted(first)[1]
    out = {"model": "glm-4-9b-chat", "weights_dtype": ctx.dtype_name, "prompt_tokens": len(prompt),
           "new_tokens": ctx.decode_tokens, "ttft_ms": 1000 * ttft, "ttft_8_together_ms": 1000 * first8,
           "decode_tok_s_batch1": (ctx.decode_tokens - 1) / max(one - ttft, 1e-9),
           "decode_tok_s_batch8": 8 * (ctx.decode_tokens - 1) / max(eight - first8, 1e-9),
           "weight_bytes_per_step": step_bytes, **support.peak_memory(ctx.device)}
    bandwidth = ctx.card.get("hbm_bytes_per_s")
    if bandwidth:
        limit = bandwidth / step_bytes
        out.update(hbm_limit_tok_s_batch1=limit, hbm_limit_tok_s_batch8=8 * limit,
                   batch1_pct_of_hbm_limit=100 * out["decode_tok_s_batch1"] / limit,
                   batch8_pct_of_hbm_limit=100 * out["decode_tok_s_batch8"] / (8 * limit))
    else:
        out["hbm_limit_reason"] = ctx.card.get("bandwidth_reason")
    del engine, loaded, model
    return out


def wave(engine, prompts: list, new_tokens: int, deadline: float) -> float:
    """Wall seconds until every one of `prompts`, submitted together, has its `new_tokens` greedy tokens."""
    from serving.engine import Finished
    from serving.sampling import SamplingParams

    done = []
    start = time.perf_counter()
    requests = [engine.submit(p, SamplingParams(max_tokens=new_tokens, temperature=0),
                              lambda e: done.append(e) if isinstance(e, Finished) else None) for p in prompts]
    while len(done) < len(prompts):
        if time.monotonic() > deadline:
            for request in requests:
                request.cancel()
            raise TimeoutError("the section's time budget ran out while decoding")
        time.sleep(0.0005)
    wall = time.perf_counter() - start
    bad = [e for e in done if e.finish_reason != "length" or e.completion_tokens != new_tokens]
    if bad:
        raise RuntimeError(f"a request ended {bad[0].finish_reason!r} after {bad[0].completion_tokens} tokens "
                           f"({bad[0].error or 'no error'}); expected {new_tokens}")
    return wall


@contextmanager
def _patched(module, name, value):
    from unittest import mock

    with mock.patch.object(module, name, value):
        yield


SECTIONS = {"chatglm_lora": chatglm_lora, "llama_ner_lora": llama_ner_lora, "glm4_lora": glm4_lora,
            "glm4_ptuning": glm4_ptuning, "qlora": qlora, "serving": serving}
# Share of the whole time budget each section may use (model build included); what one leaves goes to the rest.
BUDGET_SHARE = {"chatglm_lora": 0.16, "llama_ner_lora": 0.15, "glm4_lora": 0.17, "glm4_ptuning": 0.17,
                "qlora": 0.14, "serving": 0.13}
