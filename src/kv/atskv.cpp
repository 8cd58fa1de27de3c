#include "kv/atskv.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "kv/full.hpp"
#include "kv/snapkv.hpp"
#include "kv/wrapped_snapshot.hpp"
#include "model/transformer.hpp"
#include "train/encode.hpp"

namespace dsrsq {
namespace atskv {

std::int64_t feature_dim(const ModelConfig& cfg) { return cfg.d_model + cfg.n_heads + 3; }

std::vector<float> features(Backend& be, Arena& scratch, const ModelConfig& cfg, const TensorView& q,
                            const TensorView& k, const TensorView& v, const TensorView& pos, std::int64_t w) {
  const std::int64_t B = q.shape[0], Tn = q.shape[1], NH = cfg.n_heads, HS = cfg.head_size(), C = NH * HS;
  const std::int64_t P = Tn - w, D = feature_dim(cfg);
  // a: per head, the window's attention column sums (no pooling), as a mean over the w queries.
  const std::vector<double> a = snapkv::window_scores(be, scratch, q, k, pos, w, 1, snapkv::Pool::avg);
  std::vector<float> kh(static_cast<std::size_t>(B * Tn * C)), vh(kh.size());
  be.copy_to_host(k, std::as_writable_bytes(std::span<float>(kh)));
  be.copy_to_host(v, std::as_writable_bytes(std::span<float>(vh)));
  const auto* pp = pos.ptr<std::int32_t>();
  std::vector<float> x(static_cast<std::size_t>(B * P * D));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < P; ++t) {
      float* row = x.data() + (b * P + t) * D;
      const float* vt = vh.data() + (b * Tn + t) * C;
      std::copy(vt, vt + C, row);
      double knorm = 0;
      for (std::int64_t h = 0; h < NH; ++h) {
        row[C + h] = static_cast<float>(a[static_cast<std::size_t>((b * NH + h) * P + t)] / static_cast<double>(w));
        const float* kt = kh.data() + (b * Tn + t) * C + h * HS;
        double s = 0;
        for (std::int64_t e = 0; e < HS; ++e) s += static_cast<double>(kt[e]) * kt[e];
        knorm += std::sqrt(s);
      }
      row[C + NH] = static_cast<float>(static_cast<double>(t) / static_cast<double>(Tn));
      row[C + NH + 1] = pp[b * Tn + t] == 0 ? 1.0f : 0.0f;
      row[C + NH + 2] = static_cast<float>(knorm / static_cast<double>(NH) / std::sqrt(static_cast<double>(HS)));
    }
  return x;
}

// ---- predictor -----------------------------------------------------------------
// Per layer, flat: W1 (H x D), b1 (H), w2 (H), b2.
Predictor::Predictor(const ModelConfig& cfg, std::int64_t hidden, std::uint64_t seed)
    : layers_(cfg.n_layers), dim_(feature_dim(cfg)), hidden_(hidden), per_layer_(hidden * dim_ + 2 * hidden + 1) {
  DSRSQ_INPUT_CHECK(hidden >= 1, "option --atskv_hidden: must be >= 1, got ", hidden);
  p_.assign(static_cast<std::size_t>(layers_ * per_layer_), 0.0f);
  m_.assign(p_.size(), 0.0f);
  v_.assign(p_.size(), 0.0f);
  steps_.assign(static_cast<std::size_t>(layers_), 0);
  Rng rng(seed, 11);
  for (std::int64_t l = 0; l < layers_; ++l) {
    float* p = p_.data() + offset(l);
    for (std::int64_t i = 0; i < hidden_ * dim_; ++i) p[i] = static_cast<float>(rng.normal() / std::sqrt(static_cast<double>(dim_)));
    float* w2 = p + hidden_ * dim_ + hidden_;
    for (std::int64_t i = 0; i < hidden_; ++i) w2[i] = static_cast<float>(rng.normal() / std::sqrt(static_cast<double>(hidden_)));
  }
}

std::vector<double> Predictor::logits(std::int64_t layer, const float* x, std::int64_t n) const {
  const float* W1 = p_.data() + offset(layer);
  const float* b1 = W1 + hidden_ * dim_;
  const float* w2 = b1 + hidden_;
  const double b2 = w2[hidden_];
  std::vector<double> z(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * dim_;
    double acc = b2;
    for (std::int64_t h = 0; h < hidden_; ++h) {
      double s = b1[h];
      const float* wr = W1 + h * dim_;
      for (std::int64_t d = 0; d < dim_; ++d) s += static_cast<double>(wr[d]) * xi[d];
      if (s > 0) acc += s * w2[h];
    }
    z[static_cast<std::size_t>(i)] = acc;
  }
  return z;
}

double Predictor::adam_step(std::int64_t layer, const float* x, const double* y, std::int64_t n, double lr) {
  float* P = p_.data() + offset(layer);
  const float* W1 = P;
  const float* b1 = W1 + hidden_ * dim_;
  const float* w2 = b1 + hidden_;
  std::vector<double> g(static_cast<std::size_t>(per_layer_), 0.0), pre(static_cast<std::size_t>(hidden_));
  double loss = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * dim_;
    double z = w2[hidden_];
    for (std::int64_t h = 0; h < hidden_; ++h) {
      double s = b1[h];
      const float* wr = W1 + h * dim_;
      for (std::int64_t d = 0; d < dim_; ++d) s += static_cast<double>(wr[d]) * xi[d];
      pre[static_cast<std::size_t>(h)] = s;
      if (s > 0) z += s * w2[h];
    }
    const double e = z - y[i];
    loss += e * e;
    const double dz = 2.0 * e / static_cast<double>(n);
    g[static_cast<std::size_t>(per_layer_ - 1)] += dz;
    for (std::int64_t h = 0; h < hidden_; ++h) {
      const double s = pre[static_cast<std::size_t>(h)];
      if (s <= 0) continue;
      g[static_cast<std::size_t>(hidden_ * dim_ + hidden_ + h)] += dz * s;
      const double dh = dz * w2[h];
      g[static_cast<std::size_t>(hidden_ * dim_ + h)] += dh;
      double* gr = g.data() + h * dim_;
      for (std::int64_t d = 0; d < dim_; ++d) gr[d] += dh * xi[d];
    }
  }
  // Adam (beta 0.9, 0.999, eps 1e-8), bias-corrected.
  const std::int64_t t = ++steps_[static_cast<std::size_t>(layer)];
  const double c1 = 1.0 - std::pow(0.9, static_cast<double>(t)), c2 = 1.0 - std::pow(0.999, static_cast<double>(t));
  float* m = m_.data() + offset(layer);
  float* v = v_.data() + offset(layer);
  for (std::int64_t i = 0; i < per_layer_; ++i) {
    const double gi = g[static_cast<std::size_t>(i)];
    m[i] = static_cast<float>(0.9 * m[i] + 0.1 * gi);
    v[i] = static_cast<float>(0.999 * v[i] + 0.001 * gi * gi);
    P[i] = static_cast<float>(P[i] - lr * (m[i] / c1) / (std::sqrt(v[i] / c2) + 1e-8));
  }
  return loss / static_cast<double>(std::max<std::int64_t>(n, 1));
}

