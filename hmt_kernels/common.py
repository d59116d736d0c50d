"""What the kernel modules share: where the kernels can run."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_device(name: str, tensor: torch.Tensor) -> None:
    """Raise unless ``tensor`` is on a device the kernels run on: CUDA, or the CPU under the interpreter."""
    if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreting()):
        return
    raise ValueError(
        f"{name} is on {tensor.device}: the Triton kernels need CUDA tensors "
        "(or TRITON_INTERPRET=1, set before importing them, to run in the CPU interpreter)"
    )
