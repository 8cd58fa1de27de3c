// KV-cache policies (src/kv): full and sliding_window.
#define BOOST_TEST_MODULE kv
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "core/error.hpp"
#include "core/rng.hpp"
#include "kv/full.hpp"
#include "kv/kv_policy.hpp"
#include "kv/sliding_window.hpp"
#include "model/transformer.hpp"
#include "snapshot_check.hpp"

using namespace dsrsq;

namespace {

ModelConfig small_cfg(std::int64_t layers = 2) {
  ModelConfig c;
  c.vocab = 61;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_layers = layers;
  c.d_ff = 64;
  c.max_pos = 512;
  return c;
}

// A random model with weights large enough that attention is far from uniform
// (GPT-2 init makes every policy look alike).
std::unique_ptr<Transformer> make_model(const ModelConfig& cfg, std::uint64_t seed) {
  auto m = std::make_unique<Transformer>(cfg, cpu_backend());
  Rng rng(seed, 7);
  for (auto& p : m->params()) {
    const bool norm_w = p.name.find("ln") != std::string::npos && p.name.find("weight") != std::string::npos;
    if (norm_w) continue;
    const double sd = p.decay ? 0.25 : 0.05;
    float* v = p.value.ptr<float>();
    for (std::int64_t i = 0; i < p.value.numel(); ++i) v[i] = static_cast<float>(sd * rng.normal());
  }
  return m;
}

std::vector<std::int32_t> random_tokens(std::int64_t n, std::int64_t vocab, std::uint64_t seed) {
  Rng rng(seed, 3);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab)));
  return t;
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

// Logits (B, T, V) of the training forward on a (B, T) sequence at positions 0..T-1.
std::vector<float> forward_logits(Transformer& m, const std::vector<std::int32_t>& seq, std::int64_t B,
                                  std::int64_t T) {
  std::vector<std::int32_t> pos(static_cast<std::size_t>(B * T));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) pos[static_cast<std::size_t>(b * T + t)] = static_cast<std::int32_t>(t);
  std::vector<std::int32_t> tok = seq;
  Batch batch{TensorView(tok.data(), Shape{B, T}), TensorView(pos.data(), Shape{B, T}), {}, {}};
  m.forward(batch);
  const float* l = m.logits().ptr<float>();
  return std::vector<float>(l, l + B * T * m.config().vocab);
}

struct Run {
  std::vector<std::int32_t> seq;  // (B, N+T)
  std::vector<float> logits;      // (B, N+T, V)
  KVMemory mem_prefill, mem_end;
};

