"""The web demo without a browser: the conversation logic (what the page shows for a history, the tools box, what
regenerate retries) and the server around the page (host and origin guard, what a visitor sees before login, the
login limit, SIGTERM, the max-new-tokens slider), over HTTP on 127.0.0.1 with a real tiny engine."""
import json
import os
import sys
import tempfile
import time

import pytest
from serving_support import free_port

from serving.engine import Engine
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


# ---- the server around the page: no browser needed (issue 29, items 8, 11, 15; issue 33, item 8) --------------
def fetch(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
          timeout: float = 30) -> tuple[int, list[tuple[str, str]], str]:
    """(status, headers as sent, body text) of one request to 127.0.0.1:PORT; `headers` may set Host itself."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={"Host": f"127.0.0.1:{port}", **(headers or {})})
        response = connection.getresponse()
        return response.status, [(k.lower(), v) for k, v in response.getheaders()], \
            response.read().decode("utf-8", "replace")
    finally:
        connection.close()


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def login(port: int, password: str, user: str = "demo") -> tuple[int, list, str]:
    import urllib.parse

    return fetch(port, "POST", "/login", urllib.parse.urlencode({"username": user, "password": password}).encode(),
                 FORM)


def cookies_of(headers) -> str:
    return "; ".join(v.split(";", 1)[0] for k, v in headers if k == "set-cookie")


class RecordingEngine(Engine):
    """A real engine that also keeps the requests it was given."""

    def __init__(self, loaded, **options):
        super().__init__(loaded, **options)
        self.submitted = []

    def submit(self, prompt_ids, params, on_event):
        request = super().submit(prompt_ids, params, on_event)
        self.submitted.append(request)
        return request


@pytest.fixture(scope="module")
def tiny_engine():
    from serving.loading import load_for_serving

    engine = RecordingEngine(load_for_serving("tiny:glm-4-9b-chat"), max_batch=2)
    yield engine
    engine.close(timeout=5)


@pytest.fixture
def serve_page(tiny_engine):
    """serve_page(demo=None, **launch options) → the port of the page served in a thread (closed after the test)."""
    from serving.web_demo import WebDemo, launch

    servers = []

    def start(demo=None, **options):
        port = free_port()
        servers.append(launch(demo or WebDemo(tiny_engine), port=port, block=False, **options))
        return port
    yield start
    for server in servers:
        server.close()


def test_the_page_answers_loopback_host_names_and_same_origin_requests_only(serve_page, tiny_engine):
    """Issue 29, item 8: a web page could drive the demo (a cross-origin POST to the Gradio API) and, through DNS
    rebinding (its own host name resolving to 127.0.0.1), read it."""
    port = serve_page(allowed_hosts=["demo.internal"], cors_origins=["http://localhost:3000"])
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "demo.internal"):
        assert fetch(port, "GET", "/", headers={"Host": host})[0] == 200, host
    status, _, body = fetch(port, "GET", "/", headers={"Host": f"rebound.attacker.example:{port}"})
    assert status == 400 and "--allowed_hosts" in body

    before = len(tiny_engine.submitted)
    join = json.dumps({"data": ["你好", None, 8, 0, 0.8, "", ""], "fn_index": 0, "session_hash": "evil"}).encode()
    for origin in ("http://attacker.example", "null", f"http://127.0.0.1:{port + 1}"):
        for path, body, headers in (("/gradio_api/queue/join", join, {"Content-Type": "application/json"}),
                                    ("/gradio_api/queue/join", join, {"Content-Type": "text/plain"}),
                                    ("/login", b"username=demo&password=x", FORM)):
            status, _, text = fetch(port, "POST", path, body, {"Origin": origin, **headers})
            assert status == 403 and "cross_origin" in text, (origin, path, status, text)
    assert len(tiny_engine.submitted) == before  # nothing reached the model

    status, headers, _ = fetch(port, "GET", "/config", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200  # the page's own requests
    status, headers, _ = fetch(port, "GET", "/config", headers={"Origin": "http://localhost:3000"})
    assert status == 200 and [v for k, v in headers if k == "access-control-allow-origin"] == ["http://localhost:3000"]


def test_before_login_nothing_shows_the_system_prompt_the_model_path_or_the_page(serve_page, tiny_model, tmp_path):
    """Issue 29, item 11: the login page embedded --system (Gradio's API description lists each input's start value);
    the manifest must name the model's folder, never its path; uploads answered with server temp paths."""
    from serving.engine import Engine
    from serving.loading import load_for_serving
    from serving.web_chat import Settings
    from serving.web_demo import WebDemo

    folder = tiny_model("glm-4-9b-chat")
    engine = Engine(load_for_serving(folder), max_batch=2)
    secret = "你是内部助手 SECRET-SYSTEM-PROMPT-7f3a"
    try:
        port = serve_page(WebDemo(engine, Settings(system=secret)), auth=("demo", "s3cret"))
        folder_parent = os.path.dirname(os.path.abspath(folder))
        for path in ("/", "/manifest.json", "/theme.css", "/gradio_api/info", "/config"):
            status, _, body = fetch(port, "GET", path)
            assert secret not in body and "SECRET-SYSTEM" not in body and folder_parent not in body, path
        assert "glm-4-9b-chat" in fetch(port, "GET", "/manifest.json")[2]
        for method, path in (("GET", "/config"), ("GET", "/gradio_api/info?all_endpoints=true"),
                             ("GET", "/gradio_api/queue/data?session_hash=x"), ("GET", "/gradio_api/heartbeat/x"),
                             ("POST", "/gradio_api/queue/join"), ("GET", f"/gradio_api/file={folder}/config.json")):
            assert fetch(port, method, path, b"{}", {"Content-Type": "application/json"})[0] in (401, 404), path

        status, headers, _ = login(port, "s3cret")
        cookie = {"Cookie": cookies_of(headers)}
        status, _, config = fetch(port, "GET", "/config", headers=cookie)
        assert status == 200 and "SECRET-SYSTEM-PROMPT-7f3a" in config  # behind the login, the box has it
        upload = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n'
                  b"Content-Type: text/plain\r\n\r\nhello\r\n--b--\r\n")
        status, _, body = fetch(port, "POST", "/gradio_api/upload", upload,
                               {**cookie, "Content-Type": "multipart/form-data; boundary=b"})
        assert status == 404 and tempfile.gettempdir() not in body and "gradio" not in body.lower()
    finally:
        engine.close(timeout=5)


