#pragma once
// Small numeric helpers for the CPU kernels: BLAS dispatch on float/double and
// a vectorisable exp for float (Cephes-style range reduction + degree-6
// polynomial, relative error about 1e-7; inputs below -87 give exactly 0, so a
// masked score of -inf contributes nothing).
#include <cblas.h>

#include <cstring>
#include <cmath>
#include <cstdint>

namespace dsrsq::cpu {

inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b,
              ldb, beta, c, ldc);
}
inline void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b,
              ldb, beta, c, ldc);
}

inline float exp_approx(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (vectorises; floor() does not here).
  const float magic = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const float scaled = p * two_n;
  return x < -87.0f ? 0.0f : scaled;
}

template <class T>
inline T fexp(T x) {
  if constexpr (sizeof(T) == 4) return exp_approx(x);
  else return std::exp(x);
}

// tanh through exp, clamped where tanh is +-1 to the type's precision.
template <class T>
inline T ftanh(T u) {
  if constexpr (sizeof(T) == 8) return std::tanh(u);
  const T uc = u > T(15) ? T(15) : (u < T(-15) ? T(-15) : u);
  return T(1) - T(2) / (fexp(T(2) * uc) + T(1));
}

}  // namespace dsrsq::cpu
