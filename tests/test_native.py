"""The native ops (torch.ops.hmt.*, hmt_runtime.native.kernels) against float64 torch references, and the fallback.

Sizes are deliberately odd (head dims that are not multiples of 8, per-row cache lengths, window ends), so the
vector tails, the causal masks and the split key ranges are all exercised.
"""
import sys
import warnings

import pytest
import torch

from hmt_runtime.incremental import backend as ops_module
from hmt_runtime.native import kernels as native
from hmt_runtime.incremental.backend import resolve_ops
from hmt_runtime.core.ops import TORCH_OPS, attention_with_kvcache_torch, memory_write_torch, recall_torch

needs_native = pytest.mark.skipif(
    not native.available(), reason="the native extension hmt_runtime._C is not built (pip install -e . --no-build-isolation)"
)

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture
def threads():
    """Run a test body with a given intra-op thread count, restoring it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _attention_case(batch, q_len, kv_heads, ratio, head_dim, window, dtype, seed, full_row=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, kv_heads * ratio, head_dim, generator=g).to(dtype)
    k_new = torch.randn(batch, q_len, kv_heads, head_dim, generator=g).to(dtype)
    v_new = torch.randn(batch, q_len, kv_heads, head_dim, generator=g).to(dtype)
    k_cache = torch.randn(batch, kv_heads, window, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(batch, kv_heads, window, head_dim, generator=g).to(dtype)
    lens = torch.randint(0, window - q_len + 1, (batch,), generator=g)
    lens[0] = 0  # an empty cache
    if full_row and batch > 1:
        lens[-1] = window - q_len  # fills the window exactly
    return q, k_new, v_new, k_cache, v_cache, lens


def _check_attention(q, k_new, v_new, k_cache, v_cache, lens, scale=None):
    """Run the native op and compare output and caches with the float64 reference."""
    dtype = q.dtype
    ref_k, ref_v = k_cache.double(), v_cache.double()
    expected = attention_with_kvcache_torch(q.double(), k_new.double(), v_new.double(), ref_k, ref_v, lens, scale)
    # Positions beyond cache_lens + Lq must never be read or written: poison them.
    k_run, v_run = k_cache.clone(), v_cache.clone()
    window = k_cache.shape[2]
    beyond = torch.arange(window)[None, :] >= (lens + q.shape[1])[:, None]  # (B, W)
    k_run[beyond[:, None, :, None].expand_as(k_run)] = float("nan")
    v_run[beyond[:, None, :, None].expand_as(v_run)] = float("nan")
    out = torch.ops.hmt.attention_with_kvcache(q, k_new, v_new, k_run, v_run, lens.to(torch.int32), scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    inside = ~beyond[:, None, :, None].expand_as(k_run)
    assert torch.equal(k_run.double()[inside], ref_k[inside])  # appended rows exact, earlier rows untouched
    assert torch.equal(v_run.double()[inside], ref_v[inside])
    assert torch.isnan(k_run[~inside]).all() and torch.isnan(v_run[~inside]).all()  # beyond: untouched


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio", [1, 3, 7])
@pytest.mark.parametrize("head_dim", [64, 37])
def test_attention_decode(dtype, ratio, head_dim):
    case = _attention_case(batch=3, q_len=1, kv_heads=2, ratio=ratio, head_dim=head_dim, window=203, dtype=dtype,
                           seed=ratio * 100 + head_dim)
    _check_attention(*case)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio", [1, 3, 7])
@pytest.mark.parametrize("q_len, head_dim", [(13, 40), (70, 37)])
def test_attention_prefill(dtype, ratio, q_len, head_dim):
    case = _attention_case(batch=2, q_len=q_len, kv_heads=2, ratio=ratio, head_dim=head_dim, window=q_len + 77, dtype=dtype,
                           seed=ratio * 10 + q_len)
    _check_attention(*case)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [511, 515])
def test_attention_long_prefill_into_empty_cache(dtype, q_len):
    # From 512 queries into an empty cache the arithmetic goes to ATen's flash attention (after the fused append);
    # 511 is the longest such prefill the native kernel serves.
    case = _attention_case(batch=2, q_len=q_len, kv_heads=3, ratio=3, head_dim=64, window=530, dtype=dtype,
                           seed=q_len, full_row=False)
    case[5].zero_()
    _check_attention(*case)
    _check_attention(*case, scale=0.2)


@needs_native
def test_attention_scale_strided_query_and_float16():
    q, k_new, v_new, k_cache, v_cache, lens = _attention_case(2, 5, 3, 3, 24, 50, torch.float32, seed=7)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Lq, Hq, D) view of a (B, Hq, Lq, D) buffer
    assert not q_strided.is_contiguous()
    _check_attention(q_strided, k_new, v_new, k_cache, v_cache, lens, scale=0.3)
    half = [t.half() for t in (q, k_new, v_new, k_cache, v_cache)]
    out = torch.ops.hmt.attention_with_kvcache(*half, lens)
    expected = attention_with_kvcache_torch(*[t.double() for t in half], lens)
    torch.testing.assert_close(out.double(), expected, atol=5e-3, rtol=5e-3)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_split_key_range_matches_single_thread(dtype, threads):
    # One batch row and few KV heads: with 2 threads the key range of each head is split and merged.
    case = _attention_case(batch=1, q_len=1, kv_heads=3, ratio=3, head_dim=64, window=901, dtype=dtype, seed=3)
    case[5][0] = 777
    outs = []
    for n in (1, 2):
        threads(n)
        k_cache, v_cache = case[3].clone(), case[4].clone()
        outs.append(torch.ops.hmt.attention_with_kvcache(case[0], case[1], case[2], k_cache, v_cache, case[5]))
    torch.testing.assert_close(outs[0].float(), outs[1].float(), **TOL[dtype])
    threads(2)
    _check_attention(*case)


@needs_native
def test_attention_errors_name_the_argument():
    q, k_new, v_new, k_cache, v_cache, lens = _attention_case(2, 3, 2, 2, 16, 20, torch.float32, seed=1)
    with pytest.raises(ValueError, match="multiple of the cache's 2 heads"):
        torch.ops.hmt.attention_with_kvcache(q[:, :, :3], k_new, v_new, k_cache, v_cache, lens)
    with pytest.raises(ValueError, match=r"cache_lens\[1\] = 18.*exceeds the cache window"):
        torch.ops.hmt.attention_with_kvcache(q, k_new, v_new, k_cache, v_cache, torch.tensor([0, 18]))
    with pytest.raises(ValueError, match=r"k_new has shape \(2, 3, 2, 15\)"):
        torch.ops.hmt.attention_with_kvcache(q, k_new[..., :15], v_new, k_cache, v_cache, lens)
    with pytest.raises(TypeError, match="k_cache has dtype Double"):
        torch.ops.hmt.attention_with_kvcache(q, k_new, v_new, k_cache.double(), v_cache, lens)
    with pytest.raises(TypeError, match="cache_lens has dtype Float"):
        torch.ops.hmt.attention_with_kvcache(q, k_new, v_new, k_cache, v_cache, lens.float())


def _memory_case(batch, slots, width, key_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    summary = torch.randn(batch, width, generator=g).to(dtype)
    memory = torch.randn(batch, slots, width, generator=g).to(dtype)
    keys = torch.randn(batch, slots, key_dim, generator=g).to(dtype)
    w = (torch.randn(key_dim, width, generator=g) / width**0.5).to(dtype)
    return summary, memory, keys, w


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("written", [[0, 5], [13, 13], [14, 40]], ids=["below_N", "equal_N", "above_N"])
def test_recall(dtype, written):
    summary, memory, keys, w_q = _memory_case(2, 13, 44, 27, dtype, seed=sum(written))
    written = torch.tensor(written)
    expected = recall_torch(summary.double(), memory.double(), keys.double(), written, w_q.double())
    out = torch.ops.hmt.recall(summary, memory, keys, written, w_q)
    assert out.shape == (2, 44) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    if written[0] == 0:
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # nothing written: zeros (callers use M_init)


@needs_native
def test_recall_linear_scale_is_honoured():
    """recall_scale "linear" (scores / d_h): the native op has 1 / sqrt(d_h) built in, so the wrapper runs the
    torch recall with the given scale rather than ignoring it."""
    from hmt_runtime.core.ops import recall_scale_factor

    summary, memory, keys, w_q = _memory_case(2, 13, 44, 27, torch.float32, seed=3)
    keys = keys * 6
    written = torch.tensor([13, 5])
    scale = recall_scale_factor("linear", 27)
    expected = recall_torch(summary.double(), memory.double(), keys.double(), written, w_q.double(), scale=scale)
    out = torch.zeros(2, 3, 44)
    result = native.recall(summary, memory, keys, written, w_q, out=out[:, 1], scale=scale)
    assert result.data_ptr() == out[:, 1].data_ptr()
    torch.testing.assert_close(out[:, 1].double(), expected, **TOL[torch.float32])
    default = native.recall(summary, memory, keys, written, w_q)
    assert (default.double() - expected).abs().max() > 1e-2


@needs_native
def test_recall_split_slots_and_out_view(threads):
    # One row and many slots: split across threads; `out` may be a strided view (a row of an embedding buffer).
    summary, memory, keys, w_q = _memory_case(1, 301, 72, 96, torch.float32, seed=11)
    written = torch.tensor([1000])
    expected = recall_torch(summary.double(), memory.double(), keys.double(), written, w_q.double())
    buffer = torch.zeros(1, 3, 72)
    threads(2)
    result = native.recall(summary, memory, keys, written, w_q, out=buffer[:, 1])
    assert result.data_ptr() == buffer[:, 1].data_ptr()
    torch.testing.assert_close(buffer[:, 1].double(), expected, **TOL[torch.float32])
    assert torch.equal(buffer[:, 0], torch.zeros(1, 72)) and torch.equal(buffer[:, 2], torch.zeros(1, 72))
    threads(1)
    torch.testing.assert_close(native.recall(summary, memory, keys, written, w_q), buffer[:, 1], atol=1e-6, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("written", [[0, 4], [7, 7], [8, 23]], ids=["below_N", "equal_N", "above_N"])
def test_memory_write(dtype, written):
    new_memory, memory, keys, w_k = _memory_case(2, 7, 33, 19, dtype, seed=sum(written) + 1)
    written = torch.tensor(written)
    ref_memory, ref_keys, ref_written = memory.double(), keys.double(), written.clone()
    memory_write_torch(new_memory.double(), w_k.double(), ref_memory, ref_keys, ref_written)
    torch.ops.hmt.memory_write(new_memory, w_k, memory, keys, written)
    assert torch.equal(written, ref_written)
    assert torch.equal(memory.double(), ref_memory)  # the slot written % N holds M_n, every other slot untouched
    torch.testing.assert_close(keys.double(), ref_keys, **TOL[dtype])
    changed = (keys.double() != ref_keys.to(dtype).double()).any(-1)
    slots = (written - 1) % 7
    assert not changed[torch.arange(7)[None, :] != slots[:, None]].any()  # other key slots untouched


@needs_native
def test_memory_errors_name_the_argument():
    summary, memory, keys, w = _memory_case(2, 5, 8, 6, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"w_q has shape \(6, 7\)"):
        torch.ops.hmt.recall(summary, memory, keys, torch.tensor([1, 1]), w[:, :7])
    with pytest.raises(ValueError, match=r"written has shape \(3,\)"):
        torch.ops.hmt.recall(summary, memory, keys, torch.tensor([1, 1, 1]), w)
    with pytest.raises(ValueError, match=r"written\[1\] = -1"):
        torch.ops.hmt.memory_write(summary, w, memory, keys, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"keys has shape \(2, 4, 6\)"):
        torch.ops.hmt.memory_write(summary, w, memory, keys[:, :4], torch.tensor([0, 0]))


@needs_native
def test_wrappers_route_autograd_and_float64_to_torch():
    summary, memory, keys, w_q = _memory_case(2, 5, 12, 10, torch.float64, seed=4)
    written = torch.tensor([3, 9])
    assert torch.equal(native.recall(summary, memory, keys, written, w_q), recall_torch(summary, memory, keys, written, w_q))
    summary32 = summary.float().requires_grad_()
    out = native.recall(summary32, memory.float(), keys.float(), written, w_q.float())
    out.sum().backward()
    assert summary32.grad is not None and summary32.grad.abs().sum() > 0


@needs_native
def test_opcheck_schemas_and_fake_kernels():
    q, k_new, v_new, k_cache, v_cache, lens = _attention_case(2, 3, 2, 3, 16, 11, torch.float32, seed=5)
    torch.library.opcheck(torch.ops.hmt.attention_with_kvcache.default, (q, k_new, v_new, k_cache, v_cache, lens, None))
    summary, memory, keys, w = _memory_case(2, 5, 8, 6, torch.float32, seed=6)
    torch.library.opcheck(torch.ops.hmt.recall.default, (summary, memory, keys, torch.tensor([2, 7]), w))
    torch.library.opcheck(torch.ops.hmt.memory_write.default, (summary, w, memory, keys, torch.tensor([2, 7])))


@needs_native
def test_torch_compile_keeps_the_in_place_updates():
    """The schemas' mutation annotations and the fake kernels let torch.compile trace a whole step (fullgraph)."""

    def step(q, k_new, v_new, k_cache, v_cache, lens, summary, memory, keys, written, w_q, w_k):
        out = torch.ops.hmt.attention_with_kvcache(q, k_new, v_new, k_cache, v_cache, lens)
        recalled = torch.ops.hmt.recall(summary, memory, keys, written, w_q)
        torch.ops.hmt.memory_write(recalled, w_k, memory, keys, written)
        return out.sum() + recalled.sum()

    attention = _attention_case(1, 1, 3, 3, 32, 20, torch.float32, seed=8)
    summary, memory, keys, w = _memory_case(1, 5, 24, 16, torch.float32, seed=9)
    inputs = [*attention, summary, memory, keys, torch.tensor([3]), w, w.flip(0)]
    eager_inputs, compiled_inputs = [t.clone() for t in inputs], [t.clone() for t in inputs]
    expected = step(*eager_inputs)
    result = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled_inputs)
    torch.testing.assert_close(result, expected)
    for eager, compiled in zip(eager_inputs, compiled_inputs):  # caches, memory, keys and written all updated
        assert torch.equal(eager, compiled)
    assert int(compiled_inputs[9]) == 4


