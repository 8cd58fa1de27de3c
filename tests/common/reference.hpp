#pragma once
// Naive double-precision reference implementations of every backend op, plus
// the helpers the op and gradient tests share: seeded random tensors, error
// measures (NMSE, relative error), finite checks and sentinel guard zones.
//
// The references are written for clarity, not speed: plain loops, shapes in
// comments, all arithmetic in double. They follow the contracts written on the
// argument structs in src/backend/backend.hpp, not the CPU kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "core/rng.hpp"

namespace ref {

using Vec = std::vector<double>;
using IVec = std::vector<std::int32_t>;

// ---- random inputs ---------------------------------------------------------
template <class T>
std::vector<T> normal(std::int64_t n, dsrsq::Rng& rng, double sd = 1.0, double mean = 0.0) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<T>(mean + sd * rng.normal());
  return v;
}
template <class T>
std::vector<T> uniform(std::int64_t n, dsrsq::Rng& rng, double lo, double hi) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<T>(lo + (hi - lo) * rng.uniform());
  return v;
}
inline IVec randint(std::int64_t n, dsrsq::Rng& rng, std::int64_t hi) {
  IVec v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(hi)));
  return v;
}
template <class T>
Vec to_double(const std::vector<T>& v) {
  return Vec(v.begin(), v.end());
}
template <class T>
Vec to_double(const T* p, std::int64_t n) {
  return Vec(p, p + n);
}
// Fisher-Yates with our Rng (std::shuffle's result is library-dependent).
template <class V>
void shuffle(V& v, dsrsq::Rng& rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i)]);
}

// ---- error measures --------------------------------------------------------
// Normalised mean squared error sum (got - want)^2 / sum want^2. When want is
// all zero, returns sum got^2 (so zero only for an exact match).
template <class T>
double nmse(const T* got, const Vec& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += want[i] * want[i];
  }
  if (!(num == num)) return std::numeric_limits<double>::infinity();
  return den > 0 ? num / den : num;
}
template <class T>
double nmse(const std::vector<T>& got, const Vec& want) {
  return nmse(got.data(), want);
}
// ||got - want|| / max(||want||, floor): relative error in the 2-norm.
inline double rel_err(const Vec& got, const Vec& want, double floor = 1e-300) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  if (!(num == num)) return std::numeric_limits<double>::infinity();
  return std::sqrt(num) / std::max(std::sqrt(den), floor);
}
template <class T>
bool all_finite(const T* p, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<double>(p[i]))) return false;
  return true;
}

// ---- guard zones -------------------------------------------------------------
// A buffer with sentinel-filled zones before and after the payload; intact()
// tells whether a kernel wrote outside [data(), data() + n).
template <class T>
class Guarded {
 public:
  static constexpr std::int64_t kGuard = 67;  // odd, so the payload is not 64-byte aligned either
  static T sentinel() {
    if constexpr (std::is_integral_v<T>) return static_cast<T>(-123456789);
    else return static_cast<T>(-7777.25);  // exact in f32 and f64, implausible as an output
  }
  explicit Guarded(std::int64_t n, T fill = T(0)) : n_(n), buf_(static_cast<std::size_t>(n + 2 * kGuard), sentinel()) {
    std::fill(data(), data() + n, fill);
  }
  Guarded(const std::vector<T>& v) : Guarded(static_cast<std::int64_t>(v.size())) {  // NOLINT: implicit on purpose
    std::copy(v.begin(), v.end(), data());
  }
  T* data() { return buf_.data() + kGuard; }
  const T* data() const { return buf_.data() + kGuard; }
  std::int64_t size() const { return n_; }
  T& operator[](std::int64_t i) { return data()[i]; }
  const T& operator[](std::int64_t i) const { return data()[i]; }
  bool intact() const {
    const T s = sentinel();
    for (std::int64_t i = 0; i < kGuard; ++i)
      if (!(buf_[static_cast<std::size_t>(i)] == s) || !(buf_[static_cast<std::size_t>(n_ + kGuard + i)] == s))
        return false;
    return true;
  }
  Vec to_double() const { return Vec(data(), data() + n_); }
  std::vector<T> to_vector() const { return std::vector<T>(data(), data() + n_); }

