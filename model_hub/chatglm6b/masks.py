"""GLM attention masks and position ids, built from the input ids as the original model does (vectorised).

The prompt up to `<sop>` (bos) attends bidirectionally, from `<sop>` on attention is causal; masks are bool with
True = masked. 2-D positions: row 0 counts tokens up to `<sop>` and then repeats the index of `[gMASK]` (or of
`[MASK]` when there is no `[gMASK]`), row 1 is 0 on the prompt and 1, 2, 3, ... from `<sop>` on.
"""
import torch


def first_index(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Per row, the index of the first `token_id`, or -1 when absent."""
    hits = input_ids == token_id
    return torch.where(hits.any(-1), hits.int().argmax(-1), torch.full_like(hits[:, 0], -1, dtype=torch.long))


def context_lengths(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    ctx = first_index(input_ids, bos_token_id)
    if (ctx < 0).any():
        rows = (ctx < 0).nonzero().flatten().tolist()
        raise ValueError(f"{bos_token_id} is not in list: every ChatGLM-6B input needs <sop> (bos, id "
                         f"{bos_token_id}) after the prompt; missing in batch rows {rows}")
    return ctx


def find_mask_positions(input_ids: torch.Tensor, mask_token_id: int, gmask_token_id: int):
    """(index of [gMASK], else of [MASK]) per row, and whether it is a [gMASK]."""
    gmask = first_index(input_ids, gmask_token_id)
    use_gmask = gmask >= 0
    positions = torch.where(use_gmask, gmask, first_index(input_ids, mask_token_id))
    if (positions < 0).any():
        rows = (positions < 0).nonzero().flatten().tolist()
        raise ValueError(f"neither [gMASK] ({gmask_token_id}) nor [MASK] ({mask_token_id}) is in the input ids of "
                         f"batch rows {rows}")
    return positions, use_gmask


def build_attention_mask(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """[B, 1, L, L] bool, True = masked."""
    length = input_ids.shape[1]
    ctx = context_lengths(input_ids, bos_token_id)
    cols = torch.arange(length, device=input_ids.device)
    causal = cols[None, :] <= cols[:, None]
    visible = causal[None] | (cols[None, None, :] < ctx[:, None, None])
    return (~visible).unsqueeze(1)


def build_position_ids(input_ids: torch.Tensor, config, mask_positions=None, use_gmasks=None) -> torch.Tensor:
    """[B, 2, L] with position_encoding_2d, else [B, L] (there a [gMASK] prompt keeps counting).

    `mask_positions` / `use_gmasks` (per row) override the positions found in the ids, as the original allowed."""
    batch, length = input_ids.shape
    ctx = context_lengths(input_ids, config.bos_token_id)
    if mask_positions is None:
        mask_pos, use_gmask = find_mask_positions(input_ids, config.mask_token_id, config.gmask_token_id)
    else:
        mask_pos = torch.as_tensor(mask_positions, dtype=torch.long, device=input_ids.device)
        use_gmask = torch.as_tensor(use_gmasks if use_gmasks is not None else [False] * batch,
                                    dtype=torch.bool, device=input_ids.device)
    cols = torch.arange(length, device=input_ids.device).expand(batch, length)
    generated = cols >= ctx[:, None]
    if config.position_encoding_2d:
        positions = torch.where(generated, mask_pos[:, None], cols)
        blocks = (cols - ctx[:, None] + 1).clamp(min=0)
        return torch.stack([positions, blocks], dim=1)
    return torch.where(generated & ~use_gmask[:, None], mask_pos[:, None], cols)


def next_position_ids(input_ids: torch.Tensor, config) -> torch.Tensor:
    """Positions of the last token of `input_ids` when decoding with a cache and no given position ids.

    2-D: [mask position, len - context length]; 1-D: the mask position (the original uses it even after a [gMASK]).
    """
    mask_pos, _ = find_mask_positions(input_ids, config.mask_token_id, config.gmask_token_id)
    if config.position_encoding_2d:
        blocks = input_ids.shape[1] - context_lengths(input_ids, config.bos_token_id)
        return torch.stack([mask_pos, blocks], dim=1).unsqueeze(-1)
    return mask_pos.unsqueeze(-1)
