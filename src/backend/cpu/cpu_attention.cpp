// Blockwise causal attention on the CPU (FlashAttention-2 schedule).
//
// Shapes: q (B,T,NH,HS); k, v (B,S,NH,HS); o like q; lse (B,NH,T); q_pos (B,T),
// k_pos (B,S) are i32 positions. Key j is visible to query i iff !causal or
// k_pos[j] <= q_pos[i]. Saved for backward: o, lse (natural log-sum-exp of the
// scaled scores; -inf for a row that sees no key, whose output is 0).
//
// Two paths. f32 with HS a multiple of the vector width (16 with AVX-512: HS
// 16..256) and at least 16 queries runs hand-written register-tiled
// micro-kernels; double (gradient tests), other head sizes and decode-sized
// calls run the same schedule on BLAS tiles. Measured with bench/attention.cpp
// (which keeps the BLAS schedule at 64x128 and 256x256 tiles): BLAS tiles lose
// in the forward at every size (each call packs both operands again for a
// K = HS product, and the softmax goes through memory between the gemms); in
// the backward 256x256 BLAS tiles are within 10% at HS 64 and slower at HS 32
// and 128, and could only be parallelised deterministically over (b, h).
//
// Micro-kernel path, forward: K is first packed per (b, h, 4V-key block) as a
// transposed HS x 4V panel (V = vector width), so a score tile of 4 query rows
// x 4V keys is 16 vector accumulators fed by one broadcast per row and 4 loads
// per d. The online softmax (max, exp, sum) runs on those registers; only the
// 4 x 4V probabilities go through L1 to the P V product, which accumulates 4
// rows x HS into the query block's output buffer. Tasks are (b, h, 64-query
// block), heaviest (latest positions) first. Blocks whose smallest key
// position exceeds the block's (or the 4-row group's) largest query position
// are skipped; per-element masks are applied only where a key block's largest
// position exceeds the group's smallest query position (or at the ragged end).
//
// Backward (+= into dq, dk, dv), FA-2 order: per key block, dK and dV
// accumulate in a per-thread buffer over the query blocks that see it, with P
// recomputed from lse, dP = dO V^T, dS = P (dP - D) where D_i = dO_i . O_i.
// dQ needs a sum over key blocks, which different tasks own: each task adds
// into its own partial dQ (key blocks are dealt round-robin to G groups per
// (b, h), G fixed by the shape alone), and the partials are summed in group
// order at the end. No atomics, no T x S matrix, and the result is bitwise the
// same for every thread count.
#include <omp.h>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_math.hpp"

