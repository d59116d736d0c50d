// Weight-only linear layers: argument checks, the choice of instruction-set build, threads (linear.h).
#include "linear.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "common.h"

namespace hmt::cpu {

namespace {

using RowsFn = void (*)(const LinearArgs&, int64_t, int64_t);
using DotFn = void (*)(const DotArgs&, int64_t, int64_t);
using QuantizeFn = void (*)(const float*, int64_t, int64_t, int64_t, int8_t*, int64_t, float*, float*);
using LowRankFn = void (*)(float*, int64_t, const float*, int64_t, const void*, bool);
using Bf16Fn = void (*)(const Bf16Args&, int64_t, int64_t);
using DequantizeFn = void (*)(WeightFormat, const uint8_t*, int64_t, int64_t, int64_t, int64_t, float*);

struct IsaBuild {
  const char* name;
  RowsFn fn;
  DotFn dot;
  QuantizeFn quantize;
  LowRankFn low_rank;
  bool (*supported)();
  Bf16Fn bf16;
  bool (*bf16_supported)();
  DequantizeFn dequantize;
};

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("avx512vnni");  // the build's integer dot products use VNNI
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool always() { return true; }

// Best first; a build is listed only when setup.py compiled it (HMT_LINEAR_AVX512 / HMT_LINEAR_AVX2).
const std::vector<IsaBuild>& builds() {
  static const std::vector<IsaBuild> list = {
#ifdef HMT_LINEAR_AVX512
      {"avx512", &avx512::linear_rows, &avx512::dot_rows, &avx512::quantize_x, &avx512::add_low_rank,
       &cpu_has_avx512, &avx512::bf16_rows, &avx512::bf16_rows_supported,
       &avx512::dequantize_blocks},
#endif
#ifdef HMT_LINEAR_AVX2
      {"avx2", &avx2::linear_rows, &avx2::dot_rows, &avx2::quantize_x, &avx2::add_low_rank,
       &cpu_has_avx2, &avx2::bf16_rows, &avx2::bf16_rows_supported,
       &avx2::dequantize_blocks},
#endif
      {"scalar", &scalar::linear_rows, &scalar::dot_rows, &scalar::quantize_x, &scalar::add_low_rank,
       &always, &scalar::bf16_rows, &scalar::bf16_rows_supported,
       &scalar::dequantize_blocks},
  };
  return list;
}

const IsaBuild* find_build(const std::string& name) {
  for (const auto& b : builds())
    if (name == b.name) return &b;
  return nullptr;
}

std::string usable_names() {
  std::string s;
  for (const auto& b : builds())
    if (b.supported()) s += (s.empty() ? "" : ", ") + std::string(b.name);
  return s;
}

const IsaBuild& checked_build(const std::string& name, const char* source) {
  const IsaBuild* b = find_build(name);
  TORCH_CHECK_VALUE(b != nullptr || name == "avx512" || name == "avx2" || name == "scalar", source, "=", name,
                    ": expected one of avx512, avx2, scalar");
  TORCH_CHECK_VALUE(b != nullptr, source, "=", name, ": this extension was built without the ", name,
                    " kernels (the compiler lacked its flags); available here: ", usable_names());
  TORCH_CHECK_VALUE(b->supported(), source, "=", name, ": this CPU cannot run the ", name,
                    " kernels; available here: ", usable_names());
  return *b;
}

std::atomic<const IsaBuild*> current{nullptr};
std::mutex choose_mutex;

const IsaBuild& active() {
  const IsaBuild* b = current.load(std::memory_order_acquire);
  if (b != nullptr) return *b;
  std::lock_guard<std::mutex> lock(choose_mutex);
  b = current.load();
  if (b == nullptr) {
    const char* env = std::getenv("HMT_ISA");
    if (env != nullptr && *env != '\0') {
      b = &checked_build(env, "HMT_ISA");
    } else {
      for (const auto& candidate : builds()) {
        if (candidate.supported()) {
          b = &candidate;
          break;
        }
      }
    }
    current.store(b, std::memory_order_release);
  }
  return *b;
}

int64_t block_count(int64_t k) { return (k + 31) / 32; }



// From this many rows of x on, hmt::linear / linear_out run linear_gemm (prefill) instead of the weight-only
// kernels (decode, short chunks).
constexpr int64_t kGemmRows = 32;
// Integer dot products ("...:i8" formats) for fewer than this many rows of x; from it on, the bfloat16 products
// where the CPU has them (bf16_products: AVX512-BF16, HMT_BF16_GEMM), else still the integer dots: a row's outputs
// are then the same alone or batched, and on an AVX2 CPU at 8 rows they were a little faster than the float32
// kernels (every matrix of the model once: 50.9 against 53.5 ms, benchmarks/RESULTS.md).
constexpr int64_t kDotRows = 4;

const char* format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::kF32:
      return "fp32";
    case WeightFormat::kBF16:
      return "bf16";
    case WeightFormat::kI8:
      return "int8";
    case WeightFormat::kQ4_1:
      return "q4_1";
    case WeightFormat::kQ8_0:
      return "q8_0";
  }
  return "?";
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " is on ", t.device(), ": hmt::linear runs on the CPU");
}

