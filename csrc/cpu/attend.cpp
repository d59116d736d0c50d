// The CPU attention kernel (see attend.h): tiles of kKeyTile keys, blocks of up to 4 query rows, an online
// base-2 softmax across tiles.  Register blocking: a block of RB rows and KB keys keeps RB * KB independent
// dot-product accumulators, enough to hide the FMA latency.
#include "attend.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace hmt::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kRowBlock = 4;

// s[r * ss + c] = q_r . k_c for RB rows (qs apart) and KB keys (ks apart), d elements each.  KB is 1, 4 or 8:
// the KB accumulators of a row are reduced together (hsum4 / hsum8), which is much cheaper than KB
// separate horizontal sums.
template <typename T, int RB, int KB>
HMT_INLINE void dot_block(const float* q, int64_t qs, const T* k, int64_t ks, int64_t d, float* s, int64_t ss) {
  static_assert(KB == 1 || KB == 4 || KB == 8, "dot_block reduces 1, 4 or 8 keys at a time");
  vf8 acc[RB][KB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < KB; ++c) acc[r][c] = splat(0.0f);
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    vf8 kv[KB];
#pragma GCC unroll 8
    for (int c = 0; c < KB; ++c) kv[c] = load8(k + c * ks + j);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const vf8 qv = loadf(q + r * qs + j);
#pragma GCC unroll 8
      for (int c = 0; c < KB; ++c) acc[r][c] += qv * kv[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    float* out = s + r * ss;
    if constexpr (KB == 8) {
      storef(out, hsum8(acc[r]));
    } else if constexpr (KB == 4) {
      const vf4 sums = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      std::memcpy(out, &sums, sizeof(sums));
    } else {
      out[0] = hsum(acc[r][0]);
    }
    if (j < d) {  // head dims that are not a multiple of 8
#pragma GCC unroll 8
      for (int c = 0; c < KB; ++c)
        for (int64_t jj = j; jj < d; ++jj) out[c] += q[r * qs + jj] * to_float(k[c * ks + jj]);
    }
  }
}

// Scores of RB rows against nt keys: s (RB, kKeyTile).  Rows go in pairs (2 x 4 keys) and a single row
// (1 x 8 keys): 8 accumulators either way, which fits the 16 vector registers of AVX2.
template <typename T, int RB>
HMT_INLINE void score_block(const float* q, int64_t qs, const T* k, int64_t ks, int64_t nt, int64_t d, float* s) {
  if constexpr (RB >= 2) {
    int64_t t = 0;
    for (; t + 4 <= nt; t += 4) dot_block<T, 2, 4>(q, qs, k + t * ks, ks, d, s + t, kKeyTile);
    for (; t < nt; ++t) dot_block<T, 2, 1>(q, qs, k + t * ks, ks, d, s + t, kKeyTile);
    score_block<T, RB - 2>(q + 2 * qs, qs, k, ks, nt, d, s + 2 * kKeyTile);
  } else if constexpr (RB == 1) {
    int64_t t = 0;
    for (; t + 8 <= nt; t += 8) dot_block<T, 1, 8>(q, qs, k + t * ks, ks, d, s + t, kKeyTile);
    for (; t + 4 <= nt; t += 4) dot_block<T, 1, 4>(q, qs, k + t * ks, ks, d, s + t, kKeyTile);
    for (; t < nt; ++t) dot_block<T, 1, 1>(q, qs, k + t * ks, ks, d, s + t, kKeyTile);
  }
}

// acc_r += sum_t p[r, t] * v_t for RB rows; p (RB, kKeyTile), acc (RB, as).
template <typename T, int RB>
HMT_INLINE void pv_block(const float* p, const T* v, int64_t vs, int64_t nt, int64_t dv, float* acc, int64_t as) {
  int64_t c = 0;
  for (; c + 16 <= dv; c += 16) {
    vf8 a0[RB], a1[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      a0[r] = loadf(acc + r * as + c);
      a1[r] = loadf(acc + r * as + c + 8);
    }
    for (int64_t t = 0; t < nt; ++t) {
      const vf8 v0 = load8(v + t * vs + c);
      const vf8 v1 = load8(v + t * vs + c + 8);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        const vf8 pr = splat(p[r * kKeyTile + t]);
        a0[r] += pr * v0;
        a1[r] += pr * v1;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      storef(acc + r * as + c, a0[r]);
      storef(acc + r * as + c + 8, a1[r]);
    }
  }
  for (; c + 8 <= dv; c += 8) {
    vf8 a0[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) a0[r] = loadf(acc + r * as + c);
    for (int64_t t = 0; t < nt; ++t) {
      const vf8 v0 = load8(v + t * vs + c);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) a0[r] += splat(p[r * kKeyTile + t]) * v0;
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) storef(acc + r * as + c, a0[r]);
  }
  for (; c < dv; ++c)
    for (int r = 0; r < RB; ++r) {
      float x = acc[r * as + c];
      for (int64_t t = 0; t < nt; ++t) x += p[r * kKeyTile + t] * to_float(v[t * vs + c]);
      acc[r * as + c] = x;
    }
}

