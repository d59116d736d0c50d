"""The native backend: C++ (CPU) and CUDA kernels, registered as ``torch.ops.hmt.*`` by the extension
``hmt_runtime._C`` (sources in ``csrc/``).

Build it with ``pip install -e . --no-build-isolation`` (or ``python setup.py build_ext --inplace``).
``available()`` says whether it loads; ``ops()`` returns the ``hmt_runtime.core.ops.Ops`` backend and raises
``ImportError`` with the reason when the extension is missing, which ``resolve_ops("auto", "cpu")`` turns into one
warning and the torch ops.

The ops are ``torch.ops.hmt.attention_with_kvcache``, ``torch.ops.hmt.recall`` and ``torch.ops.hmt.memory_write``,
with the contracts of ``hmt_runtime.core.ops`` and fake (meta) kernels so that ``torch.compile`` can trace them.  They
are inference kernels for float32, bfloat16 and float16 tensors: the wrappers below hand calls that need autograd,
and other dtypes (e.g. float64), to the torch reference, so results never silently lose gradients or precision.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from ..core.ops import Ops, attention_with_kvcache_torch, memory_write_torch, recall_torch

ATTN_IMPLEMENTATION = "hmt_native"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_BUILD_HINT = "build it with `pip install -e . --no-build-isolation` (needs a C++ compiler)"

# "module": the loaded extension and "cuda": whether it has CUDA kernels; or "error": why it failed to load
# (loading is tried once per process).
_state: dict = {}
_fakes_registered = False


def _register_fakes() -> None:
    """Shapes of the ops' outputs for torch.compile / FakeTensor tracing."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("hmt::attention_with_kvcache")
    def _attention_fake(q, k_new, v_new, k_cache, v_cache, cache_lens, scale=None):
        return q.new_empty(q.shape)  # (B, Lq, Hq, D), contiguous, dtype of q

    @torch.library.register_fake("hmt::recall")
    def _recall_fake(summary, memory, keys, written, w_q):
        return memory.new_empty((memory.shape[0], memory.shape[2]))  # (B, d), dtype of memory

    @torch.library.register_fake("hmt::memory_write")
    def _memory_write_fake(new_memory, w_k, memory, keys, written):
        return None

    if hasattr(torch.ops.hmt, "linear"):  # the weight-only linear layers (hmt_runtime.native.quant)
        @torch.library.register_fake("hmt::linear")
        def _linear_fake(x, weight, scale, bias, format):
            return x.new_empty((*x.shape[:-1], weight.shape[0]))

        @torch.library.register_fake("hmt::linear_out")
        def _linear_out_fake(x, weight, scale, bias, format, out):
            return None

    _fakes_registered = True


def _extension():
    """The loaded extension module; ImportError (with the reason) when it cannot be loaded."""
    if "module" in _state:
        return _state["module"]
    if "error" not in _state:
        try:
            module = importlib.import_module("hmt_runtime._C")  # registers torch.ops.hmt.*
        except Exception as err:  # ImportError, or OSError for a library built against another torch
            _state["error"] = err
        else:
            _register_fakes()
            _state["cuda"] = bool(module.build_info()["cuda"])
            _state["module"] = module
            return module
    err = _state["error"]
    raise ImportError(f"the native extension hmt_runtime._C is not available ({err}); {_BUILD_HINT}") from err


def available() -> bool:
    """Whether the native extension is built and loads."""
    try:
        _extension()
    except ImportError:
        return False
    return True


def build_info() -> dict:
    """What the extension was built with: cuda, openmp, cpu_isa, compiler (ImportError when not built)."""
    return dict(_extension().build_info())


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    """The native kernels take these tensors: no autograd recording, a kernel dtype, a device with kernels.

    Loads the extension on first use (ImportError when it is not built)."""
    if "module" not in _state:
        _extension()
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    first = tensors[0]
    if first.dtype not in KERNEL_DTYPES:
        return False
    return first.device.type == "cpu" or (first.device.type == "cuda" and _state.get("cuda", False))


