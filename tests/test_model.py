"""HMTModel against a plain re-implementation of the spec, on tiny random backbones in float64."""
import math

import pytest
import torch

from hmt_runtime import HMTConfig, HMTModel
from helpers import FAMILIES, VOCAB, make_model, tiny_backbone  # noqa: F401  (make_model: shared by other test files)


def reference_forward(model: HMTModel, ids: torch.Tensor):
    """HMT_SPEC.md "One segment", written out directly on the backbone's full forward."""
    bb, cfg = model.backbone, model.config
    embed = bb.get_input_embeddings()
    t, m_init = model.summary_prompt, model.memory_init
    w_q, w_k = model.recall.w_q.weight, model.recall.w_k.weight
    batch, length = ids.shape

    def run(emb):
        pos = torch.arange(emb.shape[1])[None].expand(batch, -1)
        out = bb(inputs_embeds=emb, position_ids=pos, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]

    cache, logits, memories = [], [], []
    for n, start in enumerate(range(0, length, cfg.segment_tokens)):
        x = ids[:, start : start + cfg.segment_tokens]
        if not cache:
            p = m_init.expand(batch, -1)
        else:
            q = x[:, : cfg.summary_tokens] if cfg.recall == "paper" else ids[:, start - cfg.summary_tokens : start]
            tb = t.expand(batch, 1, -1)
            _, h = run(torch.cat([tb, embed(q), tb], 1))
            s = h[:, -1]
            c = torch.stack(cache[-cfg.memory_slots :], 1)
            divisor = cfg.recall_dim if cfg.recall_scale == "linear" else math.sqrt(cfg.recall_dim)
            scores = torch.einsum("bh,bnh->bn", s @ w_q.T, c @ w_k.T) / divisor
            p = torch.einsum("bn,bnd->bd", torch.softmax(scores, -1), c)
        sens = ids[:, start - cfg.sensory_tokens : start] if n > 0 and cfg.sensory_tokens else ids[:, :0]
        emb = torch.cat([p[:, None], embed(sens), embed(x), p[:, None]], 1)
        lg, h = run(emb)
        logits.append(lg[:, 1 + sens.shape[1] : 1 + sens.shape[1] + x.shape[1]])
        cache.append(h[:, -1])
        memories.append(h[:, -1])
    return torch.cat(logits, 1), torch.stack(memories, 1)


def rel_err(a, b):
    return float(((a - b).abs().max() / b.abs().max()).detach())


@pytest.mark.parametrize("recall", ["paper", "causal"])
def test_llama_seven_segments_match_reference(recall):
    model = make_model("llama", recall)
    ids = torch.randint(0, VOCAB, (1, 7 * 9))  # 7 full segments, N = 3 < 7: eviction
    out = model(ids)
    ref_logits, ref_mem = reference_forward(model, ids)
    assert out.logits.shape == (1, 63, VOCAB) and out.memories.shape == (1, 7, model.width)
    assert rel_err(out.logits, ref_logits) < 1e-6
    assert rel_err(out.memories, ref_mem) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recall", ["paper", "causal"])
def test_families_partial_last_segment_batch2(family, recall):
    model = make_model(family, recall, seed=1)
    ids = torch.randint(0, VOCAB, (2, 4 * 9 + 5))  # partial last segment, batch 2
    out = model(ids)
    ref_logits, ref_mem = reference_forward(model, ids)
    assert rel_err(out.logits, ref_logits) < 1e-6
    assert rel_err(out.memories, ref_mem) < 1e-6


@pytest.mark.parametrize("recall", ["paper", "causal"])
def test_linear_recall_scale_matches_reference(recall):
    """recall_scale="linear" divides the recall scores by d_h (not sqrt(d_h)); it changes the logits."""
    model = make_model("llama", recall, recall_scale="linear")
    ids = torch.randint(0, VOCAB, (1, 5 * 9 + 3))
    out = model(ids)
    assert rel_err(out.logits, reference_forward(model, ids)[0]) < 1e-6
    default = make_model("llama", recall)
    assert rel_err(default(ids).logits, out.logits) > 1e-6


def test_linear_recall_scale_generation_equals_forward():
    """Generation uses the same scale as the forward (causal: greedy tokens equal the forward's argmax)."""
    from helpers import greedy_positions_matching

    model = make_model("llama", "causal", recall_scale="linear")
    prompt = torch.randint(0, VOCAB, (1, 2 * 9 + 4))
    out = model.generate(prompt, max_new_tokens=25)
    assert all(ok for _, ok in greedy_positions_matching(model, prompt.shape[1], out))


