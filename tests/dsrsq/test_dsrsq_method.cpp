// DSRSQ as one method (src/methods/dsrsq_model.hpp): the identity with the
// standard model when every part covers everything (budget >= N, k_c = m,
// buffer >= N, d_c = d), the training batch of selected sequences, the HOF
// terms' gradients, the checkpoint round trip.
#define BOOST_TEST_MODULE dsrsq_method
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "backend/backend.hpp"
#include "data/tokenizer.hpp"
#include "eval/evaluator.hpp"
#include "core/rng.hpp"
#include "kv/kv_policy.hpp"
#include "model/transformer.hpp"
#include "methods/dsrsq_model.hpp"
#include "train/encode.hpp"

using namespace dsrsq;

namespace {

constexpr std::int32_t kBos = 0, kSep = 1, kAns = 2, kEos = 3, kPad = 4;

ModelConfig small_cfg() {
  ModelConfig c;
  c.vocab = 61;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_layers = 2;
  c.d_ff = 64;
  c.max_pos = 256;
  return c;
}

// Weights large enough that attention is far from uniform.
void randomise(Transformer& m, std::uint64_t seed) {
  Rng rng(seed, 7);
  for (auto& p : m.params()) {
    const bool norm_w = p.name.find("ln") != std::string::npos && p.name.find("weight") != std::string::npos;
    if (norm_w) continue;
    const double sd = p.decay ? 0.25 : 0.05;
    float* v = p.value.ptr<float>();
    for (std::int64_t i = 0; i < p.value.numel(); ++i) v[i] = static_cast<float>(sd * rng.normal());
  }
}

Encoded make_example(std::int64_t n_ctx, std::uint64_t seed) {
  Rng rng(seed, 11);
  auto tok = [&] { return static_cast<std::int32_t>(5 + rng.below(56)); };
  Encoded e;
  e.tokens.push_back(kBos);
  for (std::int64_t i = 0; i < n_ctx; ++i) e.tokens.push_back(tok());
  e.tokens.push_back(kSep);
  for (int i = 0; i < 6; ++i) e.tokens.push_back(tok());
  e.tokens.push_back(kAns);
  e.prompt_len = static_cast<std::int64_t>(e.tokens.size());
  e.query_len = 8;
  e.context_tokens = n_ctx;
  for (int i = 0; i < 3; ++i) e.tokens.push_back(tok());
  e.tokens.push_back(kEos);
  return e;
}

// Settings where every part covers everything.
DsrsqSettings identity_settings(const ModelConfig& mc) {
  DsrsqSettings s;
  s.dsr.d_r = 16;
  s.dsr.base_budget = 100000;  // >= N: the whole context
  s.dsr.span = 2;
  s.sqa.clusters = 4;
  s.sqa.top_clusters = 4;  // k_c = m
  s.rckv.d_c = mc.d_model;  // d_c = d
  s.rckv.buffer = 512;      // >= N
  s.rckv.window = 4;
  s.rckv.sqa = true;
  s.rckv.sqa_cfg = s.sqa;
  return s;
}

double rel_err(const float* a, const float* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

std::vector<float> logits_copy(const Transformer& m) {
  const TensorView l = m.logits();
  return std::vector<float>(l.ptr<float>(), l.ptr<float>() + l.numel());
}

}  // namespace

BOOST_AUTO_TEST_CASE(inference_identity_with_standard) {
  const ModelConfig mc = small_cfg();
  Transformer model(mc, cpu_backend());
  randomise(model, 3);
  DsrsqModel dm(model, identity_settings(mc), cpu_backend());
  dm.init(5);
  const Encoded enc = make_example(90, 1);
  dm.init_projections_pca({&enc}, kPad);

  // The retriever keeps every prompt token at its own position.
  const auto idx = dm.select_prompt(enc, DsrsqVariant::named("full_model"));
  BOOST_REQUIRE_EQUAL(static_cast<std::int64_t>(idx.size()), enc.prompt_len);
  for (std::size_t i = 0; i < idx.size(); ++i) BOOST_REQUIRE_EQUAL(idx[i], static_cast<std::int32_t>(i));

  SequenceInfo info;
  info.prompt_len = enc.prompt_len;
  info.query_len = enc.query_len;
  info.max_new_tokens = 6;
  KVBudget budget;  // fraction 1
  auto full = make_kv_policy("full", mc, cpu_backend());
  auto rckv = dm.make_policy(DsrsqVariant::named("full_model"));
  BOOST_CHECK_EQUAL(rckv->name(), "rckv");
  std::vector<std::int32_t> prompt(enc.tokens.begin(), enc.tokens.begin() + enc.prompt_len);
  std::vector<std::vector<float>> want, got;
  for (KVPolicy* p : {full.get(), rckv.get()}) {
    p->begin(info, budget);
    std::vector<std::int32_t> toks(idx.size());
    for (std::size_t i = 0; i < idx.size(); ++i) toks[i] = enc.tokens[static_cast<std::size_t>(idx[i])];
    std::vector<std::int32_t> pos(idx.begin(), idx.end());
    model.extend(*p, TensorView(toks.data(), Shape{1, enc.prompt_len}), TensorView(pos.data(), Shape{1, enc.prompt_len}));
    p->end_prefill();
    auto& out = p == full.get() ? want : got;
    out.push_back(logits_copy(model));
    // Decode the same 5 tokens (teacher-forced) through the cache.
    for (int s = 0; s < 5; ++s) {
      std::int32_t t = 5 + s * 7, ps = static_cast<std::int32_t>(enc.prompt_len + s);
      model.extend(*p, TensorView(&t, Shape{1, 1}), TensorView(&ps, Shape{1, 1}));
      out.push_back(logits_copy(model));
    }
  }
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double e = rel_err(got[i].data(), want[i].data(), want[i].size());
    BOOST_TEST_MESSAGE("call " << i << " rel err " << e);
    // Summation order only (first-order bound, kappa = 1 over all logits, u =
    // 2^-24; C 32, HS 8, F 64, 2 layers, T <= 99 + 5 keys): the full path's
    // chain 2 (5C + HS + 2T + F) + 2C = 944 u; the RCKV path adds K and V
    // through P then U (2 (C + d_c) per layer: 256), the f32 basis' departure
    // from U P = I (C per layer: 64) and 4 SQA cluster merges (24): 1288 u;
    // sum 2232 u = 1.3e-4: the old 1e-4 was below it -> 2e-4.
    BOOST_CHECK_LT(e, 2e-4);
  }
}

