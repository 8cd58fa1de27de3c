// GCA (methods/gca_model.hpp): the model's own checks.
//  (a) every parameter's gradient in f64 against central finite differences
//      of the f64 forward (the retrieval's choice fixed by a seeded Gumbel draw
//      and unchanged by the perturbation; the weights' softmax is smooth);
//  (b) token-by-token decoding (rings of W + 1, chunk memory, retrieval at
//      each landmark) gives the full forward's logits and choices;
//  (c) retrieval on a hand-built model: the chunk holding the query's token is
//      chosen, with weights = softmax of the chosen scores;
//  (d) each chunk's softmax has exactly one +1 (the zeroed landmark slot);
//  (e) self-attention sees W + 1 stream entries: changing an older token
//      leaves the logits unchanged;
//  (f) a training run resumed from its checkpoint ends with the same
//      parameters as the uninterrupted run;
//  (g) started from a standard model (--gca_init standard), GCA computes that
//      model's logits wherever the two models can agree (no landmark yet, the
//      window covers the sequence), keeps its own parts and zeroes Wo.
#define BOOST_TEST_MODULE dsrsq_gca
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include <boost/program_options.hpp>

#include "../common/reference.hpp"
#include "methods/gca_model.hpp"
#include "methods/method.hpp"
#include "model/transformer.hpp"
#include "train/trainer.hpp"

using dsrsq::Batch;
using dsrsq::DType;
using dsrsq::GcaConfig;
using dsrsq::GcaDecoder;
using dsrsq::GcaModel;
using dsrsq::Shape;
using dsrsq::TensorView;

namespace {

dsrsq::Backend& be() { return dsrsq::cpu_backend(); }

GcaConfig tiny() {
  GcaConfig c;
  c.base.vocab = 11;
  c.base.d_model = 8;
  c.base.n_heads = 2;
  c.base.d_ff = 12;
  c.base.max_pos = 256;
  c.chunk = 3;
  c.topk = 2;
  c.window = 4;
  c.n_lower = 1;
  c.n_upper = 2;  // two upper layers share one chunk memory: their gradients add
  c.n_enc = 2;
  c.enc_d_ff = 6;
  return c;
}

double get(const TensorView& t, std::int64_t i) {
  return t.dtype == DType::f64 ? t.ptr<double>()[i] : static_cast<double>(t.ptr<float>()[i]);
}
void set(const TensorView& t, std::int64_t i, double v) {
  if (t.dtype == DType::f64) t.ptr<double>()[i] = v;
  else t.ptr<float>()[i] = static_cast<float>(v);
}

bool is_norm_weight(const std::string& n) { return n.find("weight") != std::string::npos; }

// Random weights large enough that every path carries a visible gradient.
void randomize(GcaModel& m, std::uint64_t seed, double sd) {
  dsrsq::Rng rng(seed);
  for (auto& p : m.params())
    for (std::int64_t i = 0; i < p.value.numel(); ++i)
      set(p.value, i, is_norm_weight(p.name) ? 1.0 + 0.2 * rng.normal() : sd * rng.normal());
}

struct HostBatch {
  std::int64_t B = 0, T = 0;
  std::vector<std::int32_t> tokens, pos, targets;
  std::vector<float> mask;
  Batch view() {
    return Batch{TensorView(tokens.data(), Shape{B, T}), TensorView(pos.data(), Shape{B, T}),
                 TensorView(targets.data(), Shape{B, T}), TensorView(mask.data(), Shape{B, T})};
  }
  Batch logits_only() { return Batch{TensorView(tokens.data(), Shape{B, T}), TensorView(pos.data(), Shape{B, T}), {}, {}}; }
};

HostBatch random_batch(std::int64_t B, std::int64_t T, std::int64_t V, std::uint64_t seed) {
  dsrsq::Rng rng(seed);
  HostBatch h;
  h.B = B;
  h.T = T;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) {
      h.tokens.push_back(static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(V))));
      h.pos.push_back(static_cast<std::int32_t>(t));
      h.targets.push_back(static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(V))));
      h.mask.push_back(static_cast<float>(rng.uniform()));
    }
  h.mask[2] = 0.0f;
  return h;
}