LinearArgs kernel_args(const PackedLinear& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy) {
  return LinearArgs{p.format, p.w, p.row_bytes, p.scale, p.k, x, ldx, m, p.bias, y, ldy};
}

// Rows n0 .. n1 of W as float32 into out (n1 - n0, K), exactly as the kernels see them; int8 rows are the
// integers themselves (the per-row scale multiplies the dot product, as in the kernels).
void dequantize_rows(const PackedLinear& p, int64_t n0, int64_t n1, float* out) {
  const int64_t k = p.k;
  const IsaBuild& build = active();
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    if (p.format == WeightFormat::kQ4_1 || p.format == WeightFormat::kQ8_0) {  // the vectorised build's loop
      build.dequantize(p.format, p.w, p.row_bytes, k, r0, r1, out + (r0 - n0) * k);
      return;
    }
    for (int64_t n = r0; n < r1; ++n) {
      const uint8_t* row = p.w + n * p.row_bytes;
      float* o = out + (n - n0) * k;
      if (p.format == WeightFormat::kF32) {
        std::memcpy(o, row, k * sizeof(float));
      } else if (p.format == WeightFormat::kBF16) {
        const auto* b = reinterpret_cast<const c10::BFloat16*>(row);
        for (int64_t i = 0; i < k; ++i) o[i] = static_cast<float>(b[i]);
      } else {  // kI8
        const auto* q = reinterpret_cast<const int8_t*>(row);
        for (int64_t i = 0; i < k; ++i) o[i] = static_cast<float>(q[i]);
      }
    }
  });
}

// Whether the integer-dot formats (":i8", the approximate path) take bfloat16 products from kDotRows rows of x on
// (the bfloat16 tiles below kGemmRows, where the build has them; bfloat16 GEMM panels from it): as
// hmt_runtime.native.quant.bf16_gemm() decides for bf16 weights, HMT_BF16_GEMM=0|1 (read on every call, so it can
// change at run time), else whether the CPU has bfloat16 dot products (AVX512-BF16; CPUs with AMX have it too).
bool bf16_products() {
  const char* env = std::getenv("HMT_BF16_GEMM");
  if (env != nullptr && (std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0)) return env[0] == '1';
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
#else
  return false;
#endif
}

// Many rows of x (prefill): the weight rows dequantized a panel at a time (about 2 MB of float32, so the
// panel stays in cache) and multiplied by torch's float32 GEMM, which reuses each weight many times where the
// weight-only kernels re-decode it per tile of x.  Same float32 products, another summation order.
void linear_gemm(const PackedLinear& p, const at::Tensor& x2, const at::Tensor& y2) {
  const int64_t panel = std::max<int64_t>(64, ((int64_t{1} << 19) / p.k) / 16 * 16);
  at::Tensor w = at::empty({std::min(panel, p.n), p.k}, x2.options());
  // The approximate path: x and each dequantized panel rounded to bfloat16, torch's bfloat16 GEMM (float32
  // accumulation, outputs rounded to bfloat16), ~2x the float32 GEMM where the CPU has bfloat16 dot products.
  const bool bf16 = p.int_dot && bf16_products();
  const at::Tensor xb = bf16 ? x2.to(at::kBFloat16) : at::Tensor();
  at::Tensor wb = bf16 ? at::empty_like(w, w.options().dtype(at::kBFloat16)) : at::Tensor();
  for (int64_t n0 = 0; n0 < p.n; n0 += panel) {
    const int64_t n1 = std::min(p.n, n0 + panel);
    at::Tensor wp = w.narrow(0, 0, n1 - n0);
    dequantize_rows(p, n0, n1, wp.data_ptr<float>());
    at::Tensor out = y2.narrow(1, n0, n1 - n0);
    if (bf16) {
      at::Tensor wbp = wb.narrow(0, 0, n1 - n0);
      wbp.copy_(wp);
      out.copy_(at::mm(xb, wbp.t()));
    } else if (out.is_contiguous()) {
      at::mm_out(out, x2, wp.t());
    } else {
      out.copy_(at::mm(x2, wp.t()));
    }
    if (p.format == WeightFormat::kI8) {
      out.mul_(at::from_blob(const_cast<float*>(p.scale) + n0, {n1 - n0}, x2.options()));
    }
    if (p.bias != nullptr) {
      out.add_(at::from_blob(const_cast<float*>(p.bias) + n0, {n1 - n0}, x2.options()));
    }
  }
}

}  // namespace

