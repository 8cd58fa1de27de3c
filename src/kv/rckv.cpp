#include "kv/rckv.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>

#include "backend/cpu/cpu_backend.hpp"
#include "core/error.hpp"

namespace dsrsq::compress {

namespace {

std::size_t round64(std::size_t n) { return (n + 63) / 64 * 64; }

void check_samples(const char* what, const TensorView& x, std::int64_t C) {
  DSRSQ_INPUT_CHECK(x.shape.rank == 2 && x.dtype == DType::f32 && x.shape[1] == C && x.shape[0] >= 1, what,
                    ": samples must be f32 (N, C=", C, ") with N >= 1, got ", x.str());
  DSRSQ_INPUT_CHECK(x.device == Device::cpu, what, ": samples must be in host memory");
}

// P (dc, C) = top-dc eigenvectors of X^T X (rows), U (C, dc) = P^T.
void pca_fit(const float* x, std::int64_t N, std::int64_t C, std::int64_t dc, float* P, float* U) {
  // The samples are host memory (check_samples): the CPU backend's ops.
  Backend& be = cpu_backend();
  std::vector<double> m(static_cast<std::size_t>(C * C)), vals(static_cast<std::size_t>(C)),
      vecs(static_cast<std::size_t>(C * C));
  be.gram(GramArgs{TensorView(x, Shape{N, C}), TensorView(m.data(), Shape{C, C})});
  be.sym_eigen(SymEigenArgs{TensorView(m.data(), Shape{C, C}), TensorView(vals.data(), Shape{C}),
                            TensorView(vecs.data(), Shape{C, C})});
  std::vector<std::int64_t> idx(static_cast<std::size_t>(C));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) {
    return vals[static_cast<std::size_t>(a)] > vals[static_cast<std::size_t>(b)];
  });
  for (std::int64_t r = 0; r < dc; ++r) {
    const std::int64_t col = idx[static_cast<std::size_t>(r)];
    std::int64_t big = 0;
    for (std::int64_t c = 1; c < C; ++c)
      if (std::abs(vecs[static_cast<std::size_t>(c * C + col)]) > std::abs(vecs[static_cast<std::size_t>(big * C + col)]))
        big = c;
    const double sign = vecs[static_cast<std::size_t>(big * C + col)] < 0 ? -1.0 : 1.0;
    for (std::int64_t c = 0; c < C; ++c) {
      const auto val = static_cast<float>(sign * vecs[static_cast<std::size_t>(c * C + col)]);
      P[r * C + c] = val;
      U[c * dc + r] = val;
    }
  }
}

}  // namespace

namespace detail {
bool lapack_eigen_available() { return cpu::lapack_eigen_available(); }
void symmetric_eigen(const std::vector<double>& a, std::int64_t n, std::vector<double>& vals,
                     std::vector<double>& vecs, bool force_jacobi) {
  DSRSQ_REQUIRE(n >= 1 && a.size() == static_cast<std::size_t>(n * n), "symmetric_eigen: a must be (n, n)");
  vals.assign(static_cast<std::size_t>(n), 0.0);
  vecs.assign(static_cast<std::size_t>(n * n), 0.0);
  cpu_backend().sym_eigen(SymEigenArgs{TensorView(a.data(), Shape{n, n}), TensorView(vals.data(), Shape{n}),
                                       TensorView(vecs.data(), Shape{n, n}), force_jacobi});
}
}  // namespace detail

// ---- RckvConfig -----------------------------------------------------------------

void RckvConfig::validate(const ModelConfig& model) const {
  DSRSQ_INPUT_CHECK(d_c >= 1 && d_c <= model.d_model, "rckv_d_c: the latent size must lie in [1, d_model=",
                    model.d_model, "], got ", d_c);
  DSRSQ_INPUT_CHECK(window >= 0, "rckv_window: the uncompressed window must be >= 0 tokens, got ", window);
  DSRSQ_INPUT_CHECK(tau >= 0.0 && std::isfinite(tau), "rckv_tau: the eviction temperature must be finite and >= 0, got ",
                    tau);
  DSRSQ_INPUT_CHECK(importance_decay >= 0.0 && importance_decay < 1.0,
                    "rckv_importance_decay: must lie in [0, 1), got ", importance_decay);
  if (sqa) {
    DSRSQ_INPUT_CHECK(sqa_cfg.clusters >= 1, "rckv_sqa_clusters: must be >= 1, got ", sqa_cfg.clusters);
    DSRSQ_INPUT_CHECK(sqa_cfg.top_clusters >= 1, "rckv_sqa_top_clusters: must be >= 1, got ", sqa_cfg.top_clusters);
    DSRSQ_INPUT_CHECK(sqa_cfg.lloyd_steps >= 0, "rckv_sqa_lloyd_steps: must be >= 0, got ", sqa_cfg.lloyd_steps);
  }
}

// ---- RckvProjections ------------------------------------------------------------

RckvProjections::RckvProjections(const ModelConfig& model, const RckvConfig& cfg)
    : L_(model.n_layers), C_(model.d_model), dc_(cfg.d_c) {
  cfg.validate(model);
}

std::int64_t RckvProjections::num_parameters(const ModelConfig& model, const RckvConfig& cfg) {
  cfg.validate(model);
  return model.n_layers * 4 * cfg.d_c * model.d_model;
}

void RckvProjections::bind(float* params, float* grads) {
  DSRSQ_INPUT_CHECK(params != nullptr, "RckvProjections::bind: parameter buffer is null");
  params_ = params;
  grads_ = grads;
}

float* RckvProjections::at(std::int64_t l, int which) const {
  DSRSQ_REQUIRE(params_ != nullptr, "RckvProjections: bind() the parameter buffer first");
  DSRSQ_REQUIRE(l >= 0 && l < L_, "RckvProjections: layer ", l, " outside [0, ", L_, ")");
  return params_ + (l * 4 + which) * dc_ * C_;
}

