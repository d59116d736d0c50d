// The instruction-set builds of the weight-only linear kernels (csrc/cpu/isa/linear_kernels.cpp).
//
// That file is compiled once per instruction set with its own flags (setup.py): -mavx512f/bw/vl/dq -mfma -mf16c
// ("avx512"), -mavx2 -mfma -mf16c ("avx2") and none at all ("scalar", the portable build).  It includes nothing
// but this header and the compiler's intrinsics, and everything in it has internal linkage apart from the one
// entry point per build below, so no inline function compiled for AVX-512 can be picked by the linker for code
// that runs on a CPU without it.  csrc/cpu/linear.cpp chooses the build at run time.
#pragma once

#include <cstdint>

namespace hmt::cpu {

// How the weight matrix W (N, K) is stored; one row of W is `row_bytes` bytes at w + n * row_bytes.
enum class WeightFormat : int32_t {
  kF32 = 0,   // float32 (N, K)
  kBF16 = 1,  // bfloat16 (N, K)
  kI8 = 2,    // int8 (N, K), w[n, k] = q[n, k] * scale[n] with float32 scale (N,)
  kQ4_1 = 3,  // llama.cpp block_q4_1: ceil(K / 32) blocks of 20 bytes per row (fp16 d, fp16 m, 16 bytes of
              // nibbles; element j < 16 is the low nibble of byte j, element j + 16 its high nibble), w = d q + m
  kQ8_0 = 4,  // llama.cpp block_q8_0: ceil(K / 32) blocks of 34 bytes per row (fp16 d, 32 int8), w = d q
};

// One call: y[i, n] = sum_k x[i, k] w[n, k] (+ bias[n]) for i < m and n0 <= n < n1, accumulated in float32 from
// the weights dequantized to float32 (exact: d q + m and d q are exact float32 values for fp16 d, m and 4- or
// 8-bit q; for int8 the per-row scale multiplies the row's dot product).  The last block of a row may be partial
// (K not a multiple of 32); elements at or beyond K are never read from x.
struct LinearArgs {
  WeightFormat format;
  const uint8_t* w;     // row n at w + n * row_bytes
  int64_t row_bytes;
  const float* scale;   // (N,) for kI8, else unused
  int64_t k;            // K
  const float* x;       // row i at x + i * ldx (K floats)
  int64_t ldx;
  int64_t m;            // rows of x
  const float* bias;    // (N,) or nullptr
  float* y;             // y[i, n] at y + i * ldy + n
  int64_t ldy;
};

// Integer dot products (llama.cpp's scheme): each row of x quantized per block of 32 to int8, q = round(x / d),
// d = max |x| / 127 over the block (quantize_x), then per block of a Q4_1 or Q8_0 weight row
//   Q4_1: d_w d_x sum(q_w q_x) + m_w s_x,   Q8_0: d_w d_x sum(q_w q_x),   s_x = d_x sum(q_x),
// the integer sums exact (int32), the block terms accumulated in float32.  The error against the float32-exact
// kernels is that of replacing x by its quantized value d_x q_x, at most d_x / 2 per element.
struct DotArgs {
  WeightFormat format;  // kQ4_1 or kQ8_0
  const uint8_t* w;     // row n at w + n * row_bytes
  int64_t row_bytes;
  int64_t k;            // K (the last block may be partial: the quantized x is zero past K)
  const int8_t* qx;     // row i at qx + i * ldq (ceil(K / 32) * 32 int8, zero past K)
  int64_t ldq;
  const float* dx;      // (m, ceil(K / 32)): d_x of each block of each row
  const float* sx;      // (m, ceil(K / 32)): s_x = d_x sum(q_x)
  int64_t m;            // rows of x
  const float* bias;    // (N,) or nullptr
  float* y;             // y[i, n] at y + i * ldy + n
  int64_t ldy;
};

// bfloat16 products for a few rows of x beside the integer dots (4 <= m < 32; CPUs with AVX512-BF16): x rounded
// to bfloat16 once (xb, zero past K up to whole blocks), each Q4_1 / Q8_0 block dequantized to float32 (exact)
// and rounded to bfloat16 once per tile of rows, vdpbf16ps into float32 accumulators; bias in float32.  The
// error against the float32-exact kernels is that of the two roundings (2^-9 relative each).
struct Bf16Args {
  WeightFormat format;  // kQ4_1 or kQ8_0
  const uint8_t* w;     // row n at w + n * row_bytes
  int64_t row_bytes;
  int64_t k;            // K (the last block may be partial: xb is zero past K)
  const uint16_t* xb;   // row i at xb + i * ldxb: ceil(K / 32) * 32 bfloat16 bit patterns
  int64_t ldxb;
  int64_t m;            // rows of x
  const float* bias;    // (N,) or nullptr
  float* y;             // y[i, n] at y + i * ldy + n
  int64_t ldy;
};

// dequantize_blocks: rows n0 .. n1 of Q4_1 / Q8_0 blocks as float32 into out (n1 - n0, K), d q + m and d q exactly
// as the float32-exact kernels see them (the panels of linear_gemm).
// add_low_rank: y[o] += sum_j s[j] B^T[j, o] for o < n, B^T in tiles of kLowRankTile outputs (tile t: r rows of 16
// coefficients, tiles[t * r * 16 + j * 16 + i] = B^T[j, 16 t + i], float32 or (bf16) bfloat16, zero past N):
// the r outputs s of A x scaled into a LoRA update, read sequentially; each y vector loaded and stored once.
#define HMT_LINEAR_BUILD_ENTRIES                                                                     \
  void linear_rows(const LinearArgs& args, int64_t n0, int64_t n1);                                  \
  void add_low_rank(float* y, int64_t n, const float* s, int64_t r, const void* tiles, bool bf16);    \
  void dot_rows(const DotArgs& args, int64_t n0, int64_t n1);                                        \
  void quantize_x(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* q, int64_t ldq, float* d, \
                  float* s);                                                                         \
  bool dot_uses_vnni();                                                                              \
  void bf16_rows(const Bf16Args& args, int64_t n0, int64_t n1);                                      \
  bool bf16_rows_supported();                                                                        \
  void dequantize_blocks(WeightFormat format, const uint8_t* w, int64_t row_bytes, int64_t k, int64_t n0, \
                         int64_t n1, float* out);

constexpr int64_t kLowRankTile = 16;
// Bytes of one tile of B^T (r rows of kLowRankTile coefficients, float32 or bfloat16).
inline int64_t low_rank_tile_bytes(int64_t r, bool bf16) { return r * kLowRankTile * (bf16 ? 2 : 4); }

namespace avx512 {
HMT_LINEAR_BUILD_ENTRIES
}
namespace avx2 {
HMT_LINEAR_BUILD_ENTRIES
}
namespace scalar {
HMT_LINEAR_BUILD_ENTRIES
}

}  // namespace hmt::cpu
