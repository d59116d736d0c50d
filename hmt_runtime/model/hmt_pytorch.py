"""Checkpoints of HMT-pytorch, the paper's reference code, read for ``HMTModel.from_hmt_pytorch``
(docs/hmt_pytorch.md; ``hmt_runtime.model.convert`` writes them as this project's checkpoints).

HMT-pytorch saves the ``state_dict`` of its ``RecurrentWrapper`` (``torch.save``, after accelerate's ``prepare``:
every key carries ``module.``), or a DeepSpeed ZeRO folder whose fp32 weights DeepSpeed's ``zero_to_fp32.py``
consolidates.  Its keys, and what they are here (spec "Extra parameters"):

- ``mem`` (1, d): the summary prompt T;  ``memory_cell.memory`` (1, d): M_init;
- ``cross_attn.wq.weight``, ``cross_attn.wk.weight`` (d_h, d, stored bf16): W_q, W_k;
- ``memory_cell.model.<the transformers model's keys>``: the backbone; with LoRA (peft) the prefix is
  ``memory_cell.model.base_model.model.`` and adapted layers hold ``base_layer`` / ``lora_A.default`` /
  ``lora_B.default`` (``lora_embedding_A`` / ``lora_embedding_B`` for an embedding);
- ``memory_cell.mem_map.linear`` / ``inv_linear``: not part of the algorithm, ignored.

The sizes are not in the file: the window W (the reference's ``--segment_length``), ``--num_sensory`` k,
``--mem_recall_hidden_dim`` d_h, ``--mem_recall_context`` N and ``--sum_fraction`` (j = round(Ls * fraction)).
LoRA adapters are merged into the backbone's weights (W + alpha / r * B A, in float64); the LoRA alpha is not in
the file either (the reference's scripts use 32).  The converted model recalls in ``recall="paper"`` mode, as the
reference does (its recall query is the first j tokens of the segment).
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import backbones
from . import loading
from ..core.atomic import path_text
from ..core.checks import check_finite
from ..core.config import HMTConfig

SOURCE_FORMATS = ("hmt-pytorch",)
PREFIX = "module."                           # accelerate's wrapper
BACKBONE_PREFIX = "memory_cell.model."
PEFT_PREFIX = "base_model.model."
HMT_KEYS = {                                  # reference key -> (HMTModel parameter, what it is)
    "mem": ("summary_prompt", "the summary prompt T"),
    "memory_cell.memory": ("memory_init", "the first memory M_init"),
    "cross_attn.wq.weight": ("recall.w_q.weight", "the recall query projection W_q"),
    "cross_attn.wk.weight": ("recall.w_k.weight", "the recall key projection W_k"),
}
IGNORED_KEYS = ("memory_cell.mem_map.linear.weight", "memory_cell.mem_map.inv_linear.weight")
RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq",)  # older transformers saved it; it is computed from the config
DEFAULT_MEMORY_SLOTS = 100                    # the reference's --mem_recall_context
DEFAULT_SUM_FRACTION = 0.5                    # the reference's --sum_fraction
DEFAULT_LORA_ALPHA = 32.0                     # the reference's LoraConfig(lora_alpha=32)
QUIRK_WIDTH = 4096                            # d and d_h from which the reference's forward divides by d_h
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LORA = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.(?P<adapter>[^.]+)"
                   r"(?P<suffix>\.weight)?")
_ZERO_FILES = re.compile(r".*(model_states|optim_states)\.pt")
_STATE_FILES = ("model.safetensors", "pytorch_model.bin")


# ------------------------------------------------------------------------------------------------ reading files
def _zero_error(path: Path, found: str) -> ValueError:
    return ValueError(
        f"{str(path)!r} is a DeepSpeed ZeRO checkpoint ({found}); its weights are partitioned across optimizer "
        "states: run the zero_to_fp32.py script DeepSpeed writes into the checkpoint folder (python zero_to_fp32.py "
        "CHECKPOINT_FOLDER OUTPUT) and convert the file or folder it writes"
    )


def _zero_marker(folder: Path) -> str | None:
    """What makes ``folder`` a DeepSpeed ZeRO checkpoint folder (or None)."""
    if (folder / "latest").is_file():
        return "it holds a 'latest' file"
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and entry.name.startswith("global_step"):
            return f"it holds {entry.name!r}"
        if entry.is_file() and _ZERO_FILES.fullmatch(entry.name):
            return f"it holds {entry.name!r}"
    return None


def _load_file(path: Path) -> dict:
    """One state-dict file: safetensors, or torch.load with weights_only=True (never arbitrary objects)."""
    if _ZERO_FILES.fullmatch(path.name):
        raise _zero_error(path, "a partition file of its folder")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # safetensors raises several error types for a damaged file
            raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from None
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as err:  # pickle, zipfile and torch raise many error types for a file that is not one
        raise ValueError(f"{str(path)!r} cannot be read as a state dict of tensors with torch.load(weights_only=True) "
                         f"({_load_error(err)}); the converter never unpickles other objects") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a {type(data).__name__}; expected a state dict (a dict of tensors "
                         "saved with torch.save(model.state_dict(), ...))")
    return data


def _load_error(err: Exception) -> str:
    """The useful part of a torch.load error: the refused object, or the unpickler's reason, or its first line."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it holds a {found[1]} object, not only tensors"
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no details'}"


