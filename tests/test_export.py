"""model_hub.export: a LoRA (non-zero B) merged into each family's tiny model gives the logits and greedy tokens of
base + adapter through PEFT; LLaMA and native GLM-4 exports load in a Python that cannot import this project;
GLM-4 original → native → original is byte-identical and both layouts give the same logits; full-model
re-sharding; one-line errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import run_in_process
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import model_hub
from model_hub import export as export_module
from model_hub.convert_glm4_to_hf import convert
from model_hub.export import export
from model_hub.glm4.native import original_values
from model_hub.make_tiny import build_tiny, tiny_dir
from model_hub.registry import MODELS

FAMILIES = {"llama": "chinese-alpaca-7b", "glm4": "glm-4-9b-chat", "chatglm6b": "chatglm-6b"}
PROMPT = "请用一句话介绍北京。"
PROJECT_PACKAGES = ("model_hub", "tuning", "chatglm_lora", "llama_ner", "glm4_finetune")

# Runs in a fresh Python, cwd outside the repo, PYTHONPATH unset; the project's packages cannot be imported
# (the shared venv has an editable install, so a finder refuses them), as on a machine with only transformers.
PLAIN_LOAD = r"""
import json, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PACKAGES:
            raise ImportError(f"{name} is part of the project; this check loads without it")
sys.meta_path.insert(0, Refuse())
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
result = {}
for folder, out in json.loads(sys.argv[1]):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    save_file({"ids": ids, "logits": logits.contiguous(), "tokens": tokens}, out)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(PACKAGES))))
"""


def make_lora(base: str, out: str, targets, seed: int = 0, **config) -> str:
    """A saved PEFT LoRA whose B (and A) are random: merging it really changes the model."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets),
                                                  **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(out)
    return out


def prompt_ids(folder: str) -> torch.Tensor:
    return torch.tensor([AutoTokenizer.from_pretrained(folder)(PROMPT).input_ids])


@torch.no_grad()
def reference(base: str, adapter: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits and 8 greedy tokens of base + adapter through PEFT (unmerged)."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    return model(input_ids=ids).logits, tokens


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """{family: (base, adapter, export folder)} — one LoRA per family, exported in fp32."""
    root = tmp_path_factory.mktemp("export")
    result = {}
    for family, name in FAMILIES.items():
        base = tiny_dir(name)
        adapter = make_lora(base, str(root / f"{family}-lora"), MODELS[name].lora_targets)
        result[family] = (base, adapter, export(adapter, str(root / f"{family}-merged"), dtype="fp32"))
    return result


@pytest.fixture(scope="session")
def plain_loaded(exported, tmp_path_factory):
    """LLaMA and native GLM-4 exports loaded by transformers alone, in a subprocess."""
    root = tmp_path_factory.mktemp("plain")
    jobs = [(exported[f][2], str(root / f"{f}.safetensors")) for f in ("llama", "glm4")]
    script = PLAIN_LOAD.replace("PACKAGES", repr(PROJECT_PACKAGES)).replace("PROMPT", repr(PROMPT))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []  # nothing of the project was imported
    return {f: load_file(out) for f, (_, out) in zip(("llama", "glm4"), jobs)}


@pytest.mark.parametrize("family", ["llama", "glm4"])
def test_plain_transformers_export_equals_base_plus_adapter(exported, plain_loaded, family):
    base, adapter, _ = exported[family]
    got = plain_loaded[family]
    assert torch.equal(got["ids"], prompt_ids(base))  # plain AutoTokenizer gives the project tokenizer's ids
    logits, tokens = reference(base, adapter, got["ids"])
    assert (got["logits"] - logits).abs().max() <= 1e-4
    assert torch.equal(got["tokens"], tokens)
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(got["ids"]).logits
    assert (base_logits - logits).abs().max() > 1e-2  # the adapter matters: the comparison can fail


def test_chatglm6b_export_equals_base_plus_adapter_and_keeps_thudm_names(exported):
    base, adapter, out = exported["chatglm6b"]
    ids = prompt_ids(out)
    logits, tokens = reference(base, adapter, ids)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - logits).abs().max() <= 1e-4
        assert torch.equal(merged.generate(input_ids=ids, max_new_tokens=8, do_sample=False), tokens)
    assert load_file(os.path.join(out, "model.safetensors")).keys() == load_file(
        os.path.join(base, "model.safetensors")).keys()
    config, base_config = (json.load(open(os.path.join(d, "config.json"), encoding="utf-8")) for d in (out, base))
    assert config == base_config and config["auto_map"]  # THUDM's config, auto_map for its code included


