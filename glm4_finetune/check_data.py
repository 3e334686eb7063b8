"""Check a GLM-4 data folder against a config before training: the same validation (glm4_finetune/validate.py)
and training tokenization (glm4_finetune/data.py, the config's `combine`) as finetune.py, nothing written, no
model loaded.

For the training split it prints rows read, kept, dropped and truncated at max_input_length + max_output_length
+ 1 tokens, and the token-length distribution (p50 / p95 / max, before the cut) with the real tokenizer; the
dev/test files are validated and counted. A bad row is one line `file:line: field: expected …`, exit code 2.

    python -m glm4_finetune.check_data build/glm4/AdvertiseGen tiny:glm-4-9b-chat glm4_finetune/configs/tiny/lora.yaml
"""
import argparse
import os

from glm4_finetune.config import load_config
from glm4_finetune.data import process_batch
from glm4_finetune.finetune import read_data
from tuning.data_check import DataReport
from tuning.errors import UserError, run_main


def check_folder(data_dir: str, model_dir: str, config_file: str) -> tuple[DataReport, dict]:
    """(the training split's report, rows per split)."""
    cfg = load_config(config_file)
    if not os.path.isdir(data_dir):
        raise UserError("data folder not found", path=data_dir)
    conversations = read_data(cfg, data_dir)
    from model_hub.loader import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    limit = cfg.max_input_length + cfg.max_output_length + 1
    train = conversations["train"]
    report = DataReport(os.path.join(data_dir, cfg.data_config.train_file), limit,
                        "max_input_length + max_output_length + 1")
    report.rows_read = len(train)
    full = process_batch({"messages": train}, tokenizer, 10 ** 9, 0, cfg.combine,
                         cfg.train_first_answer_token)["input_ids"]
    for ids in full:
        report.keep(len(ids), len(ids) > limit)
    return report, {split: len(rows) for split, rows in conversations.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="folder with the .jsonl files named in the config's data_config")
    parser.add_argument("model_dir", help="native GLM-4 model folder (its tokenizer), or tiny:glm-4-9b-chat")
    parser.add_argument("config_file", help="YAML config, e.g. glm4_finetune/configs/lora.yaml")
    args = parser.parse_args()
    report, counts = check_folder(args.data_dir, args.model_dir, args.config_file)
    report.print()
    print("  conversations per split: " + ", ".join(f"{split} {n}" for split, n in counts.items()))


if __name__ == "__main__":
    run_main(main)
