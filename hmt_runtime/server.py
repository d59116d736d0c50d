"""`hmt serve`: an OpenAI-compatible HTTP server over one Scheduler, with documents kept as memory states.

    hmt serve --model default --port 8000

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending
in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), and the documents:
``POST /v1/memories`` ``{"text"}`` or ``{"token_ids"}`` -> ``{"id", "tokens", "bytes"}``, ``GET`` / ``DELETE
/v1/memories/{id}``.  A ``memory`` field (an id) on a completion request continues from that document's state,
exactly as ``generate(model, prompt, state=ingest(model, document_ids)[0])`` does offline.

Continuous batching: one engine thread owns the Scheduler (``rows`` sequences at once).  Requests wait in a
bounded queue (429 when it is full); between decode steps waiting sequences are added into free rows, each step
chooses every live row's next token with that request's own sampling settings, and a finished or abandoned
sequence frees its row before the next step.  Prompt ingestion and document ingestion run on the engine thread,
so they pause decoding of the other rows while they run (HMT reads long inputs at flat memory, not in parallel).

Memory states are safetensors files ``<id>.safetensors`` in one folder, written atomically
(``MemoryState.save``) and read from disk on every use, so several server processes can share the folder and a
restarted server keeps its documents.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import TopPLogitsWarper

from .api import _TextPieces, ingest
from .memory import MemoryState
from .scheduler import Scheduler

log = logging.getLogger("hmt.serve")

MAX_STOP = 4  # stop strings per request, as in the OpenAI API
RATE_WINDOW_S = 10.0  # the tokens/s gauge averages over this many seconds
DISCONNECT_CHECK_S = 0.2  # how often a non-streamed request checks that its client is still there


# ============================================================================================== errors
class APIError(Exception):
    """An error answered with the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class QueueFull(Exception):
    pass


