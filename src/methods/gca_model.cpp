#include "methods/gca_model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "model/transformer.hpp"

namespace dsrsq {
namespace {

constexpr std::int32_t kEmpty = KVCache::kEmptyPos;

// Host copies of small float tensors (scores, weights, the loss mask) of the
// model's dtype, as doubles: the model's tensors live on its backend.
std::vector<double> host_doubles(Backend& be, const TensorView& t) {
  if (t.dtype == DType::f64) return to_host<double>(be, t);
  const std::vector<float> f = to_host<float>(be, t);
  return std::vector<double>(f.begin(), f.end());
}
void upload_doubles(Backend& be, const std::vector<double>& v, const TensorView& t) {
  if (t.dtype == DType::f64) {
    from_host<double>(be, v, t);
    return;
  }
  std::vector<float> f(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) f[i] = static_cast<float>(v[i]);
  from_host<float>(be, f, t);
}
TensorView ints(Backend& be, Arena& ar, const std::vector<std::int32_t>& v) {
  TensorView t = ar.allocate(Shape{static_cast<std::int64_t>(v.size())}, DType::i32);
  if (!v.empty()) from_host<std::int32_t>(be, v, t);
  return t;
}
// Arena::zeros is for host arenas: zeroed by the backend.
TensorView zeros(Backend& be, Arena& ar, Shape s, DType t) {
  TensorView z = ar.allocate(s, t);
  be.fill(z, 0.0);
  return z;
}
std::int64_t block_params(std::int64_t C, std::int64_t F) { return 2 * C + 4 * (C * C + C) + 2 * C + F * C + F + C * F + C; }

// softmax of the chosen scores (the weights); all -inf cannot happen (count >= 1).
void softmax_into(const std::vector<double>& s, std::vector<double>& w) {
  const double m = *std::max_element(s.begin(), s.end());
  double z = 0;
  w.resize(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) z += (w[i] = std::exp(s[i] - m));
  for (auto& x : w) x /= z;
}

}  // namespace

void GcaConfig::validate() const {
  base.validate();
  DSRSQ_INPUT_CHECK(chunk >= 1, "option --gca_chunk: must be >= 1 token per chunk, got ", chunk);
  DSRSQ_INPUT_CHECK(topk >= 1, "option --gca_topk: must be >= 1, got ", topk);
  DSRSQ_INPUT_CHECK(window >= 1, "option --gca_window: must be >= 1, got ", window);
  DSRSQ_INPUT_CHECK(n_enc >= 1, "option --gca_encoder_layers: must be >= 1, got ", n_enc);
  DSRSQ_INPUT_CHECK(n_lower >= 1 && n_upper >= 1, "option --n_layers: GCA needs >= 1 lower and >= 1 upper layer (got ",
                    n_lower, " lower, ", n_upper, " upper)");
  DSRSQ_INPUT_CHECK(enc_d_ff >= 1, "option --gca_encoder_d_ff: must be >= 1, got ", enc_d_ff);
}

std::int64_t GcaConfig::num_parameters() const {
  const std::int64_t C = base.d_model;
  return (base.vocab + 1) * C + n_lower * block_params(C, base.d_ff) +
         n_upper * (block_params(C, base.d_ff) + 2 * C + 2 * C * C) + 2 * C + n_enc * block_params(C, enc_d_ff) +
         2 * C + 2 * C * C + 2 * C + 2 * C;
}

GcaModel::GcaModel(const GcaConfig& cfg, Backend& backend, DType dtype)
    : cfg_(cfg), be_(backend), dt_(dtype), param_arena_("gca parameters", 1 << 20, backend.allocator()),
      grad_arena_("gca gradients", 1 << 20, backend.allocator()),
      act_arena_("gca activations", 64 << 20, backend.allocator()) {
  cfg_.validate();
  DSRSQ_REQUIRE(dt_ == DType::f32 || dt_ == DType::f64, "GcaModel: float dtype expected");
  build();
  init_weights(0);
}

void GcaModel::build() {
  const std::int64_t C = cfg_.base.d_model, F = cfg_.base.d_ff, V = cfg_.base.vocab, Fe = cfg_.enc_d_ff;
  const std::int64_t total = cfg_.num_parameters();
  flat_params_ = zeros(be_, param_arena_, Shape{total}, dt_);
  flat_grads_ = zeros(be_, grad_arena_, Shape{total}, dt_);
  std::int64_t off = 0;
  auto take = [&](const std::string& name, Shape s, bool decay, TensorView& value, TensorView& grad) {
    value = flat_params_.rows(off, s.numel()).reshaped(s);
    grad = flat_grads_.rows(off, s.numel()).reshaped(s);
    params_.push_back(Param{name, value, grad, decay});
    off += s.numel();
  };
  // Row V of the embedding is the landmark's; logits use rows [0, V).
  take("wte", Shape{V + 1, C}, true, wte_, dwte_);
  auto block = [&](const std::string& pre, std::int64_t Fb, bool gca, Block& p, Block& g) {
    take(pre + "ln1.weight", Shape{C}, false, p.ln1_w, g.ln1_w);
    take(pre + "ln1.bias", Shape{C}, false, p.ln1_b, g.ln1_b);
    take(pre + "attn.wq", Shape{C, C}, true, p.wq, g.wq);
    take(pre + "attn.bq", Shape{C}, false, p.bq, g.bq);
    take(pre + "attn.wk", Shape{C, C}, true, p.wk, g.wk);
    take(pre + "attn.bk", Shape{C}, false, p.bk, g.bk);
    take(pre + "attn.wv", Shape{C, C}, true, p.wv, g.wv);
    take(pre + "attn.bv", Shape{C}, false, p.bv, g.bv);
    take(pre + "attn.wo", Shape{C, C}, true, p.wo, g.wo);
    take(pre + "attn.bo", Shape{C}, false, p.bo, g.bo);
    take(pre + "ln2.weight", Shape{C}, false, p.ln2_w, g.ln2_w);
    take(pre + "ln2.bias", Shape{C}, false, p.ln2_b, g.ln2_b);
    take(pre + "mlp.wfc", Shape{Fb, C}, true, p.wfc, g.wfc);
    take(pre + "mlp.bfc", Shape{Fb}, false, p.bfc, g.bfc);
    take(pre + "mlp.wproj", Shape{C, Fb}, true, p.wproj, g.wproj);
    take(pre + "mlp.bproj", Shape{C}, false, p.bproj, g.bproj);
    if (gca) {
      take(pre + "gca.ln.weight", Shape{C}, false, p.lng_w, g.lng_w);
      take(pre + "gca.ln.bias", Shape{C}, false, p.lng_b, g.lng_b);
      take(pre + "gca.wq", Shape{C, C}, true, p.gwq, g.gwq);  // no biases, as DRT (attention_bias false)
      take(pre + "gca.wo", Shape{C, C}, true, p.gwo, g.gwo);
    }
  };
  auto blocks = [&](const std::string& pre, std::int64_t n, std::int64_t Fb, bool gca, std::vector<Block>& p,
                    std::vector<Block>& g) {
    p.resize(static_cast<std::size_t>(n));
    g.resize(static_cast<std::size_t>(n));
    for (std::int64_t l = 0; l < n; ++l)
      block(pre + std::to_string(l) + ".", Fb, gca, p[static_cast<std::size_t>(l)], g[static_cast<std::size_t>(l)]);
  };
  blocks("lower.", cfg_.n_lower, F, false, lower_, dlower_);
  take("enc.ln_in.weight", Shape{C}, false, enc_in_w_, denc_in_w_);
  take("enc.ln_in.bias", Shape{C}, false, enc_in_b_, denc_in_b_);
  blocks("enc.", cfg_.n_enc, Fe, false, enc_, denc_);
  take("enc.ln_out.weight", Shape{C}, false, enc_out_w_, denc_out_w_);
  take("enc.ln_out.bias", Shape{C}, false, enc_out_b_, denc_out_b_);
  take("mem.wk", Shape{C, C}, true, memk_, dmemk_);
  take("mem.wv", Shape{C, C}, true, memv_, dmemv_);
  take("lmk_norm.weight", Shape{C}, false, lmk_w_, dlmk_w_);
  take("lmk_norm.bias", Shape{C}, false, lmk_b_, dlmk_b_);
  blocks("upper.", cfg_.n_upper, F, true, upper_, dupper_);
  take("lnf.weight", Shape{C}, false, lnf_w_, dlnf_w_);
  take("lnf.bias", Shape{C}, false, lnf_b_, dlnf_b_);
  DSRSQ_REQUIRE(off == total, "gca parameter layout covers ", off, " of ", total, " values");
}

const Param& GcaModel::param(const std::string& name) const {
  for (const auto& p : params_)
    if (p.name == name) return p;
  raise_input_error("gca: no parameter named '" + name + "'");
}

void GcaModel::init_weights(std::uint64_t seed) {
  const double n_layers = static_cast<double>(cfg_.n_lower + cfg_.n_upper);
  const double resid_std = 0.02 / std::sqrt(2.0 * n_layers);
  std::uint64_t stream = 0;
  for (auto& p : params_) {
    Rng rng(seed, stream++);
    const std::int64_t n = p.value.numel();
    const auto ends = [&](const char* s) {
      const std::string t(s);
      return p.name.size() >= t.size() && p.name.compare(p.name.size() - t.size(), t.size(), t) == 0;
    };
    const bool norm_weight = ends("ln1.weight") || ends("ln2.weight") || ends("ln.weight") || ends("ln_in.weight") ||
                             ends("ln_out.weight") || ends("lmk_norm.weight") || ends("lnf.weight");
    const bool resid = ends("attn.wo") || ends("mlp.wproj") || ends("gca.wo");
    std::vector<double> v(static_cast<std::size_t>(n));  // drawn on the host, then copied to the backend
    for (std::int64_t i = 0; i < n; ++i)
      v[static_cast<std::size_t>(i)] = norm_weight ? 1.0 : !p.decay ? 0.0 : rng.normal() * (resid ? resid_std : 0.02);
    upload_doubles(be_, v, p.value);
  }
}

void GcaModel::init_from_standard(Transformer& standard) {
  const ModelConfig& sc = standard.config();
  const ModelConfig& gc = cfg_.base;
  const auto same = [](const char* what, auto a, auto b) {
    DSRSQ_INPUT_CHECK(a == b, "gca: the standard model's ", what, " is ", a, ", this GCA model's ", b,
                      " (GCA starts from a standard model of its own shape)");
  };
  same("vocab", sc.vocab, gc.vocab);
  same("d_model", sc.d_model, gc.d_model);
  same("n_heads", sc.n_heads, gc.n_heads);
  same("d_ff", sc.d_ff, gc.d_ff);
  same("n_layers", sc.n_layers, cfg_.n_lower + cfg_.n_upper);
  same("rope_theta", sc.rope_theta, gc.rope_theta);
  same("attn_log_base", sc.attn_log_base, gc.attn_log_base);
  same("ln_eps", sc.ln_eps, gc.ln_eps);
  DSRSQ_INPUT_CHECK(sc.tied_embedding, "gca: the standard model has an untied output head; GCA's logits are tied to "
                                       "its token embedding");
  Backend& sbe = standard.backend();
  const auto copy = [&](const std::string& from, const TensorView& to) {
    const TensorView src = standard.param(from).value;
    DSRSQ_REQUIRE(src.numel() == to.numel(), "gca: ", from, " has ", src.numel(), " values, its GCA place ", to.numel());
    upload_doubles(be_, host_doubles(sbe, src), to);
  };
  const std::int64_t V = gc.vocab, C = gc.d_model;
  copy("wte", wte_.reshaped(Shape{(V + 1) * C}).rows(0, V * C));
  static const char* const kBlock[] = {"ln1.weight", "ln1.bias", "attn.wq", "attn.bq",  "attn.wk",  "attn.bk",
                                       "attn.wv",    "attn.bv",  "attn.wo", "attn.bo",  "ln2.weight", "ln2.bias",
                                       "mlp.wfc",    "mlp.bfc",  "mlp.wproj", "mlp.bproj"};
  for (std::int64_t l = 0; l < sc.n_layers; ++l) {
    const bool lower = l < cfg_.n_lower;
    const std::string to = lower ? "lower." + std::to_string(l) + "." : "upper." + std::to_string(l - cfg_.n_lower) + ".";
    for (const char* n : kBlock) copy("h." + std::to_string(l) + "." + n, param(to + n).value);
  }
  copy("lnf.weight", lnf_w_);
  copy("lnf.bias", lnf_b_);
  for (const Block& u : upper_) be_.fill(u.gwo, 0.0);
}

void GcaModel::zero_grad() { be_.fill(flat_grads_, 0.0); }

std::int32_t GcaModel::selected(std::int64_t b, std::int64_t c, std::int64_t i) const {
  DSRSQ_REQUIRE(b >= 0 && b < B_ && c >= 0 && c < NC_ && i >= 0 && i < cfg_.topk, "gca: selected() out of range");
  return sel_[static_cast<std::size_t>((b * NC_ + c) * cfg_.topk + i)];
}
double GcaModel::score(std::int64_t b, std::int64_t c, std::int64_t j) const {
  DSRSQ_REQUIRE(b >= 0 && b < B_ && c >= 0 && c < NC_ && j >= 0 && j < NC_, "gca: score() out of range");
  return host_doubles(be_, scores_.reshaped(Shape{B_ * NC_ * NC_}).rows((b * NC_ + c) * NC_ + j, 1))[0];
}
double GcaModel::weight(std::int64_t b, std::int64_t c, std::int64_t i) const {
  DSRSQ_REQUIRE(b >= 0 && b < B_ && c >= 0 && c < NC_ && i >= 0 && i < cfg_.topk, "gca: weight() out of range");
  return selw_[static_cast<std::size_t>((b * NC_ + c) * cfg_.topk + i)];
}

// ---- self-attention --------------------------------------------------------
// Window (stream): key j is visible to query i iff i - W <= j <= i. With blocks
// of P = W + 1 entries, query i of block m sees the keys of block m up to
// itself (causal) and the keys of block m-1 with a larger offset in the
// block. The second part is causal attention on made-up positions (query
// P-1-off_i, key P-off_j: visible iff off_j > off_i); the two partial results
// merge by their log-sum-exp, and each part's backward uses the merged o, lse.
// Chunk (encoder): bidirectional within each chunk of S + 1 rows.
void GcaModel::self_attn_fwd(Arena& ar, Acts& A, Kind kind) {
  const std::int64_t C = cfg_.base.d_model, NH = cfg_.base.n_heads, HS = cfg_.base.head_size();
  if (kind == Kind::chunk) {
    const std::int64_t R = cfg_.chunk + 1, nb = A.q.shape[0] / R;
    const Shape s{nb, R, NH, HS};
    A.att = ar.allocate(Shape{nb * R, C}, dt_);
    A.lse = ar.allocate(Shape{nb, NH, R}, dt_);
    be_.attention_fwd(AttentionArgs{A.q.reshaped(s), A.k.reshaped(s), A.v.reshaped(s), A.att.reshaped(s), A.lse,
                                    epos_.reshaped(Shape{nb, R}), epos_.reshaped(Shape{nb, R}), false, 0.0});
    return;
  }
  const std::int64_t P = cfg_.window + 1, nb = B_ * Tp_ / P, N = B_ * Tp_;
  const Shape s{nb, P, NH, HS}, ps{nb, P};
  A.att = ar.allocate(Shape{N, C}, dt_);
  A.lse = ar.allocate(Shape{nb, NH, P}, dt_);
  be_.attention_fwd(AttentionArgs{A.q.reshaped(s), A.k.reshaped(s), A.v.reshaped(s), A.att.reshaped(s), A.lse,
                                  spos_.reshaped(ps), spos_.reshaped(ps), true, 0.0});
  A.kprev = zeros(be_, ar, Shape{N, C}, dt_);
  A.vprev = zeros(be_, ar, Shape{N, C}, dt_);
  for (std::int64_t b = 0; b < B_; ++b)
    if (Tp_ > P) {
      be_.copy(A.k.rows(b * Tp_, Tp_ - P), A.kprev.rows(b * Tp_ + P, Tp_ - P));
      be_.copy(A.v.rows(b * Tp_, Tp_ - P), A.vprev.rows(b * Tp_ + P, Tp_ - P));
    }
  TensorView ob = ar.allocate(Shape{N, C}, dt_), lseb = ar.allocate(Shape{nb, NH, P}, dt_);
  be_.attention_fwd(AttentionArgs{A.q.reshaped(s), A.kprev.reshaped(s), A.vprev.reshaped(s), ob.reshaped(s), lseb,
                                  qposB_.reshaped(ps), kposB_.reshaped(ps), true, 0.0});
  be_.attention_merge(AttentionMergeArgs{A.att.reshaped(s), A.lse, ob.reshaped(s), lseb});
}

void GcaModel::self_attn_bwd(Arena& ar, const Acts& A, TensorView datt, TensorView dq, TensorView dk, TensorView dv,
                             Kind kind) {
  const std::int64_t C = cfg_.base.d_model, NH = cfg_.base.n_heads, HS = cfg_.base.head_size();
  if (kind == Kind::chunk) {
    const std::int64_t R = cfg_.chunk + 1, nb = A.q.shape[0] / R;
    const Shape s{nb, R, NH, HS};
    be_.attention_bwd(AttentionGradArgs{datt.reshaped(s), A.q.reshaped(s), A.k.reshaped(s), A.v.reshaped(s),
                                        A.att.reshaped(s), A.lse, epos_.reshaped(Shape{nb, R}),
                                        epos_.reshaped(Shape{nb, R}), dq.reshaped(s), dk.reshaped(s), dv.reshaped(s),
                                        false, 0.0});
    return;
  }
  const std::int64_t P = cfg_.window + 1, nb = B_ * Tp_ / P, N = B_ * Tp_;
  const Shape s{nb, P, NH, HS}, ps{nb, P};
  be_.attention_bwd(AttentionGradArgs{datt.reshaped(s), A.q.reshaped(s), A.k.reshaped(s), A.v.reshaped(s),
                                      A.att.reshaped(s), A.lse, spos_.reshaped(ps), spos_.reshaped(ps), dq.reshaped(s),
                                      dk.reshaped(s), dv.reshaped(s), true, 0.0});
  TensorView dkp = zeros(be_, ar, Shape{N, C}, dt_), dvp = zeros(be_, ar, Shape{N, C}, dt_);
  be_.attention_bwd(AttentionGradArgs{datt.reshaped(s), A.q.reshaped(s), A.kprev.reshaped(s), A.vprev.reshaped(s),
                                      A.att.reshaped(s), A.lse, qposB_.reshaped(ps), kposB_.reshaped(ps),
                                      dq.reshaped(s), dkp.reshaped(s), dvp.reshaped(s), true, 0.0});
  for (std::int64_t b = 0; b < B_; ++b)
    if (Tp_ > P) {
      be_.axpy(AxpyArgs{dkp.rows(b * Tp_ + P, Tp_ - P), dk.rows(b * Tp_, Tp_ - P), 1.0});
      be_.axpy(AxpyArgs{dvp.rows(b * Tp_ + P, Tp_ - P), dv.rows(b * Tp_, Tp_ - P), 1.0});
    }
}

// ---- grouped cross attention (upper layers) --------------------------------
// Problems m = (group g, slot i): the S + 1 query rows of token chunk t >= 2
// against retrieved chunk i's S + 1 memory rows (the zeroed landmark slot is
// the +1). Outputs combine with the weights by one batched product
// (G, 1, k) x (G, k, R C); rows past the stream's end go to a sink row.
void GcaModel::gca_fwd(Arena& ar, const Block& p, Acts& A) {
  const std::int64_t C = cfg_.base.d_model, NH = cfg_.base.n_heads, HS = cfg_.base.head_size();
  const std::int64_t N = B_ * Tp_, R = cfg_.chunk + 1, K = cfg_.topk, M = G_ * K;
  A.lng = ar.allocate(Shape{N, C}, dt_);
  A.mg = ar.allocate(Shape{N}, dt_);
  A.rg = ar.allocate(Shape{N}, dt_);
  be_.layernorm_fwd(LayerNormArgs{A.x1, p.lng_w, p.lng_b, A.lng, A.mg, A.rg, cfg_.base.ln_eps});
  A.qg = zeros(be_, ar, Shape{N + 1, C}, dt_);
  be_.linear_fwd(LinearArgs{A.lng, p.gwq, {}, A.qg.rows(0, N)});
  A.gatt = zeros(be_, ar, Shape{N + 1, C}, dt_);
  if (G_ > 0) {
    A.qrep = ar.allocate(Shape{M * R, C}, dt_);
    be_.gather_rows(GatherRowsArgs{A.qg, qidx_rep_, A.qrep});
    A.go = ar.allocate(Shape{M * R, C}, dt_);
    A.glse = ar.allocate(Shape{M, NH, R}, dt_);
    const Shape s{M, R, NH, HS};
    TensorView zp = zpos_.reshaped(Shape{M, R});
    be_.attention_fwd(AttentionArgs{A.qrep.reshaped(s), krep_.reshaped(s), vrep_.reshaped(s), A.go.reshaped(s), A.glse,
                                    zp, zp, false, 0.0});
    A.gcomb = ar.allocate(Shape{G_ * R, C}, dt_);
    be_.matmul_fwd(MatmulArgs{wts_, A.go.reshaped(Shape{G_, K, R * C}), A.gcomb.reshaped(Shape{G_, 1, R * C}), {}});
    be_.scatter_add_rows(ScatterAddRowsArgs{A.gcomb, qidx_, A.gatt});
  }
  A.y = ar.allocate(Shape{N, C}, dt_);
  be_.linear_fwd(LinearArgs{A.gatt.rows(0, N), p.gwo, {}, A.y});
  be_.axpy(AxpyArgs{A.x1, A.y, 1.0});
}

void GcaModel::gca_bwd(Arena& ar, const Block& p, const Block& g, const Acts& A, TensorView dy, TensorView dx1) {
  const std::int64_t C = cfg_.base.d_model, NH = cfg_.base.n_heads, HS = cfg_.base.head_size();
  const std::int64_t N = B_ * Tp_, R = cfg_.chunk + 1, K = cfg_.topk, M = G_ * K;
  TensorView dgatt = zeros(be_, ar, Shape{N + 1, C}, dt_);
  be_.linear_bwd(LinearGradArgs{dy, A.gatt.rows(0, N), p.gwo, dgatt.rows(0, N), g.gwo, {}, false});
  if (G_ == 0) return;  // nothing was retrieved: no gradient reaches q
  TensorView dgcomb = ar.allocate(Shape{G_ * R, C}, dt_);
  be_.gather_rows(GatherRowsArgs{dgatt, qidx_, dgcomb});
  TensorView dgo = zeros(be_, ar, Shape{M * R, C}, dt_);
  be_.matmul_bwd(MatmulGradArgs{dgcomb.reshaped(Shape{G_, 1, R * C}), wts_, A.go.reshaped(Shape{G_, K, R * C}),
                                dwts_, dgo.reshaped(Shape{G_, K, R * C}), {}});
  TensorView dqrep = zeros(be_, ar, Shape{M * R, C}, dt_);
  const Shape s{M, R, NH, HS};
  TensorView zp = zpos_.reshaped(Shape{M, R});
  be_.attention_bwd(AttentionGradArgs{dgo.reshaped(s), A.qrep.reshaped(s), krep_.reshaped(s), vrep_.reshaped(s),
                                      A.go.reshaped(s), A.glse, zp, zp, dqrep.reshaped(s), dkrep_.reshaped(s),
                                      dvrep_.reshaped(s), false, 0.0});
  TensorView dqg = zeros(be_, ar, Shape{N + 1, C}, dt_);
  be_.scatter_add_rows(ScatterAddRowsArgs{dqrep, qidx_rep_, dqg});
  TensorView dlng = ar.allocate(Shape{N, C}, dt_);
  be_.linear_bwd(LinearGradArgs{dqg.rows(0, N), A.lng, p.gwq, dlng, g.gwq, {}, false});
  be_.layernorm_bwd(LayerNormGradArgs{dlng, A.x1, p.lng_w, A.mg, A.rg, dx1, g.lng_w, g.lng_b});
}

// ---- one pre-LN block --------------------------------------------------------
void GcaModel::block_fwd(Arena& ar, const Block& p, Acts& A, TensorView x, TensorView out, Kind kind, bool upper,
                         std::int64_t n, std::int64_t F) {
  const std::int64_t C = cfg_.base.d_model, NH = cfg_.base.n_heads, HS = cfg_.base.head_size();
  const double eps = cfg_.base.ln_eps;
  A.x_in = x;
  A.ln1 = ar.allocate(Shape{n, C}, dt_);
  A.m1 = ar.allocate(Shape{n}, dt_);
  A.r1 = ar.allocate(Shape{n}, dt_);
  be_.layernorm_fwd(LayerNormArgs{x, p.ln1_w, p.ln1_b, A.ln1, A.m1, A.r1, eps});
  A.q = ar.allocate(Shape{n, C}, dt_);
  A.k = ar.allocate(Shape{n, C}, dt_);
  A.v = ar.allocate(Shape{n, C}, dt_);
  be_.linear_fwd(LinearArgs{A.ln1, p.wq, p.bq, A.q});
  be_.linear_fwd(LinearArgs{A.ln1, p.wk, p.bk, A.k});
  be_.linear_fwd(LinearArgs{A.ln1, p.wv, p.bv, A.v});
  TensorView pos = kind == Kind::chunk ? epos_ : spos_;
  be_.rope_fwd(RopeArgs{A.q.reshaped(Shape{n, NH, HS}), pos, cfg_.base.rope_theta, cfg_.base.attn_log_base});
  be_.rope_fwd(RopeArgs{A.k.reshaped(Shape{n, NH, HS}), pos, cfg_.base.rope_theta});
  self_attn_fwd(ar, A, kind);
  A.x1 = ar.allocate(Shape{n, C}, dt_);
  be_.linear_fwd(LinearArgs{A.att, p.wo, p.bo, A.x1});
  be_.axpy(AxpyArgs{x, A.x1, 1.0});
  TensorView pre = A.x1;
  if (upper) {
    gca_fwd(ar, p, A);
    pre = A.y;  // y = x1 + GCA(x1) feeds the MLP; the residual stays x1
  }
  A.ln2 = ar.allocate(Shape{n, C}, dt_);
  A.m2 = ar.allocate(Shape{n}, dt_);
  A.r2 = ar.allocate(Shape{n}, dt_);
  be_.layernorm_fwd(LayerNormArgs{pre, p.ln2_w, p.ln2_b, A.ln2, A.m2, A.r2, eps});
  A.fc = ar.allocate(Shape{n, F}, dt_);
  be_.linear_fwd(LinearArgs{A.ln2, p.wfc, p.bfc, A.fc});
  A.fca = ar.allocate(Shape{n, F}, dt_);
  be_.gelu_fwd(GeluArgs{A.fc, A.fca});
  be_.linear_fwd(LinearArgs{A.fca, p.wproj, p.bproj, out});
  be_.axpy(AxpyArgs{A.x1, out, 1.0});
}

void GcaModel::block_bwd(Arena& ar, const Block& p, const Block& g, const Acts& A, TensorView dx, Kind kind,
                         bool upper, std::int64_t n, std::int64_t F) {
  const std::int64_t C = cfg_.base.d_model, NH = cfg_.base.n_heads, HS = cfg_.base.head_size();
  ArenaScope scope(ar);
  TensorView dfca = ar.allocate(Shape{n, F}, dt_);
  be_.linear_bwd(LinearGradArgs{dx, A.fca, p.wproj, dfca, g.wproj, g.bproj, false});
  TensorView dfc = ar.allocate(Shape{n, F}, dt_);
  be_.gelu_bwd(GeluGradArgs{dfca, A.fc, dfc});
  TensorView dln2 = ar.allocate(Shape{n, C}, dt_);
  be_.linear_bwd(LinearGradArgs{dfc, A.ln2, p.wfc, dln2, g.wfc, g.bfc, false});
  if (upper) {
    TensorView dy = zeros(be_, ar, Shape{n, C}, dt_);
    be_.layernorm_bwd(LayerNormGradArgs{dln2, A.y, p.ln2_w, A.m2, A.r2, dy, g.ln2_w, g.ln2_b});
    be_.axpy(AxpyArgs{dy, dx, 1.0});
    gca_bwd(ar, p, g, A, dy, dx);
  } else {
    be_.layernorm_bwd(LayerNormGradArgs{dln2, A.x1, p.ln2_w, A.m2, A.r2, dx, g.ln2_w, g.ln2_b});
  }
  // dx is now d(x1).
  TensorView datt = ar.allocate(Shape{n, C}, dt_);
  be_.linear_bwd(LinearGradArgs{dx, A.att, p.wo, datt, g.wo, g.bo, false});
  TensorView dq = zeros(be_, ar, Shape{n, C}, dt_), dk = zeros(be_, ar, Shape{n, C}, dt_), dv = zeros(be_, ar, Shape{n, C}, dt_);
  self_attn_bwd(ar, A, datt, dq, dk, dv, kind);
  TensorView pos = kind == Kind::chunk ? epos_ : spos_;
  be_.rope_bwd(RopeArgs{dq.reshaped(Shape{n, NH, HS}), pos, cfg_.base.rope_theta, cfg_.base.attn_log_base});
  be_.rope_bwd(RopeArgs{dk.reshaped(Shape{n, NH, HS}), pos, cfg_.base.rope_theta});
  TensorView dln1 = ar.allocate(Shape{n, C}, dt_);
  be_.linear_bwd(LinearGradArgs{dq, A.ln1, p.wq, dln1, g.wq, g.bq, false});
  be_.linear_bwd(LinearGradArgs{dk, A.ln1, p.wk, dln1, g.wk, g.bk, true});
  be_.linear_bwd(LinearGradArgs{dv, A.ln1, p.wv, dln1, g.wv, g.bv, true});
  be_.layernorm_bwd(LayerNormGradArgs{dln1, A.x_in, p.ln1_w, A.m1, A.r1, dx, g.ln1_w, g.ln1_b});
}

// ---- retrieval -------------------------------------------------------------
void GcaModel::retrieve(Arena& ar) {
  const std::int64_t C = cfg_.base.d_model, S = cfg_.chunk, R = S + 1, K = cfg_.topk, NC = NC_;
  sel_.assign(static_cast<std::size_t>(B_ * NC * K), -1);
  selw_.assign(sel_.size(), 0.0);
  if (NC == 0) return;
  std::vector<std::int32_t> li, ei;
  for (std::int64_t b = 0; b < B_; ++b)
    for (std::int64_t c = 0; c < NC; ++c) {
      li.push_back(static_cast<std::int32_t>(b * Tp_ + c * R + S));
      ei.push_back(static_cast<std::int32_t>((b * NC + c) * R + S));
    }
  lmk_idx_ = ints(be_, ar, li);
  eidx_ = ints(be_, ar, ei);
  hq_ = ar.allocate(Shape{B_ * NC, C}, dt_);
  be_.gather_rows(GatherRowsArgs{h_, lmk_idx_, hq_});
  hqn_ = ar.allocate(Shape{B_ * NC, C}, dt_);
  hq_m_ = ar.allocate(Shape{B_ * NC}, dt_);
  hq_r_ = ar.allocate(Shape{B_ * NC}, dt_);
  be_.layernorm_fwd(LayerNormArgs{hq_, lmk_w_, lmk_b_, hqn_, hq_m_, hq_r_, cfg_.base.ln_eps});
  ekeys_ = ar.allocate(Shape{B_ * NC, C}, dt_);
  be_.gather_rows(GatherRowsArgs{E_, eidx_, ekeys_});
  scores_ = ar.allocate(Shape{B_, NC, NC}, dt_);
  be_.matmul_fwd(MatmulArgs{hqn_.reshaped(Shape{B_, NC, C}), ekeys_.reshaped(Shape{B_, NC, C}), scores_, {}, false, true,
                            1.0 / std::sqrt(static_cast<double>(C))});
  // Choice: landmark c sees chunks c' < c; Gumbel noise only for choosing.
  ArenaScope scope(ar);
  TensorView noisy = ar.allocate(Shape{B_ * NC, NC}, dt_);
  std::optional<Rng> rng;
  if (noise_) rng.emplace(*noise_, 0x6CA);
  const double ninf = -std::numeric_limits<double>::infinity();
  const std::vector<double> sc = host_doubles(be_, scores_);  // the choice runs on the host
  std::vector<double> nv(sc.size());
  for (std::int64_t b = 0; b < B_; ++b)
    for (std::int64_t c = 0; c < NC; ++c)
      for (std::int64_t j = 0; j < NC; ++j) {
        const std::int64_t i = (b * NC + c) * NC + j;
        double v = j < c ? sc[static_cast<std::size_t>(i)] : ninf;
        if (rng && j < c) {
          double u = rng->uniform();
          while (u <= 0.0) u = rng->uniform();
          v += -std::log(-std::log(u));
        }
        nv[static_cast<std::size_t>(i)] = v;
      }
  upload_doubles(be_, nv, noisy);
  const std::int64_t kk = std::min(K, NC);
  TensorView idx = ar.allocate(Shape{B_ * NC, kk}, DType::i32);
  be_.topk(TopKArgs{noisy, idx});
  const std::vector<std::int32_t> ipv = to_host<std::int32_t>(be_, idx);
  const std::int32_t* ip = ipv.data();
  std::vector<double> s, w;
  for (std::int64_t b = 0; b < B_; ++b)
    for (std::int64_t c = 0; c < NC; ++c) {
      const std::int64_t count = std::min(K, c);
      if (count == 0) continue;
      s.clear();
      for (std::int64_t i = 0; i < count; ++i)
        s.push_back(sc[static_cast<std::size_t>((b * NC + c) * NC + ip[(b * NC + c) * kk + i])]);
      softmax_into(s, w);
      for (std::int64_t i = 0; i < count; ++i) {
        sel_[static_cast<std::size_t>((b * NC + c) * K + i)] = ip[(b * NC + c) * kk + i];
        selw_[static_cast<std::size_t>((b * NC + c) * K + i)] = w[static_cast<std::size_t>(i)];
      }
    }
}

// ---- training forward / backward -------------------------------------------
double GcaModel::forward(const Batch& batch, double inv_norm) {
  const auto& mc = cfg_.base;
  DSRSQ_INPUT_CHECK(batch.tokens.shape.rank == 2 && batch.tokens.dtype == DType::i32,
                    "gca input: tokens must be i32 (B, T), got ", batch.tokens.str());
  DSRSQ_INPUT_CHECK(batch.pos.shape == batch.tokens.shape && batch.pos.dtype == DType::i32, "gca input: positions ",
                    batch.pos.str(), " must be i32 with the tokens' shape");
  act_arena_.reset();
  Arena& ar = act_arena_;
  const std::int64_t B = batch.tokens.shape[0], T = batch.tokens.shape[1];
  const std::int64_t C = mc.d_model, V = mc.vocab, S = cfg_.chunk, R = S + 1, K = cfg_.topk, P = cfg_.window + 1;
  const auto* tk = batch.tokens.ptr<std::int32_t>();
  const auto* ps = batch.pos.ptr<std::int32_t>();
  for (std::int64_t i = 0; i < B * T; ++i) {
    DSRSQ_INPUT_CHECK(tk[i] >= 0 && tk[i] < V, "gca input: token id ", tk[i], " outside the vocabulary [0, ", V, ")");
    DSRSQ_INPUT_CHECK(ps[i] == i % T, "gca input: row ", i / T, " position ", ps[i], " at column ", i % T,
                      ": GCA counts chunks from the sequence start, positions must be 0..T-1");
  }
  B_ = B;
  T_ = T;
  NC_ = T / S;
  Te_ = T + NC_;
  Tp_ = (Te_ + P - 1) / P * P;
  const std::int64_t N = B * Tp_;
  // Stream layout: ids (V = landmark), positions and the made-up window positions.
  std::vector<std::int32_t> ids(static_cast<std::size_t>(N)), sp(ids.size()), qb(ids.size()), kb(ids.size()), tr;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t e = 0; e < Tp_; ++e) {
      const auto i = static_cast<std::size_t>(b * Tp_ + e);
      ids[i] = e >= Te_ ? 0 : e % R == S ? static_cast<std::int32_t>(V) : tk[b * T + e - e / R];
      sp[i] = static_cast<std::int32_t>(e);
      qb[i] = static_cast<std::int32_t>(P - 1 - e % P);
      kb[i] = e >= P ? static_cast<std::int32_t>(P - e % P) : kEmpty;
    }
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) tr.push_back(static_cast<std::int32_t>(b * Tp_ + cfg_.stream_index(t)));
  ids_ = ints(be_, ar, ids);
  spos_ = ints(be_, ar, sp);
  qposB_ = ints(be_, ar, qb);
  kposB_ = ints(be_, ar, kb);
  tok_rows_ = ints(be_, ar, tr);
  {
    std::vector<std::int32_t> ep(static_cast<std::size_t>(B * NC_ * R));
    for (std::size_t i = 0; i < ep.size(); ++i) ep[i] = static_cast<std::int32_t>(i % static_cast<std::size_t>(R));
    epos_ = ints(be_, ar, ep);
  }
  have_targets_ = !batch.targets.empty();

  TensorView x = ar.allocate(Shape{N, C}, dt_);
  be_.embedding_fwd(EmbeddingArgs{ids_, wte_, x});
  lacts_.resize(lower_.size());
  for (std::size_t l = 0; l < lower_.size(); ++l) {
    TensorView out = ar.allocate(Shape{N, C}, dt_);
    block_fwd(ar, lower_[l], lacts_[l], x, out, Kind::window, false, N, mc.d_ff);
    x = out;
  }
  h_ = x;
  // Chunk encoder over the complete chunks, its memory and landmark keys.
  eacts_.resize(enc_.size());
  if (NC_ > 0) {
    const std::int64_t NE = B * NC_ * R;
    std::vector<std::int32_t> ei(static_cast<std::size_t>(NE));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t r = 0; r < NC_ * R; ++r) ei[static_cast<std::size_t>(b * NC_ * R + r)] = static_cast<std::int32_t>(b * Tp_ + r);
    enc_idx_ = ints(be_, ar, ei);
    enc_x_ = ar.allocate(Shape{NE, C}, dt_);
    be_.gather_rows(GatherRowsArgs{h_, enc_idx_, enc_x_});
    enc_ln_ = ar.allocate(Shape{NE, C}, dt_);
    enc_m_ = ar.allocate(Shape{NE}, dt_);
    enc_r_ = ar.allocate(Shape{NE}, dt_);
    be_.layernorm_fwd(LayerNormArgs{enc_x_, enc_in_w_, enc_in_b_, enc_ln_, enc_m_, enc_r_, mc.ln_eps});
    TensorView ex = enc_ln_;
    for (std::size_t l = 0; l < enc_.size(); ++l) {
      TensorView out = ar.allocate(Shape{NE, C}, dt_);
      block_fwd(ar, enc_[l], eacts_[l], ex, out, Kind::chunk, false, NE, cfg_.enc_d_ff);
      ex = out;
    }
    enc_last_ = ex;
    E_ = ar.allocate(Shape{NE, C}, dt_);
    Em_ = ar.allocate(Shape{NE}, dt_);
    Er_ = ar.allocate(Shape{NE}, dt_);
    be_.layernorm_fwd(LayerNormArgs{enc_last_, enc_out_w_, enc_out_b_, E_, Em_, Er_, mc.ln_eps});
    memK_ = ar.allocate(Shape{NE, C}, dt_);
    memV_ = ar.allocate(Shape{NE, C}, dt_);
    be_.linear_fwd(LinearArgs{E_, memk_, {}, memK_});
    be_.linear_fwd(LinearArgs{E_, memv_, {}, memV_});
    for (std::int64_t i = 0; i < B * NC_; ++i) {  // the landmark slot: zero key and value (the +1)
      be_.fill(memK_.rows(i * R + S, 1), 0.0);
      be_.fill(memV_.rows(i * R + S, 1), 0.0);
    }
  }
  retrieve(ar);
  // Groups: token chunks t >= 2 (t < nt) read landmark t-1's choice.
  const std::int64_t nt = (Te_ + R - 1) / R;
  G_ = nt > 2 ? B * (nt - 2) : 0;
  if (G_ > 0) {
    std::vector<std::int32_t> qi, qir, kir;
    std::vector<double> w;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 2; t < nt; ++t) {
        for (std::int64_t r = 0; r < R; ++r) {
          const std::int64_t e = t * R + r;
          qi.push_back(static_cast<std::int32_t>(e < Te_ ? b * Tp_ + e : N));
        }
        for (std::int64_t i = 0; i < K; ++i) {
          const auto at = static_cast<std::size_t>((b * NC_ + t - 1) * K + i);
          const std::int32_t c = sel_[at];
          w.push_back(c < 0 ? 0.0 : selw_[at]);
          for (std::int64_t r = 0; r < R; ++r) {
            qir.push_back(qi[qi.size() - static_cast<std::size_t>(R) + static_cast<std::size_t>(r)]);
            kir.push_back(static_cast<std::int32_t>((b * NC_ + std::max(c, 0)) * R + r));
          }
        }
      }
    qidx_ = ints(be_, ar, qi);
    qidx_rep_ = ints(be_, ar, qir);
    kidx_rep_ = ints(be_, ar, kir);
    wts_ = ar.allocate(Shape{G_, 1, K}, dt_);
    upload_doubles(be_, w, wts_);
    zpos_ = zeros(be_, ar, Shape{G_ * K * R}, DType::i32);
    krep_ = ar.allocate(Shape{G_ * K * R, C}, dt_);
    vrep_ = ar.allocate(Shape{G_ * K * R, C}, dt_);
    be_.gather_rows(GatherRowsArgs{memK_, kidx_rep_, krep_});
    be_.gather_rows(GatherRowsArgs{memV_, kidx_rep_, vrep_});
  }
  uacts_.resize(upper_.size());
  for (std::size_t l = 0; l < upper_.size(); ++l) {
    TensorView out = ar.allocate(Shape{N, C}, dt_);
    block_fwd(ar, upper_[l], uacts_[l], x, out, Kind::window, true, N, mc.d_ff);
    x = out;
  }
  x_final_ = x;
  xf_tok_ = ar.allocate(Shape{B * T, C}, dt_);
  be_.gather_rows(GatherRowsArgs{x_final_, tok_rows_, xf_tok_});
  lnf_ = ar.allocate(Shape{B * T, C}, dt_);
  lnf_m_ = ar.allocate(Shape{B * T}, dt_);
  lnf_r_ = ar.allocate(Shape{B * T}, dt_);
  be_.layernorm_fwd(LayerNormArgs{xf_tok_, lnf_w_, lnf_b_, lnf_, lnf_m_, lnf_r_, mc.ln_eps});
  logits_ = ar.allocate(Shape{B * T, V}, dt_);
  be_.linear_fwd(LinearArgs{lnf_, wte_.rows(0, V), {}, logits_});
  if (!have_targets_) return 0.0;
  DSRSQ_INPUT_CHECK(batch.targets.shape == batch.tokens.shape && batch.targets.dtype == DType::i32,
                    "gca input: targets ", batch.targets.str(), " must be i32 with shape ", batch.tokens.shape.str());
  DSRSQ_INPUT_CHECK(batch.mask.shape == batch.tokens.shape && batch.mask.dtype == DType::f32, "gca input: loss mask ",
                    batch.mask.str(), " must be f32 with shape ", batch.tokens.shape.str());
  targets_ = ar.allocate(Shape{B * T}, DType::i32);
  from_host<std::int32_t>(be_, std::span<const std::int32_t>(batch.targets.ptr<std::int32_t>(), static_cast<std::size_t>(B * T)),
                          targets_);  // the batch is on the host
  mask_ = ar.allocate(Shape{B * T}, dt_);
  double msum = 0;
  std::vector<double> mv(static_cast<std::size_t>(B * T));
  for (std::int64_t i = 0; i < B * T; ++i) {
    const double m = batch.mask.ptr<float>()[i];
    mv[static_cast<std::size_t>(i)] = m;
    msum += m;
  }
  upload_doubles(be_, mv, mask_);
  if (inv_norm <= 0) inv_norm = msum > 0 ? 1.0 / msum : 0.0;
  inv_norm_ = inv_norm;
  losses_ = ar.allocate(Shape{B * T}, dt_);
  return be_.cross_entropy_fwd(CrossEntropyArgs{logits_, targets_, mask_, losses_, inv_norm_});
}