std::vector<Param> RckvProjections::params() const {
  DSRSQ_REQUIRE(params_ != nullptr, "RckvProjections: bind() the parameter buffer first");
  static const char* names[4] = {"pk", "pv", "uk", "uv"};
  std::vector<Param> out;
  for (std::int64_t l = 0; l < L_; ++l)
    for (int w = 0; w < 4; ++w) {
      const std::int64_t off = (l * 4 + w) * dc_ * C_;
      const Shape s = w < 2 ? Shape{dc_, C_} : Shape{C_, dc_};
      out.push_back(Param{dsrsq::detail::cat("rckv.", l, ".", names[w]), TensorView(params_ + off, s),
                          grads_ ? TensorView(grads_ + off, s) : TensorView(), false});
    }
  return out;
}

void RckvProjections::init_orthonormal(std::uint64_t seed) {
  for (std::int64_t l = 0; l < L_; ++l)
    for (int w = 0; w < 2; ++w) {
      Rng rng(seed, static_cast<std::uint64_t>(l * 2 + w));
      std::vector<double> p(static_cast<std::size_t>(dc_ * C_));
      for (std::int64_t i = 0; i < dc_; ++i) {
        double* row = p.data() + i * C_;
        for (int attempt = 0;; ++attempt) {
          for (std::int64_t c = 0; c < C_; ++c) row[c] = rng.normal();
          // Modified Gram-Schmidt, twice for orthogonality to working precision.
          for (int pass = 0; pass < 2; ++pass)
            for (std::int64_t j = 0; j < i; ++j) {
              const double* rj = p.data() + j * C_;
              double d = 0;
              for (std::int64_t c = 0; c < C_; ++c) d += row[c] * rj[c];
              for (std::int64_t c = 0; c < C_; ++c) row[c] -= d * rj[c];
            }
          double nn = 0;
          for (std::int64_t c = 0; c < C_; ++c) nn += row[c] * row[c];
          if (nn > 1e-12 || attempt > 20) {
            const double inv = 1.0 / std::sqrt(nn);
            for (std::int64_t c = 0; c < C_; ++c) row[c] *= inv;
            break;
          }
        }
      }
      float* P = at(l, w);
      float* U = at(l, w + 2);
      for (std::int64_t i = 0; i < dc_; ++i)
        for (std::int64_t c = 0; c < C_; ++c) {
          const auto val = static_cast<float>(p[static_cast<std::size_t>(i * C_ + c)]);
          P[i * C_ + c] = val;
          U[c * dc_ + i] = val;
        }
    }
}

void RckvProjections::init_pca(std::int64_t layer, const TensorView& k, const TensorView& v) {
  DSRSQ_INPUT_CHECK(layer >= 0 && layer < L_, "rckv init_pca: layer ", layer, " outside [0, ", L_, ")");
  check_samples("rckv init_pca: k", k, C_);
  check_samples("rckv init_pca: v", v, C_);
  pca_fit(k.ptr<float>(), k.shape[0], C_, dc_, pk(layer), uk(layer));
  pca_fit(v.ptr<float>(), v.shape[0], C_, dc_, pv(layer), uv(layer));
}

double RckvProjections::compression_loss(std::int64_t layer, const TensorView& k, const TensorView& v) {
  DSRSQ_INPUT_CHECK(layer >= 0 && layer < L_, "rckv compression_loss: layer ", layer, " outside [0, ", L_, ")");
  check_samples("rckv compression_loss: k", k, C_);
  check_samples("rckv compression_loss: v", v, C_);
  DSRSQ_INPUT_CHECK(k.shape[0] == v.shape[0], "rckv compression_loss: k has ", k.shape[0], " rows, v has ", v.shape[0]);
  const std::int64_t N = k.shape[0];
  saved_layer_ = layer;
  saved_n_ = N;
  saved_k_.assign(k.ptr<float>(), k.ptr<float>() + N * C_);
  saved_v_.assign(v.ptr<float>(), v.ptr<float>() + N * C_);
  Backend& be = cpu_backend();  // host samples (check_samples)
  const TensorView ks(saved_k_.data(), Shape{N, C_}), vs(saved_v_.data(), Shape{N, C_});
  const double s = be.lowrank_recon_fwd(LowRankReconArgs{ks, TensorView(pk(layer), Shape{dc_, C_}),
                                                         TensorView(uk(layer), Shape{C_, dc_})}) +
                   be.lowrank_recon_fwd(LowRankReconArgs{vs, TensorView(pv(layer), Shape{dc_, C_}),
                                                         TensorView(uv(layer), Shape{C_, dc_})});
  return s / (static_cast<double>(N) * static_cast<double>(C_));
}

void RckvProjections::compression_loss_backward(double dloss) {
  DSRSQ_REQUIRE(saved_layer_ >= 0, "rckv compression_loss_backward: no compression_loss() call to differentiate");
  DSRSQ_REQUIRE(grads_ != nullptr, "rckv compression_loss_backward: bind() a gradient buffer first");
  const std::int64_t l = saved_layer_, N = saved_n_;
  const double scale = 2.0 * dloss / (static_cast<double>(N) * static_cast<double>(C_));
  auto g = [&](int w) { return grads_ + (l * 4 + w) * dc_ * C_; };
  Backend& be = cpu_backend();
  const Shape ps{dc_, C_}, us{C_, dc_};
  be.lowrank_recon_bwd(LowRankReconGradArgs{TensorView(saved_k_.data(), Shape{N, C_}), TensorView(pk(l), ps),
                                            TensorView(uk(l), us), TensorView(g(0), ps), TensorView(g(2), us), scale});
  be.lowrank_recon_bwd(LowRankReconGradArgs{TensorView(saved_v_.data(), Shape{N, C_}), TensorView(pv(l), ps),
                                            TensorView(uv(l), us), TensorView(g(1), ps), TensorView(g(3), us), scale});
}

// ---- RckvPolicy -------------------------------------------------------------------

