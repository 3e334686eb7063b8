"""Checkpoint shards: finding, reading and writing the weight files of a model folder.

Readers accept safetensors (single file or shards + model.safetensors.index.json) and pytorch_model*.bin (read with
torch.load(weights_only=True), never unpickling code). Writers produce safetensors shards + index as transformers
does. `iter_shard` and `ShardWriter` keep one tensor in memory at a time (plus the memory-mapped input
shard), so a model much larger than RAM is re-written shard by shard (model_hub/export.py).
"""
import json
import os
import re
import shutil
import struct

from tuning.errors import UserError
from tuning.files import read_json

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
# safetensors' dtype names (the format's header spelling)
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def find_shards(src: str) -> list[str]:
    """The weight files of a checkpoint folder, in a stable order."""
    for index_name in INDEX_NAMES:
        index_path = os.path.join(src, index_name)
        if os.path.isfile(index_path):
            index = read_json(index_path)
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise UserError("expected an object with a weight_map", path=index_path, field="weight_map")
            shards = sorted(set(index["weight_map"].values()))
            for shard in shards:
                if not os.path.isfile(os.path.join(src, shard)):
                    raise UserError(f"shard listed in {index_name} is missing", path=os.path.join(src, shard))
            return [os.path.join(src, s) for s in shards]
    for single in SINGLE_NAMES:
        if os.path.isfile(os.path.join(src, single)):
            return [os.path.join(src, single)]
    raise UserError("no weights found (expected model.safetensors, model.safetensors.index.json, "
                    "pytorch_model.bin or pytorch_model.bin.index.json)", path=src)


def has_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in INDEX_NAMES + SINGLE_NAMES)


def _load_bin(path: str) -> dict:
    import pickle

    import torch

    from tuning.files import pickle_refusal

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:  # a pickle with code or objects in it
        raise pickle_refusal(exc, path) from None
    except Exception as exc:  # a corrupt or truncated file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot be read with torch.load(weights_only=True): {reason}", path=path) from None
    if not isinstance(state, dict):
        raise UserError("expected a state dict", path=path)
    return state


def read_shard(path: str) -> dict:
    """The whole shard as {name: tensor}."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return _load_bin(path)


def iter_shard(path: str):
    """(name, tensor) of one shard, one tensor at a time: safetensors through a memory map, .bin memory-mapped by
    torch.load(mmap=True); the mapping is released when the iteration ends."""
    if not path.endswith(".safetensors"):
        yield from _load_bin(path).items()
        return
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt")
    except Exception as exc:
        raise UserError(f"not a readable safetensors file: {str(exc).strip().splitlines()[0]}", path=path) from None
    with handle as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def tensor_shapes(shards: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, shard path)} of every tensor, read from the safetensors headers (or the mapped .bin), without
    loading the data: checks before anything is written."""
    shapes = {}
    for path in shards:
        if path.endswith(".safetensors"):
            header = read_safetensors_header(path)
            items = ((k, tuple(v["shape"])) for k, v in header.items() if k != "__metadata__")
        else:
            items = ((k, tuple(v.shape)) for k, v in _load_bin(path).items())
        for name, shape in items:
            shapes[name] = (shape, path)
    return shapes


def read_safetensors_header(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        try:
            if not 0 < size < 100 * 2**20:
                raise ValueError(f"header size {size}")
            return json.loads(f.read(size))
        except ValueError as exc:
            raise UserError(f"not a safetensors file ({exc})", path=path) from None


def parse_size(text: str | int) -> int:
    """"2GB" / "500MB" / "1GiB" / 123456 → bytes (GB = 10^9, GiB = 2^30, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"expected a size like 2GB, 500MB or 1GiB, got {text!r}", field="max_shard_size")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    value = int(number * ((1024 if "I" in unit else 1000) ** power))
    if value <= 0:
        raise UserError(f"must be positive, got {text!r}", field="max_shard_size")
    return value


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes`, named as transformers names them, + the index.

    Each tensor's bytes go to disk as it arrives: memory holds one tensor, never a shard.

    A shard's data is appended to a scratch file; when the shard is full, the safetensors file is the header
    followed by that data (copied in blocks).
    """

    def __init__(self, out_dir: str, max_bytes: int, metadata: dict | None = None):
        self.out_dir, self.max_bytes, self.metadata = out_dir, max_bytes, metadata or {"format": "pt"}
        self.files, self.total = [], 0
        self.data, self.entries, self.offset = None, {}, 0

    def add(self, name: str, tensor):
        import torch

        dtype = SAFETENSORS_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise UserError(f"dtype {tensor.dtype} cannot be written to safetensors", field=name)
        size = tensor.numel() * tensor.element_size()
        if self.entries and self.offset + size > self.max_bytes:
            self._finish_shard()
        if self.data is None:
            self.data = open(os.path.join(self.out_dir, f".part-{len(self.files):05d}.data"), "wb")
        if size:
            self.data.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.entries[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [self.offset,
                                                                                            self.offset + size]}
        self.offset += size
        self.total += size

    def _finish_shard(self):
        data_path = self.data.name
        self.data.close()
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        name = f"part-{len(self.files):05d}.safetensors"
        with open(os.path.join(self.out_dir, name), "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        os.remove(data_path)
        self.files.append((name, list(self.entries)))
        self.data, self.entries, self.offset = None, {}, 0

    def finish(self):
        if self.entries or self.data is not None:
            self._finish_shard()
        name_shards(self.out_dir, self.files, self.total)


def name_shards(out_dir: str, files: list[tuple[str, list[str]]], total: int) -> None:
    """Rename written parts to model.safetensors, or model-0000i-of-0000n.safetensors + the index."""
    n = len(files)
    if n == 1:
        os.replace(os.path.join(out_dir, files[0][0]), os.path.join(out_dir, "model.safetensors"))
        return
    weight_map = {}
    for i, (tmp_name, names) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp_name), os.path.join(out_dir, final))
        weight_map.update({k: final for k in names})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
