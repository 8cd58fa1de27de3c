// RCKV (src/kv/rckv.hpp): identity with the full cache, the latent
// attention path and importance against a brute-force reference, compression
// loss and its gradient, PCA init, constant memory while streaming, eviction
// rule, budget accounting, input errors, SQA over the buffer.
#define BOOST_TEST_MODULE rckv
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "kv/rckv.hpp"
#include "core/error.hpp"
#include "core/rng.hpp"
#include "kv/kv_policy.hpp"
#include "model/transformer.hpp"
#include "snapshot_check.hpp"

using namespace dsrsq;
using compress::RckvConfig;
using compress::RckvPolicy;
using compress::RckvProjections;

namespace {

ModelConfig tiny_cfg(std::int64_t layers = 2) {
  ModelConfig c;
  c.vocab = 53;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_layers = layers;
  c.d_ff = 64;
  c.max_pos = 512;
  return c;
}

template <class T>
std::string testing_str(const std::vector<T>& v) {
  std::string s = "{";
  for (const auto& x : v) s += std::to_string(x) + " ";
  return s + "}";
}

// Random weights large enough that attention is far from uniform.
std::unique_ptr<Transformer> random_model(const ModelConfig& cfg, std::uint64_t seed) {
  auto m = std::make_unique<Transformer>(cfg, cpu_backend());
  Rng rng(seed, 5);
  for (auto& p : m->params()) {
    if (p.name.find("ln") != std::string::npos && p.name.find("weight") != std::string::npos) continue;
    const double sd = p.decay ? 0.25 : 0.05;
    float* v = p.value.ptr<float>();
    for (std::int64_t i = 0; i < p.value.numel(); ++i) v[i] = static_cast<float>(sd * rng.normal());
  }
  return m;
}

std::vector<std::int32_t> rand_tokens(std::int64_t n, std::int64_t vocab, std::uint64_t seed) {
  Rng rng(seed, 9);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab)));
  return t;
}

std::vector<float> rand_floats(std::int64_t n, std::uint64_t seed, double sd = 1.0) {
  Rng rng(seed, 11);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (auto& v : x) v = static_cast<float>(sd * rng.normal());
  return x;
}

double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  BOOST_REQUIRE_EQUAL(got.size(), want.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  if (!(num == num)) return std::numeric_limits<double>::infinity();
  return std::sqrt(num / std::max(den, 1e-300));
}

bool all_finite(const std::vector<float>& x) {
  return std::all_of(x.begin(), x.end(), [](float v) { return std::isfinite(v); });
}

bool msg_has(const dsrsq::Error& e, const std::string& s) { return std::string(e.what()).find(s) != std::string::npos; }

KVBudget frac(double f) { return KVBudget{f, 0}; }
KVBudget bytes(std::size_t b) { return KVBudget{1.0, b}; }

// Projections with their own flat buffers.
struct Proj {
  std::vector<float> p, g;
  std::unique_ptr<RckvProjections> r;
  Proj(const ModelConfig& m, const RckvConfig& c) {
    const auto n = static_cast<std::size_t>(RckvProjections::num_parameters(m, c));
    p.assign(n, 0.0f);
    g.assign(n, 0.0f);
    r = std::make_unique<RckvProjections>(m, c);
    r->bind(p.data(), g.data());
  }
};

struct Run {
  std::vector<std::int32_t> seq;
  std::vector<float> logits;  // (B, N+T, V)
};

// Prefill seq[:, :N] (in `chunks` extend() calls), then T one-token steps:
// greedy unless `forced` (then seq holds the whole (B, N+T) sequence).
Run run_policy(Transformer& m, KVPolicy& pol, const std::vector<std::int32_t>& seq_in, std::int64_t B, std::int64_t N,
               std::int64_t T, bool forced, std::int64_t chunks = 1, const KVBudget& budget = frac(1.0)) {
  const std::int64_t V = m.config().vocab, L = N + T, in_stride = forced ? L : N;
  Run r;
  r.seq.assign(static_cast<std::size_t>(B * L), 0);
  r.logits.assign(static_cast<std::size_t>(B * L * V), 0.0f);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < N; ++t)
      r.seq[static_cast<std::size_t>(b * L + t)] = seq_in[static_cast<std::size_t>(b * in_stride + t)];
  pol.begin(SequenceInfo{B, N, 2, T}, budget);
  std::int64_t done = 0;
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t n = c + 1 == chunks ? N - done : N / chunks;
    std::vector<std::int32_t> tok(static_cast<std::size_t>(B * n)), pos(static_cast<std::size_t>(B * n));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < n; ++t) {
        tok[static_cast<std::size_t>(b * n + t)] = r.seq[static_cast<std::size_t>(b * L + done + t)];
        pos[static_cast<std::size_t>(b * n + t)] = static_cast<std::int32_t>(done + t);
      }
    m.extend(pol, TensorView(tok.data(), Shape{B, n}), TensorView(pos.data(), Shape{B, n}));
    const float* lg = m.logits().ptr<float>();
    for (std::int64_t b = 0; b < B; ++b)
      std::copy(lg + b * n * V, lg + (b + 1) * n * V, r.logits.begin() + (b * L + done) * V);
    done += n;
  }
  pol.end_prefill();
  for (std::int64_t s = 0; s < T; ++s) {
    const std::int64_t p = N + s;
    std::vector<std::int32_t> tok(static_cast<std::size_t>(B)), pos(static_cast<std::size_t>(B), static_cast<std::int32_t>(p));
    for (std::int64_t b = 0; b < B; ++b) {
      if (forced) {
        tok[static_cast<std::size_t>(b)] = seq_in[static_cast<std::size_t>(b * L + p)];
      } else {
        const float* prev = r.logits.data() + (b * L + p - 1) * V;
        tok[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(std::max_element(prev, prev + V) - prev);
      }
      r.seq[static_cast<std::size_t>(b * L + p)] = tok[static_cast<std::size_t>(b)];
    }
    m.extend(pol, TensorView(tok.data(), Shape{B, 1}), TensorView(pos.data(), Shape{B, 1}));
    const float* lg = m.logits().ptr<float>();
    for (std::int64_t b = 0; b < B; ++b) std::copy(lg + b * V, lg + (b + 1) * V, r.logits.begin() + (b * L + p) * V);
  }
  return r;
}

void rope_ref(double* x, std::int64_t HS, std::int64_t p, double theta) {
  const std::int64_t half = HS / 2;
  for (std::int64_t i = 0; i < half; ++i) {
    const double ang = static_cast<double>(p) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(HS));
    const double c = std::cos(ang), s = std::sin(ang), x0 = x[i], x1 = x[i + half];
    x[i] = x0 * c - x1 * s;
    x[i + half] = x1 * c + x0 * s;
  }
}

// y = U P x (C), in double.
std::vector<double> recon(const float* P, const float* U, const float* x, std::int64_t C, std::int64_t dc) {
  std::vector<double> z(static_cast<std::size_t>(dc), 0.0), y(static_cast<std::size_t>(C), 0.0);
  for (std::int64_t i = 0; i < dc; ++i)
    for (std::int64_t c = 0; c < C; ++c) z[static_cast<std::size_t>(i)] += static_cast<double>(P[i * C + c]) * x[c];
  for (std::int64_t c = 0; c < C; ++c)
    for (std::int64_t i = 0; i < dc; ++i) y[static_cast<std::size_t>(c)] += static_cast<double>(U[c * dc + i]) * z[static_cast<std::size_t>(i)];
  return y;
}

}  // namespace

