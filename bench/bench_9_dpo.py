"""Benchmark 9: our DPO step (preference/train_dpo.py) against TRL's own example script (python -m trl.scripts.dpo,
TRL 1.16) on the same tiny model and the same pairs: throughput and peak RSS side by side (issue 34).

Model: the tiny Chinese-Alpaca-7B twin (model_hub.make_tiny, real tokenizer, random weights, fp32). Data: the MSRA
NER pairs of preference/make_demo_pairs.py, given to TRL's script as {"prompt", "chosen", "rejected"} text in a
local JSONL folder (its --dataset_name). Both sides: a new LoRA r 8 on the recipe's targets, beta 0.1, batch 2
pairs, lr 5e-6, max_length 256, fp32 on CPU, 2 torch threads, no checkpoints. Each run is one child process; the
parent measures its wall time and peak RSS (wait4's ru_maxrss). The training speed is each side's own count: the
tokens its Trainer logged (`num_tokens`: prompt + chosen + prompt + rejected as that side tokenized them; ours renders
llama_ner's full instruction prompt, TRL's script tokenizes the raw prompt text, so ours trains ~1.4x the tokens) per
second of its `train_runtime`. Wall time (imports, model load, tokenization, training, saving) is reported beside it.
"""
import json
import os
import re
import shutil
import sys
import tempfile
import time

from bench.common import REPO, bench_name, median, parse_args, peak_rss_mib_of_child, write_result

MODEL = "chinese-alpaca-7b"
COMMON = dict(batch=2, lr="5e-6", max_length=256, beta="0.1", rank=8)


def data(folder: str, pairs: int) -> tuple[str, str, int]:
    """(our pairs file, TRL's dataset folder, tokens of the pairs as we tokenize them)."""
    from model_hub.loader import load_tokenizer
    from preference import make_demo_pairs
    from preference.pairs import AnswerEncoder, tokenize_file

    make_demo_pairs.main(["--out_dir", folder, "--ner_pairs", str(pairs), "--tool_pairs", "1"])
    ours = os.path.join(folder, "msra_ner_pairs.jsonl")
    trl_folder = os.path.join(folder, "trl")
    os.makedirs(trl_folder)
    with open(ours, encoding="utf-8") as src, open(os.path.join(trl_folder, "train.jsonl"), "w",
                                                   encoding="utf-8") as dst:
        dst.writelines(src.readlines())
    rows, _ = tokenize_file(ours, AnswerEncoder("llama_ner", load_tokenizer(f"tiny:{MODEL}")), COMMON["max_length"])
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    return ours, trl_folder, tokens


def trainer_figures(log: str) -> tuple[int, float]:
    """(tokens trained, seconds of training) from a Trainer's printed logs: the last `num_tokens`, `train_runtime`."""
    tokens = re.findall(r"'num_tokens': '?([0-9.]+)", log)
    runtime = re.findall(r"'train_runtime': '?([0-9.]+)", log)
    if not tokens or not runtime:
        raise RuntimeError(f"no num_tokens / train_runtime in the run's log: {log[-1500:]}")
    return int(float(tokens[-1])), float(runtime[-1])


def commands(model_dir: str, ours: str, trl_folder: str, out: str, steps: int) -> dict:
    from model_hub.registry import get_family

    lora = get_family("llama").lora()
    return {
        "ours: preference/train_dpo.py": [
            sys.executable, os.path.join(REPO, "preference", "train_dpo.py"), f"--model_dir={model_dir}",
            "--prompt_format=llama_ner", f"--train_path={ours}", f"--save_dir={out}/ours-run", f"--max_steps={steps}",
            f"--train_batch_size={COMMON['batch']}", f"--learning_rate={COMMON['lr']}", f"--beta={COMMON['beta']}",
            f"--max_length={COMMON['max_length']}", f"--lora_r={COMMON['rank']}", f"--save_steps={steps + 1}",
            f"--log_steps={steps}"],
        "TRL: python -m trl.scripts.dpo": [
            sys.executable, "-m", "trl.scripts.dpo", "--model_name_or_path", model_dir, "--dataset_name", trl_folder,
            "--output_dir", f"{out}/trl-run", "--max_steps", str(steps), "--per_device_train_batch_size",
            str(COMMON["batch"]), "--learning_rate", COMMON["lr"], "--beta", COMMON["beta"], "--max_length",
            str(COMMON["max_length"]), "--use_peft", "--lora_r", str(COMMON["rank"]), "--lora_alpha",
            str(lora["alpha"]), "--lora_dropout", str(lora["dropout"]), "--lora_target_modules",
            *lora["target_modules"], "--use_cpu", "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", str(steps), "--dtype", "float32"],
    }