std::vector<std::int32_t> selections(const GcaModel& m, std::int64_t B) {
  std::vector<std::int32_t> s;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t c = 0; c < m.landmarks(); ++c)
      for (std::int64_t i = 0; i < m.config().topk; ++i) s.push_back(m.selected(b, c, i));
  return s;
}

}  // namespace

// ---- (a) gradients ---------------------------------------------------------------------------
// Tolerance: ||analytic - numeric|| / ||numeric|| <= 1e-6 per tensor, as in
// tests/grad: with h = 1e-5 in f64 the central difference's truncation error
// (~h^2 |L'''|) and rounding error (~1e-16 |L| / h) are ~1e-10 for |L| ~ 3;
// a wrong term in a backward (a lost path, a missing 1/sqrt(D)) gives >= 1e-2.
BOOST_AUTO_TEST_CASE(every_parameter_gradient_matches_finite_differences_f64) {
  const GcaConfig cfg = tiny();
  GcaModel m(cfg, be(), DType::f64);
  randomize(m, 3, 0.4);
  m.set_noise(17);  // the training path: Gumbel noise chooses, clean scores weigh
  // T = 14, S = 3: 4 landmarks; landmark 3 chooses 2 of its 3 earlier chunks;
  // the last token chunk is partial (rows past the stream go to the sink).
  HostBatch hb = random_batch(2, 14, cfg.base.vocab, 5);
  m.zero_grad();
  m.forward(hb.view());
  m.backward(1.0);
  const std::vector<std::int32_t> sel0 = selections(m, hb.B);
  BOOST_TEST_REQUIRE(m.landmarks() == 4);
  BOOST_TEST(sel0[static_cast<std::size_t>(3 * cfg.topk + 1)] >= 0, "landmark 3 should choose 2 chunks");
  std::vector<double> grads(static_cast<std::size_t>(m.flat_grads().numel()));
  for (std::size_t i = 0; i < grads.size(); ++i) grads[i] = get(m.flat_grads(), static_cast<std::int64_t>(i));
  const double h = 1e-5;
  int flips = 0;
  std::int64_t off = 0;
  for (auto& p : m.params()) {
    const std::int64_t n = p.value.numel();
    ref::Vec an(grads.begin() + off, grads.begin() + off + n), num(static_cast<std::size_t>(n));
    off += n;
    for (std::int64_t i = 0; i < n; ++i) {
      const double x0 = get(p.value, i);
      set(p.value, i, x0 + h);
      const double lp = m.forward(hb.view());
      flips += selections(m, hb.B) != sel0;
      set(p.value, i, x0 - h);
      const double lm = m.forward(hb.view());
      flips += selections(m, hb.B) != sel0;
      set(p.value, i, x0);
      num[static_cast<std::size_t>(i)] = (lp - lm) / (2 * h);
    }
    double nn = 0;
    for (double v : num) nn += v * v;
    const double e = ref::rel_err(an, num);
    BOOST_TEST(e <= 1e-6, p.name << ": relative error " << e << " (|numeric| " << std::sqrt(nn) << ")");
    BOOST_TEST(std::sqrt(nn) > 1e-8, p.name << ": gradient is identically zero, the check proves nothing");
  }
  BOOST_TEST(flips == 0, "a finite-difference step changed the retrieval's choice " << flips << " times");
}

