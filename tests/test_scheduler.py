"""The scheduler and hmt_runtime.generate(): batched == alone, streaming, state reuse, flat memory, bad input."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import hmt_runtime
from hmt_runtime import MemoryState, generate, ingest
from hmt_runtime.scheduler import LlamaEngine, Scheduler
from test_model import make_model
from tiny import VOCAB

SEGMENT = 9  # make_model: Ls = 9, k = 3, j = 4, N = 3, W = 14


def reference(model, prompt, max_new_tokens, **kw):
    """HMTModel.generate, the reference incremental path (segment.py), for one prompt."""
    return model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, **kw)[0].tolist()


def mixed_prompts(seed=0):
    """Lengths inside the first segment, at a boundary, just past one, and several segments long."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (2, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 5)]


# ---------------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # the lean engine and the transformers engine
@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_batched_greedy_equals_alone_and_reference(family, recall):
    model = make_model(family, recall, seed=1)
    prompts = mixed_prompts()
    batched = generate(model, prompts, max_new_tokens=2 * SEGMENT + 3)  # every row crosses >= 2 boundaries
    for prompt, out in zip(prompts, batched):
        assert out[: len(prompt)] == prompt and len(out) == len(prompt) + 2 * SEGMENT + 3
        assert out == generate(model, [prompt], max_new_tokens=2 * SEGMENT + 3)[0]
        assert out == reference(model, prompt, 2 * SEGMENT + 3)


def test_engines_pick_lean_for_llama_family_only():
    assert Scheduler(make_model("llama")).engine.name == "lean"
    assert Scheduler(make_model("qwen2")).engine.name == "lean"
    assert Scheduler(make_model("opt")).engine.name == "transformers"
    with pytest.raises(ValueError, match="engine='lean'.*model_type 'gpt2'"):
        Scheduler(make_model("gpt2"), engine="lean")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_lean_engine_matches_transformers_forward(family):
    """encode, a prefill after cached positions, and a batched decode step with rows at different positions."""
    model = make_model(family, "causal", seed=4)
    engine = LlamaEngine(model.backbone, 2, model.config.window)
    embeds = torch.randn(2, 11, model.width, dtype=model.dtype) * 0.5
    with torch.no_grad():
        expected = model.run_backbone(embeds)
        assert torch.allclose(engine.encode(embeds), expected, rtol=0, atol=1e-10)
        # row 0 holds 6 positions, row 1 holds 9; then one decode step at positions 6 and 9
        engine.prefill(0, embeds[:1, :6], 0)
        engine.prefill(1, embeds[1:, :5], 0)
        hidden = engine.prefill(1, embeds[1:, 5:9], 5)
        assert torch.allclose(hidden, expected[1:, 5:9], rtol=0, atol=1e-10)
        step = torch.stack([embeds[0, 6], embeds[1, 9]])[:, None]
        out = engine.decode(step, torch.ones(2, dtype=torch.long), span=10)
    assert torch.allclose(out[0, 0], expected[0, 6], rtol=0, atol=1e-10)
    assert torch.allclose(out[1, 0], expected[1, 9], rtol=0, atol=1e-10)
    assert engine.kv.lens.tolist() == [7, 10]


def test_static_span_decode_equals_eager_span():
    """The decode step as a CUDA graph runs it (attention over all W positions with a per-row mask)."""
    model = make_model("llama", "paper", seed=2)
    prompts = mixed_prompts(1)
    eager = generate(model, prompts, max_new_tokens=20)
    original = Scheduler.step

    def static_step(self):
        self.static_span = True
        return original(self)

    Scheduler.step = static_step
    try:
        static = generate(model, prompts, max_new_tokens=20)
    finally:
        Scheduler.step = original
    assert static == eager


