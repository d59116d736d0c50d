"""Causal attention over a KV cache with the append of the new keys/values fused into the same launch.

``attention_with_kvcache`` has the contract of ``hmt_runtime.ops.attention_with_kvcache_torch`` (modelled on
``flash_attn_with_kvcache``).  One launch:

* writes k_new/v_new (B, Lq, Hkv, D) into k_cache/v_cache (B, Hkv, W, D) at positions
  ``[cache_lens[b], cache_lens[b] + Lq)``, and
* computes, for every query i, softmax attention over cache positions ``[0, cache_lens[b] + i]``.

Programs of the launch never read the positions being written: keys below ``cache_lens`` come from the cache, the
new keys straight from k_new.  The append is split between the query-block programs (each writes a disjoint
chunk of the new positions), so there is no race and no second phase.

Grouped-query heads are packed into the rows of a block: row r of a (batch, kv head) program is query position
``r // G`` of q head ``kv_head * G + r % G`` (G = Hq // Hkv), so K/V tiles are loaded once per group.  Single-token
decode (and any Lq with Lq * G small) with a long cache uses split-K: the cache range is cut into chunks processed
by separate programs, whose partial results are merged by log-sum-exp in a second small kernel.

Head dims that are not powers of two (80, 96, ...) are masked on the D axis.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from hmt_kernels.common import check_kernel_device, interpreting


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
DECODE_ROWS = 64  # Lq * G at most this: the decode configuration (one row block per (batch, kv head))


@triton.jit
def _online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key tile: q (M, D), k (D, N), v (N, D), visible (M or 1, N); base-2 online softmax update."""
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a visible key for every row that reaches it
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _load_new_kv(kn_base, vn_base, offs_n, offs_d, d_mask, n_mask, stride_knm, stride_knd, stride_vnm, stride_vnd,
                 k_cache_ty, v_cache_ty, compute_ty):
    """Tiles of the new keys (D, N) and values (N, D), rounded through the cache dtype like a cache read."""
    k = tl.load(kn_base + offs_n[None, :] * stride_knm + offs_d[:, None] * stride_knd,
                mask=n_mask[None, :] & d_mask[:, None], other=0.0)
    v = tl.load(vn_base + offs_n[:, None] * stride_vnm + offs_d[None, :] * stride_vnd,
                mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    return k.to(k_cache_ty).to(compute_ty), v.to(v_cache_ty).to(compute_ty)


@triton.jit
def _attn_fwd_kernel(
    Q, KN, VN, KC, VC, LENS, O, PART_ACC, PART_ML,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_knb, stride_knm, stride_knh, stride_knd,
    stride_vnb, stride_vnm, stride_vnh, stride_vnd,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_ob, stride_om, stride_oh, stride_od,
    q_len, window, kv_heads, head_dim, rows_bucket,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // kv_heads
    kvh = pid_bh % kv_heads
    b64 = b.to(tl.int64)
    cache_len = tl.minimum(tl.load(LENS + b).to(tl.int32), window)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    kn_base = KN + b64 * stride_knb + kvh * stride_knh
    vn_base = VN + b64 * stride_vnb + kvh * stride_vnh
    kc_base = KC + b64 * stride_kcb + kvh * stride_kch
    vc_base = VC + b64 * stride_vcb + kvh * stride_vch

    # 1. Append: this program's chunk of the new positions (split 0 only).  Nobody reads these cache positions.
    if split == 0:
        chunk = tl.cdiv(q_len, tl.num_programs(0))
        j_begin = pid_m * chunk
        j_end = tl.minimum(j_begin + chunk, q_len)
        for start in range(j_begin, j_end, BLOCK_N):
            offs_j = start + tl.arange(0, BLOCK_N)
            pos = cache_len + offs_j
            mask = ((offs_j < j_end) & (pos < window))[:, None] & d_mask[None, :]
            k_new = tl.load(kn_base + offs_j[:, None] * stride_knm + offs_d[None, :] * stride_knd, mask=mask)
            tl.store(kc_base + pos[:, None] * stride_kcn + offs_d[None, :] * stride_kcd,
                     k_new.to(KC.dtype.element_ty), mask=mask)
            v_new = tl.load(vn_base + offs_j[:, None] * stride_vnm + offs_d[None, :] * stride_vnd, mask=mask)
            tl.store(vc_base + pos[:, None] * stride_vcn + offs_d[None, :] * stride_vcd,
                     v_new.to(VC.dtype.element_ty), mask=mask)

    # 2. Queries of this block: row r = (query position r // GROUP, q head kvh * GROUP + r % GROUP).
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_idx = offs_r // GROUP
    q_head = kvh * GROUP + offs_r % GROUP
    row_mask = offs_r < q_len * GROUP
    q_ptrs = (Q + b64 * stride_qb + q_idx[:, None] * stride_qm + q_head[:, None] * stride_qh
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 3. Cache positions [lo, hi) of this split: visible to every query, no causal mask.
    if NUM_SPLITS == 1:
        lo = 0
        hi = cache_len
    else:
        per_split = tl.cdiv(tl.cdiv(cache_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = tl.minimum(split * per_split, cache_len)
        hi = tl.minimum(lo + per_split, cache_len)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        k = tl.load(kc_base + offs_n[None, :] * stride_kcn + offs_d[:, None] * stride_kcd,
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0).to(q.dtype)
        v = tl.load(vc_base + offs_n[:, None] * stride_vcn + offs_d[None, :] * stride_vcd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)
        m_i, l_i, acc = _online_softmax_step(q, k, v, n_mask[None, :], m_i, l_i, acc, qk_scale, PRECISION, True)

    # 4. The new positions, read from k_new/v_new: key j is visible to query i iff j <= i.  Done by the last split.
    if split == NUM_SPLITS - 1:
        i_first = (pid_m * BLOCK_M) // GROUP
        i_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
        full_end = ((i_first + 1) // BLOCK_N) * BLOCK_N  # keys below this are visible to every row of the block
        for start_n in range(0, full_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v = _load_new_kv(kn_base, vn_base, offs_n, offs_d, d_mask, offs_n < q_len, stride_knm, stride_knd,
                                stride_vnm, stride_vnd, KC.dtype.element_ty, VC.dtype.element_ty, q.dtype)
            m_i, l_i, acc = _online_softmax_step(q, k, v, None, m_i, l_i, acc, qk_scale, PRECISION, False)
        for start_n in range(full_end, i_last + 1, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < q_len
            k, v = _load_new_kv(kn_base, vn_base, offs_n, offs_d, d_mask, n_mask, stride_knm, stride_knd,
                                stride_vnm, stride_vnd, KC.dtype.element_ty, VC.dtype.element_ty, q.dtype)
            visible = n_mask[None, :] & (offs_n[None, :] <= q_idx[:, None])
            m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, PRECISION, True)

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        o_ptrs = (O + b64 * stride_ob + q_idx[:, None] * stride_om + q_head[:, None] * stride_oh
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    else:
        # Partials: PART_ACC (B*Hkv, NUM_SPLITS, rows, BLOCK_D), PART_ML (B*Hkv, NUM_SPLITS, 2, rows),
        # rows = grid0 * BLOCK_M.
        n_rows = tl.num_programs(0) * BLOCK_M
        base = pid_bh.to(tl.int64) * NUM_SPLITS + split
        tl.store(PART_ACC + (base * n_rows + offs_r[:, None]) * BLOCK_D + offs_d[None, :], acc)
        tl.store(PART_ML + (base * 2) * n_rows + offs_r, m_i)
        tl.store(PART_ML + (base * 2 + 1) * n_rows + offs_r, l_i)


@triton.jit
def _split_merge_kernel(
    PART_ACC, PART_ML, O,
    stride_ob, stride_om, stride_oh, stride_od,
    q_len, kv_heads, head_dim, n_rows,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Merge the split-K partials of one (batch, kv head) row block by log-sum-exp and write out."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    kvh = pid_bh % kv_heads
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(NUM_SPLITS):
        base = pid_bh.to(tl.int64) * NUM_SPLITS + split
        m_max = tl.maximum(m_max, tl.load(PART_ML + (base * 2) * n_rows + offs_r))
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(NUM_SPLITS):
        base = pid_bh.to(tl.int64) * NUM_SPLITS + split
        weight = tl.exp2(tl.load(PART_ML + (base * 2) * n_rows + offs_r) - m_max)  # 0 for an empty split
        l_sum += weight * tl.load(PART_ML + (base * 2 + 1) * n_rows + offs_r)
        acc += weight[:, None] * tl.load(PART_ACC + (base * n_rows + offs_r[:, None]) * BLOCK_D + offs_d[None, :])
    out = acc / l_sum[:, None]
    q_idx = offs_r // GROUP
    q_head = kvh * GROUP + offs_r % GROUP
    mask = (offs_r < q_len * GROUP)[:, None] & (offs_d < head_dim)[None, :]
    o_ptrs = (O + b.to(tl.int64) * stride_ob + q_idx[:, None] * stride_om + q_head[:, None] * stride_oh
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask)


def _prefill_configs():
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
    ]


def _decode_configs():
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n, warps, stages in [(64, 4, 3), (128, 4, 3), (256, 8, 2)]
    ]


_KEY = ["rows_bucket", "head_dim", "GROUP", "NUM_SPLITS"]
_attn_fwd_prefill = triton.autotune(configs=_prefill_configs(), key=_KEY)(_attn_fwd_kernel)
_attn_fwd_decode = triton.autotune(configs=_decode_configs(), key=_KEY)(_attn_fwd_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(batch: int, kv_heads: int, window: int, device: torch.device) -> int:
    """Split-K factor for the decode configuration: about two programs per SM, chunks of >= 128 cache positions.

    Decided from the cache capacity W (the lengths live on the device); programs past a row's length exit
    early, so a short row in a long cache costs little."""
    if device.type != "cuda" or window < 256:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    wanted = triton.cdiv(2 * _sm_count(index), batch * kv_heads)
    return max(1, min(wanted, window // 128, 64))


def _check(q, k_new, v_new, k_cache, v_cache, cache_lens):
    tensors = {"q": q, "k_new": k_new, "v_new": v_new, "k_cache": k_cache, "v_cache": v_cache}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-dim tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype}: expected one of {_DTYPES}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    check_kernel_device("q", q)
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads, window = k_cache.shape[1], k_cache.shape[2]
    if k_new.shape != (batch, q_len, kv_heads, head_dim) or v_new.shape != k_new.shape:
        raise ValueError(
            f"k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)}: expected (B, Lq, Hkv, D) = "
            f"{(batch, q_len, kv_heads, head_dim)}"
        )
    if k_cache.shape != (batch, kv_heads, window, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}: expected equal (B, Hkv, W, D) with "
            f"B={batch}, D={head_dim}"
        )
    if q_heads % kv_heads:
        raise ValueError(f"q has {q_heads} heads, expected a multiple of the cache's {kv_heads} heads")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim}: expected 1..{MAX_HEAD_DIM}")
    if q_len < 1:
        raise ValueError(f"q has Lq={q_len} positions, expected at least 1")
    if not isinstance(cache_lens, torch.Tensor) or cache_lens.shape != (batch,) or cache_lens.dtype not in (
        torch.int32, torch.int64
    ):
        raise ValueError(
            f"cache_lens: expected a ({batch},) int32/int64 tensor, got "
            f"{getattr(cache_lens, 'shape', type(cache_lens))} {getattr(cache_lens, 'dtype', '')}"
        )
    if cache_lens.device != q.device:
        raise ValueError(f"cache_lens is on {cache_lens.device}, expected q's device {q.device}")
    if q.device.type == "cpu":  # free to check here; on a GPU it would cost a host sync
        longest = int(cache_lens.max()) + q_len
        if int(cache_lens.min()) < 0 or longest > window:
            raise ValueError(
                f"cache_lens + Lq reaches {longest} (min len {int(cache_lens.min())}): expected 0..{window}"
            )


def _attention(q, k_new, v_new, k_cache, v_cache, cache_lens, scale=None, num_splits=None, block=None, out=None):
    """``attention_with_kvcache`` with explicit launch choices (tests, benchmarks): ``num_splits`` for split-K,
    ``block`` = (BLOCK_M, BLOCK_N) to bypass autotuning, ``out`` (B, Lq, Hq, D) to write into."""
    _check(q, k_new, v_new, k_cache, v_cache, cache_lens)
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads, window = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    rows = q_len * group
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out: expected {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    interp = interpreting()
    decode = rows <= DECODE_ROWS
    if num_splits is None:
        num_splits = decode_splits(batch, kv_heads, window, q.device) if decode else 1
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits}: expected >= 1")
    meta = dict(
        GROUP=group,
        BLOCK_D=block_d,
        NUM_SPLITS=num_splits,
        UPCAST=interp and q.dtype == torch.bfloat16,  # the interpreter's bf16 dot is wrong
        PRECISION="ieee" if q.dtype == torch.float32 else None,
    )
    # Decode rows fit one block; otherwise BLOCK_M/BLOCK_N are autotuned on a GPU (fixed under the interpreter).
    fixed = block is not None or interp
    if block is not None:
        meta.update(BLOCK_M=block[0], BLOCK_N=block[1])
    elif decode:
        meta.update(BLOCK_M=max(16, triton.next_power_of_2(rows)), **({"BLOCK_N": 64} if interp else {}))
    elif interp:
        meta.update(BLOCK_M=64, BLOCK_N=64)
    if num_splits > 1 and "BLOCK_M" not in meta:
        raise ValueError(f"num_splits={num_splits} needs the decode configuration (Lq * G <= {DECODE_ROWS}) or a block")
    rows_bucket = min(triton.next_power_of_2(rows), 4096)

    part_acc = part_ml = out  # placeholders unless split
    if num_splits > 1:
        n_rows = triton.cdiv(rows, meta["BLOCK_M"]) * meta["BLOCK_M"]
        part_acc = torch.empty(batch * kv_heads, num_splits, n_rows, block_d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(batch * kv_heads, num_splits, 2, n_rows, dtype=torch.float32, device=q.device)

    def grid(m):
        return (triton.cdiv(rows, m["BLOCK_M"]), batch * kv_heads, num_splits)

    args = (
        q, k_new, v_new, k_cache, v_cache, cache_lens, out, part_acc, part_ml,
        scale * 1.4426950408889634,
        *q.stride(), *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        q_len, window, kv_heads, head_dim, rows_bucket,
    )
    if fixed:
        _attn_fwd_kernel[grid(meta)](*args, **meta, num_warps=4, num_stages=2)
    elif decode:
        _attn_fwd_decode[grid](*args, **meta)
    else:
        _attn_fwd_prefill[grid](*args, **meta)
    if num_splits > 1:
        block_m = meta["BLOCK_M"]
        n_rows = part_acc.shape[2]
        _split_merge_kernel[(n_rows // block_m, batch * kv_heads)](
            part_acc, part_ml, out, *out.stride(), q_len, kv_heads, head_dim, n_rows,
            GROUP=group, BLOCK_M=block_m, BLOCK_D=block_d, NUM_SPLITS=num_splits, num_warps=4,
        )
    return out


def attention_with_kvcache(q, k_new, v_new, k_cache, v_cache, cache_lens, scale=None, *, num_splits=None, out=None):
    """Append k_new/v_new to the KV cache and attend causally, in one launch (two with split-K decode).

    Args:
        q: (B, Lq, Hq, D) queries; fp16, bf16 or fp32; any strides.
        k_new, v_new: (B, Lq, Hkv, D) keys/values of the Lq new positions; Hq must be a multiple of Hkv.
        k_cache, v_cache: (B, Hkv, W, D) caches, written in place at ``[cache_lens[b], cache_lens[b] + Lq)``.
            k_new/v_new may alias exactly those positions (the write then stores equal values).
        cache_lens: (B,) int32/int64 device tensor, cached positions per row before this call; not advanced.
        scale: softmax scale, default 1/sqrt(D).
        num_splits: split-K factor, for decode only (Lq * Hq / Hkv <= 64; more than 1 otherwise is an error);
            default: ``decode_splits(B, Hkv, W, device)`` for decode (from the cache capacity and the GPU's SM
            count), 1 for prefill.
        out: (B, Lq, Hq, D) tensor of q's dtype to write the result into (default: a new one).

    Returns:
        out: (B, Lq, Hq, D), dtype of q: query i of row b attends to positions ``[0, cache_lens[b] + i]``
        (bottom-right aligned causal mask).  Cache positions at or past ``cache_lens[b] + Lq`` are neither read
        nor written.  ``cache_lens[b] + Lq <= W`` is checked on CPU tensors only (on a GPU it would need a host
        sync); on a GPU, positions past W are dropped instead of written out of bounds.
    """
    return _attention(q, k_new, v_new, k_cache, v_cache, cache_lens, scale=scale, num_splits=num_splits, out=out)