WeightFormat parse_weight_format(const std::string& name, bool* int_dot) {
  if (int_dot != nullptr) *int_dot = false;
  if (name == "q4_1:i8" || name == "q8_0:i8") {
    TORCH_CHECK_VALUE(int_dot != nullptr, "format=", name, ": integer dot products are not available here");
    *int_dot = true;
    return name[1] == '4' ? WeightFormat::kQ4_1 : WeightFormat::kQ8_0;
  }
  if (name == "fp32") return WeightFormat::kF32;
  if (name == "bf16") return WeightFormat::kBF16;
  if (name == "int8") return WeightFormat::kI8;
  if (name == "q4_1") return WeightFormat::kQ4_1;
  if (name == "q8_0") return WeightFormat::kQ8_0;
  TORCH_CHECK_VALUE(false, "format=", name, ": expected one of fp32, bf16, int8, q4_1, q8_0, q4_1:i8, q8_0:i8");
}

PackedLinear pack_linear(const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& bias, const std::string& format, int64_t k) {
  bool int_dot = false;
  const WeightFormat f = parse_weight_format(format, &int_dot);
  TORCH_CHECK_VALUE(k > 0, "x has ", k, " features: expected at least one");
  check_cpu(weight, "weight");
  check_dim(weight, "weight", 2, "(N, row)");
  const int64_t n = weight.size(0);
  at::ScalarType dtype;
  int64_t row_elems;
  switch (f) {
    case WeightFormat::kF32:
      dtype = at::kFloat, row_elems = k;
      break;
    case WeightFormat::kBF16:
      dtype = at::kBFloat16, row_elems = k;
      break;
    case WeightFormat::kI8:
      dtype = at::kChar, row_elems = k;
      break;
    case WeightFormat::kQ4_1:
      dtype = at::kByte, row_elems = block_count(k) * 20;
      break;
    default:
      dtype = at::kByte, row_elems = block_count(k) * 34;
      break;
  }
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, "weight has dtype ", weight.scalar_type(), ": format ",
                   format_name(f), " expects ", dtype);
  TORCH_CHECK_VALUE(weight.size(1) == row_elems, "weight has shape ", shape_str(weight), ": format ",
                    format_name(f), " with K = ", k, " expects (N, ", row_elems, ")");
  TORCH_CHECK_VALUE(weight.stride(1) == 1 || weight.size(1) == 1, "weight has strides ", weight.strides(),
                    ": expected a contiguous last dimension");
  TORCH_CHECK_VALUE(n > 0, "weight has shape ", shape_str(weight), ": expected at least one output row");
  const float* scale_ptr = nullptr;
  if (f == WeightFormat::kI8) {
    TORCH_CHECK_VALUE(scale.has_value(), "scale is None: format int8 needs the per-row float32 scales (N,)");
    check_cpu(*scale, "scale");
    TORCH_CHECK_TYPE(scale->scalar_type() == at::kFloat, "scale has dtype ", scale->scalar_type(),
                     ": expected float32");
    TORCH_CHECK_VALUE(scale->dim() == 1 && scale->size(0) == n && scale->is_contiguous(), "scale has shape ",
                      shape_str(*scale), ": expected a contiguous (", n, ",)");
    scale_ptr = scale->data_ptr<float>();
  } else {
    TORCH_CHECK_VALUE(!scale.has_value(), "scale was given: only format int8 has per-row scales (format ",
                      format_name(f), ")");
  }
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, "bias has dtype ", bias->scalar_type(),
                     ": expected float32");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(), "bias has shape ",
                      shape_str(*bias), ": expected a contiguous (", n, ",)");
    bias_ptr = bias->data_ptr<float>();
  }
  const int64_t row_bytes = weight.stride(0) * static_cast<int64_t>(weight.element_size());
  return PackedLinear{f, static_cast<const uint8_t*>(weight.data_ptr()), row_bytes, scale_ptr, bias_ptr, n, k,
                      int_dot};
}


