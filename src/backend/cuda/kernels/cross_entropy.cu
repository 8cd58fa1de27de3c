// Masked softmax cross-entropy, forward and backward. CPU twin:
// cross_entropy_fwd_t / cross_entropy_bwd_t in src/backend/cpu/cpu_backend.cpp.
//   fwd: losses[n] = logsumexp(logits[n]) - logits[n][tgt[n]] where mask[n] != 0,
//        0 elsewhere (overwrite); total = sum_n mask[n] * losses[n] (double)
//   bwd: dlogits[n] = g * mask[n] * (softmax(logits[n]) - onehot(tgt[n]))  (overwrite),
//        g = dloss * inv_norm (folded by the caller)
#include <cmath>

#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

constexpr int kCeBlock = 256;

__device__ __forceinline__ float exp_t(float x) { return expf(x); }
__device__ __forceinline__ double exp_t(double x) { return exp(x); }

// One block per row (V is the vocabulary: thousands of columns; 256 threads
// stride over them): max, then the sum of exponentials, both block reductions.
template <class T>
__global__ void ce_fwd_kernel(const T* __restrict__ logits, const std::int32_t* __restrict__ tgt,
                              const T* __restrict__ mask, T* __restrict__ losses, i64 V) {
  __shared__ T scratch[32];
  const i64 n = blockIdx.x;
  if (mask[n] == T(0)) {  // uniform per block
    if (threadIdx.x == 0) losses[n] = 0;
    return;
  }
  const T* row = logits + n * V;
  T mx = -INFINITY;
  for (i64 v = threadIdx.x; v < V; v += blockDim.x) mx = max(mx, row[v]);
  mx = block_max(mx, scratch, static_cast<T>(-INFINITY));
  T s = 0;
  for (i64 v = threadIdx.x; v < V; v += blockDim.x) s += exp_t(row[v] - mx);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) losses[n] = log(s) + mx - row[tgt[n]];
}

// One block: sum_n mask*loss in double, each thread over a fixed stride, then
// a fixed tree: deterministic.
template <class T>
__global__ void ce_total_kernel(const T* __restrict__ mask, const T* __restrict__ losses, double* __restrict__ total,
                                i64 N) {
  __shared__ double scratch[32];
  double s = 0;
  for (i64 n = threadIdx.x; n < N; n += blockDim.x) s += static_cast<double>(mask[n]) * static_cast<double>(losses[n]);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *total = s;
}

// One block per row, as the forward; every column is written.
template <class T>
__global__ void ce_bwd_kernel(const T* __restrict__ logits, const std::int32_t* __restrict__ tgt,
                              const T* __restrict__ mask, T* __restrict__ dl, i64 V, double g) {
  __shared__ T scratch[32];
  const i64 n = blockIdx.x;
  T* d = dl + n * V;
  if (mask[n] == T(0)) {
    for (i64 v = threadIdx.x; v < V; v += blockDim.x) d[v] = 0;
    return;
  }
  const T* row = logits + n * V;
  T mx = -INFINITY;
  for (i64 v = threadIdx.x; v < V; v += blockDim.x) mx = max(mx, row[v]);
  mx = block_max(mx, scratch, static_cast<T>(-INFINITY));
  T s = 0;
  for (i64 v = threadIdx.x; v < V; v += blockDim.x) s += exp_t(row[v] - mx);
  s = block_sum(s, scratch);
  const T gm = static_cast<T>(g) * mask[n];
  const T f = gm / s;
  const i64 t = tgt[n];
  for (i64 v = threadIdx.x; v < V; v += blockDim.x) {
    T val = exp_t(row[v] - mx) * f;
    if (v == t) val -= gm;
    d[v] = val;
  }
}

}  // namespace

template <class T>
void cross_entropy_fwd(const T* logits, const std::int32_t* tgt, const T* mask, T* losses, double* total_dev, i64 N,
                       i64 V, cudaStream_t s) {
  if (N > 0) {
    ce_fwd_kernel<T><<<static_cast<unsigned>(N), kCeBlock, 0, s>>>(logits, tgt, mask, losses, V);
    DSRSQ_CUDA_LAUNCH_CHECK();
  }
  ce_total_kernel<T><<<1, kCeBlock, 0, s>>>(mask, losses, total_dev, N);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template <class T>
void cross_entropy_bwd(const T* logits, const std::int32_t* tgt, const T* mask, T* dlogits, i64 N, i64 V, double g,
                       cudaStream_t s) {
  if (N == 0) return;
  ce_bwd_kernel<T><<<static_cast<unsigned>(N), kCeBlock, 0, s>>>(logits, tgt, mask, dlogits, V, g);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template void cross_entropy_fwd<float>(const float*, const std::int32_t*, const float*, float*, double*, i64, i64,
                                       cudaStream_t);
template void cross_entropy_fwd<double>(const double*, const std::int32_t*, const double*, double*, double*, i64, i64,
                                        cudaStream_t);
template void cross_entropy_bwd<float>(const float*, const std::int32_t*, const float*, float*, i64, i64, double,
                                       cudaStream_t);
template void cross_entropy_bwd<double>(const double*, const std::int32_t*, const double*, double*, i64, i64, double,
                                        cudaStream_t);

}  // namespace dsrsq::cuda
