"""Preference data → token ids, rendered by the prompt format the SFT recipe trained with.

Records (one JSON object per line of a .jsonl file, or a JSON list in a .json file):
    {"prompt": "…", "chosen": "…", "rejected": "…"}                       single-turn (every format)
    {"messages": [...], "chosen": ANSWER, "rejected": ANSWER}             a conversation that ends with the user's
                                                                          turn (or a tool's observation), GLM-4
    {"prompt" | "messages": …, "completion": ANSWER, "label": true|false}  KTO's unpaired form
`messages` are glm4_finetune's (system with `tools`, user, assistant with `metadata` for a tool call, observation);
ANSWER is a string or one assistant message ({"role": "assistant", "content": …, "metadata": TOOL_NAME}).
Single-turn formats (chatglm_tuning, llama_ner) use the last user message, as their serving does.

Ids are exactly SFT's: the prompt is `PromptFormat.prompt_ids` (what the server sends the model), an answer is
tokenized as its recipe tokenizes a trained answer — llama_ner: "<s>ANSWER</s>" without the "<s>" the prompt already
ends with; GLM-4: the assistant turn as glm4_finetune (`combine: false`) templates it, after its <|assistant|>,
plus the <|user|> the recipe appends (the model learns to stop); ChatGLM-Tuning: the answer + <eop>. The rows are
handed to TRL pre-tokenized (prompt_ids / chosen_ids / rejected_ids, or prompt_ids / completion_ids / label).
"""
import json
import os

from glm4_finetune.data import ASSISTANT, EOS_FOR_CHAT, process_message
from glm4_finetune.validate import check_conversation
from model_hub.prompt_format import get_prompt_format, stop_ids_of_family
from tuning.data_check import DataReport
from tuning.errors import UserError
from tuning.readers import read_json, read_jsonl

PAIRED = ("chosen", "rejected")
UNPAIRED = ("completion",)


def read_records(path: str) -> list[tuple[int | None, int, dict]]:
    """(line or None, record number from 1, object): .jsonl by line, .json as a list of objects."""
    if path.endswith(".jsonl"):
        return [(line, n, record) for n, (line, record) in enumerate(read_jsonl(path), start=1)]
    if not path.endswith(".json"):
        raise UserError("expected a .jsonl (one object per line) or .json (a list of objects) file", path=path)
    records = read_json(path)
    if not isinstance(records, list):
        raise UserError(f"expected a JSON list of objects, got {type(records).__name__}", path=path)
    for n, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise UserError(f"expected an object, got {type(record).__name__}", path=path, field=f"record {n}")
    return [(None, n, record) for n, record in enumerate(records, start=1)]


class Where:
    """Names the place of a bad value: file:line: field, or file: record N.field for a .json list."""

    def __init__(self, path: str, line: int | None, number: int):
        self.path, self.line, self.number = path, line, number

    def fail(self, field: str, message: str):
        field = field if self.line is not None else f"record {self.number}.{field}"
        raise UserError(message, path=self.path, line=self.line, field=field)


def answer_message(value, field: str, where: Where) -> dict:
    """An answer (string or one assistant message) as a GLM-4 assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # TRL's conversational form: [{"role": "assistant", ...}]
    if isinstance(value, str):
        value = {"role": "assistant", "content": value}
    if not isinstance(value, dict):
        where.fail(field, f"expected a string or an assistant message object, got {type(value).__name__}")
    if value.get("role") != "assistant":
        where.fail(f"{field}.role", f"expected 'assistant', got {value.get('role')!r}")
    if not isinstance(value.get("content"), str) or not value["content"].strip():
        where.fail(f"{field}.content", "expected non-empty text")
    if set(value) - {"role", "content", "metadata"}:
        where.fail(field, f"unknown key {sorted(set(value) - {'role', 'content', 'metadata'})[0]!r}; expected "
                          "role, content, metadata (a tool call's function name)")
    if value.get("metadata") is not None and not isinstance(value["metadata"], str):
        where.fail(f"{field}.metadata", "expected the called function's name (a string)")
    return {k: v for k, v in value.items() if v is not None}


def prompt_messages(record: dict, answer: dict, where: Where) -> list[dict]:
    """The conversation before the answer, validated as glm4_finetune validates its data (with the answer after)."""
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        where.fail("prompt", "expected exactly one of prompt (text) and messages (a conversation)")
    if has_prompt:
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            where.fail("prompt", "expected non-empty text")
        return [{"role": "user", "content": record["prompt"]}]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        where.fail("messages", "expected a non-empty list of {role, content} messages")
    try:
        check_conversation({"messages": [_as_checked(m) for m in (*messages, answer)]}, where.path,
                           where.line or where.number)
    except UserError as exc:
        where.fail(exc.field or "messages", exc.message)
    if messages[-1].get("role") not in ("user", "observation"):
        where.fail(f"messages[{len(messages) - 1}].role", "expected the conversation to end with a user (or "
                                                          "observation) turn: the answer follows it")
    return [process_message(m) for m in messages]


def _as_checked(message):
    """A call in GLM-4's metadata form (metadata = function, content = its JSON arguments) as the NAME\\n{JSON}
    form glm4_finetune's validator reads, so that an observation after it is checked against the declared tools."""
    if isinstance(message, dict) and isinstance(message.get("metadata"), str) and isinstance(message.get("content"),
                                                                                              str):
        return {**message, "content": f"{message['metadata']}\n{message['content']}"}
    return message


