// Blockwise causal attention, backward (FlashAttention-2 order, f32, explicit
// positions). CPU twin: attention_bwd_kernel in src/backend/cpu/cpu_attention.cpp.
//
// Inputs as saved by the forward (o, lse); dq, dk, dv accumulate (+=). With
// P = exp(scale q.k - lse) on visible pairs (0 elsewhere and on rows with
// lse = -inf), D_i = dO_i . O_i, dP = dO V^T, dS = P (dP - D) * scale:
//   dV += P^T dO,  dK += dS^T Q,  dQ += dS K.
// P is recomputed tile by tile from lse: no T x S matrix.
//
// Three launches, no atomics (the result is the same bits on every run):
//  1. D_i: one warp per (b, t, h) row.
//  2. dK, dV: grid (ceil(S / rows), NH, B), 256 threads; a block owns `rows`
//     keys of one (b, h) (64 at HS <= 64), keeps their K, V rows and dK, dV
//     accumulators in registers, and streams Q and dO tiles (4096/D queries)
//     through shared memory, skipping tiles with no query that sees any of its
//     keys.
//  3. dQ: grid (ceil(T / rows), NH, B); a block owns queries as the forward
//     does and streams K and V tiles.
// FA-2 instead adds dQ with atomics from the dK/dV pass; the separate dQ pass
// recomputes QK^T and dO V^T once more (7 tile products instead of 5) in
// exchange for determinism.
#include "backend/cuda/kernels/attention_common.cuh"

namespace dsrsq::cuda {
namespace {

using namespace attn;

// One warp per row r = (b, t, h) of o / dout; Dvec laid out like lse (B, NH, T).
__global__ void attention_dvec_kernel(const float* __restrict__ dout, const float* __restrict__ o,
                                      float* __restrict__ dvec, long long B, long long T, long long NH, long long HS) {
  const long long r = blockIdx.x * 8LL + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= B * T * NH) return;  // whole warps leave together
  const long long h = r % NH, t = (r / NH) % T, b = r / (NH * T);
  float s = 0.f;
  for (long long x = lane; x < HS; x += 32) s = fmaf(dout[r * HS + x], o[r * HS + x], s);
  s = warp_sum(s);
  if (lane == 0) dvec[(b * NH + h) * T + t] = s;
}

template <int D>
__global__ void __launch_bounds__(kThreads, 2) attention_dkdv_kernel(
    const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
    const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ dvec,
    const std::int32_t* __restrict__ qpos, const std::int32_t* __restrict__ kpos, float* __restrict__ dk,
    float* __restrict__ dv, AttentionDims d) {
  using TL = Tile<D>;
  __shared__ __align__(16) float Qs[TL::kStream * D];
  __shared__ __align__(16) float dOs[TL::kStream * D];
  __shared__ int Qp[TL::kStream];
  __shared__ float Ls[TL::kStream], Ds[TL::kStream];
  __shared__ int kmin_s;

  const int HS = static_cast<int>(d.HS);
  const long long T = d.T, S = d.S, NH = d.NH;
  const long long h = blockIdx.y, b = blockIdx.z;
  const int row = threadIdx.x / TL::TPR, part = threadIdx.x % TL::TPR;
  const long long j = static_cast<long long>(blockIdx.x) * TL::kRows + row;
  const bool active = j < S;

  float kr[16], vr[16], dkr[16], dvr[16];
  const long long krow = ((b * S + (active ? j : 0)) * NH + h) * HS;
  load_row<D>(kr, k + krow, part, HS, active);
  load_row<D>(vr, v + krow, part, HS, active);
#pragma unroll
  for (int e = 0; e < 16; ++e) dkr[e] = dvr[e] = 0.f;
  const int my_pos = active ? kpos[b * S + j] : INT_MAX;

  if (threadIdx.x == 0) kmin_s = INT_MAX;
  __syncthreads();
  if (active && part == 0) atomicMin(&kmin_s, my_pos);
  __syncthreads();
  const int kmin = kmin_s;

  for (long long i0 = 0; i0 < T; i0 += TL::kStream) {
    const int nq = static_cast<int>(min(static_cast<long long>(TL::kStream), T - i0));
    int qp = INT_MIN;
    if (threadIdx.x < TL::kStream) {
      const int t = threadIdx.x;
      qp = t < nq ? qpos[b * T + i0 + t] : INT_MIN;
      Qp[t] = qp;
      Ls[t] = t < nq ? lse[(b * NH + h) * T + i0 + t] : -INFINITY;
      Ds[t] = t < nq ? dvec[(b * NH + h) * T + i0 + t] : 0.f;
    }
    const bool mine = threadIdx.x < nq && (!d.causal || qp >= kmin);
    if (!__syncthreads_or(mine)) continue;  // no query of this tile sees any key of the block
    load_tile<D>(Qs, q, b, i0, nq, T, NH, h, HS);
    load_tile<D>(dOs, dout, b, i0, nq, T, NH, h, HS);
    __syncthreads();

    for (int c0 = 0; c0 < nq; c0 += 16) {  // uniform bounds: every lane runs the same shuffles
#pragma unroll 4
      for (int ii = 0; ii < 16; ++ii) {
        const int t = c0 + ii;
        const float s = row_dot<D>(kr, Qs, t, part) * d.scale;
        const float dp = row_dot<D>(vr, dOs, t, part);
        const float L = Ls[t];
        const bool vis = t < nq && active && L != -INFINITY && (!d.causal || my_pos <= Qp[t]);
        const float p = vis ? expf(s - L) : 0.f;
        const float ds = p * (dp - Ds[t]) * d.scale;
        row_axpy<D>(dvr, p, dOs, t, part);
        row_axpy<D>(dkr, ds, Qs, t, part);
      }
    }
    __syncthreads();
  }

  if (!active) return;
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int dd = dim_of<D>(c, part, e);
      if (dd < HS) {
        dk[krow + dd] += dkr[4 * c + e];
        dv[krow + dd] += dvr[4 * c + e];
      }
    }
}

