// Weight-only linear kernels y = x W^T (+ b) for float32 activations and fp32 / bf16 / int8 / Q4_1 / Q8_0
// weights (formats and contract: csrc/cpu/linear_isa.h).
//
// This file is compiled once per instruction set (setup.py): HMT_LINEAR_NS names the build (avx512, avx2,
// scalar) and HMT_VEC_FLOATS its vector width in floats (16, 8, 4); the flags of each build (-mavx512f ...,
// -mavx2 -mfma -mf16c, or none) apply to this file only.  It includes no C++ library or ATen headers, and
// everything but the entry point has internal linkage (anonymous namespace), so nothing compiled here with
// wider instructions is shared with the rest of the extension.
//
// Work is tiled as MR rows of x by NR rows of W: each weight vector is dequantized to float32 in registers once
// (w = d q + m for Q4_1, d q for Q8_0, widening for bf16 / int8) and multiplied into MR accumulators, so the
// weights are read once per tile of MR rows and dequantized once per vector; rows of x are taken in blocks of
// kRowBlock so that such a block stays in cache while the weight rows stream past it.
#include <cstdint>

#include "../linear_isa.h"

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if !defined(HMT_LINEAR_NS) || !defined(HMT_VEC_FLOATS)
#error "compile with -DHMT_LINEAR_NS=<avx512|avx2|scalar> -DHMT_VEC_FLOATS=<16|8|4> (see setup.py)"
#endif

namespace hmt::cpu::HMT_LINEAR_NS {
namespace {

#define HMT_K_INLINE inline __attribute__((always_inline))

constexpr int W = HMT_VEC_FLOATS;  // floats per vector
static_assert(W == 4 || W == 8 || W == 16, "HMT_VEC_FLOATS must be 4, 8 or 16");
#if HMT_VEC_FLOATS == 16
constexpr int kNR = 4, kMR = 4;  // 32 zmm: 16 accumulators + 4 weight vectors + x
#elif HMT_VEC_FLOATS == 8
constexpr int kNR = 4, kMR = 2;  // 16 ymm: 8 accumulators + 4 weight vectors + x
#else
constexpr int kNR = 2, kMR = 2;
#endif
constexpr int64_t kRowBlock = 64;  // rows of x per block

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu32 __attribute__((vector_size(W * 4)));
typedef uint16_t vu16 __attribute__((vector_size(W * 2)));
typedef uint8_t vu8 __attribute__((vector_size(W)));
typedef int8_t vs8 __attribute__((vector_size(W)));
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));

