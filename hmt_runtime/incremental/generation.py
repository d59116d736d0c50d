"""The user-facing entry points, all on the scheduler (hmt_runtime.incremental.scheduler), the one incremental path:

* ``generate(model, prompts, ...)``: text or token ids in, text or ids out, batched, streamed if asked;
* ``ingest(model, input_ids, state=None)``: read a document into a ``MemoryState`` (flat memory);
* ``generate_ids(model, input_ids, ...)``: the transformers-style form behind ``HMTModel.generate``.

    text = hmt_runtime.generate(model, "Once upon a time", max_new_tokens=40)
    for piece in hmt_runtime.generate(model, "Once upon a time", max_new_tokens=40, stream=True):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import json
import weakref
from typing import Iterator

import torch

from .backend import check_choices
from ..core.checks import check_eos_token_id, check_input_ids, check_text, check_token_ids
from ..core.memory import MemoryState
from .requests import RequestBatch, Sequence, TextPieces
from .sampling import Sampling
from .scheduler import Scheduler


# ---------------------------------------------------------------------------------------------------- arguments
def check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 0")
    if do_sample and (not isinstance(temperature, (int, float)) or temperature <= 0):
        raise ValueError(f"temperature={temperature!r}: expected a number > 0 when sampling")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: expected None or an integer >= 1")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: expected None or a number in (0, 1]")


def _eos_set(eos_token_id, vocab_size: int) -> set[int]:
    """eos_token_id: None, an int or a list of ints, each in [0, vocab_size) (``checks.check_eos_token_id``)."""
    return check_eos_token_id(eos_token_id, vocab_size)


# ---------------------------------------------------------------------------------------------------- generate
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
    state.validate(model.config, width=model.width, vocab_size=model.vocab_size)  # values: ranges, finite


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
    check_choices(engine, cuda_graphs)
    items, kind = _encode(model, prompts)
    _check_state(model, state, len(items))
    tokenizer = model.tokenizer
    if kind in ("text", "texts"):
        if tokenizer is None:
            raise ValueError("prompts: text needs a model with a tokenizer (load the backbone by name or path)")
        for i, text in enumerate(items):
            check_text(text, f"prompts[{i}]")
            if not text:
                raise ValueError(f"prompts[{i}]: empty prompt; expected at least one character")
        items = [torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long).reshape(-1)
                 for text in items]
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
    items = [check_token_ids(ids, model.vocab_size, f"prompts[{i}]") for i, ids in enumerate(items)]
    eos = _eos_set(eos_token_id, model.vocab_size)
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
    pieces = [TextPieces(tokenizer) for _ in run.items] if text else None
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
    """One generate() call as an iterator over steps of the request loop (``requests.RequestBatch``): each step
    yields {prompt index: new token ids}.

    With ``keep_states``, ``states[i]`` receives prompt i's state when it finishes (a batch-1 MemoryState after
    the prompt and every new token but a final EOS)."""

    def __init__(self, model, items, max_new_tokens, do_sample, temperature, top_k, top_p, eos, state, progress,
                 rows, engine, cuda_graphs, keep_states: bool = False):
        self.model, self.items, self.max_new, self.eos = model, items, max_new_tokens, eos
        self.sampling = Sampling(do_sample, temperature, top_k, top_p)
        self.state, self.progress = state, progress
        self.rows, self.engine, self.cuda_graphs = rows, engine, cuda_graphs
        self.finished_now: set[int] = set()
        self.keep_states = keep_states
        warpers = self.sampling.warpers()
        self.sequences = [Sequence(ids, max_new_tokens, eos, self.sampling, warpers, state=self._state_for(i),
                                   keep_state=keep_states, index=i) for i, ids in enumerate(items)]

    @property
    def outputs(self) -> list[list[int]]:
        return [s.tokens for s in self.sequences]

    @property
    def states(self) -> list[MemoryState | None]:
        return [s.final_state for s in self.sequences]

    def _state_for(self, index: int):
        if self.state is None:
            return None
        return self.state if self.state.batch_size == 1 else self.state.row(index)

    def __iter__(self):
        if self.max_new == 0 and not self.keep_states:
            return
        sched = _scheduler(self.model, self.rows, self.engine, self.cuda_graphs)
        sched.busy = True
        batch = RequestBatch(sched)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(i.numel() for i in self.items), unit="tok", desc="ingest", leave=False)
            for sequence in self.sequences:
                sequence.on_progress = bar.update
        pending = list(self.sequences)
        try:
            while pending or batch.busy():
                for row in batch.free_rows():  # admit waiting prompts into free rows, read them whole
                    if not pending:
                        break
                    batch.admit(row, pending.pop(0))
                    while batch.reading:
                        batch.read_one()
                produced = batch.advance()
                if produced:
                    self.finished_now = {s.index for s, _, reason in produced if reason is not None}
                    yield {s.index: s.tokens[-1:] for s, _, _ in produced}
                batch.decode()  # closing rows read their last token here, then leave
        finally:
            sched.busy = False
            if bar is not None:
                bar.close()


# ---------------------------------------------------------------------------------------------------- ingest
def new_state(model, batch_size: int = 1) -> MemoryState:
    """An empty state (no segment read yet) for ``batch_size`` sequences of ``model``."""
    return MemoryState.empty(model.config, batch_size, model.width, device=model.device, dtype=model.dtype)


def ingest(model, input_ids: torch.Tensor, state: MemoryState | None = None, progress: bool = False):
    """Read ``input_ids`` (B, S) into ``state`` (a new one if None; updated in place).  Returns ``(state, logits)``
    with the logits (B, V) after each row's last token.

    Runs on the scheduler: memory use is flat in S, since only the W-position KV cache and the fixed-size state
    are kept, so a document of a million tokens needs what ten thousand do.
    """
    input_ids = check_input_ids(input_ids, model.vocab_size)
    if state is None:
        state = new_state(model, input_ids.shape[0])
    else:
        _check_state(model, state, input_ids.shape[0])
        if state.batch_size != input_ids.shape[0]:
            raise ValueError(f"state: holds {state.batch_size} sequences but input_ids has {input_ids.shape[0]} rows")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=input_ids.numel(), unit="tok", desc="ingest", leave=False)
    scheduler = Scheduler(model, rows=1, cuda_graphs=False)
    logits = []
    try:
        for b in range(input_ids.shape[0]):
            row = scheduler.add(input_ids[b].to(model.device), state=state.row(b),
                                on_progress=bar.update if bar else None, prompt=False)
            with torch.no_grad():
                for name, tensor in scheduler.export(row).tensors().items():
                    getattr(state, name)[b].copy_(tensor[0])
            logits.append(scheduler.logits[row : row + 1].clone())
            scheduler.release(row)
    finally:
        if bar is not None:
            bar.close()
    return state, torch.cat(logits)


# ---------------------------------------------------------------------------------------------------- HMTModel.generate
def generate_ids(model, input_ids, max_new_tokens=32, do_sample=False, temperature=1.0, top_k=None, top_p=None,
                 eos_token_id=None, streamer=None, state=None, return_state=False, progress=False):
    """``HMTModel.generate``: input_ids (B, S) -> (B, S + new) on the scheduler, rows that stop early padded with
    the smallest EOS id; ``(ids, state)`` with ``return_state``.  See ``HMTModel.generate``."""
    check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    input_ids = check_input_ids(input_ids, model.vocab_size)
    batch = input_ids.shape[0]
    if streamer is not None and batch != 1:
        raise ValueError(f"streamer: supported for batch size 1, got {batch} rows")
    _check_state(model, state, batch)
    eos = _eos_set(eos_token_id, model.vocab_size)
    items = list(input_ids.detach().cpu())
    run = _Run(model, items, max_new_tokens, do_sample, temperature, top_k, top_p, eos, state, progress,
               min(batch, DEFAULT_ROWS), "auto", "auto", keep_states=return_state)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for new in run:
        if streamer is not None and 0 in new:
            streamer.put(torch.tensor(new[0]))
    if streamer is not None:
        streamer.end()
    result = _results(model, run, "tensor", None, eos)
    if return_state:
        return result, MemoryState.stack(run.states)
    return result
