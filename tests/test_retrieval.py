"""Retrieval prompts (hmt_runtime.training.retrieval) and the benchmark's scoring (benchmarks/retrieval.py)."""
import random
import sys
from pathlib import Path

import pytest
import torch

from hmt_runtime import HMTConfig
from hmt_runtime.training import retrieval
from helpers import CharTokenizer, make_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import retrieval as bench  # noqa: E402

TOK = CharTokenizer()


def prose(n=3000, seed=0):
    rng = random.Random(seed)
    words = ["the", "house", "was", "quiet", "and", "she", "walked", "on", "a", "long", "road"]
    text = " ".join(rng.choice(words) + ("." if rng.random() < 0.1 else "") for _ in range(n))
    return [torch.tensor(TOK(text).input_ids)]


@pytest.mark.parametrize("task", retrieval.TASKS)
@pytest.mark.parametrize("split", retrieval.SPLITS)
def test_a_sample_holds_its_needle_far_from_its_question(task, split):
    for seed, depth in enumerate((0.0, 0.3, 1.0)):
        rng = random.Random(seed)
        s = retrieval.build(TOK, task, 600, depth, rng, split, prose(), gap=100)
        assert s.prompt_end == 600 and s.ids.numel() == 600 + len(TOK(" " + s.answer).input_ids)
        assert TOK.decode(s.answer_ids.tolist()) == " " + s.answer
        prompt = TOK.decode(s.ids[: s.prompt_end].tolist())
        question = prompt[prompt.rindex("\n") :]
        needle_end = TOK.decode(s.ids[: s.needle_at].tolist())
        assert s.answer in prompt[len(needle_end) : len(prompt) - len(question) - 100 + 1] or task == "facts"
        assert len(prompt) - len(question) - prompt.rindex(s.answer) >= 100  # the gap holds


def test_many_samples_build_and_hold_their_answer():
    rng = random.Random(0)
    for i in range(300):
        task = retrieval.TASKS[i % 3]
        s = retrieval.build(TOK, task, 400, rng.random(), rng, retrieval.SPLITS[i % 2], prose(), gap=60)
        assert TOK.decode(s.answer_ids.tolist()).strip() == s.answer


def test_train_and_valid_phrasings_are_disjoint():
    for table in (retrieval._PASSKEY, retrieval._NEEDLE, retrieval._FACTS):
        for key in table["train"]:
            train, valid = table["train"][key], table["valid"][key]
            if isinstance(train, dict):
                train, valid = list(train) + sum(train.values(), []), list(valid) + sum(valid.values(), [])
            assert not set(train) & set(valid), key
    assert not set(retrieval._FILLERS["train"]) & set(retrieval._FILLERS["valid"])


def test_training_batch_scores_only_the_answer_and_keeps_the_needle_out_of_the_window():
    cfg = HMTConfig(segment_tokens=200, sensory_tokens=8)  # room for facts and a question of characters
    rng = random.Random(0)
    for segments in (2, 3, 5):
        ids, prompt_end, labels = retrieval.training_batch(TOK, prose(), 6, cfg, segments, rng)
        assert ids.shape[0] == 6 and bool((prompt_end > (segments - 1) * cfg.segment_tokens).all())
        for b in range(6):
            scored = (labels[b] != -100).nonzero()[:, 0]
            assert int(scored[0]) == int(prompt_end[b])
            assert torch.equal(labels[b, scored], ids[b, scored])
            text = TOK.decode(ids[b, : int(prompt_end[b])].tolist())
            window_start = (segments - 1) * cfg.segment_tokens - cfg.sensory_tokens
            answer = TOK.decode(ids[b, scored].tolist()).strip()
            assert answer not in text[window_start:]  # only memory holds it


@pytest.mark.parametrize("prompt_recall", [False, True])
def test_benchmark_scores_hmt_through_generate_as_the_forward_would(prompt_recall):
    """``hmt`` is scored by greedy generation; the teacher-forced forward with the prompt's end must agree, and
    every method answers a bool (``full`` None beyond its limit)."""
    replay = {"replay": 1, "replay_query": 3} if prompt_recall else {}  # with prompt recall, replay one slot too
    model = make_model("llama", "causal", seed=2, prompt_recall=prompt_recall, **replay)
    model.tokenizer = TOK
    rmt = bench.evaluate.rmt_view(model)
    for seed in range(6):
        s = retrieval.build(TOK, "passkey", 150, 0.2, random.Random(seed), "valid", gap=30)
        forward = retrieval.answered(bench._teacher_forced(model, s, use_recall=True), s)
        assert bench.score(model, "hmt", s) == forward
        with torch.no_grad():
            logits = model(s.ids[None], prompt_end=s.prompt_end).logits[0, s.prompt_end - 1 : -1]
        assert retrieval.answered(logits, s) == forward
        for method in bench.METHODS:
            if method == "replay-hit" and not replay:
                assert bench.score(model, method, s, rmt) is None  # nothing replayed without the option
                continue
            assert bench.score(model, method, s, rmt) in (True, False)
    long = retrieval.build(TOK, "passkey", bench.FULL_LIMIT + 10, 0.5, random.Random(0), "valid", gap=20)
    assert bench.score(model, "full", long) is None