template <typename T>
HMT_K_INLINE T load_bytes(const void* p) {
  T v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

HMT_K_INLINE vf loadf(const float* p) { return load_bytes<vf>(p); }

HMT_K_INLINE vf splat(float a) {
  const vf zero = {};
  return a - zero;  // broadcasts; a - 0 is a for every a (unlike 0 + a for -0), so no add is emitted
}

HMT_K_INLINE float hsum(vf v) {
#if HMT_VEC_FLOATS == 16
  vf8 a = load_bytes<vf8>(&v), b = load_bytes<vf8>(reinterpret_cast<const char*>(&v) + 32);
  vf8 s8 = a + b;
#elif HMT_VEC_FLOATS == 8
  vf8 s8 = v;
#endif
#if HMT_VEC_FLOATS >= 8
  vf4 c = load_bytes<vf4>(&s8), d = load_bytes<vf4>(reinterpret_cast<const char*>(&s8) + 16);
  vf4 s4 = c + d;
#else
  vf4 s4 = v;
#endif
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

HMT_K_INLINE float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    __builtin_memcpy(&bits, &magnitude, 4);
    bits |= sign;
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
#endif
}

HMT_K_INLINE float read_half(const uint8_t* p) { return half_to_float(load_bytes<uint16_t>(p)); }

// Widening loads of W integers (GCC turns __builtin_convertvector from bytes into element-wise inserts, so the
// x86 builds use the pmovzx / pmovsx instructions).
HMT_K_INLINE vi widen_u8(const uint8_t* p) {
#if HMT_VEC_FLOATS == 16 && defined(__AVX512F__)
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif HMT_VEC_FLOATS == 8 && defined(__AVX2__)
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  return __builtin_convertvector(load_bytes<vu8>(p), vi);
#endif
}

HMT_K_INLINE vi widen_s8(const uint8_t* p) {
#if HMT_VEC_FLOATS == 16 && defined(__AVX512F__)
  return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif HMT_VEC_FLOATS == 8 && defined(__AVX2__)
  return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  return __builtin_convertvector(load_bytes<vs8>(p), vi);
#endif
}

HMT_K_INLINE vu32 widen_u16(const uint8_t* p) {
#if HMT_VEC_FLOATS == 16 && defined(__AVX512F__)
  return (vu32)_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif HMT_VEC_FLOATS == 8 && defined(__AVX2__)
  return (vu32)_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  return __builtin_convertvector(load_bytes<vu16>(p), vu32);
#endif
}

// Rows of a blocked weight are a few hundred bytes: streams too short for the hardware prefetcher to ramp up on,
// so a tile over rows n0 .. n0 + NR prefetches the next tile's rows (contiguous: NR * row_bytes from row n0 + NR),
// a share of its cache lines at each of its `steps` steps (measured on the Q8_0 LM head at one row of x: 2.5x).
// Past the end of W the hint is harmless (prefetches do not fault).
HMT_K_INLINE void prefetch_next_tile(const uint8_t* w, int64_t row_bytes, int64_t n0, int nr, int64_t step,
                                     int64_t steps) {
  const uint8_t* ahead = w + (n0 + nr) * row_bytes;
  const int64_t lines = (nr * row_bytes + 63) / 64, per_step = (lines + steps - 1) / steps;
  for (int64_t l = step * per_step; l < (step + 1) * per_step && l < lines; ++l)
    __builtin_prefetch(ahead + l * 64, 0, 3);
}

// ---- formats: dense ones give vector `load(row, k)` (elements k .. k + W) and scalar `at(row, k)` -----------

struct F32 {
  static constexpr bool kBlocked = false;
  static HMT_K_INLINE vf load(const uint8_t* row, int64_t k) { return loadf(reinterpret_cast<const float*>(row) + k); }
  static HMT_K_INLINE float at(const uint8_t* row, int64_t k) { return load_bytes<float>(row + 4 * k); }
};

struct BF16 {
  static constexpr bool kBlocked = false;
  static HMT_K_INLINE vf load(const uint8_t* row, int64_t k) {
    const vu32 wide = widen_u16(row + 2 * k) << 16;
    return (vf)wide;
  }
  static HMT_K_INLINE float at(const uint8_t* row, int64_t k) {
    const uint32_t bits = static_cast<uint32_t>(load_bytes<uint16_t>(row + 2 * k)) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
  }
};

struct I8 {  // the row's scale is applied to the finished dot product
  static constexpr bool kBlocked = false;
  static HMT_K_INLINE vf load(const uint8_t* row, int64_t k) {
    return __builtin_convertvector(widen_s8(row + k), vf);
  }
  static HMT_K_INLINE float at(const uint8_t* row, int64_t k) {
    return static_cast<float>(static_cast<int8_t>(row[k]));
  }
};

// ---- block formats: 32 elements per block; `piece(block, p, d, m)` is elements p W .. p W + W of the block --

struct Q4_1 {
  static constexpr bool kBlocked = true;
  static constexpr int64_t kBlockBytes = 20;
  static HMT_K_INLINE void scales(const uint8_t* block, float& d, float& m) {
    d = read_half(block);
    m = read_half(block + 2);
  }
  static HMT_K_INLINE vf piece(const uint8_t* block, int p, vf d, vf m) {
    constexpr int kLow = 16 / W;  // pieces taken from the low nibbles
    const int byte0 = (p < kLow ? p : p - kLow) * W;
    const vi bytes = widen_u8(block + 4 + byte0);
    const vi q = p < kLow ? (bytes & 15) : (bytes >> 4);
    return __builtin_convertvector(q, vf) * d + m;  // d q is exact, so this rounds once (as an FMA would)
  }
  static HMT_K_INLINE float element(const uint8_t* block, int t) {
    const uint8_t byte = block[4 + (t & 15)];
    const int q = t < 16 ? (byte & 15) : (byte >> 4);
    return static_cast<float>(q) * read_half(block) + read_half(block + 2);
  }
};

struct Q8_0 {
  static constexpr bool kBlocked = true;
  static constexpr int64_t kBlockBytes = 34;
  static HMT_K_INLINE void scales(const uint8_t* block, float& d, float& m) {
    d = read_half(block);
    m = 0.0f;
  }
  static HMT_K_INLINE vf piece(const uint8_t* block, int p, vf d, vf) {
    const vi q = widen_s8(block + 2 + p * W);
    return __builtin_convertvector(q, vf) * d;  // exact
  }
  static HMT_K_INLINE float element(const uint8_t* block, int t) {
    return static_cast<float>(static_cast<int8_t>(block[2 + t])) * read_half(block);
  }
};

template <class F>
constexpr bool kRowScale = false;
template <>
constexpr bool kRowScale<I8> = true;

// ---- one tile: rows i0 .. i0 + MR of x against rows n0 .. n0 + NR of W ---------------------------------------

template <class F, int MR, int NR>
HMT_K_INLINE void tile(const LinearArgs& a, int64_t i0, int64_t n0) {
  constexpr int U = MR == 1 ? 2 : 1;  // a lone row gets two accumulator sets for more independent FMAs
  const int64_t K = a.k;
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = a.w + (n0 + r) * a.row_bytes;
  const float* xs[MR];
  for (int i = 0; i < MR; ++i) xs[i] = a.x + (i0 + i) * a.ldx;

  vf acc[U][MR][NR];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < NR; ++r) acc[u][i][r] = vf{};
  float tail[MR][NR] = {};

  if constexpr (F::kBlocked) {
    const int64_t full = K / 32;
    for (int64_t b = 0; b < full; ++b) {
      prefetch_next_tile(a.w, a.row_bytes, n0, NR, b, full);
      const uint8_t* blocks[NR];
      vf d[NR], m[NR];
      for (int r = 0; r < NR; ++r) {
        blocks[r] = rows[r] + b * F::kBlockBytes;
        float ds, ms;
        F::scales(blocks[r], ds, ms);
        d[r] = splat(ds);
        m[r] = splat(ms);
      }
#pragma GCC unroll 8
      for (int p = 0; p < 32 / W; ++p) {
        const int u = U == 2 ? (p & 1) : 0;
        vf w[NR];
        for (int r = 0; r < NR; ++r) w[r] = F::piece(blocks[r], p, d[r], m[r]);
        for (int i = 0; i < MR; ++i) {
          const vf xv = loadf(xs[i] + b * 32 + p * W);
          for (int r = 0; r < NR; ++r) acc[u][i][r] += xv * w[r];
        }
      }
    }
    const int rest = static_cast<int>(K - full * 32);
    if (rest > 0) {  // a partial last block: elements full * 32 .. K
      for (int r = 0; r < NR; ++r) {
        const uint8_t* block = rows[r] + full * F::kBlockBytes;
        for (int t = 0; t < rest; ++t) {
          const float wt = F::element(block, t);
          for (int i = 0; i < MR; ++i) tail[i][r] += xs[i][full * 32 + t] * wt;
        }
      }
    }
  } else {
    int64_t k = 0;
    if constexpr (U == 2) {
      for (; k + 2 * W <= K; k += 2 * W) {
#pragma GCC unroll 2
        for (int u = 0; u < 2; ++u) {
          vf w[NR];
          for (int r = 0; r < NR; ++r) w[r] = F::load(rows[r], k + u * W);
          const vf xv = loadf(xs[0] + k + u * W);
          for (int r = 0; r < NR; ++r) acc[u][0][r] += xv * w[r];
        }
      }
    }
    for (; k + W <= K; k += W) {
      vf w[NR];
      for (int r = 0; r < NR; ++r) w[r] = F::load(rows[r], k);
      for (int i = 0; i < MR; ++i) {
        const vf xv = loadf(xs[i] + k);
        for (int r = 0; r < NR; ++r) acc[0][i][r] += xv * w[r];
      }
    }
    for (; k < K; ++k) {
      for (int r = 0; r < NR; ++r) {
        const float wt = F::at(rows[r], k);
        for (int i = 0; i < MR; ++i) tail[i][r] += xs[i][k] * wt;
      }
    }
  }

  for (int i = 0; i < MR; ++i) {
    float* out = a.y + (i0 + i) * a.ldy + n0;
    for (int r = 0; r < NR; ++r) {
      vf total = acc[0][i][r];
      if constexpr (U == 2) total += acc[1][i][r];
      float s = hsum(total) + tail[i][r];
      if constexpr (kRowScale<F>) s *= a.scale[n0 + r];
      if (a.bias != nullptr) s += a.bias[n0 + r];
      out[r] = s;
    }
  }
}

