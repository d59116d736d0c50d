"""Replay at the end of a prompt (docs/spec.md): the rule that picks slots, and generation equal to the forward
with ``prompt_end`` on every path (lean and transformers engines, causal and paper recall, 1 and 2 slots)."""
import pytest
import torch

from hmt_runtime import HMTConfig, MemoryState, generate, ingest
from hmt_runtime.core import replay
from hmt_runtime.incremental.scheduler import Scheduler
from helpers import SEGMENT, VOCAB, CharTokenizer, make_model
from test_prompt_recall import assert_scheduler_logits_equal_the_forward, forward_greedy_from_prompt, prompts

J = 4  # make_model's summary_tokens


def replay_model(family="llama", recall="causal", count=1, seed=3, **kw):
    return make_model(family, recall, seed=seed, prompt_recall=True, replay=count, replay_query=3, **kw)


# ------------------------------------------------------------------------------------------------ the rule
def test_the_slot_that_shares_the_question_s_rare_ids_is_chosen():
    filler = torch.tensor([5, 6, 7, 8] * 3)
    slots = [filler.clone() for _ in range(5)]
    slots[1] = torch.cat([filler[:6], torch.tensor([40, 41, 42]), filler[:3]])  # the needle: 40 41 42
    query = torch.tensor([7, 30, 41])  # asks for 41, which only slot 1 holds
    assert replay.choose(1, query, slots) == [1]
    # two slots are returned oldest first, whatever their rank
    slots[3] = torch.cat([filler[:4], torch.tensor([30]), filler[:4]])
    assert replay.choose(2, query, slots) == [1, 3]
    # nothing asked matches: the slot unlike the others (its novelty) wins over the newest
    assert replay.choose(1, torch.tensor([99]), slots) == [1]
    # identical slots: the newest
    assert replay.choose(1, torch.tensor([99]), [filler] * 4) == [3]
    assert replay.choose(0, query, slots) == [] and replay.choose(2, query, []) == []
    assert replay.choose(9, query, slots) == [0, 1, 2, 3, 4]


def test_rare_shared_ids_outweigh_several_common_ones():
    # squared weights (tf-idf's dot product): one id only slot 0 holds beats three ids that half of the slots hold
    common = [torch.tensor([41, 42, 43, 9])] * 3
    slots = [torch.tensor([40, 7, 8])] + common + [torch.tensor([5, 6, 7])]
    query = torch.tensor([40, 41, 42, 43])
    # weights: 40 -> rarity(40) * 1, the others -> rarity * log(5/3)/log(5) = 0.32 rarity; a plain sum would rank
    # slot 1 first (3 * 0.32 > 1), the sum of squares ranks slot 0 first (3 * 0.10 < 1)
    assert replay.choose(1, query, slots) == [0]


def test_an_id_rare_in_the_language_outweighs_one_rare_only_in_this_prompt():
    # "where" (a low, frequent id) in one slot of prose against a name (a high, rare id) that three slots hold:
    # in-prompt counts alone (idf) would pick the slot with "where"; the rarity of the id in any text picks the name
    vocab = torch.arange(50000)  # a 50k vocabulary whose ids are ranked most frequent first
    where, name, filler = 800, 15000, list(range(300, 550))  # slots of ~250 ids, as the default's (254)
    slots = [torch.tensor(filler + [i]) for i in range(1000, 1030)]
    slots[2] = torch.tensor(filler + [name])
    slots[5] = torch.tensor(filler + [name])
    slots[7] = torch.tensor(filler + [where])
    slots[9] = torch.tensor(filler + [name])
    query = torch.tensor([where, name, 300])
    assert replay.choose(1, query, slots, vocab) == [9]
    r = replay.rarity(50000, 254)
    assert r[name] > r[where] > r[300] > 0 and torch.all(r[1:] >= r[:-1])  # rarer with the rank, always positive
    # a name every slot holds tells them nothing: novelty decides (the slot unlike the others)
    same = [torch.tensor(filler + [name])] * 6
    same[1] = torch.tensor(filler + [name, 4000])
    assert replay.choose(1, torch.tensor([name]), same, vocab) == [1]