RckvPolicy::RckvPolicy(const ModelConfig& model, Backend& backend, const RckvProjections& proj, RckvConfig cfg)
    : mc_(model), be_(backend), proj_(proj), cfg_(std::move(cfg)),
      scratch_("rckv_scratch", std::size_t{1} << 20, backend.allocator()) {
  cfg_.validate(mc_);
  DSRSQ_INPUT_CHECK(proj.layers() == mc_.n_layers && proj.channels() == mc_.d_model && proj.latent() == cfg_.d_c,
                    "KV policy 'rckv': projections (layers ", proj.layers(), ", C ", proj.channels(), ", d_c ",
                    proj.latent(), ") do not match the model/config (layers ", mc_.n_layers, ", C ", mc_.d_model,
                    ", d_c ", cfg_.d_c, ")");
  DSRSQ_INPUT_CHECK(backend.device() == Device::cpu, "KV policy 'rckv': runs on the CPU backend only");
}

// One byte rule for every policy (results/README.md, "KV bytes"): K, V and
// the per-slot state a policy keeps resident count; token positions (one i32
// per kept token) count for no policy, as in KVBudget::full_bytes.
std::size_t RckvPolicy::slot_bytes() const { return 2 * static_cast<std::size_t>(cfg_.d_c) * 4 + 4; }
std::size_t RckvPolicy::window_token_bytes() const { return 2 * static_cast<std::size_t>(mc_.d_model) * 4; }

void RckvPolicy::begin(const SequenceInfo& info, const KVBudget& budget) {
  kvdetail::check_sequence(mc_, info);
  const std::int64_t total = info.prompt_len + info.max_new_tokens;
  const std::size_t requested = budget.resolve(mc_, info.budget_basis());
  begun_ = false;
  arena_.reset();
  scratch_.reset();
  scratch_.reset_peak();
  stats_.clear();
  info_ = info;
  budget_ = budget;
  scratch_floor_ = 0;
  decoding_ = false;
  sqa_active_ = false;
  requested_ = requested;

  const std::int64_t L = mc_.n_layers, B = info.batch, NH = mc_.n_heads, HS = mc_.head_size(), C = mc_.d_model,
                     dc = cfg_.d_c;
  W_ = std::min(cfg_.window, total);
  const auto Lz = static_cast<std::size_t>(L);
  m_ = cfg_.sqa ? cfg_.sqa_cfg.clusters : 0;
  if (cfg_.buffer > 0) {
    S_ = cfg_.buffer;
  } else {
    // Everything kept counts inside the budget: the window, and with SQA its
    // index (centroids and cluster sizes per layer, an assignment per slot and head).
    const std::size_t sqa_fixed = cfg_.sqa ? static_cast<std::size_t>(NH * m_ * HS + NH * m_) * 4 : 0;
    const std::size_t sqa_slot = cfg_.sqa ? static_cast<std::size_t>(NH) * 4 : 0;
    const std::size_t fixed_all = Lz * (static_cast<std::size_t>(W_) * window_token_bytes() + sqa_fixed);
    const std::size_t fit = requested > fixed_all ? (requested - fixed_all) / (Lz * (slot_bytes() + sqa_slot)) : 0;
    S_ = std::max<std::int64_t>(1, static_cast<std::int64_t>(fit));
    S_ = std::min(S_, std::max<std::int64_t>(1, total - W_));
  }
  {
    const std::size_t sqa_fixed = cfg_.sqa ? static_cast<std::size_t>(NH * m_ * HS + NH * m_) * 4 : 0;
    const std::size_t sqa_slot = cfg_.sqa ? static_cast<std::size_t>(NH) * 4 : 0;
    const std::size_t minimum = Lz * (static_cast<std::size_t>(W_) * window_token_bytes() + sqa_fixed + slot_bytes() +
                                      sqa_slot);
    infeasible_ = minimum > requested;
  }
  const std::size_t sqa_row = cfg_.sqa ? static_cast<std::size_t>(NH * m_ * HS + NH * S_ + NH * m_) * 4 : 0;
  achieved_ = Lz * (static_cast<std::size_t>(S_) * slot_bytes() + static_cast<std::size_t>(W_) * window_token_bytes() +
                    sqa_row);
  // Over budget for any reason (its fixed minimum, or an explicit --rckv_buffer
  // larger than the budget allows) is over budget: the cell is infeasible.
  infeasible_ = infeasible_ || achieved_ > requested;

  // Two blocks (f32, i32) for all layers and rows.
  const std::int64_t f_row = 2 * S_ * dc + S_ + 2 * W_ * C + NH * m_ * HS;  // per (layer, row)
  // Positions (one i32 per kept token) live outside the KV arena: counted by
  // no policy (the one byte rule), like the full cache's.
  const std::int64_t i_row = std::max<std::int64_t>(1, cfg_.sqa ? NH * S_ + NH * m_ : 0);
  const std::int64_t nf = L * B * f_row, ni = L * B * i_row;
  arena_ = std::make_unique<Arena>("kv_cache_rckv", round64(static_cast<std::size_t>(nf) * 4) +
                                                        round64(static_cast<std::size_t>(ni) * 4),
                                   be_.allocator());
  float* fb = arena_->zeros(Shape{nf}, DType::f32).ptr<float>();
  std::int32_t* ib = arena_->allocate(Shape{ni}, DType::i32).ptr<std::int32_t>();
  std::fill_n(ib, ni, -1);
  fbase_ = fb;
  ibase_ = ib;
  nf_ = nf;
  ni_ = ni;
  positions_.assign(static_cast<std::size_t>(L * B * (S_ + W_)), -1);
  std::int32_t* pb = positions_.data();
  ck_.clear(); cv_.clear(); wimp_.clear(); wk_.clear(); wv_.clear(); bpos_.clear(); wpos_.clear();
  cent_.clear(); cassign_.clear(); csize_.clear();
  for (std::int64_t l = 0; l < L; ++l) {
    ck_.push_back(fb); fb += B * S_ * dc;
    cv_.push_back(fb); fb += B * S_ * dc;
    wimp_.push_back(fb); fb += B * S_;
    wk_.push_back(fb); fb += B * W_ * C;
    wv_.push_back(fb); fb += B * W_ * C;
    cent_.push_back(fb); fb += B * NH * m_ * HS;
    bpos_.push_back(pb); pb += B * S_;
    wpos_.push_back(pb); pb += B * W_;
    cassign_.push_back(ib); ib += cfg_.sqa ? B * NH * S_ : 0;
    csize_.push_back(ib); ib += cfg_.sqa ? B * NH * m_ : 0;
  }
  m_eff_.assign(Lz, 0);
  st_.assign(Lz, LayerState{});
  rng_.clear();
  for (std::int64_t l = 0; l < L; ++l) rng_.emplace_back(cfg_.seed, static_cast<std::uint64_t>(l));
  resident_ = peak_ = 0;
  prefill_scratch_ = 0;
  begun_ = true;
}