// Rows m0 .. m1 of x against rows n0 .. n0 + NR of W, MR rows of x per tile.
template <class F, int MR, int NR>
void tile_column(const LinearArgs& a, int64_t m0, int64_t m1, int64_t n0) {
  int64_t i = m0;
  for (; i + MR <= m1; i += MR) tile<F, MR, NR>(a, i, n0);
  int64_t rest = m1 - i;
  if constexpr (MR > 4) {
    if (rest >= 4) {
      tile<F, 4, NR>(a, i, n0);
      i += 4;
      rest -= 4;
    }
  }
  if constexpr (MR > 3) {
    if (rest == 3) return tile<F, 3, NR>(a, i, n0);
  }
  if constexpr (MR > 2) {
    if (rest == 2) return tile<F, 2, NR>(a, i, n0);
  }
  if constexpr (MR > 1) {
    if (rest == 1) return tile<F, 1, NR>(a, i, n0);
  }
}

#if HMT_VEC_FLOATS == 16
constexpr int kWideMR = 8, kWideNR = 2;  // from 8 rows of x: each weight vector decoded once for 8 rows
#else
constexpr int kWideMR = kMR, kWideNR = kNR;
#endif

template <class F>
void run(const LinearArgs& a, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < a.m; m0 += kRowBlock) {
    const int64_t m1 = m0 + kRowBlock < a.m ? m0 + kRowBlock : a.m;
    int64_t n = n0;
    if (m1 - m0 >= kWideMR && kWideMR != kMR) {
      for (; n + kWideNR <= n1; n += kWideNR) tile_column<F, kWideMR, kWideNR>(a, m0, m1, n);
    } else {
      for (; n + kNR <= n1; n += kNR) tile_column<F, kMR, kNR>(a, m0, m1, n);
    }
    for (; n < n1; ++n) tile_column<F, kMR, 1>(a, m0, m1, n);
  }
}