double Predictor::mse(std::int64_t layer, const float* x, const double* y, std::int64_t n) const {
  const std::vector<double> z = logits(layer, x, n);
  double loss = 0;
  for (std::int64_t i = 0; i < n; ++i) loss += (z[static_cast<std::size_t>(i)] - y[i]) * (z[static_cast<std::size_t>(i)] - y[i]);
  return loss / static_cast<double>(std::max<std::int64_t>(n, 1));
}

double Predictor::flops(std::int64_t n, bool backward) const {
  const double f = 2.0 * static_cast<double>(n) * static_cast<double>(hidden_) * static_cast<double>(dim_ + 1);
  return backward ? 3.0 * f : f;
}

void Predictor::save(std::map<std::string, std::vector<float>>& extra, bool with_optimizer) const {
  extra["atskv.params"] = p_;
  extra["atskv.shape"] = {static_cast<float>(layers_), static_cast<float>(dim_), static_cast<float>(hidden_)};
  if (!with_optimizer) return;
  extra["atskv.adam_m"] = m_;
  extra["atskv.adam_v"] = v_;
  std::vector<float> st(steps_.begin(), steps_.end());
  extra["atskv.steps"] = st;
}

bool Predictor::load(const std::map<std::string, std::vector<float>>& extra, bool with_optimizer) {
  const auto it = extra.find("atskv.params");
  if (it == extra.end()) return false;
  const auto sh = extra.find("atskv.shape");
  DSRSQ_INPUT_CHECK(sh != extra.end() && sh->second.size() == 3 && static_cast<std::int64_t>(sh->second[0]) == layers_ &&
                        static_cast<std::int64_t>(sh->second[1]) == dim_ && static_cast<std::int64_t>(sh->second[2]) == hidden_ &&
                        it->second.size() == p_.size(),
                    "checkpoint: the ATSKV predictor it holds has another shape than this run's (layers, features, --atskv_hidden)");
  p_ = it->second;
  loaded_ = true;
  if (with_optimizer && extra.count("atskv.adam_m")) {
    m_ = extra.at("atskv.adam_m");
    v_ = extra.at("atskv.adam_v");
    const auto& st = extra.at("atskv.steps");
    for (std::size_t l = 0; l < steps_.size() && l < st.size(); ++l) steps_[l] = static_cast<std::int64_t>(st[l]);
  }
  return true;
}

// ---- recording (teacher forcing, frozen backbone) --------------------------------
namespace {

// The full cache, keeping a host copy of each layer's post-RoPE q, k, v and output.
class Recorder final : public KVPolicy {
 public:
  Recorder(const ModelConfig& cfg, Backend& be) : full_(cfg, be), be_(be), layers_(static_cast<std::size_t>(cfg.n_layers)) {}
  std::string name() const override { return "atskv_recorder"; }
  void begin(const SequenceInfo& info, const KVBudget& budget) override { full_.begin(info, budget); }
  void attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos, TensorView out) override {
    full_.attend(layer, q, k, v, pos, out);  // rotates q and k in place
    Layer& L = layers_[static_cast<std::size_t>(layer)];
    for (auto [src, dst] : {std::pair{q, &L.q}, std::pair{k, &L.k}, std::pair{v, &L.v}, std::pair{out, &L.o}}) {
      dst->resize(static_cast<std::size_t>(src.numel()));
      be_.copy_to_host(src, std::as_writable_bytes(std::span<float>(*dst)));
    }
  }
  KVMemory memory() const override { return full_.memory(); }
  std::size_t budget_requested_bytes() const override { return full_.budget_requested_bytes(); }
  std::size_t budget_achieved_bytes() const override { return full_.budget_achieved_bytes(); }
  double attended_tokens() const override { return full_.attended_tokens(); }
  struct Layer {
    std::vector<float> q, k, v, o;
  };
  std::vector<Layer>& layers() { return layers_; }

