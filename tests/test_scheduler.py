"""The scheduler and hmt_runtime.generate(): batched == alone, streaming, state reuse, flat memory, bad input."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import hmt_runtime
from hmt_runtime import MemoryState, generate, ingest
from helpers import SEGMENT, VOCAB, CharTokenizer, forward_greedy, greedy_positions_matching, make_model, mixed_prompts
from hmt_runtime.incremental.engines import LlamaEngine
from hmt_runtime.incremental.scheduler import Scheduler


def alone(model, prompt, max_new_tokens, **kw):
    """The prompt generated alone (one row)."""
    return generate(model, [prompt], max_new_tokens=max_new_tokens, **kw)[0]


def assert_follows_forward(model, prompt, out):
    """Against the teacher-forced forward: causal mode, every token is the forward's greedy choice; paper mode,
    every token predicted from segment position >= j - 1 (where P is no longer provisional)."""
    if model.config.recall == "causal":
        assert out == forward_greedy(model, prompt, len(out) - len(prompt))
        return
    for i, ok in greedy_positions_matching(model, len(prompt), torch.tensor([out])):
        if (i - 1) % SEGMENT >= model.config.summary_tokens - 1:
            assert ok, f"token {i} differs from the forward pass"


# ---------------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # the lean engine and the transformers engine
@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_batched_greedy_equals_alone_and_reference(family, recall):
    model = make_model(family, recall, seed=1)
    prompts = mixed_prompts()
    batched = generate(model, prompts, max_new_tokens=2 * SEGMENT + 3)  # every row crosses >= 2 boundaries
    for prompt, out in zip(prompts, batched):
        assert out[: len(prompt)] == prompt and len(out) == len(prompt) + 2 * SEGMENT + 3
        assert out == alone(model, prompt, 2 * SEGMENT + 3)
        assert out == model.generate(torch.tensor([prompt]), max_new_tokens=2 * SEGMENT + 3)[0].tolist()
        assert_follows_forward(model, prompt, out)


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
    free = alone(model, prompts[1], 8)
    assert_follows_forward(model, prompts[1], free)
    eos = free[len(prompts[1]) + 2]  # ends prompt 1 after its third token
    out = generate(model, prompts, max_new_tokens=8, eos_token_id=eos, batch_size=2)
    for prompt, got in zip(prompts, out):
        want = alone(model, prompt, 8, eos_token_id=eos)
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
    with torch.no_grad():
        forward = model(ids).logits[:, -1]  # causal mode: the state's logits are the forward's, exactly
    assert torch.allclose(logits, forward, rtol=0, atol=1e-10)
    assert state.written.tolist() == [3, 3] and state.segment_len.tolist() == [4, 4]
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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_summary_passes_run_batched_and_equal_one_at_a_time(family, recall, monkeypatch):
    """Ingestion runs the summary passes of a prompt's segments in batches of several queries (a summary pass
    is the only cache-free pass, so batches show as encode calls with B > 1), and the state and logits it
    leaves equal those of one pass per segment; also when the prompt continues a state that ends mid-segment."""
    from hmt_runtime.incremental.scheduler import _Summaries

    model = make_model(family, recall, seed=3)
    monkeypatch.setattr(_Summaries, "BATCH_POSITIONS", 3 * (model.config.summary_tokens + 2))  # 3 per batch
    gen = torch.Generator().manual_seed(7)
    head = torch.randint(0, VOCAB, (SEGMENT + 4,), generator=gen)
    body = torch.randint(0, VOCAB, (8 * SEGMENT + 2,), generator=gen)

    def run(batched: bool):
        sched = Scheduler(model, rows=1)
        batches = []
        encode = sched.engine.encode
        sched.engine.encode = lambda embeds: (batches.append(embeds.shape[0]), encode(embeds))[1]
        if not batched:
            sched._plan_summaries = lambda row, ids: None
        row = sched.add(head)
        state = sched.export(row)
        sched.release(row)
        row = sched.add(body, state=state)  # continues mid-segment
        return sched.export(row), sched.logits[row].clone(), batches

    want_state, want_logits, singles = run(False)
    got_state, got_logits, batches = run(True)
    assert set(singles) == {1} and max(batches) == 3, (singles, batches)
    assert sum(batches) == len(singles)  # the same summaries, fewer passes
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-12, atol=1e-12)
    for name, tensor in want_state.tensors().items():
        torch.testing.assert_close(getattr(got_state, name), tensor, rtol=1e-12, atol=1e-12, msg=name)


def test_ingestion_peak_memory_is_flat_in_length(monkeypatch):
    from hmt_runtime.incremental.scheduler import _Summaries

    model = make_model("llama", "causal", slots=3)
    # summary passes batched 6 at a time: both lengths hold many batches
    monkeypatch.setattr(_Summaries, "BATCH_POSITIONS", 6 * (model.config.summary_tokens + 2))
    short = torch.randint(0, VOCAB, (1, 20 * SEGMENT))
    long = torch.randint(0, VOCAB, (1, 200 * SEGMENT))  # 10x the tokens, 10x the memory writes (N = 3 slots)
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

    monkeypatch.setattr(hmt_runtime.incremental.generation, "Scheduler", no_work)
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
    assert first + produced == alone(model, first, len(produced))


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
    from hmt_runtime.native import kernels as native

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


# ---------------------------------------------------------------------------------------------------- one path
@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_model_generate_keeps_the_given_state_and_returns_a_new_one(recall):
    model = make_model("llama", recall, seed=11)
    doc = torch.randint(0, VOCAB, (1, 2 * SEGMENT + 3))
    question = torch.randint(0, VOCAB, (1, 4))
    state, _ = ingest(model, doc)
    before = {k: v.clone() for k, v in state.tensors().items()}
    out, after = model.generate(question, max_new_tokens=12, state=state, return_state=True)
    assert all(torch.equal(before[k], v) for k, v in state.tensors().items())  # never modified
    assert out.tolist()[0] == generate(model, [question[0].tolist()], max_new_tokens=12, state=state)[0]
    # the returned state holds the document, the question and every new token: continuing from it equals
    # reading everything at once
    more = torch.randint(0, VOCAB, (1, 3))
    continued = model.generate(more, max_new_tokens=6, state=after)
    whole = model.generate(torch.cat([doc, out, more], 1), max_new_tokens=6)
    assert torch.equal(continued[:, 3:], whole[:, -6:])
    assert int(after.segments_done[0]) == (doc.shape[1] + out.shape[1]) // SEGMENT


def test_model_generate_return_state_without_new_tokens_and_with_eos():
    model = make_model("llama", "causal", seed=12)
    prompt = torch.randint(0, VOCAB, (2, SEGMENT + 2))
    ids, state = model.generate(prompt, max_new_tokens=0, return_state=True)
    assert torch.equal(ids, prompt) and state.batch_size == 2
    reference, _ = ingest(model, prompt)
    assert all(torch.equal(getattr(reference, k), v) for k, v in state.tensors().items())
    free = model.generate(prompt[:1], max_new_tokens=5)
    eos = int(free[0, -3])  # the third new token
    ids, state = model.generate(prompt[:1], max_new_tokens=5, eos_token_id=eos, return_state=True)
    assert int(ids[0, -1]) == eos and ids.shape[1] == prompt.shape[1] + 3
    read, _ = ingest(model, ids[:, :-1])  # the EOS itself is not read
    assert all(torch.equal(getattr(read, k), v) for k, v in state.tensors().items())


@pytest.mark.parametrize("field, change", [("memory_slots", dict(slots=5)), ("sensory_tokens", dict(sensory=2)),
                                           ("summary_tokens", dict(summary=3))])
def test_model_generate_checks_the_state_against_the_config(field, change):
    model = make_model("llama", "causal")
    other = make_model("llama", "causal", **change)
    state, _ = ingest(other, torch.randint(0, VOCAB, (1, 12)))
    with pytest.raises(ValueError, match=r"state\.\w+: shape .* was made for another HMT config"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, state=state)
    with pytest.raises(TypeError, match="state: expected a MemoryState"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, state=object())


def lora_model(recall="causal", seed=13):
    """make_model with a peft LoRA adapter (rank 4, non-zero B) on the attention and MLP projections."""
    from peft import LoraConfig, get_peft_model

    model = make_model("llama", recall, seed=seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    model.backbone = get_peft_model(model.backbone, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.double().eval()


@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_lora_backbone_runs_on_the_lean_engine_with_the_adapter_kept(recall):
    model = lora_model(recall)
    sched = Scheduler(model)
    assert sched.engine.name == "lean" and sched.backend.lean_reason is None
    prompts = mixed_prompts(8)
    lean = generate(model, prompts, max_new_tokens=2 * SEGMENT)
    assert lean == generate(model, prompts, max_new_tokens=2 * SEGMENT, engine="transformers")
    for prompt, out in zip(prompts, lean):
        assert_follows_forward(model, prompt, out)
    # the merge is a copy: the peft layers still hold their adapter, unmerged, and it changes the output
    layer = model.backbone.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer.merged and torch.count_nonzero(layer.lora_B["default"].weight) > 0
    with model.backbone.disable_adapter():
        assert generate(model, prompts, max_new_tokens=2 * SEGMENT, engine="transformers") != lean


def test_lean_engine_refuses_lora_variants_it_cannot_merge():
    from peft import LoraConfig, get_peft_model

    model = make_model("llama", "causal")
    model.backbone = get_peft_model(model.backbone, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="engine='lean'.*DoRA"):
        Scheduler(model, engine="lean")
    assert Scheduler(model).engine.name == "transformers"


@pytest.mark.parametrize("recall", ["causal", "paper"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_chunked_ingestion_between_decode_steps_equals_add(recall, chunk):
    """``Scheduler.ingestion``: a long prompt read a piece at a time while another row decodes leaves the state
    and logits ``add`` leaves, and the decoding row's tokens are those it produces alone; an abandoned ingestion
    frees its row."""
    model = make_model("llama", recall, seed=5)
    gen = torch.Generator().manual_seed(11)
    long = torch.randint(0, VOCAB, (6 * SEGMENT + 5,), generator=gen)
    short = torch.randint(0, VOCAB, (3,), generator=gen)
    ref = Scheduler(model, rows=2)
    row = ref.add(long)
    want_state, want_logits = ref.export(row), ref.logits[row].clone()
    decoding_alone = alone(model, short.tolist(), 40)

    sched = Scheduler(model, rows=2)
    other = sched.add(short)
    job = sched.ingestion(long, chunk_tokens=chunk)
    assert job.row != other and job.row not in sched.free_rows() and job.row not in sched.live_rows()
    out, pieces = [], 0
    while not job.step():
        pieces += 1
        sched.pick()
        out.append(int(sched.tokens[other]))
        sched.step()
        assert job.read <= job.total
    assert pieces >= (6 * SEGMENT + 5) // (chunk or SEGMENT)  # the input was read a bounded piece at a time
    assert out == decoding_alone[3 : 3 + len(out)]
    assert job.row in sched.live_rows()
    torch.testing.assert_close(sched.logits[job.row], want_logits, rtol=1e-12, atol=1e-12)
    for name, tensor in want_state.tensors().items():
        torch.testing.assert_close(getattr(sched.export(job.row), name), tensor, rtol=1e-12, atol=1e-12, msg=name)
    sched.release(job.row)
    job = sched.ingestion(long, chunk_tokens=chunk)
    job.step()
    job.close()
    assert job.row in sched.free_rows()
