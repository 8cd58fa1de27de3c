// Dense linear algebra the methods need, in f64: symmetric eigendecomposition
// (LAPACK dsyevd when linked, else cyclic Jacobi), the Gram matrix X^T X, and
// the low-rank reconstruction loss ||U P x - x||^2 with its backward (RCKV's
// compression term). Shapes and rules: backend/backend.hpp.
//   lowrank_recon_fwd: returns the sum over rows (the caller normalises).
//   lowrank_recon_bwd: dp +=, du += (scale * gradient of that sum).
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"

// LAPACK's symmetric eigensolver (OpenBLAS ships it), referenced weakly: when
// the linked BLAS has no LAPACK the pointer is null and the Jacobi solver below
// is used instead.
extern "C" void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
                        double* work, const int* lwork, int* iwork, const int* liwork, int* info, std::size_t,
                        std::size_t) __attribute__((weak));

namespace dsrsq::cpu {

bool lapack_eigen_available() { return dsyevd_ != nullptr; }

namespace {

// Symmetric eigen-decomposition by cyclic Jacobi rotations, in place on a
// (n, n) row-major matrix: on return the diagonal of a holds the eigenvalues
// and the columns of vecs (n, n) the eigenvectors.
void jacobi_eigen(std::vector<double>& a, std::int64_t n, std::vector<double>& vecs) {
  vecs.assign(static_cast<std::size_t>(n * n), 0.0);
  for (std::int64_t i = 0; i < n; ++i) vecs[static_cast<std::size_t>(i * n + i)] = 1.0;
  auto A = [&](std::int64_t r, std::int64_t c) -> double& { return a[static_cast<std::size_t>(r * n + c)]; };
  auto V = [&](std::int64_t r, std::int64_t c) -> double& { return vecs[static_cast<std::size_t>(r * n + c)]; };
  double total = 0;
  for (double x : a) total += x * x;
  if (total == 0) return;
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (std::int64_t p = 0; p < n; ++p)
      for (std::int64_t q = p + 1; q < n; ++q) off += A(p, q) * A(p, q);
    if (off <= 1e-30 * total) break;
    for (std::int64_t p = 0; p < n; ++p)
      for (std::int64_t q = p + 1; q < n; ++q) {
        const double apq = A(p, q);
        if (apq == 0.0) continue;
        const double app = A(p, p), aqq = A(q, q);
        if (std::abs(apq) < 1e-18 * std::sqrt(std::abs(app * aqq)) ) {
          A(p, q) = A(q, p) = 0.0;
          continue;
        }
        const double theta = (aqq - app) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (std::int64_t k = 0; k < n; ++k) {  // columns p, q: A J
          const double akp = A(k, p), akq = A(k, q);
          A(k, p) = c * akp - s * akq;
          A(k, q) = s * akp + c * akq;
        }
        for (std::int64_t k = 0; k < n; ++k) {  // rows p, q: J^T (A J)
          const double apk = A(p, k), aqk = A(q, k);
          A(p, k) = c * apk - s * aqk;
          A(q, k) = s * apk + c * aqk;
        }
        A(p, q) = A(q, p) = 0.0;
        for (std::int64_t k = 0; k < n; ++k) {
          const double vkp = V(k, p), vkq = V(k, q);
          V(k, p) = c * vkp - s * vkq;
          V(k, q) = s * vkp + c * vkq;
        }
      }
  }
}

// Symmetric eigen-decomposition of a (n, n) row-major: vals (n) and vecs
// (n, n) row-major with eigenvector j in column j. LAPACK dsyevd when linked,
// else cyclic Jacobi (fine up to C ~ 256; O(C^3) per sweep with strided access).
void eigen_sym(std::vector<double> a, std::int64_t n, std::vector<double>& vals, std::vector<double>& vecs,
               bool force_jacobi = false) {
  vals.assign(static_cast<std::size_t>(n), 0.0);
  if (!force_jacobi && dsyevd_ != nullptr && n <= 46340) {
    const int ni = static_cast<int>(n);
    int info = 0, lwork = -1, liwork = -1, iwq = 0;
    double wq = 0;
    std::vector<double> ac = a;  // symmetric: row- and column-major agree
    dsyevd_("V", "U", &ni, ac.data(), &ni, vals.data(), &wq, &lwork, &iwq, &liwork, &info, 1, 1);
    if (info == 0) {
      lwork = static_cast<int>(wq) + 1;
      liwork = iwq;
      std::vector<double> work(static_cast<std::size_t>(lwork));
      std::vector<int> iwork(static_cast<std::size_t>(std::max(liwork, 1)));
      dsyevd_("V", "U", &ni, ac.data(), &ni, vals.data(), work.data(), &lwork, iwork.data(), &liwork, &info, 1, 1);
    }
    if (info == 0) {
      // Column-major output: eigenvector j is ac[j * n .. j * n + n).
      vecs.assign(static_cast<std::size_t>(n * n), 0.0);
      for (std::int64_t j = 0; j < n; ++j)
        for (std::int64_t r = 0; r < n; ++r) vecs[static_cast<std::size_t>(r * n + j)] = ac[static_cast<std::size_t>(j * n + r)];
      return;
    }
  }
  jacobi_eigen(a, n, vecs);
  for (std::int64_t i = 0; i < n; ++i) vals[static_cast<std::size_t>(i)] = a[static_cast<std::size_t>(i * n + i)];
}

// Loss sum (not normalised) of ||U P x - x||^2 over the N rows, in f64.
double recon_sq_sum(const float* x, std::int64_t N, std::int64_t C, std::int64_t dc, const float* P, const float* U) {
  double total = 0;
// No size threshold here: the reduction's grouping depends on the thread
  // count, and the loss must stay bitwise what it was.
#pragma omp parallel
  {
    std::vector<double> z(static_cast<std::size_t>(dc));
#pragma omp for reduction(+ : total) schedule(static)
    for (std::int64_t n = 0; n < N; ++n) {
      const float* xn = x + n * C;
      for (std::int64_t i = 0; i < dc; ++i) {
        double s = 0;
        const float* pr = P + i * C;
        for (std::int64_t c = 0; c < C; ++c) s += static_cast<double>(pr[c]) * xn[c];
        z[static_cast<std::size_t>(i)] = s;
      }
      for (std::int64_t c = 0; c < C; ++c) {
        double s = 0;
        const float* ur = U + c * dc;
        for (std::int64_t i = 0; i < dc; ++i) s += static_cast<double>(ur[i]) * z[static_cast<std::size_t>(i)];
        const double r = s - xn[c];
        total += r * r;
      }
    }
  }
  return total;
}

// dP += scale * sum_n (U^T r_n) x_n^T, dU += scale * sum_n r_n z_n^T.
void recon_grad(const float* x, std::int64_t N, std::int64_t C, std::int64_t dc, const float* P, const float* U,
                double scale, float* dP, float* dU) {
  std::vector<double> Z(static_cast<std::size_t>(N * dc)), R(static_cast<std::size_t>(N * C)),
      G(static_cast<std::size_t>(N * dc));
#pragma omp parallel for schedule(static) if (N * C * dc > kParallelMin)
  for (std::int64_t n = 0; n < N; ++n) {
    const float* xn = x + n * C;
    double* z = Z.data() + n * dc;
    double* r = R.data() + n * C;
    double* g = G.data() + n * dc;
    for (std::int64_t i = 0; i < dc; ++i) {
      double s = 0;
      for (std::int64_t c = 0; c < C; ++c) s += static_cast<double>(P[i * C + c]) * xn[c];
      z[i] = s;
    }
    for (std::int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (std::int64_t i = 0; i < dc; ++i) s += static_cast<double>(U[c * dc + i]) * z[i];
      r[c] = s - xn[c];
    }
    for (std::int64_t i = 0; i < dc; ++i) g[i] = 0;
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t i = 0; i < dc; ++i) g[i] += static_cast<double>(U[c * dc + i]) * r[c];
  }
#pragma omp parallel for schedule(static) if (N * C * dc > kParallelMin)
  for (std::int64_t c = 0; c < C; ++c) {
    std::vector<double> acc(static_cast<std::size_t>(dc), 0.0);
    for (std::int64_t n = 0; n < N; ++n) {
      const double rc = R[static_cast<std::size_t>(n * C + c)];
      const double* z = Z.data() + n * dc;
      for (std::int64_t i = 0; i < dc; ++i) acc[static_cast<std::size_t>(i)] += rc * z[i];
    }
    for (std::int64_t i = 0; i < dc; ++i) dU[c * dc + i] += static_cast<float>(scale * acc[static_cast<std::size_t>(i)]);
  }
#pragma omp parallel for schedule(static) if (N * C * dc > kParallelMin)
  for (std::int64_t i = 0; i < dc; ++i) {
    std::vector<double> acc(static_cast<std::size_t>(C), 0.0);
    for (std::int64_t n = 0; n < N; ++n) {
      const double gi = G[static_cast<std::size_t>(n * dc + i)];
      const float* xn = x + n * C;
      for (std::int64_t c = 0; c < C; ++c) acc[static_cast<std::size_t>(c)] += gi * xn[c];
    }
    for (std::int64_t c = 0; c < C; ++c) dP[i * C + c] += static_cast<float>(scale * acc[static_cast<std::size_t>(c)]);
  }
}

}  // namespace

