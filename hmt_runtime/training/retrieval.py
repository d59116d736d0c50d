"""Retrieval tasks: prompts whose answer was read far beyond the window, for training and for the benchmark.

Three tasks, each built from a haystack of token ids, a needle and a question at the end of the prompt:

- ``passkey``: a key (digits or a word code) hidden in repeated filler sentences;
- ``needle``: a sentence stating a fact ("<person>'s favourite <thing> is <value>.") hidden in natural prose;
- ``facts``: bAbI-style facts ("Mary went to the kitchen.") scattered through prose, several about the same
  people; the question asks where one of them is and the answer is that person's latest fact.

Every task has two disjoint sets of phrasings (needles, questions, answer lead-ins, fillers, names and values):
``split="train"`` for training and ``split="valid"`` for the benchmark, so that the benchmark never scores a
phrasing training saw.  A sample is ``(ids, prompt_end, answer_ids)``: the prompt is ``ids[:prompt_end]``, the
answer ``ids[prompt_end:]``; it is answered when greedy decoding after the prompt gives the answer's tokens,
i.e. when every answer token is the argmax of the logits before it (``answered``).

Depth ``d`` in [0, 1] places the needle (the first fact) at that fraction of the haystack.  A needle is
inserted after a sentence end of the haystack where one is near, else at the exact token position.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

TASKS = ("passkey", "needle", "facts")
ANSWER_ROOM = 16  # training prompts end at least this many ids before their last segment's end
SPLITS = ("train", "valid")

_FILLERS = {
    "train": [
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
        "A river runs past the old mill. The wheel turns slowly. Birds sing in the tall trees.",
        "Rain fell on the quiet town. The shops were closed. A dog slept by the door.",
        "The train left the station at noon. Fields passed by the window. Nobody spoke.",
        "Snow covered the road. Smoke rose from the chimney. A cart went slowly up the lane.",
        "The market was busy. People bought bread and apples. A bell rang in the square.",
    ],
    "valid": [
        "The wind moves over the hills. Clouds drift to the east. The day goes on as before.",
        "Boats rest in the harbour. Gulls circle above the water. The tide comes in and out.",
    ],
}
_PASSKEY = {
    "train": {
        "needle": [
            "The pass key is {key}. Remember it. {key} is the pass key.",
            "Important: the secret code is {key}. Keep the code {key} in mind.",
            "Note this down, the access number is {key}.",
            "Your password for the vault is {key}.",
            "The key you will be asked for is {key}. Again: {key}.",
            "Write this somewhere safe: {key} opens the door.",
            "The magic word of the day is {key}.",
            "For later: the reference code is {key}.",
            "My lucky number is {key}, she said.",
        ],
        "question": [
            "What is the pass key? The pass key is",
            "What was the secret code? The secret code is",
            "Question: what is the access number? Answer:",
            "Tell me the password for the vault. The password is",
            "Which key were you asked to remember? It is",
            "What opens the door? The answer is",
            "Say the magic word of the day:",
            "Give the reference code. Reference code:",
            "What was her lucky number? Her lucky number was",
            "Repeat the code you were given earlier.",
        ],
    },
    "valid": {
        "needle": [
            "Listen carefully: the combination is {key}. Do not forget {key}.",
            "The hidden number for today is {key}.",
        ],
        "question": [
            "What is the combination? The combination is",
            "Recall the hidden number for today. It was",
        ],
    },
}
_NEEDLE = {
    "train": {
        "people": ["Arthur", "Beatrice", "Cedric", "Dolores", "Edmund", "Fiona", "Gregory", "Helena", "Ivan", "Judith"],
        "things": {"colour": ["crimson", "turquoise", "amber", "violet", "olive"],
                   "fruit": ["apricot", "fig", "mango", "quince", "plum"],
                   "city": ["Lisbon", "Oslo", "Prague", "Vienna", "Dublin"]},
        "needle": ["{person}'s favourite {thing} is {value}.", "It is well known that the {thing} {person} loves "
                   "most is {value}.", "By the way, {person} once said that {value} is the best {thing}.",
                   "Of every {thing}, {person} liked {value} the most.",
                   "When asked, {person} always chose {value} as {thing}."],
        "question": ["What is {person}'s favourite {thing}? {person}'s favourite {thing} is",
                     "Which {thing} does {person} love most? The answer is",
                     "Question: {person}'s favourite {thing}? Answer:",
                     "Tell me the {thing} that {person} likes best.",
                     "{person} likes one {thing} above all. Which one? It is",
                     "What {thing} would {person} choose?"],
    },
    "valid": {
        "people": ["Kenneth", "Lucinda", "Matthias", "Nora", "Oswin", "Philippa"],
        "things": {"flower": ["tulip", "orchid", "lily", "daisy"],
                   "metal": ["copper", "silver", "bronze", "nickel"]},
        "needle": ["Everyone agreed that {person} preferred the {value} above any other {thing}.",
                   "{person} has a favourite {thing}: the {value}."],
        "question": ["Which {thing} does {person} prefer? It is the",
                     "Name the favourite {thing} of {person}. The"],
    },
}
_FACTS = {
    "train": {
        "people": ["Mary", "John", "Sandra", "Daniel"],
        "places": ["kitchen", "garden", "office", "hallway", "bathroom", "bedroom"],
        "fact": ["{person} went to the {place}.", "{person} moved to the {place}.",
                 "{person} travelled to the {place}.", "Then {person} walked into the {place}.",
                 "{person} ran to the {place}."],
        "question": ["Where is {person}? {person} is in the", "Question: where is {person} now? Answer: the",
                     "Which room did {person} go to last? The", "Where can {person} be found now? In the",
                     "Where did {person} end up? The"],
    },
    "valid": {
        "people": ["Julie", "Fred", "Bill", "Emily"],
        "places": ["cellar", "library", "attic", "garage", "studio"],
        "fact": ["{person} journeyed to the {place}.", "{person} went back to the {place}."],
        "question": ["Where is {person} at the end? In the"],
    },
}


@dataclass
class Sample:
    """One retrieval prompt and its answer: ``ids`` (L,) = prompt + answer, ``prompt_end`` = the prompt's
    length, ``answer`` the answer's text; ``needle_at``: where the needle (the first fact) starts in ``ids``."""

    ids: torch.Tensor
    prompt_end: int
    answer: str
    needle_at: int
    task: str

    @property
    def answer_ids(self) -> torch.Tensor:
        return self.ids[self.prompt_end :]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _key(rng: random.Random) -> str:
    if rng.random() < 0.75:
        digits = rng.randint(3, 6)
        return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return "".join(rng.choice(letters) for _ in range(3)) + "-" + str(rng.randint(10, 99))


