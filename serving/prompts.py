"""Chat messages → the prompt ids a model was trained on, and its answer text → what the user sees.

The knowledge is data in `model_hub.prompt_format` (one record per format: render, stop ids, clean-up, streaming
hold-back), shared with the recipes that train on it; this module is serving's view of it.
"""

from model_hub.glm4.prompts import glm4_messages, parse_tool_call as parse_glm4_tool_call  # noqa: F401
from tuning.errors import UserError
from model_hub.prompt_format import (PROMPT_FORMATS, chatglm6b_history, detect_prompt_format,  # noqa: F401
                                     get_prompt_format, last_user_text, stop_ids_of_family)

SINGLE_TURN = tuple(name for name, f in PROMPT_FORMATS.items() if not f.multi_turn)
FAMILY_OF_FORMAT = {name: f.family for name, f in PROMPT_FORMATS.items()}
# How many trailing characters of a partial answer may still change under postprocess, so streaming holds them back.
HOLD_BACK = {name: f.hold_back for name, f in PROMPT_FORMATS.items() if f.hold_back}


def build_prompt_ids(prompt_format: str, tokenizer, messages: list[dict], tools: list[dict] | None = None,
                     forced_tool: str | None = None) -> list[int]:
    """The prompt's ids; with `forced_tool` (tool_choice naming a function) the answer is opened as its call."""
    fmt = get_prompt_format(prompt_format)
    ids = fmt.prompt_ids(tokenizer, messages, tools)
    if forced_tool:
        if fmt.open_tool_call is None:
            raise UserError(f"the prompt format {fmt.name} has no tool calls", field="tool_choice")
        ids = ids + fmt.open_tool_call(tokenizer, forced_tool)
    return ids


def postprocess(prompt_format: str, text: str) -> str:
    """The answer as the recipe shows it (strip; ChatGLM-6B's punctuation fix; ChatGLM-Tuning's "\\nEND")."""
    return get_prompt_format(prompt_format).postprocess(text)
