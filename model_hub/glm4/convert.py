"""Convert an original glm-4-9b-chat checkpoint (remote-code layout: fused `query_key_value`, `dense_h_to_4h`,
`output_layer`) into transformers' native GlmForCausalLM folder (the glm-4-9b-chat-hf layout), with the real
GLM-4 tokenizer, so that it loads with `AutoModelForCausalLM.from_pretrained(OUT_DIR)` and no remote code.

    python -m model_hub.convert_glm4_to_hf ORIGINAL_DIR OUT_DIR

ORIGINAL_DIR holds config.json and the weights: model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model*.bin (read with torch.load(weights_only=True)). Shards are
converted one at a time (a 9B model never sits in memory twice); tensors keep their dtype (bf16 for the real
model). OUT_DIR is written completely or not at all. The mapping is the one verified in
tests/golden/glm4_model/README.md ("Conversion to transformers' native GlmForCausalLM").
"""
import argparse
import os
import re


from model_hub.shards import ShardWriter, find_shards, read_shard
from tuning.errors import UserError
from tuning.files import atomic_dir, read_json
from tuning.outputs import refuse_inputs

LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
# Per-layer names that are copied unchanged apart from the prefix.
LAYER_COPY = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # first half gate (silu), second half up: same as native
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
TOP_COPY = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
DROP = {"transformer.rotary_pos_emb.inv_freq"}  # lacks rope_ratio; the native model computes its own


class Layout:
    """The sizes the fused query_key_value is split by: all queries, then all keys, then all values."""

    def __init__(self, orig: dict):
        self.heads = orig["num_attention_heads"]
        self.groups = orig["multi_query_group_num"] if orig.get("multi_query_attention", False) else self.heads
        self.head_dim = orig["kv_channels"]  # never hidden_size / heads: the two need not agree
        self.layers = orig["num_layers"]
        self.bias = orig.get("add_qkv_bias", True)

    def qkv_rows(self):
        q, kv = self.heads * self.head_dim, self.groups * self.head_dim
        return q, kv, kv


def convert_tensor(name: str, tensor, layout: Layout) -> list:
    """One original tensor → its native (name, tensor) pairs; [] for the dropped rotary buffer."""
    import torch

    if name in DROP:
        return []
    if name in TOP_COPY:
        return [(TOP_COPY[name], tensor)]
    match = LAYER.match(name)
    if not match:
        raise UserError("unexpected tensor; not part of a glm-4-9b-chat checkpoint", field=name)
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in LAYER_COPY:
        return [(prefix + LAYER_COPY[rest], tensor)]
    if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        kind = rest.rsplit(".", 1)[1]
        rows = layout.qkv_rows()
        if tensor.shape[0] != sum(rows):
            raise UserError(f"has {tensor.shape[0]} rows; config.json gives heads·kv_channels + 2·groups·kv_channels "
                            f"= {sum(rows)}", field=name)
        q, k, v = torch.split(tensor, rows, dim=0)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t.clone()) for p, t in zip("qkv", (q, k, v))]
    raise UserError("unexpected tensor; not part of a glm-4-9b-chat checkpoint", field=name)


NATIVE_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
NATIVE_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
ROTARY_BUFFER = "transformer.rotary_pos_emb.inv_freq"


class ToOriginal:
    """Native GlmForCausalLM tensors → THUDM's original names: the exact inverse of `convert_tensor`.

    q/k/v_proj are concatenated back into query_key_value once all three of a layer have arrived (they may sit in
    different shards); `finish` adds the rotary buffer the original checkpoint carries (1/10000^(2i/(kv_channels/2)),
    without rope_ratio, as THUDM's code computes it) in the checkpoint's dtype.
    """

    def __init__(self, layout: Layout):
        self.layout, self.pending, self.dtype = layout, {}, None
        self.top = {native: original for original, native in TOP_COPY.items()}
        self.layer = {native: original for original, native in LAYER_COPY.items()}

    def add(self, name: str, tensor) -> list:
        import torch

        if tensor.is_floating_point():
            self.dtype = tensor.dtype
        if name in self.top:
            return [(self.top[name], tensor)]
        match = NATIVE_LAYER.match(name)
        if not match:
            raise UserError("unexpected tensor; not part of a native GLM-4 (GlmForCausalLM) checkpoint", field=name)
        layer, rest = match.groups()
        prefix = f"transformer.encoder.layers.{layer}."
        if rest in self.layer:
            return [(prefix + self.layer[rest], tensor)]
        qkv = NATIVE_QKV.match(rest)
        if not qkv:
            raise UserError("unexpected tensor; not part of a native GLM-4 (GlmForCausalLM) checkpoint", field=name)
        part, kind = qkv.groups()
        pieces = self.pending.setdefault((layer, kind), {})
        pieces[part] = tensor
        if len(pieces) < 3:
            return []
        del self.pending[(layer, kind)]
        fused = torch.cat([pieces[p] for p in "qkv"], dim=0)
        if fused.shape[0] != sum(self.layout.qkv_rows()):
            raise UserError(f"q/k/v_proj have {fused.shape[0]} rows together; config.json gives "
                            f"{sum(self.layout.qkv_rows())}", field=f"model.layers.{layer}.self_attn")
        return [(f"{prefix}self_attention.query_key_value.{kind}", fused)]

    def finish(self) -> list:
        import torch

        if self.pending:
            (layer, kind), pieces = next(iter(self.pending.items()))
            raise UserError(f"checkpoint is incomplete: layer {layer} has only {'/'.join(sorted(pieces))}_proj.{kind}",
                            field=f"model.layers.{layer}.self_attn")
        dim = self.layout.head_dim // 2  # the original rotates half of each head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        return [(ROTARY_BUFFER, inv_freq.to(self.dtype or torch.float32))]


