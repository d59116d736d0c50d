"""Native CPU ops against the torch sequences they replace, at SmolLM2-135M shapes (pytest-benchmark).

    python -m pytest benchmarks/bench_native.py --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds

Each group holds the native op and its torch baseline, measured in the same run; pytest-benchmark prints each
one's time relative to the fastest of its group, so the ratio is read off the table.

* attention (9 query heads, 3 KV heads, head dim 64, batch 1, float32):
  - decode: one new token over a cache of L tokens (L = 64, 256, 1024).  Baseline: ``index_copy_`` of the new
    key/value into the cache + ``F.scaled_dot_product_attention`` over the L + 1 cached positions (GQA).
  - prefill: L new tokens into an empty cache (baseline: ``index_copy_`` + causal SDPA), and after 32 cached
    positions (baseline: ``index_copy_`` + SDPA with the bottom-right causal mask, built outside the timing).
    Into an empty cache, from 512 tokens, the native op itself hands the arithmetic to ATen's flash attention.
* recall (d = 576, d_h = 1536, N = 300 full slots) against ``hmt_runtime.core.ops.recall_torch`` (separate torch ops),
  and memory_write against ``memory_write_torch``.
* HMT generate on the default backbone (marked slow: loads SmolLM2-135M; about a minute): the whole model with
  ``kernels="native"`` against ``kernels="torch"``; the time includes the prompt's segment passes.
"""
import pytest
import torch
import torch.nn.functional as F

from hmt_runtime.native import kernels as native
from hmt_runtime.core.ops import memory_write_torch, recall_torch

pytestmark = pytest.mark.skipif(not native.available(), reason="the native extension hmt_runtime._C is not built")

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
WIDTH, RECALL_DIM, SLOTS = 576, 1536, 300
CACHE_LENS = (64, 256, 1024)


def _attention_inputs(cache_len: int, q_len: int):
    g = torch.Generator().manual_seed(cache_len + q_len)
    window = cache_len + q_len
    q = torch.randn(1, q_len, Q_HEADS, HEAD_DIM, generator=g)
    k_new = torch.randn(1, q_len, KV_HEADS, HEAD_DIM, generator=g)
    v_new = torch.randn(1, q_len, KV_HEADS, HEAD_DIM, generator=g)
    k_cache = torch.randn(1, KV_HEADS, window, HEAD_DIM, generator=g)
    v_cache = torch.randn(1, KV_HEADS, window, HEAD_DIM, generator=g)
    return q, k_new, v_new, k_cache, v_cache


def _torch_attention(q, k_new, v_new, k_cache, v_cache, positions, causal):
    """The torch sequence: index_copy_ the new keys/values into the cache, then SDPA over the filled part."""
    k_cache.index_copy_(2, positions, k_new.transpose(1, 2))
    v_cache.index_copy_(2, positions, v_new.transpose(1, 2))
    end = int(positions[-1]) + 1
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache[:, :, :end], v_cache[:, :, :end], is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("cache_len", CACHE_LENS)
def test_attention_decode(benchmark, impl, cache_len):
    benchmark.group = f"attention decode, cache {cache_len}"
    q, k_new, v_new, k_cache, v_cache = _attention_inputs(cache_len, 1)
    if impl == "native":
        lens = torch.tensor([cache_len], dtype=torch.int32)
        out = benchmark(native.attention_with_kvcache, q, k_new, v_new, k_cache, v_cache, lens)
    else:
        positions = torch.tensor([cache_len])
        out = benchmark(_torch_attention, q, k_new, v_new, k_cache, v_cache, positions, False)
    assert out.shape == q.shape


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("cached", [0, 32])
@pytest.mark.parametrize("q_len", CACHE_LENS)
def test_attention_prefill(benchmark, impl, q_len, cached):
    benchmark.group = f"attention prefill, {q_len} tokens after {cached} cached"
    q, k_new, v_new, k_cache, v_cache = _attention_inputs(cached, q_len)
    if impl == "native":
        lens = torch.full((1,), cached, dtype=torch.int32)
        out = benchmark(native.attention_with_kvcache, q, k_new, v_new, k_cache, v_cache, lens)
    elif cached == 0:
        positions = torch.arange(q_len)
        out = benchmark(_torch_attention, q, k_new, v_new, k_cache, v_cache, positions, True)
    else:  # bottom-right causal needs an explicit mask (SDPA's is_causal is top-left); built once, outside the timing
        positions = torch.arange(cached, cached + q_len)
        mask = torch.arange(cached + q_len)[None, :] <= positions[:, None]
        out = benchmark(_torch_attention_masked, q, k_new, v_new, k_cache, v_cache, positions, mask)
    assert out.shape == q.shape