void GcaModel::backward(double dloss) {
  DSRSQ_REQUIRE(have_targets_ && B_ > 0, "gca: backward() needs a training forward with targets first");
  const auto& mc = cfg_.base;
  const std::int64_t C = mc.d_model, V = mc.vocab, S = cfg_.chunk, R = S + 1, K = cfg_.topk;
  const std::int64_t B = B_, T = T_, N = B * Tp_, NC = NC_;
  Arena& ar = act_arena_;
  ArenaScope scope(ar);
  TensorView dlogits = ar.allocate(Shape{B * T, V}, dt_);
  be_.cross_entropy_bwd(CrossEntropyGradArgs{logits_, targets_, mask_, dlogits, inv_norm_, dloss});
  TensorView dlnf = ar.allocate(Shape{B * T, C}, dt_);
  be_.linear_bwd(LinearGradArgs{dlogits, lnf_, wte_.rows(0, V), dlnf, dwte_.rows(0, V), {}, false});
  TensorView dxt = zeros(be_, ar, Shape{B * T, C}, dt_);
  be_.layernorm_bwd(LayerNormGradArgs{dlnf, xf_tok_, lnf_w_, lnf_m_, lnf_r_, dxt, dlnf_w_, dlnf_b_});
  TensorView dx = zeros(be_, ar, Shape{N, C}, dt_);
  be_.scatter_add_rows(ScatterAddRowsArgs{dxt, tok_rows_, dx});
  if (G_ > 0) {
    dwts_ = zeros(be_, ar, Shape{G_, 1, K}, dt_);
    dkrep_ = zeros(be_, ar, Shape{G_ * K * R, C}, dt_);
    dvrep_ = zeros(be_, ar, Shape{G_ * K * R, C}, dt_);
  }
  for (std::size_t l = upper_.size(); l-- > 0;)
    block_bwd(ar, upper_[l], dupper_[l], uacts_[l], dx, Kind::window, true, N, mc.d_ff);
  // dx = d(h) from the upper stack; add the retrieval and encoder paths.
  if (NC > 0) {
    const std::int64_t NE = B * NC * R;
    // The softmax backward of the choice weights, on the host (each score
    // gets at most one term: the chosen chunks of a landmark are distinct).
    std::vector<double> ds(static_cast<std::size_t>(B * NC * NC), 0.0);
    const std::vector<double> dw = host_doubles(be_, dwts_);
    const std::int64_t nt = (Te_ + R - 1) / R;
    std::int64_t g = 0;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 2; t < nt; ++t, ++g) {
        const std::int64_t c = t - 1;
        double dot = 0;
        for (std::int64_t i = 0; i < K; ++i)
          if (sel_[static_cast<std::size_t>((b * NC + c) * K + i)] >= 0)
            dot += selw_[static_cast<std::size_t>((b * NC + c) * K + i)] * dw[static_cast<std::size_t>(g * K + i)];
        for (std::int64_t i = 0; i < K; ++i) {
          const auto at = static_cast<std::size_t>((b * NC + c) * K + i);
          if (sel_[at] < 0) continue;
          const std::int64_t j = (b * NC + c) * NC + sel_[at];
          ds[static_cast<std::size_t>(j)] += selw_[at] * (dw[static_cast<std::size_t>(g * K + i)] - dot);  // softmax backward
        }
      }
    TensorView dscores = ar.allocate(Shape{B, NC, NC}, dt_);
    upload_doubles(be_, ds, dscores);
    TensorView dhqn = zeros(be_, ar, Shape{B * NC, C}, dt_), dek = zeros(be_, ar, Shape{B * NC, C}, dt_);
    be_.matmul_bwd(MatmulGradArgs{dscores, hqn_.reshaped(Shape{B, NC, C}), ekeys_.reshaped(Shape{B, NC, C}),
                                  dhqn.reshaped(Shape{B, NC, C}), dek.reshaped(Shape{B, NC, C}), {}, false, true,
                                  1.0 / std::sqrt(static_cast<double>(C))});
    TensorView dhq = zeros(be_, ar, Shape{B * NC, C}, dt_);
    be_.layernorm_bwd(LayerNormGradArgs{dhqn, hq_, lmk_w_, hq_m_, hq_r_, dhq, dlmk_w_, dlmk_b_});
    be_.scatter_add_rows(ScatterAddRowsArgs{dhq, lmk_idx_, dx});
    TensorView dmK = zeros(be_, ar, Shape{NE, C}, dt_), dmV = zeros(be_, ar, Shape{NE, C}, dt_);
    if (G_ > 0) {
      be_.scatter_add_rows(ScatterAddRowsArgs{dkrep_, kidx_rep_, dmK});
      be_.scatter_add_rows(ScatterAddRowsArgs{dvrep_, kidx_rep_, dmV});
    }
    for (std::int64_t i = 0; i < B * NC; ++i) {  // the landmark slot is a constant zero
      be_.fill(dmK.rows(i * R + S, 1), 0.0);
      be_.fill(dmV.rows(i * R + S, 1), 0.0);
    }
    TensorView dE = ar.allocate(Shape{NE, C}, dt_);
    be_.linear_bwd(LinearGradArgs{dmK, E_, memk_, dE, dmemk_, {}, false});
    be_.linear_bwd(LinearGradArgs{dmV, E_, memv_, dE, dmemv_, {}, true});
    be_.scatter_add_rows(ScatterAddRowsArgs{dek, eidx_, dE});
    TensorView de = zeros(be_, ar, Shape{NE, C}, dt_);
    be_.layernorm_bwd(LayerNormGradArgs{dE, enc_last_, enc_out_w_, Em_, Er_, de, denc_out_w_, denc_out_b_});
    for (std::size_t l = enc_.size(); l-- > 0;)
      block_bwd(ar, enc_[l], denc_[l], eacts_[l], de, Kind::chunk, false, NE, cfg_.enc_d_ff);
    TensorView dex = zeros(be_, ar, Shape{NE, C}, dt_);
    be_.layernorm_bwd(LayerNormGradArgs{de, enc_x_, enc_in_w_, enc_m_, enc_r_, dex, denc_in_w_, denc_in_b_});
    be_.scatter_add_rows(ScatterAddRowsArgs{dex, enc_idx_, dx});
  }
  for (std::size_t l = lower_.size(); l-- > 0;)
    block_bwd(ar, lower_[l], dlower_[l], lacts_[l], dx, Kind::window, false, N, mc.d_ff);
  be_.embedding_bwd(EmbeddingGradArgs{ids_, dx, dwte_});
}

