// DSR scorer: local-context encoding, reduced-dimension cosine scores, budget
// features and head, span expansion, and the policy-gradient step that turns
// dsr_policy.hpp's losses into parameter gradients. Formulas in the header.
#include "retrieval/dsr_scorer.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/backend.hpp"
#include "core/error.hpp"

namespace dsrsq::retrieval {
namespace {

constexpr double kNormEps = 1e-12;  // |x|_e = sqrt(|x|^2 + kNormEps)

std::size_t sz(std::int64_t v) { return static_cast<std::size_t>(v); }

// Score of one projected row r_i (R values): |r_i|_e, cos(u, r_i) and
// s_i = scale * cos. The one definition for the training forward and the
// inference path, so both give the same bits.
struct RowScore {
  double norm, cosine, score;
};
inline RowScore row_score(const double* ri, std::int64_t R, const double* u, double u_norm, double scale) {
  double rr = 0, ur = 0;
  for (std::int64_t j = 0; j < R; ++j) {
    rr += ri[j] * ri[j];
    ur += ri[j] * u[j];
  }
  const double nr = std::sqrt(rr + kNormEps);
  const double cs = ur / (u_norm * nr);
  return {nr, cs, scale * cs};
}

// The top-k order of dsr_policy's top_k (score descending, ties to the lower index).
inline bool ranks_before(double sa, std::int32_t ia, double sb, std::int32_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

}  // namespace

void DsrConfig::validate() const {
  DSRSQ_INPUT_CHECK(d_r >= 1, "dsr_d_r must be >= 1, got ", d_r);
  DSRSQ_INPUT_CHECK(conv_width >= 1, "dsr_conv_width must be >= 1, got ", conv_width);
  DSRSQ_INPUT_CHECK(span >= 0, "dsr_span must be >= 0, got ", span);
  DSRSQ_INPUT_CHECK(std::isfinite(base_budget) && base_budget > 0,
                    "dsr_base_budget must be > 0 (tokens, or a fraction of the context in (0, 1)), got ",
                    base_budget);
  DSRSQ_INPUT_CHECK(std::isfinite(alpha) && alpha >= 0, "dsr_alpha must be >= 0, got ", alpha);
  DSRSQ_INPUT_CHECK(std::isfinite(lambda) && lambda >= 0, "dsr_lambda must be >= 0, got ", lambda);
  DSRSQ_INPUT_CHECK(std::isfinite(clip) && clip >= 0, "dsr_clip must be >= 0 (0 disables clipping), got ", clip);
  DSRSQ_INPUT_CHECK(baseline_decay >= 0 && baseline_decay < 1, "dsr_baseline_decay must be in [0, 1), got ",
                    baseline_decay);
  DSRSQ_INPUT_CHECK(std::isfinite(budget_sigma) && budget_sigma > 0, "dsr_budget_sigma must be > 0, got ",
                    budget_sigma);
  DSRSQ_INPUT_CHECK(std::isfinite(init_scale) && init_scale > 0, "dsr_init_scale must be > 0, got ", init_scale);
  DSRSQ_INPUT_CHECK(ppo_epochs >= 1, "dsr_ppo_epochs must be >= 1 (1 = REINFORCE), got ", ppo_epochs);
}

// ---- selection helpers --------------------------------------------------------------

std::int64_t resolve_base_budget(const DsrConfig& cfg, std::int64_t n) {
  DSRSQ_REQUIRE(n >= 1, "resolve_base_budget: empty context");
  const double tokens = cfg.base_budget < 1.0 ? cfg.base_budget * static_cast<double>(n) : cfg.base_budget;
  const double r = std::round(tokens);
  if (!(r >= 1.0)) return 1;
  if (r >= static_cast<double>(n)) return n;
  return static_cast<std::int64_t>(r);
}

std::vector<std::int32_t> expand_spans(std::span<const std::int32_t> top, std::int64_t span, std::int64_t n) {
  DSRSQ_REQUIRE(span >= 0, "expand_spans: span ", span, " < 0");
  DSRSQ_REQUIRE(n >= 0, "expand_spans: n ", n, " < 0");
  std::vector<char> keep(sz(n), 0);
  for (const std::int32_t i : top) {
    DSRSQ_REQUIRE(i >= 0 && i < n, "expand_spans: index ", i, " out of range [0, ", n, ")");
    const std::int64_t end = std::min<std::int64_t>(n, static_cast<std::int64_t>(i) + span + 1);
    for (std::int64_t j = i; j < end; ++j) keep[sz(j)] = 1;
  }
  std::vector<std::int32_t> out;
  for (std::int64_t j = 0; j < n; ++j)
    if (keep[sz(j)]) out.push_back(static_cast<std::int32_t>(j));
  return out;
}

std::int64_t seeds_for_budget(std::int64_t budget, std::int64_t span) {
  DSRSQ_REQUIRE(span >= 0, "seeds_for_budget: span ", span, " < 0");
  if (budget <= 1) return 1;
  return (budget + span) / (span + 1);
}

DsrSelection select(const DsrForward& fwd, Rng* rng, const TopK& top) {
  const std::int64_t n = fwd.n;
  DSRSQ_REQUIRE(n >= 1 && static_cast<std::int64_t>(fwd.scores.size()) == n, "dsr select: forward has n=", n,
                " and ", fwd.scores.size(), " scores");
  DsrSelection sel;
  sel.budget = sample_budget(fwd.head, fwd.features, n, rng);
  sel.budget_log_prob = sel.budget.log_prob;
  if (sel.budget.budget >= n) {
    sel.full = true;
    sel.positions.resize(sz(n));
    std::iota(sel.positions.begin(), sel.positions.end(), 0);
  } else {
    sel.k = seeds_for_budget(sel.budget.budget, fwd.span);
    if (top) {
      std::vector<double> pert(fwd.scores);
      if (rng)
        for (auto& x : pert) x += rng->gumbel();  // the draws gumbel_top_k makes, in its order
      sel.seeds = top(pert, sel.k);
    } else {
      sel.seeds = rng ? gumbel_top_k(fwd.scores, sel.k, *rng) : top_k(fwd.scores, sel.k);
    }
    sel.positions = expand_spans(sel.seeds, fwd.span, n);
    sel.selection_log_prob = plackett_luce_log_prob(fwd.scores, sel.seeds);
  }
  sel.selected_fraction = static_cast<double>(sel.positions.size()) / static_cast<double>(n);
  return sel;
}

// ---- scorer ------------------------------------------------------------------------------

DsrScorer::DsrScorer(std::int64_t d_model, DsrConfig cfg) : c_(d_model), cfg_(cfg) {
  DSRSQ_REQUIRE(d_model >= 1, "DsrScorer: d_model ", d_model, " < 1");
  cfg_.validate();
  const std::int64_t R = cfg_.d_r, C = c_;
  o_wq_ = 0;
  o_wc_ = o_wq_ + R * C;
  o_conv_ = o_wc_ + R * C;
  o_scale_ = o_conv_ + cfg_.conv_width * C;
  o_bw_ = o_scale_ + 1;
  o_bb_ = o_bw_ + cfg_.num_features();
  total_ = o_bb_ + 1;
  DSRSQ_DEBUG_ASSERT(total_ == num_parameters(d_model, cfg_));
}

std::int64_t DsrScorer::num_parameters(std::int64_t d_model, const DsrConfig& cfg) {
  return 2 * cfg.d_r * d_model + cfg.conv_width * d_model + 1 + cfg.num_features() + 1;
}

void DsrScorer::bind(float* params, float* grads) {
  DSRSQ_REQUIRE(params != nullptr, "DsrScorer::bind: null parameter buffer");
  p_ = params;
  g_ = grads;
}

std::vector<Param> DsrScorer::params() {
  DSRSQ_REQUIRE(p_ != nullptr, "DsrScorer::params: bind() first");
  const std::int64_t R = cfg_.d_r, C = c_;
  auto view = [&](float* base, std::int64_t off, Shape s) {
    return base ? TensorView(base + off, s) : TensorView();
  };
  auto make = [&](const char* name, std::int64_t off, Shape s, bool decay) {
    return Param{name, view(p_, off, s), view(g_, off, s), decay};
  };
  return {make("dsr.wq", o_wq_, Shape{R, C}, true),
          make("dsr.wc", o_wc_, Shape{R, C}, true),
          make("dsr.conv", o_conv_, Shape{cfg_.conv_width, C}, false),
          make("dsr.log_scale", o_scale_, Shape{1}, false),
          make("dsr.budget_w", o_bw_, Shape{cfg_.num_features()}, true),
          make("dsr.budget_b", o_bb_, Shape{1}, false)};
}

void DsrScorer::init(std::uint64_t seed) {
  DSRSQ_REQUIRE(p_ != nullptr, "DsrScorer::init: bind() first");
  Rng rng(seed, 0x445352);  // stream "DSR"
  const std::int64_t R = cfg_.d_r, C = c_;
  const double sd = 1.0 / std::sqrt(static_cast<double>(C));
  for (std::int64_t i = 0; i < R * C; ++i) {
    const float v = static_cast<float>(sd * rng.normal());
    p_[o_wq_ + i] = v;
    p_[o_wc_ + i] = v;  // tied at init: a random projection of the embedding cosine
  }
  for (std::int64_t t = 0; t < cfg_.conv_width; ++t)
    for (std::int64_t c = 0; c < C; ++c)
      p_[o_conv_ + t * C + c] = t == 0 ? 1.0f : static_cast<float>(0.02 * rng.normal());
  p_[o_scale_] = static_cast<float>(std::log(cfg_.init_scale));
  for (std::int64_t k = 0; k < cfg_.num_features(); ++k) p_[o_bw_ + k] = 0.0f;
  p_[o_bb_] = 0.0f;
}

BudgetHead DsrScorer::budget_head(std::int64_t n) const {
  DSRSQ_REQUIRE(p_ != nullptr, "DsrScorer: bind() first");
  BudgetHead h;
  h.w.assign(p_ + o_bw_, p_ + o_bw_ + cfg_.num_features());
  h.b = p_[o_bb_];
  h.log_sigma = std::log(cfg_.budget_sigma);
  h.base = static_cast<double>(resolve_base_budget(cfg_, n));
  h.alpha = cfg_.alpha;
  return h;
}

DsrForward DsrScorer::forward(const TensorView& context_emb, const TensorView& query_emb) const {
  const char* op = "DsrScorer::forward";
  check_dtype(op, "context_emb", context_emb, DType::f32);
  check_dtype(op, "query_emb", query_emb, DType::f32);
  DSRSQ_REQUIRE(context_emb.device == Device::cpu && query_emb.device == Device::cpu, op,
                ": embeddings must be on the CPU");
  DSRSQ_REQUIRE(context_emb.shape.rank == 2 && context_emb.dim(1) == c_ && context_emb.dim(0) >= 1, op,
                ": context_emb must be (N >= 1, ", c_, "), got ", context_emb.shape.str());
  DSRSQ_REQUIRE(query_emb.shape.rank == 2 && query_emb.dim(1) == c_ && query_emb.dim(0) >= 1, op,
                ": query_emb must be (Nq >= 1, ", c_, "), got ", query_emb.shape.str());
  DsrForward f;
  f.n = context_emb.dim(0);
  const float* ce = context_emb.ptr<float>();
  f.context.assign(ce, ce + f.n * c_);
  const std::int64_t nq = query_emb.dim(0);
  const float* qe = query_emb.ptr<float>();
  f.query.assign(sz(c_), 0.0);
  for (std::int64_t i = 0; i < nq; ++i)
    for (std::int64_t c = 0; c < c_; ++c) f.query[sz(c)] += qe[i * c_ + c];
  for (auto& v : f.query) v /= static_cast<double>(nq);
  encode(f);
  return f;
}

DsrForward DsrScorer::forward_tokens(const TensorView& wte, std::span<const std::int32_t> context_tokens,
                                     std::span<const std::int32_t> query_tokens) const {
  const char* op = "DsrScorer::forward_tokens";
  check_dtype(op, "wte", wte, DType::f32);
  DSRSQ_REQUIRE(wte.device == Device::cpu, op, ": wte must be on the CPU");
  DSRSQ_REQUIRE(wte.shape.rank == 2 && wte.dim(1) == c_, op, ": wte must be (V, ", c_, "), got ", wte.shape.str());
  DSRSQ_REQUIRE(!context_tokens.empty() && !query_tokens.empty(), op, ": empty context or query");
  const std::int64_t V = wte.dim(0);
  const float* table = wte.ptr<float>();
  auto row = [&](std::int32_t t) {
    DSRSQ_REQUIRE(t >= 0 && t < V, op, ": token id ", t, " out of range [0, ", V, ")");
    return table + static_cast<std::int64_t>(t) * c_;
  };
  DsrForward f;
  f.n = static_cast<std::int64_t>(context_tokens.size());
  f.context.resize(sz(f.n * c_));
  for (std::int64_t i = 0; i < f.n; ++i) {
    const float* r = row(context_tokens[sz(i)]);
    std::copy(r, r + c_, f.context.begin() + i * c_);
  }
  f.query.assign(sz(c_), 0.0);
  for (const std::int32_t t : query_tokens) {
    const float* r = row(t);
    for (std::int64_t c = 0; c < c_; ++c) f.query[sz(c)] += r[c];
  }
  for (auto& v : f.query) v /= static_cast<double>(query_tokens.size());
  encode(f);
  return f;
}

void DsrScorer::encode(DsrForward& f) const {
  DSRSQ_REQUIRE(p_ != nullptr, "DsrScorer::forward: bind() first");
  const std::int64_t N = f.n, C = c_, R = cfg_.d_r, W = cfg_.conv_width;
  f.c = C;
  f.d_r = R;
  f.span = cfg_.span;
  const float* wq = p_ + o_wq_;
  const float* wc = p_ + o_wc_;
  const float* a = p_ + o_conv_;
  f.scale = std::exp(static_cast<double>(p_[o_scale_]));

  f.u.assign(sz(R), 0.0);
  double uu = 0;
  for (std::int64_t j = 0; j < R; ++j) {
    double acc = 0;
    for (std::int64_t c = 0; c < C; ++c) acc += static_cast<double>(wq[j * C + c]) * f.query[sz(c)];
    f.u[sz(j)] = acc;
    uu += acc * acc;
  }
  f.u_norm = std::sqrt(uu + kNormEps);

  f.r.assign(sz(N * R), 0.0);
  f.r_norm.assign(sz(N), 0.0);
  f.cosine.assign(sz(N), 0.0);
  f.scores.assign(sz(N), 0.0);
  const float* E = f.context.data();
  // r_i = W_c e'_i with e' the causal depthwise convolution (Backend op, f64).
  cpu_backend().conv_project_fwd(ConvProjectArgs{TensorView(E, Shape{N, C}), TensorView(a, Shape{W, C}),
                                                 TensorView(wc, Shape{R, C}), TensorView(f.r.data(), Shape{N, R})});
  for (std::int64_t i = 0; i < N; ++i) {
    const RowScore rs = row_score(f.r.data() + i * R, R, f.u.data(), f.u_norm, f.scale);
    f.r_norm[sz(i)] = rs.norm;
    f.cosine[sz(i)] = rs.cosine;
    f.scores[sz(i)] = rs.score;
  }

  f.features.resize(sz(cfg_.num_features()));
  for (std::int64_t j = 0; j < R; ++j) f.features[sz(j)] = f.u[sz(j)] / f.u_norm;
  f.features[sz(R)] = std::log(static_cast<double>(N)) / 10.0;
  f.head = budget_head(N);
}

DsrSelection DsrScorer::select_inference(const TensorView& wte, std::span<const std::int32_t> context_tokens,
                                         std::span<const std::int32_t> query_tokens, DsrInferenceStats* stats) const {
  const char* op = "DsrScorer::select_inference";
  check_dtype(op, "wte", wte, DType::f32);
  DSRSQ_REQUIRE(wte.device == Device::cpu, op, ": wte must be on the CPU");
  DSRSQ_REQUIRE(wte.shape.rank == 2 && wte.dim(1) == c_, op, ": wte must be (V, ", c_, "), got ", wte.shape.str());
  DSRSQ_REQUIRE(!context_tokens.empty() && !query_tokens.empty(), op, ": empty context or query");
  DSRSQ_REQUIRE(p_ != nullptr, op, ": bind() first");
  const std::int64_t V = wte.dim(0), N = static_cast<std::int64_t>(context_tokens.size()), C = c_, R = cfg_.d_r,
                     W = cfg_.conv_width;
  const float* table = wte.ptr<float>();
  auto row = [&](std::int32_t t) {
    DSRSQ_REQUIRE(t >= 0 && t < V, op, ": token id ", t, " out of range [0, ", V, ")");
    return table + static_cast<std::int64_t>(t) * C;
  };
  // The query side exactly as forward_tokens + encode (same operation order).
  std::vector<double> query(sz(C), 0.0);
  for (const std::int32_t t : query_tokens) {
    const float* r = row(t);
    for (std::int64_t c = 0; c < C; ++c) query[sz(c)] += r[c];
  }
  for (auto& v : query) v /= static_cast<double>(query_tokens.size());
  const float* wq = p_ + o_wq_;
  std::vector<double> u(sz(R), 0.0);
  double uu = 0;
  for (std::int64_t j = 0; j < R; ++j) {
    double acc = 0;
    for (std::int64_t c = 0; c < C; ++c) acc += static_cast<double>(wq[j * C + c]) * query[sz(c)];
    u[sz(j)] = acc;
    uu += acc * acc;
  }
  const double u_norm = std::sqrt(uu + kNormEps);
  std::vector<double> features(sz(cfg_.num_features()));
  for (std::int64_t j = 0; j < R; ++j) features[sz(j)] = u[sz(j)] / u_norm;
  features[sz(R)] = std::log(static_cast<double>(N)) / 10.0;
  const double scale = std::exp(static_cast<double>(p_[o_scale_]));

  DsrSelection sel;
  sel.budget = sample_budget(budget_head(N), features, N, nullptr);
  if (sel.budget.budget >= N) {  // the whole context: nothing to score
    sel.full = true;
    sel.positions.resize(sz(N));
    std::iota(sel.positions.begin(), sel.positions.end(), 0);
    sel.selected_fraction = 1.0;
    if (stats) *stats = DsrInferenceStats{};
    return sel;
  }
  sel.k = seeds_for_budget(sel.budget.budget, cfg_.span);
  const std::int64_t k = std::min(sel.k, N);

  // One pass over the context in blocks: the block's embedding rows (with the
  // W - 1 rows before it, so the causal convolution sees its left neighbours),
  // r = conv + projection (the Backend op the training forward uses; its rows
  // are independent, so a block's rows equal the whole context's), scores,
  // and a bounded heap of the k best (worst on top).
  const std::int64_t blk = std::min(N, kInferenceBlock);
  std::vector<float> ebuf(sz((blk + W - 1) * C));
  std::vector<double> rbuf(sz((blk + W - 1) * R));
  struct Cand {
    double s;
    std::int32_t i;
  };
  auto worse_on_top = [](const Cand& a, const Cand& b) { return ranks_before(a.s, a.i, b.s, b.i); };
  std::vector<Cand> heap;
  heap.reserve(sz(k));
  for (std::int64_t i0 = 0; i0 < N; i0 += blk) {
    const std::int64_t i1 = std::min(N, i0 + blk), e0 = std::max<std::int64_t>(0, i0 - (W - 1)), m = i1 - e0;
    for (std::int64_t i = e0; i < i1; ++i) {
      const float* r = row(context_tokens[sz(i)]);
      std::copy(r, r + C, ebuf.begin() + (i - e0) * C);
    }
    cpu_backend().conv_project_fwd(ConvProjectArgs{TensorView(ebuf.data(), Shape{m, C}),
                                                   TensorView(p_ + o_conv_, Shape{W, C}),
                                                   TensorView(p_ + o_wc_, Shape{R, C}),
                                                   TensorView(rbuf.data(), Shape{m, R})});
    for (std::int64_t i = i0; i < i1; ++i) {
      const double s = row_score(rbuf.data() + (i - e0) * R, R, u.data(), u_norm, scale).score;
      const Cand c{s, static_cast<std::int32_t>(i)};
      if (static_cast<std::int64_t>(heap.size()) < k) {
        heap.push_back(c);
        std::push_heap(heap.begin(), heap.end(), worse_on_top);
      } else if (ranks_before(c.s, c.i, heap.front().s, heap.front().i)) {
        std::pop_heap(heap.begin(), heap.end(), worse_on_top);
        heap.back() = c;
        std::push_heap(heap.begin(), heap.end(), worse_on_top);
      }
    }
  }
  std::sort(heap.begin(), heap.end(), worse_on_top);  // best first: top_k's order
  sel.seeds.reserve(heap.size());
  for (const Cand& c : heap) sel.seeds.push_back(c.i);
  sel.positions = expand_spans(sel.seeds, cfg_.span, N);
  sel.selected_fraction = static_cast<double>(sel.positions.size()) / static_cast<double>(N);
  if (stats)
    *stats = DsrInferenceStats{ebuf.capacity() * sizeof(float) + rbuf.capacity() * sizeof(double) +
                               heap.capacity() * sizeof(Cand)};
  return sel;
}

void DsrScorer::backward(const DsrForward& fwd, std::span<const double> dscores, const BudgetGrad* dbudget,
                         double weight) {
  DSRSQ_REQUIRE(p_ != nullptr && g_ != nullptr, "DsrScorer::backward: bind() with a gradient buffer first");
  const std::int64_t N = fwd.n, C = c_, R = cfg_.d_r, W = cfg_.conv_width;
  DSRSQ_REQUIRE(fwd.c == C && fwd.d_r == R, "DsrScorer::backward: forward was made by another scorer (C=", fwd.c,
                ", d_r=", fwd.d_r, ")");
  DSRSQ_REQUIRE(static_cast<std::int64_t>(dscores.size()) == N, "DsrScorer::backward: dscores has ",
                dscores.size(), " entries, context ", N);

  if (dbudget) {
    const std::int64_t F = cfg_.num_features();
    if (!dbudget->dw.empty()) {
      DSRSQ_REQUIRE(static_cast<std::int64_t>(dbudget->dw.size()) == F, "DsrScorer::backward: budget dw has ",
                    dbudget->dw.size(), " entries, expected ", F);
      for (std::int64_t k = 0; k < F; ++k) g_[o_bw_ + k] += static_cast<float>(weight * dbudget->dw[sz(k)]);
    }
    g_[o_bb_] += static_cast<float>(weight * dbudget->db);
  }
  if (std::all_of(dscores.begin(), dscores.end(), [](double v) { return v == 0.0; })) return;

  // log_scale: d s_i / d log_scale = s_i.
  double dlog_scale = 0;
  for (std::int64_t i = 0; i < N; ++i) dlog_scale += dscores[sz(i)] * fwd.scores[sz(i)];
  g_[o_scale_] += static_cast<float>(weight * dlog_scale);

  // cos_i = u.r_i / (|u| |r_i|): d/du = r_i/(|u||r_i|) - cos_i u/|u|^2, d/dr_i = u/(|u||r_i|) - cos_i r_i/|r_i|^2.
  const double nu = fwd.u_norm;
  std::vector<double> dR(sz(N * R));
  std::vector<double> du(sz(R), 0.0);
  for (std::int64_t i = 0; i < N; ++i) {
    const double gc = dscores[sz(i)] * fwd.scale;
    const double nr = fwd.r_norm[sz(i)], cs = fwd.cosine[sz(i)];
    const double* ri = fwd.r.data() + i * R;
    double* dri = dR.data() + i * R;
    if (gc == 0.0) continue;  // dR row stays 0
    for (std::int64_t j = 0; j < R; ++j) {
      dri[j] = gc * (fwd.u[sz(j)] / (nu * nr) - cs * ri[j] / (nr * nr));
      du[sz(j)] += gc * (ri[j] / (nu * nr) - cs * fwd.u[sz(j)] / (nu * nu));
    }
  }
  // W_q: u = W_q q.
  for (std::int64_t j = 0; j < R; ++j)
    for (std::int64_t c = 0; c < C; ++c)
      g_[o_wq_ + j * C + c] += static_cast<float>(weight * du[sz(j)] * fwd.query[sz(c)]);

  // W_c and conv taps: the backward of the convolution + projection (Backend op).
  cpu_backend().conv_project_bwd(ConvProjectGradArgs{
      TensorView(fwd.context.data(), Shape{N, C}), TensorView(p_ + o_conv_, Shape{W, C}), TensorView(p_ + o_wc_, Shape{R, C}),
      TensorView(dR.data(), Shape{N, R}), TensorView(g_ + o_wc_, Shape{R, C}), TensorView(g_ + o_conv_, Shape{W, C}),
      weight});
}

DsrPolicyStats DsrScorer::policy_step(std::span<const DsrRecord> records, double baseline, double weight) {
  DsrPolicyStats st;
  st.baseline = baseline;
  if (records.empty()) return st;
  const double inv = 1.0 / static_cast<double>(records.size());
  for (const DsrRecord& rec : records) {
    DSRSQ_REQUIRE(rec.forward != nullptr && rec.selection != nullptr, "DsrScorer::policy_step: null record");
    const DsrForward& fwd = *rec.forward;
    const DsrSelection& sel = *rec.selection;
    DSRSQ_REQUIRE(static_cast<std::int64_t>(sel.positions.size()) <= fwd.n,
                  "DsrScorer::policy_step: selection does not belong to this forward");
    const SelectionSample ss{sel.seeds, rec.reward, sel.selection_log_prob};
    const PolicyLoss pl = selection_policy_loss(fwd.scores, std::span<const SelectionSample>(&ss, 1), baseline,
                                                cfg_.clip);
    const BudgetSampleRecord bs{fwd.features, sel.budget.z, rec.reward, sel.budget_log_prob};
    const BudgetLoss bl = budget_policy_loss(fwd.head, std::span<const BudgetSampleRecord>(&bs, 1), baseline,
                                             cfg_.clip, /*learn_sigma=*/false);
    st.selection_loss += pl.loss * inv;
    st.budget_loss += bl.loss * inv;
    st.mean_reward += rec.reward * inv;
    st.mean_advantage += (rec.reward - baseline) * inv;
    st.mean_ratio += pl.mean_ratio * inv;
    st.selection_clip_fraction += pl.clip_fraction * inv;
    st.budget_clip_fraction += bl.clip_fraction * inv;
    st.mean_selected_fraction += sel.selected_fraction * inv;
    st.mean_budget += static_cast<double>(sel.budget.budget) * inv;
    st.selection_ratios.push_back(pl.mean_ratio);  // one sample: its ratio
    st.selection_clipped.push_back(pl.clip_fraction > 0 ? 1 : 0);
    st.budget_ratios.push_back(std::exp(budget_log_prob(fwd.head, fwd.features, sel.budget.z) - sel.budget_log_prob));
    st.budget_clipped.push_back(bl.clip_fraction > 0 ? 1 : 0);
    st.advantages.push_back(rec.reward - baseline);
    if (weight != 0.0) backward(fwd, pl.dloss, &bl.dloss, weight * inv);
  }
  return st;
}

std::vector<DsrPolicyStats> DsrScorer::ppo_step(std::span<const PpoRecord> records, double baseline, double weight,
                                                const std::function<void()>& update) {
  std::vector<DsrRecord> recs;
  recs.reserve(records.size());
  for (const PpoRecord& r : records) {
    DSRSQ_REQUIRE(r.forward != nullptr && r.selection != nullptr, "DsrScorer::ppo_step: null record");
    recs.push_back(DsrRecord{r.forward, r.selection, r.reward});
  }
  std::vector<DsrPolicyStats> out;
  for (std::int64_t e = 0; e < cfg_.ppo_epochs; ++e) {
    if (e > 0) {
      DSRSQ_REQUIRE(static_cast<bool>(update), "DsrScorer::ppo_step: ppo_epochs ", cfg_.ppo_epochs,
                    " > 1 needs an update step");
      update();
      for (const PpoRecord& r : records) refresh(*r.forward);
    }
    out.push_back(policy_step(recs, baseline, weight));
  }
  return out;
}

DsrPolicyStats DsrScorer::policy_step(std::span<const DsrRecord> records, MovingAverageBaseline& baseline,
                                      double weight) {
  const DsrPolicyStats st = policy_step(records, baseline.value(), weight);
  if (!records.empty()) baseline.update(st.mean_reward);
  return st;
}

}  // namespace dsrsq::retrieval