def test_llama_export_reads_text_and_renders_the_prompt_as_trained_under_plain_transformers(exported):
    """The export's tokenizer, read by plain transformers (no project code): every golden string of the original
    Chinese-Alpaca tokenizer to its ids (digit and whitespace runs included; transformers' LlamaTokenizer misreads 8 of
    them), and the chat template (llama_ner's, the adapter has no record) renders the prompt our server sends."""
    from model_hub.llama.tokenizer import load_llama_tokenizer
    from model_hub.prompt_format import get_prompt_format
    from plain_transformers import run_plain_probe

    out = exported["llama"][2]
    bad, prompts = run_plain_probe(sys.executable, {out: "chinese_alpaca_7b"})
    assert bad == []
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "文本：2008年1月，北京 99999 元。"}]
    assert prompts[out] == get_prompt_format("llama_ner").prompt_ids(load_llama_tokenizer(out), chat)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_folder_is_complete(exported, family):
    base, adapter, out = exported[family]
    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "README.md"} <= files
    assert "model.safetensors" in files and not any(f.startswith(".") for f in files)
    generation = json.load(open(os.path.join(out, "generation_config.json"), encoding="utf-8"))
    spec = MODELS[FAMILIES[family]]
    eos = generation["eos_token_id"]
    assert (eos if isinstance(eos, list) else [eos]) == list(spec.stop_ids)
    assert generation["pad_token_id"] is not None
    readme = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert base in readme and adapter in readme and "float32" in readme and "python -m model_hub.export" in readme
    if family == "glm4":
        assert "chat_template.jinja" in files  # GLM-4's chat template travels with the model


@pytest.fixture(scope="session")
def glm4_original_dir(tmp_path_factory):
    """An original-layout folder for the tiny GLM-4: THUDM's config.json keys with the tiny sizes, and the real
    tokenizer files (the code files of a real download are copied the same way)."""
    folder = tmp_path_factory.mktemp("glm4-original")
    real = model_hub.tokenizer_files("glm-4-9b-chat")
    native = json.load(open(os.path.join(tiny_dir("glm-4-9b-chat"), "config.json"), encoding="utf-8"))
    config = json.load(open(os.path.join(real, "config.json"), encoding="utf-8"))
    config.update(original_values(native), torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "LICENSE"):
        (folder / name).write_bytes(open(os.path.join(real, name), "rb").read())
    return str(folder)


def test_glm4_original_layout_gives_the_same_logits(exported, glm4_original_dir, tmp_path):
    _, adapter, native_out = exported["glm4"]
    original = export(adapter, str(tmp_path / "original"), dtype="fp32", layout="original",
                      original_dir=glm4_original_dir)
    names = set(load_file(os.path.join(original, "model.safetensors")))
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in names
    assert {"tokenizer.model", "tokenizer_config.json", "LICENSE"} <= set(os.listdir(original))
    back = convert(original, str(tmp_path / "back"), with_tokenizer=False)  # the golden-verified converter
    ids = prompt_ids(native_out)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(native_out, dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)