 private:
  std::int64_t n_;
  std::vector<T> buf_;
};

// ---- reference ops ---------------------------------------------------------
// out(N,C) = table(V,C)[tokens[n]]
inline Vec embedding(const IVec& tokens, const Vec& table, std::int64_t C) {
  Vec out(tokens.size() * static_cast<std::size_t>(C));
  for (std::size_t n = 0; n < tokens.size(); ++n)
    for (std::int64_t c = 0; c < C; ++c) out[n * C + c] = table[static_cast<std::size_t>(tokens[n] * C + c)];
  return out;
}
// dtable(V,C) += scatter of dout(N,C)
inline void embedding_bwd(const IVec& tokens, const Vec& dout, std::int64_t C, Vec& dtable) {
  for (std::size_t n = 0; n < tokens.size(); ++n)
    for (std::int64_t c = 0; c < C; ++c) dtable[static_cast<std::size_t>(tokens[n] * C + c)] += dout[n * C + c];
}

// x (N, NH, HS), pair (i, i + HS/2) rotated by angle pos * theta^(-2i/HS);
// inverse rotates by the negative angle.
// log_base > 0 also scales row n by max(1, ln(pos + 1) / ln(log_base)).
inline Vec rope(const Vec& x, std::int64_t N, std::int64_t NH, std::int64_t HS, const IVec& pos, double theta,
                bool inverse = false, double log_base = 0.0) {
  Vec out = x;
  const std::int64_t half = HS / 2;
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t h = 0; h < NH; ++h)
      for (std::int64_t i = 0; i < half; ++i) {
        const double s = log_base > 0 ? std::max(1.0, std::log(static_cast<double>(pos[static_cast<std::size_t>(n)]) + 1.0) / std::log(log_base)) : 1.0;
        const double ang = (inverse ? -1.0 : 1.0) * static_cast<double>(pos[static_cast<std::size_t>(n)]) *
                           std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(HS));
        const std::size_t a = static_cast<std::size_t>((n * NH + h) * HS + i), b = a + static_cast<std::size_t>(half);
        out[a] = s * (x[a] * std::cos(ang) - x[b] * std::sin(ang));
        out[b] = s * (x[b] * std::cos(ang) + x[a] * std::sin(ang));
      }
  return out;
}

// x (N,C) -> out (N,C), mean (N), rstd (N) with biased variance.
struct LayerNormOut {
  Vec out, mean, rstd;
};
inline LayerNormOut layernorm(const Vec& x, const Vec& w, const Vec& b, std::int64_t N, std::int64_t C, double eps) {
  LayerNormOut r{Vec(x.size()), Vec(static_cast<std::size_t>(N)), Vec(static_cast<std::size_t>(N))};
  for (std::int64_t n = 0; n < N; ++n) {
    double m = 0;
    for (std::int64_t c = 0; c < C; ++c) m += x[static_cast<std::size_t>(n * C + c)];
    m /= static_cast<double>(C);
    double v = 0;
    for (std::int64_t c = 0; c < C; ++c) {
      const double d = x[static_cast<std::size_t>(n * C + c)] - m;
      v += d * d;
    }
    v /= static_cast<double>(C);
    const double rs = 1.0 / std::sqrt(v + eps);
    for (std::int64_t c = 0; c < C; ++c) {
      const std::size_t i = static_cast<std::size_t>(n * C + c);
      r.out[i] = (x[i] - m) * rs * w[static_cast<std::size_t>(c)] + b[static_cast<std::size_t>(c)];
    }
    r.mean[static_cast<std::size_t>(n)] = m;
    r.rstd[static_cast<std::size_t>(n)] = rs;
  }
  return r;
}

