// Latent-space attention (RCKV's compressed buffer), forward only. CPU twin:
// CpuBackend::latent_attention_fwd_impl in src/backend/cpu/cpu_latent_attention.cpp;
// the definition is at LatentAttentionArgs in backend/backend.hpp:
//   s_j = scale q.k_j (f64 of f32 values) over the visible keys (k_pos <= q_pos
//   and, with clusters, the key's cluster among the query's top_clusters
//   centroids), p = softmax(s), z = sum_j p_j latent_j (dc, f64),
//   o = up[h] z, lse = log sum exp s; no visible key: o = 0, lse = -inf.
//   used[b,i] = visible keys summed over heads (=); mass[b,j] += row_weight[i]
//   * (this part's merge weight against lse_other) * p_j / NH (accumulated).
//
// Launch: one block of 256 threads (8 warps) per query row (b, i); warp w
// takes heads w, w+8, ... A warp picks the row's clusters (kc rounds of a warp
// argmax, ties to the lower index, as the CPU's partial sort), then makes
// three passes over the keys, lanes striding over them: the max and the
// visible count, the normaliser, and z (each lane owns dc/32 latent dims and
// adds the keys in order, broadcast by shuffles) with the mass. z goes
// through shared memory for the up-projection (lanes over the HS outputs).
// mass is added with double atomics: its summation order varies run to run
// (f64: differences near 1e-16 relative); everything else is deterministic.
#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kMaxZ = kLatentMaxDc / 32;  // latent dims per lane

__device__ __forceinline__ double dotf(const float* __restrict__ a, const float* __restrict__ b, i64 n) {
  double d = 0;
  for (i64 x = 0; x < n; ++x) d += static_cast<double>(a[x]) * static_cast<double>(b[x]);
  return d;
}

