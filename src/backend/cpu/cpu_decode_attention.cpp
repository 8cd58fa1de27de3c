// Decode-specialised attention forward on the CPU: a few queries (Tq <=
// kDecodeMaxQ per batch row) against a long key set, as in one decode step.
//
// Same contract as attention_fwd_kernel (AttentionArgs in backend/backend.hpp:
// causal visibility k_pos <= q_pos, keys in any order, o = 0 and lse = -inf
// for a row that sees no key). Why a separate kernel: with one query per head
// the blockwise kernel runs (b, h) tasks of rank-1 gemms, so with 4 heads and 2
// threads it reads each head's strided keys separately and the BLAS call
// overhead dominates; decode is bound by the bytes of K and V, so this kernel
// is built to stream them once:
//   - split-K: the keys [0, S) are cut into P contiguous ranges (P = threads of
//     the team), so every thread reads its own contiguous slab of K and V for
//     all heads at once (rows of NH * HS floats: the cache's natural layout);
//   - per block of kDB keys: all scores of the block (every head, every query)
//     from K, the online-softmax update, then P V from the same block of V:
//     K and V each leave memory once, the block stays in L1/L2 between passes;
//   - dot products (fixed lane partial sums and tree) and the P V update are
//     simd loops over the head dimension;
//   - the P partial results (running max m, sum l, unnormalised output) are
//     combined with the log-sum-exp rule in thread order 0..P-1 after the
//     parallel region: the result is deterministic for a given thread count
//     (the partition depends only on S and P).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_math.hpp"

namespace dsrsq::cpu {
namespace {

constexpr std::int64_t kDB = 64;  // keys per block (K block of 64 x 128 f32 = 32 KiB)
constexpr std::int64_t kLanes = 16;  // dot-product lanes (one AVX-512 register of f32)
// Keys ahead that the score loop prefetches (one block: 32, 128 and 256 were
// no better at 32K on this machine).
constexpr std::int64_t kPrefetch = kDB;

// q . k over n elements: kLanes independent partial sums (one vector FMA per
// kLanes elements), then a fixed pairwise tree, then the tail. A plain
// `omp simd reduction` loop here compiled to a serial 16-add chain per dot
// product, which dominated the kernel; the order below is fixed, so results
// do not depend on the compiler's choice of vector width.
template <class T>
inline T dot(const T* q, const T* k, std::int64_t n) {
  T acc[kLanes] = {};
  std::int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes)
#pragma omp simd
    for (std::int64_t l = 0; l < kLanes; ++l) acc[l] += q[e + l] * k[e + l];
  T tail = 0;
  for (; e < n; ++e) tail += q[e] * k[e];
  for (std::int64_t w = kLanes / 2; w >= 1; w /= 2)
#pragma omp simd
    for (std::int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0] + tail;
}

// The same dot product with the head size known at compile time (HSF a
// multiple of kLanes): q and the lane sums stay in registers and the loops
// unroll. Same summation order as dot() (lane partial sums, then the tree).
template <int HSF>
inline float dot_fixed(const float* q, const float* k) {
  float acc[kLanes] = {};
  for (int e = 0; e < HSF; e += kLanes)
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += q[e + l] * k[e + l];
  for (int w = kLanes / 2; w >= 1; w /= 2)
#pragma omp simd
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// P V for one block with the head size known at compile time: row by row
// (r = qi * NH + h), the row's output accumulator stays in registers over the
// block's keys instead of being loaded and stored once per key. The same
// additions in the same order (key by key) as the generic loop.
template <int HSF>
inline void pv_block_fixed(const float* sc, const float* v, std::int64_t ld, std::int64_t rows, std::int64_t NH,
                           std::int64_t nj, float* A) {
  for (std::int64_t r = 0; r < rows; ++r) {
    float acc[HSF];
    float* ar = A + r * HSF;
#pragma omp simd
    for (int e = 0; e < HSF; ++e) acc[e] = ar[e];
    const float* w = sc + r * kDB;
    const float* vr = v + (r % NH) * HSF;
    for (std::int64_t jj = 0; jj < nj; ++jj) {
      const float wj = w[jj];
      if (wj == 0.0f) continue;
      const float* vj = vr + jj * ld;
#pragma omp simd
      for (int e = 0; e < HSF; ++e) acc[e] += wj * vj[e];
    }
#pragma omp simd
    for (int e = 0; e < HSF; ++e) ar[e] = acc[e];
  }
}

// One thread's partial result over its key range, for every (b, query, head).
template <class T>
struct Partial {
  std::vector<T> m, l, acc;  // m, l: (B, Tq, NH); acc: (B, Tq, NH, HS)
};

// dot() with the common head sizes unrolled (f32).
template <class T>
inline T dot_head(const T* q, const T* k, std::int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == 32) return dot_fixed<32>(q, k);
    if (n == 64) return dot_fixed<64>(q, k);
    if (n == 128) return dot_fixed<128>(q, k);
  }
  return dot(q, k, n);
}