namespace dsrsq::cpu {
namespace {

// Tiles of the BLAS path (double, and head sizes the micro-kernels do not take).
constexpr std::int64_t kBlasBQ = 64;   // query rows per tile
constexpr std::int64_t kBlasBK = 128;  // keys per tile

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


// ---- BLAS path ------------------------------------------------------------------
template <class T>
void attention_fwd_blas(const AttentionArgs& a) {
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
    kb[static_cast<std::size_t>(b)] = block_bounds(kpos + b * S, S, kBlasBK);
    qb[static_cast<std::size_t>(b)] = block_bounds(qpos + b * T_, T_, kBlasBQ);
  }
  const std::int64_t nqb = (T_ + kBlasBQ - 1) / kBlasBQ, nkb = (S + kBlasBK - 1) / kBlasBK;
  const std::int64_t tasks = B * NH * nqb;

#pragma omp parallel if (tasks > 1 && B * T_ * S * NH > 4096)
  {
    std::vector<T> sbuf(static_cast<std::size_t>(kBlasBQ * kBlasBK)), acc(static_cast<std::size_t>(kBlasBQ * HS));
    std::vector<T> mrow(static_cast<std::size_t>(kBlasBQ)), lrow(static_cast<std::size_t>(kBlasBQ));
    // Heaviest query blocks (latest positions) first balances causal work.
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < tasks; ++task) {
      const std::int64_t qbi = nqb - 1 - task % nqb, bh = task / nqb, b = bh / NH, h = bh % NH;
      const std::int64_t i0 = qbi * kBlasBQ, nq = std::min(kBlasBQ, T_ - i0);
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
        const std::int64_t j0 = jb * kBlasBK, nj = std::min(kBlasBK, S - j0);
        const T* K = k + (b * S + j0) * ld + h * HS;
        const T* Vp = v + (b * S + j0) * ld + h * HS;
        const std::int32_t* kp = kpos + b * S + j0;
        gemm(false, true, static_cast<int>(nq), static_cast<int>(nj), static_cast<int>(HS), scale, Q,
             static_cast<int>(ld), K, static_cast<int>(ld), T(0), sbuf.data(), static_cast<int>(kBlasBK));
        const bool partial = a.causal && kmax > qmin;
        for (std::int64_t r = 0; r < nq; ++r) {
          T* s = sbuf.data() + r * kBlasBK;
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
             static_cast<int>(kBlasBK), Vp, static_cast<int>(ld), T(1), acc.data(), static_cast<int>(HS));
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
void attention_bwd_blas(const AttentionGradArgs& a) {
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
    kb[static_cast<std::size_t>(b)] = block_bounds(kpos + b * S, S, kBlasBK);
    qb[static_cast<std::size_t>(b)] = block_bounds(qpos + b * T_, T_, kBlasBQ);
  }
  const std::int64_t nqb = (T_ + kBlasBQ - 1) / kBlasBQ, nkb = (S + kBlasBK - 1) / kBlasBK;

#pragma omp parallel if (B * NH > 1 && B * T_ * S * NH > 4096)
  {
    std::vector<T> pbuf(static_cast<std::size_t>(kBlasBQ * kBlasBK)), dpbuf(static_cast<std::size_t>(kBlasBQ * kBlasBK));
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
        const std::int64_t i0 = qbi * kBlasBQ, nq = std::min(kBlasBQ, T_ - i0);
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
          const std::int64_t j0 = jb * kBlasBK, nj = std::min(kBlasBK, S - j0);
          const T* K = k + base_k + j0 * ld;
          const T* Vp = v + base_k + j0 * ld;
          T* dK = dk + base_k + j0 * ld;
          T* dV = dv + base_k + j0 * ld;
          const std::int32_t* kp = kpos + b * S + j0;
          gemm(false, true, static_cast<int>(nq), static_cast<int>(nj), static_cast<int>(HS), scale, Q,
               static_cast<int>(ld), K, static_cast<int>(ld), T(0), pbuf.data(), static_cast<int>(kBlasBK));
          const bool partial = a.causal && kmax > qmin;
          for (std::int64_t r = 0; r < nq; ++r) {
            T* p = pbuf.data() + r * kBlasBK;
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
               static_cast<int>(kBlasBK), dO, static_cast<int>(ld), T(1), dV, static_cast<int>(ld));
          // dP = dO V^T
          gemm(false, true, static_cast<int>(nq), static_cast<int>(nj), static_cast<int>(HS), T(1), dO,
               static_cast<int>(ld), Vp, static_cast<int>(ld), T(0), dpbuf.data(), static_cast<int>(kBlasBK));
          for (std::int64_t r = 0; r < nq; ++r) {
            const T* p = pbuf.data() + r * kBlasBK;
            T* ds = dpbuf.data() + r * kBlasBK;
            const T dd = drow[static_cast<std::size_t>(i0 + r)];
#pragma omp simd
            for (std::int64_t j = 0; j < nj; ++j) ds[j] = p[j] * (ds[j] - dd) * scale;
          }
          // dQ += dS K ; dK += dS^T Q
          gemm(false, false, static_cast<int>(nq), static_cast<int>(HS), static_cast<int>(nj), T(1), dpbuf.data(),
               static_cast<int>(kBlasBK), K, static_cast<int>(ld), T(1), dQ, static_cast<int>(ld));
          gemm(true, false, static_cast<int>(nj), static_cast<int>(HS), static_cast<int>(nq), T(1), dpbuf.data(),
               static_cast<int>(kBlasBK), Q, static_cast<int>(ld), T(1), dK, static_cast<int>(ld));
        }
      }
    }
  }
}


// ---- micro-kernel path (f32) ----------------------------------------------------
#if defined(__AVX512F__)
constexpr int VL = 16;
#elif defined(__AVX__)
constexpr int VL = 8;
#else
constexpr int VL = 4;
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef std::int32_t vi __attribute__((vector_size(VL * sizeof(std::int32_t))));

constexpr int kR = 4;                    // query rows (or key rows) per register tile
constexpr int kNV = 4;                   // vectors per score row
constexpr std::int64_t kBK = kNV * VL;   // keys per block
constexpr std::int64_t kBQ = 64;         // query rows per block