// ---- (b) decode == forward --------------------------------------------------------------------
namespace {

// Logits of the full forward and of decoding in two extend calls (the first
// from position 0, of `split` tokens: the batched prefill unless `mode` is
// stepwise or split is 1; the rest token by token), with the choices each made.
void decode_vs_forward(DType dt, double tol, GcaDecoder::Prefill mode = GcaDecoder::Prefill::stepwise,
                       std::int64_t split = 10, std::int64_t chunk = 4, std::int64_t window = 6) {
  GcaConfig cfg = tiny();
  cfg.base.vocab = 13;
  cfg.base.d_model = 16;
  cfg.chunk = chunk;
  cfg.topk = 2;
  cfg.window = window;
  GcaModel m(cfg, be(), dt);
  randomize(m, 8, 0.3);
  const std::int64_t T = 37;  // S 4: 9 landmarks, a partial last chunk; T > window
  HostBatch hb = random_batch(1, T, cfg.base.vocab, 9);
  m.forward(hb.logits_only());
  const std::int64_t V = cfg.base.vocab;
  std::vector<double> full(static_cast<std::size_t>(T * V));
  for (std::size_t i = 0; i < full.size(); ++i) full[i] = get(m.logits(), static_cast<std::int64_t>(i));
  // The forward's choices per landmark (read now: a batched prefill runs a forward of its own).
  std::vector<std::vector<std::int32_t>> chose(static_cast<std::size_t>(m.landmarks()));
  std::vector<std::vector<double>> weights(chose.size());
  for (std::int64_t c = 0; c < m.landmarks(); ++c)
    for (std::int64_t i = 0; i < cfg.topk; ++i)
      if (m.selected(0, c, i) >= 0) {
        chose[static_cast<std::size_t>(c)].push_back(m.selected(0, c, i));
        weights[static_cast<std::size_t>(c)].push_back(m.weight(0, c, i));
      }
  GcaDecoder dec(m, T, mode);
  std::vector<double> step(full.size());
  for (auto [a, n] : {std::pair<std::int64_t, std::int64_t>{0, split}, {split, T - split}}) {
    if (n == 0) continue;
    TensorView lg = dec.extend(std::span<const std::int32_t>(hb.tokens.data() + a, static_cast<std::size_t>(n)),
                               std::span<const std::int32_t>(hb.pos.data() + a, static_cast<std::size_t>(n)));
    for (std::int64_t i = 0; i < n * V; ++i) step[static_cast<std::size_t>(a * V + i)] = get(lg, i);
    // After the last landmark so far: the decoder reads what the forward chose for it.
    BOOST_TEST(dec.tokens_seen() == a + n);
    BOOST_TEST(dec.chunks() == (a + n) / cfg.chunk);
    const std::int64_t c = dec.chunks() - 1;
    if (c < 0) continue;
    const auto& want = chose[static_cast<std::size_t>(c)];
    BOOST_TEST(dec.current_chunks() == want, "landmark " << c << ": decoding chose other chunks than the forward");
    for (std::size_t i = 0; i < want.size(); ++i)
      BOOST_TEST(std::abs(dec.current_weights()[i] - weights[static_cast<std::size_t>(c)][i]) <= tol);
  }
  BOOST_TEST(dec.chunks() == T / cfg.chunk);
  double maxabs = 0, maxdiff = 0;
  for (std::size_t i = 0; i < full.size(); ++i) {
    maxabs = std::max(maxabs, std::abs(full[i]));
    maxdiff = std::max(maxdiff, std::abs(full[i] - step[i]));
  }
  BOOST_TEST(maxdiff <= tol * std::max(1.0, maxabs), "decode vs forward: max |difference| " << maxdiff
                                                                                            << " (max |logit| " << maxabs << ")");
}

}  // namespace

// f64: the two paths are the same algorithm in other orders of summation, so
// they agree to ~1e-14 relative; 1e-10 leaves four orders of margin and
// catches any wrong mask, landmark timing or chunk choice (>= 1e-3).
BOOST_AUTO_TEST_CASE(decode_equals_forward_f64) { decode_vs_forward(DType::f64, 1e-10); }

// f32: unit roundoff u = 6e-8; a logit passes through ~40 chained dot
// products of length <= 64 (3 blocks, the encoder, GCA), each adding at most
// ~64 u relative in the worst case: 40 * 64 * 6e-8 ~ 1.5e-4. 5e-4 relative
// to the largest logit covers the worst case; a real mismatch is >= 1e-2.
BOOST_AUTO_TEST_CASE(decode_equals_forward_f32) { decode_vs_forward(DType::f32, 5e-4); }