def _texts(task: str, split: str, rng: random.Random, n_facts: int = 3):
    """(needle sentences in order, question, answer) for one sample of ``task``."""
    if task == "passkey":
        t = _PASSKEY[split]
        key = _key(rng)
        return [rng.choice(t["needle"]).format(key=key)], rng.choice(t["question"]), key
    if task == "needle":
        t = _NEEDLE[split]
        person, thing = rng.choice(t["people"]), rng.choice(sorted(t["things"]))
        value = rng.choice(t["things"][thing])
        fill = dict(person=person, thing=thing, value=value)
        return [rng.choice(t["needle"]).format(**fill)], rng.choice(t["question"]).format(**fill), value
    if task == "facts":
        t = _FACTS[split]
        people = rng.sample(t["people"], min(2, len(t["people"])))
        facts, where = [], {}
        for i in range(n_facts):
            person = people[0] if i == 0 else rng.choice(people)
            place = rng.choice([p for p in t["places"] if p != where.get(person)])
            where[person] = place
            facts.append(rng.choice(t["fact"]).format(person=person, place=place))
        asked = people[0]
        return facts, rng.choice(t["question"]).format(person=asked), where[asked]
    raise ValueError(f"task={task!r}: expected one of {TASKS}")


def filler_ids(tokenizer, split: str, length: int, rng: random.Random) -> list[int]:
    """``length`` ids of repeated filler sentences of ``split`` (the pass-key haystack)."""
    sentence = _encode(tokenizer, " " + rng.choice(_FILLERS[split]))
    return (sentence * (length // len(sentence) + 1))[:length]


def _sentence_end(tokenizer, haystack: list[int], at: int, reach: int = 40) -> int:
    """A position near ``at`` just after a sentence end of ``haystack`` (else ``at``)."""
    for offset in range(reach):
        for p in (at - offset, at + offset):
            if 0 < p < len(haystack) and tokenizer.decode(haystack[p - 1 : p]).rstrip().endswith((".", "!", "?")):
                return p
    return at


def build(tokenizer, task: str, length: int, depth: float, rng: random.Random, split: str = "valid",
          prose: list[torch.Tensor] | None = None, gap: int = 0) -> Sample:
    """A sample of about ``length`` prompt ids of ``task`` with the needle at ``depth`` of the haystack.

    prose: documents (1-D id tensors) for the ``needle`` and ``facts`` haystacks (a random stretch of one is
    used); ``passkey`` uses filler sentences.  gap: at least this many haystack ids between the last needle
    and the question (e.g. the window, so that the needle is out of it).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r}: expected a number in [0, 1]")
    needles, question, answer = _texts(task, split, rng)
    needle_ids = [_encode(tokenizer, " " + text) for text in needles]
    question_ids = _encode(tokenizer, "\n" + question)
    answer_ids = _encode(tokenizer, " " + answer)
    room = length - len(question_ids) - sum(map(len, needle_ids))
    if room < max(1, gap):
        raise ValueError(f"length={length}: too short for this {task} sample's needles "
                         f"({sum(map(len, needle_ids))} ids), question ({len(question_ids)}) and gap={gap}")
    if task == "passkey" or not prose:
        haystack = filler_ids(tokenizer, split, room, rng)
    else:
        doc = rng.choice([d for d in prose if d.numel() > room] or prose)
        start = rng.randint(0, max(0, doc.numel() - room))
        haystack = doc[start : start + room].tolist()
    latest = len(haystack) - gap
    first = _sentence_end(tokenizer, haystack, int(depth * latest))
    first = min(first, latest)
    # later facts between the first needle and the gap, in order
    spots = [first] + sorted(rng.randint(first, latest) for _ in needle_ids[1:])
    ids, cursor, needle_at = [], 0, 0
    for i, (spot, needle) in enumerate(zip(spots, needle_ids)):
        ids += haystack[cursor:spot]
        if i == 0:
            needle_at = len(ids)
        ids += needle
        cursor = spot
    ids += haystack[cursor:] + question_ids
    prompt_end = len(ids)
    return Sample(torch.tensor(ids + answer_ids), prompt_end, answer, needle_at, task)


def answered(logits: torch.Tensor, sample: Sample) -> bool:
    """Whether greedy decoding after the prompt gives the answer: logits (A, V) at positions prompt_end - 1 ..
    len - 2 (those predicting the answer's A ids)."""
    return bool(torch.equal(logits.argmax(dim=-1).cpu(), sample.answer_ids.cpu()))


def training_batch(tokenizer, prose: list[torch.Tensor], batch: int, cfg, segments: int, rng: random.Random,
                   tasks=TASKS, split: str = "train", max_tail: int | None = None):
    """A batch of ``split`` samples whose answer lies only in memory: (ids (B, S), prompt_end (B,),
    labels (B, S) = the answer ids, -100 elsewhere).

    Every prompt spans ``segments`` segments of ``cfg`` (Ls = cfg.segment_tokens) and ends inside the last one;
    every needle ends before the last segment's sensory tokens, so no window ever holds it with the question.
    Rows are padded on the right (after the answer) to one length; padding is never scored.  max_tail: at most
    this many prompt ids in the last segment (cheaper steps; None: up to Ls - ANSWER_ROOM)."""
    if segments < 2:
        raise ValueError(f"segments={segments}: expected >= 2 (the needle's segment and the question's)")
    ls, k = cfg.segment_tokens, cfg.sensory_tokens
    low = min(24, ls - 1)
    high = ls - ANSWER_ROOM if max_tail is None else min(ls - ANSWER_ROOM, max_tail)
    if high < low:
        raise ValueError(f"max_tail={max_tail}: expected >= {low} (room for a question)")
    tail = rng.randint(low, max(low, high))  # the answer usually ends in the same segment
    length = (segments - 1) * ls + tail
    rows = [build(tokenizer, rng.choice(tasks), length, rng.random(), rng, split, prose, gap=tail + k + 2)
            for _ in range(batch)]
    width = max(r.ids.numel() for r in rows)
    pad = getattr(tokenizer, "eos_token_id", None) or 0
    ids = torch.full((batch, width), pad, dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : r.ids.numel()] = r.ids
        labels[b, r.prompt_end : r.ids.numel()] = r.answer_ids
    return ids, torch.tensor([r.prompt_end for r in rows]), labels