inline vf ldv(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void stv(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
inline vi ldi(const std::int32_t* p) {
  vi x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
// Broadcast (not vf{} + s: adding 0.0f is not an identity for -0.0f, so GCC keeps the add).
inline vf bc(float s) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(s);
#elif defined(__AVX__)
  return _mm256_set1_ps(s);
#else
  vf r;
  for (int i = 0; i < VL; ++i) r[i] = s;
  return r;
#endif
}
// Explicit FMA: the project compiles in ISO mode, where GCC does not contract a*b+c.
inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}
// Keeps a loaded operand in a register: otherwise GCC folds the load into each
// FMA that uses it, R loads per vector instead of one, and the kernel becomes
// load-bound.
inline vf load_reg(const float* p) {
  vf x = ldv(p);
#if defined(__AVX__)
  asm("" : "+v"(x));
#endif
  return x;
}
// Maximum over the lanes, halving the width at each step (cheaper than
// full-width rotations).
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
inline float hmax(vf v) {
#if defined(__AVX__)
  vf8 m8;
#if defined(__AVX512F__)
  const vf8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const vf8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  m8 = lo > hi ? lo : hi;
#else
  std::memcpy(&m8, &v, sizeof m8);
#endif
  const vf4 lo4 = __builtin_shufflevector(m8, m8, 0, 1, 2, 3), hi4 = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const vf4 m4 = lo4 > hi4 ? lo4 : hi4;
  return std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
#else
  float m = v[0];
  for (int i = 1; i < VL; ++i) m = std::max(m, v[i]);
  return m;
#endif
}
inline float hsum(vf v) {
  float s = v[0];
  for (int i = 1; i < VL; ++i) s += v[i];
  return s;
}
// exp_approx of cpu_math.hpp on a vector (same constants, same clamping).
inline vf vexp(vf x) {
  const vf lo = bc(-87.0f), hi = bc(88.0f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf magic = bc(12582912.0f);
  const vf n = vfma(xc, bc(1.44269504088896341f), magic) - magic;
  const vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = bc(1.9875691500e-4f);
  p = vfma(p, r, bc(1.3981999507e-3f));
  p = vfma(p, r, bc(8.3334519073e-3f));
  p = vfma(p, r, bc(4.1665795894e-2f));
  p = vfma(p, r, bc(1.6666665459e-1f));
  p = vfma(p, r, bc(5.0000001201e-1f));
  p = vfma(p * r, r, r) + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < lo ? bc(0.0f) : p * two_n;
}

// s[r][0..kBK) = A[r, 0..HS) . panel[0..HS, 0..kBK) for r < R, where the panel is
// a key block transposed (HS rows of kBK keys).
template <int R, int HV>
inline void score_tile(const float* A, std::int64_t lda, const float* panel, vf (&s)[kR][kNV]) {
  constexpr int HS = HV * VL;
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) s[r][v] = vf{};
#pragma GCC unroll 2
  for (int d = 0; d < HS; ++d) {
    static_assert(kNV == 4);
    const vf b0 = load_reg(panel + d * kBK), b1 = load_reg(panel + d * kBK + VL);
    const vf b2 = load_reg(panel + d * kBK + 2 * VL), b3 = load_reg(panel + d * kBK + 3 * VL);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const vf a = bc(A[r * lda + d]);
      s[r][0] = vfma(a, b0, s[r][0]);
      s[r][1] = vfma(a, b1, s[r][1]);
      s[r][2] = vfma(a, b2, s[r][2]);
      s[r][3] = vfma(a, b3, s[r][3]);
    }
  }
}

