// hmt::decode_step: one decode position of a Llama-family decoder in one op (csrc/cpu/decode.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace hmt::cpu {

at::Tensor decode_step(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                       const std::vector<std::optional<at::Tensor>>& scales,
                       const std::vector<std::optional<at::Tensor>>& biases, const std::vector<std::string>& formats,
                       const std::vector<std::optional<at::Tensor>>& lora_a,
                       const std::vector<std::optional<at::Tensor>>& lora_b, const std::vector<double>& lora_scale,
                       const std::vector<at::Tensor>& norms, const std::vector<double>& eps, const at::Tensor& cos,
                       const at::Tensor& sin_signed, const std::vector<at::Tensor>& k_cache,
                       const std::vector<at::Tensor>& v_cache, const at::Tensor& lens, double scale,
                       int64_t q_heads, int64_t kv_heads);

}  // namespace hmt::cpu