std::string GcaModel::config_str() const {
  return detail::cat(cfg_.base.str(), " gca_chunk=", cfg_.chunk, " gca_topk=", cfg_.topk, " gca_window=", cfg_.window,
                     " gca_lower=", cfg_.n_lower, " gca_upper=", cfg_.n_upper, " gca_encoder_layers=", cfg_.n_enc,
                     " gca_encoder_d_ff=", cfg_.enc_d_ff);
}

double GcaModel::train_flops(std::int64_t B, std::int64_t T) const {
  const auto& mc = cfg_.base;
  const std::int64_t C = mc.d_model, F = mc.d_ff, S = cfg_.chunk, R = S + 1, K = cfg_.topk, P = cfg_.window + 1;
  const std::int64_t NC = T / S, Te = T + NC, Tp = (Te + P - 1) / P * P, N = B * Tp, NE = B * NC * R;
  const std::int64_t nt = (Te + R - 1) / R, G = nt > 2 ? B * (nt - 2) : 0;
  double fl = 0;
  for (bool bwd : {false, true}) {
    const double win = 2 * attention_cost(B * Tp / P, P, P, mc.n_heads, mc.head_size(), true, bwd).flops;
    const double blk = 4 * linear_cost(N, C, C, bwd).flops + linear_cost(N, C, F, bwd).flops + linear_cost(N, F, C, bwd).flops + win;
    const double gca = 2 * linear_cost(N, C, C, bwd).flops +
                       attention_cost(G * K, R, R, mc.n_heads, mc.head_size(), false, bwd).flops +
                       linear_cost(G * R, K, C, bwd).flops;
    const double enc = 4 * linear_cost(NE, C, C, bwd).flops + linear_cost(NE, C, cfg_.enc_d_ff, bwd).flops +
                       linear_cost(NE, cfg_.enc_d_ff, C, bwd).flops +
                       attention_cost(B * NC, R, R, mc.n_heads, mc.head_size(), false, bwd).flops;
    fl += static_cast<double>(cfg_.n_lower) * blk + static_cast<double>(cfg_.n_upper) * (blk + gca) +
          static_cast<double>(cfg_.n_enc) * enc + 2 * linear_cost(NE, C, C, bwd).flops +
          linear_cost(B * NC, C, NC, bwd).flops + linear_cost(B * T, C, mc.vocab, bwd).flops;
  }
  return fl;
}