// The prefill in blocks (up to W tokens inside one chunk, the landmark with
// the chunk's last token) followed by token-by-token decoding gives the
// forward's logits and choices, wherever the prompt ends: one token (a block
// of one), inside the first chunk, at a landmark (S = 4), inside the first
// window (W = 6), inside a chunk past the window, at a later landmark, and the
// whole sequence. A wrong ring slot or mask, stale chunk state or an
// off-by-one landmark choice moves the logits after the split by >= 1e-3.
// Tolerances as above: blocks and single steps are the same algorithm as the
// forward in other orders of summation.
BOOST_AUTO_TEST_CASE(batched_prefill_equals_forward) {
  for (const std::int64_t split : {1, 3, 4, 6, 10, 20, 37}) {
    BOOST_TEST_CONTEXT("prompt of " << split << " tokens") {
      decode_vs_forward(DType::f64, 1e-10, GcaDecoder::Prefill::batched, split);
      decode_vs_forward(DType::f32, 5e-4, GcaDecoder::Prefill::batched, split);
    }
  }
  // Chunks longer than the window (S = 8, W = 3): a chunk's tokens go in blocks of at most W, its landmark with
  // the last (blocks 3, 3, 2 + landmark: W + 1 entries at most, what the ring holds); 4 chunks of the 37 tokens.
  for (const std::int64_t split : {2, 3, 7, 8, 20, 37}) {
    BOOST_TEST_CONTEXT("S 8, W 3, prompt of " << split << " tokens") {
      decode_vs_forward(DType::f64, 1e-10, GcaDecoder::Prefill::batched, split, 8, 3);
      decode_vs_forward(DType::f64, 1e-10, GcaDecoder::Prefill::stepwise, split, 8, 3);
    }
  }
}

// ---- (c) retrieval on a hand-built case -------------------------------------------------------
// Every block is the identity except the encoder's attention, which averages
// its chunk (zero queries and keys, identity values and output): a chunk's
// landmark key leans toward the mean of its tokens. The query (the landmark's
// own embedding, the lower stack being the identity) points along u; only
// token 1 (the "needle") has a large u component, so every landmark after the
// needle's chunk must choose that chunk first. Worked through: a key is
// LN(lmk + (lmk + 3 tokens) / 4) of LayerNormed rows (norm sqrt(8)); its cosine
// with u is ~0.95 for the needle's chunk and ~0.86 for the others, so the
// needle's score leads by ~0.26 (no near-tie).
BOOST_AUTO_TEST_CASE(retrieval_chooses_the_chunk_matching_the_query) {
  GcaConfig cfg = tiny();
  cfg.topk = 2;
  cfg.n_upper = 1;
  GcaModel m(cfg, be(), DType::f64);
  const std::int64_t C = cfg.base.d_model, V = cfg.base.vocab;
  for (auto& p : m.params())
    for (std::int64_t i = 0; i < p.value.numel(); ++i) set(p.value, i, is_norm_weight(p.name) ? 1.0 : 0.0);
  dsrsq::Rng rng(4);
  const TensorView wte = m.param("wte").value;
  for (std::int64_t t = 0; t <= V; ++t)
    for (std::int64_t j = 0; j < C; ++j) {
      // u = (1, -1, 0, ...): zero mean, so LayerNorm keeps it. Other tokens live in coordinates 2.. only.
      double v = j >= 2 ? 0.5 * rng.normal() : 0.0;
      if (t == 1) v = j == 0 ? 5.0 : j == 1 ? -5.0 : 0.1 * rng.normal();
      if (t == V) v = j == 0 ? 3.0 : j == 1 ? -3.0 : 0.2 * rng.normal();
      set(wte, t * C + j, v);
    }
  for (const char* w : {"enc.0.attn.wv", "enc.0.attn.wo"}) {
    const TensorView x = m.param(w).value;
    for (std::int64_t j = 0; j < C; ++j) set(x, j * C + j, 1.0);
  }
  // 6 chunks of S = 3; the needle (token 1) in chunk 2, token 2 everywhere
  // else (so the other chunks' keys are equal and only the needle can differ).
  HostBatch hb = random_batch(1, 18, V, 11);
  for (auto& t : hb.tokens) t = 2;
  hb.tokens[7] = 1;
  m.forward(hb.logits_only());
  BOOST_TEST_REQUIRE(m.landmarks() == 6);
  for (std::int64_t c = 3; c < 6; ++c) {
    BOOST_TEST(m.selected(0, c, 0) == 2, "landmark " << c << " chose chunk " << m.selected(0, c, 0) << ", not the needle's 2");
    // Weights: softmax of the chosen clean scores.
    const double s0 = m.score(0, c, m.selected(0, c, 0)), s1 = m.score(0, c, m.selected(0, c, 1));
    const double w0 = 1.0 / (1.0 + std::exp(s1 - s0));
    BOOST_TEST(std::abs(m.weight(0, c, 0) - w0) <= 1e-12);
    BOOST_TEST(std::abs(m.weight(0, c, 1) - (1.0 - w0)) <= 1e-12);
  }
  // Strictly earlier chunks only: landmark 2 (the needle's own) cannot choose itself.
  BOOST_TEST(m.selected(0, 2, 0) != 2);
  BOOST_TEST(m.selected(0, 2, 1) != 2);
  BOOST_TEST(m.selected(0, 0, 0) == -1);  // landmark 0 sees no earlier chunk
}

