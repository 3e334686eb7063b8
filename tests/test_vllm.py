"""The vLLM hand-off, proven equal (issue 31): what `python -m serving.vllm` serves answers as `python -m serving.api`
does, through the official `openai` client, with the same prompt tokens.

- LLaMA (llama_ner's prompt): two LoRA adapters and a DPO-trained one (preference/train_dpo.py, issue 34) UNMERGED on
  their base in one vLLM server (multi-LoRA) — each answers as our server with that adapter alone, the base otherwise;
  the merged export of one of them — as our server on the export;
  a system message (ignored by the single-turn prompt, as trained), digit and whitespace runs (where vLLM's own
  tokenizer differs from the original), `/v1/models` listing the adapters after the base.
- GLM-4: the tool-call fixture (full SFT) returns the same `tool_calls` through both servers (the project's
  `glm4_9b_chat` parser in vLLM), and a LoRA adapter trained on it, unmerged in the same vLLM server, answers a
  system + user chat as our server does (and otherwise than its base); its merged export as our server on it.
- The prepared tokenizer folder reads every golden string of the three LLaMA tokenizers to the original ids under
  vLLM's transformers (5.19), and the ChatGLM-6B / P-tuning refusals are one line naming serving.api, exit 2.
Greedy decoding, 16 new tokens; servers on 127.0.0.1, started once per module, requests bounded.
"""
import json
import os
import subprocess

import pytest

from conftest import REPO, run_in_process
from serving_support import WEATHER_CALL, WEATHER_QUESTION, WEATHER_TOOLS, Server
from plain_transformers import run_plain_probe
from vllm_support import (ENV, VllmServer, base_model, dpo_adapter, exported, glm4_tool_call_sft, lora_adapter,
                          vllm_python)

pytestmark = pytest.mark.slow
NEW_TOKENS = 16
LLAMA_CHATS = [[{"role": "system", "content": "你是一个实体识别模型"},
                {"role": "user", "content": "找出句子中的人名：张三在北京工作。"}],
               [{"role": "user", "content": "99999 1000000 0.000001"}],
               [{"role": "user", "content": "  两个空格  和\t制表符"}]]
NER_CHATS = [[{"role": "user", "content": "找出句子中的地名、人名和机构名：\n文本：李明在上海复旦大学读书。"}],
             *LLAMA_CHATS[:2]]
GLM4_CHATS = [[{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "你好"}],
              [{"role": "user", "content": "介绍一下北京。"}]]