// ---- integer dot products (DotArgs, linear_isa.h): one block of 32 is one 256-bit vector of bytes ----------

#if defined(__AVX2__)
#define HMT_DOT_SIMD 1
// u (unsigned bytes) . s (signed bytes) -> 8 int32 partial sums, exact for the ranges used here (|u| <= 128,
// |s| <= 127: maddubs's 16-bit pair sums stay below 2^15).
HMT_K_INLINE __m256i dot_i32(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

HMT_K_INLINE float hsum8(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
#endif

struct DotQ4_1 {
  static constexpr int64_t kBlockBytes = 20;
  static constexpr bool kMin = true;
#ifdef HMT_DOT_SIMD
  static HMT_K_INLINE __m256i unpack(const uint8_t* block) {  // elements 0..15 low nibbles, 16..31 high
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
  }
  static HMT_K_INLINE __m256i dot(__m256i w, __m256i x) { return dot_i32(w, x); }
#endif
  static HMT_K_INLINE int32_t dot_scalar(const uint8_t* block, const int8_t* x) {
    int32_t s = 0;
    for (int j = 0; j < 16; ++j) s += (block[4 + j] & 15) * x[j] + (block[4 + j] >> 4) * x[j + 16];
    return s;
  }
};

struct DotQ8_0 {
  static constexpr int64_t kBlockBytes = 34;
  static constexpr bool kMin = false;
#ifdef HMT_DOT_SIMD
  static HMT_K_INLINE __m256i unpack(const uint8_t* block) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
  }
  // |w| . (x with w's sign): unsigned by signed, as the instructions need
  static HMT_K_INLINE __m256i dot(__m256i w, __m256i x) {
    return dot_i32(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  }
#endif
  static HMT_K_INLINE int32_t dot_scalar(const uint8_t* block, const int8_t* x) {
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) s += static_cast<int8_t>(block[2 + j]) * x[j];
    return s;
  }
};

#if HMT_VEC_FLOATS == 16
constexpr int kDotNR = 4, kDotMR = 4;  // 32 ymm: 16 accumulators + 4 weight blocks + x
constexpr int kWideDotNR = kDotNR, kWideDotMR = kDotMR;
#else
constexpr int kDotNR = 4, kDotMR = 2;  // 16 ymm: 8 accumulators + 4 weight blocks + x
// from 4 rows of x (batched decode): 8 accumulators + 2 weight blocks + x, each block decoded once for 4 rows
constexpr int kWideDotNR = 2, kWideDotMR = 4;
#endif

// a b + c, rounded once where the build has FMA whatever the compiler vectorises, so that every tile shape sums
// a row's block terms alike (with contraction left to the compiler, one shape's got fused and another's not).
HMT_K_INLINE float mul_add(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

template <class F, int MR, int NR>
HMT_K_INLINE void dot_tile(const DotArgs& a, int64_t i0, int64_t n0) {
  const int64_t blocks = (a.k + 31) / 32;
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = a.w + (n0 + r) * a.row_bytes;
  const int8_t* xs[MR];
  const float* dxs[MR];
  const float* sxs[MR];
  for (int i = 0; i < MR; ++i) {
    xs[i] = a.qx + (i0 + i) * a.ldq;
    dxs[i] = a.dx + (i0 + i) * blocks;
    sxs[i] = a.sx + (i0 + i) * blocks;
  }
  float mins[MR][NR] = {};
#ifdef HMT_DOT_SIMD
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_next_tile(a.w, a.row_bytes, n0, NR, b, blocks);
    __m256i w[NR];
    float dw[NR], mw[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* block = rows[r] + b * F::kBlockBytes;
      dw[r] = read_half(block);
      mw[r] = F::kMin ? read_half(block + 2) : 0.0f;
      w[r] = F::unpack(block);
    }
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[i] + b * 32));
      const float dxi = dxs[i][b], sxi = sxs[i][b];
      for (int r = 0; r < NR; ++r) {
        const __m256 prod = _mm256_cvtepi32_ps(F::dot(w[r], xv));
        acc[i][r] = _mm256_fmadd_ps(prod, _mm256_set1_ps(dw[r] * dxi), acc[i][r]);
        if constexpr (F::kMin) mins[i][r] = mul_add(mw[r], sxi, mins[i][r]);
      }
    }
  }
