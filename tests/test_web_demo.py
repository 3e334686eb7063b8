"""The web demo (python -m serving.web_demo) in a real headless Chromium driven by selenium: Chinese prompts,
streamed replies equal to the engine's greedy answer, history, clear, stop, regenerate, errors shown in the page,
and a GLM-4 overfitted by the glm4 recipe calling a tool whose pasted result goes back as the observation turn.

The page runs in this process (Gradio on a free 127.0.0.1 port) on a real engine that only records what it is
asked, so a test can compare the page with the engine's own answer for the same messages.
"""
import json
import os
import shutil
import socket
import tempfile
import time

import pytest
from conftest import REPO
from serving_support import WEATHER_CALL, WEATHER_QUESTION, WEATHER_TOOLS

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = os.environ.get("WEB_DEMO_SCREENSHOT", os.path.join(REPO, "build", "tests", "web_demo.png"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                                 reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")]


def normalized(text: str) -> str:
    """What a reader sees: HTML folds runs of whitespace into one space."""
    return " ".join(text.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="web-demo-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1280,1400", "--lang=zh-CN"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class Demo:
    """The page on a real engine that records each request it is given (prompt ids, the request itself)."""

    def __init__(self, model: str, driver, name: str | None = None):
        from serving.engine import Engine
        from serving.loading import load_for_serving
        from serving.web_demo import WebDemo, launch

        class RecordingEngine(Engine):
            def submit(engine, prompt_ids, params, on_event):
                request = super().submit(prompt_ids, params, on_event)
                engine.submitted.append(request)
                return request

        self.engine = RecordingEngine(load_for_serving(model, served_name=name))
        self.engine.submitted = []
        self.url = f"http://127.0.0.1:{free_port()}/"
        self.page = launch(WebDemo(self.engine), port=int(self.url.split(":")[2].strip("/")), block=False)
        self.driver = driver
        driver.get(self.url)
        wait_for(lambda: driver.find_elements("css selector", "#send"), 30, "the page")

    def close(self):
        self.page.close()
        self.engine.close(timeout=5)

    # ---- the page ------------------------------------------------------------------------------------------
    def find(self, css):
        return self.driver.find_element("css selector", css)

    def set_number(self, elem_id: str, value) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)
        wait_for(lambda: box.get_attribute("value") == str(value), 5, f"{elem_id} = {value}")

    def type(self, elem_id: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} textarea")
        box.send_keys(Keys.CONTROL, "a", Keys.DELETE)
        box.send_keys(text)

    def click(self, elem_id: str) -> None:
        self.find(f"#{elem_id}").click()

    def messages(self, who: str) -> list[str]:
        """The text of each user / bot message shown in the chat (read again when a streamed update replaced an
        element while it was being read)."""
        from selenium.common.exceptions import StaleElementReferenceException

        for _ in range(50):
            try:
                return [e.text for e in self.driver.find_elements("css selector", f'#chat [data-testid="{who}"]')]
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError(f"the {who} messages kept changing while being read")

    # ---- the engine ----------------------------------------------------------------------------------------
    def answered(self, before: int, seconds: float = 60):
        """The request the page made after `before` requests, once it has finished."""
        wait_for(lambda: len(self.engine.submitted) > before and self.engine.submitted[before].done, seconds,
                 "the page's request to finish")
        return self.engine.submitted[before]

    def greedy(self, messages, max_tokens, tools=None) -> str:
        from serving.engine import Finished
        from serving.sampling import SamplingParams

        events = list(self.engine.generate(messages, SamplingParams(max_tokens=max_tokens, temperature=0),
                                           tools=tools))
        assert isinstance(events[-1], Finished) and events[-1].finish_reason in ("stop", "length"), events[-1]
        return events[-1].text

    def shows_answer(self, expected: str, seconds: float = 20) -> None:
        def last_bot():
            shown = self.messages("bot")
            return shown and normalized(shown[-1]) == normalized(expected)
        try:
            wait_for(last_bot, seconds, "the streamed answer")
        except AssertionError:
            assert normalized(self.messages("bot")[-1]) == normalized(expected)


@pytest.fixture(scope="module")
def tiny_demo(browser):
    demo = Demo("tiny:glm-4-9b-chat", browser)
    yield demo
    demo.close()


MAX_TOKENS = 24


def test_chinese_chat_streams_the_greedy_answer_keeps_history_and_clears(tiny_demo):
    demo = tiny_demo
    demo.set_number("temperature", 0)
    demo.set_number("max_tokens", MAX_TOKENS)
    first = "你好，请用一句话介绍一下你自己。"
    before = len(demo.engine.submitted)
    demo.type("message", first)
    demo.click("send")
    request = demo.answered(before)
    turn1 = [{"role": "user", "content": first}]
    assert request.prompt_ids == demo.engine.prompt_ids(turn1)
    answer1 = demo.greedy(turn1, MAX_TOKENS)
    demo.shows_answer(answer1)
    assert demo.messages("user") == [first]

    second = "那北京呢？"
    before = len(demo.engine.submitted)
    demo.type("message", second + "\n")  # Enter sends too
    request = demo.answered(before)
    turn2 = turn1 + [{"role": "assistant", "content": answer1}, {"role": "user", "content": second}]
    assert request.prompt_ids[:len(demo.engine.prompt_ids(turn1))] == demo.engine.prompt_ids(turn1)
    assert request.prompt_ids == demo.engine.prompt_ids(turn2)  # the first turn went back with the second
    answer2 = demo.greedy(turn2, MAX_TOKENS)
    demo.shows_answer(answer2)

    before = len(demo.engine.submitted)  # regenerate: the same prompt again (not the answer appended)
    demo.click("regenerate")
    assert demo.answered(before).prompt_ids == demo.engine.prompt_ids(turn2)
    demo.shows_answer(answer2)
    assert len(demo.messages("bot")) == 2

    demo.click("clear")
    wait_for(lambda: not demo.messages("user") and not demo.messages("bot"), 10, "an empty chat")
    before = len(demo.engine.submitted)  # and the model starts afresh
    demo.type("message", second)
    demo.click("send")
    assert demo.answered(before).prompt_ids == demo.engine.prompt_ids([{"role": "user", "content": second}])
    demo.click("clear")


def test_stop_ends_the_reply_and_keeps_what_was_written(tiny_demo):
    demo = tiny_demo
    demo.set_number("max_tokens", 2000)
    before = len(demo.engine.submitted)
    demo.type("message", "写一篇很长的文章。")
    demo.click("send")
    wait_for(lambda: len(demo.engine.submitted) > before and len(demo.engine.submitted[before].output_ids) > 4,
             30, "the reply to start")
    demo.click("stop")
    request = demo.answered(before, seconds=10)
    assert request.cancelled.is_set() and len(request.output_ids) < 2000
    wait_for(lambda: demo.messages("bot") and demo.messages("bot")[-1].strip(), 10, "the partial answer")
    partial = demo.messages("bot")[-1]
    time.sleep(0.5)
    assert demo.messages("bot")[-1] == partial  # it stays in the chat
    demo.set_number("max_tokens", MAX_TOKENS)
    demo.click("clear")


def test_generation_errors_are_shown_in_the_page(tiny_demo):
    demo = tiny_demo
    demo.type("tools", '[{"type": "function", "function": {"name": ')
    demo.type("message", "你好")
    demo.click("send")
    wait_for(lambda: any("tools: not valid JSON" in text for text in demo.messages("bot")), 15, "the error")
    assert any("出错 / Error" in text for text in demo.messages("bot"))
    demo.type("tools", "")
    demo.click("clear")


def test_glm4_tool_call_is_its_own_message_and_the_result_goes_back_as_observation(browser, glm4_tool_call_model):
    demo = Demo(glm4_tool_call_model, browser, name="glm4-tool-call (tiny GLM-4, glm4 recipe SFT)")
    try:
        demo.set_number("temperature", 0)
        demo.set_number("max_tokens", 32)
        demo.type("tools", json.dumps(WEATHER_TOOLS, ensure_ascii=False))
        before = len(demo.engine.submitted)
        demo.type("message", WEATHER_QUESTION)
        demo.click("send")
        demo.answered(before)
        arguments = json.dumps(WEATHER_CALL["arguments"], ensure_ascii=False)
        pretty = normalized(json.dumps(WEATHER_CALL["arguments"], ensure_ascii=False, indent=2))
        try:  # the title first, then the arguments as a JSON block under it
            wait_for(lambda: any("Tool call: get_weather" in t and pretty in normalized(t)
                                 for t in demo.messages("bot")), 15, "the tool-call message")
        except AssertionError:
            assert pretty in demo.messages("bot")

        result = '{"weather": "晴", "temperature": 22}'
        demo.type("tool_result", result)
        before = len(demo.engine.submitted)
        demo.click("send_tool_result")
        request = demo.answered(before)
        calls = [{"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]
        conversation = [{"role": "user", "content": WEATHER_QUESTION},
                        {"role": "assistant", "content": None, "tool_calls": calls},
                        {"role": "tool", "content": result, "tool_call_id": "x"}]
        assert request.prompt_ids == demo.engine.prompt_ids(conversation, WEATHER_TOOLS)
        assert demo.engine.loaded.tokenizer.convert_tokens_to_ids("<|observation|>") in request.prompt_ids
        wait_for(lambda: any(result.replace(" ", "") in t.replace(" ", "") for t in demo.messages("user")), 10,
                 "the tool result in the chat")
        time.sleep(1)  # let the page draw the last reply before the picture
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        demo.driver.save_screenshot(SCREENSHOT)
    finally:
        demo.close()


def test_cli_refuses_a_malformed_auth_in_one_line(capsys):
    from serving.web_demo import main
    from tuning.errors import run_main

    argv = ["--model", "tiny:glm-4-9b-chat", "--auth", "no-colon"]
    with pytest.raises(SystemExit) as exit_code:
        run_main(lambda: main(argv), argv)
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.strip() == "error: auth: expected user:password"


def test_auth_keeps_the_page_closed_until_login(tiny_demo):
    import urllib.error
    import urllib.parse
    import urllib.request

    from serving.web_demo import WebDemo, launch

    port = free_port()
    page = launch(WebDemo(tiny_demo.engine), port=port, auth=("demo", "s3cret"), block=False)
    base = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/config", timeout=10)
        assert refused.value.code == 401

        def login(password):
            form = urllib.parse.urlencode({"username": "demo", "password": password}).encode()
            return urllib.request.urlopen(urllib.request.Request(f"{base}/login", data=form), timeout=10)
        with pytest.raises(urllib.error.HTTPError):
            login("wrong")
        answer = login("s3cret")
        cookies = "; ".join(c.split(";", 1)[0] for c in answer.headers.get_all("Set-Cookie"))
        config = urllib.request.urlopen(urllib.request.Request(f"{base}/config", headers={"Cookie": cookies}),
                                        timeout=10)
        assert config.status == 200
    finally:
        page.close()


# ---- the server around the page: no browser needed (issue 29, items 8, 11, 15; issue 33, item 8) --------------
def http(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
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

    return http(port, "POST", "/login", urllib.parse.urlencode({"username": user, "password": password}).encode(),
                FORM)


def cookies_of(headers) -> str:
    return "; ".join(v.split(";", 1)[0] for k, v in headers if k == "set-cookie")


@pytest.fixture
def serve_page(tiny_demo):
    """serve_page(demo=None, **launch options) → the port of the page served in a thread (closed after the test)."""
    from serving.web_demo import WebDemo, launch

    servers = []

    def start(demo=None, **options):
        port = free_port()
        servers.append(launch(demo or WebDemo(tiny_demo.engine), port=port, block=False, **options))
        return port
    yield start
    for server in servers:
        server.close()


def test_the_page_answers_loopback_host_names_and_same_origin_requests_only(serve_page, tiny_demo):
    """Issue 29, item 8: a web page could drive the demo (a cross-origin POST to the Gradio API) and, through DNS
    rebinding (its own host name resolving to 127.0.0.1), read it."""
    port = serve_page(allowed_hosts=["demo.internal"], cors_origins=["http://localhost:3000"])
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "demo.internal"):
        assert http(port, "GET", "/", headers={"Host": host})[0] == 200, host
    status, _, body = http(port, "GET", "/", headers={"Host": f"rebound.attacker.example:{port}"})
    assert status == 400 and "--allowed_hosts" in body

    before = len(tiny_demo.engine.submitted)
    join = json.dumps({"data": ["你好", None, 8, 0, 0.8, "", ""], "fn_index": 0, "session_hash": "evil"}).encode()
    for origin in ("http://attacker.example", "null", f"http://127.0.0.1:{port + 1}"):
        for path, body, headers in (("/gradio_api/queue/join", join, {"Content-Type": "application/json"}),
                                    ("/gradio_api/queue/join", join, {"Content-Type": "text/plain"}),
                                    ("/login", b"username=demo&password=x", FORM)):
            status, _, text = http(port, "POST", path, body, {"Origin": origin, **headers})
            assert status == 403 and "cross_origin" in text, (origin, path, status, text)
    assert len(tiny_demo.engine.submitted) == before  # nothing reached the model

    status, headers, _ = http(port, "GET", "/config", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200  # the page's own requests
    status, headers, _ = http(port, "GET", "/config", headers={"Origin": "http://localhost:3000"})
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
            status, _, body = http(port, "GET", path)
            assert secret not in body and "SECRET-SYSTEM" not in body and folder_parent not in body, path
        assert "glm-4-9b-chat" in http(port, "GET", "/manifest.json")[2]
        for method, path in (("GET", "/config"), ("GET", "/gradio_api/info?all_endpoints=true"),
                             ("GET", "/gradio_api/queue/data?session_hash=x"), ("GET", "/gradio_api/heartbeat/x"),
                             ("POST", "/gradio_api/queue/join"), ("GET", f"/gradio_api/file={folder}/config.json")):
            assert http(port, method, path, b"{}", {"Content-Type": "application/json"})[0] in (401, 404), path

        status, headers, _ = login(port, "s3cret")
        cookie = {"Cookie": cookies_of(headers)}
        status, _, config = http(port, "GET", "/config", headers=cookie)
        assert status == 200 and "SECRET-SYSTEM-PROMPT-7f3a" in config  # behind the login, the box has it
        upload = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n'
                  b"Content-Type: text/plain\r\n\r\nhello\r\n--b--\r\n")
        status, _, body = http(port, "POST", "/gradio_api/upload", upload,
                               {**cookie, "Content-Type": "multipart/form-data; boundary=b"})
        assert status == 404 and tempfile.gettempdir() not in body and "gradio" not in body.lower()
    finally:
        engine.close(timeout=5)


def test_failed_logins_from_one_address_are_refused_for_a_while(serve_page):
    """Issue 29, item 15: Gradio's login answered every guess at once."""
    port = serve_page(auth=("demo", "s3cret"), login_limit={"max_failures": 3, "window": 60, "lockout": 2})
    assert "3 failed logins" in http(port, "GET", "/")[2]  # the login page says the rule
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
        scope = {"type": "http", "method": "POST", "path": "/login", "client": (f"10.0.{address // 256}.{address % 256}", 1)}
        asyncio.run(limit(scope, None, noop))
    assert len(limit._clients) == 50


def test_auth_on_the_command_line_says_to_use_the_environment_variable():
    from conftest import run_in_process

    from serving.web_demo import AUTH_ENV, build_parser, main

    assert AUTH_ENV in " ".join(build_parser().format_help().split())
    code, _, err = run_in_process(main, ["--auth", "demo:s3cret", "--port", "0"])
    assert code == 2 and f"set {AUTH_ENV} instead" in err and err.strip().endswith("expected a port from 1 to 65535")


def test_max_new_tokens_starts_from_the_device_and_tops_at_what_the_engine_holds(tiny_demo):
    """Issue 33, item 8: 512 new tokens by default made a CPU reply take ~80 s, and the slider went to 131,072
    whatever the memory could hold."""
    from model_hub.glm4.native import native_config_from_original
    from model_hub.make_tiny import _real_config
    from model_hub.registry import get_spec
    from serving.web_demo import WebDemo, default_max_tokens, kv_bytes_per_token, reply_token_limit

    import torch

    loaded = tiny_demo.engine.loaded
    page = WebDemo(tiny_demo.engine).build()
    slider = next(c["props"] for c in page.config["components"] if c["props"].get("elem_id") == "max_tokens")
    assert slider["value"] == default_max_tokens("cpu") == 256 and default_max_tokens("cuda:0") >= 512
    assert slider["maximum"] == reply_token_limit(loaded, tiny_demo.engine.max_batch) <= loaded.context_length

    per_token = kv_bytes_per_token(loaded.core.config, loaded.core.dtype)
    assert per_token == 2 * 2 * 2 * 16 * 4  # k and v × 2 layers × 2 key/value heads × 16 dims × fp32
    assert reply_token_limit(loaded, 8, free_bytes=2 * 8 * per_token * 1000) == 1000
    assert reply_token_limit(loaded, 8, free_bytes=1 << 50) == loaded.context_length == 131072
    glm4_9b = native_config_from_original(_real_config(get_spec("glm-4-9b-chat")))
    assert kv_bytes_per_token(glm4_9b, torch.bfloat16) == 2 * 40 * 2 * 128 * 2  # 40 KiB a token


def test_sigterm_lets_the_reply_in_flight_end_cleanly_and_exits_0():
    """Issue 33, item 8: SIGTERM killed the web demo (exit 143, `make: *** … Terminated`), the reply cut mid-stream."""
    import signal
    import sys

    from serving_support import Server

    class WebDemoProcess(Server):
        def __init__(self, *args: str):
            self.start(lambda port: [sys.executable, "-m", "serving.web_demo", "--port", str(port), *args],
                       "web-demo-test", {}, 180)

    server = WebDemoProcess("--model", "tiny:glm-4-9b-chat", "--drain_timeout", "3", "--max_batch", "2")
    try:
        config = json.loads(http(server.port, "GET", "/config")[2])
        send = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "send")
        fn_index = next(d["id"] for d in config["dependencies"] if [send, "click"] in d["targets"])
        join = {"data": ["写一篇很长的文章。", None, 100000, 0, 0.8, "", ""], "event_data": None,
                "fn_index": fn_index, "trigger_id": send, "session_hash": "sigterm"}
        status, _, body = http(server.port, "POST", "/gradio_api/queue/join", json.dumps(join).encode(),
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
