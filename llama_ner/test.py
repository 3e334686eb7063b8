"""Evaluate the trained LoRA on the dev set and the MSRA test split (the original's test.py, plus real metrics).

    python llama_ner/test.py                                   # reads ./checkpoint/msra/train_trainer/…/train_args.json
    python llama_ner/test.py --train_args=build/llama-ner/train_trainer/adapter_model/train_args.json --eval_rows=32

1. As the original: one teacher-forced forward pass over the dev set (shuffled, batch train_batch_size) and the
   first 20 decoded "predictions" and labels printed as 预测： / 真实：. These contain the gold answer in the
   input, so they are not a measure of NER quality.
2. Added: free greedy generation from the training prompt over the dev set and the MSRA test split, answers
   parsed into (entity, type) sets, and micro / per-type precision, recall, F1 and exact match printed as tables
   and written (atomically) to report_path as JSON, with every prediction.
Options: the keys of train_args.json (the training run) and the ones below, as --key=value; --help lists them.
NB the vendored dev.txt is msra_1000.txt = the first 1,000 train sentences (dev ⊂ train); the test split is
held out.
"""
import os


from llama_ner.common import BASE_CONFIG, collate_for, resolve_data_paths, show_args
from llama_ner.dataset import load_data
from llama_ner.evaluation import (generate_answers, load_model, parse_eval_args, pick_rows,
                                  score_split, teacher_forced, write_report)
from tuning.errors import run_main

EVAL_CONFIG = {
    "test_path": "build/llama-ner/instruct_data/test.txt",  # MSRA test split (process.py); "" to skip
    "eval_rows": -1,          # > 0: a fixed-seed subset of this many rows per split (CPU runs)
    "eval_batch_size": 8,
    "max_new_tokens": 128,
    "report_path": "",        # default: save_dir/ner_report.json
    "teacher_forced_rows": 20,
}


def main():
    args = parse_eval_args(EVAL_CONFIG, __doc__)
    resolve_data_paths(args, {**BASE_CONFIG, **EVAL_CONFIG}, ("dev_path", "test_path"))
    show_args(args)
    columns = (args.instruct_column, args.query_column, args.response_column)
    splits = [("dev", args.dev_path)] + ([("test", args.test_path)] if args.test_path else [])
    data = {name: pick_rows(load_data(path, columns), args.eval_rows, args.seed) for name, path in splits}

    model, tokenizer = load_model(args)
    collate = collate_for(args, tokenizer)

    preds, trues = teacher_forced(model, collate, data["dev"], args.train_batch_size, shuffle=True, seed=args.seed)
    print("预测：", preds[:args.teacher_forced_rows])
    print("真实：", trues[:args.teacher_forced_rows])

    report = {"model_dir": args.model_dir, "save_dir": args.save_dir, "decoding": "greedy",
              "max_new_tokens": args.max_new_tokens, "splits": {}}
    for name, path in splits:
        answers = generate_answers(model, tokenizer, collate, data[name], args.eval_batch_size,
                                   args.max_new_tokens, desc=f"generating ({name})")
        report["splits"][name] = score_split(name, path, data[name], answers, args.response_column)
    write_report(args.report_path or os.path.join(args.save_dir, "ner_report.json"), report)
    return report


if __name__ == "__main__":
    run_main(main)