BOOST_AUTO_TEST_CASE(training_identity_with_standard) {
  const ModelConfig mc = small_cfg();
  Transformer model(mc, cpu_backend());
  randomise(model, 4);
  DsrsqModel dm(model, identity_settings(mc), cpu_backend());
  dm.init(6);
  const Encoded a = make_example(70, 2), b = make_example(50, 3);
  const std::vector<const Encoded*> seqs{&a, &b};
  HostBatch std_batch = make_batch(seqs, kPad, 0.3f);
  HostBatch sel = dm.training_batch(seqs, kPad, 0.3f, std::nullopt, 1);
  BOOST_REQUIRE_EQUAL(sel.T, std_batch.T);
  // Same tokens, targets and weights wherever the standard batch has a real row;
  // positions equal there (padding sits at max_pos - 1).
  for (std::size_t i = 0; i < sel.tokens.size(); ++i) {
    if (std_batch.mask[i] == 0 && std_batch.is_answer[i] == 0 && sel.mask[i] == 0) continue;
    BOOST_REQUIRE_EQUAL(sel.tokens[i], std_batch.tokens[i]);
    BOOST_REQUIRE_EQUAL(sel.pos[i], std_batch.pos[i]);
    BOOST_REQUIRE_EQUAL(sel.targets[i], std_batch.targets[i]);
    BOOST_REQUIRE_EQUAL(sel.mask[i], std_batch.mask[i]);
  }
  // SQA with k_c = m is dense attention: the same loss and gradients.
  model.zero_grad();
  const double l0 = model.forward(std_batch.view());
  model.backward();
  const TensorView g = model.flat_grads();
  std::vector<float> g0(g.ptr<float>(), g.ptr<float>() + g.numel());
  model.attention_override = dm.sqa_override();
  model.zero_grad();
  const double l1 = model.forward(std_batch.view());
  model.backward();
  model.attention_override = nullptr;
  // Summation order only (cluster-wise online softmax vs one pass); every later
  // op then rounds independently. Logits: 2 paths x (2 (5C + HS + 2T + F) + 2C)
  // with T <= 84: 2 x 872 u = 1.0e-4 relative (kappa 1). The loss is a sum of
  // positive per-token cross-entropies (kappa 1), each lse(logits) - logit_y,
  // whose error is that of the logits scaled by |logit| / CE ~ 1 for this
  // random model: 1.0e-4 plus the sum's own n u (n <= 2 x 84): ~1.1e-4; the old
  // 1e-6 (17 u) was below it -> 2e-4. Gradients: the backward chain doubles
  // the forward one (transposed GEMMs over the same C, F, T, plus the row sums
  // of the weight gradients over <= 168 rows): 2 x (2 x 872 + 168) u = 2.3e-4;
  // the old 1e-5 was below it -> 5e-4. A wrong cluster (k_c < m) moves both by
  // O(1e-2).
  BOOST_CHECK_LT(std::abs(l1 - l0) / std::abs(l0), 2e-4);
  BOOST_CHECK_LT(rel_err(g.ptr<float>(), g0.data(), g0.size()), 5e-4);
}

