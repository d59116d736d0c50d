"""generate(): the user-facing entry point over text or token ids, on the scheduler (hmt_runtime.scheduler).

    text = hmt_runtime.generate(model, "Once upon a time", max_new_tokens=40)
    for piece in hmt_runtime.generate(model, "Once upon a time", max_new_tokens=40, stream=True):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import json
import weakref
from typing import Iterator

import torch

from .memory import MemoryState
from .scheduler import Scheduler
from .segment import _eos_set, _warpers, check_sampling

DEFAULT_ROWS = 8

# With CUDA graphs a scheduler is worth keeping between calls (its graphs are captured once): the last one built
# for a model, reused when the request and the model's weights are unchanged.
_SCHEDULERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _scheduler(model, rows: int, engine: str, cuda_graphs) -> Scheduler:
    key = (rows, engine, cuda_graphs, str(model.device), str(model.dtype), json.dumps(model.config.to_dict()),
           tuple(p.data_ptr() for p in model.parameters()))
    cached = _SCHEDULERS.get(model)
    if cached is not None and cached[0] == key and not cached[1].busy:
        sched = cached[1]
        for row in sched.live_rows():  # a stream abandoned early leaves rows live
            sched.release(row)
        return sched
    sched = Scheduler(model, rows, engine=engine, cuda_graphs=cuda_graphs)
    if sched.graphs is not None:
        _SCHEDULERS[model] = (key, sched)
    return sched


def _encode(model, prompts):
    """-> (prompts as a list of str or of 1-D int64 CPU tensors, kind) where kind says how to return results:
    "text", "texts", "ids", "tensor", "tensor1d" (a 1-D tensor: one prompt)."""
    if isinstance(prompts, str):
        return [prompts], "text"
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype.is_floating_point or prompts.dtype == torch.bool or prompts.is_complex():
            raise TypeError(f"prompts: expected a tensor of integer token ids, got dtype {prompts.dtype}")
        if prompts.dim() == 1:
            return [prompts.detach().long().cpu()], "tensor1d"
        if prompts.dim() != 2:
            raise ValueError(f"prompts: expected a tensor of shape (batch, seq_len) or (seq_len,), "
                             f"got {tuple(prompts.shape)}")
        if prompts.shape[0] == 0:
            raise ValueError("prompts: expected at least one prompt, got a tensor with 0 rows")
        return list(prompts.detach().long().cpu()), "tensor"
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got an empty list")
        if all(isinstance(p, str) for p in prompts):
            return list(prompts), "texts"
        if all(isinstance(p, (list, tuple)) for p in prompts):
            for i, p in enumerate(prompts):
                bad = next((t for t in p if isinstance(t, bool) or not isinstance(t, int)), None)
                if bad is not None:
                    raise TypeError(f"prompts[{i}]: expected integer token ids, found {bad!r}")
            return [torch.tensor(p, dtype=torch.long).reshape(-1) for p in prompts], "ids"
    raise TypeError("prompts: expected a string, a list of strings, a tensor of ids, or a list of id lists; "
                    f"got {type(prompts).__name__}")


def _check_state(model, state, n_prompts: int) -> None:
    if state is None:
        return
    if not isinstance(state, MemoryState):
        raise TypeError(f"state: expected a MemoryState (from hmt_runtime.ingest or MemoryState.load), "
                        f"got {type(state).__name__}")
    if state.batch_size not in (1, n_prompts):
        raise ValueError(f"state: holds {state.batch_size} sequences; expected 1 (shared by every prompt) "
                         f"or {n_prompts} (one per prompt)")
    expected = MemoryState.empty(model.config, 1, model.width, device="meta").tensors()
    for name, tensor in state.tensors().items():
        if tensor.shape[1:] != expected[name].shape[1:]:
            raise ValueError(f"state.{name}: shape {tuple(tensor.shape)} was made for another HMT config; this "
                             f"model needs (B, {', '.join(map(str, expected[name].shape[1:]))})")


class _TextPieces:
    """Incremental detokenisation: the new text of a growing token list, held back while it ends in a partial
    character, so that the pieces concatenate to the decode of all tokens."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sent = tokenizer, ""

    def update(self, tokens: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if not final and (text.endswith("\ufffd") or not text.startswith(self.sent)):
            return ""
        piece = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text if text.startswith(self.sent) else self.sent
        return piece


def generate(model, prompts, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k=None, top_p=None, eos_token_id=None, stream: bool = False, state: MemoryState | None = None,
             progress: bool = False, batch_size: int | None = None, engine: str = "auto", cuda_graphs="auto"):
    """Continue ``prompts`` with an HMTModel.

    prompts: a string, a list of strings, a tensor (B, S) or (S,) of ids, or a list of id lists (lengths may
        differ).  Each prompt keeps its own segment boundaries and memory; greedy output per prompt equals
        generating it alone, whatever else is in the batch.
    max_new_tokens: >= 0 tokens per prompt.  do_sample / temperature (> 0) / top_k (>= 1) / top_p (in (0, 1]):
        sampling, as in transformers.  eos_token_id: an id or a list of ids that end a prompt's generation
        (default for text prompts: the tokenizer's EOS); the EOS token is part of the output.
    stream: False returns the results; True returns an iterator of chunks as they are produced: a string prompt
        (or a 1-D tensor) yields str pieces (ids lists); any batch input yields, per step, a list with one
        entry per prompt (the new text or ids of that prompt, empty when it produced nothing this step).  The
        chunks concatenate to exactly the non-streamed result.
    state: a MemoryState (``hmt_runtime.ingest`` / ``MemoryState.load``) to continue from: 1 row (shared by every
        prompt) or one row per prompt; it is not modified.
    progress: a progress bar while prompts are ingested.  batch_size: rows decoded together (default
        min(len(prompts), 8)); more prompts wait for a free row.  engine / cuda_graphs: see ``Scheduler``.

    Returns what was given: the continuation text (str, or a list of str) without the prompt; for ids, prompt +
    continuation (a tensor for a tensor input, rows that stopped early padded with the smallest EOS id; else a
    list of lists).  Every argument is checked before any work starts.
    """
    check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r}: expected None or an integer >= 1")
    if engine not in ("auto", "lean", "transformers"):
        raise ValueError(f"engine={engine!r}: expected 'auto', 'lean' or 'transformers'")
    if cuda_graphs not in ("auto", True, False):
        raise ValueError(f"cuda_graphs={cuda_graphs!r}: expected 'auto', True or False")
    items, kind = _encode(model, prompts)
    _check_state(model, state, len(items))
    tokenizer = model.tokenizer
    if kind in ("text", "texts"):
        if tokenizer is None:
            raise ValueError("prompts: text needs a model with a tokenizer (load the backbone by name or path)")
        for i, text in enumerate(items):
            if not text:
                raise ValueError(f"prompts[{i}]: empty prompt; expected at least one character")
        items = [torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long).reshape(-1)
                 for text in items]
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
    vocab = model.vocab_size
    for i, ids in enumerate(items):
        if not ids.numel():
            raise ValueError(f"prompts[{i}]: empty prompt; expected at least one token")
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= vocab:
            raise ValueError(f"prompts[{i}]: token id {low if low < 0 else high} is outside the vocabulary [0, {vocab})")
    eos = _eos_set(eos_token_id)
    if any(e < 0 or e >= vocab for e in eos):
        raise ValueError(f"eos_token_id={eos_token_id!r}: expected ids in [0, {vocab})")
    rows = batch_size or min(len(items), DEFAULT_ROWS)
    run = _Run(model, items, max_new_tokens, do_sample, temperature, top_k, top_p, eos, state, progress,
               min(rows, len(items)), engine, cuda_graphs)
    if stream:
        return _stream(run, kind, tokenizer)
    for _ in run:
        pass
    return _results(model, run, kind, tokenizer, eos)


