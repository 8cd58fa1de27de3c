// Token embedding, forward and backward. CPU twin: embedding_fwd_t /
// embedding_bwd_t in src/backend/cpu/cpu_backend.cpp.
//   fwd: out(N,C) = table[tok[n]]                      (overwrite)
//   bwd: dtable[tok[n]] += dout(N,C)                   (accumulate)
// The backward scatters with atomicAdd: repeated tokens add in an order the
// hardware picks, so dtable is not bitwise repeatable run to run (the sum is
// the same to f32 rounding; the CPU twin adds rows in order).
#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

// One thread per output element, grid-strided: consecutive threads read
// consecutive columns of one table row (coalesced).
template <class T>
__global__ void embedding_fwd_kernel(const std::int32_t* __restrict__ tok, const T* __restrict__ table,
                                     T* __restrict__ out, i64 N, i64 C) {
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < N * C;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 n = i / C, c = i % C;
    out[i] = table[static_cast<i64>(tok[n]) * C + c];
  }
}

// Same shape as the forward; atomicAdd because two rows n may share a token.
template <class T>
__global__ void embedding_bwd_kernel(const std::int32_t* __restrict__ tok, const T* __restrict__ dout,
                                     T* __restrict__ dtable, i64 N, i64 C) {
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < N * C;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 n = i / C, c = i % C;
    atomicAdd(dtable + static_cast<i64>(tok[n]) * C + c, dout[i]);
  }
}

}  // namespace

template <class T>
void embedding_fwd(const std::int32_t* tok, const T* table, T* out, i64 N, i64 C, cudaStream_t s) {
  if (N * C == 0) return;
  embedding_fwd_kernel<T><<<grid_for(N * C), kBlock, 0, s>>>(tok, table, out, N, C);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template <class T>
void embedding_bwd(const std::int32_t* tok, const T* dout, T* dtable, i64 N, i64 C, cudaStream_t s) {
  if (N * C == 0) return;
  embedding_bwd_kernel<T><<<grid_for(N * C), kBlock, 0, s>>>(tok, dout, dtable, N, C);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template void embedding_fwd<float>(const std::int32_t*, const float*, float*, i64, i64, cudaStream_t);
template void embedding_fwd<double>(const std::int32_t*, const double*, double*, i64, i64, cudaStream_t);
template void embedding_bwd<float>(const std::int32_t*, const float*, float*, i64, i64, cudaStream_t);
template void embedding_bwd<double>(const std::int32_t*, const double*, double*, i64, i64, cudaStream_t);

}  // namespace dsrsq::cuda