def ask_streamed(server, model: str, messages, tools=None):
    """The streamed answer put together: (content, [(name, arguments)], finish_reason)."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="unused", timeout=120, max_retries=0)
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                                                stream=True, **({"tools": tools} if tools else {})):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            name, arguments = calls.get(call.index, ("", ""))
            calls[call.index] = (name + (call.function.name or ""), arguments + (call.function.arguments or ""))
        reason = chunk.choices[0].finish_reason or reason
    return content.strip(), [(n, json.loads(a)) for _, (n, a) in sorted(calls.items())], reason


def ask(server, model: str, messages, tools=None):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="unused", timeout=120, max_retries=0)
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                                           **({"tools": tools} if tools else {}))
    message = reply.choices[0].message
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    # The same tokens can end in half a character when max_tokens cuts a multi-byte one (a byte-fallback piece):
    # vLLM shows it as U+FFFD, our server holds it back. GLM-4 answers open with "\n", which our server strips.
    return (message.content or "").strip().rstrip("\ufffd"), calls, reply.usage.prompt_tokens


@pytest.fixture(scope="module")
def llama():
    base = base_model("chinese-alpaca-7b")
    adapters = [lora_adapter(base, f"llama-lora-{seed}", seed, "llama_ner", "llama_ner") for seed in (1, 2)]
    return base, adapters, exported(adapters[0], "llama-lora-1-export"), dpo_adapter(base)


@pytest.fixture(scope="module")
def llama_vllm_answers(llama):
    """One vLLM server (vLLM's default, compiled path, as users run it) with the base and the three adapters
    unmerged: name → its answers (the LoRA adapters to LLAMA_CHATS; the DPO adapter and the base to NER_CHATS)."""
    base, adapters, _, dpo = llama
    names = [os.path.basename(a) for a in (*adapters, dpo)]
    server = VllmServer(*adapters, dpo, compiled=True)
    try:
        listed = [m["id"] for m in server.request("GET", "/v1/models")[2]["data"]]
        assert listed == [os.path.basename(base), *names]  # the base first, then the adapters
        answers = {name: [ask(server, name, chat) for chat in LLAMA_CHATS] for name in names[:2]}
        for name in (names[2], os.path.basename(base)):
            answers[name] = [ask(server, name, chat) for chat in NER_CHATS]
    finally:
        server.stop()
    return answers


@pytest.fixture(scope="module")
def glm4():
    """(the tool-call SFT model, a LoRA trained on it): one vLLM server serves both, base and adapter (issue 32)."""
    tool_model = glm4_tool_call_sft(base_model("glm-4-9b-chat"))
    return tool_model, lora_adapter(tool_model, "glm4-lora-on-tool-sft", 3, "glm4_chat", "glm4_finetune")


def test_llama_adapters_unmerged_and_the_export_answer_as_our_server(llama, llama_vllm_answers):
    _, adapters, export, _ = llama
    names = [os.path.basename(a) for a in adapters]
    theirs = llama_vllm_answers
    assert theirs[names[0]] != theirs[names[1]], "the two adapters answer alike: LoRA not applied"
    for adapter, name in zip(adapters, names):
        ours = Server("--adapter", adapter)
        try:
            assert [ask(ours, name, chat) for chat in LLAMA_CHATS] == theirs[name]
        finally:
            ours.stop()
    server, ours = VllmServer(export), Server("--model", export)
    try:
        name = os.path.basename(export)
        merged = [ask(server, name, chat) for chat in LLAMA_CHATS]
        assert merged == [ask(ours, name, chat) for chat in LLAMA_CHATS]
        assert [prompt for _, _, prompt in merged] == [prompt for _, _, prompt in theirs[names[0]]]
    finally:
        server.stop()
        ours.stop()


def test_a_dpo_adapter_unmerged_answers_as_our_server(llama, llama_vllm_answers):
    """preference/train_dpo.py's output keeps its prompt record (llama_ner) and serves through the hand-off as through
    our server: the same prompt tokens and greedy answer; the base answers otherwise (the adapter is applied)."""
    from model_hub.prompt_format import read_prompt_format

    base, _, _, dpo = llama
    name = os.path.basename(dpo)
    assert read_prompt_format(dpo) == "llama_ner"
    assert llama_vllm_answers[name] != llama_vllm_answers[os.path.basename(base)], "DPO adapter not applied"
    ours = Server("--adapter", dpo)
    try:
        assert [ask(ours, name, chat) for chat in NER_CHATS] == llama_vllm_answers[name]
    finally:
        ours.stop()


def test_glm4_tool_calls_an_unmerged_adapter_and_its_export_answer_as_our_server(glm4):
    tool_model, adapter = glm4
    server, ours = VllmServer(adapter), Server("--model", tool_model)  # vLLM: the base and its LoRA, unmerged
    try:
        name = os.path.basename(tool_model)
        assert [m["id"] for m in server.request("GET", "/v1/models")[2]["data"]] == [name, os.path.basename(adapter)]
        question = [{"role": "user", "content": WEATHER_QUESTION}]
        theirs = ask(server, name, question, WEATHER_TOOLS)
        assert theirs[1] == [(WEATHER_CALL["name"], WEATHER_CALL["arguments"])], theirs
        assert theirs == ask(ours, name, question, WEATHER_TOOLS)
        streamed = ask_streamed(server, name, question, WEATHER_TOOLS)  # the parser's streaming path
        assert streamed == ask_streamed(ours, name, question, WEATHER_TOOLS)
        assert streamed == ("", theirs[1], "tool_calls")
        after = question + [{"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_0", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "上海"}'}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": '{"weather": "晴", "temperature": 25}'}]
        assert ask(server, name, after, WEATHER_TOOLS) == ask(ours, name, after, WEATHER_TOOLS)
        without_adapter = [ask(server, name, chat) for chat in GLM4_CHATS]
        ours.stop()
        ours = Server("--adapter", adapter)
        name = os.path.basename(adapter)
        unmerged = [ask(server, name, chat) for chat in GLM4_CHATS]
        assert unmerged != without_adapter, "the adapter answers as its base: LoRA not applied"
        assert unmerged == [ask(ours, name, chat) for chat in GLM4_CHATS]
    finally:
        server.stop()
        ours.stop()
    export = exported(adapter, "glm4-lora-on-tool-sft-export")  # the same adapter merged: vLLM reads the native GlmForCausalLM
    server, ours = VllmServer(export), Server("--model", export)
    try:
        name = os.path.basename(export)
        merged = [ask(server, name, chat) for chat in GLM4_CHATS]
        assert merged == [ask(ours, name, chat) for chat in GLM4_CHATS]
        assert [prompt for _, _, prompt in merged] == [prompt for _, _, prompt in unmerged]
    finally:
        server.stop()
        ours.stop()


def test_the_prepared_llama_tokenizers_read_every_golden_string_as_the_original_under_vllm():
    """Each of the three LLaMA tokenizers, saved as `serving.vllm` prepares it, loaded by vLLM's transformers (5.19)
    with the project's vLLM plugin registered: every golden string of the original gives the original ids."""
    from model_hub import tokenizer_files
    from serving.vllm import prepare_tokenizer

    golden = {"llama-7b": "llama_original", "chinese-llama-7b": "chinese_llama_7b",
              "chinese-alpaca-7b": "chinese_alpaca_7b"}
    prepared = {name: prepare_tokenizer("llama", tokenizer_files(name), [], "llama_ner") for name in golden}
    probe = ("import json, sys; from serving.vllm_plugin import register; register()\n"
             "import transformers; from transformers import AutoTokenizer; bad = []\n"
             "for folder, name in zip(sys.argv[1::2], sys.argv[2::2]):\n"
             "    tok = AutoTokenizer.from_pretrained(folder)\n"
             "    assert type(tok).__name__ == 'LlamaSentencePieceTokenizer', type(tok)\n"
             "    for case in json.load(open(f'tests/golden/llama/{name}.json', encoding='utf-8'))['strings']:\n"
             "        if tok(case['text'])['input_ids'] != case['ids_with_bos']: bad.append((name, case['text']))\n"
             "print(transformers.__version__, json.dumps(bad))")
    argv = [str(item) for name, gold in golden.items() for item in (prepared[name], gold)]
    result = subprocess.run([vllm_python(), "-c", probe, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, **ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    version, bad = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert version.startswith("5.19") and json.loads(bad) == []


def test_the_llama_folders_the_project_writes_read_as_the_original_under_vllms_transformers(tmp_path):
    """Without the plugin (vLLM started by hand on an export): vLLM's transformers (5.19) reads the tokenizer of every
    LLaMA folder the project writes to the original's ids, and its chat template renders the trained prompt."""
    from model_hub.llama.tokenizer import load_llama_tokenizer
    from model_hub.prompt_format import get_prompt_format, record_prompt_format

    golden = {"llama-7b": "llama_original", "chinese-llama-7b": "chinese_llama_7b",
              "chinese-alpaca-7b": "chinese_alpaca_7b"}
    folders = {}
    for name, gold in golden.items():
        load_llama_tokenizer(name).save_pretrained(tmp_path / name)
        record_prompt_format(str(tmp_path / name), "llama_ner", "llama_ner")
        folders[str(tmp_path / name)] = gold
    bad, prompts = run_plain_probe(vllm_python(), folders)
    assert bad == []
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "文本：2008年1月，北京 99999 元。"}]
    for folder, name in zip(folders, golden):
        assert prompts[folder] == get_prompt_format("llama_ner").prompt_ids(load_llama_tokenizer(name), chat)


@pytest.mark.parametrize("what", ["chatglm6b", "ptuning"])
def test_what_vllm_cannot_serve_is_refused_in_one_line(what, tmp_path):
    from serving import vllm

    if what == "chatglm6b":
        folder, expected = "tiny:chatglm-6b", "ChatGLM-6B is not a model vLLM serves; serve it with `python -m " \
                                              "serving.api --model"
    else:
        from peft import PrefixTuningConfig, get_peft_model

        from model_hub.loader import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer("tiny:glm-4-9b-chat", dtype="fp32")
        folder = str(tmp_path / "ptuning")
        get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(folder)
        expected = f"a PREFIX_TUNING adapter (P-tuning v2 prefix) cannot be served by vLLM; serve it with " \
                   f"`python -m serving.api --adapter {folder}`"
    code, out, err = run_in_process(vllm.main, [folder, "--dry_run"], script="python -m serving.vllm")
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and expected in err
