// hmt::recall and hmt::memory_write on CPU (spec "Recall"; contracts: hmt_runtime/ops.py).
//
// Recall is one attention row per batch row: the query S W_q^T against the cached keys of the valid slots,
// with the raw memory embeddings as values.  It runs on the attention kernel; with few batch rows the slot
// range is split across threads and merged like split decode attention.
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"
#include "ops_cpu.h"

namespace hmt::cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kMinSplitSlots = 16;

at::Tensor as_rows(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor r = t.scalar_type() == dtype ? t : t.to(dtype);
  return r.stride(-1) == 1 ? r : r.contiguous();
}

// x @ w^T for x: (B, d), w: (d_h, d), in w's dtype.
at::Tensor project(const at::Tensor& x, const at::Tensor& w) {
  return at::mm(x.scalar_type() == w.scalar_type() ? x : x.to(w.scalar_type()), w.t());
}

// dst[j] = src[j] for n elements of esize bytes, strides in elements.
void copy_strided(const char* src, int64_t src_stride, char* dst, int64_t dst_stride, int64_t n, int64_t esize) {
  if (src_stride == 1 && dst_stride == 1) {
    std::memcpy(dst, src, n * esize);
    return;
  }
  for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * dst_stride * esize, src + j * src_stride * esize, esize);
}

}  // namespace

at::Tensor recall(const at::Tensor& summary, const at::Tensor& memory, const at::Tensor& keys,
                  const at::Tensor& written, const at::Tensor& w_q) {
  const MemoryShapes s = check_memory(memory, keys, w_q, "w_q");
  check_rows(summary, "summary", s, memory);
  check_same_device(written, "written", memory);
  const std::vector<int64_t> counts = read_counts(written, "written", s.batch);
  double work = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK_VALUE(counts[b] >= 0, "written[", b, "] = ", counts[b], ": expected a count >= 0");
    work += static_cast<double>(std::min(counts[b], s.slots)) * (s.key_dim + s.width);
  }

  const at::Tensor query = project(summary, w_q);  // (B, d_h)
  const at::ScalarType dtype = memory.scalar_type();
  const at::Tensor values = as_rows(memory, dtype);
  const at::Tensor cached = as_rows(keys, dtype);
  at::Tensor out = at::zeros({s.batch, s.width}, memory.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.batch == 0) return out;

  const int64_t threads = pool_threads(work);
  const int64_t splits = choose_splits(s.batch, threads, s.slots, kMinSplitSlots);
  const int64_t split_slots = (s.slots + splits - 1) / splits;
  std::vector<float> part_m(s.batch * splits), part_l(s.batch * splits), part_acc;
  if (splits > 1) part_acc.resize(s.batch * splits * s.width);

  const AttendFn attend = attend_for(dtype);
  const float factor = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.key_dim))) * kLog2e;
  const int64_t esize = values.element_size();
  char* out_base = static_cast<char*>(out.data_ptr());

  run_tasks(s.batch * splits, threads, [&](int64_t item) {
    static thread_local std::vector<float> buf;
    const int64_t b = item / splits, split = item % splits;
    const int64_t count = std::min(counts[b], s.slots);
    if (count == 0) {
      part_m[item] = -std::numeric_limits<float>::infinity();
      part_l[item] = 0.0f;
      if (splits > 1) std::fill_n(part_acc.data() + item * s.width, s.width, 0.0f);
      return;  // out stays 0 (callers use M_init there)
    }
    float* qrow = scratch(buf, s.key_dim + s.width);
    float* acc = splits > 1 ? part_acc.data() + item * s.width : qrow + s.key_dim;
    const char* qsrc = static_cast<const char*>(query.data_ptr()) + b * query.stride(0) * query.element_size();
    load_row_scaled(qsrc, query.scalar_type(), s.key_dim, factor, qrow);
    AttendArgs args;
    args.q = qrow;
    args.q_stride = s.key_dim;
    args.rows = 1;
    args.limits = &count;
    args.k = static_cast<const char*>(cached.data_ptr()) + b * cached.stride(0) * esize;
    args.k_stride = cached.stride(1);
    args.dk = s.key_dim;
    args.v = static_cast<const char*>(values.data_ptr()) + b * values.stride(0) * esize;
    args.v_stride = values.stride(1);
    args.dv = s.width;
    args.key_begin = split * split_slots;
    args.key_end = std::min(count, (split + 1) * split_slots);
    args.m = &part_m[item];
    args.l = &part_l[item];
    args.acc = acc;
    args.acc_stride = s.width;
    attend(args);
    if (splits == 1) store_row_scaled(acc, 1.0f / part_l[item], s.width, dtype, out_base + b * s.width * esize);
  });

  if (splits > 1) {
    std::vector<float> merged(s.width);
    for (int64_t b = 0; b < s.batch; ++b) {
      if (std::min(counts[b], s.slots) == 0) continue;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t p = 0; p < splits; ++p) top = std::max(top, part_m[b * splits + p]);
      std::fill(merged.begin(), merged.end(), 0.0f);
      float total = 0.0f;
      for (int64_t p = 0; p < splits; ++p) {
        const int64_t item = b * splits + p;
        if (part_m[item] == -std::numeric_limits<float>::infinity()) continue;
        const float w = std::exp2(part_m[item] - top);
        total += w * part_l[item];
        const float* a = part_acc.data() + item * s.width;
        for (int64_t j = 0; j < s.width; ++j) merged[j] += w * a[j];
      }
      store_row_scaled(merged.data(), 1.0f / total, s.width, dtype, out_base + b * s.width * esize);
    }
  }
  return out;
}

