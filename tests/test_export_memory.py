"""model_hub.export merges shard by shard: exporting a ~340 MB model split into ~20 MB shards raises the peak RSS
of the exporting process (measured in a subprocess, not timed) by about one shard, far from the model's size.

The issue's bound for a real 9B model is largest shard + adapter + 1.5 GiB; on this small model the fixed slack
is scaled down to 100 MB, so that an export holding the whole model (340 MB) fails the test.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from model_hub.make_tiny import tiny_dir
from model_hub.shards import ShardWriter

MiB = 2**20
HIDDEN, FFN, LAYERS, RANK = 256, 2048, 32, 8

# Peak = VmHWM, the high-water mark of this process's own memory map. Not getrusage's ru_maxrss: Linux carries
# that over exec from the parent (the large pytest process), so it would report the parent's peak.
MEASURE = r"""
import json, sys
from model_hub.export import export
# torch, transformers' tokenizer code and our registered classes are loaded before the baseline (model_hub registers
# them when transformers is first imported), so the growth measured is the export's data, not module code.
import transformers.models.llama.modeling_llama, model_hub.loader
from transformers import AutoConfig, AutoTokenizer

def status(key):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024

baseline = status("VmRSS")
src, out = sys.argv[1:3]
export(src, out)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""


def write_model(folder: str, shard_bytes: int) -> tuple[int, int]:
    """A LLaMA folder (real Chinese-Alpaca tokenizer, random weights) in many shards; returns (total, largest)."""
    tiny = tiny_dir("chinese-alpaca-7b")
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(tiny, name), folder)
    config = json.load(open(os.path.join(tiny, "config.json"), encoding="utf-8"))
    config.update(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=4)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    vocab = config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (HIDDEN, HIDDEN) for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, FFN), p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,)})
    writer = ShardWriter(folder, shard_bytes)
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.add(name, torch.randn(shape, generator=generator) * 0.02)
    writer.finish()
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")]
    return sum(sizes), max(sizes)


def write_adapter(folder: str, base: str) -> int:
    """A LoRA on q_proj/v_proj with non-zero B, saved as peft saves it (keys, adapter_config.json)."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(LAYERS):
        for module in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=generator) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=generator) * 0.05
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 16,
                   "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": base}, f)
    return os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.slow
def test_export_peak_memory_is_about_one_shard(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    total, largest = write_model(str(base), 20 * MiB)
    adapter_bytes = write_adapter(str(adapter), str(base))
    bound = largest + adapter_bytes + 100 * MiB
    assert total > 2 * bound  # holding the whole model would fail
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(adapter), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    grew = memory["peak"] - memory["baseline"]
    print(f"model {total / MiB:.0f} MiB, largest shard {largest / MiB:.0f} MiB, peak RSS grew {grew / MiB:.0f} MiB")
    assert grew <= bound
    assert os.path.getsize(tmp_path / "out" / "model.safetensors") > total * 0.99  # one output file, streamed
