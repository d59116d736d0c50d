// Hand-written CUDA kernels: the KV append into the bounded segment cache and the ring-buffer store of the
// memory write.  Both read the per-row positions (cache_lens, written) on the device: no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops_cuda.h"

namespace hmt::cuda {
namespace {

// Threads per block: one block copies one row of `width` elements.
int threads_for(int64_t width) {
  const int64_t warps = (width + 31) / 32;
  return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, warps * 32)));
}

struct AppendParams {
  int64_t q_len, kv_heads, head_dim;
  int64_t k_s0, k_s1, k_s2;  // k_new strides (B, Lq, Hkv)
  int64_t v_s0, v_s1, v_s2;  // v_new strides
  int64_t kc_s0, kc_s1, kc_s2;  // k_cache strides (B, Hkv, W)
  int64_t vc_s0, vc_s1, vc_s2;  // v_cache strides
};

// One block per (b, i, h): k_cache[b, h, lens[b] + i, :] = k_new[b, i, h, :], same for v.  The sources may alias
// their destinations (new keys that are views of the cache tail): each element is read and written by the same
// thread, so no __restrict__.
template <typename scalar_t>
__global__ void kv_append_kernel(const scalar_t* k_new, const scalar_t* v_new, scalar_t* k_cache, scalar_t* v_cache,
                                 const int64_t* lens, AppendParams p) {
  const int64_t row = blockIdx.x;
  const int64_t h = row % p.kv_heads;
  const int64_t i = (row / p.kv_heads) % p.q_len;
  const int64_t b = row / (p.kv_heads * p.q_len);
  const int64_t pos = lens[b] + i;
  const scalar_t* ks = k_new + b * p.k_s0 + i * p.k_s1 + h * p.k_s2;
  const scalar_t* vs = v_new + b * p.v_s0 + i * p.v_s1 + h * p.v_s2;
  scalar_t* kd = k_cache + b * p.kc_s0 + h * p.kc_s1 + pos * p.kc_s2;
  scalar_t* vd = v_cache + b * p.vc_s0 + h * p.vc_s1 + pos * p.vc_s2;
  for (int64_t j = threadIdx.x; j < p.head_dim; j += blockDim.x) {
    kd[j] = ks[j];
    vd[j] = vs[j];
  }
}

// One block per batch row b: dst[b, written[b] % slots, :] = rows[b, :]; then, with advance, written[b] += 1.
template <typename scalar_t>
__global__ void memory_store_kernel(const scalar_t* rows, int64_t rows_s0, scalar_t* dst, int64_t d_s0, int64_t d_s1,
                                    int64_t d_s2, int64_t* written, int64_t w_s0, int64_t slots, int64_t width,
                                    bool advance) {
  const int64_t b = blockIdx.x;
  const int64_t slot = written[b * w_s0] % slots;  // the oldest slot once the buffer is full
  const scalar_t* src = rows + b * rows_s0;
  scalar_t* out = dst + b * d_s0 + slot * d_s1;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) out[j * d_s2] = src[j];
  if (advance) {
    __syncthreads();  // every thread has read written[b]
    if (threadIdx.x == 0) written[b * w_s0] += 1;
  }
}

}  // namespace

void launch_kv_append(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& lens) {
  const int64_t rows = k_new.size(0) * k_new.size(1) * k_new.size(2);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const AppendParams p{k_new.size(1),      k_new.size(2),      k_new.size(3),      k_new.stride(0),
                       k_new.stride(1),    k_new.stride(2),    v_new.stride(0),    v_new.stride(1),
                       v_new.stride(2),    k_cache.stride(0),  k_cache.stride(1),  k_cache.stride(2),
                       v_cache.stride(0),  v_cache.stride(1),  v_cache.stride(2)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(k_cache.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "hmt_kv_append", [&] {
    kv_append_kernel<scalar_t><<<static_cast<unsigned int>(rows), threads_for(p.head_dim), 0, stream>>>(
        k_new.data_ptr<scalar_t>(), v_new.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
        v_cache.data_ptr<scalar_t>(), lens.data_ptr<int64_t>(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_memory_store(const at::Tensor& rows, const at::Tensor& dst, const at::Tensor& written, bool advance) {
  const int64_t batch = dst.size(0);
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(dst.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dst.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "hmt_memory_store", [&] {
    memory_store_kernel<scalar_t><<<static_cast<unsigned int>(batch), threads_for(dst.size(2)), 0, stream>>>(
        rows.data_ptr<scalar_t>(), rows.stride(0), dst.data_ptr<scalar_t>(), dst.stride(0), dst.stride(1),
        dst.stride(2), written.data_ptr<int64_t>(), written.stride(0), dst.size(1), dst.size(2), advance);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hmt::cuda
