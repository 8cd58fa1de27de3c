#pragma once
// Shared layout of the blockwise attention kernels (attention_fwd.cu,
// attention_bwd.cu). f32 only (the engine's dtype); HS <= 256.
//
// Head dims are padded to D in {32, 64, 128, 256} (a template parameter).
// A row (a query in the forward and dQ kernels, a key in the dK/dV kernel)
// belongs to TPR = D/16 adjacent lanes of one warp; each lane holds 16 of the
// row's D values in registers as 4 float4, lane `part` taking the float4s
// c*TPR + part (c = 0..3). In shared memory a K/V (or Q/dO) tile row is D
// contiguous floats, so at a given c the TPR lanes of a row read TPR
// consecutive float4s (conflict-free) and all rows of the warp read the same
// ones (broadcast). A dot product is 16 FMAs per lane and a log2(TPR)-step
// butterfly over the row's lanes.
//
// 256 threads per block: 256/TPR rows per block; tiles of 4096/D rows (16 KB)
// per streamed operand, so two operands take 32 KB of shared memory at every D.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>

#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda::attn {

constexpr int kThreads = 256;

template <int D>
struct Tile {
  static constexpr int TPR = D / 16;                // lanes per row
  static constexpr int kRows = kThreads / TPR;       // rows owned per block
  static constexpr int kStream = 4096 / D;           // rows per streamed tile
  static_assert(kStream % 16 == 0, "tiles are processed in chunks of 16 rows");
};

// Dimension of element e (0..3) of float4 c (0..3) held by lane `part`.
template <int D>
__device__ __forceinline__ int dim_of(int c, int part, int e) {
  return 4 * (c * Tile<D>::TPR + part) + e;
}

// Load this lane's 16 values of a global row (zeros beyond HS or when !valid).
template <int D>
__device__ __forceinline__ void load_row(float (&r)[16], const float* __restrict__ g, int part, int HS, bool valid) {
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int d = dim_of<D>(c, part, e);
      r[4 * c + e] = valid && d < HS ? g[d] : 0.f;
    }
}

// Dot product of this lane's 16 register values with row `j` of a shared tile,
// summed over the row's TPR lanes (every lane of the row gets the sum).
template <int D>
__device__ __forceinline__ float row_dot(const float (&r)[16], const float* __restrict__ tile, int j, int part) {
  const float4* t = reinterpret_cast<const float4*>(tile + j * D);
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const float4 x = t[c * Tile<D>::TPR + part];
    s = fmaf(r[4 * c + 0], x.x, s);
    s = fmaf(r[4 * c + 1], x.y, s);
    s = fmaf(r[4 * c + 2], x.z, s);
    s = fmaf(r[4 * c + 3], x.w, s);
  }
#pragma unroll
  for (int off = Tile<D>::TPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

// acc += w * (row j of a shared tile), this lane's 16 values.
template <int D>
__device__ __forceinline__ void row_axpy(float (&acc)[16], float w, const float* __restrict__ tile, int j, int part) {
  const float4* t = reinterpret_cast<const float4*>(tile + j * D);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const float4 x = t[c * Tile<D>::TPR + part];
    acc[4 * c + 0] = fmaf(w, x.x, acc[4 * c + 0]);
    acc[4 * c + 1] = fmaf(w, x.y, acc[4 * c + 1]);
    acc[4 * c + 2] = fmaf(w, x.z, acc[4 * c + 2]);
    acc[4 * c + 3] = fmaf(w, x.w, acc[4 * c + 3]);
  }
}

// Copy rows [r0, r0 + n) of head h of a (B, L, NH, HS) tensor into a shared
// tile of kStream x D floats, zero-padded (rows >= n, dims >= HS). All threads
// of the block take part; consecutive threads read consecutive dims (coalesced).
template <int D>
__device__ __forceinline__ void load_tile(float* __restrict__ tile, const float* __restrict__ g, long long b,
                                          long long r0, int n, long long L, long long NH, long long h, int HS) {
  for (int t = threadIdx.x; t < Tile<D>::kStream * D; t += kThreads) {
    const int r = t / D, d = t % D;
    tile[t] = r < n && d < HS ? g[((b * L + r0 + r) * NH + h) * HS + d] : 0.f;
  }
}

}  // namespace dsrsq::cuda::attn
