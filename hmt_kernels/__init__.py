"""Triton kernels for HMT's hot path, and their transformers integration.

* ``recall`` / ``memory_write`` (``hmt_kernels.recall``): the memory recall and the ring-buffer write, one launch
  each, no host synchronisation.
* ``attention_with_kvcache`` (``hmt_kernels.attention``): causal segment attention that appends the new keys and
  values to the KV cache in the same launch (prefill), with a split-K path for single-token decode.
* ``hmt_kernels.hf``: ``register_attention`` and ``SegmentKVCache`` for transformers models.

The package stands alone: it imports nothing of ``hmt_runtime``.  Submodules import Triton lazily, so
``hmt_kernels.hf`` works without it.
"""
from __future__ import annotations

ATTN_IMPLEMENTATION = "hmt_triton"


def _triton_supports(query) -> bool:
    """The kernels take fp16/bf16/fp32 CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    import torch

    from hmt_kernels.attention import MAX_HEAD_DIM
    from hmt_kernels.common import interpreting

    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or query.shape[-1] > MAX_HEAD_DIM:
        return False
    return query.is_cuda or (query.device.type == "cpu" and interpreting())


def register() -> None:
    """Register the Triton attention as ``attn_implementation="hmt_triton"`` in transformers."""
    from hmt_kernels.attention import attention_with_kvcache
    from hmt_kernels.hf import register_attention

    register_attention(ATTN_IMPLEMENTATION, attention_with_kvcache, supports=_triton_supports, tail_aliasing=True)


__all__ = ["ATTN_IMPLEMENTATION", "register"]
