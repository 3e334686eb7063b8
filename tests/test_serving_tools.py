"""GLM-4 tool calls through the live server and the official `openai` client: a tiny GLM-4 overfitted by the
glm4 recipe on one tool-call conversation really emits the call, which comes back as OpenAI `tool_calls`
(streamed and not), and the tool's result sent back as a role "tool" message becomes GLM-4's observation turn:
the prompt counts exactly the tokens of the golden chat template's rendering."""
import json
import os

import pytest
from serving_support import WEATHER_CALL, WEATHER_QUESTION, WEATHER_TOOLS, Server

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
RESULT = '{"weather": "晴", "temperature": 25}'


@pytest.fixture(scope="module")
def server(glm4_tool_call_model):
    server = Server("--model", glm4_tool_call_model, "--served_model_name", "glm4-tools")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="glm4-tools", messages=messages, temperature=0, max_tokens=32,
                                          **kwargs)


def test_the_model_s_tool_call_comes_back_as_tool_calls(client):
    answer = ask(client, [{"role": "user", "content": WEATHER_QUESTION}], tools=WEATHER_TOOLS).choices[0]
    assert answer.finish_reason == "tool_calls"
    assert answer.message.content is None
    (call,) = answer.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == WEATHER_CALL["name"]
    assert json.loads(call.function.arguments) == WEATHER_CALL["arguments"]


def test_streamed_tool_call(client):
    chunks = list(ask(client, [{"role": "user", "content": WEATHER_QUESTION}], tools=WEATHER_TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not "".join(d.content or "" for d in deltas)  # the call's text is not leaked as content
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == WEATHER_CALL["name"]
    assert json.loads(calls[0].function.arguments) == WEATHER_CALL["arguments"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_without_tools_the_same_text_is_plain_content(client):
    answer = ask(client, [{"role": "user", "content": WEATHER_QUESTION}], tools=WEATHER_TOOLS,
                 tool_choice="none").choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None


def test_tool_choice_naming_the_function_makes_the_call(client, server):
    answer = ask(client, [{"role": "user", "content": WEATHER_QUESTION}], tools=WEATHER_TOOLS,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(answer.message.tool_calls[0].function.arguments) == WEATHER_CALL["arguments"]
    for choice, message in (("required", '"required" is not supported'),
                            ({"type": "function", "function": {"name": "nope"}}, "'nope', which is not in tools")):
        status, _, body = server.request("POST", "/v1/chat/completions", {
            "model": "glm4-tools", "messages": [{"role": "user", "content": "hi"}], "tools": WEATHER_TOOLS,
            "tool_choice": choice})
        assert status == 400 and message in body["error"]["message"], body


def test_the_tool_result_is_fed_back_as_the_observation_turn(client, golden_dir, glm4_tokenizer):
    """Conversation 4 of the golden GLM-4 vectors (same tool, same question, same call) + the tool's result: the
    server's prompt has exactly the tokens of the golden rendering + GLM-4's call and observation turns."""
    with open(os.path.join(golden_dir, "glm4", "glm4_finetune.json"), encoding="utf-8") as f:
        golden = json.load(f)
    tools = golden["conversations"][4][0]["tools"]
    assert golden["conversations"][4][1]["content"] == WEATHER_QUESTION
    arguments = json.dumps(WEATHER_CALL["arguments"], ensure_ascii=False)
    assert golden["conversations"][4][2]["content"] == f"{WEATHER_CALL['name']}\n{arguments}"
    messages = [{"role": "user", "content": WEATHER_QUESTION},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": WEATHER_CALL["name"], "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": RESULT}]
    second = ask(client, messages, tools=tools)
    rendered = golden["rendered_chat_template"][4]
    expected = glm4_tokenizer.encode(
        rendered[:rendered.index("<|assistant|>")] + f"<|assistant|>{WEATHER_CALL['name']}\n{arguments}"
        f"<|observation|>\n{RESULT}<|assistant|>", add_special_tokens=False)
    assert second.usage.prompt_tokens == len(expected)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