// ---- decoding --------------------------------------------------------------
GcaDecoder::GcaDecoder(GcaModel& model, std::int64_t max_tokens, Prefill prefill)
    : m_(model), prefill_mode_(prefill), cap_chunks_(std::max<std::int64_t>(1, max_tokens / model.config().chunk)),
      state_("gca decode state", 1 << 20, model.backend().allocator()),
      scratch_("gca decode scratch", 1 << 20, model.backend().allocator()) {
  DSRSQ_INPUT_CHECK(max_tokens >= 1, "gca decoding: max_tokens must be >= 1, got ", max_tokens);
  reset();
}

void GcaDecoder::reset() {
  const GcaConfig& c = m_.config();
  const std::int64_t C = c.base.d_model, NH = c.base.n_heads, HS = c.base.head_size(), P = c.window + 1;
  const DType dt = m_.dtype();
  state_.reset();
  state_.reset_peak();
  rk_.clear();
  rv_.clear();
  ring_pos_.assign(static_cast<std::size_t>(P), kEmpty);
  Backend& be = m_.backend();
  for (std::int64_t l = 0; l < c.n_lower + c.n_upper; ++l) {
    rk_.push_back(zeros(be, state_, Shape{1, P, NH, HS}, dt));
    rv_.push_back(zeros(be, state_, Shape{1, P, NH, HS}, dt));
  }
  chunk_buf_ = zeros(be, state_, Shape{c.chunk + 1, C}, dt);
  lmk_h_ = zeros(be, state_, Shape{1, C}, dt);
  // Chunk memory: S rows per chunk, then one shared zero row (the landmark slot).
  memk_ = zeros(be, state_, Shape{cap_chunks_ * c.chunk + 1, C}, dt);
  memv_ = zeros(be, state_, Shape{cap_chunks_ * c.chunk + 1, C}, dt);
  lmk_ = zeros(be, state_, Shape{cap_chunks_, C}, dt);
  cur_sel_ = zeros(be, state_, Shape{c.topk}, DType::i32);
  cur_w_ = zeros(be, state_, Shape{1, c.topk}, dt);
  cur_count_ = seen_ = nchunks_ = 0;
}

