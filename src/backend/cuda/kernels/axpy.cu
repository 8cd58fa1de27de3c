// y += alpha * x on the device, f32. CPU twin: CpuBackend::axpy_impl
// (src/backend/cpu/cpu_backend.cpp). Proves the CUDA build path end to end;
// the CUDA backend's other kernels join this folder one concern a file.
#include <cuda_runtime.h>

#include "backend/cuda/cuda_device.hpp"

namespace dsrsq::cuda {

// ---- forward kernels --------------------------------------------------------
__global__ void axpy_kernel(const float* __restrict__ x, float* __restrict__ y, float alpha, long long n) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] += alpha * x[i];
}

// ---- launchers (host) -------------------------------------------------------
void axpy(const float* x, float* y, float alpha, long long n, cudaStream_t stream) {
  if (n <= 0) return;
  const int block = 256;
  const long long grid = (n + block - 1) / block;
  axpy_kernel<<<static_cast<unsigned>(grid), block, 0, stream>>>(x, y, alpha, n);
  DSRSQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsrsq::cuda