template <int D>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(
    const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
    const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ dvec,
    const std::int32_t* __restrict__ qpos, const std::int32_t* __restrict__ kpos, float* __restrict__ dq,
    AttentionDims d) {
  using TL = Tile<D>;
  __shared__ __align__(16) float Ks[TL::kStream * D];
  __shared__ __align__(16) float Vs[TL::kStream * D];
  __shared__ int Kp[TL::kStream];
  __shared__ int qmax_s;

  const int HS = static_cast<int>(d.HS);
  const long long T = d.T, S = d.S, NH = d.NH;
  const long long qb = gridDim.x - 1 - blockIdx.x;  // heaviest first
  const long long h = blockIdx.y, b = blockIdx.z;
  const int row = threadIdx.x / TL::TPR, part = threadIdx.x % TL::TPR;
  const long long i = qb * TL::kRows + row;
  const bool active = i < T;

  float qr[16], dor[16], dqr[16];
  const long long qrow = ((b * T + (active ? i : 0)) * NH + h) * HS;
  load_row<D>(qr, q + qrow, part, HS, active);
  load_row<D>(dor, dout + qrow, part, HS, active);
#pragma unroll
  for (int e = 0; e < 16; ++e) dqr[e] = 0.f;
  const int my_pos = active ? qpos[b * T + i] : INT_MIN;
  const float L = active ? lse[(b * NH + h) * T + i] : -INFINITY;
  const float Di = active ? dvec[(b * NH + h) * T + i] : 0.f;

  if (threadIdx.x == 0) qmax_s = INT_MIN;
  __syncthreads();
  if (active && part == 0 && L != -INFINITY) atomicMax(&qmax_s, my_pos);
  __syncthreads();
  const int qmax = qmax_s;

  for (long long j0 = 0; j0 < S; j0 += TL::kStream) {
    const int nk = static_cast<int>(min(static_cast<long long>(TL::kStream), S - j0));
    int kp = INT_MAX;
    if (threadIdx.x < TL::kStream) {
      kp = threadIdx.x < nk ? kpos[b * S + j0 + threadIdx.x] : INT_MAX;
      Kp[threadIdx.x] = kp;
    }
    const bool mine = threadIdx.x < nk && qmax != INT_MIN && (!d.causal || kp <= qmax);
    if (!__syncthreads_or(mine)) continue;
    load_tile<D>(Ks, k, b, j0, nk, S, NH, h, HS);
    load_tile<D>(Vs, v, b, j0, nk, S, NH, h, HS);
    __syncthreads();

    for (int c0 = 0; c0 < nk; c0 += 16) {
#pragma unroll 4
      for (int jj = 0; jj < 16; ++jj) {
        const int j = c0 + jj;
        const float s = row_dot<D>(qr, Ks, j, part) * d.scale;
        const float dp = row_dot<D>(dor, Vs, j, part);
        const bool vis = j < nk && active && L != -INFINITY && (!d.causal || Kp[j] <= my_pos);
        const float p = vis ? expf(s - L) : 0.f;
        const float ds = p * (dp - Di) * d.scale;
        row_axpy<D>(dqr, ds, Ks, j, part);
      }
    }
    __syncthreads();
  }

  if (!active) return;
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int dd = dim_of<D>(c, part, e);
      if (dd < HS) dq[qrow + dd] += dqr[4 * c + e];
    }
}

