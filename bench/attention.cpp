// bench_attention: causal attention forward and backward at long T (1K..32K)
// on the CPU backend against the same run's sgemm peak, the kernel this engine
// had before (BLAS on 64 x 128 tiles, kept here as `blas64x128`, and the same
// schedule on 256 x 256 tiles), and PyTorch 1.13's materialised attention where
// its T x T matrices fit (bench/torch_attention.py, same inputs).
//
// FLOP convention (the cost model's, src/backend/backend.cpp attention_cost):
// forward = 4 * T_keys_visible * HS per query row and head (QK^T and PV, causal
// counts only the visible half: T(T+1)/2 pairs); backward = 2.5 x forward
// (FlashAttention-2's count: five matmuls of which one recomputes S). The same
// count is used for every row, so GFLOP/s compare times.
// Check column: a slice of rows against a double-precision reference computed
// here (forward o and lse for 8 query rows per head; backward dq of the same
// rows, dk and dv of 6 key rows whose queries are few enough to afford exactly).
// Output: nccl-tests style table; summary line
//   attention_fwd_of_peak=<x> attention_bwd_of_peak=<y>
// (ours, HS 64, T >= 4K: median over those rows of the median-time GFLOP/s over
// the sgemm peak).
#include <cblas.h>
#include <omp.h>
#include <time.h>
#include <unistd.h>

#include <chrono>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "backend/cpu/cpu_math.hpp"
#include "core/rng.hpp"
#include "core/timer.hpp"
#include "dsrsq/build_info.hpp"

using dsrsq::AttentionArgs;
using dsrsq::AttentionGradArgs;
using dsrsq::Shape;
using dsrsq::TensorView;
using dsrsq::cpu::fexp;
using dsrsq::cpu::gemm;

