"""LLaMA weight tools on tiny checkpoints built here: Meta consolidated.*.pth → transformers (logits equal a
reference Meta-layout forward; 1 and 2 model-parallel shards agree), LoRA merge (merged logits equal base +
adapters, vocabulary resize and modules_to_save in order), and the pth round trip (HF → merge to pth → convert
back) is exact."""
import json
import os
import shutil

import pytest
from conftest import run_in_process
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import model_hub
from model_hub import convert_llama_weights_to_hf as convert_script
from model_hub import merge_llama_with_chinese_lora as merge_script
from model_hub.convert_llama_weights_to_hf import write_model
from model_hub.llama.tokenizer import load_llama_tokenizer
from model_hub.merge_llama_with_chinese_lora import merge
from tuning.errors import UserError

PARAMS = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-06, "vocab_size": -1}
HIDDEN, FFN, VOCAB = 64, 192, 32000
IDS = torch.tensor([[1, 13866, 338, 385, 15278, 393, 16612, 263, 3414, 29889, 30919, 32038 % VOCAB]])


def meta_weights(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return (torch.randn(*shape, generator=g) * scale).half()

    w = {"tok_embeddings.weight": rnd(VOCAB, HIDDEN, scale=1.0), "norm.weight": 1 + rnd(HIDDEN),
         "output.weight": rnd(VOCAB, HIDDEN), "rope.freqs": torch.ones(8).half()}
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            w[p + f"attention.{name}.weight"] = rnd(HIDDEN, HIDDEN, scale=0.3)
        w[p + "feed_forward.w1.weight"] = rnd(FFN, HIDDEN, scale=0.2)
        w[p + "feed_forward.w3.weight"] = rnd(FFN, HIDDEN, scale=0.2)
        w[p + "feed_forward.w2.weight"] = rnd(HIDDEN, FFN, scale=0.2)
        w[p + "attention_norm.weight"] = 1 + rnd(HIDDEN)
        w[p + "ffn_norm.weight"] = 1 + rnd(HIDDEN)
    return w


def split_like_meta(w: dict, n: int) -> list[dict]:
    axis = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}
    shards = [{} for _ in range(n)]
    for name, t in w.items():
        kind = name.split(".")[-2]
        pieces = torch.chunk(t, n, dim=axis[kind]) if kind in axis else [t] * n
        for s, piece in zip(shards, pieces):
            s[name] = piece.clone()
    return shards


def write_meta(root, size: str, w: dict, n_shards: int):
    folder = os.path.join(root, size)
    os.makedirs(folder, exist_ok=True)
    for i, shard in enumerate(split_like_meta(w, n_shards)):
        torch.save(shard, os.path.join(folder, f"consolidated.{i:02d}.pth"))
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(PARAMS, f)
    shutil.copy(os.path.join(model_hub.tokenizer_files("llama-7b"), "tokenizer.model"), root)


