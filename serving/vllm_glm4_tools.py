"""vLLM tool-call parser for GLM-4-9b-chat, registered as `glm4_9b_chat` (vLLM has none for this format).

GLM-4-9b-chat calls a tool by answering, right after `<|assistant|>`, with the function name on the first line and
the JSON arguments below it, then stopping at `<|observation|>`; a normal answer starts with a newline. This parser
turns such an answer into OpenAI `tool_calls` exactly as `python -m serving.api` does (the same function:
`model_hub.glm4.prompts.parse_tool_call`): a known tool name and a JSON object, else the text is the answer.

Loaded inside vLLM's process (its own venv), by `--tool-parser-plugin serving/vllm_glm4_tools.py` or by the
project's vLLM plugin (serving/vllm_plugin.py); `python -m serving.vllm` passes both flags for GLM-4 folders.
Imports vLLM, so nothing else in the project imports this module.
"""
import json

from vllm.entrypoints.generate.base.protocol import (DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                                     ExtractedToolCallInformation, FunctionCall, ToolCall)
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager

from model_hub.glm4.prompts import parse_tool_call

NAME = "glm4_9b_chat"


def _tool_dicts(tools) -> list[dict]:
    return [{"type": "function", "function": {"name": tool.function.name}} for tool in tools or []
            if getattr(tool, "type", "function") == "function" and getattr(tool, "function", None) is not None]


@ToolParserManager.register_module(NAME)
class Glm4ChatToolParser(ToolParser):
    # A forced or required tool choice is answered in GLM-4's own format, not as vLLM's JSON: parse it as "auto".
    supports_required_and_named = False

    def __init__(self, tokenizer, tools=None):
        super().__init__(tokenizer, tools)
        self.sent_content = False

    def _call(self, text: str, request):
        return parse_tool_call(text, _tool_dicts(getattr(request, "tools", None) or self.tools))

    def extract_tool_calls(self, model_output: str, request) -> ExtractedToolCallInformation:
        call = self._call(model_output, request)
        if call is None:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output.strip())
        name, arguments = call
        return ExtractedToolCallInformation(
            tools_called=True, content=None,
            tool_calls=[ToolCall(id=make_tool_call_id(), function=FunctionCall(name=name, arguments=arguments))])

    def extract_tool_calls_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                     current_token_ids, delta_token_ids, request) -> DeltaMessage | None:
        if self.current_tool_id >= 0:  # the call was sent; what follows (nothing, normally) is not streamed
            return None
        first_line, newline, _ = current_text.partition("\n")
        known = {t["function"]["name"] for t in _tool_dicts(getattr(request, "tools", None) or self.tools)}
        could_be_a_call = not current_text.startswith("\n") and (
            (not newline and any(name.startswith(first_line.strip()) for name in known))
            or (newline and first_line.strip() in known))
        if not could_be_a_call:  # an answer: stream it (held-back text first, once it is clearly not a call)
            text = delta_text if self.sent_content else current_text
            self.sent_content = True
            return DeltaMessage(content=text) if text else None
        call = self._call(current_text, request)
        if call is None:
            return None  # a call in the making: hold it until its arguments parse
        name, arguments = call
        self.current_tool_id = 0
        self.prev_tool_call_arr = [{"name": name, "arguments": json.loads(arguments)}]
        self.streamed_args_for_tool = [arguments]
        return DeltaMessage(tool_calls=[DeltaToolCall(
            index=0, id=make_tool_call_id(), type="function",
            function=DeltaFunctionCall(name=name, arguments=arguments).model_dump(exclude_none=True))])
