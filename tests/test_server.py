"""`hmt serve` against real server processes on free loopback ports, with the official openai client.

The served model is an HMT checkpoint over the tiny random Llama of tests/tiny.py, with a tokenizer trained here
on a few sentences (nothing is downloaded); offline references come from the same checkpoint in this process.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from hmt_runtime import HMTConfig, HMTModel, generate, ingest
from tiny import VOCAB, tiny_backbone

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-hmt"
SENTENCES = [
    "Once upon a time there was a small house by the sea.",
    "The cat sat on the mat, and the dog slept by the door.",
    "What is the capital of France? Paris is the capital of France.",
    "She said: it is a truth universally acknowledged!",
    "Numbers like 42 and 7 are small; 1000 is larger.",
]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["Once upon a time", "The cat sat", "What is the capital of France?", "She said: it is",
           "Numbers like 42", "a", "The dog slept by the door, and the cat sat on the mat by the sea.",
           "Paris is"]


def tiny_tokenizer(chat_template: bool = True):
    """A BPE tokenizer with VOCAB ids (0 pad, 1 BOS, 2 EOS, 3 unk, as the tiny backbones expect)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = string.ascii_letters + string.digits + " .,!?;:'<>-\n"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=list(alphabet), limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    assert len(fast) <= VOCAB and fast.eos_token_id == 2
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(chat_template: bool = True) -> HMTModel:
    # as the shipped default: a prompt's end steers recall and replays 2 slots
    cfg = HMTConfig(segment_tokens=9, sensory_tokens=3, summary_tokens=4, memory_slots=3, recall_dim=16,
                    kernels="torch", prompt_recall=True, replay=2, replay_query=3)
    model = HMTModel(tiny_backbone("llama", seed=0, dtype=torch.float32), cfg, tokenizer=tiny_tokenizer(chat_template))
    torch.manual_seed(100)
    with torch.no_grad():  # make the recall weights matter
        model.recall.w_q.weight.normal_(0, 1.0)
        model.recall.w_k.weight.normal_(0, 1.0)
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`hmt serve` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, memory_dir: Path, log: Path, *flags: str):
        self.checkpoint, self.memory_dir, self.log_path, self.flags = checkpoint, memory_dir, log, flags
        self.proc = None

    def launch(self) -> "ServerProcess":
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "hmt_runtime.cli", "serve", "--model", str(self.checkpoint),
               "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(self.port),
               "--memory-dir", str(self.memory_dir), "--threads", "1", "--log-level", "warning", *self.flags]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 60.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"hmt serve exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"hmt serve not ready after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self.log.close()

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.launch().wait_ready()

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items()))
                values[key] = sample.value
        return values

    def wait_metric(self, name: str, value: float, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metrics().get(name) == value:
                return
            time.sleep(0.05)
        assert self.metrics().get(name) == value, f"{name} did not reach {value}: {self.metrics()}"


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Offline references on one torch thread, as the servers run (--threads 1): on a busy machine, more threads
    than free cores make these tiny ops hundreds of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, model): the served checkpoint, and the same checkpoint loaded here for offline references."""
    folder = tmp_path_factory.mktemp("tiny-ckpt") / "tiny-hmt"
    tiny_model().save_pretrained(folder, save_backbone=True)
    return folder, HMTModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """The main server (8 rows) and a small one (1 row, a queue of 1) sharing one memory folder; both are
    started at once (startup is mostly imports) and stopped in the finaliser."""
    work = tmp_path_factory.mktemp("serve")
    memories = work / "memories"
    main = ServerProcess(checkpoint[0], memories, work / "main.log", "--rows", "8", "--max-queue", "64")
    small = ServerProcess(checkpoint[0], memories, work / "small.log", "--rows", "1", "--max-queue", "1")
    try:
        main.launch(), small.launch()
        main.wait_ready(), small.wait_ready()
        yield main, small
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def model(checkpoint):
    return checkpoint[1]


def offline(model, prompt, max_tokens, state=None) -> str:
    return generate(model, prompt, max_new_tokens=max_tokens, state=state)


def stream_text(stream, kind="completion") -> tuple[dict[int, str], list]:
    """Concatenated text per choice index, and every finish_reason seen (None chunks left out)."""
    texts, reasons = {}, []
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.text if kind == "completion" else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason is not None:
                reasons.append((choice.index, choice.finish_reason))
    return texts, reasons


@pytest.fixture(scope="module")
def long_prompt(model):
    """A prompt whose greedy continuation has no EOS in its first 400 tokens (a request that runs long)."""
    candidates = [f"{p} {q}" for p in PROMPTS for q in ("by the sea", "and the cat")][:8]
    ids = [model.tokenizer(c, add_special_tokens=False).input_ids for c in candidates]
    outs = generate(model, ids, max_new_tokens=400)
    eos = model.tokenizer.eos_token_id
    for text, prompt, out in zip(candidates, ids, outs):
        if eos not in out[len(prompt):]:
            return text
    pytest.fail("no candidate prompt runs 400 tokens without EOS")


# ---------------------------------------------------------------------------------------------------- tests
def test_models_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in server.client().models.list().data] == [NAME]
    metrics = server.metrics()
    for name in ("hmt_requests_running", "hmt_requests_waiting", "hmt_generated_tokens_total",
                 "hmt_generated_tokens_per_second", "hmt_time_to_first_token_seconds_count", "hmt_memory_store_bytes"):
        assert name in metrics, name


@pytest.mark.parametrize("max_tokens", [1, 23])
def test_greedy_stream_equals_non_stream_equals_offline(server, model, max_tokens):
    client = server.client()
    for prompt in PROMPTS[:3]:
        whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
        texts, reasons = stream_text(client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens,
                                                               temperature=0, stream=True))
        expected = offline(model, prompt, max_tokens)
        assert whole.choices[0].text == expected
        assert texts == {0: expected}
        assert reasons == [(0, whole.choices[0].finish_reason)]  # exactly one chunk carries it
        assert whole.choices[0].finish_reason in ("stop", "length")
        assert whole.usage.prompt_tokens == len(model.tokenizer(prompt, add_special_tokens=False).input_ids)
        n_new = len(model.tokenizer(prompt, add_special_tokens=False).input_ids)
        assert whole.usage.total_tokens == n_new + whole.usage.completion_tokens


def test_chat_equals_offline_on_the_template(server, model):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = offline(model, text, 17)
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=17, temperature=0)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=17, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    texts, reasons = stream_text(chunks, kind="chat")
    assert texts == {0: expected} and reasons == [(0, whole.choices[0].finish_reason)]


def test_32_concurrent_streams_of_mixed_lengths(server, model):
    """More requests than rows: they queue, join rows between steps and leave when done; each text is its own
    offline greedy continuation."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i % 3) + "ab"[: i % 3], 1 + (i * 7) % 40) for i in range(32)]
    tok = model.tokenizer
    ids = [tok(p, add_special_tokens=False).input_ids for p, _ in jobs]
    outs = generate(model, ids, max_new_tokens=40, eos_token_id=tok.eos_token_id)
    expected = []
    for prompt_ids, out, (_, k) in zip(ids, outs, jobs):
        new = out[len(prompt_ids):][:k]
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id) + 1]
        expected.append(tok.decode(new, skip_special_tokens=True))
    results: list = [None] * len(jobs)
    client = server.client()

    def run(i):
        prompt, k = jobs[i]
        try:
            results[i] = stream_text(client.completions.create(model=NAME, prompt=prompt, max_tokens=k,
                                                               temperature=0, stream=True))
        except Exception as err:  # reported below
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, result in enumerate(results):
        assert not isinstance(result, Exception) and result is not None, f"request {i}: {result!r}"
        texts, reasons = result
        assert texts == {0: expected[i]}, f"request {i} {jobs[i]}"
        assert len(reasons) == 1
    server.wait_metric("hmt_requests_running", 0)
    server.wait_metric("hmt_rows_live", 0)