def test_failed_logins_from_one_address_are_refused_for_a_while(serve_page):
    """Issue 29, item 15: Gradio's login answered every guess at once."""
    port = serve_page(auth=("demo", "s3cret"), login_limit={"max_failures": 3, "window": 60, "lockout": 2})
    assert "3 failed logins" in fetch(port, "GET", "/")[2]  # the login page says the rule
    assert [login(port, "wrong")[0] for _ in range(3)] == [400, 400, 400]
    status, headers, body = login(port, "s3cret")  # the right password too: the address waits
    assert status == 429 and "too many failed logins" in body and dict(headers)["retry-after"] in ("1", "2")
    time.sleep(2.2)
    assert login(port, "s3cret")[0] == 200  # after the lockout; and the success forgives the failures
    assert [login(port, "wrong")[0] for _ in range(3)] == [400, 400, 400]


def test_the_login_limit_remembers_a_bounded_number_of_addresses():
    import asyncio

    from serving.login_limit import LoginLimit

    async def wrong_password(scope, receive, send):
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def noop(message):
        pass

    limit = LoginLimit(wrong_password, max_failures=2, max_clients=50)
    for address in range(1000):
        client = (f"10.0.{address // 256}.{address % 256}", 1)
        asyncio.run(limit({"type": "http", "method": "POST", "path": "/login", "client": client}, None, noop))
    assert len(limit._clients) == 50


def test_auth_on_the_command_line_says_to_use_the_environment_variable():
    from conftest import run_in_process

    from serving.web_demo import AUTH_ENV, build_parser, main

    assert AUTH_ENV in " ".join(build_parser().format_help().split())
    code, _, err = run_in_process(main, ["--auth", "demo:s3cret", "--port", "0"])
    assert code == 2 and f"set {AUTH_ENV} instead" in err and err.strip().endswith("expected a port from 1 to 65535")


