"""The chat-completions request, checked field by field into one clear message per mistake (OpenAI's ranges), and
the response / stream-chunk shapes the official `openai` client reads.

Fields of OpenAI's API that change nothing here (user, logprobs=false, stream_options, ...) are accepted;
penalties other than 0 and n > 1 are refused rather than silently ignored.
"""
import time
from dataclasses import dataclass

from .sampling import SamplingParams

ROLES = ("system", "user", "assistant", "tool")
MAX_STOP = 4
MAX_STOP_CHARS = 256  # each is scanned against the answer's tail at every token


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                503: "service_unavailable"}.get(self.status, "server_error" if self.status >= 500 else
                                                "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    params: SamplingParams
    stream: bool
    include_usage: bool
    tools: list[dict] | None
    forced_tool: str | None       # tool_choice naming a function


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, low: float, high: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value):
        raise bad(key, f"expected a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise bad(key, f"must be between {low:g} and {high:g}, got {value}")
    return float(value)


def _unicode(text: str, where: str) -> str:
    """JSON's \\ud800 escapes give Python strings no tokenizer can encode (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(where, f"not valid Unicode: a lone surrogate (\\u{ord(text[exc.start]):04x}) at character "
                         f"{exc.start}") from None
    return text


MAX_DEPTH = 32  # a tool's JSON Schema nested deeper than this is refused (it is rendered into the prompt)


def _depth(value, limit: int) -> int:
    """How deeply `value` nests lists and objects (counting stops past `limit`)."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _content(message: dict, where: str, required: bool) -> str | None:
    content = message.get("content")
    if content is None:
        if required:
            raise bad(f"{where}.content", "is required")
        return None
    if isinstance(content, str):
        return _unicode(content, f"{where}.content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}]
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are served")
            texts.append(_unicode(part["text"], f"{where}.content[{j}]"))
        return "".join(texts)
    raise bad(f"{where}.content", f"expected a string or a list of text parts, got {type(content).__name__}")


def _tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise bad(where, "expected a non-empty list of tool calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise bad(f"{where}[{j}].function", "expected {\"name\": string, \"arguments\": JSON string}")
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def _messages(value) -> list[dict]:
    if not isinstance(value, list):
        raise bad("messages", f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise bad("messages", "must not be empty")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"expected an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        clean = {"role": role}
        if role == "assistant" and message.get("tool_calls") is not None:
            clean["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
            clean["content"] = _content(message, where, required=False)
        else:
            clean["content"] = _content(message, where, required=True)
        out.append(clean)
    if not any(m["role"] == "user" for m in out):
        raise bad("messages", "needs at least one user message")
    return out


def _tools(value) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad("tools", f"expected a list, got {type(value).__name__}")
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}]", "expected {\"type\": \"function\", \"function\": {\"name\": ..., ...}}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", "expected a JSON Schema object")
        if _depth(tool, MAX_DEPTH) > MAX_DEPTH:
            raise bad(f"tools[{i}]", f"nested more than {MAX_DEPTH} levels deep")
    return value or None


def _tool_choice(value, tools) -> tuple[bool, str | None]:
    """(tools offered to the model, the function it must call)."""
    if value is None or value == "auto":
        return bool(tools), None
    if value == "none":
        return False, None
    if value == "required":
        raise bad("tool_choice", "\"required\" is not supported; use \"auto\" or name a function")
    name = value.get("function", {}).get("name") if isinstance(value, dict) and \
        isinstance(value.get("function"), dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise bad("tool_choice", "expected \"none\", \"auto\" or {\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in {t["function"]["name"] for t in tools or []}:
        raise bad("tool_choice", f"names {name!r}, which is not in tools")
    return True, name


def parse_chat_request(body, default_max_tokens: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "expected the model name (a string); GET /v1/models lists it")
    messages = _messages(body.get("messages"))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", f"expected true or false, got {type(stream).__name__}")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "expected an object")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_key)
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens):
        raise bad(max_key, f"expected an integer, got {type(max_tokens).__name__}")
    elif max_tokens <= 0:
        raise bad(max_key, f"must be at least 1, got {max_tokens}")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n < 1):
        raise bad("n", f"expected a positive integer, got {n!r}")
    if n is not None and n > 1:
        raise bad("n", f"only n=1 is served, got {n}")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, -2, 2, 0.0) != 0:
            raise bad(key, "only 0 is served")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop", "expected a string or a list of strings")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad("stop", f"a stop string is at most {MAX_STOP_CHARS} characters, got {max(map(len, stop))}")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad("seed", f"expected an integer, got {type(seed).__name__}")
    if seed is not None and not -2**63 <= seed < 2**64:  # what a torch generator takes
        raise bad("seed", f"must be a 64-bit integer, got {seed}")
    tools = _tools(body.get("tools"))
    use_tools, forced = _tool_choice(body.get("tool_choice"), tools)
    params = SamplingParams(max_tokens=max_tokens, temperature=_number(body, "temperature", 0, 2, 1.0),
                            top_p=_number(body, "top_p", 0, 1, 1.0), seed=seed, stop=tuple(stop))
    return ChatRequest(model, messages, params, stream, bool((options or {}).get("include_usage")),
                       tools if use_tools else None, forced)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, message: dict, finish_reason: str, use: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": use}


def chunk(request_id: str, model: str, delta: dict | None, finish_reason: str | None = None,
          use: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}]
    out = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
