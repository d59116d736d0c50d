"""`hmt serve`: an OpenAI-compatible HTTP server over one Scheduler, with documents kept as memory states.

    hmt serve --model default --port 8000

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending
in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), and the documents:
``POST /v1/memories`` ``{"text"}`` or ``{"token_ids"}`` -> ``{"id", "tokens", "bytes"}``, ``GET /v1/memories``
(every memory: id, tokens, bytes, created, last_used), ``GET`` / ``DELETE /v1/memories/{id}``.  A ``memory``
field (an id) on a completion request continues from that document's state, exactly as
``generate(model, prompt, state=ingest(model, document_ids)[0])`` does offline.

Continuous batching with chunked ingestion: one engine thread owns the Scheduler (``rows`` sequences at once)
and runs one loop.  Requests and documents wait in a bounded queue (429 when it is full) and take free rows in
arrival order.  Each turn of the loop reads one piece of one input being ingested (``--prefill-chunk-tokens``,
default one segment, or one batch of planned summary passes; the inputs take turns), then runs one decode step
of the rows that are generating, each choosing its next token with its own sampling settings.  So a long prompt
or document delays the others by about one segment's work per step, and a client that disconnects stops its
ingestion at the next piece.  A failure while serving one request (its prompt, its sampling, its text) ends that
request with an OpenAI error and frees its row; only a failure of the batched decode step itself ends the
requests in rows.  A request whose streaming client stops reading for ``stall_seconds`` (30) is ended.

Access and limits (flags of ``hmt serve``; every refusal is an OpenAI error body):
    --api-key KEY (or $HMT_API_KEY)  every endpoint but /health needs ``Authorization: Bearer KEY`` (401).
    Host check                       bound to a loopback address, only Host headers naming this machine
                                     (localhost, 127.0.0.1, ::1, the bound address) are served (400), which
                                     stops DNS-rebinding pages; ``--allowed-host NAME`` adds names ("*": any).
    beyond loopback without a key    served, with a warning on stderr (the server then trusts its network).
    --max-request-bytes (4 MiB)      larger bodies are refused with 413 before they are read.
    --max-prompt-tokens (131072)     per prompt (400, code context_length_exceeded).
    --max-document-tokens (1048576)  per document (400, code document_too_long).
    --max-tokens-limit (4096)        the largest max_tokens / max_completion_tokens a request may ask (400).
    --max-memories (1000)            memory files kept in the folder; a new one evicts the least recently used
                                     beyond the cap (0: no cap).
Error messages quote at most a short excerpt of the input, and never a server path or an exception's text
(those go to the log).

Drain: on SIGTERM (or SIGINT) the server stops admitting (503 ``shutting_down``, /health answers 503), lets
running requests finish for up to ``--drain-seconds`` (30), then ends the rest (streams get an error event and
``data: [DONE]``) and exits with status 0.  A second signal exits at once.

Memory states are safetensors files ``<id>.safetensors`` in one folder, written atomically
(``MemoryState.save``, only the written memory slots, so a short document makes a small file) and read from disk
on every use (which records its last use as the file's mtime), so several server processes can share the folder
and a restarted server keeps its documents.  A creation whose client disconnects leaves no file; partial files of
killed saves are removed at start and with every new memory.

Over 500 lines: the protocol models, memory store, request loop and app share the request types and the
error shape; splitting them into modules is the next cut (docs/layout.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import TopPLogitsWarper

from ..incremental.generation import _TextPieces
from ..core.atomic import clean_partials
from ..core.checks import check_text, check_token_ids
from ..core.config import SERVE_LIMITS
from ..core.memory import MemoryState
from ..incremental.scheduler import Scheduler

log = logging.getLogger("hmt.serve")

MAX_STOP = 4  # stop strings per request, as in the OpenAI API
RATE_WINDOW_S = 10.0  # the tokens/s gauge averages over this many seconds
DISCONNECT_CHECK_S = 0.2  # how often a non-streamed request checks that its client is still there
EXCERPT = 40  # characters of a client's input quoted in an error message
MIN_TEMPERATURE = 1e-6  # smaller temperatures sample as this one (greedy in effect; float32 stays finite)
LIMITS = SERVE_LIMITS  # the defaults of the limit flags (see the module docstring)


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


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds this server's limit of {limit} bytes (--max-request-bytes)")


def _excerpt(value, limit: int = EXCERPT) -> str:
    """A short quotation of a client's value for an error message (JSON with escapes, cut with "...")."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


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
            raise APIError(400, f"{name}={_excerpt(getattr(body, name))} is not supported by this server "
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
    if param is not None and len(param) > EXCERPT:
        param = param[:EXCERPT] + "..."
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        param = None
    elif first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"{param or 'body'}: a required field is missing"
    else:
        got = first.get("input")
        shown = _excerpt(got) if isinstance(got, (str, int, float, bool, list, dict, type(None))) \
            else type(got).__name__
        message = f"{param or 'body'}: {first.get('msg')} (got {shown})"
    return APIError(400, message[:300], param=param).response()


def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, _BodyTooLarge):
        return APIError(413, str(exc.detail), code="request_too_large").response()
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), type=kind).response()


