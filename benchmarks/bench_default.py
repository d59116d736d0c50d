"""The shipped default model (a LoRA / peft model) on the lean engine, side by side with an adapter-free HMT of
the same backbone, the same model on the transformers engine, and ``HMTModel.generate`` (one process, rounds
interleaved so that machine noise hits every configuration alike).

    python benchmarks/bench_default.py [--contexts 2048 8192] [--new 64] [--rounds 3] [--threads 2] [--json FILE]

Prints a markdown table: ingest tok/s (prompt tokens / time to the first new token) and decode tok/s (tokens
per second between the first and the last new token), the median over rounds, and the ratios to the
adapter-free lean figure of the same round.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def text_ids(tokenizer, n_tokens: int) -> list[int]:
    ids: list[int] = []
    for name in ("prideprejudice.txt", "emma.txt", "mansfieldpark.txt"):
        ids += tokenizer((ROOT / "data" / "austen" / name).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def streamed(fn) -> tuple[float, float, int]:
    """fn(on_token) runs one generation calling on_token() per new token -> (ingest s, decode tok/s, tokens)."""
    stamps: list[float] = []
    start = time.perf_counter()
    fn(lambda: stamps.append(time.perf_counter()))
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--native", nargs="*", default=[], choices=("fp32", "bf16", "int8", "q4"),
                        help="also the shipped default with kernels='native' and these weight formats")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import hmt_runtime
    from hmt_runtime import HMTModel, load_backbone
    from hmt_runtime.incremental.scheduler import Scheduler

    default = HMTModel.from_pretrained("default", kernels="torch", weights="fp32")
    backbone, _ = load_backbone("smollm2-135m")
    plain = HMTModel(backbone, default.config, tokenizer=default.tokenizer)
    plain.load_hmt_weights(hmt_runtime.model.hmt.DEFAULT_DIR)
    plain.eval()
    assert Scheduler(default).engine.name == "lean" and Scheduler(plain).engine.name == "lean"

    def api(model, engine="auto"):
        def run(prompt, on_token):
            for _ in hmt_runtime.generate(model, prompt, max_new_tokens=args.new, stream=True, engine=engine):
                on_token()
        return run

    def model_generate(model):
        class Clock:
            def __init__(self, on_token):
                self.on_token, self.first = on_token, True

            def put(self, value):
                if self.first:  # the prompt
                    self.first = False
                else:
                    self.on_token()

            def end(self):
                pass

        def run(prompt, on_token):
            model.generate(prompt[None], max_new_tokens=args.new, streamer=Clock(on_token))
        return run

    configs = {
        "adapter-free HMT, lean engine": api(plain),
        "shipped default (LoRA), lean engine": api(default),
        "shipped default, HMTModel.generate": model_generate(default),
        "shipped default, transformers engine": api(default, "transformers"),
    }
    for weights in args.native:  # the native kernels: one-op decode step, low-precision weights
        native = HMTModel.from_pretrained("default", kernels="native", weights=weights)
        assert Scheduler(native).backend.fused_decode
        configs[f"shipped default, native kernels, {weights} weights"] = api(native)
    results: dict = {}
    for context in args.contexts:
        prompt = torch.tensor(text_ids(default.tokenizer, context - args.new))
        for fn in configs.values():  # warm-up
            streamed(lambda tick: fn(prompt[:300], tick))
        rows = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, fn in configs.items():
                rows[name].append(streamed(lambda tick: fn(prompt, tick)))
        results[context] = rows

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\nCPU: {cpu}, {args.threads} threads, torch {torch.__version__}; {args.new} new tokens; "
          f"median of {args.rounds} interleaved rounds\n")
    print("| configuration | context | ingest tok/s | decode tok/s | decode vs adapter-free (per round) |")
    print("|---|---|---|---|---|")
    for context, rows in results.items():
        base = [decode for _, decode, _ in rows["adapter-free HMT, lean engine"]]
        for name, runs in rows.items():
            ingest = statistics.median((context - args.new) / i for i, _, _ in runs)
            decode = statistics.median(d for _, d, _ in runs)
            ratio = statistics.median(d / b for (_, d, _), b in zip(runs, base))
            print(f"| {name} | {context} | {ingest:.0f} | {decode:.1f} | {ratio:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({str(c): r for c, r in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
