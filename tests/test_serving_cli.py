"""The recipes' CLIs stream through the serving engine and still print the answers `model.generate` gave:
glm4_finetune/inference.py and llama_ner/chat_ner.py, seeded sampling with their own settings, and greedy."""
import builtins
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import set_seed

from glm4_finetune import inference
from llama_ner import chat_ner
from model_hub.loader import load_model_and_tokenizer


@torch.no_grad()
def generate_ids(model, ids, stop, seed, **settings):
    """What the CLIs did before they streamed: `model.generate` on one prompt; the new ids."""
    set_seed(seed)
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), eos_token_id=stop,
                         pad_token_id=0, **settings)
    return out[0, len(ids):].tolist()


def generate_text(model, tokenizer, ids, stop, seed, **settings):
    return tokenizer.decode(generate_ids(model, ids, stop, seed, **settings), skip_special_tokens=True)


@pytest.fixture(scope="module")
def glm4():
    return load_model_and_tokenizer("tiny:glm-4-9b-chat")


@pytest.mark.parametrize("sampling", [
    dict(max_new_tokens=24, do_sample=True, top_p=0.8, temperature=0.8, repetition_penalty=1.2),  # the defaults
    dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.2),
])
def test_glm4_inference_answers_are_generate_s(glm4, sampling):
    model, tokenizer = glm4
    messages = [{"role": "user", "content": "#裙子#夏天"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = generate_text(model, tokenizer, list(ids), model.config.eos_token_id, 3, **sampling)
    set_seed(3)
    deltas = []
    message, tool_call, text = inference.generate_reply(model, tokenizer, messages, on_delta=deltas.append,
                                                        **sampling)
    assert text == expected and message["content"] == expected.strip()
    if text.startswith("\n"):
        assert "".join(d.text for d in deltas) == message["content"]


def test_glm4_answer_printer_streams_answers_and_holds_tool_calls(capsys):
    from serving.engine import Delta

    printer = inference.AnswerPrinter("GLM-4> ")
    for text, raw in (("上海", "\n上海"), ("今天晴", "\n上海今天晴")):
        printer(Delta(text, raw))
    call = inference.AnswerPrinter("GLM-4> ")
    call(Delta('get_weather\n{"city"', 'get_weather\n{"city"'))
    assert capsys.readouterr().out == "GLM-4> 上海今天晴" and printer.started and not call.started


def test_chat_ner_answers_are_generate_s_and_stream(monkeypatch, capsys):
    model, tokenizer = load_model_and_tokenizer("tiny:chinese-alpaca-7b")
    monkeypatch.setitem(chat_ner.GENERATION_CONFIG, "max_new_tokens", 20)
    args = SimpleNamespace(with_prompt=True, original_prompt=False)
    for original in (False, True):
        args.original_prompt = original
        ids, _ = chat_ner.prompt_ids(tokenizer, "找出人名：张三在北京。", None, True, original)
        new_ids = generate_ids(model, ids, tokenizer.eos_token_id, 1, **chat_ner.GENERATION_CONFIG)
        set_seed(1)
        answer = chat_ner.respond(model, tokenizer, args, "找出人名：张三在北京。")
        if original:  # the original template: the whole output decoded and cut after "### Response:"
            expected = tokenizer.decode(ids + new_ids, skip_special_tokens=True).split("### Response:")[1].strip()
        else:
            expected = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        assert answer == expected

    # --interactive prints the answer as it comes: the same text
    typed = iter(["找出人名：张三在北京。", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    monkeypatch.setattr(chat_ner, "load", lambda args: (model, tokenizer))
    monkeypatch.setattr(sys, "argv", ["chat_ner.py", "--base_model", "tiny:chinese-alpaca-7b", "--with_prompt",
                                      "--interactive", "--only_cpu", "--seed", "1"])
    chat_ner.main()
    ids, _ = chat_ner.prompt_ids(tokenizer, "找出人名：张三在北京。", None, True, False)
    expected = generate_text(model, tokenizer, ids, tokenizer.eos_token_id, 1, **chat_ner.GENERATION_CONFIG).strip()
    assert f"Response:  {expected}\n" in capsys.readouterr().out


def test_one_engine_per_loaded_model_and_the_old_one_is_closed(glm4):
    """The CLIs ask one engine many times; another model gets its own and the old engine stops (before, engines were
    kept forever in a dict keyed by id(model), which a later model can reuse)."""
    from serving.cli import engine_for

    model, tokenizer = glm4
    first = engine_for(model, tokenizer, "glm4_chat")
    assert engine_for(model, tokenizer, "glm4_chat") is first
    other, _ = load_model_and_tokenizer("tiny:glm-4-9b-chat")
    second = engine_for(other, tokenizer, "glm4_chat")
    assert second is not first and second.loaded.core is other
    assert first.stats()["closed"] and not first._thread.is_alive()
    with second:  # the engine's life as a context manager
        assert not second.stats()["closed"]
    assert second.stats()["closed"]
    assert engine_for(other, tokenizer, "glm4_chat") is not second  # a closed engine is not handed out again