def test_n_and_seed(server, model):
    client = server.client()
    greedy = client.completions.create(model=NAME, prompt="The cat", max_tokens=12, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.text for c in greedy.choices}) == 1 and greedy.choices[0].text == offline(model, "The cat", 12)
    args = dict(model=NAME, prompt="The cat", max_tokens=20, temperature=1.5, top_p=0.95, seed=1234, n=2)
    first = client.completions.create(**args)
    again = client.completions.create(**args)
    streamed, _ = stream_text(client.completions.create(**args, stream=True))
    assert [c.text for c in first.choices] == [c.text for c in again.choices] == [streamed[0], streamed[1]]
    other = client.completions.create(**{**args, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    assert first.choices[0].text != first.choices[1].text  # each choice draws from its own generator


def test_prompt_lists_and_token_ids(server, model):
    client = server.client()
    tok = model.tokenizer
    texts = ["The cat", "Paris is"]
    got = client.completions.create(model=NAME, prompt=texts, max_tokens=9, temperature=0, n=2)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]  # prompt-major, as in the OpenAI API
    assert [c.text for c in got.choices] == [offline(model, t, 9) for t in texts for _ in range(2)]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=9, temperature=0)
    assert [c.text for c in by_ids.choices] == [offline(model, t, 9) for t in texts]
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))


