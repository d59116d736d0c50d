// hmt::decode_step on CPU: one decode position of a whole Llama-family decoder in one op.
//
// Per layer: RMSNorm, the q / k / v projections, RoPE, the append of k and v to the bounded segment cache,
// grouped-query attention over positions [0, lens[b]], the o projection and residual, RMSNorm, the SiLU-gated MLP
// and residual; then the final RMSNorm.  The projections are the weight-only linear kernels (linear.h: fp32,
// bf16, int8, Q4_1, Q8_0), each with an optional LoRA adapter applied beside it as its low-rank product
// (y += scale * B (A x), A x by the same vectorised kernels), the projections of one input (q / k / v, gate /
// up) in one parallel region; attention is the shared CPU attention kernel (attend.h).  The ~25 small operations
// around the projections run here, on float32 rows, without a dispatcher call each.
//
// Contract (hmt_runtime/engines.py, LlamaEngine.decode): x (B, d) float32 input embeddings; per layer l, seven
// projections in the order q, k, v, o, gate, up, down (weights[7 l + i] with scales / biases / formats /
// LoRA factors A and B^T at the same index, below); norms[2 l] / norms[2 l + 1] the input / post-attention
// RMSNorm weights and norms[2 L] the final one (eps at the same indices); cos, sin_signed (B, D): the rotary
// rows of each batch row's position, sin_signed = [-sin_1 ; sin_2] (RoPE = x cos + x[perm] sin_signed, perm
// swapping the halves);
// k_cache[l], v_cache[l] (rows >= B, Hkv, W, D) float32 or bfloat16, written at position lens[b]; lens (B,)
// int64, not advanced.  Returns the final hidden states (B, d) float32.
//
// A LoRA factor is stored as its dtype says: A float32 (r, K), or uint8 (r, ceil(K / 32) * 34) for
// llama.cpp's Q8_0 blocks, multiplied by the integer dots on the int8 x the base projection already quantized
// (its format must then be an ":i8" one); B^T float32 or bfloat16 in tiles of 16 outputs, (ceil(N / 16), r, 16)
// (linear.h, LowRank; zero past N).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "attend.h"
#include "decode.h"
#include "linear.h"
#include "vec.h"

namespace hmt::cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

struct Projection {
  PackedLinear base;
  PackedLinear lora_a;             // A (r, K) as a weight (fp32 or q8_0:i8); n == 0 without LoRA
  const void* lora_bt = nullptr;   // B^T tiles (ceil(N / 16), r, 16), float32 or bfloat16 (lora_bt_bf16)
  bool lora_bt_bf16 = false;
  float lora_scale = 0.0f;
};

// y_i (m, N_i) = x (m, K) W_i^T (+ b_i) (+ scale_i * B_i (A_i x)) for `count` projections that read the same x
// (q / k / v; gate / up), in one parallel region (linear_parallel_many): the LoRA A products in parts shared by
// the pool's threads, then the weight rows split over the pool, each thread adding B_i s to the rows it computed.
void project(const Projection* ps, int count, const float* x, int64_t m, float* const* ys,
             std::vector<float>& scratch) {
  constexpr int kMax = kMaxSharedProjections;
  TORCH_CHECK(count <= kMax, "project: ", count, " projections of one input; at most ", kMax);
  int64_t lora = 0;
  for (int i = 0; i < count; ++i)
    if (ps[i].lora_bt != nullptr) lora += m * ps[i].lora_a.n;
  scratch.resize(static_cast<size_t>(lora));
  std::array<const PackedLinear*, kMax> packed;
  std::array<float*, kMax> outs;
  std::array<int64_t, kMax> lds;
  std::array<LowRank, kMax> low_rank;
  std::array<const LowRank*, kMax> updates;
  int64_t offset = 0;
  for (int i = 0; i < count; ++i) {
    packed[i] = &ps[i].base;
    outs[i] = ys[i];
    lds[i] = ps[i].base.n;
    updates[i] = nullptr;
    if (ps[i].lora_bt == nullptr) continue;
    const int64_t r = ps[i].lora_a.n;
    low_rank[i] = LowRank{&ps[i].lora_a, ps[i].lora_scale, scratch.data() + offset, r, ps[i].lora_bt,
                          ps[i].lora_bt_bf16};
    updates[i] = &low_rank[i];
    offset += m * r;
  }
  linear_parallel_many(packed.data(), count, x, ps[0].base.k, m, outs.data(), lds.data(), updates.data());
}

