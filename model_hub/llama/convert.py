"""Convert Meta's LLaMA checkpoint (consolidated.XX.pth + params.json) into a transformers LlamaForCausalLM folder.

    python model_hub/convert_llama_weights_to_hf.py --input_dir ./ --model_size 7B --output_dir ./7B-hf
    python model_hub/convert_llama_weights_to_hf.py --input_dir ./ --model_size tokenizer_only --output_dir ./7B-hf

INPUT_DIR holds tokenizer.model and a MODEL_SIZE folder with params.json and consolidated.00.pth …
(7B: 1 shard, 13B: 2, 30B: 4, 65B: 8). A folder whose params.json sits directly in INPUT_DIR (what
merge_llama_with_chinese_lora.py --output_type pth writes) is accepted too. Shards are read with
torch.load(weights_only=True); model-parallel slices are joined (wq/wk/wv/w1/w3/output on rows, wo/w2 and the
embedding on columns), wq/wk are permuted from Meta's interleaved rotary layout to transformers' half-split one,
and the result is written as safetensors (fp16 by default, as the original) with config.json and the tokenizer.
OUTPUT_DIR gets complete files or none (written aside, then moved in).
"""
import argparse
import contextlib
import glob
import os
import shutil
import tempfile


import torch
from tqdm import tqdm

from model_hub.shards import ShardWriter, read_shard
from tuning.errors import UserError
from tuning.files import read_json
from tuning.outputs import check_files_folder