std::vector<std::int32_t> GcaDecoder::current_chunks() const {
  return to_host<std::int32_t>(m_.backend(), cur_sel_.rows(0, cur_count_));
}
std::vector<double> GcaDecoder::current_weights() const {
  std::vector<double> w;
  if (cur_count_ > 0) w = host_doubles(m_.backend(), cur_w_.reshaped(Shape{cur_w_.numel()}).rows(0, cur_count_));
  return w;
}

std::size_t GcaDecoder::fixed_bytes(const GcaConfig& c) {
  const auto C = static_cast<std::size_t>(c.base.d_model);
  return sizeof(float) * (static_cast<std::size_t>(c.n_lower + c.n_upper) * static_cast<std::size_t>(c.window + 1) * 2 * C +
                          static_cast<std::size_t>(c.chunk + 1) * C);
}
std::size_t GcaDecoder::resident_bytes_for(const GcaConfig& c, std::int64_t n) {
  const auto C = static_cast<std::size_t>(c.base.d_model);
  const auto chunks = static_cast<std::size_t>(n / c.chunk);
  return fixed_bytes(c) + sizeof(float) * chunks * (static_cast<std::size_t>(c.chunk) * 2 * C + C);
}
std::size_t GcaDecoder::resident_bytes() const {
  const std::size_t es = dtype_size(m_.dtype()) / sizeof(float);
  return es * resident_bytes_for(m_.config(), nchunks_ * m_.config().chunk);
}
std::size_t GcaDecoder::read_bytes_per_step() const {
  const GcaConfig& c = m_.config();
  const auto C = static_cast<std::size_t>(c.base.d_model);
  return dtype_size(m_.dtype()) * (static_cast<std::size_t>(c.n_lower + c.n_upper) * static_cast<std::size_t>(c.window + 1) * 2 * C +
                                   static_cast<std::size_t>(cur_count_ * c.chunk) * 2 * C);
}
double GcaDecoder::attended_keys() const {
  const GcaConfig& c = m_.config();
  const double ring = static_cast<double>(std::min<std::int64_t>(c.window + 1, seen_ + nchunks_));
  const double L = static_cast<double>(c.n_lower + c.n_upper);
  return (L * ring + static_cast<double>(c.n_upper * cur_count_ * c.chunk)) / L;
}

