"""The generation scheduler: HMT over preallocated, fixed-size state (docs/spec.md "Generation"), the one
incremental path: ``hmt_runtime.generate``, ``hmt_runtime.ingest`` and ``HMTModel.generate`` all run on it.

Rows
    A ``Scheduler`` holds ``rows`` sequences.  Each row has its own memory (a row of a ``MemoryState``), its own
    segment boundaries and its own slice of the static KV cache; no row reads another row's state, and an error
    while one row is being worked on leaves the other rows untouched (the failing row is freed).

Static state (allocated when the scheduler is built, never resized)
    kv.keys[l], kv.values[l]: (rows, Hkv, W, D) per layer, owned by the engine (``hmt_runtime.incremental.engines``);
    kv.lens: (rows,) int64 on the device, the positions of the current segment each row holds (``kv.host_lens``
    mirrors it, so control flow never reads the device).
    state: ``MemoryState`` of ``rows`` sequences: ring buffers (rows, N, d) with cached keys (rows, N, d_h),
    sensory / segment / tail ids, the recalled P of the current segment.
    logits: (rows, V), the next-token logits of every row.

One decode step and the events around it (the rules themselves are in ``hmt_runtime.core.segment``)
    decode   one token for every live row at once: row b writes its key/value at position ``lens[b]`` and
             attends to positions [0, lens[b]] (a per-row mask).  No host sync inside the step; on CUDA the step
             is captured as a CUDA graph per batch bucket and replayed (``hmt_runtime.incremental.graphs``).
    start    (per row) summary pass + recall -> P; empty the row's KV; prefill [P ; E(sensory)].  In causal mode
             it runs right after ``close`` (its query is the tail of the closed segment); in paper mode it waits
             for the segment's first token (a provisional query, spec "Generation").
    refresh  (paper mode, per row) when the segment reaches j tokens: the true P from its first j tokens, and a
             re-prefill of [P ; E(sensory) ; E(x_0 .. x_{j-1})].
    close    (per row) at Ls tokens: feed the trailing P, write M_n to the ring buffer, carry the sensory ids and
             the tail to the next segment.

Kernels, engine and CUDA graphs are chosen together by ``hmt_runtime.incremental.backend.select_backend``.

Over 500 lines: the scheduler's rows, events and steps share its books.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core import segment as rules
from .backend import select_backend
from .engines import make_engine
from .graphs import CUDAGraphs
from ..core.memory import MemoryState
from ..core.checks import check_token_ids
from .sampling import Sampling, choose

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


# ---------------------------------------------------------------------------------------------------- scheduler
@dataclass
class _Host:
    """Host mirror of one row's control state (so boundaries never need a device read)."""

    live: bool = False
    ingesting: bool = False  # reserved by an Ingestion in progress (not decoded)
    started: bool = False
    provisional: bool = False
    written: int = 0
    sensory_len: int = 0
    segment_len: int = 0
    tail_len: int = 0
    replay_len: int = 0