def test_of_slots_that_answer_alike_the_newest_wins():
    # "Mary went to the kitchen." ... "Mary went to the garden.": the latest fact supersedes
    filler = [300, 301, 302, 303]
    slots = [torch.tensor(filler + [1000 + i]) for i in range(10)]
    mary, went, kitchen, garden = 9000, 700, 5001, 5002
    slots[1] = torch.tensor(filler + [mary, went, kitchen, 5003])  # more unlike the others (novelty) than slot 6
    slots[6] = torch.tensor(filler + [mary, went, garden])
    slots[3] = torch.tensor(filler + [went])
    assert replay.choose(1, torch.tensor([mary, 300]), slots) == [6]
    # recency only weighs between near-equal matches: a slot matching a rarer id stays first however old it is
    assert replay.choose(1, torch.tensor([mary, kitchen]), slots) == [1]


def test_the_question_is_the_prompt_s_last_line():
    nl = 50
    breaks = torch.zeros(64, dtype=torch.bool)
    breaks[nl] = True
    slots = [torch.tensor([30, 31, 32]), torch.tensor([40, 5, 6]), torch.tensor([5, 6, 7])]
    line = [40] + [5] * (replay.QUESTION_MIN_IDS - 1)  # the question asks for 40 (slot 1)
    query = torch.tensor([30, 31, 32, nl] + line)  # the prose before it names what slot 0 holds
    assert replay.question(query, breaks).tolist() == line
    assert replay.choose(1, query, slots, breaks=breaks) == [1]
    assert replay.choose(1, query, slots) == [0]  # without line breaks the whole query asks
    # a last line shorter than QUESTION_MIN_IDS ("Answer:") takes the line before it too
    short = torch.tensor([30, nl, 40, 5, 6, 7, 5, 6, 7, nl, 8, 9])
    assert replay.question(short, breaks).tolist() == [40, 5, 6, 7, 5, 6, 7, nl, 8, 9]
    assert torch.equal(replay.question(torch.tensor([1, 2, nl, 3]), breaks), torch.tensor([1, 2, nl, 3]))


def test_line_breaks_from_token_names():
    class Tok:
        names = ["\u010a", "a\u010a\u010a", "<0x0A>", "\u0120key", "x"]

        def __len__(self):
            return len(self.names)

        def convert_ids_to_tokens(self, ids):
            return [self.names[i] for i in ids]

    assert replay.line_breaks(Tok(), 6).tolist() == [True, True, True, False, False, False]
    assert not replay.line_breaks(None, 3).any()


def test_canonical_ids_join_case_and_space_variants():
    class Tok:
        names = ["Key", "\u0120key", "key", "\u0120door", "\u010a", "\u0120"]

        def __len__(self):
            return len(self.names)

        def convert_ids_to_tokens(self, ids):
            return [self.names[i] for i in ids]

    canon = replay.canonical_ids(Tok(), 8)
    assert canon[0] == canon[1] == canon[2]
    assert len(set(canon[3:].tolist())) == 5  # door, newline, space and the two unnamed ids stay apart
    assert torch.equal(replay.canonical_ids(None, 5), torch.arange(5))
    assert torch.equal(replay.canonical_ids(CharTokenizer(), 4), torch.arange(4))  # no names: identity