def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return APIError(500, "internal server error (details are in the server's log)", type="server_error",
                    code="internal_error").response()


# ============================================================================================== memory store
_MEMORY_ID = re.compile(r"^[0-9a-f]{32}$")
_MEMORY_SUFFIX = ".safetensors"


class UnusableMemory(Exception):
    """A memory file that cannot be read with this model (another HMT config, damaged, not a file)."""


class MemoryStore:
    """Memory states as ``<id>.safetensors`` files in ``directory``; nothing is kept in process, so several
    servers can share the folder.  A file's mtime is its last use.  ``max_memories``: files kept (the least
    recently used beyond it are removed when one is added; None or 0: no cap).  Unknown or malformed ids raise
    KeyError, files that cannot be used UnusableMemory."""

    def __init__(self, directory, model, max_memories: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model, self.max_memories = model, max_memories or None
        self.clean()

    def path(self, memory_id: str) -> Path:
        if not isinstance(memory_id, str) or not _MEMORY_ID.match(memory_id):
            raise KeyError(memory_id)
        return self.directory / (memory_id + _MEMORY_SUFFIX)

    def clean(self) -> int:
        """Remove partial files of killed saves (never those of saves in progress)."""
        return clean_partials(self.directory, r"[0-9a-f]{32}" + re.escape(_MEMORY_SUFFIX))

    def add(self, state: MemoryState, tokens: int) -> str:
        self.clean()
        memory_id = secrets.token_hex(16)
        state.save(self.path(memory_id), config=self.model.config,
                   metadata={"created": str(int(time.time())), "tokens": str(int(tokens))})
        self.evict(keep=memory_id)
        return memory_id

    def load(self, memory_id: str) -> MemoryState:
        path = self.path(memory_id)
        try:
            state = MemoryState.load(path, config=self.model.config, device=self.model.device)
        except FileNotFoundError:
            raise KeyError(memory_id) from None
        except (OSError, ValueError, TypeError) as err:
            log.warning("memory %s cannot be used: %s", memory_id, err)
            raise UnusableMemory(memory_id) from None
        with contextlib.suppress(OSError):
            os.utime(path)  # its last use
        return state

    def _entry(self, path: Path) -> dict | None:
        """id, tokens, bytes, created, last_used of a memory file (from its header); None if it is not one."""
        try:
            stat = path.stat()
        except OSError:
            return None
        if not path.is_file():
            return None
        from safetensors import safe_open

        meta = {}
        with contextlib.suppress(Exception):  # an old or damaged file: the stat fields only
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        entry = {"id": path.name[: -len(_MEMORY_SUFFIX)], "object": "memory", "tokens": None, "bytes": stat.st_size,
                 "created": int(stat.st_mtime), "last_used": int(stat.st_mtime)}
        for name in ("tokens", "created"):
            with contextlib.suppress(KeyError, ValueError):
                entry[name] = int(meta[name])
        return entry

    def info(self, memory_id: str) -> dict:
        path = self.path(memory_id)
        if not path.exists():
            raise KeyError(memory_id)
        entry = self._entry(path)
        if entry is None:
            raise UnusableMemory(memory_id)
        if entry["tokens"] is None:  # a file from before tokens were recorded
            entry["tokens"] = state_tokens(self.load(memory_id), self.model.config)
        return entry

    def entries(self) -> list[dict]:
        """Every memory, the most recently used first."""
        entries = [self._entry(path) for path in self._files()]
        return sorted((e for e in entries if e is not None), key=lambda e: e["last_used"], reverse=True)

    def _files(self) -> list[Path]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return [self.directory / n for n in names
                if n.endswith(_MEMORY_SUFFIX) and _MEMORY_ID.match(n[: -len(_MEMORY_SUFFIX)])]

    def delete(self, memory_id: str) -> None:
        path = self.path(memory_id)
        try:
            path.unlink()
        except FileNotFoundError:
            raise KeyError(memory_id) from None
        except OSError:  # e.g. a folder of that name
            raise UnusableMemory(memory_id) from None

    def evict(self, keep: str | None = None) -> int:
        """Remove the least recently used files beyond ``max_memories``; returns how many."""
        if not self.max_memories:
            return 0
        dated = []
        for path in self._files():
            with contextlib.suppress(OSError):
                if path.is_file():
                    dated.append((path.stat().st_mtime_ns, path))
        dated.sort()
        removed = 0
        for _, path in dated[: max(0, len(dated) - self.max_memories)]:
            if keep is not None and path.name == keep + _MEMORY_SUFFIX:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
                log.info("memory %s removed (--max-memories %d)", path.name[: -len(_MEMORY_SUFFIX)], self.max_memories)
        return removed

    def total_bytes(self) -> int:
        total = 0
        for path in self._files():
            with contextlib.suppress(OSError):
                if path.is_file():
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

    def _sample(self, scores: torch.Tensor, seq: _Sequence) -> torch.Tensor:
        """A draw from one row's logits (V,) with the request's temperature and top_p, safe for every accepted
        value: in float32 with the maximum subtracted, a temperature of at least MIN_TEMPERATURE, and the argmax
        when the probabilities are not a distribution (NaN or infinite logits).  No host sync."""
        request = seq.request
        scores = scores.float()[None]
        scores = (scores - scores.max()) / max(request.temperature, MIN_TEMPERATURE)
        if request.warper is not None:
            scores = request.warper(None, scores)
        probs = torch.softmax(scores, dim=-1)
        usable = torch.isfinite(probs).all() & (probs.sum() > 0)
        greedy = torch.zeros_like(probs).scatter_(1, torch.nan_to_num(scores, nan=-float("inf")).argmax(-1, keepdim=True), 1.0)
        probs = torch.where(usable, torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0), greedy)
        return torch.multinomial(probs, 1, generator=seq.generator)[0, 0]

    def _choose(self, batch: int) -> list[int]:
        """Next token of rows [0, batch): argmax for greedy rows, a draw from the row's own generator otherwise.
        A row whose sampling fails ends its request alone."""
        logits = self.sched.logits[:batch]
        chosen = torch.argmax(logits, dim=-1)
        for row, seq in list(self._owner.items()):
            if seq.generator is None or row not in self._owner:
                continue
            try:
                chosen[row] = self._sample(logits[row], seq)
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