// ---- (a) identity with the full cache -------------------------------------------

BOOST_AUTO_TEST_CASE(identity_with_full_cache) {
  const ModelConfig cfg = tiny_cfg();
  auto m = random_model(cfg, 21);
  const std::int64_t B = 2, N = 27, T = 9;
  auto seq = rand_tokens(B * (N + T), cfg.vocab, 3);
  std::vector<std::int32_t> prompt(static_cast<std::size_t>(B * N));
  for (std::int64_t b = 0; b < B; ++b) std::copy_n(seq.begin() + b * (N + T), N, prompt.begin() + b * N);
  auto full = make_kv_policy("full", cfg, cpu_backend());
  const Run ff = run_policy(*m, *full, seq, B, N, T, true);
  const Run fg = run_policy(*m, *full, prompt, B, N, T, false);
  for (bool pca : {false, true})
    for (std::int64_t window : {0, 5}) {
      RckvConfig rc;
      rc.d_c = cfg.d_model;
      rc.buffer = N + T;
      rc.window = window;
      Proj pr(cfg, rc);
      if (pca) {
        for (std::int64_t l = 0; l < cfg.n_layers; ++l) {
          auto k = rand_floats(50 * cfg.d_model, 100 + static_cast<std::uint64_t>(l));
          auto v = rand_floats(50 * cfg.d_model, 200 + static_cast<std::uint64_t>(l));
          pr.r->init_pca(l, TensorView(k.data(), Shape{50, cfg.d_model}), TensorView(v.data(), Shape{50, cfg.d_model}));
        }
      } else {
        pr.r->init_orthonormal(7);
      }
      RckvPolicy pol(cfg, cpu_backend(), *pr.r, rc);
      for (std::int64_t chunks : {1, 3}) {
        BOOST_TEST_INFO("pca=" << pca << " window=" << window << " chunks=" << chunks);
        const Run rf = run_policy(*m, pol, seq, B, N, T, true, chunks);
        // Tolerance: full path 2 x (5C + HS + 2T + F) + 2C = 672 u (C 32, HS 8,
        // T 36, F 64, 2 layers); the RCKV path adds K and V through P then U
        // (C + d_c = 64 per layer each: 256) and the f32 basis' departure from
        // U P = I (<= C u per layer: 64): 992 u; sum 1664 u = 9.9e-5, kappa 1:
        // no room under the old 1e-4 -> 2e-4.
        BOOST_TEST(rel_err(rf.logits, ff.logits) <= 2e-4);
        const Run rg = run_policy(*m, pol, prompt, B, N, T, false, chunks);
        BOOST_TEST(rg.seq == fg.seq);
        BOOST_TEST(rel_err(rg.logits, fg.logits) <= 2e-4);  // as above
        BOOST_TEST(pol.filled_slots(0) == N + T - window);
        BOOST_TEST(pol.window_tokens(1) == window);
        BOOST_TEST(pol.attended_tokens() > 0.0);
      }
    }
}

// ---- the latent path and the importance against a brute-force reference ---------

