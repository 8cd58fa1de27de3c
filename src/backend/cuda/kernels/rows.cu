// Gather rows / scatter-add rows (a forward/backward pair). CPU twin:
// src/backend/cpu/cpu_rows.cpp.
//   gather:      dst(M,C) = src[idx[m]]                    (overwrite, any dtype)
//   scatter_add: dst[idx[m]] += src(M,C), rows in order m   (accumulate)
// The scatter keeps the contract's order (repeated indices add in order m =
// 0..M-1: deterministic) by giving each column to one thread, as the CPU twin
// does; it is parallel over C only, which suits the methods' sizes (C is a
// model width, M a selection of rows).
#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

// One thread per 32-bit word of the output (rows are whole words: every dtype
// is 4 or 8 bytes), grid-strided; a copy, so order cannot matter.
__global__ void gather_kernel(const std::uint32_t* __restrict__ src, const std::int32_t* __restrict__ idx,
                              std::uint32_t* __restrict__ dst, i64 M, i64 words) {
  for (i64 t = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; t < M * words;
       t += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 m = t / words, w = t % words;
    dst[t] = src[static_cast<i64>(idx[m]) * words + w];
  }
}

// One thread per column c; it walks the rows m in order.
template <class T>
__global__ void scatter_add_kernel(const T* __restrict__ src, const std::int32_t* __restrict__ idx,
                                   T* __restrict__ dst, i64 M, i64 C) {
  const i64 c = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  for (i64 m = 0; m < M; ++m) dst[static_cast<i64>(idx[m]) * C + c] += src[m * C + c];
}

}  // namespace

void gather_rows(const void* src, const std::int32_t* idx, void* dst, i64 M, i64 row_bytes, cudaStream_t s) {
  const i64 words = row_bytes / 4;
  if (M * words == 0) return;
  gather_kernel<<<grid_for(M * words), kBlock, 0, s>>>(static_cast<const std::uint32_t*>(src), idx,
                                                        static_cast<std::uint32_t*>(dst), M, words);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template <class T>
void scatter_add_rows(const T* src, const std::int32_t* idx, T* dst, i64 M, i64 C, cudaStream_t s) {
  if (M * C == 0) return;
  scatter_add_kernel<T><<<static_cast<unsigned>((C + 127) / 128), 128, 0, s>>>(src, idx, dst, M, C);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template void scatter_add_rows<float>(const float*, const std::int32_t*, float*, i64, i64, cudaStream_t);
template void scatter_add_rows<double>(const double*, const std::int32_t*, double*, i64, i64, cudaStream_t);

}  // namespace dsrsq::cuda