def _hostname(host: str) -> str:
    """The name part of a Host header: "[::1]:8000" -> "::1", "Example.com.:80" -> "example.com"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Guard:
    """ASGI middleware before every route: the Host check (``allowed_hosts``: names, None = any), the API key
    (every path but /health) and the request size (413 before or while the body is read)."""

    def __init__(self, app, api_key: str | None, allowed_hosts, max_request_bytes: int | None):
        self.app, self.max_bytes = app, max_request_bytes
        self.key = api_key.encode() if api_key else None
        self.hosts = None if allowed_hosts is None else {_hostname(h) for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.lower(), value)
        refusal = None
        if self.hosts is not None and _hostname(headers.get(b"host", b"").decode("latin-1")) not in self.hosts:
            refusal = APIError(400, "the Host header does not name this server (a loopback server answers only "
                                    "requests addressed to this machine; see --allowed-host)", code="invalid_host")
        elif self.key is not None and scope.get("path") != "/health":
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else None
            if given is None or not secrets.compare_digest(given, self.key):
                refusal = APIError(401, "Incorrect API key provided: expected 'Authorization: Bearer <key>' with this "
                                        "server's key" if given is not None else
                                   "You didn't provide an API key: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        elif self.max_bytes is not None:
            try:
                length = int(headers.get(b"content-length", b"0") or 0)
            except ValueError:
                length = 0
            if length > self.max_bytes:
                refusal = APIError(413, str(_BodyTooLarge(self.max_bytes).detail), code="request_too_large",
                                   headers={"Connection": "close"})
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        if self.max_bytes is None:
            return await self.app(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        return await self.app(scope, counted, send)


class Server:
    """The FastAPI app around a RequestLoop and a MemoryStore (``Server(model, ...).app``).  Limits and access: see
    the module docstring (``allowed_hosts`` None: any Host; ``api_key`` None: no key; a limit None: none)."""

    def __init__(self, model, rows: int = 8, max_queue: int = 64, memory_dir="hmt-memories",
                 model_name: str = "default", default_max_tokens: int = 256, engine: str = "auto",
                 cuda_graphs="auto", api_key: str | None = None, allowed_hosts=None,
                 max_request_bytes: int | None = LIMITS["max_request_bytes"],
                 max_prompt_tokens: int | None = LIMITS["max_prompt_tokens"],
                 max_document_tokens: int | None = LIMITS["max_document_tokens"],
                 max_tokens_limit: int | None = LIMITS["max_tokens_limit"],
                 max_memories: int | None = LIMITS["max_memories"], chunk_tokens: int | None = None,
                 stall_seconds: float = 30.0):
        if model.tokenizer is None:
            raise ValueError("model: the server needs a model with a tokenizer (load the backbone by name or path)")
        if isinstance(default_max_tokens, bool) or not isinstance(default_max_tokens, int) or default_max_tokens < 1:
            raise ValueError(f"default_max_tokens={default_max_tokens!r}: expected an integer >= 1")
        for name, value in (("max_request_bytes", max_request_bytes), ("max_prompt_tokens", max_prompt_tokens),
                            ("max_document_tokens", max_document_tokens), ("max_tokens_limit", max_tokens_limit),
                            ("max_memories", max_memories)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r}: expected None or an integer >= 0")
        if max_tokens_limit and default_max_tokens > max_tokens_limit:
            raise ValueError(f"default_max_tokens={default_max_tokens} exceeds max_tokens_limit={max_tokens_limit}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key: expected a non-empty string")
        self.model, self.tokenizer, self.model_name = model, model.tokenizer, model_name
        self.default_max_tokens = default_max_tokens
        self.api_key, self.allowed_hosts = api_key, allowed_hosts
        self.max_request_bytes = max_request_bytes or None
        self.max_prompt_tokens, self.max_document_tokens = max_prompt_tokens or None, max_document_tokens or None
        self.max_tokens_limit = max_tokens_limit or None
        self.created = int(time.time())
        self.store = MemoryStore(memory_dir, model, max_memories=max_memories)
        self.engine = RequestLoop(model, rows=rows, max_queue=max_queue, engine=engine, cuda_graphs=cuda_graphs,
                             chunk_tokens=chunk_tokens, stall_seconds=stall_seconds)
        self.metrics = self.engine.metrics = Metrics(self.engine, self.store)
        eos = self.tokenizer.eos_token_id
        self.eos = set() if eos is None else {int(eos)}
        self.draining = False
        self.active = 0  # completion and memory requests being answered (event loop thread)
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
        app.add_exception_handler(Exception, _internal_error)
        app.add_middleware(_Guard, api_key=self.api_key, allowed_hosts=self.allowed_hosts,
                           max_request_bytes=self.max_request_bytes)

        @app.get("/health")
        async def health():
            if not self.engine.thread.is_alive():
                return JSONResponse({"status": "engine stopped"}, status_code=503)
            if self.draining:
                return JSONResponse({"status": "draining"}, status_code=503)
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
        async def create_memory(body: MemoryRequest, request: Request):
            self._admitting()
            self.active += 1
            try:
                return await self._create_memory(body, request)
            finally:
                self.active -= 1

        @app.get("/v1/memories")
        async def list_memories():
            return {"object": "list", "data": await run_in_threadpool(self.store.entries)}

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
            raise APIError(404, f"The model {_excerpt(name)} does not exist; this server serves `{self.model_name}`",
                           param="model", type="not_found_error", code="model_not_found")

    def _admitting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down; send the request to another server or retry later",
                           type="server_error", code="shutting_down", headers={"Retry-After": "5"})

    def _submit(self, job: _Request) -> None:
        try:
            self.engine.submit(job)
        except QueueFull:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is busy: {self.engine.max_queue} requests are already waiting "
                                "(--max-queue); retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None

    # ------------------------------------------------------------------------------------------ memories
    def _memory_call(self, fn, memory_id: str):
        try:
            return fn(memory_id)
        except KeyError:
            raise APIError(404, f"no memory with id {_excerpt(memory_id)}", param="memory_id",
                           type="not_found_error", code="memory_not_found") from None
        except UnusableMemory:  # a file made for another HMT config, damaged, or not a file
            raise APIError(409, f"memory {_excerpt(memory_id)} cannot be used with this model (made for another "
                                "HMT configuration, or damaged)", param="memory_id", code="memory_unusable") from None

    def _load_memory(self, memory_id: str) -> MemoryState:
        try:
            return self.store.load(memory_id)
        except KeyError:
            raise APIError(404, f"memory: no memory with id {_excerpt(memory_id)} (create one with POST "
                                "/v1/memories)", param="memory", type="not_found_error",
                           code="memory_not_found") from None
        except UnusableMemory:
            raise APIError(400, f"memory: {_excerpt(memory_id)} cannot be used with this model (made for another "
                                "HMT configuration, or damaged)", param="memory", code="memory_unusable") from None

    async def _create_memory(self, body: MemoryRequest, request: Request) -> Response | dict:
        if (body.text is None) == (body.token_ids is None):
            raise APIError(400, "give exactly one of text (a string) or token_ids (a list of token ids)",
                           param="text")
        limit = self.max_document_tokens
        if body.text is not None:
            if not body.text:
                raise APIError(400, "text: empty document; expected at least one character", param="text")
            self._check_text(body.text, "text")
            ids = await run_in_threadpool(lambda: self.tokenizer(body.text, add_special_tokens=False).input_ids)
            if not ids:
                raise APIError(400, "text: the document has no tokens", param="text")
            param = "text"
        else:
            ids, param = body.token_ids, "token_ids"
        if limit and len(ids) > limit:
            raise APIError(400, f"{param}: the document has {len(ids)} tokens; this server reads at most {limit} "
                                "(--max-document-tokens)", param=param, code="document_too_long")
        ids = self._check_ids(ids, param)
        job = _Request([ids], 1, 1, 0.0, 1.0, [], None, None, self.tokenizer, self.eos, self.model.device,
                       document=True)
        job.attach()
        self._submit(job)
        try:
            result = await self._collect(job, request)
        finally:
            self.engine.cancel(job)  # a no-op for a finished request
        if result is None:  # the client went away: its ingestion stopped, nothing was saved
            return Response(status_code=499)
        try:
            memory_id = await run_in_threadpool(self.store.add, result["state"], int(ids.numel()))
            size = (await run_in_threadpool(self.store.path(memory_id).stat)).st_size
        except OSError as err:
            log.error("could not save a memory: %s", err)
            raise APIError(507, "the memory store could not save the document (the disk is full or not "
                                "writable)", type="server_error", code="memory_store_failed") from None
        if await request.is_disconnected():  # nobody will learn the id: remove the file
            with contextlib.suppress(KeyError, UnusableMemory):
                await run_in_threadpool(self.store.delete, memory_id)
            return Response(status_code=499)
        return {"id": memory_id, "object": "memory", "tokens": int(ids.numel()), "bytes": size,
                "created": int(time.time())}

    def _check_text(self, text: str, param: str) -> None:
        try:
            check_text(text, param)
        except ValueError:
            raise APIError(400, f"{param}: not valid Unicode text (it holds a lone surrogate such as \"\\ud800\"); "
                                "expected UTF-8 text", param=param) from None

    def _check_ids(self, ids: list[int], param: str) -> torch.Tensor:
        """Token ids of a request, validated as every entry point does (``check_token_ids``), as a 400."""
        vocab = self.model.vocab_size
        bad = next((t for t in ids if not -2**63 <= t < 2**63), None)  # beyond int64: refused before conversion
        if bad is not None:
            raise APIError(400, f"{param}: token id {_excerpt(bad)} is outside the vocabulary [0, {vocab})",
                           param=param)
        try:
            return check_token_ids(torch.tensor(ids, dtype=torch.long), vocab, param)
        except (TypeError, ValueError) as err:
            raise APIError(400, str(err), param=param) from None

    # ------------------------------------------------------------------------------------------ completions
    def _prompts(self, body, chat: bool) -> list[torch.Tensor]:
        """Prompt ids as ``hmt_runtime.generate`` tokenizes text: ``tokenizer(text, add_special_tokens=False)``."""
        param = "messages" if chat else "prompt"
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise APIError(400, f"messages: the model `{self.model_name}` has no chat template in its "
                                    "tokenizer; use /v1/completions with a prompt instead", param="messages")
            messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                         else "".join(part.text for part in m.content), **({"name": m.name} if m.name else {})}
                        for m in body.messages]
            for i, m in enumerate(messages):
                self._check_text(m["content"] + m.get("name", ""), f"messages.{i}.content")
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # the template's own checks (e.g. roles it refuses)
                log.info("the chat template refused a request: %s", err)
                raise APIError(400, "messages: the model's chat template refused them (check the roles and their "
                                    "order)", param="messages") from None
            texts = [text]
        elif isinstance(body.prompt, str):
            texts = [body.prompt]
        elif body.prompt and all(isinstance(p, str) for p in body.prompt):
            texts = list(body.prompt)
        else:
            lists = body.prompt if body.prompt and isinstance(body.prompt[0], list) else [body.prompt]
            for ids in lists:
                self._check_length(len(ids), param)
            return [self._check_ids(ids, "prompt") for ids in lists]
        prompts = []
        for text in texts:
            if not text:
                raise APIError(400, "prompt: empty prompt; expected at least one character", param="prompt")
            self._check_text(text, param)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            self._check_length(len(ids), param)
            prompts.append(self._check_ids(ids, "prompt"))
        return prompts

    def _check_length(self, tokens: int, param: str) -> None:
        if self.max_prompt_tokens and tokens > self.max_prompt_tokens:
            raise APIError(400, f"{param}: the prompt has {tokens} tokens; this server reads at most "
                                f"{self.max_prompt_tokens} per prompt (--max-prompt-tokens); send long documents "
                                "to /v1/memories", param=param, code="context_length_exceeded")

    def _request(self, body, chat: bool) -> _Request:
        self._check_model(body.model)
        _unsupported(body)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(400, f"stop: expected up to {MAX_STOP} non-empty strings, got {_excerpt(body.stop)}",
                           param="stop")
        if chat:
            if body.max_tokens is not None and body.max_completion_tokens is not None:
                raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
            param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            max_tokens = body.max_completion_tokens or body.max_tokens or self.default_max_tokens
        else:
            param = "max_tokens"
            max_tokens = body.max_tokens if body.max_tokens is not None else self.default_max_tokens
        if self.max_tokens_limit and max_tokens > self.max_tokens_limit:
            raise APIError(400, f"{param}: {_excerpt(max_tokens)} exceeds this server's limit of "
                                f"{self.max_tokens_limit} (--max-tokens-limit)", param=param)
        prompts = self._prompts(body, chat)
        if len(prompts) * body.n > self.engine.rows:
            raise APIError(400, f"n: {len(prompts)} prompt(s) x n={body.n} sequences exceed this server's "
                                f"{self.engine.rows} rows (--rows)", param="n")
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        top_p = 1.0 if body.top_p is None else float(body.top_p)
        state = self._load_memory(body.memory) if body.memory is not None else None
        return _Request(prompts, body.n, max_tokens, temperature, top_p, stop, body.seed, state, self.tokenizer,
                        self.eos, self.model.device)

    async def _complete(self, body, request: Request, chat: bool):
        self._admitting()
        self.active += 1
        streaming = False
        try:
            job = await run_in_threadpool(self._request, body, chat)
            job.attach()
            self._submit(job)
            kind = ("chat.completion", "chatcmpl") if chat else ("text_completion", "cmpl")
            head = {"id": f"{kind[1]}-{job.id}", "created": int(time.time()), "model": self.model_name}
            if body.stream:
                usage = bool(body.stream_options and body.stream_options.include_usage)

                def closed():
                    self.engine.cancel(job)
                    self.active -= 1

                response = _EngineStream(self._stream(job, head, chat, usage), on_close=closed,
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
                streaming = True
                return response
            try:
                result = await self._collect(job, request)
            finally:
                self.engine.cancel(job)  # a no-op for a finished request
        finally:
            if not streaming:
                self.active -= 1
        if result is None:  # the client went away
            return Response(status_code=499)
        texts, reasons = result["texts"], result["reasons"]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                        "finish_reason": reasons[i]} for i in range(len(texts))]
        else:
            choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                       for i in range(len(texts))]
        return {**head, "object": kind[0], "choices": choices, "usage": result["usage"]}

    async def _collect(self, job: _Request, request: Request) -> dict | None:
        """Wait for a whole request -> {"texts", "reasons", "usage", "state"}; None if the client left."""
        texts = [""] * len(job.sequences)
        reasons: list[str | None] = [None] * len(job.sequences)
        state = None
        checked = time.monotonic()
        while True:
            try:
                events = await asyncio.wait_for(job.take(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                events = []
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return None
            for event in events:
                if event[0] == "text":
                    texts[event[1]] += event[2]
                elif event[0] == "finish":
                    texts[event[1]] += event[2]
                    reasons[event[1]] = event[3]
                elif event[0] == "state":
                    state = event[1]
                elif event[0] == "done":
                    return {"texts": texts, "reasons": reasons, "usage": event[1], "state": state}
                elif event[0] == "error":
                    raise event[1]

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
            events = await job.take()
            for event in events:
                if event[0] == "text":
                    yield chunk(event[1], event[2], None)
                elif event[0] == "finish":
                    yield chunk(event[1], event[2], event[3])
                elif event[0] == "error":
                    yield _sse(event[1].body())
                    yield "data: [DONE]\n\n"
                    return
                elif event[0] == "done":
                    if include_usage:
                        yield _sse({**head, "object": object_name, "choices": [], "usage": event[1]})
                    yield "data: [DONE]\n\n"
                    return


# ============================================================================================== hmt serve
def _drain_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server with a drain on SIGTERM / SIGINT (module docstring); a second signal exits at once."""

        def __init__(self, config, app_server: Server, drain_seconds: float):
            super().__init__(config)
            self.app_server, self.drain_seconds, self.draining = app_server, drain_seconds, False

        def handle_exit(self, sig, frame) -> None:
            shutting = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if self.draining:  # a second signal: end everything now
                self.app_server.engine.abort(shutting)
                self.should_exit = self.force_exit = True
                return
            self.draining = self.app_server.draining = True
            print(f"hmt serve: draining (up to {self.drain_seconds:g} s for {self.app_server.active} running "
                  "requests); a second signal exits at once", file=sys.stderr, flush=True)
            threading.Thread(target=self._drain, args=(shutting,), name="hmt-drain", daemon=True).start()

        def _drain(self, shutting: APIError) -> None:
            deadline = time.monotonic() + self.drain_seconds
            while self.app_server.active > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.app_server.active > 0:
                self.app_server.engine.abort(shutting)
                deadline = time.monotonic() + 5.0
                while self.app_server.active > 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.should_exit = True

    return DrainingServer


