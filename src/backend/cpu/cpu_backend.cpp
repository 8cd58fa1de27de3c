// CPU kernels for every op except attention (cpu_attention.cpp). Shapes and
// gradient rules are documented on the argument structs in backend/backend.hpp.
#include "backend/cpu/cpu_backend.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/cpu/cpu_math.hpp"

namespace dsrsq {

Backend& cpu_backend() {
  static cpu::CpuBackend b;
  return b;
}

namespace cpu {
namespace {

// [begin, end) of part `i` of `parts` equal pieces of n.
inline std::pair<std::int64_t, std::int64_t> part(std::int64_t n, int i, int parts) {
  const std::int64_t q = n / parts, r = n % parts;
  const std::int64_t b = i * q + std::min<std::int64_t>(i, r);
  return {b, b + q + (i < r ? 1 : 0)};
}

// Threads worth using for n elements of light work.
inline int threads_for(std::int64_t n) { return n < 32768 ? 1 : omp_get_max_threads(); }

template <class T>
void embedding_fwd_t(const EmbeddingArgs& a) {
  const auto* tok = a.tokens.ptr<std::int32_t>();
  const T* table = a.table.ptr<T>();
  T* out = a.out.ptr<T>();
  const std::int64_t N = a.out.shape[0], C = a.out.shape[1];
#pragma omp parallel for schedule(static) if (N * C > 32768)
  for (std::int64_t n = 0; n < N; ++n) std::memcpy(out + n * C, table + tok[n] * C, sizeof(T) * static_cast<std::size_t>(C));
}

template <class T>
void embedding_bwd_t(const EmbeddingGradArgs& a) {
  const auto* tok = a.tokens.ptr<std::int32_t>();
  const T* dout = a.dout.ptr<T>();
  T* dtable = a.dtable.ptr<T>();
  const std::int64_t N = a.dout.shape[0], C = a.dout.shape[1];
  // Columns are split over threads; rows are visited in order: deterministic.
  const int nt = threads_for(N * C);
#pragma omp parallel num_threads(nt)
  {
    const auto [c0, c1] = part(C, omp_get_thread_num(), omp_get_num_threads());
    for (std::int64_t n = 0; n < N; ++n) {
      T* dst = dtable + tok[n] * C;
      const T* src = dout + n * C;
      for (std::int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

// cos/sin tables per (theta, head size), grown on demand to the largest
// position seen (up to kRopeTableMax positions; beyond that computed directly).
// Angles in double, as the reference computes them. The cap bounds the
// tables' memory (2 x 8 x hs/2 bytes per position: 4 MB at hs 32, 16 MB at hs
// 128); a call with a position beyond it computes every angle directly, with
// the same formula, so results do not depend on the cap.
struct RopeTable {
  double theta = 0;
  std::int64_t hs = 0, npos = 0;
  std::vector<double> cs, sn;  // (npos, hs/2)
};
constexpr std::int64_t kRopeTableMax = std::int64_t{1} << 15;

const RopeTable& rope_table(double theta, std::int64_t hs, std::int64_t need) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<RopeTable>> tables;
  std::lock_guard<std::mutex> lock(mu);
  RopeTable* t = nullptr;
  for (auto& p : tables)
    if (p->theta == theta && p->hs == hs) t = p.get();
  if (!t) {
    tables.push_back(std::make_unique<RopeTable>());
    t = tables.back().get();
    t->theta = theta;
    t->hs = hs;
  }
  if (t->npos < need) {
    const std::int64_t half = hs / 2, n = std::max(need, std::min<std::int64_t>(2 * t->npos, kRopeTableMax));
    t->cs.resize(static_cast<std::size_t>(n * half));
    t->sn.resize(static_cast<std::size_t>(n * half));
    for (std::int64_t i = 0; i < half; ++i) {
      const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(hs));
      for (std::int64_t p = t->npos; p < n; ++p) {
        const double ang = static_cast<double>(p) * inv_freq;
        t->cs[static_cast<std::size_t>(p * half + i)] = std::cos(ang);
        t->sn[static_cast<std::size_t>(p * half + i)] = std::sin(ang);
      }
    }
    t->npos = n;
  }
  return *t;
}

template <class T>
void rope_t(const RopeArgs& a, bool inverse) {
  T* x = a.x.ptr<T>();
  const auto* pos = a.pos.ptr<std::int32_t>();
  const std::int64_t N = a.x.shape[0], NH = a.x.shape[1], HS = a.x.shape[2], half = HS / 2;
  const T sign = inverse ? T(-1) : T(1);
  std::int64_t maxpos = 0;
  for (std::int64_t n = 0; n < N; ++n) maxpos = std::max<std::int64_t>(maxpos, pos[n]);
  const RopeTable* tab = maxpos < kRopeTableMax ? &rope_table(a.theta, HS, maxpos + 1) : nullptr;
#pragma omp parallel if (N * NH * HS > 32768)
  {
    std::vector<T> cs(static_cast<std::size_t>(half)), sn(static_cast<std::size_t>(half));
#pragma omp for schedule(static)
    for (std::int64_t n = 0; n < N; ++n) {
      const double scale = log_length_scale(a.log_base, static_cast<double>(pos[n]));
      for (std::int64_t i = 0; i < half; ++i) {
        double c, s_;
        if (tab) {
          c = tab->cs[static_cast<std::size_t>(pos[n] * half + i)];
          s_ = tab->sn[static_cast<std::size_t>(pos[n] * half + i)];
        } else {
          const double ang = static_cast<double>(pos[n]) * std::pow(a.theta, -2.0 * static_cast<double>(i) / static_cast<double>(HS));
          c = std::cos(ang);
          s_ = std::sin(ang);
        }
        cs[static_cast<std::size_t>(i)] = static_cast<T>(c * scale);
        sn[static_cast<std::size_t>(i)] = sign * static_cast<T>(s_ * scale);
      }
      for (std::int64_t h = 0; h < NH; ++h) {
        T* r = x + (n * NH + h) * HS;
#pragma omp simd
        for (std::int64_t i = 0; i < half; ++i) {
          const T x0 = r[i], x1 = r[i + half];
          const T c = cs[static_cast<std::size_t>(i)], s = sn[static_cast<std::size_t>(i)];
          r[i] = x0 * c - x1 * s;
          r[i + half] = x1 * c + x0 * s;
        }
      }
    }
  }
}

template <class T>
void layernorm_fwd_t(const LayerNormArgs& a) {
  const T* x = a.x.ptr<T>();
  const T* w = a.weight.ptr<T>();
  const T* b = a.bias.ptr<T>();
  T* out = a.out.ptr<T>();
  T* mean = a.mean.ptr<T>();
  T* rstd = a.rstd.ptr<T>();
  const std::int64_t N = a.x.shape[0], C = a.x.shape[1];
#pragma omp parallel for schedule(static) if (N * C > 32768)
  for (std::int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * C;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (std::int64_t c = 0; c < C; ++c) s += xr[c];
    const T m = s / static_cast<T>(C);
    T v = 0;
#pragma omp simd reduction(+ : v)
    for (std::int64_t c = 0; c < C; ++c) v += (xr[c] - m) * (xr[c] - m);
    const T rs = T(1) / std::sqrt(v / static_cast<T>(C) + static_cast<T>(a.eps));
    T* o = out + n * C;
#pragma omp simd
    for (std::int64_t c = 0; c < C; ++c) o[c] = (xr[c] - m) * rs * w[c] + b[c];
    mean[n] = m;
    rstd[n] = rs;
  }
}

template <class T>
void layernorm_bwd_t(const LayerNormGradArgs& a) {
  const T* dout = a.dout.ptr<T>();
  const T* x = a.x.ptr<T>();
  const T* w = a.weight.ptr<T>();
  const T* mean = a.mean.ptr<T>();
  const T* rstd = a.rstd.ptr<T>();
  T* dx = a.dx.ptr<T>();
  T* dw = a.dweight.ptr<T>();
  T* db = a.dbias.ptr<T>();
  const std::int64_t N = a.x.shape[0], C = a.x.shape[1];
  const int nt = threads_for(N * C);
  // Per-thread partial dweight/dbias over a fixed row partition, added in thread order.
  std::vector<T> partial(static_cast<std::size_t>(2 * C * nt), T(0));
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const auto [n0, n1] = part(N, tid, omp_get_num_threads());
    T* pw = partial.data() + 2 * C * tid;
    T* pb = pw + C;
    for (std::int64_t n = n0; n < n1; ++n) {
      const T* xr = x + n * C;
      const T* g = dout + n * C;
      const T m = mean[n], rs = rstd[n];
      T dmean = 0, dnorm_mean = 0;
#pragma omp simd reduction(+ : dmean, dnorm_mean)
      for (std::int64_t c = 0; c < C; ++c) {
        const T norm = (xr[c] - m) * rs;
        const T dn = g[c] * w[c];
        dmean += dn;
        dnorm_mean += dn * norm;
      }
      dmean /= static_cast<T>(C);
      dnorm_mean /= static_cast<T>(C);
      T* d = dx + n * C;
#pragma omp simd
      for (std::int64_t c = 0; c < C; ++c) {
        const T norm = (xr[c] - m) * rs;
        const T dn = g[c] * w[c];
        d[c] += (dn - dmean - norm * dnorm_mean) * rs;
        pw[c] += g[c] * norm;
        pb[c] += g[c];
      }
    }
  }
  for (int t = 0; t < nt; ++t) {
    const T* pw = partial.data() + 2 * C * t;
    for (std::int64_t c = 0; c < C; ++c) {
      dw[c] += pw[c];
      db[c] += pw[C + c];
    }
  }
}

template <class T>
void matmul_t(const MatmulArgs& a) {
  const int r = a.a.shape.rank, o = r - 2;
  const std::int64_t batch = r == 3 ? a.a.shape[0] : 1;
  const std::int64_t M = a.c.shape[o], N = a.c.shape[o + 1];
  const std::int64_t K = a.trans_a ? a.a.shape[o] : a.a.shape[o + 1];
  const std::int64_t lda = a.a.shape[o + 1], ldb = a.b.shape[o + 1];
  const std::int64_t sa = a.a.shape[o] * a.a.shape[o + 1], sb = a.b.shape[o] * a.b.shape[o + 1], sc = M * N;
  const T* A = a.a.ptr<T>();
  const T* B = a.b.ptr<T>();
  T* Cp = a.c.ptr<T>();
  const T* bias = a.bias.empty() ? nullptr : a.bias.ptr<T>();
  T beta = static_cast<T>(a.beta);
  if (bias && beta == T(0)) {
    // Broadcast the bias into c, then accumulate the product onto it.
#pragma omp parallel for schedule(static) if (batch * M * N > 32768)
    for (std::int64_t i = 0; i < batch * M; ++i) std::memcpy(Cp + i * N, bias, sizeof(T) * static_cast<std::size_t>(N));
    beta = T(1);
  } else if (bias) {
#pragma omp parallel for schedule(static) if (batch * M * N > 32768)
    for (std::int64_t i = 0; i < batch * M; ++i) {
      T* row = Cp + i * N;
      for (std::int64_t j = 0; j < N; ++j) row[j] = row[j] + bias[j] / beta;  // scaled by beta below
    }
  }
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (std::int64_t i = 0; i < batch * M * N; ++i) Cp[i] *= beta;
    return;
  }
  auto one = [&](std::int64_t bi) {
    gemm(a.trans_a, a.trans_b, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<T>(a.alpha),
         A + bi * sa, static_cast<int>(lda), B + bi * sb, static_cast<int>(ldb), beta, Cp + bi * sc, static_cast<int>(N));
  };
  if (batch == 1) {
    one(0);  // BLAS threads itself
  } else {
#pragma omp parallel for schedule(dynamic)
    for (std::int64_t bi = 0; bi < batch; ++bi) one(bi);  // BLAS runs single-threaded inside
  }
}

template <class T>
void gelu_fwd_t(const GeluArgs& a) {
  const T* x = a.x.ptr<T>();
  T* out = a.out.ptr<T>();
  const std::int64_t n = a.x.numel();
  const T k0 = static_cast<T>(0.7978845608028654), k1 = static_cast<T>(0.044715);
#pragma omp parallel for simd schedule(static) if (n > 32768)
  for (std::int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    out[i] = T(0.5) * v * (T(1) + ftanh(k0 * (v + k1 * v * v * v)));
  }
}

template <class T>
void gelu_bwd_t(const GeluGradArgs& a) {
  const T* x = a.x.ptr<T>();
  const T* dout = a.dout.ptr<T>();
  T* dx = a.dx.ptr<T>();
  const std::int64_t n = a.x.numel();
  const T k0 = static_cast<T>(0.7978845608028654), k1 = static_cast<T>(0.044715);
#pragma omp parallel for simd schedule(static) if (n > 32768)
  for (std::int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    const T t = ftanh(k0 * (v + k1 * v * v * v));
    const T dt = (T(1) - t * t) * k0 * (T(1) + T(3) * k1 * v * v);
    dx[i] = dout[i] * (T(0.5) * (T(1) + t) + T(0.5) * v * dt);
  }
}

template <class T>
T mask_at(const TensorView& m, std::int64_t i) {
  return m.ptr<T>()[i];
}

template <class T>
double cross_entropy_fwd_t(const CrossEntropyArgs& a) {
  const T* logits = a.logits.ptr<T>();
  const auto* tgt = a.targets.ptr<std::int32_t>();
  const T* mask = a.mask.ptr<T>();
  T* losses = a.losses.ptr<T>();
  const std::int64_t N = a.logits.shape[0], V = a.logits.shape[1];
#pragma omp parallel for schedule(static) if (N * V > 32768)
  for (std::int64_t n = 0; n < N; ++n) {
    if (mask[n] == T(0)) {
      losses[n] = 0;
      continue;
    }
    const T* row = logits + n * V;
    T mx = row[0];
    for (std::int64_t v = 1; v < V; ++v) mx = std::max(mx, row[v]);
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (std::int64_t v = 0; v < V; ++v) s += fexp(row[v] - mx);
    losses[n] = std::log(s) + mx - row[tgt[n]];
  }
  double total = 0;  // sequential: deterministic
  for (std::int64_t n = 0; n < N; ++n) total += static_cast<double>(mask[n]) * static_cast<double>(losses[n]);
  return total * a.inv_norm;
}

template <class T>
void cross_entropy_bwd_t(const CrossEntropyGradArgs& a) {
  const T* logits = a.logits.ptr<T>();
  const auto* tgt = a.targets.ptr<std::int32_t>();
  const T* mask = a.mask.ptr<T>();
  T* dl = a.dlogits.ptr<T>();
  const std::int64_t N = a.logits.shape[0], V = a.logits.shape[1];
#pragma omp parallel for schedule(static) if (N * V > 32768)
  for (std::int64_t n = 0; n < N; ++n) {
    T* d = dl + n * V;
    if (mask[n] == T(0)) {
      std::fill(d, d + V, T(0));
      continue;
    }
    const T* row = logits + n * V;
    T mx = row[0];
    for (std::int64_t v = 1; v < V; ++v) mx = std::max(mx, row[v]);
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (std::int64_t v = 0; v < V; ++v) {
      d[v] = fexp(row[v] - mx);
      s += d[v];
    }
    const T g = static_cast<T>(a.dloss * a.inv_norm) * mask[n] / s;
#pragma omp simd
    for (std::int64_t v = 0; v < V; ++v) d[v] *= g;
    d[tgt[n]] -= static_cast<T>(a.dloss * a.inv_norm) * mask[n];
  }
}

}  // namespace

void CpuBackend::embedding_fwd_impl(const EmbeddingArgs& a) {
  dispatch_float(a.table.dtype, [&](auto t) { embedding_fwd_t<decltype(t)>(a); });
}
void CpuBackend::embedding_bwd_impl(const EmbeddingGradArgs& a) {
  dispatch_float(a.dtable.dtype, [&](auto t) { embedding_bwd_t<decltype(t)>(a); });
}
void CpuBackend::rope_impl(const RopeArgs& a, bool inverse) {
  dispatch_float(a.x.dtype, [&](auto t) { rope_t<decltype(t)>(a, inverse); });
}
void CpuBackend::layernorm_fwd_impl(const LayerNormArgs& a) {
  dispatch_float(a.x.dtype, [&](auto t) { layernorm_fwd_t<decltype(t)>(a); });
}
void CpuBackend::layernorm_bwd_impl(const LayerNormGradArgs& a) {
  dispatch_float(a.x.dtype, [&](auto t) { layernorm_bwd_t<decltype(t)>(a); });
}
void CpuBackend::matmul_fwd_impl(const MatmulArgs& a) {
  dispatch_float(a.a.dtype, [&](auto t) { matmul_t<decltype(t)>(a); });
}
void CpuBackend::gelu_fwd_impl(const GeluArgs& a) {
  dispatch_float(a.x.dtype, [&](auto t) { gelu_fwd_t<decltype(t)>(a); });
}
void CpuBackend::gelu_bwd_impl(const GeluGradArgs& a) {
  dispatch_float(a.x.dtype, [&](auto t) { gelu_bwd_t<decltype(t)>(a); });
}
// cpu_decode_attention.cpp: a few queries over many keys (decode steps).
template <class T> void decode_attention_kernel(const AttentionArgs& a);
constexpr std::int64_t kDecodeMaxQ = 4;
void CpuBackend::attention_fwd_impl(const AttentionArgs& a) {
  if (a.q.shape[1] <= kDecodeMaxQ)
    return dispatch_float(a.q.dtype, [&](auto t) { decode_attention_kernel<decltype(t)>(a); });
  dispatch_float(a.q.dtype, [&](auto t) { attention_fwd_kernel<decltype(t)>(a); });
}
void CpuBackend::attention_bwd_impl(const AttentionGradArgs& a) {
  dispatch_float(a.q.dtype, [&](auto t) { attention_bwd_kernel<decltype(t)>(a); });
}
double CpuBackend::cross_entropy_fwd_impl(const CrossEntropyArgs& a) {
  return dispatch_float(a.logits.dtype, [&](auto t) { return cross_entropy_fwd_t<decltype(t)>(a); });
}
void CpuBackend::cross_entropy_bwd_impl(const CrossEntropyGradArgs& a) {
  dispatch_float(a.logits.dtype, [&](auto t) { cross_entropy_bwd_t<decltype(t)>(a); });
}

void CpuBackend::adamw_impl(const AdamWArgs& a) {
  float* p = a.params.ptr<float>();
  const float* g = a.grads.ptr<float>();
  float* m = a.m.ptr<float>();
  float* v = a.v.ptr<float>();
  const std::int64_t n = a.params.numel();
  const float b1 = static_cast<float>(a.beta1), b2 = static_cast<float>(a.beta2);
  // 1 - beta in double, then rounded: 1.0f - float(0.999) keeps only 4 digits.
  const float omb1 = static_cast<float>(1.0 - a.beta1), omb2 = static_cast<float>(1.0 - a.beta2);
  const float bc1 = static_cast<float>(1.0 - std::pow(a.beta1, static_cast<double>(a.step)));
  const float bc2 = static_cast<float>(1.0 - std::pow(a.beta2, static_cast<double>(a.step)));
  const float lr = static_cast<float>(a.lr), wd = static_cast<float>(a.weight_decay), eps = static_cast<float>(a.eps);
  const float gs = static_cast<float>(a.grad_scale);
#pragma omp parallel for simd schedule(static) if (n > 32768)
  for (std::int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gs;
    m[i] = b1 * m[i] + omb1 * gi;
    v[i] = b2 * v[i] + omb2 * gi * gi;
    const float mh = m[i] / bc1, vh = v[i] / bc2;
    p[i] -= lr * (mh / (std::sqrt(vh) + eps) + wd * p[i]);
  }
}

void CpuBackend::axpy_impl(const AxpyArgs& a) {
  dispatch_float(a.x.dtype, [&](auto t) {
    using T = decltype(t);
    const T* x = a.x.ptr<T>();
    T* y = a.y.ptr<T>();
    const T al = static_cast<T>(a.alpha);
    const std::int64_t n = a.x.numel();
#pragma omp parallel for simd schedule(static) if (n > 32768)
    for (std::int64_t i = 0; i < n; ++i) y[i] += al * x[i];
  });
}

void CpuBackend::fill_impl(TensorView x, double value) {
  const std::int64_t n = x.numel();
  if (x.dtype == DType::i32) {
    std::fill_n(x.ptr<std::int32_t>(), n, static_cast<std::int32_t>(value));
    return;
  }
  dispatch_float(x.dtype, [&](auto t) {
    using T = decltype(t);
    T* p = x.ptr<T>();
    if (value == 0.0) {
      std::memset(p, 0, x.bytes());
      return;
    }
    std::fill_n(p, n, static_cast<T>(value));
  });
}

void CpuBackend::copy_impl(TensorView src, TensorView dst) { std::memcpy(dst.data, src.data, src.bytes()); }

double CpuBackend::sum_squares_impl(TensorView x) {
  return dispatch_float(x.dtype, [&](auto t) {
    using T = decltype(t);
    const T* p = x.ptr<T>();
    const std::int64_t n = x.numel();
    const int nt = threads_for(n);
    std::vector<double> partial(static_cast<std::size_t>(nt), 0.0);
#pragma omp parallel num_threads(nt)
    {
      const auto [b, e] = part(n, omp_get_thread_num(), omp_get_num_threads());
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (std::int64_t i = b; i < e; ++i) s += static_cast<double>(p[i]) * static_cast<double>(p[i]);
      partial[static_cast<std::size_t>(omp_get_thread_num())] = s;
    }
    double s = 0;
    for (double v : partial) s += v;
    return s;
  });
}

void CpuBackend::scale_impl(TensorView x, double s) {
  dispatch_float(x.dtype, [&](auto t) {
    using T = decltype(t);
    T* p = x.ptr<T>();
    const T f = static_cast<T>(s);
    const std::int64_t n = x.numel();
#pragma omp parallel for simd schedule(static) if (n > 32768)
    for (std::int64_t i = 0; i < n; ++i) p[i] *= f;
  });
}

void CpuBackend::bias_rows_sum_impl(TensorView dout2d, TensorView dbias) {
  dispatch_float(dout2d.dtype, [&](auto t) {
    using T = decltype(t);
    const T* d = dout2d.ptr<T>();
    T* db = dbias.ptr<T>();
    const std::int64_t N = dout2d.shape[0], C = dout2d.shape[1];
    const int nt = threads_for(N * C);
#pragma omp parallel num_threads(nt)
    {
      const auto [c0, c1] = part(C, omp_get_thread_num(), omp_get_num_threads());
      for (std::int64_t n = 0; n < N; ++n) {
        const T* row = d + n * C;
#pragma omp simd
        for (std::int64_t c = c0; c < c1; ++c) db[c] += row[c];
      }
    }
  });
}

}  // namespace cpu
}  // namespace dsrsq
