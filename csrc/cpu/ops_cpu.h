// CPU implementations of the hmt ops (contracts: hmt_runtime/ops.py; schemas: csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace hmt::cpu {

// q: (B, Lq, Hq, D); k_new, v_new: (B, Lq, Hkv, D); k_cache, v_cache: (B, Hkv, W, D), written in place at
// [cache_lens[b], cache_lens[b] + Lq); cache_lens: (B,) int.  Returns (B, Lq, Hq, D) in q's dtype.
at::Tensor attention_with_kvcache(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                  std::optional<double> scale);

// summary: (B, d); memory: (B, N, d); keys: (B, N, d_h); written: (B,) int; w_q: (d_h, d).  Returns P: (B, d)
// in memory's dtype (zeros for rows with no memory written).
at::Tensor recall(const at::Tensor& summary, const at::Tensor& memory, const at::Tensor& keys,
                  const at::Tensor& written, const at::Tensor& w_q);

// new_memory: (B, d); w_k: (d_h, d).  Stores new_memory and new_memory @ w_k^T at slot written % N of
// memory (B, N, d) and keys (B, N, d_h), then increments written (B,) int64, all in place.
void memory_write(const at::Tensor& new_memory, const at::Tensor& w_k, const at::Tensor& memory,
                  const at::Tensor& keys, const at::Tensor& written);

}  // namespace hmt::cpu