// One layer fed random pre-RoPE q, k, v in calls of `call` tokens. Reference in
// double: token j before the current call is compressed iff j < t0 - W (no
// eviction: buffer large), its key RoPE(U_k P_k k_j, j), its value (U_v P_v v_j);
// other tokens exact; one softmax. Importance EMA and initial mean as documented.
BOOST_AUTO_TEST_CASE(latent_attention_matches_reference) {
  ModelConfig cfg = tiny_cfg(1);
  const std::int64_t NH = cfg.n_heads, HS = cfg.head_size(), C = cfg.d_model;
  for (std::int64_t W : {0, 3})
    for (std::int64_t B : {1, 2}) {
      RckvConfig rc;
      rc.d_c = 6;
      rc.buffer = 64;
      rc.window = W;
      rc.importance_decay = 0.7;
      Proj pr(cfg, rc);
      pr.r->init_orthonormal(3);
      // Perturb U so it is no longer P^T (learned freely).
      Rng prng(5, 1);
      for (float* U : {pr.r->uk(0), pr.r->uv(0)})
        for (std::int64_t i = 0; i < C * rc.d_c; ++i) U[i] += static_cast<float>(0.2 * prng.normal());
      RckvPolicy pol(cfg, cpu_backend(), *pr.r, rc);
      const std::vector<std::int64_t> calls = {5, 1, 4, 1, 1, 7, 1};
      std::int64_t total = 0;
      for (auto c : calls) total += c;
      pol.begin(SequenceInfo{B, total, 0, 0}, frac(1.0));
      auto Q = rand_floats(B * total * C, 31), K = rand_floats(B * total * C, 32), Vv = rand_floats(B * total * C, 33);
      const float* uk = pr.r->uk(0);
      const float* pk = pr.r->pk(0);
      const float* uv = pr.r->uv(0);
      const float* pv = pr.r->pv(0);
      std::vector<std::vector<double>> w_ref(static_cast<std::size_t>(B));
      std::int64_t t0 = 0;
      double worst = 0, worst_w = 0;
      for (std::int64_t c : calls) {
        std::vector<float> q(static_cast<std::size_t>(B * c * C)), k(q.size()), v(q.size()), o(q.size());
        std::vector<std::int32_t> pos(static_cast<std::size_t>(B * c));
        for (std::int64_t b = 0; b < B; ++b)
          for (std::int64_t i = 0; i < c; ++i) {
            const std::size_t src = static_cast<std::size_t>((b * total + t0 + i) * C), dst = static_cast<std::size_t>((b * c + i) * C);
            std::copy_n(Q.begin() + static_cast<std::ptrdiff_t>(src), C, q.begin() + static_cast<std::ptrdiff_t>(dst));
            std::copy_n(K.begin() + static_cast<std::ptrdiff_t>(src), C, k.begin() + static_cast<std::ptrdiff_t>(dst));
            std::copy_n(Vv.begin() + static_cast<std::ptrdiff_t>(src), C, v.begin() + static_cast<std::ptrdiff_t>(dst));
            pos[static_cast<std::size_t>(b * c + i)] = static_cast<std::int32_t>(t0 + i);
          }
        const Shape s{B, c, NH, HS};
        pol.attend(0, TensorView(q.data(), s), TensorView(k.data(), s), TensorView(v.data(), s),
                   TensorView(pos.data(), Shape{B, c}), TensorView(o.data(), s));
        const std::int64_t ncomp = std::max<std::int64_t>(0, t0 - W);  // compressed tokens 0..ncomp-1
        for (std::int64_t b = 0; b < B; ++b) {
          auto& wr = w_ref[static_cast<std::size_t>(b)];
          std::vector<double> mass(static_cast<std::size_t>(ncomp * c), 0.0);
          for (std::int64_t i = 0; i < c; ++i) {
            const std::int64_t t = t0 + i;
            const float* qt = Q.data() + (b * total + t) * C;
            for (std::int64_t h = 0; h < NH; ++h) {
              std::vector<double> qq(qt + h * HS, qt + (h + 1) * HS);
              rope_ref(qq.data(), HS, t, cfg.rope_theta);
              std::vector<double> sc, val;
              for (std::int64_t j = 0; j <= t; ++j) {
                const float* kj = K.data() + (b * total + j) * C;
                const float* vj = Vv.data() + (b * total + j) * C;
                std::vector<double> kk, vv;
                if (j < ncomp) {
                  kk = recon(pk, uk, kj, C, rc.d_c);
                  vv = recon(pv, uv, vj, C, rc.d_c);
                } else {
                  kk.assign(kj, kj + C);
                  vv.assign(vj, vj + C);
                }
                rope_ref(kk.data() + h * HS, HS, j, cfg.rope_theta);
                double d = 0;
                for (std::int64_t e = 0; e < HS; ++e) d += qq[static_cast<std::size_t>(e)] * kk[static_cast<std::size_t>(h * HS + e)];
                sc.push_back(d / std::sqrt(static_cast<double>(HS)));
                val.insert(val.end(), vv.begin() + h * HS, vv.begin() + (h + 1) * HS);
              }
              const double mx = *std::max_element(sc.begin(), sc.end());
              double z = 0;
              for (auto& x : sc) z += (x = std::exp(x - mx));
              for (std::int64_t e = 0; e < HS; ++e) {
                double acc = 0;
                for (std::size_t j = 0; j < sc.size(); ++j) acc += sc[j] / z * val[j * static_cast<std::size_t>(HS) + static_cast<std::size_t>(e)];
                const double got = o[static_cast<std::size_t>(((b * c + i) * NH + h) * HS + e)];
                worst = std::max(worst, std::abs(got - acc) / (1.0 + std::abs(acc)));
              }
              for (std::int64_t j = 0; j < ncomp; ++j)
                mass[static_cast<std::size_t>(i * ncomp + j)] += sc[static_cast<std::size_t>(j)] / z / static_cast<double>(NH);
            }
          }
          // Importance EMA over the call's queries, then the pushed tokens enter with the mean.
          for (std::int64_t i = 0; i < c; ++i)
            for (std::int64_t j = 0; j < ncomp; ++j)
              wr[static_cast<std::size_t>(j)] = rc.importance_decay * wr[static_cast<std::size_t>(j)] +
                                                (1 - rc.importance_decay) * mass[static_cast<std::size_t>(i * ncomp + j)];
          const std::int64_t ncomp_after = std::max<std::int64_t>(0, t0 + c - W);
          // A multi-token call's own tokens enter with the attention mass they
          // received in the call: dense softmax over the exact keys (window and
          // call, j >= ncomp), mean over heads, query i weighted (1-d) d^(c-1-i).
          std::vector<double> newm(static_cast<std::size_t>(c), 0.0);
          if (c > 1)
            for (std::int64_t i = 0; i < c; ++i) {
              const std::int64_t t = t0 + i;
              const double wi = (1 - rc.importance_decay) * std::pow(rc.importance_decay, static_cast<double>(c - 1 - i));
              const float* qt = Q.data() + (b * total + t) * C;
              for (std::int64_t h = 0; h < NH; ++h) {
                std::vector<double> qq(qt + h * HS, qt + (h + 1) * HS);
                rope_ref(qq.data(), HS, t, cfg.rope_theta);
                std::vector<double> sc;
                for (std::int64_t j = ncomp; j <= t; ++j) {
                  const float* kj = K.data() + (b * total + j) * C;
                  std::vector<double> kk(kj + h * HS, kj + (h + 1) * HS);
                  rope_ref(kk.data(), HS, j, cfg.rope_theta);
                  double d = 0;
                  for (std::int64_t e = 0; e < HS; ++e) d += qq[static_cast<std::size_t>(e)] * kk[static_cast<std::size_t>(e)];
                  sc.push_back(d / std::sqrt(static_cast<double>(HS)));
                }
                const double mx = *std::max_element(sc.begin(), sc.end());
                double z = 0;
                for (auto& x : sc) z += (x = std::exp(x - mx));
                for (std::int64_t jj = 0; jj <= i; ++jj)
                  newm[static_cast<std::size_t>(jj)] += wi * sc[static_cast<std::size_t>(t0 + jj - ncomp)] / z / NH;
              }
            }
          for (std::int64_t j = ncomp; j < ncomp_after; ++j) {
            if (c > 1 && j >= t0) {
              wr.push_back(newm[static_cast<std::size_t>(j - t0)]);
              continue;
            }
            double mean = 0;
            for (double x : wr) mean += x;
            wr.push_back(wr.empty() ? 0.0 : mean / static_cast<double>(wr.size()));
          }
          const auto got_w = pol.slot_importance(0, b);
          const auto got_p = pol.slot_positions(0, b);
          BOOST_REQUIRE_EQUAL(pol.filled_slots(0), ncomp_after);
          for (std::int64_t j = 0; j < ncomp_after; ++j) {
            BOOST_TEST(got_p[static_cast<std::size_t>(j)] == j);
            worst_w = std::max(worst_w, std::abs(got_w[static_cast<std::size_t>(j)] - wr[static_cast<std::size_t>(j)]));
          }
        }
        t0 += c;
      }
      BOOST_TEST_INFO("W=" << W << " B=" << B);
      // vs the double reference, |err| / (1 + |o|): P k (C = 32), U z (d_c = 6),
      // RoPE 2, scores 8, expf 2, softmax and P V over <= 20 keys: 90 u =
      // 5.4e-6 <= 2e-5 (kept). Importance: masses carry <= 70 u = 4.2e-6 (the
      // chain up to the softmax); the EMA contracts old errors by 0.7 and adds
      // 0.3 x that + 2 u per call (<= 4.2e-6 + 7 u), a new slot's mean of <= 20
      // values adds 20 u: <= 5.8e-6 <= 1e-5 (kept).
      BOOST_TEST(worst <= 2e-5);
      BOOST_TEST(worst_w <= 1e-5);
    }
}

// ---- (b) compression loss, gradient, PCA ------------------------------------------

