// Blockwise causal attention on the CPU (FlashAttention-2 schedule on BLAS tiles).
//
// Shapes: q (B,T,NH,HS); k, v (B,S,NH,HS); o like q; lse (B,NH,T); q_pos (B,T),
// k_pos (B,S) are i32 positions. Key j is visible to query i iff !causal or
// k_pos[j] <= q_pos[i].
// Forward: per (b, h, query block), loop over key blocks; a block whose smallest
// key position exceeds the largest query position is skipped without touching
// it; scores of a tile come from one gemm, the running max / sum are updated
// with the online-softmax rule, and P @ V is accumulated with a second gemm.
// No T x S matrix exists; the largest buffer is one BQ x BK tile per thread.
// Saved for backward: o, lse (natural log-sum-exp of the scaled scores; -inf
// for a row that sees no key, whose output is 0).
// Backward (+= into dq, dk, dv): per (b, h), recompute each visible tile's
// probabilities from lse, then dV += P^T dO, dP = dO V^T, dS = P (dP - D) scale,
// dQ += dS K, dK += dS^T Q, where D_i = dO_i . O_i. One thread owns a (b, h)
// pair, so accumulation has no races and a fixed order (bitwise repeatable).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_math.hpp"

namespace dsrsq::cpu {
namespace {

constexpr std::int64_t kBQ = 64;   // query rows per tile
constexpr std::int64_t kBK = 128;  // keys per tile

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

}  // namespace

template <class T>
void attention_fwd_kernel(const AttentionArgs& a) {
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
void attention_bwd_kernel(const AttentionGradArgs& a) {
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

template void attention_fwd_kernel<float>(const AttentionArgs&);
template void attention_fwd_kernel<double>(const AttentionArgs&);
template void attention_bwd_kernel<float>(const AttentionGradArgs&);
template void attention_bwd_kernel<double>(const AttentionGradArgs&);

}  // namespace dsrsq::cpu
