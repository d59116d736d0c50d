"""hmt_runtime.training.evaluate against direct computations on a tiny float64 backbone.

Each backbone baseline is checked token by token: the reference runs one fresh forward per scored token over
exactly the context the method defines, so an off-by-one in any window arithmetic changes the figure."""
import math

import pytest
import torch

from hmt_runtime import HMTConfig, HMTModel
from hmt_runtime.training.evaluate import evaluate, format_table, rmt_view, streaming_nll
from tiny import VOCAB, tiny_backbone

SEGMENT, SENSORY = 8, 3  # W = 13


def make_model(seed=0):
    cfg = HMTConfig(segment_tokens=SEGMENT, sensory_tokens=SENSORY, summary_tokens=4, memory_slots=3,
                    recall_dim=16, recall="causal", kernels="torch")
    model = HMTModel(tiny_backbone("llama", seed), cfg).double().eval()
    torch.manual_seed(seed + 7)
    with torch.no_grad():
        model.recall.w_q.weight.normal_(0, 1.0)
        model.recall.w_k.weight.normal_(0, 1.0)
    return model


def nll_given(backbone, context: torch.Tensor, target: int) -> float:
    """-log p(target | context) from one forward of the backbone over context (1-D ids)."""
    logits = backbone(input_ids=context[None]).logits[0, -1].double()
    return float(-torch.log_softmax(logits, -1)[target])


def reference_backbone_ppl(backbone, docs, context_start) -> float:
    """Perplexity where token t of a document is predicted from doc[context_start(t) : t]."""
    total, count = 0.0, 0
    for doc in docs:
        for t in range(1, doc.numel()):
            total += nll_given(backbone, doc[context_start(t) : t], int(doc[t]))
            count += 1
    return math.exp(total / count)


def reference_hmt_ppl(model, docs, use_recall=True) -> float:
    total, count = 0.0, 0
    for doc in docs:
        logits = model(doc[None], use_recall=use_recall).logits[0, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits, doc[1:], reduction="sum"))
        count += doc.numel() - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(3)
    model = make_model()
    docs = [torch.randint(0, VOCAB, (41,)), torch.randint(0, VOCAB, (30,))]  # not multiples of W or Ls
    with torch.no_grad():
        result = evaluate(model, docs, segments=2, full_context=25)
    return model, docs, result


