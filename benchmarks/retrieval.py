"""Retrieval beyond the window: HMT beside the equal-memory baselines, offline, on prompts generated here.

    python benchmarks/retrieval.py --model default --lengths 1024 8192 32768 65536 --depths 0 0.5 1 \
        --samples 2 --out runs/retrieval

Tasks (``hmt_runtime.training.retrieval``, ``split="valid"``: phrasings, fillers, names and values that training never
sees): ``passkey`` (a key in repeated filler), ``needle`` (a fact sentence in the validation prose: Persuasion and
the Bash Reference Manual), ``facts`` (bAbI-style moves scattered through that prose; the answer is the asked
person's latest place).  A sample is answered when greedy decoding after the prompt gives the answer's tokens.

Methods, each at the memory it needs:
- ``hmt``: the model through the plain API (``hmt_runtime.generate``, greedy): KV of W positions, N memories.
- ``hmt-no-recall``: the same weights, segment n reads M_{n-1} (teacher-forced, the answer's logits).
- ``rmt``: the same parameters as an RMT (no sensory tokens, no recall; ``evaluate.rmt_view``).
- ``sliding``: the backbone alone on the last W tokens (the most a sliding window of W ever sees).
- ``streaming``: the backbone alone on 4 attention sinks + the last W - 4 tokens, positions as in StreamingLLM.
- ``full``: the backbone alone with the whole prompt in context, up to its 8,192 positions ("n/a" beyond).
- ``replay-hit``: no backbone work: whether the slots HMT replays at the end of the prompt (docs/spec.md "Replay at
  the end of a prompt") hold the answer's ids, i.e. whether memory handed the reader the text to answer from
  ("n/a" without replay).  Beside ``hmt`` it separates what memory retrieved from what the backbone then read.
The teacher-forced methods score the answer's tokens by argmax of the logits before each: the same test as
greedy decoding of the answer's length.

Also the paper's context switching (``--switch-tokens``): two validation documents alternating every segment,
whole-stream perplexity of HMT with recall and without (``hmt_runtime.training.evaluate``'s ``hmt`` and
``hmt-no-recall`` streams).

Writes ``results.json``, ``report.md`` (accuracy per task, method and length, and per length x depth for HMT)
and ``heatmap_<task>.png`` (accuracy of HMT per length and depth, the needle-in-a-haystack picture).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hmt_runtime import HMTModel, generate  # noqa: E402
from hmt_runtime.training import evaluate  # noqa: E402
from hmt_runtime.training import retrieval  # noqa: E402
from hmt_runtime.training.data import tokenize_files  # noqa: E402

METHODS = ("hmt", "hmt-no-recall", "rmt", "sliding", "streaming", "full", "replay-hit")
VALID_PROSE = (ROOT / "data" / "austen" / "persuasion.txt", ROOT / "data" / "corpus" / "valid" / "technical")
FULL_LIMIT = 8192
SINKS = 4


def _teacher_forced(model: HMTModel, sample, use_recall: bool) -> torch.Tensor:
    """The answer's logits (A, V) from the teacher-forced forward (the LM head only where the answer is read)."""
    ids = sample.ids[None].to(model.device)
    first, count = sample.prompt_end - 1, sample.answer_ids.numel()
    pieces = []
    for start, hidden, _ in model.iter_segments(ids, use_recall=use_recall,
                                                prompt_end=torch.tensor([sample.prompt_end])):
        lo, hi = max(first, start), min(first + count, start + hidden.shape[1])
        if lo < hi:
            pieces.append(evaluate._logits(model, hidden[:, lo - start : hi - start])[0])
    return torch.cat(pieces)


def _backbone(model: HMTModel, ids: torch.Tensor, answer: int) -> torch.Tensor:
    """Backbone alone (adapter off) on ``ids`` (L,) with positions 0..L-1: the last ``answer`` + 1 positions'
    logits but the very last, i.e. those predicting the answer."""
    with evaluate._adapter(model.backbone, False):
        logits = evaluate._backbone_logits(model, ids[None].to(model.device))
    return logits[-answer - 1 : -1]