// Online softmax update of one row for one tile: s[0, valid) are scores, turned into weights in place;
// s[valid, nt) become 0.  Rescales l and acc to the new maximum.
HMT_INLINE void softmax_row(float* s, int64_t nt, int64_t valid, float& m, float& l, float* acc, int64_t dv) {
  if (valid <= 0) {
    for (int64_t t = 0; t < nt; ++t) s[t] = 0.0f;
    return;
  }
  vf8 mv = splat(kNegInf);
  int64_t t = 0;
  for (; t + 8 <= valid; t += 8) mv = vmax(mv, loadf(s + t));
  float tile_max = hmax(mv);
  for (; t < valid; ++t) tile_max = std::max(tile_max, s[t]);
  const float m_new = std::max(m, tile_max);
  const vf8 shift = splat(m_new);
  vf8 sum = splat(0.0f);
  for (t = 0; t + 8 <= valid; t += 8) {
    const vf8 p = exp2_nonpos(loadf(s + t) - shift);
    storef(s + t, p);
    sum += p;
  }
  if (t < valid) {  // tail: pad with -inf so the same approximation is used (and gives 0 there)
    float tail[8];
    for (int i = 0; i < 8; ++i) tail[i] = t + i < valid ? s[t + i] : kNegInf;
    const vf8 p = exp2_nonpos(loadf(tail) - shift);
    sum += p;
    for (int i = 0; t + i < valid; ++i) s[t + i] = p[i];
    t = valid;
  }
  for (; t < nt; ++t) s[t] = 0.0f;
  const float corr = m == kNegInf ? 0.0f : std::exp2(m - m_new);
  if (corr != 1.0f) {
    const vf8 cv = splat(corr);
    int64_t c = 0;
    for (; c + 8 <= dv; c += 8) storef(acc + c, loadf(acc + c) * cv);
    for (; c < dv; ++c) acc[c] *= corr;
  }
  l = l * corr + hsum(sum);
  m = m_new;
}

template <typename T, int RB>
HMT_INLINE void row_block(const AttendArgs& a, int64_t r0, int64_t t0, int64_t nt, float* s) {
  // Keys this block can see in the tile (rows have different causal limits in prefill).
  int64_t block_nt = 0;
  for (int r = 0; r < RB; ++r) block_nt = std::max(block_nt, std::min(nt, a.limits[r0 + r] - t0));
  if (block_nt <= 0) return;
  const T* k = static_cast<const T*>(a.k) + t0 * a.k_stride;
  const T* v = static_cast<const T*>(a.v) + t0 * a.v_stride;
  score_block<T, RB>(a.q + r0 * a.q_stride, a.q_stride, k, a.k_stride, block_nt, a.dk, s);
  for (int r = 0; r < RB; ++r) {
    const int64_t valid = std::min(block_nt, a.limits[r0 + r] - t0);
    softmax_row(s + r * kKeyTile, block_nt, valid, a.m[r0 + r], a.l[r0 + r], a.acc + (r0 + r) * a.acc_stride, a.dv);
  }
  pv_block<T, RB>(s, v, a.v_stride, block_nt, a.dv, a.acc + r0 * a.acc_stride, a.acc_stride);
}

// ---- many rows (prefill): matrix-multiply form ------------------------------------------------------------------
// With 8 or more query rows the scores are computed transposed, st[t][r] = k_t . q_r, as a small matrix product
// against the transposed queries (a vector holds 8 rows, a key element is broadcast), so no horizontal sums are
// needed, and the softmax runs down the key axis on 8 rows at a time.

constexpr int64_t kGemmRows = 8;

// st[t * rp + r] += ... for TB keys (ks apart) and RV vectors of 8 rows of qt (dk x rp, row-major).
template <int TB, int RV>
HMT_INLINE void st_block(const float* k, int64_t ks, const float* qt, int64_t rp, int64_t dk, float* st) {
  vf8 acc[TB][RV];
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < RV; ++v) acc[t][v] = splat(0.0f);
  for (int64_t j = 0; j < dk; ++j) {
    vf8 qv[RV];
#pragma GCC unroll 8
    for (int v = 0; v < RV; ++v) qv[v] = loadf(qt + j * rp + 8 * v);
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      const vf8 kb = splat(k[t * ks + j]);
#pragma GCC unroll 8
      for (int v = 0; v < RV; ++v) acc[t][v] += kb * qv[v];
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < RV; ++v) storef(st + t * rp + 8 * v, acc[t][v]);
}

