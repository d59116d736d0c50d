"""Perplexity of HMT and of its baselines on text (spec "Training": whole-document and last-segment figures).

Whole-document perplexity scores every token of a document but the first, each exactly once, while streaming;
all methods score the same tokens, so their figures compare directly.  A method that cuts the text into pieces
scores the first token of a piece with the last position of the previous piece (as HMT does across segments).

Methods (``METHODS``):
- ``hmt``: the HMT model, every segment with memory (``iter_segments`` under no_grad, one segment at a time).
- ``hmt-no-recall``: the same model, memory input of segment n = M_{n-1} (training stage 1).
- ``rmt``: the same parameters as an RMT: one memory token carried from segment to segment, no sensory tokens,
  no recall (``sensory_tokens=0``, ``use_recall=False``, the same window W, so Ls grows by k).
- ``windows``: the backbone alone on non-overlapping windows of W tokens.
- ``sliding``: the backbone alone on windows of W tokens moved by W/4; each window scores only its new tokens.
- ``streaming``: the backbone alone with a rolling KV cache of W positions whose first 4 are kept (attention
  sinks, StreamingLLM): every token sees the 4 sinks and its W - 4 most recent positions (itself included).
  Positions are those inside the cache, as StreamingLLM assigns them: a query at cache position
  ``c = min(t, W - 1)``, a recent key ``t - u`` positions before it, the sinks at 0..3.  Keys are cached
  un-rotated and RoPE is applied at attention time, so each score sees exactly the cache distances; chunks of
  tokens run at once with a mask that gives every query exactly that view (``streaming_nll``, on the lean
  engine's layers, ``LlamaEngine.run_layers``, with this attention in place of the engine's).
- ``full``: the backbone alone with all earlier tokens in context, in chunks of its position limit.
- ``adapted-windows``: like ``windows`` with the model's LoRA adapter on (only for models with an adapter:
  separates what the adapter learnt about the text from what memory adds).  The other backbone methods run the
  backbone with any adapter off.

The paper's last-segment perplexity (``last_segment_ppl``) is the mean over non-overlapping windows of S
segments of each window's perplexity on its last segment, every window read from an empty memory; for the
backbone-only ``windows`` method the matching figure is the mean over W-token windows of their perplexity.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core import backbones
from ..core.config import HMTConfig
from .data import as_documents, tokenize_files
from ..model.hmt import HMTModel

METHODS = ("hmt", "hmt-no-recall", "rmt", "windows", "sliding", "streaming", "full", "adapted-windows")
SINKS = 4  # attention-sink positions kept by the ``streaming`` method (StreamingLLM)
HMT_METHODS = ("hmt", "hmt-no-recall", "rmt")


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (L, V), targets (L,) -> per-token negative log-likelihood (L,) in float64."""
    return F.cross_entropy(logits.double(), targets, reduction="none")


def _score(doc: torch.Tensor, scored: torch.Tensor, logits: torch.Tensor, first_target: int) -> float:
    """NLL sum of logits (L, V) against doc[first_target : first_target + L], marking those tokens scored."""
    end = min(first_target + logits.shape[0], doc.numel())
    if end <= first_target:
        return 0.0
    if bool(scored[first_target:end].any()):
        raise AssertionError(f"token {first_target} scored twice")  # a bug in a method, never user input
    scored[first_target:end] = True
    targets = doc[first_target:end].to(logits.device)
    return float(_token_nll(logits[: end - first_target], targets).sum())


