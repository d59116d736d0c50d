// Registration of the hmt ops with the PyTorch dispatcher (torch.ops.hmt.*), and the Python module
// hmt_runtime._C that loads them.  Contracts: hmt_runtime/ops.py.  Fake (meta) kernels for torch.compile are
// registered in Python (hmt_runtime/native.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/decode.h"
#include "cpu/linear.h"
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
  // Weight-only linear layers (csrc/cpu/linear.h): format is fp32, bf16, int8, q4_1 or q8_0, or q4_1:i8 / q8_0:i8
  // (int8 activations, integer dot products, for fewer than 4 rows of x).
  m.def("linear(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, str format) -> Tensor");
  m.def("linear_out(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, str format, Tensor(a!) out) -> ()");
  // One decode position of a Llama-family decoder (csrc/cpu/decode.cpp; contract: hmt_runtime/engines.py).
  m.def(
      "decode_step(Tensor x, Tensor[] weights, Tensor?[] scales, Tensor?[] biases, str[] formats, Tensor?[] lora_a, "
      "Tensor?[] lora_b, float[] lora_scale, Tensor[] norms, float[] eps, Tensor cos, Tensor sin_signed, "
      "Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor lens, float scale, int q_heads, int kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(hmt, CPU, m) {
  m.impl("attention_with_kvcache", &hmt::cpu::attention_with_kvcache);
  m.impl("recall", &hmt::cpu::recall);
  m.impl("memory_write", &hmt::cpu::memory_write);
  m.impl("linear", &hmt::cpu::linear);
  m.impl("linear_out", &hmt::cpu::linear_out);
  m.impl("decode_step", &hmt::cpu::decode_step);
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
  try {
    info["linear_isa"] = hmt::cpu::linear_isa();  // the build of the weight-only linear kernels in use
  } catch (const c10::Error& err) {  // a bad HMT_ISA: reported here, raised by the linear ops
    info["linear_isa"] = std::string("error: ") + err.what_without_backtrace();
  }
  info["linear_isas"] = hmt::cpu::linear_isas();
  try {
    info["linear_bf16"] = hmt::cpu::linear_bf16();  // bfloat16 products beside the integer dots (AVX512-BF16)
  } catch (const c10::Error&) {
    info["linear_bf16"] = false;
  }  // the builds this CPU can run, best first
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native hmt ops; importing this module registers torch.ops.hmt.*";
  m.def("build_info", &build_info,
        "dict: cuda (CUDA kernels compiled in), openmp, cpu_isa (instruction set the CPU kernels run with), "
        "linear_isa and linear_isas (the weight-only linear kernels' build in use and those this CPU runs), "
        "linear_bf16 (that build's bfloat16 products run here), compiler");
  m.def("set_linear_isa", &hmt::cpu::set_linear_isa, pybind11::arg("name"),
        "Use the avx512, avx2 or scalar build of the weight-only linear kernels (ValueError when unavailable)");
}