// ---- (d) the single +1 ------------------------------------------------------------------------
// With zero memory keys every one of a chunk's S token slots scores 0, and so
// does the zeroed landmark slot: softmax1 gives each token slot 1 / (S + 1),
// so the retrieved chunk contributes S / (S + 1) times the mean of its values
// (two +1s would give S / (S + 2), none 1). Values = the encoder's output
// (identity value projection); k = 1 makes the weight exactly 1.
BOOST_AUTO_TEST_CASE(chunk_softmax_adds_one_exactly_once) {
  GcaConfig cfg = tiny();
  cfg.topk = 1;
  cfg.n_upper = 1;
  GcaModel m(cfg, be(), DType::f64);
  randomize(m, 21, 0.4);
  const std::int64_t C = cfg.base.d_model, S = cfg.chunk, R = S + 1;
  const TensorView wk = m.param("mem.wk").value, wv = m.param("mem.wv").value;
  for (std::int64_t i = 0; i < C * C; ++i) {
    set(wk, i, 0.0);
    set(wv, i, i % (C + 1) == 0 ? 1.0 : 0.0);
  }
  HostBatch hb = random_batch(1, 12, cfg.base.vocab, 22);
  m.forward(hb.logits_only());
  // Token chunk 2 reads landmark 1's choice: chunk 0, weight 1.
  BOOST_TEST_REQUIRE(m.selected(0, 1, 0) == 0);
  BOOST_TEST_REQUIRE(std::abs(m.weight(0, 1, 0) - 1.0) <= 1e-15);
  const TensorView E = m.encoder_output(), g = m.gca_attention(0);
  for (std::int64_t r = 0; r < R; ++r) {  // every row of chunk 2, its landmark included
    const std::int64_t row = 2 * R + r;
    for (std::int64_t j = 0; j < C; ++j) {
      double mean = 0;
      for (std::int64_t s = 0; s < S; ++s) mean += get(E, s * C + j);
      mean /= static_cast<double>(S);
      const double want = static_cast<double>(S) / static_cast<double>(S + 1) * mean;
      BOOST_TEST(std::abs(get(g, row * C + j) - want) <= 1e-13 * std::max(1.0, std::abs(want)),
                 "row " << row << " channel " << j << ": " << get(g, row * C + j) << " want " << want);
    }
  }
  for (std::int64_t row = 0; row < 2 * R; ++row)  // chunks 0 and 1 read nothing
    for (std::int64_t j = 0; j < C; ++j) BOOST_TEST(get(g, row * C + j) == 0.0);
}