__global__ void __launch_bounds__(kWarps * 32) latent_attention_kernel(LatentAttentionDev a) {
  extern __shared__ double smem[];
  double* zs_all = smem;  // kWarps x dc
  auto* chosen_all = reinterpret_cast<unsigned char*>(smem + kWarps * a.dc);  // kWarps x max(me, 1)
  __shared__ double used_s[kWarps];

  const i64 bi = blockIdx.x, b = bi / a.T, i = bi % a.T;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  double* zs = zs_all + warp * a.dc;
  unsigned char* chosen = chosen_all + warp * (a.me > 0 ? a.me : 1);
  const std::int32_t qp = a.qpos[bi];
  const bool sqa = a.cent != nullptr;
  double used_w = 0;

  for (i64 h = warp; h < a.NH; h += kWarps) {
    const float* qv = a.q + (bi * a.NH + h) * a.HS;
    const std::int32_t* as = sqa ? a.assign + (b * a.NH + h) * a.Sa : nullptr;
    if (sqa) {
      const float* cen = a.cent + (b * a.NH + h) * a.M * a.HS;
      const std::int32_t* sz = a.sizes + (b * a.NH + h) * a.M;
      for (i64 c = lane; c < a.me; c += 32) chosen[c] = 0;
      __syncwarp();
      for (i64 round = 0; round < a.kc; ++round) {
        double bv = 0;
        i64 bc = -1;  // this lane's best unchosen non-empty cluster
        for (i64 c = lane; c < a.me; c += 32) {
          if (sz[c] <= 0 || chosen[c]) continue;
          const double s = dotf(qv, cen + c * a.HS, a.HS);
          if (bc < 0 || s > bv) {  // lanes visit c in increasing order: ties keep the lower index
            bv = s;
            bc = c;
          }
        }
        for (int off = 16; off > 0; off >>= 1) {
          const double ov = __shfl_xor_sync(0xffffffffu, bv, off);
          const i64 oc = __shfl_xor_sync(0xffffffffu, bc, off);
          if (oc >= 0 && (bc < 0 || ov > bv || (ov == bv && oc < bc))) {
            bv = ov;
            bc = oc;
          }
        }
        if (bc < 0) break;  // fewer non-empty clusters than kc (uniform over the warp)
        if (lane == 0) chosen[bc] = 1;
        __syncwarp();
      }
    }
    auto visible = [&](i64 j) {
      return a.kpos[b * a.Sp + j] <= qp && (!sqa || (as[j] >= 0 && chosen[as[j]]));
    };
    auto score = [&](i64 j) { return dotf(qv, a.k + ((b * a.n + j) * a.NH + h) * a.HS, a.HS) * a.scale; };

    double mx = -INFINITY, cnt = 0;
    for (i64 j = lane; j < a.n; j += 32)
      if (visible(j)) {
        mx = fmax(mx, score(j));
        cnt += 1;
      }
    mx = warp_max(mx);
    cnt = warp_sum(cnt);
    double* o = a.o + (bi * a.NH + h) * a.HS;
    double& lse_out = a.lse[(b * a.NH + h) * a.T + i];
    if (cnt == 0) {  // no visible key: "nothing" for the merge
      for (i64 r = lane; r < a.HS; r += 32) o[r] = 0;
      if (lane == 0) lse_out = -INFINITY;
      __syncwarp();
      continue;
    }
    double Z = 0;
    for (i64 j = lane; j < a.n; j += 32)
      if (visible(j)) Z += exp(score(j) - mx);
    Z = warp_sum(Z);
    const double lse_b = mx + log(Z);
    if (lane == 0) lse_out = lse_b;
    used_w += cnt;
    double w = 0;  // mass weight per unnormalised e_j
    if (a.mass) {
      double fb = 1.0;
      if (a.lse_other) {
        const double lw = a.lse_other[(b * a.NH + h) * a.T + i];
        const double m = fmax(lse_b, lw);
        const double ab = exp(lse_b - m), aw = lw == -INFINITY ? 0.0 : exp(lw - m);
        fb = ab / (ab + aw);
      }
      w = a.rw[i] * fb / static_cast<double>(a.NH) / Z;
    }

    double zr[kMaxZ];
#pragma unroll
    for (int u = 0; u < kMaxZ; ++u) zr[u] = 0;
    for (i64 j0 = 0; j0 < a.n; j0 += 32) {
      const i64 j = j0 + lane;
      const double e = j < a.n && visible(j) ? exp(score(j) - mx) : 0.0;
      if (a.mass && e != 0.0) atomicAdd(a.mass + b * a.n + j, w * e);
      const double pj = e / Z;
      for (int t = 0; t < 32; ++t) {
        const double pt = __shfl_sync(0xffffffffu, pj, t);
        if (pt == 0.0) continue;  // uniform: every lane holds the same pt
        const float* c = a.latent + (b * a.Sp + j0 + t) * a.dc;
#pragma unroll
        for (int u = 0; u < kMaxZ; ++u) {
          const i64 x = lane + 32 * u;
          if (x < a.dc) zr[u] += pt * static_cast<double>(c[x]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kMaxZ; ++u) {
      const i64 x = lane + 32 * u;
      if (x < a.dc) zs[x] = zr[u];
    }
    __syncwarp();
    for (i64 r = lane; r < a.HS; r += 32) {
      const float* ur = a.up + (h * a.HS + r) * a.dc;
      double ob = 0;
      for (i64 x = 0; x < a.dc; ++x) ob += static_cast<double>(ur[x]) * zs[x];
      o[r] = ob;
    }
    __syncwarp();  // zs and chosen are reused by this warp's next head
  }

  if (lane == 0) used_s[warp] = used_w;
  __syncthreads();
  if (a.used && threadIdx.x == 0) {
    double u = 0;
    for (int w = 0; w < kWarps; ++w) u += used_s[w];  // integer counts: exact
    a.used[bi] = u;
  }
}

}  // namespace

void latent_attention(const LatentAttentionDev& a, cudaStream_t s) {
  if (a.B * a.T == 0) return;
  DSRSQ_REQUIRE(a.dc >= 1 && a.dc <= kLatentMaxDc, "cuda latent_attention: latent size ", a.dc, " outside [1, ",
                kLatentMaxDc, "]");
  const std::size_t shared = sizeof(double) * static_cast<std::size_t>(kWarps * a.dc) +
                             static_cast<std::size_t>(kWarps * (a.me > 0 ? a.me : 1));
  DSRSQ_REQUIRE(shared <= 48 * 1024, "cuda latent_attention: ", shared, " bytes of shared memory (dc ", a.dc,
                ", clusters ", a.me, ") exceed 48 KB");
  latent_attention_kernel<<<static_cast<unsigned>(a.B * a.T), kWarps * 32, shared, s>>>(a);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

}  // namespace dsrsq::cuda
