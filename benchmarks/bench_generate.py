"""HMT generation on the scheduler against transformers' own generate, on the same backbone (pytest-benchmark).

    python -m pytest benchmarks/bench_generate.py -p no:cacheprovider -q --benchmark-json=generation.json
    python benchmarks/report.py generation.json --plots benchmarks     # tables (markdown) + PNG plots

About 12 minutes on the 2-core CPU (the 128k-token memory point alone takes 5); ``HMT_BENCH_TINY=1`` runs
everything on a tiny random Llama in about a minute (see conftest.py for the other settings).

Both sides run the default backbone (SmolLM2-135M, fp32, sdpa, 2 threads).  transformers: ``generate`` with its
DynamicCache over the full context.  HMT: ``hmt_runtime.generate`` with window W = 256 (causal recall, untrained
HMT parameters: speed does not depend on their values).  Measured in one run, side by side:

* ingest / decode: one streamed call per (side, context), prompts of context - 48 tokens of English text.
  Prompt ingestion tok/s = prompt tokens / time to the first new token; decode tok/s = tokens per second between the first and the last new token (HMT decodes 256
  tokens, so at least one segment boundary with its summary pass, memory write and prefill is inside the figure;
  transformers decodes 48, keeping prompt + new tokens within its 8192 positions).
* peak memory: a fresh subprocess per (side, context) loads the model, resets the kernel's peak-RSS counter
  (``/proc/self/clear_refs``), ingests the prompt and reads the peak (VmHWM); points never share a process.
  transformers is not run past its ``max_position_embeddings`` (8192 for SmolLM2-135M).
* decode-step anatomy: the scheduler's step (amortised boundary events included), the lean backbone forward
  alone, transformers' backbone forward for one token, the GEMV chain over every weight (the weight-read bound)
  and the machine's read bandwidth.

``python benchmarks/bench_generate.py rss hmt 32768`` runs one memory point by hand (prints JSON).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HMT_NEW_TOKENS = 256
HF_NEW_TOKENS = 48


@dataclass(frozen=True)
class Settings:
    tiny: bool
    threads: int
    window: int
    kernels: str
    contexts: tuple[int, ...]  # ingest / decode points, in process
    memory_contexts: tuple[int, ...]  # peak-RSS points, one subprocess each
    hf_max_positions: int

    @property
    def label(self) -> str:
        return "tiny random Llama" if self.tiny else "SmolLM2-135M fp32"


def settings() -> Settings:
    tiny = os.environ.get("HMT_BENCH_TINY", "0") not in ("", "0")
    threads = int(os.environ.get("HMT_BENCH_THREADS", "2"))
    window = int(os.environ.get("HMT_BENCH_WINDOW", "64" if tiny else "256"))
    kernels = os.environ.get("HMT_BENCH_KERNELS", "torch")
    if tiny:
        contexts, memory, hf_max = (256, 1024), (256, 1024, 4096, 16384), 1024
    else:
        contexts, memory, hf_max = (2048, 8192), (2048, 8192, 32768, 131072), 8192
    cap = int(os.environ.get("HMT_BENCH_MAX_CONTEXT", str(max(memory))))
    return Settings(tiny, threads, window, kernels, contexts, tuple(c for c in memory if c <= cap), hf_max)


# ---------------------------------------------------------------------------------------------------- setup
def load(s: Settings):
    """(backbone, tokenizer or None) in eval mode, sdpa attention."""
    if s.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=s.hf_max_positions,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
        return LlamaForCausalLM(cfg).eval(), None
    from hmt_runtime import load_backbone

    return load_backbone("smollm2-135m", attn_implementation="sdpa")


def hmt_model(s: Settings, recall: str = "causal"):
    from hmt_runtime import HMTConfig, HMTModel

    backbone, tokenizer = load(s)
    config = HMTConfig.from_window(s.window, sensory_tokens=32 if s.window >= 128 else 8, recall=recall,
                                   kernels=s.kernels, recall_dim=1536 if not s.tiny else 64)
    return HMTModel(backbone, config, tokenizer).eval()


def corpus_ids(s: Settings, n_tokens: int) -> torch.Tensor:
    """(n_tokens,) ids of English text (the novels in data/austen, repeated if needed); random ids when tiny."""
    if s.tiny:
        return torch.randint(3, 2048, (n_tokens,), generator=torch.Generator().manual_seed(0))
    from hmt_runtime import load_backbone

    _, tokenizer = load_backbone("smollm2-135m")
    ids: list[int] = []
    files = sorted((ROOT / "data" / "austen").glob("*.txt"))
    if not files:
        raise FileNotFoundError("benchmarks need data/austen/*.txt (English text to ingest)")
    while len(ids) < n_tokens:
        for path in files:
            ids.extend(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids)
            if len(ids) >= n_tokens:
                break
    return torch.tensor(ids[:n_tokens])


# ---------------------------------------------------------------------------------------------------- runs
def hmt_run(model, prompt: torch.Tensor, new_tokens: int = HMT_NEW_TOKENS) -> dict:
    """One streamed hmt_runtime.generate call: ingest time and decode tokens/s."""
    from hmt_runtime import generate

    stamps = []
    start = time.perf_counter()
    for _ in generate(model, prompt, max_new_tokens=new_tokens, stream=True):
        stamps.append(time.perf_counter())
    ingest_s = stamps[0] - start
    return {"prompt_tokens": prompt.numel(), "new_tokens": len(stamps), "ingest_s": ingest_s,
            "ingest_tok_s": prompt.numel() / ingest_s,
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def hf_run(backbone, prompt: torch.Tensor, new_tokens: int = HF_NEW_TOKENS) -> dict:
    """One transformers generate call (greedy, DynamicCache): prefill time and decode tokens/s, timed by a
    logits processor that runs once per new token."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    clock = Clock()
    start = time.perf_counter()
    with torch.no_grad():
        backbone.generate(prompt[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    stamps = clock.stamps
    prefill_s = stamps[0] - start
    return {"prompt_tokens": prompt.numel(), "new_tokens": len(stamps), "ingest_s": prefill_s,
            "ingest_tok_s": prompt.numel() / prefill_s,
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def _mean_s(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def step_anatomy(model, hf_backbone, prompt: torch.Tensor, steps: int = 240) -> dict:
    """Milliseconds per token: scheduler step, lean forward, transformers forward, GEMV chain; read GB/s."""
    from transformers import DynamicCache

    from hmt_runtime.core.backbones import cache_kwargs
    from hmt_runtime.incremental.scheduler import Scheduler

    sched = Scheduler(model, rows=1)
    row = sched.add(prompt)
    for _ in range(3):
        sched.pick()
        sched.step()

    def one_step():
        sched.pick()
        sched.step()

    step_s = _mean_s(one_step, steps)  # includes the boundary events met on the way (amortised)
    engine = sched.engine
    embeds = model.embed(sched.tokens[:1, None])
    frozen = torch.zeros(1, dtype=torch.long)  # do not advance: every call decodes the same position
    span = sched.kv.host_lens[row] + 1

    def lean():
        if engine.name == "lean":
            hidden = engine.decode(embeds, frozen, span)
        else:
            hidden = engine.decode(embeds, frozen, span, live_rows=[row])
        model.lm_logits(hidden[:, 0])

    lean_s = _mean_s(lean, 40)
    ids = prompt[: model.config.window // 2][None]
    cache = DynamicCache()
    hf_backbone(ids, **cache_kwargs(hf_backbone, cache))
    token = ids[:, -1:]
    hf_s = _mean_s(lambda: hf_backbone(token, **cache_kwargs(hf_backbone, cache)), 40)
    weights = [m.weight for m in hf_backbone.modules() if isinstance(m, torch.nn.Linear)]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    gemv_s = _mean_s(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], 10)
    read_s = _mean_s(lambda: [w.sum() for w in weights], 10)
    return {"step_ms": step_s * 1e3, "lean_forward_ms": lean_s * 1e3, "hf_forward_ms": hf_s * 1e3,
            "gemv_bound_ms": gemv_s * 1e3, "weight_mb": weight_bytes / 1e6, "read_gb_s": weight_bytes / read_s / 1e9,
            "overhead_vs_lean_ms": (step_s - lean_s) * 1e3, "overhead_vs_hf_ms": (step_s - hf_s) * 1e3,
            "engine": engine.name, "window": model.config.window}


# ---------------------------------------------------------------------------------------------------- memory
def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM missing from /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_point_here(impl: str, context: int) -> dict:
    """In this process: load, reset the peak-RSS counter, ingest ``context`` tokens, read the peak."""
    import psutil

    s = settings()
    torch.set_num_threads(s.threads)
    prompt = corpus_ids(s, context)
    if impl == "hmt":
        from hmt_runtime import ingest

        model = hmt_model(s)
        ingest(model, prompt[:64][None])  # lazy initialisations out of the way
    else:
        backbone, _ = load(s)
        with torch.no_grad():
            backbone.generate(prompt[:64][None], max_new_tokens=1, do_sample=False, pad_token_id=0)
    model_mb = psutil.Process().memory_info().rss / 2**20
    reset = _reset_peak()
    start = time.perf_counter()
    if impl == "hmt":
        ingest(model, prompt[None])
    else:
        with torch.no_grad():
            backbone.generate(prompt[None], max_new_tokens=1, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    return {"impl": impl, "context": context, "model_rss_mb": model_mb, "peak_rss_mb": _vm_hwm_kb() / 1024,
            "peak_reset": reset, "seconds": seconds, "tok_s": context / seconds}


def rss_point(impl: str, context: int, timeout: float = 3600) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "rss", impl, str(context)],
                         capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if out.returncode != 0:
        raise RuntimeError(f"rss point {impl} {context} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    load1, load5, load15 = os.getloadavg()
    return {"cpus": os.cpu_count(), "load_avg": [round(load1, 2), round(load5, 2), round(load15, 2)],
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------- tests
def _record(benchmark, group: str, info: dict, s: Settings) -> None:
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark.extra_info.update({"backbone": s.label, "machine": _machine(), "window": s.window})


def _once(benchmark, fn):
    return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)


def pytest_generate_tests(metafunc):
    s = settings()
    if "context" in metafunc.fixturenames:
        metafunc.parametrize("context", s.contexts)
    if "memory_context" in metafunc.fixturenames:
        metafunc.parametrize("memory_context", s.memory_contexts)


def test_generate_hmt(benchmark, settings, hmt_model, corpus, context):
    prompt = corpus[: context - HF_NEW_TOKENS]  # the same prompts as the transformers side
    hmt_run(hmt_model, corpus[:300], 8)  # warm-up
    info = _once(benchmark, lambda: hmt_run(hmt_model, prompt))
    _record(benchmark, f"generate {context}", {"impl": "hmt", "context": context, **info}, settings)


def test_generate_transformers(benchmark, settings, hf_backbone, corpus, context):
    prompt = corpus[: context - HF_NEW_TOKENS]
    hf_run(hf_backbone, corpus[:300], 4)  # warm-up
    info = _once(benchmark, lambda: hf_run(hf_backbone, prompt))
    _record(benchmark, f"generate {context}", {"impl": "transformers", "context": context, **info}, settings)


def test_peak_rss_hmt(benchmark, settings, memory_context):
    info = _once(benchmark, lambda: rss_point("hmt", memory_context))
    _record(benchmark, f"peak rss {memory_context}", info, settings)


def test_peak_rss_transformers(benchmark, settings, memory_context):
    import pytest

    if memory_context > settings.hf_max_positions:
        pytest.skip(f"transformers stops at max_position_embeddings = {settings.hf_max_positions}")
    info = _once(benchmark, lambda: rss_point("transformers", memory_context))
    _record(benchmark, f"peak rss {memory_context}", info, settings)


def test_decode_step_anatomy(benchmark, settings, hmt_model, hf_backbone, corpus):
    info = _once(benchmark, lambda: step_anatomy(hmt_model, hf_backbone, corpus[:1000]))
    _record(benchmark, "decode step", info, settings)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "rss":
        print(json.dumps(rss_point_here(sys.argv[2], int(sys.argv[3]))))
    else:
        print(__doc__)
        sys.exit(2)