namespace {

// ---- the previous kernel (BLAS tiles), verbatim but for the tile sizes -------
struct BlockBounds {
  std::vector<std::int32_t> lo, hi;  // min / max position per block
};

BlockBounds block_bounds(const std::int32_t* pos, std::int64_t n, std::int64_t bs) {
  const std::int64_t nb = (n + bs - 1) / bs;
  BlockBounds r;
  r.lo.resize(static_cast<std::size_t>(nb));
  r.hi.resize(static_cast<std::size_t>(nb));
  for (std::int64_t b = 0; b < nb; ++b) {
    std::int32_t lo = std::numeric_limits<std::int32_t>::max(), hi = std::numeric_limits<std::int32_t>::min();
    for (std::int64_t j = b * bs; j < std::min(n, (b + 1) * bs); ++j) {
      lo = std::min(lo, pos[j]);
      hi = std::max(hi, pos[j]);
    }
    r.lo[static_cast<std::size_t>(b)] = lo;
    r.hi[static_cast<std::size_t>(b)] = hi;
  }
  return r;
}

template <class T>
T attn_scale(double s, std::int64_t hs) {
  return static_cast<T>(s > 0 ? s : 1.0 / std::sqrt(static_cast<double>(hs)));
}

template <class T>
void blas_tiles_fwd(const AttentionArgs& a, std::int64_t kBQ, std::int64_t kBK) {
  const std::int64_t B = a.q.shape[0], T_ = a.q.shape[1], NH = a.q.shape[2], HS = a.q.shape[3], S = a.k.shape[1];
  const std::int64_t ld = NH * HS;
  const T scale = attn_scale<T>(a.scale, HS);
  const T* q = a.q.ptr<T>();
  const T* k = a.k.ptr<T>();
  const T* v = a.v.ptr<T>();
  T* o = a.o.ptr<T>();
  T* lse = a.lse.ptr<T>();
  const auto* qpos = a.q_pos.ptr<std::int32_t>();
  const auto* kpos = a.k_pos.ptr<std::int32_t>();
  const T neg_inf = -std::numeric_limits<T>::infinity();

  std::vector<BlockBounds> kb(static_cast<std::size_t>(B)), qb(static_cast<std::size_t>(B));
  for (std::int64_t b = 0; b < B; ++b) {
    kb[static_cast<std::size_t>(b)] = block_bounds(kpos + b * S, S, kBK);
    qb[static_cast<std::size_t>(b)] = block_bounds(qpos + b * T_, T_, kBQ);
  }
  const std::int64_t nqb = (T_ + kBQ - 1) / kBQ, nkb = (S + kBK - 1) / kBK;
  const std::int64_t tasks = B * NH * nqb;

#pragma omp parallel if (tasks > 1 && B * T_ * S * NH > 4096)
  {
    std::vector<T> sbuf(static_cast<std::size_t>(kBQ * kBK)), acc(static_cast<std::size_t>(kBQ * HS));
    std::vector<T> mrow(static_cast<std::size_t>(kBQ)), lrow(static_cast<std::size_t>(kBQ));
    // Heaviest query blocks (latest positions) first balances causal work.
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < tasks; ++task) {
      const std::int64_t qbi = nqb - 1 - task % nqb, bh = task / nqb, b = bh / NH, h = bh % NH;
      const std::int64_t i0 = qbi * kBQ, nq = std::min(kBQ, T_ - i0);
      const std::int32_t qmin = qb[static_cast<std::size_t>(b)].lo[static_cast<std::size_t>(qbi)];
      const std::int32_t qmax = qb[static_cast<std::size_t>(b)].hi[static_cast<std::size_t>(qbi)];
      const T* Q = q + (b * T_ + i0) * ld + h * HS;
      const std::int32_t* qp = qpos + b * T_ + i0;
      std::fill(acc.begin(), acc.begin() + nq * HS, T(0));
      std::fill(mrow.begin(), mrow.end(), neg_inf);
      std::fill(lrow.begin(), lrow.end(), T(0));
      for (std::int64_t jb = 0; jb < nkb; ++jb) {
        const std::int32_t kmin = kb[static_cast<std::size_t>(b)].lo[static_cast<std::size_t>(jb)];
        const std::int32_t kmax = kb[static_cast<std::size_t>(b)].hi[static_cast<std::size_t>(jb)];
        if (a.causal && kmin > qmax) continue;  // fully masked tile: skipped
        const std::int64_t j0 = jb * kBK, nj = std::min(kBK, S - j0);
        const T* K = k + (b * S + j0) * ld + h * HS;
        const T* Vp = v + (b * S + j0) * ld + h * HS;
        const std::int32_t* kp = kpos + b * S + j0;
        gemm(false, true, static_cast<int>(nq), static_cast<int>(nj), static_cast<int>(HS), scale, Q,
             static_cast<int>(ld), K, static_cast<int>(ld), T(0), sbuf.data(), static_cast<int>(kBK));
        const bool partial = a.causal && kmax > qmin;
        for (std::int64_t r = 0; r < nq; ++r) {
          T* s = sbuf.data() + r * kBK;
          if (partial) {
            const std::int32_t p = qp[r];
            for (std::int64_t j = 0; j < nj; ++j)
              if (kp[j] > p) s[j] = neg_inf;
          }
          T mx = neg_inf;
          for (std::int64_t j = 0; j < nj; ++j) mx = std::max(mx, s[j]);
          if (mx == neg_inf) {  // nothing visible in this tile for this row
            std::fill(s, s + nj, T(0));
            continue;
          }
          const T mnew = std::max(mrow[static_cast<std::size_t>(r)], mx);
          const T corr = fexp(mrow[static_cast<std::size_t>(r)] - mnew);
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (std::int64_t j = 0; j < nj; ++j) {
            const T p = fexp(s[j] - mnew);
            s[j] = p;
            sum += p;
          }
          lrow[static_cast<std::size_t>(r)] = lrow[static_cast<std::size_t>(r)] * corr + sum;
          if (corr != T(1)) {
            T* ar = acc.data() + r * HS;
            for (std::int64_t d = 0; d < HS; ++d) ar[d] *= corr;
          }
          mrow[static_cast<std::size_t>(r)] = mnew;
        }
        gemm(false, false, static_cast<int>(nq), static_cast<int>(HS), static_cast<int>(nj), T(1), sbuf.data(),
             static_cast<int>(kBK), Vp, static_cast<int>(ld), T(1), acc.data(), static_cast<int>(HS));
      }
      T* O = o + (b * T_ + i0) * ld + h * HS;
      T* L = lse + (b * NH + h) * T_ + i0;
      for (std::int64_t r = 0; r < nq; ++r) {
        const T l = lrow[static_cast<std::size_t>(r)];
        T* orow = O + r * ld;
        if (l == T(0)) {
          std::fill(orow, orow + HS, T(0));
          L[r] = neg_inf;
          continue;
        }
        const T inv = T(1) / l;
        const T* ar = acc.data() + r * HS;
        for (std::int64_t d = 0; d < HS; ++d) orow[d] = ar[d] * inv;
        L[r] = mrow[static_cast<std::size_t>(r)] + std::log(l);
      }
    }
  }
}

