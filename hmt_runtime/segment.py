"""Incremental HMT: ingest a prompt and generate, applying the segment step of model.py token by token.

Rules (spec "Generation"):
- A segment's window is [P ; sensory ; x ; P].  Its KV cache starts with the prefill of [P ; E(sensory)],
  grows by one position per token, and never exceeds W positions.
- When a segment holds Ls tokens the trailing P is fed as one more position; its final hidden state is M_n,
  which is written to the memory ring buffer; the KV cache is dropped; the next segment starts.
- causal mode: P_{n+1} comes from the last j tokens of segment n, so it is exact at the boundary and greedy
  generation equals the argmax of the teacher-forced forward.
- paper mode: P_n needs the first j tokens of segment n.  While fewer are known, a provisional query (the most
  recent j known tokens) is used; when the segment reaches j tokens, S and P are recomputed from them and the
  segment is prefilled again with the true P.  From position j on, generation matches the forward pass.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .memory import MemoryState
from .model import HMTModel, check_input_ids


def new_state(model: HMTModel, batch_size: int = 1) -> MemoryState:
    """An empty state (no segment read yet) for ``batch_size`` sequences."""
    return MemoryState.empty(model.config, batch_size, model.width, device=model.device, dtype=model.dtype)


class _Row:
    """The incremental segment step for one sequence: ``st`` is a batch-1 view of a MemoryState."""

    def __init__(self, model: HMTModel, st: MemoryState):
        self.model, self.st, self.cfg = model, st, model.config
        self.ops = model.ops()

    # --- helpers over the state tensors (all batch-1)
    def _sensory(self):
        n = int(self.st.sensory_len[0])
        return self.st.sensory_ids[:, :n] if n else None

    def _segment(self):
        return self.st.segment_ids[:, : int(self.st.segment_len[0])]

    def _tail(self):
        return self.st.tail_ids[:, self.st.tail_ids.shape[1] - int(self.st.tail_len[0]) :]

    def _recall(self, query_ids):
        st = self.st
        if int(st.written[0]) == 0:
            return self.model.memory_init.detach().clone()  # spec step 2: empty cache -> M_init
        summary = self.model.summarize(query_ids)
        return self.model.recall_memory(summary, st.memory, st.keys, st.written, self.ops)

    def _prefill(self):
        """(Re)build the KV cache of the current segment from P, the sensory ids and its tokens so far;
        returns the logits of the last token position (None when the segment has no token yet)."""
        st = self.st
        kv = DynamicCache()
        tokens = self._segment()
        embeds = self.model.segment_embeddings(st.recalled, self._sensory(), tokens, trailing=False)
        hidden = self.model.run_backbone(embeds, 0, kv)
        st.kv[0] = kv
        return self.model.lm_logits(hidden[:, -1]) if tokens.shape[1] else None

    def start_segment(self, upcoming: torch.Tensor) -> None:
        """Compute P for a new segment; ``upcoming`` (1, L) are the segment's tokens known in advance."""
        st, cfg = self.st, self.cfg
        j = cfg.summary_tokens
        provisional = False
        if cfg.recall == "causal":
            query = self._tail()
        elif upcoming.shape[1] >= j:
            query = upcoming[:, :j]
        else:
            query = torch.cat([self._tail(), upcoming], dim=1)[:, -j:]  # provisional: the newest j known
            provisional = int(st.written[0]) > 0
        st.recalled.copy_(self._recall(query))
        st.provisional.fill_(provisional)
        st.started.fill_(True)
        self._prefill()

    def close_segment(self) -> None:
        """Feed the trailing P, write M_n to memory, carry sensory ids and the tail, drop the KV cache."""
        st, cfg = self.st, self.cfg
        n_tokens = int(st.segment_len[0])
        start = 1 + int(st.sensory_len[0]) + n_tokens
        hidden = self.model.run_backbone(st.recalled[:, None, :], start, st.kv[0])
        self.ops.memory_write(hidden[:, -1], self.model.recall.w_k.weight, st.memory, st.keys, st.written)
        tokens = st.segment_ids
        if cfg.sensory_tokens:
            st.sensory_ids.copy_(tokens[:, -cfg.sensory_tokens :])
            st.sensory_len.fill_(cfg.sensory_tokens)
        st.tail_ids.copy_(tokens[:, -cfg.summary_tokens :])
        st.tail_len.fill_(cfg.summary_tokens)
        st.segment_len.zero_()
        st.segments_done += 1
        st.started.fill_(False)
        st.provisional.fill_(False)
        st.kv[0] = None

    def feed(self, ids: torch.Tensor, on_progress=None) -> torch.Tensor:
        """Append ids (1, L), L >= 1, to the sequence; returns the logits (1, V) after the last one."""
        st, cfg = self.st, self.cfg
        logits = None
        pos = 0
        while pos < ids.shape[1]:
            if not bool(st.started[0]):
                self.start_segment(ids[:, pos : pos + cfg.segment_tokens])
            elif st.kv[0] is None:
                self._prefill()  # a loaded state: rebuild the cache
            have = int(st.segment_len[0])
            take = min(cfg.segment_tokens - have, ids.shape[1] - pos)
            if bool(st.provisional[0]) and have < cfg.summary_tokens:
                take = min(take, cfg.summary_tokens - have)  # stop at j to refresh P
            chunk = ids[:, pos : pos + take]
            start = 1 + int(st.sensory_len[0]) + have
            hidden = self.model.run_backbone(self.model.embed(chunk), start, st.kv[0])
            logits = self.model.lm_logits(hidden[:, -1])
            st.segment_ids[:, have : have + take] = chunk
            st.segment_len += take
            pos += take
            have += take
            if bool(st.provisional[0]) and have == cfg.summary_tokens:
                st.recalled.copy_(self._recall(st.segment_ids[:, : cfg.summary_tokens]))
                st.provisional.fill_(False)
                logits = self._prefill()
            if have == cfg.segment_tokens:
                self.close_segment()
            if on_progress is not None:
                on_progress(take)
        return logits