def test_glm4_original_native_original_is_byte_identical(golden_dir, tmp_path):
    golden = os.path.join(golden_dir, "glm4_model")
    native = convert(golden, str(tmp_path / "native"), max_shard_gb=0.005, with_tokenizer=False)
    assert os.path.isfile(os.path.join(native, "model.safetensors.index.json"))  # q/k/v of a layer may be split
    original = export(native, str(tmp_path / "original"), layout="original", original_dir=golden)
    want, got = load_file(os.path.join(golden, "model.safetensors")), load_file(os.path.join(original,
                                                                                             "model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype and want[name].shape == got[name].shape, name
        assert want[name].view(torch.uint8).equal(got[name].view(torch.uint8)), name
    config = json.load(open(os.path.join(original, "config.json"), encoding="utf-8"))
    assert config == json.load(open(os.path.join(golden, "config.json"), encoding="utf-8"))


def test_full_model_is_resharded_and_cast(tmp_path):
    src = tiny_dir("glm-4-9b-chat")
    out = export(src, str(tmp_path / "bf16"), dtype="bf16", max_shard_size="100KB")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json"), encoding="utf-8"))
    shards = sorted(set(index["weight_map"].values()))
    per_shard = {s: [k for k, v in index["weight_map"].items() if v == s] for s in shards}
    assert len(shards) >= 4  # only a tensor larger than the limit (the embeddings) makes a shard of its own larger
    assert all(os.path.getsize(os.path.join(out, s)) <= 100_000 + 4096 or len(per_shard[s]) == 1 for s in shards)
    original = load_file(os.path.join(src, "model.safetensors"))
    written = {}
    for shard in shards:
        written.update(load_file(os.path.join(out, shard)))
    assert written.keys() == original.keys()
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], original[k].bfloat16())
               for k in original)
    assert json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))["dtype"] == "bfloat16"


def test_export_copies_only_regular_files_of_the_source(tmp_path, capsys):
    """Issue 29, item 10: a LICENSE symlink to a credentials file became a regular file in OUT, ready to publish.
    Links (and anything not a regular file) are left out and named; the weights and real files are all there."""
    src = tmp_path / "model"
    shutil.copytree(tiny_dir("chinese-alpaca-7b"), src)
    (tmp_path / "credentials").write_text("aws_secret_access_key = SECRET")
    os.symlink(tmp_path / "credentials", src / "LICENSE")
    out = export(str(src), str(tmp_path / "out"))
    assert not os.path.lexists(os.path.join(out, "LICENSE"))
    assert "SECRET" not in "".join(open(os.path.join(out, n), errors="replace").read() for n in os.listdir(out)
                                   if os.path.isfile(os.path.join(out, n)))
    assert "not copied from" in capsys.readouterr().out and os.path.isfile(os.path.join(out, "tokenizer.model"))
    umask = os.umask(0)
    os.umask(umask)
    assert all(os.stat(os.path.join(out, n)).st_mode & 0o777 == 0o666 & ~umask for n in os.listdir(out))


def cli(argv, monkeypatch, capsys) -> str:
    code, _, err = run_in_process(export_module.main, argv, script="python -m model_hub.export")
    assert code == 2
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.fixture(scope="session")
def other_llama(tmp_path_factory):
    """A LLaMA of other sizes (hidden 32) and a LoRA trained on it."""
    root = tmp_path_factory.mktemp("other")
    base = build_tiny("chinese-alpaca-7b", str(root / "small"), sizes=dict(hidden_size=32, intermediate_size=64))
    return base, make_lora(base, str(root / "small-lora"), ["q_proj"])