BOOST_AUTO_TEST_CASE(selection_and_hof_gradients) {
  const ModelConfig mc = small_cfg();
  Transformer model(mc, cpu_backend());
  randomise(model, 5);
  DsrsqSettings s = identity_settings(mc);
  s.dsr.base_budget = 0.25;  // a quarter of the context (before the alpha term and spans)
  s.rckv.d_c = 8;
  s.sqa.top_clusters = 2;
  s.ramp = 10;
  s.dsr.ppo_epochs = 1;  // REINFORCE: ppo_update_epochs below covers PPO
  DsrsqModel dm(model, s, cpu_backend());
  dm.init(7);
  const Encoded a = make_example(120, 4), b = make_example(100, 5);
  // Inference selection: sorted, BOS and the whole question kept, far fewer context tokens.
  const auto idx = dm.select_prompt(a, DsrsqVariant::named("full_model"));
  BOOST_CHECK(std::is_sorted(idx.begin(), idx.end()));
  BOOST_CHECK_EQUAL(idx.front(), 0);
  for (std::int64_t i = 1 + a.context_tokens; i < a.prompt_len; ++i)
    BOOST_CHECK(std::binary_search(idx.begin(), idx.end(), static_cast<std::int32_t>(i)));
  const auto n_ctx = static_cast<std::int64_t>(idx.size()) - 1 - a.query_len;
  BOOST_CHECK_GT(n_ctx, 0);
  BOOST_CHECK_LT(n_ctx, a.context_tokens * 6 / 10);
  const auto all = dm.select_prompt(a, DsrsqVariant::named("no_dsr"));
  BOOST_CHECK_EQUAL(static_cast<std::int64_t>(all.size()), a.prompt_len);

  // Training: sampled batch, then the HOF terms. Before the ramp nothing but
  // the compression term... at step 0 every efficiency weight is 0.
  model.save_pre_rope_keys = true;
  model.attention_override = dm.sqa_override();
  auto step = [&](std::int64_t st) {
    HostBatch hb = dm.training_batch({&a, &b}, kPad, 0.0f, std::uint64_t{99} + static_cast<std::uint64_t>(st), 1);
    model.zero_grad();
    model.forward(hb.view());
    model.backward();
    dm.zero_extra_grad();
    return dm.hof_terms(st, hb, {0.5 + 0.1 * static_cast<double>(st), 0.7}, nullptr, true, 2.0);
  };
  const HofTerms h0 = step(0);
  BOOST_CHECK_EQUAL(h0.ramp, 0.0);
  double n0 = 0;
  const TensorView g = dm.extra_grads();
  for (std::int64_t i = 0; i < g.numel(); ++i) n0 += std::abs(g.ptr<float>()[i]);
  BOOST_CHECK_EQUAL(n0, 0.0);
  const HofTerms h = step(20);
  BOOST_CHECK_EQUAL(h.ramp, 1.0);
  BOOST_CHECK(std::isfinite(h.retrieval) && std::isfinite(h.compression) && std::isfinite(h.compute));
  BOOST_CHECK_GT(h.compression, 0.0);  // d_c = 8 < d cannot reconstruct exactly
  BOOST_CHECK_GT(h.selected_fraction, 0.0);
  BOOST_CHECK_LT(h.selected_fraction, 1.0);
  BOOST_CHECK_GT(h.compute, h.selected_fraction * 0.5);
  // Gradients reach the retriever and every layer's projections.
  for (const auto& p : dm.extra_params()) {
    double n = 0;
    for (std::int64_t i = 0; i < p.grad.numel(); ++i) n += std::abs(p.grad.ptr<float>()[i]);
    if (p.name == "dsr.budget_b" || p.name.rfind("dsr.", 0) == 0 || p.name.rfind("rckv.", 0) == 0)
      BOOST_CHECK_MESSAGE(n > 0 || p.name == "dsr.conv", p.name << " got no gradient");
  }
  model.attention_override = nullptr;
  model.save_pre_rope_keys = false;

  // Checkpoint round trip of the extra state.
  std::map<std::string, std::vector<float>> extra;
  std::vector<float> m(static_cast<std::size_t>(dm.extra_flat().numel()), 0.25f), v(m.size(), 0.5f);
  dm.save(extra, TensorView(m.data(), Shape{static_cast<std::int64_t>(m.size())}),
          TensorView(v.data(), Shape{static_cast<std::int64_t>(v.size())}), 17);
  const std::vector<float> before(dm.extra_flat().ptr<float>(), dm.extra_flat().ptr<float>() + dm.extra_flat().numel());
  const double base = dm.baseline().value();
  cpu_backend().fill(dm.extra_flat(), 0.0);
  std::vector<float> m2(m.size()), v2(m.size());
  const auto steps = dm.load(extra, TensorView(m2.data(), Shape{static_cast<std::int64_t>(m2.size())}),
                             TensorView(v2.data(), Shape{static_cast<std::int64_t>(v2.size())}));
  BOOST_CHECK_EQUAL(steps, 17);
  BOOST_CHECK(m2 == m && v2 == v);
  BOOST_CHECK(std::equal(before.begin(), before.end(), dm.extra_flat().ptr<float>()));
  BOOST_CHECK_CLOSE(dm.baseline().value(), base, 1e-4);
}

