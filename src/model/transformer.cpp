#include "model/transformer.hpp"

#include <cmath>
#include <cstring>

#include "core/rng.hpp"
#include "kv/kv_policy.hpp"

namespace dsrsq {

std::size_t KVCache::bytes() const {
  std::size_t b = pos.bytes();
  for (const auto& t : k) b += t.bytes();
  for (const auto& t : v) b += t.bytes();
  return b;
}

Transformer::Transformer(const ModelConfig& cfg, Backend& backend)
    : cfg_(cfg), be_(backend), param_arena_("parameters", 1 << 20, backend.allocator()),
      grad_arena_("gradients", 1 << 20, backend.allocator()), act_arena_("activations", 64 << 20, backend.allocator()),
      input_arena_("inputs", 1 << 16, backend.allocator()) {
  cfg_.validate();
  build_params();
  init_weights(0);
}

void Transformer::build_params() {
  const std::int64_t C = cfg_.d_model, F = cfg_.d_ff, V = cfg_.vocab;
  const std::int64_t total = cfg_.num_parameters();
  flat_params_ = param_arena_.allocate(Shape{total}, DType::f32);
  flat_grads_ = grad_arena_.allocate(Shape{total}, DType::f32);
  be_.fill(flat_params_, 0.0);
  be_.fill(flat_grads_, 0.0);
  std::int64_t off = 0;
  // Views into the flat buffers (on the backend's device: no host access).
  auto take = [&](const std::string& name, Shape s, bool decay, TensorView& value, TensorView& grad) {
    value = flat_params_.rows(off, s.numel()).reshaped(s);
    grad = flat_grads_.rows(off, s.numel()).reshaped(s);
    params_.push_back(Param{name, value, grad, decay});
    off += s.numel();
  };
  take("wte", Shape{V, C}, true, wte_, dwte_);
  layers_.resize(static_cast<std::size_t>(cfg_.n_layers));
  dlayers_.resize(static_cast<std::size_t>(cfg_.n_layers));
  for (std::int64_t l = 0; l < cfg_.n_layers; ++l) {
    Layer& p = layers_[static_cast<std::size_t>(l)];
    Layer& g = dlayers_[static_cast<std::size_t>(l)];
    const std::string pre = "h." + std::to_string(l) + ".";
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
    take(pre + "mlp.wfc", Shape{F, C}, true, p.wfc, g.wfc);
    take(pre + "mlp.bfc", Shape{F}, false, p.bfc, g.bfc);
    take(pre + "mlp.wproj", Shape{C, F}, true, p.wproj, g.wproj);
    take(pre + "mlp.bproj", Shape{C}, false, p.bproj, g.bproj);
  }
  take("lnf.weight", Shape{C}, false, lnf_w_, dlnf_w_);
  take("lnf.bias", Shape{C}, false, lnf_b_, dlnf_b_);
  if (cfg_.tied_embedding) {
    head_ = wte_;
    dhead_ = dwte_;
  } else {
    take("lm_head", Shape{V, C}, true, head_, dhead_);
  }
  DSRSQ_REQUIRE(off == total, "parameter layout covers ", off, " of ", total, " values");
}

const Param& Transformer::param(const std::string& name) const {
  for (const auto& p : params_)
    if (p.name == name) return p;
  raise_input_error("no parameter named '" + name + "'");
}

void Transformer::init_weights(std::uint64_t seed) {
  const double resid_std = 0.02 / std::sqrt(2.0 * static_cast<double>(cfg_.n_layers));
  std::uint64_t stream = 0;
  std::vector<float> host;  // drawn on the host, then copied to the backend
  for (auto& p : params_) {
    Rng rng(seed, stream++);
    const std::int64_t n = p.value.numel();
    host.resize(static_cast<std::size_t>(n));
    float* v = host.data();
    const bool is_norm_weight = p.name.find("ln") != std::string::npos && p.name.find("weight") != std::string::npos;
    if (is_norm_weight) {
      std::fill(v, v + n, 1.0f);
    } else if (!p.decay) {
      std::fill(v, v + n, 0.0f);
    } else {
      const bool resid = p.name.find("attn.wo") != std::string::npos || p.name.find("mlp.wproj") != std::string::npos;
      const double sd = resid ? resid_std : 0.02;
      for (std::int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(rng.normal() * sd);
    }
    from_host<float>(be_, host, p.value);
  }
}

void Transformer::zero_grad() { be_.fill(flat_grads_, 0.0); }

void Transformer::check_batch(const TensorView& tokens, const TensorView& pos) const {
  DSRSQ_INPUT_CHECK(tokens.shape.rank == 2 && tokens.dtype == DType::i32,
                    "model input: tokens must be i32 (B, T), got ", tokens.str());
  DSRSQ_INPUT_CHECK(pos.shape == tokens.shape && pos.dtype == DType::i32, "model input: positions ", pos.str(),
                    " must be i32 with the tokens' shape ", tokens.shape.str());
  const auto* t = tokens.ptr<std::int32_t>();
  const auto* p = pos.ptr<std::int32_t>();
  for (std::int64_t i = 0; i < tokens.numel(); ++i) {
    DSRSQ_INPUT_CHECK(t[i] >= 0 && t[i] < cfg_.vocab, "model input: token id ", t[i], " at index ", i,
                      " outside the vocabulary [0, ", cfg_.vocab, ")");
    DSRSQ_INPUT_CHECK(p[i] >= 0 && p[i] < cfg_.max_pos, "model input: position ", p[i], " at index ", i,
                      " is outside [0, max_pos=", cfg_.max_pos, "): raise max_pos or shorten the input");
  }
}

// A copy of src in `arena` (on the backend's device): from the host when src
// is a host tensor (the model's inputs), else a device copy.
TensorView Transformer::copy_into(Arena& arena, const TensorView& src) {
  TensorView t = arena.allocate(src.shape, src.dtype);
  if (src.device == t.device && t.device == Device::cpu) std::memcpy(t.data, src.data, src.bytes());
  else if (src.device == Device::cpu) be_.copy_from_host(std::span<const std::byte>(static_cast<const std::byte*>(src.data), src.bytes()), t);
  else be_.copy(src, t);
  return t;
}

TensorView Transformer::saved_keys(std::int64_t layer) const {
  DSRSQ_REQUIRE(have_targets_ && layer >= 0 && layer < cfg_.n_layers, "saved_keys: no training forward or bad layer");
  const TensorView& k = acts_[static_cast<std::size_t>(layer)].k_pre;
  DSRSQ_REQUIRE(!k.empty(), "saved_keys: set save_pre_rope_keys before the forward");
  return k;
}

TensorView Transformer::saved_values(std::int64_t layer) const {
  DSRSQ_REQUIRE(have_targets_ && layer >= 0 && layer < cfg_.n_layers, "saved_values: no training forward or bad layer");
  const LayerActs& A = acts_[static_cast<std::size_t>(layer)];
  return A.v_pre.empty() ? A.v : A.v_pre;
}

void Transformer::run_forward(Arena& arena, std::int64_t B, std::int64_t T, TensorView tokens, TensorView pos,
                              KVCache* cache, KVPolicy* policy) {
  const std::int64_t C = cfg_.d_model, F = cfg_.d_ff, V = cfg_.vocab, NH = cfg_.n_heads, HS = cfg_.head_size();
  const std::int64_t N = B * T;
  const DType f = DType::f32;
  TensorView pos_flat = pos.reshaped(Shape{N});
  acts_.resize(static_cast<std::size_t>(cfg_.n_layers));

  if (cache) {
    DSRSQ_INPUT_CHECK(cache->batch == B, "decode: cache holds batch ", cache->batch, ", input has batch ", B);
    DSRSQ_INPUT_CHECK(cache->len + T <= cache->capacity, "decode: cache capacity ", cache->capacity, " exceeded (",
                      cache->len, " cached + ", T, " new tokens)");
    const TensorView cp = cache->pos.reshaped(Shape{B * cache->capacity});
    for (std::int64_t b = 0; b < B; ++b) be_.copy(pos_flat.rows(b * T, T), cp.rows(b * cache->capacity + cache->len, T));
  }

  TensorView x = arena.allocate(Shape{N, C}, f);
  be_.embedding_fwd(EmbeddingArgs{tokens.reshaped(Shape{N}), wte_, x});
  for (std::int64_t l = 0; l < cfg_.n_layers; ++l) {
    const Layer& p = layers_[static_cast<std::size_t>(l)];
    LayerActs& A = acts_[static_cast<std::size_t>(l)];
    A.x_in = x;
    A.ln1 = arena.allocate(Shape{N, C}, f);
    A.ln1_mean = arena.allocate(Shape{N}, f);
    A.ln1_rstd = arena.allocate(Shape{N}, f);
    be_.layernorm_fwd(LayerNormArgs{x, p.ln1_w, p.ln1_b, A.ln1, A.ln1_mean, A.ln1_rstd, cfg_.ln_eps});
    A.q = arena.allocate(Shape{N, C}, f);
    A.k = arena.allocate(Shape{N, C}, f);
    A.v = arena.allocate(Shape{N, C}, f);
    be_.linear_fwd(LinearArgs{A.ln1, p.wq, p.bq, A.q});
    be_.linear_fwd(LinearArgs{A.ln1, p.wk, p.bk, A.k});
    be_.linear_fwd(LinearArgs{A.ln1, p.wv, p.bv, A.v});
    A.att = arena.allocate(Shape{N, C}, f);
    const Shape qs{B, T, NH, HS};
    if (policy) {
      policy->attend(l, A.q.reshaped(qs), A.k.reshaped(qs), A.v.reshaped(qs), pos, A.att.reshaped(qs));
    } else {
    A.k_pre = TensorView{};
    A.v_pre = TensorView{};
    if (save_pre_rope_keys && !cache) A.k_pre = copy_into(arena, A.k);
    if (kv_transform && !cache) {
      if (save_pre_rope_keys) A.v_pre = copy_into(arena, A.v);
      kv_transform->forward(l, A.k, A.v);
    }
    be_.rope_fwd(RopeArgs{A.q.reshaped(Shape{N, NH, HS}), pos_flat, cfg_.rope_theta, cfg_.attn_log_base});
    be_.rope_fwd(RopeArgs{A.k.reshaped(Shape{N, NH, HS}), pos_flat, cfg_.rope_theta});
    A.lse = arena.allocate(Shape{B, NH, T}, f);
    if (cache) {
      const std::int64_t cap = cache->capacity;
      const TensorView kc = cache->k[static_cast<std::size_t>(l)].reshaped(Shape{B * cap, C});
      const TensorView vc = cache->v[static_cast<std::size_t>(l)].reshaped(Shape{B * cap, C});
      for (std::int64_t b = 0; b < B; ++b) {
        be_.copy(A.k.rows(b * T, T), kc.rows(b * cap + cache->len, T));
        be_.copy(A.v.rows(b * T, T), vc.rows(b * cap + cache->len, T));
      }
      be_.attention_fwd(AttentionArgs{A.q.reshaped(qs), cache->k[static_cast<std::size_t>(l)],
                                      cache->v[static_cast<std::size_t>(l)], A.att.reshaped(qs), A.lse, pos, cache->pos,
                                      true, 0.0});
    } else {
      const AttentionArgs aa{A.q.reshaped(qs), A.k.reshaped(qs), A.v.reshaped(qs), A.att.reshaped(qs), A.lse,
                             pos, pos, true, 0.0};
      if (attention_override) attention_override->forward(l, aa);
      else be_.attention_fwd(aa);
    }
    }
    A.x_mid = arena.allocate(Shape{N, C}, f);
    be_.linear_fwd(LinearArgs{A.att, p.wo, p.bo, A.x_mid});
    be_.axpy(AxpyArgs{x, A.x_mid, 1.0});
    A.ln2 = arena.allocate(Shape{N, C}, f);
    A.ln2_mean = arena.allocate(Shape{N}, f);
    A.ln2_rstd = arena.allocate(Shape{N}, f);
    be_.layernorm_fwd(LayerNormArgs{A.x_mid, p.ln2_w, p.ln2_b, A.ln2, A.ln2_mean, A.ln2_rstd, cfg_.ln_eps});
    A.fc = arena.allocate(Shape{N, F}, f);
    be_.linear_fwd(LinearArgs{A.ln2, p.wfc, p.bfc, A.fc});
    A.fc_act = arena.allocate(Shape{N, F}, f);
    be_.gelu_fwd(GeluArgs{A.fc, A.fc_act});
    TensorView x_out = arena.allocate(Shape{N, C}, f);
    be_.linear_fwd(LinearArgs{A.fc_act, p.wproj, p.bproj, x_out});
    be_.axpy(AxpyArgs{A.x_mid, x_out, 1.0});
    x = x_out;
  }
  if (cache) cache->len += T;
  x_final_ = x;
  lnf_ = arena.allocate(Shape{N, C}, f);
  lnf_mean_ = arena.allocate(Shape{N}, f);
  lnf_rstd_ = arena.allocate(Shape{N}, f);
  be_.layernorm_fwd(LayerNormArgs{x, lnf_w_, lnf_b_, lnf_, lnf_mean_, lnf_rstd_, cfg_.ln_eps});
  logits_ = arena.allocate(Shape{N, V}, f);
  be_.linear_fwd(LinearArgs{lnf_, head_, {}, logits_});
}

double Transformer::forward(const Batch& batch, double inv_norm) {
  check_batch(batch.tokens, batch.pos);
  act_arena_.reset();
  B_ = batch.tokens.shape[0];
  T_ = batch.tokens.shape[1];
  const std::int64_t N = B_ * T_;
  tokens_ = copy_into(act_arena_, batch.tokens);
  pos_ = copy_into(act_arena_, batch.pos);
  have_targets_ = !batch.targets.empty();
  if (have_targets_) {
    DSRSQ_INPUT_CHECK(batch.targets.shape == batch.tokens.shape && batch.targets.dtype == DType::i32,
                      "model input: targets ", batch.targets.str(), " must be i32 with shape ", batch.tokens.shape.str());
    DSRSQ_INPUT_CHECK(batch.mask.shape == batch.tokens.shape && batch.mask.dtype == DType::f32,
                      "model input: loss mask ", batch.mask.str(), " must be f32 with shape ", batch.tokens.shape.str());
    targets_ = copy_into(act_arena_, batch.targets).reshaped(Shape{N});
    mask_ = copy_into(act_arena_, batch.mask).reshaped(Shape{N});
  }
  run_forward(act_arena_, B_, T_, tokens_, pos_, nullptr);
  if (!have_targets_) return 0.0;
  if (inv_norm <= 0) {
    double msum = 0;
    const float* m = batch.mask.ptr<float>();  // the host input (the model's copy may be on a device)
    for (std::int64_t i = 0; i < N; ++i) msum += m[i];
    inv_norm = msum > 0 ? 1.0 / msum : 0.0;
  }
  inv_norm_ = inv_norm;
  losses_ = act_arena_.allocate(Shape{N}, DType::f32);
  return be_.cross_entropy_fwd(CrossEntropyArgs{logits_, targets_, mask_, losses_, inv_norm_});
}

// Zeroed f32 scratch on the backend (Arena::zeros is for host arenas).
TensorView Transformer::zeros(Arena& ar, Shape s) {
  TensorView t = ar.allocate(s, DType::f32);
  be_.fill(t, 0.0);
  return t;
}

void Transformer::backward(double dloss) {
  DSRSQ_REQUIRE(have_targets_ && B_ > 0, "backward() needs a training forward with targets first");
  const std::int64_t C = cfg_.d_model, F = cfg_.d_ff, V = cfg_.vocab, NH = cfg_.n_heads, HS = cfg_.head_size();
  const std::int64_t B = B_, T = T_, N = B * T;
  const DType f = DType::f32;
  ArenaScope scratch(act_arena_);
  Arena& ar = act_arena_;

  TensorView dlogits = ar.allocate(Shape{N, V}, f);
  be_.cross_entropy_bwd(CrossEntropyGradArgs{logits_, targets_, mask_, dlogits, inv_norm_, dloss});
  TensorView dlnf = ar.allocate(Shape{N, C}, f);
  be_.linear_bwd(LinearGradArgs{dlogits, lnf_, head_, dlnf, dhead_, {}, false});
  TensorView dx = zeros(ar, Shape{N, C});  // gradient of the residual stream
  be_.layernorm_bwd(LayerNormGradArgs{dlnf, x_final_, lnf_w_, lnf_mean_, lnf_rstd_, dx, dlnf_w_, dlnf_b_});

  const Shape qs{B, T, NH, HS};
  TensorView pos_flat = pos_.reshaped(Shape{N});
  for (std::int64_t l = cfg_.n_layers - 1; l >= 0; --l) {
    ArenaScope layer_scratch(ar);
    const Layer& p = layers_[static_cast<std::size_t>(l)];
    const Layer& g = dlayers_[static_cast<std::size_t>(l)];
    const LayerActs& A = acts_[static_cast<std::size_t>(l)];
    // MLP: x_out = x_mid + wproj gelu(wfc ln2(x_mid))
    TensorView dfc_act = ar.allocate(Shape{N, F}, f);
    be_.linear_bwd(LinearGradArgs{dx, A.fc_act, p.wproj, dfc_act, g.wproj, g.bproj, false});
    TensorView dfc = ar.allocate(Shape{N, F}, f);
    be_.gelu_bwd(GeluGradArgs{dfc_act, A.fc, dfc});
    TensorView dln2 = ar.allocate(Shape{N, C}, f);
    be_.linear_bwd(LinearGradArgs{dfc, A.ln2, p.wfc, dln2, g.wfc, g.bfc, false});
    be_.layernorm_bwd(LayerNormGradArgs{dln2, A.x_mid, p.ln2_w, A.ln2_mean, A.ln2_rstd, dx, g.ln2_w, g.ln2_b});
    // Attention: x_mid = x_in + wo attn(...)
    TensorView datt = ar.allocate(Shape{N, C}, f);
    be_.linear_bwd(LinearGradArgs{dx, A.att, p.wo, datt, g.wo, g.bo, false});
    TensorView dq = zeros(ar, Shape{N, C});
    TensorView dk = zeros(ar, Shape{N, C});
    TensorView dv = zeros(ar, Shape{N, C});
    const AttentionGradArgs ga{datt.reshaped(qs), A.q.reshaped(qs), A.k.reshaped(qs), A.v.reshaped(qs),
                               A.att.reshaped(qs), A.lse, pos_, pos_, dq.reshaped(qs), dk.reshaped(qs),
                               dv.reshaped(qs), true, 0.0};
    if (attention_override) attention_override->backward(l, ga);
    else be_.attention_bwd(ga);
    be_.rope_bwd(RopeArgs{dq.reshaped(Shape{N, NH, HS}), pos_flat, cfg_.rope_theta, cfg_.attn_log_base});
    be_.rope_bwd(RopeArgs{dk.reshaped(Shape{N, NH, HS}), pos_flat, cfg_.rope_theta});
    if (kv_transform) kv_transform->backward(l, dk, dv);
    TensorView dln1 = ar.allocate(Shape{N, C}, f);
    be_.linear_bwd(LinearGradArgs{dq, A.ln1, p.wq, dln1, g.wq, g.bq, false});
    be_.linear_bwd(LinearGradArgs{dk, A.ln1, p.wk, dln1, g.wk, g.bk, true});
    be_.linear_bwd(LinearGradArgs{dv, A.ln1, p.wv, dln1, g.wv, g.bv, true});
    be_.layernorm_bwd(LayerNormGradArgs{dln1, A.x_in, p.ln1_w, A.ln1_mean, A.ln1_rstd, dx, g.ln1_w, g.ln1_b});
    if (on_layer_grads_ready) on_layer_grads_ready(l);
  }
  be_.embedding_bwd(EmbeddingGradArgs{tokens_.reshaped(Shape{N}), dx, dwte_});
  if (on_layer_grads_ready) on_layer_grads_ready(-1);
}

KVCache Transformer::new_cache(std::int64_t batch, std::int64_t capacity, Arena& arena) const {
  DSRSQ_INPUT_CHECK(batch > 0 && capacity > 0, "decode: cache batch and capacity must be > 0, got ", batch, " and ",
                    capacity);
  KVCache c;
  c.batch = batch;
  c.capacity = capacity;
  const Shape s{batch, capacity, cfg_.n_heads, cfg_.head_size()};
  for (std::int64_t l = 0; l < cfg_.n_layers; ++l) {
    c.k.push_back(arena.allocate(s, DType::f32));
    c.v.push_back(arena.allocate(s, DType::f32));
  }
  c.pos = arena.allocate(Shape{batch, capacity}, DType::i32);
  const std::vector<std::int32_t> empty(static_cast<std::size_t>(batch * capacity), KVCache::kEmptyPos);
  from_host<std::int32_t>(be_, empty, c.pos);
  return c;
}

// Host inputs on a device backend are copied into the input arena (apart
// from the activations, so the activation figures do not depend on the device).
void Transformer::device_inputs(TensorView& tokens, TensorView& pos) {
  input_arena_.reset();
  if (be_.device() == Device::cpu) return;
  if (tokens.device == Device::cpu) tokens = copy_into(input_arena_, tokens);
  if (pos.device == Device::cpu) pos = copy_into(input_arena_, pos);
}

void Transformer::extend(KVCache& cache, TensorView tokens, TensorView pos) {
  check_batch(tokens, pos);
  act_arena_.reset();
  have_targets_ = false;
  B_ = 0;  // a decode call invalidates saved training activations
  device_inputs(tokens, pos);
  run_forward(act_arena_, tokens.shape[0], tokens.shape[1], tokens, pos, &cache);
}

void Transformer::extend(KVPolicy& policy, TensorView tokens, TensorView pos) {
  check_batch(tokens, pos);
  act_arena_.reset();
  have_targets_ = false;
  B_ = 0;
  device_inputs(tokens, pos);
  run_forward(act_arena_, tokens.shape[0], tokens.shape[1], tokens, pos, nullptr, &policy);
}

double Transformer::train_flops(std::int64_t B, std::int64_t T) const {
  const std::int64_t C = cfg_.d_model, F = cfg_.d_ff, N = B * T;
  double fl = 0;
  for (bool bwd : {false, true}) {
    double layer = 4 * linear_cost(N, C, C, bwd).flops + linear_cost(N, C, F, bwd).flops + linear_cost(N, F, C, bwd).flops +
                   attention_cost(B, T, T, cfg_.n_heads, cfg_.head_size(), true, bwd).flops;
    fl += static_cast<double>(cfg_.n_layers) * layer + linear_cost(N, C, cfg_.vocab, bwd).flops;
  }
  return fl;
}

}  // namespace dsrsq
