"""Recall at the end of a prompt (docs/spec.md): generation equals the forward with ``prompt_end``, on every path."""
import pytest
import torch

from hmt_runtime import HMTConfig, generate, ingest
from hmt_runtime.incremental.scheduler import Scheduler
from helpers import SEGMENT, VOCAB, make_model

J = 4  # make_model's summary_tokens


@torch.no_grad()
def forward_greedy_from_prompt(model, prompt, max_new_tokens):
    """Greedy decoding with the teacher-forced forward, the prompt's end given: the reference of generation."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids]), prompt_end=len(prompt)).logits[0, -1].argmax()))
    return ids


def prompts(seed=0):
    """Inside the first segment (no memory), mid-segment after memory (before and after j), on a boundary."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (3, SEGMENT + 2, 2 * SEGMENT + J + 2, 2 * SEGMENT, 4 * SEGMENT + 1)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # the lean engine and the transformers engine
@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_generation_equals_the_forward_with_the_prompt_end(family, recall):
    model = make_model(family, recall, seed=3, prompt_recall=True)
    new = 2 * SEGMENT + 2
    batched = generate(model, prompts(), max_new_tokens=new)
    for prompt, out in zip(prompts(), batched):
        expected = forward_greedy_from_prompt(model, prompt, new)
        if recall == "causal":
            assert out == expected
            continue
        # paper mode: the prompt's segment is exact; later segments from position j on (provisional before it)
        first_later = (len(prompt) // SEGMENT + 1) * SEGMENT
        for i in range(len(prompt), len(out)):
            if i < first_later or (i - 1) % SEGMENT >= J - 1:
                assert out[i] == expected[i], f"token {i} of a prompt of {len(prompt)}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_scheduler_logits_equal_the_forward_with_the_prompt_end(family, recall):
    """Logits, not only argmaxes: after the prompt and after each fed token of a fixed continuation."""
    assert_scheduler_logits_equal_the_forward(make_model(family, recall, seed=3, prompt_recall=True), recall)


def assert_scheduler_logits_equal_the_forward(model, recall):
    """The scheduler's logits after each of ``prompts()`` and after each fed token of a continuation that
    closes the prompt's segment, against ``model(ids, prompt_end=...)`` (paper mode: where generation is exact)."""
    gen = torch.Generator().manual_seed(7)
    for prompt in prompts():
        more = torch.randint(0, VOCAB, (SEGMENT + 3,), generator=gen)
        ids = torch.cat([torch.tensor(prompt), more])
        with torch.no_grad():
            expected = model(ids[None], prompt_end=len(prompt)).logits[0]
        sched = Scheduler(model, rows=1)
        row = sched.add(torch.tensor(prompt))
        first_later = (len(prompt) // SEGMENT + 1) * SEGMENT
        for i in range(len(prompt), ids.shape[0]):
            exact = recall == "causal" or i <= first_later or (i - 1) % SEGMENT >= J - 1
            if exact:
                assert torch.allclose(sched.logits[row], expected[i - 1], rtol=0, atol=1e-9), (len(prompt), i)
            sched.tokens[row] = ids[i]
            sched.step()


@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_the_prompt_steers_recall_and_the_rule_is_off_by_default(recall):
    """The rule changes what a mid-segment prompt recalls (so the equality above is not vacuous), and a model
    without it is unchanged by ``prompt_end``."""
    on = make_model("llama", recall, seed=3, prompt_recall=True)
    off = make_model("llama", recall, seed=3)
    assert off.config.prompt_recall is False
    ids = torch.tensor([prompts()[2]])
    with torch.no_grad():
        plain = off(ids).logits
        assert torch.equal(off(ids, prompt_end=ids.shape[1]).logits, plain)
        steered = on(ids, prompt_end=ids.shape[1]).logits
    start = 2 * SEGMENT
    assert torch.equal(steered[:, :start], plain[:, :start])  # earlier segments untouched
    assert not torch.allclose(steered[:, start:], plain[:, start:])


@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_a_question_after_an_ingested_document_equals_one_prompt(recall):
    model = make_model("llama", recall, seed=5, prompt_recall=True)
    gen = torch.Generator().manual_seed(1)
    document = torch.randint(0, VOCAB, (3 * SEGMENT + 2,), generator=gen)
    question = torch.randint(0, VOCAB, (5,), generator=gen)
    state, _ = ingest(model, document[None])
    assert not bool(state.provisional.any()) or recall == "paper"
    after = generate(model, [question.tolist()], max_new_tokens=6, state=state)[0][len(question):]
    whole = generate(model, [torch.cat([document, question]).tolist()], max_new_tokens=6)[0]
    assert after == whole[len(document) + len(question):]
    expected = forward_greedy_from_prompt(model, torch.cat([document, question]).tolist(), 6)
    assert whole == expected
    sched = Scheduler(model, rows=1)
    row = sched.add(question, state=state)
    with torch.no_grad():
        reference = model(torch.cat([document, question])[None], prompt_end=len(document) + len(question)).logits
    assert torch.allclose(sched.logits[row], reference[0, -1], rtol=0, atol=1e-9)


def test_config_records_the_rule_and_old_configs_load_without_it():
    cfg = HMTConfig(prompt_recall=True)
    assert HMTConfig.from_dict(cfg.to_dict()).prompt_recall is True
    old = cfg.to_dict()
    del old["prompt_recall"]
    assert HMTConfig.from_dict(old).prompt_recall is False
    with pytest.raises(ValueError, match="prompt_recall='yes'"):
        HMTConfig(prompt_recall="yes")


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, r"prompt_end: 0 in row 0; expected a value in \[1, 7\]"),
    (8, ValueError, r"prompt_end: 8 in row 0"),
    ([3, 3], ValueError, r"expected 1 integers"),
    (2.5, ValueError, r"dtype torch.float"),
    (True, TypeError, r"prompt_end=True"),
])
def test_bad_prompt_end(value, error, match):
    model = make_model("llama", "causal", prompt_recall=True)
    with pytest.raises(error, match=match):
        model(torch.zeros(1, 7, dtype=torch.long), prompt_end=value)