def expected_names(layout: Layout) -> set[str]:
    names = set(TOP_COPY.values())
    for i in range(layout.layers):
        names |= {f"model.layers.{i}.{n}" for n in LAYER_COPY.values()}
        names |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"}
        if layout.bias:
            names |= {f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"}
    return names


def convert(src: str, out_dir: str, *, max_shard_gb: float = 5.0, with_tokenizer: bool = True,
            force: bool = False) -> str:
    from tqdm import tqdm

    from model_hub.glm4.native import native_config_from_original

    config_path = os.path.join(src, "config.json")
    orig = read_json(config_path)
    if not isinstance(orig, dict) or "padded_vocab_size" not in orig or "multi_query_group_num" not in orig:
        raise UserError("not an original glm-4-9b-chat config (expected padded_vocab_size, multi_query_group_num, "
                        "kv_channels, ...)", path=config_path)
    try:
        config = native_config_from_original(orig, dtype=orig.get("torch_dtype", "bfloat16"))
        layout = Layout(orig)
    except (ValueError, KeyError) as exc:
        raise UserError(f"cannot map to GlmConfig: {exc}", path=config_path) from None
    shards = find_shards(src)
    with atomic_dir(out_dir, "model", inputs=[src], overwrite=force, flag="--force") as tmp:
        writer, seen = ShardWriter(tmp, int(max_shard_gb * 2**30)), set()
        for shard in tqdm(shards, desc="converting shards", unit="shard"):
            for name, tensor in read_shard(shard).items():
                for new_name, new_tensor in convert_tensor(name, tensor, layout):
                    if new_name in seen:
                        raise UserError("tensor appears twice in the checkpoint", path=shard, field=name)
                    seen.add(new_name)
                    writer.add(new_name, new_tensor)
        missing = sorted(expected_names(layout) - seen)
        if missing:
            raise UserError(f"checkpoint is incomplete: {len(missing)} native tensors missing, e.g. {missing[0]}",
                            path=src)
        writer.finish()
        config.save_pretrained(tmp)
        generation = os.path.join(src, "generation_config.json")
        if os.path.isfile(generation):
            from transformers import GenerationConfig

            GenerationConfig.from_pretrained(src).save_pretrained(tmp)
        if with_tokenizer:
            from model_hub.glm4.tokenizer import load_glm4_tokenizer

            load_glm4_tokenizer().save_pretrained(tmp)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original_dir", metavar="ORIGINAL_DIR", help="original glm-4-9b-chat folder (remote-code layout)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="new folder for the native GlmForCausalLM checkpoint")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard, GiB (default 5)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it already exists")
    args = parser.parse_args()
    if not os.path.isdir(args.original_dir):
        raise UserError("folder not found", path=args.original_dir)
    if os.path.abspath(args.original_dir) == os.path.abspath(args.out_dir):
        raise UserError("OUT_DIR must differ from ORIGINAL_DIR", path=args.out_dir)
    refuse_inputs(args.out_dir, [args.original_dir])
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir) and not args.force:
        raise UserError("already exists and is not empty (use --force to replace it)", path=args.out_dir)
    convert(args.original_dir, args.out_dir, max_shard_gb=args.max_shard_gb, force=args.force)
    print(f"converted {args.original_dir} -> {args.out_dir} (GlmForCausalLM, safetensors)")

