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

from ..core.memory import MemoryState
from ..incremental.requests import RequestBatch, Sequence
from ..incremental.scheduler import Scheduler
from ..incremental.sampling import Sampling
from .protocol import APIError, QueueFull, RATE_WINDOW_S, log
from .store import MemoryStore


# ============================================================================================== engine
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
        self.sequences = [self._sequence(p * n + j, ids, base + 0x9E3779B97F4A7C15 * (p * n + j))
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

    def _sequence(self, index: int, ids: torch.Tensor, seed: int) -> Sequence:
        """Choice ``index`` of the request: its prompt ids (L,), a generator of its own when sampling."""
        generator = None
        if self.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed % 2**64)
        return Sequence(ids, 0 if self.document else self.max_tokens, self.eos, self.sampling, self.warpers,
                        generator, self.state, self.tokenizer, self.stop, keep_state=self.document,
                        prompt=not self.document, owner=self, index=index)

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
        self.batch = RequestBatch(self.sched, chunk_tokens)  # the rows' sequences (engine thread only)
        self.metrics: Metrics | None = None
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
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
            # (len of each of the batch's dicts: safe while the engine thread changes them)
            batch = self.batch
            free, queued = self.rows - len(batch.generating) - len(batch.reading) - len(batch.closing), 0
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
                    while not (self._stopping or self._abort or self.batch.busy() or self._waiting):
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
                    if self.batch.generating:
                        self._step()
                except Exception:  # the batched decode step itself: fail what was in the rows, keep serving
                    log.exception("engine step failed")
                    self._fail_all(_internal("decoding"))
                self._count()
        self._fail_all(APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))

    def _take_admissions(self) -> list[int]:
        """Rows reserved for waiting sequences, in arrival order; drops cancelled waiting requests (holds the lock)."""
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            request.unfinished = 0
        free = self.batch.free_rows()
        admit = []
        while free and self._waiting:
            request = self._waiting[0]
            admit.append(free.pop(0))
            self.batch.reserve(admit[-1], request.pending.pop(0))  # the ingestion starts outside the lock
            if not request.pending:
                self._waiting.popleft()
            self._running.add(request)
        self.waiting_requests = len(self._waiting)
        return admit

    def _release_cancelled(self) -> None:
        self.batch.drop(lambda seq: seq.owner.cancelled)
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

    def _admit(self, admit: list[int]) -> None:
        """Start reading each admitted sequence's input (its memory state is loaded here)."""
        for row in admit:
            request = self.batch.reading[row][0].owner
            if request.cancelled or not request.unfinished:
                self.batch.reading.pop(row, None)
                continue
            try:
                self.batch.start(row)
            except Exception:
                log.exception("request %s: could not start reading its input", request.id)
                self._error(request, _internal("reading the input"))

    def _read_one(self) -> None:
        """One piece of the next input being read (the inputs take turns by row)."""
        result = self.batch.read_one(on_error=self._failed)
        if result is None:
            return
        seq, read, done = result
        if self.metrics:
            self.metrics.ingested.inc(read)
        request = seq.owner
        if not done or not request.document:
            return  # a read prompt generates from the next step on
        request.unfinished = 0
        self._running.discard(request)
        if self.metrics:
            self.metrics.requests.labels("done").inc()
        request.push([("state", seq.final_state), ("done", request.usage())])

    def _failed(self, seq: Sequence, what: str, err: BaseException) -> None:
        """One sequence failed in a step (its row is freed): end its request alone."""
        log.error("request %s: %s failed", seq.owner.id, what, exc_info=err)
        self._error(seq.owner, _internal(what))

    def _step(self) -> None:
        produced = 0
        events: dict[_Request, list] = {}
        now = time.perf_counter()
        for seq, text, reason in self.batch.advance(on_error=self._failed):
            request = seq.owner
            if request.cancelled:  # failed at a later row of this step
                continue
            produced += 1
            out = events.setdefault(request, [])
            if request.first_token_at is None:
                request.first_token_at = now
                if self.metrics:
                    self.metrics.ttft.observe(now - request.arrival)
            if reason is None:
                if text:
                    out.append(("text", seq.index, text))
                continue
            out.append(("finish", seq.index, text, reason))
            request.unfinished -= 1
            if request.unfinished == 0:
                out.append(("done", request.usage()))
                self._running.discard(request)
                if self.metrics:
                    self.metrics.requests.labels("done").inc()
        self._recent.append((now, produced))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        if self.metrics:
            self.metrics.tokens.inc(produced)
        for request, out in events.items():
            if out and not request.cancelled:
                request.push(out)
        self.batch.decode(on_error=self._failed)

    def _error(self, request: _Request, error: APIError, finish: str = "error") -> None:
        request.cancelled = True
        request.unfinished = 0
        self._running.discard(request)
        self.batch.drop(lambda seq: seq.owner is request)
        if self.metrics:
            self.metrics.requests.labels(finish).inc()
        request.push([("error", error)])

    def _fail_all(self, error: APIError) -> None:
        requests = {seq.owner for seq in self.batch.generating.values()} | set(self._running)
        requests |= {seq.owner for seq, _ in self.batch.reading.values()}
        with self._cond:
            requests |= set(self._waiting)
            self._waiting.clear()
        self.batch.clear()
        for request in requests:
            if request.unfinished:
                self._error(request, error)

    def _count(self) -> None:
        batch = self.batch
        self.live_rows = len(batch.generating) + len(batch.reading) + len(batch.closing)
        self.running_requests = len(self._running)
        self.waiting_requests = len(self._waiting)
        self.ingesting = len(batch.reading)
        self.ingest_pending = sum(job.total - job.read for _, job in batch.reading.values() if job is not None)