def _prepare_ingest(model: HMTModel, input_ids, state: MemoryState | None, progress: bool):
    """Checked ids, the state to fill (a new one if None) and a progress bar (or None)."""
    input_ids = check_input_ids(input_ids, model.vocab_size)
    if state is None:
        state = new_state(model, input_ids.shape[0])
    elif state.batch_size != input_ids.shape[0]:
        raise ValueError(f"state: holds {state.batch_size} sequences but input_ids has {input_ids.shape[0]} rows")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=input_ids.numel(), unit="tok", desc="ingest", leave=False)
    return input_ids, state, bar


def ingest(model: HMTModel, input_ids: torch.Tensor, state: MemoryState | None = None, progress: bool = False):
    """Read ``input_ids`` (B, S) into ``state`` (a new one if None; updated in place).  Returns ``(state, logits)``
    with the logits (B, V) after each row's last token.

    Runs on the scheduler (hmt_runtime.scheduler): memory use is flat in S, since only the W-position KV cache
    and the fixed-size state are kept, so a document of a million tokens needs what ten thousand do.  The
    state's live KV caches are dropped (``state.kv`` is None per row; they are rebuilt when generation resumes).
    """
    from .scheduler import Scheduler

    input_ids, state, bar = _prepare_ingest(model, input_ids, state, progress)
    scheduler = Scheduler(model, rows=1, cuda_graphs=False)
    logits = []
    try:
        for b in range(input_ids.shape[0]):
            row = scheduler.add(input_ids[b].to(model.device), state=state.row(b), on_progress=bar.update if bar else None)
            with torch.no_grad():
                for name, tensor in scheduler.export(row).tensors().items():
                    getattr(state, name)[b].copy_(tensor[0])
            logits.append(scheduler.logits[row : row + 1].clone())
            scheduler.release(row)
    finally:
        if bar is not None:
            bar.close()
    state.kv = [None] * state.batch_size
    return state, torch.cat(logits)


def _ingest_rows(model: HMTModel, input_ids: torch.Tensor, state: MemoryState | None = None, progress: bool = False):
    """``ingest`` on the reference path (``_Row``, a DynamicCache per row): keeps each row's live KV cache."""
    input_ids, state, bar = _prepare_ingest(model, input_ids, state, progress)
    rows = []
    with torch.no_grad():
        for b in range(input_ids.shape[0]):
            row = _Row(model, state.row(b))
            rows.append(row.feed(input_ids[b : b + 1], on_progress=bar.update if bar else None))
    if bar is not None:
        bar.close()
    return state, torch.cat(rows)


def _warpers(do_sample, temperature, top_k, top_p) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if not do_sample:
        return warpers
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 0")
    if do_sample and (not isinstance(temperature, (int, float)) or temperature <= 0):
        raise ValueError(f"temperature={temperature!r}: expected a number > 0 when sampling")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: expected None or an integer >= 1")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: expected None or a number in (0, 1]")


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


def generate_ids(model: HMTModel, input_ids, max_new_tokens=32, do_sample=False, temperature=1.0, top_k=None,
                 top_p=None, eos_token_id=None, streamer=None, state=None, return_state=False, progress=False):
    """See HMTModel.generate.  The reference incremental path (``_Row``): rows are generated one after another,
    each with its own segment boundaries and a DynamicCache.  Rows that stop early (EOS) are padded with the
    first EOS id.  ``hmt_runtime.generate`` runs the same rules on the scheduler (batched, static buffers)."""
    check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    input_ids = check_input_ids(input_ids, model.vocab_size)
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(f"streamer: supported for batch size 1, got {input_ids.shape[0]} rows")
    eos = _eos_set(eos_token_id)
    warpers = _warpers(do_sample, temperature, top_k, top_p)
    state, logits = _ingest_rows(model, input_ids, state=state, progress=progress)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    outputs = []
    with torch.no_grad():
        for b in range(input_ids.shape[0]):
            row = _Row(model, state.row(b))
            history = input_ids[b : b + 1]
            next_logits = logits[b : b + 1]
            new_tokens: list[int] = []
            for _ in range(max_new_tokens):
                scores = warpers(history, next_logits.float()) if do_sample else next_logits
                if do_sample:
                    token = torch.multinomial(torch.softmax(scores, dim=-1), 1)
                else:
                    token = scores.argmax(dim=-1, keepdim=True)
                new_tokens.append(int(token))
                if streamer is not None:
                    streamer.put(token[0].cpu())
                history = torch.cat([history, token], dim=1)
                if int(token) in eos:
                    break
                next_logits = row.feed(token)
            outputs.append(new_tokens)
    if streamer is not None:
        streamer.end()
    width = max((len(t) for t in outputs), default=0)
    pad = min(eos) if eos else 0
    new = torch.full((input_ids.shape[0], width), pad, dtype=torch.long, device=input_ids.device)
    for b, tokens in enumerate(outputs):
        if tokens:
            new[b, : len(tokens)] = torch.tensor(tokens, device=input_ids.device)
    result = torch.cat([input_ids, new], dim=1)
    return (result, state) if return_state else result