// The LowRank A products of one linear_parallel_many call as parts (a projection's A rows [n0, n1): pieces of
// about kPartRows rows, at most kPartsPerFactor per factor) that the threads of its region claim in order:
// take_share(threads, fn) at the start of a thread's range computes up to its share of the parts, finish(fn)
// before the first use of s computes any part still unclaimed, then waits until every claimed part is done.
// Nothing waits on a thread that has not started: a part is waited for only once some thread has claimed it, so
// a region run on fewer threads than it was split for (or none) still finishes.
class LowRankParts {
 public:
  struct Part {
    int i;
    int64_t n0, n1;
  };
  static constexpr int kPartsPerFactor = 4;
  static constexpr int64_t kPartRows = 4;  // few rows per call of a kernel are slow

  void add(int i, int64_t rows) {
    const int64_t pieces = std::clamp<int64_t>((rows + kPartRows - 1) / kPartRows, 1, kPartsPerFactor);
    for (int64_t p = 0; p < pieces; ++p) parts_[count_++] = Part{i, rows * p / pieces, rows * (p + 1) / pieces};
  }

  template <class Fn>
  void take_share(int64_t threads, const Fn& fn) {
    const int64_t share = (count_ + threads - 1) / std::max<int64_t>(threads, 1);
    for (int64_t taken = 0; taken < share && claim(fn); ++taken) {
    }
  }

  template <class Fn>
  void finish(const Fn& fn) {
    while (claim(fn)) {
    }
    while (done_.load(std::memory_order_acquire) < count_) std::this_thread::yield();
  }

 private:
  template <class Fn>
  bool claim(const Fn& fn) {
    if (next_.load(std::memory_order_relaxed) >= count_) return false;
    const int p = next_.fetch_add(1, std::memory_order_relaxed);
    if (p >= count_) return false;
    fn(parts_[p]);
    done_.fetch_add(1, std::memory_order_release);
    return true;
  }

  std::array<Part, kMaxSharedProjections * kPartsPerFactor> parts_{};
  int count_ = 0;
  std::atomic<int> next_{0}, done_{0};
};

// run(i, n0, n1) over all weight rows of the `count` projections ps[i] (which read the same m rows of x): on
// the calling thread for small products, else contiguous ranges of whole tasks of kRowsPerTask rows (a multiple
// of every build's weight-row tile), one range per pool thread, the tasks of all projections in one list so that
// they share one parallel region.  begin(threads) runs first on every thread that takes a range (once on the
// calling thread when there is no region), before its first run().
template <class Run, class Begin>
void split_weight_rows(const PackedLinear* const* ps, int count, int64_t m, const Run& run, const Begin& begin) {
  constexpr int64_t kRowsPerTask = 16;
  static_assert(kRowsPerTask % kLowRankTile == 0, "a task's first row starts a tile of a LowRank update");
  std::array<int64_t, kMaxSharedProjections + 1> first{};  // the first task of each projection
  double work = 0.0;
  for (int i = 0; i < count; ++i) {
    first[i + 1] = first[i] + (ps[i]->n + kRowsPerTask - 1) / kRowsPerTask;
    work += static_cast<double>(m) * ps[i]->n * ps[i]->k;
  }
  const int64_t tasks = first[count];
  const auto range = [&](int64_t t0, int64_t t1) {  // tasks [t0, t1), one call per projection they touch
    int i = 0;
    while (first[i + 1] <= t0) ++i;
    while (t0 < t1) {
      const int64_t end = std::min(t1, first[i + 1]);
      run(i, (t0 - first[i]) * kRowsPerTask, std::min(ps[i]->n, (end - first[i]) * kRowsPerTask));
      t0 = end;
      ++i;
    }
  };
  const int64_t threads = pool_threads(work);
  if (threads <= 1 || tasks <= 1) {
    begin(int64_t{1});
    range(0, tasks);
    return;
  }
  const int64_t per_thread = (tasks + threads - 1) / threads;
  const int64_t chunks = (tasks + per_thread - 1) / per_thread;
  at::parallel_for(0, tasks, per_thread, [&](int64_t t0, int64_t t1) {
    begin(chunks);
    range(t0, t1);
  });
}