#else
  float acc[MR][NR] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_next_tile(a.w, a.row_bytes, n0, NR, b, blocks);
    for (int r = 0; r < NR; ++r) {
      const uint8_t* block = rows[r] + b * F::kBlockBytes;
      const float dw = read_half(block), mw = F::kMin ? read_half(block + 2) : 0.0f;
      for (int i = 0; i < MR; ++i) {
        acc[i][r] += static_cast<float>(F::dot_scalar(block, xs[i] + b * 32)) * (dw * dxs[i][b]);
        if constexpr (F::kMin) mins[i][r] = mul_add(mw, sxs[i][b], mins[i][r]);
      }
    }
  }
#endif
  for (int i = 0; i < MR; ++i) {
    float* out = a.y + (i0 + i) * a.ldy + n0;
    for (int r = 0; r < NR; ++r) {
#ifdef HMT_DOT_SIMD
      float s = hsum8(acc[i][r]) + mins[i][r];
#else
      float s = acc[i][r] + mins[i][r];
#endif
      if (a.bias != nullptr) s += a.bias[n0 + r];
      out[r] = s;
    }
  }
}

template <class F, int MR, int NR>
void dot_column(const DotArgs& a, int64_t m0, int64_t m1, int64_t n0) {
  int64_t i = m0;
  for (; i + MR <= m1; i += MR) dot_tile<F, MR, NR>(a, i, n0);
  const int64_t rest = m1 - i;
  if constexpr (MR > 3) {
    if (rest == 3) return dot_tile<F, 3, NR>(a, i, n0);
  }
  if constexpr (MR > 2) {
    if (rest == 2) return dot_tile<F, 2, NR>(a, i, n0);
  }
  if (rest == 1) dot_tile<F, 1, NR>(a, i, n0);
}

// Every tile shape sums each output's blocks in the same order, so a row of x gets the same y alone or batched.
template <class F>
void dot_run(const DotArgs& a, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < a.m; m0 += kRowBlock) {
    const int64_t m1 = m0 + kRowBlock < a.m ? m0 + kRowBlock : a.m;
    int64_t n = n0;
    if (m1 - m0 >= kWideDotMR && kWideDotMR != kDotMR) {
      for (; n + kWideDotNR <= n1; n += kWideDotNR) dot_column<F, kWideDotMR, kWideDotNR>(a, m0, m1, n);
    } else {
      for (; n + kDotNR <= n1; n += kDotNR) dot_column<F, kDotMR, kDotNR>(a, m0, m1, n);
    }
    for (; n < n1; ++n) dot_column<F, kDotMR, 1>(a, m0, m1, n);
  }
}

}  // namespace