def _logits(model: HMTModel, hidden: torch.Tensor) -> torch.Tensor:
    """LM head at the weights' precision (float32 or float64) whatever the autocast: hidden (B, L, d) ->
    logits (B, L, V)."""
    if model.dtype not in (torch.float32, torch.float64):
        return model.lm_logits(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return model.lm_logits(hidden.to(model.dtype))


def _backbone_logits(model: HMTModel, ids: torch.Tensor) -> torch.Tensor:
    """ids (1, L) -> logits (L, V) of the backbone alone (positions 0..L-1)."""
    body = backbones.decoder_body(model.backbone)
    hidden = body(input_ids=ids, **backbones.cache_kwargs(body, None)).last_hidden_state
    return _logits(model, hidden)[0]


def _chunked_nll(model: HMTModel, doc: torch.Tensor, chunk: int) -> tuple[float, list[float]]:
    """Non-overlapping chunks of ``chunk`` tokens; the last logit of a chunk scores the next chunk's first token.
    Returns (NLL sum over tokens 1..S-1, per-chunk perplexity over the chunk's own tokens)."""
    scored = torch.zeros(doc.numel(), dtype=torch.bool)
    total, per_chunk = 0.0, []
    device = model.device
    for start in range(0, doc.numel(), chunk):
        logits = _backbone_logits(model, doc[None, start : start + chunk].to(device))
        inside = _score(doc, scored, logits[:-1], start + 1)
        total += inside
        if logits.shape[0] > 1:
            per_chunk.append(math.exp(inside / (logits.shape[0] - 1)))
        total += _score(doc, scored, logits[-1:], start + logits.shape[0])
    assert bool(scored[1:].all())
    return total, per_chunk


def _sliding_nll(model: HMTModel, doc: torch.Tensor, window: int, stride: int) -> float:
    """Windows of ``window`` tokens ending every ``stride`` tokens; each scores only tokens not scored before."""
    scored = torch.zeros(doc.numel(), dtype=torch.bool)
    total, done = 0.0, 1  # token 0 is never scored
    device = model.device
    end = min(window, doc.numel())
    while True:
        start = max(0, end - window)
        logits = _backbone_logits(model, doc[None, start:end].to(device))
        # logits[t] predicts token start + t + 1; the new tokens are done .. end - 1
        total += _score(doc, scored, logits[done - start - 1 : end - start - 1], done)
        done = end
        if end >= doc.numel():
            break
        end = min(end + stride, doc.numel())
    assert bool(scored[1:].all())
    return total


def streaming_engine(backbone, window: int):
    """The lean engine's layers (``incremental.engines.LlamaEngine``) over ``backbone``, for StreamingLLM's
    attention; a clear error for a backbone they cannot run."""
    from ..incremental.engines import LlamaEngine, lean_unsupported_reason

    reason = lean_unsupported_reason(backbone, window)
    if reason is not None:
        inner = backbones.unwrap(backbone)
        raise ValueError(f"method 'streaming': needs a Llama-family backbone (Llama, Mistral, Qwen2: rotary "
                         f"positions, q/k/v/o projections); got {type(inner).__name__}: {reason}")
    return LlamaEngine(backbone, kv_rows=1, window=window)


def streaming_nll(backbone, lm_logits, doc: torch.Tensor, window: int, sinks: int = SINKS,
                  chunk: int | None = None) -> tuple[float, torch.Tensor]:
    """The backbone with a rolling KV cache of ``window`` positions, the first ``sinks`` kept (StreamingLLM).

    doc (S,) token ids; lm_logits: hidden (1, L, d) -> logits (1, L, V).  Token t attends to positions
    0..sinks-1 and to t - (window - sinks - 1) .. t; scores use the cache positions (query at
    min(t, window - 1), recent key u at min(t, window - 1) - (t - u), sink s at s).  Keys are kept un-rotated
    (at most ``window - sinks - 1`` recent ones plus the sinks, per layer) and rotated at attention time.
    ``chunk`` tokens run per pass (default ``window``).  Returns (NLL sum of tokens 1..S-1, per-token NLL (S-1,)).
    """
    if window <= sinks:
        raise ValueError(f"window={window}: expected more than the {sinks} sink positions")
    engine = streaming_engine(backbone, window)
    body = backbones.decoder_body(backbone)
    chunk = chunk or window
    keep = window - sinks - 1  # recent keys a new token needs from before it
    device = doc.device
    cache_k = [None] * engine.n_layers  # un-rotated keys (1, Hkv, P, D) of cached positions
    cache_v = [None] * engine.n_layers
    cache_pos = torch.zeros(0, dtype=torch.long, device=device)  # document index of each cached position
    nll = []
    for a in range(0, doc.numel(), chunk):
        ids = doc[None, a : a + chunk]
        q_pos = torch.arange(a, a + ids.shape[1], device=device)
        k_pos = torch.cat([cache_pos, q_pos])
        # visible: causal, and either a sink or one of the window - sinks most recent positions
        visible = (k_pos[None] <= q_pos[:, None]) & (
            (k_pos[None] < sinks) | (k_pos[None] >= q_pos[:, None] - keep))
        is_sink = (k_pos < sinks)[None].expand_as(visible)
        held = (k_pos < sinks) | (k_pos > int(q_pos[-1]) - keep)  # what the next chunk keeps
        # rotary tables: recent scores need only distances t - u (rotate at document index, relative to a);
        # sink scores need c(t) - s, c(t) = min(t, window - 1) the query's cache position
        base = int(k_pos[0])
        q_rot, k_rot = engine.rope(q_pos - base), engine.rope(k_pos - base)
        c_rot, s_rot = engine.rope(q_pos.clamp(max=window - 1)), engine.rope(k_pos.clamp(max=sinks - 1))

        def attend(i, q, k, v):
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, H, L, D)
            keys = k if cache_k[i] is None else torch.cat([cache_k[i], k], dim=2)
            values = v if cache_v[i] is None else torch.cat([cache_v[i], v], dim=2)
            group = engine.group
            recent = engine.rotate(q, *q_rot) @ engine.rotate(keys, *k_rot).repeat_interleave(group, 1).transpose(-1, -2)
            sink = engine.rotate(q, *c_rot) @ engine.rotate(keys, *s_rot).repeat_interleave(group, 1).transpose(-1, -2)
            scores = torch.where(is_sink[None, None], sink, recent) * engine.scale
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            scores = scores.masked_fill(~visible[None, None], float("-inf"))
            values_g = values.repeat_interleave(group, dim=1)
            out = torch.softmax(scores, dim=-1).to(values_g.dtype) @ values_g
            cache_k[i], cache_v[i] = keys[:, :, held], values[:, :, held]
            return out.transpose(1, 2)

        hidden = engine.run_layers(body.embed_tokens(ids), attend)
        cache_pos = k_pos[held]
        logits = lm_logits(hidden)[0]
        targets = doc[a + 1 : a + 1 + ids.shape[1]]
        nll.append(_token_nll(logits[: targets.numel()], targets))
    per_token = torch.cat(nll)
    return float(per_token.sum()), per_token


