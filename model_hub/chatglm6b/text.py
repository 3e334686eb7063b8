"""ChatGLM-6B text → ids with SentencePiece alone (no transformers, no torch).

The text layout (newlines, tabs and blank runs as pieces) is the one ChatGLMTokenizer uses
(model_hub/chatglm6b/tokenization.py calls `layout` and `prepare` from here). `ChatGLMTextEncoder` gives, for a whole
list of texts in one multi-threaded SentencePiece call, the ids `tokenizer(text, add_special_tokens=False)` gives
one text at a time; texts that contain a special-token string (which the transformers tokenizer splits out
first) are reported back so the caller can send them through the full tokenizer. This module imports neither
torch nor transformers (model_hub registers its classes only once transformers is imported), so the
tokenization fast path starts in a fraction of a second.
"""
import os
import re

from tuning.errors import UserError
from tuning.files import read_json

NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"
_BLANK_RUN = re.compile(r" {2,}")
VOCAB_FILE = "ice_text.model"
# tokenizer_config.json keys whose values ChatGLMTokenizer registers as special (split out of the text).
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


def _blank_pieces(match, max_blank_length: int) -> str:
    # Same result as replacing runs of max_blank_length, ..., 3, 2 spaces in turn: full-length pieces first,
    # then one piece for the remainder (a lone remaining space stays a space).
    full, rest = divmod(len(match.group(0)), max_blank_length)
    tail = f"<|blank_{rest}|>" if rest >= 2 else " " * rest
    return f"<|blank_{max_blank_length}|>" * full + tail


def layout(text: str, max_blank_length: int = 80, linebreak: bool = True, whitespaces: bool = True) -> str:
    """Newlines, tabs and blank runs become pieces, because the normaliser would collapse the whitespace."""
    if linebreak:
        text = text.replace("\n", NEWLINE_PIECE)
    if whitespaces:
        text = text.replace("\t", TAB_PIECE)
        if "  " in text:
            text = _BLANK_RUN.sub(lambda m: _blank_pieces(m, max_blank_length), text)
    return text


def prepare(text: str, *, remove_space: bool, do_lower_case: bool, max_blank_length: int) -> str:
    """The exact string ChatGLMTokenizer hands to SentencePiece for one piece of plain text."""
    if remove_space:
        text = " ".join(text.strip().split())
    if do_lower_case:
        text = text.lower()
    return layout(text, max_blank_length)


class ChatGLMTextEncoder:
    """SentencePiece on ice_text.model with the settings of the folder's tokenizer_config.json."""

    def __init__(self, folder: str):
        import sentencepiece as spm

        self.folder = folder
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise UserError("expected a JSON object", path=config_path)
        if config.get("tokenizer_class") != "ChatGLMTokenizer":
            raise UserError(f"tokenizer_class is {config.get('tokenizer_class')!r}, not ChatGLMTokenizer",
                            path=config_path)
        self.remove_space = bool(config.get("remove_space", False))
        self.do_lower_case = bool(config.get("do_lower_case", False))
        self.max_blank_length = int(config.get("max_blank_length", 80))
        self.num_image_tokens = int(config.get("num_image_tokens", 20000))
        self.sp_model = spm.SentencePieceProcessor(model_file=os.path.join(folder, VOCAB_FILE))
        defaults = {"bos_token": "<sop>", "eos_token": "<eop>", "unk_token": "<unk>", "pad_token": "<pad>",
                    "mask_token": "[MASK]"}
        tokens = {key: self._content(config.get(key, defaults[key])) for key in SPECIAL_KEYS}
        self.bos_id, self.eos_id = self.token_id(tokens["bos_token"]), self.token_id(tokens["eos_token"])
        self.gmask_id = self.token_id(self._content(config.get("gmask_token", "[gMASK]")))
        # Any string the transformers tokenizer may split out of the text (over-inclusive is safe: such texts
        # just take the exact, slow path).
        added = [self._content(t) for t in (config.get("added_tokens_decoder") or {}).values()]
        added += [self._content(t) for t in config.get("additional_special_tokens") or []]
        self.special_strings = sorted({t for t in list(tokens.values()) + added if t})

    @staticmethod
    def _content(token) -> str:
        return token.get("content", "") if isinstance(token, dict) else str(token or "")

    def token_id(self, piece: str) -> int:
        return self.sp_model.piece_to_id(piece) + self.num_image_tokens

    def has_special(self, text: str) -> bool:
        return any(s in text for s in self.special_strings)

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int] | None]:
        """Ids of each text (no special tokens added); None for a text that contains a special-token string."""
        # Every special string starts with "<" or "["; most texts contain neither, so the full check is rare.
        starts = {s[0] for s in self.special_strings}
        special = [any(c in text for c in starts) and self.has_special(text) for text in texts]
        plain = [i for i, text in enumerate(texts) if text and not special[i]]
        if self.remove_space or self.do_lower_case or self.max_blank_length != 80:
            prepared = [prepare(texts[i], remove_space=self.remove_space, do_lower_case=self.do_lower_case,
                                max_blank_length=self.max_blank_length) for i in plain]
        else:  # the default settings: layout() inlined, it runs for every text
            prepared = [texts[i].replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE) for i in plain]
            prepared = [layout(text) if "  " in text else text for text in prepared]
        encoded = self.sp_model.encode(prepared, num_threads=num_threads)
        if self.num_image_tokens:
            offset = self.num_image_tokens
            encoded = [[i + offset for i in ids] for ids in encoded]
        out: list[list[int] | None] = [None if flag else [] for flag in special]
        for i, ids in zip(plain, encoded):
            out[i] = ids
        return out


def build_prompt(query: str, history=None) -> str:
    """The query alone without history; otherwise "[Round i]\\n问：q\\n答：r\\n" per turn, then the open round."""
    if not history:
        return query
    turns = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return turns + f"[Round {len(history)}]\n问：{query}\n答："


_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
_CJK = r"[\u4e00-\u9fff]"


def process_response(response: str) -> str:
    """Strip, fill in the training date, and turn ASCII , ! : ; ? next to a CJK character into full-width marks
    (decoding returns ASCII punctuation because the tokenizer's NFKC normaliser folded it)."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for mark, full in _PUNCTUATION:
        mark = re.escape(mark)
        response = re.sub(f"({_CJK}){mark}", rf"\g<1>{full}", response)
        response = re.sub(f"{mark}({_CJK})", rf"{full}\g<1>", response)
    return response
