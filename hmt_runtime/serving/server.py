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

The parts: ``protocol`` (request bodies, errors), ``store`` (memory files), ``loop`` (the request loop), and this
module (the FastAPI app, access checks, drain and ``serve``).

Over 500 lines: the app's endpoints share the request validation and streaming helpers.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import sys
import threading
import time

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.checks import check_text, check_token_ids
from ..core.memory import MemoryState
from .protocol import (DISCONNECT_CHECK_S, LIMITS, MAX_STOP, APIError, ChatRequest, CompletionRequest, MemoryRequest,
                       QueueFull, _BodyTooLarge, _excerpt, _http_error, _internal_error, _unsupported,
                       _validation_error, log)
from .store import MemoryStore, UnusableMemory
from .loop import Metrics, RequestLoop, _Request


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