void CpuBackend::sym_eigen_impl(const SymEigenArgs& a) {
  const std::int64_t n = a.a.shape[0];
  const double* ap = a.a.ptr<double>();
  std::vector<double> m(ap, ap + n * n), vals, vecs;
  eigen_sym(std::move(m), n, vals, vecs, a.force_jacobi);
  std::copy(vals.begin(), vals.end(), a.vals.ptr<double>());
  std::copy(vecs.begin(), vecs.end(), a.vecs.ptr<double>());
}

void CpuBackend::gram_impl(const GramArgs& a) {
  const std::int64_t N = a.x.shape[0], C = a.x.shape[1];
  const float* x = a.x.ptr<float>();
  double* m = a.g.ptr<double>();
  std::fill(m, m + C * C, 0.0);
  // Row i of the upper triangle per task: every element sums over n in order.
#pragma omp parallel for schedule(dynamic, 4) if (N * C * C > kParallelMin)
  for (std::int64_t i = 0; i < C; ++i) {
    double* row = m + i * C;
    for (std::int64_t n = 0; n < N; ++n) {
      const float* xn = x + n * C;
      const double xi = xn[i];
      if (xi == 0.0) continue;
      for (std::int64_t j = i; j < C; ++j) row[j] += xi * static_cast<double>(xn[j]);
    }
  }
  for (std::int64_t i = 0; i < C; ++i)
    for (std::int64_t j = 0; j < i; ++j) m[i * C + j] = m[j * C + i];
}

double CpuBackend::lowrank_recon_fwd_impl(const LowRankReconArgs& a) {
  return recon_sq_sum(a.x.ptr<float>(), a.x.shape[0], a.x.shape[1], a.p.shape[0], a.p.ptr<float>(), a.u.ptr<float>());
}

void CpuBackend::lowrank_recon_bwd_impl(const LowRankReconGradArgs& a) {
  recon_grad(a.x.ptr<float>(), a.x.shape[0], a.x.shape[1], a.p.shape[0], a.p.ptr<float>(), a.u.ptr<float>(), a.scale,
             a.dp.ptr<float>(), a.du.ptr<float>());
}

}  // namespace dsrsq::cpu