def _sharded(folder: Path, index: Path) -> dict:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{str(index)!r} is not a shard index (a JSON object with a \"weight_map\"): {err}") from None
    state = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or not (folder / shard).is_file():
            raise FileNotFoundError(f"{str(index)!r} names the shard {shard!r}, which is not a file in {str(folder)!r}")
        state.update(_load_file(folder / shard))
    return state


def read_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """The state dict of an HMT-pytorch checkpoint: a ``.pth`` / ``.pt`` / ``.bin`` file (torch.load with
    ``weights_only=True``), a ``.safetensors`` file, or a folder holding ``model.safetensors`` or
    ``pytorch_model.bin`` (with their ``.index.json`` when sharded), as DeepSpeed's ``zero_to_fp32.py`` writes.
    A DeepSpeed ZeRO checkpoint folder itself is refused with the command that consolidates it."""
    path = Path(path_text(checkpoint, "checkpoint", "an HMT-pytorch checkpoint file or folder"))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():  # a consolidated state dict (also when written into the ZeRO folder), else refused
        for name in _STATE_FILES:
            if (path / f"{name}.index.json").is_file():
                state = _sharded(path, path / f"{name}.index.json")
                break
            if (path / name).is_file():
                state = _load_file(path / name)
                break
        else:
            marker = _zero_marker(path)
            if marker is not None:
                raise _zero_error(path, marker)
            raise FileNotFoundError(f"checkpoint {str(path)!r} is a folder without model.safetensors or "
                                    "pytorch_model.bin; expected a .pth / .pt / .bin / .safetensors state dict file "
                                    "or a folder holding one")
    else:
        state = _load_file(path)
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"checkpoint {str(path)!r}: key {key!r} is a {type(key).__name__}; expected a state "
                             "dict with string keys")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint {str(path)!r}: entry {key!r} is a {type(value).__name__}; expected a state "
                             "dict whose every entry is a tensor")
    if not state:
        raise ValueError(f"checkpoint {str(path)!r} holds no tensors")
    return state


