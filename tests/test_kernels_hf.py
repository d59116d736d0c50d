"""transformers integration: register_attention, SegmentKVCache, "hmt_triton" as a drop-in for "sdpa", and
HMTModel with kernels="triton" against kernels="torch" (CPU: Triton interpreter, see conftest.py)."""
import copy
import dataclasses

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, Qwen2Config
from transformers.masking_utils import AttentionMaskInterface

import hmt_kernels
import hmt_kernels.hf
from hmt_kernels.hf import SegmentKVCache, cache_argument, register_attention
from hmt_runtime.core.ops import attention_with_kvcache_torch

VOCAB = 61


def tiny_config(kind="llama", head_dim=16, heads=4, kv_heads=2):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)


def model_pair(attn, config, seed=0):
    """The same random weights under "sdpa" and under ``attn`` (float32, eval)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").float().eval()
    other = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn).float().eval()
    other.load_state_dict(base.state_dict())
    assert base.config._attn_implementation == "sdpa" and other.config._attn_implementation == attn
    return base, other


def counting(op, calls):
    def wrapped(*args, **kwargs):
        calls.append(args[0].shape)
        return op(*args, **kwargs)

    return wrapped


@pytest.fixture(scope="module")
def reference_attention():
    """The torch reference op registered under a test name; returns (name, list of recorded calls)."""
    calls = []
    register_attention("hmt_test_reference", counting(attention_with_kvcache_torch, calls))
    return "hmt_test_reference", calls


def test_register_attention_registers_attention_and_mask(reference_attention):
    name, _ = reference_attention
    assert name in AttentionInterface._global_mapping
    assert name in AttentionMaskInterface._global_mapping
    with pytest.raises(ValueError, match="name=''"):
        register_attention("", attention_with_kvcache_torch)


def test_reference_op_plain_padded_and_generate(reference_attention):
    name, calls = reference_attention
    base, model = model_pair(name, tiny_config())
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        calls.clear()
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2  # one fused call per layer
        # Left padding: an explicit 4D mask, served by the sdpa fallback (the op is not called).
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        calls.clear()
        padded, expected = model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits
        assert len(calls) == 0
        torch.testing.assert_close(padded[0, 4:], expected[0, 4:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[1], expected[1], rtol=1e-5, atol=1e-5)
        # DynamicCache decode: keys already appended; the op sees them as the cache tail.
        calls.clear()
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        assert torch.equal(generated, base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                                    do_sample=False))
        assert len(calls) == 2 * 5 and calls[-1][1] == 1


def test_segment_kv_cache_defers_append_to_the_op(reference_attention):
    name, calls = reference_attention
    base, model = model_pair(name, tiny_config())
    ids = torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = base(ids).logits
        for m in (model, base):  # fused append (registered op), then the eager append (sdpa)
            cache = SegmentKVCache(m.config, window=24)
            calls.clear()
            kw = {cache_argument(m): cache, "use_cache": True}  # `past_key_values` in transformers 5.17
            parts = [m(ids[:, a:b], **kw).logits for a, b in ((0, 7), (7, 16), (16, 17))]
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
            assert cache.get_seq_length() == 17 and cache.layers[1].lens.tolist() == [17, 17]
            assert len(calls) == (6 if m is model else 0)
        torch.testing.assert_close(cache.layers[0].keys[:, :, 17:], torch.zeros_like(cache.layers[0].keys[:, :, 17:]))
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.layers[0].lens.tolist() == [0, 0]
        with pytest.raises(ValueError, match="exceeds the window 24"):
            model(torch.randint(3, VOCAB, (2, 25)), **{cache_argument(model): cache}, use_cache=True)


def test_segment_kv_cache_reports_an_append_the_attention_never_performed(reference_attention):
    """A deferred append whose keys never reach the registered attention is an error, not a silent gap."""
    name, _ = reference_attention
    config = tiny_config()
    config._attn_implementation = name
    cache = SegmentKVCache(config, window=8)
    k = torch.randn(1, 2, 3, 16)
    layer = cache.layers[0]
    assert layer.update(k, k.clone(), 0)[0] is k  # deferred: the new states come back unchanged
    with pytest.raises(RuntimeError, match="never performed"):
        cache.layers[1].update(k.clone(), k.clone(), 1)
    layer.reset()  # the slot is clear again: the next update defers normally
    assert layer.update(k, k.clone(), 0)[0] is k
    cache.reset()


@pytest.mark.parametrize("kind,head_dim,heads,kv_heads", [("llama", 16, 4, 2), ("qwen2", 20, 7, 1)])
def test_hmt_triton_drop_in_for_sdpa(kind, head_dim, heads, kv_heads, monkeypatch):
    """Same logits as sdpa (head dim 16 and the masked 20, GQA 2 and 7), same greedy tokens with DynamicCache
    and with SegmentKVCache, all through the kernel (no sdpa fallback)."""
    hmt_kernels.register()

    def no_fallback(*args, **kwargs):
        pytest.fail("hmt_triton fell back to sdpa")

    monkeypatch.setattr(hmt_kernels.hf, "_sdpa_fallback", no_fallback)
    base, model = model_pair("hmt_triton", tiny_config(kind, head_dim, heads, kv_heads), seed=3)
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(4))
    ones = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
        expected = base.generate(ids, attention_mask=ones, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, attention_mask=ones, max_new_tokens=6, do_sample=False), expected)
        cache = SegmentKVCache(model.config, window=32)
        got = model.generate(ids, attention_mask=ones, max_new_tokens=6, do_sample=False,
                             **{cache_argument(model): cache})
        assert torch.equal(got, expected)
        assert cache.layers[0].lens.tolist() == [26, 26]  # 21 prompt + 5 fed back (the 6th token is not fed)


def test_hmt_triton_falls_back_for_float64_and_gradients():
    hmt_kernels.register()
    base, model = model_pair("hmt_triton", tiny_config(), seed=5)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    # Autograd recording: sdpa fallback, gradients flow.
    model(ids).logits.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(model.double()(ids).logits, base.double()(ids).logits)


def test_ops_backend():
    from hmt_runtime.incremental.backend import triton_ops

    ops = triton_ops()
    assert ops.name == "triton" and ops.attn_implementation == "hmt_triton"
    assert "hmt_triton" in AttentionInterface._global_mapping


def test_hmt_model_triton_equals_torch(monkeypatch):
    """HMTModel end to end: kernels="triton" (recall, memory write and backbone attention) equals "torch"."""
    try:
        from hmt_runtime import HMTConfig, HMTModel
    except ImportError as err:  # pragma: no cover - only while hmt_runtime lacks the model
        pytest.skip(f"hmt_runtime does not expose HMTConfig/HMTModel yet: {err}")
    from hmt_kernels.attention import attention_with_kvcache
    from tiny import tiny_backbone

    import hmt_runtime.incremental.backend

    calls = {"recall": [], "memory_write": [], "attention": []}
    real_ops = hmt_runtime.incremental.backend.triton_ops

    def counted_ops():  # the Triton backend, every op counted
        ops = real_ops()
        register_attention("hmt_triton", counting(attention_with_kvcache, calls["attention"]),
                           supports=hmt_kernels._triton_supports, tail_aliasing=True)
        return dataclasses.replace(ops, recall=counting(ops.recall, calls["recall"]),
                                   memory_write=counting(ops.memory_write, calls["memory_write"]))

    monkeypatch.setattr(hmt_runtime.incremental.backend, "triton_ops", counted_ops)
    models = {}
    for kernels in ("torch", "triton"):
        cfg = HMTConfig(segment_tokens=9, sensory_tokens=3, summary_tokens=4, memory_slots=3, recall_dim=24,
                        recall="causal", kernels=kernels)
        torch.manual_seed(0)
        models[kernels] = HMTModel(tiny_backbone("qwen2", seed=1, dtype=torch.float32), cfg).float().eval()
    models["triton"].load_state_dict(models["torch"].state_dict())
    try:
        with torch.no_grad():
            for m in models.values():  # make the recall weights matter
                torch.manual_seed(7)
                m.recall.w_q.weight.normal_(0, 1.0)
                m.recall.w_k.weight.normal_(0, 1.0)
            ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(8))
            expected = models["torch"](ids).logits
            got = models["triton"](ids).logits
            assert models["triton"].prepare_ops().name == "triton"
            # Generation writes memory through memory_write at every segment boundary.
            expected_ids = models["torch"].generate(ids[:1, :20], max_new_tokens=10)
            got_ids = models["triton"].generate(ids[:1, :20], max_new_tokens=10)
    finally:
        hmt_kernels.register()  # the uncounted attention again
    assert models["triton"].backbone.config._attn_implementation == "hmt_triton"
    # 40 tokens in segments of 9: 5 segments, 4 recalls; attention in both backbone passes of every segment.
    assert len(calls["recall"]) >= 4 and len(calls["attention"]) >= 2 * 9
    assert len(calls["memory_write"]) == 3  # 30 tokens in segments of 9: 3 boundaries
    assert got.shape == expected.shape == (2, 40, 97)
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
