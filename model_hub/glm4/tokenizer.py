"""GLM-4-9B-chat tokenizer as a plain transformers fast tokenizer, built offline from the real files.

The original `ChatGLM4Tokenizer` is remote code on top of tiktoken. Here the real `tokenizer.model` (tiktoken ranks)
is converted with transformers' `TikTokenConverter` into a `tokenizers` byte-level BPE with the GLM-4 split
pattern; the 14 special tokens of tokenizer_config.json get ids 151329-151342, a post-processor puts
`[gMASK]<sop>` in front (the original `build_inputs_with_special_tokens`), and the real jinja chat template is
attached. The result loads with `AutoTokenizer.from_pretrained(dir)` as a `TokenizersBackend` (no remote code,
no model_hub import needed).

The converted tokenizer.json is ~20 MB, so it is never committed: `load_glm4_tokenizer()` builds it once into
`BUILD_DIR/tokenizers/glm-4-9b-chat` (git-ignored) and rebuilds when the folder is missing or was built from
other inputs. `python -m model_hub.glm4.tokenizer OUT_DIR` writes the same folder anywhere.
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile

import tokenizers
import transformers
from tokenizers import processors

from .. import BUILD_DIR, tokenizer_files

NAME = "glm-4-9b-chat"
CACHE_DIR = os.path.join(BUILD_DIR, "tokenizers", NAME)
STAMP_FILE = "model_hub_build.json"
BUILD_VERSION = 1  # bump when the build below changes, so stale caches are rebuilt

# The pre-tokenisation regex of ChatGLM4Tokenizer (the cl100k/Qwen style split).
GLM4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PREFIX = ("[gMASK]", "<sop>")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_stamp(files_dir: str) -> dict:
    return {
        "build_version": BUILD_VERSION,
        "tokenizer.model": _sha256(os.path.join(files_dir, "tokenizer.model")),
        "tokenizer_config.json": _sha256(os.path.join(files_dir, "tokenizer_config.json")),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def build_glm4_tokenizer(files_dir: str | None = None):
    """Build the tokenizer in memory from the vendored (or given) glm-4-9b-chat folder (~2 s)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    files_dir = files_dir or tokenizer_files(NAME)
    with open(os.path.join(files_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    added = {int(i): tok["content"] for i, tok in config["added_tokens_decoder"].items()}
    specials = [added[i] for i in sorted(added)]

    backend = TikTokenConverter(vocab_file=os.path.join(files_dir, "tokenizer.model"), pattern=GLM4_PATTERN,
                                extra_special_tokens=specials).converted()
    for index, content in added.items():
        if backend.token_to_id(content) != index:  # the specials must follow the 151329 ranks, in id order
            raise ValueError(f"{files_dir}: special token {content!r} got id {backend.token_to_id(content)}, "
                             f"expected {index}")
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        # Pair encoding of the original appends the id of "<eos>", a token GLM-4 does not have; we append nothing.
        processors.TemplateProcessing(
            single=f"{PREFIX[0]} {PREFIX[1]} $A", pair=f"{PREFIX[0]} {PREFIX[1]} $A $B:1",
            special_tokens=[(t, added_id) for added_id, t in added.items() if t in PREFIX]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=config["eos_token"],
        pad_token=config["pad_token"],
        extra_special_tokens=config.get("additional_special_tokens", specials),
        padding_side=config["padding_side"],
        model_max_length=config["model_max_length"],
        clean_up_tokenization_spaces=config["clean_up_tokenization_spaces"],
        chat_template=config["chat_template"],
        model_input_names=["input_ids", "attention_mask"],
    )


def _write(out_dir: str, files_dir: str, replace: bool) -> None:
    """Save into a temporary sibling folder, then rename it into place (readers never see half a folder)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        build_glm4_tokenizer(files_dir).save_pretrained(tmp)
        with open(os.path.join(tmp, STAMP_FILE), "w", encoding="utf-8") as f:
            json.dump(_expected_stamp(files_dir), f, indent=2)
        old = None
        if replace and os.path.lexists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            try:
                os.rename(out_dir, os.path.join(old, "x"))
            except FileNotFoundError:  # another process moved it first
                pass
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.isdir(out_dir):  # not a lost race with another builder: a real error
                raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_current(out_dir: str, files_dir: str) -> bool:
    try:
        with open(os.path.join(out_dir, STAMP_FILE), encoding="utf-8") as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    needed = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    return stamp == _expected_stamp(files_dir) and all(os.path.isfile(os.path.join(out_dir, n)) for n in needed)


def glm4_tokenizer_dir(files_dir: str | None = None) -> str:
    """The cached tokenizer folder, (re)built first when missing or stale."""
    files_dir = files_dir or tokenizer_files(NAME)
    for _ in range(3):  # a parallel builder may swap the folder between our build and our check
        if _is_current(CACHE_DIR, files_dir):
            return CACHE_DIR
        _write(CACHE_DIR, files_dir, replace=True)
    if not _is_current(CACHE_DIR, files_dir):
        raise RuntimeError(f"could not build the GLM-4 tokenizer into {CACHE_DIR}")
    return CACHE_DIR


def load_glm4_tokenizer():
    """The GLM-4-9B-chat tokenizer (a `TokenizersBackend`), from the build cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(glm4_tokenizer_dir(), trust_remote_code=False)  # our own files


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m model_hub.glm4.tokenizer OUT_DIR", file=sys.stderr)
        return 2
    out_dir = args[0]
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        print(f"error: {out_dir}: folder exists and is not empty; remove it or choose another", file=sys.stderr)
        return 2
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        print(f"error: {out_dir}: exists and is not a folder", file=sys.stderr)
        return 2
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    _write(out_dir, tokenizer_files(NAME), replace=False)
    print(f"wrote the GLM-4-9B-chat tokenizer to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
