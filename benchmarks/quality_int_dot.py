"""What the integer dot products cost in quality: the shipped default in q4 with the float32-exact kernels against
q4 with int8 activations (``QuantLinear.int_dot``), on the paths where the choice applies; with the integer dots,
the LoRA adapter both as the decode step takes it by default (A as Q8_0 blocks, B^T bfloat16: ``compact``) and
in float32 (``Projection.compact_lora = False``).

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
"""
from __future__ import annotations

import argparse
import json
import math
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import torch

    from hmt_runtime import HMTModel
    from hmt_runtime.incremental.engines import Projection
    from hmt_runtime.incremental.generation import generate_ids
    from hmt_runtime.native import quant

    variants = (("exact", False, False), ("int_dot_f32_lora", True, False), ("int_dot", True, True))

    def use(on: bool, compact: bool) -> None:
        quant.set_int_dot(model, on)
        Projection.compact_lora = compact

    torch.set_num_threads(args.threads)
    model = HMTModel.from_pretrained("default", weights="q4")
    tok = model.tokenizer
    result = {"machine": platform.processor() or platform.machine(), "isa": quant.isa(), "tokens": args.tokens,
              "ppl": {}, "seconds": {}}
    for name, path in DOCS.items():
        ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids[: args.tokens]
        choices = {}
        for variant, on, compact in variants:
            use(on, compact)
            start = time.perf_counter()
            nll, choices[variant] = stream_nll(model, ids)
            result["ppl"][f"{name}/{variant}"] = math.exp(nll)
            result["seconds"][f"{name}/{variant}"] = time.perf_counter() - start
            print(f"{name} {variant}: ppl {result['ppl'][f'{name}/{variant}']:.3f}", flush=True)
        for variant, _, _ in variants[1:]:  # teacher-forced: the same greedy choice as the exact variant's
            same = sum(a == b for a, b in zip(choices["exact"], choices[variant]))
            result.setdefault("argmax_agreement_percent", {})[f"{name}/{variant}"] = 100 * same / len(choices[variant])
    text = DOCS["persuasion"].read_text(encoding="utf-8")
    prompt = torch.tensor([tok(text[20000:40000], add_special_tokens=False).input_ids[:600]])
    greedy = {}
    for variant, on, compact in variants:
        use(on, compact)
        greedy[variant] = generate_ids(model, prompt, max_new_tokens=200, eos_token_id=[])[0, 600:].tolist()
    result["greedy_first_difference"], result["greedy_equal_tokens"] = {}, {}
    for variant, _, _ in variants[1:]:
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