BOOST_AUTO_TEST_CASE(compression_loss_value_and_gradient) {
  ModelConfig cfg = tiny_cfg(2);
  cfg.d_model = 8;
  cfg.n_heads = 2;
  RckvConfig rc;
  rc.d_c = 3;
  Proj pr(cfg, rc);
  Rng rng(4, 2);
  for (auto& x : pr.p) x = static_cast<float>(0.5 * rng.normal());
  const std::int64_t N = 10, C = 8, dc = 3, layer = 1;
  auto k = rand_floats(N * C, 41), v = rand_floats(N * C, 42);
  const TensorView kt(k.data(), Shape{N, C}), vt(v.data(), Shape{N, C});
  // Value against a direct evaluation.
  double want = 0;
  for (std::int64_t n = 0; n < N; ++n) {
    const auto yk = recon(pr.r->pk(layer), pr.r->uk(layer), k.data() + n * C, C, dc);
    const auto yv = recon(pr.r->pv(layer), pr.r->uv(layer), v.data() + n * C, C, dc);
    for (std::int64_t c = 0; c < C; ++c) {
      want += std::pow(yk[static_cast<std::size_t>(c)] - k[static_cast<std::size_t>(n * C + c)], 2);
      want += std::pow(yv[static_cast<std::size_t>(c)] - v[static_cast<std::size_t>(n * C + c)], 2);
    }
  }
  want /= static_cast<double>(N * C);
  const double got = pr.r->compression_loss(layer, kt, vt);
  BOOST_TEST(std::abs(got - want) <= 1e-12 * want);
  std::fill(pr.g.begin(), pr.g.end(), 0.0f);
  pr.r->compression_loss_backward(2.0);
  // Finite differences (the loss is quadratic in each single parameter, so the
  // central difference is exact up to rounding).
  double worst = 0;
  const std::int64_t per_layer = 4 * dc * C;
  for (std::int64_t i = 0; i < RckvProjections::num_parameters(cfg, rc); ++i) {
    float& p = pr.p[static_cast<std::size_t>(i)];
    const float p0 = p;
    p = p0 + 1e-2f;
    const float hi = p;
    const double lp = pr.r->compression_loss(layer, kt, vt);
    p = p0 - 1e-2f;
    const float lo = p;
    const double lm = pr.r->compression_loss(layer, kt, vt);
    p = p0;
    const double fd = 2.0 * (lp - lm) / (static_cast<double>(hi) - lo);
    const double g = pr.g[static_cast<std::size_t>(i)];
    if (i / per_layer != layer) BOOST_TEST(g == 0.0);  // other layers untouched
    worst = std::max(worst, std::abs(g - fd) / (1e-3 + std::abs(fd)));
  }
  BOOST_TEST(worst <= 1e-4);
  // Param list.
  const auto ps = pr.r->params();
  BOOST_REQUIRE_EQUAL(ps.size(), 8u);
  BOOST_TEST(ps[5].name == "rckv.1.pv");
  BOOST_TEST(ps[6].name == "rckv.1.uk");
  BOOST_TEST(!ps[6].decay);
  BOOST_TEST((ps[6].value.shape == Shape{C, dc}));
  BOOST_TEST((ps[0].value.shape == Shape{dc, C}));
  BOOST_TEST(ps[7].grad.ptr<float>() == pr.g.data() + 7 * dc * C);
}

BOOST_AUTO_TEST_CASE(pca_init) {
  ModelConfig cfg = tiny_cfg(1);
  cfg.d_model = 16;
  cfg.n_heads = 2;
  const std::int64_t C = 16, N = 400;
  // Correlated data: rank-3 signal plus small noise, with distinct scales.
  Rng rng(8, 1);
  std::vector<double> A(static_cast<std::size_t>(C * 3));
  for (auto& a : A) a = rng.normal();
  std::vector<float> x(static_cast<std::size_t>(N * C)), y(x.size());
  for (std::int64_t n = 0; n < N; ++n) {
    const double z[3] = {3 * rng.normal(), 2 * rng.normal(), 1 * rng.normal()};
    for (std::int64_t c = 0; c < C; ++c) {
      double s = 0.05 * rng.normal();
      for (int r = 0; r < 3; ++r) s += A[static_cast<std::size_t>(c * 3 + r)] * z[r];
      x[static_cast<std::size_t>(n * C + c)] = static_cast<float>(s);
      y[static_cast<std::size_t>(n * C + c)] = static_cast<float>(0.5 * s + 0.05 * rng.normal());
    }
  }
  const TensorView xt(x.data(), Shape{N, C}), yt(y.data(), Shape{N, C});
  RckvConfig rc;
  rc.d_c = 3;
  Proj pca(cfg, rc), orth(cfg, rc);
  pca.r->init_pca(0, xt, yt);
  orth.r->init_orthonormal(1);
  const double lp = pca.r->compression_loss(0, xt, yt), lo = orth.r->compression_loss(0, xt, yt);
  BOOST_TEST_MESSAGE("PCA loss " << lp << ", random orthonormal loss " << lo);
  BOOST_TEST(lp < 0.05 * lo);
  BOOST_TEST(lp < 0.01);
  // Rows orthonormal, U = P^T.
  const float* P = pca.r->pk(0);
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t j = 0; j < 3; ++j) {
      double d = 0;
      for (std::int64_t c = 0; c < C; ++c) d += static_cast<double>(P[i * C + c]) * P[j * C + c];
      BOOST_TEST(std::abs(d - (i == j ? 1.0 : 0.0)) <= 1e-6);
    }
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t c = 0; c < C; ++c) BOOST_TEST(pca.r->uk(0)[c * 3 + i] == P[i * C + c]);
  // d_c = C: exact reconstruction, zero loss, for both inits.
  RckvConfig full = rc;
  full.d_c = C;
  Proj fp(cfg, full), fo(cfg, full);
  fp.r->init_pca(0, xt, yt);
  fo.r->init_orthonormal(2);
  BOOST_TEST(fp.r->compression_loss(0, xt, yt) <= 1e-10);
  BOOST_TEST(fo.r->compression_loss(0, xt, yt) <= 1e-10);
  double worst = 0;
  for (std::int64_t n = 0; n < 20; ++n) {
    const auto r = recon(fp.r->pk(0), fp.r->uk(0), x.data() + n * C, C, C);
    for (std::int64_t c = 0; c < C; ++c)
      worst = std::max(worst, std::abs(r[static_cast<std::size_t>(c)] - x[static_cast<std::size_t>(n * C + c)]));
  }
  // |x| ~ 10; recon() is double, so only the f32 basis counts: U P - I has
  // entries <= ~C u (rounding + eigensolver), |r - x| <= C u max|x| ... ~ 32 u x
  // 10 x (a few) ~ 2e-5 worst case, but the errors are of random sign: sqrt(C)
  // u x ||x||_2 ~ 6e-6 <= 1e-5 (kept; a wrong basis gives O(1)).
  BOOST_TEST(worst <= 1e-5);
  // A loss-gradient step from PCA does not find an immediate descent direction.
  std::fill(pca.g.begin(), pca.g.end(), 0.0f);
  pca.r->compression_loss(0, xt, yt);
  pca.r->compression_loss_backward(1.0);
  double gn = 0;
  for (float g : pca.g) gn += static_cast<double>(g) * g;
  std::fill(orth.g.begin(), orth.g.end(), 0.0f);
  orth.r->compression_loss(0, xt, yt);
  orth.r->compression_loss_backward(1.0);
  double gno = 0;
  for (float g : orth.g) gno += static_cast<double>(g) * g;
  BOOST_TEST(std::sqrt(gn) < 0.05 * std::sqrt(gno));
}

// ---- (c) streaming: constant memory ---------------------------------------------------