// c[b] = alpha * op(a[b]) @ op(b[b]) + beta * c[b] + bias (N) on every row.
// a is (M,K), or (K,M) with ta; b is (K,N), or (N,K) with tb; c (M,N).
inline void matmul(const Vec& a, const Vec& b, Vec& c, const Vec* bias, std::int64_t batch, std::int64_t M,
                   std::int64_t N, std::int64_t K, bool ta, bool tb, double alpha, double beta) {
  for (std::int64_t p = 0; p < batch; ++p) {
    const double* A = a.data() + p * M * K;
    const double* Bm = b.data() + p * K * N;
    double* Cm = c.data() + p * M * N;
    for (std::int64_t i = 0; i < M; ++i)
      for (std::int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (std::int64_t k = 0; k < K; ++k) {
          const double av = ta ? A[k * M + i] : A[i * K + k];
          const double bv = tb ? Bm[j * K + k] : Bm[k * N + j];
          s += av * bv;
        }
        double r = alpha * s + (beta != 0 ? beta * Cm[i * N + j] : 0.0);
        if (bias) r += (*bias)[static_cast<std::size_t>(j)];
        Cm[i * N + j] = r;
      }
  }
}
// out(N,OC) = x(N,C) @ w(OC,C)^T + bias(OC)
inline Vec linear(const Vec& x, const Vec& w, const Vec* bias, std::int64_t N, std::int64_t C, std::int64_t OC) {
  Vec out(static_cast<std::size_t>(N * OC));
  matmul(x, w, out, bias, 1, N, OC, C, false, true, 1.0, 0.0);
  return out;
}

// GELU, tanh approximation.
inline double gelu(double x) {
  const double k = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}
inline Vec gelu(const Vec& x) {
  Vec o(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) o[i] = gelu(x[i]);
  return o;
}

// Attention: q (B,T,NH,HS); k, v (B,S,NH,HS); o (B,T,NH,HS); lse (B,NH,T).
// Causal: key j visible to query i iff k_pos[j] <= q_pos[i]. Rows with no
// visible key: o = 0, lse = -inf. scale <= 0 means 1/sqrt(HS).
struct AttentionOut {
  Vec o, lse;
};
inline AttentionOut attention(const Vec& q, const Vec& k, const Vec& v, const IVec& qpos, const IVec& kpos,
                              std::int64_t B, std::int64_t T, std::int64_t S, std::int64_t NH, std::int64_t HS,
                              bool causal, double scale = 0.0) {
  if (scale <= 0) scale = 1.0 / std::sqrt(static_cast<double>(HS));
  AttentionOut r{Vec(static_cast<std::size_t>(B * T * NH * HS), 0.0), Vec(static_cast<std::size_t>(B * NH * T))};
  Vec s(static_cast<std::size_t>(S));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < NH; ++h)
      for (std::int64_t i = 0; i < T; ++i) {
        const double* qi = q.data() + ((b * T + i) * NH + h) * HS;
        double mx = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < S; ++j) {
          const bool vis = !causal || kpos[static_cast<std::size_t>(b * S + j)] <= qpos[static_cast<std::size_t>(b * T + i)];
          if (!vis) {
            s[static_cast<std::size_t>(j)] = -std::numeric_limits<double>::infinity();
            continue;
          }
          const double* kj = k.data() + ((b * S + j) * NH + h) * HS;
          double d = 0;
          for (std::int64_t c = 0; c < HS; ++c) d += qi[c] * kj[c];
          s[static_cast<std::size_t>(j)] = d * scale;
          mx = std::max(mx, d * scale);
        }
        double* oi = r.o.data() + ((b * T + i) * NH + h) * HS;
        double& lse = r.lse[static_cast<std::size_t>((b * NH + h) * T + i)];
        if (mx == -std::numeric_limits<double>::infinity()) {
          lse = mx;  // no visible key: o stays 0
          continue;
        }
        double sum = 0;
        for (std::int64_t j = 0; j < S; ++j) sum += std::exp(s[static_cast<std::size_t>(j)] - mx);
        for (std::int64_t j = 0; j < S; ++j) {
          const double p = std::exp(s[static_cast<std::size_t>(j)] - mx) / sum;
          if (p == 0) continue;
          const double* vj = v.data() + ((b * S + j) * NH + h) * HS;
          for (std::int64_t c = 0; c < HS; ++c) oi[c] += p * vj[c];
        }
        lse = mx + std::log(sum);
      }
  return r;
}