void linear_rows(const LinearArgs& args, int64_t n0, int64_t n1) {
  switch (args.format) {
    case WeightFormat::kF32:
      return run<F32>(args, n0, n1);
    case WeightFormat::kBF16:
      return run<BF16>(args, n0, n1);
    case WeightFormat::kI8:
      return run<I8>(args, n0, n1);
    case WeightFormat::kQ4_1:
      return run<Q4_1>(args, n0, n1);
    case WeightFormat::kQ8_0:
      return run<Q8_0>(args, n0, n1);
  }
}

}  // namespace hmt::cpu::HMT_LINEAR_NS

namespace hmt::cpu::HMT_LINEAR_NS {

void dot_rows(const DotArgs& args, int64_t n0, int64_t n1) {
  if (args.format == WeightFormat::kQ4_1) return dot_run<DotQ4_1>(args, n0, n1);
  if (args.format == WeightFormat::kQ8_0) return dot_run<DotQ8_0>(args, n0, n1);
}

// Rows of x (m, K) -> q (m, ldq) int8 (zero past K), d and s (m, ceil(K / 32)).
void quantize_x(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* q, int64_t ldq, float* d, float* s) {
  const int64_t blocks = (k + 31) / 32;
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    int8_t* qi = q + i * ldq;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t start = b * 32, take = k - start < 32 ? k - start : 32;
      float amax = 0.0f;
      for (int64_t j = 0; j < take; ++j) {
        const float v = xi[start + j] < 0 ? -xi[start + j] : xi[start + j];
        amax = v > amax ? v : amax;
      }
      const float db = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t total = 0;
      for (int64_t j = 0; j < 32; ++j) {
        int32_t v = 0;
        if (j < take) {
          v = static_cast<int32_t>(__builtin_nearbyintf(xi[start + j] * inv));
          v = v > 127 ? 127 : (v < -127 ? -127 : v);
        }
        qi[start + j] = static_cast<int8_t>(v);
        total += v;
      }
      d[i * blocks + b] = db;
      s[i * blocks + b] = db * static_cast<float>(total);
    }
  }
}

namespace {
template <class F>
void dequantize_run(const uint8_t* w, int64_t row_bytes, int64_t k, int64_t n0, int64_t n1, float* out) {
  const int64_t full = k / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    float* o = out + (n - n0) * k;
    for (int64_t b = 0; b < full; ++b) {
      const uint8_t* block = row + b * F::kBlockBytes;
      float ds, ms;
      F::scales(block, ds, ms);
      const vf d = splat(ds), m = splat(ms);
      for (int p = 0; p < 32 / W; ++p) {
        const vf v = F::piece(block, p, d, m);
        __builtin_memcpy(o + b * 32 + p * W, &v, sizeof(v));
      }
    }
    for (int64_t t = full * 32; t < k; ++t) o[t] = F::element(row + full * F::kBlockBytes, static_cast<int>(t - full * 32));
  }
}
}  // namespace

void dequantize_blocks(WeightFormat format, const uint8_t* w, int64_t row_bytes, int64_t k, int64_t n0, int64_t n1,
                       float* out) {
  if (format == WeightFormat::kQ4_1) return dequantize_run<Q4_1>(w, row_bytes, k, n0, n1, out);
  if (format == WeightFormat::kQ8_0) return dequantize_run<Q8_0>(w, row_bytes, k, n0, n1, out);
}

void add_low_rank(float* y, int64_t n, const float* s, int64_t r, const void* tiles, bool bf16) {
  static_assert(kLowRankTile % W == 0, "a tile is whole vectors");
  const uint8_t* base = static_cast<const uint8_t*>(tiles);
  const int64_t esize = bf16 ? 2 : 4, tile_bytes = r * kLowRankTile * esize;
  for (int64_t t0 = 0; t0 < n; t0 += kLowRankTile) {
    const uint8_t* tile = base + (t0 / kLowRankTile) * tile_bytes;
    if (t0 + kLowRankTile <= n) {
      for (int64_t v = 0; v < kLowRankTile; v += W) {
        vf acc = loadf(y + t0 + v);
        for (int64_t j = 0; j < r; ++j) {
          const uint8_t* row = tile + j * kLowRankTile * esize;
          acc += splat(s[j]) * (bf16 ? BF16::load(row, v) : F32::load(row, v));
        }
        __builtin_memcpy(y + t0 + v, &acc, sizeof(acc));
      }
    } else {
      for (int64_t o = t0; o < n; ++o) {
        float acc = y[o];
        for (int64_t j = 0; j < r; ++j) {
          const uint8_t* row = tile + j * kLowRankTile * esize;
          acc += s[j] * (bf16 ? BF16::at(row, o - t0) : F32::at(row, o - t0));
        }
        y[o] = acc;
      }
    }
  }
}