def test_errors_are_one_line_and_write_nothing(exported, other_llama, golden_dir, tmp_path, monkeypatch, capsys):
    llama_base, llama_adapter, _ = exported["llama"]
    out = str(tmp_path / "out")

    def fails(argv, *expected):
        err = cli(argv, monkeypatch, capsys)
        assert all(e in err for e in expected), err
        assert not os.path.exists(out)

    ptuning = os.path.join(golden_dir, "glm4_model", "ptuning_adapter")
    fails([ptuning, out], "PREFIX_TUNING", "not a weight delta", "base + adapter")
    moved = tmp_path / "moved-lora"
    moved.mkdir()
    for name in os.listdir(llama_adapter):
        (moved / name).write_bytes(open(os.path.join(llama_adapter, name), "rb").read())
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/llama"}))
    fails([str(moved), out], "/nowhere/llama", "--base")
    chatglm_adapter = exported["chatglm6b"][1]
    fails([chatglm_adapter, out, "--base", llama_base], "query_key_value", llama_base, "llama", "chatglm-6b")
    small_base, small_adapter = other_llama
    fails([small_adapter, out, "--base", llama_base], "shape", "(32, 32)", "(64, 64)", small_adapter)
    resized = make_lora(llama_base, str(tmp_path / "resized"), ["q_proj"], modules_to_save=["embed_tokens"])
    tensors = load_file(os.path.join(resized, "adapter_model.safetensors"))
    key = next(k for k in tensors if "embed_tokens" in k)
    tensors[key] = torch.cat([tensors[key], tensors[key][:6]])
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(resized, "adapter_model.safetensors"))
    fails([resized, out], "vocabulary size differs", "(49960, 64)", "(49954, 64)")
    bigger_tokenizer = make_lora(tiny_dir("llama-7b"), str(tmp_path / "on-llama-7b"), ["q_proj"])
    for name in ("tokenizer.model", "tokenizer_config.json"):  # Chinese-Alpaca's 49,954 tokens, 32,000 rows
        (tmp_path / "on-llama-7b" / name).write_bytes(open(os.path.join(llama_base, name), "rb").read())
    fails([bigger_tokenizer, out], "49954 tokens", tiny_dir("llama-7b"), "32000", "merge_llama_with_chinese_lora")
    fails([llama_adapter, out, "--layout", "original", "--original_dir", golden_dir], "--layout original is for GLM-4")
    fails([llama_adapter, out, "--max_shard_size", "lots"], "max_shard_size")
    os.makedirs(out)
    (tmp_path / "out" / "keep.txt").write_text("mine")
    err = cli([llama_adapter, out], monkeypatch, capsys)
    assert "--overwrite" in err and os.listdir(out) == ["keep.txt"]
    export_module.main([llama_adapter, out, "--overwrite"])
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


def test_glm4_native_config_carries_the_original_keys_transformers_ignores(exported):
    """Issue 24: llama.cpp's converter reads layernorm_epsilon / rope_ratio / seq_length …; transformers reads the
    native fields. Both must describe the same model, and transformers must load the config as before."""
    from transformers import AutoConfig

    from model_hub.glm4.native import LLAMA_CPP_KEYS

    base, _, out = exported["glm4"]
    written = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))
    assert written["layernorm_epsilon"] == written["rms_norm_eps"]
    assert written["rope_ratio"] * 10000 == written["rope_parameters"]["rope_theta"]
    assert written["seq_length"] == written["max_position_embeddings"]
    assert written["padded_vocab_size"] == written["vocab_size"]
    assert written["num_layers"] == written["num_hidden_layers"]
    assert written["kv_channels"] == written["head_dim"] and written["ffn_hidden_size"] == written["intermediate_size"]
    ours, plain = AutoConfig.from_pretrained(out).to_dict(), AutoConfig.from_pretrained(base).to_dict()
    for key in (*LLAMA_CPP_KEYS, "transformers_version", "_name_or_path"):
        ours.pop(key, None)
        plain.pop(key, None)
    assert ours == plain


def test_chatglm6b_ptuning_checkpoint_exports_with_its_prefix_encoder(tmp_path, monkeypatch, capsys):
    """THUDM's ptuning/main.py saves config.json (pre_seq_len) + only the prefix encoder; ChatGLM-6B keeps the
    encoder inside the model, so base + encoder is a standalone model."""
    from model_hub.chatglm6b import ChatGLMForConditionalGeneration

    base = tiny_dir("chatglm-6b")
    torch.manual_seed(3)
    model = ChatGLMForConditionalGeneration.from_pretrained(base, dtype=torch.float32, pre_seq_len=4).eval()
    src = tmp_path / "ptuning"
    model.config.save_pretrained(src)
    prefix = {k: v for k, v in model.state_dict().items() if "prefix_encoder" in k}
    assert prefix and all(v.abs().sum() > 0 for v in prefix.values())
    torch.save(prefix, src / "pytorch_model.bin")  # the original's format
    err = cli([str(src), str(tmp_path / "out")], monkeypatch, capsys)
    assert "prefix encoder" in err and "--base" in err
    out = export(str(src), str(tmp_path / "out"), base=base)
    exported_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert exported_model.config.pre_seq_len == 4
    ids = prompt_ids(out)
    with torch.no_grad():
        assert torch.equal(exported_model(input_ids=ids).logits, model(input_ids=ids).logits)
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(input_ids=ids).logits
    assert (plain - model(input_ids=ids).logits).abs().max() > 1e-3  # the prefix matters