template <int TB>
HMT_INLINE void st_keys(const float* k, int64_t ks, const float* qt, int64_t rp, int64_t dk, float* st) {
  int64_t r = 0;
  for (; r + 16 <= rp; r += 16) st_block<TB, 2>(k, ks, qt + r, rp, dk, st + r);
  if (r < rp) st_block<TB, 1>(k, ks, qt + r, rp, dk, st + r);
}

// acc[r][c] += sum_t pt[t * rp + r] * v[t][c] for RB rows.
template <int RB>
HMT_INLINE void pv_gemm(const float* pt, int64_t rp, const float* v, int64_t vs, int64_t nt, int64_t dv, float* acc,
                        int64_t as) {
  int64_t c = 0;
  for (; c + 16 <= dv; c += 16) {
    vf8 a0[RB], a1[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      a0[r] = loadf(acc + r * as + c);
      a1[r] = loadf(acc + r * as + c + 8);
    }
    for (int64_t t = 0; t < nt; ++t) {
      const vf8 v0 = loadf(v + t * vs + c), v1 = loadf(v + t * vs + c + 8);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        const vf8 p = splat(pt[t * rp + r]);
        a0[r] += p * v0;
        a1[r] += p * v1;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      storef(acc + r * as + c, a0[r]);
      storef(acc + r * as + c + 8, a1[r]);
    }
  }
  for (; c < dv; ++c)
    for (int r = 0; r < RB; ++r) {
      float x = acc[r * as + c];
      for (int64_t t = 0; t < nt; ++t) x += pt[t * rp + r] * v[t * vs + c];
      acc[r * as + c] = x;
    }
}

// rows x d elements of type T (stride `stride`) into a dense float buffer (rows x d).
template <typename T>
HMT_INLINE void widen_rows(const T* src, int64_t stride, int64_t rows, int64_t d, float* dst) {
  for (int64_t t = 0; t < rows; ++t) {
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) storef(dst + t * d + j, load8(src + t * stride + j));
    for (; j < d; ++j) dst[t * d + j] = to_float(src[t * stride + j]);
  }
}