// Prefill the prompt seq[:, :N] through the policy, then T single-token decode
// steps. Greedy (the next token is the argmax of the last logits) unless
// `forced` holds the whole (B, N+T) sequence (teacher forcing).
Run run_policy(Transformer& m, KVPolicy& pol, const std::vector<std::int32_t>& prompt_or_seq, std::int64_t B,
               std::int64_t N, std::int64_t T, const KVBudget& budget, std::int64_t query_len, bool forced,
               std::int64_t prefill_chunks = 1) {
  const std::int64_t V = m.config().vocab, L = N + T;
  const std::int64_t stride_in = forced ? L : N;
  Run r;
  r.seq.assign(static_cast<std::size_t>(B * L), 0);
  r.logits.assign(static_cast<std::size_t>(B * L * V), 0.0f);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < N; ++t)
      r.seq[static_cast<std::size_t>(b * L + t)] = prompt_or_seq[static_cast<std::size_t>(b * stride_in + t)];
  pol.begin(SequenceInfo{B, N, query_len, T}, budget);
  // Prefill, optionally in several extend() calls.
  std::int64_t done = 0;
  for (std::int64_t c = 0; c < prefill_chunks; ++c) {
    const std::int64_t n = (c + 1 == prefill_chunks) ? N - done : N / prefill_chunks;
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
  r.mem_prefill = pol.memory();
  for (std::int64_t s = 0; s < T; ++s) {
    const std::int64_t p = N + s;
    std::vector<std::int32_t> tok(static_cast<std::size_t>(B)), pos(static_cast<std::size_t>(B), static_cast<std::int32_t>(p));
    for (std::int64_t b = 0; b < B; ++b) {
      if (forced) {
        tok[static_cast<std::size_t>(b)] = prompt_or_seq[static_cast<std::size_t>(b * L + p)];
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
  r.mem_end = pol.memory();
  return r;
}

KVBudget frac(double f) { return KVBudget{f, 0}; }
KVBudget bytes(std::size_t b) { return KVBudget{1.0, b}; }

bool msg_has(const dsrsq::Error& e, const std::string& s) { return std::string(e.what()).find(s) != std::string::npos; }

// ---- brute-force StreamingLLM reference for one layer -----------------------
// RoPE (rotate-half) in double at position p.
void rope_ref(double* x, std::int64_t HS, std::int64_t p, double theta) {
  const std::int64_t half = HS / 2;
  for (std::int64_t i = 0; i < half; ++i) {
    const double ang = static_cast<double>(p) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(HS));
    const double c = std::cos(ang), s = std::sin(ang), x0 = x[i], x1 = x[i + half];
    x[i] = x0 * c - x1 * s;
    x[i + half] = x1 * c + x0 * s;
  }
}

// Output (B, total, NH, HS) of streaming attention where token t attends to the
// kept set {0..t} if t < K, else sinks [0, S) and the window [t-W+1, t]; keys
// rotated by their index in the kept set, the query by its own index.
std::vector<double> streaming_ref(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                                  std::int64_t B, std::int64_t total, std::int64_t NH, std::int64_t HS, std::int64_t K,
                                  std::int64_t S, double theta, double log_base = 0.0) {
  const std::int64_t W = K - S;
  std::vector<double> out(static_cast<std::size_t>(B * total * NH * HS), 0.0);
  auto at = [&](std::int64_t b, std::int64_t t, std::int64_t h) { return ((b * total + t) * NH + h) * HS; };
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < total; ++t) {
      std::vector<std::int64_t> kept;
      if (t < K) {
        for (std::int64_t j = 0; j <= t; ++j) kept.push_back(j);
      } else {
        for (std::int64_t j = 0; j < S; ++j) kept.push_back(j);
        for (std::int64_t j = t - W + 1; j <= t; ++j) kept.push_back(j);
      }
      const auto n = static_cast<std::int64_t>(kept.size());
      for (std::int64_t h = 0; h < NH; ++h) {
        std::vector<double> qq(q.begin() + at(b, t, h), q.begin() + at(b, t, h) + HS);
        rope_ref(qq.data(), HS, n - 1, theta);
        // Log-length scaling at the query's cache index n - 1 (RopeArgs::log_base).
        for (auto& e : qq) e *= log_length_scale(log_base, static_cast<double>(n - 1));
        std::vector<double> sc(static_cast<std::size_t>(n));
        double mx = -1e300;
        for (std::int64_t i = 0; i < n; ++i) {
          const std::int64_t j = kept[static_cast<std::size_t>(i)];
          std::vector<double> kk(k.begin() + at(b, j, h), k.begin() + at(b, j, h) + HS);
          rope_ref(kk.data(), HS, i, theta);
          double d = 0;
          for (std::int64_t e = 0; e < HS; ++e) d += qq[static_cast<std::size_t>(e)] * kk[static_cast<std::size_t>(e)];
          sc[static_cast<std::size_t>(i)] = d / std::sqrt(static_cast<double>(HS));
          mx = std::max(mx, sc[static_cast<std::size_t>(i)]);
        }
        double z = 0;
        for (auto& s : sc) z += (s = std::exp(s - mx));
        for (std::int64_t i = 0; i < n; ++i) {
          const std::int64_t j = kept[static_cast<std::size_t>(i)];
          for (std::int64_t e = 0; e < HS; ++e)
            out[static_cast<std::size_t>(at(b, t, h) + e)] +=
                sc[static_cast<std::size_t>(i)] / z * v[static_cast<std::size_t>(at(b, j, h) + e)];
        }
      }
    }
  return out;
}

}  // namespace

// (a) full + greedy decode == training forward on the generated sequence.
BOOST_AUTO_TEST_CASE(full_matches_forward) {
  const ModelConfig cfg = small_cfg();
  auto m = make_model(cfg, 11);
  for (std::int64_t B : {1, 2}) {
    const std::int64_t N = 23, T = 9;
    // Greedy decoding, and teacher forcing of a random continuation (greedy
    // decoding of a random model may repeat one token).
    auto seq = random_tokens(B * (N + T), cfg.vocab, 100 + static_cast<std::uint64_t>(B));
    std::vector<std::int32_t> prompt(static_cast<std::size_t>(B * N));
    for (std::int64_t b = 0; b < B; ++b)
      std::copy_n(seq.begin() + b * (N + T), N, prompt.begin() + b * N);
    auto pol = make_kv_policy("full", cfg, cpu_backend());
    for (std::int64_t chunks : {1, 3})
      for (bool forced : {false, true}) {
        Run r = forced ? run_policy(*m, *pol, seq, B, N, T, frac(1.0), 5, true, chunks)
                       : run_policy(*m, *pol, prompt, B, N, T, frac(1.0), 5, false, chunks);
        if (forced) BOOST_TEST(r.seq == seq);
        const auto want = forward_logits(*m, r.seq, B, N + T);
        const double e = rel_err(r.logits, want);
        BOOST_TEST_INFO("B=" << B << " chunks=" << chunks << " forced=" << forced);
        // Summation order only (cache vs one forward). First-order bound, kappa
        // = 1 (L2 over all logits), u = 2^-24: per layer 5C + HS + 2T + F =
        // 296 (C 32, HS 8, T = N + T = 32, F 64), x 2 layers + 2C = 656 u per
        // path, x 2 paths = 1312 u = 7.8e-5 -> 1e-4 (was 1e-5, below it).
        BOOST_TEST(e <= 1e-4);
        auto* full = dynamic_cast<FullPolicy*>(pol.get());
        BOOST_REQUIRE(full);
        BOOST_TEST(full->cached_tokens(0) == N + T);
        BOOST_TEST(r.mem_prefill.resident_after_prefill == static_cast<std::size_t>(B) * KVBudget::full_bytes(cfg, N + T));
        BOOST_TEST(full->kv_bytes_allocated() == r.mem_prefill.resident_after_prefill);
      }
  }
}