// C[r, 0..HS) += sum_{kk < kdim} A[r*ars + kk*acs] * Bm[kk*ldb + 0..HS) for r < R.
// The columns go in passes of at most 4 vectors (R x 4 accumulators).
template <int R, int HV>
inline void accum_rows(std::int64_t kdim, const float* A, std::int64_t ars, std::int64_t acs, const float* Bm,
                       std::int64_t ldb, float* C, std::int64_t ldc) {
  constexpr int CV = HV < 4 ? HV : 4;
  for (int c0 = 0; c0 < HV; c0 += CV) {
    vf acc[R][CV];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < CV; ++c) acc[r][c] = ldv(C + r * ldc + (c0 + c) * VL);
    const float* Bc = Bm + c0 * VL;
#pragma GCC unroll 2
    for (std::int64_t kk = 0; kk < kdim; ++kk) {
      const vf b0 = load_reg(Bc + kk * ldb);
      const vf b1 = CV > 1 ? load_reg(Bc + kk * ldb + VL) : b0;
      const vf b2 = CV > 2 ? load_reg(Bc + kk * ldb + 2 * VL) : b0;
      const vf b3 = CV > 3 ? load_reg(Bc + kk * ldb + 3 * VL) : b0;
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const vf a = bc(A[r * ars + kk * acs]);
        acc[r][0] = vfma(a, b0, acc[r][0]);
        if constexpr (CV > 1) acc[r][1] = vfma(a, b1, acc[r][1]);
        if constexpr (CV > 2) acc[r][2] = vfma(a, b2, acc[r][2]);
        if constexpr (CV > 3) acc[r][3] = vfma(a, b3, acc[r][3]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < CV; ++c) stv(C + r * ldc + (c0 + c) * VL, acc[r][c]);
  }
}

// Dispatch a row count 1..kR to the template.
template <int HV, class F>
inline void with_rows(int R, F&& f) {
  switch (R) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

template <int R, int HV>
inline void accum_rows_n(std::int64_t nrows, std::int64_t kdim, const float* A, std::int64_t ars, std::int64_t acs,
                         const float* Bm, std::int64_t ldb, float* C, std::int64_t ldc) {
  std::int64_t r = 0;
  for (; r + kR <= nrows; r += kR) accum_rows<kR, HV>(kdim, A + r * ars, ars, acs, Bm, ldb, C + r * ldc, ldc);
  if (r < nrows)
    with_rows<HV>(static_cast<int>(nrows - r), [&](auto rr) {
      accum_rows<decltype(rr)::value, HV>(kdim, A + r * ars, ars, acs, Bm, ldb, C + r * ldc, ldc);
    });
}

// Masks score rows where needed: lanes at or past nj, and (causal) keys after the row's query.
template <int R>
inline void mask_tile(vf (&s)[kR][kNV], const std::int32_t* kpad, std::int64_t nj, bool causal, const std::int32_t* qp) {
  vi lane;
  for (int i = 0; i < VL; ++i) lane[i] = i;
  const vf ninf = bc(-std::numeric_limits<float>::infinity());
#pragma GCC unroll 4
  for (int v = 0; v < kNV; ++v) {
    const vi in_range = (lane + v * VL) < static_cast<std::int32_t>(nj);
    const vi kp = ldi(kpad + v * VL);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const vi vis = causal ? (in_range & (kp <= qp[r])) : in_range;
      s[r][v] = vis ? s[r][v] : ninf;
    }
  }
}

// Per-block position bounds plus the key positions padded to whole blocks.
struct Layout {
  std::int64_t B, T, S, NH, HS, ld, nqb, nkb;
  std::vector<std::int32_t> qlo, qhi, klo, khi, kpad;  // (B, nqb), (B, nkb), (B, nkb * kBK)
  Layout(const TensorView& q, const TensorView& k, const std::int32_t* qpos, const std::int32_t* kpos)
      : B(q.shape[0]), T(q.shape[1]), S(k.shape[1]), NH(q.shape[2]), HS(q.shape[3]), ld(NH * HS),
        nqb((T + kBQ - 1) / kBQ), nkb((S + kBK - 1) / kBK) {
    qlo.resize(static_cast<std::size_t>(B * nqb));
    qhi.resize(qlo.size());
    klo.resize(static_cast<std::size_t>(B * nkb));
    khi.resize(klo.size());
    kpad.assign(static_cast<std::size_t>(B * nkb * kBK), std::numeric_limits<std::int32_t>::max());
    for (std::int64_t b = 0; b < B; ++b) {
      const BlockBounds qb = block_bounds(qpos + b * T, T, kBQ), kb = block_bounds(kpos + b * S, S, kBK);
      std::copy(qb.lo.begin(), qb.lo.end(), qlo.begin() + b * nqb);
      std::copy(qb.hi.begin(), qb.hi.end(), qhi.begin() + b * nqb);
      std::copy(kb.lo.begin(), kb.lo.end(), klo.begin() + b * nkb);
      std::copy(kb.hi.begin(), kb.hi.end(), khi.begin() + b * nkb);
      std::copy(kpos + b * S, kpos + (b + 1) * S, kpad.begin() + b * nkb * kBK);
    }
  }
  std::size_t qi(std::int64_t b, std::int64_t qb) const { return static_cast<std::size_t>(b * nqb + qb); }
  std::size_t ki(std::int64_t b, std::int64_t kb) const { return static_cast<std::size_t>(b * nkb + kb); }
};

