// CUDA implementations of the hmt ops (contracts: hmt_runtime/ops.py; schemas: csrc/ops.cpp).  The KV append and
// the memory store are hand-written kernels (kernels.cu); the attention and recall arithmetic use ATen
// (cuBLAS / SDPA), which the Triton backend (hmt_kernels) outperforms where it applies.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace hmt::cuda {

at::Tensor attention_with_kvcache(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                  std::optional<double> scale);

at::Tensor recall(const at::Tensor& summary, const at::Tensor& memory, const at::Tensor& keys,
                  const at::Tensor& written, const at::Tensor& w_q);

void memory_write(const at::Tensor& new_memory, const at::Tensor& w_k, const at::Tensor& memory,
                  const at::Tensor& keys, const at::Tensor& written);

// Kernel launchers (kernels.cu), on the current stream of the tensors' device.
// k_cache[b, h, lens[b] + i, :] = k_new[b, i, h, :] and the same for v; k_new/v_new have the caches' dtype and
// a contiguous last dimension; lens: (B,) int64 on the device.
void launch_kv_append(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& lens);
// dst[b, written[b] % N, :] = rows[b, :] for dst (B, N, w) and rows (B, w) of dst's dtype; with advance,
// written[b] += 1 afterwards (written: (B,) int64 on the device).  No host synchronisation.
void launch_memory_store(const at::Tensor& rows, const at::Tensor& dst, const at::Tensor& written, bool advance);

}  // namespace hmt::cuda
