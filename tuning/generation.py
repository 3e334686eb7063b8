"""Batched generation from token-id prompts, left-padded, with a progress bar.

Recipes build their prompts as ids (their own template and special tokens), so this takes id lists rather than
text. Left padding keeps every prompt's last token at the end of the batch, where generation continues; the
attention mask hides the padding and transformers derives position ids from the mask, so a batched result
equals the one-prompt-at-a-time result (tests check this for greedy decoding).
"""
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from .patches import forward_replaced


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=torch.long)
    return input_ids, attention_mask


def cut_at_stop(ids: list[int], stop_ids) -> list[int]:
    """The generated ids up to (not including) the first stop id."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


@contextmanager
def vocab_projection_as_tall_matmul(model):
    """On CPU in fp32, compute the output projection as weight @ hidden.T while generating.

    A decode step of batch 2-16 multiplies a few rows by the [vocab, hidden] head; the CPU fp32 gemm picks a poor
    kernel for that shape (49,954 x 512 at 8 rows: 15-18 ms as F.linear, 6-7 ms as weight @ hidden.T, batch 1
    the same either way and bit-identical). Plain nn.Linear heads only (a LoRA-wrapped head is left alone).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (type(head) is not torch.nn.Linear or head.weight.device.type != "cpu"
            or head.weight.dtype != torch.float32):
        yield
        return

    def forward(hidden):
        flat = hidden.reshape(-1, hidden.shape[-1])
        if head.bias is None:
            logits = torch.mm(head.weight, flat.t()).t()
        else:
            logits = torch.addmm(head.bias.unsqueeze(1), head.weight, flat.t()).t()
        return logits.contiguous().reshape(*hidden.shape[:-1], head.out_features)

    with forward_replaced(head, forward):  # on this instance only: its hooks stay in place
        yield


@torch.no_grad()
def generate_batched(model, prompts: list[list[int]], *, pad_id: int, stop_ids, batch_size: int = 8,
                     desc: str = "generating", show_progress: bool = True, **generate_kwargs) -> list[list[int]]:
    """New token ids for every prompt (in order), cut at the first of `stop_ids`.

    `generate_kwargs` go to `model.generate` (e.g. max_new_tokens=64, do_sample=False). Prompts are sorted by
    length inside the call so batches waste little padding; results come back in the caller's order.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    stop_ids = set(stop_ids)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int] | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not show_progress, unit="row")
    was_training = model.training
    model.eval()
    try:
        with vocab_projection_as_tall_matmul(model):
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                input_ids, attention_mask = left_pad([prompts[i] for i in index], pad_id)
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     pad_token_id=pad_id, eos_token_id=sorted(stop_ids), **generate_kwargs)
                for row, i in enumerate(index):
                    results[i] = cut_at_stop(out[row, input_ids.shape[1]:].tolist(), stop_ids)
                bar.update(len(index))
    finally:
        bar.close()
        model.train(was_training)
    return results