def recall(summary, memory, keys, written, w_q, out=None, scale=None):
    """P = softmax((S W_q^T) K^T / sqrt(d_h)) @ memory over the valid slots; see ``hmt_runtime.core.ops``.

    summary: (B, d); memory: (B, N, d); keys: (B, N, d_h); written: (B,) int64; w_q: (d_h, d);
    out: optional (B, d), may be a strided view.  Returns P: (B, d) (zeros for rows with nothing written).
    scale: the factor of the scores; the native op has 1 / sqrt(d_h) built in, so another ``scale`` (the
    "linear" recall scale) runs the torch recall (one small op per segment).
    """
    if scale is not None or not _kernel_ok(summary, memory, keys, w_q):
        return recall_torch(summary, memory, keys, written, w_q, out=out, scale=scale)
    result = torch.ops.hmt.recall.default(summary, memory, keys, written, w_q)
    if out is not None:
        out.copy_(result)
        return out
    return result


def memory_write(new_memory, w_k, memory, keys, written) -> None:
    """Store new_memory (B, d) and its key new_memory @ w_k^T (w_k: (d_h, d)) at slot ``written % N`` of
    memory (B, N, d) and keys (B, N, d_h), then ``written += 1`` (B,) int64; all in place."""
    if not _kernel_ok(new_memory, w_k, memory, keys):
        return memory_write_torch(new_memory, w_k, memory, keys, written)
    torch.ops.hmt.memory_write.default(new_memory, w_k, memory, keys, written)
    return None


def attention_with_kvcache(q, k_new, v_new, k_cache, v_cache, cache_lens, scale=None):
    """Append k_new/v_new to the caches at ``cache_lens`` and attend causally (bottom-right); see ``hmt_runtime.core.ops``.

    q: (B, Lq, Hq, D); k_new, v_new: (B, Lq, Hkv, D); k_cache, v_cache: (B, Hkv, W, D), written in place at
    positions [cache_lens[b], cache_lens[b] + Lq); cache_lens: (B,) int (not advanced); Hq a multiple of Hkv.
    Returns (B, Lq, Hq, D) in q's dtype.
    """
    if not _kernel_ok(q, k_new, v_new, k_cache):
        return attention_with_kvcache_torch(q, k_new, v_new, k_cache, v_cache, cache_lens, scale=scale)
    return torch.ops.hmt.attention_with_kvcache.default(q, k_new, v_new, k_cache, v_cache, cache_lens, scale)


def _attention_supported(query: torch.Tensor) -> bool:
    """For transformers' attention: query (B, Hq, Lq, D) can take the native fast path."""
    return query.dtype in KERNEL_DTYPES and (
        query.device.type == "cpu" or (query.device.type == "cuda" and _state.get("cuda", False))
    )


@functools.lru_cache(maxsize=None)
def register() -> str | None:
    """Register the native attention as ``attn_implementation="hmt_native"`` in transformers (once).

    Returns the name, or None when transformers' attention registry is unavailable (the backbone then keeps
    its own attention; recall and memory write still run natively)."""
    _extension()
    try:
        from hmt_kernels.hf import register_attention
    except ImportError:
        return None
    # The append tolerates k_new/v_new that alias their destination in the cache (it is a memmove).
    register_attention(ATTN_IMPLEMENTATION, attention_with_kvcache, supports=_attention_supported, tail_aliasing=True)
    return ATTN_IMPLEMENTATION


def _registry_available() -> bool:
    try:
        return importlib.util.find_spec("hmt_kernels.hf") is not None
    except ImportError:
        return False


def ops() -> Ops:
    """The native backend as ``hmt_runtime.core.ops.Ops``; ImportError when the extension is not built.  The
    attention is registered with transformers when a transformers backbone first takes it (``Ops.register``):
    importing transformers' attention registry imports its modeling code (~170 MB)."""
    _extension()
    return Ops(
        name="native",
        recall=recall,
        memory_write=memory_write,
        attention_with_kvcache=attention_with_kvcache,
        attn_implementation=ATTN_IMPLEMENTATION if _registry_available() else None,
        register=register,
    )
