"""chat() / stream_chat(): the original's [Round i] prompt, response post-processing and NaN/inf guard."""
import pytest
import torch
from transformers import LogitsProcessorList

import model_hub
from model_hub.chatglm6b import ChatGLMForConditionalGeneration, ChatGLMTokenizer, tiny_config
from model_hub.chatglm6b.generation import InvalidScoreLogitsProcessor, build_prompt, process_response


@pytest.fixture(scope="module")
def tokenizer():
    return ChatGLMTokenizer.from_pretrained(model_hub.tokenizer_files("chatglm-6b"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():  # larger weights than the default init, so greedy decoding is not one repeated token
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5)
    return model


def test_prompt_without_history_is_the_query():
    assert build_prompt("你好") == "你好"
    assert build_prompt("你好", []) == "你好"


def test_prompt_with_history():
    history = [("你好", "你好！有什么可以帮你？"), ("1+1", "2")]
    assert build_prompt("再见", history) == (
        "[Round 0]\n问：你好\n答：你好！有什么可以帮你？\n[Round 1]\n问：1+1\n答：2\n[Round 2]\n问：再见\n答：")


@pytest.mark.parametrize("raw, expected", [
    ("  你好,世界!  ", "你好，世界！"),
    ("Hello, world!", "Hello, world!"),
    ("答案:42;43对吗?", "答案：42;43对吗？"),
    ("a?中 b:文", "a？中 b：文"),
    ("中,,文", "中，，文"),
    ("今年是[[训练时间]]", "今年是2023年"),
], ids=["cjk", "ascii", "mixed", "after", "double", "date"])
def test_process_response(raw, expected):
    assert process_response(raw) == expected
    assert ChatGLMForConditionalGeneration.process_response(raw) == expected


def test_invalid_scores_become_the_space_piece():
    scores = torch.tensor([[0.5, float("nan"), 1.0, 2.0, 3.0, 0.1, 4.0]])
    fixed = InvalidScoreLogitsProcessor()(None, scores.clone())
    assert fixed.argmax(-1).item() == 5 and fixed[0, 5] == 5e4 and fixed.sum() == 5e4
    fine = torch.tensor([[0.5, 1.0]])
    assert torch.equal(InvalidScoreLogitsProcessor()(None, fine.clone()), fine)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "top_p"])
def test_guard_runs_before_the_sampling_warpers(model, do_sample):
    broken = ChatGLMForConditionalGeneration(model.config).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.transformer.final_layernorm.weight.fill_(float("nan"))
    ids = torch.tensor([[5, 74874, 130001, 130004]])
    out = broken.generate(input_ids=ids, max_new_tokens=3, do_sample=do_sample, top_p=0.7, temperature=0.95,
                          logits_processor=LogitsProcessorList([InvalidScoreLogitsProcessor()]))
    assert out[0, 4:].tolist() == [5, 5, 5]


def test_chat_and_stream_chat_agree(model, tokenizer):
    history = [("你好", "你好！")]
    response, new_history = model.chat(tokenizer, "介绍一下北京", history=history, max_length=40, do_sample=False)
    assert new_history == history + [("介绍一下北京", response)]
    assert history == [("你好", "你好！")]  # the caller's history is not modified

    prompt_ids = tokenizer([build_prompt("介绍一下北京", history)], return_tensors="pt")["input_ids"]
    generated = model.generate(input_ids=prompt_ids, max_length=40, do_sample=False)
    assert response == process_response(tokenizer.decode(generated[0, prompt_ids.shape[1]:].tolist()))

    steps = list(model.stream_chat(tokenizer, "介绍一下北京", history=history, max_length=40, do_sample=False))
    assert len(steps) == generated.shape[1] - prompt_ids.shape[1]
    assert steps[-1] == (response, new_history)


def test_stream_chat_can_stop_early(model, tokenizer):
    stream = model.stream_chat(tokenizer, "你好", max_length=60, do_sample=False)
    first = next(stream)
    stream.close()  # the worker thread stops at its next step
    assert isinstance(first[0], str) and first[1][-1][0] == "你好"