# ============================================================================================== request bodies
Number = float  # strict models: ints are accepted for floats, strings and bools are not


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by both completion endpoints.  Fields the OpenAI API has but this server cannot honour are
    accepted only at their no-op value (checked in ``_unsupported``); any other field is a 400."""

    model: str
    temperature: Optional[Number] = Field(None, ge=0, le=2)
    top_p: Optional[Number] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)
    memory: Optional[str] = None
    user: Optional[str] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Any]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class MemoryRequest(_Body):
    text: Optional[str] = None
    token_ids: Optional[list[int]] = None


_FIELDS = set()
for _model in (CompletionRequest, ChatRequest, ChatMessage, TextPart, StreamOptions, MemoryRequest):
    _FIELDS |= set(_model.model_fields)


def _unsupported(body: _Sampling) -> None:
    """A 400 naming the first field set to a value this server cannot honour."""
    no_op = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
             "logprobs": (None, False), "echo": (None, False), "best_of": (None, 1), "suffix": (None,),
             "top_logprobs": (None,)}
    for name, allowed in no_op.items():
        if name in body.model_fields_set and getattr(body, name, None) not in allowed:
            raise APIError(400, f"{name}={getattr(body, name)!r} is not supported by this server "
                                f"(accepted: {' or '.join(json.dumps(a) for a in allowed)})", param=name)


def _param(loc: tuple, extra: bool = False) -> str | None:
    """The request field a pydantic error location names: ("body", "messages", 0, "role") -> "messages.0.role"
    (union member tags such as "list[int]" are dropped; with ``extra`` the last part is an unknown field name)."""
    loc = loc[1:] if loc and loc[0] == "body" else loc
    if extra and loc:
        head = _param(loc[:-1])
        return f"{head}.{loc[-1]}" if head else str(loc[-1])
    parts = []
    for part in loc:
        if isinstance(part, int) and parts:
            parts.append(str(part))
        elif isinstance(part, str) and part in _FIELDS:
            parts.append(part)
        else:
            break
    return ".".join(parts) or None


def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    param = _param(tuple(first.get("loc", ())), extra=first.get("type") == "extra_forbidden")
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        param = None
    elif first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"{param or 'body'}: a required field is missing"
    else:
        got = first.get("input")
        shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, list, dict, type(None))) else repr(got)
        message = f"{param or 'body'}: {first.get('msg')} (got {shown})"
    return APIError(400, message, param=param).response()


def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), type=kind).response()


# ============================================================================================== memory store
_MEMORY_ID = re.compile(r"^[0-9a-f]{32}$")
_MEMORY_SUFFIX = ".safetensors"


class MemoryStore:
    """Memory states as ``<id>.safetensors`` files in ``directory``; nothing is kept in process, so several
    servers can share the folder.  Unknown or malformed ids raise KeyError."""

    def __init__(self, directory, model):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model = model

    def path(self, memory_id: str) -> Path:
        if not isinstance(memory_id, str) or not _MEMORY_ID.match(memory_id):
            raise KeyError(memory_id)
        return self.directory / (memory_id + _MEMORY_SUFFIX)

    def add(self, state: MemoryState) -> str:
        memory_id = secrets.token_hex(16)
        state.save(self.path(memory_id), config=self.model.config)
        return memory_id

    def load(self, memory_id: str) -> MemoryState:
        try:
            return MemoryState.load(self.path(memory_id), config=self.model.config, device=self.model.device)
        except FileNotFoundError:
            raise KeyError(memory_id) from None

    def info(self, memory_id: str) -> dict:
        path = self.path(memory_id)
        state = self.load(memory_id)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise KeyError(memory_id) from None
        return {"id": memory_id, "object": "memory", "tokens": state_tokens(state, self.model.config),
                "bytes": stat.st_size, "created": int(stat.st_mtime)}

    def delete(self, memory_id: str) -> None:
        try:
            self.path(memory_id).unlink()
        except FileNotFoundError:
            raise KeyError(memory_id) from None

    def total_bytes(self) -> int:
        total = 0
        for path in self.directory.glob("*" + _MEMORY_SUFFIX):
            if _MEMORY_ID.match(path.name[: -len(_MEMORY_SUFFIX)]):
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size
        return total


def state_tokens(state: MemoryState, config) -> int:
    """Tokens read into a batch-1 state: full segments of Ls tokens plus the current segment's."""
    return int(state.segments_done[0]) * config.segment_tokens + int(state.segment_len[0])


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
    """A completion request as the engine sees it.  Events go to ``queue`` (an asyncio.Queue on ``loop``), a list
    per engine step: ("text", index, str), ("finish", index, str, reason), ("done", usage), ("error", message)."""

    def __init__(self, prompts: list[torch.Tensor], n: int, max_tokens: int, temperature: float, top_p: float,
                 stop: list[str], seed: int | None, state: MemoryState | None, tokenizer, eos: set[int], device):
        self.id = secrets.token_hex(12)
        self.max_tokens, self.temperature, self.top_p, self.stop = max_tokens, temperature, top_p, stop
        self.state, self.tokenizer, self.eos, self.device = state, tokenizer, eos, device
        self.warper = TopPLogitsWarper(top_p) if temperature > 0 and top_p < 1 else None
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

    def attach(self) -> None:
        """Bind the event queue to the running event loop (call on that loop before ``Engine.submit``)."""
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def push(self, events: list) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed (shutdown)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, events)

    def usage(self) -> dict:
        completion = sum(len(s.tokens) for s in self.sequences)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


class Metrics:
    """The server's Prometheus metrics, in their own registry."""

    def __init__(self, engine: "Engine", store: MemoryStore):
        self.registry = registry = CollectorRegistry()
        Gauge("hmt_requests_running", "Requests with at least one sequence in a scheduler row",
              registry=registry).set_function(lambda: engine.running_requests)
        Gauge("hmt_requests_waiting", "Requests waiting for a free row", registry=registry).set_function(
            lambda: engine.waiting_requests)
        Gauge("hmt_rows_live", "Scheduler rows holding a sequence", registry=registry).set_function(
            lambda: engine.live_rows)
        Gauge("hmt_rows", "Scheduler rows (sequences decoded together)", registry=registry).set(engine.rows)
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