void RckvPolicy::reconstruct_keys(std::int64_t layer, std::int64_t b, std::int64_t n, float* dst) const {
  const std::int64_t C = mc_.d_model, dc = cfg_.d_c, NH = mc_.n_heads, HS = mc_.head_size();
  const auto l = static_cast<std::size_t>(layer);
  be_.linear_fwd(LinearArgs{TensorView(ck_[l] + b * S_ * dc, Shape{n, dc}),
                            TensorView(proj_.uk(layer), Shape{C, dc}), TensorView(), TensorView(dst, Shape{n, C})});
  be_.rope_fwd(RopeArgs{TensorView(dst, Shape{n, NH, HS}), TensorView(bpos_[l] + b * S_, Shape{n}), mc_.rope_theta});
}

std::int64_t RckvPolicy::choose_victim(const float* w, std::int64_t n, double tau, Rng& rng) {
  DSRSQ_REQUIRE(n >= 1, "rckv choose_victim: empty buffer");
  std::int64_t best = 0, ties = 1;
  for (std::int64_t i = 1; i < n; ++i)
    if (w[i] < w[best]) {
      best = i;
      ties = 1;
    } else if (w[i] == w[best]) {
      ++ties;
    }
  if (tau <= 0.0) {
    if (ties == 1) return best;
    // Equal importances carry no preference: draw one of them uniformly (a
    // fixed "lowest slot" rule would always evict the oldest token, BOS first).
    auto pick = static_cast<std::int64_t>(rng.uniform() * static_cast<double>(ties));
    pick = std::min(pick, ties - 1);
    for (std::int64_t i = best; i < n; ++i)
      if (w[i] == w[best] && pick-- == 0) return i;
    return best;
  }
  const double wmin = w[best];
  double total = 0;
  for (std::int64_t i = 0; i < n; ++i) total += std::exp(-(static_cast<double>(w[i]) - wmin) / tau);
  const double u = rng.uniform() * total;
  double run = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    run += std::exp(-(static_cast<double>(w[i]) - wmin) / tau);
    if (run > u) return i;
  }
  return n - 1;  // rounding at the end of the sum
}

// attend() in named steps: rotate the queries, gather the window and the new
// tokens (exact keys), score the new tokens' importance, attend to them,
// attend to the buffer in latent space and merge (the Backend's one merge),
// update the importance, account, push.
void RckvPolicy::attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos,
                        TensorView out) {
  kvdetail::check_attend("KV policy 'rckv'", begun_, mc_, info_.batch, layer, q, k, v, pos, out);
  const std::int64_t B = info_.batch, Tn = q.shape[1], NH = mc_.n_heads, HS = mc_.head_size();
  ArenaScope scope(scratch_);
  // 1. Queries rotated at their original positions (in place: caller's scratch).
  be_.rope_fwd(RopeArgs{q.reshaped(Shape{B * Tn, NH, HS}), pos.reshaped(Shape{B * Tn}), mc_.rope_theta, mc_.attn_log_base});
  // 2. Window + new tokens: exact keys (rotated copies; k stays pre-RoPE for push()).
  const ExactKV w = gather_exact(layer, k, v, pos);
  // 3. Importance of the call's tokens from the attention they receive.
  score_new_tokens(q, w, pos);
  // 4. Exact attention over window + new tokens (SQA for a multi-token call).
  TensorView lse_w = scratch_.allocate(Shape{B, NH, Tn}, DType::f32);
  attend_exact(q, w, pos, out, lse_w);
  // 5. Buffer in latent space, merged into out; importance EMA.
  std::vector<double> buf_keys_used(static_cast<std::size_t>(B * Tn), 0.0);
  attend_buffer(layer, q, pos, lse_w, out, buf_keys_used);
  // 6. Memory accounting and decode statistics.
  account(layer, Tn, buf_keys_used);
  // 7. New tokens enter the window; the overflow is compressed into the buffer.
  push(layer, k, v, pos, scratch_);
}