template <class T>
void decode_range(const AttentionArgs& a, T scale, std::int64_t s0, std::int64_t s1, Partial<T>& part) {
  const std::int64_t B = a.q.shape[0], Tq = a.q.shape[1], NH = a.q.shape[2], HS = a.q.shape[3], S = a.k.shape[1];
  const std::int64_t ld = NH * HS, rows = Tq * NH;
  const T* q = a.q.ptr<T>();
  const T* k = a.k.ptr<T>();
  const T* v = a.v.ptr<T>();
  const auto* qpos = a.q_pos.ptr<std::int32_t>();
  const auto* kpos = a.k_pos.ptr<std::int32_t>();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  part.m.assign(static_cast<std::size_t>(B * rows), neg_inf);
  part.l.assign(static_cast<std::size_t>(B * rows), T(0));
  part.acc.assign(static_cast<std::size_t>(B * rows * HS), T(0));
  // Scores of one block, row r = qi * NH + h (the layout of q and acc).
  std::vector<T> sc(static_cast<std::size_t>(rows * kDB));
  for (std::int64_t b = 0; b < B; ++b) {
    const T* Q = q + b * Tq * ld;
    const std::int32_t* qp = qpos + b * Tq;
    const std::int32_t* kp = kpos + b * S;
    std::int32_t qmax = std::numeric_limits<std::int32_t>::min();
    for (std::int64_t i = 0; i < Tq; ++i) qmax = std::max(qmax, qp[i]);
    T* M = part.m.data() + b * rows;
    T* L = part.l.data() + b * rows;
    T* A = part.acc.data() + b * rows * HS;
    for (std::int64_t j0 = s0; j0 < s1; j0 += kDB) {
      const std::int64_t nj = std::min(kDB, s1 - j0);
      // Scores: one pass over the block's K rows.
      bool any = false;
      for (std::int64_t jj = 0; jj < nj; ++jj) {
        const std::int32_t p = kp[j0 + jj];
        const bool maybe = !a.causal || p <= qmax;
        const T* Kr = k + (b * S + j0 + jj) * ld;
        // Software prefetch of the next block's rows of K and V (one row of
        // each per key scored here): with the hardware prefetcher alone one
        // core streamed 11-13 GB/s at 32K keys; with this, 13-18 GB/s on one
        // thread and 30-45% more on two (interleaved runs, one query, HS 32).
        if (j0 + kPrefetch + jj < s1) {
          const char* kn = reinterpret_cast<const char*>(Kr + kPrefetch * ld);
          const char* vn = reinterpret_cast<const char*>(v + (b * S + j0 + kPrefetch + jj) * ld);
          for (std::int64_t off = 0; off < ld * static_cast<std::int64_t>(sizeof(T)); off += 64) {
            __builtin_prefetch(kn + off);
            __builtin_prefetch(vn + off);
          }
        }
        for (std::int64_t qi = 0; qi < Tq; ++qi) {
          const bool vis = maybe && (!a.causal || p <= qp[qi]);
          for (std::int64_t h = 0; h < NH; ++h) {
            T s = neg_inf;
            if (vis) {
              s = dot_head(Q + qi * ld + h * HS, Kr + h * HS, HS) * scale;
              any = true;
            }
            sc[static_cast<std::size_t>((qi * NH + h) * kDB + jj)] = s;
          }
        }
      }
      if (!any) continue;  // nothing visible in this block: V is not read
      // Online softmax per row: scores become weights (0 where masked).
      for (std::int64_t r = 0; r < rows; ++r) {
        T* s = sc.data() + r * kDB;
        T mx = neg_inf;
        for (std::int64_t jj = 0; jj < nj; ++jj) mx = std::max(mx, s[jj]);
        if (mx == neg_inf) {
          std::fill(s, s + nj, T(0));
          continue;
        }
        const T mnew = std::max(M[r], mx);
        const T corr = fexp(M[r] - mnew);
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (std::int64_t jj = 0; jj < nj; ++jj) {
          const T w = fexp(s[jj] - mnew);
          s[jj] = w;
          sum += w;
        }
        L[r] = L[r] * corr + sum;
        if (corr != T(1)) {
          T* ar = A + r * HS;
#pragma omp simd
          for (std::int64_t e = 0; e < HS; ++e) ar[e] *= corr;
        }
        M[r] = mnew;
      }
      // P V: one pass over the block's V rows.
      if constexpr (std::is_same_v<T, float>) {
        if (HS == 32) { pv_block_fixed<32>(sc.data(), v + (b * S + j0) * ld, ld, rows, NH, nj, A); continue; }
        if (HS == 64) { pv_block_fixed<64>(sc.data(), v + (b * S + j0) * ld, ld, rows, NH, nj, A); continue; }
        if (HS == 128) { pv_block_fixed<128>(sc.data(), v + (b * S + j0) * ld, ld, rows, NH, nj, A); continue; }
      }
      for (std::int64_t jj = 0; jj < nj; ++jj) {
        const T* Vr = v + (b * S + j0 + jj) * ld;
        for (std::int64_t r = 0; r < rows; ++r) {
          const T w = sc[static_cast<std::size_t>(r * kDB + jj)];
          if (w == T(0)) continue;
          const T* vr = Vr + (r % NH) * HS;
          T* ar = A + r * HS;
#pragma omp simd
          for (std::int64_t e = 0; e < HS; ++e) ar[e] += w * vr[e];
        }
      }
    }
  }
}

}  // namespace

