"""Build a tiny random-weight twin of a real model: the real architecture config shrunk, the REAL tokenizer
and vocabulary, weights from a fixed seed. Builds in seconds, loads offline with the Auto classes.

    python -m model_hub.make_tiny NAME OUT_DIR      # NAME: llama-7b, chinese-llama-7b, chinese-alpaca-7b,
                                                    #       glm-4-9b-chat, chatglm-6b
    python -m model_hub.make_tiny all               # every model into build/tiny/<NAME>
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import torch

from tuning.durable import follow_umask

from . import BUILD_DIR, tokenizer_files
from .registry import MODELS, get_spec

SEED = 1234


def _real_config(spec) -> dict:
    with open(os.path.join(tokenizer_files(spec.files), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _build_llama(spec):
    from transformers import LlamaConfig, LlamaForCausalLM

    from .llama.tokenizer import load_llama_tokenizer

    real = _real_config(spec)
    keep = ("vocab_size", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id",
            "pad_token_id", "hidden_act", "tie_word_embeddings")
    config = LlamaConfig(**{k: real[k] for k in keep}, **spec.tiny)
    return LlamaForCausalLM(config), load_llama_tokenizer(tokenizer_files(spec.files))


def _build_glm4(spec):
    from transformers import GlmForCausalLM

    from .glm4.native import native_config_from_original
    from .glm4.tokenizer import load_glm4_tokenizer

    config = native_config_from_original({**_real_config(spec), **spec.tiny})
    return GlmForCausalLM(config), load_glm4_tokenizer()


def _build_chatglm6b(spec):
    from .chatglm6b import ChatGLMForConditionalGeneration, ChatGLMTokenizer, tiny_config

    model = ChatGLMForConditionalGeneration(tiny_config(**spec.tiny))
    _spread_init(model)
    return model, ChatGLMTokenizer.from_pretrained(tokenizer_files(spec.files))


@torch.no_grad()
def _spread_init(model) -> None:
    """Wider random weights for the tiny ChatGLM, like the golden tiny model's.

    ChatGLM adds alpha x LayerNorm(x) to every residual and ties lm_head to the embedding, so with the usual
    0.02-std init the last input token dominates the logits and greedy decoding repeats it forever, which makes
    generation tests meaningless. Matrices N(0, 3.2/sqrt(fan_in)) and biases N(0, 0.4) give varied outputs.
    """
    for name, param in model.named_parameters():
        if "layernorm" in name:
            base, std = (1.0, 0.1) if name.endswith("weight") else (0.0, 0.05)
            param.copy_(base + torch.randn_like(param) * std)
        elif "word_embeddings" in name:
            param.normal_(0.0, 0.1)  # logits stay O(1): initial loss near ln(vocab)
        elif param.dim() == 2:
            param.normal_(0.0, 3.2 / param.shape[1] ** 0.5)
        else:
            param.normal_(0.0, 0.4)


BUILDERS = {"llama": _build_llama, "glm4": _build_glm4, "chatglm6b": _build_chatglm6b}


def build_tiny(name: str, out_dir: str, seed: int = SEED, sizes: dict | None = None) -> str:
    """Write the tiny `name` model + tokenizer to `out_dir` (atomically: a reader never sees half a folder).

    `sizes` overrides the tiny sizes of the registry (e.g. a bigger twin for benchmarks: bench/bench_2_training.py).
    """
    spec = get_spec(name)
    if sizes:
        spec = dataclasses.replace(spec, tiny={**spec.tiny, **sizes})
    torch.manual_seed(seed)
    model, tokenizer = BUILDERS[spec.family](spec)
    model = model.float().eval()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        with open(os.path.join(tmp, "tiny_model.json"), "w", encoding="utf-8") as f:
            json.dump({"name": name, "seed": seed, "parameters": n_params, "random_weights": True,
                       "real_files": f"model_hub/tokenizer_files/{spec.files}",
                       **({"sizes": sizes} if sizes else {})}, f, indent=2)
        follow_umask(tmp)  # safetensors writes 0600
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def tiny_dir(name: str) -> str:
    """build/tiny/<name>, built on first use (the same seed always gives the same weights)."""
    out = os.path.join(BUILD_DIR, "tiny", name)
    if not os.path.exists(os.path.join(out, "tiny_model.json")):
        try:
            build_tiny(name, out)
        except OSError:
            # A parallel process may have renamed its copy into place first; theirs is identical.
            if not os.path.exists(os.path.join(out, "tiny_model.json")):
                raise
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=[*MODELS, "all"], help="which real model to shrink")
    parser.add_argument("out_dir", nargs="?", help="output folder (default: build/tiny/NAME)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    names = list(MODELS) if args.name == "all" else [args.name]
    if args.out_dir and len(names) > 1:
        parser.error("OUT_DIR needs a single NAME")
    for name in names:
        out = args.out_dir or os.path.join(BUILD_DIR, "tiny", name)
        build_tiny(name, out, args.seed)
        with open(os.path.join(out, "tiny_model.json"), encoding="utf-8") as f:
            print(f"{name}: {json.load(f)['parameters']:,} parameters -> {out}")


if __name__ == "__main__":
    sys.exit(main())