RckvPolicy::ExactKV RckvPolicy::gather_exact(std::int64_t layer, const TensorView& k, const TensorView& v,
                                             const TensorView& pos) {
  const std::int64_t B = info_.batch, Tn = k.shape[1], NH = mc_.n_heads, HS = mc_.head_size(), C = mc_.d_model,
                     dc = cfg_.d_c;
  const auto l = static_cast<std::size_t>(layer);
  const LayerState& st = st_[l];
  ExactKV w;
  w.win = st.win_len;
  w.S = st.win_len + Tn;
  const std::int64_t Sw = w.S;
  w.K = scratch_.allocate(Shape{B, Sw, NH, HS}, DType::f32);
  w.V = scratch_.allocate(Shape{B, Sw, NH, HS}, DType::f32);
  w.pos = scratch_.allocate(Shape{B, Sw}, DType::i32);
  const TensorView K2 = w.K.reshaped(Shape{B * Sw, C}), V2 = w.V.reshaped(Shape{B * Sw, C});
  const TensorView P2 = w.pos.reshaped(Shape{B * Sw, 1});
  const TensorView k2 = k.reshaped(Shape{B * Tn, C}), v2 = v.reshaped(Shape{B * Tn, C}),
                   p2 = pos.reshaped(Shape{B * Tn, 1});
  // Window ring rows (oldest first), then the call's tokens, per batch row.
  std::vector<std::int32_t> idx(static_cast<std::size_t>(std::max<std::int64_t>(st.win_len, 1)));
  for (std::int64_t b = 0; b < B; ++b) {
    if (st.win_len > 0) {
      for (std::int64_t i = 0; i < st.win_len; ++i)
        idx[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(b * W_ + (st.win_head + i) % W_);
      const TensorView ix(idx.data(), Shape{st.win_len});
      be_.gather_rows({TensorView(wk_[l], Shape{B * W_, C}), ix, K2.rows(b * Sw, st.win_len)});
      be_.gather_rows({TensorView(wv_[l], Shape{B * W_, C}), ix, V2.rows(b * Sw, st.win_len)});
      be_.gather_rows({TensorView(wpos_[l], Shape{B * W_, 1}), ix, P2.rows(b * Sw, st.win_len)});
    }
    be_.copy(k2.rows(b * Tn, Tn), K2.rows(b * Sw + st.win_len, Tn));
    be_.copy(v2.rows(b * Tn, Tn), V2.rows(b * Sw + st.win_len, Tn));
    be_.copy(p2.rows(b * Tn, Tn), P2.rows(b * Sw + st.win_len, Tn));
  }
  // As in DSRSQ's training forward (RckvTrainTransform): new tokens this call
  // pushes out of the window (the first Tn - W) are seen by every query of the
  // call through their reconstruction U P x, the way later calls will see them.
  // Only the attention copies change: push() compresses the original k, v.
  if (cfg_.train_matched_prefill && Tn > W_) {
    const std::int64_t M = Tn - W_;
    TensorView x = scratch_.allocate(Shape{M, C}, DType::f32);
    TensorView z = scratch_.allocate(Shape{M, dc}, DType::f32);
    TensorView xh = scratch_.allocate(Shape{M, C}, DType::f32);
    for (int kind = 0; kind < 2; ++kind) {
      const TensorView dst = kind == 0 ? K2 : V2;
      const TensorView P(const_cast<float*>(kind == 0 ? proj_.pk(layer) : proj_.pv(layer)), Shape{dc, C});
      const TensorView U(const_cast<float*>(kind == 0 ? proj_.uk(layer) : proj_.uv(layer)), Shape{C, dc});
      for (std::int64_t b = 0; b < B; ++b) {
        const TensorView rows = dst.rows(b * Sw + st.win_len, M);
        be_.copy(rows, x);
        be_.linear_fwd(LinearArgs{x, P, {}, z});
        be_.linear_fwd(LinearArgs{z, U, {}, xh});
        be_.copy(xh, rows);
      }
    }
  }
  be_.rope_fwd(RopeArgs{w.K.reshaped(Shape{B * Sw, NH, HS}), w.pos.reshaped(Shape{B * Sw}), mc_.rope_theta});
  return w;
}

// The importance a multi-token call's tokens start with (push() stores it):
// the attention mass each receives in the dense softmax over the window and
// the call (f64; mean over heads).
//   default:          every query i of the call, weighted as the decode-time
//                     EMA would weigh it: (1 - decay) decay^(Tn-1-i), so a
//                     prompt token is scored by the attention it actually got;
//   observe_prefill:  the call's last max(W, 1) queries, uniform (SnapKV's
//                     observation window).
// A single-token call (decode) leaves new_mass_ at -1 (its token enters the
// window; a window token reaching the buffer starts at the buffer mean).
void RckvPolicy::score_new_tokens(const TensorView& q, const ExactKV& w, const TensorView& pos) {
  const std::int64_t B = info_.batch, Tn = q.shape[1], NH = mc_.n_heads;
  new_mass_.assign(static_cast<std::size_t>(B * Tn), -1.0f);
  if (Tn <= 1) return;
  std::vector<double> rw(static_cast<std::size_t>(Tn), 0.0);
  double divisor = static_cast<double>(NH);
  if (cfg_.observe_prefill) {
    const std::int64_t obs = std::min<std::int64_t>(Tn, std::max<std::int64_t>(W_, 1));
    for (std::int64_t i = Tn - obs; i < Tn; ++i) rw[static_cast<std::size_t>(i)] = 1.0;
    divisor = static_cast<double>(obs * NH);
  } else {
    const double decay = cfg_.importance_decay;
    for (std::int64_t i = 0; i < Tn; ++i)
      rw[static_cast<std::size_t>(i)] = (1.0 - decay) * std::pow(decay, static_cast<double>(Tn - 1 - i));
  }
  TensorView mass = scratch_.allocate(Shape{B, w.S}, DType::f64);
  be_.attention_mass(AttentionMassArgs{q, w.K, pos, w.pos, TensorView(rw.data(), Shape{Tn}), mass, divisor});
  const double* md = mass.ptr<double>();
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < Tn; ++i)
      new_mass_[static_cast<std::size_t>(b * Tn + i)] = static_cast<float>(md[b * w.S + w.win + i]);
}

void RckvPolicy::attend_exact(const TensorView& q, const ExactKV& w, const TensorView& pos, const TensorView& out,
                              const TensorView& lse_w) {
  if (cfg_.sqa && q.shape[1] > 1) {
    // SQA over the call's tokens (and the window), as in training: k-means over
    // their keys, each query attends exactly to its top-k_c clusters.
    const attention::ClusterPlan plan = attention::cluster_plan(q, w.K, pos, w.pos, cfg_.sqa_cfg);
    attention::cluster_attention_fwd(be_, plan, AttentionArgs{q, w.K, w.V, out, lse_w, pos, w.pos, true, 0.0});
  } else {
    be_.attention_fwd(AttentionArgs{q, w.K, w.V, out, lse_w, pos, w.pos, true, 0.0});
  }
}

