"""Memory at the input scale (HMTConfig.memory_scale="input", docs/spec.md): the forward's memories are the
RMS-normalised final hidden states times the gain, generation equals the forward on every engine, and checkpoints
and memory states record the rule."""
import pytest
import torch

from hmt_runtime import HMTConfig, HMTModel, MemoryState, generate, ingest
from hmt_runtime.incremental.scheduler import Scheduler
from hmt_runtime.training.train import TrainConfig, train
from helpers import SEGMENT, VOCAB, forward_greedy, make_model, mixed_prompts
from tiny import tiny_backbone


def randomised_model(family="llama", recall="causal", seed=3, **kw):
    """make_model with its memory gains (memory_scale="input", memory_read="sink") drawn at random, so that a
    missed or doubled transform shows."""
    model = make_model(family, recall, seed=seed, **kw)
    with torch.no_grad():
        for gain in (model.memory_gain, model.memory_read_gain):
            if gain is not None:
                gain.uniform_(0.05, 3.0, generator=torch.Generator().manual_seed(seed))
        if model.memory_read_center is not None:
            model.memory_read_center.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return model


def input_scale_model(family="llama", recall="causal", seed=3, **kw):
    return randomised_model(family, recall, seed, memory_scale="input", **kw)


def test_memories_are_rms_normalised_hidden_states_times_the_gain():
    hidden, scaled = make_model("llama", seed=3), input_scale_model(seed=3)
    with torch.no_grad():
        scaled.load_state_dict({k: v for k, v in hidden.state_dict().items()}, strict=False)
        ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT + 1), generator=torch.Generator().manual_seed(0))
        raw = hidden(ids).memories  # the first segment's memory is computed the same way in both
        out = scaled(ids).memories
    first = raw[:, 0].double()
    expected = first / first.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * scaled.memory_gain[0].double()
    assert torch.allclose(out[:, 0], expected, rtol=1e-12, atol=1e-12)
    rms = out.pow(2).mean(-1).sqrt()
    assert float(rms.max()) < 3.0 and float(raw.pow(2).mean(-1).sqrt().min()) > 0  # scale changed, rule not vacuous
    assert not torch.allclose(out[:, 1:], raw[:, 1:])  # later segments read the rescaled memories
    # a fresh gain starts at the token embeddings' RMS
    fresh = make_model("llama", seed=3, memory_scale="input")
    emb = fresh.embed(torch.arange(VOCAB)[None])[0]
    assert torch.allclose(fresh.memory_gain, emb.pow(2).mean().sqrt().expand_as(fresh.memory_gain))


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # the lean engine and the transformers engine
def test_generation_equals_the_forward(family):
    model = input_scale_model(family)
    new = 2 * SEGMENT + 3
    out = generate(model, mixed_prompts(), max_new_tokens=new)
    for prompt, tokens in zip(mixed_prompts(), out):
        assert tokens == forward_greedy(model, prompt, new)


@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_scheduler_logits_equal_the_forward_with_prompt_recall(recall):
    model = input_scale_model("llama", recall, prompt_recall=True)
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, VOCAB, (3 * SEGMENT + 2,), generator=gen)
    more = torch.randint(0, VOCAB, (SEGMENT + 3,), generator=gen)
    ids = torch.cat([prompt, more])
    assert_scheduler_follows_the_forward(model, ids, len(prompt))


