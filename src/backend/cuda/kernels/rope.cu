// Rotary position embedding (rotate-half layout), in place, with explicit
// positions. CPU twin: rope_t in src/backend/cpu/cpu_backend.cpp.
// For i < HS/2: angle = pos[n] * theta^(-2i/HS) (double, as the CPU twin),
//   (x[i], x[i+HS/2]) -> (x[i] c - x[i+HS/2] s, x[i+HS/2] c + x[i] s),
// with s negated for the inverse rotation (the backward, applied to the gradient);
// log_base > 0 scales both by max(1, ln(pos+1)/ln(log_base)) (RopeArgs::log_base).
#include "backend/cuda/kernels/common.cuh"
#include "backend/cuda/kernels/kernels.hpp"

namespace dsrsq::cuda {
namespace {

// One thread per (token n, frequency i): the angle's cos/sin are computed once
// in double and rounded to T (as the CPU table is), then applied to every head.
// Consecutive threads take consecutive i of one token: coalesced per head.
template <class T>
__global__ void rope_kernel(T* __restrict__ x, const std::int32_t* __restrict__ pos, i64 N, i64 NH, i64 HS,
                            double theta, double log_base, T sign) {
  const i64 half = HS / 2;
  for (i64 t = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; t < N * half;
       t += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 n = t / half, i = t % half;
    const double inv_freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(HS));
    const double ang = static_cast<double>(pos[n]) * inv_freq;
    double sd, cd;
    sincos(ang, &sd, &cd);
    const double g = log_base > 0 ? fmax(1.0, log(static_cast<double>(pos[n]) + 1.0) / log(log_base)) : 1.0;
    const T c = static_cast<T>(cd * g), s = sign * static_cast<T>(sd * g);
    for (i64 h = 0; h < NH; ++h) {
      T* r = x + (n * NH + h) * HS;
      const T x0 = r[i], x1 = r[i + half];
      r[i] = x0 * c - x1 * s;
      r[i + half] = x1 * c + x0 * s;
    }
  }
}

}  // namespace

template <class T>
void rope(T* x, const std::int32_t* pos, i64 N, i64 NH, i64 HS, double theta, double log_base, bool inverse,
          cudaStream_t s) {
  if (N * (HS / 2) == 0) return;
  rope_kernel<T><<<grid_for(N * (HS / 2)), kBlock, 0, s>>>(x, pos, N, NH, HS, theta, log_base, inverse ? T(-1) : T(1));
  DSRSQ_CUDA_LAUNCH_CHECK();
}

template void rope<float>(float*, const std::int32_t*, i64, i64, i64, double, double, bool, cudaStream_t);
template void rope<double>(double*, const std::int32_t*, i64, i64, i64, double, double, bool, cudaStream_t);

}  // namespace dsrsq::cuda
