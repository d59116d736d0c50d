"""Incremental generation against the teacher-forced forward; memory state save/resume; bounded KV cache."""
import pytest
import torch

from hmt_runtime import MemoryState, generate, ingest, new_state
from helpers import VOCAB, greedy_positions_matching, make_model


def test_causal_greedy_generation_equals_forward_argmax():
    model = make_model("llama", "causal")
    prompt = torch.randint(0, VOCAB, (1, 2 * 9 + 4))  # ends mid-segment
    out = model.generate(prompt, max_new_tokens=25)  # crosses at least two more boundaries
    assert out.shape == (1, prompt.shape[1] + 25)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    assert all(ok for _, ok in greedy_positions_matching(model, prompt.shape[1], out))


@pytest.mark.parametrize("family", ["gpt2", "opt", "qwen2"])
def test_causal_generation_other_families(family):
    model = make_model(family, "causal", seed=3)
    prompt = torch.randint(0, VOCAB, (1, 13))
    out = model.generate(prompt, max_new_tokens=20)
    assert all(ok for _, ok in greedy_positions_matching(model, prompt.shape[1], out))


def test_paper_mode_matches_forward_from_position_j():
    """Spec: tokens predicted from segment positions >= j - 1 follow the true P and match the forward pass."""
    model = make_model("llama", "paper", summary=4)
    prompt = torch.randint(0, VOCAB, (1, 9 + 2))
    out = model.generate(prompt, max_new_tokens=30)
    checked = 0
    for i, ok in greedy_positions_matching(model, prompt.shape[1], out):
        in_segment = (i - 1) % 9  # position of the predicting token inside its segment
        if in_segment >= model.config.summary_tokens - 1:
            assert ok, f"token {i} (predicted at segment position {in_segment}) differs from the forward pass"
            checked += 1
    assert checked >= 15


def test_paper_mode_refresh_recomputes_p():
    """The provisional P is replaced at j: the state's P equals a recall from the segment's first j tokens."""
    model = make_model("llama", "paper", summary=4)
    ids = torch.randint(0, VOCAB, (1, 9 + 2))
    state, _ = ingest(model, ids)
    assert bool(state.provisional[0])  # 2 tokens < j known: provisional
    more = torch.randint(0, VOCAB, (1, 3))
    state, _ = ingest(model, more, state=state)
    assert not bool(state.provisional[0])
    seg = torch.cat([ids[:, 9:], more], 1)[:, :4]
    with torch.no_grad():
        s = model.summarize(seg)
        p = model.recall_memory(s, state.memory, state.keys, state.written)
    assert torch.allclose(state.recalled, p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # the lean engine and the transformers engine
def test_kv_cache_never_exceeds_window(monkeypatch, family):
    from hmt_runtime.incremental.engines import Engine, StaticKV

    model = make_model(family, "causal")
    seen = []
    set_len, commit = StaticKV.set_len, Engine.commit

    def spy_set_len(self, row, length):
        seen.append(length)
        return set_len(self, row, length)

    def spy_commit(self, live_rows):
        commit(self, live_rows)
        seen.extend(self.kv.host_lens[row] for row in live_rows)

    monkeypatch.setattr(StaticKV, "set_len", spy_set_len)
    monkeypatch.setattr(Engine, "commit", spy_commit)
    model.generate(torch.randint(0, VOCAB, (1, 30)), max_new_tokens=40)
    assert seen and max(seen) <= model.config.window
    assert max(seen) == model.config.window  # the trailing P fills the window exactly


def test_batch_generation_equals_single():
    model = make_model("llama", "causal")
    prompts = torch.randint(0, VOCAB, (2, 15))
    both = model.generate(prompts, max_new_tokens=12)
    for b in range(2):
        assert torch.equal(both[b : b + 1], model.generate(prompts[b : b + 1], max_new_tokens=12))


def test_state_save_resume_gives_identical_continuations(tmp_path):
    model = make_model("llama", "paper")
    doc = torch.randint(0, VOCAB, (1, 40))
    state, _ = ingest(model, doc)
    path = tmp_path / "state.safetensors"
    state.save(path, config=model.config)
    question = torch.randint(0, VOCAB, (1, 3))
    first = model.generate(question, max_new_tokens=15, state=state.clone())
    loaded = MemoryState.load(path, config=model.config)
    second = model.generate(question, max_new_tokens=15, state=loaded)
    assert torch.equal(first, second)
    # and both equal reading document + question in one go
    whole = model.generate(torch.cat([doc, question], 1), max_new_tokens=15)
    assert torch.equal(whole[:, 40:], first)


def test_state_load_rejects_other_files_and_configs(tmp_path):
    model = make_model("llama", "paper")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not an HMT memory state"):
        MemoryState.load(bad)
    state = new_state(model)
    state.save(tmp_path / "s.safetensors", config=model.config)
    other = make_model("llama", "paper", slots=5)
    with pytest.raises(ValueError, match="another HMT config"):
        MemoryState.load(tmp_path / "s.safetensors", config=other.config)


def test_state_saved_before_recall_scale_existed_loads_as_sqrt(tmp_path):
    import dataclasses

    model = make_model("llama", "paper")

    class OldConfig:  # a config as written before HMTConfig.recall_scale existed
        def to_dict(self):
            data = model.config.to_dict()
            del data["recall_scale"]
            return data

    state, _ = ingest(model, torch.randint(0, VOCAB, (1, 20)))
    state.save(tmp_path / "old.safetensors", config=OldConfig())
    assert torch.equal(MemoryState.load(tmp_path / "old.safetensors", config=model.config).memory, state.memory)
    linear = dataclasses.replace(model.config, recall_scale="linear")
    with pytest.raises(ValueError, match="recall_scale"):
        MemoryState.load(tmp_path / "old.safetensors", config=linear)


def test_eos_stops_and_pads():
    model = make_model("llama", "causal")
    prompt = torch.randint(0, VOCAB, (1, 5))
    free = model.generate(prompt, max_new_tokens=6)
    eos = int(free[0, 7])  # the third generated token
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    assert out.shape[1] <= 8 and int(out[0, -1]) == eos


def test_sampling_is_seeded_and_respects_top_k():
    model = make_model("llama", "causal")
    prompt = torch.randint(0, VOCAB, (1, 5))
    torch.manual_seed(7)
    a = model.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
    torch.manual_seed(7)
    b = model.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
    assert torch.equal(a, b)
    torch.manual_seed(8)
    c = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=1)
    assert torch.equal(c, model.generate(prompt, max_new_tokens=10))  # top_k=1 sampling is greedy


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(do_sample=True, temperature=0), "temperature"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_p=0), "top_p"),
    (dict(top_k=0), "top_k"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 3, **kwargs})


def test_generate_api_token_lists_and_errors():
    model = make_model("llama", "causal")
    prompts = [[5, 6, 7, 8], [9, 10]]
    out = generate(model, prompts, max_new_tokens=4)
    assert out[0] == model.generate(torch.tensor([prompts[0]]), max_new_tokens=4)[0].tolist()
    assert out[1] == model.generate(torch.tensor([prompts[1]]), max_new_tokens=4)[0].tolist()
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts\\[1\\]"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [[1, VOCAB + 3]], max_new_tokens=2)
