"""Score a trained chatglm_lora adapter on a dev split: batched greedy generation, then BLEU-4 and ROUGE-1/2/L with
the same metric code as glm4_finetune (tuning/text_metrics.py: jieba words, rouge-chinese F × 100, nltk BLEU-4
with smoothing method3 on its 0–1 scale), a printed table, and a JSON of the scores and every prediction.

The dev split is --eval_file (any format tokenize_dataset_rows.py reads), or the rows of --data_path that
`tokenize_dataset_rows.py --eval_fraction F --seed S` left out of training (give the same F and S here).

    python chatglm_lora/evaluate.py --chatglm_path /data/chatglm-6b --lora_path output --eval_file dev.jsonl
    python chatglm_lora/evaluate.py --chatglm_path tiny:chatglm-6b --lora_path output \
        --data_path my.jsonl --eval_fraction 0.05 --seed 42 --num 8 --batch_size 4
"""
import argparse
import json
import os

from chatglm_lora.data_formats import held_out, read_rows
from chatglm_lora.infer import check_adapter_args, generate_answers, load_with_adapter
from tuning.errors import UserError, run_main
from tuning.files import atomic_file, require_output_parent
from tuning.text_metrics import METRICS, score_corpus, score_pair


def dev_rows(args) -> list[tuple[int, str, str]]:
    """(line, prompt, reference) of the dev split; rows with an empty reference are left out (not scorable)."""
    if bool(args.eval_file) == bool(args.data_path):
        raise UserError("give --eval_file, or --data_path with --eval_fraction (the rows training left out)",
                        field="eval_file")
    if args.eval_file:
        rows = read_rows(args.eval_file)
    else:
        rows = read_rows(args.data_path)
        dev = held_out(len(rows), args.eval_fraction, args.seed)
        rows = [row for i, row in enumerate(rows) if i in dev]
    rows = [row for row in rows if row[2].strip()]
    if not rows:
        raise UserError("no dev row with a non-empty target", path=args.eval_file or args.data_path)
    return rows[:args.num] if args.num > 0 else rows


def format_table(scores: dict, n_rows: int) -> str:
    lines = [f"{'metric':<10}{'score':>10}   ({n_rows} rows, greedy)"]
    lines += [f"{name:<10}{scores[name]:>10.4f}" for name in METRICS]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chatglm_path", default="model_path/chatglm", help="base ChatGLM-6B folder or tiny:chatglm-6b")
    parser.add_argument("--lora_path", default="output", help="PEFT adapter folder (finetune.py's output_dir)")
    parser.add_argument("--eval_file", default="", help="the dev rows (context/target, alpaca, multi-turn)")
    parser.add_argument("--data_path", default="", help="the training file whose held-out rows are the dev split")
    parser.add_argument("--eval_fraction", type=float, default=0.05, help="with --data_path (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="with --data_path (default: %(default)s)")
    parser.add_argument("--num", type=int, default=0, help="> 0: score only the first N dev rows")
    parser.add_argument("--max_length", type=int, default=256, help="prompt + answer tokens, as infer.py")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (left-padded)")
    parser.add_argument("--output", default="", help="JSON of scores and predictions (default: LORA_PATH/eval_results.json)")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (CPU or GPU)")
    args = parser.parse_args()

    if args.batch_size < 1:
        raise UserError("must be at least 1", field="batch_size")
    rows = dev_rows(args)
    check_adapter_args(args.chatglm_path, args.lora_path)
    output = args.output or os.path.join(args.lora_path, "eval_results.json")
    require_output_parent(output)
    model, tokenizer = load_with_adapter(args.chatglm_path, args.lora_path, args.bf16)
    predictions = generate_answers(model, tokenizer, [prompt for _, prompt, _ in rows], args.max_length,
                                   args.batch_size)
    references = [target for _, _, target in rows]
    scores = score_corpus(predictions, references)
    result = {"eval_file": args.eval_file or None, "data_path": args.data_path or None,
              "eval_fraction": None if args.eval_file else args.eval_fraction,
              "seed": None if args.eval_file else args.seed, "rows": len(rows), "decoding": "greedy",
              "max_length": args.max_length, "scores": scores,
              "predictions": [{"line": line, "prompt": prompt, "reference": reference, "prediction": prediction,
                               "scores": score_pair(prediction, reference)}
                              for (line, prompt, reference), prediction in zip(rows, predictions)]}
    with atomic_file(output) as f:
        json.dump(result, f, ensure_ascii=False, indent=2)
    print(format_table(scores, len(rows)))
    print(f"scores and predictions: {output}")
    return result


if __name__ == "__main__":
    run_main(main)
