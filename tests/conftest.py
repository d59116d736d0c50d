# --- Triton: run kernels in the CPU interpreter when there is no CUDA device. -----------------------------------
# Must happen before any module that imports triton kernels is imported (Triton reads it at decoration time).
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# --- end Triton -------------------------------------------------------------------------------------------------
