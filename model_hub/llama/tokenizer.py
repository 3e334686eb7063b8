"""LLaMA / Chinese-LLaMA / Chinese-Alpaca tokenizer with the ids of the original (transformers 4.28 slow
`LlamaTokenizer` on sentencepiece).

transformers 5's `LlamaTokenizer` is tokenizers-backed and differs from sentencepiece on runs of spaces, a leading
space and digits in the merged Chinese vocabularies. This class runs the real `tokenizer.model` through
sentencepiece and re-implements the 4.28 behaviour around it:
- special-token text inside a string ("<s>answer</s>") is split out first; every other chunk is encoded on its own,
  so it gets sentencepiece's dummy-prefix "▁" (the chunk after "<s>" starts with 29871 "▁" or a "▁word" piece);
- whitespace next to a special token is stripped as 4.28 did: per the token's lstrip/rstrip flags when it was
  declared as an AddedToken (llama-7b's files), on both sides when it was a plain string (the Chinese models'
  special_tokens_map.json, `add_special_tokens({"pad_token": "[PAD]"})`). Plain-string tokens are stored as
  AddedToken(lstrip=True, rstrip=True), which is the same rule and survives save_pretrained;
- decoding: special tokens are not passed to sentencepiece, a space is put before a special token that follows
  ordinary text, and tokens added beyond the vocabulary are joined with spaces (`spaces_between_special_tokens`).

Importing this module registers the class with AutoTokenizer, so after `import model_hub`,
`AutoTokenizer.from_pretrained(dir)` gives this class for every folder whose tokenizer_config.json names it (the three
vendored folders, the tokenizer `python -m serving.vllm` prepares). What `save_pretrained` writes (every LLaMA
folder the project makes) names transformers' own sentencepiece class instead (`portable_tokenizer_config`), so that
plain transformers and vLLM read it to the original ids without our code; the project's loaders
(`load_llama_tokenizer`, `model_hub.loader.tokenizer_from_folder`) still read it with this class.
"""
import json
import os

from transformers import AutoTokenizer, LlamaConfig
from transformers.tokenization_utils_base import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from .. import tokenizer_files

LLAMA_NAMES = ("llama-7b", "chinese-llama-7b", "chinese-alpaca-7b")


def _strip_both(content: str, special: bool = True) -> AddedToken:
    # transformers 4.28 stripped the whitespace on both sides of a no-split token that was a plain string.
    return AddedToken(content, lstrip=True, rstrip=True, normalized=not special, special=special)


def _special(value, default: str | None):
    if value is None:
        # The 4.28 class itself wrapped its default special tokens as non-stripping AddedTokens.
        return None if default is None else AddedToken(default, lstrip=False, rstrip=False, normalized=False,
                                                       special=True)
    return value if isinstance(value, AddedToken) else _strip_both(str(value))


