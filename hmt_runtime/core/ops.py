"""The three HMT hot-path operations: their contract, and their torch reference implementations.

This module is the bottom of the package (it imports nothing of it); ``hmt_runtime.incremental.backend`` picks a backend.

Every backend (torch, Triton, native C++/CUDA) implements the same three functions with the same contract:

``recall(summary, memory, keys, written, w_q, out=None, scale=None) -> P``
    summary: (B, d) summary states S_n.  memory: (B, N, d) ring buffer of memory embeddings.
    keys: (B, N, d_h) cached keys (memory @ w_q-shaped W_k^T).  written: (B,) int64, memories written so far per
    row; the valid slots are the first ``min(written, N)``.  w_q: (d_h, d) (``nn.Linear.weight``).
    Returns P: (B, d) = softmax(scale (S W_q^T)(K)^T) @ memory over valid slots (spec "One segment", step 2); ``scale``
    None means 1 / sqrt(d_h) (``HMTConfig.recall_scale``: ``recall_scale_factor``).
    A row with no valid slot gets zeros (callers use M_init there).  ``out`` (B, d), if given, receives P
    (it may be a strided view, e.g. a row of an input-embedding buffer) and is returned.

``memory_write(new_memory, w_k, memory, keys, written) -> None``
    new_memory: (B, d) M_n.  w_k: (d_h, d).  Stores M_n and its key M_n W_k^T into slot ``written % N`` of
    ``memory``/``keys`` and increments ``written``, all in place (the FIFO of the newest N: the slot
    overwritten is the oldest one, and recall treats the cache as a set, so this is exact).

``attention_with_kvcache(q, k_new, v_new, k_cache, v_cache, cache_lens, scale=None) -> out``
    q: (B, Lq, Hq, D); k_new, v_new: (B, Lq, Hkv, D); k_cache, v_cache: (B, Hkv, W, D); cache_lens: (B,) int.
    Writes k_new/v_new into the caches at positions [cache_lens[b], cache_lens[b] + Lq) and returns the causal
    attention of q over cache positions [0, cache_lens[b] + Lq) with bottom-right alignment (query i sees
    positions <= cache_lens[b] + i); Hq must be a multiple of Hkv (grouped-query heads).  ``cache_lens`` is not
    advanced (like ``flash_attn_with_kvcache``).  out: (B, Lq, Hq, D), dtype of q.  Cache positions beyond
    cache_lens + Lq are never read or written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

RECALL_SCALES = ("sqrt", "linear")


def recall_scale_factor(recall_scale: str, recall_dim: int) -> float | None:
    """The ``scale`` argument of ``recall`` for ``HMTConfig.recall_scale``: None (every backend's default,
    1 / sqrt(d_h), the spec) for "sqrt"; 1 / d_h for "linear" (the teacher-forced forward of the paper's code at
    d >= 4096 and d_h >= 4096, docs/hmt_pytorch.md)."""
    if recall_scale == "sqrt":
        return None
    if recall_scale == "linear":
        return 1.0 / recall_dim
    raise ValueError(f"recall_scale={recall_scale!r}: expected one of {RECALL_SCALES}")


def recall_torch(summary, memory, keys, written, w_q, out=None, scale=None):
    n_slots = memory.shape[1]
    count = written.clamp(max=n_slots)
    query = summary @ w_q.t()  # (B, d_h)
    scores = torch.einsum("bh,bnh->bn", query, keys)
    scores = scores / math.sqrt(keys.shape[-1]) if scale is None else scores * scale
    valid = torch.arange(n_slots, device=memory.device)[None, :] < count[:, None]
    scores = scores.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # rows with no valid slot
    result = torch.einsum("bn,bnd->bd", weights, memory)
    if out is not None:
        out.copy_(result)
        return out
    return result


def memory_write_torch(new_memory, w_k, memory, keys, written):
    n_slots = memory.shape[1]
    rows = torch.arange(memory.shape[0], device=memory.device)
    slot = written % n_slots
    memory[rows, slot] = new_memory.to(memory.dtype)
    keys[rows, slot] = (new_memory @ w_k.t()).to(keys.dtype)
    written += 1


def attention_with_kvcache_torch(q, k_new, v_new, k_cache, v_cache, cache_lens, scale=None):
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads, window = k_cache.shape[1], k_cache.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"q has {q_heads} heads, expected a multiple of the cache's {kv_heads} heads")
    lens = cache_lens.to(torch.long)
    if int((lens + q_len).max()) > window:
        raise ValueError(f"cache_lens + Lq exceeds the cache window {window}")
    pos = lens[:, None] + torch.arange(q_len, device=q.device)[None, :]  # (B, Lq)
    rows = torch.arange(batch, device=q.device)[:, None].expand(batch, q_len)
    k_cache[rows, :, pos] = k_new.to(k_cache.dtype)  # advanced indexing: (B, Lq, Hkv, D)
    v_cache[rows, :, pos] = v_new.to(v_cache.dtype)
    total = int((lens + q_len).max())
    keys = k_cache[:, :, :total].repeat_interleave(q_heads // kv_heads, dim=1)
    values = v_cache[:, :, :total].repeat_interleave(q_heads // kv_heads, dim=1)
    key_pos = torch.arange(total, device=q.device)
    mask = key_pos[None, None, :] <= pos[:, :, None]  # (B, Lq, total)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=mask[:, None], scale=scale
    )
    return out.transpose(1, 2)


@dataclass(frozen=True)
class Ops:
    """One implementation of the three ops (torch, Triton or native), picked by ``hmt_runtime.incremental.backend``."""

    name: str
    recall: Callable
    memory_write: Callable
    attention_with_kvcache: Callable
    attn_implementation: str | None  # transformers attention name for the backbone, None = leave as is
    # registers attn_implementation with transformers; called once before a transformers backbone takes it (a
    # backbone that is not transformers' never imports transformers' attention registry)
    register: Callable | None = None


TORCH_OPS = Ops("torch", recall_torch, memory_write_torch, attention_with_kvcache_torch, None)