 private:
  FullPolicy full_;
  Backend& be_;
  std::vector<Layer> layers_;
};

}  // namespace

Sample record(Transformer& model, const Encoded& enc, std::int64_t window) {
  const ModelConfig& cfg = model.config();
  Backend& be = model.backend();
  const std::int64_t S = static_cast<std::int64_t>(enc.tokens.size()), N = enc.prompt_len;
  const std::int64_t NH = cfg.n_heads, HS = cfg.head_size(), C = cfg.d_model;
  DSRSQ_INPUT_CHECK(N >= 2 && S > N, "atskv: an example needs a prompt of >= 2 tokens and an answer, got prompt ", N,
                    " of ", S, " tokens");
  Sample out;
  out.w = window > 0 ? std::min(window, N - 1) : snapkv::default_window(enc.query_len, N);
  out.rows = N - out.w;
  Recorder rec(cfg, be);
  SequenceInfo info;
  info.prompt_len = S;
  rec.begin(info, KVBudget{});
  std::vector<std::int32_t> tok = enc.tokens, pos(static_cast<std::size_t>(S));
  std::iota(pos.begin(), pos.end(), 0);
  model.extend(rec, TensorView(tok.data(), Shape{1, S}), TensorView(pos.data(), Shape{1, S}));
  Arena scratch("atskv_record", std::size_t{1} << 20, be.allocator());
  const double scale = 1.0 / std::sqrt(static_cast<double>(HS));
  for (std::int64_t l = 0; l < cfg.n_layers; ++l) {
    auto& L = rec.layers()[static_cast<std::size_t>(l)];
    // Features of the prompt as the policy sees its compression call.
    // (q, k, v back on the backend for its ops; positions stay on the host, as features() reads them.)
    {
      ArenaScope s(scratch);
      out.x.push_back(features(be, scratch, cfg, kvdetail::op_arg(be, scratch, L.q.data(), Shape{1, N, NH, HS}),
                               kvdetail::op_arg(be, scratch, L.k.data(), Shape{1, N, NH, HS}),
                               kvdetail::op_arg(be, scratch, L.v.data(), Shape{1, N, NH, HS}),
                               TensorView(pos.data(), Shape{1, N}), out.w));
    }
    // |Wo_h v_hj| per head and prefix token; |Wo o_i| per answer query.
    const std::vector<float> wo_host = to_host<float>(be, model.param("h." + std::to_string(l) + ".attn.wo").value);
    const float* wo = wo_host.data();  // (C, C): out = x Wo^T
    auto proj_norm = [&](const float* x, std::int64_t h0, std::int64_t h1) {
      double s = 0;
      for (std::int64_t c = 0; c < C; ++c) {
        double acc = 0;
        for (std::int64_t e = h0 * HS; e < h1 * HS; ++e) acc += static_cast<double>(wo[c * C + e]) * x[e];
        s += acc * acc;
      }
      return std::sqrt(s);
    };
    std::vector<double> nv(static_cast<std::size_t>(out.rows * NH));
    for (std::int64_t j = 0; j < out.rows; ++j)
      for (std::int64_t h = 0; h < NH; ++h)
        nv[static_cast<std::size_t>(j * NH + h)] = proj_norm(L.v.data() + j * C, h, h + 1);  // head h's slice of v_j
    std::vector<double> t(static_cast<std::size_t>(out.rows), 0.0);
    for (std::int64_t i = N - 1; i < S - 1; ++i) {  // the queries that predict answer tokens
      const double no = std::max(proj_norm(L.o.data() + i * C, 0, NH), 1e-30);
      std::vector<double> contrib(static_cast<std::size_t>(out.rows), 0.0);
      for (std::int64_t h = 0; h < NH; ++h) {
        const float* qi = L.q.data() + i * C + h * HS;
        std::vector<double> s(static_cast<std::size_t>(i + 1));
        double mx = -1e300;
        for (std::int64_t j = 0; j <= i; ++j) {
          const float* kj = L.k.data() + j * C + h * HS;
          double d = 0;
          for (std::int64_t e = 0; e < HS; ++e) d += static_cast<double>(qi[e]) * kj[e];
          s[static_cast<std::size_t>(j)] = d * scale;
          mx = std::max(mx, s[static_cast<std::size_t>(j)]);
        }
        double z = 0;
        for (auto& x : s) z += (x = std::exp(x - mx));
        for (std::int64_t j = 0; j < out.rows; ++j)
          contrib[static_cast<std::size_t>(j)] += s[static_cast<std::size_t>(j)] / z * nv[static_cast<std::size_t>(j * NH + h)];
      }
      for (std::int64_t j = 0; j < out.rows; ++j)
        t[static_cast<std::size_t>(j)] = std::max(t[static_cast<std::size_t>(j)], contrib[static_cast<std::size_t>(j)] / no);
    }
    std::vector<double> y(t.size());
    for (std::size_t j = 0; j < t.size(); ++j) y[j] = std::log(std::max(t[j], 1e-30));
    out.y.push_back(std::move(y));
  }
  return out;
}