// ---- (e) the window --------------------------------------------------------------------------
// With GCA's output projection zeroed the model is windowed self-attention
// only: 2 layers of W + 1 keys reach back 2W stream entries. A token whose
// stream entry is more than 2W before a query cannot change its logits (the
// same arithmetic on the same numbers: equal up to the order of block sums,
// so a tolerance of 1e-13 in f64); one exactly 2W before can.
BOOST_AUTO_TEST_CASE(tokens_older_than_the_window_are_invisible) {
  GcaConfig cfg = tiny();
  cfg.n_upper = 1;
  GcaModel m(cfg, be(), DType::f64);
  randomize(m, 31, 0.4);
  const TensorView wo = m.param("upper.0.gca.wo").value;
  for (std::int64_t i = 0; i < wo.numel(); ++i) set(wo, i, 0.0);
  const std::int64_t T = 30, V = cfg.base.vocab, W = cfg.window;
  HostBatch a = random_batch(1, T, V, 32);
  HostBatch b = a;
  const std::int64_t p0 = 4;  // stream entry 5
  b.tokens[p0] = (a.tokens[p0] + 1) % static_cast<std::int32_t>(V);
  m.forward(a.logits_only());
  std::vector<double> la(static_cast<std::size_t>(T * V));
  for (std::size_t i = 0; i < la.size(); ++i) la[i] = get(m.logits(), static_cast<std::int64_t>(i));
  m.forward(b.logits_only());
  const std::int64_t e0 = cfg.stream_index(p0);
  for (std::int64_t p = p0; p < T; ++p) {
    double d = 0;
    for (std::int64_t v = 0; v < V; ++v)
      d = std::max(d, std::abs(la[static_cast<std::size_t>(p * V + v)] - get(m.logits(), p * V + v)));
    const std::int64_t e = cfg.stream_index(p);
    if (e - e0 > 2 * W) BOOST_TEST(d <= 1e-13, "position " << p << " (stream " << e << ") sees stream " << e0 << ": " << d);
    if (e - e0 <= 2 * W) BOOST_TEST(d > 1e-6, "position " << p << " (stream " << e << ") should see stream " << e0);
  }
}

// ---- (f) resume -------------------------------------------------------------------------------
// The gca method through the registry, trained by the standard Trainer (its
// hooks draw the Gumbel noise of step s from (seed, s)): stopping after step 3
// and resuming from the checkpointed parameters, AdamW moments and step gives
// bitwise the parameters of the uninterrupted run (same process, same ops in
// the same order: deterministic by construction).
namespace {

struct TrainState {
  std::vector<float> params, m, v;
  std::int64_t steps = 0;
};

std::vector<std::vector<dsrsq::Encoded>> tiny_pools(std::int64_t V) {
  dsrsq::Rng rng(41);
  std::vector<std::vector<dsrsq::Encoded>> pools(1);
  for (int i = 0; i < 6; ++i) {
    dsrsq::Encoded e;
    const std::int64_t n = 20 + i;
    for (std::int64_t t = 0; t < n; ++t) e.tokens.push_back(static_cast<std::int32_t>(1 + rng.below(static_cast<std::uint64_t>(V - 1))));
    e.prompt_len = n - 4;
    e.query_len = 3;
    e.context_tokens = n - 8;
    pools[0].push_back(e);
  }
  return pools;
}

}  // namespace