// (a') with log-length query scaling (attn_log_base 8 < N + T = 32) the cache's
// decode still equals the training forward (both scale queries by position),
// and the scaling acts: the logits differ from the unscaled model's by far
// more than the rounding bound.
BOOST_AUTO_TEST_CASE(full_matches_forward_log_scaled) {
  ModelConfig cfg = small_cfg();
  cfg.attn_log_base = 8;
  auto m = make_model(cfg, 11);
  const std::int64_t B = 2, N = 23, T = 9;
  auto seq = random_tokens(B * (N + T), cfg.vocab, 102);
  auto pol = make_kv_policy("full", cfg, cpu_backend());
  Run r = run_policy(*m, *pol, seq, B, N, T, frac(1.0), 5, true, 3);
  BOOST_TEST(r.seq == seq);
  const auto want = forward_logits(*m, r.seq, B, N + T);
  BOOST_TEST(rel_err(r.logits, want) <= 1e-4);  // the bound of full_matches_forward
  ModelConfig plain = cfg;
  plain.attn_log_base = 0;
  auto m0 = make_model(plain, 11);  // same weights (same seed), no scaling
  BOOST_TEST(rel_err(forward_logits(*m0, r.seq, B, N + T), want) > 1e-2);
}

// (b) sliding_window with S + W >= N + T is the full model.
BOOST_AUTO_TEST_CASE(sliding_window_large_budget_equals_full) {
  const ModelConfig cfg = small_cfg();
  auto m = make_model(cfg, 12);
  const std::int64_t B = 2, N = 30, T = 8;
  auto seq = random_tokens(B * (N + T), cfg.vocab, 7);
  auto full = make_kv_policy("full", cfg, cpu_backend());
  const Run rf = run_policy(*m, *full, seq, B, N, T, frac(1.0), 4, true);
  for (const KVBudget& bud : {frac(1.0), bytes(KVBudget::full_bytes(cfg, N + T)), bytes(10 * KVBudget::full_bytes(cfg, N + T))}) {
    auto sw = make_kv_policy("window", cfg, cpu_backend());
    const Run rs = run_policy(*m, *sw, seq, B, N, T, bud, 4, true);
    // As full_matches_forward with T = 38: 2 x (2 x 308 + 64) u = 8.1e-5 -> 1e-4
    // (was 1e-5); the small-budget control below differs by > 1e-3.
    BOOST_TEST(rel_err(rs.logits, rf.logits) <= 1e-4);
    auto* p = dynamic_cast<SlidingWindowPolicy*>(sw.get());
    BOOST_TEST(p->capacity() == N + T);
    BOOST_TEST(p->budget_achieved_bytes() == KVBudget::full_bytes(cfg, N + T));
  }
  // Sanity: with a small budget the outputs do differ (so the check above can fail).
  auto sw = make_kv_policy("window", cfg, cpu_backend());
  const Run rs = run_policy(*m, *sw, seq, B, N, T, frac(0.3), 4, true);
  BOOST_TEST(rel_err(rs.logits, rf.logits) > 1e-3);
  // ... but the first K prompt tokens (before any eviction) are still exact.
  const std::int64_t K = dynamic_cast<SlidingWindowPolicy*>(sw.get())->capacity();
  const std::int64_t V = cfg.vocab;
  for (std::int64_t b = 0; b < B; ++b) {
    std::vector<float> a(rs.logits.begin() + b * (N + T) * V, rs.logits.begin() + (b * (N + T) + K) * V);
    std::vector<float> w(rf.logits.begin() + b * (N + T) * V, rf.logits.begin() + (b * (N + T) + K) * V);
    BOOST_TEST(rel_err(a, w) <= 1e-4);  // the same bound (8.1e-5), was 1e-5
  }
}