// Masked softmax cross-entropy: losses[n] = -log softmax(logits[n])[t[n]] where
// mask[n] != 0 (else 0); returns inv_norm * sum mask[n] * losses[n].
inline double cross_entropy(const Vec& logits, const IVec& targets, const Vec& mask, std::int64_t N, std::int64_t V,
                            double inv_norm, Vec* losses = nullptr) {
  double total = 0;
  if (losses) losses->assign(static_cast<std::size_t>(N), 0.0);
  for (std::int64_t n = 0; n < N; ++n) {
    if (mask[static_cast<std::size_t>(n)] == 0) continue;
    const double* row = logits.data() + n * V;
    double mx = row[0];
    for (std::int64_t j = 1; j < V; ++j) mx = std::max(mx, row[j]);
    double s = 0;
    for (std::int64_t j = 0; j < V; ++j) s += std::exp(row[j] - mx);
    const double nll = std::log(s) + mx - row[targets[static_cast<std::size_t>(n)]];
    if (losses) (*losses)[static_cast<std::size_t>(n)] = nll;
    total += mask[static_cast<std::size_t>(n)] * nll;
  }
  return total * inv_norm;
}

// One AdamW step with torch.optim.AdamW semantics (decoupled decay on the
// parameter before the update): g' = grad_scale g; m, v moments; bias
// correction by the 1-based step; p -= lr (mhat / (sqrt(vhat) + eps) + wd p_old).
struct AdamWRef {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.0, grad_scale = 1.0;
  std::int64_t step = 1;
};
inline void adamw(Vec& p, const Vec& g, Vec& m, Vec& v, const AdamWRef& a) {
  const double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  const double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
  for (std::size_t i = 0; i < p.size(); ++i) {
    const double gi = g[i] * a.grad_scale;
    m[i] = a.beta1 * m[i] + (1 - a.beta1) * gi;
    v[i] = a.beta2 * v[i] + (1 - a.beta2) * gi * gi;
    const double mh = m[i] / bc1, vh = v[i] / bc2;
    const double p_old = p[i];
    p[i] = p_old - a.lr * (mh / (std::sqrt(vh) + a.eps) + a.wd * p_old);
  }
}

// ---- reference backward passes (used by the f32 op checks; the f64 backend's
// own backward is checked against finite differences in tests/grad) -----------
// LayerNorm: dx += rstd (dn - mean(dn) - norm mean(dn norm)), dn = dout w;
// dweight += sum_n dout norm; dbias += sum_n dout.
inline void layernorm_bwd(const Vec& dout, const Vec& x, const Vec& w, std::int64_t N, std::int64_t C, double eps,
                          Vec& dx, Vec& dw, Vec& db) {
  const Vec zero(static_cast<std::size_t>(C), 0.0);
  const LayerNormOut f = layernorm(x, w, zero, N, C, eps);
  for (std::int64_t n = 0; n < N; ++n) {
    double mdn = 0, mdnn = 0;
    const double m = f.mean[static_cast<std::size_t>(n)], rs = f.rstd[static_cast<std::size_t>(n)];
    for (std::int64_t c = 0; c < C; ++c) {
      const std::size_t i = static_cast<std::size_t>(n * C + c);
      const double norm = (x[i] - m) * rs, dn = dout[i] * w[static_cast<std::size_t>(c)];
      mdn += dn;
      mdnn += dn * norm;
    }
    mdn /= static_cast<double>(C);
    mdnn /= static_cast<double>(C);
    for (std::int64_t c = 0; c < C; ++c) {
      const std::size_t i = static_cast<std::size_t>(n * C + c);
      const double norm = (x[i] - m) * rs, dn = dout[i] * w[static_cast<std::size_t>(c)];
      dx[i] += rs * (dn - mdn - norm * mdnn);
      dw[static_cast<std::size_t>(c)] += dout[i] * norm;
      db[static_cast<std::size_t>(c)] += dout[i];
    }
  }
}

// d gelu / dx for the tanh approximation.
inline double gelu_grad(double x) {
  const double k = std::sqrt(2.0 / M_PI), a = 0.044715;
  const double u = k * (x + a * x * x * x), t = std::tanh(u);
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * a * x * x);
}

