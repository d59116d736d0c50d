// Small portable SIMD layer for the CPU kernels.
//
// The kernels are written once against `vf8` (8 floats, GCC/Clang vector extensions) and compiled for several
// instruction sets with `HMT_CLONES` (function multiversioning: the loader picks the best clone for the running
// CPU), so the extension is portable (no -march=native) and still uses AVX2/FMA where present.  Everything a
// cloned function calls is `HMT_INLINE`, so it is inlined into, and compiled for, each clone.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if !defined(__GNUC__)
#error "the hmt CPU kernels need GCC or Clang vector extensions"
#endif

#define HMT_INLINE inline __attribute__((always_inline))

// Multiversioning is enabled where it is tested (GCC >= 12 on x86-64 Linux); elsewhere one baseline build.
#if defined(__x86_64__) && defined(__ELF__) && !defined(__clang__) && __GNUC__ >= 12
#define HMT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define HMT_MULTIVERSIONED 1
#else
#define HMT_CLONES
#endif

namespace hmt::cpu {

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));

// vector + scalar broadcasts the scalar; GCC compiles this to vbroadcastss, unlike a brace initialiser.
HMT_INLINE vf8 splat(float x) {
  const vf8 zero = {};
  return zero + x;
}

HMT_INLINE vf8 loadf(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

HMT_INLINE void storef(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

// Load 8 consecutive elements of any supported storage type as floats.
HMT_INLINE vf8 load8(const float* p) { return loadf(p); }

HMT_INLINE vf8 load8(const c10::BFloat16* p) {
  // bfloat16 is the upper half of a float32: widen and shift.
  vh8 h;
  std::memcpy(&h, p, sizeof(h));
  vu8 w = __builtin_convertvector(h, vu8) << 16;
  return (vf8)w;
}

HMT_INLINE vf8 load8(const c10::Half* p) {
  float tmp[8];
  for (int i = 0; i < 8; ++i) tmp[i] = static_cast<float>(p[i]);
  return loadf(tmp);
}

HMT_INLINE float to_float(float x) { return x; }
HMT_INLINE float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
HMT_INLINE float to_float(c10::Half x) { return static_cast<float>(x); }

HMT_INLINE float hsum(vf8 v) {
  vf4 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  vf4 s = lo + hi;
  return (s[0] + s[2]) + (s[1] + s[3]);
}

#if defined(__clang__) || __GNUC__ >= 12
#define HMT_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define HMT_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi8{__VA_ARGS__})
#endif

// Pairwise sums within 128-bit lanes (like _mm256_hadd_ps):
// [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7].
HMT_INLINE vf8 hadd(vf8 a, vf8 b) {
  return HMT_SHUFFLE(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + HMT_SHUFFLE(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// The horizontal sums of 4 vectors, as one vector [sum(a0), sum(a1), sum(a2), sum(a3)].
HMT_INLINE vf4 hsum4(vf8 a0, vf8 a1, vf8 a2, vf8 a3) {
  const vf8 h = hadd(hadd(a0, a1), hadd(a2, a3));  // [a0..a3 low halves | a0..a3 high halves]
  vf4 lo, hi;
  std::memcpy(&lo, &h, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&h) + sizeof(lo), sizeof(hi));
  return lo + hi;
}

// The horizontal sums of 8 vectors, as one vector [sum(a[0]), ..., sum(a[7])].
HMT_INLINE vf8 hsum8(const vf8* a) {
  const vf8 x = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));
  const vf8 y = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return HMT_SHUFFLE(x, y, 0, 1, 2, 3, 8, 9, 10, 11) + HMT_SHUFFLE(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
}

HMT_INLINE float hmax(vf8 v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

HMT_INLINE vf8 vmax(vf8 a, vf8 b) { return a > b ? a : b; }

// 2^x for x <= 0 (softmax arguments after subtracting the row maximum), relative error < 3e-7.
// Arguments below -126 (masked keys are -inf) give exactly 0, so a masked key never contributes.
HMT_INLINE vf8 exp2_nonpos(vf8 x) {
  const vf8 xc = vmax(x, splat(-127.0f));
  // Round to nearest integer with the 1.5 * 2^23 trick (exact for |x| < 2^22).
  const vf8 magic = splat(12582912.0f);
  const vf8 t = xc + magic;
  const vi8 n = (vi8)t - (vi8)magic;
  const vf8 f = xc - (t - magic);  // in [-0.5, 0.5]
  // 2^f, minimax polynomial (Cephes exp2f).
  vf8 p = splat(1.535336188319500e-4f);
  p = p * f + splat(1.339887440266574e-3f);
  p = p * f + splat(9.618437357674640e-3f);
  p = p * f + splat(5.550332471162809e-2f);
  p = p * f + splat(2.402264791363012e-1f);
  p = p * f + splat(6.931472028550421e-1f);
  p = p * f + splat(1.0f);
  const vi8 scaled = (vi8)p + (n << 23);
  const vi8 keep = x >= splat(-126.0f);  // all ones where kept
  return (vf8)(scaled & keep);
}

}  // namespace hmt::cpu