// (c) small budget: attend() against a brute-force StreamingLLM reference for
// one layer (prefill longer than the budget, then decode), kept tokens, memory.
BOOST_AUTO_TEST_CASE(sliding_window_matches_streaming_reference) {
  ModelConfig cfg = small_cfg(1);
  cfg.d_model = 16;
  cfg.n_heads = 2;
  const std::int64_t NH = 2, HS = 8, C = 16;
  const std::size_t bpt = KVBudget::full_bytes(cfg, 1);
  struct Case {
    std::int64_t B, N, T, K, query_len, default_sinks, chunks, expect_S;
  };
  const Case cases[] = {
      {1, 12, 6, 7, 2, 4, 1, 4},   // S=4, W=3
      {2, 12, 6, 7, 2, 4, 3, 4},   // prefill in 3 calls
      {2, 15, 5, 7, 5, 4, 1, 2},   // question of 5: sinks shrink to 2
      {1, 10, 4, 3, 6, 4, 1, 0},   // budget < question: most recent 3 only
      {2, 9, 5, 4, 1, 0, 2, 0},    // plain sliding window
      {1, 8, 3, 1, 1, 4, 1, 0},    // one token: each query sees only itself
      {2, 6, 4, 20, 2, 4, 1, 4},   // everything fits (K capped at N+T=10)
  };
  // log_base 4: the log-length factor s(i) = ln(i + 1) / ln 4 is 1.16-1.66
  // over these caches' last indices (3..9), so a query scaled at its stream
  // index instead of its cache index would be off by up to 2x in its logits.
  for (const double log_base : {0.0, 4.0})
  for (const Case& cs : cases) {
    cfg.attn_log_base = log_base;
    BOOST_TEST_CONTEXT("log_base=" << log_base << " B=" << cs.B << " N=" << cs.N << " K=" << cs.K << " q=" << cs.query_len) {
      const std::int64_t total = cs.N + cs.T;
      SlidingWindowPolicy pol(cfg, cpu_backend(), cs.default_sinks);
      // Budget between K and K+1 tokens: floor gives K.
      pol.begin(SequenceInfo{cs.B, cs.N, cs.query_len, cs.T}, bytes(static_cast<std::size_t>(cs.K) * bpt + bpt / 2));
      const std::int64_t K = std::min(cs.K, total);
      BOOST_TEST(pol.capacity() == K);
      BOOST_TEST(pol.sinks() == cs.expect_S);
      BOOST_TEST(pol.question_kept() == (cs.N <= K || K - cs.expect_S >= cs.query_len));
      Rng rng(static_cast<std::uint64_t>(cs.N * 100 + cs.K), 1);
      const std::int64_t n_all = cs.B * total * C;
      std::vector<float> q(static_cast<std::size_t>(n_all)), k(q.size()), v(q.size());
      for (auto* x : {&q, &k, &v})
        for (auto& e : *x) e = static_cast<float>(1.5 * rng.normal());
      std::vector<float> out(q.size(), 0.0f);
      // Feeds tokens [t0, t0+n) of every row through attend().
      auto feed = [&](std::int64_t t0, std::int64_t n) {
        std::vector<float> qs(static_cast<std::size_t>(cs.B * n * C)), ks(qs.size()), vs(qs.size()), os(qs.size());
        std::vector<std::int32_t> ps(static_cast<std::size_t>(cs.B * n));
        for (std::int64_t b = 0; b < cs.B; ++b) {
          const auto src = static_cast<std::size_t>((b * total + t0) * C), dst = static_cast<std::size_t>(b * n * C);
          std::copy_n(q.begin() + src, n * C, qs.begin() + dst);
          std::copy_n(k.begin() + src, n * C, ks.begin() + dst);
          std::copy_n(v.begin() + src, n * C, vs.begin() + dst);
          for (std::int64_t t = 0; t < n; ++t) ps[static_cast<std::size_t>(b * n + t)] = static_cast<std::int32_t>(t0 + t);
        }
        const Shape s{cs.B, n, NH, HS};
        pol.attend(0, TensorView(qs.data(), s), TensorView(ks.data(), s), TensorView(vs.data(), s),
                   TensorView(ps.data(), Shape{cs.B, n}), TensorView(os.data(), s));
        for (std::int64_t b = 0; b < cs.B; ++b)
          std::copy_n(os.begin() + b * n * C, n * C, out.begin() + (b * total + t0) * C);
      };
      auto expect_kept = [&](std::int64_t seen) {
        std::vector<std::int32_t> e;
        if (seen <= K) {
          for (std::int64_t j = 0; j < seen; ++j) e.push_back(static_cast<std::int32_t>(j));
        } else {
          for (std::int64_t j = 0; j < pol.sinks(); ++j) e.push_back(static_cast<std::int32_t>(j));
          for (std::int64_t j = seen - pol.window(); j < seen; ++j) e.push_back(static_cast<std::int32_t>(j));
        }
        return e;
      };
      std::int64_t done = 0;
      for (std::int64_t c = 0; c < cs.chunks; ++c) {
        const std::int64_t n = (c + 1 == cs.chunks) ? cs.N - done : cs.N / cs.chunks;
        feed(done, n);
        done += n;
      }
      pol.end_prefill();
      for (std::int64_t b = 0; b < cs.B; ++b) BOOST_TEST(pol.kept_positions(0, b) == expect_kept(cs.N));
      const KVMemory mp = pol.memory();
      const std::size_t want_bytes = static_cast<std::size_t>(cs.B * K) * bpt;
      BOOST_TEST(mp.resident_after_prefill == want_bytes);
      BOOST_TEST(mp.peak_prefill == want_bytes);
      BOOST_TEST(pol.kv_bytes_allocated() == want_bytes);
      BOOST_TEST(mp.resident_after_prefill <= static_cast<std::size_t>(cs.B) * pol.budget_requested_bytes());
      BOOST_TEST(pol.budget_achieved_bytes() == static_cast<std::size_t>(K) * bpt);
      BOOST_TEST(pol.budget_achieved_bytes() <= pol.budget_requested_bytes());
      for (std::int64_t s = 0; s < cs.T; ++s) {
        feed(cs.N + s, 1);
        BOOST_TEST(pol.cached_tokens(0) == std::min(K, cs.N + s + 1));
        for (std::int64_t b = 0; b < cs.B; ++b) BOOST_TEST(pol.kept_positions(0, b) == expect_kept(cs.N + s + 1));
        BOOST_TEST(pol.memory().total == want_bytes);
        BOOST_TEST(pol.kv_bytes_allocated() == want_bytes);
      }
      const auto want = streaming_ref(q, k, v, cs.B, total, NH, HS, K, pol.sinks(), cfg.rope_theta, log_base);
      // f32 attend() vs the double reference, one layer: RoPE (2 roundings),
      // scores (HS = 8), expf (<= 2 ulp), softmax sum and P V (<= K = 10 keys
      // each), the output's rounding: 33 u = 2.0e-6 (kappa = 1), no room under
      // the old 2e-6 -> 5e-6 (2.5x). A wrong kept set moves it by O(0.1).
      // With log_base 4 the logits, and the absolute error of their exp, grow
      // by s <= 1.66: 55 u = 3.3e-6, inside the same bound.
      BOOST_TEST(rel_err(out, std::vector<float>(want.begin(), want.end())) <= 5e-6);
      // attended tokens: decode query at index N+s sees min(K, N+s+1) keys.
      double mean = 0;
      for (std::int64_t s = 0; s < cs.T; ++s) mean += static_cast<double>(std::min(K, cs.N + s + 1));
      mean /= static_cast<double>(cs.T);
      BOOST_TEST(pol.attended_tokens() == mean, boost::test_tools::tolerance(1e-12));
      BOOST_TEST(pol.memory().read_per_step == static_cast<std::size_t>(mean * static_cast<double>(cs.B) * 2 * C * 4));
    }
  }
}