void RckvPolicy::attend_buffer(std::int64_t layer, const TensorView& q, const TensorView& pos, const TensorView& lse_w,
                               const TensorView& out, std::vector<double>& buf_keys_used) {
  const std::int64_t B = info_.batch, Tn = q.shape[1], NH = mc_.n_heads, HS = mc_.head_size(), C = mc_.d_model,
                     dc = cfg_.d_c;
  const auto l = static_cast<std::size_t>(layer);
  const std::int64_t n = st_[l].buf_len;
  if (n == 0) return;
  TensorView Kb = scratch_.allocate(Shape{B, n, C}, DType::f32);
  for (std::int64_t b = 0; b < B; ++b) reconstruct_keys(layer, b, n, Kb.ptr<float>() + b * n * C);
  const double decay = cfg_.importance_decay;
  std::vector<double> rw(static_cast<std::size_t>(Tn));
  for (std::int64_t i = 0; i < Tn; ++i)
    rw[static_cast<std::size_t>(i)] = (1.0 - decay) * std::pow(decay, static_cast<double>(Tn - 1 - i));
  TensorView ob = scratch_.allocate(Shape{B, Tn, NH, HS}, DType::f64);
  TensorView lb = scratch_.allocate(Shape{B, NH, Tn}, DType::f64);
  TensorView mass = scratch_.zeros(Shape{B, n}, DType::f64);
  LatentAttentionArgs la;
  la.q = q;
  la.k = Kb.reshaped(Shape{B, n, NH, HS});
  la.q_pos = pos;
  la.k_pos = TensorView(bpos_[l], Shape{B, S_});
  la.latent = TensorView(cv_[l], Shape{B, S_, dc});
  la.up = TensorView(const_cast<float*>(proj_.uv(layer)), Shape{C, dc});
  la.o = ob;
  la.lse = lb;
  if (decoding_ && m_eff_[l] > 0) {  // SQA at decode: only the top-k_c clusters' slots
    la.centroids = TensorView(cent_[l], Shape{B, NH, m_, HS});
    la.assign = TensorView(cassign_[l], Shape{B, NH, S_});
    la.sizes = TensorView(csize_[l], Shape{B, NH, m_});
    la.clusters = m_eff_[l];
    la.top_clusters = cfg_.sqa_cfg.top_clusters;
  }
  la.lse_other = lse_w;
  la.row_weight = TensorView(rw.data(), Shape{Tn});
  la.mass = mass;
  la.used = TensorView(buf_keys_used.data(), Shape{B, Tn});
  be_.latent_attention_fwd(la);
  // The one log-sum-exp merge (f64 partial into the f32 window result).
  be_.attention_merge(AttentionMergeArgs{out, lse_w, ob, lb});
  // Importance EMA over this call's query rows (in order), policy metadata.
  const double dT = std::pow(decay, static_cast<double>(Tn));
  const double* md = mass.ptr<double>();
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t j = 0; j < n; ++j) {
      float& wj = wimp_[l][b * S_ + j];
      wj = static_cast<float>(dT * wj + md[b * n + j]);
    }
}

void RckvPolicy::account(std::int64_t layer, std::int64_t Tn, const std::vector<double>& buf_keys_used) {
  const std::int64_t B = info_.batch, NH = mc_.n_heads, C = mc_.d_model;
  const LayerState& st = st_[static_cast<std::size_t>(layer)];
  if (decoding_) {
    const std::int64_t n = st.buf_len;
    const std::size_t tok = 2 * static_cast<std::size_t>(C) * sizeof(float);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < Tn; ++i) {
        const std::int64_t exact = st.win_len + i + 1;
        stats_.read_bytes += static_cast<std::size_t>(n) * slot_bytes() + static_cast<std::size_t>(exact) * tok;
        stats_.keys += static_cast<double>(exact) + buf_keys_used[static_cast<std::size_t>(b * Tn + i)] / NH;
        stats_.queries += 1;
      }
    if (layer == 0) stats_.tokens += Tn;
  } else {
    peak_ = std::max(peak_, arena_->peak_bytes());
  }
}

void RckvPolicy::push(std::int64_t layer, const TensorView& k, const TensorView& v, const TensorView& pos,
                      Arena& scratch) {
  const std::int64_t B = info_.batch, Tn = k.shape[1], C = mc_.d_model, dc = cfg_.d_c;
  const auto l = static_cast<std::size_t>(layer);
  LayerState& st = st_[l];
  const float* ks = k.ptr<float>();
  const float* vs = v.ptr<float>();
  const auto* pp = pos.ptr<std::int32_t>();
  const std::size_t row = static_cast<std::size_t>(C) * sizeof(float);

  const std::int64_t E = std::max<std::int64_t>(0, st.win_len + Tn - W_);
  const std::int64_t e_w = std::min(st.win_len, E), e_n = E - e_w;
  TensorView Ck, Cv;
  std::vector<std::int32_t> epos(static_cast<std::size_t>(B * E));
  if (E > 0) {
    TensorView X = scratch.allocate(Shape{B * E, C}, DType::f32);
    TensorView Y = scratch.allocate(Shape{B * E, C}, DType::f32);
    float* xd = X.ptr<float>();
    float* yd = Y.ptr<float>();
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t e = 0; e < e_w; ++e) {
        const std::int64_t r = (st.win_head + e) % W_;
        std::memcpy(xd + (b * E + e) * C, wk_[l] + (b * W_ + r) * C, row);
        std::memcpy(yd + (b * E + e) * C, wv_[l] + (b * W_ + r) * C, row);
        epos[static_cast<std::size_t>(b * E + e)] = wpos_[l][b * W_ + r];
      }
      for (std::int64_t e = 0; e < e_n; ++e) {
        std::memcpy(xd + (b * E + e_w + e) * C, ks + (b * Tn + e) * C, row);
        std::memcpy(yd + (b * E + e_w + e) * C, vs + (b * Tn + e) * C, row);
        epos[static_cast<std::size_t>(b * E + e_w + e)] = pp[b * Tn + e];
      }
    }
    Ck = scratch.allocate(Shape{B * E, dc}, DType::f32);
    Cv = scratch.allocate(Shape{B * E, dc}, DType::f32);
    be_.linear_fwd(LinearArgs{X, TensorView(proj_.pk(layer), Shape{dc, C}), TensorView(), Ck});
    be_.linear_fwd(LinearArgs{Y, TensorView(proj_.pv(layer), Shape{dc, C}), TensorView(), Cv});
  }

  // Window ring: drop the e_w oldest, append the new tokens that stay.
  if (W_ > 0) {
    st.win_head = (st.win_head + e_w) % W_;
    st.win_len -= e_w;
    for (std::int64_t t = e_n; t < Tn; ++t) {
      const std::int64_t r = (st.win_head + st.win_len) % W_;
      for (std::int64_t b = 0; b < B; ++b) {
        std::memcpy(wk_[l] + (b * W_ + r) * C, ks + (b * Tn + t) * C, row);
        std::memcpy(wv_[l] + (b * W_ + r) * C, vs + (b * Tn + t) * C, row);
        wpos_[l][b * W_ + r] = pp[b * Tn + t];
      }
      ++st.win_len;
    }
  }

  // Buffer: free slot, else evict (per row).
  const float* ckd = E > 0 ? Ck.ptr<float>() : nullptr;
  const float* cvd = E > 0 ? Cv.ptr<float>() : nullptr;
  std::vector<float> cand(static_cast<std::size_t>(S_ + 1));
  for (std::int64_t e = 0; e < E; ++e) {
    const bool room = st.buf_len < S_;
    const std::int64_t filled = st.buf_len;
    for (std::int64_t b = 0; b < B; ++b) {
      float* w = wimp_[l] + b * S_;
      double mean = 0;
      if (filled > 0) {
        for (std::int64_t j = 0; j < filled; ++j) mean += w[j];
        mean /= static_cast<double>(filled);
      }
      // A token of this call with an observation-window mass starts there, and
      // competes for its place: when the buffer is full and it is the least
      // important (or drawn, tau > 0), it is the one evicted (never stored).
      const bool observed = e >= e_w && new_mass_.size() == static_cast<std::size_t>(B * Tn) &&
                            new_mass_[static_cast<std::size_t>(b * Tn + (e - e_w))] >= 0.0f;
      const float w_new = observed ? new_mass_[static_cast<std::size_t>(b * Tn + (e - e_w))] : static_cast<float>(mean);
      std::int64_t slot = filled;
      if (!room) {
        if (observed) {
          std::copy(w, w + S_, cand.begin());
          cand[static_cast<std::size_t>(S_)] = w_new;
          slot = choose_victim(cand.data(), S_ + 1, cfg_.tau, rng_[l]);
          if (slot == S_) continue;  // the incoming token is the least important: dropped
        } else {
          slot = choose_victim(w, S_, cfg_.tau, rng_[l]);
        }
      }
      std::memcpy(ck_[l] + (b * S_ + slot) * dc, ckd + (b * E + e) * dc, static_cast<std::size_t>(dc) * sizeof(float));
      std::memcpy(cv_[l] + (b * S_ + slot) * dc, cvd + (b * E + e) * dc, static_cast<std::size_t>(dc) * sizeof(float));
      bpos_[l][b * S_ + slot] = epos[static_cast<std::size_t>(b * E + e)];
      w[slot] = w_new;
      if (m_eff_[l] > 0) assign_slot(layer, b, slot);
    }
    if (room) ++st.buf_len;
  }
}