TrainStats train(Predictor& pred, const std::vector<Sample>& samples, std::int64_t epochs, double lr) {
  TrainStats st;
  const auto t0 = std::chrono::steady_clock::now();
  DSRSQ_INPUT_CHECK(!samples.empty(), "atskv: no training examples for the predictor");
  const std::int64_t L = static_cast<std::int64_t>(samples.front().x.size()), D = pred.dim();
  std::vector<std::vector<float>> X(static_cast<std::size_t>(L));
  std::vector<std::vector<double>> Y(static_cast<std::size_t>(L));
  for (const Sample& s : samples)
    for (std::int64_t l = 0; l < L; ++l) {
      X[static_cast<std::size_t>(l)].insert(X[static_cast<std::size_t>(l)].end(), s.x[static_cast<std::size_t>(l)].begin(),
                                            s.x[static_cast<std::size_t>(l)].end());
      Y[static_cast<std::size_t>(l)].insert(Y[static_cast<std::size_t>(l)].end(), s.y[static_cast<std::size_t>(l)].begin(),
                                            s.y[static_cast<std::size_t>(l)].end());
    }
  const auto n = static_cast<std::int64_t>(Y.front().size());
  st.samples = static_cast<std::int64_t>(samples.size());
  st.rows = n;
  for (std::int64_t l = 0; l < L; ++l)
    if (pred.steps(l) == 0 && n > 0) {
      const auto& y = Y[static_cast<std::size_t>(l)];
      pred.set_output_bias(l, std::accumulate(y.begin(), y.end(), 0.0) / static_cast<double>(n));
    }
  for (std::int64_t e = 0; e < epochs; ++e) {
    double loss = 0;
    for (std::int64_t l = 0; l < L; ++l) {
      const auto ls = static_cast<std::size_t>(l);
      DSRSQ_REQUIRE(static_cast<std::int64_t>(X[ls].size()) == n * D, "atskv: feature rows do not match targets");
      loss += pred.adam_step(l, X[ls].data(), Y[ls].data(), n, lr);
      st.flops += pred.flops(n, true);
    }
    st.loss.push_back(loss / static_cast<double>(L));
  }
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return st;
}

double mse(const Predictor& pred, const std::vector<Sample>& samples) {
  if (samples.empty()) return 0.0;
  const auto L = static_cast<std::int64_t>(samples.front().x.size());
  double total = 0;
  for (std::int64_t l = 0; l < L; ++l) {
    double sum = 0;
    std::int64_t rows = 0;
    for (const Sample& s : samples) {
      sum += pred.mse(l, s.x[static_cast<std::size_t>(l)].data(), s.y[static_cast<std::size_t>(l)].data(), s.rows) *
             static_cast<double>(s.rows);
      rows += s.rows;
    }
    total += sum / static_cast<double>(std::max<std::int64_t>(rows, 1));
  }
  return total / static_cast<double>(L);
}

}  // namespace atskv

// ---- the policy ----------------------------------------------------------------------

void AtskvConfig::validate() const {
  DSRSQ_INPUT_CHECK(window >= 0, "option --atskv_window: must be >= 0 (0: max(question, 8)), got ", window);
  DSRSQ_INPUT_CHECK(beta > 0 && std::isfinite(beta), "option --atskv_beta: must be > 0 and finite, got ", beta);
  DSRSQ_INPUT_CHECK(q_min >= 0 && q_min <= q_max && q_max < 1,
                    "options --atskv_q_min, --atskv_q_max: need 0 <= q_min <= q_max < 1, got ", q_min, " ", q_max);
  DSRSQ_INPUT_CHECK(ema >= 0 && ema < 1, "option --atskv_ema: must lie in [0, 1), got ", ema);
  DSRSQ_INPUT_CHECK(promote_slots >= 0, "option --atskv_promote_slots: must be >= 0, got ", promote_slots);
}

AtskvPolicy::AtskvPolicy(const ModelConfig& cfg, Backend& backend, const AtskvConfig& c, const atskv::Predictor& pred)
    : EvictingPolicy(cfg, backend, "atskv"), c_(c), pred_(pred) {
  c_.validate();
}

bool AtskvPolicy::plan(const SequenceInfo& info, std::size_t requested_bytes) {
  const ModelConfig& cfg = config();
  row_tokens_ = static_cast<std::int64_t>(requested_bytes / KVBudget::full_bytes(cfg, 1));
  q_.assign(static_cast<std::size_t>(cfg.n_layers), 0.7);  // the seed's initial sparsity
  passive_.assign(static_cast<std::size_t>(cfg.n_layers), {});
  arenas_.clear();
  arenas_.resize(static_cast<std::size_t>(cfg.n_layers));
  slot_k_.assign(static_cast<std::size_t>(cfg.n_layers), TensorView{});
  slot_v_ = slot_k_;
  passive_bytes_ = 0;
  slots_ = 0;
  promotions_ = 0;
  decoding_ = false;
  const std::int64_t n = info.prompt_len;
  const std::int64_t w = c_.window > 0 ? std::min(c_.window, std::max<std::int64_t>(1, n - 1)) : snapkv::default_window(info.query_len, n);
  return row_tokens_ >= std::min(n, w) + info.max_new_tokens;
}