def _results(model, run, kind, tokenizer, eos):
    items, outputs = run.items, run.outputs
    if kind in ("text", "texts"):
        texts = [tokenizer.decode(out, skip_special_tokens=True) for out in outputs]
        return texts[0] if kind == "text" else texts
    if kind == "ids":
        return [ids.tolist() + out for ids, out in zip(items, outputs)]
    whole = [torch.cat([ids, torch.tensor(out, dtype=torch.long)]) for ids, out in zip(items, outputs)]
    if kind == "tensor1d":
        return whole[0].to(model.device)
    width = max(w.numel() for w in whole)
    result = torch.full((len(whole), width), min(eos) if eos else 0, dtype=torch.long)
    for row, w in enumerate(whole):
        result[row, : w.numel()] = w
    return result.to(model.device)


def _stream(run, kind, tokenizer) -> Iterator:
    """Chunks of ``run`` as documented in ``generate`` (a generator: work happens as it is consumed)."""
    text = kind in ("text", "texts")
    single = kind in ("text", "tensor1d")
    pieces = [_TextPieces(tokenizer) for _ in run.items] if text else None
    for new in run:  # new: {prompt index: [token ids produced this step]}
        if text:
            chunk = [pieces[i].update(run.outputs[i], final=i in run.finished_now) if i in new else ""
                     for i in range(len(run.items))]
        else:
            chunk = [new.get(i, []) for i in range(len(run.items))]
        if single:
            if chunk[0]:
                yield chunk[0]
        elif any(chunk):
            yield chunk


class _Run:
    """One generate() call as an iterator over steps: each step yields {prompt index: new token ids}."""

    def __init__(self, model, items, max_new_tokens, do_sample, temperature, top_k, top_p, eos, state, progress,
                 rows, engine, cuda_graphs):
        self.model, self.items, self.max_new, self.eos = model, items, max_new_tokens, eos
        self.do_sample, self.warpers = do_sample, _warpers(do_sample, temperature, top_k, top_p)
        self.state, self.progress = state, progress
        self.rows, self.engine, self.cuda_graphs = rows, engine, cuda_graphs
        self.outputs: list[list[int]] = [[] for _ in items]
        self.finished_now: set[int] = set()

    def _state_for(self, index: int):
        if self.state is None:
            return None
        return self.state if self.state.batch_size == 1 else self.state.row(index)

    def __iter__(self):
        if self.max_new == 0:
            return
        sched = _scheduler(self.model, self.rows, self.engine, self.cuda_graphs)
        sched.busy = True
        device = self.model.device
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(i.numel() for i in self.items), unit="tok", desc="ingest", leave=False)
        pending = list(range(len(self.items)))
        owner: dict[int, int] = {}  # row -> prompt index
        try:
            while pending or owner:
                for row in sched.free_rows():  # admit waiting prompts into free rows
                    if not pending:
                        break
                    index = pending.pop(0)
                    ids = self.items[index].to(device)
                    sched.add(ids, state=self._state_for(index), row=row, on_progress=bar.update if bar else None)
                    owner[row] = index
                sched.pick(self.do_sample, self.warpers)
                chosen = sched.tokens[: max(owner) + 1].tolist()  # the one host read of a step
                new: dict[int, list[int]] = {}
                self.finished_now = set()
                for row, index in list(owner.items()):
                    token = chosen[row]
                    self.outputs[index].append(token)
                    new[index] = [token]
                    if token in self.eos or len(self.outputs[index]) >= self.max_new:
                        self.finished_now.add(index)
                        sched.release(row)
                        del owner[row]
                yield new
                if owner:
                    sched.step()
        finally:
            sched.busy = False
            if bar is not None:
                bar.close()
