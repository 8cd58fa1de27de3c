// Blockwise causal attention, forward, with online softmax and explicit
// positions (FlashAttention-2 schedule on CUDA cores, f32). CPU twin:
// attention_fwd_kernel in src/backend/cpu/cpu_attention.cpp.
//
// q (B,T,NH,HS); k, v (B,S,NH,HS); o like q (=); lse (B,NH,T) (=), the natural
// log-sum-exp of the scaled scores. Key j is visible to query i iff !causal or
// k_pos[j] <= q_pos[i]; keys may come in any order. A row that sees no key gets
// o = 0 and lse = -inf. No T x S matrix: scores live in registers, 16 keys at
// a time.
//
// Launch: grid (ceil(T / rows), NH, B), 256 threads; a block owns `rows`
// queries of one (b, h) (64 at HS <= 64; see attention_common.cuh for the
// lane layout), heaviest query blocks (latest positions) first. It streams
// K and V in tiles of 4096/D keys through shared memory; a tile none of whose
// keys is visible to any of the block's queries is skipped (the test uses the
// block's largest query position, so shuffled key orders are handled). Per
// row, the running max m and sum l stay in registers and the output
// accumulator is rescaled when m grows (FA-2: one division at the end).
#include "backend/cuda/kernels/attention_common.cuh"

namespace dsrsq::cuda {
namespace {

using namespace attn;

template <int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                                                 const float* __restrict__ v, float* __restrict__ o,
                                                                 float* __restrict__ lse,
                                                                 const std::int32_t* __restrict__ qpos,
                                                                 const std::int32_t* __restrict__ kpos, AttentionDims d) {
  using TL = Tile<D>;
  __shared__ __align__(16) float Ks[TL::kStream * D];
  __shared__ __align__(16) float Vs[TL::kStream * D];
  __shared__ int Kp[TL::kStream];
  __shared__ int qmax_s;

  const int HS = static_cast<int>(d.HS);
  const long long B = d.B, T = d.T, S = d.S, NH = d.NH;
  const long long qb = gridDim.x - 1 - blockIdx.x;  // heaviest first
  const long long h = blockIdx.y, b = blockIdx.z;
  const int row = threadIdx.x / TL::TPR, part = threadIdx.x % TL::TPR;
  const long long i = qb * TL::kRows + row;
  const bool active = i < T;
  (void)B;

  float qr[16], acc[16];
  load_row<D>(qr, q + ((b * T + (active ? i : 0)) * NH + h) * HS, part, HS, active);
#pragma unroll
  for (int e = 0; e < 16; ++e) acc[e] = 0.f;
  const int my_pos = active ? qpos[b * T + i] : INT_MIN;

  if (threadIdx.x == 0) qmax_s = INT_MIN;
  __syncthreads();
  if (active && part == 0) atomicMax(&qmax_s, my_pos);
  __syncthreads();
  const int qmax = qmax_s;

  float m = -INFINITY, l = 0.f;
  for (long long j0 = 0; j0 < S; j0 += TL::kStream) {
    const int nk = static_cast<int>(min(static_cast<long long>(TL::kStream), S - j0));
    int kp = INT_MAX;
    if (threadIdx.x < TL::kStream) {
      kp = threadIdx.x < nk ? kpos[b * S + j0 + threadIdx.x] : INT_MAX;
      Kp[threadIdx.x] = kp;
    }
    const bool mine = threadIdx.x < nk && (!d.causal || kp <= qmax);
    if (!__syncthreads_or(mine)) continue;  // no key of this tile is visible to the block
    load_tile<D>(Ks, k, b, j0, nk, S, NH, h, HS);
    load_tile<D>(Vs, v, b, j0, nk, S, NH, h, HS);
    __syncthreads();

    for (int c0 = 0; c0 < nk; c0 += 16) {  // nk is uniform: every lane runs the same shuffles
      float s[16];
      float cmax = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < 16; ++jj) {
        const int j = c0 + jj;
        const float dot = row_dot<D>(qr, Ks, j, part);  // rows >= nk are zeros
        const bool vis = j < nk && active && (!d.causal || Kp[j] <= my_pos);
        s[jj] = vis ? dot * d.scale : -INFINITY;
        cmax = fmaxf(cmax, s[jj]);
      }
      if (cmax != -INFINITY) {
        const float mnew = fmaxf(m, cmax);
        const float corr = expf(m - mnew);  // 0 on the first visible chunk (m = -inf)
        l *= corr;
#pragma unroll
        for (int e = 0; e < 16; ++e) acc[e] *= corr;
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
          const float p = s[jj] == -INFINITY ? 0.f : expf(s[jj] - mnew);
          l += p;
          row_axpy<D>(acc, p, Vs, c0 + jj, part);
        }
        m = mnew;
      }
    }
    __syncthreads();  // the tile is consumed before the next one is loaded
  }

  if (!active) return;
  float* orow = o + ((b * T + i) * NH + h) * HS;
  const float inv = l == 0.f ? 0.f : 1.f / l;
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int dd = dim_of<D>(c, part, e);
      if (dd < HS) orow[dd] = acc[4 * c + e] * inv;  // l == 0: acc is 0, o = 0
    }
  if (part == 0) lse[(b * NH + h) * T + i] = l == 0.f ? -INFINITY : m + logf(l);
}

template <int D>
void launch_fwd(const float* q, const float* k, const float* v, float* o, float* lse, const std::int32_t* qpos,
                const std::int32_t* kpos, const AttentionDims& d, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((d.T + Tile<D>::kRows - 1) / Tile<D>::kRows), static_cast<unsigned>(d.NH),
                  static_cast<unsigned>(d.B));
  attention_fwd_kernel<D><<<grid, kThreads, 0, s>>>(q, k, v, o, lse, qpos, kpos, d);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

}  // namespace

void attention_fwd(const float* q, const float* k, const float* v, float* o, float* lse, const std::int32_t* qpos,
                   const std::int32_t* kpos, const AttentionDims& d, cudaStream_t s) {
  if (d.B * d.T * d.NH == 0) return;
  DSRSQ_REQUIRE(d.HS >= 1 && d.HS <= kAttentionMaxHS, "cuda attention_fwd: head size ", d.HS, " outside [1, ",
                kAttentionMaxHS, "]");
  DSRSQ_REQUIRE(d.NH <= 65535 && d.B <= 65535, "cuda attention_fwd: NH ", d.NH, " or B ", d.B, " exceeds 65535");
  if (d.HS <= 32) launch_fwd<32>(q, k, v, o, lse, qpos, kpos, d, s);
  else if (d.HS <= 64) launch_fwd<64>(q, k, v, o, lse, qpos, kpos, d, s);
  else if (d.HS <= 128) launch_fwd<128>(q, k, v, o, lse, qpos, kpos, d, s);
  else launch_fwd<256>(q, k, v, o, lse, qpos, kpos, d, s);
}

}  // namespace dsrsq::cuda