def openai_shape(messages: list[dict]) -> tuple[list[dict], list[dict] | None]:
    """glm4_finetune's messages → (OpenAI messages, tools), what PromptFormat.prompt_ids takes (the server's input)."""
    out, tools = [], None
    for message in messages:
        role, content = message["role"], message.get("content", "")
        if role == "system":
            tools = message.get("tools") or tools
            out.append({"role": "system", "content": content})
        elif role == "assistant" and message.get("metadata"):
            out.append({"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": message["metadata"], "arguments": content}}]})
        elif role == "observation":
            out.append({"role": "tool", "content": content})
        else:
            out.append({"role": role, "content": content})
    return out, tools


class AnswerEncoder:
    """Prompt and answer ids of one prompt format, as its SFT recipe tokenized them (module docstring)."""

    def __init__(self, prompt_format: str, tokenizer):
        self.format = get_prompt_format(prompt_format)
        self.tokenizer = tokenizer
        if self.format.name not in ("llama_ner", "alpaca", "glm4_chat", "chatglm_tuning", "chatglm6b_chat"):
            raise UserError(f"no answer tokenization for {self.format.name}", field="prompt_format")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.format.family == "glm4":
            openai_messages, tools = openai_shape(messages)
            return self.format.prompt_ids(self.tokenizer, openai_messages, tools)
        return self.format.prompt_ids(self.tokenizer, messages)

    def answer_ids(self, answer: dict) -> list[int]:
        tokenizer = self.tokenizer
        if self.format.family == "glm4":
            ids = tokenizer.apply_chat_template([answer], tokenize=True, return_dict=False)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)[2:]  # [gMASK]<sop> opened the prompt
            if ids[:1] != [ASSISTANT]:
                raise ValueError("GLM-4's template did not open the answer with <|assistant|>")
            return ids[1:] + [EOS_FOR_CHAT]
        if answer.get("metadata"):
            raise UserError(f"tool calls need a GLM-4 model; {self.format.name} has none", field="metadata")
        if self.format.family == "llama":
            text = f"{tokenizer.bos_token}{answer['content']}{tokenizer.eos_token}"
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return ids[1:]  # the "<s>" that opens the answer ends the prompt (prompt_format.llama_ner)
        return tokenizer.encode(answer["content"], add_special_tokens=False) + [stop_ids_of_family("chatglm6b")[0]]


def _paired_row(record, where, encoder) -> dict:
    chosen = answer_message(record.get("chosen"), "chosen", where) if "chosen" in record else None
    rejected = answer_message(record.get("rejected"), "rejected", where) if "rejected" in record else None
    if chosen is None or rejected is None:
        where.fail("chosen" if chosen is None else "rejected", "missing; expected the preferred (chosen) and the "
                                                                "dispreferred (rejected) answer")
    messages = prompt_messages(record, chosen, where)
    prompt_messages(record, rejected, where)  # the rejected answer must fit the conversation as well
    return {"prompt_ids": encoder.prompt_ids(messages), "chosen_ids": encoder.answer_ids(chosen),
            "rejected_ids": encoder.answer_ids(rejected), "_same": chosen == rejected}


def _unpaired_row(record, where, encoder) -> dict:
    completion = answer_message(record.get("completion"), "completion", where)
    if not isinstance(record.get("label"), bool):
        where.fail("label", f"expected true (desirable) or false (undesirable), got {record.get('label')!r}")
    messages = prompt_messages(record, completion, where)
    return {"prompt_ids": encoder.prompt_ids(messages), "completion_ids": encoder.answer_ids(completion),
            "label": record["label"]}


def tokenize_file(path: str, encoder: AnswerEncoder, max_length: int, unpaired: bool = False
                  ) -> tuple[list[dict], DataReport]:
    """Every record validated and tokenized (a bad one: a UserError naming file, line, field). Dropped, counted by
    reason: a prompt that fills max_length (nothing of the answer would be scored), chosen == rejected (no
    preference). Lengths: prompt + longest answer, before the max_length cut."""
    report = DataReport(path, max_length, "max_length")
    rows = []
    records = read_records(path)
    report.rows_read = len(records)
    for line, number, record in records:
        where = Where(path, line, number)
        kind = "unpaired" if "completion" in record or "label" in record else "paired"
        if unpaired != (kind == "unpaired"):
            where.fail("completion" if unpaired else "chosen", "expected {prompt|messages, completion, label} "
                       "(KTO)" if unpaired else "expected {prompt|messages, chosen, rejected} (paired preference)")
        row = (_unpaired_row if unpaired else _paired_row)(record, where, encoder)
        answers = [row["completion_ids"]] if unpaired else [row["chosen_ids"], row["rejected_ids"]]
        full = len(row["prompt_ids"]) + max(map(len, answers))
        if row.pop("_same", False):
            report.drop("chosen equals rejected")
        elif len(row["prompt_ids"]) >= max_length:
            report.drop("prompt fills max_length")
        else:
            report.keep(full, full > max_length)
            rows.append(row)
    if not rows:
        raise UserError("no usable record (see the drops above; raise --max_length?)", path=path)
    return rows, report


def data_file(path: str) -> str:
    if not os.path.isfile(path):
        raise UserError("file not found", path=path, field="train_path")
    return path


def dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)