def test_backbone_baselines_match_direct_computation(setup):
    model, docs, result = setup
    window, stride = model.config.window, model.config.window // 4
    bb = model.backbone
    with torch.no_grad():
        windows = reference_backbone_ppl(bb, docs, lambda t: ((t - 1) // window) * window)
        full = reference_backbone_ppl(bb, docs, lambda t: ((t - 1) // 25) * 25)

        sliding = 0.0
        for doc in docs:  # windows end at W, W + s, W + 2s, ... (the last one at the document's end)
            def sliding_start(t, n=doc.numel()):
                end = window  # t is scored by the first window ending after it
                while end <= t:
                    end += stride
                return max(0, min(end, n) - window)

            sliding += math.log(reference_backbone_ppl(bb, [doc], sliding_start)) * (doc.numel() - 1)
        sliding = math.exp(sliding / (40 + 29))
    got = result["methods"]
    assert result["tokens"] == 40 + 29
    assert got["windows"]["ppl"] == pytest.approx(windows, rel=1e-9)
    assert got["sliding"]["ppl"] == pytest.approx(sliding, rel=1e-9)
    assert got["full"]["ppl"] == pytest.approx(full, rel=1e-9)
    assert got["sliding"]["ppl"] != pytest.approx(got["windows"]["ppl"], rel=1e-6)  # the methods differ


def test_windows_mean_per_window_ppl(setup):
    model, docs, result = setup
    window = model.config.window
    ppls = []
    with torch.no_grad():
        for doc in docs:
            for start in range(0, doc.numel(), window):
                chunk = doc[start : start + window]
                if chunk.numel() > 1:
                    logits = model.backbone(input_ids=chunk[None]).logits[0, :-1]
                    ppls.append(math.exp(float(torch.nn.functional.cross_entropy(logits, chunk[1:]))))
    assert result["methods"]["windows"]["last_segment_ppl"] == pytest.approx(sum(ppls) / len(ppls), rel=1e-9)


def test_hmt_methods_match_teacher_forced_forward(setup):
    model, docs, result = setup
    got = result["methods"]
    with torch.no_grad():
        assert got["hmt"]["ppl"] == pytest.approx(reference_hmt_ppl(model, docs), rel=1e-9)
        assert got["hmt-no-recall"]["ppl"] == pytest.approx(reference_hmt_ppl(model, docs, False), rel=1e-9)
        rmt = rmt_view(model)
        assert rmt.config.sensory_tokens == 0 and rmt.config.window == model.config.window
        assert got["rmt"]["ppl"] == pytest.approx(reference_hmt_ppl(rmt, docs, False), rel=1e-9)
    assert got["hmt"]["ppl"] != pytest.approx(got["hmt-no-recall"]["ppl"], rel=1e-6)


def test_hmt_last_segment_ppl_is_mean_over_windows(setup):
    model, docs, result = setup
    length = 2 * SEGMENT
    ppls = []
    with torch.no_grad():
        for doc in docs:
            for start in range(0, doc.numel() - length + 1, length):
                ids = doc[None, start : start + length]
                ppls.append(math.exp(float(model(ids, labels=ids, loss_on="last_segment").loss)))
    assert len(ppls) == 2 + 1
    assert result["methods"]["hmt"]["last_segment_ppl"] == pytest.approx(sum(ppls) / len(ppls), rel=1e-9)


def test_table_and_method_selection(setup):
    model, docs, result = setup
    table = format_table(result)
    assert table.count("\n| ") == 1 + 7  # header + one row per method
    assert "sliding window 13, stride 3" in table
    only = evaluate(model, docs[:1], methods=["windows"])
    assert list(only["methods"]) == ["windows"]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        evaluate(model, docs, methods=["nope"])
    with pytest.raises(ValueError, match="adapter"):
        evaluate(model, docs, methods=["adapted-windows"])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate(model, [torch.tensor([5])])


# ------------------------------------------------------------------------------------------ streaming (sinks)
def _rotate(keys, rotary, shift):
    """keys (1, H, L, D) rotated by ``shift`` positions (RoPE composes: R(p + shift) = R(shift) R(p))."""
    cos, sin = rotary(keys, torch.full((1, keys.shape[2]), shift, dtype=torch.long))
    cos, sin = cos[:, None], sin[:, None]
    half = keys.shape[-1] // 2
    return keys * cos + torch.cat((-keys[..., half:], keys[..., :half]), -1) * sin


def reference_streaming_nll(backbone, doc, window, sinks=4):
    """StreamingLLM token by token through the backbone's own forward: a KV cache of at most ``window``
    positions, keys rotated at their cache position; when full, the oldest non-sink entry is evicted and the
    later ones are re-rotated one position down.  Returns per-token NLL (S-1,) in float64."""
    from transformers import DynamicCache

    body = backbone.model
    keys = values = None  # per layer lists of (1, Hkv, P, D), rotated at cache positions 0..P-1
    out = []
    for t in range(doc.numel() - 1):
        if keys is not None and keys[0].shape[2] == window:  # make room: evict position `sinks`, shift the rest
            keys = [torch.cat([k[:, :, :sinks], _rotate(k[:, :, sinks + 1 :], body.rotary_emb, -1)], 2) for k in keys]
            values = [torch.cat([v[:, :, :sinks], v[:, :, sinks + 1 :]], 2) for v in values]
        cache = DynamicCache()
        length = 0
        if keys is not None:
            for layer, (k, v) in enumerate(zip(keys, values)):
                cache.update(k, v, layer)
            length = keys[0].shape[2]
        res = backbone(input_ids=doc[None, t : t + 1], position_ids=torch.tensor([[length]]),
                       past_key_values=cache, use_cache=True)
        logp = torch.log_softmax(res.logits[0, -1].double(), -1)
        out.append(-logp[int(doc[t + 1])])
        new = res.past_key_values
        keys = [new.layers[i].keys for i in range(len(body.layers))]
        values = [new.layers[i].values for i in range(len(body.layers))]
        assert keys[0].shape[2] <= window
    return torch.stack(out)


@pytest.mark.parametrize("family,window,chunk", [("llama", 13, None), ("llama", 9, 5), ("qwen2", 11, 7),
                                                  ("mistral", 10, 3)])
def test_streaming_matches_token_by_token_cache_with_sinks(family, window, chunk):
    torch.manual_seed(11)
    backbone = tiny_backbone(family, seed=4)
    doc = torch.randint(0, VOCAB, (37,))  # several evictions, not a multiple of the window or the chunk
    with torch.no_grad():
        expected = reference_streaming_nll(backbone, doc, window)
        total, got = streaming_nll(backbone, backbone.lm_head, doc, window, chunk=chunk)
        # the first `window` tokens see everything before them: equal to the plain backbone there
        plain = torch.log_softmax(backbone(input_ids=doc[None, :window]).logits[0].double(), -1)
        plain_nll = -plain[torch.arange(window - 1), doc[1:window]]
    assert got.shape == (36,)
    # transformers builds its rotary tables in float32, and the reference composes rotations: agree to 1e-7
    assert torch.allclose(got, expected, rtol=1e-7, atol=1e-7)
    assert total == pytest.approx(float(got.sum()), rel=1e-12)
    assert torch.allclose(got[: window - 1], plain_nll, rtol=1e-9, atol=1e-9)
    # past the window, the view differs from full context (the test can tell the methods apart)
    full = torch.log_softmax(backbone(input_ids=doc[None]).logits[0].double(), -1)
    full_nll = -full[torch.arange(36), doc[1:]]
    assert not torch.allclose(got[window:], full_nll[window:], rtol=1e-6, atol=1e-6)


def test_streaming_in_evaluate_and_its_errors(setup):
    model, docs, result = setup
    with torch.no_grad():
        direct = sum(streaming_nll(model.backbone, model.lm_logits, doc, model.config.window)[0] for doc in docs)
    assert result["methods"]["streaming"]["ppl"] == pytest.approx(math.exp(direct / result["tokens"]), rel=1e-9)
    with pytest.raises(ValueError, match="window=4"):
        streaming_nll(model.backbone, model.lm_logits, docs[0], 4)
    gpt2 = tiny_backbone("gpt2", seed=1)
    with pytest.raises(ValueError, match="rotary positions"):
        streaming_nll(gpt2, gpt2.lm_head, docs[0], 13)
