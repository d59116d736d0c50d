// hmt::attention_with_kvcache on CPU: append k_new / v_new to the bounded segment cache, then causal
// grouped-query attention of q over the cache (contract: hmt_runtime/ops.py).
//
// Work items are (batch row, KV head, block of queries); each one serves all the query heads of its KV head,
// so a key row is read once for the whole group.  When there are too few items for the threads (decode: one
// query, often one batch row), each item's key range is split and the partial softmax states are merged.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>

#include "common.h"
#include "ops_cpu.h"

namespace hmt::cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kRowsPerTask = 32;     // query rows (queries x group heads) per work item in prefill
constexpr int64_t kMinSplitKeys = 64;    // fewest keys worth a separate piece of a split key range
constexpr int64_t kAtenPrefillQueries = 512;  // from here a prefill into an empty cache goes to ATen (faster there)

// cache[b, h, lens[b] + i, :] = src[b, i, h, :]; src has the cache's dtype and a contiguous last dimension.
// src may alias its destination (new keys that are views of the cache tail): memmove.
void append(const at::Tensor& src, const at::Tensor& cache, const std::vector<int64_t>& lens) {
  const int64_t batch = src.size(0), q_len = src.size(1), kv_heads = src.size(2), head_dim = src.size(3);
  const int64_t esize = src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* c = static_cast<char*>(cache.data_ptr());
  const int64_t rows = batch * q_len * kv_heads;
  auto copy_rows = [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % kv_heads, i = (row / kv_heads) % q_len, b = row / (kv_heads * q_len);
      const char* from = s + (b * src.stride(0) + i * src.stride(1) + h * src.stride(2)) * esize;
      char* to = c + (b * cache.stride(0) + h * cache.stride(1) + (lens[b] + i) * cache.stride(2)) * esize;
      std::memmove(to, from, head_dim * esize);
    }
  };
  if (rows * head_dim < (1 << 16) || at::in_parallel_region()) {
    copy_rows(0, rows);
  } else {
    at::parallel_for(0, rows, 64, copy_rows);
  }
}

at::Tensor as_storage(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor r = t.scalar_type() == dtype ? t : t.to(dtype);
  return r.stride(-1) == 1 ? r : r.contiguous();
}

}  // namespace