def test_finished_rows_free_their_row_for_waiting_prompts():
    model = make_model("llama", "causal", seed=3)
    prompts = mixed_prompts(2) + [[5, 6, 7]]
    free = reference(model, prompts[1], 8)
    eos = free[len(prompts[1]) + 2]  # ends prompt 1 after its third token
    out = generate(model, prompts, max_new_tokens=8, eos_token_id=eos, batch_size=2)
    for prompt, got in zip(prompts, out):
        want = reference(model, prompt, 8, eos_token_id=eos)
        assert got == want[: len(got)] and (got[-1] == eos or len(got) == len(prompt) + 8)
    assert len(out[1]) <= len(prompts[1]) + 3


def test_static_buffers_are_not_reallocated_and_stay_within_window():
    model = make_model("llama", "causal")
    sched = Scheduler(model, rows=2)
    pointers = [t.data_ptr() for t in sched.kv.keys + sched.kv.values]
    window = model.config.window
    assert all(t.shape[2] == window for t in sched.kv.keys)
    sched.add(torch.randint(0, VOCAB, (5,)))
    sched.add(torch.randint(0, VOCAB, (17,)))
    longest = 0
    for _ in range(3 * SEGMENT):
        sched.pick()
        sched.step()
        longest = max(longest, *sched.kv.host_lens)
        assert sched.kv.lens.tolist() == sched.kv.host_lens
    assert [t.data_ptr() for t in sched.kv.keys + sched.kv.values] == pointers
    assert longest <= window - 1  # the trailing P takes the last position at close, then the cache restarts


# ---------------------------------------------------------------------------------------------------- streaming
class CharTokenizer:
    """Characters 32..126 -> ids 0..94, newline -> 95, EOS -> 96."""

    eos_token_id = 96

    def __call__(self, text, add_special_tokens=False):
        class Encoded:
            input_ids = [95 if c == "\n" else ord(c) - 32 for c in text]

        return Encoded()

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\n" if i == 95 else "" if i == 96 else chr(i + 32) for i in ids)


def test_stream_yields_exactly_the_tokens_of_the_non_streamed_call():
    model = make_model("llama", "paper", seed=5)
    prompts = mixed_prompts(3)
    whole = generate(model, prompts, max_new_tokens=15)
    chunks = list(generate(model, prompts, max_new_tokens=15, stream=True))
    assert all(isinstance(c, list) and len(c) == len(prompts) for c in chunks)
    for i, (prompt, out) in enumerate(zip(prompts, whole)):
        assert prompt + [t for c in chunks for t in c[i]] == out
    single = list(generate(model, torch.tensor(prompts[3]), max_new_tokens=15, stream=True))
    assert prompts[3] + [t for piece in single for t in piece] == whole[3]


def test_stream_text_concatenates_to_the_returned_text():
    model = make_model("llama", "causal", seed=6)
    model.tokenizer = CharTokenizer()
    texts = ["Hello there, a prompt of a few segments.", "Hi"]
    full = generate(model, texts, max_new_tokens=12)
    assert all(isinstance(t, str) for t in full) and full[0]
    pieces = list(generate(model, texts, max_new_tokens=12, stream=True))
    assert ["".join(p[i] for p in pieces) for i in range(2)] == full
    one = list(generate(model, texts[0], max_new_tokens=12, stream=True))
    assert all(isinstance(p, str) for p in one) and "".join(one) == full[0]


def test_model_generate_streamer_still_works():
    model = make_model("llama", "causal")

    class Collect:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, value):
            self.parts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    prompt = torch.randint(0, VOCAB, (1, 6))
    out = model.generate(prompt, max_new_tokens=7, streamer=streamer)
    assert streamer.ended and [t for p in streamer.parts for t in p] == out[0].tolist()