template <class T>
void blas_tiles_bwd(const AttentionGradArgs& a, std::int64_t kBQ, std::int64_t kBK) {
  const std::int64_t B = a.q.shape[0], T_ = a.q.shape[1], NH = a.q.shape[2], HS = a.q.shape[3], S = a.k.shape[1];
  const std::int64_t ld = NH * HS;
  const T scale = attn_scale<T>(a.scale, HS);
  const T* q = a.q.ptr<T>();
  const T* k = a.k.ptr<T>();
  const T* v = a.v.ptr<T>();
  const T* o = a.o.ptr<T>();
  const T* lse = a.lse.ptr<T>();
  const T* dout = a.dout.ptr<T>();
  T* dq = a.dq.ptr<T>();
  T* dk = a.dk.ptr<T>();
  T* dv = a.dv.ptr<T>();
  const auto* qpos = a.q_pos.ptr<std::int32_t>();
  const auto* kpos = a.k_pos.ptr<std::int32_t>();
  const T neg_inf = -std::numeric_limits<T>::infinity();

  std::vector<BlockBounds> kb(static_cast<std::size_t>(B)), qb(static_cast<std::size_t>(B));
  for (std::int64_t b = 0; b < B; ++b) {
    kb[static_cast<std::size_t>(b)] = block_bounds(kpos + b * S, S, kBK);
    qb[static_cast<std::size_t>(b)] = block_bounds(qpos + b * T_, T_, kBQ);
  }
  const std::int64_t nqb = (T_ + kBQ - 1) / kBQ, nkb = (S + kBK - 1) / kBK;

#pragma omp parallel if (B * NH > 1 && B * T_ * S * NH > 4096)
  {
    std::vector<T> pbuf(static_cast<std::size_t>(kBQ * kBK)), dpbuf(static_cast<std::size_t>(kBQ * kBK));
    std::vector<T> drow(static_cast<std::size_t>(T_));
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t bh = 0; bh < B * NH; ++bh) {
      const std::int64_t b = bh / NH, h = bh % NH;
      const std::int64_t base_q = b * T_ * ld + h * HS, base_k = b * S * ld + h * HS;
      const T* L = lse + (b * NH + h) * T_;
      for (std::int64_t i = 0; i < T_; ++i) {
        const T* dor = dout + base_q + i * ld;
        const T* orow = o + base_q + i * ld;
        T s = 0;
        for (std::int64_t d = 0; d < HS; ++d) s += dor[d] * orow[d];
        drow[static_cast<std::size_t>(i)] = s;
      }
      for (std::int64_t qbi = 0; qbi < nqb; ++qbi) {
        const std::int64_t i0 = qbi * kBQ, nq = std::min(kBQ, T_ - i0);
        const std::int32_t qmin = qb[static_cast<std::size_t>(b)].lo[static_cast<std::size_t>(qbi)];
        const std::int32_t qmax = qb[static_cast<std::size_t>(b)].hi[static_cast<std::size_t>(qbi)];
        const T* Q = q + base_q + i0 * ld;
        const T* dO = dout + base_q + i0 * ld;
        T* dQ = dq + base_q + i0 * ld;
        const std::int32_t* qp = qpos + b * T_ + i0;
        for (std::int64_t jb = 0; jb < nkb; ++jb) {
          const std::int32_t kmin = kb[static_cast<std::size_t>(b)].lo[static_cast<std::size_t>(jb)];
          const std::int32_t kmax = kb[static_cast<std::size_t>(b)].hi[static_cast<std::size_t>(jb)];
          if (a.causal && kmin > qmax) continue;
          const std::int64_t j0 = jb * kBK, nj = std::min(kBK, S - j0);
          const T* K = k + base_k + j0 * ld;
          const T* Vp = v + base_k + j0 * ld;
          T* dK = dk + base_k + j0 * ld;
          T* dV = dv + base_k + j0 * ld;
          const std::int32_t* kp = kpos + b * S + j0;
          gemm(false, true, static_cast<int>(nq), static_cast<int>(nj), static_cast<int>(HS), scale, Q,
               static_cast<int>(ld), K, static_cast<int>(ld), T(0), pbuf.data(), static_cast<int>(kBK));
          const bool partial = a.causal && kmax > qmin;
          for (std::int64_t r = 0; r < nq; ++r) {
            T* p = pbuf.data() + r * kBK;
            const T l = L[i0 + r];
            if (l == neg_inf) {
              std::fill(p, p + nj, T(0));
              continue;
            }
            if (partial) {
              const std::int32_t qpr = qp[r];
              for (std::int64_t j = 0; j < nj; ++j) p[j] = kp[j] > qpr ? T(0) : fexp(p[j] - l);
            } else {
#pragma omp simd
              for (std::int64_t j = 0; j < nj; ++j) p[j] = fexp(p[j] - l);
            }
          }
          // dV += P^T dO
          gemm(true, false, static_cast<int>(nj), static_cast<int>(HS), static_cast<int>(nq), T(1), pbuf.data(),
               static_cast<int>(kBK), dO, static_cast<int>(ld), T(1), dV, static_cast<int>(ld));
          // dP = dO V^T
          gemm(false, true, static_cast<int>(nq), static_cast<int>(nj), static_cast<int>(HS), T(1), dO,
               static_cast<int>(ld), Vp, static_cast<int>(ld), T(0), dpbuf.data(), static_cast<int>(kBK));
          for (std::int64_t r = 0; r < nq; ++r) {
            const T* p = pbuf.data() + r * kBK;
            T* ds = dpbuf.data() + r * kBK;
            const T dd = drow[static_cast<std::size_t>(i0 + r)];
#pragma omp simd
            for (std::int64_t j = 0; j < nj; ++j) ds[j] = p[j] * (ds[j] - dd) * scale;
          }
          // dQ += dS K ; dK += dS^T Q
          gemm(false, false, static_cast<int>(nq), static_cast<int>(HS), static_cast<int>(nj), T(1), dpbuf.data(),
               static_cast<int>(kBK), K, static_cast<int>(ld), T(1), dQ, static_cast<int>(ld));
          gemm(true, false, static_cast<int>(nj), static_cast<int>(HS), static_cast<int>(nq), T(1), dpbuf.data(),
               static_cast<int>(kBK), Q, static_cast<int>(ld), T(1), dK, static_cast<int>(ld));
        }
      }
    }
  }
}