def test_opt_uses_projected_width():
    model = make_model("opt")
    assert model.width == 24 and model.summary_prompt.shape == (1, 24)
    assert model.recall.w_q.weight.shape == (16, 24)


def test_no_sensory_tokens():
    model = make_model("llama", "paper", sensory=0)
    ids = torch.randint(0, VOCAB, (1, 3 * 9 + 2))
    assert rel_err(model(ids).logits, reference_forward(model, ids)[0]) < 1e-6


def test_memory_changes_predictions():
    """The recalled memory must reach the logits: other earlier text changes a later segment's logits."""
    model = make_model("llama", "causal")
    ids = torch.randint(0, VOCAB, (1, 4 * 9))
    other = ids.clone()
    other[:, :9] = torch.randint(0, VOCAB, (1, 9))  # only segment 0 differs: reaches segment 3 via memory only
    a, b = model(ids).logits[:, 27:], model(other).logits[:, 27:]
    assert (a - b).abs().max() > 1e-6


def test_right_padding_equals_separate_rows():
    model = make_model("llama", "paper")
    ids = torch.randint(0, VOCAB, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    out = model(ids, attention_mask=mask)
    alone = model(ids[1:, :20])
    assert rel_err(out.logits[1, :20], alone.logits[0]) < 1e-9
    assert torch.all(out.logits[1, 20:] == 0)


def test_last_segment_and_all_token_loss():
    model = make_model("llama", "causal")
    ids = torch.randint(0, VOCAB, (2, 3 * 9 + 4))
    out = model(ids, labels=ids)
    logits = out.logits
    ce = torch.nn.functional.cross_entropy
    last = ce(logits[:, 27:-1].reshape(-1, VOCAB), ids[:, 28:].reshape(-1))
    assert abs(float(out.loss) - float(last)) < 1e-9
    full = model(ids, labels=ids, loss_on="all").loss
    assert abs(float(full) - float(ce(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))) < 1e-9


def test_gradients_reach_every_hmt_parameter_through_memory():
    model = make_model("llama", "paper")
    ids = torch.randint(0, VOCAB, (1, 4 * 9))
    model(ids, labels=ids).loss.backward()
    for name in ("summary_prompt", "memory_init"):
        assert getattr(model, name).grad.abs().sum() > 0, name
    assert model.recall.w_q.weight.grad.abs().sum() > 0
    assert model.recall.w_k.weight.grad.abs().sum() > 0


def test_stage_one_without_recall_uses_previous_memory():
    model = make_model("llama", "paper")
    ids = torch.randint(0, VOCAB, (1, 2 * 9))
    out = model(ids, use_recall=False)
    # segment 1's input memory must be M_0: recompute segment 1 by hand
    bb = model.backbone
    m0 = out.memories[:, 0]
    emb = torch.cat([m0[:, None], bb.get_input_embeddings()(ids[:, 6:18]), m0[:, None]], 1)
    logits = bb(inputs_embeds=emb, position_ids=torch.arange(14)[None]).logits
    assert rel_err(out.logits[:, 9:], logits[:, 4:13]) < 1e-9


# ------------------------------------------------------------------------------------------ config and bad input
def test_config_window_arithmetic():
    cfg = HMTConfig.from_window(1024, sensory_tokens=32)
    assert cfg.segment_tokens == 990 and cfg.window == 1024 and cfg.summary_tokens == 495
    assert HMTConfig.from_window(256, sensory_tokens=32).segment_tokens == 222
    assert HMTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, match", [
    (dict(segment_tokens=0), "segment_tokens"),
    (dict(segment_tokens=10, sensory_tokens=11), "sensory_tokens"),
    (dict(segment_tokens=10, sensory_tokens=2, summary_tokens=11), "summary_tokens"),
    (dict(memory_slots=0), "memory_slots"),
    (dict(recall="sideways"), "recall"),
    (dict(kernels="cuda"), "kernels"),
    (dict(recall_scale="dh"), "recall_scale"),
    (dict(segment_tokens=2.5), "segment_tokens"),
])
def test_config_rejects_inconsistent_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HMTConfig(**kwargs)


def test_from_window_rejects_too_small_and_conflicting():
    with pytest.raises(ValueError, match="window"):
        HMTConfig.from_window(20, sensory_tokens=32)
    with pytest.raises(ValueError, match="segment_tokens"):
        HMTConfig.from_window(256, segment_tokens=100)
    with pytest.raises(ValueError, match="window"):
        HMTConfig.from_dict({**HMTConfig.from_window(256).to_dict(), "window": 300})


def test_bad_input_ids():
    model = make_model()
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="right padding"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(TypeError, match="HMTConfig"):
        HMTModel(model.backbone, {"segment_tokens": 9})
