"""ChatGLM-6B tokenizer: SentencePiece on `ice_text.model` (no icetk) with the original's text layout handling.

Ids, decodes, special-token building and the GLM padding (bool mask [1, L, L] with True = masked, 2-D position ids)
follow THUDM's `tokenization_chatglm.py` (final 130528-vocab version) as run on transformers 4.27.
"""
import os
import re
import shutil

import numpy as np
import sentencepiece as spm
from transformers import AddedToken, PreTrainedTokenizer
from transformers.utils import PaddingStrategy, logging

from .text import NEWLINE_PIECE, TAB_PIECE, VOCAB_FILE, layout, prepare

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": VOCAB_FILE}
_BLANK_PIECE = re.compile(r"<\|blank_(\d+)\|>")
_IMAGE_TOKEN = re.compile(r"<image_(\d+)>")


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(self, vocab_file, do_lower_case=False, remove_space=False, bos_token="<sop>", eos_token="<eop>",
                 end_token="</s>", mask_token="[MASK]", gmask_token="[gMASK]", padding_side="left",
                 pad_token="<pad>", unk_token="<unk>", num_image_tokens=20000, max_blank_length=80,
                 clean_up_tokenization_spaces=True, **kwargs):
        self.vocab_file = vocab_file
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.num_image_tokens = num_image_tokens
        self.max_blank_length = max_blank_length
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self._base_vocab = None
        # `[gMASK]` and `</s>` are plain attributes, not HF special tokens: typed text "[gMASK]" is not split out
        # (the original gives ▁[ g MASK ]) and skip_special_tokens keeps them. transformers 5 registers any
        # `*_token` entry of tokenizer_config.json as special (model_specific_special_tokens): take them back.
        specific = dict(kwargs.pop("model_specific_special_tokens", None) or {})
        gmask_token = specific.pop("gmask_token", gmask_token)
        end_token = specific.pop("end_token", end_token)
        if specific:
            kwargs["model_specific_special_tokens"] = specific
        self.gmask_token = str(gmask_token)
        self.end_token = str(end_token)
        # transformers 4.27 stripped the whitespace on both sides of a special token found in the text
        # ("a <sop> b" -> "a", "<sop>", "b"); v5 only does that for AddedTokens with lstrip/rstrip.
        if not hasattr(self, "_added_tokens_decoder"):
            self._added_tokens_decoder = {}
        for token in (bos_token, eos_token, unk_token, pad_token, mask_token):
            if token is None:
                continue
            token = str(token)
            self._added_tokens_decoder[self._convert_token_to_id(token)] = AddedToken(
                token, lstrip=True, rstrip=True, normalized=False, special=True)
        super().__init__(do_lower_case=do_lower_case, remove_space=remove_space, padding_side=padding_side,
                         bos_token=bos_token, eos_token=eos_token, mask_token=mask_token, pad_token=pad_token,
                         unk_token=unk_token, num_image_tokens=num_image_tokens, max_blank_length=max_blank_length,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        self.init_kwargs["gmask_token"] = self.gmask_token
        self.init_kwargs["end_token"] = self.end_token

    # ---- vocabulary -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp_model.get_piece_size()

    def get_vocab(self) -> dict:
        if self._base_vocab is None:
            self._base_vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab = dict(self._base_vocab)
        vocab.update(self._added_tokens_encoder if hasattr(self, "_added_tokens_encoder") else {})
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        if self._base_vocab is not None and token in self._base_vocab:
            return self._base_vocab[token]
        image = _IMAGE_TOKEN.fullmatch(token)
        if image:
            return int(image.group(1))
        return self.sp_model.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        piece_id = index - self.num_image_tokens
        if piece_id >= self.sp_model.get_piece_size():
            # Embedding rows 130344-130527 are padding no token uses; a random model can still emit them.
            return self.sp_model.id_to_piece(self.sp_model.unk_id())
        return self.sp_model.id_to_piece(piece_id)

    @property
    def gmask_token_id(self) -> int:
        return self._convert_token_to_id(self.gmask_token)

    @property
    def end_token_id(self) -> int:
        return self._convert_token_to_id(self.end_token)

    # ---- encoding ---------------------------------------------------------------------------------------------
    def _layout(self, text: str, linebreak: bool = True, whitespaces: bool = True) -> str:
        """Newlines, tabs and blank runs become pieces, because the normaliser would collapse the whitespace."""
        return layout(text, self.max_blank_length, linebreak, whitespaces)

    def _tokenize(self, text: str, **kwargs) -> list:
        return self.sp_model.encode(prepare(text, remove_space=self.remove_space, do_lower_case=self.do_lower_case,
                                            max_blank_length=self.max_blank_length), out_type=str)

    def encode_text(self, text: str, linebreak: bool = True, whitespaces: bool = True,
                    add_dummy_prefix: bool = True) -> list:
        """The original inner encoder (no special tokens, no HF splitting). Without the dummy prefix the text is
        encoded after a `<n>` and the leading `▁ <n>` ids are dropped, so "你好" gives [74874] instead of [5, 74874]."""
        text = self._layout(text, linebreak, whitespaces)
        if not add_dummy_prefix:
            text = NEWLINE_PIECE + text
        ids = [i + self.num_image_tokens for i in self.sp_model.encode(text)]
        return ids if add_dummy_prefix else ids[2:]

    # ---- decoding ---------------------------------------------------------------------------------------------
    def convert_tokens_to_string(self, tokens: list) -> str:
        pieces = [t for t in tokens if not _IMAGE_TOKEN.fullmatch(t)]
        text = self.sp_model.decode_pieces(pieces)
        text = text.replace(NEWLINE_PIECE, "\n").replace(TAB_PIECE, "\t")
        return _BLANK_PIECE.sub(self._blank_text, text)

    def _blank_text(self, match) -> str:
        n = int(match.group(1))
        return " " * n if 2 <= n <= self.max_blank_length else match.group(0)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = [int(i) for i in token_ids if int(i) != self.pad_token_id]  # the original drops pads first
        if not token_ids:
            return ""
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # ---- special tokens ---------------------------------------------------------------------------------------
    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None) -> list:
        """`a + [gMASK, <sop>]`, and for a pair `a + [gMASK, <sop>] + b + [<eop>]`: the mask and bos go at the END."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False) -> list:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None) -> list:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # ---- padding: builds the GLM attention mask and 2-D position ids ------------------------------------------
    def _pad(self, encoded_inputs, max_length=None, padding_strategy=PaddingStrategy.DO_NOT_PAD,
             pad_to_multiple_of=None, padding_side=None, return_attention_mask=None) -> dict:
        side = padding_side if padding_side is not None else self.padding_side
        if side != "left":
            raise ValueError("ChatGLMTokenizer pads on the left only (the GLM mask and position ids assume it); "
                             "pad training batches yourself, as ChatGLM-Tuning's collator does, if you need "
                             "right padding")
        ids = encoded_inputs[self.model_input_names[0]]
        length = len(ids)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        # Like the original, masks and positions are only built when a length is given (any padding call).
        if max_length is not None:
            ids = list(ids)
            context = ids.index(self.bos_token_id) if self.bos_token_id in ids else length
            mask = encoded_inputs.get("attention_mask")
            if mask is None or np.ndim(mask) != 3:
                full = np.tril(np.ones((1, length, length)))
                full[:, :, :context] = 1
                encoded_inputs["attention_mask"] = full < 0.5
            if "position_ids" not in encoded_inputs:
                positions = np.arange(length, dtype=np.int64)
                # The tokenizer prefers [MASK] over [gMASK]; the model prefers [gMASK] (both as in the original).
                mask_id = self.mask_token_id if self.mask_token_id in ids else self.gmask_token_id
                if mask_id in ids:
                    positions[context:] = ids.index(mask_id)
                blocks = np.concatenate([np.zeros(context, dtype=np.int64),
                                         np.arange(1, length - context + 1, dtype=np.int64)])
                encoded_inputs["position_ids"] = np.stack([positions, blocks], axis=0)
        if padding_strategy != PaddingStrategy.DO_NOT_PAD and max_length is not None and length < max_length:
            extra = max_length - length
            if "attention_mask" in encoded_inputs:
                encoded_inputs["attention_mask"] = np.pad(encoded_inputs["attention_mask"],
                                                          [(0, 0), (extra, 0), (extra, 0)], constant_values=True)
            if "position_ids" in encoded_inputs:
                encoded_inputs["position_ids"] = np.pad(encoded_inputs["position_ids"], [(0, 0), (extra, 0)])
            if "token_type_ids" in encoded_inputs:
                encoded_inputs["token_type_ids"] = [self.pad_token_type_id] * extra + list(
                    encoded_inputs["token_type_ids"])
            if "special_tokens_mask" in encoded_inputs:
                encoded_inputs["special_tokens_mask"] = [1] * extra + list(encoded_inputs["special_tokens_mask"])
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * extra + list(ids)
        return encoded_inputs

    # ---- saving -----------------------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
        if not os.path.isdir(save_directory):
            raise ValueError(f"vocabulary path {save_directory!r} should be a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "ice_text.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, out)
            else:
                with open(out, "wb") as f:
                    f.write(self.sp_model.serialized_model_proto())
        return (out,)
