"""What replay costs at decode: the default's decode speed right after a prompt with ``replay`` on and off,
interleaved in one process (docs/spec.md "Replay at the end of a prompt").

    python benchmarks/bench_replay_cost.py --prompt-tokens 2000 --new-tokens 64 --rounds 3 --threads 2

The prompt is the start of a training text (not a validation document) (*Emma*); each round builds a scheduler for each
setting, reads the prompt, then times ``--new-tokens`` greedy decode steps.  Prints one JSON line per measurement
and the sorted rates per setting.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hmt_runtime import HMTModel  # noqa: E402
from hmt_runtime.incremental.scheduler import Scheduler  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--text", default=str(ROOT / "data" / "austen" / "emma.txt"))
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", type=int, nargs="+", default=[0, 2], help="replay values compared")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = HMTModel.from_pretrained(args.model)
    text = Path(args.text).read_text(encoding="utf-8")[: args.prompt_tokens * 20]
    ids = torch.tensor(model.tokenizer(text).input_ids[: args.prompt_tokens])
    rates: dict[int, list[float]] = {r: [] for r in args.settings}
    for _ in range(args.rounds):
        for replay in args.settings:
            model.config.set_replay(replay)
            sched = Scheduler(model, rows=1)
            row = sched.add(ids)
            positions = sched.kv.host_lens[row]
            started = time.perf_counter()
            for _ in range(args.new_tokens):
                sched.pick()
                sched.step()
            rates[replay].append(args.new_tokens / (time.perf_counter() - started))
            print(json.dumps({"replay": replay, "kv_positions_after_prompt": positions,
                              "decode_tok_s": round(rates[replay][-1], 1)}), flush=True)
    for replay, values in rates.items():
        print(f"replay {replay}: decode tok/s {[round(v, 1) for v in sorted(values)]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
