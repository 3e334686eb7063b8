"""The web demo's conversation logic without a browser: what the page shows for a history, the tools box, what
regenerate retries."""
import json

import pytest

from serving.web_chat import TOOL_CALL_TITLE, display, escape, last_tool_call_id, parse_tools, retry_point
from tuning.errors import UserError


def test_escape_keeps_markdown_and_html_characters_literal():
    import markdown_it

    text = "*粗* _斜_ `code` [链接](x) <b>标签</b> 1. # 标题 a&b \\ $x$\n===\n- 项"
    rendered = markdown_it.MarkdownIt().render(escape(text))
    visible = rendered.replace("<p>", "").replace("</p>", "").replace("&lt;", "<").replace("&gt;", ">") \
        .replace("&amp;", "&").strip()
    assert visible == text


def test_tools_box_accepts_openai_tools_and_bare_functions():
    function = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    wrapped = [{"type": "function", "function": function}]
    assert parse_tools(json.dumps(wrapped)) == wrapped
    assert parse_tools(json.dumps([function])) == wrapped
    assert parse_tools(json.dumps(function)) == wrapped
    assert parse_tools("  ") is None


@pytest.mark.parametrize("text, message", [
    ('[{"name": ', "tools: not valid JSON at line 1, column 11"),
    ('"get_weather"', "tools: expected a JSON list of tools"),
    ('[{"type": "function", "function": {"description": "x"}}]', "tools: tool 1 has no function name"),
])
def test_tools_box_errors_say_what_is_wrong(text, message):
    with pytest.raises(UserError) as error:
        parse_tools(text)
    assert str(error.value).startswith(message)


def test_a_tool_call_is_its_own_message_with_pretty_arguments_and_the_result_is_shown():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
    history = [{"role": "user", "content": "北京天气？"}, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "content": "晴", "tool_call_id": "call_1"}]
    shown = display(history)
    assert shown[1] == {"role": "assistant", "content": '```json\n{\n  "city": "北京"\n}\n```',
                        "metadata": {"title": TOOL_CALL_TITLE.format(name="get_weather")}}
    assert shown[2]["role"] == "user" and shown[2]["content"].endswith("晴")
    assert last_tool_call_id(history[:2]) == "call_1"
    with pytest.raises(UserError, match="has not called a tool"):
        last_tool_call_id(history)


def test_a_tool_calls_name_and_arguments_cannot_inject_markup():
    """Issue 29, item 14: a tool named `<img src=…>` rendered an image in the title (a beacon); arguments holding
    ``` closed the code block and the rest rendered as Markdown/HTML."""
    call = {"id": "c", "type": "function", "function": {
        "name": '<img src="http://attacker.example/beacon">',
        "arguments": json.dumps({"q": "```\n<img src=x onerror=alert(1)>"})}}
    shown = display([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}])
    title, content = shown[1]["metadata"]["title"], shown[1]["content"]
    assert "<img" not in title and "&lt;img" in title
    fence = content.split("json", 1)[0]
    assert len(fence) > 3 and content.endswith("\n" + fence) and content.count(fence) == 2


def test_regenerate_retries_from_the_last_user_or_tool_turn():
    user = {"role": "user", "content": "a"}
    answer = {"role": "assistant", "content": "b"}
    assert retry_point([user, answer, user, answer]) == [user, answer, user]
    assert retry_point([user]) == [user]
    assert retry_point([]) == []