// PPO in the method: dsr.ppo_epochs = 3 re-runs only the scorer between
// epochs (the backbone's forward and the rewards are those of the sampled batch),
// each inner epoch ending in the retriever's own AdamW step; the last epoch sees
// ratios != 1. The first epoch's surrogate is the logged value, so the logged
// retrieval loss equals the REINFORCE run's; the backbone's gradient is untouched.
BOOST_AUTO_TEST_CASE(ppo_update_epochs) {
  const ModelConfig mc = small_cfg();
  const Encoded a = make_example(120, 4), b = make_example(100, 5);
  auto run = [&](std::int64_t epochs, std::optional<double> lr, std::vector<float>* extra_after,
                 std::vector<float>* backbone_grad) {
    Transformer model(mc, cpu_backend());
    randomise(model, 5);
    DsrsqSettings s = identity_settings(mc);
    s.dsr.base_budget = 0.25;
    s.rckv.d_c = 8;
    s.sqa.top_clusters = 2;
    s.ramp = 10;
    s.dsr.ppo_epochs = epochs;
    DsrsqModel dm(model, s, cpu_backend());
    dm.init(7);
    model.save_pre_rope_keys = true;
    model.attention_override = dm.sqa_override();
    HostBatch hb = dm.training_batch({&a, &b}, kPad, 0.0f, std::uint64_t{99}, 1);
    model.zero_grad();
    model.forward(hb.view());
    model.backward();
    dm.zero_extra_grad();
    const HofTerms h = dm.hof_terms(20, hb, {0.5, 0.9}, nullptr, true, 2.0, lr);
    if (extra_after)
      extra_after->assign(dm.extra_flat().ptr<float>(), dm.extra_flat().ptr<float>() + dm.extra_flat().numel());
    if (backbone_grad) {
      const TensorView g = model.flat_grads();
      backbone_grad->assign(g.ptr<float>(), g.ptr<float>() + g.numel());
    }
    if (epochs > 1) BOOST_CHECK_EQUAL(dm.ppo_optimizer()->steps(), epochs - 1);
    return h;
  };
  std::vector<float> p1, p3, g1, g3;
  const HofTerms h1 = run(1, std::nullopt, &p1, &g1);
  const HofTerms h3 = run(3, 0.01, &p3, &g3);
  BOOST_CHECK_EQUAL(h1.ppo_epochs, 1);
  BOOST_CHECK_EQUAL(h1.ppo_mean_ratio, 1.0);
  BOOST_CHECK_EQUAL(h3.ppo_epochs, 3);
  BOOST_TEST_MESSAGE("ppo_epochs 3: last epoch mean ratio " << h3.ppo_mean_ratio << ", clip fractions "
                                                            << h3.ppo_selection_clip_fraction << " (selection) "
                                                            << h3.ppo_budget_clip_fraction << " (budget)");
  BOOST_CHECK_GT(std::abs(h3.ppo_mean_ratio - 1.0), 1e-3);
  BOOST_CHECK_EQUAL(h3.retrieval, h1.retrieval);  // the on-policy surrogate is logged
  BOOST_CHECK_EQUAL(h3.compression, h1.compression);
  BOOST_CHECK_EQUAL(h3.compute, h1.compute);
  BOOST_CHECK(g3 == g1);  // the backbone is not re-run
  // The inner steps moved the scorer's part of the parameters only.
  const std::int64_t nd = retrieval::DsrScorer::num_parameters(mc.d_model, identity_settings(mc).dsr);
  BOOST_CHECK(!std::equal(p1.begin(), p1.begin() + nd, p3.begin()));
  BOOST_CHECK(std::equal(p1.begin() + nd, p1.end(), p3.begin() + nd));
  // Without the step's learning rate PPO cannot run: an error naming the option.
  BOOST_CHECK_THROW(run(3, std::nullopt, nullptr, nullptr), Error);
}