// Transposed key-block panels of x (B,S,NH,HS): panel (b, h, jb) holds HS rows of kBK keys, zero past S.
void pack_panels(const float* x, const Layout& L, std::vector<float>& out) {
  const std::int64_t psz = L.HS * kBK, n = L.B * L.NH * L.nkb;
  out.resize(static_cast<std::size_t>(n * psz));
#pragma omp parallel for schedule(static) if (n > 1 && L.S * L.ld > 8192)
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t jb = t % L.nkb, bh = t / L.nkb, b = bh / L.NH, h = bh % L.NH;
    const std::int64_t j0 = jb * kBK, nj = std::min(kBK, L.S - j0);
    float* P = out.data() + t * psz;
    for (std::int64_t j = 0; j < kBK; ++j) {
      if (j < nj) {
        const float* row = x + (b * L.S + j0 + j) * L.ld + h * L.HS;
        for (std::int64_t d = 0; d < L.HS; ++d) P[d * kBK + j] = row[d];
      } else {
        for (std::int64_t d = 0; d < L.HS; ++d) P[d * kBK + j] = 0.0f;
      }
    }
  }
}

inline std::pair<std::int32_t, std::int32_t> minmax_pos(const std::int32_t* qp, int R) {
  std::int32_t lo = qp[0], hi = qp[0];
  for (int r = 1; r < R; ++r) {
    lo = std::min(lo, qp[r]);
    hi = std::max(hi, qp[r]);
  }
  return {lo, hi};
}

