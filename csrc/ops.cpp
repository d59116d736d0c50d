// Registration of the hmt ops with the PyTorch dispatcher (torch.ops.hmt.*), and the Python module
// hmt_runtime._C that loads them.  Contracts: hmt_runtime/ops.py.  Fake (meta) kernels for torch.compile are
// registered in Python (hmt_runtime/native.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/ops_cpu.h"
#include "cpu/vec.h"
#ifdef HMT_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

TORCH_LIBRARY(hmt, m) {
  m.def(
      "attention_with_kvcache(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor cache_lens, float? scale=None) -> Tensor");
  m.def("recall(Tensor summary, Tensor memory, Tensor keys, Tensor written, Tensor w_q) -> Tensor");
  m.def(
      "memory_write(Tensor new_memory, Tensor w_k, Tensor(a!) memory, Tensor(b!) keys, Tensor(c!) written) -> ()");
}

TORCH_LIBRARY_IMPL(hmt, CPU, m) {
  m.impl("attention_with_kvcache", &hmt::cpu::attention_with_kvcache);
  m.impl("recall", &hmt::cpu::recall);
  m.impl("memory_write", &hmt::cpu::memory_write);
}

#ifdef HMT_WITH_CUDA
TORCH_LIBRARY_IMPL(hmt, CUDA, m) {
  m.impl("attention_with_kvcache", &hmt::cuda::attention_with_kvcache);
  m.impl("recall", &hmt::cuda::recall);
  m.impl("memory_write", &hmt::cuda::memory_write);
}
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef HMT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef HMT_MULTIVERSIONED
  // The clone the loader picked for this CPU.
  info["cpu_isa"] = __builtin_cpu_supports("x86-64-v3") ? "x86-64-v3" : "x86-64";
#else
  info["cpu_isa"] = "baseline";  // built once, for the compiler's default target
#endif
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native hmt ops; importing this module registers torch.ops.hmt.*";
  m.def("build_info", &build_info,
        "dict: cuda (CUDA kernels compiled in), openmp, cpu_isa (instruction set the CPU kernels run with), compiler");
}