BOOST_AUTO_TEST_CASE(streaming_constant_memory) {
  ModelConfig cfg;
  cfg.vocab = 40;
  cfg.d_model = 16;
  cfg.n_heads = 2;
  cfg.n_layers = 1;
  cfg.d_ff = 32;
  cfg.max_pos = 100000 + 16;
  auto m = random_model(cfg, 77);
  RckvConfig rc;
  rc.d_c = 4;
  rc.buffer = 128;
  rc.window = 8;
  Proj pr(cfg, rc);
  pr.r->init_orthonormal(9);
  RckvPolicy pol(cfg, cpu_backend(), *pr.r, rc);
  const std::int64_t total = 100000, chunk = 256;
  pol.begin(SequenceInfo{1, total, 0, 0}, frac(1.0));
  const std::size_t arena0 = pol.kv_bytes_allocated();
  BOOST_TEST(arena0 > 0u);
  auto tokens = rand_tokens(total, cfg.vocab, 5);
  std::size_t resident_full = 0;
  std::int64_t done = 0;
  bool finite = true;
  while (done < total) {
    const std::int64_t n = std::min(chunk, total - done);
    std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(done + i);
    m->extend(pol, TensorView(tokens.data() + done, Shape{1, n}), TensorView(pos.data(), Shape{1, n}));
    done += n;
    if (pol.filled_slots(0) == rc.buffer) {
      if (resident_full == 0) resident_full = pol.memory().resident_after_prefill;
      const std::size_t r = pol.memory().resident_after_prefill;
      BOOST_REQUIRE(std::abs(static_cast<double>(r) - static_cast<double>(resident_full)) <= 0.01 * resident_full);
      BOOST_REQUIRE(pol.kv_bytes_allocated() == arena0);
    }
    if (done % (chunk * 64) == 0 || done == total) {
      const float* lg = m->logits().ptr<float>();
      for (std::int64_t i = 0; i < n * cfg.vocab; ++i) finite = finite && std::isfinite(lg[i]);
    }
  }
  BOOST_TEST(finite);
  BOOST_TEST(resident_full == arena0);
  BOOST_TEST(pol.filled_slots(0) == rc.buffer);
  BOOST_TEST(pol.window_tokens(0) == rc.window);
  const auto sp = pol.slot_positions(0, 0);
  // A token of the last chunk survives (the newest pushed token may itself be
  // dropped when it is the least important: incoming tokens compete).
  BOOST_TEST(*std::max_element(sp.begin(), sp.end()) >= total - chunk - rc.window);
  BOOST_TEST(*std::min_element(sp.begin(), sp.end()) >= 0);
  pol.end_prefill();
  BOOST_TEST(pol.memory().resident_after_prefill == arena0);
  BOOST_TEST(pol.memory().peak_prefill == arena0 + pol.scratch_peak_bytes());  // scratch counted
  BOOST_TEST(pol.memory().total == arena0);
}

// ---- (d) eviction -----------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(eviction_rule) {
  Rng rng(1, 0);
  // tau = 0: argmin; equal minima: each drawn about equally often (a fixed
  // "lowest slot" rule would always evict the oldest token).
  const std::vector<float> w = {0.5f, 0.2f, 0.9f, 0.2f, 0.3f};
  int tie[5] = {0, 0, 0, 0, 0};
  for (int d = 0; d < 4000; ++d) ++tie[RckvPolicy::choose_victim(w.data(), 5, 0.0, rng)];
  BOOST_TEST(tie[0] + tie[2] + tie[4] == 0);
  BOOST_TEST(std::abs(tie[1] - 2000) <= 200);  // binomial sd ~32: a 6-sigma band
  const std::vector<float> w1 = {0.5f, 0.1f, 0.9f, 0.2f, 0.3f};
  BOOST_TEST(RckvPolicy::choose_victim(w1.data(), 5, 0.0, rng) == 1);
  // tau > 0: P(i) ~ exp(-w_i / tau).
  const std::vector<float> w2 = {0.0f, 0.5f, 1.0f, 2.0f};
  const double tau = 0.5;
  std::vector<double> p(4);
  double z = 0;
  for (std::size_t i = 0; i < 4; ++i) z += (p[i] = std::exp(-w2[i] / tau));
  std::vector<int> count(4, 0);
  const int draws = 200000;
  for (int d = 0; d < draws; ++d) ++count[static_cast<std::size_t>(RckvPolicy::choose_victim(w2.data(), 4, tau, rng))];
  for (std::size_t i = 0; i < 4; ++i) BOOST_TEST(std::abs(count[i] / double(draws) - p[i] / z) <= 0.01);
  // Very small tau behaves like argmin.
  BOOST_TEST(RckvPolicy::choose_victim(w2.data(), 4, 1e-6, rng) == 0);
}

BOOST_AUTO_TEST_CASE(eviction_in_policy) {
  const ModelConfig cfg = tiny_cfg(1);
  auto m = random_model(cfg, 4);
  RckvConfig rc;
  rc.d_c = 8;
  rc.buffer = 6;
  rc.window = 2;
  Proj pr(cfg, rc);
  pr.r->init_orthonormal(1);
  RckvPolicy pol(cfg, cpu_backend(), *pr.r, rc);
  const std::int64_t N = 8, B = 2;
  auto tok = rand_tokens(B * (N + 4), cfg.vocab, 2);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(B * N));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < N; ++t) pos[static_cast<std::size_t>(b * N + t)] = static_cast<std::int32_t>(t);
  pol.begin(SequenceInfo{B, N, 0, 4}, frac(1.0));
  m->extend(pol, TensorView(tok.data(), Shape{B, N}), TensorView(pos.data(), Shape{B, N}));
  pol.end_prefill();
  BOOST_REQUIRE(pol.filled_slots(0) == 6);  // positions 0..5 buffered, 6..7 in the window
  // Known importances (gaps far larger than one step's EMA change, <= 1 - decay).
  pol.set_slot_importance(0, 0, {5.f, 3.f, 0.01f, 4.f, 2.f, 6.f});
  pol.set_slot_importance(0, 1, {5.f, 5.f, 5.f, 5.f, 0.f, 5.f});
  std::vector<std::int32_t> t1 = {tok[static_cast<std::size_t>(N)], tok[static_cast<std::size_t>(N + 1)]};
  std::vector<std::int32_t> p1 = {static_cast<std::int32_t>(N), static_cast<std::int32_t>(N)};
  m->extend(pol, TensorView(t1.data(), Shape{B, 1}), TensorView(p1.data(), Shape{B, 1}));
  // Position 6 left the window and replaced the least important slot.
  auto s0 = pol.slot_positions(0, 0), s1 = pol.slot_positions(0, 1);
  BOOST_TEST((s0 == std::vector<std::int32_t>{0, 1, 6, 3, 4, 5}));
  BOOST_TEST((s1 == std::vector<std::int32_t>{0, 1, 2, 3, 6, 5}));
  // The new slot starts at the mean importance of the buffer before the write.
  const auto w0 = pol.slot_importance(0, 0);
  double mean = 0;
  for (std::size_t j = 0; j < 6; ++j)
    if (j != 2) mean += w0[j];
  // The other slots moved by at most (1 - decay); the mean included the victim (~0.009).
  BOOST_TEST(std::abs(w0[2] - (mean + 0.01 * 0.9) / 6.0) <= 0.1 / 6.0 + 1e-6);
  BOOST_TEST(pol.window_tokens(0) == 2);
}

