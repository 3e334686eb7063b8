"""Engine events → an OpenAI answer: plain content, or (GLM-4 with tools) a tool call.

GLM-4 writes a call as "NAME\\n{arguments}" right after <|assistant|>, a normal answer starts with "\\n". With
tools offered, content is held back until the first line tells which: a known tool name means a call, sent
whole as `tool_calls` at the end (finish_reason "tool_calls"); if it does not parse as one after all, the held
text goes out as content. A tool_choice naming a function starts the answer with "NAME\\n" (serving/api.py).
"""
import uuid

from .engine import Delta, Finished
from .prompts import parse_glm4_tool_call


class AnswerShaper:
    def __init__(self, tools: list[dict] | None, forced_tool: str | None = None):
        self.tools = tools
        self.forced = forced_tool
        self.known = {t["function"]["name"] for t in tools or []}
        self.mode = "content" if not tools else ("tool" if forced_tool else "undecided")
        self.held = ""

    def _full_raw(self, raw: str) -> str:
        return f"{self.forced}\n{raw}" if self.forced else raw

    def content_delta(self, event: Delta) -> str:
        """The content to send now for this delta (maybe "")."""
        if self.mode == "undecided":
            raw = event.raw_text
            if raw.startswith("\n"):
                self.mode = "content"
            elif "\n" in raw:
                self.mode = "tool" if raw.partition("\n")[0].strip() in self.known else "content"
        self.held += event.text
        if self.mode != "content":
            return ""
        out, self.held = self.held, ""
        return out

    def finish(self, event: Finished) -> tuple[str, list[dict] | None, str]:
        """(content still to send, tool calls or None, finish_reason)."""
        if self.tools and event.finish_reason in ("stop", "length"):
            call = parse_glm4_tool_call(self._full_raw(event.raw_text), self.tools)
            if call:
                name, arguments = call
                return "", [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                             "function": {"name": name, "arguments": arguments}}], "tool_calls"
        out, self.held = self.held, ""
        return out, None, event.finish_reason

    def message(self, event: Finished) -> tuple[dict, str]:
        """The whole non-streamed assistant message and its finish_reason."""
        _, calls, reason = self.finish(event)
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": calls}, reason
        return {"role": "assistant", "content": event.text}, reason