def test_max_new_tokens_starts_from_the_device_and_tops_at_what_the_engine_holds(tiny_engine):
    """Issue 33, item 8: 512 new tokens by default made a CPU reply take ~80 s, and the slider went to 131,072
    whatever the memory could hold."""
    from model_hub.glm4.native import native_config_from_original
    from model_hub.make_tiny import _real_config
    from model_hub.registry import get_spec
    from serving.web_demo import WebDemo, default_max_tokens, kv_bytes_per_token, reply_token_limit

    import torch

    loaded = tiny_engine.loaded
    page = WebDemo(tiny_engine).build()
    slider = next(c["props"] for c in page.config["components"] if c["props"].get("elem_id") == "max_tokens")
    assert slider["value"] == default_max_tokens("cpu") == 256 and default_max_tokens("cuda:0") >= 512
    assert slider["maximum"] == reply_token_limit(loaded, tiny_engine.max_batch) <= loaded.context_length

    per_token = kv_bytes_per_token(loaded.core.config, loaded.core.dtype)
    assert per_token == 2 * 2 * 2 * 16 * 4  # k and v × 2 layers × 2 key/value heads × 16 dims × fp32
    assert reply_token_limit(loaded, 8, free_bytes=2 * 8 * per_token * 1000) == 1000
    assert reply_token_limit(loaded, 8, free_bytes=1 << 50) == loaded.context_length == 131072
    glm4_9b = native_config_from_original(_real_config(get_spec("glm-4-9b-chat")))
    assert kv_bytes_per_token(glm4_9b, torch.bfloat16) == 2 * 40 * 2 * 128 * 2  # 40 KiB a token


@pytest.mark.slow
def test_sigterm_lets_the_reply_in_flight_end_cleanly_and_exits_0():
    """Issue 33, item 8: SIGTERM killed the web demo (exit 143, `make: *** … Terminated`), cutting the reply."""
    import signal

    from serving_support import Server

    class WebDemoProcess(Server):
        def __init__(self, *args: str):
            self.start(lambda port: [sys.executable, "-m", "serving.web_demo", "--port", str(port), *args],
                       "web-demo-test", {}, 180)

    server = WebDemoProcess("--model", "tiny:glm-4-9b-chat", "--drain_timeout", "3", "--max_batch", "2")
    try:
        config = json.loads(fetch(server.port, "GET", "/config")[2])
        send = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "send")
        fn_index = next(d["id"] for d in config["dependencies"] if [send, "click"] in d["targets"])
        join = {"data": ["写一篇很长的文章。", None, 100000, 0, 0.8, "", ""], "event_data": None,
                "fn_index": fn_index, "trigger_id": send, "session_hash": "sigterm"}
        status, _, body = fetch(server.port, "POST", "/gradio_api/queue/join", json.dumps(join).encode(),
                               {"Content-Type": "application/json"})
        assert status == 200, body
        messages = sse_messages(server.port, "/gradio_api/queue/data?session_hash=sigterm", seconds=120)
        while next(messages)["msg"] != "process_generating":
            pass
        server.process.send_signal(signal.SIGTERM)
        after = [message for message in messages]
        generating = [m for m in after if m["msg"] == "process_generating"]
        completed = [m for m in after if m["msg"] == "process_completed"]
        assert generating and completed and completed[0]["success"], after[-3:]  # it went on, then ended cleanly
        chat = completed[0]["output"]["data"][2]
        text = "".join(part.get("text", "") for part in chat[-1]["content"])
        assert chat[-1]["role"] == "assistant" and len(text) > 20, chat[-1]
        assert server.process.wait(timeout=60) == 0
        assert "web demo stopped" in server.output()
    finally:
        server.stop()


def sse_messages(port: int, path: str, seconds: float):
    """The JSON messages of a server-sent event stream until it ends (bounded in time)."""
    import http.client

    deadline = time.monotonic() + seconds
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200
        while time.monotonic() < deadline:
            line = response.fp.readline()
            if not line:
                return
            if line.startswith(b"data: "):
                message = json.loads(line[6:])
                yield message
                if message["msg"] in ("close_stream", "unexpected_error"):
                    return
        raise AssertionError(f"the stream {path} did not end in {seconds} s")
    finally:
        connection.close()
