"""One line of figures for the tree this file is run from, to compare commits side by side: run it from each
tree's root (a ``git worktree`` per commit, the native extension built in each), interleaving the trees so that
machine noise hits every one alike.

    for round in 1 2 3 4; do for tree in ../before .; do (cd $tree && python benchmarks/bench_trees.py --name $tree); done; done

The shipped default (``HMTModel.from_pretrained("default")``), a prompt of ``--context`` tokens of Persuasion,
``--new`` greedy tokens through ``hmt_runtime.generate(..., stream=True)``; prints the name and a JSON object:
ingest tok/s (prompt tokens / time to the first new token) and decode tok/s (after the first new token).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=".", help="label of this tree in the output")
    parser.add_argument("--context", type=int, nargs="+", default=[256])
    parser.add_argument("--new", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    root = Path.cwd()
    sys.path.insert(0, str(root))
    torch.set_num_threads(args.threads)
    from hmt_runtime import HMTModel, generate

    model = HMTModel.from_pretrained("default")
    ids = model.tokenizer((root / "data" / "austen" / "persuasion.txt").read_text(encoding="utf-8"),
                          add_special_tokens=False).input_ids
    out = {}
    for n in args.context:
        prompt = torch.tensor(ids[10000 : 10000 + n])
        start, first, count = time.perf_counter(), None, 0
        for chunk in generate(model, prompt, max_new_tokens=args.new + 1, stream=True):
            first = first or time.perf_counter()
            count += len(chunk)
        end = time.perf_counter()
        out[n] = {"ingest_tok_s": round(n / (first - start), 1), "decode_tok_s": round((count - 1) / (end - first), 1)}
    print(args.name, json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