double AtskvPolicy::quantile_of(std::vector<double> r, double q) {
  if (r.empty()) return 0.0;
  std::sort(r.begin(), r.end());
  const double at = q * static_cast<double>(r.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(at));
  return r[lo] + (at - std::floor(at)) * (r[std::min(lo + 1, r.size() - 1)] - r[lo]);
}

std::vector<std::int32_t> AtskvPolicy::keep_prefix(const std::vector<double>& r, double q, double beta, std::int64_t cap) {
  const auto P = static_cast<std::int64_t>(r.size());
  if (P == 0) return {};
  const double tau = beta * quantile_of(r, q);
  // Above the threshold, at most `cap` of them (the highest scores; ties to the earlier token).
  std::vector<double> s(r.size());
  std::int64_t above = 0;
  for (std::size_t i = 0; i < r.size(); ++i) {
    s[i] = r[i] > tau ? r[i] : -1.0;
    above += r[i] > tau ? 1 : 0;
  }
  return snapkv::top_in_order(s.data(), P, std::min(above, cap));
}

std::vector<std::vector<std::int32_t>> AtskvPolicy::select(const LayerPrefill& p) {
  const ModelConfig& cfg = config();
  const std::int64_t tn = p.tokens, rows = this->rows(), NH = cfg.n_heads, HS = cfg.head_size(), C = cfg.d_model;
  const std::int64_t l = p.layer;
  std::vector<std::vector<std::int32_t>> out(static_cast<std::size_t>(rows));
  const std::int64_t keep_row = row_tokens_ - slots_after(tn);  // active tokens of the call per row
  if (tn <= 1 || keep_row >= tn) {
    std::vector<std::int32_t> all(static_cast<std::size_t>(tn));
    std::iota(all.begin(), all.end(), 0);
    for (auto& o : out) o = all;
    return out;
  }
  DSRSQ_INPUT_CHECK(pred_.trained(), "method atskv: its relevance predictor is untrained; train it with --model atskv "
                                     "(from a standard --init_from checkpoint) or load a checkpoint that holds it with --init_from");
  const std::int64_t w = c_.window > 0 ? std::min(c_.window, tn - 1) : snapkv::default_window(info().query_len, tn);
  const std::int64_t P = tn - w, D = pred_.dim();
  // The promotion slots come out of the prefix's share of the budget.
  slots_ = std::min(c_.promote_slots, std::max<std::int64_t>(0, keep_row - w));
  const std::int64_t cap = std::max<std::int64_t>(0, keep_row - w - slots_);
  const std::vector<float> x = atskv::features(backend(), scratch(), cfg, p.q, p.k, p.v, p.pos, w);
  // The quantile follows the memory target: M_cur / M_target is what this
  // layer would hold keeping everything over what the budget allows.
  const double ratio = static_cast<double>(tn + slots_after(tn)) / static_cast<double>(std::max<std::int64_t>(1, row_tokens_));
  double& q = q_[static_cast<std::size_t>(l)];
  q = c_.ema * q + (1.0 - c_.ema) * (c_.q_min + (c_.q_max - c_.q_min) * std::min(1.0, ratio));
  auto& tier = passive_[static_cast<std::size_t>(l)];
  tier.assign(static_cast<std::size_t>(info().batch), Passive{});
  std::vector<float> kh(static_cast<std::size_t>(tn * C)), vh(kh.size());
  for (std::int64_t b = 0; b < info().batch; ++b) {
    const std::vector<double> z = pred_.logits(l, x.data() + b * P * D, P);
    std::vector<double> r(z.size());
    for (std::size_t i = 0; i < z.size(); ++i) r[i] = 1.0 / (1.0 + std::exp(-z[i]));
    std::vector<std::int32_t> keep = keep_prefix(r, q, c_.beta, cap);
    Passive& ps = tier[static_cast<std::size_t>(b)];
    ps.tau = c_.beta * quantile_of(r, q);
    for (std::int32_t j : keep) ps.r_active.push_back(r[static_cast<std::size_t>(j)]);
    // The demoted prefix tokens go to the passive tier (host copies).
    std::vector<char> kept(static_cast<std::size_t>(P), 0);
    for (std::int32_t j : keep) kept[static_cast<std::size_t>(j)] = 1;
    backend().copy_to_host(p.k.reshaped(Shape{info().batch * tn, C}).rows(b * tn, tn), std::as_writable_bytes(std::span<float>(kh)));
    backend().copy_to_host(p.v.reshaped(Shape{info().batch * tn, C}).rows(b * tn, tn), std::as_writable_bytes(std::span<float>(vh)));
    const auto* pp = p.pos.ptr<std::int32_t>() + b * tn;
    ps.k.assign(static_cast<std::size_t>(NH), {});
    ps.v.assign(static_cast<std::size_t>(NH), {});
    for (std::int64_t j = 0; j < P; ++j) {
      if (kept[static_cast<std::size_t>(j)]) continue;
      ps.pos.push_back(pp[j]);
      ps.r.push_back(r[static_cast<std::size_t>(j)]);
      ps.f.insert(ps.f.end(), x.begin() + (b * P + j) * D + C, x.begin() + (b * P + j + 1) * D);
      for (std::int64_t h = 0; h < NH; ++h) {
        ps.k[static_cast<std::size_t>(h)].insert(ps.k[static_cast<std::size_t>(h)].end(), kh.begin() + j * C + h * HS,
                                                 kh.begin() + j * C + (h + 1) * HS);
        ps.v[static_cast<std::size_t>(h)].insert(ps.v[static_cast<std::size_t>(h)].end(), vh.begin() + j * C + h * HS,
                                                 vh.begin() + j * C + (h + 1) * HS);
      }
      // K and V of every head plus the other features, on the host.
      passive_bytes_ += static_cast<std::size_t>(NH) * token_bytes() + static_cast<std::size_t>(D - C) * sizeof(float);
    }
    ps.slot_of.assign(ps.pos.size(), -1);
    ps.in_slot.assign(static_cast<std::size_t>(slots_), -1);
    ps.a_step.assign(ps.pos.size() * static_cast<std::size_t>(NH), 0.0);
    for (std::int64_t j = P; j < tn; ++j) keep.push_back(static_cast<std::int32_t>(j));
    for (std::int64_t h = 0; h < NH; ++h) out[static_cast<std::size_t>(b * NH + h)] = keep;
  }
  return out;
}

