// Element-wise ops and reductions: axpy (typed), fill, scale, f32 -> f64,
// sum of squares (global-norm clipping), the bias gradient (column sums) and
// matmul's bias broadcast. CPU twins: axpy_impl, fill_impl, scale_impl,
// sum_squares_impl, bias_rows_sum_impl and the bias branch of matmul_t in
// src/backend/cpu/cpu_backend.cpp. Reductions use a fixed partition and a fixed
// tree (no atomics): the same input gives the same bits on every run.
#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

constexpr int kSumBlocks = 240;  // partial sums of sum_squares (about 2 per SM on an H100)
constexpr int kRowChunks = 64;   // row partition of bias_rows_sum

#define DSRSQ_GRID_STRIDE(i, n)                                                               \
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<i64>(gridDim.x) * blockDim.x)

// Element-wise kernels: one thread per element, grid-strided (memory bound).
template <class T>
__global__ void axpy_kernel_t(const T* __restrict__ x, T* __restrict__ y, T alpha, i64 n) {
  DSRSQ_GRID_STRIDE(i, n) y[i] += alpha * x[i];
}
template <class T>
__global__ void fill_kernel(T* __restrict__ x, T value, i64 n) {
  DSRSQ_GRID_STRIDE(i, n) x[i] = value;
}
template <class T>
__global__ void scale_kernel(T* __restrict__ x, T f, i64 n) {
  DSRSQ_GRID_STRIDE(i, n) x[i] *= f;
}
__global__ void f32_to_f64_kernel(const float* __restrict__ x, double* __restrict__ y, i64 n) {
  DSRSQ_GRID_STRIDE(i, n) y[i] = static_cast<double>(x[i]);
}