BOOST_AUTO_TEST_CASE(variants) {
  BOOST_CHECK(DsrsqVariant::named("no_dsr").dsr == false);
  BOOST_CHECK(DsrsqVariant::named("no_sqa").sqa == false);
  BOOST_CHECK(DsrsqVariant::named("no_rckv").rckv == false);
  BOOST_CHECK_THROW(DsrsqVariant::named("no_everything"), Error);
}

// RCKV in the training forward: the loss's gradient w.r.t. the projections and
// the backbone's K/V weights through the reconstruction, against finite
// differences (f32 model; central differences in the parameters).
BOOST_AUTO_TEST_CASE(rckv_train_transform_gradient) {
  ModelConfig mc = small_cfg();
  mc.n_layers = 1;
  Transformer model(mc, cpu_backend());
  randomise(model, 8);
  DsrsqSettings s = identity_settings(mc);
  s.rckv.d_c = 8;
  s.rckv.window = 5;
  DsrsqModel dm(model, s, cpu_backend());
  dm.init(9);
  const Encoded a = make_example(30, 6);
  HostBatch hb = dm.training_batch({&a}, kPad, 0.5f, std::nullopt, 1);
  std::int64_t n_comp = 0;
  for (auto c : hb.compress) n_comp += c;
  BOOST_CHECK_EQUAL(n_comp, a.prompt_len - s.rckv.window);  // budget >= N: every prompt token kept
  model.kv_transform = dm.kv_transform();
  auto loss = [&] {
    dm.kv_transform()->set_rows(hb.compress);
    return model.forward(hb.view());
  };
  model.zero_grad();
  dm.zero_extra_grad();
  const double l0 = loss();
  model.backward();
  // The transform changes the loss (d_c < C), and its gradient reaches P, U and W_k.
  model.kv_transform = nullptr;
  const double plain = model.forward(hb.view());
  model.kv_transform = dm.kv_transform();
  BOOST_CHECK_GT(std::abs(plain - l0), 1e-4);
  auto check = [&](const Param& p, int picks) {
    std::vector<std::int64_t> idx(static_cast<std::size_t>(p.grad.numel()));
    for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<std::int64_t>(i);
    const float* g = p.grad.ptr<float>();
    std::partial_sort(idx.begin(), idx.begin() + picks, idx.end(),
                      [&](auto x, auto y) { return std::abs(g[x]) > std::abs(g[y]); });
    for (int j = 0; j < picks; ++j) {
      float* v = p.value.ptr<float>() + idx[static_cast<std::size_t>(j)];
      const float keep = *v;
      const float h = 1e-2f;
      *v = keep + h;
      const double lp = loss();
      *v = keep - h;
      const double lm = loss();
      *v = keep;
      const double fd = (lp - lm) / (2.0 * h);
      const double an = g[idx[static_cast<std::size_t>(j)]];
      BOOST_TEST_MESSAGE(p.name << "[" << idx[static_cast<std::size_t>(j)] << "] analytic " << an << " fd " << fd);
      BOOST_CHECK_LT(std::abs(fd - an), 0.03 * std::abs(an) + 2e-4);
    }
  };
  for (const auto& p : dm.extra_params())
    if (p.name.rfind("rckv.0.", 0) == 0) check(p, 3);
  check(model.param("h.0.attn.wk"), 3);
  check(model.param("h.0.attn.wv"), 3);
  model.kv_transform = nullptr;
}

