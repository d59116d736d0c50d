// Host side of the CUDA ops: argument checks, then the append / store kernels (kernels.cu) and ATen for the
// arithmetic.  Contracts: hmt_runtime/ops.py.
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <limits>

#include "../cpu/common.h"
#include "ops_cuda.h"

namespace hmt::cuda {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cuda(), name, " is on ", t.device(), ": expected a CUDA tensor");
}

void check_counts(const at::Tensor& t, const char* name, int64_t batch, const at::Tensor& first) {
  hmt::cpu::check_dim(t, name, 1, "(B,)");
  TORCH_CHECK_VALUE(t.size(0) == batch, name, " has shape ", hmt::cpu::shape_str(t), ": expected (", batch, ",)");
  hmt::cpu::check_same_device(t, name, first);
}

}  // namespace

at::Tensor attention_with_kvcache(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                  std::optional<double> scale) {
  hmt::cpu::check_attention_args(q, k_new, v_new, k_cache, v_cache);
  check_cuda(q, "q");
  const int64_t batch = q.size(0), q_len = q.size(1), window = k_cache.size(2);
  check_counts(cache_lens, "cache_lens", batch, q);
  TORCH_CHECK_TYPE(cache_lens.scalar_type() == at::kLong || cache_lens.scalar_type() == at::kInt,
                   "cache_lens has dtype ", cache_lens.scalar_type(), ": expected int64 or int32");
  const c10::cuda::CUDAGuard guard(q.device());
  if (batch == 0) return at::empty(q.sizes(), q.options());

  // One host synchronisation: the checks must pass before anything is written, and the attention reads only
  // the keys [0, max(cache_lens) + Lq) (positions beyond cache_lens + Lq are never read).
  const at::Tensor lens = cache_lens.to(at::kLong).contiguous();
  const at::Tensor bounds = at::stack({lens.min(), lens.max()}).cpu();
  const int64_t low = bounds[0].item<int64_t>(), high = bounds[1].item<int64_t>();
  TORCH_CHECK_VALUE(low >= 0 && high + q_len <= window, "cache_lens ranges over [", low, ", ", high,
                    "]: expected 0 <= cache_lens + Lq <= W, with Lq = ", q_len, " and cache window W = ", window,
                    " (cache_lens + Lq exceeds the cache window otherwise)");

  auto as_cache = [&](const at::Tensor& t) {
    at::Tensor r = t.scalar_type() == k_cache.scalar_type() ? t : t.to(k_cache.scalar_type());
    return r.stride(-1) == 1 ? r : r.contiguous();
  };
  launch_kv_append(as_cache(k_new), as_cache(v_new), k_cache, v_cache, lens);

  const int64_t total = high + q_len;
  const at::Tensor keys = k_cache.narrow(2, 0, total).to(q.scalar_type());
  const at::Tensor values = v_cache.narrow(2, 0, total).to(q.scalar_type());
  const at::Tensor query_pos = lens.unsqueeze(1) + at::arange(q_len, lens.options()).unsqueeze(0);  // (B, Lq)
  const at::Tensor key_pos = at::arange(total, lens.options());
  const at::Tensor mask = key_pos.view({1, 1, total}) <= query_pos.unsqueeze(2);  // (B, Lq, total), bottom-right
  const at::Tensor out = at::scaled_dot_product_attention(q.transpose(1, 2), keys, values, mask.unsqueeze(1), 0.0,
                                                          /*is_causal=*/false, scale, /*enable_gqa=*/true);
  return out.transpose(1, 2).contiguous();  // (B, Lq, Hq, D)
}

at::Tensor recall(const at::Tensor& summary, const at::Tensor& memory, const at::Tensor& keys,
                  const at::Tensor& written, const at::Tensor& w_q) {
  const hmt::cpu::MemoryShapes s = hmt::cpu::check_memory(memory, keys, w_q, "w_q");
  hmt::cpu::check_rows(summary, "summary", s, memory);
  check_cuda(memory, "memory");
  check_counts(written, "written", s.batch, memory);
  const c10::cuda::CUDAGuard guard(memory.device());

  const at::Tensor query = at::mm(summary.to(w_q.scalar_type()), w_q.t());  // (B, d_h)
  at::Tensor scores = at::bmm(keys, query.to(keys.scalar_type()).unsqueeze(2)).squeeze(2).to(at::kFloat);  // (B, N)
  scores = scores * (1.0 / std::sqrt(static_cast<double>(s.key_dim)));
  const at::Tensor count = written.to(at::kLong).clamp_max(s.slots);
  const at::Tensor valid = at::arange(s.slots, count.options()).unsqueeze(0) < count.unsqueeze(1);
  scores = scores.masked_fill(valid.logical_not(), -std::numeric_limits<float>::infinity());
  const at::Tensor weights = at::nan_to_num(at::softmax(scores, 1), 0.0);  // rows with no valid slot: zeros
  return at::bmm(weights.unsqueeze(1).to(memory.scalar_type()), memory).squeeze(1);  // (B, d)
}

void memory_write(const at::Tensor& new_memory, const at::Tensor& w_k, const at::Tensor& memory,
                  const at::Tensor& keys, const at::Tensor& written) {
  const hmt::cpu::MemoryShapes s = hmt::cpu::check_memory(memory, keys, w_k, "w_k");
  hmt::cpu::check_rows(new_memory, "new_memory", s, memory);
  check_cuda(memory, "memory");
  check_counts(written, "written", s.batch, memory);
  TORCH_CHECK_TYPE(written.scalar_type() == at::kLong, "written has dtype ", written.scalar_type(),
                   ": expected int64");
  const c10::cuda::CUDAGuard guard(memory.device());

  auto as_rows = [](const at::Tensor& t, at::ScalarType dtype) {
    at::Tensor r = t.scalar_type() == dtype ? t : t.to(dtype);
    return r.stride(-1) == 1 ? r : r.contiguous();
  };
  const at::Tensor key_rows = as_rows(at::mm(new_memory.to(w_k.scalar_type()), w_k.t()), keys.scalar_type());
  // Same stream: the second launch runs after the first, so both read written[b] before it is advanced.
  launch_memory_store(as_rows(new_memory, memory.scalar_type()), memory, written, /*advance=*/false);
  launch_memory_store(key_rows, keys, written, /*advance=*/true);
}

}  // namespace hmt::cuda
