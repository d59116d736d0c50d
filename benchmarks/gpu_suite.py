"""GPU suite for hmt_kernels: correctness in fp16/bf16 against float64, then speed against PyTorch SDPA
(and FlashAttention's ``flash_attn_with_kvcache`` when installed), reported against the card's measured peaks.

    python benchmarks/gpu_suite.py              # on a CUDA machine; appends a report to benchmarks/RESULTS.md
    python benchmarks/gpu_suite.py --quick      # fewer shapes
    python benchmarks/gpu_suite.py --dry-run    # CPU smoke run in the Triton interpreter, tiny shapes, no report

Sections:
* peaks: memory bandwidth from a 1 GiB copy, fp16 matmul TFLOP/s from an 8192^3 matmul;
* correctness: attention (prefill onto filled caches, decode with and without split-K, GQA 1/3/4/7, head dims
  64/80/96/128), recall and memory write, and "hmt_triton" against "sdpa" on a tiny Llama;
* segment prefill (empty cache, Lq = L, causal, the cache append fused) for L in 256..2048;
* decode (Lq = 1) for cache lengths 64..2048;
* recall + memory write latency at SmolLM2-135M (d 576, d_h 1536) and 7B (d 4096, d_h 4096) sizes, N = 300.
Shapes: SmolLM2 heads (9 q / 3 kv, D 64) and 7B-like (32 / 8, D 128); batch 1 and 8.
Targets (H100): prefill >= SDPA flash; decode >= 70% of the measured bandwidth; recall + write < 10 us.
Exit status: 0 when every correctness check passes, 1 otherwise, 2 without a CUDA device.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

SHAPES = {"smollm2 9/3 D64": (9, 3, 64), "7b-like 32/8 D128": (32, 8, 128)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke run in the Triton interpreter, tiny shapes")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--results", type=Path, default=None,
                        help="markdown file to append to (default benchmarks/RESULTS.md; none with --dry-run)")
    return parser.parse_args(argv)


class Suite:
    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.checks: list[tuple] = []  # (name, dtype, max_err, tol, ok)
        self.sections: list[tuple[str, list[str], list[list[str]]]] = []
        self.notes: list[str] = []
        self.peak_bw = None  # bytes/s
        self.peak_flops = None  # flop/s

    # ------------------------------------------------------------------------------------------ helpers
    def bench_us(self, fn) -> float:
        """Median time of fn in microseconds (GPU: triton do_bench, L2 flushed; dry run: one timed call)."""
        if self.dry:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3

    def section(self, title, header, rows):
        self.sections.append((title, header, rows))
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
        print(f"\n== {title}")
        print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))

    def check(self, name, dtype, got, expected, tol):
        torch = self.torch
        err = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
        ok = bool(torch.isfinite(got).all()) and err <= tol
        self.checks.append((name, str(dtype).replace("torch.", ""), f"{err:.2e}", f"{tol:.0e}", "ok" if ok else "FAIL"))

    def guarded(self, title, fn):
        try:
            fn()
        except Exception as err:  # report and carry on with the other sections
            traceback.print_exc()
            self.notes.append(f"{title}: failed with {type(err).__name__}: {err}")
            self.checks.append((title, "-", "-", "-", "FAIL (exception)"))

    # ------------------------------------------------------------------------------------------ peaks
    def measure_peaks(self):
        torch = self.torch
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
        self.section("measured peaks", ["copy bandwidth", "fp16 matmul"],
                     [[f"{self.peak_bw / 1e9:.0f} GB/s", f"{self.peak_flops / 1e12:.0f} TFLOP/s"]])

    # ------------------------------------------------------------------------------------------ correctness
    def attention_case(self, batch, q_len, q_heads, kv_heads, head_dim, window, lens, dtype, num_splits=None):
        from hmt_kernels.attention import _attention
        from hmt_runtime.ops import attention_with_kvcache_torch

        torch = self.torch
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
        k64, v64 = k_cache.double().nan_to_num(0.0), v_cache.double().nan_to_num(0.0)
        expected = attention_with_kvcache_torch(q.double(), k_new.double(), v_new.double(), k64, v64, lens_t)
        out = torch.full_like(q, float("nan"))
        _attention(q, k_new, v_new, k_cache, v_cache, lens_t, num_splits=num_splits, out=out)
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        name = f"attention B{batch} Lq{q_len} {q_heads}/{kv_heads} D{head_dim} lens{lens}" + (
            f" splits{num_splits}" if num_splits else "")
        self.check(name, dtype, out, expected, tol)
        # the append: exact; past len + Lq: untouched (still NaN)
        appended_ok = True
        for b, n in enumerate(lens):
            end = n + q_len
            appended_ok &= torch.equal(k_cache[b, :, :end].double(), k64[b, :, :end])
            appended_ok &= torch.equal(v_cache[b, :, :end].double(), v64[b, :, :end])
            appended_ok &= bool(torch.isnan(k_cache[b, :, end:]).all() and torch.isnan(v_cache[b, :, end:]).all())
        self.checks.append((name + " cache", str(dtype).replace("torch.", ""), "-", "exact",
                            "ok" if appended_ok else "FAIL"))

    def correctness(self):
        torch = self.torch
        dtypes = [torch.float16, torch.bfloat16]
        if self.dry:
            cases = [(2, 19, 9, 3, 64, 60, [0, 33]), (2, 1, 14, 2, 80, 50, [49, 7])]
            for dtype in dtypes:
                for case in cases:
                    self.guarded("attention", lambda: self.attention_case(*case, dtype))
                self.guarded("attention split", lambda: self.attention_case(2, 1, 9, 3, 64, 120, [119, 0], dtype, 3))
        else:
            cases = [
                (2, 300, 9, 3, 64, 1024, [0, 517]),  # SmolLM2 heads, segment prefill onto empty/filled rows
                (2, 257, 32, 8, 128, 600, [300, 17]),  # 7B-like
                (1, 129, 8, 2, 80, 300, [77]),  # GQA 4, D 80
                (2, 77, 14, 2, 96, 200, [100, 3]),  # Qwen2-0.5B heads (GQA 7), D 96
                (3, 1, 9, 3, 64, 2100, [2047, 5, 1000]),  # decode, auto split-K
                (8, 1, 32, 8, 128, 2049, [2048] * 8),  # decode, 7B-like
                (2, 3, 4, 4, 64, 700, [650, 0]),  # GQA 1, a few queries
            ]
            for dtype in dtypes:
                for case in cases:
                    self.guarded("attention", lambda: self.attention_case(*case, dtype))
                for splits in (2, 7):
                    self.guarded("attention split", lambda: self.attention_case(2, 1, 14, 2, 128, 1500, [1499, 640],
                                                                                dtype, splits))
        for dtype in dtypes:
            self.guarded("recall/write", lambda: self.recall_case(dtype))
        self.guarded("hmt_triton drop-in", self.drop_in_case)

    def recall_case(self, dtype):
        from hmt_kernels.recall import memory_write, recall
        from hmt_runtime.ops import memory_write_torch, recall_torch

        torch = self.torch
        dev = self.device
        batch, n_slots, d_model, d_h = (2, 20, 64, 96) if self.dry else (3, 300, 576, 1536)
        w_q = (torch.randn(d_h, d_model, device=dev) / math.sqrt(d_model)).to(dtype)
        w_k = (torch.randn(d_h, d_model, device=dev) / math.sqrt(d_model)).to(dtype)
        memory = torch.zeros(batch, n_slots, d_model, device=dev, dtype=dtype)
        keys = torch.zeros(batch, n_slots, d_h, device=dev, dtype=dtype)
        written = torch.tensor([0, 5, n_slots - 3][:batch], device=dev)
        ref = (memory.double().clone(), keys.double().clone(), written.clone())
        for _ in range(7):  # wraps the third row
            new = torch.randn(batch, d_model, device=dev).to(dtype)
            memory_write(new, w_k, memory, keys, written)
            memory_write_torch(new.double(), w_k.double(), *ref)
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        self.check(f"memory_write B{batch} N{n_slots} d{d_model} d_h{d_h} (memory)", dtype, memory, ref[0], 0.0)
        self.check("memory_write (keys, relative)", dtype, keys / ref[1].abs().max(), ref[1] / ref[1].abs().max(), tol)
        count_ok = torch.equal(written, ref[2])
        self.checks.append(("memory_write (count)", "int64", "-", "exact", "ok" if count_ok else "FAIL"))
        summary = torch.randn(batch, d_model, device=dev).to(dtype)
        embeds = torch.full((batch, 4, d_model), float("nan"), device=dev, dtype=dtype)
        recall(summary, memory, keys, written, w_q, out=embeds[:, 1])
        expected = recall_torch(summary.double(), memory.double(), keys.double(), written, w_q.double())
        self.check(f"recall B{batch} N{n_slots} d{d_model} d_h{d_h} into a strided row", dtype, embeds[:, 1],
                   expected, tol)

    def drop_in_case(self):
        import copy

        from transformers import AutoModelForCausalLM, LlamaConfig

        import hmt_kernels

        torch = self.torch
        hmt_kernels.register()
        cfg = LlamaConfig(vocab_size=211, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
        dtype = torch.float32 if self.dry else torch.float16
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
        fast = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="hmt_triton")
        base, fast = base.to(self.device, dtype).eval(), fast.to(self.device, dtype).eval()
        fast.load_state_dict(base.state_dict())
        ids = torch.randint(0, 211, (2, 37 if self.dry else 301), device=self.device)
        with torch.no_grad():
            expected = base(ids).logits
            scale = max(1.0, expected.abs().max().item())  # relative to the largest logit
            self.check("hmt_triton vs sdpa logits (relative to the largest), tiny Llama", dtype,
                       fast(ids).logits / scale, expected / scale, 1e-2)
            ones = torch.ones_like(ids)
            same = torch.equal(fast.generate(ids, attention_mask=ones, max_new_tokens=8, do_sample=False),
                               base.generate(ids, attention_mask=ones, max_new_tokens=8, do_sample=False))
        self.checks.append(("hmt_triton vs sdpa greedy generate, tiny Llama", str(dtype).replace("torch.", ""),
                            "-", "equal", "ok" if same else "differs (fp16 ties?)"))

    # ------------------------------------------------------------------------------------------ speed
    def flash_attn(self):
        try:
            from flash_attn import flash_attn_with_kvcache

            return flash_attn_with_kvcache
        except Exception:
            return None

    def sdpa_flash(self, q, k, v):
        torch = self.torch
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

            def run():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

            return run, "flash"
        except Exception:
            return (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)), "default"

    def prefill(self):
        from hmt_kernels.attention import attention_with_kvcache

        torch = self.torch
        dev, dtype = self.device, (torch.float32 if self.dry else torch.float16)
        lengths = [32] if self.dry else ([256, 1024, 2048] if self.args.quick else [256, 512, 1024, 2048])
        batches = [1] if self.dry else [1, 8]
        fa = self.flash_attn()
        rows = []
        for shape, (q_heads, kv_heads, head_dim) in SHAPES.items():
            for batch in batches:
                for length in lengths:
                    q = torch.randn(batch, length, q_heads, head_dim, device=dev, dtype=dtype)
                    k = torch.randn(batch, length, kv_heads, head_dim, device=dev, dtype=dtype)
                    v = torch.randn_like(k)
                    k_cache = torch.zeros(batch, kv_heads, length, head_dim, device=dev, dtype=dtype)
                    v_cache = torch.zeros_like(k_cache)
                    lens = torch.zeros(batch, dtype=torch.int32, device=dev)
                    ours = self.bench_us(lambda: attention_with_kvcache(q, k, v, k_cache, v_cache, lens))
                    group = q_heads // kv_heads
                    qt = q.transpose(1, 2).contiguous()
                    kt = k.transpose(1, 2).repeat_interleave(group, 1).contiguous()
                    vt = v.transpose(1, 2).repeat_interleave(group, 1).contiguous()
                    sdpa_fn, backend = self.sdpa_flash(qt, kt, vt)
                    sdpa = self.bench_us(sdpa_fn)
                    fa_us = "-"
                    if fa is not None:
                        kc = torch.zeros(batch, length, kv_heads, head_dim, device=dev, dtype=dtype)
                        vc = torch.zeros_like(kc)
                        fa_us = f"{self.bench_us(lambda: fa(q, kc, vc, k=k, v=v, cache_seqlens=lens, causal=True)):.1f}"
                    flops = 4 * batch * q_heads * head_dim * length * (length + 1) / 2
                    tflops = flops / (ours * 1e-6) / 1e12
                    pct = f"{100 * tflops * 1e12 / self.peak_flops:.0f}%" if self.peak_flops else "-"
                    rows.append([shape, batch, length, f"{ours:.1f}", f"{sdpa:.1f} ({backend})", fa_us,
                                 f"{tflops:.1f}", pct, f"{sdpa / ours:.2f}x"])
        self.section(f"segment prefill (empty cache, causal, fused append; {str(dtype)[6:]})",
                     ["heads q/kv D", "B", "L", "hmt_triton us", "sdpa us", "flash_attn us", "TFLOP/s", "% peak",
                      "speed vs sdpa"], rows)

    def decode(self):
        from hmt_kernels.attention import _decode_splits, attention_with_kvcache

        torch = self.torch
        dev, dtype = self.device, (torch.float32 if self.dry else torch.float16)
        lengths = [40] if self.dry else ([64, 512, 2048] if self.args.quick else [64, 256, 512, 1024, 2048])
        batches = [1] if self.dry else [1, 8]
        fa = self.flash_attn()
        rows = []
        for shape, (q_heads, kv_heads, head_dim) in SHAPES.items():
            for batch in batches:
                for length in lengths:
                    window = length + 1
                    q = torch.randn(batch, 1, q_heads, head_dim, device=dev, dtype=dtype)
                    k = torch.randn(batch, 1, kv_heads, head_dim, device=dev, dtype=dtype)
                    v = torch.randn_like(k)
                    k_cache = torch.randn(batch, kv_heads, window, head_dim, device=dev, dtype=dtype)
                    v_cache = torch.randn_like(k_cache)
                    lens = torch.full((batch,), length, dtype=torch.int32, device=dev)
                    ours = self.bench_us(lambda: attention_with_kvcache(q, k, v, k_cache, v_cache, lens))
                    qt = q.transpose(1, 2)
                    try:
                        sdpa_gqa = torch.nn.functional.scaled_dot_product_attention
                        sdpa_gqa(qt, k_cache, v_cache, enable_gqa=True)
                        sdpa = self.bench_us(lambda: sdpa_gqa(qt, k_cache, v_cache, enable_gqa=True))
                    except Exception:
                        group = q_heads // kv_heads
                        kt, vt = k_cache.repeat_interleave(group, 1), v_cache.repeat_interleave(group, 1)
                        sdpa = self.bench_us(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
                    fa_us = "-"
                    if fa is not None:
                        kc = torch.randn(batch, window, kv_heads, head_dim, device=dev, dtype=dtype)
                        vc = torch.randn_like(kc)
                        fa_us = f"{self.bench_us(lambda: fa(q, kc, vc, k=k, v=v, cache_seqlens=lens, causal=True)):.1f}"
                    elt = k_cache.element_size()
                    moved = (2 * batch * kv_heads * (length + 1) * head_dim + 2 * batch * q_heads * head_dim) * elt
                    gbs = moved / (ours * 1e-6) / 1e9
                    pct = f"{100 * gbs * 1e9 / self.peak_bw:.0f}%" if self.peak_bw else "-"
                    splits = _decode_splits(batch, kv_heads, window, dev)
                    rows.append([shape, batch, length, splits, f"{ours:.1f}", f"{sdpa:.1f}", fa_us, f"{gbs:.0f}", pct])
        self.section(f"decode (Lq = 1, fused append; {str(dtype)[6:]})",
                     ["heads q/kv D", "B", "cache len", "splits", "hmt_triton us", "sdpa us", "flash_attn us", "GB/s",
                      "% peak bw"], rows)

    def recall_latency(self):
        from hmt_kernels.recall import memory_write, recall

        torch = self.torch
        dev, dtype = self.device, (torch.float32 if self.dry else torch.float16)
        sizes = [(64, 96, 20)] if self.dry else [(576, 1536, 300), (4096, 4096, 300)]
        rows = []
        for d_model, d_h, n_slots in sizes:
            for batch in ([1] if self.dry else [1, 8]):
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
                rows.append([d_model, d_h, n_slots, batch, f"{rec:.1f}", f"{wri:.1f}", f"{total:.1f}",
                             "ok" if total < 10 else "over 10 us"])
        self.section(f"recall + memory write ({str(dtype)[6:]})",
                     ["d", "d_h", "N", "B", "recall us", "write us", "recall+write us", "target < 10 us"], rows)

    # ------------------------------------------------------------------------------------------ report
    def report(self, command):
        torch = self.torch
        import triton

        device_name = "CPU (Triton interpreter, dry run)" if self.dry else torch.cuda.get_device_name(self.device)
        try:
            import flash_attn

            fa = f"flash_attn {flash_attn.__version__}"
        except Exception:
            fa = "flash_attn not installed"
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = [f"## {stamp}: {device_name}", "",
                 f"Command: `{command}`; torch {torch.__version__}, triton {triton.__version__}, {fa}, "
                 f"Python {platform.python_version()}.", ""]
        self.sections.insert(0, ("correctness (max abs error against float64)",
                                 ["check", "dtype", "max err", "tol", "result"], [list(c) for c in self.checks]))
        for title, header, rows in self.sections:
            lines += [f"### {title}", "", "| " + " | ".join(map(str, header)) + " |",
                      "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
            lines.append("")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (torch.cuda.is_available() is False). Run it on a machine with an NVIDIA "
              "GPU, or pass --dry-run for a CPU smoke run in the Triton interpreter.", file=sys.stderr)
        return 2
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/gpu_suite.py", *(argv or sys.argv[1:])])
    torch.manual_seed(0)
    suite = Suite(args)
    suite.guarded("peaks", suite.measure_peaks)
    suite.correctness()
    suite.section("correctness", ["check", "dtype", "max err", "tol", "result"], [list(c) for c in suite.checks])
    suite.sections.pop()  # printed now; the report puts it first
    for title, fn in (("prefill", suite.prefill), ("decode", suite.decode), ("recall", suite.recall_latency)):
        suite.guarded(title, fn)
    report = suite.report(command)
    target = args.results or (None if args.dry_run else RESULTS)
    if target is not None:
        with open(target, "a") as f:
            f.write("\n" + report)
        print(f"\nappended to {target}")
    failed = [c for c in suite.checks if not c[-1].startswith("ok") and not c[-1].startswith("differs")]
    for note in suite.notes:
        print("note:", note)
    print(f"\n{len(suite.checks) - len(failed)}/{len(suite.checks)} correctness checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