@needs_native
def test_native_ops_backend():
    backend = native.ops()
    assert backend.name == "native" and backend.attn_implementation == native.ATTN_IMPLEMENTATION
    assert resolve_ops("native", "cpu").name == "native"
    info = native.build_info()
    assert set(info) >= {"cuda", "openmp", "cpu_isa", "compiler"}


def test_missing_extension_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setitem(sys.modules, "hmt_runtime._C", None)  # the import now fails
    monkeypatch.setattr(ops_module, "_warned", set())
    assert not native.available()
    with pytest.raises(ImportError, match="pip install -e . --no-build-isolation"):
        native.ops()
    with pytest.raises(ImportError):
        resolve_ops("native", "cpu")  # asked for explicitly: fails loudly
    with pytest.warns(UserWarning, match="native kernels unavailable") as record:
        assert resolve_ops("auto", "cpu") is TORCH_OPS
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second resolve must not warn again
        assert resolve_ops("auto", "cpu") is TORCH_OPS


@needs_native
def test_hmt_model_native_equals_torch():
    try:
        from hmt_runtime import HMTConfig, HMTModel
    except ImportError as err:  # the model is optional for the ops themselves
        pytest.skip(f"hmt_runtime.HMTModel is not importable: {err}")
    from tiny import tiny_backbone

    def build(kernels):
        backbone = tiny_backbone("llama", seed=0, dtype=torch.float32)
        config = HMTConfig.from_window(19, sensory_tokens=3, memory_slots=2, recall_dim=24, kernels=kernels)
        torch.manual_seed(1)
        return HMTModel(backbone, config).eval()

    ids = torch.randint(3, 97, (2, 71), generator=torch.Generator().manual_seed(2))  # 5 segments, the last partial
    reference, model = build("torch"), build("native")
    with torch.no_grad():
        expected = reference(ids).logits
        expected_ids = reference.generate(ids[:, :30], max_new_tokens=20)  # crosses a segment boundary
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            logits = model(ids).logits
            generated = model.generate(ids[:, :30], max_new_tokens=20)
    names = {event.name for event in prof.events()}
    assert {"hmt::attention_with_kvcache", "hmt::recall", "hmt::memory_write"} <= names
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(generated, expected_ids)


@needs_native
def test_hmt_model_under_bf16_autocast_matches_torch_path():
    """Under autocast RoPE leaves keys in fp32 and values in bf16: the attention must not mix them."""
    from hmt_runtime import HMTConfig, HMTModel
    from tiny import tiny_backbone

    def logits(kernels):
        torch.manual_seed(0)
        cfg = HMTConfig(segment_tokens=9, sensory_tokens=3, summary_tokens=4, memory_slots=3, recall_dim=16,
                        kernels=kernels)
        model = HMTModel(tiny_backbone("llama", dtype=torch.float32), cfg).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.arange(30)[None] % 97).logits.float()

    assert (logits("native") - logits("torch")).abs().max() < 0.05
