"""Write a pyarrow table as the folder `datasets.Dataset.save_to_disk` writes, without importing `datasets`.

`import datasets` alone takes ~1.3 s; the fast tokenize step writes its rows with pyarrow only. The layout is the
one of datasets 5.2 for one shard: `data-00000-of-00001.arrow` (Arrow IPC stream whose schema carries the features
under the "huggingface" key), `dataset_info.json` and `state.json`. `datasets.load_from_disk` reads it back;
tests/test_tokenize_fast.py checks the folder against one written by datasets itself.
"""
import hashlib
import json
import os

from .files import atomic_dir

SHARD = "data-00000-of-00001.arrow"


def feature_of(arrow_type) -> dict:
    """The `datasets` feature dict of an integer/float column or a list of them."""
    import pyarrow as pa

    if pa.types.is_list(arrow_type):
        return {"feature": feature_of(arrow_type.value_type), "_type": "List"}
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        dtype = {"halffloat": "float16", "float": "float32", "double": "float64"}.get(str(arrow_type), str(arrow_type))
        return {"dtype": dtype, "_type": "Value"}
    raise TypeError(f"no `datasets` feature mapping for arrow type {arrow_type}")


def save_table(table, path: str, inputs=(), overwrite: bool = False) -> None:
    """Write `table` (a pyarrow.Table) to the folder `path` atomically, in save_to_disk's layout (replacing only
    an earlier `datasets` folder unless `overwrite`; never one holding an input, see tuning.outputs)."""
    import pyarrow as pa

    features = {field.name: feature_of(field.type) for field in table.schema}
    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    with atomic_dir(path, "datasets", inputs=inputs, overwrite=overwrite) as tmp:
        with pa.OSFile(os.path.join(tmp, SHARD), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table.replace_schema_metadata(schema.metadata))
        # `datasets` hashes the dataset's state; a hash of the written bytes is as deterministic (same rows, same
        # folder bytes) without importing it.
        with open(os.path.join(tmp, SHARD), "rb") as f:
            fingerprint = hashlib.sha256(f.read()).hexdigest()[:16]
        state = {"_data_files": [{"filename": SHARD}], "_fingerprint": fingerprint, "_format_columns": None,
                 "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "dataset_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)


def token_rows_table(input_ids: list[list[int]], seq_len: list[int]):
    """input_ids as list<int32> (what `datasets` infers for a column of that name) and seq_len as int64.

    Built from flat buffers (array module), not from Python lists, and without numpy/pandas (~0.8 s to import).
    """
    import array
    import itertools

    import pyarrow as pa

    offsets = array.array("i", [0])
    offsets.extend(itertools.accumulate(map(len, input_ids)))
    values = array.array("i", itertools.chain.from_iterable(input_ids))
    ids = pa.ListArray.from_buffers(pa.list_(pa.int32()), len(input_ids), [None, pa.py_buffer(offsets)],
                                    children=[pa.Array.from_buffers(pa.int32(), len(values),
                                                                    [None, pa.py_buffer(values)])])
    lengths = pa.Array.from_buffers(pa.int64(), len(seq_len), [None, pa.py_buffer(array.array("q", seq_len))])
    return pa.Table.from_arrays([ids, lengths], names=["input_ids", "seq_len"])
