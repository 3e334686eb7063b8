"""Generated ids → text deltas that never split a character and never show text that later changes.

The answer is decoded incrementally: only the ids since the last complete character are decoded again (with one
id before them, so a tokenizer that drops the leading space of a sequence drops it on both sides of the difference;
byte-fallback pieces of one character decode to U+FFFD until the character is complete), so a long answer costs
linear, not quadratic, decoding. It is post-processed as the recipe does (serving/prompts.postprocess), and only
its stable part is released: no trailing U+FFFD, no trailing whitespace (strip() may drop it), not the last characters a
post-processing rule may still rewrite, and not a tail that could be the start of a stop string. So the
concatenated deltas equal the final text of a non-streamed answer.
"""
from .prompts import HOLD_BACK, postprocess

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, prompt_format: str, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.raw = ""        # decoded answer before post-processing (tool-call parsing needs it)
        self.text = ""       # post-processed answer, cut at a stop string
        self.sent = ""       # what has been released so far
        self.stopped = False
        self._done = ""      # raw text of ids[:self._read], each character complete
        self._prefix = 0     # decoding window: ids[_prefix:_read] decode to the tail of _done
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the newly releasable text (maybe ""). Sets `stopped` at a stop string."""
        self.ids.append(token_id)
        self.raw = self._decode_new()
        text = postprocess(self.prompt_format, self.raw)
        cut = self._stop_index(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._release(len(self.text))
        self.text = text
        return self._release(self._stable_end(text))

    def _decode_new(self) -> str:
        """The raw text of all ids, decoding only the window since the last complete character."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        window = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if not window.startswith(before):  # a tokenizer whose decode is not local: decode it all (correct, slower)
            return decode(self.ids, skip_special_tokens=True)
        new = window[len(before):]
        if new.endswith(REPLACEMENT):  # a character still incomplete: shown as decode shows it, window kept open
            return self._done + new
        self._done += new
        self._prefix, self._read = self._read, len(self.ids)
        return self._done

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        return self._release(len(self.text))

    def _stop_index(self, text: str) -> int | None:
        hits = [text.find(s, max(0, len(self.sent) - len(s))) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _stable_end(self, text: str) -> int:
        end = len(text.rstrip().rstrip(REPLACEMENT)) - HOLD_BACK.get(self.prompt_format, 0)
        for s in self.stop:  # a tail that may grow into a stop string waits
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k:end] == s[:k]:
                    end -= k
                    break
        return end

    def _release(self, end: int) -> str:
        if not self.text.startswith(self.sent):  # post-processing rewrote released text (should not happen)
            return ""
        if end <= len(self.sent):
            return ""
        delta = self.text[len(self.sent):end]
        self.sent += delta
        return delta