void memory_write(const at::Tensor& new_memory, const at::Tensor& w_k, const at::Tensor& memory,
                  const at::Tensor& keys, const at::Tensor& written) {
  const MemoryShapes s = check_memory(memory, keys, w_k, "w_k");
  check_rows(new_memory, "new_memory", s, memory);
  check_same_device(written, "written", memory);
  const std::vector<int64_t> counts = read_counts(written, "written", s.batch);
  for (int64_t b = 0; b < s.batch; ++b)
    TORCH_CHECK_VALUE(counts[b] >= 0, "written[", b, "] = ", counts[b], ": expected a count >= 0");

  const at::Tensor key_rows = as_rows(project(new_memory, w_k), keys.scalar_type());  // (B, d_h)
  const at::Tensor mem_rows = as_rows(new_memory, memory.scalar_type());            // (B, d)
  const int64_t mem_esize = memory.element_size(), key_esize = keys.element_size();
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t slot = counts[b] % s.slots;  // the oldest slot once the buffer is full
    copy_strided(static_cast<const char*>(mem_rows.data_ptr()) + b * mem_rows.stride(0) * mem_esize, 1,
                 static_cast<char*>(memory.data_ptr()) + (b * memory.stride(0) + slot * memory.stride(1)) * mem_esize,
                 memory.stride(2), s.width, mem_esize);
    copy_strided(static_cast<const char*>(key_rows.data_ptr()) + b * key_rows.stride(0) * key_esize, 1,
                 static_cast<char*>(keys.data_ptr()) + (b * keys.stride(0) + slot * keys.stride(1)) * key_esize,
                 keys.stride(2), s.key_dim, key_esize);
  }
  // written += 1, in its own dtype and layout.
  if (written.scalar_type() == at::kLong) {
    int64_t* w = written.data_ptr<int64_t>();
    for (int64_t b = 0; b < s.batch; ++b) w[b * written.stride(0)] += 1;
  } else {
    int32_t* w = written.data_ptr<int32_t>();
    for (int64_t b = 0; b < s.batch; ++b) w[b * written.stride(0)] += 1;
  }
}

}  // namespace hmt::cpu
