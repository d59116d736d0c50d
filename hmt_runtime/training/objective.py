"""The training objective: the loss over the scored segments (``LastSegmentLoss``, what DDP wraps), distillation
from the backbone's own predictions (``teacher_topk``, ``distillation_kl``) and per-segment gradient
checkpointing (``segment_checkpointing``).  Used by ``training.train`` and ``training.diagnose``."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..core import backbones
from ..core.segment import loss_start
from ..model.hmt import HMTModel, shifted_cross_entropy


class LastSegmentLoss(nn.Module):
    """The training objective as a module (what DDP wraps): ids (B, S) -> mean CE over the last segment.

    Equal to ``model(ids, labels=ids, use_recall=..., loss_on="last_segment").loss``, but computes the LM head
    only on the last segment (the others act only through memory).  ``loss_on`` "after_first" scores every
    segment but the first, "all" every position (``core.segment.loss_start``, as the forward does).  With
    ``teacher`` (``teacher_topk``'s (log-probs, ids), each (B, S, k)) and ``distill_weight`` w, the loss is
    CE + w * KL(teacher || HMT) over the same positions (with ``labels``, the positions up to each row's last
    label: the prompt as well as its answer, never the padding); ``parts`` (a dict) receives the two terms.
    ``detach_memory``: the segments wholly before the scored ones run without gradient, so only the read side
    (what the scored segments do with the memories) trains."""

    def __init__(self, model: HMTModel, loss_on: str = "last_segment"):
        super().__init__()
        loss_start(model.config, loss_on, 1)  # checks the choice
        self.model = model
        self.loss_on = loss_on

    def forward(self, input_ids: torch.Tensor, use_recall: bool, teacher=None, distill_weight: float = 0.0,
                parts: dict | None = None, prompt_end=None, labels=None, detach_memory: bool = False) -> torch.Tensor:
        kept: list[tuple[int, torch.Tensor]] = []
        # with labels (answers), every segment from the one predicting the first scored label
        scored = None if labels is None else (labels != -100).any(dim=0).nonzero()
        if scored is not None and scored.numel():
            since = int(scored[0]) - 1
        else:
            since = loss_start(self.model.config, self.loss_on, input_ids.shape[1])
        ls = self.model.config.segment_tokens
        segments = self.model.iter_segments(input_ids, use_recall=use_recall, prompt_end=prompt_end)
        for index in range(-(-input_ids.shape[1] // ls)):
            # the memories of unscored segments are written by the current weights but taught nothing
            with torch.set_grad_enabled(torch.is_grad_enabled() and not (detach_memory and (index + 1) * ls <= since)):
                start, hidden, _ = next(segments)
            if start + hidden.shape[1] > since:
                kept.append((start, hidden))
        first = kept[0][0]
        logits = self.model.lm_logits(torch.cat([h for _, h in kept], dim=1))
        loss = shifted_cross_entropy(logits, (input_ids if labels is None else labels)[:, first:])
        if parts is not None:
            parts["ce"] = loss.detach()
        if teacher is not None and distill_weight:
            mask = None
            if labels is not None:  # each row up to its last label: prompt and answer, not the padding after it
                positions = torch.arange(labels.shape[1], device=labels.device)
                ends = torch.where(labels != -100, positions, -1).amax(dim=1, keepdim=True)
                mask = (positions < ends)[:, first:-1]
            kl = distillation_kl(logits[:, :-1], teacher[0][:, first:-1], teacher[1][:, first:-1], mask)
            if parts is not None:
                parts["kl"] = kl.detach()
            loss = loss + distill_weight * kl
        return loss


def teacher_topk(model: HMTModel, input_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's own predictions with the whole window as context (any adapter off, no grad):
    input_ids (B, S) -> (log-probs, token ids) of the top ``k`` next tokens at every position, each (B, S, k)."""
    from .evaluate import _adapter

    body = backbones.decoder_body(model.backbone)
    values, indices = [], []
    with torch.no_grad(), _adapter(model.backbone, False):
        for row in input_ids:
            hidden = body(input_ids=row[None], **backbones.cache_kwargs(body, None)).last_hidden_state
            logits = model.lm_logits(hidden)
            logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            top = logp.topk(k, dim=-1)
            values.append(top.values)
            indices.append(top.indices)
    return torch.cat(values), torch.cat(indices)


def distillation_kl(logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of KL(p || q) on the teacher's top-k tokens: p the teacher's top-k probabilities
    renormalised, q the student's softmax.  logits (B, L, V); teacher_logp, teacher_ids (B, L, k); mask (B, L)
    bool: the positions the mean is over (None: all)."""
    p_logp = teacher_logp - torch.logsumexp(teacher_logp, dim=-1, keepdim=True)
    q_logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    q_logp = q_logp.gather(-1, teacher_ids)
    kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1)
    if mask is None:
        return kl.mean()
    return (kl * mask).sum() / mask.sum().clamp(min=1)


@contextlib.contextmanager
def segment_checkpointing(model: HMTModel, enabled: bool):
    """While active, every backbone pass of a segment (summary and segment pass) keeps only its input
    embeddings and is recomputed in the backward pass (torch.utils.checkpoint)."""
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    original = model.run_backbone

    def run(embeds, start=0, past_key_values=None):
        if past_key_values is not None or not torch.is_grad_enabled():
            return original(embeds, start, past_key_values)
        return checkpoint(original, embeds, start, use_reentrant=False)

    model.run_backbone = run
    try:
        yield
    finally:
        del model.run_backbone