// ---- bfloat16 products (Bf16Args, linear_isa.h): AVX512-BF16 only, chosen per function (target attribute) -----
#if HMT_VEC_FLOATS == 16 && defined(__AVX512F__)
#define HMT_BF16_TARGET __attribute__((target("avx512bf16")))

namespace {

// One block of 32 weights of format F (DotQ4_1 / DotQ8_0: the block layouts of the integer dots) as 32
// bfloat16 (element j of the block in lane j).
template <class F>
HMT_BF16_TARGET HMT_K_INLINE __m512bh block_bf16(const uint8_t* block) {
  const __m512 d = _mm512_set1_ps(read_half(block));
  __m512 lo, hi;
  if constexpr (F::kMin) {  // Q4_1
    const __m512 m = _mm512_set1_ps(read_half(block + 2));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4));
    const __m128i mask = _mm_set1_epi8(0x0F);
    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)));
    lo = _mm512_fmadd_ps(lo, d, m);  // d q exact: one rounding, the float32-exact kernels' value
    hi = _mm512_fmadd_ps(hi, d, m);
  } else {
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2)))), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 18)))), d);
  }
  return _mm512_cvtne2ps_pbh(hi, lo);  // lanes 0..15 from lo, 16..31 from hi
}

// Rows i0 .. i0 + MR of x against rows n0 .. n0 + NR of W.  A partial last block is read whole: its weights past
// K are finite and meet x's zeros.
template <class F, int MR, int NR>
HMT_BF16_TARGET HMT_K_INLINE void bf16_tile(const Bf16Args& a, int64_t i0, int64_t n0) {
  const int64_t blocks = (a.k + 31) / 32;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_next_tile(a.w, a.row_bytes, n0, NR, b, blocks);
    __m512bh w[NR];
    for (int r = 0; r < NR; ++r) w[r] = block_bf16<F>(a.w + (n0 + r) * a.row_bytes + b * F::kBlockBytes);
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(a.xb + (i0 + i) * a.ldxb + b * 32);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], w[r], xv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      float s = _mm512_reduce_add_ps(acc[i][r]);
      if (a.bias != nullptr) s += a.bias[n0 + r];
      a.y[(i0 + i) * a.ldy + n0 + r] = s;
    }
}

template <class F, int MR, int NR>
HMT_BF16_TARGET void bf16_column(const Bf16Args& a, int64_t i0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) bf16_tile<F, MR, NR>(a, i0, n);
  for (; n < n1; ++n) bf16_tile<F, MR, 1>(a, i0, n);
}

// 8 rows of x at a time (16 accumulators, 2 weight blocks: each block decoded once for 8 rows), then 4, 2, 1.
template <class F>
HMT_BF16_TARGET void bf16_run(const Bf16Args& a, int64_t n0, int64_t n1) {
  int64_t i = 0;
  for (; i + 8 <= a.m; i += 8) bf16_column<F, 8, 2>(a, i, n0, n1);
  if (i + 4 <= a.m) bf16_column<F, 4, 4>(a, i, n0, n1), i += 4;
  if (i + 2 <= a.m) bf16_column<F, 2, 4>(a, i, n0, n1), i += 2;
  if (i < a.m) bf16_column<F, 1, 4>(a, i, n0, n1);
}

}  // namespace

void bf16_rows(const Bf16Args& args, int64_t n0, int64_t n1) {
  if (args.format == WeightFormat::kQ4_1) return bf16_run<DotQ4_1>(args, n0, n1);
  if (args.format == WeightFormat::kQ8_0) return bf16_run<DotQ8_0>(args, n0, n1);
}

bool bf16_rows_supported() { return __builtin_cpu_supports("avx512bf16"); }
#else
void bf16_rows(const Bf16Args&, int64_t, int64_t) {}
bool bf16_rows_supported() { return false; }
#endif

bool dot_uses_vnni() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return true;
#else
  return false;
#endif
}

}  // namespace hmt::cpu::HMT_LINEAR_NS