def assert_scheduler_follows_the_forward(model, ids, prompt_len):
    """The scheduler's logits after a prompt of ``prompt_len`` ids and after each fed id of the rest equal the
    forward's with ``prompt_end`` (paper mode: where a segment's recall is final, from its position j on)."""
    with torch.no_grad():
        expected = model(ids[None], prompt_end=prompt_len).logits[0]
    sched = Scheduler(model, rows=1)
    row = sched.add(ids[:prompt_len])
    first_later = (prompt_len // SEGMENT + 1) * SEGMENT
    for i in range(prompt_len, ids.shape[0]):
        if model.config.recall == "causal" or i <= first_later or (i - 1) % SEGMENT >= 3:
            assert torch.allclose(sched.logits[row], expected[i - 1], rtol=0, atol=1e-9), i
        sched.tokens[row] = ids[i]
        sched.step()


def test_checkpoints_and_memory_states_record_the_rule(tmp_path):
    model = input_scale_model()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HMTModel.from_pretrained(tmp_path / "ckpt", backbone=tiny_backbone("llama", 3)).double().eval()
    assert loaded.config.memory_scale == "input"
    assert torch.equal(loaded.memory_gain, model.memory_gain)
    ids = torch.tensor([mixed_prompts()[-1]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # an older config without the field means the paper's rule
    old = model.config.to_dict()
    del old["memory_scale"]
    assert HMTConfig.from_dict(old).memory_scale == "hidden"
    with pytest.raises(ValueError, match="memory_scale='rms'"):
        HMTConfig(memory_scale="rms")
    # a memory state made under one rule is refused by a model of the other
    state, _ = ingest(model, ids)
    state.save(tmp_path / "state.safetensors", config=model.config)
    plain = make_model("llama", seed=3)
    with pytest.raises(ValueError, match="memory_scale"):
        MemoryState.load(tmp_path / "state.safetensors", config=plain.config)
    # hmt.safetensors of the other rule does not load silently
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="memory_gain"):
        model.load_hmt_weights(tmp_path / "plain")


def test_training_switches_a_hidden_checkpoint_to_the_input_scale(tmp_path):
    make_model("llama", seed=0).save_pretrained(tmp_path / "start")
    from hmt_runtime.training import train as train_module

    base = dict(window=SEGMENT + 3 + 2, sensory_tokens=3, memory_slots=3, recall_dim=16, stage1_steps=0,
                stage2_steps=2, stage2_segments=3, batch_size=2, lr=1e-2, checkpoint_every=1, seed=5, mode="frozen",
                recall="causal")
    original = train_module.HMTModel.from_pretrained

    def from_pretrained(path, **kw):  # the tiny backbone stands in for the checkpoint's
        return original(path, backbone=tiny_backbone("llama", 0), **kw)

    train_module.HMTModel.from_pretrained = from_pretrained
    try:
        gen = torch.Generator().manual_seed(0)
        docs = torch.randint(0, VOCAB, (3, 4 * SEGMENT), generator=gen)
        cfg = TrainConfig(output_dir=str(tmp_path / "run"), init_from=str(tmp_path / "start"),
                          memory_scale="input", **base)
        model = train(cfg, corpus=docs, progress=False)
    finally:
        train_module.HMTModel.from_pretrained = original
    assert model.config.memory_scale == "input"
    assert model.memory_gain is not None and model.memory_gain.requires_grad
    saved = HMTModel.read_checkpoint_config(tmp_path / "run" / "final")
    assert saved["hmt"]["memory_scale"] == "input"
    with pytest.raises(ValueError, match="memory_scale='big'"):
        TrainConfig(output_dir=str(tmp_path / "x"), memory_scale="big")


# ------------------------------------------------------------------ memory read at the attention sink
def sink_read_model(family="llama", recall="causal", seed=3, read="sink", **kw):
    return randomised_model(family, recall, seed, memory_read=read, **kw)


def test_the_first_position_holds_bos_plus_the_gain_times_p():
    model = sink_read_model()
    p = torch.randn(2, model.width, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (2, 4))
    embeds = model.segment_embeddings(p, ids[:, :2], ids[:, 2:])
    bos = model.embed(torch.tensor([[1]]))[0, 0]
    assert torch.allclose(embeds[:, 0], bos + model.memory_read_gain[0] * p, rtol=0, atol=1e-12)
    assert torch.equal(embeds[:, -1], p)  # the trailing position (which writes M_n) holds P itself
    assert torch.allclose(make_model("llama", seed=3, memory_read="sink").memory_read_gain,
                          torch.full((1, model.width), 0.05, dtype=torch.float64))


def test_the_read_gain_starts_where_asked_and_bad_starts_are_refused():
    model = make_model("llama", seed=3)
    model.set_memory_read("sink", 0.7)
    assert torch.equal(model.memory_read_gain, torch.full((1, model.width), 0.7, dtype=model.dtype))
    with torch.no_grad():
        model.memory_read_gain[0, 0] = 2.0
    model.set_memory_read("sink")  # a gain the model has is kept unless one is given
    assert float(model.memory_read_gain[0, 0]) == 2.0
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="gain"):
            model.set_memory_read("sink", bad)
    with pytest.raises(ValueError, match="memory_read_gain=0.5 needs memory_read 'sink' or 'broadcast'"):
        TrainConfig(data=["x"], memory_read_gain=0.5)
    with pytest.raises(ValueError, match="memory_read_gain"):
        TrainConfig(data=["x"], memory_read="sink", memory_read_gain=-1.0)
    with pytest.raises(ValueError, match="probe_every"):
        TrainConfig(data=["x"], probe_every=-1)


def test_a_broadcast_read_adds_the_gain_times_p_to_every_token_position():
    model = sink_read_model(read="broadcast")
    p = torch.randn(2, model.width, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (2, 5))
    embeds = model.segment_embeddings(p, ids[:, :2], ids[:, 2:])
    bos = model.embed(torch.tensor([[1]]))[0, 0]
    assert float(model.memory_read_center.abs().min()) > 0
    gp = model.memory_read_gain[0] * (p - model.memory_read_center[0])
    assert torch.allclose(embeds[:, 0], bos + gp, rtol=0, atol=1e-12)
    assert torch.allclose(embeds[:, 1:-1], model.embed(ids) + gp[:, None], rtol=0, atol=1e-12)
    assert torch.equal(embeds[:, -1], p)
    assert torch.equal(model.token_embeddings(ids, p), embeds[:, 1:-1])
    direct = make_model("llama", seed=3)
    assert torch.equal(direct.token_embeddings(ids, p), direct.embed(ids))  # other reads: E(x) alone
    assert direct.memory_read_center is None and sink_read_model().memory_read_center is None
    fresh = make_model("llama", seed=3, memory_read="broadcast")
    assert torch.equal(fresh.memory_read_center, torch.zeros(1, fresh.width, dtype=fresh.dtype))


def test_training_centres_the_broadcast_read_on_the_mean_memory(tmp_path):
    from hmt_runtime.training.train import CENTER_WINDOWS, center_memory_read
    from hmt_runtime.training.data import Windows

    model = make_model("llama", seed=3, memory_read="broadcast")
    docs = [torch.randint(0, VOCAB, (5 * SEGMENT,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    windows = Windows.build(docs, SEGMENT, 2)
    picks = sorted({i * len(windows) // CENTER_WINDOWS for i in range(CENTER_WINDOWS)})
    with torch.no_grad():  # the memories the model writes before the centre is set (it reads P - 0)
        expected = model(windows.batch(picks)).memories.reshape(-1, model.width).mean(0, keepdim=True)
    center_memory_read(model, docs)
    assert torch.allclose(model.memory_read_center, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="center_memory_read=True needs memory_read='broadcast'"):
        TrainConfig(data=["x"], memory_read="sink", center_memory_read=True)


@pytest.mark.parametrize("read", ["sink", "broadcast"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sink_read_generation_equals_the_forward(family, read):
    model = sink_read_model(family, memory_scale="input", read=read)
    new = 2 * SEGMENT + 3
    out = generate(model, mixed_prompts(), max_new_tokens=new)
    for prompt, tokens in zip(mixed_prompts(), out):
        assert tokens == forward_greedy(model, prompt, new)


@pytest.mark.parametrize("read", ["sink", "broadcast"])
def test_sink_read_scheduler_logits_and_checkpoints(tmp_path, read):
    model = sink_read_model("llama", "paper", prompt_recall=True, read=read)
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, VOCAB, (4 * SEGMENT + 2,), generator=gen)
    assert_scheduler_follows_the_forward(model, ids, 3 * SEGMENT + 1)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HMTModel.from_pretrained(tmp_path / "ckpt", backbone=tiny_backbone("llama", 3)).double().eval()
    assert loaded.config.memory_read == read and torch.equal(loaded.memory_read_gain, model.memory_read_gain)
    with torch.no_grad():
        assert torch.equal(loaded(ids[None]).logits, model(ids[None]).logits)
    old = model.config.to_dict()
    del old["memory_read"]
    assert HMTConfig.from_dict(old).memory_read == "direct"
    with pytest.raises(ValueError, match="memory_read='bos'"):
        HMTConfig(memory_read="bos")
