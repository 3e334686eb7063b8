"""The one LoRA merge: W' = W + scale · B·A for every adapted weight; modules_to_save tensors replace the base's.

Used tensor by tensor, so that the caller decides where weights live: model_hub/export.py streams the base's
shards through `Adapter.merged` (bounded memory), merge_llama_with_chinese_lora.py applies it to the parameters of
a loaded model (vocabulary resize, Meta pth output). The sum is computed in fp32 in blocks of rows and rounded
once to the output dtype.
"""
import math
import os
from dataclasses import dataclass

import torch

from tuning.errors import UserError
from tuning.files import read_json
from tuning.publish import finish_publish

from .shards import read_shard

LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
BLOCK_ELEMENTS = 1 << 24  # rows merged at a time: ≤ 64 MB of fp32 temporaries, whatever the matrix size


def read_adapter_config(lora_dir: str) -> dict:
    if not os.path.isdir(lora_dir):
        raise UserError("LoRA folder not found", path=lora_dir)
    config_path = os.path.join(lora_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise UserError("adapter_config.json not found; not a LoRA folder", path=lora_dir)
    finish_publish(lora_dir)  # a save interrupted while its files moved in
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise UserError("expected a JSON object", path=config_path)
    return config


def read_adapter(lora_dir: str) -> tuple[dict, dict]:
    """(adapter config, adapter tensors) of a LoRA folder."""
    config = read_adapter_config(lora_dir)
    config_path = os.path.join(lora_dir, "adapter_config.json")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError("expected a LoRA adapter config (peft_type LORA)", path=config_path, field="peft_type")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise UserError("missing or not a positive number", path=config_path, field=key)
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise UserError("rank_pattern / alpha_pattern / DoRA adapters are not supported by this merge",
                        path=config_path)
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = os.path.join(lora_dir, name)
        if os.path.isfile(path):
            return config, read_shard(path)
    raise UserError("no adapter_model.safetensors or adapter_model.bin", path=lora_dir)


def module_key(key: str) -> str:
    """A saved adapter key → the base model's parameter name (peft 0.3 … 0.21 spellings)."""
    key = key.removeprefix("base_model.model.")
    return key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")


@dataclass
class LowRankUpdate:
    """The update of one weight as left @ right · scale (left [rows, r], right [r, cols])."""
    left: torch.Tensor
    right: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]


class Adapter:
    """One LoRA adapter as updates keyed by the base weight's name (`…q_proj.weight`) plus full replacement
    tensors (modules_to_save)."""

    def __init__(self, config: dict, tensors: dict, where: str):
        self.where = where
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        pairs, self.full = {}, {}
        for key, tensor in tensors.items():
            if ".original_module." in key:
                continue  # peft's copy of the untouched base layer (saved alongside resized embeddings)
            name = module_key(key)
            for part in LORA_PARTS:
                marker = f".{part}."
                if marker in name or name.endswith(f".{part}"):
                    module = name.split(marker)[0] if marker in name else name[: -len(part) - 1]
                    pairs.setdefault(module, {})[part] = tensor
                    break
            else:
                if ".modules_to_save." in key or name not in self.full:  # the trained copy wins over a duplicate
                    self.full[name] = tensor
        self.updates = {}
        for module, parts in pairs.items():
            if "lora_A" in parts and "lora_B" in parts:
                left, right = parts["lora_B"], parts["lora_A"]  # W [out, in] += B [out, r] @ A [r, in]
                if config.get("fan_in_fan_out"):  # Conv1D weights are stored [in, out]: the transpose
                    left, right = right.T, left.T
            elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
                # embedding [vocab, dim] += (B [dim, r] @ A [r, vocab]).T
                left, right = parts["lora_embedding_A"].T, parts["lora_embedding_B"].T
            else:
                raise UserError(f"incomplete LoRA pair (has {', '.join(sorted(parts))})", path=where, field=module)
            self.updates[module + ".weight"] = LowRankUpdate(left, right, scale)

    @classmethod
    def load(cls, lora_dir: str) -> "Adapter":
        return cls(*read_adapter(lora_dir), lora_dir)

    def names(self) -> set[str]:
        """Every base tensor this adapter changes."""
        return set(self.updates) | set(self.full)

    def is_zero(self) -> bool:
        return not self.full and all(not u.left.any() or not u.right.any() for u in self.updates.values())

    def check_shape(self, name: str, shape: tuple, base: str) -> None:
        """A one-line error naming both sides when the adapter's tensor does not fit the base's."""
        shape = tuple(shape)
        if name in self.updates and tuple(self.updates[name].shape) != shape:
            raise UserError(f"LoRA update has shape {tuple(self.updates[name].shape)}, the base weight {shape} in "
                            f"{base}: the adapter was trained on another model", path=self.where, field=name)
        if name in self.full and tuple(self.full[name].shape) != shape:
            what = " (the vocabulary size differs)" if shape and self.full[name].shape[1:] == shape[1:] else ""
            raise UserError(f"has shape {tuple(self.full[name].shape)}, the base {shape} in {base}{what}",
                            path=self.where, field=name)

    @torch.no_grad()
    def merged(self, name: str, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`weight` (the base tensor called `name`) with this adapter applied, in `dtype` (default: its own)."""
        dtype = dtype or weight.dtype
        if name in self.full:
            self.check_shape(name, weight.shape, "the base model")
            return self.full[name].to(dtype)
        update = self.updates.get(name)
        if update is None:
            return weight.to(dtype)
        self.check_shape(name, weight.shape, "the base model")
        left, right = update.left.float(), update.right.float()
        out = torch.empty(weight.shape, dtype=dtype)
        step = max(1, BLOCK_ELEMENTS // max(1, weight.shape[1]))
        for i in range(0, weight.shape[0], step):
            block = weight[i:i + step].float().addmm_(left[i:i + step], right, alpha=update.scale)
            out[i:i + step] = block.to(dtype)
        return out
