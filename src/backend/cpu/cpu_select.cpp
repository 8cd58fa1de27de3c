// Top-k per row and k-means assignment (nearest centroid). No backward: both
// produce indices (a choice, treated as constant by the methods' gradients).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"

namespace dsrsq::cpu {
namespace {

template <class T>
void topk_t(const TopKArgs& a) {
  const std::int64_t R = a.x.shape[0], N = a.x.shape[1], K = a.idx.shape[1];
  const T* x = a.x.ptr<T>();
  std::int32_t* out = a.idx.ptr<std::int32_t>();
  // Larger value first; NaN below everything; equal values: lower index first.
  auto before = [](T va, std::int32_t ia, T vb, std::int32_t ib) {
    const bool na = std::isnan(va), nb = std::isnan(vb);
    if (na != nb) return nb;
    if (!na && va != vb) return va > vb;
    return ia < ib;
  };
#pragma omp parallel for schedule(static) if (R * N > kParallelMin)
  for (std::int64_t r = 0; r < R; ++r) {
    const T* row = x + r * N;
    std::vector<std::int32_t> id(static_cast<std::size_t>(N));
    std::iota(id.begin(), id.end(), 0);
    std::partial_sort(id.begin(), id.begin() + K, id.end(),
                      [&](std::int32_t p, std::int32_t q) { return before(row[p], p, row[q], q); });
    std::copy_n(id.begin(), K, out + r * K);
  }
}

template <class T>
void kmeans_assign_t(const KMeansAssignArgs& a) {
  const std::int64_t G = a.x.shape[0], N = a.x.shape[1], D = a.x.shape[2], M = a.centroids.shape[1];
  const std::int64_t m = a.clusters > 0 ? a.clusters : M;
  const T* x = a.x.ptr<T>();
  const T* c = a.centroids.ptr<T>();
  std::int32_t* as = a.assign.ptr<std::int32_t>();
  double* dist = a.dist.empty() ? nullptr : a.dist.ptr<double>();
#pragma omp parallel for schedule(static) if (G * N * m * D > kParallelMin)
  for (std::int64_t gn = 0; gn < G * N; ++gn) {
    const std::int64_t g = gn / N;
    const T* xv = x + gn * D;
    std::int64_t best = 0;
    double bd = std::numeric_limits<double>::infinity();
    for (std::int64_t k = 0; k < m; ++k) {
      const T* cv = c + (g * M + k) * D;
      double d2 = 0;
      for (std::int64_t t = 0; t < D; ++t) {
        const double d = static_cast<double>(xv[t]) - cv[t];
        d2 += d * d;
      }
      if (d2 < bd) {  // strict: ties keep the lower index
        bd = d2;
        best = k;
      }
    }
    as[gn] = static_cast<std::int32_t>(best);
    if (dist) dist[gn] = bd;
  }
}

}  // namespace

void CpuBackend::topk_impl(const TopKArgs& a) {
  dispatch_float(a.x.dtype, [&](auto t) { topk_t<decltype(t)>(a); });
}
void CpuBackend::kmeans_assign_impl(const KMeansAssignArgs& a) {
  dispatch_float(a.x.dtype, [&](auto t) { kmeans_assign_t<decltype(t)>(a); });
}

}  // namespace dsrsq::cpu