// ---- yardsticks -----------------------------------------------------------------
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string loadavg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

// Wall clock by default; --clock cpu divides the process CPU time by the thread
// count instead (for a loaded machine: it leaves out the time other processes
// hold the cores, not the cache and frequency they cost). Both yardstick and
// kernels use the same clock.
bool g_cpu_clock = false;
int g_threads = 1;
struct Clock {
  double t0 = now();
  static double now() {
    if (!g_cpu_clock)
      return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec)) / g_threads;
  }
  void reset() { t0 = now(); }
  double seconds() const { return now() - t0; }
};

struct GemmResult {
  double gflops, max_rel_err;
};
// sgemm peak as bench_train_step measures it: 2048^3, median of repeats.
GemmResult sgemm_peak(int n, int repeats) {
  std::vector<float> a(static_cast<std::size_t>(n) * n), b(a.size()), c(a.size());
  dsrsq::Rng rng(7);
  for (auto& x : a) x = static_cast<float>(rng.normal());
  for (auto& x : b) x = static_cast<float>(rng.normal());
  std::vector<double> t;
  for (int r = 0; r < repeats + 1; ++r) {
    Clock tm;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    if (r > 0) t.push_back(tm.seconds());
  }
  double err = 0;
  for (int s = 0; s < 16; ++s) {
    const int i = static_cast<int>(rng.below(static_cast<std::uint64_t>(n)));
    const int j = static_cast<int>(rng.below(static_cast<std::uint64_t>(n)));
    double ref = 0, mag = 0;
    for (int k = 0; k < n; ++k) {
      ref += static_cast<double>(a[static_cast<std::size_t>(i) * n + k]) * b[static_cast<std::size_t>(k) * n + j];
      mag += std::fabs(static_cast<double>(a[static_cast<std::size_t>(i) * n + k]) * b[static_cast<std::size_t>(k) * n + j]);
    }
    err = std::max(err, std::fabs(c[static_cast<std::size_t>(i) * n + j] - ref) / mag);
  }
  return {2.0 * n * static_cast<double>(n) * n / median(t) / 1e9, err};
}

// ---- problem and double-precision reference on a slice -------------------------
struct Problem {
  std::int64_t T, NH, HS;
  double scale;
  std::vector<float> q, k, v, dout;
  std::vector<std::int32_t> pos;
  Shape qs() const { return Shape{1, T, NH, HS}; }
  std::size_t at(std::int64_t i, std::int64_t h) const { return static_cast<std::size_t>((i * NH + h) * HS); }
};

Problem make_problem(std::int64_t T, std::int64_t NH, std::int64_t HS, std::uint64_t seed) {
  Problem p{T, NH, HS, 1.0 / std::sqrt(static_cast<double>(HS)), {}, {}, {}, {}, {}};
  dsrsq::Rng rng(seed);
  const auto n = static_cast<std::size_t>(T * NH * HS);
  auto fill = [&](std::vector<float>& x, double sd) {
    x.resize(n);
    for (auto& e : x) e = static_cast<float>(sd * rng.normal());
  };
  fill(p.q, 1.2);  // scaled scores of sd ~1.4: softmax neither uniform nor one-hot
  fill(p.k, 1.2);
  fill(p.v, 1.0);
  fill(p.dout, 1.0);
  p.pos.resize(static_cast<std::size_t>(T));
  for (std::int64_t i = 0; i < T; ++i) p.pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  return p;
}

struct Output {
  std::vector<float> o, lse, dq, dk, dv;
};

// Exact (double) softmax statistics of one query row of one head.
struct RowRef {
  double lse, D;  // D = sum_j P_ij dP_ij
  std::vector<double> p, dp;  // over keys 0..i
};
RowRef row_ref(const Problem& P, std::int64_t i, std::int64_t h) {
  RowRef r;
  const auto n = static_cast<std::size_t>(i + 1);
  r.p.resize(n);
  r.dp.resize(n);
  double mx = -std::numeric_limits<double>::infinity();
  for (std::int64_t j = 0; j <= i; ++j) {
    double s = 0, dp = 0;
    for (std::int64_t d = 0; d < P.HS; ++d) {
      s += static_cast<double>(P.q[P.at(i, h) + d]) * P.k[P.at(j, h) + d];
      dp += static_cast<double>(P.dout[P.at(i, h) + d]) * P.v[P.at(j, h) + d];
    }
    r.p[static_cast<std::size_t>(j)] = s * P.scale;
    r.dp[static_cast<std::size_t>(j)] = dp;
    mx = std::max(mx, s * P.scale);
  }
  double sum = 0;
  for (auto& x : r.p) sum += std::exp(x - mx);
  r.lse = mx + std::log(sum);
  r.D = 0;
  for (std::size_t j = 0; j < n; ++j) {
    r.p[j] = std::exp(r.p[j] - r.lse);
    r.D += r.p[j] * r.dp[j];
  }
  return r;
}

