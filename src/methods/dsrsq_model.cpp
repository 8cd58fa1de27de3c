#include "methods/dsrsq_model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "dist/sharded_top_k.hpp"
#include "kv/kv_policy.hpp"

namespace dsrsq {

DsrsqVariant DsrsqVariant::named(const std::string& name) {
  DsrsqVariant v;
  v.name = name;
  if (name == "full_model") return v;
  if (name == "no_dsr") v.dsr = false;
  else if (name == "no_sqa") v.sqa = false;
  else if (name == "no_rckv") v.rckv = false;
  else raise_input_error("unknown DSRSQ variant '" + name + "' (valid: full_model, no_dsr, no_sqa, no_rckv)");
  return v;
}

// ---- SQA as the training attention --------------------------------------------------

void ClusterAttentionOverride::forward(std::int64_t layer, const AttentionArgs& a) {
  auto& plan = plans_.at(static_cast<std::size_t>(layer));
  plan = attention::cluster_plan(a.q, a.k, a.q_pos, a.k_pos, cfg_);
  attention::cluster_attention_fwd(be_, plan, a);
}

void ClusterAttentionOverride::backward(std::int64_t layer, const AttentionGradArgs& a) {
  attention::cluster_attention_bwd(be_, plans_.at(static_cast<std::size_t>(layer)), a);
}

double ClusterAttentionOverride::key_fraction() const {
  double s = 0;
  for (const auto& p : plans_) s += p.stats.key_fraction();
  return plans_.empty() ? 0.0 : s / static_cast<double>(plans_.size());
}

double ClusterAttentionOverride::active_cluster_fraction() const {
  double s = 0;
  for (const auto& p : plans_) s += p.stats.active_cluster_fraction(p.m);
  return plans_.empty() ? 0.0 : s / static_cast<double>(plans_.size());
}

// ---- RCKV in the training forward -------------------------------------------------------

void RckvTrainTransform::set_rows(const std::vector<std::uint8_t>& compress) {
  rows_.clear();
  for (std::size_t i = 0; i < compress.size(); ++i)
    if (compress[i]) rows_.push_back(static_cast<std::int64_t>(i));
}

TensorView RckvTrainTransform::p_of(std::int64_t layer, int kind, bool grad) const {
  const auto params = proj_.params();  // pk, pv, uk, uv per layer
  const Param& p = params.at(static_cast<std::size_t>(4 * layer + kind));
  return grad ? p.grad : p.value;
}

TensorView RckvTrainTransform::u_of(std::int64_t layer, int kind, bool grad) const {
  const auto params = proj_.params();
  const Param& p = params.at(static_cast<std::size_t>(4 * layer + 2 + kind));
  return grad ? p.grad : p.value;
}

void RckvTrainTransform::forward(std::int64_t layer, TensorView k, TensorView v) {
  if (x_.size() <= static_cast<std::size_t>(layer)) {
    x_.resize(static_cast<std::size_t>(layer) + 1);
    z_.resize(static_cast<std::size_t>(layer) + 1);
  }
  const std::int64_t C = k.shape[1], dc = proj_.latent(), M = static_cast<std::int64_t>(rows_.size());
  for (int kind = 0; kind < 2; ++kind) {
    auto& x = x_[static_cast<std::size_t>(layer)][static_cast<std::size_t>(kind)];
    auto& z = z_[static_cast<std::size_t>(layer)][static_cast<std::size_t>(kind)];
    x.resize(static_cast<std::size_t>(M * C));
    z.resize(static_cast<std::size_t>(M * dc));
    if (M == 0) continue;
    float* t = (kind == 0 ? k : v).ptr<float>();
    for (std::int64_t r = 0; r < M; ++r)
      std::memcpy(x.data() + r * C, t + rows_[static_cast<std::size_t>(r)] * C, sizeof(float) * static_cast<std::size_t>(C));
    std::vector<float> xh(static_cast<std::size_t>(M * C));
    be_.linear_fwd(LinearArgs{TensorView(x.data(), Shape{M, C}), p_of(layer, kind, false), {}, TensorView(z.data(), Shape{M, dc})});
    be_.linear_fwd(LinearArgs{TensorView(z.data(), Shape{M, dc}), u_of(layer, kind, false), {}, TensorView(xh.data(), Shape{M, C})});
    for (std::int64_t r = 0; r < M; ++r)
      std::memcpy(t + rows_[static_cast<std::size_t>(r)] * C, xh.data() + r * C, sizeof(float) * static_cast<std::size_t>(C));
  }
}

void RckvTrainTransform::backward(std::int64_t layer, TensorView dk, TensorView dv) {
  const std::int64_t C = dk.shape[1], dc = proj_.latent(), M = static_cast<std::int64_t>(rows_.size());
  if (M == 0) return;
  for (int kind = 0; kind < 2; ++kind) {
    auto& x = x_[static_cast<std::size_t>(layer)][static_cast<std::size_t>(kind)];
    auto& z = z_[static_cast<std::size_t>(layer)][static_cast<std::size_t>(kind)];
    float* g = (kind == 0 ? dk : dv).ptr<float>();
    std::vector<float> dxh(static_cast<std::size_t>(M * C)), dz(static_cast<std::size_t>(M * dc)), dx(dxh.size());
    for (std::int64_t r = 0; r < M; ++r)
      std::memcpy(dxh.data() + r * C, g + rows_[static_cast<std::size_t>(r)] * C, sizeof(float) * static_cast<std::size_t>(C));
    be_.linear_bwd(LinearGradArgs{TensorView(dxh.data(), Shape{M, C}), TensorView(z.data(), Shape{M, dc}),
                                  u_of(layer, kind, false), TensorView(dz.data(), Shape{M, dc}), u_of(layer, kind, true), {},
                                  false});
    be_.linear_bwd(LinearGradArgs{TensorView(dz.data(), Shape{M, dc}), TensorView(x.data(), Shape{M, C}),
                                  p_of(layer, kind, false), TensorView(dx.data(), Shape{M, C}), p_of(layer, kind, true), {},
                                  false});
    for (std::int64_t r = 0; r < M; ++r)
      std::memcpy(g + rows_[static_cast<std::size_t>(r)] * C, dx.data() + r * C, sizeof(float) * static_cast<std::size_t>(C));
  }
}

// ---- the model -----------------------------------------------------------------------

DsrsqModel::DsrsqModel(Transformer& backbone, DsrsqSettings s, Backend& be)
    : model_(backbone), s_(s), be_(be), scorer_(backbone.config().d_model, s.dsr),
      proj_(backbone.config(), s.rckv), arena_("dsrsq_parameters", 1 << 20, be.allocator()),
      baseline_(s.dsr.baseline_decay), sqa_(be, s.sqa, backbone.config().n_layers), kvt_(proj_, be) {
  const std::int64_t nd = scorer_.num_parameters(), nr = proj_.num_parameters(backbone.config(), s.rckv);
  extra_ = arena_.zeros(Shape{nd + nr}, DType::f32);
  extra_grad_ = arena_.zeros(Shape{nd + nr}, DType::f32);
  scorer_.bind(extra_.ptr<float>(), extra_grad_.ptr<float>());
  proj_.bind(extra_.ptr<float>() + nd, extra_grad_.ptr<float>() + nd);
  extra_params_ = scorer_.params();
  for (auto& p : proj_.params()) extra_params_.push_back(p);
  if (s_.dsr.ppo_epochs > 1) {
    scorer_params_ = scorer_.params();
    ppo_opt_ = std::make_unique<AdamW>(scorer_params_, TensorView(extra_.ptr<float>(), Shape{nd}), s_.ppo_adam, be);
  }
}

void DsrsqModel::zero_extra_grad() { be_.fill(extra_grad_, 0.0); }

void DsrsqModel::init(std::uint64_t seed) {
  scorer_.init(seed ^ 0xD5A);
  proj_.init_orthonormal(seed ^ 0x2CC);
}

void DsrsqModel::gather_saved_kv(std::int64_t layer, const std::vector<std::int64_t>& rows, std::vector<float>& k,
                                 std::vector<float>& v) const {
  const std::int64_t C = model_.config().d_model;
  const float* ks = model_.saved_keys(layer).ptr<float>();
  const float* vs = model_.saved_values(layer).ptr<float>();
  const auto row = sizeof(float) * static_cast<std::size_t>(C);
  for (std::size_t r = 0; r < rows.size(); ++r) {
    std::memcpy(k.data() + r * static_cast<std::size_t>(C), ks + rows[r] * C, row);
    std::memcpy(v.data() + r * static_cast<std::size_t>(C), vs + rows[r] * C, row);
  }
}

void DsrsqModel::init_projections_pca(const std::vector<const Encoded*>& seqs, std::int32_t pad_id) {
  if (seqs.empty()) return;
  HostBatch hb = make_batch(seqs, pad_id, 1.0f);
  const bool saved = model_.save_pre_rope_keys;
  model_.save_pre_rope_keys = true;
  AttentionOverride* att = model_.attention_override;
  KVTransform* kvt = model_.kv_transform;
  model_.attention_override = nullptr;
  model_.kv_transform = nullptr;
  model_.forward(hb.view());
  const std::int64_t C = model_.config().d_model;
  std::vector<std::int64_t> real;
  for (std::int64_t i = 0; i < hb.B * hb.T; ++i)
    if (hb.mask[static_cast<std::size_t>(i)] > 0) real.push_back(i);
  std::vector<float> k(real.size() * static_cast<std::size_t>(C)), v(k.size());
  for (std::int64_t l = 0; l < model_.config().n_layers; ++l) {
    gather_saved_kv(l, real, k, v);
    const Shape sh{static_cast<std::int64_t>(real.size()), C};
    proj_.init_pca(l, TensorView(k.data(), sh), TensorView(v.data(), sh));
  }
  model_.save_pre_rope_keys = saved;
  model_.attention_override = att;
  model_.kv_transform = kvt;
}

DsrsqModel::Example DsrsqModel::score(const Encoded& enc, Rng* rng) const {
  // [BOS] context [SEP] query [ANS] ...
  const std::int64_t n = enc.context_tokens;
  DSRSQ_REQUIRE(n >= 1, "DSRSQ: an example with no context tokens");
  std::span<const std::int32_t> ctx(enc.tokens.data() + 1, static_cast<std::size_t>(n));
  const std::int64_t q0 = enc.prompt_len - enc.query_len + 1, q1 = enc.prompt_len - 1;  // the question
  std::span<const std::int32_t> query = q1 > q0 ? std::span<const std::int32_t>(enc.tokens.data() + q0, static_cast<std::size_t>(q1 - q0))
                                                : std::span<const std::int32_t>(enc.tokens.data() + q0 - 1, 2);
  const Param& wte = model_.param("wte");
  Example ex;
  ex.n = n;
  ex.fwd = scorer_.forward_tokens(wte.value, ctx, query);
  retrieval::TopK top;
  if (sp_comm_ && sp_comm_->size() > 1)
    top = [this](std::span<const double> v, std::int64_t k) { return dist::sharded_top_k(*sp_comm_, v, k); };
  ex.sel = retrieval::select(ex.fwd, rng, top);
  return ex;
}

namespace {

// One selected sequence: kept token indices into enc.tokens (sorted), the
// prompt's length in the original indexing.
std::vector<std::int32_t> kept_indices(const Encoded& enc, const std::vector<std::int32_t>& ctx_positions, bool with_answer) {
  std::vector<std::int32_t> idx{0};
  for (auto p : ctx_positions) idx.push_back(p + 1);
  const auto end = with_answer ? static_cast<std::int64_t>(enc.tokens.size()) : enc.prompt_len;
  for (std::int64_t i = 1 + enc.context_tokens; i < end; ++i) idx.push_back(static_cast<std::int32_t>(i));
  return idx;
}

}  // namespace

std::vector<std::int32_t> dsr_positions(const std::vector<std::int32_t>& selected, bool compact) {
  if (!compact) return selected;
  std::vector<std::int32_t> out(selected.size());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<std::int32_t>(i);
  return out;
}

HostBatch DsrsqModel::training_batch(const std::vector<const Encoded*>& seqs, std::int32_t pad_id, float lm_weight,
                                     std::optional<std::uint64_t> sample_seed, std::int64_t pad_multiple) {
  batch_.clear();
  std::vector<std::vector<std::int32_t>> kept;
  for (const auto* e : seqs) {
    std::uint64_t h = 1469598103934665603ull;  // FNV-1a over the tokens
    for (auto t : e->tokens) h = (h ^ static_cast<std::uint32_t>(t)) * 1099511628211ull;
    Rng rng(sample_seed.value_or(0), h);
    batch_.push_back(score(*e, sample_seed ? &rng : nullptr));
    kept.push_back(kept_indices(*e, batch_.back().sel.positions, true));
  }
  HostBatch hb;
  hb.B = static_cast<std::int64_t>(seqs.size());
  for (const auto& k : kept) hb.T = std::max<std::int64_t>(hb.T, static_cast<std::int64_t>(k.size()) - 1);
  if (pad_multiple > 1) hb.T = (hb.T + pad_multiple - 1) / pad_multiple * pad_multiple;
  const std::size_t N = static_cast<std::size_t>(hb.B * hb.T);
  // Padding sits after every real input (positions <= max_seq_len - 2) at the
  // last position, so no real token sees it.
  const auto pad_pos = static_cast<std::int32_t>(model_.config().max_pos - 1);
  hb.tokens.assign(N, pad_id);
  hb.pos.assign(N, pad_pos);
  hb.targets.assign(N, pad_id);
  hb.mask.assign(N, 0.0f);
  hb.is_answer.assign(N, 0);
  hb.compress.assign(N, 0);
  for (std::int64_t b = 0; b < hb.B; ++b) {
    const Encoded& e = *seqs[static_cast<std::size_t>(b)];
    const auto& k = kept[static_cast<std::size_t>(b)];
    // Inference keeps the last `window` prompt tokens exact, the older ones compressed.
    const auto prompt_kept = static_cast<std::int64_t>(std::count_if(k.begin(), k.end(), [&](std::int32_t i) { return i < e.prompt_len; }));
    const std::int64_t compressed = std::max<std::int64_t>(0, prompt_kept - s_.rckv.window);
    for (std::int64_t t = 0; t < std::min<std::int64_t>(compressed, hb.T); ++t) hb.compress[static_cast<std::size_t>(b * hb.T + t)] = 1;
    for (std::size_t t = 0; t + 1 < k.size(); ++t) {
      const std::size_t i = static_cast<std::size_t>(b * hb.T) + t;
      hb.tokens[i] = e.tokens[static_cast<std::size_t>(k[t])];
      hb.pos[i] = s_.compact_positions ? static_cast<std::int32_t>(t) : k[t];  // as inference will (dsr_positions)
      hb.targets[i] = e.tokens[static_cast<std::size_t>(k[t + 1])];
      if (k[t + 1] >= e.prompt_len) {
        hb.mask[i] = 1.0f;
        hb.is_answer[i] = 1;
        ++hb.answer_tokens;
      } else if (k[t + 1] == k[t] + 1) {
        hb.mask[i] = lm_weight;  // language modelling only where the true next token was kept
      }
    }
  }
  return hb;
}

HofWeights DsrsqModel::hof_weights(std::int64_t step) const {
  HofWeights w;
  w.ramp = s_.ramp > 0 ? std::min(1.0, static_cast<double>(step) / static_cast<double>(s_.ramp)) : 1.0;
  w.task = s_.g[0];
  w.retrieval = s_.g[1] * w.ramp;
  w.compression = s_.g[2] * w.ramp;
  w.compute = s_.g[3] * w.ramp;
  return w;
}

std::vector<double> DsrsqModel::retrieval_rewards(const std::vector<double>& answer_loss) const {
  std::vector<double> rewards(batch_.size());
  for (std::size_t b = 0; b < batch_.size(); ++b)
    rewards[b] = retrieval::dsr_reward(-answer_loss[b], static_cast<std::int64_t>(batch_[b].sel.positions.size()),
                                       batch_[b].n, s_.dsr.lambda);
  return rewards;
}

double DsrsqModel::compression_term(const HostBatch& local, dist::Communicator* comm, double weight) {
  // Every layer's pre-RoPE K and V of this rank's real tokens.
  const std::int64_t C = model_.config().d_model;
  std::vector<std::int64_t> real;
  for (std::int64_t i = 0; i < local.B * local.T; ++i)
    if (local.tokens[static_cast<std::size_t>(i)] >= 0 && local.pos[static_cast<std::size_t>(i)] < model_.config().max_pos - 1)
      real.push_back(i);
  double rows_global = static_cast<double>(real.size());
  if (comm) comm->all_reduce_sum(std::span<double>(&rows_global, 1));
  // This rank's layer losses are means over its rows: weight them by its share.
  const double share_rows = rows_global > 0 ? static_cast<double>(real.size()) / rows_global : 0.0;
  std::vector<float> k(real.size() * static_cast<std::size_t>(C)), v(k.size());
  double comp = 0;
  if (!real.empty()) {
    for (std::int64_t l = 0; l < model_.config().n_layers; ++l) {
      gather_saved_kv(l, real, k, v);
      const Shape sh{static_cast<std::int64_t>(real.size()), C};
      comp += proj_.compression_loss(l, TensorView(k.data(), sh), TensorView(v.data(), sh));
      if (weight > 0) proj_.compression_loss_backward(weight * share_rows);
    }
  }
  return comp * share_rows;  // summed over ranks: the global mean (over rows) of the per-layer sum
}

double DsrsqModel::compute_term_local() const {
  double sum = 0;
  for (const auto& ex : batch_) {
    const double mu = ex.fwd.head.mean_logit(ex.fwd.features);
    const double sg = 1.0 / (1.0 + std::exp(-mu));
    const double base = static_cast<double>(retrieval::resolve_base_budget(s_.dsr, ex.n));
    const double budget = base * (1.0 + s_.dsr.alpha * sg);
    sum += std::min(1.0, budget / static_cast<double>(ex.n));
  }
  return sum;
}

void DsrsqModel::compute_term_backward(double global_sequences, double weight) {
  // Expected selected fraction at the budget head's mean: d/dmu * features (pathwise).
  for (const auto& ex : batch_) {
    const double mu = ex.fwd.head.mean_logit(ex.fwd.features);
    const double sg = 1.0 / (1.0 + std::exp(-mu));
    const double base = static_cast<double>(retrieval::resolve_base_budget(s_.dsr, ex.n));
    const double budget = base * (1.0 + s_.dsr.alpha * sg);
    const double n = static_cast<double>(ex.n);
    if (!(budget < n)) continue;
    const double d = base * s_.dsr.alpha * sg * (1.0 - sg) / n / global_sequences;
    if (d == 0) continue;
    retrieval::BudgetGrad bg;
    bg.dw.assign(ex.fwd.features.size(), 0.0);
    for (std::size_t i = 0; i < bg.dw.size(); ++i) bg.dw[i] = d * ex.fwd.features[i];
    bg.db = d;
    const std::vector<double> zero(static_cast<std::size_t>(ex.n), 0.0);
    scorer_.backward(ex.fwd, zero, &bg, weight);
  }
}

std::vector<retrieval::DsrPolicyStats> DsrsqModel::retrieval_term(const std::vector<double>& rewards, double baseline,
                                                                  double weight, bool ppo, bool lead,
                                                                  dist::Communicator* comm, std::optional<double> lr) {
  std::vector<retrieval::DsrPolicyStats> stats;
  const std::int64_t epochs = s_.dsr.ppo_epochs;
  // Without PPO updates (ppo_epochs 1, or a zero retrieval weight before the ramp): one pass.
  if (epochs <= 1 || !ppo) {
    if (lead && !batch_.empty()) {
      std::vector<retrieval::DsrRecord> recs;
      for (std::size_t b = 0; b < batch_.size(); ++b) recs.push_back({&batch_[b].fwd, &batch_[b].sel, rewards[b]});
      stats.push_back(scorer_.policy_step(recs, baseline, weight));
    }
    return stats;
  }
  DSRSQ_INPUT_CHECK(lr.has_value(), "DSRSQ: dsr_ppo_epochs = ", epochs,
                    " needs the step's learning rate for the retriever's inner PPO updates (hof_terms' lr)");
  DSRSQ_REQUIRE(ppo_opt_ != nullptr, "DSRSQ: no inner PPO optimizer");
  // Between epochs: the retriever's gradient summed over the world (every rank,
  // lead or not, so the replicas stay equal), its own AdamW step, zeroed.
  const TensorView g(extra_grad_.ptr<float>(), Shape{scorer_.num_parameters()});
  auto update = [&] {
    if (comm) comm->all_reduce_sum(std::span<float>(g.ptr<float>(), static_cast<std::size_t>(g.numel())));
    ppo_opt_->step(*lr);
    be_.fill(g, 0.0);
  };
  if (lead && !batch_.empty()) {
    std::vector<retrieval::PpoRecord> recs;
    for (std::size_t b = 0; b < batch_.size(); ++b) recs.push_back({&batch_[b].fwd, &batch_[b].sel, rewards[b]});
    stats = scorer_.ppo_step(recs, baseline, weight, update);
  } else {
    for (std::int64_t e = 1; e < epochs; ++e) update();
  }
  return stats;
}

HofTerms DsrsqModel::hof_terms(std::int64_t step, const HostBatch& local, const std::vector<double>& answer_loss,
                               dist::Communicator* comm, bool lead, double global_sequences, std::optional<double> lr) {
  HofTerms h;
  const HofWeights w = hof_weights(step);
  h.ramp = w.ramp;
  // Local sums over this rank's sequences (lead only), reduced over the world in one call:
  // [reward, selected fraction, expected fraction, compression loss share, unused].
  double sums[5] = {0, 0, 0, 0, 0};
  std::vector<double> rewards(batch_.size());
  if (lead) {
    rewards = retrieval_rewards(answer_loss);
    for (std::size_t b = 0; b < batch_.size(); ++b) {
      sums[0] += rewards[b];
      sums[1] += batch_[b].sel.selected_fraction;
    }
  }
  sums[3] = compression_term(local, comm, w.compression);
  if (lead) sums[2] = compute_term_local();
  if (comm) comm->all_reduce_sum(std::span<double>(sums, 5));
  const double G = std::max(1.0, global_sequences);
  h.selected_fraction = sums[1] / G;
  // L_compute = expected selected fraction + the active-cluster fraction of the
  // step's attention (dense attention, ring attention under sp, attends every cluster).
  const double active = model_.attention_override == &sqa_ ? sqa_.active_cluster_fraction() : 1.0;
  h.compute = sums[2] / G + active;
  h.compression = sums[3];
  // Policy gradient with a global-mean baseline; per-rank losses are means over
  // its own sequences, so weight them by their share of the global batch.
  const double mean_reward = sums[0] / G;
  const double share = static_cast<double>(batch_.size()) / G;
  // Before the first update the baseline is this batch's mean (not 0, which
  // would make the first advantages the raw rewards).
  const double base = baseline_.initialized() ? baseline_.value() : mean_reward;
  // The same decision on every rank (it decides how many all-reduces the inner updates make).
  const bool ppo = w.retrieval > 0;
  const auto epochs = retrieval_term(rewards, base, w.retrieval * share, ppo, lead, comm, lr);
  if (!epochs.empty()) {
    // The on-policy (first epoch's) surrogate is the logged value.
    h.retrieval = (epochs.front().selection_loss + epochs.front().budget_loss) * share;
    h.ppo_epochs = static_cast<std::int64_t>(epochs.size());
    h.ppo_mean_ratio = epochs.back().mean_ratio;
    h.ppo_selection_clip_fraction = epochs.back().selection_clip_fraction;
    h.ppo_budget_clip_fraction = epochs.back().budget_clip_fraction;
  }
  if (lead && !batch_.empty() && w.compute > 0) compute_term_backward(G, w.compute);
  if (comm) {
    double r = h.retrieval;
    comm->all_reduce_sum(std::span<double>(&r, 1));
    h.retrieval = r;
    comm->all_reduce_sum(std::span<float>(extra_grad_.ptr<float>(), static_cast<std::size_t>(extra_grad_.numel())));
  }
  baseline_.update(mean_reward);
  return h;
}

std::vector<std::int32_t> DsrsqModel::select_prompt(const Encoded& enc, const DsrsqVariant& v) {
  std::vector<std::int32_t> ctx;
  if (v.dsr && enc.context_tokens > 0 && sp_comm_ && sp_comm_->size() > 1) {
    ctx = score(enc, nullptr).sel.positions;  // sharded top-k over the ranks
  } else if (v.dsr && enc.context_tokens > 0) {
    // Inference: the same selection as score(enc, nullptr) without the training record.
    const std::int64_t n = enc.context_tokens;
    const std::int64_t q0 = enc.prompt_len - enc.query_len + 1, q1 = enc.prompt_len - 1;
    std::span<const std::int32_t> query = q1 > q0 ? std::span<const std::int32_t>(enc.tokens.data() + q0, static_cast<std::size_t>(q1 - q0))
                                                  : std::span<const std::int32_t>(enc.tokens.data() + q0 - 1, 2);
    ctx = scorer_.select_inference(model_.param("wte").value,
                                   std::span<const std::int32_t>(enc.tokens.data() + 1, static_cast<std::size_t>(n)), query)
              .positions;
  } else {
    for (std::int64_t i = 0; i < enc.context_tokens; ++i) ctx.push_back(static_cast<std::int32_t>(i));
  }
  return kept_indices(enc, ctx, false);
}

std::unique_ptr<KVPolicy> DsrsqModel::make_policy(const DsrsqVariant& v) {
  if (!v.rckv) return make_kv_policy(KVPolicySpec{"full"}, model_.config(), be_);
  compress::RckvConfig c = s_.rckv;
  c.sqa = v.sqa;
  c.train_matched_prefill = true;
  KVPolicySpec spec;
  spec.kind = "rckv";
  spec.rckv = &c;
  spec.projections = &proj_;
  return make_kv_policy(spec, model_.config(), be_);
}

void DsrsqModel::save(std::map<std::string, std::vector<float>>& extra, const TensorView& adam_m,
                      const TensorView& adam_v, std::int64_t adam_steps) const {
  auto vec = [](const TensorView& t) {
    return std::vector<float>(t.ptr<float>(), t.ptr<float>() + t.numel());
  };
  extra["dsrsq.params"] = vec(extra_);
  extra["dsrsq.adam_m"] = vec(adam_m);
  extra["dsrsq.adam_v"] = vec(adam_v);
  // The baseline's exact bits, as four 16-bit integers (exact in f32): a resumed
  // run must equal the straight one bitwise.
  std::uint64_t bits = 0;
  const double b = baseline_.value();
  std::memcpy(&bits, &b, sizeof bits);
  extra["dsrsq.state"] = {static_cast<float>(adam_steps), baseline_.initialized() ? 1.0f : 0.0f,
                          static_cast<float>(bits & 0xFFFF), static_cast<float>((bits >> 16) & 0xFFFF),
                          static_cast<float>((bits >> 32) & 0xFFFF), static_cast<float>((bits >> 48) & 0xFFFF)};
  if (ppo_opt_) {
    extra["dsrsq.ppo_adam_m"] = vec(ppo_opt_->m());
    extra["dsrsq.ppo_adam_v"] = vec(ppo_opt_->v());
    const auto t = static_cast<std::uint64_t>(ppo_opt_->steps());  // as 16-bit pieces: exact in f32
    extra["dsrsq.ppo_state"] = {static_cast<float>(t & 0xFFFF), static_cast<float>((t >> 16) & 0xFFFF),
                                static_cast<float>((t >> 32) & 0xFFFF)};
  }
}

bool DsrsqModel::load_params(const std::map<std::string, std::vector<float>>& extra) {
  auto it = extra.find("dsrsq.params");
  if (it == extra.end()) return false;
  DSRSQ_INPUT_CHECK(static_cast<std::int64_t>(it->second.size()) == extra_.numel(), "checkpoint: dsrsq.params holds ",
                    it->second.size(), " values, this DSRSQ configuration has ", extra_.numel(),
                    " (were the dsr_/rckv_ settings changed?)");
  std::memcpy(extra_.data, it->second.data(), it->second.size() * sizeof(float));
  return true;
}

std::int64_t DsrsqModel::load(const std::map<std::string, std::vector<float>>& extra, TensorView adam_m,
                              TensorView adam_v) {
  auto it = extra.find("dsrsq.params");
  if (it == extra.end()) return -1;
  auto put = [&](const char* name, TensorView t) {
    const auto& v = extra.at(name);
    DSRSQ_INPUT_CHECK(static_cast<std::int64_t>(v.size()) == t.numel(), "checkpoint: ", name, " holds ", v.size(),
                      " values, this DSRSQ configuration has ", t.numel(),
                      " (were the dsr_/rckv_ settings changed?)");
    std::memcpy(t.data, v.data(), v.size() * sizeof(float));
  };
  put("dsrsq.params", extra_);
  put("dsrsq.adam_m", adam_m);
  put("dsrsq.adam_v", adam_v);
  const auto& st = extra.at("dsrsq.state");
  DSRSQ_INPUT_CHECK(st.size() == 6, "checkpoint: dsrsq.state must hold 6 values, got ", st.size());
  std::uint64_t bits = 0;
  for (int i = 0; i < 4; ++i) bits |= static_cast<std::uint64_t>(st[static_cast<std::size_t>(2 + i)]) << (16 * i);
  double b = 0;
  std::memcpy(&b, &bits, sizeof b);
  baseline_ = retrieval::MovingAverageBaseline(s_.dsr.baseline_decay);
  if (st[1] > 0) baseline_.update(b);
  if (ppo_opt_) {
    be_.fill(ppo_opt_->m(), 0.0);
    be_.fill(ppo_opt_->v(), 0.0);
    ppo_opt_->set_steps(0);
    if (extra.count("dsrsq.ppo_state")) {
      put("dsrsq.ppo_adam_m", ppo_opt_->m());
      put("dsrsq.ppo_adam_v", ppo_opt_->v());
      const auto& ps = extra.at("dsrsq.ppo_state");
      DSRSQ_INPUT_CHECK(ps.size() == 3, "checkpoint: dsrsq.ppo_state must hold 3 values, got ", ps.size());
      std::uint64_t t = 0;
      for (int i = 0; i < 3; ++i) t |= static_cast<std::uint64_t>(ps[static_cast<std::size_t>(i)]) << (16 * i);
      ppo_opt_->set_steps(static_cast<std::int64_t>(t));
    }
  }
  return static_cast<std::int64_t>(st[0]);
}

void DsrsqModel::broadcast_ppo_state(dist::Communicator& comm, int root) {
  if (!ppo_opt_) return;
  std::int64_t t = ppo_opt_->steps();
  comm.broadcast(std::span<std::int64_t>(&t, 1), root);
  ppo_opt_->set_steps(t);
  for (TensorView v : {ppo_opt_->m(), ppo_opt_->v()})
    comm.broadcast(std::span<float>(v.ptr<float>(), static_cast<std::size_t>(v.numel())), root);
}

}  // namespace dsrsq
