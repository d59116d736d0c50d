"""The segment rules of HMT, written once (docs/spec.md "One segment", "Recall modes", "Generation").

Host-side decisions only, no backbone work: which tokens form the recall query, when a provisional query is
refreshed, how many tokens a segment takes next, when it closes, and what is carried to the next segment.  The
teacher-forced forward (``HMTModel.iter_segments``) and the scheduler (``hmt_runtime.incremental.scheduler``) both call these
functions, so the two paths cannot drift apart.

Shapes: ids are (B, L) int64 tensors; ``cfg`` is an ``HMTConfig`` (Ls = ``segment_tokens``, k =
``sensory_tokens``, j = ``summary_tokens``).
"""
from __future__ import annotations

import torch


def recall_query(cfg, tail: torch.Tensor, known: torch.Tensor, complete: bool, has_memory: bool = True):
    """The recall query of a segment and whether it is provisional (spec "Recall modes", "Generation").

    tail: (B, t), t <= j, the last ids before the segment (the tail of the previous one).  known: (B, L) the
    segment's ids known so far.  complete: no more ids of this segment will come (the teacher-forced forward
    sees whole segments; a last, partial segment then uses the ids it has).  has_memory: the memory holds at
    least one slot (otherwise no recall runs and nothing is provisional).

    causal: the tail (the last j ids before the segment).  paper: the segment's first j ids; while fewer are
    known and more will come, the newest j known ids, provisionally (refreshed at j: ``refresh_due``).
    Returns (query (B, <= j), provisional).
    """
    j = cfg.summary_tokens
    if cfg.recall == "causal":
        return tail[:, -j:], False
    if complete or known.shape[1] >= j:
        return known[:, :j], False
    return torch.cat([tail, known], dim=1)[:, -j:], has_memory


def prompt_query(cfg, tail: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """The recall query of the segment in which a prompt ends, with ``cfg.prompt_recall`` (spec "Recall at the
    end of a prompt"): the last j ids of the prompt.  tail: (B, t) the last ids before the segment; known: (B, L)
    the segment's ids up to the prompt's end (L may be 0: the prompt ended on a boundary)."""
    return torch.cat([tail, known], dim=1)[:, -cfg.summary_tokens :]


def prompt_segment(cfg, prompt_end: int) -> int:
    """The index of the segment whose recall the end of a prompt of ``prompt_end`` ids sets: the one holding the
    prompt's last id, or, when the prompt ends on a boundary, the next one (it starts with the first new id)."""
    return prompt_end // cfg.segment_tokens


def refresh_due(cfg, provisional: bool, segment_len: int) -> bool:
    """A provisional P is recomputed from the segment's first j ids once it holds exactly j of them."""
    return provisional and segment_len == cfg.summary_tokens


def next_take(cfg, segment_len: int, provisional: bool, available: int) -> int:
    """How many of ``available`` ids the current segment (holding ``segment_len``) takes in one pass: up to the
    segment's end, and, while P is provisional, up to j (where P is refreshed)."""
    take = min(cfg.segment_tokens - segment_len, available)
    if provisional and segment_len < cfg.summary_tokens:
        take = min(take, cfg.summary_tokens - segment_len)
    return take


def closes(cfg, segment_len: int) -> bool:
    """A segment closes (its trailing P is fed, M_n written) when it holds Ls ids."""
    return segment_len == cfg.segment_tokens


def carried(cfg, segment_ids: torch.Tensor):
    """What a closed segment (B, L) hands to the next one: (sensory ids (B, min(k, L)) or None when k = 0,
    tail (B, min(j, L)): the next causal query and the start of a provisional one)."""
    sensory = segment_ids[:, -cfg.sensory_tokens :] if cfg.sensory_tokens else None
    return sensory, segment_ids[:, -cfg.summary_tokens :]



LOSS_ON = ("last_segment", "after_first", "all")  # which predictions a loss scores (forward and training)


def loss_start(cfg, loss_on: str, length: int) -> int:
    """The first position t whose prediction (of token t + 1) a loss over ``length`` ids scores: "last_segment"
    the last segment's positions (the spec's training loss), "after_first" every segment but the first (all of
    a one-segment input), "all" every position."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}: expected one of {LOSS_ON}")
    ls = cfg.segment_tokens
    if loss_on == "all":
        return 0
    if loss_on == "after_first":
        return ls if length > ls else 0
    return ((length - 1) // ls) * ls