// Eviction by importance, not position, under the DEFAULT settings
// (observe_prefill off): a one-call prompt where an early token receives little
// attention and a later one much, the buffer too small for all: the important
// later token survives, BOS survives while it is important, and the kept set is
// the top-S by the attention mass the prompt gave (read from a run whose buffer
// holds every token). Keys live in the lowest RoPE frequency pair (dims 3, 7 of
// HS = 8: 10000^-0.75 rad per position), so rotation barely moves the scores.
namespace {
struct EvictionRun {
  std::vector<std::int32_t> kept;  // positions in the buffer
  std::vector<float> w;            // their importance
};
EvictionRun run_prompt(const ModelConfig& cfg, const RckvProjections& proj, RckvConfig rc,
                       const std::vector<double>& a) {
  const std::int64_t N = static_cast<std::int64_t>(a.size()), NH = cfg.n_heads, HS = cfg.head_size(),
                     C = cfg.d_model;
  RckvPolicy pol(cfg, cpu_backend(), proj, rc);
  pol.begin(SequenceInfo{1, N, 0, 1}, frac(1.0));
  std::vector<float> q(static_cast<std::size_t>(N * C), 0.f), k(q.size(), 0.f), v(q.size(), 0.f), o(q.size());
  std::vector<std::int32_t> pos(static_cast<std::size_t>(N));
  for (std::int64_t t = 0; t < N; ++t) {
    pos[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t);
    for (std::int64_t h = 0; h < NH; ++h) {
      q[static_cast<std::size_t>(t * C + h * HS + HS / 2 - 1)] = 1.f;
      k[static_cast<std::size_t>(t * C + h * HS + HS / 2 - 1)] = static_cast<float>(a[static_cast<std::size_t>(t)]);
      v[static_cast<std::size_t>(t * C + h * HS)] = static_cast<float>(t);
    }
  }
  const Shape s{1, N, NH, HS};
  pol.attend(0, TensorView(q.data(), s), TensorView(k.data(), s), TensorView(v.data(), s),
             TensorView(pos.data(), Shape{1, N}), TensorView(o.data(), s));
  EvictionRun r;
  const auto p = pol.slot_positions(0, 0);
  const auto w = pol.slot_importance(0, 0);
  for (std::int64_t j = 0; j < pol.filled_slots(0); ++j) {
    r.kept.push_back(p[static_cast<std::size_t>(j)]);
    r.w.push_back(w[static_cast<std::size_t>(j)]);
  }
  return r;
}
std::vector<std::int32_t> top_by_mass(const EvictionRun& all, std::size_t S) {
  std::vector<std::size_t> id(all.kept.size());
  for (std::size_t i = 0; i < id.size(); ++i) id[i] = i;
  std::stable_sort(id.begin(), id.end(), [&](std::size_t x, std::size_t y) { return all.w[x] > all.w[y]; });
  std::vector<std::int32_t> top;
  for (std::size_t i = 0; i < S; ++i) top.push_back(all.kept[id[i]]);
  std::sort(top.begin(), top.end());
  return top;
}
}  // namespace

BOOST_AUTO_TEST_CASE(default_eviction_follows_prefill_attention) {
  const ModelConfig cfg = tiny_cfg(1);
  RckvConfig rc;
  rc.d_c = 8;
  rc.window = 1;
  BOOST_REQUIRE(!rc.observe_prefill);  // the default
  Proj pr(cfg, rc);
  pr.r->init_orthonormal(3);
  // Case 1: BOS (a sink: key 4) and a later token 5 (key 8) attract attention,
  // tokens 1-4 and 6 (key 0) little. Buffer 2 of the 7 pushed tokens (0..6).
  // Case 2: BOS repels (key -6) and the EMA weighs early queries little (decay
  // 0.5): BOS is the least important and must go; token 5 still stays.
  struct Case { std::vector<double> a; double decay; std::size_t S; bool bos_kept; };
  for (const Case& c : {Case{{4, 0, 0, 0, 0, 8, 0, 0}, 0.9, 2, true}, Case{{-6, 0, 0, 0, 0, 8, 0, 0}, 0.5, 5, false}}) {
    BOOST_TEST_CONTEXT("S=" << c.S << " decay=" << c.decay) {
      RckvConfig r = rc;
      r.importance_decay = c.decay;
      r.buffer = 7;
      const EvictionRun all = run_prompt(cfg, *pr.r, r, c.a);
      BOOST_REQUIRE_EQUAL(all.kept.size(), 7u);
      r.buffer = static_cast<std::int64_t>(c.S);
      EvictionRun few = run_prompt(cfg, *pr.r, r, c.a);
      std::sort(few.kept.begin(), few.kept.end());
      const auto want = top_by_mass(all, c.S);
      BOOST_TEST(few.kept == want, "kept " << ::testing_str(few.kept) << " want " << ::testing_str(want));
      BOOST_TEST(std::count(few.kept.begin(), few.kept.end(), 5) == 1);  // the important later token
      BOOST_TEST((std::count(few.kept.begin(), few.kept.end(), 0) == 1) == c.bos_kept);
      const auto bos = std::find(all.kept.begin(), all.kept.end(), 0) - all.kept.begin();
      const bool bos_least = *std::min_element(all.w.begin(), all.w.end()) == all.w[static_cast<std::size_t>(bos)];
      BOOST_TEST(bos_least == !c.bos_kept);
    }
  }
}

// A budget below the fixed window + one slot is infeasible (and reported so);
// a generous one is not.
BOOST_AUTO_TEST_CASE(infeasible_budget) {
  const ModelConfig cfg = tiny_cfg(2);
  RckvConfig rc;
  rc.d_c = 8;
  rc.window = 16;
  rc.buffer = 0;  // derived from the budget
  Proj pr(cfg, rc);
  pr.r->init_orthonormal(1);
  RckvPolicy pol(cfg, cpu_backend(), *pr.r, rc);
  const std::int64_t N = 64, T = 4;
  KVBudget tiny;
  tiny.bytes = static_cast<std::size_t>(cfg.n_layers) * 16 * pol.window_token_bytes();  // the window alone, no slot
  pol.begin(SequenceInfo{1, N, 0, T}, tiny);
  BOOST_TEST(pol.infeasible());
  BOOST_TEST(pol.budget_achieved_bytes() > pol.budget_requested_bytes());
  KVBudget enough;
  enough.bytes = tiny.bytes + static_cast<std::size_t>(cfg.n_layers) * 4 * pol.slot_bytes();
  pol.begin(SequenceInfo{1, N, 0, T}, enough);
  BOOST_TEST(!pol.infeasible());
  BOOST_TEST(pol.budget_achieved_bytes() <= pol.budget_requested_bytes());
}

// observe_prefill: a prompt's tokens start at the attention mass the call's last
// W queries give them, and with a full buffer the least important of the
// residents and the incoming token is the one left out. With tau = 0 the kept
// set is the top-S tokens by that mass: compare with the masses of a run whose
// buffer holds everything (the prompt call's masses do not depend on the buffer).
BOOST_AUTO_TEST_CASE(observation_window_importance) {
  const ModelConfig cfg = tiny_cfg(1);
  auto m = random_model(cfg, 6);
  RckvConfig rc;
  rc.d_c = 8;
  rc.window = 4;
  rc.observe_prefill = true;
  Proj pr(cfg, rc);
  pr.r->init_orthonormal(2);
  const std::int64_t N = 40, B = 2, S = 9;
  auto tok = rand_tokens(B * N, cfg.vocab, 7);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(B * N));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < N; ++t) pos[static_cast<std::size_t>(b * N + t)] = static_cast<std::int32_t>(t);
  auto prefill = [&](std::int64_t slots) {
    RckvConfig c = rc;
    c.buffer = slots;
    auto pol = std::make_unique<RckvPolicy>(cfg, cpu_backend(), *pr.r, c);
    pol->begin(SequenceInfo{B, N, 2, 2}, frac(1.0));
    m->extend(*pol, TensorView(tok.data(), Shape{B, N}), TensorView(pos.data(), Shape{B, N}));
    return pol;
  };
  auto all = prefill(N);
  auto few = prefill(S);
  BOOST_REQUIRE(all->filled_slots(0) == N - rc.window && few->filled_slots(0) == S);
  for (std::int64_t b = 0; b < B; ++b) {
    const auto w = all->slot_importance(0, b);
    const auto p = all->slot_positions(0, b);
    double total = 0;
    for (std::int64_t j = 0; j < N - rc.window; ++j) {
      BOOST_TEST(w[static_cast<std::size_t>(j)] >= 0.0f);
      total += w[static_cast<std::size_t>(j)];
    }
    BOOST_TEST(total > 0.0);
    BOOST_TEST(total <= 1.0 + 1e-5);  // masses of a softmax, minus the window's share
    // The filled slots by importance (w is indexed by slot, not by position;
    // the unfilled slots' positions are -1: indexing w by them read outside it,
    // found by ASan), then their positions.
    std::vector<std::size_t> order(static_cast<std::size_t>(N - rc.window));
    for (std::size_t j = 0; j < order.size(); ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) { return w[x] > w[y]; });
    std::vector<std::int32_t> want, got = few->slot_positions(0, b);
    for (std::int64_t k = 0; k < S; ++k) want.push_back(p[order[static_cast<std::size_t>(k)]]);
    std::sort(want.begin(), want.end());
    std::sort(got.begin(), got.end());
    BOOST_TEST(got == want);
  }
}