def _torch_attention_masked(q, k_new, v_new, k_cache, v_cache, positions, mask):
    k_cache.index_copy_(2, positions, k_new.transpose(1, 2))
    v_cache.index_copy_(2, positions, v_new.transpose(1, 2))
    end = int(positions[-1]) + 1
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask, enable_gqa=True
    )
    return out.transpose(1, 2)


def _memory_inputs():
    g = torch.Generator().manual_seed(0)
    summary = torch.randn(1, WIDTH, generator=g)
    memory = torch.randn(1, SLOTS, WIDTH, generator=g)
    keys = torch.randn(1, SLOTS, RECALL_DIM, generator=g)
    weight = torch.randn(RECALL_DIM, WIDTH, generator=g) / WIDTH**0.5
    return summary, memory, keys, weight


@pytest.mark.parametrize("impl", ["native", "torch"])
def test_recall(benchmark, impl):
    benchmark.group = "recall, N=300 full"
    summary, memory, keys, w_q = _memory_inputs()
    written = torch.tensor([SLOTS + 7])
    fn = native.recall if impl == "native" else recall_torch
    with torch.no_grad():
        out = benchmark(fn, summary, memory, keys, written, w_q)
    assert out.shape == (1, WIDTH)


@pytest.mark.parametrize("impl", ["native", "torch"])
def test_memory_write(benchmark, impl):
    benchmark.group = "memory_write"
    new_memory, memory, keys, w_k = _memory_inputs()
    written = torch.tensor([5])
    fn = native.memory_write if impl == "native" else memory_write_torch
    with torch.no_grad():
        benchmark(fn, new_memory, w_k, memory, keys, written)
    assert int(written) > 5


@pytest.fixture(scope="module")
def default_models():
    """HMT on the default backbone (SmolLM2-135M, window 256) with the torch and the native ops, same weights."""
    from hmt_runtime import HMTConfig, HMTModel, load_backbone

    try:
        backbone, _ = load_backbone()
    except Exception as err:  # the weights package is not installed
        pytest.skip(f"the default backbone is not available: {err}")
    models = {}
    for kernels in ("torch", "native"):
        config = HMTConfig.from_window(256, sensory_tokens=32, memory_slots=300, recall_dim=1536, recall="causal",
                                       kernels=kernels)
        torch.manual_seed(0)
        models[kernels] = HMTModel(backbone, config).eval()
    return models


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["native", "torch"])
def test_hmt_generate(benchmark, default_models, impl):
    """Whole HMT generation on the default backbone: a 230-token prompt (one segment boundary), 16 new tokens."""
    benchmark.group = "HMT generate, SmolLM2-135M, 230 + 16 tokens"
    model = default_models[impl]
    prompt = torch.randint(10, 1000, (1, 230), generator=torch.Generator().manual_seed(0))
    new_tokens = 16
    with torch.no_grad():
        out = benchmark.pedantic(model.generate, args=(prompt,), kwargs={"max_new_tokens": new_tokens}, rounds=2)
    assert out.shape == (1, 230 + new_tokens)
