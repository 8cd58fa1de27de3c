#pragma once
// Helpers shared by the CUDA kernels (device code only; compiled by nvcc).
// Launch shapes are chosen per kernel and explained at each launcher.
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/cuda_device.hpp"

// After a launch: a bad configuration (grid too large, too much shared memory)
// is reported here, at the launcher, not at the next synchronising call.
#define DSRSQ_CUDA_LAUNCH_CHECK() DSRSQ_CUDA_CHECK(cudaGetLastError())

namespace dsrsq::cuda {

constexpr int kBlock = 256;  // default threads per block for element-wise kernels

// Grid for one thread per element of n, capped: the kernels stride over the rest.
inline unsigned grid_for(long long n, int block = kBlock, long long cap = 65535LL * 8) {
  long long g = (n + block - 1) / block;
  if (g < 1) g = 1;
  return static_cast<unsigned>(g < cap ? g : cap);
}

// Sum over a warp (every lane gets the result). Fixed butterfly order: deterministic.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
template <class T>
__device__ __forceinline__ T warp_max(T v) {
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, <= 1024); every
// thread gets the result. `scratch` holds 32 values. Deterministic (fixed tree).
template <class T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nw ? scratch[lane] : T(0);
  return warp_sum(r);
}
template <class T>
__device__ T block_max(T v, T* scratch, T lowest) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nw ? scratch[lane] : lowest;
  return warp_max(r);
}

}  // namespace dsrsq::cuda
