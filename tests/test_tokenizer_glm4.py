"""GLM-4-9B-chat tokenizer (built from the real tokenizer.model) against the golden vectors of the original
ChatGLM4Tokenizer: tests/golden/glm4/glm4_finetune.json and tests/golden/glm4_model/cases.json."""
import json
import os
import random
import threading

import pytest

import model_hub
from model_hub.glm4 import tokenizer as glm4
from transformers import AutoTokenizer

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
with open(os.path.join(GOLDEN, "glm4", "glm4_finetune.json"), encoding="utf-8") as _f:
    FINETUNE = json.load(_f)
with open(os.path.join(GOLDEN, "glm4_model", "cases.json"), encoding="utf-8") as _f:
    MODEL_CASES = {case["name"]: case for case in json.load(_f)["cases"]}
SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
            "<|end_of_video|>"]


@pytest.fixture(scope="session")
def glm4_tok():
    return glm4.load_glm4_tokenizer()  # builds build/tokenizers/glm-4-9b-chat once if missing or stale


@pytest.mark.parametrize("index", range(len(FINETUNE["strings"])),
                         ids=[repr(s["text"][:24]) for s in FINETUNE["strings"]])
def test_golden_string(glm4_tok, index):
    case = FINETUNE["strings"][index]
    assert glm4_tok(case["text"], add_special_tokens=False).input_ids == case["ids"]
    assert glm4_tok.encode(case["text"], add_special_tokens=False) == case["ids"]
    assert glm4_tok.decode(case["ids"]) == case["decode"]


def test_special_tokens(glm4_tok):
    assert glm4_tok.convert_tokens_to_ids(SPECIALS) == list(range(151329, 151343))
    assert glm4_tok.extra_special_tokens == SPECIALS
    assert len(glm4_tok) == 151343
    assert (glm4_tok.eos_token, glm4_tok.eos_token_id) == ("<|endoftext|>", 151329)
    assert (glm4_tok.pad_token, glm4_tok.pad_token_id) == ("<|endoftext|>", 151329)
    assert (glm4_tok.padding_side, glm4_tok.model_max_length) == ("left", 128000)
    names = {"gMASK": "[gMASK]", "sop": "<sop>", "user": "<|user|>", "assistant": "<|assistant|>",
             "observation": "<|observation|>", "endoftext_pad": "<|endoftext|>", "system": "<|system|>"}
    assert FINETUNE["ids"] == {key: glm4_tok.convert_tokens_to_ids(names[key]) for key in FINETUNE["ids"]}
    # special-token text inside a string is one token
    assert glm4_tok("<|user|>\n你好<|assistant|>", add_special_tokens=False).input_ids == [151336, 198, 109377, 151337]
    assert glm4_tok.decode([151331, 151333, 151336, 198, 109377], skip_special_tokens=True) == "\n你好"


def test_prefix_on_encode(glm4_tok):
    # the original build_inputs_with_special_tokens: [gMASK] <sop> in front
    assert glm4_tok("你好").input_ids == [151331, 151333, 109377]
    assert glm4_tok("你好", add_special_tokens=False).input_ids == [109377]
    assert glm4_tok("").input_ids == [151331, 151333]
    assert set(glm4_tok("你好")) == {"input_ids", "attention_mask"}


def test_table_of_the_spec(glm4_tok):
    table = {"\n": [198], "你好": [109377], "Hello world": [9703, 1879],
             "    def f():\n\treturn 1\n": [262, 707, 282, 3932, 853, 220, 16, 198],
             "你好，我是人工智能助手。": [109377, 3837, 101328, 104668, 113255, 1773]}
    for text, ids in table.items():
        assert glm4_tok(text, add_special_tokens=False).input_ids == ids