def main():
    args = parse_args(__doc__.split("\n\n")[0], default_repeats=2)
    from model_hub.make_tiny import tiny_dir

    steps = 4 if args.quick else 16
    model_dir = tiny_dir(MODEL)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        ours, trl_folder, tokens = data(tmp, steps * COMMON["batch"])
        for case, argv in commands(model_dir, ours, trl_folder, tmp, steps).items():
            walls, peaks, speeds = [], [], []
            for run in range(args.repeats):
                shutil.rmtree(f"{tmp}/{'ours' if case.startswith('ours') else 'trl'}-run", ignore_errors=True)
                start = time.perf_counter()
                with open(os.path.join(tmp, "log.txt"), "w") as log:
                    peak, code = peak_rss_mib_of_child(argv, cwd=REPO, env=env, stdout=log, stderr=log)
                walls.append(time.perf_counter() - start)
                text = open(os.path.join(tmp, "log.txt"), encoding="utf-8", errors="replace").read()
                if code != 0:
                    raise RuntimeError(f"{case} failed ({code}): {text[-2000:]}")
                trained, seconds = trainer_figures(text)
                speeds.append(trained / seconds)
                peaks.append(peak)
            table.append({"case": case, "steps": steps, "pairs": steps * COMMON["batch"], "tokens_trained": trained,
                          "train_tok_per_s": round(median(speeds), 1), "wall_s": round(median(walls), 1),
                          "peak_rss_mib": round(max(peaks))})
            print(json.dumps(table[-1]), flush=True)
    ours_row, trl_row = table
    goals = [{"goal": "our DPO training tok/s >= 0.9x TRL's example script (same model, data, LoRA, batch)",
              "target": 0.9, "measured": round(ours_row["train_tok_per_s"] / trl_row["train_tok_per_s"], 2),
              "met": ours_row["train_tok_per_s"] >= 0.9 * trl_row["train_tok_per_s"]},
             {"goal": "our peak RSS <= 1.1x TRL's example script", "target": 1.1,
              "measured": round(ours_row["peak_rss_mib"] / trl_row["peak_rss_mib"], 2),
              "met": ours_row["peak_rss_mib"] <= 1.1 * trl_row["peak_rss_mib"]}]
    settings = {"model": f"tiny {MODEL} (model_hub.make_tiny, real tokenizer, random weights, fp32)",
                "data": f"{steps * COMMON['batch']} MSRA NER pairs (preference/make_demo_pairs.py), {tokens} tokens",
                **{k: v for k, v in COMMON.items()}, "steps": steps, "runs_per_case": args.repeats,
                "torch_threads": 2, "quick": args.quick}
    notes = ("train_tok_per_s: the tokens each Trainer logged (num_tokens) per second of its train_runtime. TRL's "
             "script tokenizes the raw prompt text; ours renders llama_ner's full instruction prompt as the SFT "
             "recipe trained on it, so it trains more tokens per pair (tokens_trained). wall_s and peak RSS: the "
             "whole child process (imports, model load, data preparation, training; ours also writes the adapter, "
             "loss.png, margins.png and TensorBoard logs, TRL's script saves its model).")
    print(write_result(bench_name(__file__), settings=settings, table=table, goals=goals, notes=notes))


if __name__ == "__main__":
    main()
