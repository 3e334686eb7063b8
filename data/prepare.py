"""Unpack the vendored data that git keeps compressed, and verify every byte.

The Stanford alpaca file (22.8 MB) is stored as `stanford_alpaca/alpaca_data.json.xz`; ChatGLM-Tuning's
old-format `chatglm_tuning/alpaca_data.jsonl` (21.8 MB) is rebuilt from it by the rule its repo used.
Both results must have the git blob ids of the original files, so they are byte-identical to them.
GLM-4's configs read `train.jsonl` from the data folder; `glm4_finetune_demo/AdvertiseGen/train.jsonl` is made as a
copy of the shipped 3,000-row train sample `xl.jsonl`, so the original's command runs on that folder as it is.

    python data/prepare.py          # idempotent; `make data` runs it
"""
import hashlib
import json
import lzma
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ALPACA_XZ = os.path.join(HERE, "stanford_alpaca", "alpaca_data.json.xz")
ALPACA_JSON = os.path.join(HERE, "stanford_alpaca", "alpaca_data.json")
TUNING_JSONL = os.path.join(HERE, "chatglm_tuning", "alpaca_data.jsonl")
ADVERTISEGEN = os.path.join(HERE, "glm4_finetune_demo", "AdvertiseGen")
ADVERTISEGEN_TRAIN = os.path.join(ADVERTISEGEN, "train.jsonl")
BLOBS = {
    ALPACA_JSON: "3779ddbc040543ab1834ef216c983d6fcc06cc9a",  # tatsu-lab/stanford_alpaca alpaca_data.json
    TUNING_JSONL: "38ae62499f468112a0f5e93c56e23bb211333be1",  # mymusise/ChatGLM-Tuning data/alpaca_data.jsonl
    ADVERTISEGEN_TRAIN: "b4c9cd68aa28b2c9801c97901c12d4d0d2e01e6c",  # THUDM/GLM-4 finetune_demo AdvertiseGen/xl.jsonl
}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def old_chatglm_tuning_line(example: dict) -> str:
    """One line of ChatGLM-Tuning's committed jsonl (its March 2023 format), ensure_ascii as json.dumps does."""
    text = "### Instruction:\n" + example["instruction"]
    if example["input"]:
        text += "\n\n### Input:\n" + example["input"]
    text += "\n\n### Response:\n" + example["output"] + "\nEND\n"
    return json.dumps({"text": text}) + "\n"


def write_verified(path: str, data: bytes) -> None:
    if git_blob_id(data) != BLOBS[path]:
        sys.exit(f"error: {path}: rebuilt bytes do not match the original (git blob {BLOBS[path]})")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def is_done(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        return git_blob_id(f.read()) == BLOBS[path]


def main() -> None:
    if not is_done(ALPACA_JSON):
        with lzma.open(ALPACA_XZ) as f:
            write_verified(ALPACA_JSON, f.read())
    if not is_done(TUNING_JSONL):
        with open(ALPACA_JSON, encoding="utf-8") as f:
            examples = json.load(f)
        lines = "".join(old_chatglm_tuning_line(e) for e in examples)
        write_verified(TUNING_JSONL, lines.encode("utf-8"))
    if not is_done(ADVERTISEGEN_TRAIN):
        with open(os.path.join(ADVERTISEGEN, "xl.jsonl"), "rb") as f:
            write_verified(ADVERTISEGEN_TRAIN, f.read())
    print(f"data ready: {ALPACA_JSON}, {TUNING_JSONL}, {ADVERTISEGEN_TRAIN}")


if __name__ == "__main__":
    main()
