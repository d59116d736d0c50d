"""Triton attention_with_kvcache against a float64 reference (CPU: Triton interpreter, see conftest.py)."""
import math

import pytest
import torch

from hmt_kernels.attention import _attention, attention_with_kvcache
from hmt_runtime.core.ops import attention_with_kvcache_torch

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GUARD = 5  # poisoned positions on each side of the cache window / head dim
POISON = float("nan")


def reference(q, k_new, v_new, k_cache, v_cache, lens, scale=None):
    """float64 attention over the cache as it was before the call, plus the cache after the append.

    The poison beyond each row's length is zeroed first: the torch reference multiplies masked values by 0."""
    k64, v64 = k_cache.double().nan_to_num(0.0), v_cache.double().nan_to_num(0.0)
    out = attention_with_kvcache_torch(q.double(), k_new.to(k_cache.dtype).double(), v_new.to(v_cache.dtype).double(),
                                       k64, v64, lens, scale)
    return out, k64, v64


def make_case(batch, q_len, q_heads, kv_heads, head_dim, window, lens, dtype, seed):
    """Random inputs; the caches are views inside NaN-poisoned buffers, NaN beyond each row's valid length."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=g).to(dtype)
    k_new = torch.randn(batch, q_len, kv_heads, head_dim, generator=g).to(dtype)
    v_new = torch.randn(batch, q_len, kv_heads, head_dim, generator=g).to(dtype)
    buffers = []
    for _ in range(2):
        buf = torch.full((batch, kv_heads, window + 2 * GUARD, head_dim + 2 * GUARD), POISON, dtype=dtype)
        cache = buf[:, :, GUARD : GUARD + window, GUARD : GUARD + head_dim]
        for b, n in enumerate(lens):
            cache[b, :, :n] = torch.randn(kv_heads, n, head_dim, generator=g).to(dtype)
        buffers.append((buf, cache))
    return q, k_new, v_new, buffers, torch.tensor(lens)


def check(q, k_new, v_new, buffers, lens, out, expected, k_ref, v_ref, tol):
    (k_buf, k_cache), (v_buf, v_cache) = buffers
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), "output not fully written"
    err = (out.double() - expected).abs().max().item()
    assert err < tol * max(1.0, expected.abs().max().item()), f"max error {err}"
    window = k_cache.shape[2]
    for cache, buf, ref in ((k_cache, k_buf, k_ref), (v_cache, v_buf, v_ref)):
        for b, n in enumerate(lens.tolist()):
            end = n + q.shape[1]
            # cache before len untouched, the new positions written (exactly the values cast to the cache dtype)
            torch.testing.assert_close(cache[b, :, :end].double(), ref[b, :, :end], rtol=0, atol=0)
            assert torch.isnan(cache[b, :, end:]).all(), "cache beyond len + Lq was written"
        guard = buf.clone()
        guard[:, :, GUARD : GUARD + window, GUARD : GUARD + cache.shape[3]] = POISON
        assert torch.isnan(guard).all(), "a write landed outside the cache view"


CASES = [
    # batch, q_len, q_heads, kv_heads, head_dim, window, lens, dtype
    (2, 37, 4, 4, 64, 120, [0, 41], torch.float32),  # GQA 1, prefill onto an empty and a filled row
    (2, 23, 9, 3, 64, 100, [13, 0], torch.float32),  # SmolLM2 heads (GQA 3)
    (1, 50, 8, 2, 80, 77, [27], torch.float32),  # GQA 4, head dim 80 (masked D)
    (2, 11, 14, 2, 96, 64, [5, 53], torch.float32),  # Qwen2-0.5B heads (GQA 7), head dim 96
    (2, 67, 4, 1, 128, 140, [70, 3], torch.float16),  # several row blocks, fp16
    (2, 19, 6, 2, 16, 50, [31, 7], torch.bfloat16),  # bf16, tiny head dim
    (3, 1, 9, 3, 64, 90, [0, 89, 40], torch.float16),  # decode, one row at the window's end
]


@pytest.mark.parametrize("batch,q_len,q_heads,kv_heads,head_dim,window,lens,dtype", CASES)
def test_prefill_and_decode_match_reference(batch, q_len, q_heads, kv_heads, head_dim, window, lens, dtype):
    q, k_new, v_new, buffers, lens_t = make_case(batch, q_len, q_heads, kv_heads, head_dim, window, lens, dtype,
                                                 seed=len(lens) + q_len)
    expected, k_ref, v_ref = reference(q, k_new, v_new, buffers[0][1], buffers[1][1], lens_t)
    out = torch.full_like(q, POISON)
    _attention(q, k_new, v_new, buffers[0][1], buffers[1][1], lens_t, out=out)
    check(q, k_new, v_new, buffers, lens_t, out, expected, k_ref, v_ref, TOL[dtype])


@pytest.mark.parametrize("num_splits,lens", [(3, [150, 0, 17]), (4, [149, 63, 1])])
def test_split_k_decode(num_splits, lens):
    """Split-K (partials merged by log-sum-exp), including rows whose splits are empty."""
    q, k_new, v_new, buffers, lens_t = make_case(3, 1, 14, 2, 64, 151, lens, torch.float32, seed=num_splits)
    expected, k_ref, v_ref = reference(q, k_new, v_new, buffers[0][1], buffers[1][1], lens_t)
    out = torch.full_like(q, POISON)
    _attention(q, k_new, v_new, buffers[0][1], buffers[1][1], lens_t, num_splits=num_splits, out=out)
    check(q, k_new, v_new, buffers, lens_t, out, expected, k_ref, v_ref, TOL[torch.float32])


def test_split_k_with_several_queries_and_small_blocks():
    """Split-K with Lq > 1 and blocks smaller than the rows (several row blocks, several key tiles per split)."""
    q, k_new, v_new, buffers, lens_t = make_case(2, 5, 6, 2, 80, 100, [61, 30], torch.float16, seed=7)
    expected, k_ref, v_ref = reference(q, k_new, v_new, buffers[0][1], buffers[1][1], lens_t, scale=0.3)
    out = torch.full_like(q, POISON)
    _attention(q, k_new, v_new, buffers[0][1], buffers[1][1], lens_t, scale=0.3, num_splits=3, block=(16, 16), out=out)
    check(q, k_new, v_new, buffers, lens_t, out, expected, k_ref, v_ref, TOL[torch.float16])


def test_public_function_strided_inputs_and_aliasing_tail():
    """Transposed (non-contiguous) q/k/v views as transformers passes them, with k_new/v_new aliasing the
    cache tail (keys already appended by DynamicCache)."""
    batch, q_len, q_heads, kv_heads, head_dim, total = 2, 9, 6, 3, 48, 29
    g = torch.Generator().manual_seed(3)
    query = torch.randn(batch, q_len, q_heads, head_dim, generator=g).transpose(1, 2)  # (B, Hq, Lq, D) view
    key = torch.randn(batch, total, kv_heads, head_dim, generator=g).transpose(1, 2)  # (B, Hkv, L, D) view
    value = torch.randn(batch, total, kv_heads, head_dim, generator=g).transpose(1, 2)
    lens = torch.full((batch,), total - q_len, dtype=torch.int32)
    expected = attention_with_kvcache_torch(
        query.transpose(1, 2).double(), key[:, :, -q_len:].transpose(1, 2).double(),
        value[:, :, -q_len:].transpose(1, 2).double(), key.double(), value.double(), lens,
    )
    key_before = key.clone()
    out = attention_with_kvcache(query.transpose(1, 2), key[:, :, -q_len:].transpose(1, 2),
                                 value[:, :, -q_len:].transpose(1, 2), key, value, lens)
    assert out.is_contiguous() and out.shape == (batch, q_len, q_heads, head_dim)
    assert torch.equal(key, key_before)
    assert (out.double() - expected).abs().max().item() < 2e-5


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k_new, v_new, buffers, lens_t = make_case(1, 3, 2, 1, 32, 10, [4], torch.float32, seed=11)
    k_cache, v_cache = buffers[0][1], buffers[1][1]
    expected, _, _ = reference(q, k_new, v_new, k_cache, v_cache, lens_t, scale=1 / math.sqrt(32))
    wrong, _, _ = reference(q, k_new, v_new, k_cache, v_cache, lens_t, scale=1.0)
    out = attention_with_kvcache(q, k_new, v_new, k_cache, v_cache, lens_t)
    assert (out.double() - expected).abs().max() < 2e-5
    assert (out.double() - wrong).abs().max() > 1e-2


def test_errors_name_the_argument():
    q = torch.randn(1, 2, 6, 16)
    k_new = torch.randn(1, 2, 4, 16)
    cache = torch.zeros(1, 4, 8, 16)
    lens = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="6 heads, expected a multiple"):
        attention_with_kvcache(q, k_new, k_new, cache, cache, lens)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="cache_lens \\+ Lq reaches 9"):
        attention_with_kvcache(q, k_new, k_new, cache, cache, torch.tensor([7]))
    with pytest.raises(ValueError, match="q.dtype=torch.float64"):
        attention_with_kvcache(q.double(), k_new, k_new, cache, cache, lens)
    with pytest.raises(ValueError, match="cache_lens: expected a \\(1,\\) int32/int64 tensor"):
        attention_with_kvcache(q, k_new, k_new, cache, cache, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_new .*expected \\(B, Lq, Hkv, D\\)"):
        attention_with_kvcache(q, k_new[:, :1], k_new, cache, cache, lens)
