"""Why does (or doesn't) recall matter?  Measurements of one HMT model on one text (docs/training.md).

    python -m hmt_runtime.diagnose data/austen/persuasion.txt --other data/austen/emma.txt --max-tokens 4096

Reports, on the text's segments streamed one at a time (causal recall):
- the recall weights: their entropy over the valid memory slots against the uniform distribution's log(n),
  the largest weight, and the spread of the raw scores (S W_q)(C W_k)^T / sqrt(d_h) (/ d_h: recall_scale "linear");
- the memory embeddings: their norm against the token embeddings' norm, the mean cosine similarity of the
  memories of different segments, and how close the recalled P is to the newest memory M_{n-1};
- whole-text perplexity with recall, without recall (P = M_{n-1}), with the recall weights replaced by the
  uniform mean of the cache, with each segment's cache filled with the memories of another document, and with
  P replaced by M_init (no memory content at all);
- the gradient norms of one training step (``LastSegmentLoss`` on a window of ``--grad-segments`` segments)
  reaching W_q, W_k, T, M_init, the LoRA adapter, and the memories of the unrolled segments.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys

import torch
import torch.nn.functional as F

from .data import tokenize_files
from ..model.hmt import HMTModel

VARIANTS = ("recall", "no-recall", "uniform", "foreign", "init-only")


def _logits(model: HMTModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head over hidden states, in float32 at least (bf16 / fp16 states are widened)."""
    return model.lm_logits(hidden.float() if hidden.dtype in (torch.bfloat16, torch.float16) else hidden)


def _stream(model: HMTModel, ids: torch.Tensor, variant: str, foreign: list[torch.Tensor] | None = None,
            stats: dict | None = None) -> float:
    """NLL sum of ids (1, S) tokens 1..S-1 with the memory input chosen by ``variant``; fills ``stats``.

    The model's own segment loop (``HMTModel.iter_segments``) runs every variant: "no-recall" is its stage-1
    mode, the others replace its recall through ``recall_hook``."""
    scale = model.recall_scale  # None: 1 / sqrt(d_h)

    def hook(summary, cache, keys):
        if variant == "init-only":
            return model.memory_init.expand(cache.shape[0], -1)
        if variant == "foreign":
            cache = torch.stack(foreign[: cache.shape[1]], dim=1)
            keys = model.recall.w_k(cache)
        scores = torch.einsum("bh,bnh->bn", model.recall.w_q(summary), keys)
        scores = scores / math.sqrt(keys.shape[-1]) if scale is None else scores * scale
        weights = torch.softmax(scores.float(), dim=-1)
        if variant == "uniform":
            weights = torch.full_like(weights, 1.0 / weights.shape[1])
        recalled = torch.einsum("bn,bnd->bd", weights.to(cache.dtype), cache)
        if stats is not None and variant == "recall" and cache.shape[1] > 1:
            p = weights[0].double()
            stats.setdefault("entropy", []).append(float(-(p * p.clamp_min(1e-30).log()).sum()))
            stats.setdefault("log_n", []).append(math.log(p.numel()))
            stats.setdefault("max_weight", []).append(float(p.max()))
            stats.setdefault("score_std", []).append(float(scores.float().std()))
            stats.setdefault("p_vs_newest_cos", []).append(
                float(F.cosine_similarity(recalled.float(), cache[:, -1].float())[0]))
        return recalled

    total = 0.0
    memories = []
    segments = model.iter_segments(ids, use_recall=variant != "no-recall",
                                   recall_hook=None if variant == "no-recall" else hook)
    for start, hidden, memory in segments:
        logits = _logits(model, hidden)[0]
        targets = ids[0, start + 1 : start + 1 + hidden.shape[1]]
        total += float(F.cross_entropy(logits[: targets.numel()].double(), targets, reduction="sum"))
        memories.append(memory)
    if stats is not None and variant == "recall":
        stats["memories"] = torch.cat(memories).float()
    return total


