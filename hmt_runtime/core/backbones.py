"""What differs per backbone family, behind one set of helpers (loading lives in ``hmt_runtime.model.loading``).

HMT needs four things from a transformers causal LM: the token-embedding layer (its width is ``d``; for OPT this
is ``word_embed_proj_dim``), the decoder body that maps input embeddings to final (post-final-norm) hidden states,
the LM head, and the attention implementation switch.  transformers exposes all of them generically, so any
decoder-only family works (tested: Llama, Qwen2, Mistral, GPT-2, OPT).
"""
from __future__ import annotations

import functools
import math
import inspect
import os
from pathlib import Path

import torch
from torch import nn


def cache_dir() -> Path:
    """Where converted backbones are cached: ``$HMT_CACHE``, else ``$XDG_CACHE_HOME/hmt``, else ``~/.cache/hmt``."""
    if os.environ.get("HMT_CACHE"):
        return Path(os.environ["HMT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hmt"


def unwrap(backbone: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def decoder_body(backbone: nn.Module) -> nn.Module:
    """The model without its LM head: maps ``inputs_embeds`` to post-final-norm hidden states."""
    return unwrap(backbone).base_model


@functools.lru_cache(maxsize=None)
def _cache_argument(cls) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.x; support both spellings
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwargs(body: nn.Module, cache) -> dict:
    """Keyword arguments passing ``cache`` (a transformers Cache, or None for none) to ``body``'s forward."""
    if cache is None:
        return {"use_cache": False}
    return {_cache_argument(type(body)): cache, "use_cache": True}


def embedding_width(backbone: nn.Module) -> int:
    embed = unwrap(backbone).get_input_embeddings()
    # embedding_dim / num_embeddings: nn.Embedding's, and a quantized lookup's (whose .weight would dequantize)
    return getattr(embed, "embedding_dim", None) or embed.weight.shape[1]


def vocab_size(backbone: nn.Module) -> int:
    embed = unwrap(backbone).get_input_embeddings()
    return getattr(embed, "num_embeddings", None) or embed.weight.shape[0]


_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def max_learned_positions(backbone: nn.Module) -> int | None:
    """The number of positions a backbone with a learned position table can embed (GPT-2 ``n_positions``, OPT
    ``max_position_embeddings``), or None for backbones without one (rotary, ALiBi: no hard limit)."""
    limits = []
    for name, module in decoder_body(backbone).named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            limits.append(module.num_embeddings - int(getattr(module, "offset", 0) or 0))  # OPT reserves 2 rows
    return min(limits) if limits else None


def check_window(backbone: nn.Module, config) -> None:
    """Refuse an HMT window (positions 0 .. W-1 in every segment) longer than a learned-position backbone embeds."""
    limit = max_learned_positions(backbone)
    if limit is not None and config.kv_window > config.window and config.kv_window > limit:
        raise ValueError(
            f"replay={config.replay}: the segment in which a prompt ends holds {config.kv_window} positions "
            f"(window {config.window} + {config.replay} x {config.slot_tokens} replayed ids); expected at most "
            f"{limit}, the positions this backbone's learned position table holds; use a smaller replay or window"
        )
    if limit is not None and config.window > limit:
        kind = getattr(unwrap(backbone).config, "model_type", type(unwrap(backbone)).__name__)
        raise ValueError(
            f"config.window={config.window} (segment_tokens {config.segment_tokens} + sensory_tokens "
            f"{config.sensory_tokens} + 2): expected at most {limit}, the positions this {kind} backbone's learned "
            f"position table holds; use HMTConfig.from_window({limit}, ...) or a smaller window"
        )


@torch.no_grad()
def embedding_moments(backbone: nn.Module, chunk: int = 1024) -> tuple[float, float]:
    """(standard deviation, root mean square) of every element of the input embedding table, read through the
    embedding layer ``chunk`` rows at a time (a quantized table is never dequantized whole)."""
    layer = unwrap(backbone).get_input_embeddings()
    rows = vocab_size(backbone)
    device = next((t.device for t in list(layer.parameters()) + list(layer.buffers())), torch.device("cpu"))
    total = square = 0.0
    count = 0
    for start in range(0, rows, chunk):
        block = layer(torch.arange(start, min(rows, start + chunk), device=device)).double()
        total += float(block.sum())
        square += float(block.pow(2).sum())
        count += block.numel()
    mean = total / count
    return math.sqrt(max(square / count - mean * mean, 0.0) * count / max(count - 1, 1)), math.sqrt(square / count)
