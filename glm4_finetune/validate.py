"""Checks GLM-4 chat data before anything is loaded: every problem is one line `file:line: field: expected`.

The format (finetune_demo README): one `{"messages": [...]}` object per line; roles system, user, assistant,
observation; an optional system message only first and only once; `tools` (OpenAI-style function specs) only on
the system message; a tool call is an assistant message answered by an `observation`; at least one assistant turn.
"""
import json

from tuning.errors import UserError
from tuning.files import read_jsonl

from .data import ROLES

MESSAGE_KEYS = {"role", "content", "tools", "metadata"}
TOOL_TYPES = ("function", "python", "simple_browser", "cogview")  # the chat template knows these four


def _check_tools(tools, fail) -> set[str]:
    """The declared function names; `fail(field, message)` raises."""
    if not isinstance(tools, list) or not tools:
        fail("tools", "expected a non-empty list of tool objects")
    names = set()
    for i, tool in enumerate(tools):
        field = f"tools[{i}]"
        if not isinstance(tool, dict):
            fail(field, f"expected an object, got {type(tool).__name__}")
        if tool.get("type") not in TOOL_TYPES:
            fail(f"{field}.type", f"expected one of {', '.join(TOOL_TYPES)}, got {tool.get('type')!r}")
        if tool["type"] != "function":
            continue
        function = tool.get("function")
        if not isinstance(function, dict):
            fail(f"{field}.function", 'expected {"name", "description", "parameters"}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            fail(f"{field}.function.name", "expected a non-empty string")
        parameters = function.get("parameters")
        if not isinstance(parameters, dict) or not isinstance(parameters.get("properties"), dict):
            fail(f"{field}.function.parameters",
                 'expected {"type": "object", "properties": {...}, "required": [...]}')
        names.add(function["name"])
    return names


def parse_tool_call(content: str):
    """(name, arguments) of a tool call written as {"name", "arguments"} JSON or as NAME\\n{JSON}; else None."""
    try:
        call = json.loads(content)
    except (ValueError, RecursionError):
        call = None
    if isinstance(call, dict) and isinstance(call.get("name"), str):
        arguments = call.get("arguments", call.get("parameters"))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
        return (call["name"], arguments) if isinstance(arguments, dict) else None
    name, newline, rest = content.partition("\n")
    if newline and name.strip() and " " not in name.strip():
        try:
            arguments = json.loads(rest)
        except (ValueError, RecursionError):
            return None
        return (name.strip(), arguments) if isinstance(arguments, dict) else None
    return None


def check_conversation(record: dict, path: str, line: int) -> list[dict]:
    """The validated message list of one jsonl record."""
    def fail(field, message):
        raise UserError(message, path=path, line=line, field=field)

    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        fail("messages", "expected a non-empty list of {role, content} messages")
    function_names, has_tools = set(), False
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            fail(field, f"expected an object, got {type(message).__name__}")
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            fail(f"{field}.{unknown[0]}", "unknown key; expected role, content, tools (system only), metadata")
        role = message.get("role")
        if role not in ROLES:
            fail(f"{field}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i > 0:
            fail(f"{field}.role", "a system message may only come first, and only once")
        content = message.get("content")
        if not isinstance(content, str):
            fail(f"{field}.content", f"expected a string, got {type(content).__name__}")
        if message.get("metadata") is not None and not isinstance(message["metadata"], str):
            fail(f"{field}.metadata", "expected a string")
        if message.get("tools") is not None:
            if role != "system":
                fail(f"{field}.tools", "tools are only allowed on the system message (the first message)")
            function_names, has_tools = _check_tools(message["tools"], lambda f, m: fail(f"{field}.{f}", m)), True
        elif not content.strip():
            # the chat template drops a message with empty content entirely (no role token either)
            fail(f"{field}.content", "empty; the chat template would drop this message (only a system message "
                                     "with tools may have empty content)")
        if role == "observation":
            if i == 0 or messages[i - 1].get("role") != "assistant":
                fail(f"{field}.role", "an observation must answer an assistant tool call (the message before it)")
            if not has_tools:
                fail(f"{field}.role", "observation without tools: declare the tools on a first system message")
            call = parse_tool_call(messages[i - 1]["content"])
            if function_names and call is None:
                fail(f"messages[{i - 1}].content", 'expected a tool call: {"name": ..., "arguments": {...}} '
                                                    "or NAME\\n{JSON arguments}")
            if function_names and call[0] not in function_names:
                fail(f"messages[{i - 1}].content", f"calls {call[0]!r}; declared tools: {', '.join(sorted(function_names))}")
    if not any(m["role"] == "assistant" for m in messages):
        fail("messages", "no assistant message; every conversation needs at least one assistant turn")
    return messages


def read_conversations(path: str) -> list[list[dict]]:
    """All conversations of a messages-format jsonl file, each checked (see module docstring)."""
    if not path.endswith(".jsonl"):
        raise UserError("expected a .jsonl file (one {\"messages\": [...]} object per line)", path=path)
    return [check_conversation(record, path, line) for line, record in read_jsonl(path)]
