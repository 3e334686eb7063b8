"""Merge one or more LoRA adapters (in order) into a LLaMA base, as ymcui's merge_llama_with_chinese_lora.py.

    python model_hub/merge_llama_with_chinese_lora.py --base_model ./7B-hf \\
        --lora_model ./chinese-llama-plus-lora-7b,./chinese-alpaca-plus-lora-7b \\
        --output_type huggingface --output_dir ./chinese-alpaca-7b

For each LoRA, in the order given: its tokenizer is loaded and, when the vocabulary differs, the base's
embeddings are resized to it; every lora_A/lora_B pair is added into its weight as W += B·A·(alpha/r)
(transposed for fan_in_fan_out, alpha/√r for rsLoRA), and full tensors saved with the adapter (modules_to_save:
embed_tokens, lm_head of the Chinese LoRAs) replace the base's. A LoRA that changes no weight is refused (wrong
LoRA for this base). Adapters are read from adapter_model.safetensors or adapter_model.bin (torch.load with
weights_only=True); adapter_config.json keys of old peft versions (enable_lora, merge_weights, …) are ignored.

--output_type huggingface: a LlamaForCausalLM folder (safetensors) + the last LoRA's tokenizer.
--output_type pth: Meta's layout, consolidated.XX.pth (q/k permuted back, model-parallel slices as Meta cut
them: 7B 1 shard, 13B 2, 30B 4, 65B 8) + params.json + tokenizer; convert_llama_weights_to_hf.py reads it back.
"""
import argparse
import json
import os


import torch
from tqdm import tqdm

from model_hub.llama.convert import (
    DTYPES, LAYER_MAP, NUM_SHARDS, TOP_MAP, staged_output, unpermute)
from model_hub.lora_merge import Adapter, read_adapter
from tuning.errors import UserError

SIZE_BY_WIDTH = {4096: "7B", 5120: "13B", 6656: "30B", 8192: "65B"}


def load_tokenizer_of(lora_dir: str, fallback):
    if os.path.isfile(os.path.join(lora_dir, "tokenizer.model")):
        from model_hub.llama.tokenizer import load_llama_tokenizer

        return load_llama_tokenizer(lora_dir)
    print(f"{lora_dir}: no tokenizer.model; keeping the previous tokenizer")
    return fallback


def resize_embeddings(model, size: int) -> None:
    """Resize to `size` rows; new rows start at the mean embedding (deterministic; LoRAs that add tokens bring
    their own embed_tokens/lm_head through modules_to_save)."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(size, mean_resizing=False)
    if size > old:
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight.data[old:] = weight.data[:old].float().mean(0).to(weight.dtype)


@torch.no_grad()
def merge_one(model, config: dict, tensors: dict, lora_dir: str) -> int:
    """Add one adapter into `model` in place (model_hub.lora_merge); returns how many base tensors changed."""
    params = dict(model.named_parameters())
    adapter = Adapter(config, tensors, lora_dir)
    missing = sorted(adapter.names() - params.keys())
    if missing:
        raise UserError("adapter changes a tensor the base model does not have", path=lora_dir, field=missing[0])
    changed = 0
    for name in tqdm(sorted(adapter.names()), desc=f"merging {os.path.basename(lora_dir)}", unit="tensor"):
        target = params[name]
        merged = adapter.merged(name, target.data)
        changed += not torch.equal(target.data, merged)
        target.data = merged
    return changed


def meta_shards(model, num_shards: int) -> list[dict]:
    """The merged weights in Meta's names, q/k un-permuted, cut into `num_shards` model-parallel slices."""
    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    reverse = {hf: (meta, axis) for meta, (hf, axis) in TOP_MAP.items()}
    for meta, (hf, axis) in LAYER_MAP.items():
        for layer in range(config.num_hidden_layers):
            reverse[f"model.layers.{layer}.{hf}"] = (f"layers.{layer}.{meta}", axis)
    shards = [{} for _ in range(num_shards)]
    for name, tensor in model.state_dict().items():
        if name not in reverse:
            continue  # rotary buffers and the like are not weights in Meta's format
        meta, axis = reverse[name]
        if meta.endswith("attention.wq.weight"):
            tensor = unpermute(tensor, n_heads)
        elif meta.endswith("attention.wk.weight"):
            tensor = unpermute(tensor, n_kv)
        if axis is None:
            pieces = [tensor] * num_shards
        else:
            if tensor.shape[axis] % num_shards:
                raise UserError(f"{name} (size {tensor.shape[axis]}) does not split into {num_shards} shards",
                                field="num_shards")
            pieces = torch.chunk(tensor, num_shards, dim=axis)
        for shard, piece in zip(shards, pieces):
            shard[meta] = piece.clone().contiguous()
    return shards