// (c, chunks) Prefill fed in odd pieces that cross the room -> full
// transition, the window boundary and the policy's own chunk cap
// (SlidingWindowPolicy::kFullChunk), then decoding: every output equals the
// brute-force StreamingLLM reference (token-by-token semantics) within the
// same bound as above, and the kept set after every call is the reference's.
BOOST_AUTO_TEST_CASE(sliding_window_chunked_prefill_odd_boundaries) {
  ModelConfig cfg = small_cfg(1);
  cfg.d_model = 16;
  cfg.n_heads = 2;
  cfg.max_pos = 4096;
  const std::int64_t NH = 2, HS = 8, C = 16;
  const std::size_t bpt = KVBudget::full_bytes(cfg, 1);
  struct Case {
    std::int64_t B, K, sinks, T;
    std::vector<std::int64_t> feeds;  // prefill call sizes
  };
  const std::int64_t big = SlidingWindowPolicy::kFullChunk;
  const Case cases[] = {
      {1, 13, 4, 5, {1, 7, 3, 13, 1, 29, 2, 9}},            // W = 9: chunks cut at 9 and at odd offsets
      {2, 10, 3, 4, {10, 11, 1, 17}},                       // one call fills the cache exactly, then W = 7
      {1, 6, 0, 3, {5, 2, 23, 6}},                          // no sinks
      {2, 5, 4, 3, {4, 1, 1, 9}},                           // W = 1: every token sees sinks + itself
      {1, big + 70, 4, 3, {big / 2 + 3, big + 1, 2 * big + 5}},  // W > kFullChunk: the cap cuts chunks
  };
  for (const Case& cs : cases) {
    std::int64_t N = 0;
    for (auto f : cs.feeds) N += f;
    BOOST_TEST_CONTEXT("B=" << cs.B << " K=" << cs.K << " S=" << cs.sinks << " N=" << N) {
      const std::int64_t total = N + cs.T;
      SlidingWindowPolicy pol(cfg, cpu_backend(), cs.sinks);
      pol.begin(SequenceInfo{cs.B, N, 1, cs.T}, bytes(static_cast<std::size_t>(cs.K) * bpt + bpt / 2));
      BOOST_REQUIRE(pol.capacity() == cs.K);
      BOOST_REQUIRE(pol.sinks() == cs.sinks);
      Rng rng(static_cast<std::uint64_t>(N * 31 + cs.K), 5);
      std::vector<float> q(static_cast<std::size_t>(cs.B * total * C)), k(q.size()), v(q.size()), out(q.size(), 0.0f);
      for (auto* x : {&q, &k, &v})
        for (auto& e : *x) e = static_cast<float>(1.5 * rng.normal());
      auto feed = [&](std::int64_t t0, std::int64_t n) {
        std::vector<float> qs(static_cast<std::size_t>(cs.B * n * C)), ks(qs.size()), vs(qs.size()), os(qs.size());
        std::vector<std::int32_t> ps(static_cast<std::size_t>(cs.B * n));
        for (std::int64_t b = 0; b < cs.B; ++b) {
          const auto src = static_cast<std::size_t>((b * total + t0) * C), dst = static_cast<std::size_t>(b * n * C);
          std::copy_n(q.begin() + src, n * C, qs.begin() + dst);
          std::copy_n(k.begin() + src, n * C, ks.begin() + dst);
          std::copy_n(v.begin() + src, n * C, vs.begin() + dst);
          for (std::int64_t t = 0; t < n; ++t) ps[static_cast<std::size_t>(b * n + t)] = static_cast<std::int32_t>(t0 + t);
        }
        const Shape s{cs.B, n, NH, HS};
        pol.attend(0, TensorView(qs.data(), s), TensorView(ks.data(), s), TensorView(vs.data(), s),
                   TensorView(ps.data(), Shape{cs.B, n}), TensorView(os.data(), s));
        for (std::int64_t b = 0; b < cs.B; ++b)
          std::copy_n(os.begin() + b * n * C, n * C, out.begin() + (b * total + t0) * C);
        // Kept set after the call: tokens [0, S) and the last W, or all while they fit.
        const std::int64_t seen = t0 + n;
        std::vector<std::int32_t> e;
        for (std::int64_t j = 0; j < seen; ++j)
          if (seen <= cs.K || j < cs.sinks || j >= seen - (cs.K - cs.sinks)) e.push_back(static_cast<std::int32_t>(j));
        for (std::int64_t b = 0; b < cs.B; ++b) BOOST_TEST(pol.kept_positions(0, b) == e);
      };
      std::int64_t done = 0;
      for (auto f : cs.feeds) {
        feed(done, f);
        done += f;
      }
      pol.end_prefill();
      for (std::int64_t s = 0; s < cs.T; ++s) feed(N + s, 1);
      const auto want = streaming_ref(q, k, v, cs.B, total, NH, HS, cs.K, cs.sinks, cfg.rope_theta);
      // As sliding_window_matches_streaming_reference, with up to K = 582 keys
      // per softmax: the sums add log2(K) ~ 10 u more (kappa = 1): 43 u = 2.6e-6,
      // plus two log-sum-exp merges of partial results (~6 u) -> 5e-6 still holds.
      BOOST_TEST(rel_err(out, std::vector<float>(want.begin(), want.end())) <= 5e-6);
    }
  }
}