def _memory_stats(model: HMTModel, memories: torch.Tensor) -> dict:
    """memories (n, d) -> norms and pairwise cosine similarity of different segments' memories."""
    emb = model.embed(torch.arange(0, 4096, device=model.device)[None])[0].float()
    unit = F.normalize(memories, dim=-1)
    cos = unit @ unit.T
    off = cos[~torch.eye(cos.shape[0], dtype=torch.bool)]
    centred = F.normalize(memories - memories.mean(0, keepdim=True), dim=-1)
    ccos = (centred @ centred.T)[~torch.eye(cos.shape[0], dtype=torch.bool)]
    return {
        "memory_norm_mean": float(memories.norm(dim=-1).mean()),
        "token_embedding_norm_mean": float(emb.norm(dim=-1).mean()),
        "memory_init_norm": float(model.memory_init.float().norm()),
        "memory_pairwise_cos_mean": float(off.mean()),
        "memory_pairwise_cos_min": float(off.min()),
        "memory_centred_cos_mean": float(ccos.mean()),
        "memory_centred_norm_ratio": float((memories - memories.mean(0)).norm(dim=-1).mean()
                                           / memories.norm(dim=-1).mean()),
    }


def gradient_norms(model: HMTModel, ids: torch.Tensor) -> dict:
    """Gradient norms of one last-segment training loss on ids (B, S) with recall on."""
    from .objective import LastSegmentLoss

    memories = []
    original = model.iter_segments

    def recording(input_ids, use_recall=True):
        for start, hidden, memory in original(input_ids, use_recall=use_recall):
            memory.retain_grad()
            memories.append(memory)
            yield start, hidden, memory

    model.iter_segments = recording
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = LastSegmentLoss(model)(ids, True)
            loss.backward()
    finally:
        del model.iter_segments
    out = {"loss": float(loss)}
    for name, param in (("w_q", model.recall.w_q.weight), ("w_k", model.recall.w_k.weight),
                        ("summary_prompt", model.summary_prompt), ("memory_init", model.memory_init)):
        out[f"grad_{name}"] = float(param.grad.norm()) if param.grad is not None else 0.0
        out[f"param_{name}"] = float(param.detach().norm())
    lora = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    out["grad_lora"] = float(torch.stack([g.norm() for g in lora]).norm()) if lora else 0.0
    out["grad_memories"] = [float(m.grad.norm()) if m.grad is not None else 0.0 for m in memories]
    model.zero_grad(set_to_none=True)
    return out