at::Tensor attention_with_kvcache(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                  std::optional<double> scale) {
  check_attention_args(q, k_new, v_new, k_cache, v_cache);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q is on ", q.device(), ": expected a CPU tensor");
  const int64_t batch = q.size(0), q_len = q.size(1), q_heads = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k_cache.size(1), window = k_cache.size(2), group = q_heads / kv_heads;
  check_same_device(cache_lens, "cache_lens", q);
  const std::vector<int64_t> lens = read_counts(cache_lens, "cache_lens", batch);
  int64_t max_total = 0;
  double work = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] + q_len <= window, "cache_lens[", b, "] = ", lens[b],
                      ": expected 0 <= cache_lens + Lq <= W, with Lq = ", q_len, " and cache window W = ", window,
                      " (cache_lens + Lq exceeds the cache window otherwise)");
    max_total = std::max(max_total, lens[b] + q_len);
    work += static_cast<double>(q_heads) * q_len * (lens[b] + q_len) * 2 * head_dim;
  }

  append(as_storage(k_new, k_cache.scalar_type()), k_cache, lens);
  append(as_storage(v_new, v_cache.scalar_type()), v_cache, lens);

  at::Tensor out = at::empty({batch, q_len, q_heads, head_dim}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (batch == 0 || q_len == 0 || q_heads == 0) return out;
  if (q_len >= kAtenPrefillQueries &&
      std::all_of(lens.begin(), lens.end(), [](int64_t len) { return len == 0; })) {
    // A long prefill into an empty cache is plain causal attention over the new keys: ATen's flash attention
    // (MKL matrix products, AVX-512 where the CPU has it) beats the portable kernel there.
    const at::Tensor keys = k_cache.narrow(2, 0, q_len), values = v_cache.narrow(2, 0, q_len);
    out.copy_(at::scaled_dot_product_attention(q.transpose(1, 2), keys.to(q.scalar_type()), values.to(q.scalar_type()),
                                               {}, 0.0, /*is_causal=*/true, scale, /*enable_gqa=*/true)
                  .transpose(1, 2));
    return out;
  }
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();

  const float factor = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim))) * kLog2e;
  const int64_t block_queries = std::max<int64_t>(1, kRowsPerTask / group);
  const int64_t q_blocks = (q_len + block_queries - 1) / block_queries;
  const int64_t base_tasks = batch * kv_heads * q_blocks;
  const int64_t threads = pool_threads(work);
  const int64_t splits = choose_splits(base_tasks, threads, max_total, kMinSplitKeys);
  const int64_t split_keys = (max_total + splits - 1) / splits;
  const int64_t max_rows = block_queries * group;

  // Expensive items first: later query blocks see more keys (causal), so order by the number of keys.
  std::vector<int64_t> order(base_tasks);
  for (int64_t i = 0; i < base_tasks; ++i) order[i] = i;
  if (q_blocks > 1 || batch > 1) {
    auto keys_of = [&](int64_t task) {
      const int64_t qb = task % q_blocks, b = task / (q_blocks * kv_heads);
      return lens[b] + std::min(q_len, (qb + 1) * block_queries);
    };
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return keys_of(x) > keys_of(y); });
  }

  // Partial softmax states of split items: (base_tasks, splits, max_rows) and (..., head_dim).
  std::vector<float> part_m, part_l, part_acc;
  if (splits > 1) {
    part_m.resize(base_tasks * splits * max_rows);
    part_l.resize(base_tasks * splits * max_rows);
    part_acc.resize(base_tasks * splits * max_rows * head_dim);
  }

  const AttendFn attend = attend_for(k_cache.scalar_type());
  const at::ScalarType q_type = q.scalar_type(), out_type = out.scalar_type();
  const char* q_base = static_cast<const char*>(qc.data_ptr());
  const int64_t q_esize = qc.element_size();
  char* out_base = static_cast<char*>(out.data_ptr());
  const int64_t out_esize = out.element_size();
  const char* k_base = static_cast<const char*>(k_cache.data_ptr());
  const char* v_base = static_cast<const char*>(v_cache.data_ptr());
  const int64_t kv_esize = k_cache.element_size();

  run_tasks(base_tasks * splits, threads, [&](int64_t item) {
    static thread_local std::vector<float> buf;
    const int64_t task = order[item / splits], split = item % splits;
    const int64_t qb = task % q_blocks, h = (task / q_blocks) % kv_heads, b = task / (q_blocks * kv_heads);
    const int64_t i0 = qb * block_queries, i1 = std::min(q_len, i0 + block_queries);
    const int64_t rows = (i1 - i0) * group;
    float* base = scratch(buf, rows * (2 * head_dim + 2));
    float* qrows = base;                          // (rows, head_dim)
    float* acc = qrows + rows * head_dim;         // (rows, head_dim)
    float* m = acc + rows * head_dim;             // (rows,)
    float* l = m + rows;                          // (rows,)
    int64_t limits[kRowsPerTask + 64];
    std::vector<int64_t> big_limits;
    int64_t* lim = limits;
    if (rows > static_cast<int64_t>(sizeof(limits) / sizeof(limits[0]))) {
      big_limits.resize(rows);
      lim = big_limits.data();
    }
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = (i - i0) * group + g;
        const char* src = q_base + (b * qc.stride(0) + i * qc.stride(1) + (h * group + g) * qc.stride(2)) * q_esize;
        load_row_scaled(src, q_type, head_dim, factor, qrows + r * head_dim);
        lim[r] = lens[b] + i + 1;  // bottom-right causal: query i sees cache positions <= cache_lens + i
      }
    AttendArgs args;
    args.q = qrows;
    args.q_stride = head_dim;
    args.rows = rows;
    args.limits = lim;
    args.k = k_base + (b * k_cache.stride(0) + h * k_cache.stride(1)) * kv_esize;
    args.k_stride = k_cache.stride(2);
    args.dk = head_dim;
    args.v = v_base + (b * v_cache.stride(0) + h * v_cache.stride(1)) * kv_esize;
    args.v_stride = v_cache.stride(2);
    args.dv = head_dim;
    args.key_begin = split * split_keys;
    args.key_end = std::min(lens[b] + i1, (split + 1) * split_keys);
    args.m = m;
    args.l = l;
    args.acc = acc;
    args.acc_stride = head_dim;
    attend(args);
    if (splits == 1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = (i - i0) * group + g;
          char* dst = out_base + (((b * q_len + i) * q_heads) + h * group + g) * head_dim * out_esize;
          store_row_scaled(acc + r * head_dim, 1.0f / l[r], head_dim, out_type, dst);
        }
    } else {
      const int64_t slot = (task * splits + split) * max_rows;
      std::copy(m, m + rows, part_m.data() + slot);
      std::copy(l, l + rows, part_l.data() + slot);
      std::copy(acc, acc + rows * head_dim, part_acc.data() + slot * head_dim);
    }
  });

  if (splits > 1) {
    // Merge the pieces of each row: weights 2^(m_s - max_s m_s).
    std::vector<float> merged(head_dim);
    for (int64_t task = 0; task < base_tasks; ++task) {
      const int64_t qb = task % q_blocks, h = (task / q_blocks) % kv_heads, b = task / (q_blocks * kv_heads);
      const int64_t i0 = qb * block_queries, i1 = std::min(q_len, i0 + block_queries);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = (i - i0) * group + g;
          float top = -std::numeric_limits<float>::infinity();
          for (int64_t s = 0; s < splits; ++s) top = std::max(top, part_m[(task * splits + s) * max_rows + r]);
          std::fill(merged.begin(), merged.end(), 0.0f);
          float total = 0.0f;
          for (int64_t s = 0; s < splits; ++s) {
            const int64_t slot = (task * splits + s) * max_rows + r;
            if (part_m[slot] == -std::numeric_limits<float>::infinity()) continue;
            const float w = std::exp2(part_m[slot] - top);
            total += w * part_l[slot];
            const float* a = part_acc.data() + slot * head_dim;
            for (int64_t j = 0; j < head_dim; ++j) merged[j] += w * a[j];
          }
          char* dst = out_base + (((b * q_len + i) * q_heads) + h * group + g) * head_dim * out_esize;
          store_row_scaled(merged.data(), 1.0f / total, head_dim, out_type, dst);
        }
    }
  }
  return out;
}

}  // namespace hmt::cpu
