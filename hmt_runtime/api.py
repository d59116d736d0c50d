"""generate(): the user-facing entry point over text or token ids."""
from __future__ import annotations

import torch

from .segment import check_sampling, generate_ids


def _encode(model, prompts):
    """-> (list of 1-D id lists, kind) where kind says how to return results: "text", "texts", "ids", "tensor"."""
    if isinstance(prompts, str):
        return [prompts], "text"
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        return [row.tolist() for row in prompts], "tensor"
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got an empty list")
        if all(isinstance(p, str) for p in prompts):
            return list(prompts), "texts"
        if all(isinstance(p, (list, tuple)) for p in prompts):
            return [list(p) for p in prompts], "ids"
    raise TypeError("prompts: expected a string, a list of strings, a tensor of ids, or a list of id lists")


def generate(model, prompts, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k=None, top_p=None, eos_token_id=None, state=None, progress: bool = False):
    """Continue ``prompts``: a string, a list of strings, a tensor (B, S) or (S,), or a list of id lists.

    Returns what was given: continuation text (str / list of str, without the prompt), or the ids of prompt +
    continuation (a tensor for a tensor of equal-length rows, else a list of lists).  Each prompt keeps its own
    segment boundaries and memory; greedy output per prompt equals generating it alone.
    """
    check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    items, kind = _encode(model, prompts)
    tokenizer = model.tokenizer
    if kind in ("text", "texts"):
        if tokenizer is None:
            raise ValueError("prompts: text needs a model with a tokenizer (load the backbone by name or path)")
        for i, text in enumerate(items):
            if not text:
                raise ValueError(f"prompts[{i}]: empty prompt; expected at least one character")
        items = [tokenizer(text, add_special_tokens=False).input_ids for text in items]
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
    for i, ids in enumerate(items):
        if not ids:
            raise ValueError(f"prompts[{i}]: empty prompt; expected at least one token")
    results = []
    for i, ids in enumerate(items):
        row_state = None if state is None else state.row(i)
        out = generate_ids(model, torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                           do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_token_id=eos_token_id, state=row_state, progress=progress)
        results.append(out[0].tolist())
    if kind in ("text", "texts"):
        texts = [tokenizer.decode(r[len(ids):], skip_special_tokens=True) for r, ids in zip(results, items)]
        return texts[0] if kind == "text" else texts
    if kind == "tensor" and len({len(r) for r in results}) == 1:
        return torch.tensor(results, device=model.device)
    return results