def test_config_checks_and_records_replay():
    cfg = HMTConfig(prompt_recall=True, replay=2)
    assert cfg.slot_tokens == cfg.sensory_tokens + cfg.segment_tokens
    assert cfg.kv_window == cfg.window + 2 * cfg.slot_tokens
    assert HMTConfig.from_dict(cfg.to_dict()).replay == 2
    old = cfg.to_dict()
    del old["replay"], old["replay_query"], old["prompt_recall"]
    assert HMTConfig.from_dict(old).replay == 0 and HMTConfig.from_dict(old).kv_window == cfg.window
    with pytest.raises(ValueError, match="replay=1: needs prompt_recall=True"):
        HMTConfig(replay=1)
    with pytest.raises(ValueError, match="replay=-1"):
        HMTConfig(prompt_recall=True, replay=-1)
    with pytest.raises(ValueError, match="replay_query=200: expected at most summary_tokens=111"):
        HMTConfig(prompt_recall=True, replay=1, replay_query=200)
    with pytest.raises(ValueError, match="replay=4: expected at most memory_slots=3"):
        HMTConfig(prompt_recall=True, replay=4, memory_slots=3)
    later = HMTConfig()
    later.set_replay(2)  # turns prompt_recall on with it
    assert later.prompt_recall and later.replay == 2 and later.kv_window == cfg.kv_window
    later.set_replay(0)
    assert later.prompt_recall and later.kv_window == later.window
    with pytest.raises(ValueError, match="replay=-1"):
        later.set_replay(-1)


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # the lean engine and the transformers engine
@pytest.mark.parametrize("recall", ["causal", "paper"])
@pytest.mark.parametrize("count", [1, 2])
def test_scheduler_logits_equal_the_forward_with_replay(family, recall, count):
    """Logits after the prompt and after each fed token of a continuation that closes the replaying segment."""
    assert_scheduler_logits_equal_the_forward(replay_model(family, recall, count), recall)


@pytest.mark.parametrize("count", [1, 2])
def test_generation_equals_the_forward_and_replay_changes_it(count):
    model = replay_model("llama", "causal", count)
    plain = make_model("llama", "causal", seed=3, prompt_recall=True)
    new = SEGMENT + 2
    outs = generate(model, prompts(), max_new_tokens=new)
    for prompt, out in zip(prompts(), outs):
        assert out == forward_greedy_from_prompt(model, prompt, new)
    ids = torch.tensor([prompts()[4]])
    with torch.no_grad():
        with_replay = model(ids, prompt_end=ids.shape[1]).logits
        without = plain(ids, prompt_end=ids.shape[1]).logits
    start = 4 * SEGMENT
    assert torch.equal(with_replay[:, :start], without[:, :start])  # only the prompt's segment reads the slots
    assert not torch.allclose(with_replay[:, start:], without[:, start:])


def test_a_batch_with_prompts_ending_in_different_segments_equals_each_row_alone():
    model = replay_model("llama", "causal", 2)
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (3, 4 * SEGMENT + 2), generator=gen)
    ends = torch.tensor([4 * SEGMENT + 2, 3 * SEGMENT + 1, 2 * SEGMENT + 5])
    with torch.no_grad():
        batch = model(ids, prompt_end=ends).logits
        for row in range(3):
            alone = model(ids[row : row + 1], prompt_end=ends[row : row + 1]).logits
            assert torch.allclose(batch[row], alone[0], rtol=0, atol=1e-10)


def test_a_question_after_an_ingested_document_equals_one_prompt_with_replay(tmp_path):
    model = replay_model("llama", "causal", 2, seed=5)
    gen = torch.Generator().manual_seed(1)
    document = torch.randint(0, VOCAB, (4 * SEGMENT + 2,), generator=gen)
    question = torch.randint(0, VOCAB, (5,), generator=gen)
    state, _ = ingest(model, document[None])
    assert int(state.replay_len[0]) == 0 and int(state.slot_len[0].min()) > 0  # a document is not a prompt
    state.save(tmp_path / "doc.safetensors", config=model.config)
    state = MemoryState.load(tmp_path / "doc.safetensors", config=model.config)
    after = generate(model, [question.tolist()], max_new_tokens=6, state=state)[0][len(question):]
    whole = forward_greedy_from_prompt(model, torch.cat([document, question]).tolist(), 6)
    assert after == whole[len(document) + len(question):]
    # a state taken mid-answer (replayed ids in it) resumes exactly
    sched = Scheduler(model, rows=1)
    row = sched.add(question, state=state)
    assert int(sched.state.replay_len[row]) > 0
    path = tmp_path / "mid.safetensors"
    sched.export(row).save(path, config=model.config)
    again = Scheduler(model, rows=1)
    resumed = again.add(torch.tensor([3]), state=MemoryState.load(path, config=model.config), prompt=False)
    sched.tokens[row] = 3
    sched.step()
    assert torch.allclose(again.logits[resumed], sched.logits[row], rtol=0, atol=1e-10)