def diagnose(model: HMTModel, ids: torch.Tensor, other: torch.Tensor, grad_segments: int = 4) -> dict:
    """All measurements on ids (1, S) with the foreign memories taken from other (1, S')."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    result: dict = {"tokens": int(ids.shape[1] - 1), "segments": math.ceil(ids.shape[1] / model.config.segment_tokens)}
    with torch.no_grad():
        stats: dict = {}
        foreign_stats: dict = {}
        _stream(model, other, "recall", stats=foreign_stats)
        foreign = [m[None] for m in foreign_stats["memories"].to(model.dtype)]
        for variant in VARIANTS:
            nll = _stream(model, ids, variant, foreign=foreign, stats=stats)
            result[f"ppl_{variant}"] = math.exp(nll / (ids.shape[1] - 1))
        result.update(_memory_stats(model, stats.pop("memories")))
        for key, values in stats.items():
            result[f"{key}_mean"] = sum(values) / len(values)
        result["entropy_over_log_n"] = sum(e / l for e, l in zip(stats["entropy"], stats["log_n"])) / len(stats["entropy"])
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("summary_prompt", "memory_init", "memory_gain", "recall")) or "lora_" in name)
    length = grad_segments * model.config.segment_tokens
    result["gradients"] = gradient_norms(model, ids[:, :length])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmt_runtime.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="the text to measure on")
    parser.add_argument("--other", required=True, help="another document (its memories replace this one's)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--grad-segments", type=int, default=4)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = HMTModel.from_pretrained(args.model, kernels="torch", weights="fp32")
    ids = tokenize_files([args.data], model.tokenizer)[0][None, : args.max_tokens]
    other = tokenize_files([args.other], model.tokenizer)[0][None, : args.max_tokens]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        result = diagnose(model, ids, other, args.grad_segments)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


@torch.no_grad()
def memory_probe(model: HMTModel, samples: int = 400, seed: int = 0, steps: int = 300) -> dict:
    """Does a memory embedding hold what its segment read?  Pass-key prompts of one segment (``retrieval``,
    validation phrasings, keys of digits, the key anywhere in the segment) are run through the model; a linear
    classifier (softmax regression, L2) is fitted on the first 3/4 of the memories M_0 to predict the key's
    first digit and scored on the rest (chance 10%).  The same probe on the mean of the segment's input
    embeddings says whether the digit can be read from the tokens at all by so simple a readout."""
    ids, y = _one_segment_passkeys(model, samples, seed)
    memories, inputs = [], []
    for start in range(0, samples, 16):
        chunk = ids[start : start + 16]
        memories.append(model(chunk).memories[:, 0].double())
        inputs.append(model.embed(chunk).double().mean(1))

    train_acc, test_acc = _fit_digit_probe(torch.cat(memories), y, steps)
    input_train, input_test = _fit_digit_probe(torch.cat(inputs), y, steps)
    return {"samples": samples, "chance": 0.1, "memory_train_acc": train_acc, "memory_test_acc": test_acc,
            "input_mean_train_acc": input_train, "input_mean_test_acc": input_test}


def _one_segment_passkeys(model: HMTModel, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` pass-key prompts of one segment (validation phrasings, keys of digits, the key anywhere in the
    segment but its last 16 ids): (ids (samples, Ls), the key's first digit (samples,))."""
    from . import retrieval

    rng = random.Random(seed)
    ls = model.config.segment_tokens
    rows, labels = [], []
    while len(rows) < samples:
        sample = retrieval.build(model.tokenizer, "passkey", ls + 8, rng.uniform(0.05, 0.8), rng, "valid")
        answer = sample.answer.strip()
        if sample.ids.numel() < ls or not answer[:1].isdigit() or sample.needle_at >= ls - 16:
            continue
        rows.append(sample.ids[:ls])
        labels.append(int(answer[0]))
    return torch.stack(rows), torch.tensor(labels)


def _other_prompts_memory(model: HMTModel):
    """A ``recall_hook`` that recalls from the next row's cache (the batch rolled by one): each prompt reads
    another prompt's memories."""
    return lambda summary, cache, keys: model.recall_memory(summary, cache.roll(1, 0), keys.roll(1, 0),
                                                            torch.full((cache.shape[0],), cache.shape[1]))