# ---------------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_ingested_state_saved_and_resumed(tmp_path, recall):
    model = make_model("llama", recall, seed=7)
    doc = torch.randint(0, VOCAB, (1, 4 * SEGMENT + 2))
    questions = [[3, 4, 5], [6, 7]]
    state, _ = ingest(model, doc)
    before = {k: v.clone() for k, v in state.tensors().items()}
    path = tmp_path / "doc.safetensors"
    state.save(path, config=model.config)
    in_memory = generate(model, questions, max_new_tokens=12, state=state)  # one state shared by both prompts
    assert all(torch.equal(before[k], v) for k, v in state.tensors().items())  # generate did not modify it
    resumed = generate(model, questions, max_new_tokens=12, state=MemoryState.load(path, config=model.config))
    assert resumed == in_memory
    for q, out in zip(questions, in_memory):
        whole = generate(model, [doc[0].tolist() + q], max_new_tokens=12)[0]
        assert out == q + whole[doc.shape[1] + len(q):]


def test_ingest_progress_bar_counts_every_token(monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.count, self.closed = total, 0, False
            bars.append(self)

        def update(self, n):
            self.count += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    model = make_model("llama", "causal")
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT + 4))
    state, logits = ingest(model, ids, progress=True)
    ref_state, ref_logits = hmt_runtime.segment._ingest_rows(model, ids)
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-10)
    assert torch.equal(state.written, ref_state.written) and torch.equal(state.segment_len, ref_state.segment_len)
    assert len(bars) == 1 and bars[0].total == bars[0].count == ids.numel() and bars[0].closed