// dlogits[n] = dloss * inv_norm * mask[n] * (softmax(logits[n]) - onehot(t[n]))
inline Vec cross_entropy_bwd(const Vec& logits, const IVec& targets, const Vec& mask, std::int64_t N, std::int64_t V,
                             double inv_norm, double dloss) {
  Vec d(logits.size(), 0.0);
  for (std::int64_t n = 0; n < N; ++n) {
    const double w = mask[static_cast<std::size_t>(n)];
    if (w == 0) continue;
    const double* row = logits.data() + n * V;
    double mx = row[0];
    for (std::int64_t j = 1; j < V; ++j) mx = std::max(mx, row[j]);
    double s = 0;
    for (std::int64_t j = 0; j < V; ++j) s += std::exp(row[j] - mx);
    for (std::int64_t j = 0; j < V; ++j)
      d[static_cast<std::size_t>(n * V + j)] =
          dloss * inv_norm * w * (std::exp(row[j] - mx) / s - (j == targets[static_cast<std::size_t>(n)] ? 1.0 : 0.0));
  }
  return d;
}

// Attention backward from the definition (P recomputed in double):
// dV_j += sum_i P_ij dO_i; dP_ij = dO_i . V_j; D_i = sum_j P_ij dP_ij;
// dS_ij = P_ij (dP_ij - D_i) scale; dQ_i += sum_j dS_ij K_j; dK_j += sum_i dS_ij Q_i.
inline void attention_bwd(const Vec& dout, const Vec& q, const Vec& k, const Vec& v, const IVec& qpos,
                          const IVec& kpos, std::int64_t B, std::int64_t T, std::int64_t S, std::int64_t NH,
                          std::int64_t HS, bool causal, double scale, Vec& dq, Vec& dk, Vec& dv) {
  if (scale <= 0) scale = 1.0 / std::sqrt(static_cast<double>(HS));
  Vec p(static_cast<std::size_t>(S)), dp(static_cast<std::size_t>(S));
  auto at = [&](std::int64_t b, std::int64_t t, std::int64_t len, std::int64_t h) {
    return static_cast<std::size_t>(((b * len + t) * NH + h) * HS);
  };
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < NH; ++h)
      for (std::int64_t i = 0; i < T; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < S; ++j) {
          const bool vis = !causal || kpos[static_cast<std::size_t>(b * S + j)] <= qpos[static_cast<std::size_t>(b * T + i)];
          double s = -std::numeric_limits<double>::infinity();
          if (vis) {
            s = 0;
            for (std::int64_t c = 0; c < HS; ++c) s += q[at(b, i, T, h) + c] * k[at(b, j, S, h) + c];
            s *= scale;
          }
          p[static_cast<std::size_t>(j)] = s;
          mx = std::max(mx, s);
        }
        if (mx == -std::numeric_limits<double>::infinity()) continue;  // no visible key: no gradient
        double sum = 0;
        for (auto& x : p) sum += (x = std::exp(x - mx));
        double D = 0;
        for (std::int64_t j = 0; j < S; ++j) {
          p[static_cast<std::size_t>(j)] /= sum;
          double d = 0;
          for (std::int64_t c = 0; c < HS; ++c) d += dout[at(b, i, T, h) + c] * v[at(b, j, S, h) + c];
          dp[static_cast<std::size_t>(j)] = d;
          D += p[static_cast<std::size_t>(j)] * d;
        }
        for (std::int64_t j = 0; j < S; ++j) {
          const double pj = p[static_cast<std::size_t>(j)];
          if (pj == 0) continue;
          const double ds = pj * (dp[static_cast<std::size_t>(j)] - D) * scale;
          for (std::int64_t c = 0; c < HS; ++c) {
            dv[at(b, j, S, h) + c] += pj * dout[at(b, i, T, h) + c];
            dq[at(b, i, T, h) + c] += ds * k[at(b, j, S, h) + c];
            dk[at(b, j, S, h) + c] += ds * q[at(b, i, T, h) + c];
          }
        }
      }
}

// ---- case names --------------------------------------------------------------
template <class... Args>
std::string name(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace ref