def _fit_digit_probe(features: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, float]:
    """A linear classifier (softmax regression, L2) of ``y`` (digits) from ``features`` (n, d), fitted on the
    first 3/4 of the rows: (train accuracy, held-out accuracy)."""
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    cut = features.shape[0] * 3 // 4
    weight = torch.zeros(features.shape[1], 10, dtype=torch.double, requires_grad=True)
    bias = torch.zeros(10, dtype=torch.double, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(features[:cut] @ weight + bias, y[:cut]) + 1e-3 * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    pred = (features @ weight + bias).argmax(-1)
    return float((pred[:cut] == y[:cut]).double().mean()), float((pred[cut:] == y[cut:]).double().mean())


@torch.no_grad()
def read_probe(model: HMTModel, samples: int = 400, seed: int = 0, steps: int = 300, batch: int = 16,
               per_layer: bool = False) -> dict:
    """Does what memory holds reach the position that must answer?  2-segment pass-key prompts (validation
    phrasings, keys of digits; the key only in memory) are run through the model, and the ``memory_probe``
    classifier of the key's first digit is fitted on: the memory M_0 (what the write side holds), the final
    hidden state at the position predicting the answer's first token with the prompt's own memory ("read"),
    and the same with another prompt's memory ("other": chance if the answer's state depends on the memory at
    all; the prompt's own tokens hold no key).  read close to M_0: the read side passes the key to the answer
    and only the LM head's mapping is missing; read at chance: the key is lost on the way.  ``per_layer``: also
    the same probe on every decoder layer's output at that position (own memory; a transformers Llama-family
    backbone), as ``layer_test_acc``: where on the way the key is lost."""
    from . import retrieval
    from ..core import backbones

    rng = random.Random(seed)
    memories, own, other, labels = [], [], [], []
    layers = backbones.decoder_body(model.backbone).layers if per_layer else []
    seen: list[torch.Tensor | None] = [None] * len(layers)  # per layer: its output in the latest backbone pass
    by_layer: list[list[torch.Tensor]] = [[] for _ in layers]

    def keep_output(i: int):
        def hook(module, args, output):
            seen[i] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [layer.register_forward_hook(keep_output(i)) for i, layer in enumerate(layers)]
    try:
        while len(labels) < samples:
            ids, prompt_end, _ = retrieval.training_batch(model.tokenizer, [], batch, model.config, 2, rng,
                                                          tasks=("passkey",), split="valid")
            answers = [model.tokenizer.decode(ids[b, int(prompt_end[b]) : int(prompt_end[b]) + 2]).strip()[:1]
                       for b in range(batch)]
            keep = torch.tensor([a.isdigit() for a in answers])
            if not bool(keep.any()):
                continue
            rows = torch.arange(batch)
            hooks = {"own": None, "other": _other_prompts_memory(model)}
            for name, hook in hooks.items():
                pieces, first = [], None
                for _, hidden, memory in model.iter_segments(ids, prompt_end=prompt_end, recall_hook=hook):
                    pieces.append(hidden)
                    first = memory if first is None else first
                states = torch.cat(pieces, dim=1)[rows, prompt_end - 1]  # the position predicting the answer
                (own if name == "own" else other).append(states[keep].double())
                if name == "own":
                    memories.append(first[keep].double())
                    # the last backbone pass is the question segment's: [P ; sensory ; tokens ; P]
                    at = 1 + model.config.sensory_tokens + (prompt_end - 1 - model.config.segment_tokens)
                    for i, output in enumerate(seen):
                        if output is None:
                            raise ValueError("read_probe(per_layer=True) needs a backbone that runs its decoder layers "
                                             "as modules (transformers': load with weights='fp32')")
                        by_layer[i].append(output[rows, at][keep].double())
            labels += [int(a) for a, k in zip(answers, keep.tolist()) if k]
    finally:
        for handle in handles:
            handle.remove()
    y = torch.tensor(labels[:samples])
    out = {"samples": samples, "chance": 0.1}
    for name, parts in (("memory", memories), ("read", own), ("other", other)):
        train_acc, test_acc = _fit_digit_probe(torch.cat(parts)[:samples], y, steps)
        out[f"{name}_train_acc"], out[f"{name}_test_acc"] = train_acc, test_acc
    if per_layer:
        out["layer_test_acc"] = [round(_fit_digit_probe(torch.cat(parts)[:samples], y, steps)[1], 3)
                                 for parts in by_layer]
    return out


@torch.no_grad()
def memory_use(model: HMTModel, batches: int = 4, batch: int = 8, segments: int = 2, seed: int = 0,
               task: str = "passkey") -> dict:
    """Does the model read what memory holds?  Answer cross-entropy (per answer token, teacher-forced) on
    retrieval prompts of ``segments`` segments (validation phrasings; the answer only in memory), with each
    prompt's own memories ("own"), with the memories of another prompt of the batch ("other": the cache rolled
    by one row) and with M_init in place of every recall ("none").  own < other means the memory's content is
    used; own = other = none means it is not."""
    from . import retrieval

    rng = random.Random(seed)
    totals = {"own": 0.0, "other": 0.0, "none": 0.0}
    count = 0
    for _ in range(batches):
        ids, prompt_end, labels = retrieval.training_batch(model.tokenizer, [], batch, model.config, segments, rng,
                                                           tasks=(task,), split="valid")
        hooks = {"own": None, "other": _other_prompts_memory(model),
                 "none": lambda s, c, k: model.memory_init.expand(c.shape[0], -1)}
        for name, hook in hooks.items():
            pieces = []
            for start, hidden, _ in model.iter_segments(ids, prompt_end=prompt_end, recall_hook=hook):
                pieces.append(hidden)
            logits = _logits(model, torch.cat(pieces, dim=1))[:, :-1]
            target = labels[:, 1:]
            totals[name] += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), target.reshape(-1),
                                                  ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return {f"answer_ce_{k}": v / count for k, v in totals.items()} | {"answer_tokens": count, "segments": segments}