class Engine:
    """The engine loop: one thread owns ``Scheduler(model, rows)``.  ``submit`` queues a request (QueueFull when
    ``max_queue`` requests already wait), ``cancel`` frees its rows, ``call`` runs a function on the engine
    thread between steps (model work that must not race the scheduler)."""

    def __init__(self, model, rows: int = 8, max_queue: int = 64, engine: str = "auto", cuda_graphs="auto"):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue={max_queue!r}: expected an integer >= 0")
        self.model, self.rows, self.max_queue = model, rows, max_queue
        self.sched = Scheduler(model, rows, engine=engine, cuda_graphs=cuda_graphs)
        self.metrics: Metrics | None = None
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._calls: deque = deque()
        self._owner: dict[int, _Sequence] = {}  # row -> sequence (engine thread only)
        self._running: set[_Request] = set()
        self._recent: deque = deque()  # (time, tokens) per step, for recent_rate
        self._stopping = False
        self.running_requests = self.waiting_requests = self.live_rows = 0
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
            free, queued = self.rows - len(self._owner), 0
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

    def call(self, fn) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    def recent_rate(self) -> float:
        now = time.perf_counter()
        return sum(n for t, n in list(self._recent) if t > now - RATE_WINDOW_S) / RATE_WINDOW_S

    # ------------------------------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not (self._stopping or self._calls or self._owner or self._waiting):
                        self._cond.wait()
                    if self._stopping:
                        break
                    call = self._calls.popleft() if self._calls else None
                    admit = self._take_admissions()
                if call is not None:
                    fn, future = call
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as err:  # handed to the waiting handler
                            future.set_exception(err)
                try:
                    self._release_cancelled()
                    self._admit(admit)
                    if self._owner:
                        self._step()
                except Exception as err:  # keep serving: fail what was in the rows, free them
                    log.exception("engine step failed")
                    self._fail_all(f"internal error in the engine: {type(err).__name__}: {err}")
                self._count()
        self._fail_all("the server is shutting down")

    def _take_admissions(self) -> list[tuple[int, _Sequence]]:
        """(row, sequence) pairs for free rows, in arrival order; drops cancelled waiting requests (holds the lock)."""
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            request.unfinished = 0
        free = [row for row in self.sched.free_rows() if row not in self._owner]
        admit = []
        while free and self._waiting:
            request = self._waiting[0]
            admit.append((free.pop(0), request.pending.pop(0)))
            self._owner[admit[-1][0]] = admit[-1][1]  # reserved; add() happens outside the lock
            if not request.pending:
                self._waiting.popleft()
            self._running.add(request)
        self.waiting_requests = len(self._waiting)
        return admit

    def _release_cancelled(self) -> None:
        for row, seq in list(self._owner.items()):
            if seq.request.cancelled:
                self._free(row)
        for request in [r for r in self._running if r.cancelled]:
            self._running.discard(request)
            request.unfinished = 0
            if self.metrics:
                self.metrics.requests.labels("cancelled").inc()

    def _admit(self, admit: list[tuple[int, _Sequence]]) -> None:
        for row, seq in admit:
            request = seq.request
            if request.cancelled or not request.unfinished:
                self._owner.pop(row, None)
                continue
            try:
                self.sched.add(seq.ids.to(self.model.device), state=request.state, row=row)
            except Exception as err:
                self._owner.pop(row, None)
                self._error(request, f"could not read the prompt: {err}")

    def _free(self, row: int) -> None:
        self._owner.pop(row, None)
        self.sched.release(row)

    def _choose(self, batch: int) -> list[int]:
        """Next token of rows [0, batch): argmax for greedy rows, a draw from the row's own generator otherwise."""
        logits = self.sched.logits[:batch]
        chosen = torch.argmax(logits, dim=-1)
        sampled = [(row, seq) for row, seq in self._owner.items() if seq.generator is not None]
        for row, seq in sampled:
            scores = logits[row : row + 1].float() / seq.request.temperature
            if seq.request.warper is not None:
                scores = seq.request.warper(None, scores)
            probs = torch.softmax(scores, dim=-1)
            chosen[row] = torch.multinomial(probs, 1, generator=seq.generator)[0, 0]
        self.sched.tokens[:batch] = chosen
        return chosen.tolist()  # the one host read of a step

    def _step(self) -> None:
        batch = max(self._owner) + 1
        chosen = self._choose(batch)
        produced = len(self._owner)
        events: dict[_Request, list] = {}
        now = time.perf_counter()
        for row, seq in sorted(self._owner.items()):
            request, token = seq.request, chosen[row]
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
            out = events.setdefault(request, [])
            if reason is None:
                if text:
                    out.append(("text", seq.index, text))
                continue
            seq.finish_reason = reason
            out.append(("finish", seq.index, text, reason))
            self._free(row)
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
            if out:
                request.push(out)
        if self._owner:
            self.sched.step()

    def _error(self, request: _Request, message: str) -> None:
        request.cancelled = True
        request.unfinished = 0
        self._running.discard(request)
        for row, seq in list(self._owner.items()):
            if seq.request is request:
                self._free(row)
        if self.metrics:
            self.metrics.requests.labels("error").inc()
        request.push([("error", message)])

    def _fail_all(self, message: str) -> None:
        requests = {seq.request for seq in self._owner.values()} | set(self._running)
        with self._cond:
            requests |= set(self._waiting)
            self._waiting.clear()
        for row in list(self._owner):
            self._free(row)
        for row in self.sched.live_rows():
            self.sched.release(row)
        for request in requests:
            if request.unfinished:
                self._error(request, message)

    def _count(self) -> None:
        self.live_rows = len(self._owner)
        self.running_requests = len(self._running)
        self.waiting_requests = len(self._waiting)