class LlamaSentencePieceTokenizer(SentencePieceBackend):
    """Slow LLaMA tokenizer giving exactly the ids, tokens and decodes of transformers 4.28's LlamaTokenizer."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(self, vocab_file=None, unk_token=None, bos_token=None, eos_token=None, pad_token=None,
                 add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False, **kwargs):
        if kwargs.get("legacy") is False:
            raise ValueError("LlamaSentencePieceTokenizer only implements the original (legacy) behaviour")
        kwargs["legacy"] = True
        kwargs.pop("add_prefix_space", None)  # a transformers>=4.40 option the original does not have
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        super().__init__(
            vocab_file=vocab_file,
            unk_token=_special(unk_token, "<unk>"),
            bos_token=_special(bos_token, "<s>"),
            eos_token=_special(eos_token, "</s>"),
            pad_token=_special(pad_token, None),
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    # ---- adding tokens: keep each token's strip flags --------------------------------------------------------
    def _declared_specials(self) -> dict:
        tokens = [*self._special_tokens_map.values(), *self._extra_special_tokens]
        return {str(t): t for t in tokens if isinstance(t, AddedToken)}

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        declared = self._declared_specials()
        fresh = []
        for token in new_tokens:
            if isinstance(token, str):
                # transformers 5 passes special tokens here as strings: look up the declared AddedToken.
                token = declared.get(token) or _strip_both(token, special_tokens or token in declared)
            index = self._added_tokens_encoder.get(token.content)
            if index is not None:
                # Already known (e.g. re-declared as pad): only its flags change, never its id.
                if special_tokens and not token.special:
                    token = AddedToken(token.content, lstrip=token.lstrip, rstrip=token.rstrip,
                                       single_word=token.single_word, normalized=False, special=True)
                self._added_tokens_decoder[index] = token
                continue
            fresh.append(token)
        added = super()._add_tokens(fresh, special_tokens=special_tokens) if fresh else 0
        self._update_trie()
        return added

    def add_special_tokens(self, special_tokens_dict, replace_extra_special_tokens=True) -> int:
        converted = {}
        for key, value in dict(special_tokens_dict).items():
            if isinstance(value, (list, tuple)):
                converted[key] = [v if isinstance(v, AddedToken) else _strip_both(v) for v in value]
            elif isinstance(value, str):
                converted[key] = _strip_both(value)
            else:
                converted[key] = value
        return super().add_special_tokens(converted, replace_extra_special_tokens=replace_extra_special_tokens)

    # ---- encoding --------------------------------------------------------------------------------------------
    def tokenize(self, text: str, **kwargs) -> list[str]:
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        if split_special_tokens:
            return self._tokenize(text)
        chunks = self.tokens_trie.split(text)
        for i, chunk in enumerate(chunks):
            index = self._added_tokens_encoder.get(chunk)
            if index is None:
                continue
            token = self._added_tokens_decoder[index]
            if token.rstrip and i + 1 < len(chunks) and chunks[i + 1]:
                chunks[i + 1] = chunks[i + 1].lstrip()
            if token.lstrip and i > 0 and chunks[i - 1]:
                chunks[i - 1] = chunks[i - 1].rstrip()
        tokens = []
        for chunk in chunks:
            if not chunk:
                continue
            if chunk in self._added_tokens_encoder:
                tokens.append(chunk)
            else:
                tokens.extend(self._tokenize(chunk))
        return tokens

    def _tokenize(self, text, **kwargs):
        # Every chunk gets sentencepiece's dummy prefix "▁" (the legacy behaviour).
        return self.sp_model.encode(text, out_type=str)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output = output + bos + token_ids_1 + eos
        return output

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        extra = int(self.add_bos_token) + int(self.add_eos_token)
        output = [0] * (len(token_ids_0) + extra)
        if token_ids_1 is not None:
            output += [1] * (len(token_ids_1) + extra)
        return output

    # ---- decoding --------------------------------------------------------------------------------------------
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        specials = set(self.all_special_tokens)
        out, pending, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in specials:
                # 4.28 puts the space before the pending text, not between it and the special token.
                if not prev_special and i != 0:
                    out += " "
                out += self.sp_model.decode(pending) + token
                pending, prev_special = [], True
            else:
                pending.append(token)
                prev_special = False
        return out + self.sp_model.decode(pending)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None,
                spaces_between_special_tokens=True, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        beyond_vocab = {t.content for i, t in self._added_tokens_decoder.items() if i >= self.vocab_size}
        parts, pending = [], []
        for token in tokens:
            if token in beyond_vocab:
                if pending:
                    parts.append(self.convert_tokens_to_string(pending))
                    pending = []
                parts.append(token)
            else:
                pending.append(token)
        if pending:
            parts.append(self.convert_tokens_to_string(pending))
        text = (" " if spaces_between_special_tokens else "").join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ---- saving ----------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, legacy_format=None, filename_prefix=None, push_to_hub=False,
                        **kwargs):
        files = super().save_pretrained(save_directory, legacy_format=legacy_format,
                                        filename_prefix=filename_prefix, push_to_hub=push_to_hub, **kwargs)
        path = os.path.join(str(save_directory), (filename_prefix + "-" if filename_prefix else "")
                            + "tokenizer_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        portable_tokenizer_config(config, self.add_bos_token, self.add_eos_token, self.bos_token)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files


# What plain transformers 5 (and vLLM's transformers, without any code of ours) reads to the original ids: its generic
# sentencepiece class runs tokenizer.model itself. Its LlamaTokenizer would convert tokenizer.model to a BPE
# tokenizer.json whose merge order cannot follow sentencepiece's (~18k merged-vocabulary pieces share one score, and
# sentencepiece breaks the ties by position): digit and whitespace runs then read to other ids (measured).
PORTABLE_CLASS = "SentencePieceBackend"
SPECIAL_TOKENS_PATTERN = {(True, False): "bos", (True, True): "bos_eos", (False, True): "eos", (False, False): "none"}


def portable_tokenizer_config(config: dict, add_bos: bool, add_eos: bool, bos_token) -> dict:
    """Rewrite a saved tokenizer_config.json (in place) so that plain transformers reads the original ids.

    - the class is transformers' own sentencepiece backend; `special_tokens_pattern` adds "<s>" / "</s>" as
      add_bos_token / add_eos_token say (transformers 5 drops those two keys; the original keeps them, so they stay);
    - "<s>" keeps the whitespace before it: a chat template renders the prompt and "<s>" as one text ("…Response: <s>"),
      and training tokenized them apart (the prompt's trailing space is a "▁" before "<s>"). transformers 4.28 stripped
      it; no recipe and no golden string has text with whitespace before "<s>"."""
    config.update(tokenizer_class=PORTABLE_CLASS, add_bos_token=add_bos, add_eos_token=add_eos,
                  special_tokens_pattern=SPECIAL_TOKENS_PATTERN[(bool(add_bos), bool(add_eos))])
    for entry in config.get("added_tokens_decoder", {}).values():
        if entry.get("content") == str(bos_token):
            entry["lstrip"] = False
    return config


def names_llama_sentencepiece(config: dict) -> bool:
    """A tokenizer_config.json (beside a tokenizer.model) that our class reads with the original's behaviour: what
    `save_pretrained` writes, what an original LLaMA folder declares, and what older exports of the project wrote."""
    return config.get("tokenizer_class") in (PORTABLE_CLASS, "LlamaSentencePieceTokenizer", "LlamaTokenizer",
                                             "LlamaTokenizerFast")


def load_llama_tokenizer(name_or_dir: str, **kwargs) -> LlamaSentencePieceTokenizer:
    """The tokenizer of a vendored folder name ("llama-7b", "chinese-llama-7b", "chinese-alpaca-7b") or of any
    folder holding tokenizer.model (+ tokenizer_config.json / special_tokens_map.json)."""
    path = name_or_dir if os.path.isdir(name_or_dir) else tokenizer_files(name_or_dir)
    return LlamaSentencePieceTokenizer.from_pretrained(path, **kwargs)


# Registers the class by name for AutoTokenizer. LlamaConfig is a transformers config, so its own mapping is left
# unchanged (transformers skips remapping native configs); only the tokenizer_class lookup learns our class.
AutoTokenizer.register(LlamaConfig, tokenizer_class=LlamaSentencePieceTokenizer)
