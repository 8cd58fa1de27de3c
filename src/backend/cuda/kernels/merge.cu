// The attention merge (log-sum-exp rule), in place on the running (o, lse).
// CPU twin: src/backend/cpu/cpu_merge.cpp (the rule is written at
// AttentionMergeArgs in backend/backend.hpp). Arithmetic in A, the wider of
// the running dtype F and the partial dtype P. No backward of its own.
#include <type_traits>

#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

__device__ __forceinline__ float exp_a(float x) { return expf(x); }
__device__ __forceinline__ double exp_a(double x) { return exp(x); }
__device__ __forceinline__ float log_a(float x) { return logf(x); }
__device__ __forceinline__ double log_a(double x) { return log(x); }

// One thread per row (b, h, t): the row's weights are computed once and
// applied to its HS elements. Rows are B*T*NH (thousands or more), HS <= a
// few hundred.
template <class F, class P>
__global__ void merge_kernel(F* __restrict__ O, F* __restrict__ L, const P* __restrict__ Ob, const P* __restrict__ Lb,
                             i64 B, i64 T, i64 NH, i64 HS) {
  using A = std::conditional_t<(sizeof(P) > sizeof(F)), P, F>;
  const A ninf = -INFINITY, pinf = INFINITY;
  for (i64 r = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; r < B * NH * T;
       r += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 t = r % T, h = (r / T) % NH, b = r / (T * NH);
    const i64 li = (b * NH + h) * T + t;  // == r
    F* orow = O + ((b * T + t) * NH + h) * HS;
    const P* brow = Ob + ((b * T + t) * NH + h) * HS;
    A la = static_cast<A>(L[li]), lb = static_cast<A>(Lb[li]);
    if (la == pinf) la = ninf;
    if (lb == pinf) lb = ninf;
    const A m = la > lb ? la : lb;
    if (m == ninf) {
      L[li] = static_cast<F>(ninf);
      for (i64 i = 0; i < HS; ++i) orow[i] = F(0);
      continue;
    }
    const A wa = la == ninf ? A(0) : exp_a(la - m);
    const A wb = lb == ninf ? A(0) : exp_a(lb - m);
    const A ws = wa + wb;
    L[li] = static_cast<F>(m + log_a(ws));
    const A ca = wa / ws, cb = wb / ws;
    for (i64 i = 0; i < HS; ++i) {
      const A xa = wa == A(0) ? A(0) : static_cast<A>(orow[i]);
      const A xb = wb == A(0) ? A(0) : static_cast<A>(brow[i]);
      orow[i] = static_cast<F>(ca * xa + cb * xb);
    }
  }
}

}  // namespace

template <class F, class P>
void attention_merge(F* o, F* lse, const P* ob, const P* lseb, i64 B, i64 T, i64 NH, i64 HS, cudaStream_t s) {
  const i64 rows = B * T * NH;
  if (rows == 0) return;
  merge_kernel<F, P><<<grid_for(rows, 128), 128, 0, s>>>(o, lse, ob, lseb, B, T, NH, HS);
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template void attention_merge<float, float>(float*, float*, const float*, const float*, i64, i64, i64, i64, cudaStream_t);
template void attention_merge<float, double>(float*, float*, const double*, const double*, i64, i64, i64, i64,
                                             cudaStream_t);
template void attention_merge<double, float>(double*, double*, const float*, const float*, i64, i64, i64, i64,
                                             cudaStream_t);
template void attention_merge<double, double>(double*, double*, const double*, const double*, i64, i64, i64, i64,
                                              cudaStream_t);

}  // namespace dsrsq::cuda