// The LoRA factors of `count` projections towards the caches (software prefetches, issued by the calling thread
// just before the parallel region that precedes their use): A is read right at the start of the projections,
// and both factors are small pieces left cold by the ~96 MB of weights each step
// streams, so each would otherwise start with a wait on DRAM.
void prefetch_low_rank(const Projection* ps, int count) {
  for (int i = 0; i < count; ++i) {
    if (ps[i].lora_bt == nullptr) continue;
    const auto* a = ps[i].lora_a.w;
    const int64_t a_bytes = ps[i].lora_a.n * ps[i].lora_a.row_bytes;
    for (int64_t off = 0; off < a_bytes; off += 64) __builtin_prefetch(a + off, 0, 2);
    const auto* bt = static_cast<const uint8_t*>(ps[i].lora_bt);
    const int64_t bt_bytes = (ps[i].base.n + kLowRankTile - 1) / kLowRankTile *
                             low_rank_tile_bytes(ps[i].lora_a.n, ps[i].lora_bt_bf16);
    for (int64_t off = 0; off < bt_bytes; off += 64) __builtin_prefetch(bt + off, 0, 2);
  }
}

void rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t d, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    double ss = 0.0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / d) + eps);
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = w[i] * (xr[i] * inv);
  }
}

// In place on `heads` rows of D: v = v cos + v[perm] sin_signed.
void rope(float* v, int64_t heads, int64_t dim, const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  float tmp[512];
  for (int64_t h = 0; h < heads; ++h) {
    float* row = v + h * dim;
    for (int64_t i = 0; i < dim; ++i) tmp[i] = row[i] * cos[i] + row[i < half ? i + half : i - half] * sin[i];
    std::copy(tmp, tmp + dim, row);
  }
}

// gate[i] = silu(gate[i]) up[i] = gate[i] sigmoid(gate[i]) up[i], 8 at a time: sigmoid from e = 2^(-|g| log2 e)
// (exp2_nonpos, relative error < 3e-7) as 1 / (1 + e) for g >= 0 and e / (1 + e) below.
HMT_CLONES void silu_times(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const vf8 g = loadf(gate + i);
    const vf8 e = exp2_nonpos((g < 0 ? g : -g) * kLog2e);
    const vf8 sigmoid = (g < 0 ? e : splat(1.0f)) / (e + 1.0f);
    storef(gate + i, g * sigmoid * loadf(up + i));
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

at::Tensor checked_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " is on ", t.device(), ": expected a CPU tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " has dtype ", t.scalar_type(), ": expected float32");
  return t.contiguous();
}

}  // namespace

