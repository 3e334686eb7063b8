"""Benchmark 5: peak memory (RSS) of LoRA vs full fine-tuning vs P-tuning v2, with and without gradient
checkpointing, through the glm4_finetune recipe (the one recipe that offers all three methods).

Model: a GLM-4 twin big enough to mean something: the real glm-4-9b-chat config shrunk to hidden 512, 8 layers, 8
heads, 2 key/value groups of 64, FFN 1376, with the real 151,552-token vocabulary and tokenizer, random weights
(seed 0), fp32 master weights with bf16 autocast (configs/tiny/*.yaml precision) — 177M parameters, 155M of them in
the embedding and lm_head. Each case is one child process running glm4_finetune.finetune() for a few steps on
real AdvertiseGen rows (batch 4, max_input_length/max_output_length 128/128, no evaluation); its peak RSS is
wait4's ru_maxrss (bench/common.peak_rss_mib_of_child). Methods as the recipe's configs: LoRA r 8, alpha 32,
dropout 0.1 on q/k/v (configs/lora.yaml); P-tuning v2 with 512 virtual tokens (configs/ptuning_v2.yaml, the prefix
sized for this model: 2 groups x 64); full fine-tuning (configs/sft.yaml: no peft_config), AdamW.
P-tuning v2 with gradient checkpointing is refused by peft: that cell is reported as not applicable.
"""
import json
import os
import sys
import tempfile


from bench.common import REPO, bench_name, parse_args, peak_rss_mib_of_child, write_result
from model_hub.registry import get_family

GLM4 = get_family("glm4")  # the recipe's LoRA (configs/lora.yaml)

ADVERTISEGEN = os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen", "xl.jsonl")
MODEL_DIR = os.path.join(REPO, "build", "bench", "glm4-177m")
SIZES = dict(hidden_size=512, ffn_hidden_size=1376, num_layers=8, num_attention_heads=8, multi_query_group_num=2,
             kv_channels=64)
METHODS = {
    "LoRA": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": GLM4.lora_alpha,
             "lora_dropout": GLM4.lora_dropout, "target_modules": list(GLM4.lora_targets)},
    "full fine-tuning": None,
    "P-tuning v2": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 512,
                    "num_attention_heads": 2, "token_dim": 128},
}
LEARNING_RATE = {"LoRA": 5e-4, "full fine-tuning": 5e-5, "P-tuning v2": 5e-4}  # the recipe's configs


def model_dir() -> str:
    if not os.path.exists(os.path.join(MODEL_DIR, "tiny_model.json")):
        from model_hub.make_tiny import build_tiny

        build_tiny("glm-4-9b-chat", MODEL_DIR, seed=0, sizes=SIZES)
    return MODEL_DIR


def child(case: dict) -> None:
    import torch
    import yaml

    torch.set_num_threads(2)
    from glm4_finetune.finetune import finetune

    with tempfile.TemporaryDirectory() as tmp:
        with open(ADVERTISEGEN, encoding="utf-8") as f:
            rows = f.readlines()[:4 * case["steps"]]
        with open(os.path.join(tmp, "train.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(rows)
        config = {"data_config": {"train_file": "train.jsonl", "num_proc": 1}, "combine": True, "freezeV": True,
                  "max_input_length": 128, "max_output_length": 128,
                  "training_args": {"output_dir": os.path.join(tmp, "out"), "max_steps": case["steps"],
                                    "learning_rate": LEARNING_RATE[case["method"]], "per_device_train_batch_size": 4,
                                    "dataloader_num_workers": 0, "remove_unused_columns": False,
                                    "save_strategy": "no", "logging_steps": 1, "bf16": True, "use_cpu": True,
                                    "report_to": "none", "seed": 42, "disable_tqdm": True,
                                    "gradient_checkpointing": case["gc"], "predict_with_generate": True,
                                    "generation_config": {"max_new_tokens": 8}}}
        if METHODS[case["method"]] is not None:
            config["peft_config"] = METHODS[case["method"]]
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, allow_unicode=True)
        finetune(tmp, case["model_dir"], path)


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], default_repeats=1,
                      extra=lambda p: p.add_argument("--child"))
    if args.child:
        return child(json.loads(args.child))
    path = model_dir()
    steps = 2 if args.quick else 3
    table, rss = [], {}
    for method in METHODS:
        for gc in (False, True):
            name = f"{method}, gradient checkpointing {'on' if gc else 'off'}"
            if method == "P-tuning v2" and gc:
                table.append({"case": name, "peak_rss_mib": "n/a",
                              "note": "peft: PREFIX_TUNING does not work with gradient checkpointing (refused)"})
                continue
            case = {"method": method, "gc": gc, "steps": steps, "model_dir": path}
            argv = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(case)]
            runs = []
            for _ in range(args.repeats):
                with open(os.devnull, "w") as quiet:
                    mib, code = peak_rss_mib_of_child(argv, cwd=REPO, stdout=quiet, stderr=quiet)
                if code != 0:
                    raise RuntimeError(f"case {name!r} failed with exit code {code}")
                runs.append(mib)
            rss[(method, gc)] = max(runs)
            table.append({"case": name, "peak_rss_mib": round(rss[(method, gc)])})
            print(json.dumps(table[-1]), flush=True)
    for row in table:
        method = next(m for m in METHODS if row["case"].startswith(m))
        gc = row["case"].endswith("on")
        if isinstance(row["peak_rss_mib"], (int, float)):
            row["vs_full_same_checkpointing"] = round(rss[(method, gc)] / rss[("full fine-tuning", gc)], 2)
    goals = [{"goal": f"LoRA peak RSS <= 0.6x full fine-tuning (gradient checkpointing {'on' if gc else 'off'})",
              "target": 0.6, "measured": round(rss[("LoRA", gc)] / rss[("full fine-tuning", gc)], 2),
              "met": rss[("LoRA", gc)] <= 0.6 * rss[("full fine-tuning", gc)]} for gc in (False, True)]
    settings = {"model": "GLM-4 twin: real glm-4-9b-chat config shrunk to hidden 512, 8 layers, 8 heads, 2 KV groups "
                         "x 64, FFN 1376; real 151,552 vocabulary; seed 0; fp32 weights + bf16 autocast",
                "recipe": "glm4_finetune.finetune(): batch 4, max_input/output_length 128/128, "
                          f"{steps} steps, no evaluation, AdvertiseGen xl.jsonl rows",
                "runs_per_case": args.repeats, "torch_threads": 2, "quick": args.quick}
    notes = ("Peak RSS of the whole child process (Python, libraries, tokenizer, model, optimizer, activations). "
             "Full fine-tuning keeps fp32 weights, gradients and two AdamW moments for all 177M parameters "
             "(~2.8 GB); LoRA and P-tuning keep them for well under 1% of the parameters.")
    print(write_result(bench_name(__file__), settings=settings, table=table, goals=goals, notes=notes))


if __name__ == "__main__":
    main()