def replayed_ids(model: HMTModel, sample) -> torch.Tensor | None:
    """The ids the segment in which ``sample``'s prompt ends replays (None: no replay, or no slot written yet):
    the slots are the windows (sensory + segment ids) of the segments before it, the newest N, as the forward and
    the scheduler keep them."""
    cfg = model.config
    ls, k, end = cfg.segment_tokens, cfg.sensory_tokens, sample.prompt_end
    written = end // ls  # segments closed before the prompt's segment
    if not cfg.replay or written == 0:
        return None
    ids = sample.ids
    slots = [ids[max(0, m * ls - k) : (m + 1) * ls] for m in range(max(0, written - cfg.memory_slots), written)]
    picks = model.replay_choice(ids[max(0, end - cfg.summary_tokens) : end], slots)
    return torch.cat([slots[i] for i in picks])


def _holds(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    return any(torch.equal(haystack[i : i + needle.numel()], needle)
               for i in range(haystack.numel() - needle.numel() + 1))


def score(model: HMTModel, method: str, sample, rmt: HMTModel | None = None) -> bool | None:
    """Whether ``method`` answers ``sample`` (None: the method cannot read a prompt this long)."""
    window, answer = model.config.window, sample.answer_ids.numel()
    ids = sample.ids
    if method == "replay-hit":
        replayed = replayed_ids(model, sample)
        return None if replayed is None else _holds(replayed, sample.answer_ids)
    with torch.no_grad():
        if method == "hmt":
            prompt = ids[: sample.prompt_end].tolist()
            out = generate(model, [prompt], max_new_tokens=answer)[0][len(prompt):]
            return out == sample.answer_ids.tolist()
        if method == "hmt-no-recall":
            return retrieval.answered(_teacher_forced(model, sample, use_recall=False), sample)
        if method == "rmt":
            return retrieval.answered(_teacher_forced(rmt, sample, use_recall=False), sample)
        if method == "sliding":
            return retrieval.answered(_backbone(model, ids[-window:], answer), sample)
        if method == "streaming":
            view = ids if ids.numel() <= window else torch.cat([ids[:SINKS], ids[-(window - SINKS):]])
            return retrieval.answered(_backbone(model, view, answer), sample)
        if method == "full":
            if ids.numel() > FULL_LIMIT:
                return None
            return retrieval.answered(_backbone(model, ids, answer), sample)
    raise ValueError(f"method={method!r}: expected one of {METHODS}")


def context_switching(model: HMTModel, docs: list[torch.Tensor], tokens: int) -> dict:
    """Two documents alternating every segment: whole-stream perplexity with and without recall."""
    ls = model.config.segment_tokens
    a, b = docs[0], docs[1]
    pieces = []
    for i in range(0, tokens, 2 * ls):
        n = i // 2
        pieces += [a[n : n + ls], b[n : n + ls]]
    stream = torch.cat(pieces)[:tokens]
    out = {}
    with torch.no_grad():
        for name, use_recall in (("recall", True), ("no_recall", False)):
            nll = evaluate._hmt_nll(model, stream, use_recall)
            out[name] = math.exp(nll / (stream.numel() - 1))
    out["gain"] = 1 - out["recall"] / out["no_recall"]
    out["tokens"] = int(stream.numel())
    return out


def run(model: HMTModel, tasks, lengths, depths, samples: int, methods, seed: int = 0, log=print) -> dict:
    prose = tokenize_files([str(p) for p in VALID_PROSE], model.tokenizer)
    rmt = evaluate.rmt_view(model) if "rmt" in methods else None
    results = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for i in range(samples):
                    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{i}")
                    sample = retrieval.build(model.tokenizer, task, length, depth, rng, "valid", prose,
                                             gap=model.config.window)
                    row = {"task": task, "length": length, "depth": depth, "sample": i}
                    for method in methods:
                        started = time.perf_counter()
                        row[method] = score(model, method, sample, rmt)
                        row[method + "_s"] = round(time.perf_counter() - started, 2)
                    results.append(row)
                    log(json.dumps(row))
    return {"rows": results}


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    return "n/a" if not values else f"{100 * sum(values) / len(values):.0f}%"


def report(result: dict, model: HMTModel, methods, out: Path) -> str:
    cfg = model.config
    rows = result["rows"]
    lines = [f"Retrieval (`split=valid` phrasings). HMT: W = {cfg.window}, k = {cfg.sensory_tokens}, "
             f"N = {cfg.memory_slots}, j = {cfg.summary_tokens}, recall {cfg.recall!r}, prompt_recall "
             f"{cfg.prompt_recall}; backbone positions per token {(cfg.window + cfg.summary_tokens + 2) / cfg.segment_tokens:.2f}"
             + (f"; replay {cfg.replay} slot(s) at the end of a prompt (+{cfg.replay * cfg.slot_tokens} positions "
                f"once per prompt, KV cache of {cfg.kv_window} positions)" if cfg.replay else "")
             + f". Sliding / StreamingLLM: W = {cfg.window} positions; full: up to {FULL_LIMIT}.", ""]
    lengths = sorted({r["length"] for r in rows})
    for task in sorted({r["task"] for r in rows}):
        lines += [f"### {task}", "", "| method | " + " | ".join(f"{n:,}" for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for method in methods:
            cells = [_mean([r.get(method) for r in rows if r["task"] == task and r["length"] == n]) for n in lengths]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        depths = sorted({r["depth"] for r in rows if r["task"] == task})
        if "hmt" not in methods:
            lines.append("")
            continue
        lines += ["", f"HMT per depth (rows) and length (columns), {task}:", "",
                  "| depth | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for depth in depths:
            cells = [_mean([r.get("hmt") for r in rows if r["task"] == task and r["length"] == n and r["depth"] == depth])
                     for n in lengths]
            lines.append(f"| {depth:g} | " + " | ".join(cells) + " |")
        lines.append("")
        _heatmap(rows, task, lengths, depths, out / f"heatmap_{task}.png")
    if "switching" in result:
        s = result["switching"]
        lines += ["### context switching", "",
                  f"Persuasion and the Bash manual alternating every segment, {s['tokens']:,} tokens: perplexity "
                  f"with recall {s['recall']:.2f}, without {s['no_recall']:.2f} ({100 * s['gain']:+.1f}% better "
                  "with recall).", ""]
    return "\n".join(lines)


def _heatmap(rows, task, lengths, depths, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.full((len(depths), len(lengths)), float("nan"))
    for i, depth in enumerate(depths):
        for j, n in enumerate(lengths):
            values = [r["hmt"] for r in rows if r["task"] == task and r["length"] == n and r["depth"] == depth
                      and r.get("hmt") is not None]
            if values:
                grid[i, j] = sum(values) / len(values)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.5 * len(depths)))
    image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"HMT retrieval: {task}")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or an HMT checkpoint folder")
    parser.add_argument("--tasks", nargs="+", choices=retrieval.TASKS, default=list(retrieval.TASKS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 8192, 32768, 65536])
    parser.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--samples", type=int, default=2, help="samples per (task, length, depth)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--switch-tokens", type=int, default=8192, help="context-switching stream (0 = skip)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", type=int, default=None, metavar="R",
                        help="slots replayed at the end of a prompt (default: the checkpoint's own; 0: off)")
    parser.add_argument("--out", required=True, help="folder for results.json, report.md and the heat maps")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                        help="run nothing: merge the results.json of these earlier runs (of one model) into one "
                             "report and heat map per task")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = HMTModel.from_pretrained(args.model, replay=args.replay)
    if args.merge:
        parts = [json.loads((Path(d) / "results.json").read_text()) for d in args.merge]
        result = {"rows": [row for part in parts for row in part["rows"]],
                  "merged": [str(d) for d in args.merge], "config": parts[0].get("config")}
        switching = [part["switching"] for part in parts if "switching" in part]
        if switching:
            result["switching"] = switching[0]
        methods = [m for m in METHODS if any(m in row for row in result["rows"])]
        (out / "results.json").write_text(json.dumps(result, indent=1))
        text = report(result, model, methods, out)
        (out / "report.md").write_text(text + "\n")
        print(text)
        return 0
    started = time.perf_counter()
    result = run(model, args.tasks, args.lengths, args.depths, args.samples, args.methods, args.seed)
    if args.switch_tokens:
        docs = tokenize_files([str(p) for p in VALID_PROSE], model.tokenizer)
        result["switching"] = context_switching(model, docs, args.switch_tokens)
    result["config"] = {**model.config.to_dict(), "model": args.model, "seconds": round(time.perf_counter() - started)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    text = report(result, model, args.methods, out)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