def test_same_ids_as_tiktoken(glm4_tok):
    """The converted BPE against tiktoken on the same ranks and split pattern (the original's encoder)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(os.path.join(model_hub.tokenizer_files("glm-4-9b-chat"), "tokenizer.model"))
    enc = tiktoken.Encoding("glm4", pat_str=glm4.GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={})
    rng = random.Random(1234)
    alphabet = list(" \t\n\r  abcXYZ019'’.,;:!?-_()[]{}|/\\\"你好中文。，！？😀🐼❤️ÀÉñçПриветの\u200b\u3000") + \
        ["'s", "'LL", "123456", "http://x.y/z", "\r\n\r\n", "    "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(400)]
    texts += [m["content"] for conv in FINETUNE["conversations"] for m in conv if isinstance(m.get("content"), str)]
    for text, ids in zip(texts, glm4_tok(texts, add_special_tokens=False).input_ids):
        assert ids == enc.encode(text, disallowed_special=()), text
        assert glm4_tok.decode(ids) == enc.decode(ids), text


def _process_batch_combine_512():
    for entry in FINETUNE["direct"]:
        if (entry["function"], entry["combine"], entry["max_input_length"]) == ("process_batch", True, 512):
            return entry["outputs"]
    raise AssertionError("no process_batch combine=True 512 entry in the golden file")


@pytest.mark.parametrize("index", range(len(FINETUNE["conversations"])))
def test_chat_template(glm4_tok, index):
    conv = FINETUNE["conversations"][index]
    assert glm4_tok.apply_chat_template(conv, tokenize=False) == FINETUNE["rendered_chat_template"][index]
    ids = glm4_tok.apply_chat_template(conv, tokenize=True)["input_ids"]
    assert ids[:2] == [151331, 151333] and ids[2:4] != [151331, 151333]
    golden = _process_batch_combine_512()[index]["input_ids"][0]
    assert ids + [151336] == golden  # process_batch: the template's ids + the appended <|user|>


def test_chat_template_generation_prompt(glm4_tok):
    conv = [{"role": "user", "content": "你好"}]
    assert glm4_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        "[gMASK]<sop><|user|>\n你好<|assistant|>"
    assert glm4_tok.apply_chat_template(conv, add_generation_prompt=True)["input_ids"] == \
        [151331, 151333, 151336, 198, 109377, 151337]


def test_model_cases_chat_prompt(glm4_tok):
    case = MODEL_CASES["chat_prompt"]
    out = glm4_tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
    assert out["input_ids"].tolist() == case["input_ids"]
    assert out["attention_mask"].tolist() == case["attention_mask"]


def test_model_cases_left_padded_batch(glm4_tok):
    case = MODEL_CASES["left_padded_batch"]
    out = glm4_tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=True,
                                       return_dict=True, padding=True, return_tensors="pt")
    assert out["input_ids"].tolist() == case["input_ids"]
    assert out["attention_mask"].tolist() == case["attention_mask"]
    # the same through __call__ on the rendered strings (no second prefix)
    texts = glm4_tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
    again = glm4_tok(texts, add_special_tokens=False, padding=True)
    assert again["input_ids"] == case["input_ids"] and again["attention_mask"] == case["attention_mask"]


def test_cache_folder_is_a_plain_fast_tokenizer(glm4_tok):
    # The fixture itself is AutoTokenizer.from_pretrained(cache folder): no remote code, no class of ours.
    folder = glm4.glm4_tokenizer_dir()
    assert folder == os.path.join(model_hub.BUILD_DIR, "tokenizers", "glm-4-9b-chat")
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert "auto_map" not in config and config["tokenizer_class"] == "TokenizersBackend"
    assert type(glm4_tok).__name__ == "TokenizersBackend" and glm4_tok.is_fast


def test_stale_cache_detection(glm4_tok, tmp_path):
    files = model_hub.tokenizer_files("glm-4-9b-chat")
    folder = glm4.glm4_tokenizer_dir()
    assert glm4._is_current(folder, files)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as src, open(copy / name, "wb") as dst:
            dst.write(src.read())
    assert glm4._is_current(str(copy), files)
    stamp = json.loads((copy / glm4.STAMP_FILE).read_text())
    (copy / glm4.STAMP_FILE).write_text(json.dumps({**stamp, "build_version": -1}))
    assert not glm4._is_current(str(copy), files)
    (copy / glm4.STAMP_FILE).write_text(json.dumps(stamp))
    os.remove(copy / "tokenizer.json")
    assert not glm4._is_current(str(copy), files)


def test_rebuild_is_atomic_and_parallel_safe(glm4_tok, tmp_path, monkeypatch):
    # The conversion itself is covered by the session fixture; here the builder is the already built tokenizer.
    monkeypatch.setattr(glm4, "build_glm4_tokenizer", lambda files_dir=None: glm4_tok)
    monkeypatch.setattr(glm4, "CACHE_DIR", str(tmp_path / "tokenizers" / "glm-4-9b-chat"))
    os.makedirs(glm4.CACHE_DIR)
    (tmp_path / "tokenizers" / "glm-4-9b-chat" / "junk").write_text("stale")
    errors = []

    def build():
        try:
            glm4.glm4_tokenizer_dir()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(os.listdir(glm4.CACHE_DIR)) == ["chat_template.jinja", glm4.STAMP_FILE, "tokenizer.json",
                                                  "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path / "tokenizers")) == ["glm-4-9b-chat"]  # no temp folders left


def test_cli_save_and_reload(glm4_tok, tmp_path, monkeypatch, capsys):
    # The CLI saves (atomically) what build_glm4_tokenizer gives; here that is the session's tokenizer, so this
    # is also the save_pretrained -> AutoTokenizer round trip.
    monkeypatch.setattr(glm4, "build_glm4_tokenizer", lambda files_dir=None: glm4_tok)
    out = tmp_path / "out"
    assert glm4.main([str(out)]) == 0
    again = AutoTokenizer.from_pretrained(out)
    texts = [s["text"] for s in FINETUNE["strings"]]
    assert again(texts).input_ids == glm4_tok(texts).input_ids
    assert again("你好").input_ids == [151331, 151333, 109377]
    assert (again.padding_side, again.pad_token_id, len(again)) == ("left", 151329, 151343)
    assert again.extra_special_tokens == SPECIALS
    for conv, rendered in zip(FINETUNE["conversations"], FINETUNE["rendered_chat_template"]):
        assert again.apply_chat_template(conv, tokenize=False) == rendered
    assert glm4.main([str(out)]) == 2  # never overwrites a non-empty folder
    assert "not empty" in capsys.readouterr().err
    assert glm4.main([]) == 2
