"""How ChatGLM-6B decodes from a KV cache, for serving.kv_batch (the registry's `decode_layout` of the family).

Where LLaMA and GLM-4 take 1-D positions, a 0/1 attention mask and `logits_to_keep`, ChatGLM-6B builds its own 2-D
positions from the prompt's [gMASK] and <sop> at prefill, and a decoding step's position is the pair [index of
[gMASK], tokens since <sop> + 1]; its attention mask is boolean, True where a column is hidden; its forward has no
`logits_to_keep`. Its prefill builds the mask for one prompt, so prompts are prefilled one at a time. (serving.kv_batch
takes all three from any family that has a decode layout: ChatGLM-6B is the only one.)"""
import torch


class ChatGLMDecoding:
    def __init__(self, config):
        self.gmask, self.mask, self.bos = config.gmask_token_id, config.mask_token_id, config.bos_token_id

    def row_marks(self, ids: list[int]) -> dict:
        """What a row must remember of its prompt: where [gMASK] (else [MASK]) and <sop> are."""
        mark = self.gmask if self.gmask in ids else self.mask
        return {"mask_position": ids.index(mark), "context_length": ids.index(self.bos)}

    def step_inputs(self, rows, visible: torch.Tensor) -> dict:
        """position_ids [B, 2, 1] and the hidden-columns mask [B, 1, 1, width + 1] of one decoding step."""
        position_ids = torch.tensor([[row.marks["mask_position"], row.length - row.marks["context_length"] + 1]
                                     for row in rows], device=visible.device)[:, :, None]
        return {"position_ids": position_ids, "attention_mask": (~visible)[:, None, None, :]}
