"""The native extension ``hmt_runtime._C`` (C++ / CUDA kernels in csrc/), loaded once: kernels (the HMT ops as
``torch.ops.hmt.*``) and quant (weight formats, quantized linear layers).  Stands on core only.
"""
