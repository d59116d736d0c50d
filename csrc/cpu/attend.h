// The one CPU attention kernel behind both attention_with_kvcache and recall.
//
// R query rows attend over the key rows [key_begin, key_end) of K and V with per-row causal limits, producing
// the unnormalised partial softmax state (row maximum m, row sum l, weighted value sum acc) so that a key
// range split over several threads can be merged afterwards (flash-decoding).
#pragma once

#include <cstdint>

namespace hmt::cpu {

// Key rows per tile: a tile of keys and values and its scores stay in L1.
constexpr int64_t kKeyTile = 64;

struct AttendArgs {
  // Query rows, float32, already multiplied by scale * log2(e) (scores are in base 2): (rows, q_stride).
  const float* q = nullptr;
  int64_t q_stride = 0;
  int64_t rows = 0;
  // Per row: keys with index >= limits[r] are masked (causal bound).  (rows,)
  const int64_t* limits = nullptr;
  // Keys (rows of dk elements, k_stride elements apart) and values (dv elements, v_stride apart), of the
  // storage type of the entry point; indices are absolute (key_begin is not subtracted).
  const void* k = nullptr;
  int64_t k_stride = 0;
  int64_t dk = 0;
  const void* v = nullptr;
  int64_t v_stride = 0;
  int64_t dv = 0;
  int64_t key_begin = 0;
  int64_t key_end = 0;
  // Outputs per row: m (rows,) base-2 running maximum (-inf when the row saw no key), l (rows,) sum of
  // 2^(s - m), acc (rows, acc_stride) sum of 2^(s - m) * v.
  float* m = nullptr;
  float* l = nullptr;
  float* acc = nullptr;
  int64_t acc_stride = 0;
};

// One entry point per storage type of K and V (float32, bfloat16, float16); each is compiled for several
// instruction sets and picks the best one at load time.
void attend_f32(const AttendArgs& args);
void attend_bf16(const AttendArgs& args);
void attend_f16(const AttendArgs& args);

}  // namespace hmt::cpu