# ------------------------------------------------------------------------------------------------ key layout
def _shown(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(repr(k) for k in keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def split_reference(state: dict, where: str) -> tuple[dict, dict, list[str]]:
    """(HMT tensors by reference key, backbone tensors without their prefix, ignored keys present)."""
    prefixed = [k for k in state if k.startswith(PREFIX)]
    if prefixed and len(prefixed) != len(state):
        bare = [k for k in state if not k.startswith(PREFIX)]
        raise ValueError(f"{where!r}: some keys carry the {PREFIX!r} prefix and some do not ({_shown(bare, 3)}); "
                         "expected all or none")
    if prefixed:
        state = {k[len(PREFIX):]: v for k, v in state.items()}
    hmt = {k: state[k] for k in HMT_KEYS if k in state}
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    ignored = [k for k in IGNORED_KEYS if k in state]
    unexpected = set(state) - set(hmt) - set(ignored) - {k for k in state if k.startswith(BACKBONE_PREFIX)}
    if unexpected:
        raise ValueError(f"{where!r}: unexpected keys {_shown(unexpected)}; expected those of HMT-pytorch's "
                         f"RecurrentWrapper ({', '.join(HMT_KEYS)}, {BACKBONE_PREFIX}*, memory_cell.mem_map.*)")
    missing = [k for k in HMT_KEYS if k not in hmt]
    if missing:
        if "memory_cell.memory" in hmt and "mem" not in hmt and "cross_attn.wq.weight" not in hmt:
            raise ValueError(f"{where!r}: no 'mem' and no 'cross_attn.*' keys: a checkpoint trained without memory "
                             "recall (HMT-pytorch's --hmt_stage_1, or RMT); expected a stage-2 checkpoint")
        raise ValueError(f"{where!r}: missing key {missing[0]!r} ({HMT_KEYS[missing[0]][1]})"
                         + (f" and {len(missing) - 1} more HMT keys" if len(missing) > 1 else ""))
    if not backbone:
        raise ValueError(f"{where!r}: no backbone keys ({BACKBONE_PREFIX}*)")
    return hmt, backbone, ignored


def merge_lora(backbone: dict, alpha: float, where: str) -> tuple[dict, dict]:
    """Merge peft LoRA adapters (``base_model.model.`` prefix) into their base weights, in float64.

    Linear: W + alpha / r * B A (A (r, in), B (out, r)).  Embedding: W + alpha / r * (B A)^T (A (r, V),
    B (d, r)).  Returns (plain state dict, {"modules": n, "ranks": sorted ranks, "embedding": bool, "prefix": the
    checkpoint's prefix of the backbone keys}).
    """
    peft = [k for k in backbone if k.startswith(PEFT_PREFIX)]
    if not peft:
        lora = [k for k in backbone if ".lora_" in k or ".base_layer." in k]
        if lora:
            raise ValueError(f"{where!r}: LoRA keys without peft's {BACKBONE_PREFIX}{PEFT_PREFIX} prefix "
                             f"({_shown(lora, 3)})")
        return backbone, {"modules": 0, "ranks": [], "embedding": False, "prefix": BACKBONE_PREFIX}
    if len(peft) != len(backbone):
        other = [k for k in backbone if not k.startswith(PEFT_PREFIX)]
        raise ValueError(f"{where!r}: backbone keys {_shown(other, 3)} lack peft's {PEFT_PREFIX!r} prefix that the "
                         "others carry")
    backbone = {k[len(PEFT_PREFIX):]: v for k, v in backbone.items()}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in backbone.items():
        match = _LORA.fullmatch(key)
        if match is None:
            if ".lora_" in key:
                raise ValueError(f"{where!r}: unexpected key '{BACKBONE_PREFIX}{PEFT_PREFIX}{key}': only plain LoRA "
                                 "adapters convert (lora_A / lora_B / lora_embedding_A / lora_embedding_B)")
            plain[key] = value
            continue
        kind, adapter = match["kind"], match["adapter"]
        embedding_kind = kind.startswith("lora_embedding")
        if adapter != "default" or embedding_kind == bool(match["suffix"]):
            raise ValueError(f"{where!r}: unexpected key '{BACKBONE_PREFIX}{PEFT_PREFIX}{key}': expected "
                             f"'{match['module']}.{kind}.default" + ("'" if embedding_kind else ".weight'")
                             + " (a single LoRA adapter named 'default', as peft names it)")
        adapters.setdefault(match["module"], {})[kind] = value
    ranks, embedding = set(), False
    for module, parts in sorted(adapters.items()):
        prefix = f"{BACKBONE_PREFIX}{PEFT_PREFIX}{module}"
        is_embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if is_embedding else ("lora_A", "lora_B")
        suffix = ".default" if is_embedding else ".default.weight"
        for part in (a_key, b_key):
            if part not in parts:
                raise ValueError(f"{where!r}: missing key '{prefix}.{part}{suffix}' (the other half of its LoRA pair)")
        base_key = f"{module}.base_layer.weight"
        if base_key not in plain:
            raise ValueError(f"{where!r}: missing key '{BACKBONE_PREFIX}{PEFT_PREFIX}{base_key}' (the base weight of a "
                             "LoRA layer)")
        base, a, b = plain.pop(base_key), parts[a_key], parts[b_key]
        for key, tensor in ((f"{BACKBONE_PREFIX}{PEFT_PREFIX}{base_key}", base), (f"{prefix}.{a_key}{suffix}", a),
                            (f"{prefix}.{b_key}{suffix}", b)):
            _check_float(where, key, tensor)
        rank = a.shape[0] if a.dim() == 2 and a.shape[0] > 0 else -1
        if is_embedding:
            expected = {"A": (rank, base.shape[0]), "B": (base.shape[1], rank)}
        else:
            expected = {"A": (rank, base.shape[1] if base.dim() == 2 else -1), "B": (base.shape[0], rank)}
        for half, tensor in (("A", a), ("B", b)):
            key = f"{prefix}.{a_key if half == 'A' else b_key}{suffix}"
            if base.dim() != 2 or tuple(tensor.shape) != expected[half]:
                raise ValueError(f"{where!r}: tensor {key!r} has shape {tuple(tensor.shape)}; expected "
                                 f"{expected[half]} for the base weight of shape {tuple(base.shape)}")
        delta = b.double() @ a.double()
        plain[f"{module}.weight"] = base.double() + (alpha / rank) * (delta.t() if is_embedding else delta)
        bias = plain.pop(f"{module}.base_layer.bias", None)
        if bias is not None:
            plain[f"{module}.bias"] = bias
        ranks.add(rank)
        embedding = embedding or is_embedding
    stray = [k for k in plain if ".base_layer." in k]
    if stray:
        raise ValueError(f"{where!r}: '{BACKBONE_PREFIX}{PEFT_PREFIX}{stray[0]}' is a LoRA base layer without its "
                         "lora_A / lora_B keys")
    return plain, {"modules": len(adapters), "ranks": sorted(ranks), "embedding": embedding,
                   "prefix": BACKBONE_PREFIX + PEFT_PREFIX}


def _check_float(where: str, key: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where!r}: tensor {key!r} has dtype {tensor.dtype}; expected a floating dtype "
                         "(float32, bfloat16, float16 or float64)")
    check_finite(where, key, tensor)


# ------------------------------------------------------------------------------------------------ the backbone
def _backbone_folder(backbone) -> tuple[Path, str]:
    name = path_text(backbone, "backbone", f"{loading.DEFAULT_BACKBONE!r} or a transformers model folder")
    if name == loading.DEFAULT_BACKBONE:
        return loading.default_backbone_folder(), name
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"backbone={name!r}: expected {loading.DEFAULT_BACKBONE!r} or a local transformers "
                                "model folder holding config.json (the backbone the checkpoint was trained on; its "
                                "weights are taken from the checkpoint)")
    return folder, name


