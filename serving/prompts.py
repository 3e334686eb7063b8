"""Chat messages → the prompt ids a model was trained on, and its answer text → what the user sees.

Messages are OpenAI-shaped dicts ({role: system|user|assistant|tool, content, tool_calls?}). Each format reuses
its recipe's own prompt code:
- chatglm_tuning: chatglm_lora's `format_example` ("Instruction: …\\nAnswer: "), ids as infer.py; single turn.
- llama_ner: llama_ner's `build_source` + <s> opening the answer (chat_ner.py --with_prompt); single turn.
- alpaca: chat_ner.py's original Alpaca template (--original_prompt), BOS first; single turn.
- glm4_chat: GLM-4's chat template; tools go into the system turn, an assistant tool call is rendered as GLM-4
  writes it (`<|assistant|>NAME\\n{arguments}`), a tool result becomes an `<|observation|>` turn.
- chatglm6b_chat: ChatGLM-6B's `[Round N]\\n问：…\\n答：` history (model_hub.chatglm6b.build_prompt).
Single-turn formats use the last user message (that is all they were trained on).
"""
import json
import os

from model_hub.registry import MODELS
from tuning.errors import UserError
from tuning.files import read_json
from model_hub.prompt_format import PROMPT_FORMATS, read_prompt_format

SINGLE_TURN = ("chatglm_tuning", "llama_ner", "alpaca")
# A model folder without a record: an adapter was trained by the family's recipe, a full folder is a base model.
ADAPTER_DEFAULT = {"chatglm6b": "chatglm_tuning", "llama": "llama_ner", "glm4": "glm4_chat"}
BASE_DEFAULT = {"chatglm6b": "chatglm6b_chat", "llama": "alpaca", "glm4": "glm4_chat"}
FAMILY_OF_FORMAT = {"chatglm_tuning": "chatglm6b", "chatglm6b_chat": "chatglm6b", "llama_ner": "llama",
                    "alpaca": "llama", "glm4_chat": "glm4"}


def stop_ids_of_family(family: str) -> tuple[int, ...]:
    return next(spec.stop_ids for spec in MODELS.values() if spec.family == family)


def detect_prompt_format(family: str, model_dir: str | None, adapter_dir: str | None,
                         override: str | None = None) -> str:
    """The recorded format (adapter folder first, then the model folder), else the family's default."""
    if override:
        name = override
    else:
        name = None
        for folder in (adapter_dir, model_dir):
            if folder and os.path.isdir(folder):
                name = read_prompt_format(folder) or _older_record(folder)
                if name:
                    break
        name = name or (ADAPTER_DEFAULT if adapter_dir else BASE_DEFAULT)[family]
    if name not in PROMPT_FORMATS:
        raise UserError(f"unknown prompt format {name!r}; known: {', '.join(PROMPT_FORMATS)}", field="prompt_format")
    if FAMILY_OF_FORMAT[name] != family:
        raise UserError(f"prompt format {name} is for {FAMILY_OF_FORMAT[name]} models, this model is {family}",
                        field="prompt_format")
    return name


def _older_record(folder: str) -> str | None:
    # llama_ner adapters have always carried train_args.json beside them.
    return "llama_ner" if os.path.isfile(os.path.join(folder, "train_args.json")) else None


def _text(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return _text(message)
    raise UserError("this model's prompt needs a user message", field="messages")


def glm4_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI messages → the GLM-4 chat template's (as THUDM's API server maps them)."""
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


def chatglm6b_history(messages: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """(query, [(question, answer), …]): user/assistant pairs in order; the last user message is the query."""
    query = last_user_text(messages)
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    history, question = [], None
    for message in turns[:len(turns) - 1 - [m["role"] for m in turns][::-1].index("user")]:
        if message["role"] == "user":
            question = _text(message)
        elif question is not None:
            history.append((question, _text(message)))
            question = None
    return query, history


def build_prompt_ids(prompt_format: str, tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    if tools and prompt_format != "glm4_chat":
        raise UserError("tools need a GLM-4 model (its chat template has tool calls)", field="tools")
    if prompt_format == "glm4_chat":
        ids = tokenizer.apply_chat_template(glm4_messages(messages, tools), add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if prompt_format == "chatglm6b_chat":
        from model_hub.chatglm6b.generation import build_prompt

        return tokenizer(build_prompt(*chatglm6b_history(messages)))["input_ids"]
    text = last_user_text(messages)
    if prompt_format == "chatglm_tuning":
        from chatglm_lora.cover_alpaca2jsonl import format_example

        return tokenizer.encode(format_example({"instruction": text, "output": ""})["context"])
    if prompt_format == "llama_ner":
        from llama_ner.dataset import build_source

        return tokenizer(build_source(text, None), add_special_tokens=False)["input_ids"] + [tokenizer.bos_token_id]
    if prompt_format == "alpaca":
        from llama_ner.chat_ner import generate_prompt

        return tokenizer(generate_prompt(text))["input_ids"]
    raise ValueError(prompt_format)


def postprocess(prompt_format: str, text: str) -> str:
    """The answer as the recipe shows it (strip; ChatGLM-6B's punctuation fix; ChatGLM-Tuning's "\\nEND")."""
    if prompt_format == "chatglm6b_chat":
        from model_hub.chatglm6b.generation import process_response

        return process_response(text)
    if prompt_format == "chatglm_tuning":
        return text.replace("\nEND", "").strip()
    return text.strip()


# How many trailing characters of a partial answer may still change under postprocess (ChatGLM-6B turns ","
# before a CJK character into "，"; "\nEND" is removed whole), so streaming holds them back.
HOLD_BACK = {"chatglm6b_chat": 1, "chatglm_tuning": 4}


def parse_glm4_tool_call(text: str, tools: list[dict]) -> tuple[str, str] | None:
    """(name, JSON arguments) when `text` is GLM-4's tool call ("NAME\\n{…}" with a known tool name and a JSON
    object), else None. A normal answer starts with "\\n" right after <|assistant|>."""
    if text.startswith("\n") or "\n" not in text:
        return None
    name, _, arguments = text.partition("\n")
    name = name.strip()
    known = {t.get("function", {}).get("name") for t in tools if t.get("type") == "function"}
    if name not in known:
        return None
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    return name, json.dumps(parsed, ensure_ascii=False)


def read_base_of_adapter(adapter_dir: str) -> str:
    path = os.path.join(adapter_dir, "adapter_config.json")
    base = read_json(path).get("base_model_name_or_path")
    if not base:
        raise UserError("base_model_name_or_path is empty; pass --model", path=path)
    return base
