"""Which prompt a trained model expects, recorded beside its weights when a recipe trains.

Each recipe trains on its own prompt (ChatGLM-Tuning's "Instruction: …\\nAnswer: ", llama_ner's instruction
template with <s> opening the answer, GLM-4's chat template). A server or demo cannot guess which from the weights,
so training writes `prompt_format.json` ({"prompt_format": NAME, "recipe": RECIPE}) into the output folder;
serving/prompts.py reads it (and infers the format from the model family for folders trained before this file).
"""
import json
import os

from tuning.errors import UserError
from tuning.files import atomic_file, read_json

PROMPT_FORMAT_FILE = "prompt_format.json"
# name → what it is (serving/prompts.py implements each)
PROMPT_FORMATS = {
    "chatglm_tuning": "ChatGLM-Tuning: 'Instruction: …\\n[Input: …\\n]Answer: ' (chatglm_lora)",
    "llama_ner": "llama_ner's training template, <s> opens the answer (llama_ner)",
    "alpaca": "the Alpaca template of the original chat_ner.py (Chinese-Alpaca base models)",
    "glm4_chat": "GLM-4's chat template: system, tools, observation (glm4_finetune)",
    "chatglm6b_chat": "ChatGLM-6B's '[Round N]\\n问：…\\n答：' chat format (base ChatGLM-6B)",
}


def record_prompt_format(folder: str, prompt_format: str, recipe: str) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PROMPT_FORMAT_FILE)
    with atomic_file(path) as f:
        json.dump({"prompt_format": prompt_format, "recipe": recipe}, f, indent=2)
        f.write("\n")
    return path


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
