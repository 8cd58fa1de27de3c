// AdamW (decoupled weight decay), in place, f32. CPU twin:
// CpuBackend::adamw_impl in src/backend/cpu/cpu_backend.cpp (same formula; the
// scalar constants are computed in double by the caller, as there).
#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

// One thread per parameter, grid-strided (memory bound: 4 reads, 3 writes).
__global__ void adamw_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, i64 n, float lr, float b1, float b2, float omb1, float omb2,
                             float bc1, float bc2, float eps, float wd, float gs) {
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const float gi = g[i] * gs;
    const float mi = b1 * m[i] + omb1 * gi;
    const float vi = b2 * v[i] + omb2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float mh = mi / bc1, vh = vi / bc2;
    p[i] -= lr * (mh / (sqrtf(vh) + eps) + wd * p[i]);
  }
}

}  // namespace

void adamw(float* p, const float* g, float* m, float* v, i64 n, float lr, float b1, float b2, float omb1, float omb2,
           float bc1, float bc2, float eps, float wd, float gs, cudaStream_t s) {
  if (n == 0) return;
  adamw_kernel<<<grid_for(n), kBlock, 0, s>>>(p, g, m, v, n, lr, b1, b2, omb1, omb2, bc1, bc2, eps, wd, gs);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

}  // namespace dsrsq::cuda
