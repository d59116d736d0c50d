"""`hmt serve` under hostile or careless clients, against real server processes on free loopback ports: one
request never fails another, API key and Host check, limits answered with short 4xx bodies, chunked ingestion
between decode steps (a short request is served while a 100k-token prompt is read; a client that leaves stops
its ingestion), memory files sized by what they hold, and the drain on SIGTERM.

The served model is the tiny checkpoint of tests/test_server.py (nothing is downloaded)."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from test_server import NAME, ServerProcess, checkpoint, model, offline, one_thread, tiny_model  # noqa: F401 (fixtures)
from tiny import VOCAB

KEY = "sk-test-0123456789"
LONG = 100_000  # tokens of the long prompt (the tiny model reads ~5-10k tokens/s on one busy core)


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """A server with an API key and small limits, and a plain one (default limits); started together."""
    work = tmp_path_factory.mktemp("hardening")
    memories = work / "memories"
    memories.mkdir()
    stale = memories / ("ab" * 16 + ".safetensors.tmp-zzzzzzzz.partial")  # a killed save's leftover
    stale.write_bytes(b"partial")
    strict = ServerProcess(checkpoint[0], memories, work / "strict.log", "--rows", "4", "--api-key", KEY,
                           "--max-request-bytes", "4000", "--max-prompt-tokens", "300", "--max-document-tokens",
                           "200", "--max-tokens-limit", "100", "--default-max-tokens", "50", "--max-memories", "2")
    plain = ServerProcess(checkpoint[0], work / "plain-memories", work / "plain.log", "--rows", "4")
    try:
        strict.launch(), plain.launch()
        strict.wait_ready(), plain.wait_ready()
        assert not stale.exists()  # removed at start
        yield strict, plain
    finally:
        strict.stop()
        plain.stop()


@pytest.fixture(scope="module")
def strict(servers):
    return servers[0]


@pytest.fixture(scope="module")
def plain(servers):
    return servers[1]


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, path, body, headers=AUTH, timeout=60, **kw):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout, **kw)


def assert_error(response, status, param=None, code=None, short=True):
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if short:
        assert len(response.content) < 600, response.content[:600]
    return error


def complete(server, prompt, max_tokens, headers=None, **extra):
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/completions", json=body, headers=headers or {}, timeout=120)


# ---------------------------------------------------------------------------------------------------- isolation
def test_tiny_temperature_samples_and_fails_nobody(plain, model):
    """temperature 1e-300 (in the documented range) underflowed in float32 and failed every request."""
    results = {}

    def run(name, **kw):
        results[name] = complete(plain, kw.pop("prompt", "The cat sat"), kw.pop("max_tokens", 30), **kw)

    threads = [threading.Thread(target=run, args=(f"greedy{i}",), kwargs={"prompt": p})
               for i, p in enumerate(["The cat sat", "Once upon a time", "Paris is"])]
    threads += [threading.Thread(target=run, args=(f"tiny{t}",), kwargs={"temperature": t, "seed": 3})
                for t in (1e-300, 5e-324, 1e-30)]
    threads.append(threading.Thread(target=run, args=("top_p",), kwargs={"temperature": 2, "top_p": 1e-300}))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name, response in results.items():
        assert response.status_code == 200, (name, response.text)
    for i, p in enumerate(["The cat sat", "Once upon a time", "Paris is"]):
        assert results[f"greedy{i}"].json()["choices"][0]["text"] == offline(model, p, 30)
    # a temperature that small is greedy in effect
    assert results["tiny1e-300"].json()["choices"][0]["text"] == offline(model, "The cat sat", 30)


def test_a_failure_in_one_request_ends_only_that_request(tmp_path, monkeypatch):
    """An error while one request's text is produced (injected) ends it with a 500 OpenAI body; the requests
    decoded beside it finish normally."""
    from fastapi.testclient import TestClient

    from hmt_runtime.incremental.requests import Sequence
    from hmt_runtime.serving import server as srv

    real = Sequence.advance

    def advance(self, piece, final):
        if "BOOM" in self.stop and len(self.tokens) == 3:
            raise RuntimeError("injected failure /secret/path")
        return real(self, piece, final)

    monkeypatch.setattr(Sequence, "advance", advance)
    server = srv.Server(tiny_model(), rows=4, memory_dir=tmp_path, model_name=NAME)
    with TestClient(server.app) as client:
        results = {}

        def run(name, stop):
            results[name] = client.post("/v1/completions", json={
                "model": NAME, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stop": stop})

        threads = [threading.Thread(target=run, args=(f"ok{i}", ["@@"])) for i in range(3)]
        threads.append(threading.Thread(target=run, args=("bad", ["BOOM"])))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        error = assert_error(results["bad"], 500, code="internal_error")
        assert "secret" not in error["message"] and "RuntimeError" not in error["message"]
        expected = offline(server.model, "Once upon a time", 40)
        for i in range(3):
            assert results[f"ok{i}"].status_code == 200 and results[f"ok{i}"].json()["choices"][0]["text"] == expected
        assert client.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------------- access
def test_api_key_is_required_everywhere_but_health(strict):
    assert httpx.get(strict.url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/memories"),
                             ("DELETE", "/v1/memories/" + "0" * 32), ("POST", "/v1/completions")):
            response = httpx.request(method, strict.url + path, headers=headers, json={"model": NAME, "prompt": "a"})
            assert_error(response, 401, code="invalid_api_key")
            assert KEY not in response.text
    assert httpx.get(strict.url + "/v1/models", headers=AUTH).status_code == 200
    client = strict.client()
    client.api_key = KEY
    assert client.completions.create(model=NAME, prompt="a", max_tokens=2).choices


def test_host_header_must_name_this_machine(plain):
    for host in ("attacker.example", f"attacker.example:{plain.port}", "192.168.1.5"):
        response = httpx.get(plain.url + "/v1/models", headers={"Host": host})
        assert_error(response, 400, code="invalid_host")
    for host in (f"127.0.0.1:{plain.port}", f"localhost:{plain.port}", "LOCALHOST"):
        assert httpx.get(plain.url + "/v1/models", headers={"Host": host}).status_code == 200


def test_binding_beyond_loopback_without_a_key_warns(monkeypatch, capsys, tmp_path):
    """The bind itself is not made here (no server starts): the warning is printed before uvicorn runs."""
    from hmt_runtime.serving import server as srv

    ran = []

    class NoRun:
        def __init__(self, config, app_server, drain):
            ran.append((config.host, app_server.allowed_hosts))

        def run(self):
            pass

    monkeypatch.setattr(srv, "_drain_server_class", lambda: NoRun)
    model = tiny_model()
    srv.serve(model, host="0.0.0.0", memory_dir=tmp_path)
    assert "WARNING" in capsys.readouterr().err and ran[-1] == ("0.0.0.0", None)
    srv.serve(model, host="0.0.0.0", memory_dir=tmp_path, api_key="k")
    assert "WARNING" not in capsys.readouterr().err
    srv.serve(model, host="127.0.0.1", memory_dir=tmp_path)
    assert "WARNING" not in capsys.readouterr().err and "localhost" in ran[-1][1]


# ---------------------------------------------------------------------------------------------------- limits
def test_limits_are_clear_4xx(strict):
    assert_error(post(strict, "/v1/completions", {"model": NAME, "prompt": "a" * 5000}), 413, code="request_too_large")
    chunked = httpx.post(strict.url + "/v1/completions", headers={**AUTH, "content-type": "application/json"},
                         content=iter([b'{"model": "x", "prompt": "', b"a" * 3000, b"b" * 3000, b'"}']))
    assert_error(chunked, 413, code="request_too_large")
    assert_error(post(strict, "/v1/completions", {"model": NAME, "prompt": [5] * 301}), 400, "prompt",
                 "context_length_exceeded")
    assert_error(post(strict, "/v1/completions", {"model": NAME, "prompt": "a " * 600}), 400, "prompt",
                 "context_length_exceeded")
    assert_error(post(strict, "/v1/memories", {"token_ids": [5] * 201}), 400, "token_ids", "document_too_long")
    for value in (101, 10**29):
        assert_error(post(strict, "/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": value}), 400,
                     "max_tokens")
    assert_error(post(strict, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                                       "max_completion_tokens": 10**29}), 400, "max_completion_tokens")
    assert post(strict, "/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 100}).status_code == 200


def test_error_bodies_are_short_and_never_show_paths(strict):
    bias = {str(i): 1 for i in range(200)}
    error = assert_error(post(strict, "/v1/completions", {"model": NAME, "prompt": "a", "logit_bias": bias}), 400,
                         "logit_bias")
    assert len(error["message"]) < 200
    assert_error(post(strict, "/v1/completions", {"model": "m" * 2000, "prompt": "a"}), 404, "model")
    assert_error(post(strict, "/v1/completions", {"model": NAME, "prompt": "a", "k" * 2000: 1}), 400)
    assert_error(post(strict, "/v1/completions", {"model": NAME, "prompt": "a", "memory": "z" * 2000}), 404, "memory")
    # a lone surrogate: a 400 naming the field, not a plain-text 500
    for path, body, param in (("/v1/completions", {"model": NAME, "prompt": "a\ud800b"}, "prompt"),
                              ("/v1/memories", {"text": "\ud800"}, "text"),
                              ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user",
                                                                                     "content": "\ud800"}]},
                               "messages.0.content")):
        response = httpx.post(strict.url + path, content=json.dumps(body).encode(), timeout=30,
                              headers={**AUTH, "content-type": "application/json"})
        assert_error(response, 400, param)
    # a folder and a damaged file where memories should be: 409 / 400, no path, no exception text
    folder_id, damaged_id = "1" * 32, "2" * 32
    (strict.memory_dir / f"{folder_id}.safetensors").mkdir()
    (strict.memory_dir / f"{damaged_id}.safetensors").write_bytes(b"not a state")
    for memory_id in (folder_id, damaged_id):
        for response in (httpx.get(strict.url + f"/v1/memories/{memory_id}", headers=AUTH),
                         post(strict, "/v1/completions", {"model": NAME, "prompt": "a", "memory": memory_id})):
            assert response.status_code in (400, 409), response.text
            error = assert_error(response, response.status_code, code="memory_unusable")
            assert str(strict.memory_dir) not in response.text and "Error" not in error["message"]
    assert httpx.get(strict.url + "/v1/memories", headers=AUTH).status_code == 200
    (strict.memory_dir / f"{folder_id}.safetensors").rmdir()
    (strict.memory_dir / f"{damaged_id}.safetensors").unlink()


def test_memories_are_listed_capped_and_sized_by_what_they_hold(strict, model):
    tok = model.tokenizer
    short = post(strict, "/v1/memories", {"token_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]}).json()  # 1 segment
    long = post(strict, "/v1/memories", {"token_ids": list(range(4, 40)) * 2}).json()  # 8 segments, 3 slots
    assert short["bytes"] < long["bytes"]
    listed = httpx.get(strict.url + "/v1/memories", headers=AUTH).json()
    assert listed["object"] == "list"
    by_id = {m["id"]: m for m in listed["data"]}
    assert set(by_id) == {short["id"], long["id"]}
    assert by_id[short["id"]]["tokens"] == 10 and by_id[long["id"]]["bytes"] == long["bytes"]
    assert all({"id", "tokens", "bytes", "created", "last_used"} <= set(m) for m in listed["data"])
    time.sleep(0.05)
    assert post(strict, "/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 2,
                                            "memory": short["id"]}).status_code == 200  # short: used last
    third = post(strict, "/v1/memories", {"text": "Paris is the capital of France."}).json()
    ids = [m["id"] for m in httpx.get(strict.url + "/v1/memories", headers=AUTH).json()["data"]]
    assert sorted(ids) == sorted([short["id"], third["id"]])  # the least recently used one went
    assert httpx.get(strict.url + f"/v1/memories/{long['id']}", headers=AUTH).status_code == 404
    assert third["tokens"] == len(tok("Paris is the capital of France.", add_special_tokens=False).input_ids)


# ---------------------------------------------------------------------------------------------------- ingestion
def long_ids(n=LONG):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(4, VOCAB, (n,), generator=gen).tolist()


def test_short_requests_are_served_while_a_long_prompt_is_read(plain, model):
    """A 100k-token prompt is read a segment at a time between decode steps: a short request sent while it is
    read gets its first token within 2 s; /metrics shows the ingestion."""
    before = plain.metrics()
    long_result = {}

    def long_request():
        long_result["response"] = complete(plain, long_ids(), 3)

    thread = threading.Thread(target=long_request)
    thread.start()
    try:
        plain.wait_metric("hmt_ingesting", 1, timeout=30)
        sent = time.perf_counter()
        with httpx.stream("POST", plain.url + "/v1/completions", timeout=60, json={
                "model": NAME, "prompt": "The cat sat", "max_tokens": 8, "temperature": 0, "stream": True}) as r:
            first = None
            text = ""
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    piece = json.loads(line[6:])["choices"][0]["text"]
                    if piece and first is None:
                        first = time.perf_counter() - sent
                    text += piece
        metrics = plain.metrics()
        assert metrics["hmt_ingesting"] == 1, "the long prompt finished first: the test proves nothing"
        assert metrics["hmt_ingest_pending_tokens"] > 0 and metrics["hmt_requests_running"] >= 1
        assert first is not None and first <= 2.0, first
        assert text == offline(model, "The cat sat", 8)
    finally:
        thread.join(180)
    assert long_result["response"].status_code == 200, long_result["response"].text[:300]
    assert long_result["response"].json()["usage"]["prompt_tokens"] == LONG
    grown = plain.metrics()["hmt_ingested_tokens_total"] - before.get("hmt_ingested_tokens_total", 0)
    assert grown >= LONG


def test_a_client_that_leaves_stops_its_ingestion(plain):
    for path, body in (("/v1/completions", {"model": NAME, "prompt": long_ids(), "max_tokens": 2}),
                       ("/v1/memories", {"token_ids": long_ids()})):
        files = set((plain.memory_dir).glob("*")) if plain.memory_dir.exists() else set()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(plain.url + path, json=body, timeout=httpx.Timeout(30, read=1.0))
        plain.wait_metric("hmt_ingesting", 0, timeout=5)  # long before the 100k tokens could be read
        read = plain.metrics()["hmt_ingested_tokens_total"]
        time.sleep(0.5)
        assert plain.metrics()["hmt_ingested_tokens_total"] == read
        assert set(plain.memory_dir.glob("*")) == files  # an abandoned memory leaves no file


# ---------------------------------------------------------------------------------------------------- drain
def test_sigterm_drains_then_ends_the_rest_and_exits_0(checkpoint, tmp_path):
    server = ServerProcess(checkpoint[0], tmp_path / "memories", tmp_path / "drain.log", "--drain-seconds", "3")
    server.launch().wait_ready()
    streams: dict[str, list] = {"long": [], "short": []}

    def stream(name, prompt, max_tokens):
        body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    streams[name].append(line[6:])

    threads = [threading.Thread(target=stream, args=("long", long_ids(), 5)),
               threading.Thread(target=stream, args=("short", "Once upon a time", 60))]
    try:
        threads[0].start()
        server.wait_metric("hmt_ingesting", 1, timeout=30)
        threads[1].start()
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "a"}, timeout=10)
        assert_error(refused, 503, code="shutting_down")
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        for t in threads:
            t.join(60)
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    short, long = streams["short"], streams["long"]
    assert short[-1] == "[DONE]" and json.loads(short[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert long[-1] == "[DONE]" and json.loads(long[-2])["error"]["code"] == "shutting_down"


def test_a_stream_nobody_reads_is_ended(tmp_path):
    """A request whose events wait unread for stall_seconds (a client that never reads) is ended and its row
    freed, instead of generating up to max_tokens into a buffer."""
    import asyncio

    from hmt_runtime.serving import loop as loop_module
    from hmt_runtime.serving import server as srv

    server = srv.Server(tiny_model(), rows=2, memory_dir=tmp_path, model_name=NAME, stall_seconds=0.5)
    engine = server.engine
    loop = asyncio.new_event_loop()
    try:
        job = loop_module._Request([torch.tensor([5, 6, 7])], 1, 4000, 0.0, 1.0, [], None, None, server.tokenizer,
                           set(), server.model.device)
        job.loop, job.queue = loop, asyncio.Queue()
        engine.start()
        engine.submit(job)
        deadline = time.monotonic() + 30
        while not job.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.cancelled and job.pushed < 4000
        while engine.live_rows and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.live_rows == 0 and engine.running_requests == 0
        assert server.metrics.requests.labels("stalled")._value.get() == 1
    finally:
        engine.stop()
        loop.close()