// Stream entries e0 .. e0+m-1 (one chunk's next tokens, its landmark last
// when `landmark`; m <= W + 1) through the lower and upper stacks; returns
// their final hidden states (m, C) in scratch. Self-attention: each entry sees
// itself and the W entries before it, exactly the training window, in two
// parts merged by their log-normalisers: the block's own entries (causal) and
// the ring of the W + 1 entries before the block, whose keys are masked by
// made-up positions (as the training forward's previous block): ring entry
// e_s gets e0 - e_s, block entry j gets W - j, so e_s is visible to j iff
// e_s >= e0 + j - W. Then the ring takes the block's keys and values. The
// upper layers' cross attention reads the chunks the current chunk retrieved.
TensorView GcaDecoder::run_block(std::span<const std::int32_t> ids, std::int64_t e0, bool landmark) {
  const GcaConfig& c = m_.config();
  Backend& be = m_.backend();
  const DType dt = m_.dtype();
  const std::int64_t C = c.base.d_model, NH = c.base.n_heads, HS = c.base.head_size(), P = c.window + 1;
  const std::int64_t S = c.chunk, R = S + 1, K = cur_count_, m = static_cast<std::int64_t>(ids.size());
  DSRSQ_REQUIRE(m >= 1 && m <= P && e0 % R + m <= R, "gca block of ", m, " entries from stream entry ", e0,
                " (at most W + 1 = ", P, ", inside one chunk)");
  const double eps = c.base.ln_eps;
  Arena& ar = scratch_;
  std::vector<std::int32_t> ep(static_cast<std::size_t>(m)), qb(ep.size());
  for (std::int64_t j = 0; j < m; ++j) {
    ep[static_cast<std::size_t>(j)] = static_cast<std::int32_t>(e0 + j);
    qb[static_cast<std::size_t>(j)] = static_cast<std::int32_t>(P - 1 - j);
  }
  const TensorView epos = ints(be, ar, ep).reshaped(Shape{1, m}), qpos = ints(be, ar, qb).reshaped(Shape{1, m});
  TensorView x = ar.allocate(Shape{m, C}, dt);
  be.embedding_fwd(EmbeddingArgs{ints(be, ar, std::vector<std::int32_t>(ids.begin(), ids.end())), m_.wte_, x});
  // The retrieved chunks' memory, gathered once for every upper layer; each query row repeated per chunk.
  TensorView krep, vrep, zk, zq, qsel;
  if (K > 0) {
    std::vector<std::int32_t> ki, qi;
    const std::vector<std::int32_t> sel = to_host<std::int32_t>(be, cur_sel_);
    for (std::int64_t i = 0; i < K; ++i) {
      for (std::int64_t r = 0; r < R; ++r)
        ki.push_back(static_cast<std::int32_t>(r < S ? sel[static_cast<std::size_t>(i)] * S + r : cap_chunks_ * S));
      for (std::int64_t j = 0; j < m; ++j) qi.push_back(static_cast<std::int32_t>(j));
    }
    TensorView kidx = ints(be, ar, ki);
    krep = ar.allocate(Shape{K * R, C}, dt);
    vrep = ar.allocate(Shape{K * R, C}, dt);
    be.gather_rows(GatherRowsArgs{memk_, kidx, krep});
    be.gather_rows(GatherRowsArgs{memv_, kidx, vrep});
    zk = zeros(be, ar, Shape{K, R}, DType::i32);
    zq = zeros(be, ar, Shape{K, m}, DType::i32);
    qsel = ints(be, ar, qi);
  }
  // The ring's made-up key positions (the same for every layer: the rings move together).
  std::vector<std::int32_t> kb(static_cast<std::size_t>(P), kEmpty);
  const std::vector<std::int32_t>& rp = ring_pos_;
  for (std::int64_t sl = 0; sl < P; ++sl)
    if (rp[static_cast<std::size_t>(sl)] != kEmpty)
      kb[static_cast<std::size_t>(sl)] = static_cast<std::int32_t>(e0 - rp[static_cast<std::size_t>(sl)]);
  const TensorView kpos = ints(be, ar, kb).reshaped(Shape{1, P});
  const std::int64_t L = c.n_lower + c.n_upper;
  for (std::int64_t l = 0; l < L; ++l) {
    const bool upper = l >= c.n_lower;
    const GcaModel::Block& p = upper ? m_.upper_[static_cast<std::size_t>(l - c.n_lower)] : m_.lower_[static_cast<std::size_t>(l)];
    TensorView ln1 = ar.allocate(Shape{m, C}, dt), mu = ar.allocate(Shape{m}, dt), rs = ar.allocate(Shape{m}, dt);
    be.layernorm_fwd(LayerNormArgs{x, p.ln1_w, p.ln1_b, ln1, mu, rs, eps});
    TensorView q = ar.allocate(Shape{m, C}, dt), k = ar.allocate(Shape{m, C}, dt), v = ar.allocate(Shape{m, C}, dt);
    be.linear_fwd(LinearArgs{ln1, p.wq, p.bq, q});
    be.linear_fwd(LinearArgs{ln1, p.wk, p.bk, k});
    be.linear_fwd(LinearArgs{ln1, p.wv, p.bv, v});
    const TensorView pf = epos.reshaped(Shape{m});
    be.rope_fwd(RopeArgs{q.reshaped(Shape{m, NH, HS}), pf, c.base.rope_theta, c.base.attn_log_base});
    be.rope_fwd(RopeArgs{k.reshaped(Shape{m, NH, HS}), pf, c.base.rope_theta});
    const Shape bs{1, m, NH, HS};
    const auto li = static_cast<std::size_t>(l);
    TensorView att = ar.allocate(Shape{m, C}, dt), lse = ar.allocate(Shape{1, NH, m}, dt);
    be.attention_fwd(AttentionArgs{q.reshaped(bs), k.reshaped(bs), v.reshaped(bs), att.reshaped(bs), lse, epos, epos, true, 0.0});
    TensorView ob = ar.allocate(Shape{m, C}, dt), lseb = ar.allocate(Shape{1, NH, m}, dt);
    be.attention_fwd(AttentionArgs{q.reshaped(bs), rk_[li], rv_[li], ob.reshaped(bs), lseb, qpos, kpos, true, 0.0});
    be.attention_merge(AttentionMergeArgs{att.reshaped(bs), lse, ob.reshaped(bs), lseb});
    for (std::int64_t j = 0; j < m;) {  // the ring takes the block (m <= W + 1: distinct slots, at most 2 runs)
      const std::int64_t slot = (e0 + j) % P, len = std::min(m - j, P - slot);
      be.copy(k.rows(j, len), rk_[li].reshaped(Shape{P, C}).rows(slot, len));
      be.copy(v.rows(j, len), rv_[li].reshaped(Shape{P, C}).rows(slot, len));
      j += len;
    }
    TensorView x1 = ar.allocate(Shape{m, C}, dt);
    be.linear_fwd(LinearArgs{att, p.wo, p.bo, x1});
    be.axpy(AxpyArgs{x, x1, 1.0});
    TensorView pre = x1;
    if (upper) {
      TensorView y = zeros(be, ar, Shape{m, C}, dt);
      if (K > 0) {
        TensorView lng = ar.allocate(Shape{m, C}, dt), mg = ar.allocate(Shape{m}, dt), rg = ar.allocate(Shape{m}, dt);
        be.layernorm_fwd(LayerNormArgs{x1, p.lng_w, p.lng_b, lng, mg, rg, eps});
        TensorView qg = ar.allocate(Shape{m, C}, dt);
        be.linear_fwd(LinearArgs{lng, p.gwq, {}, qg});
        TensorView qrep = ar.allocate(Shape{K * m, C}, dt);
        be.gather_rows(GatherRowsArgs{qg, qsel, qrep});
        TensorView o = ar.allocate(Shape{K * m, C}, dt), ol = ar.allocate(Shape{K, NH, m}, dt);
        be.attention_fwd(AttentionArgs{qrep.reshaped(Shape{K, m, NH, HS}), krep.reshaped(Shape{K, R, NH, HS}),
                                       vrep.reshaped(Shape{K, R, NH, HS}), o.reshaped(Shape{K, m, NH, HS}), ol, zq, zk,
                                       false, 0.0});
        TensorView comb = ar.allocate(Shape{m, C}, dt);
        be.matmul_fwd(MatmulArgs{cur_w_.reshaped(Shape{cur_w_.numel()}).rows(0, K).reshaped(Shape{1, K}),
                                 o.reshaped(Shape{K, m * C}), comb.reshaped(Shape{1, m * C}), {}});
        be.linear_fwd(LinearArgs{comb, p.gwo, {}, y});
      }
      be.axpy(AxpyArgs{x1, y, 1.0});
      pre = y;
    }
    TensorView ln2 = ar.allocate(Shape{m, C}, dt), m2 = ar.allocate(Shape{m}, dt), r2 = ar.allocate(Shape{m}, dt);
    be.layernorm_fwd(LayerNormArgs{pre, p.ln2_w, p.ln2_b, ln2, m2, r2, eps});
    const std::int64_t F = c.base.d_ff;
    TensorView fc = ar.allocate(Shape{m, F}, dt), fca = ar.allocate(Shape{m, F}, dt);
    be.linear_fwd(LinearArgs{ln2, p.wfc, p.bfc, fc});
    be.gelu_fwd(GeluArgs{fc, fca});
    TensorView out = ar.allocate(Shape{m, C}, dt);
    be.linear_fwd(LinearArgs{fca, p.wproj, p.bproj, out});
    be.axpy(AxpyArgs{x1, out, 1.0});
    x = out;
    if (l + 1 == c.n_lower) {  // the lower stack's output: the encoder's input, the landmark's query
      be.copy(x, chunk_buf_.rows(e0 % R, m));
      if (landmark) be.copy(x.rows(m - 1, 1), lmk_h_);
    }
  }
  for (std::int64_t j = 0; j < m; ++j) ring_pos_[static_cast<std::size_t>((e0 + j) % P)] = static_cast<std::int32_t>(e0 + j);
  return x;
}