template <int HV>
void attention_fwd_micro(const AttentionArgs& a) {
  constexpr std::int64_t HS = HV * VL;
  const auto* qpos = a.q_pos.ptr<std::int32_t>();
  const auto* kpos = a.k_pos.ptr<std::int32_t>();
  const Layout L(a.q, a.k, qpos, kpos);
  const std::int64_t B = L.B, T_ = L.T, S = L.S, NH = L.NH, ld = L.ld, nqb = L.nqb, nkb = L.nkb;
  const float scale = attn_scale<float>(a.scale, HS);
  const float* q = a.q.ptr<float>();
  const float* v = a.v.ptr<float>();
  float* o = a.o.ptr<float>();
  float* lse = a.lse.ptr<float>();
  const bool causal = a.causal;
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> kt;
  pack_panels(a.k.ptr<float>(), L, kt);
  const std::int64_t tasks = B * NH * nqb;

#pragma omp parallel if (tasks > 1 && B * T_ * S * NH > 4096)
  {
    std::vector<float> qs(static_cast<std::size_t>(kBQ * HS)), acc(static_cast<std::size_t>(kBQ * HS));
    // Running max per row, and the running sum kept as a vector per row (one
    // horizontal add at the end instead of one per key block).
    std::vector<float> mrow(static_cast<std::size_t>(kBQ)), lrow(static_cast<std::size_t>(kBQ * VL));
    alignas(64) float pt[kR][kBK];
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < tasks; ++task) {
      const std::int64_t qbi = nqb - 1 - task % nqb, bh = task / nqb, b = bh / NH, h = bh % NH;
      const std::int64_t i0 = qbi * kBQ, nq = std::min(kBQ, T_ - i0);
      const std::int32_t qmax = L.qhi[L.qi(b, qbi)];
      const std::int32_t* qp = qpos + b * T_ + i0;
      // Scaled query rows, contiguous: the broadcast operand of every score tile.
      for (std::int64_t r = 0; r < nq; ++r) {
        const float* src = q + (b * T_ + i0 + r) * ld + h * HS;
        for (std::int64_t d = 0; d < HS; ++d) qs[static_cast<std::size_t>(r * HS + d)] = src[d] * scale;
      }
      std::fill(acc.begin(), acc.begin() + nq * HS, 0.0f);
      std::fill(mrow.begin(), mrow.end(), ninf);
      std::fill(lrow.begin(), lrow.end(), 0.0f);
      for (std::int64_t jb = 0; jb < nkb; ++jb) {
        const std::int32_t kmin = L.klo[L.ki(b, jb)], kmax = L.khi[L.ki(b, jb)];
        if (causal && kmin > qmax) continue;  // no query of the block sees a key of it
        const std::int64_t j0 = jb * kBK, nj = std::min(kBK, S - j0);
        const float* panel = kt.data() + ((b * NH + h) * nkb + jb) * HS * kBK;
        const float* Vr = v + (b * S + j0) * ld + h * HS;
        const std::int32_t* kp = L.kpad.data() + L.ki(b, jb) * kBK;
        for (std::int64_t r0 = 0; r0 < nq; r0 += kR) {
          const int R = static_cast<int>(std::min<std::int64_t>(kR, nq - r0));
          const auto [gmin, gmax] = minmax_pos(qp + r0, R);
          if (causal && kmin > gmax) continue;
          const bool need_mask = nj < kBK || (causal && kmax > gmin);
          with_rows<HV>(R, [&](auto rr) {
            constexpr int RR = decltype(rr)::value;
            vf s[kR][kNV];
            score_tile<RR, HV>(qs.data() + r0 * HS, HS, panel, s);
            if (need_mask) mask_tile<RR>(s, kp, nj, causal, qp + r0);
            for (int r = 0; r < RR; ++r) {
              vf mv = s[r][0];
              for (int vv = 1; vv < kNV; ++vv) mv = mv > s[r][vv] ? mv : s[r][vv];
              const std::size_t ri = static_cast<std::size_t>(r0 + r);
              const float mold = mrow[ri], mnew = std::max(mold, hmax(mv));
              if (mnew == ninf) {  // nothing visible to this row so far
                std::fill(pt[r], pt[r] + kBK, 0.0f);
                continue;
              }
              const float corr = exp_approx(mold - mnew);
              vf sum = vf{};
              for (int vv = 0; vv < kNV; ++vv) {
                const vf p = vexp(s[r][vv] - mnew);
                stv(pt[r] + vv * VL, p);
                sum += p;
              }
              stv(lrow.data() + ri * VL, vfma(ldv(lrow.data() + ri * VL), bc(corr), sum));
              mrow[ri] = mnew;
              if (corr != 1.0f) {
                float* ar = acc.data() + ri * HS;
                for (int c = 0; c < HV; ++c) stv(ar + c * VL, ldv(ar + c * VL) * corr);
              }
            }
            accum_rows<RR, HV>(nj, pt[0], kBK, 1, Vr, ld, acc.data() + r0 * HS, HS);
          });
        }
      }
      float* O = o + (b * T_ + i0) * ld + h * HS;
      float* Ls = lse + (b * NH + h) * T_ + i0;
      for (std::int64_t r = 0; r < nq; ++r) {
        const float l = hsum(ldv(lrow.data() + r * VL));
        float* orow = O + r * ld;
        if (l == 0.0f) {
          std::fill(orow, orow + HS, 0.0f);
          Ls[r] = ninf;
          continue;
        }
        const float inv = 1.0f / l;
        const float* ar = acc.data() + r * HS;
        for (std::int64_t d = 0; d < HS; ++d) orow[d] = ar[d] * inv;
        Ls[r] = mrow[static_cast<std::size_t>(r)] + std::log(l);
      }
    }
  }
}

