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
                if engine.seconds_per_token:  # a slow model (a 9B one on a CPU): each event reaches the page late
                    deliver = on_event

                    def on_event(event):
                        time.sleep(engine.seconds_per_token)
                        deliver(event)
                request = super().submit(prompt_ids, params, on_event)
                engine.submitted.append(request)
                return request

        self.engine = RecordingEngine(load_for_serving(model, served_name=name))
        self.engine.submitted, self.engine.seconds_per_token = [], 0.0
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
LONG_REPLY = 2_000


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
    # The tiny model at a 9B model's pace on a CPU (50 tokens a second): 2,000 tokens take 40 s, so a loaded CI
    # machine delivers the click long before the end (unthrottled, the tiny model wrote 2,000 tokens before it, and
    # 50,000 flooded the page with updates until the click itself timed out); a stop that does not work still fails
    # within `answered`'s 10 s.
    demo.engine.seconds_per_token = 0.02
    try:
        demo.set_number("max_tokens", LONG_REPLY)
        before = len(demo.engine.submitted)
        demo.type("message", "写一篇很长的文章。")
        demo.click("send")
        wait_for(lambda: len(demo.engine.submitted) > before and len(demo.engine.submitted[before].output_ids) > 4,
                 30, "the reply to start")
        demo.click("stop")
        request = demo.answered(before, seconds=10)
    finally:  # (read at every token: a reply the stop missed then ends at full speed, not in the next tests)
        demo.engine.seconds_per_token = 0.0
    assert request.cancelled.is_set() and len(request.output_ids) < LONG_REPLY
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