class Scheduler:
    """Rows of HMT generation over fixed-size state (module docstring).

    model: an HMTModel.  rows: sequences held at once.  engine: "auto" | "lean" | "transformers".
    cuda_graphs: "auto" (on for the lean engine on CUDA), True or False.

    Use: ``row = sched.add(ids)`` ingests a prompt (1-D ids) and leaves its next-token logits in
    ``sched.logits[row]``; ``sched.pick()`` chooses every live row's next token into ``sched.tokens`` (rows,)
    (or write them there yourself); ``sched.step()`` feeds them and refreshes ``sched.logits``;
    ``sched.release(row)`` frees a row; ``sched.export(row)`` copies its state (a batch-1 MemoryState).

        sched = Scheduler(model, rows=2)
        a, b = sched.add(ids_a), sched.add(ids_b)
        for _ in range(n):
            sched.pick()
            new_a, new_b = sched.tokens[[a, b]].tolist()
            sched.step()
    """

    def __init__(self, model, rows: int = 1, engine: str = "auto", cuda_graphs="auto"):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows={rows!r}: expected an integer >= 1")
        self.model, self.cfg, self.rows = model, model.config, rows
        self.backend = select_backend(model, engine, cuda_graphs)
        self.ops = self.backend.ops
        self.engine = make_engine(model, rows, self.backend.engine, self.ops, self.backend.fused_decode,
                                  self.backend.kv_dtype)
        self.kv = self.engine.kv
        device = model.device
        self.state = MemoryState.empty(self.cfg, rows, model.width, device=device, dtype=model.dtype)
        self.logits = torch.zeros(rows, model.vocab_size, device=device, dtype=model.dtype)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # the decode step's input (static)
        self.live_mask = torch.zeros(rows, dtype=torch.long, device=device)
        self.row_index = torch.arange(rows, device=device)
        self.host = [_Host() for _ in range(rows)]
        self.graphs = CUDAGraphs() if self.backend.cuda_graphs else None
        self.static_span = False  # eager steps over all W positions, as a captured step runs (for tests)
        self.busy = False  # set by a generate() call while it uses this scheduler
        self._summary_in: dict[int, torch.Tensor] = {}
        self._prefill_in: dict[tuple[int, int], torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ rows
    def free_rows(self) -> list[int]:
        return [b for b, h in enumerate(self.host) if not (h.live or h.ingesting)]

    def live_rows(self) -> list[int]:
        return [b for b, h in enumerate(self.host) if h.live]

    def add(self, ids: torch.Tensor, state: MemoryState | None = None, row: int | None = None,
            on_progress: Callable[[int], None] | None = None, prompt: bool = True) -> int:
        """Ingest ``ids`` (L,) (L >= 1; may be long: memory stays flat) into a free row, continuing ``state``
        (a batch-1 MemoryState, not modified) if given.  Returns the row; its next-token logits are in
        ``self.logits[row]``.  ``prompt``: the ids end a prompt that generation continues (``end_prompt``);
        False for a document read into a state (``hmt_runtime.ingest``).  On any error the row is freed and the
        other rows are untouched."""
        job = self.ingestion(ids, state=state, row=row, on_progress=on_progress, prompt=prompt)
        while not job.step():
            pass
        return job.row

    def ingestion(self, ids: torch.Tensor, state: MemoryState | None = None, row: int | None = None,
                  on_progress: Callable[[int], None] | None = None, chunk_tokens: int | None = None,
                  prompt: bool = True) -> "Ingestion":
        """``add`` a piece at a time (chunked prefill): reserves a free row and returns an ``Ingestion`` whose
        ``step()`` reads the next piece: at most ``chunk_tokens`` ids (default: up to a segment's end), or one
        batch of planned summary passes; the last step of a ``prompt`` ends it (``end_prompt``).  Between steps
        the scheduler decodes its live rows as usual (the row being read is not live); the pieces give exactly
        what ``add`` gives.  The state is loaded here (a resumed segment's KV cache is rebuilt: one prefill)."""
        if row is None:
            free = self.free_rows()
            if not free:
                raise RuntimeError(f"all {self.rows} rows are live; release one first")
            row = free[0]
        elif self.host[row].live or self.host[row].ingesting:
            raise ValueError(f"row={row}: the row is live; release it first")
        if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                         or chunk_tokens < 1):
            raise ValueError(f"chunk_tokens={chunk_tokens!r}: expected None or an integer >= 1")
        ids = check_token_ids(ids, self.model.vocab_size, "ids")
        if state is not None and state.batch_size != 1:
            raise ValueError(f"state: expected a batch-1 MemoryState, got {state.batch_size} rows")
        try:
            with torch.no_grad():
                self._load(row, state)
                self.host[row].ingesting = True
        except BaseException:
            self.release(row)
            raise
        return Ingestion(self, row, ids.to(self.model.device)[None], on_progress, chunk_tokens, prompt)

    def release(self, row: int) -> None:
        """Free ``row`` (its state is reset when the row is next used)."""
        self.host[row] = _Host()
        self.live_mask[row] = 0
        self.state.segment_len[row] = 0  # scratch steps write segment_ids[row, segment_len]
        self.kv.set_len(row, 0)

    def export(self, row: int) -> MemoryState:
        """A batch-1 copy of ``row``'s state (its KV cache is not saved: it is rebuilt when resumed)."""
        return MemoryState(**{name: t[row : row + 1].clone() for name, t in self.state.tensors().items()})

    def _load(self, row: int, state: MemoryState | None) -> None:
        self.kv.set_len(row, 0)
        for name, target in self.state.tensors().items():
            if state is None:
                target[row].zero_()
            else:
                source = getattr(state, name)
                if source.shape[1:] != target.shape[1:]:
                    raise ValueError(f"state.{name}: shape {tuple(source.shape)} does not fit this model "
                                     f"(expected (1, {', '.join(map(str, target.shape[1:]))}))")
                target[row].copy_(source[0])
        h = self.host[row] = _Host()
        if state is None:
            return
        started, provisional, written, sensory, segment, tail, replayed = torch.stack([
            state.started[0].long(), state.provisional[0].long(), state.written[0], state.sensory_len[0],
            state.segment_len[0], state.tail_len[0], state.replay_len[0]]).tolist()
        h.started, h.provisional, h.written = bool(started), bool(provisional), written
        h.sensory_len, h.segment_len, h.tail_len, h.replay_len = sensory, segment, tail, replayed
        if h.started:  # rebuild the KV cache of the current segment: [P ; E(replay) ; E(sensory) ; E(x so far)]
            tokens = self.state.segment_ids[row : row + 1, : h.segment_len]
            hidden = self.engine.prefill(row, self._segment_prefix(row, tokens), 0)
            if h.segment_len:
                self.logits[row] = self.model.lm_logits(hidden[:, -1])[0]

    # ------------------------------------------------------------------------------------------ events
    def _segment_prefix(self, row: int, tokens: torch.Tensor | None = None, trailing: bool = False) -> torch.Tensor:
        """[P ; E(replay) ; E(sensory) ; E(tokens)] of ``row`` (then P again when ``trailing``):
        (1, 1 + r + k' + L + trailing, d)."""
        h = self.host[row]
        sensory = self.state.sensory_ids[row : row + 1, : h.sensory_len] if h.sensory_len else None
        replayed = self.state.replay_ids[row : row + 1, : h.replay_len] if h.replay_len else None
        if tokens is None:
            tokens = self.state.segment_ids[row : row + 1, :0]
        return self.model.segment_embeddings(self.state.recalled[row : row + 1], sensory, tokens, trailing=trailing,
                                             replay_ids=replayed)

    def _choose_replay(self, row: int, query_ids: torch.Tensor) -> None:
        """The slots the end of ``row``'s prompt replays (``HMTModel.replay_choice`` over the ring buffer, oldest
        slot first; query_ids (1, q) the prompt's last ids) into state.replay_ids / replay_len."""
        h, st, slots = self.host[row], self.state, self.cfg.memory_slots
        count = min(h.written, slots)
        order = [(h.written - count + i) % slots for i in range(count)]
        lens = st.slot_len[row].tolist()
        windows = [st.slot_ids[row, o, : lens[o]] for o in order]
        picked = torch.cat([windows[i] for i in self.model.replay_choice(query_ids[0], windows)])
        st.replay_ids[row, : picked.numel()] = picked
        st.replay_len[row] = h.replay_len = picked.numel()

    def _summarize(self, query_ids: torch.Tensor) -> torch.Tensor:
        """Spec step 1 on the engine: query_ids (1, j') -> S (1, d)."""
        embeds = self.model.summary_embeddings(query_ids)
        if self.graphs is None:
            return self.engine.encode(embeds)[:, -1]
        length = embeds.shape[1]
        static = self._summary_in.setdefault(length, torch.empty_like(embeds))
        static.copy_(embeds)
        return self.graphs.run(("summary", length), lambda: self.engine.encode(static)[:, -1]).clone()

    def _recall(self, row: int, query_ids: torch.Tensor, planned: "_Summaries | None" = None) -> None:
        """P of ``row``'s current segment into state.recalled[row] (M_init while the memory is empty).
        planned: summaries of this prompt computed ahead in batches (``_Summaries``), used when it holds this
        query."""
        target = self.state.recalled[row : row + 1]
        if self.host[row].written == 0:
            target.copy_(self.model.memory_init)
            return
        st = self.state
        summary = planned.take(query_ids) if planned is not None else None
        if summary is None:
            summary = self._summarize(query_ids)
        self.ops.recall(summary, st.memory[row : row + 1], st.keys[row : row + 1], st.written[row : row + 1],
                        self.model.recall.w_q.weight, out=target, scale=self.model.recall_scale)

    def _prefill_boundary(self, row: int, embeds: torch.Tensor) -> torch.Tensor:
        """Prefill [P ; E(sensory)] (1, 1 + k', d) into ``row``'s empty cache (a CUDA graph per row when on)."""
        if self.graphs is None:
            return self.engine.prefill(row, embeds, 0)
        key = (row, embeds.shape[1])
        static = self._prefill_in.setdefault(key, torch.empty_like(embeds))
        static.copy_(embeds)
        hidden = self.graphs.run(("prefill",) + key, lambda: self._prefill_core(row, static))
        self.kv.host_lens[row] = embeds.shape[1]
        return hidden

    def _prefill_core(self, row, static):
        return self.engine.prefill(row, static, 0)

    def _tail(self, row: int) -> torch.Tensor:
        """(1, t) the last ids of ``row``'s previous segment (t <= j; t = 0 before the first closes)."""
        return self.state.tail_ids[row : row + 1, self.cfg.summary_tokens - self.host[row].tail_len :]

    def _query(self, row: int, upcoming: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The recall query of ``row``'s next segment and whether it is provisional (``segment.recall_query``).
        upcoming: (1, L) the segment's tokens known so far."""
        return rules.recall_query(self.cfg, self._tail(row), upcoming, complete=False,
                                  has_memory=self.host[row].written > 0)

    def end_prompt(self, row: int) -> None:
        """A prompt has just been fed to ``row`` and generation follows.  With ``cfg.prompt_recall`` the segment
        in which the prompt ends (the open one, or the next when it ended on a boundary) recalls with the prompt's
        last j ids (``segment.prompt_query``; spec "Recall at the end of a prompt") and is prefilled again with
        that P; nothing is provisional after it.  Without memory written yet there is nothing to recall."""
        h = self.host[row]
        if not self.cfg.prompt_recall or h.written == 0:
            return
        known = self.state.segment_ids[row : row + 1, : h.segment_len]
        if h.started and h.segment_len == 0 and not h.provisional and not self.cfg.replay:
            return  # a causal start on the boundary already queried the prompt's last j ids
        with torch.no_grad():
            query = rules.prompt_query(self.cfg, self._tail(row), known)
            self._recall(row, query)
            if self.cfg.replay:  # spec "Replay at the end of a prompt"
                self._choose_replay(row, query)
            h.started, h.provisional = True, False
            self.state.started[row] = True
            self.state.provisional[row] = False
            self.kv.set_len(row, 0)
            if h.segment_len == 0:
                if h.replay_len:  # a length of its own per prompt: no CUDA graph for it
                    self.engine.prefill(row, self._segment_prefix(row), 0)
                else:
                    self._prefill_boundary(row, self._segment_prefix(row))
                return
            hidden = self.engine.prefill(row, self._segment_prefix(row, known), 0)
            self.logits[row] = self.model.lm_logits(hidden[:, -1])[0]

    def _start(self, row: int, upcoming: torch.Tensor, chunk: torch.Tensor | None = None,
               trailing: bool = False, planned: "_Summaries | None" = None) -> torch.Tensor:
        """Start ``row``'s segment: P from the recall query, then prefill [P ; E(sensory) ; E(chunk)] (and the
        trailing P when ``trailing``: the chunk completes the segment).  upcoming: (1, L) the segment's tokens
        known so far.  Returns the prefill's hidden states (1, 1 + k' + L + trailing, d)."""
        h = self.host[row]
        query, provisional = self._query(row, upcoming)
        self._recall(row, query, planned)
        h.started, h.provisional = True, provisional
        self.state.started[row] = True
        self.state.provisional[row] = provisional
        self.kv.set_len(row, 0)
        embeds = self._segment_prefix(row, chunk, trailing)
        if chunk is None:
            return self._prefill_boundary(row, embeds)
        return self.engine.prefill(row, embeds, 0)

    def _refresh(self, row: int) -> torch.Tensor:
        """Paper mode at j tokens: the true P, and a re-prefill; returns the last position's hidden (1, d)."""
        j = self.cfg.summary_tokens
        tokens = self.state.segment_ids[row : row + 1, :j]
        self._recall(row, tokens)
        self.host[row].provisional = False
        self.state.provisional[row] = False
        self.kv.set_len(row, 0)
        return self.engine.prefill(row, self._segment_prefix(row, tokens), 0)[:, -1]

    def _close(self, row: int, memory: torch.Tensor | None = None, start_next: bool = True,
               planned: "_Summaries | None" = None) -> None:
        """Feed the trailing P (unless its output ``memory`` (1, d) = M_n is given), write M_n, carry the sensory
        ids and the tail; in causal mode, with ``start_next``, start the next segment at once."""
        h, cfg, st = self.host[row], self.cfg, self.state
        if memory is None:
            memory = self.engine.prefill(row, st.recalled[row : row + 1, None, :], self.kv.host_lens[row])[:, -1]
        memory = self.model.memory_embedding(memory)
        if cfg.replay:  # the slot keeps the ids of the window that wrote it
            slot = h.written % cfg.memory_slots
            window = torch.cat([st.sensory_ids[row, : h.sensory_len], st.segment_ids[row]])
            st.slot_ids[row, slot, : window.numel()] = window
            st.slot_len[row, slot] = window.numel()
            st.replay_len[row] = h.replay_len = 0
        self.ops.memory_write(memory, self.model.recall.w_k.weight, st.memory[row : row + 1],
                              st.keys[row : row + 1], st.written[row : row + 1])
        sensory, tail = rules.carried(cfg, st.segment_ids[row : row + 1])
        if sensory is not None:
            st.sensory_ids[row] = sensory[0]
            st.sensory_len[row] = sensory.shape[1]
        st.tail_ids[row] = tail[0]
        st.tail_len[row] = tail.shape[1]
        st.segment_len[row] = 0
        st.segments_done[row] += 1
        st.started[row] = False
        st.provisional[row] = False
        h.written += 1
        h.sensory_len, h.tail_len, h.segment_len = int(st.sensory_len[row]), tail.shape[1], 0
        h.started = h.provisional = False
        self.kv.set_len(row, 0)
        if cfg.recall == "causal" and start_next:
            self._start(row, st.segment_ids[row : row + 1, :0], planned=planned)

    # ------------------------------------------------------------------------------------------ ingestion
    def _feed(self, row: int, ids: torch.Tensor, on_progress=None, chunk_tokens: int | None = None):
        """Append ids (1, L) to ``row`` segment by segment; leaves the logits after the last one in ``logits``.

        Two backbone passes per full segment: the summary pass, and one prefill of [P ; E(sensory) ; E(x) ; P]
        (the trailing P rides along when the chunk completes the segment; the next segment starts with the next
        chunk).  A provisional paper-mode segment stops at j for its refresh.  The summary passes of the
        segments that start inside ``ids`` are known ahead and run in batches (``_Summaries``).

        A generator: it yields after each pass (the ids taken, 0 for a batch of summaries), so that a caller can
        interleave other work (``Ingestion``); ``chunk_tokens`` caps the ids of one pass."""
        h, cfg, st = self.host[row], self.cfg, self.state
        last = None
        pos, total = 0, ids.shape[1]
        planned = self._plan_summaries(row, ids)
        cap = chunk_tokens or cfg.segment_tokens
        while pos < total:
            if not h.started:
                if planned is not None and planned.due():
                    planned.prepare()
                    yield 0
                upcoming = ids[:, pos : pos + cfg.segment_tokens]
                provisional = self._query(row, upcoming)[1]
                take = min(rules.next_take(cfg, 0, provisional, total - pos), cap)
                chunk = ids[:, pos : pos + take]
                trailing = rules.closes(cfg, take) and not provisional
                hidden = self._start(row, upcoming, chunk, trailing, planned)
            else:
                take = min(rules.next_take(cfg, h.segment_len, h.provisional, total - pos), cap)
                chunk = ids[:, pos : pos + take]
                trailing = rules.closes(cfg, h.segment_len + take) and not h.provisional
                embeds = self.model.token_embeddings(chunk, st.recalled[row : row + 1])
                if trailing:
                    embeds = torch.cat([embeds, st.recalled[row : row + 1, None, :]], dim=1)
                hidden = self.engine.prefill(row, embeds, self.kv.host_lens[row])
            memory = hidden[:, -1] if trailing else None
            last = hidden[:, -2] if trailing else hidden[:, -1]
            st.segment_ids[row, h.segment_len : h.segment_len + take] = chunk[0]
            h.segment_len += take
            st.segment_len[row] = h.segment_len
            pos += take
            if rules.refresh_due(cfg, h.provisional, h.segment_len):
                last = self._refresh(row)
            if rules.closes(cfg, h.segment_len):
                self._close(row, memory, start_next=pos == total, planned=planned)
            if on_progress is not None:
                on_progress(take)
            if pos < total:
                yield take
        self.logits[row] = self.model.lm_logits(last)[0]
        yield take

    def _plan_summaries(self, row: int, ids: torch.Tensor) -> "_Summaries | None":
        """The recall queries of the segments that will start while ``ids`` (1, L) is fed to ``row`` and lie
        wholly inside it: causal mode, a segment starting at p >= j queries ids[p - j : p]; paper mode, a
        segment starting at p with p + j <= L queries ids[p : p + j].  Segments start at p0, p0 + Ls, ...
        (p0: where the row's current segment ends, or 0 when none is open).  A segment that starts before any
        memory is written runs no recall and needs none.  None when fewer than two summaries would be batched
        or CUDA graphs are on (they capture one summary pass per query length)."""
        if self.graphs is not None:
            return None
        h, cfg = self.host[row], self.cfg
        ls, j, total = cfg.segment_tokens, cfg.summary_tokens, ids.shape[1]
        first = ls - h.segment_len if h.started else 0
        queries = []
        for p in range(first, total + 1, ls):
            if p == 0 and h.written == 0:
                continue  # the first segment of an empty memory: no recall
            if cfg.recall == "causal" and p >= j:
                queries.append(ids[0, p - j : p])
            elif cfg.recall == "paper" and p < total and p + j <= total:
                queries.append(ids[0, p : p + j])
        return _Summaries(self, queries) if len(queries) >= 2 else None

    # ------------------------------------------------------------------------------------------ decoding
    def pick(self, sampling: Sampling | None = None, warpers=None) -> None:
        """Choose the next token of every row from ``logits`` into ``tokens`` (``sampling.choose``: greedy by
        default; ``warpers``: ``sampling.warpers()`` built once by the caller); rows that are not live get a
        scratch token."""
        batch = max(self.live_rows(), default=-1) + 1
        if batch == 0:
            return
        self.tokens[:batch] = choose(self.logits[:batch], sampling or Sampling(), warpers=warpers)

    def step(self, on_error: Callable[[int, BaseException], None] | None = None) -> None:
        """Feed ``tokens[b]`` to every live row b: start events, one batched decode step, then refresh / close
        events; ``logits`` then holds every live row's next-token logits.

        on_error: when given, a failure in one row's own events (start, refresh, close) frees that row and is
        handed to ``on_error(row, error)`` while the other rows go on; without it the error is raised.  A failure
        of the batched decode itself is always raised."""

        def failed(row: int, err: Exception) -> None:
            if on_error is None:
                raise err
            self.release(row)
            on_error(row, err)

        if not self.live_rows():
            return
        with torch.no_grad():
            for row in self.live_rows():
                if not self.host[row].started:
                    try:
                        self._start(row, self.tokens[row : row + 1][None])
                    except Exception as err:
                        failed(row, err)
            live = self.live_rows()
            if not live:
                return
            batch = live[-1] + 1
            if self.graphs is not None:
                bucket = next((b for b in GRAPH_BUCKETS if b >= batch and b <= self.rows), self.rows)
                self.graphs.run(("decode", bucket), lambda: self._decode_core(bucket, None))
            else:
                span = None if self.static_span else max(self.kv.host_lens[:batch]) + 1
                self._decode_core(batch, span)
            self.engine.commit(live)
            for row in live:
                h = self.host[row]
                h.segment_len += 1
                try:
                    if rules.refresh_due(self.cfg, h.provisional, h.segment_len):
                        self.logits[row] = self.model.lm_logits(self._refresh(row))[0]
                    if rules.closes(self.cfg, h.segment_len):
                        self._close(row)
                except Exception as err:
                    failed(row, err)

    def _decode_core(self, batch: int, span: int | None) -> torch.Tensor:
        """Device-only part of a step for rows [0, batch): embed tokens, decode, logits, segment ids."""
        st = self.state
        embeds = self.model.token_embeddings(self.tokens[:batch, None], st.recalled[:batch])  # (B, 1, d)
        live = self.live_mask[:batch]
        hidden = self.engine.decode(embeds, live, span, live_rows=[b for b in range(batch) if self.host[b].live])
        self.logits[:batch] = self.engine.logits(self.model, hidden[:, 0])
        rows = self.row_index[:batch]
        st.segment_ids[rows, st.segment_len[:batch]] = self.tokens[:batch]
        st.segment_len[:batch] += live
        return self.logits


class Ingestion:
    """An input being read into a scheduler row a piece at a time (``Scheduler.ingestion``).

    ``step()`` reads the next piece and returns True once everything is read: the row is then live (decoded
    by ``Scheduler.step``) with its next-token logits in ``scheduler.logits[row]``.  ``read`` / ``total``: ids
    read so far / in all.  On an error the row is freed and the error raised; ``close()`` abandons the input
    and frees the row (the other rows are untouched either way)."""

    def __init__(self, scheduler: Scheduler, row: int, ids: torch.Tensor, on_progress, chunk_tokens,
                 prompt: bool = True):
        self.scheduler, self.row, self.total, self.read = scheduler, row, int(ids.shape[1]), 0
        self.finished, self.prompt = False, prompt
        self._pieces = scheduler._feed(row, ids, on_progress, chunk_tokens)

    def step(self) -> bool:
        if self.finished:
            return True
        sched = self.scheduler
        try:
            with torch.no_grad():
                self.read += next(self._pieces)
                if self.read < self.total:
                    return False
                self._pieces.close()
                if self.prompt:
                    sched.end_prompt(self.row)
        except BaseException:
            self.close()
            raise
        host = sched.host[self.row]
        host.ingesting, host.live = False, True
        sched.live_mask[self.row] = 1
        self.finished = True
        return True

    def close(self) -> None:
        """Abandon an unfinished input: free its row."""
        if not self.finished:
            self._pieces.close()
            self.finished = True
            self.scheduler.release(self.row)


class _Summaries:
    """The summary passes of one prompt's segments, in order, run as batches of about ``BATCH_POSITIONS``
    backbone positions (j + 2 per summary) when the first of a batch is needed, so that the activations stay
    those of a ~1k-token pass (memory flat in the prompt's length) while the GEMMs see ~1k rows instead of j + 2.
    ``take(query_ids)`` returns the next summary (1, d) if its query is ``query_ids``, else None (the caller then
    runs its own pass)."""

    BATCH_POSITIONS = 1024

    def __init__(self, scheduler: Scheduler, queries: list[torch.Tensor]):
        self.scheduler, self.queries = scheduler, queries
        self.batch = max(1, self.BATCH_POSITIONS // (scheduler.cfg.summary_tokens + 2))
        self.next, self.done, self.prepared = 0, None, -1

    def due(self) -> bool:
        """The next summary starts a batch that is not computed yet."""
        return self.next < len(self.queries) and self.next % self.batch == 0 and self.prepared != self.next

    def prepare(self) -> None:
        """Compute the batch that starts at the next summary."""
        i = self.next
        embeds = self.scheduler.model.summary_embeddings(torch.stack(self.queries[i : i + self.batch]))
        self.done, self.prepared = self.scheduler.engine.encode(embeds)[:, -1], i

    def take(self, query_ids: torch.Tensor) -> torch.Tensor | None:
        i = self.next
        if i >= len(self.queries) or not torch.equal(self.queries[i], query_ids.reshape(-1)):
            return None
        if i % self.batch == 0 and self.prepared != i:
            self.prepare()
        self.next += 1
        return self.done[i % self.batch : i % self.batch + 1]



