"""The one sampling path: next tokens from logits, for the request loop under ``generate`` and ``hmt serve``
(``requests.RequestBatch``: rows sharing torch's generator draw together, a row with its own generator alone) and
for ``Scheduler.pick``.

Greedy is the argmax.  Sampling works on the logits in float32 with their maximum subtracted, divided by the
temperature (at least ``MIN_TEMPERATURE``, so that float32 stays finite), then transformers' top-k and top-p
warpers, softmax, and a draw; a row whose probabilities are not a distribution (NaN or infinite logits) takes
its argmax instead, so every accepted setting gives a token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

MIN_TEMPERATURE = 1e-6  # smaller temperatures sample as this one (greedy in effect; float32 stays finite)


@dataclass(frozen=True)
class Sampling:
    """How a next token is chosen: ``do_sample`` False is greedy; else temperature, top_k (None: off) and top_p
    (None or 1: off)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.top_k is not None:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None,
           warpers: LogitsProcessorList | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,) int64, on the logits' device, with no host synchronisation.
    ``warpers``: ``sampling.warpers()`` built once by a caller that chooses many times."""
    if not sampling.do_sample:
        return torch.argmax(logits, dim=-1)
    raw = logits.float()
    scores = (raw - raw.max(dim=-1, keepdim=True).values) / max(float(sampling.temperature), MIN_TEMPERATURE)
    warpers = sampling.warpers() if warpers is None else warpers
    if warpers:
        scores = warpers(None, scores)
    probs = torch.softmax(scores, dim=-1)
    usable = torch.isfinite(probs).all(dim=-1, keepdim=True) & (probs.sum(dim=-1, keepdim=True) > 0)
    best = torch.nan_to_num(raw, nan=-float("inf")).argmax(-1, keepdim=True)  # an infinite logit wins
    greedy = torch.zeros_like(probs).scatter_(1, best, 1.0)
    probs = torch.where(usable, torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0), greedy)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
