// Weight-only linear layers y = x W^T (+ b): float32 activations, W stored as fp32, bf16, int8 with per-row
// scales, or llama.cpp's Q4_1 / Q8_0 blocks of 32 (formats: linear_isa.h), float32 accumulation.  Kernels:
// csrc/cpu/isa/linear_kernels.cpp, built for AVX-512, AVX2 and the portable target; the best build the CPU runs
// is chosen at load time (HMT_ISA=avx512|avx2|scalar overrides it; set_linear_isa changes it).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "linear_isa.h"

namespace hmt::cpu {

// "fp32", "bf16", "int8", "q4_1", "q8_0", and "q4_1:i8" / "q8_0:i8": the same blocks multiplied by x quantized
// to int8 per block of 32 with integer dot products when x has fewer than 4 rows (linear_isa.h, DotArgs), where *int_dot is set (ValueError
// naming the value otherwise).
WeightFormat parse_weight_format(const std::string& name, bool* int_dot = nullptr);

// A checked weight: what the kernels need besides x and y.  Build it once per layer (pack_linear), then call
// linear_parallel (which uses torch's pool, or the calling thread inside a parallel region).
struct PackedLinear {
  WeightFormat format;
  const uint8_t* w;
  int64_t row_bytes;
  const float* scale;  // (N,) for int8
  const float* bias;   // (N,) or nullptr
  int64_t n, k;        // W is (N, K)
  bool int_dot = false;  // Q4_1 / Q8_0 named with ":i8": the approximate path (integer dots, bfloat16 products)
};

// weight: fp32 / bf16 (N, K), int8 (N, K) with scale float32 (N,), q4_1 uint8 (N, ceil(K/32) * 20) or q8_0 uint8
// (N, ceil(K/32) * 34), last dimension contiguous; bias: float32 (N,) or none.  The tensors must outlive the
// PackedLinear (it holds their pointers).
PackedLinear pack_linear(const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& bias, const std::string& format, int64_t k);

// y[i, n] for i < m and all N outputs, split over torch's intra-op pool (the calling thread alone for small
// calls or inside a parallel region).  x row i at x + i * ldx (K floats); y[i, n] at y + i * ldy + n.  Weights
// packed from a ":i8" format take the integer dot products (linear_isa.h, DotArgs).
void linear_parallel(const PackedLinear& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy);

// A LoRA update y += scale B (A x) of one projection (linear_parallel_many).
struct LowRank {
  const PackedLinear* a;  // A (r, K), any format (":i8" for the integer dots)
  float scale;
  float* s;               // (m, r) scratch: receives scale * A x
  int64_t r;
  const void* tiles;      // B^T in tiles of kLowRankTile outputs (ceil(N / 16), r, 16), float32 or bfloat16
  bool bf16;
};

// linear_parallel of `count` projections ps[i] (same K, count <= kMaxSharedProjections) of the same x into ys[i]
// (row stride ldys[i]), in one parallel region: their weight rows split over the pool together, x quantized once
// for the integer dots.  low_rank (optional, one entry per projection, nullptr for none): s = scale * A x (r
// outputs per row of x, sharing x's quantization with the projections) in parts of A's rows that the region's
// threads share, each before its weight rows; then each thread adds s B^T to the rows it has just computed, so
// that both factors are read in parallel, the second beside the weight rows it updates.
constexpr int kMaxSharedProjections = 8;
void linear_parallel_many(const PackedLinear* const* ps, int count, const float* x, int64_t ldx, int64_t m,
                          float* const* ys, const int64_t* ldys, const LowRank* const* low_rank = nullptr);

// The op hmt::linear: x (..., K) float32 -> (..., N) float32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, const std::string& format);

// The op hmt::linear_out: x (M, K) float32 into out (M, N) float32 (last dimension contiguous, any row stride,
// so it may be a column slice of a wider buffer).
void linear_out(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias, const std::string& format, const at::Tensor& out);

// The instruction-set build in use ("avx512", "avx2" or "scalar"), the builds this CPU can run (best first), and
// a switch between them (ValueError for a build that is missing or that the CPU cannot run).
std::string linear_isa();
bool linear_bf16();  // whether the build in use has the bfloat16 products (Bf16Args) on this CPU
std::vector<std::string> linear_isas();
void set_linear_isa(const std::string& name);


}  // namespace hmt::cpu