def meta_forward(w: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaMA as Meta wrote it: rotary on interleaved pairs as complex numbers, on the Meta tensors directly."""
    w = {k: v.float() for k, v in w.items()}
    heads, hd, eps = PARAMS["n_heads"], HIDDEN // PARAMS["n_heads"], PARAMS["norm_eps"]
    seq = ids.shape[1]
    freqs = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    cis = torch.polar(torch.ones(seq, hd // 2), torch.outer(torch.arange(seq).float(), freqs))

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # x: [seq, heads, hd]
        xc = torch.view_as_complex(x.reshape(seq, heads, hd // 2, 2))
        return torch.view_as_real(xc * cis[:, None, :]).reshape(seq, heads, hd)

    h = w["tok_embeddings.weight"][ids[0]]
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        x = norm(h, w[p + "attention_norm.weight"])
        q, k, v = (x @ w[p + f"attention.{n}.weight"].T for n in ("wq", "wk", "wv"))
        q, k, v = rope(q.view(seq, heads, hd)), rope(k.view(seq, heads, hd)), v.view(seq, heads, hd)
        att = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5 + mask
        out = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(seq, HIDDEN)
        h = h + out @ w[p + "attention.wo.weight"].T
        x = norm(h, w[p + "ffn_norm.weight"])
        ff = F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)
        h = h + ff @ w[p + "feed_forward.w2.weight"].T
    return (norm(h, w["norm.weight"]) @ w["output.weight"].T)[None]


def load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def state(path):
    return {k: v for k, v in load(path, torch.float16).state_dict().items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny Meta checkpoint (1 shard as 7B, 2 shards as 13B) and its conversion."""
    root = tmp_path_factory.mktemp("meta")
    w = meta_weights()
    write_meta(str(root), "7B", w, 1)
    write_meta(str(root), "13B", w, 2)
    out = root / "7B-hf"
    write_model(str(root), "7B", str(out), torch.float16, max_shard_gb=0.002)  # several safetensors shards
    return root, w, out


def test_converted_logits_equal_meta_forward(converted):
    root, w, out = converted
    assert os.path.isfile(out / "model.safetensors.index.json")  # sharded output loads through the index
    config = json.loads((out / "config.json").read_text())
    assert (config["intermediate_size"], config["vocab_size"], config["hidden_size"]) == (FFN, VOCAB, HIDDEN)
    with torch.no_grad():
        logits = load(str(out))(IDS).logits
    torch.testing.assert_close(logits, meta_forward(w, IDS), atol=2e-4, rtol=1e-4)
    tok = load_llama_tokenizer(str(out))
    assert tok("Hello 世界").input_ids == load_llama_tokenizer("llama-7b")("Hello 世界").input_ids


def test_two_model_parallel_shards_give_the_same_model(converted, tmp_path):
    root, _, out = converted
    write_model(str(root), "13B", str(tmp_path / "13B-hf"), torch.float16, max_shard_gb=5)
    a, b = state(str(out)), state(str(tmp_path / "13B-hf"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_lora(base_dir, out_dir, seed, tokenizer_name=None, modules_to_save=None, vocab=None, old_peft=False):
    """A LoRA with non-zero B (and trained-looking full embed/lm_head when modules_to_save) saved like peft."""
    torch.manual_seed(seed)
    model = load(base_dir)
    if vocab:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out_dir)
    if old_peft:  # peft 0.3-style config keys and a .bin adapter, as the shipped Chinese LoRAs
        cfg = json.loads(open(os.path.join(out_dir, "adapter_config.json")).read())
        cfg.update(enable_lora=None, merge_weights=False)
        json.dump(cfg, open(os.path.join(out_dir, "adapter_config.json"), "w"))
        from safetensors.torch import load_file
        tensors = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
        torch.save(tensors, os.path.join(out_dir, "adapter_model.bin"))
        os.remove(os.path.join(out_dir, "adapter_model.safetensors"))
    if tokenizer_name:
        load_llama_tokenizer(tokenizer_name).save_pretrained(out_dir)
    return out_dir


def test_merge_equals_base_plus_adapters_in_order(converted, tmp_path):
    _, _, base = converted
    # 1: Chinese-LLaMA-like (49953 tokens, new embed/lm_head); 2: Alpaca-like (49954 tokens), merged in this order
    lora1 = make_lora(str(base), str(tmp_path / "l1"), 1, "chinese-llama-7b", ["embed_tokens", "lm_head"], 49953,
                      old_peft=True)
    lora2 = make_lora(str(base), str(tmp_path / "l2"), 2, "chinese-alpaca-7b", ["embed_tokens", "lm_head"], 49954)
    merge(str(base), [lora1, lora2], "huggingface", str(tmp_path / "merged"), dtype="float32")
    with torch.no_grad():
        reference = load(str(base))
        reference.resize_token_embeddings(49953, mean_resizing=False)
        reference = PeftModel.from_pretrained(reference, lora1).merge_and_unload()
        reference.resize_token_embeddings(49954, mean_resizing=False)
        reference = PeftModel.from_pretrained(reference, lora2).eval()  # the last one unmerged: base + adapter
        merged = load(str(tmp_path / "merged"))
        assert merged.config.vocab_size == 49954
        torch.testing.assert_close(merged(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=1e-5)
    assert len(load_llama_tokenizer(str(tmp_path / "merged"))) == 49954  # the last LoRA's tokenizer


def test_pth_round_trip_is_exact(converted, tmp_path):
    _, _, base = converted
    lora = make_lora(str(base), str(tmp_path / "lora"), 3, "llama-7b")
    merge(str(base), [lora], "huggingface", str(tmp_path / "hf"))
    merge(str(base), [lora], "pth", str(tmp_path / "pth"), num_shards=2)
    files = sorted(os.listdir(tmp_path / "pth"))
    assert {"consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"} <= set(files)
    write_model(str(tmp_path / "pth"), "13B", str(tmp_path / "back"), torch.float16, max_shard_gb=5)
    a, b = state(str(tmp_path / "hf")), state(str(tmp_path / "back"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        base_logits = load(str(base))(IDS).logits
        merged_logits = load(str(tmp_path / "hf"))(IDS).logits
    assert not torch.allclose(base_logits, merged_logits)  # the LoRA really changed the model


def test_merge_refuses_empty_lora_and_bad_paths(converted, tmp_path, monkeypatch, capsys):
    _, _, base = converted
    empty = str(tmp_path / "empty")
    get_peft_model(load(str(base)), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(empty)  # B = 0
    with pytest.raises(UserError, match="changed no weight"):
        merge(str(base), [empty], "huggingface", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
    err = cli(merge_script.main, ["--base_model", str(base), "--lora_model", str(tmp_path / "nope"),
                                  "--output_dir", str(tmp_path / "out2")], monkeypatch, capsys)
    assert err == f"error: {tmp_path / 'nope'}: LoRA folder not found"


def test_convert_errors_are_one_line(tmp_path, monkeypatch, capsys):
    err = cli(convert_script.main, ["--input_dir", str(tmp_path), "--model_size", "7B", "--output_dir",
                                    str(tmp_path / "o")], monkeypatch, capsys)
    assert err.startswith("error: ") and "params.json not found" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def cli(main, argv, monkeypatch, capsys) -> str:
    """Run a script's main as its command line would (run_main); return its one-line error."""
    code, _, err = run_in_process(main, argv)
    assert code == 2
    return err.strip()