BOOST_AUTO_TEST_CASE(resumed_training_gives_the_same_parameters) {
  namespace m = dsrsq::methods;
  dsrsq::ModelConfig mc;
  mc.vocab = 20;
  mc.d_model = 16;
  mc.n_heads = 2;
  mc.n_layers = 2;
  mc.d_ff = 32;
  mc.max_pos = 64;
  const m::MethodInfo& info = m::find_method("gca");
  BOOST_TEST_REQUIRE(info.own_architecture);
  auto knobs = info.knobs();
  {
    boost::program_options::options_description d;
    knobs->describe(d);
    const char* argv[] = {"x", "--gca_chunk", "3", "--gca_window", "5", "--gca_topk", "2"};
    boost::program_options::variables_map vm;
    boost::program_options::store(boost::program_options::parse_command_line(7, argv, d), vm);
    boost::program_options::notify(vm);
  }
  const auto pools = tiny_pools(mc.vocab);
  const std::vector<dsrsq::Encoded> val;
  dsrsq::TrainConfig tc;
  tc.steps = 6;
  tc.batch_size = 2;
  tc.warmup = 2;
  tc.lr = 1e-2;
  tc.curriculum = 0;
  tc.lm_weight = 0.1;
  tc.val_every = 0;
  tc.log_every = 1000;
  tc.seed = 5;
  dsrsq::AdamWConfig ac;
  ac.lr = tc.lr;
  ac.weight_decay = 0.01;
  ac.clip_norm = 1.0;
  auto run = [&](std::int64_t start, const TrainState* from, TrainState* at3) {
    dsrsq::Transformer backbone(mc, be());
    m::MethodContext ctx{backbone, be(), knobs.get(), ac, 9};
    auto method = info.make(ctx);
    dsrsq::TrainableModel& tm = *method->own_model();
    dsrsq::AdamW adam(tm.params(), tm.flat_params(), ac, be());
    if (from) {
      std::memcpy(tm.flat_params().data, from->params.data(), from->params.size() * sizeof(float));
      std::memcpy(adam.m().data, from->m.data(), from->m.size() * sizeof(float));
      std::memcpy(adam.v().data, from->v.data(), from->v.size() * sizeof(float));
      adam.set_steps(from->steps);
    }
    dsrsq::MethodHooks hooks;
    m::TrainEnv env;
    env.seed = tc.seed;
    env.pad_id = 0;
    method->training()->attach(hooks, env);
    dsrsq::Trainer trainer(tm, adam, tc, pools, val, 0, {}, hooks);
    dsrsq::TrainCallbacks cb;
    cb.checkpoint_every = 3;
    cb.on_checkpoint = [&](std::int64_t step) {
      if (step != 3 || !at3) return;
      const float* p = tm.flat_params().ptr<float>();
      at3->params.assign(p, p + tm.flat_params().numel());
      at3->m.assign(adam.m().ptr<float>(), adam.m().ptr<float>() + adam.m().numel());
      at3->v.assign(adam.v().ptr<float>(), adam.v().ptr<float>() + adam.v().numel());
      at3->steps = adam.steps();
    };
    BOOST_TEST(trainer.run(start, cb) == 6);
    const float* p = tm.flat_params().ptr<float>();
    return std::vector<float>(p, p + tm.flat_params().numel());
  };
  TrainState mid;
  const std::vector<float> straight = run(0, nullptr, &mid);
  BOOST_TEST_REQUIRE(mid.steps == 3);
  BOOST_TEST(straight != mid.params, "training did not move the parameters");
  const std::vector<float> resumed = run(3, &mid, nullptr);
  BOOST_TEST(std::memcmp(straight.data(), resumed.data(), straight.size() * sizeof(float)) == 0,
             "resumed run differs from the uninterrupted one");
}

