"""GLM-4's chat format around OpenAI-shaped messages (torch-free): what glm4_finetune trains on through the
tokenizer's chat template, what serving renders, how a tool call comes back.

- `glm4_messages`: OpenAI messages ({role: system|user|assistant|tool, content, tool_calls?}) → the template's
  (tools go into the system turn; an assistant tool call is `<|assistant|>NAME\\n{arguments}`, as GLM-4 writes it;
  a tool result is an `<|observation|>` turn), as THUDM's API server maps them.
- `parse_tool_call`: the generated text after `<|assistant|>` → (name, JSON arguments) when it is a call.
"""
import json

# GLM-4's special token ids (its tokenizer's; the stop ids are in model_hub/registry.py): one home for the recipe,
# its inference CLI and serving.
GMASK, SOP = 151331, 151333
USER, ASSISTANT, OBSERVATION = 151336, 151337, 151338


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


def openai_chat_template(native: str) -> str:
    """GLM-4's own chat template (`native`, from its tokenizer_config.json) for OpenAI-shaped messages, as
    `glm4_messages` maps them: tools (the engine's `tools` variable) go into the first system turn (an empty one is
    opened when there is none), an assistant tool call becomes `<|assistant|>NAME` + its arguments (a JSON string
    as given, or an object as vLLM passes it, written as json.dumps does), a `tool` message an `<|observation|>`
    turn. Built by wrapping the native template's loop body, so the rendering of each turn stays GLM-4's own."""
    head, loop = "[gMASK]<sop>{% for item in messages %}", "{% endfor %}"
    if not native.startswith(head) or loop not in native:
        raise ValueError("not GLM-4-9b-chat's chat template (expected it to start with [gMASK]<sop> and a loop)")
    body = native[len(head):native.rindex(loop)]
    mapped = (
        "{%- set ns = namespace(items=[]) -%}"
        "{%- for m in messages -%}"
        "{%- set text = m['content'] if m['content'] is string else '' -%}"
        "{%- if m['role'] == 'assistant' and m['tool_calls'] -%}"
        "{%- for call in m['tool_calls'] -%}"
        "{%- set arguments = call['function']['arguments'] -%}"
        "{%- set ns.items = ns.items + [{'role': 'assistant', 'metadata': call['function']['name'], "
        "'content': arguments if arguments is string else arguments | tojson}] -%}"
        "{%- endfor -%}"
        "{%- elif m['role'] == 'tool' -%}"
        "{%- set ns.items = ns.items + [{'role': 'observation', 'metadata': '', 'content': text}] -%}"
        "{%- else -%}"
        "{%- set ns.items = ns.items + [{'role': m['role'], 'metadata': '', 'content': text}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if tools -%}"
        "{%- if ns.items and ns.items[0]['role'] == 'system' -%}"
        "{%- set ns.items = [dict(ns.items[0], tools=tools)] + ns.items[1:] -%}"
        "{%- else -%}"
        "{%- set ns.items = [{'role': 'system', 'metadata': '', 'content': '', 'tools': tools}] + ns.items -%}"
        "{%- endif -%}"
        "{%- endif -%}"
    )
    return mapped + head.replace("messages", "ns.items") + body + loop + native[native.rindex(loop) + len(loop):]