def test_stop_strings(server, model):
    client = server.client()
    prompt = PROMPTS[0]
    full = offline(model, prompt, 30)
    assert len(full) > 12, full
    stop = full[5:8]
    cut = full[: full.index(stop)]
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "@@"])
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    texts, reasons = stream_text(client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0,
                                                           stop=stop, stream=True))
    assert texts == {0: cut} and reasons == [(0, "stop")]


def test_memory_equals_offline_generate_with_state(server, model):
    tok = model.tokenizer
    document = " ".join(SENTENCES * 3)
    doc_ids = tok(document, add_special_tokens=False).input_ids
    made = httpx.post(server.url + "/v1/memories", json={"text": document}, timeout=60).json()
    assert made["tokens"] == len(doc_ids) and made["bytes"] > 0 and len(made["id"]) == 32
    assert (server.memory_dir / f"{made['id']}.safetensors").stat().st_size == made["bytes"]
    info = httpx.get(server.url + f"/v1/memories/{made['id']}").json()
    assert info["tokens"] == made["tokens"] and info["bytes"] == made["bytes"]
    state = ingest(model, torch.tensor([doc_ids]))[0]
    client = server.client()
    for prompt in ("What is the capital", "Once"):
        expected = offline(model, prompt, 15, state=state)
        assert expected != offline(model, prompt, 15)  # the document matters
        got = client.completions.create(model=NAME, prompt=prompt, max_tokens=15, temperature=0,
                                        extra_body={"memory": made["id"]})
        assert got.choices[0].text == expected
        texts, _ = stream_text(client.completions.create(model=NAME, prompt=prompt, max_tokens=15, temperature=0,
                                                         stream=True, extra_body={"memory": made["id"]}))
        assert texts == {0: expected}
    messages = [{"role": "user", "content": "Who sat?"}]
    chat_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=9, temperature=0,
                                         extra_body={"memory": made["id"]})
    assert got.choices[0].message.content == offline(model, chat_text, 9, state=state)
    # the same document by ids; then deletion
    by_ids = httpx.post(server.url + "/v1/memories", json={"token_ids": doc_ids[:20]}).json()
    assert by_ids["tokens"] == 20 and by_ids["id"] != made["id"]
    got = client.completions.create(model=NAME, prompt="Once", max_tokens=8, temperature=0,
                                    extra_body={"memory": by_ids["id"]})
    assert got.choices[0].text == offline(model, "Once", 8, state=ingest(model, torch.tensor([doc_ids[:20]]))[0])
    assert httpx.delete(server.url + f"/v1/memories/{by_ids['id']}").json()["deleted"] is True
    for response in (httpx.get(server.url + f"/v1/memories/{by_ids['id']}"),
                     httpx.delete(server.url + f"/v1/memories/{by_ids['id']}"),
                     httpx.get(server.url + "/v1/memories/../../etc"),
                     httpx.post(server.url + "/v1/completions",
                                json={"model": NAME, "prompt": "a", "memory": by_ids["id"]})):
        assert response.status_code == 404, response.text
    assert server.metrics()["hmt_memory_store_bytes"] >= made["bytes"]


BAD = [
    ("/v1/completions", {"prompt": "a", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "a", "temperature": 3}, "temperature"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "a", "n": 9}, "n"),
    ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "a", "made_up_field": 1}, "made_up_field"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [5, VOCAB]}, "prompt"),
    ("/v1/completions", {"prompt": [1, "x"]}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "a", "memory": 7}, "memory"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
     "messages.0.tool_calls"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {}},
     "response_format"),
    ("/v1/memories", {"text": "a", "token_ids": [1]}, "text"),
    ("/v1/memories", {"token_ids": [VOCAB + 5]}, "token_ids"),
    ("/v1/memories", {"text": ""}, "text"),
]


@pytest.mark.parametrize("path, body, param", BAD, ids=[f"{p.split('/')[-1]}-{q}" for p, _, q in BAD])
def test_bad_requests_are_400_naming_the_field(server, path, body, param):
    if path != "/v1/memories":
        body = {"model": NAME, **body}
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["param"] == param, error
    assert error["error"]["message"]


def test_bad_requests_through_the_client(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="a", frequency_penalty=1.0)
    assert info.value.body["param"] == "frequency_penalty"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="a")
    assert info.value.body["param"] == "model"
    response = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404