at::Tensor decode_step(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                       const std::vector<std::optional<at::Tensor>>& scales,
                       const std::vector<std::optional<at::Tensor>>& biases, const std::vector<std::string>& formats,
                       const std::vector<std::optional<at::Tensor>>& lora_a,
                       const std::vector<std::optional<at::Tensor>>& lora_b, const std::vector<double>& lora_scale,
                       const std::vector<at::Tensor>& norms, const std::vector<double>& eps, const at::Tensor& cos,
                       const at::Tensor& sin_signed, const std::vector<at::Tensor>& k_cache,
                       const std::vector<at::Tensor>& v_cache, const at::Tensor& lens, double scale,
                       int64_t q_heads, int64_t kv_heads) {
  const int64_t n_layers = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK_VALUE(n_layers > 0 && v_cache.size() == k_cache.size(), "k_cache / v_cache: expected one tensor per layer");
  const size_t n_proj = static_cast<size_t>(7 * n_layers);
  TORCH_CHECK_VALUE(weights.size() == n_proj && scales.size() == n_proj && biases.size() == n_proj &&
                        formats.size() == n_proj && lora_a.size() == n_proj && lora_b.size() == n_proj &&
                        lora_scale.size() == n_proj,
                    "weights / scales / biases / formats / lora_*: expected 7 entries per layer (", n_proj, ")");
  TORCH_CHECK_VALUE(norms.size() == static_cast<size_t>(2 * n_layers + 1) && eps.size() == norms.size(),
                    "norms / eps: expected 2 per layer + the final norm");
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected (B, d), got ", x.sizes());
  const at::Tensor xc = checked_f32(x, "x");
  const int64_t batch = x.size(0), d = x.size(1);
  const int64_t window = k_cache[0].size(2), head_dim = k_cache[0].size(3);
  TORCH_CHECK_VALUE(q_heads % kv_heads == 0 && k_cache[0].size(1) == kv_heads, "q_heads / kv_heads mismatch");
  TORCH_CHECK_VALUE(head_dim % 2 == 0 && head_dim <= 512, "head_dim ", head_dim, ": expected even and <= 512");
  const at::Tensor cos_c = checked_f32(cos, "cos"), sin_c = checked_f32(sin_signed, "sin_signed");
  TORCH_CHECK_VALUE(cos_c.size(0) == batch && cos_c.size(1) == head_dim, "cos: expected (B, D)");
  const at::Tensor lens_c = lens.to(at::kLong).contiguous();
  TORCH_CHECK_VALUE(lens_c.numel() == batch, "lens: expected (B,)");
  const int64_t* len = lens_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] < window, "lens[", b, "] = ", len[b], ": expected in [0, ", window, ")");
  const bool bf16_cache = k_cache[0].scalar_type() == at::kBFloat16;
  for (int64_t l = 0; l < n_layers; ++l) {
    for (const at::Tensor* c : {&k_cache[l], &v_cache[l]}) {
      TORCH_CHECK_VALUE(c->is_contiguous() && c->dim() == 4 && c->size(0) >= batch && c->size(1) == kv_heads &&
                            c->size(2) == window && c->size(3) == head_dim &&
                            c->scalar_type() == (bf16_cache ? at::kBFloat16 : at::kFloat),
                        "k_cache / v_cache[", l, "]: expected contiguous (rows >= B, Hkv, W, D) of one dtype");
    }
  }

  // Pack every projection once (pointer checks only: no copies).
  std::vector<at::Tensor> keep;  // contiguous float32 copies of norms / LoRA factors, alive for the call
  std::vector<Projection> proj(n_proj);
  const int64_t inter = weights[4].size(0);  // the gate projection's outputs (N rows of W in every format)
  for (size_t i = 0; i < n_proj; ++i) {
    const int64_t k = (i % 7 == 6) ? inter : (i % 7 == 3 ? q_heads * head_dim : d);
    proj[i].base = pack_linear(weights[i], scales[i], biases[i], formats[i], k);
    TORCH_CHECK_VALUE(lora_a[i].has_value() == lora_b[i].has_value(), "lora_a / lora_b[", i,
                      "]: give both or neither");
    if (lora_a[i].has_value()) {
      const at::Tensor& a_in = *lora_a[i];
      const at::Tensor& bt_in = *lora_b[i];
      TORCH_CHECK_VALUE(a_in.device().is_cpu() && bt_in.device().is_cpu(), "lora_a / lora_b[", i,
                        "]: expected CPU tensors");
      const bool a_q8 = a_in.scalar_type() == at::kByte;
      TORCH_CHECK_VALUE(a_q8 || a_in.scalar_type() == at::kFloat, "lora_a[", i, "] has dtype ",
                        a_in.scalar_type(), ": expected float32 or uint8 (Q8_0 blocks)");
      TORCH_CHECK_VALUE(bt_in.scalar_type() == at::kFloat || bt_in.scalar_type() == at::kBFloat16, "lora_b[", i,
                        "] has dtype ", bt_in.scalar_type(), ": expected float32 or bfloat16");
      TORCH_CHECK_VALUE(!a_q8 || proj[i].base.int_dot, "lora_a[", i, "]: Q8_0 blocks need a base format with "
                        "integer dots (':i8'), got ", formats[i]);
      at::Tensor a = a_in.contiguous(), bt = bt_in.contiguous();
      const int64_t a_cols = a_q8 ? (k + 31) / 32 * 34 : k;
      const int64_t tiles = (proj[i].base.n + kLowRankTile - 1) / kLowRankTile;
      TORCH_CHECK_VALUE(a.dim() == 2 && a.size(1) == a_cols && bt.dim() == 3 && bt.size(0) == tiles &&
                            bt.size(1) == a.size(0) && bt.size(2) == kLowRankTile,
                        "lora_a / lora_b[", i, "]: expected A (r, ", a_cols, ") and B^T in tiles (", tiles,
                        ", r, ", kLowRankTile, "), got ", a.sizes(), " and ", bt.sizes());
      keep.push_back(a);
      keep.push_back(bt);
      proj[i].lora_a = pack_linear(a, std::nullopt, std::nullopt, a_q8 ? "q8_0:i8" : "fp32", k);
      proj[i].lora_bt = bt.data_ptr();
      proj[i].lora_bt_bf16 = bt.scalar_type() == at::kBFloat16;
      proj[i].lora_scale = static_cast<float>(lora_scale[i]);
    }
  }
  std::vector<const float*> norm_w(norms.size());
  for (size_t i = 0; i < norms.size(); ++i) {
    keep.push_back(checked_f32(norms[i], "norms"));
    norm_w[i] = keep.back().data_ptr<float>();
  }

  const int64_t qd = q_heads * head_dim, kvd = kv_heads * head_dim, group = q_heads / kv_heads;
  at::Tensor out = xc.clone();
  float* hid = out.data_ptr<float>();
  std::vector<float> h(batch * d), q(batch * qd), kk(batch * kvd), vv(batch * kvd), att(batch * qd);
  std::vector<float> gate(batch * inter), up(batch * inter), tmp(batch * std::max(d, inter)), lora_scratch;
  const float factor = static_cast<float>(scale) * kLog2e;

  for (int64_t l = 0; l < n_layers; ++l) {
    const Projection* p = proj.data() + 7 * l;
    rms_norm(hid, norm_w[2 * l], static_cast<float>(eps[2 * l]), batch, d, h.data());
    float* qkv[3] = {q.data(), kk.data(), vv.data()};
    prefetch_low_rank(p + 3, 1);  // each group's region prefetches the next group's factors
    project(p, 3, h.data(), batch, qkv, lora_scratch);
    char* kc = static_cast<char*>(k_cache[l].data_ptr());
    char* vc = static_cast<char*>(v_cache[l].data_ptr());
    const int64_t esize = k_cache[l].element_size();
    for (int64_t b = 0; b < batch; ++b) {
      const float* cb = cos_c.data_ptr<float>() + b * head_dim;
      const float* sb = sin_c.data_ptr<float>() + b * head_dim;
      rope(q.data() + b * qd, q_heads, head_dim, cb, sb);
      rope(kk.data() + b * kvd, kv_heads, head_dim, cb, sb);
      for (int64_t hh = 0; hh < kv_heads; ++hh) {  // append at lens[b]
        const int64_t offset = ((b * kv_heads + hh) * window + len[b]) * head_dim;
        const float* ks = kk.data() + b * kvd + hh * head_dim;
        const float* vs = vv.data() + b * kvd + hh * head_dim;
        if (bf16_cache) {
          auto* kd = reinterpret_cast<c10::BFloat16*>(kc) + offset;
          auto* vd = reinterpret_cast<c10::BFloat16*>(vc) + offset;
          for (int64_t i = 0; i < head_dim; ++i) {
            kd[i] = c10::BFloat16(ks[i]);
            vd[i] = c10::BFloat16(vs[i]);
          }
        } else {
          std::copy(ks, ks + head_dim, reinterpret_cast<float*>(kc) + offset);
          std::copy(vs, vs + head_dim, reinterpret_cast<float*>(vc) + offset);
        }
      }
    }
    // Attention: one task per (batch row, KV head), serving its `group` query heads.
    at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(group * (2 * head_dim + 2));
      std::vector<int64_t> limits(group);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / kv_heads, hh = task % kv_heads;
        float* qrows = buf.data();
        float* acc = qrows + group * head_dim;
        float* m = acc + group * head_dim;
        float* lsum = m + group;
        const float* qs = q.data() + b * qd + hh * group * head_dim;
        for (int64_t i = 0; i < group * head_dim; ++i) qrows[i] = qs[i] * factor;
        std::fill(limits.begin(), limits.end(), len[b] + 1);
        AttendArgs args;
        args.q = qrows;
        args.q_stride = head_dim;
        args.rows = group;
        args.limits = limits.data();
        const int64_t base = (b * kv_heads + hh) * window * head_dim * esize;
        args.k = kc + base;
        args.k_stride = head_dim;
        args.dk = head_dim;
        args.v = vc + base;
        args.v_stride = head_dim;
        args.dv = head_dim;
        args.key_begin = 0;
        args.key_end = len[b] + 1;
        args.m = m;
        args.l = lsum;
        args.acc = acc;
        args.acc_stride = head_dim;
        if (bf16_cache) {
          attend_bf16(args);
        } else {
          attend_f32(args);
        }
        float* dst = att.data() + b * qd + hh * group * head_dim;
        for (int64_t g = 0; g < group; ++g)
          for (int64_t i = 0; i < head_dim; ++i) dst[g * head_dim + i] = acc[g * head_dim + i] / lsum[g];
      }
    });
    float* o_out[1] = {tmp.data()};
    prefetch_low_rank(p + 4, 2);
    project(p + 3, 1, att.data(), batch, o_out, lora_scratch);
    for (int64_t i = 0; i < batch * d; ++i) hid[i] += tmp[i];
    rms_norm(hid, norm_w[2 * l + 1], static_cast<float>(eps[2 * l + 1]), batch, d, h.data());
    float* gate_up[2] = {gate.data(), up.data()};
    prefetch_low_rank(p + 6, 1);
    project(p + 4, 2, h.data(), batch, gate_up, lora_scratch);
    silu_times(gate.data(), up.data(), batch * inter);
    float* down_out[1] = {tmp.data()};
    if (l + 1 < n_layers) prefetch_low_rank(p + 7, 3);
    project(p + 6, 1, gate.data(), batch, down_out, lora_scratch);
    for (int64_t i = 0; i < batch * d; ++i) hid[i] += tmp[i];
  }
  at::Tensor result = at::empty_like(out);
  rms_norm(hid, norm_w[2 * n_layers], static_cast<float>(eps[2 * n_layers]), batch, d, result.data_ptr<float>());
  return result;
}

}  // namespace hmt::cpu
