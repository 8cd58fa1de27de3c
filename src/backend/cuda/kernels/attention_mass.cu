// Attention mass (the importance a key receives), forward only. CPU twin:
// CpuBackend::attention_mass_impl in src/backend/cpu/cpu_latent_attention.cpp.
//   mass[b,j] = (sum_i row_weight[i] sum_h p_{ihj}) / divisor        (=)
// p: the dense causal softmax of query (b,i,h) over the keys k_pos <= q_pos,
// scores in f64 of f32 values; rows with weight 0 are skipped, a row that sees
// no key contributes nothing. Two passes as on the CPU: the rows' maxima and
// normalisers, then per key its mass summed over i, then h, in order (one
// thread per key, so the sum order is the CPU twin's: deterministic).
#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

__device__ __forceinline__ double mass_score(const float* __restrict__ q, const float* __restrict__ k, i64 b, i64 i,
                                             i64 h, i64 j, i64 T, i64 S, i64 NH, i64 HS, double scale) {
  const float* qv = q + ((b * T + i) * NH + h) * HS;
  const float* kv = k + ((b * S + j) * NH + h) * HS;
  double d = 0;
  for (i64 x = 0; x < HS; ++x) d += static_cast<double>(qv[x]) * static_cast<double>(kv[x]);
  return d * scale;
}

// Pass 1: one warp per row r = ((b*T + i)*NH + h); lanes stride over the keys,
// then a warp max and a warp sum (8 rows per 256-thread block).
__global__ void mass_rows_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                 const std::int32_t* __restrict__ qpos, const std::int32_t* __restrict__ kpos,
                                 const double* __restrict__ rw, double* __restrict__ mxs, double* __restrict__ zs, i64 B,
                                 i64 T, i64 S, i64 NH, i64 HS, double scale) {
  const i64 r = blockIdx.x * 8LL + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= B * T * NH) return;  // whole warps leave together
  const i64 b = r / (T * NH), i = (r / NH) % T, h = r % NH;
  if (rw[i] == 0.0) {
    if (lane == 0) {
      mxs[r] = -INFINITY;
      zs[r] = 0.0;
    }
    return;
  }
  const std::int32_t qp = qpos[b * T + i];
  double mx = -INFINITY;
  for (i64 j = lane; j < S; j += 32)
    if (kpos[b * S + j] <= qp) mx = fmax(mx, mass_score(q, k, b, i, h, j, T, S, NH, HS, scale));
  mx = warp_max(mx);
  double z = 0;
  if (mx != -INFINITY)
    for (i64 j = lane; j < S; j += 32)
      if (kpos[b * S + j] <= qp) z += exp(mass_score(q, k, b, i, h, j, T, S, NH, HS, scale) - mx);
  z = warp_sum(z);
  if (lane == 0) {
    mxs[r] = mx;
    zs[r] = z;
  }
}

// Pass 2: one thread per key (b, j), grid-strided; queries in order, heads in order.
__global__ void mass_keys_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                 const std::int32_t* __restrict__ qpos, const std::int32_t* __restrict__ kpos,
                                 const double* __restrict__ rw, const double* __restrict__ mxs,
                                 const double* __restrict__ zs, double* __restrict__ mass, i64 B, i64 T, i64 S, i64 NH,
                                 i64 HS, double scale, double divisor) {
  for (i64 bj = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; bj < B * S;
       bj += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 b = bj / S, j = bj % S;
    double m = 0;
    for (i64 i = 0; i < T; ++i) {
      if (rw[i] == 0.0 || kpos[bj] > qpos[b * T + i]) continue;
      for (i64 h = 0; h < NH; ++h) {
        const i64 r = (b * T + i) * NH + h;
        if (mxs[r] == -INFINITY) continue;
        m += rw[i] * (exp(mass_score(q, k, b, i, h, j, T, S, NH, HS, scale) - mxs[r]) / zs[r]);
      }
    }
    mass[bj] = m / divisor;
  }
}

}  // namespace

void attention_mass(const float* q, const float* k, const std::int32_t* qpos, const std::int32_t* kpos,
                    const double* row_weight, double* mass, double* scratch, i64 B, i64 T, i64 S, i64 NH, i64 HS,
                    double scale, double divisor, cudaStream_t s) {
  const i64 rows = B * T * NH;
  if (B * S == 0) return;
  double* mxs = scratch;
  double* zs = scratch + rows;
  if (rows > 0) {
    mass_rows_kernel<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, s>>>(q, k, qpos, kpos, row_weight, mxs, zs, B, T,
                                                                          S, NH, HS, scale);
    DSRSQ_CUDA_LAUNCH_CHECK();
  }
  mass_keys_kernel<<<grid_for(B * S, 128), 128, 0, s>>>(q, k, qpos, kpos, row_weight, mxs, zs, mass, B, T, S, NH, HS,
                                                         scale, divisor);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

}  // namespace dsrsq::cuda