// kSumBlocks blocks of kBlock threads: block k sums the grid-strided elements
// its threads visit (a partition fixed by n alone) into partial[k].
template <class T>
__global__ void sum_squares_partial(const T* __restrict__ x, i64 n, double* __restrict__ partial) {
  __shared__ double scratch[32];
  double s = 0;
  DSRSQ_GRID_STRIDE(i, n) {
    const double v = static_cast<double>(x[i]);
    s += v * v;
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
// One block adds the partials (fixed tree).
__global__ void sum_partials(const double* __restrict__ partial, int count, double* __restrict__ out) {
  __shared__ double scratch[32];
  double s = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *out = s;
}

// Column sums: grid (column blocks, kRowChunks); thread c of chunk k sums its
// rows in order (consecutive threads read consecutive columns: coalesced).
template <class T>
__global__ void bias_partial(const T* __restrict__ d, T* __restrict__ scratch, i64 N, i64 C) {
  const i64 c = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const i64 per = (N + kRowChunks - 1) / kRowChunks, n0 = blockIdx.y * per, n1 = min(N, n0 + per);
  T s = 0;
  for (i64 n = n0; n < n1; ++n) s += d[n * C + c];
  scratch[static_cast<i64>(blockIdx.y) * C + c] = s;
}
template <class T>
__global__ void bias_final(const T* __restrict__ scratch, T* __restrict__ dbias, i64 C) {
  const i64 c = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  T s = 0;
  for (int k = 0; k < kRowChunks; ++k) s += scratch[static_cast<i64>(k) * C + c];
  dbias[c] += s;
}

// One thread per element of c (rows x N).
template <class T>
__global__ void add_bias_kernel(T* __restrict__ c, const T* __restrict__ bias, i64 rows, i64 N, T beta) {
  DSRSQ_GRID_STRIDE(i, rows * N) {
    const T b = bias[i % N];
    c[i] = beta == T(0) ? b : c[i] + b / beta;
  }
}

// One thread per (row, col) of the strictly lower triangle (column-major).
__global__ void mirror_kernel(double* __restrict__ g, i64 n) {
  DSRSQ_GRID_STRIDE(t, n * n) {
    const i64 i = t % n, j = t / n;  // element (i, j) at i + j n
    if (i > j) g[i + j * n] = g[j + i * n];
  }
}

}  // namespace

template <class T>
void axpy_t(const T* x, T* y, T alpha, i64 n, cudaStream_t s) {
  if (n == 0) return;
  axpy_kernel_t<T><<<grid_for(n), kBlock, 0, s>>>(x, y, alpha, n);
  DSRSQ_CUDA_LAUNCH_CHECK();
}
template <class T>
void fill(T* x, T value, i64 n, cudaStream_t s) {
  if (n == 0) return;
  fill_kernel<T><<<grid_for(n), kBlock, 0, s>>>(x, value, n);
  DSRSQ_CUDA_LAUNCH_CHECK();
}
template <class T>
void scale(T* x, T f, i64 n, cudaStream_t s) {
  if (n == 0) return;
  scale_kernel<T><<<grid_for(n), kBlock, 0, s>>>(x, f, n);
  DSRSQ_CUDA_LAUNCH_CHECK();
}
void f32_to_f64(const float* x, double* y, i64 n, cudaStream_t s) {
  if (n == 0) return;
  f32_to_f64_kernel<<<grid_for(n), kBlock, 0, s>>>(x, y, n);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

i64 sum_squares_scratch() { return kSumBlocks; }
template <class T>
void sum_squares(const T* x, i64 n, double* scratch, double* out_dev, cudaStream_t s) {
  sum_squares_partial<T><<<kSumBlocks, kBlock, 0, s>>>(x, n, scratch);
  DSRSQ_CUDA_LAUNCH_CHECK();
  sum_partials<<<1, kBlock, 0, s>>>(scratch, kSumBlocks, out_dev);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

i64 bias_rows_sum_scratch(i64 C) { return kRowChunks * C; }
template <class T>
void bias_rows_sum(const T* d, T* dbias, i64 N, i64 C, T* scratch, cudaStream_t s) {
  if (C == 0) return;
  const unsigned cols = static_cast<unsigned>((C + kBlock - 1) / kBlock);
  bias_partial<T><<<dim3(cols, kRowChunks), kBlock, 0, s>>>(d, scratch, N, C);
  DSRSQ_CUDA_LAUNCH_CHECK();
  bias_final<T><<<cols, kBlock, 0, s>>>(scratch, dbias, C);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template <class T>
void add_bias_rows(T* c, const T* bias, i64 rows, i64 N, T beta, cudaStream_t s) {
  if (rows * N == 0) return;
  add_bias_kernel<T><<<grid_for(rows * N), kBlock, 0, s>>>(c, bias, rows, N, beta);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

void mirror_upper(double* g, i64 n, cudaStream_t s) {
  if (n < 2) return;
  mirror_kernel<<<grid_for(n * n), kBlock, 0, s>>>(g, n);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template void axpy_t<float>(const float*, float*, float, i64, cudaStream_t);
template void axpy_t<double>(const double*, double*, double, i64, cudaStream_t);
template void fill<float>(float*, float, i64, cudaStream_t);
template void fill<double>(double*, double, i64, cudaStream_t);
template void fill<std::int32_t>(std::int32_t*, std::int32_t, i64, cudaStream_t);
template void scale<float>(float*, float, i64, cudaStream_t);
template void scale<double>(double*, double, i64, cudaStream_t);
template void sum_squares<float>(const float*, i64, double*, double*, cudaStream_t);
template void sum_squares<double>(const double*, i64, double*, double*, cudaStream_t);
template void bias_rows_sum<float>(const float*, float*, i64, i64, float*, cudaStream_t);
template void bias_rows_sum<double>(const double*, double*, i64, i64, double*, cudaStream_t);
template void add_bias_rows<float>(float*, const float*, i64, i64, float, cudaStream_t);
template void add_bias_rows<double>(double*, const double*, i64, i64, double, cudaStream_t);

}  // namespace dsrsq::cuda