// ---- (e) bad input ------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(bad_input) {
  const ModelConfig cfg = tiny_cfg(1);
  auto expect = [&](RckvConfig rc, const std::string& opt) {
    BOOST_TEST_INFO(opt);
    BOOST_CHECK_EXCEPTION(rc.validate(cfg), dsrsq::Error, [&](const dsrsq::Error& e) { return msg_has(e, opt); });
    BOOST_CHECK_EXCEPTION(RckvProjections(cfg, rc), dsrsq::Error, [&](const dsrsq::Error& e) { return msg_has(e, opt); });
  };
  RckvConfig rc;
  rc.d_c = cfg.d_model + 1;
  expect(rc, "rckv_d_c");
  rc.d_c = 0;
  expect(rc, "rckv_d_c");
  rc = RckvConfig{};
  rc.d_c = 8;
  rc.window = -1;
  expect(rc, "rckv_window");
  rc.window = 4;
  rc.tau = -0.5;
  expect(rc, "rckv_tau");
  rc.tau = std::numeric_limits<double>::quiet_NaN();
  expect(rc, "rckv_tau");
  rc.tau = 0;
  rc.importance_decay = 1.0;
  expect(rc, "rckv_importance_decay");
  rc.importance_decay = 0.5;
  rc.sqa = true;
  rc.sqa_cfg.clusters = 0;
  expect(rc, "rckv_sqa_clusters");
  rc.sqa = false;
  BOOST_CHECK_NO_THROW(rc.validate(cfg));
  // Projections that do not match the policy's config.
  Proj pr(cfg, rc);
  RckvConfig other = rc;
  other.d_c = 4;
  BOOST_CHECK_THROW(RckvPolicy(cfg, cpu_backend(), *pr.r, other), dsrsq::Error);
  // Sample shapes.
  std::vector<float> x(10 * 7);
  BOOST_CHECK_THROW(pr.r->compression_loss(0, TensorView(x.data(), Shape{10, 7}), TensorView(x.data(), Shape{10, 7})),
                    dsrsq::Error);
  RckvPolicy pol(cfg, cpu_backend(), *pr.r, rc);
  BOOST_CHECK_THROW(pol.end_prefill(), dsrsq::Error);  // before begin()
}

// ---- (f) budget ------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(budget_accounting) {
  const ModelConfig cfg = tiny_cfg(2);
  auto m = random_model(cfg, 6);
  const std::int64_t B = 2, N = 200, T = 6, L = cfg.n_layers;
  RckvConfig rc;
  rc.d_c = 8;
  rc.buffer = 0;
  rc.window = 4;
  Proj pr(cfg, rc);
  pr.r->init_orthonormal(2);
  RckvPolicy pol(cfg, cpu_backend(), *pr.r, rc);
  auto seq = rand_tokens(B * N, cfg.vocab, 8);
  // Latents + importance; window K and V. Positions count for no policy (one byte rule).
  const std::size_t slot = 2 * 8 * 4 + 4, wtok = 2 * 32 * 4;
  BOOST_TEST(pol.slot_bytes() == slot);
  BOOST_TEST(pol.window_token_bytes() == wtok);
  for (const KVBudget& bud : {frac(0.1), frac(0.25), bytes(20000), frac(1.0)}) {
    const Run r = run_policy(*m, pol, seq, B, N, T, false, 2, bud);
    const std::size_t req = bud.resolve(cfg, N + T);
    BOOST_TEST(pol.budget_requested_bytes() == req);
    const auto want_slots = std::min<std::int64_t>(
        std::max<std::int64_t>(1, static_cast<std::int64_t>((req - L * 4 * wtok) / (L * slot))), N + T - 4);
    BOOST_TEST(pol.slots() == want_slots);
    BOOST_TEST(pol.budget_achieved_bytes() == static_cast<std::size_t>(L) * (pol.slots() * slot + 4 * wtok));
    BOOST_TEST(pol.budget_achieved_bytes() <= req);
    const KVMemory mem = pol.memory();
    BOOST_TEST(mem.resident_after_prefill == pol.kv_bytes_allocated());
    BOOST_TEST(mem.total == mem.resident_after_prefill);
    // Strict bytes: the prefill scratch (every key the prompt's queries saw) is
    // counted in the peak, on top of the resident arena.
    BOOST_TEST(mem.peak_prefill > mem.resident_after_prefill);
    BOOST_TEST(mem.peak_prefill <= mem.resident_after_prefill + pol.scratch_peak_bytes());
    BOOST_TEST(!pol.infeasible());
    BOOST_TEST(pol.kv_bytes_allocated() >= B * pol.budget_achieved_bytes());
    BOOST_TEST(pol.kv_bytes_allocated() < B * pol.budget_achieved_bytes() + 128);
    BOOST_TEST(mem.read_per_step > 0u);
    BOOST_TEST(all_finite(r.logits));
  }
  // Infeasible: the window alone exceeds the budget -> one slot, achieved > requested.
  rc.window = 64;
  RckvPolicy big(cfg, cpu_backend(), *pr.r, rc);
  big.begin(SequenceInfo{1, N, 0, T}, bytes(1000));
  BOOST_TEST(big.slots() == 1);
  BOOST_TEST(big.budget_achieved_bytes() > big.budget_requested_bytes());
  // Explicit buffer wins over the budget.
  rc.buffer = 17;
  RckvPolicy fixed(cfg, cpu_backend(), *pr.r, rc);
  fixed.begin(SequenceInfo{1, N, 0, T}, frac(0.1));
  BOOST_TEST(fixed.slots() == 17);
  // ... and a buffer the budget cannot pay for makes the cell infeasible too.
  BOOST_TEST((fixed.budget_achieved_bytes() > fixed.budget_requested_bytes()) == fixed.infeasible());
  rc.buffer = 1000;
  RckvPolicy huge(cfg, cpu_backend(), *pr.r, rc);
  huge.begin(SequenceInfo{1, N, 0, T}, frac(0.1));
  BOOST_TEST(huge.budget_achieved_bytes() > huge.budget_requested_bytes());
  BOOST_TEST(huge.infeasible());
}

// ---- (g) SQA over the buffer ---------------------------------------------------------------

