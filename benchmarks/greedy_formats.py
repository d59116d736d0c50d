"""Greedy tokens of the shipped default model in every weight format against fp32, on real text.

    python benchmarks/greedy_formats.py                          # 3 prompts of 1,000 tokens, 200 new tokens
    python benchmarks/greedy_formats.py --formats q4 --new-tokens 300 --prompts 5

Each prompt is a slice of *Persuasion* (held out from training).  Every format runs ``hmt_runtime.generate_ids``
(the path users run: the scheduler with the engine and kernels it picks) with EOS switched off; the report gives,
per format and prompt, how many new tokens equal the fp32 ones before the first difference and, at a
difference, fp32's margin between its top two logits there (teacher-forced forward of the fp32 model over the
fp32 sequence), which tells a near-tie from a real error.  q4 reads the same weights as fp32 (the GGUF's Q4_1
blocks, dequantized exactly), so it can differ only by float32 accumulation order; bf16 and int8 round the
weights and are expected to drift.  Writes one JSON line per (format, prompt) and a summary table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    text = (ROOT / "data" / "austen" / "persuasion.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    stride = (len(ids) - length) // max(count, 1)
    return [ids[i * stride:i * stride + length] for i in range(count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=["bf16", "int8", "q4"])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the records here as well")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from hmt_runtime import HMTModel
    from hmt_runtime.incremental.generation import generate_ids

    def run(model, prompt):
        out = generate_ids(model, torch.tensor([prompt]), max_new_tokens=args.new_tokens, eos_token_id=[])
        return out[0, len(prompt):].tolist()

    ref = HMTModel.from_pretrained("default", weights="fp32")
    items = prompts(ref.tokenizer, args.prompts, args.prompt_tokens)
    want = [run(ref, p) for p in items]
    records = []
    for fmt in args.formats:
        model = HMTModel.from_pretrained("default", weights=fmt)
        for i, prompt in enumerate(items):
            started = time.perf_counter()
            got = run(model, prompt)
            same = next((j for j, (a, b) in enumerate(zip(got, want[i])) if a != b), len(got))
            record = {"format": fmt, "prompt": i, "new_tokens": len(got), "equal_prefix": same,
                      "seconds": round(time.perf_counter() - started, 1)}
            if same < len(got):
                with torch.no_grad():
                    seq = torch.tensor([prompt + want[i][:same + 1]])
                    logits = ref(seq).logits[0, len(prompt) + same - 1].double()
                top = logits.topk(2).values
                record.update(fp32_token=want[i][same], other_token=got[same],
                              fp32_top2_margin=round(float(top[0] - top[1]), 5),
                              margin_to_other=round(float(logits.max() - logits[got[same]]), 5))
            records.append(record)
            print(json.dumps(record), flush=True)
        del model
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "torch": torch.__version__, "records": records}, indent=1))
    print(f"\n| format | prompt | equal greedy tokens (of {args.new_tokens}) | fp32 top-2 margin at the first difference |")
    print("|---|---:|---:|---:|")
    for r in records:
        print(f"| {r['format']} | {r['prompt']} | {r['equal_prefix']} | {r.get('fp32_top2_margin', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