// Inference matches training: RCKV's prefill (train_matched_prefill, dense
// attention) gives the logits of the training forward with the RCKV transform
// on the same prompt (every token older than the window reconstructed).
BOOST_AUTO_TEST_CASE(prefill_matches_training_forward) {
  const ModelConfig mc = small_cfg();
  Transformer model(mc, cpu_backend());
  randomise(model, 12);
  DsrsqSettings s = identity_settings(mc);
  s.rckv.d_c = 8;  // lossy: the two paths must agree on what they lose
  s.rckv.window = 6;
  DsrsqModel dm(model, s, cpu_backend());
  dm.init(13);
  const Encoded a = make_example(60, 9);
  const std::int64_t P = a.prompt_len;
  HostBatch hb;
  hb.B = 1;
  hb.T = P;
  hb.tokens.assign(a.tokens.begin(), a.tokens.begin() + P);
  for (std::int64_t i = 0; i < P; ++i) hb.pos.push_back(static_cast<std::int32_t>(i));
  hb.compress.assign(static_cast<std::size_t>(P), 0);
  for (std::int64_t i = 0; i < P - s.rckv.window; ++i) hb.compress[static_cast<std::size_t>(i)] = 1;
  model.kv_transform = dm.kv_transform();
  dm.kv_transform()->set_rows(hb.compress);
  Batch bt{TensorView(hb.tokens.data(), Shape{1, P}), TensorView(hb.pos.data(), Shape{1, P}), {}, {}};
  model.forward(bt);
  const auto want = logits_copy(model);
  model.kv_transform = nullptr;
  auto pol = dm.make_policy(DsrsqVariant::named("no_sqa"));
  SequenceInfo info;
  info.prompt_len = P;
  info.query_len = a.query_len;
  info.max_new_tokens = 4;
  pol->begin(info, KVBudget{});
  model.extend(*pol, TensorView(hb.tokens.data(), Shape{1, P}), TensorView(hb.pos.data(), Shape{1, P}));
  const auto got = logits_copy(model);
  const double e = rel_err(got.data(), want.data(), want.size());
  BOOST_TEST_MESSAGE("prefill vs training forward rel err " << e);
  // The same reconstruction on both sides; summation order only. Per path: 2
  // (5C + HS + 2T + F) + 2C with T = 69, plus the K/V reconstruction through P
  // then U (2 (C + d_c) per layer: 160 at d_c = 8) = 908 u; two paths 1816 u =
  // 1.1e-4: the old 1e-5 was below it -> 2e-4 (measured: 0, the two paths are
  // bitwise equal today). The exact prefill (below) differs by O(1) (1.08).
  BOOST_CHECK_LT(e, 2e-4);
  // And it differs from an exact prefill (the reconstruction is lossy at d_c = 8).
  auto full = make_kv_policy("full", mc, cpu_backend());
  full->begin(info, KVBudget{});
  model.extend(*full, TensorView(hb.tokens.data(), Shape{1, P}), TensorView(hb.pos.data(), Shape{1, P}));
  BOOST_CHECK_GT(rel_err(logits_copy(model).data(), want.data(), want.size()), 1e-2);  // above the 2e-4 tolerance
}

