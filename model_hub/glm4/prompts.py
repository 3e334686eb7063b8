"""GLM-4's chat format around OpenAI-shaped messages (torch-free): what glm4_finetune trains on through the
tokenizer's chat template, what serving renders, how a tool call comes back.

- `glm4_messages`: OpenAI messages ({role: system|user|assistant|tool, content, tool_calls?}) → the template's
  (tools go into the system turn; an assistant tool call is `<|assistant|>NAME\\n{arguments}`, as GLM-4 writes it;
  a tool result is an `<|observation|>` turn), as THUDM's API server maps them.
- `parse_tool_call`: the generated text after `<|assistant|>` → (name, JSON arguments) when it is a call.
"""
import json


def _text(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def glm4_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI messages → the GLM-4 chat template's."""
    out = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                out.append({"role": "assistant", "metadata": call["function"]["name"],
                            "content": call["function"]["arguments"]})
        elif role == "tool":
            out.append({"role": "observation", "content": _text(message)})
        else:
            out.append({"role": role, "content": _text(message)})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "tools": tools}
        else:
            out.insert(0, {"role": "system", "content": "", "tools": tools})
    return out


def tool_names(tools: list[dict]) -> set[str]:
    return {t.get("function", {}).get("name") for t in tools if isinstance(t, dict) and t.get("type") == "function"}


def parse_tool_call(text: str, tools: list[dict]) -> tuple[str, str] | None:
    """(name, JSON arguments) when `text` is GLM-4's tool call ("NAME\\n{…}" with a known tool name and a JSON
    object), else None. A normal answer starts with "\\n" right after <|assistant|>."""
    if text.startswith("\n") or "\n" not in text:
        return None
    name, _, arguments = text.partition("\n")
    name = name.strip()
    if name not in tool_names(tools):
        return None
    try:
        parsed = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    return name, json.dumps(parsed, ensure_ascii=False)