def test_states_without_replay_fields_still_load(tmp_path):
    from safetensors.torch import load_file, save_file
    from hmt_runtime.core.checks import checksum_metadata

    model = make_model("llama", "causal", seed=5, prompt_recall=True)
    state, _ = ingest(model, torch.arange(2 * SEGMENT + 1)[None] % VOCAB)
    path = tmp_path / "s.safetensors"
    state.save(path, config=model.config)
    tensors = {k: v for k, v in load_file(path).items() if k not in ("slot_ids", "slot_len", "replay_ids",
                                                                       "replay_len")}
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if not k.startswith("sha256")}
    save_file(tensors, path, metadata={**meta, **checksum_metadata(tensors)})
    loaded = MemoryState.load(path, config=model.config)
    assert loaded.slot_ids.shape == (1, 3, 0) and torch.equal(loaded.memory, state.memory)
    # one replay field without the others is a damaged file
    save_file({**tensors, "replay_len": torch.zeros(1, dtype=torch.long)}, path,
              metadata={**meta, **checksum_metadata({**tensors, "replay_len": torch.zeros(1, dtype=torch.long)})})
    with pytest.raises(ValueError, match="missing"):
        MemoryState.load(path, config=model.config)


def test_a_state_with_bad_replay_fields_is_refused():
    model = replay_model()
    state, _ = ingest(model, torch.arange(2 * SEGMENT + 1)[None] % VOCAB)
    bad = state.clone()
    bad.replay_len[0] = 10 ** 6
    with pytest.raises(ValueError, match="replay_len"):
        bad.validate(model.config)
    bad = state.clone()
    bad.slot_ids[0, 0, 0] = VOCAB + 5
    with pytest.raises(ValueError, match="slot_ids"):
        bad.validate(model.config, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="slot_ids"):
        state.validate(make_model("llama", "causal", seed=3, prompt_recall=True).config)


# ------------------------------------------------------------------------------------------------ the default
@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_the_default_gives_back_what_it_read_beyond_its_window(task):
    """Through the plain API, greedy, no extra argument: the key (a pass key in filler, a fact in Austen's prose)
    lies segments before the question, out of the window; with replay off the same prompts are never answered
    (nothing else holds it)."""
    import random
    from pathlib import Path

    from hmt_runtime import HMTModel
    from hmt_runtime.training import retrieval

    model = HMTModel.from_pretrained("default")
    assert model.config.replay > 0 and model.config.prompt_recall
    book = Path(__file__).resolve().parents[1] / "data" / "austen" / "persuasion.txt"
    text = book.read_text(encoding="utf-8")[:20000]
    prose = [torch.tensor(model.tokenizer(text, add_special_tokens=False).input_ids)]
    samples = [retrieval.build(model.tokenizer, task, 1200, depth, random.Random(f"default/{i}"), "valid",
                               prose, gap=model.config.window) for i, depth in enumerate((0.1, 0.4, 0.7, 0.9))]
    prompts = [s.ids[: s.prompt_end].tolist() for s in samples]
    width = max(s.answer_ids.numel() for s in samples)
    answered = [out[len(p) : len(p) + s.answer_ids.numel()] == s.answer_ids.tolist()
                for p, s, out in zip(prompts, samples, generate(model, prompts, max_new_tokens=width))]
    assert sum(answered) >= 3, answered
    # a document read with ingest, the question asked on its state
    s = samples[answered.index(True)]
    prompt = s.ids[: s.prompt_end].tolist()
    question_at = len(prompt) - 1 - prompt[::-1].index(retrieval._encode(model.tokenizer, "\n")[0])
    state, _ = ingest(model, s.ids[None, :question_at])
    out = generate(model, [s.ids[question_at : s.prompt_end].tolist()], max_new_tokens=s.answer_ids.numel(),
                   state=state)[0][s.prompt_end - question_at :]
    assert out == s.answer_ids.tolist()
    model.config.set_replay(0)
    off = generate(model, prompts, max_new_tokens=width)
    lucky = sum(o[len(p) : len(p) + s.answer_ids.numel()] == s.answer_ids.tolist()
                for p, s, o in zip(prompts, samples, off))
    assert lucky <= (0 if task == "passkey" else 1), lucky  # a needle's value is one of four: a guess may hit
