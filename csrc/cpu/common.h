// Helpers shared by the ops: argument checks (CPU and CUDA), the CPU task runner, row conversions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "attend.h"

namespace hmt::cpu {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

inline bool is_float_storage(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float_storage(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float_storage(t.scalar_type()), name, " has dtype ", t.scalar_type(),
                   ": expected float32, bfloat16 or float16");
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " has shape ", shape_str(t), ": expected ", dim, " dimensions ", layout);
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& first) {
  TORCH_CHECK_VALUE(t.device() == first.device(), name, " is on ", t.device(), ": expected ", first.device(),
                    " like the other tensors");
}

// Row counts (cache_lens, written) as int64 values on the host.
inline std::vector<int64_t> read_counts(const at::Tensor& t, const char* name, int64_t batch) {
  check_dim(t, name, 1, "(B,)");
  TORCH_CHECK_VALUE(t.size(0) == batch, name, " has shape ", shape_str(t), ": expected (", batch, ",)");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name, " has dtype ",
                   t.scalar_type(), ": expected int64 or int32");
  std::vector<int64_t> counts(batch);
  if (t.scalar_type() == at::kLong) {
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) counts[b] = p[b * t.stride(0)];
  } else {
    const int32_t* p = t.data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) counts[b] = p[b * t.stride(0)];
  }
  return counts;
}

// ---- argument checks shared by the CPU and CUDA implementations -----------------------------------------

inline void check_attention_args(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_dim(q, "q", 4, "(B, Lq, Hq, D)");
  check_dim(k_new, "k_new", 4, "(B, Lq, Hkv, D)");
  check_dim(v_new, "v_new", 4, "(B, Lq, Hkv, D)");
  check_dim(k_cache, "k_cache", 4, "(B, Hkv, W, D)");
  check_dim(v_cache, "v_cache", 4, "(B, Hkv, W, D)");
  const int64_t batch = q.size(0), q_len = q.size(1), q_heads = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k_cache.size(1), window = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(0) == batch && k_cache.size(3) == head_dim, "k_cache has shape ",
                    shape_str(k_cache), ": expected (B, Hkv, W, D) = (", batch, ", Hkv, W, ", head_dim,
                    ") to match q ", shape_str(q));
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache has shape ", shape_str(v_cache),
                    ": expected the shape of k_cache ", shape_str(k_cache));
  for (const auto& [t, name] : {std::pair{&k_new, "k_new"}, std::pair{&v_new, "v_new"}}) {
    TORCH_CHECK_VALUE(t->size(0) == batch && t->size(1) == q_len && t->size(2) == kv_heads &&
                          t->size(3) == head_dim,
                      name, " has shape ", shape_str(*t), ": expected (B, Lq, Hkv, D) = (", batch, ", ", q_len,
                      ", ", kv_heads, ", ", head_dim, ")");
  }
  TORCH_CHECK_VALUE(kv_heads > 0 && q_heads % kv_heads == 0, "q has ", q_heads,
                    " heads, expected a multiple of the cache's ", kv_heads, " heads");
  TORCH_CHECK_VALUE(window > 0 && head_dim > 0, "k_cache has shape ", shape_str(k_cache),
                    ": expected a non-empty window and head dimension");
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k_new, "k_new"}, std::pair{&v_new, "v_new"},
                                std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_float_storage(*t, name);
    check_same_device(*t, name, q);
  }
  TORCH_CHECK_TYPE(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache has dtype ", v_cache.scalar_type(),
                   ": expected the dtype of k_cache (", k_cache.scalar_type(), ")");
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    TORCH_CHECK_VALUE(t->stride(3) == 1, name, " has strides ", t->strides(),
                      ": expected a contiguous last dimension (stride 1), since it is written in place");
  }
}

struct MemoryShapes {
  int64_t batch, slots, width, key_dim;
};