template <int HV>
void attention_bwd_micro(const AttentionGradArgs& a) {
  constexpr std::int64_t HS = HV * VL;
  const auto* qpos = a.q_pos.ptr<std::int32_t>();
  const auto* kpos = a.k_pos.ptr<std::int32_t>();
  const Layout L(a.q, a.k, qpos, kpos);
  const std::int64_t B = L.B, T_ = L.T, S = L.S, NH = L.NH, ld = L.ld, nqb = L.nqb, nkb = L.nkb;
  const float scale = attn_scale<float>(a.scale, HS);
  const float* q = a.q.ptr<float>();
  const float* k = a.k.ptr<float>();
  const float* o = a.o.ptr<float>();
  const float* lse = a.lse.ptr<float>();
  const float* dout = a.dout.ptr<float>();
  float* dq = a.dq.ptr<float>();
  float* dk = a.dk.ptr<float>();
  float* dv = a.dv.ptr<float>();
  const bool causal = a.causal;
  const float ninf = -std::numeric_limits<float>::infinity();
  const bool par = B * T_ * S * NH > 4096;

  std::vector<float> kt, vt;
  pack_panels(k, L, kt);
  pack_panels(a.v.ptr<float>(), L, vt);
  // Scaled queries per head, contiguous (B, NH, T, HS), and D = dO . O (B, NH, T).
  std::vector<float> qs(static_cast<std::size_t>(B * NH * T_ * HS)), dd(static_cast<std::size_t>(B * NH * T_));
#pragma omp parallel for schedule(static) if (par)
  for (std::int64_t bh = 0; bh < B * NH; ++bh) {
    const std::int64_t b = bh / NH, h = bh % NH;
    for (std::int64_t i = 0; i < T_; ++i) {
      const float* src = q + (b * T_ + i) * ld + h * HS;
      const float* dor = dout + (b * T_ + i) * ld + h * HS;
      const float* orow = o + (b * T_ + i) * ld + h * HS;
      float* dst = qs.data() + (bh * T_ + i) * HS;
      float s = 0;
      for (std::int64_t d = 0; d < HS; ++d) {
        dst[d] = src[d] * scale;
        s += dor[d] * orow[d];
      }
      dd[static_cast<std::size_t>(bh * T_ + i)] = s;
    }
  }
  // G groups of key blocks per (b, h), from the shape alone (never the thread
  // count), enough for about 8 tasks; each group owns one partial dQ.
  const std::int64_t G = std::clamp<std::int64_t>((8 + B * NH - 1) / (B * NH), 1, std::min<std::int64_t>(nkb, 8));
  std::vector<float> dqp(static_cast<std::size_t>(G * B * NH * T_ * HS), 0.0f);
  const std::int64_t tasks = B * NH * G;

#pragma omp parallel if (tasks > 1 && par)
  {
    std::vector<float> pbuf(static_cast<std::size_t>(kBQ * kBK)), dsbuf(pbuf.size());
    std::vector<float> dka(static_cast<std::size_t>(kBK * HS)), dva(dka.size());
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < tasks; ++task) {
      const std::int64_t g = task % G, bh = task / G, b = bh / NH, h = bh % NH;
      const float* Qh = qs.data() + bh * T_ * HS;
      const float* Lh = lse + bh * T_;
      const float* Dh = dd.data() + bh * T_;
      float* dQp = dqp.data() + (g * B * NH + bh) * T_ * HS;
      for (std::int64_t jb = g; jb < nkb; jb += G) {
        const std::int32_t kmin = L.klo[L.ki(b, jb)], kmax = L.khi[L.ki(b, jb)];
        const std::int64_t j0 = jb * kBK, nj = std::min(kBK, S - j0);
        const float* kpanel = kt.data() + ((b * NH + h) * nkb + jb) * HS * kBK;
        const float* vpanel = vt.data() + ((b * NH + h) * nkb + jb) * HS * kBK;
        const float* Kr = k + (b * S + j0) * ld + h * HS;
        const std::int32_t* kp = L.kpad.data() + L.ki(b, jb) * kBK;
        std::fill(dka.begin(), dka.end(), 0.0f);
        std::fill(dva.begin(), dva.end(), 0.0f);
        bool any = false;
        for (std::int64_t qbi = 0; qbi < nqb; ++qbi) {
          if (causal && kmin > L.qhi[L.qi(b, qbi)]) continue;
          any = true;
          const std::int64_t i0 = qbi * kBQ, nq = std::min(kBQ, T_ - i0);
          const std::int32_t* qp = qpos + b * T_ + i0;
          const float* dOr = dout + (b * T_ + i0) * ld + h * HS;
          for (std::int64_t r0 = 0; r0 < nq; r0 += kR) {
            const int R = static_cast<int>(std::min<std::int64_t>(kR, nq - r0));
            float* P = pbuf.data() + r0 * kBK;
            float* dS = dsbuf.data() + r0 * kBK;
            const auto [gmin, gmax] = minmax_pos(qp + r0, R);
            if (causal && kmin > gmax) {
              std::fill(P, P + R * kBK, 0.0f);
              std::fill(dS, dS + R * kBK, 0.0f);
              continue;
            }
            const bool need_mask = nj < kBK || (causal && kmax > gmin);
            with_rows<HV>(R, [&](auto rr) {
              constexpr int RR = decltype(rr)::value;
              vf s[kR][kNV];
              score_tile<RR, HV>(Qh + (i0 + r0) * HS, HS, kpanel, s);
              if (need_mask) mask_tile<RR>(s, kp, nj, causal, qp + r0);
              vf p[kR][kNV];
              for (int r = 0; r < RR; ++r) {
                const float l = Lh[i0 + r0 + r];
                for (int vv = 0; vv < kNV; ++vv) p[r][vv] = l == ninf ? vf{} : vexp(s[r][vv] - l);
              }
              score_tile<RR, HV>(dOr + r0 * ld, ld, vpanel, s);  // s <- dP = dO V^T
              for (int r = 0; r < RR; ++r) {
                const float D = Dh[i0 + r0 + r];
                for (int vv = 0; vv < kNV; ++vv) {
                  stv(P + r * kBK + vv * VL, p[r][vv]);
                  stv(dS + r * kBK + vv * VL, p[r][vv] * (s[r][vv] - D));
                }
              }
              // dQ (partial, unscaled) += dS K
              accum_rows<RR, HV>(nj, dS, kBK, 1, Kr, ld, dQp + (i0 + r0) * HS, HS);
            });
          }
          // dV += P^T dO ; dK += dS^T (scale Q): rows are keys, the sum runs over the block's queries.
          accum_rows_n<kR, HV>(nj, nq, pbuf.data(), 1, kBK, dOr, ld, dva.data(), HS);
          accum_rows_n<kR, HV>(nj, nq, dsbuf.data(), 1, kBK, Qh + i0 * HS, HS, dka.data(), HS);
        }
        if (!any) continue;
        for (std::int64_t j = 0; j < nj; ++j) {
          float* dkr = dk + (b * S + j0 + j) * ld + h * HS;
          float* dvr = dv + (b * S + j0 + j) * ld + h * HS;
          const float* ka = dka.data() + j * HS;
          const float* va = dva.data() + j * HS;
          for (std::int64_t d = 0; d < HS; ++d) {
            dkr[d] += ka[d];
            dvr[d] += va[d];
          }
        }
      }
    }
  }
  // dq += scale * sum_g partial_g, groups in a fixed order.
