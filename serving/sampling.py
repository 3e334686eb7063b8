"""Per-request sampling settings and the next-token choice.

The logits go through transformers' own processors in `generate`'s order (repetition penalty, then temperature,
top-k, top-p) and `torch.multinomial`, so one request alone samples what `model.generate` samples with the same
settings and seed (the CLIs' answers are unchanged). temperature 0 is greedy, as OpenAI's API means it.
A request with a `seed` draws from its own generator, so neighbours in the batch cannot change its sample.
"""
from dataclasses import dataclass, replace

import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def capped(self, room: int) -> "SamplingParams":
        return self if self.max_tokens <= room else replace(self, max_tokens=room)

    def make_generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


@torch.no_grad()
def sample_next(logits: torch.Tensor, params: SamplingParams, seen: list[int],
                generator: torch.Generator | None = None) -> int:
    """The next token from one row of logits [vocab]; `seen` = prompt + generated ids (repetition penalty)."""
    scores = logits.float()[None]
    if params.repetition_penalty != 1.0:
        seen_ids = torch.tensor([seen], device=scores.device)
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(seen_ids, scores)
    if params.greedy:
        return int(scores[0].argmax())
    penalized = scores
    if params.temperature != 1.0:
        scores = TemperatureLogitsWarper(params.temperature)(None, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        # A temperature the API accepts but so small that logits / T overflow (1e-30, a denormal): the softmax is
        # inf - inf = NaN. Its limit as T → 0 is all the mass on the best token, which is what this returns.
        return int(penalized[0].argmax())
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    return int(torch.multinomial(probs, num_samples=1, generator=generator)[0, 0])