# ============================================================================================== the app
class _EngineStream(StreamingResponse):
    """A streamed response that tells the engine when it ends for any reason (done, client gone, error)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Server:
    """The FastAPI app around an Engine and a MemoryStore (``Server(model, ...).app``)."""

    def __init__(self, model, rows: int = 8, max_queue: int = 64, memory_dir="hmt-memories",
                 model_name: str = "default", default_max_tokens: int = 256, engine: str = "auto",
                 cuda_graphs="auto"):
        if model.tokenizer is None:
            raise ValueError("model: the server needs a model with a tokenizer (load the backbone by name or path)")
        if isinstance(default_max_tokens, bool) or not isinstance(default_max_tokens, int) or default_max_tokens < 1:
            raise ValueError(f"default_max_tokens={default_max_tokens!r}: expected an integer >= 1")
        self.model, self.tokenizer, self.model_name = model, model.tokenizer, model_name
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.store = MemoryStore(memory_dir, model)
        self.engine = Engine(model, rows=rows, max_queue=max_queue, engine=engine, cuda_graphs=cuda_graphs)
        self.metrics = self.engine.metrics = Metrics(self.engine, self.store)
        eos = self.tokenizer.eos_token_id
        self.eos = set() if eos is None else {int(eos)}
        self.app = self._build()

    # ------------------------------------------------------------------------------------------ routes
    def _build(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_app):
            self.engine.start()
            try:
                yield
            finally:
                await run_in_threadpool(self.engine.stop)

        app = FastAPI(title="hmt serve", lifespan=lifespan)
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(StarletteHTTPException, _http_error)
        app.add_exception_handler(APIError, lambda _request, exc: exc.response())

        @app.get("/health")
        async def health():
            if not self.engine.thread.is_alive():
                return JSONResponse({"status": "engine stopped"}, status_code=503)
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str):
            self._check_model(model_id)
            return self._model_card()

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            return await self._complete(body, request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatRequest, request: Request):
            return await self._complete(body, request, chat=True)

        @app.post("/v1/memories")
        async def create_memory(body: MemoryRequest):
            return await self._create_memory(body)

        @app.get("/v1/memories/{memory_id}")
        async def get_memory(memory_id: str):
            return await run_in_threadpool(self._memory_call, self.store.info, memory_id)

        @app.delete("/v1/memories/{memory_id}")
        async def delete_memory(memory_id: str):
            await run_in_threadpool(self._memory_call, self.store.delete, memory_id)
            return {"id": memory_id, "object": "memory.deleted", "deleted": True}

        return app

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "hmt"}

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", type="not_found_error", code="model_not_found")

    # ------------------------------------------------------------------------------------------ memories
    def _memory_call(self, fn, memory_id: str):
        try:
            return fn(memory_id)
        except KeyError:
            raise APIError(404, f"no memory with id {memory_id!r}", param="memory_id", type="not_found_error",
                           code="memory_not_found") from None
        except ValueError as err:  # a file made for another HMT config, or not a state
            raise APIError(409, f"memory {memory_id!r} cannot be used with this model: {err}",
                           param="memory_id") from None

    def _load_memory(self, memory_id: str) -> MemoryState:
        try:
            return self.store.load(memory_id)
        except KeyError:
            raise APIError(404, f"memory: no memory with id {memory_id!r} (create one with POST /v1/memories)",
                           param="memory", type="not_found_error", code="memory_not_found") from None
        except ValueError as err:
            raise APIError(400, f"memory: {memory_id!r} cannot be used with this model: {err}",
                           param="memory") from None

    async def _create_memory(self, body: MemoryRequest) -> dict:
        if (body.text is None) == (body.token_ids is None):
            raise APIError(400, "give exactly one of text (a string) or token_ids (a list of token ids)",
                           param="text")
        if body.text is not None:
            if not body.text:
                raise APIError(400, "text: empty document; expected at least one character", param="text")
            ids = await run_in_threadpool(lambda: self.tokenizer(body.text, add_special_tokens=False).input_ids)
            if not ids:
                raise APIError(400, "text: the document has no tokens", param="text")
            param = "text"
        else:
            ids, param = body.token_ids, "token_ids"
        ids = self._check_ids(ids, param)

        def read():  # on the engine thread: the model is used by one thread at a time
            state, _ = ingest(self.model, ids[None])
            return self.store.add(state)

        memory_id = await asyncio.wrap_future(self.engine.call(read))
        size = (await run_in_threadpool(self.store.path(memory_id).stat)).st_size
        return {"id": memory_id, "object": "memory", "tokens": int(ids.numel()), "bytes": size,
                "created": int(time.time())}

    def _check_ids(self, ids: list[int], param: str) -> torch.Tensor:
        if not ids:
            raise APIError(400, f"{param}: empty; expected at least one token id", param=param)
        vocab = self.model.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)
        return torch.tensor(ids, dtype=torch.long)

    # ------------------------------------------------------------------------------------------ completions
    def _prompts(self, body, chat: bool) -> list[torch.Tensor]:
        """Prompt ids as ``hmt_runtime.generate`` tokenizes text: ``tokenizer(text, add_special_tokens=False)``."""
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise APIError(400, f"messages: the model `{self.model_name}` has no chat template in its "
                                    "tokenizer; use /v1/completions with a prompt instead", param="messages")
            messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                         else "".join(part.text for part in m.content), **({"name": m.name} if m.name else {})}
                        for m in body.messages]
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # the template's own checks (e.g. roles it refuses)
                raise APIError(400, f"messages: the chat template refused them: {err}", param="messages") from None
            texts = [text]
        elif isinstance(body.prompt, str):
            texts = [body.prompt]
        elif body.prompt and all(isinstance(p, str) for p in body.prompt):
            texts = list(body.prompt)
        else:
            lists = body.prompt if body.prompt and isinstance(body.prompt[0], list) else [body.prompt]
            return [self._check_ids(ids, "prompt") for ids in lists]
        prompts = []
        for text in texts:
            if not text:
                raise APIError(400, "prompt: empty prompt; expected at least one character", param="prompt")
            prompts.append(self._check_ids(self.tokenizer(text, add_special_tokens=False).input_ids, "prompt"))
        return prompts

    def _request(self, body, chat: bool) -> _Request:
        self._check_model(body.model)
        _unsupported(body)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(400, f"stop: expected up to {MAX_STOP} non-empty strings, got {body.stop!r}", param="stop")
        prompts = self._prompts(body, chat)
        if len(prompts) * body.n > self.engine.rows:
            raise APIError(400, f"n: {len(prompts)} prompt(s) x n={body.n} sequences exceed this server's "
                                f"{self.engine.rows} rows (--rows)", param="n")
        if chat:
            if body.max_tokens is not None and body.max_completion_tokens is not None:
                raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
            max_tokens = body.max_completion_tokens or body.max_tokens or self.default_max_tokens
        else:
            max_tokens = body.max_tokens if body.max_tokens is not None else self.default_max_tokens
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        top_p = 1.0 if body.top_p is None else float(body.top_p)
        state = self._load_memory(body.memory) if body.memory is not None else None
        return _Request(prompts, body.n, max_tokens, temperature, top_p, stop, body.seed, state, self.tokenizer,
                        self.eos, self.model.device)

    async def _complete(self, body, request: Request, chat: bool):
        job = await run_in_threadpool(self._request, body, chat)
        job.attach()
        try:
            self.engine.submit(job)
        except QueueFull:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is busy: {self.engine.max_queue} requests are already waiting "
                                "(--max-queue); retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        kind = ("chat.completion", "chatcmpl") if chat else ("text_completion", "cmpl")
        head = {"id": f"{kind[1]}-{job.id}", "created": int(time.time()), "model": self.model_name}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EngineStream(self._stream(job, head, chat, usage), on_close=lambda: self.engine.cancel(job),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            texts, reasons, usage = await self._collect(job, request)
        finally:
            self.engine.cancel(job)  # a no-op for a finished request
        if texts is None:  # the client went away
            return Response(status_code=499)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                        "finish_reason": reasons[i]} for i in range(len(texts))]
        else:
            choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                       for i in range(len(texts))]
        return {**head, "object": kind[0], "choices": choices, "usage": usage}

    async def _collect(self, job: _Request, request: Request):
        """Wait for a whole request -> (texts, finish reasons, usage); (None, None, None) if the client left."""
        texts = [""] * len(job.sequences)
        reasons: list[str | None] = [None] * len(job.sequences)
        checked = time.monotonic()
        while True:
            try:
                events = await asyncio.wait_for(job.queue.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                events = []
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return None, None, None
            for event in events:
                if event[0] == "text":
                    texts[event[1]] += event[2]
                elif event[0] == "finish":
                    texts[event[1]] += event[2]
                    reasons[event[1]] = event[3]
                elif event[0] == "done":
                    return texts, reasons, event[1]
                elif event[0] == "error":
                    raise APIError(500, event[1], type="server_error")

    async def _stream(self, job: _Request, head: dict, chat: bool, include_usage: bool):
        object_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
            payload = {**head, "object": object_name, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return _sse(payload)

        if chat:
            for seq in job.sequences:
                yield chunk(seq.index, None, None, role=True)
        while True:
            events = await job.queue.get()
            for event in events:
                if event[0] == "text":
                    yield chunk(event[1], event[2], None)
                elif event[0] == "finish":
                    yield chunk(event[1], event[2], event[3])
                elif event[0] == "error":
                    yield _sse(APIError(500, event[1], type="server_error").body())
                    yield "data: [DONE]\n\n"
                    return
                elif event[0] == "done":
                    if include_usage:
                        yield _sse({**head, "object": object_name, "choices": [], "usage": event[1]})
                    yield "data: [DONE]\n\n"
                    return


# ============================================================================================== hmt serve
def serve(model, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **server_kwargs) -> None:
    """Run the server (blocks until interrupted).  ``server_kwargs``: see ``Server``."""
    import uvicorn

    server = Server(model, **server_kwargs)
    print(f"hmt serve: `{server.model_name}` on http://{host}:{port}/v1 ({server.engine.rows} rows, queue "
          f"{server.engine.max_queue}, memories in {server.store.directory})", flush=True)
    uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=5)).run()