// --dsr_positions: compact numbers the selected tokens 0..n-1 in selection
// order (inference and training batch alike); original keeps each token's
// index in the full prompt. The selection itself does not change.
BOOST_AUTO_TEST_CASE(dsr_positions_compact_and_original) {
  const ModelConfig mc = small_cfg();
  const Encoded a = make_example(120, 4), b = make_example(100, 5);
  std::vector<std::int32_t> sel_orig;
  HostBatch hb_orig;
  for (bool compact : {false, true}) {
    BOOST_TEST_CONTEXT("compact " << compact) {
      Transformer model(mc, cpu_backend());
      randomise(model, 5);
      DsrsqSettings s = identity_settings(mc);
      s.dsr.base_budget = 0.25;
      s.compact_positions = compact;
      DsrsqModel dm(model, s, cpu_backend());
      dm.init(7);
      BOOST_CHECK_EQUAL(dm.compact_positions(), compact);
      const auto sel = dm.select_prompt(a, DsrsqVariant::named("full_model"));
      BOOST_REQUIRE_LT(static_cast<std::int64_t>(sel.size()), a.prompt_len);  // a real selection, with gaps
      const auto pos = dsr_positions(sel, compact);
      BOOST_REQUIRE_EQUAL(pos.size(), sel.size());
      for (std::size_t i = 0; i < pos.size(); ++i) BOOST_CHECK_EQUAL(pos[i], compact ? static_cast<std::int32_t>(i) : sel[i]);
      const HostBatch hb = dm.training_batch({&a, &b}, kPad, 0.0f, std::uint64_t{42}, 1);
      if (!compact) {
        sel_orig = sel;
        hb_orig = hb;
        // Original: each kept token sits at its index in the full sequence.
        for (std::int64_t r = 0; r < hb.B; ++r) {
          const Encoded& e = r == 0 ? a : b;
          for (std::int64_t t = 0; t < hb.T; ++t) {
            const auto i = static_cast<std::size_t>(r * hb.T + t);
            if (hb.pos[i] == mc.max_pos - 1) continue;  // padding
            BOOST_CHECK_EQUAL(hb.tokens[i], e.tokens[static_cast<std::size_t>(hb.pos[i])]);
          }
        }
        continue;
      }
      BOOST_CHECK(sel == sel_orig);  // positions do not change what is selected
      BOOST_REQUIRE_EQUAL(hb.T, hb_orig.T);
      BOOST_CHECK(hb.tokens == hb_orig.tokens);
      BOOST_CHECK(hb.targets == hb_orig.targets);
      bool gaps = false;
      for (std::int64_t r = 0; r < hb.B; ++r) {
        std::int32_t expect = 0;
        for (std::int64_t t = 0; t < hb.T; ++t) {
          const auto i = static_cast<std::size_t>(r * hb.T + t);
          if (hb_orig.pos[i] == mc.max_pos - 1) {  // padding stays last
            BOOST_CHECK_EQUAL(hb.pos[i], mc.max_pos - 1);
            continue;
          }
          BOOST_CHECK_EQUAL(hb.pos[i], expect++);
          gaps = gaps || hb_orig.pos[i] != hb.pos[i];
        }
      }
      BOOST_CHECK(gaps);  // the selection dropped tokens, so compact differs from original
    }
  }
}