// Relative RMS error of got against want over the slice, per tensor.
struct SliceCheck {
  double fwd = 0, bwd = 0;
};
struct Slice {
  std::vector<std::int64_t> qrows, krows;
  // want[h][row] vectors
  std::vector<double> o, lse, dq, dk, dv;
};

Slice make_slice(const Problem& P) {
  Slice s;
  const std::int64_t T = P.T;
  for (std::int64_t i : {std::int64_t{0}, T / 7, T / 3, T / 2, (2 * T) / 3, T - 129, T - 64, T - 1})
    s.qrows.push_back(std::clamp<std::int64_t>(i, 0, T - 1));
  for (std::int64_t j : {T - 1, T - 2, T - 17, T - 64, T - 100, T - 256}) s.krows.push_back(std::max<std::int64_t>(j, 0));
  for (std::int64_t h = 0; h < P.NH; ++h) {
    for (std::int64_t i : s.qrows) {
      const RowRef r = row_ref(P, i, h);
      s.lse.push_back(r.lse);
      for (std::int64_t d = 0; d < P.HS; ++d) {
        double o = 0, dq = 0;
        for (std::int64_t j = 0; j <= i; ++j) {
          const double pj = r.p[static_cast<std::size_t>(j)];
          o += pj * P.v[P.at(j, h) + d];
          dq += pj * (r.dp[static_cast<std::size_t>(j)] - r.D) * P.k[P.at(j, h) + d];
        }
        s.o.push_back(o);
        s.dq.push_back(dq * P.scale);
      }
    }
    // Keys late in the sequence: the queries that see key j are j..T-1.
    const std::int64_t i_lo = *std::min_element(s.krows.begin(), s.krows.end());
    std::vector<RowRef> rows;
    for (std::int64_t i = i_lo; i < T; ++i) rows.push_back(row_ref(P, i, h));
    for (std::int64_t j : s.krows)
      for (std::int64_t d = 0; d < P.HS; ++d) {
        double dk = 0, dv = 0;
        for (std::int64_t i = j; i < T; ++i) {
          const RowRef& r = rows[static_cast<std::size_t>(i - i_lo)];
          const double pj = r.p[static_cast<std::size_t>(j)];
          dv += pj * P.dout[P.at(i, h) + d];
          dk += pj * (r.dp[static_cast<std::size_t>(j)] - r.D) * P.q[P.at(i, h) + d];
        }
        s.dk.push_back(dk * P.scale);
        s.dv.push_back(dv);
      }
  }
  return s;
}

double rel_rms(const std::vector<double>& got, const std::vector<double>& want) {
  double e = 0, n = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    e += (got[i] - want[i]) * (got[i] - want[i]);
    n += want[i] * want[i];
  }
  return std::sqrt(e / std::max(n, 1e-300));
}

SliceCheck check(const Problem& P, const Slice& s, const Output& out, bool have_bwd) {
  std::vector<double> o, lse, dq, dk, dv;
  for (std::int64_t h = 0; h < P.NH; ++h) {
    for (std::int64_t i : s.qrows) {
      lse.push_back(out.lse[static_cast<std::size_t>(h * P.T + i)]);
      for (std::int64_t d = 0; d < P.HS; ++d) {
        o.push_back(out.o[P.at(i, h) + d]);
        if (have_bwd) dq.push_back(out.dq[P.at(i, h) + d]);
      }
    }
    if (have_bwd)
      for (std::int64_t j : s.krows)
        for (std::int64_t d = 0; d < P.HS; ++d) {
          dk.push_back(out.dk[P.at(j, h) + d]);
          dv.push_back(out.dv[P.at(j, h) + d]);
        }
  }
  SliceCheck c;
  c.fwd = std::max(rel_rms(o, s.o), rel_rms(lse, s.lse));
  if (have_bwd) c.bwd = std::max({rel_rms(dq, s.dq), rel_rms(dk, s.dk), rel_rms(dv, s.dv)});
  return c;
}

// ---- runs ---------------------------------------------------------------------
struct Row {
  std::string impl;
  double fwd_s = 0, bwd_s = 0;
  SliceCheck err;
  bool ran = false, bwd = true;
  std::string note;
};

template <class Fwd, class Bwd>
Row time_impl(const std::string& name, const Problem& P, const Slice& sl, int warmup, int repeats, Fwd fwd, Bwd bwd) {
  Row r;
  r.impl = name;
  const auto n = P.q.size();
  Output out;
  out.o.assign(n, 0.0f);
  out.lse.assign(static_cast<std::size_t>(P.NH * P.T), 0.0f);
  out.dq.assign(n, 0.0f);
  out.dk.assign(n, 0.0f);
  out.dv.assign(n, 0.0f);
  std::vector<double> tf, tb;
  for (int it = 0; it < warmup + repeats; ++it) {
    Clock t;
    fwd(out);
    const double f = t.seconds();
    std::fill(out.dq.begin(), out.dq.end(), 0.0f);
    std::fill(out.dk.begin(), out.dk.end(), 0.0f);
    std::fill(out.dv.begin(), out.dv.end(), 0.0f);
    t.reset();
    bwd(out);
    const double b = t.seconds();
    if (it >= warmup) {
      tf.push_back(f);
      tb.push_back(b);
    }
  }
  r.fwd_s = median(tf);
  r.bwd_s = median(tb);
  r.err = check(P, sl, out, true);
  r.ran = true;
  return r;
}