def serve(model, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", drain_seconds: float = 30.0,
          allowed_hosts=None, **server_kwargs) -> None:
    """Run the server (blocks until a signal ends it, after the drain).  ``allowed_hosts``: more Host names to
    serve ("*": any); a loopback bind serves only names of this machine by default.  ``server_kwargs``: see
    ``Server``."""
    import uvicorn

    names = set(allowed_hosts or ())
    loopback = is_loopback(host)
    if "*" in names:
        hosts = None
    elif loopback:
        hosts = {"localhost", "127.0.0.1", "::1", host} | names
    else:
        hosts = names or None
    server = Server(model, allowed_hosts=hosts, **server_kwargs)
    if not loopback and not server.api_key:
        print(f"hmt serve: WARNING: bound to {host}, beyond this machine, without an API key: anyone who can reach "
              "the port can generate, read and delete memories and fill the memory folder; set --api-key (or "
              "HMT_API_KEY)", file=sys.stderr, flush=True)
    print(f"hmt serve: `{server.model_name}` on http://{host}:{port}/v1 ({server.engine.rows} rows, queue "
          f"{server.engine.max_queue}, memories in {server.store.directory}"
          f"{', API key required' if server.api_key else ''})", flush=True)
    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    _drain_server_class()(config, server, drain_seconds).run()