template <int D>
void launch_bwd(const float* dout, const float* q, const float* k, const float* v, const float* lse,
                const float* dvec, const std::int32_t* qpos, const std::int32_t* kpos, float* dq, float* dk, float* dv,
                const AttentionDims& d, cudaStream_t s) {
  constexpr int R = Tile<D>::kRows;
  if (d.S > 0) {
    const dim3 gk(static_cast<unsigned>((d.S + R - 1) / R), static_cast<unsigned>(d.NH), static_cast<unsigned>(d.B));
    attention_dkdv_kernel<D><<<gk, kThreads, 0, s>>>(dout, q, k, v, lse, dvec, qpos, kpos, dk, dv, d);
    DSRSQ_CUDA_LAUNCH_CHECK();
  }
  const dim3 gq(static_cast<unsigned>((d.T + R - 1) / R), static_cast<unsigned>(d.NH), static_cast<unsigned>(d.B));
  attention_dq_kernel<D><<<gq, kThreads, 0, s>>>(dout, q, k, v, lse, dvec, qpos, kpos, dq, d);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

}  // namespace

void attention_bwd(const float* dout, const float* q, const float* k, const float* v, const float* o, const float* lse,
                   const std::int32_t* qpos, const std::int32_t* kpos, float* dq, float* dk, float* dv, float* scratch,
                   const AttentionDims& d, cudaStream_t s) {
  if (d.B * d.T * d.NH == 0) return;
  DSRSQ_REQUIRE(d.HS >= 1 && d.HS <= kAttentionMaxHS, "cuda attention_bwd: head size ", d.HS, " outside [1, ",
                kAttentionMaxHS, "]");
  DSRSQ_REQUIRE(d.NH <= 65535 && d.B <= 65535, "cuda attention_bwd: NH ", d.NH, " or B ", d.B, " exceeds 65535");
  const long long rows = d.B * d.T * d.NH;
  attention_dvec_kernel<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, s>>>(dout, o, scratch, d.B, d.T, d.NH, d.HS);
  DSRSQ_CUDA_LAUNCH_CHECK();
  if (d.HS <= 32) launch_bwd<32>(dout, q, k, v, lse, scratch, qpos, kpos, dq, dk, dv, d, s);
  else if (d.HS <= 64) launch_bwd<64>(dout, q, k, v, lse, scratch, qpos, kpos, dq, dk, dv, d, s);
  else if (d.HS <= 128) launch_bwd<128>(dout, q, k, v, lse, scratch, qpos, kpos, dq, dk, dv, d, s);
  else launch_bwd<256>(dout, q, k, v, lse, scratch, qpos, kpos, dq, dk, dv, d, s);
}

}  // namespace dsrsq::cuda