template <class T>
void decode_attention_kernel(const AttentionArgs& a) {
  const std::int64_t B = a.q.shape[0], Tq = a.q.shape[1], NH = a.q.shape[2], HS = a.q.shape[3], S = a.k.shape[1];
  const std::int64_t ld = NH * HS, rows = Tq * NH;
  const T scale = static_cast<T>(a.scale > 0 ? a.scale : 1.0 / std::sqrt(static_cast<double>(HS)));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  // Split only when each thread gets enough bytes to amortise waking the team
  // (kParallelMin elements of K per thread, as the other light ops).
  const int max_p = omp_get_max_threads();
  const bool par = max_p > 1 && B * S * ld >= 2 * kParallelMin;
  std::vector<Partial<T>> parts(static_cast<std::size_t>(par ? max_p : 1));
  int used = 1;
#pragma omp parallel if (par)
  {
    const int P = omp_get_num_threads(), p = omp_get_thread_num();
#pragma omp single
    used = P;
    // Contiguous ranges rounded to whole blocks; depends on (S, P) only.
    const std::int64_t nblk = (S + kDB - 1) / kDB;
    const std::int64_t b0 = nblk * p / P, b1 = nblk * (p + 1) / P;
    decode_range<T>(a, scale, std::min(S, b0 * kDB), std::min(S, b1 * kDB), parts[static_cast<std::size_t>(p)]);
  }
  // Log-sum-exp merge of the partials in thread order.
  T* o = a.o.ptr<T>();
  T* lse = a.lse.ptr<T>();
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t qi = r / NH, h = r % NH, row = b * rows + r;
      T mx = neg_inf;
      for (int p = 0; p < used; ++p) mx = std::max(mx, parts[static_cast<std::size_t>(p)].m[static_cast<std::size_t>(row)]);
      T* orow = o + (b * Tq + qi) * ld + h * HS;
      T& L = lse[(b * NH + h) * Tq + qi];
      if (mx == neg_inf) {  // no visible key
        std::fill(orow, orow + HS, T(0));
        L = neg_inf;
        continue;
      }
      T l = 0;
      std::fill(orow, orow + HS, T(0));
      for (int p = 0; p < used; ++p) {
        const Partial<T>& pt = parts[static_cast<std::size_t>(p)];
        const T mp = pt.m[static_cast<std::size_t>(row)];
        if (mp == neg_inf) continue;
        const T w = std::exp(mp - mx);
        l += w * pt.l[static_cast<std::size_t>(row)];
        const T* ar = pt.acc.data() + row * HS;
        for (std::int64_t e = 0; e < HS; ++e) orow[e] += w * ar[e];
      }
      const T inv = T(1) / l;
      for (std::int64_t e = 0; e < HS; ++e) orow[e] *= inv;
      L = mx + std::log(l);
    }
}

template void decode_attention_kernel<float>(const AttentionArgs&);
template void decode_attention_kernel<double>(const AttentionArgs&);

}  // namespace dsrsq::cpu
