"""Which memory slots the end of a prompt reads again as tokens (docs/spec.md "Replay at the end of a prompt").

Host-side rule, no backbone work, written once: the teacher-forced forward (``HMTModel.iter_segments``) and the
scheduler (``Scheduler.end_prompt``) both call ``choose``, on the same ids in the same order, so the two paths
pick the same slots exactly (integer counts and an exactly rounded sum: no kernel's rounding enters).

A slot's ids are the window that wrote its memory embedding (its sensory and segment ids).  An id ``t`` weighs

    w(t) = rarity(t) * log(n / df(t)) / log(n)

with ``n`` slots and ``df(t)`` the number of slots holding ``t``: ``rarity`` is how unlikely a slot of ``S`` ids
is to hold ``t`` by chance in any text (``-log(1 - exp(-S / (rank(t) H)))``: Zipf's law over the tokenizer's id
order, which byte-level BPE and SentencePiece vocabularies build most frequent first, ``rank(t) = t + 1``,
``H = ln V + 0.5772``), so that "where" or "end" weigh less than a name however seldom this prompt uses them;
the second factor is how much holding ``t`` tells the slots apart *in this prompt* (1 for an id one slot holds,
0 for one every slot holds), so that a name the whole document repeats, or a filler's words, weigh little.  The
query is the question: the prompt's last ids from just after the last line break that leaves at least
``QUESTION_MIN_IDS`` ids after it (all of them when there is none), so that the prose the question follows does
not choose for it.  A slot scores

    match   = (the sum of w(t)^2 over the distinct ids t it shares with the query: tf-idf's dot product)
              * (1 + RECENCY * (its index + 1) / n), so that of slots that answer alike the newest wins (what
              was read last supersedes: "Mary went to the garden" after "Mary went to the kitchen"),
    novelty = the mean of log((n + 1) / df(t)) over its distinct ids (how much it differs from the other slots:
              what decides when the question shares nothing with any slot),

and the ``count`` slots ranked highest by (match, novelty, recency) are replayed, oldest first.  Ids are compared
after ``canonical_ids`` (the token's text lowercased, without its leading-space or newline marker), so that
"Key", " key" and "key" are one id (the lowest of them, the most frequent, gives the rank).
"""
from __future__ import annotations

import math

import torch

_MARKERS = ("\u0120", "\u2581", "\u010a", "\u0109")  # byte-level BPE's space, SentencePiece's space, newline, tab
_BREAKS = ("\u010a", "\n", "<0x0A>")  # a newline: byte-level BPE's marker, the text itself, SentencePiece's byte
QUESTION_MIN_IDS = 8  # a question line shorter than this (e.g. "Answer:") takes the line before it too
RECENCY = 0.2  # the newest slot's match counts up to 20% more than the oldest's
_EULER = 0.5772156649015329


def canonical_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64: each id's canonical id (one per lowercased token text without its space / newline
    markers); ids the tokenizer does not name map to ids of their own.  Without a tokenizer: the identity."""
    table = torch.arange(vocab_size, dtype=torch.long)
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return table
    names = convert(list(range(min(vocab_size, len(tokenizer)))))
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            continue
        text = name
        for marker in _MARKERS:
            text = text.replace(marker, "")
        text = text.strip().lower() or name
        table[i] = index.setdefault(text, i)
    return table


def line_breaks(tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: the ids whose token holds a line break.  Without token names: none."""
    table = torch.zeros(vocab_size, dtype=torch.bool)
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return table
    for i, name in enumerate(convert(list(range(min(vocab_size, len(tokenizer)))))):
        table[i] = isinstance(name, str) and any(b in name for b in _BREAKS)
    return table


def question(query: torch.Tensor, breaks: torch.Tensor | None) -> torch.Tensor:
    """The question in ``query`` (the prompt's last ids): the ids after the last line break that leaves at least
    ``QUESTION_MIN_IDS`` ids after it; all of ``query`` when there is none (or ``breaks`` is None)."""
    if breaks is None:
        return query
    flags = breaks[query.cpu()].tolist()
    for p in range(len(flags) - QUESTION_MIN_IDS - 1, -1, -1):
        if flags[p]:
            return query[p + 1 :]
    return query


def choose(count: int, query: torch.Tensor, slots: list[torch.Tensor], canon: torch.Tensor | None = None,
           breaks: torch.Tensor | None = None) -> list[int]:
    """The indices (ascending: oldest first) of the ``count`` slots to replay.

    query: (q,) ids, the prompt's last ids; slots: 1-D id tensors, oldest first; canon: ``canonical_ids`` or None;
    breaks: ``line_breaks`` or None (the whole query is the question).
    """
    if count < 1 or not slots:
        return []
    query = question(query.cpu(), breaks)
    if canon is not None:
        query = canon[query]
        slots = [canon[s.cpu()] for s in slots]
    sets = [torch.unique(s.cpu()) for s in slots]
    n = len(sets)
    every = torch.cat(sets)
    size = int(every.max()) + 1 if every.numel() else 1
    df = torch.bincount(every, minlength=size).double()
    idf = torch.log((n + 1) / df.clamp_min(1))
    vocab = max(size, canon.numel() if canon is not None else 0)
    weight = rarity(vocab, max(s.numel() for s in slots))[:size]
    weight = weight * torch.log(n / df.clamp_min(1)) / math.log(n) if n > 1 else weight * 0
    asked = torch.zeros(size, dtype=torch.bool)
    wanted = torch.unique(query.cpu())
    asked[wanted[(wanted >= 0) & (wanted < size)]] = True
    ranked = []
    for i, ids in enumerate(sets):
        match = math.fsum((weight[ids[asked[ids]]] ** 2).tolist()) * (1 + RECENCY * (i + 1) / n)
        novelty = math.fsum(idf[ids].tolist()) / max(1, ids.numel())
        ranked.append((match, novelty, i))
    ranked.sort(reverse=True)
    return sorted(i for _, _, i in ranked[:count])


def rarity(vocab_size: int, slot_ids: int) -> torch.Tensor:
    """(vocab_size,) float64: -log of the chance that ``slot_ids`` ids of text hold the id ``t``, by Zipf's law over
    the id order (``rank(t) = t + 1``, ``H = ln vocab_size + 0.5772``): ~0 for the commonest ids, ~6.4 for a rare
    name (id 15,000) of a 49k vocabulary in a 288-id slot."""
    rank = torch.arange(1, vocab_size + 1, dtype=torch.double)
    expected = slot_ids / (rank * (math.log(max(vocab_size, 2)) + _EULER))
    return -torch.log(-torch.expm1(-expected))