// The evaluator's positions seam (EvalConfig::positions, from EvalPlan):
// serving a selection at compact positions is serving the selected tokens as
// a prompt of their own (same tokens, positions 0..n-1, decoding after them),
// bit for bit (one process, identical inputs and shapes); at original
// positions the same tokens give other logits.
BOOST_AUTO_TEST_CASE(evaluator_compact_positions_seam) {
  ModelConfig mc = small_cfg();
  mc.vocab = static_cast<std::int64_t>(ByteTokenizer::kVocabSize);
  Transformer model(mc, cpu_backend());
  randomise(model, 8);
  const ByteTokenizer tok;
  data::Example ex;
  ex.id = "seam";
  ex.context = "The quick brown fox jumps over the lazy dog near 42 river banks.";
  ex.query = "Which dog?";
  ex.answers = {"lazy"};
  EvalConfig cfg;
  cfg.max_new_tokens = 5;
  cfg.max_seq_len = 200;
  cfg.budget = KVBudget::parse("1.0");
  // BOS, every other context token, the whole question.
  auto every_other = [](const Encoded& e) {
    std::vector<std::int32_t> idx{0};
    for (std::int64_t i = 1; i <= e.context_tokens; i += 2) idx.push_back(static_cast<std::int32_t>(i));
    for (std::int64_t i = 1 + e.context_tokens; i < e.prompt_len; ++i) idx.push_back(static_cast<std::int32_t>(i));
    return idx;
  };
  cfg.select = [every_other](const Encoded& e, const SelectionEnv&) { return Selection{every_other(e), {}, {}}; };
  auto run = [&](const data::Example& e, const EvalConfig& c) {
    auto policy = make_kv_policy("full", mc, cpu_backend());
    const ExampleEval r = serve_example(model, *policy, tok, e, c);
    const TensorView l = model.logits();
    return std::make_pair(r, std::vector<float>(l.ptr<float>(), l.ptr<float>() + l.numel()));
  };
  EvalConfig compact = cfg;
  compact.select = [every_other](const Encoded& e, const SelectionEnv&) {
    const auto idx = every_other(e);
    return Selection{idx, dsr_positions(idx, true), {}};
  };
  const auto [a, la] = run(ex, compact);
  data::Example cut = ex;
  cut.context.clear();
  for (std::size_t i = 0; i < ex.context.size(); i += 2) cut.context += ex.context[i];  // byte tokens: index i+1
  EvalConfig plain = cfg;
  plain.select = nullptr;
  const auto [b, lb] = run(cut, plain);
  BOOST_TEST(a.prompt_tokens_in == b.prompt_tokens_in);
  BOOST_TEST(a.prediction == b.prediction);
  BOOST_TEST(a.generated_tokens == b.generated_tokens);
  BOOST_TEST(la == lb);
  const auto [c, lc] = run(ex, cfg);  // original positions: gaps in the positions
  BOOST_TEST(c.prompt_tokens_in == a.prompt_tokens_in);
  BOOST_TEST((lc.size() != la.size() || lc != la));
}
