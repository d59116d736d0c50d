"""GPU checks and timings of the generation scheduler (hmt_runtime.scheduler), for benchmarks/gpu_suite.py.

    from gpu_scheduler import run_scheduler_suite
    result = run_scheduler_suite()      # {"sections": [(title, header, rows)], "checks": [...], "notes": [...]}

    python benchmarks/gpu_scheduler.py [--quick]     # the same, printed

Sections:
* correctness: greedy tokens of the CUDA-graph path equal the eager path (tiny Llama fp32, both recall modes;
  SmolLM2-135M bf16 one decode step: logits of the captured step against the eager step);
* decode step, CUDA graph vs eager, SmolLM2-135M bf16, batch 1 / 4 / 8 (target: graph >= 2x faster);
* tokens/s at 2k and 8k context against transformers' generate with a StaticCache, whose decoding forward
  transformers compiles itself (torch.compile, CompileConfig mode "reduce-overhead"), same backbone and dtype.
Raises RuntimeError without a CUDA device.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "tests", Path(__file__).resolve().parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def _cuda_time_ms(fn, repeats: int = 50) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _smollm(dtype):
    from hmt_runtime import HMTConfig, HMTModel, load_backbone

    backbone, tokenizer = load_backbone("smollm2-135m")
    backbone = backbone.to(device="cuda", dtype=dtype).eval()
    config = HMTConfig.from_window(256, recall="causal", kernels="torch")
    return HMTModel(backbone, config, tokenizer).to("cuda").eval(), backbone


def _prompt(n_tokens: int, vocab: int):
    import torch

    files = sorted((ROOT / "data" / "austen").glob("*.txt"))
    if files:
        from hmt_runtime import load_backbone

        _, tokenizer = load_backbone("smollm2-135m")
        ids: list[int] = []
        while len(ids) < n_tokens:
            for path in files:
                ids.extend(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids)
        return torch.tensor(ids[:n_tokens])
    return torch.randint(3, vocab, (n_tokens,), generator=torch.Generator().manual_seed(0))


def _correctness(checks, notes):
    import torch

    from hmt_runtime import generate
    from test_model import make_model
    from tiny import VOCAB

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (2, 9, 10, 32)]
    for recall in ("causal", "paper"):
        model = make_model("llama", recall, seed=9).float().cuda()
        eager = generate(model, prompts, max_new_tokens=30, cuda_graphs=False)
        graphed = generate(model, prompts, max_new_tokens=30, cuda_graphs=True)
        same = sum(a == b for a, b in zip(eager, graphed))
        checks.append((f"tiny llama fp32 {recall}: graph tokens == eager", "fp32", f"{same}/{len(prompts)} rows",
                       "all", "ok" if same == len(prompts) else "FAIL"))

    from hmt_runtime.scheduler import Scheduler

    model, _ = _smollm(torch.bfloat16)
    prompt = _prompt(600, model.vocab_size).cuda()
    results = []
    for graphs in (False, True):
        sched = Scheduler(model, rows=1, cuda_graphs=graphs)
        sched.add(prompt)
        for _ in range(4):  # graphs are captured on the third call: compare a replayed step
            sched.pick()
            sched.step()
        results.append(sched.logits[0].float().clone())
    err = (results[0] - results[1]).abs().max().item()
    scale = results[0].abs().max().item()
    checks.append(("SmolLM2 bf16 decode step logits: graph vs eager", "bf16", f"{err:.2e}", f"{0.02 * scale:.1e}",
                   "ok" if err <= 0.02 * scale else "FAIL"))


def _graph_vs_eager(quick):
    import torch

    from hmt_runtime.scheduler import Scheduler

    model, _ = _smollm(torch.bfloat16)
    prompt = _prompt(300, model.vocab_size).cuda()
    rows = []
    for batch in ((1,) if quick else (1, 4, 8)):
        timings = {}
        for graphs in (False, True):
            sched = Scheduler(model, rows=batch, cuda_graphs=graphs)
            for _ in range(batch):
                sched.add(prompt)
            for _ in range(3):
                sched.pick()
                sched.step()
            live = torch.ones(batch, dtype=torch.long, device="cuda")

            def core():  # the decode step alone: embed, layers, logits (the position is held fixed)
                sched.live_mask[:batch].zero_()
                if graphs:
                    sched.graphs.run(("decode", batch), lambda: sched._decode_core(batch, None))
                else:
                    sched._decode_core(batch, max(sched.kv.host_lens[:batch]) + 1)
                sched.live_mask[:batch].copy_(live)

            timings[graphs] = _cuda_time_ms(core)

            def full():
                sched.pick()
                sched.step()

            timings[("step", graphs)] = _cuda_time_ms(full, 100)
        speedup = timings[False] / timings[True]
        rows.append([batch, f"{timings[False]:.2f}", f"{timings[True]:.2f}", f"{speedup:.1f}x",
                     f"{timings[('step', False)]:.2f}", f"{timings[('step', True)]:.2f}",
                     "ok" if speedup >= 2 else "below 2x"])
    return ("scheduler decode step, CUDA graph vs eager (SmolLM2-135M bf16, W 256)",
            ["batch", "eager ms", "graph ms", "speedup", "eager step ms (events incl.)", "graph step ms",
             "target >= 2x"], rows)


def _vs_transformers(quick):
    import torch
    from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList

    from hmt_runtime import generate

    model, backbone = _smollm(torch.bfloat16)
    reference = backbone  # the same weights; HMT never changes them

    class Clock(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            return scores

    rows = []
    contexts = (2048,) if quick else (2048, 8192)
    for context in contexts:
        new_hf = 128
        prompt = _prompt(context - new_hf, model.vocab_size).cuda()

        def hf(n):
            # a StaticCache makes generate compile the decoding forward itself (CompileConfig: reduce-overhead)
            clock = Clock()
            reference.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                               cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"),
                               logits_processor=LogitsProcessorList([clock]))
            return (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0])

        hf(new_hf)  # compile + warm-up at the very shapes timed next
        hf_tok_s = hf(new_hf)

        def hmt(n):
            stamps = []
            for _ in generate(model, prompt, max_new_tokens=n, stream=True, cuda_graphs=True):
                stamps.append(time.perf_counter())  # a token is read on the host each step: synchronised
            return (len(stamps) - 1) / (stamps[-1] - stamps[0])

        hmt(16)
        hmt_tok_s = hmt(512)
        rows.append([context, f"{hmt_tok_s:.0f}", f"{hf_tok_s:.0f}", f"{hmt_tok_s / hf_tok_s:.2f}x"])
    return ("decode tokens/s vs transformers (StaticCache + torch.compile reduce-overhead), SmolLM2-135M bf16, batch 1",
            ["context", "HMT (CUDA graphs) tok/s", "transformers tok/s", "ratio"], rows)


def run_scheduler_suite(quick: bool = False) -> dict:
    """Run the scheduler's GPU checks and timings; returns {"sections", "checks", "notes"} in gpu_suite's shapes:
    sections: [(title, header, rows)], checks: [(name, dtype, measured, tolerance, "ok" | "FAIL ...")]."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("run_scheduler_suite needs a CUDA device: torch.cuda.is_available() is False "
                           "(run it on a machine with an NVIDIA GPU)")
    checks, notes, sections = [], [], []
    torch.manual_seed(0)
    for title, fn in (("correctness", lambda: _correctness(checks, notes)),
                      ("graph vs eager", lambda: sections.append(_graph_vs_eager(quick))),
                      ("vs transformers", lambda: sections.append(_vs_transformers(quick)))):
        try:
            fn()
        except Exception as err:  # report and carry on with the other sections
            import traceback

            traceback.print_exc()
            notes.append(f"scheduler {title}: failed with {type(err).__name__}: {err}")
            checks.append((f"scheduler {title}", "-", "-", "-", "FAIL (exception)"))
    return {"sections": sections, "checks": checks, "notes": notes}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and context 2k only")
    args = parser.parse_args(argv)
    try:
        result = run_scheduler_suite(quick=args.quick)
    except RuntimeError as err:
        print(f"gpu_scheduler: {err}", file=sys.stderr)
        return 2
    for name, dtype, got, tol, verdict in result["checks"]:
        print(f"check  {name} [{dtype}]: {got} (tolerance {tol}) {verdict}")
    for title, header, rows in result["sections"]:
        print(f"\n== {title}\n" + " | ".join(map(str, header)))
        for row in rows:
            print(" | ".join(map(str, row)))
    for note in result["notes"]:
        print("note:", note)
    return 1 if any(not c[-1].startswith("ok") for c in result["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