void linear_parallel_many(const PackedLinear* const* ps, int count, const float* x, int64_t ldx, int64_t m,
                          float* const* ys, const int64_t* ldys, const LowRank* const* low_rank) {
  if (m <= 0 || count <= 0) return;
  TORCH_CHECK(count <= kMaxSharedProjections, "linear_parallel_many: ", count, " projections; at most ",
              kMaxSharedProjections);
  const IsaBuild& build = active();
  std::array<LinearArgs, kMaxSharedProjections> plain;  // per call on the hot path: no heap allocation
  std::array<DotArgs, kMaxSharedProjections> dots;
  std::array<Bf16Args, kMaxSharedProjections> bf16s;
  std::array<bool, kMaxSharedProjections> dot{}, bf16{};
  const int64_t k = ps[0]->k, blocks = block_count(k), ldq = blocks * 32;
  // The integer-dot path: x quantized per block of 32 once (on the calling thread) for every projection that
  // takes it.
  thread_local std::vector<int8_t> qx;
  thread_local std::vector<float> dx, sx;
  bool quantized = false;
  const auto quantize_once = [&] {
    if (quantized) return;
    qx.resize(static_cast<size_t>(m * ldq));
    dx.resize(static_cast<size_t>(m * blocks));
    sx.resize(static_cast<size_t>(m * blocks));
    build.quantize(x, ldx, m, k, qx.data(), ldq, dx.data(), sx.data());
    quantized = true;
  };
  // From kDotRows rows on, the same layers take bfloat16 products where the CPU has them (linear_isa.h,
  // Bf16Args): x rounded to bfloat16 once, here.
  thread_local std::vector<uint16_t> xb;
  const bool bf16_tiles = m >= kDotRows && build.bf16_supported() && bf16_products();
  const auto takes_dots = [&](const PackedLinear& p) { return p.int_dot && !bf16_tiles; };
  bool rounded = false;
  const auto round_once = [&] {
    if (rounded) return;
    xb.assign(static_cast<size_t>(m * ldq), 0);
    for (int64_t row = 0; row < m; ++row)
      for (int64_t j = 0; j < k; ++j) xb[row * ldq + j] = c10::BFloat16(x[row * ldx + j]).x;
    rounded = true;
  };
  for (int i = 0; i < count; ++i) {
    const PackedLinear& p = *ps[i];
    TORCH_CHECK(p.k == k, "linear_parallel_many: projections of one x must share K (", p.k, " != ", k, ")");
    dot[i] = takes_dots(p);
    bf16[i] = p.int_dot && bf16_tiles;
    if (bf16[i]) {
      round_once();
      bf16s[i] = Bf16Args{p.format, p.w, p.row_bytes, k, xb.data(), ldq, m, p.bias, ys[i], ldys[i]};
      continue;
    }
    if (!dot[i]) {
      plain[i] = kernel_args(p, x, ldx, m, ys[i], ldys[i]);
      continue;
    }
    quantize_once();
    dots[i] = DotArgs{p.format, p.w, p.row_bytes, k, qx.data(), ldq, dx.data(), sx.data(), m, p.bias, ys[i], ldys[i]};
  }
  // The LowRank updates' s = scale * A x (r outputs per row of x, sharing x's quantization with the
  // projections), in parts of A's rows that the region's threads claim (LowRankParts): each thread first computes
  // its share, then its weight rows; before it adds s B^T to those rows, it computes whatever part is still
  // unclaimed or waits for the parts being computed.  With no region, the calling thread computes them all.
  LowRankParts parts;
  for (int i = 0; low_rank != nullptr && i < count; ++i) {
    const LowRank* lr = low_rank[i];
    if (lr == nullptr) continue;
    const PackedLinear& a = *lr->a;
    TORCH_CHECK(a.k == k && a.n == lr->r, "linear_parallel_many: LowRank A must be (r, K)");
    if (takes_dots(a)) quantize_once();
    parts.add(i, a.n);
  }
  // (qx, dx and sx are the calling thread's: a lambda run on another thread would name that thread's own)
  const int8_t* const q_data = qx.data();
  const float* const d_data = dx.data();
  const float* const s_data = sx.data();
  const auto low_rank_part = [&](const LowRankParts::Part& part) {
    const LowRank* lr = low_rank[part.i];
    const PackedLinear& a = *lr->a;
    if (takes_dots(a)) {
      build.dot(DotArgs{a.format, a.w, a.row_bytes, k, q_data, ldq, d_data, s_data, m, nullptr, lr->s, lr->r},
                part.n0, part.n1);
    } else {
      build.fn(kernel_args(a, x, ldx, m, lr->s, lr->r), part.n0, part.n1);
    }
    for (int64_t row = 0; row < m; ++row)
      for (int64_t j = part.n0; j < part.n1; ++j) lr->s[row * lr->r + j] *= lr->scale;
  };
  const auto begin = [&](int64_t threads) { parts.take_share(threads, low_rank_part); };
  split_weight_rows(ps, count, m, [&](int i, int64_t n0, int64_t n1) {
    if (dot[i]) {
      build.dot(dots[i], n0, n1);
    } else if (bf16[i]) {
      build.bf16(bf16s[i], n0, n1);
    } else {
      build.fn(plain[i], n0, n1);
    }
    const LowRank* lr = low_rank == nullptr ? nullptr : low_rank[i];
    if (lr != nullptr) {  // the same rows, while they are in cache: y[:, n0:n1] += s B^T[:, n0:n1]
      parts.finish(low_rank_part);
      const int64_t tile_bytes = low_rank_tile_bytes(lr->r, lr->bf16);  // n0: a whole task, whole tiles
      const uint8_t* tiles = static_cast<const uint8_t*>(lr->tiles) + (n0 / kLowRankTile) * tile_bytes;
      for (int64_t row = 0; row < m; ++row)
        build.low_rank(ys[i] + row * ldys[i] + n0, n1 - n0, lr->s + row * lr->r, lr->r, tiles, lr->bf16);
    }
  }, begin);
}