// (c, model path) small budget through the model: kept tokens in every layer,
// constant memory, and the first decode step is not the full model's.
BOOST_AUTO_TEST_CASE(sliding_window_model_kept_tokens) {
  const ModelConfig cfg = small_cfg();
  auto m = make_model(cfg, 13);
  const std::int64_t B = 2, N = 40, T = 6, q = 5;
  auto prompt = random_tokens(B * N, cfg.vocab, 21);
  auto pol = make_kv_policy("window", cfg, cpu_backend());
  auto* sw = dynamic_cast<SlidingWindowPolicy*>(pol.get());
  const std::size_t bpt = KVBudget::full_bytes(cfg, 1);
  const Run r = run_policy(*m, *pol, prompt, B, N, T, bytes(12 * bpt), q, false);
  BOOST_TEST(sw->capacity() == 12);
  BOOST_TEST(sw->sinks() == 4);
  BOOST_TEST(sw->window() == 8);
  BOOST_TEST(sw->question_kept());
  std::vector<std::int32_t> want{0, 1, 2, 3};
  for (std::int64_t j = N + T - 8; j < N + T; ++j) want.push_back(static_cast<std::int32_t>(j));
  for (std::int64_t l = 0; l < cfg.n_layers; ++l)
    for (std::int64_t b = 0; b < B; ++b) BOOST_TEST(sw->kept_positions(l, b) == want);
  BOOST_TEST(r.mem_prefill.resident_after_prefill == static_cast<std::size_t>(B) * 12 * bpt);
  BOOST_TEST(r.mem_end.total == r.mem_prefill.total);
  BOOST_TEST(sw->attended_tokens() == 12.0);
  BOOST_TEST(r.mem_end.read_per_step == static_cast<std::size_t>(cfg.n_layers * B * 12) * 2 * cfg.d_model * 4);
  for (float x : r.logits) BOOST_REQUIRE(std::isfinite(x));
}

