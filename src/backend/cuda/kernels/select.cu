// Top-k per row and k-means assignment (nearest centroid). CPU twin:
// src/backend/cpu/cpu_select.cpp. No backward: both produce indices.
//   topk:   idx[r, 0..k) = the k largest of x[r] in decreasing order, ties to
//           the lower index, NaN below everything                  (overwrite)
//   kmeans: assign[g,n] = argmin_c ||x[g,n] - c[g,c]||^2 over c < m (f64
//           distances, ties to the lower c), dist (optional) = that distance
#include <cub/cub.cuh>

#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

// Top-k as a segmented radix sort (CUB) of 64-bit keys that make the order
// total: high word = the value's bits mapped so that unsigned order is float
// order (-0 folded onto +0, NaN mapped to 0, below -inf), low word = ~column,
// so equal values put the lower column first. Keys are unique, so the sort's
// stability does not matter and the result is deterministic.
__device__ __forceinline__ std::uint64_t topk_key(float v, i64 col) {
  std::uint32_t hi;
  if (isnan(v)) {
    hi = 0;
  } else {
    if (v == 0.f) v = 0.f;  // -0 == +0: a tie, decided by the column
    const std::uint32_t u = __float_as_uint(v);
    hi = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<std::uint64_t>(hi) << 32) | (0xFFFFFFFFu - static_cast<std::uint32_t>(col));
}

// One thread per element (grid-strided); thread 0 also writes the R+1 offsets.
__global__ void topk_keys_kernel(const float* __restrict__ x, std::uint64_t* __restrict__ keys, int* __restrict__ off,
                                 i64 R, i64 N) {
  for (i64 t = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; t < R * N;
       t += static_cast<i64>(gridDim.x) * blockDim.x)
    keys[t] = topk_key(x[t], t % N);
  for (i64 r = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; r <= R;
       r += static_cast<i64>(gridDim.x) * blockDim.x)
    off[r] = static_cast<int>(r * N);
}

// One thread per output index.
__global__ void topk_extract_kernel(const std::uint64_t* __restrict__ sorted, std::int32_t* __restrict__ idx, i64 R,
                                    i64 N, i64 K) {
  for (i64 t = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; t < R * K;
       t += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 r = t / K, j = t % K;
    idx[t] = static_cast<std::int32_t>(0xFFFFFFFFu - static_cast<std::uint32_t>(sorted[r * N + j] & 0xFFFFFFFFu));
  }
}

struct TopkLayout {
  std::size_t keys_in = 0, keys_out = 0, offsets = 0, temp = 0, temp_bytes = 0, total = 0;
};

std::size_t align_up(std::size_t n) { return (n + 255) / 256 * 256; }

TopkLayout topk_layout(i64 R, i64 N) {
  TopkLayout l;
  const std::size_t nkeys = static_cast<std::size_t>(R * N);
  std::size_t temp = 0;
  DSRSQ_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
      nullptr, temp, static_cast<const std::uint64_t*>(nullptr), static_cast<std::uint64_t*>(nullptr),
      static_cast<int>(nkeys), static_cast<int>(R), static_cast<const int*>(nullptr), static_cast<const int*>(nullptr)));
  l.keys_in = 0;
  l.keys_out = align_up(nkeys * sizeof(std::uint64_t));
  l.offsets = l.keys_out + align_up(nkeys * sizeof(std::uint64_t));
  l.temp = l.offsets + align_up(static_cast<std::size_t>(R + 1) * sizeof(int));
  l.temp_bytes = temp;
  l.total = l.temp + align_up(temp);
  return l;
}

// One thread per point (g, n): m centroid distances in f64, strict < keeps the
// lower index on ties. Centroids of a group are shared by its points (L1/L2).
template <class T>
__global__ void kmeans_assign_kernel(const T* __restrict__ x, const T* __restrict__ c, std::int32_t* __restrict__ as,
                                     double* __restrict__ dist, i64 G, i64 N, i64 D, i64 M, i64 m) {
  for (i64 gn = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; gn < G * N;
       gn += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 g = gn / N;
    const T* xv = x + gn * D;
    i64 best = 0;
    double bd = INFINITY;
    for (i64 k = 0; k < m; ++k) {
      const T* cv = c + (g * M + k) * D;
      double d2 = 0;
      for (i64 t = 0; t < D; ++t) {
        const double d = static_cast<double>(xv[t]) - static_cast<double>(cv[t]);
        d2 += d * d;
      }
      if (d2 < bd) {
        bd = d2;
        best = k;
      }
    }
    as[gn] = static_cast<std::int32_t>(best);
    if (dist) dist[gn] = bd;
  }
}

}  // namespace

std::size_t topk_scratch_bytes(i64 R, i64 N) { return topk_layout(R, N).total; }

void topk(const float* x, std::int32_t* idx, i64 R, i64 N, i64 K, void* scratch, std::size_t scratch_bytes,
          cudaStream_t s) {
  if (R * K == 0) return;
  DSRSQ_REQUIRE(R * N < (i64{1} << 31), "cuda topk: ", R, " x ", N, " elements exceed CUB's int item count");
  const TopkLayout l = topk_layout(R, N);
  DSRSQ_REQUIRE(scratch_bytes >= l.total, "cuda topk: scratch of ", scratch_bytes, " bytes, need ", l.total);
  auto* base = static_cast<unsigned char*>(scratch);
  auto* keys_in = reinterpret_cast<std::uint64_t*>(base + l.keys_in);
  auto* keys_out = reinterpret_cast<std::uint64_t*>(base + l.keys_out);
  auto* off = reinterpret_cast<int*>(base + l.offsets);
  topk_keys_kernel<<<grid_for(R * N), kBlock, 0, s>>>(x, keys_in, off, R, N);
  DSRSQ_CUDA_LAUNCH_CHECK();
  std::size_t temp = l.temp_bytes;
  DSRSQ_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(base + l.temp, temp, keys_in, keys_out,
                                                                      static_cast<int>(R * N), static_cast<int>(R), off,
                                                                      off + 1, 0, 64, s));
  topk_extract_kernel<<<grid_for(R * K), kBlock, 0, s>>>(keys_out, idx, R, N, K);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template <class T>
void kmeans_assign(const T* x, const T* c, std::int32_t* assign, double* dist, i64 G, i64 N, i64 D, i64 M, i64 m,
                   cudaStream_t s) {
  if (G * N == 0) return;
  kmeans_assign_kernel<T><<<grid_for(G * N, 128), 128, 0, s>>>(x, c, assign, dist, G, N, D, M, m);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template void kmeans_assign<float>(const float*, const float*, std::int32_t*, double*, i64, i64, i64, i64, i64,
                                   cudaStream_t);
template void kmeans_assign<double>(const double*, const double*, std::int32_t*, double*, i64, i64, i64, i64, i64,
                                    cudaStream_t);

}  // namespace dsrsq::cuda
