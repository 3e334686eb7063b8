"""AdvertiseGen `{"content", "summary"}` lines → the messages format finetune.py reads (byte-equal to the
original's train.jsonl / dev.jsonl: one user turn with the content, one assistant turn with the summary).

\b
    python glm4_finetune/convert_advertisegen.py data/AdvertiseGen/train.json data/AdvertiseGen/train.jsonl
    python glm4_finetune/convert_advertisegen.py data/AdvertiseGen/dev.json data/AdvertiseGen/dev.jsonl
"""
import argparse
import json


from tqdm import tqdm

from tuning.errors import run_main
from tuning.files import atomic_file, read_jsonl, require_str


def to_messages(record: dict) -> dict:
    return {"messages": [{"role": "user", "content": record["content"]},
                         {"role": "assistant", "content": record["summary"]}]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.replace("\b\n", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="AdvertiseGen file: one {\"content\", \"summary\"} JSON object per line")
    parser.add_argument("output", help="messages-format .jsonl to write")
    args = parser.parse_args()

    rows = read_jsonl(args.input)
    for line, record in rows:  # check everything before writing anything
        require_str(record, "content", args.input, line)
        require_str(record, "summary", args.input, line)
    with atomic_file(args.output) as f:
        for _, record in tqdm(rows, desc="converting", unit="row"):
            f.write(json.dumps(to_messages(record), ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} conversations to {args.output}")


if __name__ == "__main__":
    run_main(main)
