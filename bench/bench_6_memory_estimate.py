"""Benchmark 6: GPU memory on paper (python -m model_hub.estimate_memory) vs the seeds' published figures.

Each case uses the settings the figure was measured with (/work/shared/spec/SEEDS_SPEC.md):
- GLM-4-9B-chat finetune_demo, June-2024 configs (the README's resource table, A100-80G, nvidia-smi MiB): bf16
  weights, gradient checkpointing always on in that version, micro batch and max lengths of each YAML; the longest
  batch is max_input_length + max_output_length + 1 tokens (the appended <|user|>).
    lora.yaml: batch 1, 512 + 512 + 1, LoRA r 8 on query_key_value            → 21,531 MiB
    ptuning_v2.yaml: batch 4, 128 + 128 + 1, 512 virtual tokens             → 21,381 MiB
    sft.yaml: batch 1, 256 + 512 + 1, ZeRO-3 on 8 GPUs (fp32 partitions)    → 80,935 MiB per GPU
- ChatGLM-Tuning README command: 8-bit base, fp16, batch 6, max_seq_length 384, gradient checkpointing,
  LoRA r 8 on query_key_value; the README asks for a GPU of at least 16 GB.
"""


from bench.common import bench_name, parse_args, write_result

MIB = 2**20
TOLERANCE = 0.15
CASES = [  # (case, model, method, estimator options, published MiB, where the figure comes from)
    ("GLM-4-9B LoRA", "glm-4-9b-chat", "lora",
     dict(dtype="bf16", batch_size=1, seq_len=1025, gradient_checkpointing=True, lora_rank=8), 21531,
     "GLM-4 finetune_demo README: 21531MiB"),
    ("GLM-4-9B P-tuning v2", "glm-4-9b-chat", "ptuning_v2",
     dict(dtype="bf16", batch_size=4, seq_len=257, gradient_checkpointing=True, prefix_length=512), 21381,
     "GLM-4 finetune_demo README: 21381MiB"),
    ("GLM-4-9B SFT ZeRO-3 × 8 (per GPU)", "glm-4-9b-chat", "sft",
     dict(dtype="bf16", batch_size=1, seq_len=769, gradient_checkpointing=True, zero_stage=3, num_gpus=8), 80935,
     "GLM-4 finetune_demo README: 80935MiB per GPU, 8 GPUs"),
    ("ChatGLM-6B LoRA (8-bit)", "chatglm-6b", "lora",
     dict(dtype="fp16", batch_size=6, seq_len=384, gradient_checkpointing=True, load_in_8bit=True, lora_rank=8),
     16e9 / MIB, "ChatGLM-Tuning README: GPU ≥ 16 GB"),
]


def cli_flags(options: dict) -> str:
    """The estimator command-line flags of one case (what a reader would type)."""
    flags = []
    for key, value in options.items():
        if value is True and key == "load_in_8bit":
            flags.append(f"--{key}")
        else:
            flags.append(f"--{key} {str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(flags)


def main():
    args = parse_args(__doc__.split("\n\n")[0])  # --quick changes nothing: the estimate is arithmetic
    from model_hub import estimate_memory as em

    table, goals = [], []
    for case, model, method, options, published, source in CASES:
        arch, _ = em.load_arch(model)
        result = em.estimate(arch, method, **options)
        parts = {name: value / MIB for name, value in result["parts"].items()}
        estimate = result["total"] / MIB
        deviation = estimate / published - 1
        table.append({"case": case, **{f"{k}_mib": v for k, v in parts.items()}, "estimate_mib": estimate,
                      "published_mib": published, "deviation_pct": 100 * deviation, "source": source})
        goals.append({"goal": f"{case}: estimate within 15% of the published figure (MiB)", "target": published,
                      "measured": round(estimate), "met": abs(deviation) <= TOLERANCE})
    settings = {case: f"python -m model_hub.estimate_memory {model} {method} {cli_flags(options)}"
                for case, model, method, options, _, _ in CASES}
    settings["quick"] = args.quick
    notes = (
        "Formulas: model_hub/estimate_memory.py --help (exact parameter counts from the vendored configs; activation "
        "bytes per decoder layer from the tensors autograd keeps; 600 MiB fixed CUDA overhead, not fitted). "
        "GLM-4 SFT: the published 80,935 MiB is 98.8% of an A100-80G's 81,920 MiB, i.e. the card was full; the "
        "estimate of what ZeRO-3 needs per GPU (bf16 weight and gradient shards, fp32 master + Adam moment shards, "
        "two gathered layers, activations with checkpointing) is about a quarter of that. The rest is what the "
        "caching allocator and DeepSpeed's buckets (stage3_max_live_parameters 1e9, prefetch/reduce buckets 5e8) "
        "keep, and the evaluation phase (predict_with_generate, eval batch 16, 512 new tokens), none of which is a "
        "requirement of the training step, so the estimator does not imitate it. ChatGLM-6B: '≥ 16 GB' is the "
        "README's card recommendation, not a measured peak; the estimate (≈12.6 GB with 8-bit weights, batch 6 × "
        "384) is more than a 12 GB card offers once fragmentation is counted, consistent with the recommendation, "
        "but it is not within 15% of 16 GB.")
    print(write_result(bench_name(__file__), settings=settings, table=table, goals=goals, notes=notes))


if __name__ == "__main__":
    main()