// (d) budget accounting.
BOOST_AUTO_TEST_CASE(budget_accounting) {
  const ModelConfig cfg = small_cfg();  // L=2, d_model=32
  const std::size_t bpt = 2 * 2 * 32 * 4;
  BOOST_TEST(KVBudget::full_bytes(cfg, 1) == bpt);
  BOOST_TEST(KVBudget::full_bytes(cfg, 10) == 10 * bpt);
  BOOST_TEST(frac(0.5).resolve(cfg, 10) == 5 * bpt);
  BOOST_TEST(frac(1.0).resolve(cfg, 10) == 10 * bpt);
  BOOST_TEST(frac(0.33).resolve(cfg, 10) == static_cast<std::size_t>(std::floor(0.33 * 10 * bpt)));
  BOOST_TEST(bytes(1000).resolve(cfg, 10) == 1000u);
  BOOST_TEST(bytes(10).resolve(cfg, 10) == bpt);        // clamped to one token
  BOOST_TEST(frac(1e-9).resolve(cfg, 10) == bpt);       // never zero
  BOOST_TEST((KVBudget{0.5, 777}.resolve(cfg, 10) == 777u));  // bytes win

  auto m = make_model(cfg, 14);
  const std::int64_t B = 2, N = 6, T = 3;
  auto prompt = random_tokens(B * N, cfg.vocab, 5);
  {  // fraction 1e-9 on a short context: one token kept, never zero.
    auto pol = make_kv_policy("window", cfg, cpu_backend());
    auto* sw = dynamic_cast<SlidingWindowPolicy*>(pol.get());
    const Run r = run_policy(*m, *pol, prompt, B, N, T, frac(1e-9), 2, false);
    BOOST_TEST(sw->capacity() == 1);
    BOOST_TEST(sw->sinks() == 0);
    BOOST_TEST(!sw->question_kept());
    BOOST_TEST(pol->budget_requested_bytes() == bpt);
    BOOST_TEST(pol->budget_achieved_bytes() == bpt);
    BOOST_TEST(r.mem_prefill.resident_after_prefill == B * bpt);
    BOOST_TEST(pol->attended_tokens() == 1.0);
    for (float x : r.logits) BOOST_REQUIRE(std::isfinite(x));
  }
  {  // fraction and bytes budgets that resolve to the same count agree exactly.
    const std::int64_t N2 = 30, T2 = 10;  // 40 tokens; 0.25 -> 10 tokens
    auto seq = random_tokens(B * (N2 + T2), cfg.vocab, 6);
    auto p1 = make_kv_policy("window", cfg, cpu_backend());
    auto p2 = make_kv_policy("window", cfg, cpu_backend());
    const Run r1 = run_policy(*m, *p1, seq, B, N2, T2, frac(0.25), 3, true);
    const Run r2 = run_policy(*m, *p2, seq, B, N2, T2, bytes(10 * bpt + bpt - 1), 3, true);
    BOOST_TEST(dynamic_cast<SlidingWindowPolicy*>(p1.get())->capacity() == 10);
    BOOST_TEST(dynamic_cast<SlidingWindowPolicy*>(p2.get())->capacity() == 10);
    BOOST_TEST(p1->budget_requested_bytes() == 10 * bpt);
    BOOST_TEST(p2->budget_requested_bytes() == 11 * bpt - 1);
    BOOST_TEST(p1->budget_achieved_bytes() == 10 * bpt);
    BOOST_TEST(p2->budget_achieved_bytes() == 10 * bpt);
    BOOST_TEST(r1.logits == r2.logits);
    BOOST_TEST(r1.mem_end.resident_after_prefill == r2.mem_end.resident_after_prefill);
  }
  {  // full: requested is recorded, achieved is the whole sequence, decode traffic grows.
    auto pol = make_kv_policy("full", cfg, cpu_backend());
    const Run r = run_policy(*m, *pol, prompt, B, N, T, frac(0.5), 2, false);
    BOOST_TEST(pol->budget_requested_bytes() == frac(0.5).resolve(cfg, N + T));
    BOOST_TEST(pol->budget_achieved_bytes() == KVBudget::full_bytes(cfg, N + T));
    const double mean_keys = N + (T + 1) / 2.0;  // decode step s sees N + s + 1 keys
    BOOST_TEST(pol->attended_tokens() == mean_keys, boost::test_tools::tolerance(1e-12));
    BOOST_TEST(r.mem_end.read_per_step == static_cast<std::size_t>(mean_keys * B * static_cast<double>(bpt)));
    BOOST_TEST(r.mem_end.resident_after_prefill == B * KVBudget::full_bytes(cfg, N + T));
    BOOST_TEST(r.mem_end.peak_prefill == r.mem_end.resident_after_prefill);
    BOOST_TEST(r.mem_end.total == r.mem_end.resident_after_prefill);
  }
}

// (e) begin() starts clean: A then B gives B's outputs as B alone.
BOOST_AUTO_TEST_CASE(begin_starts_clean) {
  const ModelConfig cfg = small_cfg();
  auto m = make_model(cfg, 15);
  for (const std::string name : {"full", "window"}) {
    BOOST_TEST_CONTEXT(name) {
      auto seq_a = random_tokens(2 * 40, cfg.vocab, 31);
      auto seq_b = random_tokens(1 * 25, cfg.vocab, 32);
      auto reused = make_kv_policy(name, cfg, cpu_backend());
      run_policy(*m, *reused, seq_a, 2, 32, 8, frac(0.4), 4, true);
      const Run rb = run_policy(*m, *reused, seq_b, 1, 20, 5, frac(0.5), 3, true);
      auto fresh = make_kv_policy(name, cfg, cpu_backend());
      const Run rf = run_policy(*m, *fresh, seq_b, 1, 20, 5, frac(0.5), 3, true);
      BOOST_TEST(rb.logits == rf.logits);
      BOOST_TEST(rb.mem_end.resident_after_prefill == rf.mem_end.resident_after_prefill);
      BOOST_TEST(rb.mem_end.peak_prefill == rf.mem_end.peak_prefill);
      BOOST_TEST(rb.mem_end.read_per_step == rf.mem_end.read_per_step);
      BOOST_TEST(reused->attended_tokens() == fresh->attended_tokens());
      BOOST_TEST(reused->budget_requested_bytes() == fresh->budget_requested_bytes());
      BOOST_TEST(reused->budget_achieved_bytes() == fresh->budget_achieved_bytes());
    }
  }
}

// (g) the reuse protocol: snapshot after the context, every question from a
// restore equals a fresh prefill of context + question (bitwise, memory too).
BOOST_AUTO_TEST_CASE(snapshot_restore_equals_fresh_prefill) {
  const ModelConfig cfg = small_cfg();
  auto m = make_model(cfg, 16);
  for (const std::string name : {"full", "window"})
    for (const double f : {1.0, 0.4})
      for (const std::int64_t B : {1, 2}) {
        BOOST_TEST_CONTEXT(name << ", budget " << f << ", batch " << B) {
          const auto ctx = random_tokens(B * 30, cfg.vocab, 41), q1 = random_tokens(B * 4, cfg.vocab, 42),
                     q2 = random_tokens(B * 6, cfg.vocab, 43);
          testing::check_snapshot_reuse(
              *m, [&] { return make_kv_policy(name, cfg, cpu_backend()); }, frac(f), B, ctx, q1, q2, 6, 2);
        }
      }
}