def _hmt_nll(model: HMTModel, doc: torch.Tensor, use_recall: bool) -> float:
    """Every segment with memory, streamed: the NLL sum of tokens 1..S-1."""
    scored = torch.zeros(doc.numel(), dtype=torch.bool)
    total = 0.0
    for start, hidden, _ in model.iter_segments(doc[None].to(model.device), use_recall=use_recall):
        logits = _logits(model, hidden)[0]
        total += _score(doc, scored, logits, start + 1)
    assert bool(scored[1:].all())
    return total


def _hmt_last_segment(model: HMTModel, doc: torch.Tensor, segments: int, use_recall: bool) -> list[float]:
    """Per-window perplexity of the last segment over non-overlapping windows of ``segments`` segments."""
    length = segments * model.config.segment_tokens
    out = []
    for start in range(0, doc.numel() - length + 1, length):
        ids = doc[None, start : start + length].to(model.device)
        last = None
        for seg_start, hidden, _ in model.iter_segments(ids, use_recall=use_recall):
            last = (seg_start, hidden)
        logits = _logits(model, last[1])[0, :-1]
        targets = ids[0, last[0] + 1 :]
        out.append(math.exp(float(_token_nll(logits, targets).mean())))
    return out


def rmt_view(model: HMTModel) -> HMTModel:
    """The RMT ablation of ``model``: same backbone and parameters, no sensory tokens, the same window W."""
    cfg = model.config
    rmt_cfg = HMTConfig.from_window(cfg.window, sensory_tokens=0, memory_slots=cfg.memory_slots,
                                    recall_dim=cfg.recall_dim, recall=cfg.recall, kernels=cfg.kernels,
                                    recall_scale=cfg.recall_scale)
    rmt = HMTModel(model.backbone, rmt_cfg, tokenizer=model.tokenizer)
    with torch.no_grad():
        for name, value in rmt.hmt_state_dict().items():
            value.copy_(model.hmt_state_dict()[name])
    return rmt.eval()


@contextlib.contextmanager
def _adapter(backbone, enabled: bool):
    if hasattr(backbone, "disable_adapter") and not enabled:
        with backbone.disable_adapter():
            yield
    else:
        yield