def _tied_names(model) -> tuple[str, str] | None:
    """(input-embedding key, output-embedding key) when the two share one weight, else None."""
    head = model.get_output_embeddings()
    if head is None or head.weight is not model.get_input_embeddings().weight:
        return None
    names = [name for name, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    out = [n for n in names if n.startswith(_module_name(model, head))]
    inp = [n for n in names if n not in out]
    return (inp[0], out[0]) if inp and out else None


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _skeleton(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_backbone(folder: Path, source: str, state: dict, where: str, prefix: str = BACKBONE_PREFIX) -> dict:
    """Check ``state`` (merged, unprefixed backbone tensors) against the config of the backbone in ``folder``
    (its config.json; its weights are not read; ``source`` names it): keys, shapes, floating dtypes, finite
    values.  A tied output embedding that differs from the input embedding (a merged embedding LoRA: the
    reference's LM head keeps the base weight) is untied.  Errors name the checkpoint's keys (``prefix`` + the
    transformers key).

    Returns {"config", "folder", "source", "state" (the tensors to load), "width" (d), "untied"}."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    skeleton = _skeleton(config)
    tied = _tied_names(skeleton)
    state = {k: v for k, v in state.items() if not k.endswith(RECOMPUTED_BUFFERS)}
    untied = False
    if tied is not None:
        inp, out = tied
        if out not in state and inp in state:
            state[out] = state[inp]
        elif inp in state and out in state and state[inp].shape == state[out].shape and not torch.equal(
                state[inp].double(), state[out].double()):
            for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
                cfg.tie_word_embeddings = False
            skeleton, untied = _skeleton(config), True
            if _tied_names(skeleton) is not None:
                raise ValueError(f"{where!r}: {prefix + out!r} differs from {prefix + inp!r}, but this "
                                 f"{config.model_type} backbone cannot hold an output embedding of its own")
    expected = skeleton.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    label = f"(backbone {source!r}, {config.model_type})"
    if missing or unexpected:
        found = [f"missing backbone keys {_shown(prefix + k for k in missing)}" if missing else "",
                 f"unexpected backbone keys {_shown(prefix + k for k in unexpected)}" if unexpected else ""]
        hint = ": was it trained on another backbone?" if missing and unexpected else ""
        raise ValueError(f"{where!r}: {'; '.join(f for f in found if f)} {label}{hint}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{where!r}: tensor {prefix + key!r} has shape {tuple(tensor.shape)}; expected "
                             f"{tuple(expected[key].shape)} {label}")
        if expected[key].is_floating_point():
            _check_float(where, prefix + key, tensor)
    return {"config": config, "folder": folder, "source": source, "state": state,
            "width": backbones.embedding_width(skeleton), "untied": untied}


def build_backbone(checked: dict, dtype):
    """(transformers model holding the checked state in ``dtype``, tokenizer or None) from ``check_backbone``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers.initialization import no_init_weights  # every weight is loaded below
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(checked["config"], dtype=dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checked["state"].items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    model.hmt_source = checked["source"]
    folder, tokenizer = checked["folder"], None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ the model
def _check_number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (low < value <= high) or math.isnan(value):
        raise ValueError(f"{name}={value!r}: expected a number in ({low:g}, {high:g}]")
    return float(value)


def _dtype(value):
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        value = getattr(torch, value, value)
    if value not in FLOAT_DTYPES:
        raise ValueError(f"dtype={value!r}: expected None / 'auto' (the checkpoint's) or one of "
                         "float32, bfloat16, float16, float64")
    return value


@dataclass
class Converted:
    """An HMT-pytorch checkpoint, read: the config, the backbone (LoRA merged) and its tokenizer, the HMT
    parameters by ``HMTModel`` parameter name, and what the conversion found (``HMTModel.hmt_conversion``)."""

    config: HMTConfig
    backbone: torch.nn.Module
    tokenizer: object
    parameters: dict
    info: dict


def read_hmt_pytorch(checkpoint, backbone, *, window: int, sensory_tokens: int, recall_dim: int,
                     memory_slots: int = DEFAULT_MEMORY_SLOTS, sum_fraction: float = DEFAULT_SUM_FRACTION,
                     recall_scale: str | None = None, lora_alpha: float = DEFAULT_LORA_ALPHA, dtype=None,
                     kernels: str = "auto"):
    """What ``HMTModel.from_hmt_pytorch`` builds a model from: an HMT-pytorch checkpoint read and validated
    (``read_state_dict`` says which files), as a ``Converted``.

    backbone: the backbone it was trained on, ``"smollm2-135m"`` or a transformers model folder (its config.json
    and tokenizer are used; the weights come from the checkpoint).  window: the reference's ``--segment_length``
    (W = Ls + k + 2); sensory_tokens: ``--num_sensory`` (k); recall_dim: ``--mem_recall_hidden_dim`` (d_h);
    memory_slots: ``--mem_recall_context`` (N); sum_fraction: ``--sum_fraction`` (j = round(Ls * fraction)).
    recall_scale: "sqrt" or "linear" (scores / d_h, as the reference's teacher-forced forward at d >= 4096 and
    d_h >= 4096); None means "sqrt" and, at those sizes, an error asking for the choice.  lora_alpha: the LoRA
    alpha of the training run (not in the file).  dtype: the model's dtype (None: the checkpoint's, the most
    common dtype of its backbone tensors).  Recall runs in "paper" mode, as in the reference.  Everything read is
    validated; errors name the file, the key, what was found and what was expected.
    """
    where = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else repr(checkpoint)
    sum_fraction = _check_number("sum_fraction", sum_fraction, 0.0, 1.0)
    lora_alpha = _check_number("lora_alpha", lora_alpha, 0.0, math.inf)
    if recall_scale is not None and recall_scale not in ("sqrt", "linear"):
        raise ValueError(f"recall_scale={recall_scale!r}: expected None, 'sqrt' or 'linear'")
    dtype = _dtype(dtype)
    folder, source = _backbone_folder(backbone)
    config = HMTConfig.from_window(window, sensory_tokens=sensory_tokens, memory_slots=memory_slots,
                                   recall_dim=recall_dim, recall="paper", kernels=kernels)  # validates the sizes
    summary = int(round(config.segment_tokens * sum_fraction))  # as the reference computes it
    if summary < 1:
        raise ValueError(f"sum_fraction={sum_fraction!r}: gives round(Ls * fraction) = round({config.segment_tokens} "
                         f"* {sum_fraction:g}) = {summary} summary tokens; expected at least 1")

    state = read_state_dict(checkpoint)
    hmt, backbone_state, _ = split_reference(state, where)
    del state
    for key, tensor in hmt.items():
        _check_float(where, key, tensor)
    if dtype is None:  # the checkpoint's: the most common dtype of its backbone tensors
        counts: dict = {}
        for tensor in backbone_state.values():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
        dtype = max(counts, key=counts.get)
        dtype = dtype if dtype in FLOAT_DTYPES else torch.float32
    backbone_state, lora = merge_lora(backbone_state, lora_alpha, where)
    checked = check_backbone(folder, source, backbone_state, where, lora["prefix"])
    del backbone_state
    width = checked["width"]
    expected = {"mem": (1, width), "memory_cell.memory": (1, width),
                "cross_attn.wq.weight": (recall_dim, width), "cross_attn.wk.weight": (recall_dim, width)}
    for key, tensor in hmt.items():
        if tuple(tensor.shape) != expected[key]:
            shape = "(1, d)" if key in ("mem", "memory_cell.memory") else "(recall_dim d_h, d)"
            raise ValueError(f"{where!r}: tensor {key!r} ({HMT_KEYS[key][1]}) has shape {tuple(tensor.shape)}; "
                             f"expected {expected[key]} = {shape} for d = {width} (the backbone's embedding width) and "
                             f"recall_dim = {recall_dim}")
    if recall_scale is None:
        if width >= QUIRK_WIDTH and recall_dim >= QUIRK_WIDTH:
            raise ValueError(
                f"recall_scale (--recall-scale) is required here: at d = {width} and d_h = {recall_dim} HMT-pytorch's "
                "teacher-forced forward (training and scoring) divides the recall scores by d_h, its generate by "
                "sqrt(d_h); choose 'linear' (as it trained) or 'sqrt'")
        recall_scale = "sqrt"
    config = HMTConfig.from_window(window, sensory_tokens=sensory_tokens, summary_tokens=summary,
                                   memory_slots=memory_slots, recall_dim=recall_dim, recall="paper",
                                   recall_scale=recall_scale, kernels=kernels)
    model_backbone, tokenizer = build_backbone(checked, dtype)
    untied = checked["untied"]
    del checked
    parameters = {name: hmt[key] for key, (name, _) in HMT_KEYS.items()}
    info = {"lora_modules": lora["modules"], "lora_ranks": lora["ranks"],
            "lora_alpha": lora_alpha if lora["modules"] else None, "untied_lm_head": untied}
    return Converted(config, model_backbone, tokenizer, parameters, info)
