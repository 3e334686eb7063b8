"""Prompt formats as data: one record per way a recipe prompts its model, used by training, serving, export's chat
template and the vLLM hand-off alike (one definition: what is served is what was trained).

| name | family | turns | trained by |
|---|---|---|---|
| chatglm_tuning | chatglm6b | single | chatglm_lora: "Instruction: …\\n[Input: …\\n]Answer: " |
| chatglm6b_chat | chatglm6b | chat | base ChatGLM-6B: "[Round N]\\n问：…\\n答：" |
| llama_ner | llama | single | llama_ner: the NER template, "<s>" opens the answer |
| alpaca | llama | single | the original chat_ner.py's Alpaca template (Chinese-Alpaca base models) |
| glm4_chat | glm4 | chat + tools | glm4_finetune: GLM-4's chat template (system, tools, observation) |

Each record says how to render prompt ids from OpenAI-shaped messages (single-turn formats use the last user
message: that is all they were trained on), which ids stop generation (the family's, from the registry), how the
answer is cleaned up as the recipe shows it, and how many trailing characters streaming must hold back because that
clean-up may still change them. The text pieces live torch-free in `model_hub/<family>/prompts.py`.

Training writes `prompt_format.json` ({"prompt_format": NAME, "recipe": RECIPE}) into its output folder, because a
server cannot tell from the weights which prompt they learned; `detect_prompt_format` reads it back.
"""
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

from tuning.errors import UserError
from tuning.files import atomic_file, read_json

from .chatglm6b.prompts import clean_tuning_answer, tuning_prompt
from .chatglm6b.text import build_prompt as chatglm6b_prompt, process_response
from .glm4.prompts import glm4_messages, openai_chat_template
from .llama.prompts import ALPACA_CHAT_TEMPLATE, NER_CHAT_TEMPLATE, build_source, generate_prompt
from .registry import MODELS

PROMPT_FORMAT_FILE = "prompt_format.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _text(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return _text(message)
    raise UserError("this model's prompt needs a user message", field="messages")


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


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


_SLOT = re.compile("\ue000(\\d+)\ue001")  # private-use characters mark where a message's text goes


def _open_glm4_tool_call(tokenizer, name: str) -> list[int]:
    """GLM-4 writes a call as "NAME\\n{arguments}" right after <|assistant|>: the name and its newline are given."""
    return tokenizer.encode(name + "\n", add_special_tokens=False)


