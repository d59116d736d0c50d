"""Memory recall and memory write (spec "Recall"), one launch each, no host synchronisation.

``recall`` computes ``P = softmax((S W_q^T) K^T / sqrt(d_h)) C`` (or another given score ``scale``) over the
valid slots of the ring buffer.  The query projection is a GEMV with the large W_q (d_h, d), so the launch is
spread over chunks of d_h: program (j, b) computes q[chunk j] and its contribution to every slot's score, added
atomically into a float32 scratch.
The slots are cut into groups of GROUP_N; the program that completes a group's scores (the last of the d_h chunks
to add to it, found with an atomic counter) computes that group's softmax partial (max, sum, weighted sum of its
memory rows), and the program that completes the last group merges the partials by log-sum-exp and writes P.
Programs visit the groups in rotated order so the group work spreads over programs.  Nothing waits on another
program, so the result does not depend on scheduling; the scratch is left zeroed for the next call.

``memory_write`` projects M_n with W_k (again split over d_h chunks), stores M_n and its key in slot
``written % N``, and the last program to finish increments ``written``.

Scratch buffers are kept per (device, stream, shape): concurrent calls on one stream are ordered; calls on
different streams get their own buffers.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hmt_kernels.common import check_kernel_device

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUP_N = 32  # slots per softmax group
GEMV_TILE = 8192  # elements of a W tile per program step (BLOCK_H x BLOCK_DM)


def _blocks(d_model: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_DM, BLOCK_C): wide d tiles so a GEMV chunk takes few dependent steps (d = 576: two)."""
    block_dm = min(triton.next_power_of_2(d_model), 512)
    return max(16, GEMV_TILE // block_dm), block_dm, min(triton.next_power_of_2(d_model), 256)


@triton.jit
def _recall_kernel(
    S, C, K, WRITTEN, WQ, OUT,
    SCORES, GROUP_CNT, ROW_CNT, PART_ACC, PART_ML,
    stride_sb, stride_sd,
    stride_cb, stride_cn, stride_cd,
    stride_kb, stride_kn, stride_kh,
    stride_wh, stride_wd,
    stride_ob, stride_od,
    n_slots, d_model, d_h, max_groups, scale,
    BLOCK_H: tl.constexpr,
    BLOCK_DM: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    j = tl.program_id(0)
    b = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    b64 = b.to(tl.int64)
    count = tl.minimum(tl.load(WRITTEN + b), n_slots).to(tl.int32)
    n_groups = tl.cdiv(count, GROUP_N)
    offs_c0 = tl.arange(0, BLOCK_C)

    if count == 0:
        if j == 0:  # no valid slot: P = 0
            for c0 in range(0, d_model, BLOCK_C):
                offs_c = c0 + offs_c0
                tl.store(OUT + b64 * stride_ob + offs_c * stride_od,
                         tl.zeros([BLOCK_C], dtype=tl.float32).to(OUT.dtype.element_ty), mask=offs_c < d_model)
    else:
        # q[chunk j] = W_q[chunk j] @ S[b]
        offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = offs_h < d_h
        q = tl.zeros([BLOCK_H], dtype=tl.float32)
        for d0 in range(0, d_model, BLOCK_DM):
            offs_d = d0 + tl.arange(0, BLOCK_DM)
            d_mask = offs_d < d_model
            s = tl.load(S + b64 * stride_sb + offs_d * stride_sd, mask=d_mask, other=0.0).to(tl.float32)
            w = tl.load(WQ + offs_h[:, None] * stride_wh + offs_d[None, :] * stride_wd,
                        mask=h_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            q += tl.sum(w * s[None, :], 1)

        offs_g0 = tl.arange(0, GROUP_N)
        for t in range(0, n_groups):
            g = (t + j) % n_groups
            offs_n = g * GROUP_N + offs_g0
            n_mask = offs_n < count
            k = tl.load(K + b64 * stride_kb + offs_n[:, None] * stride_kn + offs_h[None, :] * stride_kh,
                        mask=n_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
            tl.atomic_add(SCORES + b64 * n_slots + offs_n, tl.sum(k * q[None, :], 1), mask=n_mask)
            tl.debug_barrier()
            ticket = tl.atomic_add(GROUP_CNT + b64 * max_groups + g, 1)
            if ticket == n_chunks - 1:
                # This program completed group g's scores: its softmax partial over the group's memory rows.
                scores = tl.load(SCORES + b64 * n_slots + offs_n, mask=n_mask, other=float("-inf"),
                                 cache_modifier=".cg") * scale
                m_g = tl.max(scores, 0)
                p = tl.exp(scores - m_g)
                part = (b64 * max_groups + g)
                for c0 in range(0, d_model, BLOCK_C):
                    offs_c = c0 + offs_c0
                    c_mask = offs_c < d_model
                    mem = tl.load(C + b64 * stride_cb + offs_n[:, None] * stride_cn + offs_c[None, :] * stride_cd,
                                  mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
                    tl.store(PART_ACC + part * d_model + offs_c, tl.sum(p[:, None] * mem, 0), mask=c_mask)
                tl.store(PART_ML + part * 2, m_g)
                tl.store(PART_ML + part * 2 + 1, tl.sum(p, 0))
                tl.store(SCORES + b64 * n_slots + offs_n, tl.zeros([GROUP_N], dtype=tl.float32), mask=n_mask)
                tl.store(GROUP_CNT + b64 * max_groups + g, 0)
                tl.debug_barrier()
                done = tl.atomic_add(ROW_CNT + b, 1)
                if done == n_groups - 1:
                    # Every group is done: merge the partials and write P.
                    offs_g = tl.arange(0, BLOCK_G)
                    g_mask = offs_g < n_groups
                    parts = b64 * max_groups + offs_g
                    m = tl.load(PART_ML + parts * 2, mask=g_mask, other=float("-inf"), cache_modifier=".cg")
                    l = tl.load(PART_ML + parts * 2 + 1, mask=g_mask, other=0.0, cache_modifier=".cg")
                    weight = tl.where(g_mask, tl.exp(m - tl.max(m, 0)), 0.0)
                    inv_total = 1.0 / tl.sum(weight * l, 0)
                    for c0 in range(0, d_model, BLOCK_C):
                        offs_c = c0 + offs_c0
                        c_mask = offs_c < d_model
                        acc = tl.load(PART_ACC + parts[:, None] * d_model + offs_c[None, :],
                                      mask=g_mask[:, None] & c_mask[None, :], other=0.0, cache_modifier=".cg")
                        out = tl.sum(weight[:, None] * acc, 0) * inv_total
                        tl.store(OUT + b64 * stride_ob + offs_c * stride_od, out.to(OUT.dtype.element_ty), mask=c_mask)
                    tl.store(ROW_CNT + b, 0)


@triton.jit
def _memory_write_kernel(
    NEW, WK, MEM, KEYS, WRITTEN, CNT,
    stride_nb, stride_nd,
    stride_wh, stride_wd,
    stride_mb, stride_mn, stride_md,
    stride_kb, stride_kn, stride_kh,
    n_slots, d_model, d_h,
    BLOCK_H: tl.constexpr,
    BLOCK_DM: tl.constexpr,
):
    j = tl.program_id(0)
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    written = tl.load(WRITTEN + b)
    slot = (written % n_slots).to(tl.int64)
    offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < d_h
    key = tl.zeros([BLOCK_H], dtype=tl.float32)
    for d0 in range(0, d_model, BLOCK_DM):
        offs_d = d0 + tl.arange(0, BLOCK_DM)
        d_mask = offs_d < d_model
        x = tl.load(NEW + b64 * stride_nb + offs_d * stride_nd, mask=d_mask, other=0.0)
        if j == 0:
            tl.store(MEM + b64 * stride_mb + slot * stride_mn + offs_d * stride_md, x.to(MEM.dtype.element_ty),
                     mask=d_mask)
        w = tl.load(WK + offs_h[:, None] * stride_wh + offs_d[None, :] * stride_wd,
                    mask=h_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        key += tl.sum(w * x.to(tl.float32)[None, :], 1)
    tl.store(KEYS + b64 * stride_kb + slot * stride_kn + offs_h * stride_kh, key.to(KEYS.dtype.element_ty),
             mask=h_mask)
    tl.debug_barrier()
    # Every program has read `written` before it arrives here; the last one to arrive advances it.
    ticket = tl.atomic_add(CNT + b, 1)
    if ticket == tl.num_programs(0) - 1:
        tl.store(WRITTEN + b, written + 1)
        tl.store(CNT + b, 0)


_scratch_cache: dict = {}


def _stream_key(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _scratch(kind: str, device: torch.device, *sizes: int) -> tuple[torch.Tensor, ...]:
    """Zeroed scratch buffers, reused across calls (each kernel leaves them zeroed)."""
    key = (kind, device, _stream_key(device), sizes)
    buffers = _scratch_cache.get(key)
    if buffers is None:
        if kind == "recall":
            batch, n_slots, max_groups, d_model = sizes
            buffers = (
                torch.zeros(batch, n_slots, dtype=torch.float32, device=device),  # scores
                torch.zeros(batch, max_groups, dtype=torch.int32, device=device),  # group counters
                torch.zeros(batch, dtype=torch.int32, device=device),  # row counters
                torch.empty(batch, max_groups, d_model, dtype=torch.float32, device=device),  # partial sums
                torch.empty(batch, max_groups, 2, dtype=torch.float32, device=device),  # partial max, sum
            )
        else:
            (batch,) = sizes
            buffers = (torch.zeros(batch, dtype=torch.int32, device=device),)
        _scratch_cache[key] = buffers
    return buffers


def _check_float(name: str, t, shape: tuple, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name}.dtype={t.dtype}: expected one of {_DTYPES}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _check_written(written, batch: int, device) -> None:
    if not isinstance(written, torch.Tensor) or tuple(written.shape) != (batch,) or written.dtype not in (
        torch.int32, torch.int64
    ):
        raise ValueError(
            f"written: expected a ({batch},) int64 tensor, got {getattr(written, 'shape', type(written))} "
            f"{getattr(written, 'dtype', '')}"
        )
    if written.device != device:
        raise ValueError(f"written is on {written.device}, expected {device}")


def recall(summary, memory, keys, written, w_q, out=None, scale=None):
    """Recall P from the memory ring buffer in one launch.

    Args:
        summary: (B, d) summary states S_n.
        memory: (B, N, d) ring buffer C of memory embeddings.
        keys: (B, N, d_h) cached keys of the memory rows (memory @ W_k^T).
        written: (B,) int64 device tensor, memories written so far; valid slots are the first min(written, N).
        w_q: (d_h, d) query projection (``nn.Linear.weight``).
        out: optional (B, d) destination, any strides (e.g. a row of an input-embedding buffer).
        scale: the factor of the scores (None: 1 / sqrt(d_h); ``hmt_runtime.ops.recall_scale_factor``).

    Returns:
        P: (B, d) = softmax(scale (S W_q^T) K^T) C over the valid slots; zeros for a row with no valid
        slot.  ``out`` if given (written in its dtype), else a new tensor of memory's dtype.
    """
    if not isinstance(memory, torch.Tensor) or memory.dim() != 3:
        raise ValueError(f"memory: expected a (B, N, d) tensor, got {getattr(memory, 'shape', type(memory))}")
    batch, n_slots, d_model = memory.shape
    device = memory.device
    check_kernel_device("memory", memory)
    if not isinstance(w_q, torch.Tensor) or w_q.dim() != 2:
        raise ValueError(f"w_q: expected a (d_h, d) tensor, got {getattr(w_q, 'shape', type(w_q))}")
    d_h = w_q.shape[0]
    _check_float("memory", memory, (batch, n_slots, d_model), device)
    _check_float("summary", summary, (batch, d_model), device)
    _check_float("keys", keys, (batch, n_slots, d_h), device)
    _check_float("w_q", w_q, (d_h, d_model), device)
    _check_written(written, batch, device)
    if out is None:
        out = torch.empty(batch, d_model, dtype=memory.dtype, device=device)
    else:
        _check_float("out", out, (batch, d_model), device)
    if batch == 0 or n_slots == 0:
        return out.zero_()
    max_groups = triton.cdiv(n_slots, GROUP_N)
    scores, group_cnt, row_cnt, part_acc, part_ml = _scratch("recall", device, batch, n_slots, max_groups, d_model)
    block_h, block_dm, block_c = _blocks(d_model)
    grid = (triton.cdiv(d_h, block_h), batch)
    _recall_kernel[grid](
        summary, memory, keys, written, w_q, out,
        scores, group_cnt, row_cnt, part_acc, part_ml,
        *summary.stride(), *memory.stride(), *keys.stride(), *w_q.stride(), *out.stride(),
        n_slots, d_model, d_h, max_groups, 1.0 / math.sqrt(d_h) if scale is None else float(scale),
        BLOCK_H=block_h, BLOCK_DM=block_dm, GROUP_N=GROUP_N, BLOCK_C=block_c,
        BLOCK_G=max(2, triton.next_power_of_2(max_groups)), num_warps=4,
    )
    return out


def memory_write(new_memory, w_k, memory, keys, written):
    """Store M_n and its key in slot ``written % N`` and increment ``written``, in place, in one launch.

    Args:
        new_memory: (B, d) the new memory embeddings M_n.
        w_k: (d_h, d) key projection (``nn.Linear.weight``).
        memory: (B, N, d) ring buffer, written at row ``written[b] % N``.
        keys: (B, N, d_h) cached keys, written at the same row with ``M_n @ w_k^T``.
        written: (B,) int64 device tensor, incremented by one.
    """
    if not isinstance(memory, torch.Tensor) or memory.dim() != 3:
        raise ValueError(f"memory: expected a (B, N, d) tensor, got {getattr(memory, 'shape', type(memory))}")
    batch, n_slots, d_model = memory.shape
    device = memory.device
    check_kernel_device("memory", memory)
    if not isinstance(w_k, torch.Tensor) or w_k.dim() != 2:
        raise ValueError(f"w_k: expected a (d_h, d) tensor, got {getattr(w_k, 'shape', type(w_k))}")
    d_h = w_k.shape[0]
    _check_float("memory", memory, (batch, n_slots, d_model), device)
    _check_float("new_memory", new_memory, (batch, d_model), device)
    _check_float("w_k", w_k, (d_h, d_model), device)
    _check_float("keys", keys, (batch, n_slots, d_h), device)
    _check_written(written, batch, device)
    if n_slots == 0:
        raise ValueError("memory has N=0 slots, expected at least 1")
    if batch == 0:
        return
    (counter,) = _scratch("write", device, batch)
    block_h, block_dm, _ = _blocks(d_model)
    _memory_write_kernel[(triton.cdiv(d_h, block_h), batch)](
        new_memory, w_k, memory, keys, written, counter,
        *new_memory.stride(), *w_k.stride(), *memory.stride(), *keys.stride(),
        n_slots, d_model, d_h,
        BLOCK_H=block_h, BLOCK_DM=block_dm, num_warps=4,
    )
