"""Backend choice, made in one place: which kernels run the three HMT ops, which engine runs the backbone over
the static KV cache, and whether its steps are captured as CUDA graphs.

``select_backend(model, engine, cuda_graphs)`` decides all three together and is called once per scheduler
(``HMTModel.prepare_ops()`` reuses the same kernel choice).  Resolving the kernels sets the backbone's attention
implementation once (the registered attention of the Triton / native backend, which hands training and masked
calls to sdpa by itself); nothing flips it afterwards.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from ..core.backbones import unwrap
from ..core.config import KERNEL_CHOICES
from .engines import lean_unsupported_reason
from ..core.ops import TORCH_OPS, Ops

ENGINE_CHOICES = ("auto", "lean", "transformers")


def triton_ops() -> Ops:
    """The Triton backend (``hmt_kernels``); registers its attention with transformers."""
    import hmt_kernels
    from hmt_kernels.attention import attention_with_kvcache
    from hmt_kernels.recall import memory_write, recall

    hmt_kernels.register()
    return Ops("triton", recall, memory_write, attention_with_kvcache, hmt_kernels.ATTN_IMPLEMENTATION)


def native_ops() -> Ops:
    """The native C++ / CUDA backend (``hmt_runtime.native.kernels``); ImportError when the extension is not built."""
    from ..native import kernels as native

    return native.ops()


_warned: set[str] = set()


def resolve_ops(kernels: str, device: torch.device | str) -> Ops:
    """The ops for ``HMTConfig.kernels`` on ``device``.

    "torch" is the reference.  "auto" picks Triton on CUDA and the native extension on CPU when they are
    available, else torch (with one warning per missing backend).  "triton" / "native" fail loudly when missing.
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r}: expected one of {KERNEL_CHOICES}")
    device = torch.device(device)
    if kernels == "torch":
        return TORCH_OPS
    if kernels == "triton":
        return triton_ops()
    if kernels == "native":
        return native_ops()
    wanted = "triton" if device.type == "cuda" else "native"
    try:
        return triton_ops() if wanted == "triton" else native_ops()
    except Exception as err:  # a missing optional backend must never crash the model
        if wanted not in _warned:
            _warned.add(wanted)
            warnings.warn(f"hmt: {wanted} kernels unavailable ({err}); using the torch path", stacklevel=2)
        return TORCH_OPS


def check_choices(engine, cuda_graphs) -> None:
    """ValueError unless ``engine`` is one of ENGINE_CHOICES and ``cuda_graphs`` is "auto", True or False."""
    if not isinstance(engine, str) or engine not in ENGINE_CHOICES:
        raise ValueError(f"engine={engine!r}: expected 'auto', 'lean' or 'transformers'")
    if not (isinstance(cuda_graphs, bool) or (isinstance(cuda_graphs, str) and cuda_graphs == "auto")):
        raise ValueError(f"cuda_graphs={cuda_graphs!r}: expected 'auto', True or False")


def model_ops(model) -> Ops:
    """The kernels of ``model`` (an HMTModel) on its device: resolved once per (device, kernels) and cached on
    the model; resolving sets the backbone's attention implementation (once): the backend's registered attention,
    or the backbone's own (``model.base_attn_implementation``) for the torch ops."""
    key = (str(model.device), model.config.kernels)
    cache = model.resolved_ops
    if key not in cache:
        ops = resolve_ops(model.config.kernels, model.device)
        wanted = ops.attn_implementation or model.base_attn_implementation
        inner = unwrap(model.backbone)
        if wanted is not None and getattr(inner.config, "_attn_implementation", None) != wanted:
            if wanted == ops.attn_implementation and ops.register is not None and not getattr(inner, "hmt_lean", False):
                ops.register()
            inner.set_attn_implementation(wanted)
        cache[key] = ops
    return cache[key]


@dataclass(frozen=True)
class Backend:
    """What runs a model's incremental path.  ops: the three HMT ops.  engine: "lean" | "transformers".
    cuda_graphs: capture the decode / boundary steps.  lean_reason: why the lean engine is not used (or None).
    fused_decode: the lean engine's decode step is one native op (CPU, native kernels, float32 activations).
    kv_dtype: the KV cache's storage type (None: the model's dtype; ``kv_cache_dtype``)."""

    ops: Ops
    engine: str
    cuda_graphs: bool
    lean_reason: str | None
    fused_decode: bool = False
    kv_dtype: torch.dtype | None = None


KV_CACHE_CHOICES = ("auto", "bf16", "fp32")


def kv_cache_dtype(model, fused_decode: bool) -> torch.dtype | None:
    """The KV cache's storage type for ``model`` (an HMTModel); None means the model's dtype.

    ``HMT_KV_CACHE`` = "auto" (default): bfloat16 under the fused CPU decode step when the backbone's projections
    take the integer dot products (8-bit activations: the approximate path, where a bfloat16 cache costs no
    measurable quality; benchmarks/RESULTS.md), else the model's dtype, so float32 weights stay exact against the
    teacher-forced forward.  "bf16": bfloat16 whenever the decode step is fused.  "fp32": the model's dtype."""
    choice = os.environ.get("HMT_KV_CACHE", "auto")
    if choice not in KV_CACHE_CHOICES:
        raise ValueError(f"HMT_KV_CACHE={choice!r}: expected one of {KV_CACHE_CHOICES}")
    if not fused_decode or choice == "fp32":
        return None
    if choice == "bf16" or any(getattr(m, "int_dot", False) for m in model.backbone.modules()):
        return torch.bfloat16
    return None


def select_backend(model, engine: str = "auto", cuda_graphs="auto") -> Backend:
    """Kernels, engine and CUDA graphs for ``model`` (an HMTModel).

    engine: "auto" (lean when the backbone allows it exactly), "lean" (ValueError naming the reason when it does
    not) or "transformers".  cuda_graphs: "auto" (on for the lean engine on CUDA), True (ValueError unless CUDA
    and lean) or False.
    """
    check_choices(engine, cuda_graphs)
    reason = lean_unsupported_reason(model.backbone, model.config.kv_window)
    if engine == "lean" and reason is not None:
        raise ValueError(f"engine='lean': {reason}")
    kind = "transformers" if engine == "transformers" or reason is not None else "lean"
    on_cuda = model.device.type == "cuda"
    graphs = (on_cuda and kind == "lean") if cuda_graphs == "auto" else bool(cuda_graphs)
    if graphs and not (on_cuda and kind == "lean"):
        raise ValueError(f"cuda_graphs=True: needs a CUDA model and the lean engine (device {model.device}, "
                         f"engine {kind!r})")
    with torch.no_grad():
        ops = model_ops(model)
    fused = (kind == "lean" and ops.name == "native" and model.device.type == "cpu" and model.dtype == torch.float32
             and hasattr(torch.ops.hmt, "decode_step"))
    return Backend(ops, kind, graphs, reason, fused, kv_cache_dtype(model, fused))