def _render_glm4(tokenizer, messages, tools):
    """GLM-4's chat template. Text a user typed or a tool returned stays text: "<|system|>" in it is the letters, not
    the special token (it would open a forged turn). Only when such a string is there is the prompt put together
    from the template's structure (specials) and each text encoded with specials split; otherwise it is the
    template's own encoding, as training."""
    turns = glm4_messages(messages, tools)
    specials = [t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t]
    if not any(special in (turn.get("content") or "") for turn in turns for special in specials):
        return _ids(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False))
    texts = [turn.get("content") or "" for turn in turns]
    marked = [{**turn, "content": f"\ue000{i}\ue001"} if texts[i] else turn for i, turn in enumerate(turns)]
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    ids, parts = [], _SLOT.split(rendered)
    for k, part in enumerate(parts):  # structure, text, structure, text, ...
        if k % 2:
            ids += tokenizer(texts[int(part)], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids


def _render_chatglm6b(tokenizer, messages, tools):
    return tokenizer(chatglm6b_prompt(*chatglm6b_history(messages)))["input_ids"]


def _render_chatglm_tuning(tokenizer, messages, tools):
    return tokenizer.encode(tuning_prompt(last_user_text(messages)))


def _render_llama_ner(tokenizer, messages, tools):
    source = tokenizer(build_source(last_user_text(messages), None), add_special_tokens=False)["input_ids"]
    return source + [tokenizer.bos_token_id]  # "<s>" opens every trained answer


def _render_alpaca(tokenizer, messages, tools):
    return tokenizer(generate_prompt(last_user_text(messages)))["input_ids"]


@dataclass(frozen=True)
class PromptFormat:
    name: str
    family: str                                  # a registry family
    description: str
    multi_turn: bool                             # False: only the last user message is rendered
    tools: bool                                  # the format has tool calls (tools in the prompt, calls parsed back)
    render: Callable[..., list[int]]             # (tokenizer, messages, tools) → prompt ids, generation prompt open
    postprocess: Callable[[str], str]            # the answer as the recipe shows it
    hold_back: int = 0                           # trailing characters postprocess may still change while streaming
    # (tokenizer) → the same prompt as a Jinja chat template over OpenAI messages (+ `tools`), for engines that
    # render it themselves (vLLM); None where no such engine serves the family (ChatGLM-6B).
    chat_template: Callable[[object], str] | None = None
    # (tokenizer, tool name) → the ids that open the answer as a call of that tool (tool_choice naming a function);
    # None where the format has no tool calls.
    open_tool_call: Callable[[object, str], list[int]] | None = None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return stop_ids_of_family(self.family)

    def prompt_ids(self, tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        if tools and not self.tools:
            raise UserError("tools need a GLM-4 model (its chat template has tool calls)", field="tools")
        return self.render(tokenizer, messages, tools)


PROMPT_FORMATS = {
    f.name: f
    for f in [
        PromptFormat("chatglm_tuning", "chatglm6b", "ChatGLM-Tuning: 'Instruction: …\\n[Input: …\\n]Answer: ' "
                     "(chatglm_lora)", False, False, _render_chatglm_tuning, clean_tuning_answer, hold_back=4),
        PromptFormat("llama_ner", "llama", "llama_ner's training template, <s> opens the answer (llama_ner)",
                     False, False, _render_llama_ner, str.strip, chat_template=lambda tokenizer: NER_CHAT_TEMPLATE),
        PromptFormat("alpaca", "llama", "the Alpaca template of the original chat_ner.py (Chinese-Alpaca base models)",
                     False, False, _render_alpaca, str.strip, chat_template=lambda tokenizer: ALPACA_CHAT_TEMPLATE),
        PromptFormat("glm4_chat", "glm4", "GLM-4's chat template: system, tools, observation (glm4_finetune)",
                     True, True, _render_glm4, str.strip,
                     chat_template=lambda tokenizer: openai_chat_template(tokenizer.chat_template),
                     open_tool_call=_open_glm4_tool_call),
        PromptFormat("chatglm6b_chat", "chatglm6b", "ChatGLM-6B's '[Round N]\\n问：…\\n答：' chat format (base "
                     "ChatGLM-6B)", True, False, _render_chatglm6b, process_response, hold_back=1),
    ]
}
# A model folder without a record: an adapter was trained by the family's recipe, a full folder is a base model.
ADAPTER_DEFAULT = {"chatglm6b": "chatglm_tuning", "llama": "llama_ner", "glm4": "glm4_chat"}
BASE_DEFAULT = {"chatglm6b": "chatglm6b_chat", "llama": "alpaca", "glm4": "glm4_chat"}


def stop_ids_of_family(family: str) -> tuple[int, ...]:
    return next(spec.stop_ids for spec in MODELS.values() if spec.family == family)


def get_prompt_format(name: str) -> PromptFormat:
    if name not in PROMPT_FORMATS:
        raise UserError(f"unknown prompt format {name!r}; known: {', '.join(PROMPT_FORMATS)}", field="prompt_format")
    return PROMPT_FORMATS[name]


def record_prompt_format(folder: str, prompt_format: str, recipe: str) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PROMPT_FORMAT_FILE)
    with atomic_file(path) as f:
        json.dump({"prompt_format": prompt_format, "recipe": recipe}, f, indent=2)
        f.write("\n")
    write_chat_template(folder, prompt_format)
    write_stop_ids(folder, prompt_format)
    return path


def write_stop_ids(folder: str, prompt_format: str) -> None:
    """The format's stop ids as generation_config.json where the folder has none (an adapter folder): an engine
    serving it (vLLM, plain transformers' generate) stops where training taught the model to. A model folder's own
    file (a full fine-tuning output, an export: both write the family's stops) is left as it is."""
    path = os.path.join(folder, "generation_config.json")
    if os.path.exists(path):
        return
    stops = list(PROMPT_FORMATS[prompt_format].stop_ids)
    with atomic_file(path) as f:
        json.dump({"eos_token_id": stops[0] if len(stops) == 1 else stops}, f, indent=2)
        f.write("\n")


def write_chat_template(folder: str, prompt_format: str) -> None:
    """The LLaMA prompts as chat_template.jinja beside the weights, so that engines rendering OpenAI messages
    (vLLM, plain transformers) build the trained prompt. GLM-4 folders keep GLM-4's own template (THUDM's messages
    use it; `python -m serving.vllm` adds the OpenAI mapping); ChatGLM-6B has no such engine."""
    record = PROMPT_FORMATS[prompt_format]
    if record.family != "llama":
        return
    with atomic_file(os.path.join(folder, CHAT_TEMPLATE_FILE)) as f:
        f.write(record.chat_template(None))


def read_prompt_format(folder: str) -> str | None:
    """The recorded format name, or None when the folder has no record (trained before it was written)."""
    path = os.path.join(folder, PROMPT_FORMAT_FILE)
    if not os.path.isfile(path):
        return None
    record = read_json(path)
    name = record.get("prompt_format") if isinstance(record, dict) else None
    if name not in PROMPT_FORMATS:
        raise UserError(f"expected one of {', '.join(PROMPT_FORMATS)}, got {name!r}", path=path,
                        field="prompt_format")
    return name


def _older_record(folder: str) -> str | None:
    # llama_ner adapters have always carried train_args.json beside them.
    return "llama_ner" if os.path.isfile(os.path.join(folder, "train_args.json")) else None


def detect_prompt_format(family: str, model_dir: str | None, adapter_dir: str | None,
                         override: str | None = None) -> str:
    """The recorded format (adapter folder first, then the model folder), else the family's default."""
    name = override
    if not name:
        for folder in (adapter_dir, model_dir):
            if folder and os.path.isdir(folder):
                name = read_prompt_format(folder) or _older_record(folder)
                if name:
                    break
        name = name or (ADAPTER_DEFAULT if adapter_dir else BASE_DEFAULT)[family]
    found = get_prompt_format(name)
    if found.family != family:
        raise UserError(f"prompt format {name} is for {found.family} models, this model is {family}",
                        field="prompt_format")
    return name