// A policy without snapshot support says so by name; a snapshot restores only
// into the policy object that took it.
BOOST_AUTO_TEST_CASE(snapshot_errors) {
  struct NoSnapshot final : KVPolicy {
    std::string name() const override { return "nosnap"; }
    void begin(const SequenceInfo&, const KVBudget&) override {}
    void attend(std::int64_t, TensorView, TensorView, TensorView, TensorView, TensorView) override {}
    KVMemory memory() const override { return {}; }
    std::size_t budget_requested_bytes() const override { return 0; }
    std::size_t budget_achieved_bytes() const override { return 0; }
    double attended_tokens() const override { return 0; }
  } none;
  BOOST_CHECK_EXCEPTION(none.snapshot(), dsrsq::Error, [](const dsrsq::Error& e) {
    return msg_has(e, "policy nosnap cannot snapshot its cache") && msg_has(e, "--protocol reuse");
  });
  const ModelConfig cfg = small_cfg();
  auto a = make_kv_policy("full", cfg, cpu_backend()), b = make_kv_policy("full", cfg, cpu_backend()),
       w = make_kv_policy("window", cfg, cpu_backend());
  BOOST_CHECK_THROW(a->snapshot(), dsrsq::Error);  // before begin()
  a->begin(SequenceInfo{1, 8, 0, 2}, frac(1.0));
  w->begin(SequenceInfo{1, 8, 0, 2}, frac(1.0));
  auto sa = a->snapshot();
  BOOST_CHECK_THROW(none.restore(*sa), dsrsq::Error);
  BOOST_CHECK_EXCEPTION(b->restore(*sa), dsrsq::Error, [](const dsrsq::Error& e) { return msg_has(e, "did not take"); });
  BOOST_CHECK_THROW(w->restore(*sa), dsrsq::Error);
  a->restore(*sa);
}

// (f) errors.
BOOST_AUTO_TEST_CASE(errors) {
  const ModelConfig cfg = small_cfg();
  for (double f : {0.0, -0.5, 1.5, std::nan(""), std::numeric_limits<double>::infinity()}) {
    BOOST_TEST_CONTEXT("fraction " << f) {
      BOOST_CHECK_EXCEPTION(frac(f).resolve(cfg, 10), dsrsq::Error,
                            [](const dsrsq::Error& e) { return msg_has(e, "--kv_budget"); });
      for (const auto& name : kv_policy_names()) {
        auto pol = make_kv_policy(name, cfg, cpu_backend());
        BOOST_CHECK_EXCEPTION(pol->begin(SequenceInfo{1, 10, 2, 4}, frac(f)), dsrsq::Error,
                              [](const dsrsq::Error& e) { return msg_has(e, "--kv_budget"); });
      }
    }
  }
  BOOST_TEST((kv_policy_names() == std::vector<std::string>{"full", "window"}));
  BOOST_CHECK_EXCEPTION(make_kv_policy("snapkv_typo", cfg, cpu_backend()), dsrsq::Error, [](const dsrsq::Error& e) {
    return msg_has(e, "snapkv_typo") && msg_has(e, "full") && msg_has(e, "window") && msg_has(e, "rckv");
  });
  for (const auto& name : kv_policy_names()) {
    auto pol = make_kv_policy(name, cfg, cpu_backend());
    BOOST_TEST(pol->name() == name);
    std::vector<float> buf(static_cast<std::size_t>(1 * 2 * 32), 0.0f), o(buf.size());
    std::vector<std::int32_t> pos{0, 1};
    const Shape s{1, 2, 4, 8};
    auto attend = [&] {
      pol->attend(0, TensorView(buf.data(), s), TensorView(buf.data(), s), TensorView(buf.data(), s),
                  TensorView(pos.data(), Shape{1, 2}), TensorView(o.data(), s));
    };
    BOOST_CHECK_THROW(attend(), dsrsq::Error);  // before begin()
    BOOST_CHECK_THROW(pol->begin(SequenceInfo{1, 10, 11, 4}, frac(1.0)), dsrsq::Error);  // query > prompt
    BOOST_CHECK_THROW(pol->begin(SequenceInfo{0, 10, 1, 4}, frac(1.0)), dsrsq::Error);   // batch 0
    pol->begin(SequenceInfo{1, 1, 1, 0}, frac(1.0));  // room for one token only
    if (name == "full") BOOST_CHECK_THROW(attend(), dsrsq::Error);  // capacity exceeded
    else attend();  // streaming never runs out of room
    pol->begin(SequenceInfo{2, 4, 1, 0}, frac(1.0));
    BOOST_CHECK_THROW(attend(), dsrsq::Error);  // batch mismatch
    BOOST_CHECK_THROW(pol->attend(5, TensorView(buf.data(), s), TensorView(buf.data(), s), TensorView(buf.data(), s),
                                  TensorView(pos.data(), Shape{1, 2}), TensorView(o.data(), s)),
                      dsrsq::Error);  // layer out of range
  }
}
