"""Stanford alpaca JSON → ChatGLM-Tuning's {"context", "target"} jsonl (byte-exact with the original).

    python chatglm_lora/cover_alpaca2jsonl.py --data_path data/stanford_alpaca/alpaca_data.json \
        --save_path data/alpaca_data.jsonl
"""
import argparse
import json
import os

from tqdm import tqdm

from model_hub.chatglm6b.prompts import format_example  # noqa: F401  (the original name; one definition)
from tuning.errors import UserError, run_main
from tuning.files import atomic_file, default_input, list_record, read_json, require_str
from tuning.outputs import check_output_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The alpaca file this repository ships (the original's default, data/alpaca_data.json, is not here).
ALPACA_JSON = "data/stanford_alpaca/alpaca_data.json"


def alpaca_path(value: str) -> str:
    """--data_path; its default is the repository's alpaca file wherever the script is run from."""
    return default_input(value, ALPACA_JSON, REPO, "--data_path",
                         "run `python data/prepare.py` (it unpacks the shipped alpaca_data.json.xz)")


def read_alpaca(path: str) -> list[dict]:
    """The alpaca list, every record checked: instruction (non-empty), input (optional), output (strings)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise UserError(f"expected a JSON list of {{instruction, input, output}} records, got {type(data).__name__}",
                        path=path)
    for i, example in enumerate(data):
        where = list_record(path, i)
        if not isinstance(example, dict):
            raise UserError(f"expected an object, got {type(example).__name__}", path=where)
        require_str(example, "instruction", where, None)
        require_str(example, "output", where, None, allow_empty=True)
        if example.get("input") is not None:
            require_str(example, "input", where, None, allow_empty=True)
    return data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", type=str, default=ALPACA_JSON, help="alpaca JSON list (default: %(default)s)")
    parser.add_argument("--save_path", type=str, default="data/alpaca_data.jsonl", help="output jsonl")
    args = parser.parse_args()

    data_path = alpaca_path(args.data_path)
    examples = read_alpaca(data_path)
    check_output_file(args.save_path, [data_path])
    empty_targets = 0
    with atomic_file(args.save_path) as f:
        for example in tqdm(examples, desc="formatting.."):
            row = format_example(example)
            empty_targets += not row["target"]
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(examples)} rows to {args.save_path}")
    if empty_targets:
        print(f"note: {empty_targets} rows have an empty output (kept, as the original; "
              "tokenize_dataset_rows.py drops them and says so)")


if __name__ == "__main__":
    run_main(main)