AttentionArgs fwd_args(const Problem& P, Output& out) {
  const Shape qs = P.qs();
  return {TensorView(const_cast<float*>(P.q.data()), qs), TensorView(const_cast<float*>(P.k.data()), qs),
          TensorView(const_cast<float*>(P.v.data()), qs), TensorView(out.o.data(), qs),
          TensorView(out.lse.data(), Shape{1, P.NH, P.T}), TensorView(const_cast<std::int32_t*>(P.pos.data()), Shape{1, P.T}),
          TensorView(const_cast<std::int32_t*>(P.pos.data()), Shape{1, P.T}), true, 0.0};
}
AttentionGradArgs bwd_args(const Problem& P, Output& out) {
  const Shape qs = P.qs();
  return {TensorView(const_cast<float*>(P.dout.data()), qs), TensorView(const_cast<float*>(P.q.data()), qs),
          TensorView(const_cast<float*>(P.k.data()), qs), TensorView(const_cast<float*>(P.v.data()), qs),
          TensorView(out.o.data(), qs), TensorView(out.lse.data(), Shape{1, P.NH, P.T}),
          TensorView(const_cast<std::int32_t*>(P.pos.data()), Shape{1, P.T}),
          TensorView(const_cast<std::int32_t*>(P.pos.data()), Shape{1, P.T}), TensorView(out.dq.data(), qs),
          TensorView(out.dk.data(), qs), TensorView(out.dv.data(), qs), true, 0.0};
}

// PyTorch 1.13 peer: materialised causal attention on the same inputs (files in a
// scratch folder), its outputs read back for the same check.
Row run_torch(const std::string& python, int threads, int warmup, int repeats, const Problem& P, const Slice& sl) {
  Row r;
  r.impl = "pytorch";
  char tmpl[] = "/tmp/dsrsq_bench_attn_XXXXXX";
  if (!mkdtemp(tmpl)) {
    r.note = "cannot make a scratch folder";
    return r;
  }
  const std::filesystem::path dir(tmpl);
  auto put = [&](const char* name, const std::vector<float>& x) {
    std::ofstream f(dir / name, std::ios::binary);
    f.write(reinterpret_cast<const char*>(x.data()), static_cast<std::streamsize>(x.size() * sizeof(float)));
  };
  put("q.f32", P.q);
  put("k.f32", P.k);
  put("v.f32", P.v);
  put("dout.f32", P.dout);
  const std::filesystem::path script = std::filesystem::path(DSRSQ_SOURCE_DIR) / "bench" / "torch_attention.py";
  std::ostringstream cmd;
  cmd << "OMP_NUM_THREADS=" << threads << " " << python << " " << script.string() << " --dir " << dir.string()
      << " --t " << P.T << " --nh " << P.NH << " --hs " << P.HS << " --threads " << threads << " --warmup " << warmup
      << " --repeats " << repeats << " --clock " << (g_cpu_clock ? "cpu" : "wall") << " 2>&1";
  FILE* p = popen(cmd.str().c_str(), "r");
  std::string text;
  if (p) {
    std::array<char, 4096> buf{};
    while (std::fgets(buf.data(), static_cast<int>(buf.size()), p)) text += buf.data();
  }
  const int rc = p ? pclose(p) : -1;
  const auto at = text.rfind("{\"peer\"");
  if (rc != 0 || at == std::string::npos) {
    r.note = "pytorch failed (exit " + std::to_string(rc) + "): " + text.substr(0, 300);
  } else {
    try {
      const auto j = nlohmann::json::parse(text.substr(at));
      r.fwd_s = median(j.at("fwd_s").get<std::vector<double>>());
      r.bwd_s = median(j.at("bwd_s").get<std::vector<double>>());
      Output out;
      auto get = [&](const char* name, std::vector<float>& x, std::size_t n) {
        x.resize(n);
        std::ifstream f(dir / name, std::ios::binary);
        f.read(reinterpret_cast<char*>(x.data()), static_cast<std::streamsize>(n * sizeof(float)));
        if (!f) throw std::runtime_error(std::string("cannot read the peer's ") + name);
      };
      const auto n = P.q.size();
      get("o.f32", out.o, n);
      get("lse.f32", out.lse, static_cast<std::size_t>(P.NH * P.T));
      get("dq.f32", out.dq, n);
      get("dk.f32", out.dk, n);
      get("dv.f32", out.dv, n);
      r.err = check(P, sl, out, true);
      r.ran = true;
    } catch (const std::exception& e) {
      r.note = std::string("cannot read the peer's result: ") + e.what();
    }
  }
  std::filesystem::remove_all(dir);
  return r;
}

