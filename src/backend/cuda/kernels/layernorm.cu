// LayerNorm over the last dim, forward and backward. CPU twin:
// layernorm_fwd_t / layernorm_bwd_t in src/backend/cpu/cpu_backend.cpp.
//   fwd: out = (x - mean) * rstd * w + b; saves mean (N), rstd (N)   (overwrite)
//   bwd: dx +=, dw +=, db +=  (dw, db summed over rows in a fixed partition:
//        deterministic, no atomics)
#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp per row, 8 warps per block
constexpr int kChunks = 64;       // row partition of the dw/db reduction

// One warp per row (rows are C <= a few thousand: a warp streams a row from
// L1/L2 three times). Two passes for the variance, as the CPU twin.
template <class T>
__global__ void layernorm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                     T* __restrict__ out, T* __restrict__ mean, T* __restrict__ rstd, i64 N, i64 C,
                                     T eps) {
  const i64 n = blockIdx.x * static_cast<i64>(kRowsPerBlock) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= N) return;  // whole warps leave together
  const T* xr = x + n * C;
  T s = 0;
  for (i64 c = lane; c < C; c += 32) s += xr[c];
  const T m = warp_sum(s) / static_cast<T>(C);
  T v = 0;
  for (i64 c = lane; c < C; c += 32) v += (xr[c] - m) * (xr[c] - m);
  const T rs = T(1) / sqrt(warp_sum(v) / static_cast<T>(C) + eps);
  T* o = out + n * C;
  for (i64 c = lane; c < C; c += 32) o[c] = (xr[c] - m) * rs * w[c] + b[c];
  if (lane == 0) {
    mean[n] = m;
    rstd[n] = rs;
  }
}

// dx: one warp per row, as the forward.
template <class T>
__global__ void layernorm_dx_kernel(const T* __restrict__ dout, const T* __restrict__ x, const T* __restrict__ w,
                                    const T* __restrict__ mean, const T* __restrict__ rstd, T* __restrict__ dx, i64 N,
                                    i64 C) {
  const i64 n = blockIdx.x * static_cast<i64>(kRowsPerBlock) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  const T* xr = x + n * C;
  const T* g = dout + n * C;
  const T m = mean[n], rs = rstd[n];
  T dmean = 0, dnm = 0;
  for (i64 c = lane; c < C; c += 32) {
    const T norm = (xr[c] - m) * rs;
    const T dn = g[c] * w[c];
    dmean += dn;
    dnm += dn * norm;
  }
  dmean = warp_sum(dmean) / static_cast<T>(C);
  dnm = warp_sum(dnm) / static_cast<T>(C);
  T* d = dx + n * C;
  for (i64 c = lane; c < C; c += 32) {
    const T norm = (xr[c] - m) * rs;
    d[c] += (g[c] * w[c] - dmean - norm * dnm) * rs;
  }
}

// dw/db partials: grid (column blocks, kChunks); thread c of chunk k sums its
// rows in order into scratch[k][c] (consecutive threads: consecutive columns).
template <class T>
__global__ void layernorm_dwdb_partial(const T* __restrict__ dout, const T* __restrict__ x, const T* __restrict__ mean,
                                       const T* __restrict__ rstd, T* __restrict__ scratch, i64 N, i64 C) {
  const i64 c = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const i64 per = (N + kChunks - 1) / kChunks, n0 = blockIdx.y * per, n1 = min(N, n0 + per);
  T pw = 0, pb = 0;
  for (i64 n = n0; n < n1; ++n) {
    const T g = dout[n * C + c];
    pw += g * (x[n * C + c] - mean[n]) * rstd[n];
    pb += g;
  }
  scratch[(2 * static_cast<i64>(blockIdx.y)) * C + c] = pw;
  scratch[(2 * static_cast<i64>(blockIdx.y) + 1) * C + c] = pb;
}

// One thread per column adds the kChunks partials in chunk order.
template <class T>
__global__ void layernorm_dwdb_final(const T* __restrict__ scratch, T* __restrict__ dw, T* __restrict__ db, i64 C) {
  const i64 c = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  T sw = 0, sb = 0;
  for (int k = 0; k < kChunks; ++k) {
    sw += scratch[(2 * static_cast<i64>(k)) * C + c];
    sb += scratch[(2 * static_cast<i64>(k) + 1) * C + c];
  }
  dw[c] += sw;
  db[c] += sb;
}

}  // namespace

template <class T>
void layernorm_fwd(const T* x, const T* w, const T* b, T* out, T* mean, T* rstd, i64 N, i64 C, double eps,
                   cudaStream_t s) {
  if (N == 0) return;
  const unsigned grid = static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
  layernorm_fwd_kernel<T><<<grid, 32 * kRowsPerBlock, 0, s>>>(x, w, b, out, mean, rstd, N, C, static_cast<T>(eps));
  DSRSQ_CUDA_LAUNCH_CHECK();
}

i64 layernorm_bwd_scratch(i64 C) { return 2 * kChunks * C; }

template <class T>
void layernorm_bwd(const T* dout, const T* x, const T* w, const T* mean, const T* rstd, T* dx, T* dw, T* db, i64 N,
                   i64 C, T* scratch, cudaStream_t s) {
  if (N == 0 || C == 0) return;
  const unsigned grid = static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
  layernorm_dx_kernel<T><<<grid, 32 * kRowsPerBlock, 0, s>>>(dout, x, w, mean, rstd, dx, N, C);
  DSRSQ_CUDA_LAUNCH_CHECK();
  const unsigned cols = static_cast<unsigned>((C + kBlock - 1) / kBlock);
  layernorm_dwdb_partial<T><<<dim3(cols, kChunks), kBlock, 0, s>>>(dout, x, mean, rstd, scratch, N, C);
  DSRSQ_CUDA_LAUNCH_CHECK();
  layernorm_dwdb_final<T><<<cols, kBlock, 0, s>>>(scratch, dw, db, C);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template void layernorm_fwd<float>(const float*, const float*, const float*, float*, float*, float*, i64, i64, double,
                                   cudaStream_t);
template void layernorm_fwd<double>(const double*, const double*, const double*, double*, double*, double*, i64, i64,
                                    double, cudaStream_t);
template void layernorm_bwd<float>(const float*, const float*, const float*, const float*, const float*, float*, float*,
                                   float*, i64, i64, float*, cudaStream_t);
template void layernorm_bwd<double>(const double*, const double*, const double*, const double*, const double*, double*,
                                    double*, double*, i64, i64, double*, cudaStream_t);

}  // namespace dsrsq::cuda