inline MemoryShapes check_memory(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& weight,
                          const char* weight_name) {
  check_dim(memory, "memory", 3, "(B, N, d)");
  check_dim(keys, "keys", 3, "(B, N, d_h)");
  check_dim(weight, weight_name, 2, "(d_h, d)");
  const MemoryShapes s{memory.size(0), memory.size(1), memory.size(2), keys.size(2)};
  TORCH_CHECK_VALUE(s.slots > 0, "memory has shape ", shape_str(memory), ": expected at least one slot (N >= 1)");
  TORCH_CHECK_VALUE(keys.size(0) == s.batch && keys.size(1) == s.slots, "keys has shape ", shape_str(keys),
                    ": expected (B, N, d_h) with (B, N) = (", s.batch, ", ", s.slots, ") as in memory ",
                    shape_str(memory));
  TORCH_CHECK_VALUE(weight.size(0) == s.key_dim && weight.size(1) == s.width, weight_name, " has shape ",
                    shape_str(weight), ": expected (d_h, d) = (", s.key_dim, ", ", s.width, ")");
  for (const auto& [t, name] : {std::pair{&memory, "memory"}, std::pair{&keys, "keys"}, std::pair{&weight, weight_name}}) {
    check_float_storage(*t, name);
    check_same_device(*t, name, memory);
  }
  return s;
}

inline void check_rows(const at::Tensor& rows, const char* name, const MemoryShapes& s, const at::Tensor& memory) {
  check_dim(rows, name, 2, "(B, d)");
  TORCH_CHECK_VALUE(rows.size(0) == s.batch && rows.size(1) == s.width, name, " has shape ", shape_str(rows),
                    ": expected (B, d) = (", s.batch, ", ", s.width, ")");
  check_float_storage(rows, name);
  check_same_device(rows, name, memory);
}

// ---- CPU kernel helpers ----------------------------------------------------------------------------------------

using AttendFn = void (*)(const AttendArgs&);

inline AttendFn attend_for(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return attend_f32;
    case at::kBFloat16:
      return attend_bf16;
    default:
      return attend_f16;
  }
}

// dst[j] = float(src[j * stride]) * factor, j < n, for a float32 / bfloat16 / float16 source.
inline void load_row_scaled(const void* src, at::ScalarType t, int64_t n, float factor, float* dst) {
  switch (t) {
    case at::kFloat: {
      const float* s = static_cast<const float*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = s[j] * factor;
      break;
    }
    case at::kBFloat16: {
      const c10::BFloat16* s = static_cast<const c10::BFloat16*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(s[j]) * factor;
      break;
    }
    default: {
      const c10::Half* s = static_cast<const c10::Half*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(s[j]) * factor;
      break;
    }
  }
}

// dst[j] = src[j] * factor converted to the storage type t, j < n.
inline void store_row_scaled(const float* src, float factor, int64_t n, at::ScalarType t, void* dst) {
  switch (t) {
    case at::kFloat: {
      float* d = static_cast<float*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j] = src[j] * factor;
      break;
    }
    case at::kBFloat16: {
      c10::BFloat16* d = static_cast<c10::BFloat16*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j] = c10::BFloat16(src[j] * factor);
      break;
    }
    default: {
      c10::Half* d = static_cast<c10::Half*>(dst);
      for (int64_t j = 0; j < n; ++j) d[j] = c10::Half(src[j] * factor);
      break;
    }
  }
}

// Work (multiply-adds) under which a call runs on the calling thread: waking the pool costs more.
constexpr double kParallelMinWork = 1 << 18;

inline int64_t pool_threads(double work) {
  if (work < kParallelMinWork || at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, at::get_num_threads());
}

// Runs fn(i) for i in [0, n) on `threads` threads of the intra-op pool; each thread takes the next task
// (dynamic), so list the expensive tasks first.
template <typename F>
void run_tasks(int64_t n, int64_t threads, const F& fn) {
  threads = std::min(threads, n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

// How many pieces to split each of `base_tasks` equal tasks into so that `threads` threads finish soonest
// (each piece must keep at least `min_piece` of `length`).
inline int64_t choose_splits(int64_t base_tasks, int64_t threads, int64_t length, int64_t min_piece) {
  if (threads <= 1 || base_tasks <= 0) return 1;
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(4 * threads, length / min_piece));
  int64_t best = 1;
  double best_time = 1e30;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t rounds = (base_tasks * s + threads - 1) / threads;
    const double time = static_cast<double>(rounds) / s + 0.02 * s;  // small cost per piece (merge, setup)
    if (time < best_time - 1e-9) {
      best_time = time;
      best = s;
    }
  }
  return best;
}

// Per-thread scratch that grows to the largest request and is reused across calls.
inline float* scratch(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace hmt::cpu