def evaluate(model: HMTModel, corpus, methods=None, segments: int = 4, sliding_stride: int | None = None,
             full_context: int | None = None, precision: str = "fp32", progress: bool = False) -> dict:
    """Perplexities of ``methods`` (default: all that apply) on ``corpus`` (list of 1-D token-id tensors).

    segments: S of the last-segment perplexity.  sliding_stride: default W // 4.  full_context: chunk of the
    ``full`` method, default the backbone's ``max_position_embeddings``.  precision: "fp32", or "bf16" (the
    backbone passes under bf16 autocast, the LM head and the log-likelihoods in float32).  Returns
    ``{"tokens": scored tokens, "documents": n, "window": W, "segments": S, "methods": {name: {"ppl",
    "nll", "last_segment_ppl" (or None), "seconds"}}}``; ppl = exp(sum NLL / scored tokens).
    """
    docs = as_documents(corpus)
    if any(doc.numel() < 2 for doc in docs):
        raise ValueError("corpus: every document needs at least 2 tokens (the first one is never scored)")
    has_adapter = hasattr(model.backbone, "peft_config")
    if methods is None:
        methods = [m for m in METHODS if m != "adapted-windows" or has_adapter]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; expected some of {METHODS}")
        if m == "adapted-windows" and not has_adapter:
            raise ValueError("methods: 'adapted-windows' needs a model with a LoRA adapter")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: expected 'fp32' or 'bf16'")
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments={segments!r}: expected an integer >= 1")
    window = model.config.window
    stride = sliding_stride or max(1, window // 4)
    inner = backbones.unwrap(model.backbone)
    limit = full_context or getattr(inner.config, "max_position_embeddings", None) or getattr(inner.config, "n_positions")
    n_tokens = sum(doc.numel() - 1 for doc in docs)
    result = {"tokens": n_tokens, "documents": len(docs), "window": window, "segments": segments,
              "segment_tokens": model.config.segment_tokens, "sliding_stride": stride, "full_context": limit,
              "precision": precision, "methods": {}}
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(methods) * len(docs), unit="doc", desc="hmt eval", leave=False)
    try:
        autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.no_grad(), autocast:
            for method in methods:
                started = time.perf_counter()
                nll, last = 0.0, []
                runner = rmt_view(model) if method == "rmt" else model
                for doc in docs:
                    if method in HMT_METHODS:
                        recall = method == "hmt"
                        nll += _hmt_nll(runner, doc, recall)
                        last += _hmt_last_segment(runner, doc, segments, recall)
                    else:
                        with _adapter(model.backbone, method == "adapted-windows"):
                            if method in ("windows", "adapted-windows"):
                                part, per_window = _chunked_nll(model, doc, window)
                                nll += part
                                last += per_window
                            elif method == "sliding":
                                nll += _sliding_nll(model, doc, window, stride)
                            elif method == "streaming":
                                nll += streaming_nll(model.backbone, lambda h: _logits(model, h),
                                                     doc.to(model.device), window)[0]
                            else:
                                nll += _chunked_nll(model, doc, limit)[0]
                    if bar is not None:
                        bar.update(1)
                result["methods"][method] = {
                    "ppl": math.exp(nll / n_tokens),
                    "nll": nll,
                    "last_segment_ppl": sum(last) / len(last) if last else None,
                    "seconds": round(time.perf_counter() - started, 2),
                }
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return result


def describe_method(name: str, result: dict) -> str:
    """A one-line label of ``name`` with the sizes used in ``result``."""
    w = result["window"]
    return {
        "hmt": f"HMT, window {w} (memory, sensory, recall)",
        "hmt-no-recall": f"HMT without recall, window {w}",
        "rmt": f"RMT ablation, window {w} (memory token only)",
        "windows": f"backbone, non-overlapping windows of {w}",
        "sliding": f"backbone, sliding window {w}, stride {result['sliding_stride']}",
        "streaming": f"backbone, rolling KV cache of {w} with {SINKS} attention sinks (StreamingLLM)",
        "full": f"backbone, full context (chunks of {result['full_context']})",
        "adapted-windows": f"backbone + LoRA adapter, windows of {w}",
    }[name]


def format_table(result: dict) -> str:
    """A Markdown table of ``evaluate``'s result."""
    lines = [
        f"{result['tokens']} scored tokens in {result['documents']} document(s); W = {result['window']}, "
        f"Ls = {result['segment_tokens']}, last-segment windows of S = {result['segments']} segments; "
        f"{result['precision']}",
        "",
        "| method | whole-document ppl | last-segment ppl | seconds |",
        "|---|---:|---:|---:|",
    ]
    for name, row in result["methods"].items():
        last = f"{row['last_segment_ppl']:.2f}" if row["last_segment_ppl"] is not None else "-"
        lines.append(f"| {describe_method(name, result)} | {row['ppl']:.2f} | {last} | {row['seconds']:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- command line
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", help="text files or folders (*.txt, *.md, *.text, searched recursively)")
    parser.add_argument("--model", default="default", help="HMT checkpoint folder or 'default' (default %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="what to measure (default: all that apply)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of each file")
    parser.add_argument("--segments", type=int, default=4, help="S of the last-segment perplexity (default 4)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: backbone passes under bf16 autocast (much faster on CPUs with AMX)")
    parser.add_argument("--kernels", default=None, help="HMT kernels backend (auto, torch, triton, native)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run_from_args(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens={args.max_tokens}: expected at least 2")
    kernels = args.kernels
    if kernels is None and args.precision == "bf16":
        kernels = "torch"  # the reference ops follow autocast; the fused kernels expect one dtype
    model = HMTModel.from_pretrained(args.model, kernels=kernels, weights="fp32")
    docs = tokenize_files(args.data, model.tokenizer)
    if args.max_tokens:
        docs = [doc[: args.max_tokens] for doc in docs]
    result = evaluate(model, docs, methods=args.methods, segments=args.segments,
                      precision=args.precision, progress=args.progress)
    result["model"] = str(args.model)
    result["data"] = [str(p) for p in args.data]
    result["max_tokens"] = args.max_tokens
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``hmt eval`` on an argparse subparsers object."""
    parser = subparsers.add_parser("eval", help="perplexity of HMT and its baselines on text",
                                   description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    parser.set_defaults(func=run_from_args)
    return parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmt_runtime.evaluate", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
