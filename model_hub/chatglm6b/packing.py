"""ChatGLM-6B's packed layout for tuning.packing: each packed sequence gets the bool mask and 2-D positions it has
unpacked (bidirectional prompt, causal answer; model_hub.chatglm6b.masks), padding a block of its own."""
import torch

from .masks import build_attention_mask, build_position_ids


class ChatGLMBlocks:
    """mask [B, 1, L, L] (True = masked) and positions [B, 2, L], sequence by sequence, as unpacked."""

    def __init__(self, config):
        self.config = config

    def empty(self, rows: int, length: int) -> dict:
        return {"position_ids": torch.zeros((rows, 2, length), dtype=torch.long),
                "attention_mask": torch.ones((rows, 1, length, length), dtype=torch.bool)}

    def place(self, batch: dict, row: int, start: int, ids: torch.Tensor) -> None:
        end = start + len(ids)
        batch["position_ids"][row, :, start:end] = build_position_ids(ids[None], self.config)[0]
        batch["attention_mask"][row, 0, start:end, start:end] = build_attention_mask(ids[None],
                                                                                     self.config.bos_token_id)[0, 0]

    def pad(self, batch: dict, row: int, start: int) -> None:
        count = batch["attention_mask"].shape[-1] - start
        batch["attention_mask"][row, 0, start:, start:] = ~torch.eye(count, dtype=torch.bool)
