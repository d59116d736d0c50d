"""The one sampling path (hmt_runtime.incremental.sampling), used by generate and by hmt serve."""
import math

import torch

from hmt_runtime.incremental.sampling import MIN_TEMPERATURE, Sampling, choose


def test_greedy_and_degenerate_settings_are_the_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    best = logits.argmax(-1)
    assert torch.equal(choose(logits, Sampling()), best)
    assert torch.equal(choose(logits, Sampling(True, top_k=1), gen), best)
    assert torch.equal(choose(logits, Sampling(True, temperature=MIN_TEMPERATURE / 10), gen), best)
    bad = logits.clone()
    bad[2, 7] = float("nan")
    bad[3, 4] = float("inf")
    out = choose(bad, Sampling(True), gen)
    assert out[3] == 4 and 0 <= int(out[2]) < 50  # an infinite logit wins; NaN rows still give a token


def test_draws_follow_the_tempered_and_truncated_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(40000, 4)
    gen = torch.Generator().manual_seed(1)
    for temperature, top_p in ((1.0, None), (0.5, None), (2.0, 0.8)):
        probs = torch.softmax(logits[0].double() / temperature, -1)
        if top_p is not None:  # the smallest set of most likely tokens holding top_p of the mass
            order = probs.argsort(descending=True)
            keep = (probs[order].cumsum(0) - probs[order]) < top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], probs[order][keep])
            probs /= probs.sum()
        draws = choose(logits, Sampling(True, temperature, top_p=top_p), gen)
        freq = torch.bincount(draws, minlength=4).double() / draws.numel()
        tol = 4 * torch.sqrt(probs * (1 - probs) / draws.numel()) + 1e-9
        assert ((freq - probs).abs() <= tol).all(), (temperature, top_p, freq, probs)


def test_a_seeded_generator_repeats_and_rows_differ():
    logits = torch.zeros(3, 1000)
    a = choose(logits, Sampling(True), torch.Generator().manual_seed(5))
    b = choose(logits, Sampling(True), torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len(set(a.tolist())) > 1
    assert not math.isnan(float(a.float().mean()))