@torch.no_grad()
def attention_on_memory(model: HMTModel, batch: int = 4, seed: int = 0, read_bias: float | None = None) -> dict:
    """How much attention the second segment of a 2-segment pass-key prompt pays to P, its position 0 (the
    recalled memory), and to its position 1 (the first sensory token): means over layers, heads, rows and the
    queries from position 40 on, from the backbone's eager attention.  ``read_bias`` s: position 0 holds
    E(BOS) + s P instead of P (what a sink-compatible read of memory would feed)."""
    from . import retrieval
    from ..core import backbones

    rng = random.Random(seed)
    ids, _, _ = retrieval.training_batch(model.tokenizer, [], batch, model.config, 2, rng, tasks=("passkey",),
                                         split="valid")
    ls, k = model.config.segment_tokens, model.config.sensory_tokens
    memory = model(ids[:, :ls]).memories[:, 0]
    embeds = model.segment_embeddings(memory, ids[:, ls - k : ls] if k else None, ids[:, ls:], trailing=False)
    inner = backbones.unwrap(model.backbone)
    if read_bias is not None:
        bos = model.embed(torch.tensor([[inner.config.bos_token_id]], device=model.device))[0, 0]
        embeds[:, 0] = embeds[:, 0] * read_bias + bos
    previous = inner.config._attn_implementation
    inner.set_attn_implementation("eager")
    try:
        body = backbones.decoder_body(model.backbone)
        positions = torch.arange(embeds.shape[1], device=model.device)[None].expand(embeds.shape[0], -1)
        attentions = torch.stack(body(inputs_embeds=embeds, position_ids=positions, output_attentions=True).attentions)
    finally:
        inner.set_attn_implementation(previous)
    later = attentions[:, :, :, 40:, :].double()  # (layers, B, heads, queries, keys)
    return {"on_memory": float(later[..., 0].mean()), "on_first_sensory": float(later[..., 1].mean()),
            "on_memory_per_layer": [round(float(v), 4) for v in later[..., 0].mean(dim=(1, 2, 3))]}


@torch.no_grad()
def memory_names_key(model: HMTModel, samples: int = 96, seed: int = 0) -> dict:
    """Does a memory's own next-token distribution name the key it read?  One-segment pass-key prompts (validation
    phrasings, keys of digits), the LM head over M_0 restricted to the ten digit tokens: how often the key's first
    digit ranks first, and its mean rank (chance: 10% and 4.5).  What a read of memory as a token of the
    backbone's own embedding space (the expected embedding under this distribution) would carry untrained."""
    digits = [model.tokenizer(str(d), add_special_tokens=False).input_ids[0] for d in range(10)]
    ids, labels = _one_segment_passkeys(model, samples, seed)
    memories = torch.cat([model(ids[i : i + 16]).memories[:, 0] for i in range(0, samples, 16)])
    logits = model.lm_logits(memories[:, None])[:, 0][:, digits]
    ranks = [logit.argsort(descending=True).tolist().index(int(y)) for logit, y in zip(logits, labels)]
    return {"samples": samples, "top1": sum(r == 0 for r in ranks) / samples, "mean_rank": sum(ranks) / samples,
            "chance_top1": 0.1, "chance_mean_rank": 4.5}