def save_pth(model, out_dir: str, num_shards: int) -> None:
    config = model.config
    for i, shard in enumerate(meta_shards(model, num_shards)):
        torch.save(shard, os.path.join(out_dir, f"consolidated.{i:02d}.pth"))
    params = {"dim": config.hidden_size, "multiple_of": 256, "n_heads": config.num_attention_heads,
              "n_layers": config.num_hidden_layers, "norm_eps": config.rms_norm_eps, "vocab_size": -1}
    if config.num_key_value_heads != config.num_attention_heads:
        params["n_kv_heads"] = config.num_key_value_heads
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta and float(theta) != 10000.0:
        params["rope_theta"] = float(theta)
    with open(os.path.join(out_dir, "params.json"), "w", encoding="utf-8") as f:
        json.dump(params, f)


def merge(base_model: str, lora_dirs: list[str], output_type: str, output_dir: str, *, dtype: str = "float16",
          num_shards: int | None = None, offload_dir: str | None = None, overwrite: bool = False) -> None:
    if not lora_dirs:
        raise UserError("expected one or more LoRA folders, comma-separated", field="lora_model")
    from tuning.outputs import check_files_folder

    inputs = [base_model, *lora_dirs]
    check_files_folder(output_dir, "model", inputs=inputs, overwrite=overwrite)
    adapters = [(d, *read_adapter(d)) for d in lora_dirs]  # check every adapter before the base is loaded

    from transformers import AutoModelForCausalLM

    from model_hub import register_with_transformers
    from model_hub.loader import load_tokenizer, remote_code_refused, resolve_model_path
    from tuning.consent import remote_code_allowed

    register_with_transformers()
    base_path = resolve_model_path(base_model)
    load_kwargs = {"offload_folder": offload_dir} if offload_dir else {}
    with remote_code_refused(base_path):
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[dtype],
                                                     trust_remote_code=remote_code_allowed(), **load_kwargs).to("cpu")
    width = model.config.hidden_size
    size = SIZE_BY_WIDTH.get(width)
    print(f"base model: {base_path} (hidden size {width}: {size or 'not a Meta size'})")
    tokenizer = load_tokenizer(base_path)
    for lora_dir, config, tensors in adapters:
        tokenizer = load_tokenizer_of(lora_dir, tokenizer)
        vocab = model.get_input_embeddings().weight.shape[0]
        if vocab != len(tokenizer):
            print(f"resizing the vocabulary {vocab} -> {len(tokenizer)} for {lora_dir}")
            resize_embeddings(model, len(tokenizer))
        if merge_one(model, config, tensors, lora_dir) == 0:
            raise UserError("merging changed no weight: this LoRA is empty (all-zero lora_B) or not for this base",
                            path=lora_dir)
    model.config.vocab_size = model.get_input_embeddings().weight.shape[0]

    with staged_output(output_dir, inputs=inputs, overwrite=overwrite) as tmp:
        tokenizer.save_pretrained(tmp)
        if output_type == "huggingface":
            model.save_pretrained(tmp)
        else:
            save_pth(model, tmp, num_shards or NUM_SHARDS.get(size, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", required=True, help="LLaMA folder in transformers format (or tiny:NAME)")
    parser.add_argument("--lora_model", required=True, help="LoRA folders, comma-separated, merged in this order")
    parser.add_argument("--offload_dir", default=None, help="folder for offloaded weights while loading the base")
    parser.add_argument("--output_type", choices=["pth", "huggingface"], default="pth",
                        help="pth: Meta consolidated.XX.pth + params.json; huggingface: safetensors folder")
    parser.add_argument("--output_dir", default="./", help="where to write the merged model (default ./)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16",
                        help="dtype of the merged weights (default float16, as the original)")
    parser.add_argument("--num_shards", type=int, default=None,
                        help="pth shards (default: Meta's count for the model size, 1 for other sizes)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --output_dir even when it holds model files that are not an earlier output")
    args = parser.parse_args()

    lora_dirs = [p.strip() for p in args.lora_model.split(",") if p.strip()]
    merge(args.base_model, lora_dirs, args.output_type, args.output_dir, dtype=args.dtype,
          num_shards=args.num_shards, offload_dir=args.offload_dir, overwrite=args.overwrite)
    print(f"merged {len(lora_dirs)} LoRA(s) -> {args.output_dir} ({args.output_type}, {args.dtype})")

