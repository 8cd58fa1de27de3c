// GELU, tanh approximation (GPT-2, torch approximate='tanh'), forward and
// backward. CPU twin: gelu_fwd_t / gelu_bwd_t in src/backend/cpu/cpu_backend.cpp,
// the same formula: in f32, tanh(u) = 1 - 2 / (exp(2u) + 1) with u clamped to
// [-15, 15] (cpu_math.hpp ftanh); in f64, tanh itself.
//   fwd: out = 0.5 x (1 + tanh(k0 (x + k1 x^3)))          (overwrite)
//   bwd: dx = dout * gelu'(x)                               (overwrite)
#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

__device__ __forceinline__ float tanh_like_cpu(float u) {
  const float uc = u > 15.f ? 15.f : (u < -15.f ? -15.f : u);
  return 1.f - 2.f / (expf(2.f * uc) + 1.f);
}
__device__ __forceinline__ double tanh_like_cpu(double u) { return tanh(u); }

// One thread per element, grid-strided (memory bound).
template <class T>
__global__ void gelu_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, i64 n) {
  const T k0 = static_cast<T>(0.7978845608028654), k1 = static_cast<T>(0.044715);
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const T v = x[i];
    out[i] = T(0.5) * v * (T(1) + tanh_like_cpu(k0 * (v + k1 * v * v * v)));
  }
}

template <class T>
__global__ void gelu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ x, T* __restrict__ dx, i64 n) {
  const T k0 = static_cast<T>(0.7978845608028654), k1 = static_cast<T>(0.044715);
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const T v = x[i];
    const T t = tanh_like_cpu(k0 * (v + k1 * v * v * v));
    const T dt = (T(1) - t * t) * k0 * (T(1) + T(3) * k1 * v * v);
    dx[i] = dout[i] * (T(0.5) * (T(1) + t) + T(0.5) * v * dt);
  }
}

}  // namespace

template <class T>
void gelu_fwd(const T* x, T* out, i64 n, cudaStream_t s) {
  if (n == 0) return;
  gelu_fwd_kernel<T><<<grid_for(n), kBlock, 0, s>>>(x, out, n);
  DSRSQ_CUDA_LAUNCH_CHECK();
}
template <class T>
void gelu_bwd(const T* dout, const T* x, T* dx, i64 n, cudaStream_t s) {
  if (n == 0) return;
  gelu_bwd_kernel<T><<<grid_for(n), kBlock, 0, s>>>(dout, x, dx, n);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template void gelu_fwd<float>(const float*, float*, i64, cudaStream_t);
template void gelu_fwd<double>(const double*, double*, i64, cudaStream_t);
template void gelu_bwd<float>(const float*, const float*, float*, i64, cudaStream_t);
template void gelu_bwd<double>(const double*, const double*, double*, i64, cudaStream_t);

}  // namespace dsrsq::cuda
