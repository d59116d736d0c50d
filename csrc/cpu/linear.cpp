// Weight-only linear layers: argument checks, the choice of instruction-set build, threads (linear.h).
#include "linear.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

#include "common.h"

namespace hmt::cpu {

namespace {

using RowsFn = void (*)(const LinearArgs&, int64_t, int64_t);

struct IsaBuild {
  const char* name;
  RowsFn fn;
  bool (*supported)();
};

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
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
      {"avx512", &avx512::linear_rows, &cpu_has_avx512},
#endif
#ifdef HMT_LINEAR_AVX2
      {"avx2", &avx2::linear_rows, &cpu_has_avx2},
#endif
      {"scalar", &scalar::linear_rows, &always},
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

}  // namespace

WeightFormat parse_weight_format(const std::string& name) {
  if (name == "fp32") return WeightFormat::kF32;
  if (name == "bf16") return WeightFormat::kBF16;
  if (name == "int8") return WeightFormat::kI8;
  if (name == "q4_1") return WeightFormat::kQ4_1;
  if (name == "q8_0") return WeightFormat::kQ8_0;
  TORCH_CHECK_VALUE(false, "format=", name, ": expected one of fp32, bf16, int8, q4_1, q8_0");
}

PackedLinear pack_linear(const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& bias, const std::string& format, int64_t k) {
  const WeightFormat f = parse_weight_format(format);
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
  return PackedLinear{f, static_cast<const uint8_t*>(weight.data_ptr()), row_bytes, scale_ptr, bias_ptr, n, k};
}

void linear_run(const PackedLinear& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, int64_t n0,
                int64_t n1) {
  if (m <= 0 || n1 <= n0) return;
  active().fn(kernel_args(p, x, ldx, m, y, ldy), n0, n1);
}

void linear_parallel(const PackedLinear& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy) {
  if (m <= 0) return;
  const RowsFn fn = active().fn;
  const LinearArgs args = kernel_args(p, x, ldx, m, y, ldy);
  const int64_t threads = pool_threads(static_cast<double>(m) * p.n * p.k);
  constexpr int64_t kRowsPerTask = 16;  // a multiple of every build's weight-row tile
  const int64_t tasks = (p.n + kRowsPerTask - 1) / kRowsPerTask;
  if (threads <= 1 || tasks <= 1) {
    fn(args, 0, p.n);
    return;
  }
  // Contiguous ranges of weight rows, one per thread.
  const int64_t per_thread = (tasks + threads - 1) / threads;
  at::parallel_for(0, tasks, per_thread, [&](int64_t t0, int64_t t1) {
    fn(args, t0 * kRowsPerTask, std::min(p.n, t1 * kRowsPerTask));
  });
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
  linear_parallel(p, x.data_ptr<float>(), x.stride(0), x.size(0), out.data_ptr<float>(), out.stride(0));
}

std::string linear_isa() { return active().name; }

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