void linear_parallel(const PackedLinear& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy) {
  const PackedLinear* ps[1] = {&p};
  float* ys[1] = {y};
  linear_parallel_many(ps, 1, x, ldx, m, ys, &ldy);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, const std::string& format) {
  check_cpu(x, "x");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x has dtype ", x.scalar_type(), ": expected float32");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x is a scalar: expected (..., K)");
  const int64_t k = x.size(-1);
  const PackedLinear p = pack_linear(weight, scale, bias, format, k);
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = p.n;
  at::Tensor y = at::empty(shape, x.options());
  if (x2.size(0) >= kGemmRows) {
    linear_gemm(p, x2, y.view({-1, p.n}));
    return y;
  }
  linear_parallel(p, x2.data_ptr<float>(), k, x2.size(0), y.data_ptr<float>(), p.n);
  return y;
}

void linear_out(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias, const std::string& format, const at::Tensor& out) {
  check_cpu(x, "x");
  check_cpu(out, "out");
  check_dim(x, "x", 2, "(M, K)");
  check_dim(out, "out", 2, "(M, N)");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x has dtype ", x.scalar_type(), ": expected float32");
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "out has dtype ", out.scalar_type(), ": expected float32");
  const PackedLinear p = pack_linear(weight, scale, bias, format, x.size(1));
  TORCH_CHECK_VALUE(out.size(0) == x.size(0) && out.size(1) == p.n, "out has shape ", shape_str(out),
                    ": expected (M, N) = (", x.size(0), ", ", p.n, ")");
  TORCH_CHECK_VALUE(out.stride(1) == 1 || p.n == 1, "out has strides ", out.strides(),
                    ": expected a contiguous last dimension");
  TORCH_CHECK_VALUE(x.stride(1) == 1 || x.size(1) == 1, "x has strides ", x.strides(),
                    ": expected a contiguous last dimension");
  if (x.size(0) >= kGemmRows) {
    linear_gemm(p, x, out);
    return;
  }
  linear_parallel(p, x.data_ptr<float>(), x.stride(0), x.size(0), out.data_ptr<float>(), out.stride(0));
}

std::string linear_isa() { return active().name; }

bool linear_bf16() { return active().bf16_supported(); }


std::vector<std::string> linear_isas() {
  std::vector<std::string> names;
  for (const auto& b : builds())
    if (b.supported()) names.emplace_back(b.name);
  return names;
}

void set_linear_isa(const std::string& name) {
  const IsaBuild& b = checked_build(name, "isa");
  std::lock_guard<std::mutex> lock(choose_mutex);
  current.store(&b, std::memory_order_release);
}

}  // namespace hmt::cpu