void RckvPolicy::assign_slot(std::int64_t layer, std::int64_t b, std::int64_t slot) {
  const std::int64_t NH = mc_.n_heads, HS = mc_.head_size(), C = mc_.d_model, dc = cfg_.d_c;
  const auto l = static_cast<std::size_t>(layer);
  std::vector<float> key(static_cast<std::size_t>(C));
  std::int32_t p = bpos_[l][b * S_ + slot];
  be_.linear_fwd(LinearArgs{TensorView(ck_[l] + (b * S_ + slot) * dc, Shape{1, dc}),
                            TensorView(proj_.uk(layer), Shape{C, dc}), TensorView(), TensorView(key.data(), Shape{1, C})});
  be_.rope_fwd(RopeArgs{TensorView(key.data(), Shape{1, NH, HS}), TensorView(&p, Shape{1}), mc_.rope_theta});
  const std::int64_t me = m_eff_[l];
  for (std::int64_t h = 0; h < NH; ++h) {
    const float* cen = cent_[l] + (b * NH + h) * m_ * HS;
    std::int64_t best = 0;
    double bd = std::numeric_limits<double>::infinity();
    for (std::int64_t c = 0; c < me; ++c) {
      double d2 = 0;
      for (std::int64_t x = 0; x < HS; ++x) {
        const double d = static_cast<double>(key[static_cast<std::size_t>(h * HS + x)]) - cen[c * HS + x];
        d2 += d * d;
      }
      if (d2 < bd) {
        bd = d2;
        best = c;
      }
    }
    std::int32_t& a = cassign_[l][(b * NH + h) * S_ + slot];
    std::int32_t* sz = csize_[l] + (b * NH + h) * m_;
    if (a >= 0) --sz[a];
    a = static_cast<std::int32_t>(best);
    ++sz[best];
  }
}

void RckvPolicy::build_clusters() {
  const std::int64_t L = mc_.n_layers, B = info_.batch, NH = mc_.n_heads, HS = mc_.head_size(), C = mc_.d_model;
  for (std::int64_t layer = 0; layer < L; ++layer) {
    const auto l = static_cast<std::size_t>(layer);
    const std::int64_t n = st_[l].buf_len;
    m_eff_[l] = 0;
    if (n == 0) continue;
    const std::int64_t me = std::min(m_, n);
    std::vector<float> keys(static_cast<std::size_t>(n * C));
    std::vector<double> x(static_cast<std::size_t>(n * HS));
    for (std::int64_t b = 0; b < B; ++b) {
      reconstruct_keys(layer, b, n, keys.data());
      for (std::int64_t h = 0; h < NH; ++h) {
        for (std::int64_t j = 0; j < n; ++j)
          for (std::int64_t d = 0; d < HS; ++d)
            x[static_cast<std::size_t>(j * HS + d)] = keys[static_cast<std::size_t>(j * C + h * HS + d)];
        Rng rng(cfg_.sqa_cfg.seed, static_cast<std::uint64_t>((layer * B + b) * NH + h));
        const attention::KMeansResult km = attention::kmeans(x.data(), n, HS, me, cfg_.sqa_cfg.lloyd_steps, rng);
        float* cen = cent_[l] + (b * NH + h) * m_ * HS;
        for (std::int64_t i = 0; i < me * HS; ++i) cen[i] = static_cast<float>(km.centroids[static_cast<std::size_t>(i)]);
        std::int32_t* as = cassign_[l] + (b * NH + h) * S_;
        std::int32_t* sz = csize_[l] + (b * NH + h) * m_;
        std::fill_n(as, S_, -1);
        std::fill_n(sz, m_, 0);
        for (std::int64_t j = 0; j < n; ++j) {
          as[j] = km.assign[static_cast<std::size_t>(j)];
          ++sz[as[j]];
        }
      }
    }
    m_eff_[l] = me;
    sqa_active_ = true;
  }
}