#pragma omp parallel for schedule(static) if (par)
  for (std::int64_t r = 0; r < B * NH * T_; ++r) {
    const std::int64_t bh = r / T_, i = r % T_, b = bh / NH, h = bh % NH;
    float* dqr = dq + (b * T_ + i) * ld + h * HS;
    for (std::int64_t d = 0; d < HS; ++d) {
      float s = 0;
      for (std::int64_t g = 0; g < G; ++g) s += dqp[static_cast<std::size_t>(((g * B * NH + bh) * T_ + i) * HS + d)];
      dqr[d] += scale * s;
    }
  }
}

// The micro-kernels take f32 with HS = HV * VL for HV in {1, 2, 4, 8, 16}.
template <class F>
bool with_head_vectors(std::int64_t hs, F&& f) {
  if (hs % VL) return false;
  switch (hs / VL) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    case 16: f(std::integral_constant<int, 16>{}); return true;
    default: return false;
  }
}

// The micro-kernel path copies K (and V in backward) into transposed panels once
// per call; with fewer than 16 queries per sequence (decode steps) that copy
// costs as much as the attention itself, so those calls stay on the BLAS path,
// which reads the cache in place.
constexpr std::int64_t kMinQueriesForPanels = 16;

bool use_micro(const TensorView& q, const TensorView& k) {
  return q.shape[1] >= kMinQueriesForPanels && k.shape[1] > 0;
}

}  // namespace

template <class T>
void attention_fwd_kernel(const AttentionArgs& a) {
  if constexpr (sizeof(T) == 4)
    if (use_micro(a.q, a.k) &&
        with_head_vectors(a.q.shape[3], [&](auto hv) { attention_fwd_micro<decltype(hv)::value>(a); }))
      return;
  attention_fwd_blas<T>(a);
}

template <class T>
void attention_bwd_kernel(const AttentionGradArgs& a) {
  if constexpr (sizeof(T) == 4)
    if (use_micro(a.q, a.k) &&
        with_head_vectors(a.q.shape[3], [&](auto hv) { attention_bwd_micro<decltype(hv)::value>(a); }))
      return;
  attention_bwd_blas<T>(a);
}

template void attention_fwd_kernel<float>(const AttentionArgs&);
template void attention_fwd_kernel<double>(const AttentionArgs&);
template void attention_bwd_kernel<float>(const AttentionGradArgs&);
template void attention_bwd_kernel<double>(const AttentionGradArgs&);

}  // namespace dsrsq::cpu