NUM_SHARDS = {"7B": 1, "13B": 2, "30B": 4, "65B": 8}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Meta layer tensor → (transformers name, axis the model-parallel slices are joined on; None = replicated)
LAYER_MAP = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
TOP_MAP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json", "consolidated.*.pth", "params.json")


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's rotary pairs (x0,x1),(x2,x3)… per head → transformers' halves (x0,x2,…),(x1,x3,…)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute` (transformers → Meta)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


@contextlib.contextmanager
def staged_output(out_dir: str, replace_weights: bool = True, inputs=(), overwrite: bool = False):
    """Yield a scratch folder inside `out_dir`; on success its files are moved in (and, with `replace_weights`,
    the weight files already in `out_dir` are removed first).

    Never replaces `out_dir` itself (the originals default it to "./"), and a failure leaves it untouched.
    Model files already in `out_dir` are deleted or replaced only when the folder is an earlier model output
    (or `overwrite`), never when it holds one of the run's `inputs` (tuning.outputs.check_files_folder).
    """
    check_files_folder(out_dir, "model", inputs=inputs, overwrite=overwrite)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=out_dir)
    try:
        yield tmp
        for pattern in WEIGHT_FILES if replace_weights else ():  # stale weights of an earlier run would shadow or mix with the new ones
            for old in glob.glob(os.path.join(out_dir, pattern)):
                os.remove(old)
        for name in os.listdir(tmp):
            target = os.path.join(out_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_checkpoint(input_dir: str, model_size: str) -> tuple[str, list[str]]:
    folder = os.path.join(input_dir, model_size)
    if not os.path.isfile(os.path.join(folder, "params.json")) and os.path.isfile(os.path.join(input_dir, "params.json")):
        folder = input_dir
    if not os.path.isfile(os.path.join(folder, "params.json")):
        raise UserError(f"params.json not found (expected {model_size}/params.json with consolidated.*.pth)",
                        path=os.path.join(input_dir, model_size))
    shards = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    expected = [os.path.join(folder, f"consolidated.{i:02d}.pth") for i in range(NUM_SHARDS[model_size])]
    if shards != expected:
        raise UserError(f"{model_size} needs {len(expected)} shard(s) consolidated.00.pth … "
                        f"consolidated.{len(expected) - 1:02d}.pth; found {len(shards)}", path=folder)
    return folder, shards


def read_params(folder: str) -> dict:
    path = os.path.join(folder, "params.json")
    params = read_json(path)
    for key in ("dim", "n_heads", "n_layers", "norm_eps"):
        if not isinstance(params, dict) or not isinstance(params.get(key), (int, float)):
            raise UserError("missing or not a number", path=path, field=key)
    return params


def join(name: str, slices: list[torch.Tensor], axis) -> torch.Tensor:
    if axis is None or len(slices) == 1:
        return slices[0]
    return torch.cat(slices, dim=axis)


def convert_state(shards: list[dict], params: dict, dtype: torch.dtype):
    """Yield (transformers name, tensor) one layer at a time; also yields the config sizes it found."""
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads

    def take(meta_name):
        missing = [i for i, s in enumerate(shards) if meta_name not in s]
        if missing:
            raise UserError(f"tensor missing from shard {missing[0]:02d}", field=meta_name)
        return [s[meta_name] for s in shards]

    for meta, (hf, axis) in TOP_MAP.items():
        yield hf, join(meta, take(meta), axis).to(dtype)
    for layer in range(params["n_layers"]):
        for meta, (hf, axis) in LAYER_MAP.items():
            w = join(meta, take(f"layers.{layer}.{meta}"), axis)
            if meta == "attention.wq.weight":
                w = permute(w, n_heads)
            elif meta == "attention.wk.weight":
                w = permute(w, n_kv)
            yield f"model.layers.{layer}.{hf}", w.to(dtype)


def llama_config(params: dict, vocab_size: int, intermediate_size: int, dtype: torch.dtype):
    from transformers import LlamaConfig

    n_heads = params["n_heads"]
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=params["dim"], intermediate_size=intermediate_size,
        num_hidden_layers=params["n_layers"], num_attention_heads=n_heads,
        num_key_value_heads=params.get("n_kv_heads") or n_heads, rms_norm_eps=params["norm_eps"],
        rope_theta=float(params.get("rope_theta", 10000.0)), max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, dtype=dtype,
        architectures=["LlamaForCausalLM"])


def write_model(input_dir: str, model_size: str, out_dir: str, dtype: torch.dtype, max_shard_gb: float,
                overwrite: bool = False) -> None:
    check_files_folder(out_dir, "model", inputs=[input_dir], overwrite=overwrite)
    folder, shard_paths = find_checkpoint(input_dir, model_size)
    params = read_params(folder)
    if params["dim"] % params["n_heads"]:
        raise UserError("dim must be a multiple of n_heads", path=os.path.join(folder, "params.json"))
    shards = [read_shard(p) for p in tqdm(shard_paths, desc="reading shards", unit="shard")]
    with staged_output(out_dir, inputs=[input_dir], overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, int(max_shard_gb * 2**30))
        sizes = {}
        total = 2 + 9 * params["n_layers"]
        for name, tensor in tqdm(convert_state(shards, params, dtype), total=total, desc="converting", unit="tensor"):
            if name == "model.embed_tokens.weight":
                sizes["vocab"] = tensor.shape[0]
            elif name == "model.layers.0.mlp.gate_proj.weight":
                sizes["intermediate"] = tensor.shape[0]
            writer.add(name, tensor)
        writer.finish()
        config = llama_config(params, sizes["vocab"], sizes["intermediate"], dtype)
        config.save_pretrained(tmp)
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(tmp)
        write_tokenizer(input_dir, tmp)


def write_tokenizer(input_dir: str, out_dir: str) -> None:
    path = os.path.join(input_dir, "tokenizer.model")
    if not os.path.isfile(path):
        raise UserError("tokenizer.model not found", path=path)
    from model_hub.llama.tokenizer import LlamaSentencePieceTokenizer

    tokenizer = LlamaSentencePieceTokenizer(vocab_file=path)
    tokenizer.save_pretrained(out_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="folder with tokenizer.model and MODEL_SIZE/")
    parser.add_argument("--model_size", required=True, choices=[*NUM_SHARDS, "tokenizer_only"],
                        help="which Meta checkpoint (decides the number of consolidated.XX.pth shards)")
    parser.add_argument("--output_dir", required=True, help="where to write the transformers folder")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16",
                        help="dtype of the written weights (default float16, as the original)")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="largest output safetensors file, GiB")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --output_dir even when it holds model files that are not an earlier output")
    args = parser.parse_args()
    if not os.path.isdir(args.input_dir):
        raise UserError("folder not found", path=args.input_dir)
    if args.model_size == "tokenizer_only":
        with staged_output(args.output_dir, replace_weights=False, inputs=[args.input_dir],
                           overwrite=args.overwrite) as tmp:
            write_tokenizer(args.input_dir, tmp)
        print(f"wrote the tokenizer -> {args.output_dir}")
        return
    write_model(args.input_dir, args.model_size, args.output_dir, DTYPES[args.dtype], args.max_shard_gb,
                args.overwrite)
    print(f"converted {args.model_size} -> {args.output_dir} (LlamaForCausalLM, safetensors, {args.dtype})")