struct Options {
  int threads = 2, repeats = 3, warmup = 1;
  std::int64_t d_model = 128;
  std::vector<std::int64_t> hs = {32, 64, 128};
  std::vector<std::int64_t> ts = {1024, 2048, 4096, 8192, 16384, 32768};
  std::int64_t ref_max_t = 8192, torch_max_t = 4096;
  bool peer = true, reference = true, cpu_clock = false;
  std::string python = "/usr/bin/python3";
};

void usage() {
  std::puts(
      "usage: bench_attention [--threads N] [--repeats N] [--warmup N] [--d_model C] [--hs 32,64,128]\n"
      "                       [--t 1024,...,32768] [--ref_max_t N] [--torch_max_t N] [--no-peer] [--no-reference]\n"
      "                       [--python PATH] [--clock wall|cpu]\n"
      "  heads = d_model / hs (batch 1); the old BLAS-tile kernels run up to --ref_max_t (default 8192),\n"
      "  PyTorch's materialised attention up to --torch_max_t (default 4096: its T x T matrices).\n"
      "  --clock cpu: times are process CPU seconds / threads (for a loaded machine; default wall).");
}

std::vector<std::int64_t> parse_list(const std::string& opt, const std::string& v) {
  std::vector<std::int64_t> r;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long long x = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || !end || *end || x <= 0) {
      std::fprintf(stderr, "error: option %s expects positive integers separated by commas, got '%s'\n", opt.c_str(),
                   v.c_str());
      std::exit(2);
    }
    r.push_back(x);
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: option %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    auto num = [&]() -> long long {
      const auto v = parse_list(a, next());
      if (v.size() != 1) {
        std::fprintf(stderr, "error: option %s expects one positive integer\n", a.c_str());
        std::exit(2);
      }
      return v[0];
    };
    if (a == "--threads") o.threads = static_cast<int>(num());
    else if (a == "--repeats") o.repeats = static_cast<int>(num());
    else if (a == "--warmup") {
      const std::string v = next();
      char* end = nullptr;
      const long x = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end || x < 0) {
        std::fprintf(stderr, "error: option --warmup expects a non-negative integer, got '%s'\n", v.c_str());
        return 2;
      }
      o.warmup = static_cast<int>(x);
    }
    else if (a == "--d_model") o.d_model = num();
    else if (a == "--hs") o.hs = parse_list(a, next());
    else if (a == "--t") o.ts = parse_list(a, next());
    else if (a == "--ref_max_t") o.ref_max_t = num();
    else if (a == "--torch_max_t") o.torch_max_t = num();
    else if (a == "--no-peer") o.peer = false;
    else if (a == "--no-reference") o.reference = false;
    else if (a == "--clock") {
      const std::string v = next();
      if (v != "wall" && v != "cpu") {
        std::fprintf(stderr, "error: option --clock expects wall or cpu, got '%s'\n", v.c_str());
        return 2;
      }
      o.cpu_clock = v == "cpu";
    }
    else if (a == "--python") o.python = next();
    else if (a == "--help" || a == "-h") {
      usage();
      return 0;
    } else {
      std::fprintf(stderr, "error: unknown option '%s'\n", a.c_str());
      usage();
      return 2;
    }
  }
  for (std::int64_t hs : o.hs)
    if (o.d_model % hs) {
      std::fprintf(stderr, "error: --hs %lld does not divide --d_model %lld\n", static_cast<long long>(hs),
                   static_cast<long long>(o.d_model));
      return 2;
    }
  try {
    omp_set_num_threads(o.threads);
    g_cpu_clock = o.cpu_clock;
    g_threads = o.threads;
    std::printf("# dsrsq bench_attention %s  git %s  %s  %s\n", dsrsq::build::version, dsrsq::build::git_sha,
                dsrsq::build::build_type, dsrsq::build::blas);
    std::printf("# causal self-attention, batch 1, d_model %lld (heads = d_model / HS), positions 0..T-1, fp32\n",
                static_cast<long long>(o.d_model));
    std::printf("# threads %d  warmup %d  repeats %d  time = median over repeats (%s clock); fwd and bwd timed separately\n",
                o.threads, o.warmup, o.repeats, o.cpu_clock ? "process CPU / threads" : "wall");
    std::printf("# FLOPs: fwd = 4*HS*(visible query-key pairs) per head (causal: T(T+1)/2 pairs), bwd = 2.5 x fwd\n");
    std::printf("# loadavg at start: %s\n", loadavg().c_str());
    const GemmResult peak0 = sgemm_peak(2048, 5);
    std::printf("# sgemm peak (2048^3, %d threads): %.1f GFLOP/s  max_rel_err %.1e\n", o.threads, peak0.gflops,
                peak0.max_rel_err);
    std::printf("# check: relative RMS error on a slice (8 query rows: o, lse, dq; 6 late key rows: dk, dv) against a\n"
                "#   double reference; ok when fwd <= 10*sqrt(T)*eps32 and bwd <= 100*sqrt(T)*eps32\n");
    std::printf("# impls: dsrsq = the engine's CpuBackend; blas64x128 = the previous kernel (BLAS on 64 x 128 tiles);\n"
                "#   blas256x256 = the same schedule on 256 x 256 tiles; pytorch = materialised attention (%s)\n",
                o.peer ? "torch 1.13 has no scaled_dot_product_attention" : "not run: --no-peer");
    // Rows are printed once the sgemm peak has been measured again at the end:
    // under load the yardstick moves, and the larger of the two is the
    // conservative denominator. Progress goes to stderr meanwhile.
    struct Result {
      std::int64_t hs, T;
      double fwd_flops, eps;
      Row row;
    };
    std::vector<Result> results;
    dsrsq::Backend& be = dsrsq::cpu_backend();
    for (std::int64_t hs : o.hs)
      for (std::int64_t T : o.ts) {
        const std::int64_t NH = o.d_model / hs;
        const Problem P = make_problem(T, NH, hs, static_cast<std::uint64_t>(T * 1000 + hs));
        const Slice sl = make_slice(P);
        const double fwd_flops = dsrsq::attention_cost(1, T, T, NH, hs, true, false).flops;
        const double eps = std::sqrt(static_cast<double>(T)) * 5.96e-8;
        auto add = [&](Row r) {
          std::fprintf(stderr, "bench_attention: HS %lld T %lld %s fwd %.1f ms bwd %.1f ms\n", static_cast<long long>(hs),
                       static_cast<long long>(T), r.impl.c_str(), r.fwd_s * 1e3, r.bwd_s * 1e3);
          results.push_back({hs, T, fwd_flops, eps, std::move(r)});
        };
        add(time_impl("dsrsq", P, sl, o.warmup, o.repeats, [&](Output& out) { be.attention_fwd(fwd_args(P, out)); },
                      [&](Output& out) { be.attention_bwd(bwd_args(P, out)); }));
        if (o.reference && T <= o.ref_max_t) {
          for (auto [bq, bk] : {std::pair<std::int64_t, std::int64_t>{64, 128}, {256, 256}}) {
            const std::string name = "blas" + std::to_string(bq) + "x" + std::to_string(bk);
            add(time_impl(name, P, sl, o.warmup, o.repeats,
                          [&](Output& out) { blas_tiles_fwd<float>(fwd_args(P, out), bq, bk); },
                          [&](Output& out) { blas_tiles_bwd<float>(bwd_args(P, out), bq, bk); }));
          }
        }
        if (o.peer && T <= o.torch_max_t) add(run_torch(o.python, o.threads, o.warmup, o.repeats, P, sl));
      }
    const GemmResult peak1 = sgemm_peak(2048, 5);
    const double peak = std::max(peak0.gflops, peak1.gflops);
    std::printf("# sgemm peak again at the end: %.1f GFLOP/s; %%peak below uses the larger, %.1f\n", peak1.gflops, peak);
    std::printf("# loadavg at end: %s\n", loadavg().c_str());
    std::printf("#\n");
    std::printf("#  %4s %6s %-12s %10s %8s %7s %10s %8s %7s %9s %9s %6s\n", "HS", "T", "impl", "fwd_time", "fwd", "fwd",
                "bwd_time", "bwd", "bwd", "fwd_err", "bwd_err", "check");
    std::printf("#  %4s %6s %-12s %10s %8s %7s %10s %8s %7s %9s %9s %6s\n", "", "", "", "(ms)", "GFLOP/s", "%peak",
                "(ms)", "GFLOP/s", "%peak", "(rel)", "(rel)", "");
    int rows = 0, failed = 0;
    std::vector<double> fwd_frac, bwd_frac;
    for (const Result& x : results) {
      const Row& r = x.row;
      ++rows;
      if (!r.ran) {
        std::printf("   %4lld %6lld %-12s %s\n", static_cast<long long>(x.hs), static_cast<long long>(x.T), r.impl.c_str(),
                    r.note.c_str());
        continue;
      }
      const double gf = x.fwd_flops / r.fwd_s / 1e9, gb = 2.5 * x.fwd_flops / r.bwd_s / 1e9;
      const bool ok = r.err.fwd <= 10 * x.eps && r.err.bwd <= 100 * x.eps;
      failed += !ok;
      std::printf("   %4lld %6lld %-12s %10.1f %8.1f %7.1f %10.1f %8.1f %7.1f %9.1e %9.1e %6s\n",
                  static_cast<long long>(x.hs), static_cast<long long>(x.T), r.impl.c_str(), r.fwd_s * 1e3, gf,
                  100 * gf / peak, r.bwd_s * 1e3, gb, 100 * gb / peak, r.err.fwd, r.err.bwd, ok ? "ok" : "FAIL");
      if (r.impl == "dsrsq" && x.hs == 64 && x.T >= 4096) {
        fwd_frac.push_back(gf / peak);
        bwd_frac.push_back(gb / peak);
      }
    }
    std::printf("# rows %d  failed %d\n", rows, failed);
    if (fwd_frac.empty()) std::printf("attention_fwd_of_peak=nan attention_bwd_of_peak=nan\n");
    else std::printf("attention_fwd_of_peak=%.2f attention_bwd_of_peak=%.2f\n", median(fwd_frac), median(bwd_frac));
    return failed ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_attention: %s\n", e.what());
    return 1;
  }
}