// ---- (g) starting from a standard model ----------------------------------------------------
// Before the first landmark (T < S) and with the window covering the sequence
// (W + 1 >= T), the stream is the token sequence, every self-attention sees
// what the standard model's causal attention sees, and GCA reads no chunk
// (its output is 0 whatever Wo is): the logits must be the standard model's.
// Both run in f32 with the same ops in another blocking (windowed attention in
// blocks of W + 1, merged by log-sum-exp), so they differ by f32 rounding:
// ~1e-7 relative per op, a few hundred ops deep, on logits of size ~1 with
// weights of sd 0.3: 1e-4 absolute is ~10x that; a wrongly mapped tensor
// (a swapped layer, bias or norm) moves logits by >= 1e-2.
BOOST_AUTO_TEST_CASE(started_from_a_standard_model_gives_its_logits_before_the_first_landmark) {
  GcaConfig cfg = tiny();
  cfg.chunk = 8;
  cfg.window = 8;
  cfg.base.tied_embedding = true;
  dsrsq::ModelConfig mc = cfg.base;
  mc.n_layers = cfg.n_lower + cfg.n_upper;
  dsrsq::Transformer std_model(mc, be());
  dsrsq::Rng rng(21);
  for (auto& p : std_model.params())
    for (std::int64_t i = 0; i < p.value.numel(); ++i)
      set(p.value, i, is_norm_weight(p.name) ? 1.0 + 0.2 * rng.normal() : 0.3 * rng.normal());
  GcaModel m(cfg, be(), DType::f32);
  randomize(m, 4, 0.3);
  std::vector<float> before(static_cast<std::size_t>(m.flat_params().numel()));
  for (std::size_t i = 0; i < before.size(); ++i) before[i] = m.flat_params().ptr<float>()[i];
  m.init_from_standard(std_model);

  // What GCA keeps of its own, and what it took.
  const std::int64_t C = cfg.base.d_model, V = cfg.base.vocab;
  std::int64_t off = 0;
  for (auto& p : m.params()) {
    const std::int64_t n = p.value.numel();
    const bool own = p.name.rfind("enc.", 0) == 0 || p.name.rfind("mem.", 0) == 0 || p.name.rfind("lmk_norm.", 0) == 0 ||
                     p.name.find(".gca.ln.") != std::string::npos || p.name.find(".gca.wq") != std::string::npos;
    if (p.name.find(".gca.wo") != std::string::npos) {
      for (std::int64_t i = 0; i < n; ++i) BOOST_TEST_REQUIRE(get(p.value, i) == 0.0, p.name << " is not zero");
    } else if (own) {
      for (std::int64_t i = 0; i < n; ++i)
        BOOST_TEST_REQUIRE(get(p.value, i) == before[static_cast<std::size_t>(off + i)], p.name << " changed");
    } else if (p.name == "wte") {
      for (std::int64_t i = 0; i < V * C; ++i)
        BOOST_TEST_REQUIRE(get(p.value, i) == get(std_model.param("wte").value, i), "wte[" << i << "]");
      for (std::int64_t i = V * C; i < n; ++i)
        BOOST_TEST_REQUIRE(get(p.value, i) == before[static_cast<std::size_t>(off + i)], "the landmark row changed");
    }
    off += n;
  }
  const std::string l1 = "h." + std::to_string(cfg.n_lower) + ".mlp.wfc";
  for (std::int64_t i = 0; i < m.param("upper.0.mlp.wfc").value.numel(); ++i)
    BOOST_TEST_REQUIRE(get(m.param("upper.0.mlp.wfc").value, i) == get(std_model.param(l1).value, i));

  // The same function before the first landmark.
  const std::int64_t T = cfg.chunk - 1;
  HostBatch hb = random_batch(2, T, V, 13);
  m.forward(hb.logits_only());
  std_model.forward(hb.logits_only());
  double maxdiff = 0, maxabs = 0;
  for (std::int64_t i = 0; i < hb.B * T * V; ++i) {
    maxdiff = std::max(maxdiff, std::abs(get(m.logits(), i) - get(std_model.logits(), i)));
    maxabs = std::max(maxabs, std::abs(get(std_model.logits(), i)));
  }
  BOOST_TEST(maxabs > 0.1, "logits too small for the comparison to mean anything");
  BOOST_TEST(maxdiff <= 1e-4, "GCA started from the standard model differs from it by " << maxdiff);

  // Another shape is refused with the field named.
  GcaConfig wide = cfg;
  wide.base.d_ff = cfg.base.d_ff + 4;
  GcaModel other(wide, be(), DType::f32);
  BOOST_CHECK_EXCEPTION(other.init_from_standard(std_model), dsrsq::Error, [](const dsrsq::Error& e) {
    return std::string(e.what()).find("d_ff") != std::string::npos;
  });
}