// The chunk is complete (its landmark ran): encode it, append its memory and
// landmark key, then choose the chunks the next chunk's tokens read: the new
// landmark's lower state through the landmark norm against the keys of the
// strictly earlier chunks (as in training, without noise).
void GcaDecoder::close_chunk() {
  const GcaConfig& c = m_.config();
  Backend& be = m_.backend();
  const DType dt = m_.dtype();
  const std::int64_t C = c.base.d_model, NH = c.base.n_heads, HS = c.base.head_size(), S = c.chunk, R = S + 1;
  const double eps = c.base.ln_eps;
  DSRSQ_INPUT_CHECK(nchunks_ < cap_chunks_, "gca decoding: more than the ", cap_chunks_ * S,
                    " tokens this decoder was sized for");
  Arena& ar = scratch_;
  ArenaScope scope(ar);
  std::vector<std::int32_t> ep(static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) ep[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(r);
  TensorView epos = ints(be, ar, ep);
  TensorView x = ar.allocate(Shape{R, C}, dt), mu = ar.allocate(Shape{R}, dt), rs = ar.allocate(Shape{R}, dt);
  be.layernorm_fwd(LayerNormArgs{chunk_buf_, m_.enc_in_w_, m_.enc_in_b_, x, mu, rs, eps});
  const std::int64_t F = c.enc_d_ff;
  for (const auto& p : m_.enc_) {
    TensorView ln1 = ar.allocate(Shape{R, C}, dt);
    be.layernorm_fwd(LayerNormArgs{x, p.ln1_w, p.ln1_b, ln1, mu, rs, eps});
    TensorView q = ar.allocate(Shape{R, C}, dt), k = ar.allocate(Shape{R, C}, dt), v = ar.allocate(Shape{R, C}, dt);
    be.linear_fwd(LinearArgs{ln1, p.wq, p.bq, q});
    be.linear_fwd(LinearArgs{ln1, p.wk, p.bk, k});
    be.linear_fwd(LinearArgs{ln1, p.wv, p.bv, v});
    be.rope_fwd(RopeArgs{q.reshaped(Shape{R, NH, HS}), epos, c.base.rope_theta, c.base.attn_log_base});
    be.rope_fwd(RopeArgs{k.reshaped(Shape{R, NH, HS}), epos, c.base.rope_theta});
    TensorView att = ar.allocate(Shape{R, C}, dt), lse = ar.allocate(Shape{1, NH, R}, dt);
    const Shape s{1, R, NH, HS};
    TensorView ep2 = epos.reshaped(Shape{1, R});
    be.attention_fwd(AttentionArgs{q.reshaped(s), k.reshaped(s), v.reshaped(s), att.reshaped(s), lse, ep2, ep2, false, 0.0});
    TensorView x1 = ar.allocate(Shape{R, C}, dt);
    be.linear_fwd(LinearArgs{att, p.wo, p.bo, x1});
    be.axpy(AxpyArgs{x, x1, 1.0});
    TensorView ln2 = ar.allocate(Shape{R, C}, dt);
    be.layernorm_fwd(LayerNormArgs{x1, p.ln2_w, p.ln2_b, ln2, mu, rs, eps});
    TensorView fc = ar.allocate(Shape{R, F}, dt), fca = ar.allocate(Shape{R, F}, dt);
    be.linear_fwd(LinearArgs{ln2, p.wfc, p.bfc, fc});
    be.gelu_fwd(GeluArgs{fc, fca});
    TensorView out = ar.allocate(Shape{R, C}, dt);
    be.linear_fwd(LinearArgs{fca, p.wproj, p.bproj, out});
    be.axpy(AxpyArgs{x1, out, 1.0});
    x = out;
  }
  TensorView E = ar.allocate(Shape{R, C}, dt);
  be.layernorm_fwd(LayerNormArgs{x, m_.enc_out_w_, m_.enc_out_b_, E, mu, rs, eps});
  const std::int64_t ch = nchunks_;
  be.linear_fwd(LinearArgs{E.rows(0, S), m_.memk_, {}, memk_.rows(ch * S, S)});
  be.linear_fwd(LinearArgs{E.rows(0, S), m_.memv_, {}, memv_.rows(ch * S, S)});
  be.copy(E.rows(S, 1), lmk_.rows(ch, 1));
  ++nchunks_;
  choose(ch);
}

// The new landmark's lower state (lmk_h_) through the landmark norm against the
// keys of the strictly earlier chunks: the top k and the softmax of their scores.
void GcaDecoder::choose(std::int64_t ch) {
  const GcaConfig& c = m_.config();
  Backend& be = m_.backend();
  const DType dt = m_.dtype();
  const std::int64_t C = c.base.d_model;
  const double eps = c.base.ln_eps;
  cur_count_ = std::min(c.topk, ch);
  if (cur_count_ == 0) return;
  Arena& ar = scratch_;
  ArenaScope scope(ar);
  TensorView qn = ar.allocate(Shape{1, C}, dt), m1 = ar.allocate(Shape{1}, dt), r1 = ar.allocate(Shape{1}, dt);
  be.layernorm_fwd(LayerNormArgs{lmk_h_, m_.lmk_w_, m_.lmk_b_, qn, m1, r1, eps});
  TensorView sc = ar.allocate(Shape{1, ch}, dt);
  be.matmul_fwd(MatmulArgs{qn, lmk_.rows(0, ch), sc, {}, false, true, 1.0 / std::sqrt(static_cast<double>(C))});
  TensorView idx = ar.allocate(Shape{1, cur_count_}, DType::i32);
  be.topk(TopKArgs{sc, idx});
  std::vector<double> sv, w;
  const std::vector<double> sch = host_doubles(be, sc);
  const std::vector<std::int32_t> ih = to_host<std::int32_t>(be, idx);
  for (std::int64_t i = 0; i < cur_count_; ++i) sv.push_back(sch[static_cast<std::size_t>(ih[static_cast<std::size_t>(i)])]);
  softmax_into(sv, w);
  from_host<std::int32_t>(be, ih, cur_sel_.rows(0, cur_count_));
  upload_doubles(be, w, cur_w_.reshaped(Shape{cur_w_.numel()}).rows(0, cur_count_));
}

std::size_t GcaDecoder::activation_peak_bytes() const { return scratch_.peak_bytes(); }
void GcaDecoder::reset_activation_peak() { scratch_.reset_peak(); }

// The tokens in blocks that stay inside one chunk (a chunk's landmark joins the
// block of its S-th token and closes the chunk after it), at most W tokens per
// block (Prefill::stepwise: one), so a block with its landmark fits the ring.
TensorView GcaDecoder::extend(std::span<const std::int32_t> tokens, std::span<const std::int32_t> pos) {
  const GcaConfig& c = m_.config();
  Backend& be = m_.backend();
  const std::int64_t n = static_cast<std::int64_t>(tokens.size()), C = c.base.d_model, V = c.base.vocab, S = c.chunk;
  DSRSQ_INPUT_CHECK(pos.size() == tokens.size(), "gca decoding: ", tokens.size(), " tokens but ", pos.size(), " positions");
  for (std::int64_t i = 0; i < n; ++i) {
    const auto id = tokens[static_cast<std::size_t>(i)];
    DSRSQ_INPUT_CHECK(id >= 0 && id < V, "gca decoding: token id ", id, " outside the vocabulary [0, ", V, ")");
    DSRSQ_INPUT_CHECK(pos[static_cast<std::size_t>(i)] == seen_ + i, "gca decoding: position ",
                      pos[static_cast<std::size_t>(i)], " given, the next is ", seen_ + i,
                      " (GCA reads its tokens in order from position 0)");
  }
  scratch_.reset();
  logits_ = scratch_.allocate(Shape{n, V}, m_.dtype());
  const std::int64_t most = prefill_mode_ == Prefill::stepwise ? 1 : c.window;
  for (std::int64_t i = 0; i < n;) {
    const std::int64_t open = seen_ % S, len = std::min({n - i, S - open, most});
    const bool closes = open + len == S;
    {
      ArenaScope scope(scratch_);
      std::vector<std::int32_t> ids(tokens.begin() + i, tokens.begin() + i + len);
      if (closes) ids.push_back(static_cast<std::int32_t>(V));  // the chunk's landmark
      const TensorView x = run_block(ids, c.stream_index(seen_), closes);
      TensorView ln = scratch_.allocate(Shape{len, C}, m_.dtype()), mu = scratch_.allocate(Shape{len}, m_.dtype()),
                 rs = scratch_.allocate(Shape{len}, m_.dtype());
      be.layernorm_fwd(LayerNormArgs{x.rows(0, len), m_.lnf_w_, m_.lnf_b_, ln, mu, rs, c.base.ln_eps});
      be.linear_fwd(LinearArgs{ln, m_.wte_.rows(0, V), {}, logits_.rows(i, len)});
    }
    seen_ += len;
    i += len;
    if (closes) close_chunk();  // its memory and landmark key, then the next chunk's retrieval
  }
  return logits_;
}

}  // namespace dsrsq