BOOST_AUTO_TEST_CASE(sqa_all_clusters_equals_dense) {
  const ModelConfig cfg = tiny_cfg(2);
  auto m = random_model(cfg, 13);
  const std::int64_t B = 2, N = 60, T = 12;
  auto seq = rand_tokens(B * (N + T), cfg.vocab, 17);
  RckvConfig rc;
  rc.d_c = 12;
  rc.buffer = 40;  // evictions during prefill (chunks) and decode
  rc.window = 4;
  rc.tau = 0.05;
  Proj pr(cfg, rc);
  pr.r->init_orthonormal(4);
  RckvPolicy dense(cfg, cpu_backend(), *pr.r, rc);
  const Run rd = run_policy(*m, dense, seq, B, N, T, true, 3);
  BOOST_TEST(all_finite(rd.logits));
  RckvConfig sq = rc;
  sq.sqa = true;
  sq.sqa_cfg.clusters = 5;
  sq.sqa_cfg.top_clusters = 5;
  RckvPolicy all(cfg, cpu_backend(), *pr.r, sq);
  const Run ra = run_policy(*m, all, seq, B, N, T, true, 3);
  BOOST_TEST(all.sqa_active());
  // SQA with every cluster is dense attention in another order (per-cluster
  // partials merged online). Once a bit differs every later op rounds
  // independently, so each path carries the chain of identity_with_full_cache
  // with T = N + T = 72 keys (2 x (5C + HS + 2T + F) + 2C + 320 = 1136 u),
  // plus 5 cluster merges (15 u): 2 x 1151 u = 1.4e-4 (kappa 1); the old 1e-6
  // (17 u) was below it -> 2e-4. Top-1 (below) must differ at all.
  BOOST_TEST(rel_err(ra.logits, rd.logits) <= 2e-4);
  BOOST_TEST(std::abs(all.attended_tokens() - dense.attended_tokens()) <= 1e-9);
  sq.sqa_cfg.top_clusters = 1;
  RckvPolicy few(cfg, cpu_backend(), *pr.r, sq);
  const Run rf = run_policy(*m, few, seq, B, N, T, true, 3);
  BOOST_TEST(all_finite(rf.logits));
  BOOST_TEST(few.attended_tokens() < dense.attended_tokens());
  BOOST_TEST_MESSAGE("attended keys per decode query: dense " << dense.attended_tokens() << ", SQA top-1 of 5 "
                                                             << few.attended_tokens());
  // SQA also acts within a multi-token (prefill) call: top-1 changes the prefill logits.
  const std::int64_t V = cfg.vocab;
  double diff = 0;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < N * V; ++i)
      diff = std::max(diff, std::abs(double(rf.logits[static_cast<std::size_t>(b * (N + T) * V + i)]) -
                                     rd.logits[static_cast<std::size_t>(b * (N + T) * V + i)]));
  BOOST_TEST(diff > 0.0);
  // SQA state is allocated and counted.
  BOOST_TEST(few.budget_achieved_bytes() > dense.budget_achieved_bytes());
  BOOST_TEST(few.memory().resident_after_prefill == few.kv_bytes_allocated());
}

// begin() starts clean: the same run twice gives the same logits (eviction sampling reseeded).
BOOST_AUTO_TEST_CASE(begin_restarts_clean) {
  const ModelConfig cfg = tiny_cfg(1);
  auto m = random_model(cfg, 2);
  RckvConfig rc;
  rc.d_c = 6;
  rc.buffer = 10;
  rc.window = 3;
  rc.tau = 0.5;
  Proj pr(cfg, rc);
  pr.r->init_orthonormal(3);
  RckvPolicy pol(cfg, cpu_backend(), *pr.r, rc);
  auto seq = rand_tokens(40, cfg.vocab, 4);
  const Run a = run_policy(*m, pol, seq, 1, 30, 10, true, 5);
  const Run b = run_policy(*m, pol, seq, 1, 30, 10, true, 5);
  BOOST_TEST(a.logits == b.logits);
}

// The reuse protocol: snapshot after the context (buffers, window, importance,
// SQA index, positions, RNG state, statistics), every question from a restore
// equals a fresh prefill of context + question, bitwise, memory figures too.
BOOST_AUTO_TEST_CASE(snapshot_restore_equals_fresh_prefill) {
  const ModelConfig cfg = tiny_cfg(2);
  auto m = random_model(cfg, 21);
  struct Case {
    const char* what;
    std::int64_t buffer, window;
    double tau, budget;
    bool sqa, observe;
  };
  for (const Case c : {Case{"sampled eviction", 12, 3, 0.5, 1.0, false, false},
                       Case{"sqa top-1", 14, 4, 0.0, 1.0, true, false},
                       Case{"budget-derived buffer, observation window", 0, 4, 0.0, 0.5, false, true}})
    for (const std::int64_t B : {1, 2}) {
      BOOST_TEST_CONTEXT(c.what << ", batch " << B) {
        RckvConfig rc;
        rc.d_c = 8;
        rc.buffer = c.buffer;
        rc.window = c.window;
        rc.tau = c.tau;
        rc.sqa = c.sqa;
        rc.sqa_cfg.clusters = 3;
        rc.sqa_cfg.top_clusters = 1;
        rc.observe_prefill = c.observe;
        Proj pr(cfg, rc);
        pr.r->init_orthonormal(5);
        const auto ctx = rand_tokens(B * 36, cfg.vocab, 22), q1 = rand_tokens(B * 5, cfg.vocab, 23),
                   q2 = rand_tokens(B * 7, cfg.vocab, 24);
        testing::check_snapshot_reuse(
            *m, [&] { return std::make_unique<RckvPolicy>(cfg, cpu_backend(), *pr.r, rc); }, frac(c.budget), B, ctx,
            q1, q2, 8, 3);
      }
    }
}

// The eigen-solver behind init_pca: LAPACK (when linked) and the Jacobi fallback.
BOOST_AUTO_TEST_CASE(symmetric_eigen_solvers) {
  BOOST_TEST_MESSAGE("LAPACK dsyevd available: " << compress::detail::lapack_eigen_available());
  const std::int64_t n = 24;
  Rng rng(3, 3);
  std::vector<double> g(static_cast<std::size_t>(n * n)), a(static_cast<std::size_t>(n * n), 0.0);
  for (auto& x : g) x = rng.normal();
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t k = 0; k < n; ++k)
        a[static_cast<std::size_t>(i * n + j)] += g[static_cast<std::size_t>(i * n + k)] * g[static_cast<std::size_t>(j * n + k)];
  for (bool jac : {false, true}) {
    std::vector<double> vals, vecs;
    compress::detail::symmetric_eigen(a, n, vals, vecs, jac);
    double worst = 0;
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t i = 0; i < n; ++i) {
        double av = 0;
        for (std::int64_t k = 0; k < n; ++k) av += a[static_cast<std::size_t>(i * n + k)] * vecs[static_cast<std::size_t>(k * n + j)];
        worst = std::max(worst, std::abs(av - vals[static_cast<std::size_t>(j)] * vecs[static_cast<std::size_t>(i * n + j)]));
      }
    double orth = 0;
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        double d = 0;
        for (std::int64_t k = 0; k < n; ++k) d += vecs[static_cast<std::size_t>(k * n + i)] * vecs[static_cast<std::size_t>(k * n + j)];
        orth = std::max(orth, std::abs(d - (i == j ? 1.0 : 0.0)));
      }
    BOOST_TEST_INFO("jacobi=" << jac);
    BOOST_TEST(worst <= 1e-9);
    BOOST_TEST(orth <= 1e-12);
  }
}
