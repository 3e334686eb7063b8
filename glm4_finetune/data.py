"""GLM-4 conversations → token ids, labels and evaluation pairs (THUDM/GLM-4 finetune_demo's data code).

`process_batch` / `process_batch_eval` keep the original signatures and give the original ids wherever the
original is right (tests/golden/glm4). Where it was broken they do the right thing instead (README,
"Deviations"): None-valued keys (as `datasets` fills them in) are dropped before templating, combine-mode
evaluation no longer feeds the gold answer to the model, an evaluation conversation that reaches
max_input_length before any answer gives no example instead of an UnboundLocalError, and a conversation without
an assistant message is refused with a clear message.
"""
import copy

from model_hub.glm4.prompts import ASSISTANT, GMASK, SOP, USER  # noqa: F401  (GLM-4's special ids, one home)

EOS_FOR_CHAT = USER  # the original appends <|user|> after every training row: the model learns to stop there

ROLES = ("system", "user", "assistant", "observation")


def _template(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _clean(message: dict) -> dict:
    """Drop None-valued keys (datasets fills every key seen in a file with None; the template then crashed)."""
    return {k: v for k, v in message.items() if v is not None}


def process_message(message: dict) -> dict:
    """The original's per-message fix-up: tools only on the system message, None tool properties removed."""
    message = copy.deepcopy(_clean(message))
    if "tools" in message and message["role"] == "system":
        for tool in message["tools"]:
            parameters = tool.get("function", {}).get("parameters", {})
            properties = parameters.get("properties")
            if isinstance(properties, dict):
                parameters["properties"] = {k: v for k, v in properties.items() if v is not None}
    elif "tools" in message:
        del message["tools"]
    return message


def _last_assistant(ids: list[int]) -> int:
    if ASSISTANT not in ids:
        raise ValueError("conversation has no assistant message: nothing to train on or evaluate "
                         "(every conversation needs at least one assistant turn)")
    return len(ids) - 1 - ids[::-1].index(ASSISTANT)


def process_batch(batch: dict, tokenizer, max_input_length: int, max_output_length: int,
                  combine: bool, train_first_answer_token: bool = True) -> dict:
    """Training rows: input_ids and labels (-100 = not trained), cut to max_input + max_output + 1 tokens.

    Token i is a label iff token i-1 belongs to a trained message. combine=True trains only the LAST assistant
    turn of a conversation (templated as a whole); combine=False templates message by message and trains every
    assistant turn, including the role token that follows it (the model learns where to stop).
    train_first_answer_token=False gives the original's combine labels, which never trained the token right after
    the last <|assistant|> — the "\n" of a reply, and the first token of a tool call's function name (Deviations).
    """
    out = {"input_ids": [], "labels": []}
    for conversation in batch["messages"]:
        messages = [process_message(m) for m in conversation]
        if combine:
            input_ids = _template(tokenizer, messages)
            start = _last_assistant(input_ids) + (0 if train_first_answer_token else 1)
            loss_masks = [i >= start for i in range(len(input_ids))]
        else:
            if not any(m["role"] == "assistant" for m in messages):
                _last_assistant([])
            input_ids, loss_masks = [GMASK, SOP], [False, False]
            for message in messages:
                new_ids = _template(tokenizer, [message])[2:]  # drop [gMASK]<sop>
                input_ids += new_ids
                loss_masks += [message["role"] == "assistant"] * len(new_ids)
        input_ids.append(EOS_FOR_CHAT)
        loss_masks = [False, *loss_masks]  # shift: a token is trained when the one before it is
        labels = [token if mask else -100 for token, mask in zip(input_ids, loss_masks)]
        max_length = max_input_length + max_output_length + 1
        out["input_ids"].append(input_ids[:max_length])
        out["labels"].append(labels[:max_length])
    return out


def process_batch_eval(batch: dict, tokenizer, max_input_length: int, max_output_length: int,
                       combine: bool) -> dict:
    """Evaluation pairs: input_ids = context + <|assistant|>, output_ids = "\\n" + answer + <|user|>.

    combine=False gives one pair per assistant turn, stopping once the history reaches max_input_length.
    combine=True gives one pair for the last assistant turn (the original put the whole conversation, answer
    included, into input_ids; fixed here so the model has to produce the answer itself).
    """
    out = {"input_ids": [], "output_ids": []}
    for conversation in batch["messages"]:
        messages = [process_message(m) for m in conversation]
        if combine:
            ids = _template(tokenizer, messages)
            a = _last_assistant(ids)
            out["input_ids"].append(ids[:a][:max_input_length] + [ASSISTANT])
            out["output_ids"].append((ids[a + 1:] + [EOS_FOR_CHAT])[:max_output_length])
            continue
        if not any(m["role"] == "assistant" for m in messages):
            _last_assistant([])
        input_ids = [GMASK, SOP]
        for message in messages:
            if len(input_ids) >= max_input_length:
                break  # later turns would only see a cut history (the original stops here too)
            new_ids = _template(tokenizer, [message])[2:]
            if message["role"] == "assistant":
                out["input_ids"].append(input_ids[:max_input_length] + new_ids[:1])
                out["output_ids"].append((new_ids[1:] + [EOS_FOR_CHAT])[:max_output_length])
            input_ids += new_ids
    return out