void RckvPolicy::end_prefill() {
  DSRSQ_INPUT_CHECK(begun_, "KV policy 'rckv': end_prefill() before begin()");
  if (cfg_.sqa) build_clusters();
  decoding_ = true;
  resident_ = arena_->used_bytes();
  peak_ = std::max(peak_, arena_->peak_bytes());
  prefill_scratch_ = std::max(scratch_.peak_bytes(), scratch_floor_);
}

KVMemory RckvPolicy::memory() const {
  KVMemory m = kvdetail::arena_memory(arena_.get(), decoding_, resident_, peak_, stats_);
  // Prefill scratch (every key a prompt's queries attended) counts in the peak.
  m.peak_prefill += decoding_ ? prefill_scratch_ : std::max(scratch_.peak_bytes(), scratch_floor_);
  return m;
}

struct RckvPolicy::State {
  SequenceInfo info;
  KVBudget budget;
  bool decoding = false, sqa_active = false;
  std::vector<std::int32_t> positions;
  std::vector<std::int64_t> m_eff;
  std::vector<LayerState> layers;
  std::vector<Rng> rng;
  std::vector<float> new_mass;
  std::size_t requested = 0, achieved = 0, resident = 0, peak = 0, prefill_scratch = 0, scratch_peak = 0;
  bool infeasible = false;
  kvdetail::DecodeStats stats;
};

std::unique_ptr<KVSnapshot> RckvPolicy::snapshot() const {
  DSRSQ_INPUT_CHECK(begun_, "KV policy 'rckv': snapshot() before begin()");
  auto s = std::make_unique<kvdetail::PolicySnapshot<State>>();
  s->owner = this;
  s->state = State{info_, budget_, decoding_, sqa_active_, positions_, m_eff_, st_, rng_, new_mass_,
                   requested_, achieved_, resident_, peak_, prefill_scratch_,
                   std::max(scratch_.peak_bytes(), scratch_floor_), infeasible_, stats_};
  s->blocks.resize(2);
  s->blocks[0].save(be_, TensorView(fbase_, Shape{nf_}));
  s->blocks[1].save(be_, TensorView(ibase_, Shape{ni_}));
  s->host_bytes = positions_.size() * sizeof(std::int32_t) + rng_.size() * sizeof(Rng) +
                  st_.size() * sizeof(LayerState) + m_eff_.size() * sizeof(std::int64_t) +
                  new_mass_.size() * sizeof(float);
  return s;
}

void RckvPolicy::restore(const KVSnapshot& snap) {
  const auto& s = kvdetail::snapshot_of<kvdetail::PolicySnapshot<State>>(snap, this, "rckv");
  const State& st = s.state;
  // Same sequence and budget: the same layout (slots, window, clusters), so
  // the arena and the views into it and into positions_ are reused;
  // otherwise begin() rebuilds them as they were.
  if (!begun_ || !kvdetail::same_sequence(info_, st.info) || requested_ != st.requested) begin(st.info, st.budget);
  s.blocks[0].load(be_, TensorView(fbase_, Shape{nf_}));
  s.blocks[1].load(be_, TensorView(ibase_, Shape{ni_}));
  // Element-wise into the existing storage: bpos_/wpos_ point into positions_.
  DSRSQ_REQUIRE(positions_.size() == st.positions.size(), "rckv restore: positions layout mismatch");
  std::copy(st.positions.begin(), st.positions.end(), positions_.begin());
  decoding_ = st.decoding;
  sqa_active_ = st.sqa_active;
  m_eff_ = st.m_eff;
  st_ = st.layers;
  rng_ = st.rng;
  new_mass_ = st.new_mass;
  requested_ = st.requested;
  achieved_ = st.achieved;
  resident_ = st.resident;
  peak_ = st.peak;
  prefill_scratch_ = st.prefill_scratch;
  infeasible_ = st.infeasible;
  stats_ = st.stats;
  // The scratch held nothing between calls; its high-water mark so far is the snapshot's.
  scratch_.reset();
  scratch_.reset_peak();
  scratch_floor_ = st.scratch_peak;
}

std::vector<std::int32_t> RckvPolicy::slot_positions(std::int64_t layer, std::int64_t b) const {
  DSRSQ_INPUT_CHECK(begun_ && layer >= 0 && layer < mc_.n_layers && b >= 0 && b < info_.batch,
                    "rckv: slot_positions(", layer, ", ", b, ") out of range");
  const auto l = static_cast<std::size_t>(layer);
  std::vector<std::int32_t> r(static_cast<std::size_t>(S_), -1);
  for (std::int64_t j = 0; j < st_[l].buf_len; ++j) r[static_cast<std::size_t>(j)] = bpos_[l][b * S_ + j];
  return r;
}

std::vector<float> RckvPolicy::slot_importance(std::int64_t layer, std::int64_t b) const {
  DSRSQ_INPUT_CHECK(begun_ && layer >= 0 && layer < mc_.n_layers && b >= 0 && b < info_.batch,
                    "rckv: slot_importance(", layer, ", ", b, ") out of range");
  const auto l = static_cast<std::size_t>(layer);
  return std::vector<float>(wimp_[l] + b * S_, wimp_[l] + (b + 1) * S_);
}

void RckvPolicy::set_slot_importance(std::int64_t layer, std::int64_t b, const std::vector<float>& w) {
  DSRSQ_INPUT_CHECK(begun_ && layer >= 0 && layer < mc_.n_layers && b >= 0 && b < info_.batch &&
                        static_cast<std::int64_t>(w.size()) <= S_,
                    "rckv: set_slot_importance(", layer, ", ", b, ") out of range");
  std::copy(w.begin(), w.end(), wimp_[static_cast<std::size_t>(layer)] + b * S_);
}

}  // namespace dsrsq::compress