template <typename T>
HMT_INLINE void attend_gemm(const AttendArgs& a) {
  const int64_t rows = a.rows, rp = (rows + 7) / 8 * 8, dk = a.dk, dv = a.dv;
  constexpr bool widen = !std::is_same_v<T, float>;
  static thread_local std::vector<float> buf;
  const size_t need = dk * rp + kKeyTile * rp + 4 * rp + (widen ? kKeyTile * (dk + dv) : 0);
  if (buf.size() < need) buf.resize(need);
  float* qt = buf.data();           // (dk, rp) transposed queries, zero-padded rows
  float* st = qt + dk * rp;         // (kKeyTile, rp) scores, then weights
  float* m = st + kKeyTile * rp;    // (rp,)
  float* l = m + rp;                // (rp,)
  float* lim = l + rp;              // (rp,) causal limits as floats (exact below 2^24)
  float* corr = lim + rp;           // (rp,)
  float* kf = corr + rp;            // (kKeyTile, dk) widened keys (storage types other than float32)
  float* vf = kf + kKeyTile * dk;   // (kKeyTile, dv) widened values
  int64_t end = a.key_begin, min_limit = a.key_end;
  for (int64_t r = 0; r < rp; ++r) {
    const int64_t src = std::min(r, rows - 1);  // padding rows repeat the last row's limit
    const int64_t limit = std::min(a.limits[src], a.key_end);
    lim[r] = static_cast<float>(limit);
    m[r] = kNegInf;
    l[r] = 0.0f;
    end = std::max(end, limit);
    min_limit = std::min(min_limit, limit);
    for (int64_t j = 0; j < dk; ++j) qt[j * rp + r] = r < rows ? a.q[r * a.q_stride + j] : 0.0f;
  }
  for (int64_t r = 0; r < rows; ++r) std::fill(a.acc + r * a.acc_stride, a.acc + r * a.acc_stride + dv, 0.0f);
  const T* K = static_cast<const T*>(a.k);
  const T* V = static_cast<const T*>(a.v);
  for (int64_t t0 = a.key_begin; t0 < end; t0 += kKeyTile) {
    const int64_t nt = std::min(kKeyTile, end - t0);
    const float* kt;
    const float* vt;
    int64_t ks, vs;
    if constexpr (widen) {
      widen_rows(K + t0 * a.k_stride, a.k_stride, nt, dk, kf);
      widen_rows(V + t0 * a.v_stride, a.v_stride, nt, dv, vf);
      kt = kf, ks = dk, vt = vf, vs = dv;
    } else {
      kt = K + t0 * a.k_stride, ks = a.k_stride, vt = V + t0 * a.v_stride, vs = a.v_stride;
    }
    int64_t t = 0;
    for (; t + 4 <= nt; t += 4) st_keys<4>(kt + t * ks, ks, qt, rp, dk, st + t * rp);
    for (; t < nt; ++t) st_keys<1>(kt + t * ks, ks, qt, rp, dk, st + t * rp);
    if (min_limit < t0 + nt) {  // the tile crosses a row's causal limit: mask keys >= limit
      for (t = 0; t < nt; ++t) {
        const vf8 key = splat(static_cast<float>(t0 + t));
        for (int64_t r = 0; r < rp; r += 8) {
          const vf8 s = loadf(st + t * rp + r);
          storef(st + t * rp + r, key < loadf(lim + r) ? s : splat(kNegInf));
        }
      }
    }
    for (int64_t r = 0; r < rp; r += 8) {
      vf8 top = splat(kNegInf);
      for (t = 0; t < nt; ++t) top = vmax(top, loadf(st + t * rp + r));
      const vf8 m_old = loadf(m + r);
      const vf8 m_new = vmax(m_old, top);
      const vf8 c = exp2_nonpos(m_old - m_new);  // 0 when m_old is -inf (also for rows that saw no key yet)
      vf8 sum = splat(0.0f);
      for (t = 0; t < nt; ++t) {
        const vf8 p = exp2_nonpos(loadf(st + t * rp + r) - m_new);
        storef(st + t * rp + r, p);
        sum += p;
      }
      storef(l + r, loadf(l + r) * c + sum);
      storef(m + r, m_new);
      storef(corr + r, c);
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (corr[r] == 1.0f) continue;
      float* row = a.acc + r * a.acc_stride;
      const vf8 cv = splat(corr[r]);
      int64_t c = 0;
      for (; c + 8 <= dv; c += 8) storef(row + c, loadf(row + c) * cv);
      for (; c < dv; ++c) row[c] *= corr[r];
    }
    int64_t r0 = 0;
    for (; r0 + 6 <= rows; r0 += 6) pv_gemm<6>(st + r0, rp, vt, vs, nt, dv, a.acc + r0 * a.acc_stride, a.acc_stride);
    switch (rows - r0) {
      case 5: pv_gemm<5>(st + r0, rp, vt, vs, nt, dv, a.acc + r0 * a.acc_stride, a.acc_stride); break;
      case 4: pv_gemm<4>(st + r0, rp, vt, vs, nt, dv, a.acc + r0 * a.acc_stride, a.acc_stride); break;
      case 3: pv_gemm<3>(st + r0, rp, vt, vs, nt, dv, a.acc + r0 * a.acc_stride, a.acc_stride); break;
      case 2: pv_gemm<2>(st + r0, rp, vt, vs, nt, dv, a.acc + r0 * a.acc_stride, a.acc_stride); break;
      case 1: pv_gemm<1>(st + r0, rp, vt, vs, nt, dv, a.acc + r0 * a.acc_stride, a.acc_stride); break;
      default: break;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    a.m[r] = m[r];
    a.l[r] = l[r];
  }
}

template <typename T>
HMT_INLINE void attend(const AttendArgs& a) {
  if (a.rows >= kGemmRows) {
    attend_gemm<T>(a);
    return;
  }
  alignas(64) float s[kRowBlock * kKeyTile];
  int64_t end = a.key_begin;
  for (int64_t r = 0; r < a.rows; ++r) {
    a.m[r] = kNegInf;
    a.l[r] = 0.0f;
    std::fill(a.acc + r * a.acc_stride, a.acc + r * a.acc_stride + a.dv, 0.0f);
    end = std::max(end, std::min(a.key_end, a.limits[r]));
  }
  for (int64_t t0 = a.key_begin; t0 < end; t0 += kKeyTile) {
    const int64_t nt = std::min(kKeyTile, end - t0);
    int64_t r0 = 0;
    for (; r0 + kRowBlock <= a.rows; r0 += kRowBlock) row_block<T, kRowBlock>(a, r0, t0, nt, s);
    switch (a.rows - r0) {
      case 3:
        row_block<T, 3>(a, r0, t0, nt, s);
        break;
      case 2:
        row_block<T, 2>(a, r0, t0, nt, s);
        break;
      case 1:
        row_block<T, 1>(a, r0, t0, nt, s);
        break;
      default:
        break;
    }
  }
}

}  // namespace

HMT_CLONES void attend_f32(const AttendArgs& args) { attend<float>(args); }
HMT_CLONES void attend_bf16(const AttendArgs& args) { attend<c10::BFloat16>(args); }
HMT_CLONES void attend_f16(const AttendArgs& args) { attend<c10::Half>(args); }

}  // namespace hmt::cpu