void AtskvPolicy::after_select(const LayerPrefill& p, const std::vector<std::vector<std::int32_t>>&) {
  if (slots_ > 0 && !passive_[static_cast<std::size_t>(p.layer)].empty()) alloc_slots(p.layer);
}

void AtskvPolicy::alloc_slots(std::int64_t layer) {
  const auto l = static_cast<std::size_t>(layer);
  const Shape shape{rows() * slots_, config().head_size()};
  arenas_[l] = std::make_unique<Arena>("atskv_slots", std::max<std::size_t>(2 * static_cast<std::size_t>(shape.numel()) * sizeof(float), 64),
                                       backend().allocator());
  slot_k_[l] = arenas_[l]->allocate(shape, DType::f32);
  slot_v_[l] = arenas_[l]->allocate(shape, DType::f32);
  backend().fill(slot_k_[l], 0.0);
  backend().fill(slot_v_[l], 0.0);
}

std::size_t AtskvPolicy::own_bytes() const {
  std::size_t n = 0;
  for (const auto& a : arenas_)
    if (a) n += a->used_bytes();
  return n;
}

std::vector<std::int32_t> AtskvPolicy::promoted(std::int64_t layer, std::int64_t r) const {
  std::vector<std::int32_t> out;
  const auto& tier = passive_.at(static_cast<std::size_t>(layer));
  if (tier.empty()) return out;
  const Passive& ps = tier[static_cast<std::size_t>(r / config().n_heads)];
  for (std::int32_t t : ps.in_slot)
    if (t >= 0) out.push_back(ps.pos[static_cast<std::size_t>(t)]);
  return out;
}

void AtskvPolicy::end_prefill() {
  EvictingPolicy::end_prefill();
  decoding_ = true;
}

void AtskvPolicy::attend_row(std::int64_t layer, std::int64_t r, TensorView q, TensorView qpos, TensorView o,
                             TensorView lse) {
  EvictingPolicy::attend_row(layer, r, q, qpos, o, lse);  // exact over the active row
  const auto l = static_cast<std::size_t>(layer);
  if (passive_[l].empty()) return;
  const std::int64_t NH = config().n_heads, HS = config().head_size(), Tn = q.shape[0], b = r / NH, h = r % NH;
  Passive& ps = passive_[l][static_cast<std::size_t>(b)];
  // The promoted slots of this row, merged into the result.
  std::vector<std::int32_t> used, spos;
  for (std::size_t s = 0; s < ps.in_slot.size(); ++s)
    if (ps.in_slot[s] >= 0) {
      used.push_back(static_cast<std::int32_t>(s));
      spos.push_back(ps.pos[static_cast<std::size_t>(ps.in_slot[s])]);
    }
  if (!used.empty()) {
    ArenaScope scope(scratch());
    const auto n = static_cast<std::int64_t>(used.size());
    std::vector<std::int32_t> src(used.size());
    for (std::size_t i = 0; i < used.size(); ++i) src[i] = static_cast<std::int32_t>(r * slots_ + used[i]);
    TensorView idx = scratch().allocate(Shape{n}, DType::i32);
    backend().copy_from_host(std::as_bytes(std::span<const std::int32_t>(src)), idx);
    TensorView ks = scratch().allocate(Shape{n, HS}, DType::f32), vs = scratch().allocate(Shape{n, HS}, DType::f32);
    backend().gather_rows(GatherRowsArgs{slot_k_[l], idx, ks});
    backend().gather_rows(GatherRowsArgs{slot_v_[l], idx, vs});
    TensorView o2 = scratch().allocate(Shape{1, Tn, 1, HS}, DType::f32), l2 = scratch().allocate(Shape{1, 1, Tn}, DType::f32);
    backend().attention_fwd(AttentionArgs{q.reshaped(Shape{1, Tn, 1, HS}), ks.reshaped(Shape{1, n, 1, HS}),
                                          vs.reshaped(Shape{1, n, 1, HS}), o2, l2, qpos.reshaped(Shape{1, Tn}),
                                          kvdetail::op_arg(backend(), scratch(), spos.data(), Shape{1, n}), true, 0.0});
    backend().attention_merge(AttentionMergeArgs{o.reshaped(Shape{1, Tn, 1, HS}), lse.reshaped(Shape{1, 1, Tn}), o2, l2});
  }
  if (!decoding_ || Tn != 1 || ps.pos.empty()) return;
  // This step's probability of each passive token (against the normaliser of
  // what the query attended to), for head h.
  std::vector<float> qh(static_cast<std::size_t>(HS));
  float lh = 0;
  backend().copy_to_host(q.reshaped(Shape{HS}), std::as_writable_bytes(std::span<float>(qh)));
  backend().copy_to_host(lse.reshaped(Shape{1}), std::as_writable_bytes(std::span<float>(&lh, 1)));
  const double scale = 1.0 / std::sqrt(static_cast<double>(HS));
  const auto& kp = ps.k[static_cast<std::size_t>(h)];
  for (std::size_t j = 0; j < ps.pos.size(); ++j) {
    double d = 0;
    for (std::int64_t e = 0; e < HS; ++e) d += static_cast<double>(qh[static_cast<std::size_t>(e)]) * kp[j * static_cast<std::size_t>(HS) + static_cast<std::size_t>(e)];
    ps.a_step[j * static_cast<std::size_t>(NH) + static_cast<std::size_t>(h)] = std::isfinite(lh) ? std::exp(d * scale - lh) : 0.0;
  }
  if (h == NH - 1) rescore(layer, b);  // every head of the sequence has its probabilities
}