CLIENT = """
import sys, httpx
body = {"model": sys.argv[2], "prompt": sys.argv[3], "max_tokens": 2000, "temperature": 0, "stream": True}
with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, timeout=60) as response:
    for line in response.iter_lines():
        print(line, flush=True)
"""


def test_killed_client_frees_its_row(server, model, long_prompt):
    before = server.metrics()
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.url, NAME, long_prompt], stdout=subprocess.PIPE)
    try:
        got = []
        while len(got) < 3:  # a few chunks: it is mid-stream
            line = proc.stdout.readline()
            assert line, "the client's stream ended early"
            if line.startswith(b"data: {"):
                got.append(json.loads(line[6:]))
        assert got[0]["choices"][0]["finish_reason"] is None
    finally:
        proc.kill()
        proc.wait(10)
    server.wait_metric("hmt_requests_running", 0)
    server.wait_metric("hmt_rows_live", 0)
    after = server.metrics()
    assert after["hmt_requests_total{finish=cancelled}"] == before.get("hmt_requests_total{finish=cancelled}", 0) + 1
    assert after["hmt_generated_tokens_total"] - before["hmt_generated_tokens_total"] < 400  # stopped early
    # a non-streamed request whose client gives up is freed too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(30, read=0.3),
                   json={"model": NAME, "prompt": long_prompt, "max_tokens": 4000, "temperature": 0})
    server.wait_metric("hmt_requests_running", 0)
    assert server.client().completions.create(model=NAME, prompt="a", max_tokens=3, temperature=0).choices[0].text \
        == offline(model, "a", 3)


def test_full_queue_answers_429(servers, model, long_prompt):
    """1 row and a queue of 1: of three requests sent together one runs, one waits, one is refused."""
    small = servers[1]
    expected = offline(model, long_prompt, 400)
    results: list = [None] * 3

    def run(i):
        try:
            results[i] = httpx.post(small.url + "/v1/completions", timeout=60, json={
                "model": NAME, "prompt": long_prompt, "max_tokens": 400, "temperature": 0})
        except Exception as err:  # reported below
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 429], [getattr(r, "text", r) for r in results]
    refused = next(r for r in results if r.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"] == "1"
    assert all(r.json()["choices"][0]["text"] == expected for r in results if r.status_code == 200)
    assert small.metrics()["hmt_requests_rejected_total"] >= 1
    with pytest.raises(openai.RateLimitError):  # the client sees it as a rate limit
        blocker = threading.Thread(target=run, args=(0,))
        blocker.start()
        small.wait_metric("hmt_requests_running", 1)
        waiter = threading.Thread(target=run, args=(1,))
        waiter.start()
        small.wait_metric("hmt_requests_waiting", 1)
        try:
            small.client().completions.create(model=NAME, prompt="a", max_tokens=2)
        finally:
            blocker.join(60)
            waiter.join(60)


def test_memories_are_shared_and_survive_a_restart(servers, model):
    main, small = servers
    document = SENTENCES[2] * 4
    doc_ids = model.tokenizer(document, add_special_tokens=False).input_ids
    made = httpx.post(main.url + "/v1/memories", json={"text": document}, timeout=60).json()
    expected = offline(model, "Paris", 10, state=ingest(model, torch.tensor([doc_ids]))[0])

    def check():
        assert httpx.get(small.url + f"/v1/memories/{made['id']}").json()["tokens"] == len(doc_ids)
        got = small.client().completions.create(model=NAME, prompt="Paris", max_tokens=10, temperature=0,
                                                extra_body={"memory": made["id"]})
        assert got.choices[0].text == expected

    check()  # the other process sees it at once: there is no in-process index
    small.restart()
    check()


def test_chat_without_template_is_a_clear_400(tmp_path):
    from fastapi.testclient import TestClient

    from hmt_runtime.serving.server import Server

    server = Server(tiny_model(chat_template=False), rows=2, memory_dir=tmp_path, model_name=NAME)
    with TestClient(server.app) as client:
        response = client.post("/v1/chat/completions",
                               json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "messages" and "chat template" in response.json()["error"]["message"]
        ok = client.post("/v1/completions", json={"model": NAME, "prompt": "The cat", "max_tokens": 5,
                                                  "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == offline(server.model, "The cat", 5)
    assert not server.engine.thread.is_alive()  # stopped with the app


def test_server_needs_a_tokenizer(tmp_path):
    from hmt_runtime.serving.server import Server

    model = tiny_model()
    model.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        Server(model, memory_dir=tmp_path)