def test_a_prompt_too_short_for_its_gap_is_refused():
    with pytest.raises(ValueError, match="length=50: too short"):
        retrieval.build(TOK, "facts", 50, 0.5, random.Random(0), "valid", prose(), gap=40)


def test_the_answer_loss_reads_labels_wherever_they_fall():
    """Labels that end the prompt's segment and spill into the next one are all scored (the loss is finite and
    equals the cross-entropy of the forward's logits at those positions)."""
    from hmt_runtime.training.objective import LastSegmentLoss

    model = make_model("llama", "causal", seed=1, prompt_recall=True)
    ids = torch.randint(0, 97, (2, 3 * 9 + 4), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 2 * 9 + 7 : 2 * 9 + 11] = ids[:, 2 * 9 + 7 : 2 * 9 + 11]  # two ids in segment 2, two in segment 3
    with torch.no_grad():
        loss = LastSegmentLoss(model)(ids, use_recall=True, prompt_end=torch.tensor([25, 25]), labels=labels)
        logits = model(ids, prompt_end=25).logits
    expected = torch.nn.functional.cross_entropy(logits[:, 24:28].reshape(-1, 97), ids[:, 25:29].reshape(-1))
    assert torch.isfinite(loss) and torch.allclose(loss, expected, rtol=0, atol=1e-10)


def test_detach_memory_trains_only_the_read_side():
    """With ``detach_memory`` the loss is the same number, but nothing that acts only before the scored
    segments (M_init: segment 0's memory input) gets gradient; without it, it does."""
    from hmt_runtime.training.objective import LastSegmentLoss

    model = make_model("llama", "causal", seed=3, prompt_recall=True)
    ids = torch.randint(0, 97, (2, 3 * 9 + 6), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, 18 + 3 : 18 + 6] = ids[:, 18 + 3 : 18 + 6]
    losses, grads = [], []
    for detach in (False, True):
        model.zero_grad(set_to_none=True)
        loss = LastSegmentLoss(model)(ids, use_recall=True, prompt_end=torch.tensor([21, 21]), labels=labels,
                                      detach_memory=detach)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.memory_init.grad)
        read = model.recall.w_q.weight.grad
    assert torch.allclose(losses[0], losses[1], rtol=0, atol=1e-12)
    assert grads[0] is not None and float(grads[0].abs().sum()) > 0
    assert grads[1] is None or float(grads[1].abs().sum()) == 0
    assert read is not None and float(read.abs().sum()) > 0  # the read side (segment 2's recall) still trains


def test_training_batch_max_tail_bounds_the_last_segment():
    cfg = HMTConfig(segment_tokens=200, sensory_tokens=8)
    rng = random.Random(3)
    for _ in range(5):
        ids, prompt_end, _ = retrieval.training_batch(TOK, prose(), 2, cfg, 2, rng, tasks=("passkey",), max_tail=40)
        assert bool((prompt_end - cfg.segment_tokens <= 40).all()) and bool((prompt_end > cfg.segment_tokens).all())
    with pytest.raises(ValueError, match="max_tail=10"):
        retrieval.training_batch(TOK, prose(), 2, cfg, 2, rng, max_tail=10)


def test_replay_hit_reads_the_ids_the_scheduler_replays():
    """The benchmark's ``replay-hit`` rebuilds the replayed ids from a sample alone: they are the ids the
    scheduler put in the window at the prompt's end (several prompt lengths; more segments than slots)."""
    from hmt_runtime.incremental.scheduler import Scheduler

    model = make_model("llama", "causal", seed=2, prompt_recall=True, replay=2, replay_query=3)
    gen = torch.Generator().manual_seed(4)
    for length in (12, 20, 31, 45, 58):
        ids = torch.randint(0, 90, (length + 2,), generator=gen)
        sample = retrieval.Sample(ids, length, "x", 0, "passkey")
        sched = Scheduler(model, rows=1)
        row = sched.add(ids[:length])
        replayed = bench.replayed_ids(model, sample)
        held = sched.state.replay_ids[row, : int(sched.state.replay_len[row])]
        assert torch.equal(replayed, held), length
        assert bench.score(model, "replay-hit", sample) == bench._holds(held, ids[length:])
    assert bench.replayed_ids(make_model("llama", "causal", prompt_recall=True), sample) is None
