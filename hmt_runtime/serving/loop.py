"""The request loop of `hmt serve`: one thread owns the Scheduler; requests queue, take rows, are read in
pieces and decoded together (see hmt_runtime.serving.server, "Continuous batching").

Over 500 lines: the request and sequence types, the metrics and the loop that drives them share one lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections import deque

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..incremental.generation import _TextPieces
from ..core.memory import MemoryState
from ..incremental.scheduler import Scheduler
from ..incremental.sampling import Sampling, choose
from .protocol import APIError, QueueFull, RATE_WINDOW_S, log
from .store import MemoryStore


# ============================================================================================== engine
class _Sequence:
    """One choice of a request: its prompt ids (L,), generated tokens, and the text sent so far."""

    def __init__(self, request: "_Request", index: int, ids: torch.Tensor, seed: int):
        self.request, self.index, self.ids = request, index, ids
        self.tokens: list[int] = []
        self.pieces = _TextPieces(request.tokenizer)
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of ``text`` given to the client (the rest may start a stop string)
        self.finish_reason: str | None = None
        self.generator = None
        if request.temperature > 0:
            self.generator = torch.Generator(device=request.device)
            self.generator.manual_seed(seed % 2**64)

    def advance(self, piece: str, final: bool) -> tuple[str, bool]:
        """Add newly decoded text -> (text to send now, a stop string was reached)."""
        self.text += piece
        stops = self.request.stop
        if stops:
            hits = [p for p in (self.text.find(s, self.sent) for s in stops) if p >= 0]
            if hits:
                cut = min(hits)
                out, self.sent = self.text[self.sent : cut], cut
                return out, True
        end = len(self.text)
        if stops and not final:  # hold back a tail that may be the start of a stop string
            for keep in range(min(max(map(len, stops)) - 1, end - self.sent), 0, -1):
                if any(s.startswith(self.text[end - keep :]) for s in stops):
                    end -= keep
                    break
        out, self.sent = self.text[self.sent : end], end
        return out, False


class _Request:
    """A completion request (or, with ``document``, a document to read into a memory state) as the engine sees
    it.  Events go to ``queue`` (an asyncio.Queue on ``loop``), a list per engine step: ("text", index, str),
    ("finish", index, str, reason), ("state", MemoryState) (a document, read), ("done", usage),
    ("error", APIError)."""

    def __init__(self, prompts: list[torch.Tensor], n: int, max_tokens: int, temperature: float, top_p: float,
                 stop: list[str], seed: int | None, state: MemoryState | None, tokenizer, eos: set[int], device,
                 document: bool = False):
        self.id = secrets.token_hex(12)
        self.max_tokens, self.temperature, self.top_p, self.stop = max_tokens, temperature, top_p, stop
        self.state, self.tokenizer, self.eos, self.device = state, tokenizer, eos, device
        self.document = document
        self.sampling = Sampling(do_sample=temperature > 0, temperature=temperature, top_p=top_p)
        self.warpers = self.sampling.warpers()
        base = seed if seed is not None else secrets.randbits(63)
        self.sequences = [_Sequence(self, p * n + j, ids, base + 0x9E3779B97F4A7C15 * (p * n + j))
                          for p, ids in enumerate(prompts) for j in range(n)]
        self.prompt_tokens = sum(int(ids.numel()) for ids in prompts)
        self.pending = list(self.sequences)  # not yet in a row
        self.unfinished = len(self.sequences)
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue | None = None
        self.pushed = self.taken = 0  # event lists sent by the engine / taken by the handler
        self.backlog_since = self.last_taken = 0.0

    def attach(self) -> None:
        """Bind the event queue to the running event loop (call on that loop before ``RequestLoop.submit``)."""
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def push(self, events: list) -> None:
        if self.pushed == self.taken:
            self.backlog_since = time.monotonic()
        self.pushed += 1
        with contextlib.suppress(RuntimeError):  # the event loop has closed (shutdown)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, events)

    async def take(self) -> list:
        """The next list of events (on the event loop)."""
        events = await self.queue.get()
        self.taken += 1
        self.last_taken = time.monotonic()
        return events

    def stalled(self, seconds: float) -> bool:
        """Events have waited unread for ``seconds`` (the client stopped reading)."""
        return self.pushed > self.taken and time.monotonic() - max(self.backlog_since, self.last_taken) > seconds

    def usage(self) -> dict:
        completion = sum(len(s.tokens) for s in self.sequences)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


class Metrics:
    """The server's Prometheus metrics, in their own registry."""

    def __init__(self, engine: "RequestLoop", store: MemoryStore):
        self.registry = registry = CollectorRegistry()
        Gauge("hmt_requests_running", "Requests with a sequence in a scheduler row (ingesting or generating)",
              registry=registry).set_function(lambda: engine.running_requests)
        Gauge("hmt_requests_waiting", "Requests waiting for a free row", registry=registry).set_function(
            lambda: engine.waiting_requests)
        Gauge("hmt_rows_live", "Scheduler rows holding a sequence", registry=registry).set_function(
            lambda: engine.live_rows)
        Gauge("hmt_rows", "Scheduler rows (sequences decoded together)", registry=registry).set(engine.rows)
        Gauge("hmt_ingesting", "Prompts and documents being read (a piece per engine step)",
              registry=registry).set_function(lambda: engine.ingesting)
        Gauge("hmt_ingest_pending_tokens", "Tokens of the inputs being read that are not read yet",
              registry=registry).set_function(lambda: engine.ingest_pending)
        self.ingested = Counter("hmt_ingested_tokens", "Prompt and document tokens read", registry=registry)
        self.tokens = Counter("hmt_generated_tokens", "Tokens generated", registry=registry)
        Gauge("hmt_generated_tokens_per_second", f"Tokens generated per second over the last {RATE_WINDOW_S:.0f} s",
              registry=registry).set_function(engine.recent_rate)
        self.ttft = Histogram("hmt_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                              registry=registry)
        self.requests = Counter("hmt_requests", "Finished requests", ["finish"], registry=registry)
        self.rejected = Counter("hmt_requests_rejected", "Requests refused because the queue was full",
                                registry=registry)
        Gauge("hmt_memory_store_bytes", "Bytes of memory-state files in the memory directory",
              registry=registry).set_function(store.total_bytes)


def _internal(what: str) -> APIError:
    return APIError(500, f"internal error in the engine while {what} (details are in the server's log); other "
                         "requests were not affected", type="server_error", code="internal_error")


class RequestLoop:
    """The request loop: one thread owns ``Scheduler(model, rows)``.  ``submit`` queues a request (QueueFull when
    ``max_queue`` requests already wait), ``cancel`` ends it (its rows are freed at the next turn), ``abort``
    ends every request.  Each turn: admissions into free rows, one piece of one input being read
    (``chunk_tokens`` ids at most; the inputs take turns), one decode step of the generating rows."""

    def __init__(self, model, rows: int = 8, max_queue: int = 64, engine: str = "auto", cuda_graphs="auto",
                 chunk_tokens: int | None = None, stall_seconds: float = 30.0):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue={max_queue!r}: expected an integer >= 0")
        if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                         or chunk_tokens < 1):
            raise ValueError(f"chunk_tokens={chunk_tokens!r}: expected None or an integer >= 1")
        self.model, self.rows, self.max_queue = model, rows, max_queue
        self.chunk_tokens, self.stall_seconds = chunk_tokens, stall_seconds
        self.sched = Scheduler(model, rows, engine=engine, cuda_graphs=cuda_graphs)
        self.metrics: Metrics | None = None
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._owner: dict[int, _Sequence] = {}  # row -> sequence generating there (engine thread only)
        self._reading: dict[int, list] = {}  # row -> [sequence, Ingestion or None (reserved)] (engine thread)
        self._turn = -1  # the row whose input was read last
        self._running: set[_Request] = set()
        self._recent: deque = deque()  # (time, tokens) per step, for recent_rate
        self._stopping = False
        self._abort: APIError | None = None
        self.running_requests = self.waiting_requests = self.live_rows = self.ingesting = self.ingest_pending = 0
        self.thread = threading.Thread(target=self._loop, name="hmt-engine", daemon=True)

    # ------------------------------------------------------------------------------------------ any thread
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.thread.join(timeout)

    def submit(self, request: _Request) -> None:
        with self._cond:
            # requests that free rows take at once do not count as waiting; the others must fit in max_queue
            free, queued = self.rows - len(self._owner) - len(self._reading), 0
            for other in (*self._waiting, request):
                if len(other.pending) <= free:
                    free -= len(other.pending)
                else:
                    free, queued = 0, queued + 1
            if queued > self.max_queue:
                raise QueueFull
            self._waiting.append(request)
            self.waiting_requests = len(self._waiting)
            self._cond.notify_all()

    def cancel(self, request: _Request) -> None:
        with self._cond:
            if request.unfinished and not request.cancelled:
                request.cancelled = True
                self._cond.notify_all()

    def abort(self, error: APIError) -> None:
        """End every waiting and running request with ``error`` (at the next turn)."""
        with self._cond:
            self._abort = error
            self._cond.notify_all()

    def recent_rate(self) -> float:
        now = time.perf_counter()
        return sum(n for t, n in list(self._recent) if t > now - RATE_WINDOW_S) / RATE_WINDOW_S

    # ------------------------------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not (self._stopping or self._abort or self._owner or self._reading or self._waiting):
                        self._cond.wait()
                    if self._stopping:
                        break
                    abort, self._abort = self._abort, None
                    admit = self._take_admissions() if abort is None else []
                try:
                    if abort is not None:
                        self._fail_all(abort)
                    self._release_cancelled()
                    self._admit(admit)
                    self._read_one()
                    if self._owner:
                        self._step()
                except Exception:  # the batched decode step itself: fail what was in the rows, keep serving
                    log.exception("engine step failed")
                    self._fail_all(_internal("decoding"))
                self._count()
        self._fail_all(APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))

    def _take_admissions(self) -> list[tuple[int, _Sequence]]:
        """(row, sequence) pairs for free rows, in arrival order; drops cancelled waiting requests (holds the lock)."""
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            request.unfinished = 0
        free = [row for row in self.sched.free_rows() if row not in self._owner and row not in self._reading]
        admit = []
        while free and self._waiting:
            request = self._waiting[0]
            admit.append((free.pop(0), request.pending.pop(0)))
            self._reading[admit[-1][0]] = [admit[-1][1], None]  # reserved; the ingestion starts outside the lock
            if not request.pending:
                self._waiting.popleft()
            self._running.add(request)
        self.waiting_requests = len(self._waiting)
        return admit

    def _release_cancelled(self) -> None:
        for row, seq in list(self._owner.items()):
            if seq.request.cancelled:
                self._free(row)
        for row, (seq, job) in list(self._reading.items()):
            if seq.request.cancelled:
                self._reading.pop(row)
                if job is not None:
                    job.close()
        for request in list(self._running):
            if not request.cancelled and not request.document and request.stalled(self.stall_seconds):
                log.warning("request %s: its client stopped reading for %.0f s; ended", request.id,
                            self.stall_seconds)
                self._error(request, APIError(408, "the client stopped reading its stream", code="client_stalled"),
                            finish="stalled")
        for request in [r for r in self._running if r.cancelled]:
            self._running.discard(request)
            request.unfinished = 0
            if self.metrics:
                self.metrics.requests.labels("cancelled").inc()

    def _admit(self, admit: list[tuple[int, _Sequence]]) -> None:
        """Start reading each admitted sequence's prompt (its memory state is loaded here)."""
        for row, seq in admit:
            request = seq.request
            if request.cancelled or not request.unfinished:
                self._reading.pop(row, None)
                continue
            try:
                job = self.sched.ingestion(seq.ids.to(self.model.device), state=request.state, row=row,
                                           chunk_tokens=self.chunk_tokens, prompt=not request.document)
            except Exception:
                log.exception("request %s: could not start reading its input", request.id)
                self._reading.pop(row, None)
                self._error(request, _internal("reading the input"))
                continue
            self._reading[row][1] = job

    def _read_one(self) -> None:
        """One piece of the next input being read (the inputs take turns by row)."""
        rows = sorted(row for row, (_, job) in self._reading.items() if job is not None)
        if not rows:
            return
        row = next((r for r in rows if r > self._turn), rows[0])
        self._turn = row
        seq, job = self._reading[row]
        request = seq.request
        before = job.read
        try:
            done = job.step()
        except Exception:
            log.exception("request %s: reading its input failed", request.id)
            self._reading.pop(row, None)  # the Ingestion freed the row
            self._error(request, _internal("reading the input"))
            return
        if self.metrics:
            self.metrics.ingested.inc(job.read - before)
        if not done:
            return
        del self._reading[row]
        if not request.document:
            self._owner[row] = seq  # generates from the next step on
            return
        try:
            state = self.sched.export(row)
        except Exception:
            log.exception("request %s: could not copy the document's state", request.id)
            self.sched.release(row)
            self._error(request, _internal("reading the document"))
            return
        self.sched.release(row)
        request.unfinished = 0
        self._running.discard(request)
        if self.metrics:
            self.metrics.requests.labels("done").inc()
        request.push([("state", state), ("done", request.usage())])

    def _free(self, row: int) -> None:
        self._owner.pop(row, None)
        self.sched.release(row)

    def _choose(self, batch: int) -> list[int]:
        """Next token of rows [0, batch): argmax for greedy rows, a draw from the row's own generator otherwise.
        A row whose sampling fails ends its request alone."""
        logits = self.sched.logits[:batch]
        chosen = torch.argmax(logits, dim=-1)
        for row, seq in list(self._owner.items()):
            if seq.generator is None or row not in self._owner:
                continue
            try:
                request = seq.request
                chosen[row] = choose(logits[row : row + 1], request.sampling, seq.generator, request.warpers)[0]
            except Exception:
                log.exception("request %s: sampling failed", seq.request.id)
                self._error(seq.request, _internal("sampling"))
        self.sched.tokens[:batch] = chosen
        return chosen.tolist()  # the one host read of a step

    def _step(self) -> None:
        batch = max(self._owner) + 1
        chosen = self._choose(batch)
        produced = 0
        events: dict[_Request, list] = {}
        now = time.perf_counter()
        for row, seq in sorted(self._owner.items()):
            request = seq.request
            if row not in self._owner:  # freed by an earlier row of the same request
                continue
            try:
                reason = self._advance(row, seq, chosen[row], now, events.setdefault(request, []))
            except Exception:
                log.exception("request %s: producing its text failed", request.id)
                events.pop(request, None)
                self._error(request, _internal("producing the text"))
                continue
            produced += 1
            if reason is None:
                continue
            self._free(row)
            request.unfinished -= 1
            if request.unfinished == 0:
                events[request].append(("done", request.usage()))
                self._running.discard(request)
                if self.metrics:
                    self.metrics.requests.labels("done").inc()
        self._recent.append((now, produced))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        if self.metrics:
            self.metrics.tokens.inc(produced)
        for request, out in events.items():
            if out:
                request.push(out)
        if self._owner:
            self.sched.step(on_error=self._row_failed)

    def _advance(self, row: int, seq: _Sequence, token: int, now: float, out: list) -> str | None:
        """Record one chosen token of a row -> its finish reason (None: it goes on); events into ``out``."""
        request = seq.request
        seq.tokens.append(token)
        if request.first_token_at is None:
            request.first_token_at = now
            if self.metrics:
                self.metrics.ttft.observe(now - request.arrival)
        reason = "stop" if token in request.eos else ("length" if len(seq.tokens) >= request.max_tokens else None)
        piece = seq.pieces.update(seq.tokens, final=reason is not None)
        text, stopped = seq.advance(piece, final=reason is not None)
        if stopped:
            reason = "stop"
        if reason is None:
            if text:
                out.append(("text", seq.index, text))
            return None
        seq.finish_reason = reason
        out.append(("finish", seq.index, text, reason))
        return reason

    def _row_failed(self, row: int, err: BaseException) -> None:
        """A row's own work in a decode step failed (the scheduler freed the row): end its request alone."""
        seq = self._owner.pop(row, None)
        log.error("row %d failed in a decode step", row, exc_info=err)
        if seq is not None:
            self._error(seq.request, _internal("decoding"))

    def _error(self, request: _Request, error: APIError, finish: str = "error") -> None:
        request.cancelled = True
        request.unfinished = 0
        self._running.discard(request)
        for row, seq in list(self._owner.items()):
            if seq.request is request:
                self._free(row)
        for row, (seq, job) in list(self._reading.items()):
            if seq.request is request:
                self._reading.pop(row)
                if job is not None:
                    job.close()
        if self.metrics:
            self.metrics.requests.labels(finish).inc()
        request.push([("error", error)])

    def _fail_all(self, error: APIError) -> None:
        requests = {seq.request for seq in self._owner.values()} | set(self._running)
        requests |= {seq.request for seq, _ in self._reading.values()}
        with self._cond:
            requests |= set(self._waiting)
            self._waiting.clear()
        for row in list(self._owner):
            self._free(row)
        for row, (_, job) in list(self._reading.items()):
            self._reading.pop(row)
            if job is not None:
                job.close()
        for row in self.sched.live_rows():
            self.sched.release(row)
        for request in requests:
            if request.unfinished:
                self._error(request, error)

    def _count(self) -> None:
        self.live_rows = len(self._owner) + len(self._reading)
        self.running_requests = len(self._running)
        self.waiting_requests = len(self._waiting)
        self.ingesting = len(self._reading)
        self.ingest_pending = sum(job.total - job.read for _, job in self._reading.values() if job is not None)


