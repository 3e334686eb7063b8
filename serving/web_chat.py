"""The web demo's conversation, apart from Gradio: the history (OpenAI-shaped messages), what the page shows
for it, and one streamed reply from the engine.

The history holds what the model saw and said: user turns, assistant answers, GLM-4 tool calls
(`{"role": "assistant", "tool_calls": [...]}`) and the tool results the user pasted (`{"role": "tool"}`, an
`<|observation|>` turn). The page shows it through `display`: text exactly as written (Markdown and HTML
characters escaped, as the ChatGLM-6B demo's parse_text did, so a model's `*`, `_` or `<` show as themselves), a
tool call as its own message titled with the function name over its arguments as pretty JSON.
"""
import html
import json
import queue
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuning.errors import UserError

if TYPE_CHECKING:  # annotations only: sampling loads torch when a reply is made
    from .sampling import SamplingParams

TOOL_CALL_TITLE = "调用工具 / Tool call: {name}"
TOOL_RESULT_TITLE = "工具结果 / Tool result:"
ERROR_TITLE = "出错 / Error"
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|~=$>])")


def escape(text: str) -> str:
    """Text → Markdown that renders as exactly this text (HTML entities for & < >, a backslash before the rest)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)


@dataclass(frozen=True)
class Settings:
    """What the page's sliders and boxes say for one reply (as start values: max_tokens None = from the device)."""
    max_tokens: int | None = None
    temperature: float = 0.6
    top_p: float = 0.8
    system: str = ""
    tools_json: str = ""

    def params(self) -> "SamplingParams":
        # the engine's modules load torch and transformers: imported here, so the web demo's --help answers at once
        from .sampling import SamplingParams

        return SamplingParams(max_tokens=int(self.max_tokens), temperature=float(self.temperature),
                              top_p=float(self.top_p))


def parse_tools(text: str) -> list[dict] | None:
    """The tools box → OpenAI tools ([{type: function, function: {name, description, parameters}}]); bare
    function objects ({name, …}, as GLM-4's own demos list them) are accepted too. Empty: no tools."""
    if not text.strip():
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                        field="tools") from None
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list):
        raise UserError("expected a JSON list of tools", field="tools")
    tools = []
    for index, tool in enumerate(parsed):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise UserError(f"tool {index + 1} has no function name (expected {{\"type\": \"function\", "
                            "\"function\": {\"name\": …, \"parameters\": {…}}})", field="tools")
        tools.append({"type": "function", "function": function})
    return tools


def display(history: list[dict]) -> list[dict]:
    """The history as Gradio chatbot messages."""
    shown = []
    for message in history:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                arguments = json.dumps(json.loads(call["function"]["arguments"]), ensure_ascii=False, indent=2)
                # The fence is longer than any run of backticks inside, so the arguments cannot close it; the
                # title is escaped like every other text (a tool named "<img src=…>" is shown, not loaded).
                fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", arguments)), default=0))
                shown.append({"role": "assistant", "content": f"{fence}json\n{arguments}\n{fence}",
                              "metadata": {"title": TOOL_CALL_TITLE.format(name=html.escape(call["function"]["name"]))}})
        elif role == "tool":
            shown.append({"role": "user", "content": f"{TOOL_RESULT_TITLE}\n\n{escape(message['content'])}"})
        else:
            shown.append({"role": role, "content": escape(message.get("content") or "")})
    return shown


def error_message(text: str) -> dict:
    return {"role": "assistant", "content": escape(text), "metadata": {"title": ERROR_TITLE}}


def retry_point(history: list[dict]) -> list[dict]:
    """The history without the model's last reply (answer or tool calls), for regenerate."""
    end = len(history)
    while end and history[end - 1]["role"] == "assistant":
        end -= 1
    return history[:end]


def last_tool_call_id(history: list[dict]) -> str:
    if history and history[-1]["role"] == "assistant" and history[-1].get("tool_calls"):
        return history[-1]["tool_calls"][-1]["id"]
    raise UserError("the model has not called a tool: there is no call to answer", field="tool result")


def stream_reply(engine, history: list[dict], settings: Settings, on_request=lambda request: None):
    """Yield (history, shown messages) while the model answers the last turn of `history`; the last yield holds
    the history with the answer (a stopped answer keeps what was written; an error leaves the history as it
    was and shows the error in the chat)."""
    from .chat import AnswerShaper
    from .engine import Delta, EngineBusy, EngineClosed

    shown_before = display(history)
    try:
        tools = parse_tools(settings.tools_json)
        system = [{"role": "system", "content": settings.system}] if settings.system.strip() else []
        prompt_ids = engine.prompt_ids(system + history, tools)
        events: queue.Queue = queue.Queue()
        request = engine.submit(prompt_ids, settings.params(), events.put)
    except (UserError, ValueError, EngineBusy, EngineClosed) as exc:
        yield history, shown_before + [error_message(str(exc))]
        return
    on_request(request)
    shaper, text = AnswerShaper(tools), ""
    try:
        while True:
            event = events.get()
            if isinstance(event, Delta):
                text += shaper.content_delta(event)
                yield history, shown_before + [{"role": "assistant", "content": escape(text)}]
                continue
            rest, calls, reason = shaper.finish(event)
            if reason == "error":
                yield history, shown_before + [error_message(f"generation failed: {event.error}")]
                return
            answer = {"role": "assistant", "content": None, "tool_calls": calls} if calls else \
                {"role": "assistant", "content": text + rest}
            history = history + [answer]
            yield history, display(history)
            return
    finally:
        request.cancel()  # the page went away mid-answer: free the engine's slot