// A decode step of sequence b in `layer`: the passive tokens' attention
// features follow this step's probabilities, their scores are recomputed, the
// quantile follows the memory ratio, and promotions swap slots.
void AtskvPolicy::rescore(std::int64_t layer, std::int64_t b) {
  const auto l = static_cast<std::size_t>(layer);
  Passive& ps = passive_[l][static_cast<std::size_t>(b)];
  const std::int64_t NH = config().n_heads, C = config().d_model, D = pred_.dim();
  const std::size_t n = ps.pos.size();
  const std::int64_t F = D - C, HS = config().head_size();
  std::vector<float> x(n * static_cast<std::size_t>(D));
  for (std::size_t j = 0; j < n; ++j) {
    float* row = x.data() + j * static_cast<std::size_t>(D);
    for (std::int64_t h = 0; h < NH; ++h) {
      const float* vj = ps.v[static_cast<std::size_t>(h)].data() + j * static_cast<std::size_t>(HS);
      std::copy(vj, vj + HS, row + h * HS);
      float& a = ps.f[j * static_cast<std::size_t>(F) + static_cast<std::size_t>(h)];
      a = static_cast<float>(c_.ema * a + (1.0 - c_.ema) * ps.a_step[j * static_cast<std::size_t>(NH) + static_cast<std::size_t>(h)]);
    }
    std::copy(ps.f.begin() + static_cast<std::ptrdiff_t>(j * static_cast<std::size_t>(F)),
              ps.f.begin() + static_cast<std::ptrdiff_t>((j + 1) * static_cast<std::size_t>(F)), row + C);
  }
  const std::vector<double> z = pred_.logits(layer, x.data(), static_cast<std::int64_t>(n));
  for (std::size_t j = 0; j < n; ++j) ps.r[j] = 1.0 / (1.0 + std::exp(-z[j]));
  // M_cur / M_target: the row's active tokens and used slots over the budget.
  std::int64_t used = 0;
  for (std::int32_t t : ps.in_slot) used += t >= 0 ? 1 : 0;
  const double ratio = static_cast<double>(row_len(layer, b * NH) + used) / static_cast<double>(std::max<std::int64_t>(1, row_tokens_));
  double& q = q_[l];
  q = c_.ema * q + (1.0 - c_.ema) * (c_.q_min + (c_.q_max - c_.q_min) * std::min(1.0, ratio));
  // The threshold over every scored prefix token of the layer: the active ones
  // keep their prefill scores (they are not re-scored), the passive ones move.
  std::vector<double> all = ps.r_active;
  all.insert(all.end(), ps.r.begin(), ps.r.end());
  ps.tau = c_.beta * quantile_of(std::move(all), q);
  if (ps.in_slot.empty()) return;
  // Promoted tokens that fell to the threshold return to the passive tier.
  for (std::size_t s = 0; s < ps.in_slot.size(); ++s) {
    const std::int32_t t = ps.in_slot[s];
    if (t >= 0 && ps.r[static_cast<std::size_t>(t)] <= ps.tau) {
      ps.slot_of[static_cast<std::size_t>(t)] = -1;
      ps.in_slot[s] = -1;
    }
  }
  // Candidates above the threshold, highest first; each takes a free slot or
  // the slot of the lowest promoted token scoring below it.
  std::vector<std::int32_t> cand;
  for (std::size_t j = 0; j < n; ++j)
    if (ps.slot_of[j] < 0 && ps.r[j] > ps.tau) cand.push_back(static_cast<std::int32_t>(j));
  std::stable_sort(cand.begin(), cand.end(), [&](std::int32_t a, std::int32_t b2) { return ps.r[static_cast<std::size_t>(a)] > ps.r[static_cast<std::size_t>(b2)]; });
  for (std::int32_t t : cand) {
    std::int64_t slot = -1;
    double low = ps.r[static_cast<std::size_t>(t)];
    for (std::size_t s = 0; s < ps.in_slot.size(); ++s) {
      if (ps.in_slot[s] < 0) {
        slot = static_cast<std::int64_t>(s);
        break;
      }
      const double rs = ps.r[static_cast<std::size_t>(ps.in_slot[s])];
      if (rs < low) {
        low = rs;
        slot = static_cast<std::int64_t>(s);
      }
    }
    if (slot < 0) break;  // every slot holds a better token
    const auto ss = static_cast<std::size_t>(slot);
    if (ps.in_slot[ss] >= 0) ps.slot_of[static_cast<std::size_t>(ps.in_slot[ss])] = -1;
    ps.in_slot[ss] = t;
    ps.slot_of[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(slot);
    ++promotions_;
    for (std::int64_t h = 0; h < NH; ++h) {
      const std::int64_t row = (b * NH + h) * slots_ + slot;
      const auto at = static_cast<std::size_t>(t) * static_cast<std::size_t>(HS);
      backend().copy_from_host(std::as_bytes(std::span<const float>(ps.k[static_cast<std::size_t>(h)].data() + at, static_cast<std::size_t>(HS))),
                               slot_k_[l].rows(row, 1));
      backend().copy_from_host(std::as_bytes(std::span<const float>(ps.v[static_cast<std::size_t>(h)].data() + at, static_cast<std::size_t>(HS))),
                               slot_v_[l].rows(row, 1));
    }
  }
}

double AtskvPolicy::row_keys_read(std::int64_t layer, std::int64_t r) const {
  return static_cast<double>(row_len(layer, r) + static_cast<std::int64_t>(promoted(layer, r).size()));
}

std::size_t AtskvPolicy::aux_read_bytes(std::int64_t layer, std::int64_t r) const {
  // The passive keys scored against the query (host memory).
  const auto& tier = passive_.at(static_cast<std::size_t>(layer));
  if (tier.empty()) return 0;
  return tier[static_cast<std::size_t>(r / config().n_heads)].pos.size() * static_cast<std::size_t>(config().head_size()) * sizeof(float);
}

KVMemory AtskvPolicy::memory() const {
  KVMemory m = EvictingPolicy::memory();
  const std::size_t own = own_bytes();  // the promotion slots: resident from their layer's compression on
  m.resident_after_prefill += own;
  m.peak_prefill += own;
  m.total = m.resident_after_prefill + passive_bytes_;  // the passive tier (host memory) counts in the total
  return m;
}

std::size_t AtskvPolicy::budget_achieved_bytes() const {
  return EvictingPolicy::budget_achieved_bytes() + own_bytes() / static_cast<std::size_t>(std::max<std::int64_t>(info().batch, 1));
}

namespace {
struct AtskvExtra {
  std::int64_t slots = 0, promotions = 0;
  bool decoding = false;
  std::vector<double> q;
  std::size_t passive_bytes = 0;
  std::vector<char> has_slots;
};
}  // namespace

std::unique_ptr<KVSnapshot> AtskvPolicy::snapshot() const {
  // The passive tier is copied by value (host state) with the slots' blocks.
  auto s = std::make_unique<kvdetail::WrappedSnapshot<std::pair<AtskvExtra, std::vector<std::vector<Passive>>>>>();
  s->owner = this;
  s->base = EvictingPolicy::snapshot();
  s->extra.first = AtskvExtra{slots_, promotions_, decoding_, q_, passive_bytes_, {}};
  s->extra.second = passive_;
  for (std::size_t l = 0; l < slot_k_.size(); ++l) {
    s->extra.first.has_slots.push_back(slot_k_[l].data ? 1 : 0);
    if (!slot_k_[l].data) continue;
    s->blocks.emplace_back().save(backend(), slot_k_[l]);
    s->blocks.emplace_back().save(backend(), slot_v_[l]);
  }
  s->extra_host_bytes = passive_bytes_;
  return s;
}

void AtskvPolicy::restore(const KVSnapshot& snap) {
  const auto& s = kvdetail::wrapped_of<std::pair<AtskvExtra, std::vector<std::vector<Passive>>>>(snap, this, "atskv");
  EvictingPolicy::restore(*s.base);
  const AtskvExtra& e = s.extra.first;
  const bool same = slots_ == e.slots && slot_k_.size() == e.has_slots.size();
  slots_ = e.slots;
  promotions_ = e.promotions;
  decoding_ = e.decoding;
  q_ = e.q;
  passive_bytes_ = e.passive_bytes;
  passive_ = s.extra.second;
  if (!same) {
    arenas_.clear();
    arenas_.resize(e.has_slots.size());
    slot_k_.assign(e.has_slots.size(), TensorView{});
    slot_v_ = slot_k_;
  }
  std::size_t bi = 0;
  for (std::size_t l = 0; l < e.has_slots.size(); ++l) {
    if (!e.has_slots[l]) {
      arenas_[l].reset();
      slot_k_[l] = slot_v_[l] = TensorView{};
      continue;
    }
    if (!slot_k_[l].data) alloc_slots(static_cast<std::int64_t>(l));
    s.blocks[bi++].load(backend(), slot_k_[l]);
    s.blocks[bi++].load(backend(), slot_v_[l]);
  }
}

}  // namespace dsrsq