def _peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated while ``fn`` runs (torch profiler memory events, in order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_ingestion_peak_memory_is_flat_in_length():
    model = make_model("llama", "causal", slots=3)
    short = torch.randint(0, VOCAB, (1, 4 * SEGMENT))
    long = torch.randint(0, VOCAB, (1, 40 * SEGMENT))  # 10x the tokens, 10x the memory writes (N = 3 slots)
    ingest(model, short)  # warm-up: lazy initialisations
    peak_short = _peak_bytes(lambda: ingest(model, short))
    peak_long = _peak_bytes(lambda: ingest(model, long))
    assert peak_short > 0
    assert abs(peak_long - peak_short) <= 0.05 * peak_short, (peak_short, peak_long)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("prompts, kwargs, error, match", [
    ([], {}, ValueError, "prompts: expected at least one prompt"),
    ([[1, 2], []], {}, ValueError, r"prompts\[1\]: empty prompt"),
    ([[1, VOCAB]], {}, ValueError, rf"prompts\[0\]: token id {VOCAB} is outside the vocabulary"),
    ([[1, -1]], {}, ValueError, r"prompts\[0\]: token id -1"),
    ([[1, 2]], dict(do_sample=True, temperature=0.0), ValueError, "temperature=0.0"),
    ([[1, 2]], dict(do_sample=True, top_p=1.5), ValueError, "top_p=1.5"),
    ([[1, 2]], dict(do_sample=True, top_p=0), ValueError, "top_p=0"),
    ([[1, 2]], dict(max_new_tokens=-1), ValueError, "max_new_tokens=-1"),
    ([[1, 2]], dict(eos_token_id=VOCAB + 5), ValueError, "eos_token_id"),
    ([[1, 2]], dict(batch_size=0), ValueError, "batch_size=0"),
    ([[1, 2]], dict(engine="fast"), ValueError, "engine='fast'"),
    ("text", {}, ValueError, "needs a model with a tokenizer"),
    ([[1.5, 2]], {}, TypeError, r"prompts\[0\]: expected integer token ids"),
    (torch.zeros(2, 3), {}, TypeError, "prompts: expected a tensor of integer"),
])
def test_bad_input_fails_before_any_work(monkeypatch, prompts, kwargs, error, match):
    model = make_model("llama", "causal")

    def no_work(*args, **kw):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(hmt_runtime.api, "Scheduler", no_work)
    with pytest.raises(error, match=match):
        generate(model, prompts, **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(error, match=match):  # streaming checks eagerly too, not at the first next()
        generate(model, prompts, stream=True, **{"max_new_tokens": 4, **kwargs})


def test_bad_state_argument():
    model = make_model("llama", "causal")
    two, _ = ingest(model, torch.randint(0, VOCAB, (2, 5)))
    with pytest.raises(ValueError, match="state: holds 2 sequences"):
        generate(model, [[1], [2], [3]], max_new_tokens=2, state=two)
    with pytest.raises(TypeError, match="state: expected a MemoryState"):
        generate(model, [[1]], max_new_tokens=2, state={"memory": 0})
    other, _ = ingest(make_model("llama", "causal", slots=5), torch.randint(0, VOCAB, (1, 5)))
    with pytest.raises(ValueError, match=r"state.memory: shape \(1, 5, 32\) was made for another HMT config"):
        generate(model, [[1]], max_new_tokens=2, state=other, stream=True)


def test_a_failing_row_leaves_the_other_rows_intact(monkeypatch):
    model = make_model("llama", "paper", seed=8)
    first = mixed_prompts(4)[3]
    sched = Scheduler(model, rows=2)
    row = sched.add(torch.tensor(first))
    produced = []
    for _ in range(4):
        sched.pick()
        produced.append(int(sched.tokens[row]))
        sched.step()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sched.add(torch.tensor([1, VOCAB + 1]))
    calls = {"n": 0}
    original = sched.engine.prefill

    def failing(r, embeds, start):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return original(r, embeds, start)

    monkeypatch.setattr(sched.engine, "prefill", failing)
    with pytest.raises(RuntimeError, match="injected"):
        sched.add(torch.randint(0, VOCAB, (3 * SEGMENT,)))  # fails in its third prefill, mid-ingestion
    monkeypatch.setattr(sched.engine, "prefill", original)
    assert sched.live_rows() == [row]
    for _ in range(2 * SEGMENT):
        sched.pick()
        produced.append(int(sched.tokens[row]))
        sched.step()
    assert first + produced == reference(model, first, len(produced))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = make_model("llama", "causal")
    prompts = mixed_prompts(5)
    torch.manual_seed(3)
    a = generate(model, prompts, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    torch.manual_seed(3)
    b = generate(model, prompts, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    assert a == b
    assert generate(model, prompts, max_new_tokens=10, do_sample=True, top_k=1) == generate(model, prompts, max_new_tokens=10)


def test_return_types_follow_the_input():
    model = make_model("llama", "causal")
    batch = torch.randint(0, VOCAB, (2, 5))
    out = generate(model, batch, max_new_tokens=3)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 8) and torch.equal(out[:, :5], batch)
    one = generate(model, batch[0], max_new_tokens=3)
    assert isinstance(one, torch.Tensor) and one.shape == (8,) and torch.equal(one, out[0])
    assert generate(model, [[1, 2, 3]], max_new_tokens=0) == [[1, 2, 3]]


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; this machine has none")
def test_cuda_graph_path_equals_eager_path():
    model = make_model("llama", "causal", seed=9).float().cuda()
    prompts = mixed_prompts(6)
    eager = generate(model, prompts, max_new_tokens=3 * SEGMENT, cuda_graphs=False)
    graphed = generate(model, prompts, max_new_tokens=3 * SEGMENT, cuda_graphs=True)
    assert graphed == eager
    paper = make_model("llama", "paper", seed=9).float().cuda()
    assert generate(paper, prompts, max_new_tokens=3 * SEGMENT, cuda_graphs=True) == \
        generate(paper, prompts, max_new_tokens=3 * SEGMENT, cuda_graphs=False)


def _native_available() -> bool:
    from hmt_runtime import native

    return native.available()


@pytest.mark.skipif(not _native_available(), reason="the native extension hmt_runtime._C is not built")
def test_fused_native_attention_gives_the_same_tokens():
    """kernels="native": the lean engine calls ops.attention_with_kvcache (append + attention in one op)."""
    torch_model = make_model("llama", "paper", seed=10).float()
    native_model = make_model("llama", "paper", seed=10).float()
    native_model.config.kernels = "native"
    assert Scheduler(native_model).engine.fused is not None and Scheduler(torch_model).engine.fused is None
    prompts = mixed_prompts(7)
    assert generate(native_model, prompts, max_new_tokens=20) == generate(torch_model, prompts, max_new_tokens=20)
