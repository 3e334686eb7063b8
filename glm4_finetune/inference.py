"""Chat with a fine-tuned GLM-4 (THUDM/GLM-4 finetune_demo/inference.py).

\b
    python glm4_finetune/inference.py MODEL_DIR                  # one prompt (#裙子#夏天), sampled as the original
    python glm4_finetune/inference.py MODEL_DIR --interactive    # multi-turn chat with history and tool calls

MODEL_DIR is an adapter folder (LoRA or P-tuning v2; it has adapter_config.json, whose base_model_name_or_path
names the base model; --base-model overrides it) or a full model folder (SFT, or any native GLM-4).
In --interactive mode a reply that ends in <|observation|> is a tool call: it is shown, you type the tool's
result, and the model continues. `clear` forgets the history; an empty line, `exit` or `quit` ends.
"""
import os


from typing import Annotated

import typer

from tuning.errors import UserError, run_main
from tuning.files import read_json, refuse_pickled_code

OBSERVATION = 151338
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def load_for_inference(model_dir: str, base_model: str | None = None, dtype: str = "bf16",
                       quantization_bit: int | None = None):
    """(model, tokenizer) from an adapter folder (base + adapter) or a full model folder, as the original;
    `quantization_bit` 4/8 loads the (base) model's linear layers through bitsandbytes."""
    from model_hub.loader import load_model_and_tokenizer

    adapter_config = os.path.join(model_dir, "adapter_config.json")
    if not os.path.isfile(adapter_config):
        model, tokenizer = load_model_and_tokenizer(model_dir, dtype=dtype, quantization_bit=quantization_bit)
        return model.eval(), tokenizer
    from peft import PeftModelForCausalLM

    from model_hub.glm4.prefix_positions import number_text_from_zero

    from tuning.publish import read_adapter_folder

    config = read_adapter_folder(model_dir)  # whole (an interrupted save finished), weights there: no Hub lookup
    base = base_model
    if not base:
        from model_hub.loader import resolve_recorded_model_path

        base = config.get("base_model_name_or_path")
        if not base:
            raise UserError("base_model_name_or_path is empty; pass --base-model", path=adapter_config)
        resolve_recorded_model_path(base, f"base_model_name_or_path in {adapter_config}", "--base-model PATH")
    model, tokenizer = load_model_and_tokenizer(base, dtype=dtype, quantization_bit=quantization_bit)
    with refuse_pickled_code(model_dir):
        model = PeftModelForCausalLM.from_pretrained(model, model_dir)
    number_text_from_zero(model)  # P-tuning v2: the text positions it was trained with (no-op for LoRA)
    if os.path.isfile(os.path.join(model_dir, "tokenizer_config.json")):  # ours save it with the adapter
        from model_hub.loader import tokenizer_from_folder

        tokenizer = tokenizer_from_folder(model_dir)
    return model.eval(), tokenizer


def generate_reply(model, tokenizer, messages, **sampling) -> tuple[dict, bool, str]:
    """The next assistant message for `messages`, whether it is a tool call (ended with <|observation|>), and
    the decoded new tokens."""
    import torch

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_tensors="pt", return_dict=True).to(model.device)
    with torch.no_grad():
        outputs = model.generate(**inputs, eos_token_id=model.config.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
    new_ids = outputs[0][inputs["input_ids"].shape[1]:].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return reply_message(text), bool(new_ids) and new_ids[-1] == OBSERVATION, text


def reply_message(text: str) -> dict:
    """Generated text → history message. A normal answer starts with "\n" right after <|assistant|>; a tool
    call starts with the tool's name, which the chat template renders as metadata (`<|assistant|>NAME\n{args}`)."""
    if text.startswith("\n") or "\n" not in text:
        return {"role": "assistant", "content": text.strip()}
    name, _, content = text.partition("\n")
    return {"role": "assistant", "metadata": name.strip(), "content": content.strip()}


def chat(model, tokenizer, history: list[dict], sampling: dict, read=input) -> None:
    """Multi-turn loop on stdin/stdout; tool calls are shown and their results typed in as observations."""
    base = list(history)
    while True:
        try:
            text = read("\n用户 / user> ").strip()
        except EOFError:
            return
        if text.lower() in ("", "exit", "quit"):
            return
        if text.lower() == "clear":
            history[:] = list(base)
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        while True:
            message, tool_call, _ = generate_reply(model, tokenizer, history, **sampling)
            history.append(message)
            if not tool_call:
                print(f"GLM-4> {message['content']}")
                break
            print(f"[tool call] {message.get('metadata', '')} {message['content']}".replace("  ", " "))
            try:
                result = read("observation> ")
            except EOFError:
                return
            history.append({"role": "observation", "content": result})


def system_messages(system: str | None, tools_file: str | None) -> list[dict]:
    if tools_file:
        tools = read_json(tools_file)
        if not isinstance(tools, list) or not tools:
            raise UserError("expected a JSON list of tools ({\"type\": \"function\", \"function\": {...}})",
                            path=tools_file)
        from glm4_finetune.validate import _check_tools

        def fail(field, message):
            raise UserError(message, path=tools_file, field=field)

        _check_tools(tools, fail)
        return [{"role": "system", "content": system or "", "tools": tools}]
    return [{"role": "system", "content": system}] if system else []


@app.command(help=__doc__)
def main(
    model_dir: Annotated[str, typer.Argument(help="adapter folder or full model folder (or tiny:glm-4-9b-chat)")],
    interactive: Annotated[bool, typer.Option(help="multi-turn chat with history and tool calls")] = False,
    prompt: Annotated[str, typer.Option(help="the single-turn user message")] = "#裙子#夏天",
    system: Annotated[str | None, typer.Option(help="a system message")] = None,
    tools: Annotated[str | None, typer.Option(help="JSON file with a list of tools (function specs)")] = None,
    base_model: Annotated[str | None, typer.Option(help="base model for an adapter (default: from "
                                                        "adapter_config.json)")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 1024,
    do_sample: Annotated[bool, typer.Option()] = True,
    top_p: Annotated[float, typer.Option()] = 0.8,
    temperature: Annotated[float, typer.Option()] = 0.8,
    repetition_penalty: Annotated[float, typer.Option()] = 1.2,
    seed: Annotated[int | None, typer.Option(help="fix the sampling")] = None,
    dtype: Annotated[str, typer.Option(help="bf16 (the original), fp32 or auto")] = "bf16",
    quantization_bit: Annotated[int | None, typer.Option(
        "--quantization-bit", help="4 (nf4) or 8: the base through bitsandbytes, the adapter on top")] = None,
):
    if not model_dir.startswith("tiny:") and not os.path.isdir(model_dir):
        raise UserError("model folder not found", path=model_dir)
    history = system_messages(system, tools)
    model, tokenizer = load_for_inference(model_dir, base_model, dtype, quantization_bit)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    sampling = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, top_p=top_p, temperature=temperature,
                    repetition_penalty=repetition_penalty)
    if interactive:
        chat(model, tokenizer, history, sampling)
        return
    _, _, text = generate_reply(model, tokenizer, history + [{"role": "user", "content": prompt}], **sampling)
    print("=========")
    print(text.strip())


if __name__ == "__main__":
    run_main(app)
