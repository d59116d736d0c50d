"""What the integer dot products cost in quality: the shipped default in q4 with the float32-exact kernels against
q4 with int8 activations (``QuantLinear.int_dot``), on the paths where the choice applies; with the integer dots,
the LoRA adapter both as the decode step takes it by default (A as Q8_0 blocks, B^T bfloat16: ``compact``) and
in float32 (``Projection.compact_lora = False``), and the KV cache both as the default beside integer dots stores it
(bfloat16) and in float32 (``HMT_KV_CACHE=fp32``).

    python benchmarks/quality_int_dot.py                  # 2 x 2,048 tokens streamed + 200 greedy tokens, ~4 min
    python benchmarks/quality_int_dot.py --tokens 4096 --out benchmarks/quality_int_dot.json

The integer dot products run only below 4 rows of x, i.e. when tokens are decoded one at a time, so perplexity
is measured by streaming: every token of the first ``--tokens`` of each validation document (Persuasion, the
Bash manual; training never saw them) fed through the scheduler one decode step at a time, teacher-forced, its
log-likelihood taken from the logits the step produced.  Both variants stream the same ids with the same weights;
only the activations' precision in the Q4_1 / Q8_0 products (and the adapter's storage) differs.  Then 200 greedy
tokens after 600 tokens of Persuasion, compared token for token with the exact variant's (the first position where
they part, if any; one prompt, so a near tie early decides it), and the teacher-forced greedy choice at every
streamed position against the exact variant's (``argmax_agreement_percent``).

Prefill (32 rows of x and more) takes the approximate path too: with the integer dots on, Q4_1 / Q8_0 panels run
as bfloat16 GEMMs where the CPU has bfloat16 dot products (docs/native.md).  ``forward_ppl`` measures it: the
teacher-forced forward (``hmt_runtime.evaluate``'s ``hmt`` method: every segment a 256-row prefill) over the first
``--forward-tokens`` of each document, with the integer dots off and on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOCS = {"persuasion": ROOT / "data" / "austen" / "persuasion.txt",
        "bash-manual": ROOT / "data" / "corpus" / "valid" / "technical" / "bash-reference-manual.txt"}


def stream_nll(model, ids: list[int]) -> tuple[float, list[int]]:
    """Mean negative log-likelihood of ids[1:], each predicted by the decode step that fed the previous id, and
    the greedy choice (argmax) at every position."""
    import torch

    from hmt_runtime.incremental.scheduler import Scheduler

    sched = Scheduler(model, rows=1)
    row = sched.add(torch.tensor(ids[:1]))
    total = 0.0
    greedy = []
    with torch.no_grad():
        for token in ids[1:]:
            total -= float(torch.log_softmax(sched.logits[row].double(), -1)[token])
            greedy.append(int(sched.logits[row].argmax()))
            sched.tokens[row] = token
            sched.step()
    return total / (len(ids) - 1), greedy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens streamed per document")
    parser.add_argument("--forward-tokens", type=int, default=8192,
                        help="tokens per document of the teacher-forced forward's perplexity (0: skip it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import torch

    from hmt_runtime import HMTModel
    from hmt_runtime.incremental.engines import Projection
    from hmt_runtime.incremental.generation import generate_ids
    from hmt_runtime.native import quant

    # (name, integer dots, compact adapter, KV cache): "int_dot" is the default as users run it
    variants = (("exact", False, False, "fp32"), ("int_dot_f32_lora", True, False, "fp32"),
                ("int_dot_fp32_kv", True, True, "fp32"), ("int_dot", True, True, "auto"))

    def use(on: bool, compact: bool, kv: str) -> None:
        quant.set_int_dot(model, on)
        Projection.compact_lora = compact
        os.environ["HMT_KV_CACHE"] = kv  # read when a scheduler is built (each stream and generate call)

    torch.set_num_threads(args.threads)
    model = HMTModel.from_pretrained("default", weights="q4")
    tok = model.tokenizer
    result = {"machine": platform.processor() or platform.machine(), "isa": quant.isa(), "tokens": args.tokens,
              "ppl": {}, "seconds": {}}
    for name, path in DOCS.items():
        ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids[: args.tokens]
        choices = {}
        for variant, *choice in variants:
            use(*choice)
            start = time.perf_counter()
            nll, choices[variant] = stream_nll(model, ids)
            result["ppl"][f"{name}/{variant}"] = math.exp(nll)
            result["seconds"][f"{name}/{variant}"] = time.perf_counter() - start
            print(f"{name} {variant}: ppl {result['ppl'][f'{name}/{variant}']:.3f}", flush=True)
        for variant, *_ in variants[1:]:  # teacher-forced: the same greedy choice as the exact variant's
            same = sum(a == b for a, b in zip(choices["exact"], choices[variant]))
            result.setdefault("argmax_agreement_percent", {})[f"{name}/{variant}"] = 100 * same / len(choices[variant])
    if args.forward_tokens:
        from hmt_runtime.training.evaluate import evaluate

        for name, path in DOCS.items():
            ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids[: args.forward_tokens]
            for variant, on in (("exact", False), ("bf16_panels", True)):
                quant.set_int_dot(model, on)
                out = evaluate(model, [torch.tensor(ids)], methods=["hmt"])["methods"]["hmt"]
                result.setdefault("forward_ppl", {})[f"{name}/{variant}"] = out["ppl"]
                result["seconds"][f"{name}/forward/{variant}"] = out["seconds"]
                print(f"{name} forward {variant}: ppl {out['ppl']:.3f} ({out['seconds']:.0f} s)", flush=True)
            exact, other = (result["forward_ppl"][f"{name}/{v}"] for v in ("exact", "bf16_panels"))
            result["forward_ppl"][f"{name}/bf16_panels/change_percent"] = 100 * (other - exact) / exact
    text = DOCS["persuasion"].read_text(encoding="utf-8")
    prompt = torch.tensor([tok(text[20000:40000], add_special_tokens=False).input_ids[:600]])
    greedy = {}
    for variant, *choice in variants:
        use(*choice)
        greedy[variant] = generate_ids(model, prompt, max_new_tokens=200, eos_token_id=[])[0, 600:].tolist()
    result["greedy_first_difference"], result["greedy_equal_tokens"] = {}, {}
    for variant, *_ in variants[1:]:
        pairs = list(zip(greedy["exact"], greedy[variant]))
        result["greedy_first_difference"][variant] = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        result["greedy_equal_tokens"][variant] = sum(a == b for a, b in pairs)
        for name in DOCS:
            exact, other = result["ppl"][f"{name}/exact"], result["ppl"][f"{name}/{variant}"]
            result["ppl"][f"{name}/{variant}/change_percent"] = 100 * (other - exact) / exact
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
