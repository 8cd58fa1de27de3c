// Level 1 unit tests (STYLE.md 8.6): core types (Shape, TensorView, Arena, Rng,
// Handle), ModelConfig validation, and the error messages at op boundaries:
// every bad input throws dsrsq::Error whose message names the op, the argument
// and both shapes (or the offending value and its limit).
#define BOOST_TEST_MODULE dsrsq_core
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "core/arena.hpp"
#include "core/error.hpp"
#include "core/handle.hpp"
#include "core/rng.hpp"
#include "core/tensor.hpp"
#include "model/config.hpp"
#include "model/transformer.hpp"
#include "../common/errors.hpp"

using dsrsq::Shape;
using dsrsq::TensorView;

namespace {

using ref::error_of;

// Every needle occurs in the message.
void expect_mentions(const std::string& msg, std::initializer_list<const char*> needles) {
  for (const char* n : needles) BOOST_TEST(msg.find(n) != std::string::npos, "message '" << msg << "' lacks '" << n << "'");
}

dsrsq::Backend& be() { return dsrsq::cpu_backend(); }

}  // namespace

// ---- Shape and TensorView ----------------------------------------------------------
BOOST_AUTO_TEST_CASE(shape_basics) {
  const Shape s{4, 1024, 256};
  BOOST_TEST(s.rank == 3);
  BOOST_TEST(s.numel() == 4 * 1024 * 256);
  BOOST_TEST(s.str() == "(4, 1024, 256)");
  BOOST_TEST(Shape{}.numel() == 1);  // a scalar
  BOOST_TEST(Shape{}.str() == "()");
  BOOST_TEST((Shape{3, 0}.numel() == 0));
  BOOST_TEST((Shape{2, 3} == Shape{2, 3}));
  BOOST_TEST(!(Shape{2, 3} == Shape{3, 2}));
  BOOST_TEST(!(Shape{6} == Shape{6, 1}));  // rank matters
  BOOST_CHECK_THROW((Shape{1, 2, 3, 4, 5}), dsrsq::Error);
  expect_mentions(error_of([] { Shape{2, -1}; }), {"negative", "-1"});
}

BOOST_AUTO_TEST_CASE(tensor_view_reshape_rows_str) {
  std::vector<float> buf(24);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i);
  TensorView t(buf.data(), Shape{4, 6});
  BOOST_TEST(t.str() == "f32(4, 6)");
  BOOST_TEST(t.bytes() == 24u * 4u);
  BOOST_TEST(TensorView(static_cast<double*>(nullptr), Shape{2}).str() == "f64(2)");

  TensorView r = t.reshaped(Shape{2, 3, 4});
  BOOST_TEST(r.data == t.data);
  BOOST_TEST(r.shape.str() == "(2, 3, 4)");
  expect_mentions(error_of([&] { t.reshaped(Shape{5, 5}); }), {"(4, 6)", "(5, 5)"});

  TensorView rows = t.rows(1, 2);
  BOOST_TEST(rows.shape.str() == "(2, 6)");
  BOOST_TEST(rows.ptr<float>()[0] == 6.0f);  // starts at row 1
  BOOST_TEST(rows.ptr<float>()[11] == 17.0f);
  TensorView r3 = r.rows(1, 1);  // rows of a 3-D view are (3, 4) slabs
  BOOST_TEST(r3.ptr<float>()[0] == 12.0f);
  BOOST_TEST(t.rows(4, 0).numel() == 0);
  expect_mentions(error_of([&] { t.rows(3, 2); }), {"[3, 5)", "(4, 6)"});
  BOOST_CHECK_THROW(t.rows(-1, 1), dsrsq::Error);

  BOOST_CHECK_THROW(t.ptr<double>(), dsrsq::Error);  // dtype is checked on access
  expect_mentions(error_of([&] { t.ptr<std::int32_t>(); }), {"f32", "i32"});
}

// ---- Arena -------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(arena_alignment_and_peak) {
  dsrsq::Arena a("test", 1 << 16);
  std::vector<void*> ptrs;
  for (std::size_t n : {1u, 3u, 63u, 64u, 65u, 1000u, 4097u}) {
    void* p = a.allocate_bytes(n);
    BOOST_TEST(reinterpret_cast<std::uintptr_t>(p) % 64 == 0u, "allocation of " << n << " bytes not 64-byte aligned");
    std::memset(p, 0xAB, n);  // the whole range is usable
    ptrs.push_back(p);
  }
  // Disjoint: each block starts at or after the previous one's end.
  for (std::size_t i = 1; i < ptrs.size(); ++i) BOOST_TEST(ptrs[i] > ptrs[i - 1]);
  const std::size_t used = a.used_bytes();
  BOOST_TEST(used == std::size_t(64 + 64 + 64 + 64 + 128 + 1024 + 4160));
  BOOST_TEST(a.peak_bytes() == used);

  {
    dsrsq::ArenaScope scope(a);
    TensorView z = a.zeros(Shape{100, 3}, dsrsq::DType::f64);
    for (std::int64_t i = 0; i < z.numel(); ++i) BOOST_TEST_REQUIRE(z.ptr<double>()[i] == 0.0);
    BOOST_TEST(a.used_bytes() == used + 2432);  // 2400 rounded up to 64
  }
  BOOST_TEST(a.used_bytes() == used);          // the scope released its scratch
  BOOST_TEST(a.peak_bytes() == used + 2432);   // the high-water mark remembers it
  a.reset_peak();
  BOOST_TEST(a.peak_bytes() == used);

  // Rewind hands out the same memory again.
  const dsrsq::Arena::Mark m = a.mark();
  void* p1 = a.allocate_bytes(100);
  a.rewind(m);
  void* p2 = a.allocate_bytes(100);
  BOOST_TEST(p1 == p2);
  a.reset();
  BOOST_TEST(a.used_bytes() == 0u);
  BOOST_TEST(a.allocate_bytes(1) == ptrs[0]);
}

BOOST_AUTO_TEST_CASE(arena_growth_across_chunks) {
  dsrsq::Arena a("grow", 1024);
  auto* p0 = static_cast<unsigned char*>(a.allocate_bytes(600));
  std::memset(p0, 7, 600);
  auto* p1 = static_cast<unsigned char*>(a.allocate_bytes(600));  // does not fit: a second chunk
  BOOST_TEST(a.reserved_bytes() == 2048u);
  BOOST_TEST(reinterpret_cast<std::uintptr_t>(p1) % 64 == 0u);
  std::memset(p1, 9, 600);
  BOOST_TEST(p0[599] == 7);  // the first chunk was not moved or clobbered
  // The unusable tail of chunk 0 counts as used, so the peak never understates.
  BOOST_TEST(a.used_bytes() == 1024u + 640u);
  auto* big = a.allocate_bytes(5000);  // larger than a chunk: its own chunk
  BOOST_TEST(a.reserved_bytes() == 2048u + 5056u);
  std::memset(big, 1, 5000);
  const std::size_t peak = a.peak_bytes();
  BOOST_TEST(peak >= 1024u + 640u + 5056u);

  // After a reset the chunks are reused, not reallocated.
  a.reset();
  BOOST_TEST(a.allocate_bytes(600) == p0);
  BOOST_TEST(a.allocate_bytes(600) == p1);
  BOOST_TEST(a.reserved_bytes() == 2048u + 5056u);
  BOOST_TEST(a.peak_bytes() == peak);

  // A mark inside the second chunk survives a detour through later chunks.
  const auto m = a.mark();
  a.allocate_bytes(300);
  a.allocate_bytes(3000);
  a.rewind(m);
  BOOST_TEST(a.used_bytes() == 1024u + 640u);
  BOOST_CHECK_THROW(a.rewind(dsrsq::Arena::Mark{0, 0, 1u << 30}), dsrsq::Error);  // a later mark

  // Moving an arena moves ownership of its chunks.
  dsrsq::Arena b(std::move(a));
  BOOST_TEST(b.reserved_bytes() == 2048u + 5056u);
  BOOST_TEST(a.reserved_bytes() == 0u);  // NOLINT(bugprone-use-after-move): moved-from state is specified
}

// ---- Rng -----------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(rng_determinism_and_streams) {
  dsrsq::Rng a(42, 3), b(42, 3);
  for (int i = 0; i < 1000; ++i) BOOST_TEST_REQUIRE(a.next_u64() == b.next_u64());
  // reseed restarts the sequence, including the cached Box-Muller spare.
  dsrsq::Rng c(7);
  const double n0 = c.normal();
  c.reseed(7);
  BOOST_TEST(c.normal() == n0);
  c.normal();  // leaves a spare behind
  c.reseed(7);
  BOOST_TEST(c.normal() == n0);

  // Different streams of one seed, and different seeds, give unrelated sequences.
  const int n = 100000;
  dsrsq::Rng s0(42, 0), s1(42, 1), t0(43, 0);
  std::set<std::uint64_t> seen;
  double sxy = 0, sx = 0, sy = 0, sxx = 0, syy = 0;
  for (int i = 0; i < n; ++i) {
    const double x = s0.uniform(), y = s1.uniform();
    BOOST_TEST_REQUIRE((x >= 0.0 && x < 1.0));
    sx += x, sy += y, sxy += x * y, sxx += x * x, syy += y * y;
    if (i < 1000) {
      seen.insert(s0.next_u64());
      seen.insert(t0.next_u64());
    }
  }
  BOOST_TEST(seen.size() == 2000u, "streams or seeds share outputs");
  const double corr = (sxy / n - sx / n * sy / n) / std::sqrt((sxx / n - sx / n * sx / n) * (syy / n - sy / n * sy / n));
  BOOST_TEST(std::abs(corr) < 0.02, "streams 0 and 1 correlate: " << corr);  // ~3e-3 expected for independent streams
  BOOST_TEST(std::abs(sx / n - 0.5) < 0.01);

  // normal(): mean 0 and variance 1 (standard errors 0.003 and 0.0045 at n = 1e5).
  dsrsq::Rng g(5);
  double m = 0, v = 0;
  for (int i = 0; i < n; ++i) {
    const double z = g.normal();
    m += z;
    v += z * z;
  }
  m /= n;
  v = v / n - m * m;
  BOOST_TEST(std::abs(m) < 0.02);
  BOOST_TEST(std::abs(v - 1.0) < 0.03);
  for (int i = 0; i < 1000; ++i) BOOST_TEST_REQUIRE(g.below(7) < 7u);
  BOOST_TEST(g.below(0) == 0u);
}

// ---- Handle --------------------------------------------------------------------------
namespace {
struct CountingTraits {
  using type = int;
  static constexpr int null = -1;
  static inline std::vector<int> destroyed;
  static void destroy(int h) { destroyed.push_back(h); }
};
using H = dsrsq::Handle<CountingTraits>;
}  // namespace

BOOST_AUTO_TEST_CASE(handle_move_semantics) {
  auto& d = CountingTraits::destroyed;
  d.clear();
  {
    H empty;
    BOOST_TEST(!empty);
    BOOST_TEST(empty.get() == -1);
  }
  BOOST_TEST(d.empty(), "a null handle must not be destroyed");
  {
    H a(1);
    BOOST_TEST(static_cast<bool>(a));
    H b(std::move(a));  // move construction transfers, the source becomes null
    BOOST_TEST(!a);     // NOLINT(bugprone-use-after-move)
    BOOST_TEST(b.get() == 1);
    BOOST_TEST(d.empty());
    H c(2);
    c = std::move(b);  // move assignment destroys the target's old handle once
    BOOST_TEST((d == std::vector<int>{2}));
    BOOST_TEST(c.get() == 1);
    BOOST_TEST(!b);  // NOLINT(bugprone-use-after-move)
    auto& self = c;
    c = std::move(self);  // self-move: no effect
    BOOST_TEST(c.get() == 1);
    BOOST_TEST((d == std::vector<int>{2}));
    c.reset(3);  // reset destroys the old one
    BOOST_TEST((d == std::vector<int>{2, 1}));
    H e(4);
    BOOST_TEST(e.release() == 4);  // release gives up ownership: never destroyed
    BOOST_TEST(!e);
  }
  BOOST_TEST((d == std::vector<int>{2, 1, 3}), "each handle destroyed exactly once");
}

// ---- ModelConfig::validate ----------------------------------------------------------
BOOST_AUTO_TEST_CASE(model_config_validate) {
  dsrsq::ModelConfig ok;
  BOOST_CHECK_NO_THROW(ok.validate());
  BOOST_TEST(ok.head_size() == 32);

  auto bad = [](auto edit) {
    dsrsq::ModelConfig c;
    edit(c);
    return error_of([&] { c.validate(); });
  };
  expect_mentions(bad([](auto& c) { c.n_heads = 5; }), {"n_heads=5", "d_model=128"});
  expect_mentions(bad([](auto& c) { c.vocab = 0; }), {"vocab", "0"});
  expect_mentions(bad([](auto& c) { c.d_model = -8; }), {"d_model", "-8"});
  expect_mentions(bad([](auto& c) { c.n_heads = 0; }), {"n_heads", "> 0"});
  expect_mentions(bad([](auto& c) { c.n_layers = 0; }), {"n_layers"});
  expect_mentions(bad([](auto& c) { c.d_ff = -1; }), {"d_ff", "-1"});
  expect_mentions(bad([](auto& c) { c.max_pos = 0; }), {"max_pos"});
  // d_model 12 / 4 heads = head size 3: RoPE needs pairs.
  expect_mentions(bad([](auto& c) { c.d_model = 12, c.n_heads = 4; }), {"head size", "3", "even"});
  expect_mentions(bad([](auto& c) { c.max_pos = std::int64_t{1} << 30; }), {"max_pos"});
  // The model refuses an invalid config at construction.
  dsrsq::ModelConfig c;
  c.n_heads = 3;
  BOOST_CHECK_THROW(dsrsq::Transformer(c, be()), dsrsq::Error);
}

// ---- op-boundary errors ----------------------------------------------------------------
BOOST_AUTO_TEST_CASE(op_boundary_shape_errors) {
  std::vector<float> buf(4096, 0.f);
  float* p = buf.data();
  auto f32 = [&](Shape s) { return TensorView(p, s); };

  // linear_fwd: weight (5, 4) against x (3, 7).
  expect_mentions(error_of([&] { be().linear_fwd({f32(Shape{3, 7}), f32(Shape{5, 4}), {}, f32(Shape{3, 5})}); }),
                  {"linear_fwd", "weight", "(5, 4)", "x", "(3, 7)"});
  // linear_fwd: out of the wrong shape.
  expect_mentions(error_of([&] { be().linear_fwd({f32(Shape{3, 7}), f32(Shape{5, 7}), {}, f32(Shape{3, 4})}); }),
                  {"linear_fwd", "'out'", "(3, 4)", "(3, 5)"});
  // linear_fwd: bias of the wrong length.
  expect_mentions(error_of([&] { be().linear_fwd({f32(Shape{3, 7}), f32(Shape{5, 7}), f32(Shape{4}), f32(Shape{3, 5})}); }),
                  {"linear_fwd", "'bias'", "(4)", "(5)"});

  // attention_fwd: k (1, 9, 2, 4) where (1, 9, 2, 8) is expected from q (1, 5, 2, 8).
  std::vector<std::int32_t> pos(64, 0);
  auto i32 = [&](Shape s) { return TensorView(pos.data(), s); };
  expect_mentions(error_of([&] {
                    be().attention_fwd({f32(Shape{1, 5, 2, 8}), f32(Shape{1, 9, 2, 4}), f32(Shape{1, 9, 2, 8}),
                                        f32(Shape{1, 5, 2, 8}), f32(Shape{1, 2, 5}), i32(Shape{1, 5}), i32(Shape{1, 9})});
                  }),
                  {"attention_fwd", "'k'", "(1, 9, 2, 4)", "(1, 9, 2, 8)"});
  // attention_fwd: lse laid out (B, T, NH) instead of (B, NH, T).
  expect_mentions(error_of([&] {
                    be().attention_fwd({f32(Shape{1, 5, 2, 8}), f32(Shape{1, 9, 2, 8}), f32(Shape{1, 9, 2, 8}),
                                        f32(Shape{1, 5, 2, 8}), f32(Shape{1, 5, 2}), i32(Shape{1, 5}), i32(Shape{1, 9})});
                  }),
                  {"attention_fwd", "'lse'", "(1, 5, 2)", "(1, 2, 5)"});
  // attention_bwd: dk of the wrong shape.
  expect_mentions(error_of([&] {
                    be().attention_bwd({f32(Shape{1, 5, 2, 8}), f32(Shape{1, 5, 2, 8}), f32(Shape{1, 9, 2, 8}),
                                        f32(Shape{1, 9, 2, 8}), f32(Shape{1, 5, 2, 8}), f32(Shape{1, 2, 5}),
                                        i32(Shape{1, 5}), i32(Shape{1, 9}), f32(Shape{1, 5, 2, 8}),
                                        f32(Shape{1, 5, 2, 8}), f32(Shape{1, 9, 2, 8})});
                  }),
                  {"attention_bwd", "'dk'", "(1, 5, 2, 8)", "(1, 9, 2, 8)"});
  // attention: a negative position is named with its index.
  pos[3] = -4;
  expect_mentions(error_of([&] {
                    be().attention_fwd({f32(Shape{1, 5, 2, 8}), f32(Shape{1, 9, 2, 8}), f32(Shape{1, 9, 2, 8}),
                                        f32(Shape{1, 5, 2, 8}), f32(Shape{1, 2, 5}), i32(Shape{1, 5}), i32(Shape{1, 9})});
                  }),
                  {"attention_fwd", "q_pos", "-4", "index 3"});
  pos[3] = 0;

  // layernorm_fwd: weight of length 7 for C = 8.
  expect_mentions(error_of([&] {
                    be().layernorm_fwd({f32(Shape{3, 8}), f32(Shape{7}), f32(Shape{8}), f32(Shape{3, 8}), f32(Shape{3}),
                                        f32(Shape{3})});
                  }),
                  {"layernorm_fwd", "'weight'", "(7)", "(8)"});
  // matmul_fwd: inner dims 4 vs 5.
  expect_mentions(error_of([&] { be().matmul_fwd({f32(Shape{3, 4}), f32(Shape{5, 6}), f32(Shape{3, 6}), {}}); }),
                  {"matmul_fwd", "inner dims", "(3, 4)", "(5, 6)"});
  // rope: odd head size.
  expect_mentions(error_of([&] { be().rope_fwd({f32(Shape{2, 1, 5}), i32(Shape{2})}); }), {"rope_fwd", "head size", "5"});
  // mixed dtypes: an f64 out for an f32 table.
  std::vector<double> d64(64);
  expect_mentions(error_of([&] {
                    be().embedding_fwd({i32(Shape{2}), f32(Shape{4, 3}), TensorView(d64.data(), Shape{2, 3})});
                  }),
                  {"embedding_fwd", "'out'", "f64", "f32"});
  // cross_entropy: targets of the wrong length.
  expect_mentions(error_of([&] {
                    be().cross_entropy_fwd({f32(Shape{4, 10}), i32(Shape{3}), f32(Shape{4}), f32(Shape{4})});
                  }),
                  {"cross_entropy_fwd", "'targets'", "(3)", "(4)"});
  // adamw is f32 only.
  expect_mentions(error_of([&] {
                    dsrsq::AdamWArgs a;
                    a.params = TensorView(d64.data(), Shape{8});
                    a.grads = a.m = a.v = a.params;
                    be().adamw(a);
                  }),
                  {"adamw", "params", "f64"});
}

BOOST_AUTO_TEST_CASE(token_and_position_range_errors) {
  std::vector<float> table(5 * 3), out(4 * 3);
  std::vector<std::int32_t> tok{0, 4, 9, 1};
  expect_mentions(error_of([&] {
                    be().embedding_fwd({TensorView(tok.data(), Shape{4}), TensorView(table.data(), Shape{5, 3}),
                                        TensorView(out.data(), Shape{4, 3})});
                  }),
                  {"embedding_fwd", "token id 9", "index 2", "[0, 5)"});
  // cross_entropy: a target outside the vocabulary on a row that counts.
  std::vector<float> logits(4 * 5), mask{1, 1, 1, 1}, losses(4);
  expect_mentions(error_of([&] {
                    be().cross_entropy_fwd({TensorView(logits.data(), Shape{4, 5}), TensorView(tok.data(), Shape{4}),
                                            TensorView(mask.data(), Shape{4}), TensorView(losses.data(), Shape{4})});
                  }),
                  {"cross_entropy_fwd", "target 9", "row 2", "[0, 5)"});

  // The model: token id outside vocab, and a position >= max_pos.
  dsrsq::ModelConfig cfg;
  cfg.vocab = 50;
  cfg.d_model = 16;
  cfg.n_heads = 2;
  cfg.n_layers = 1;
  cfg.d_ff = 32;
  cfg.max_pos = 64;
  dsrsq::Transformer model(cfg, be());
  std::vector<std::int32_t> t{1, 2, 50, 3}, ps{0, 1, 2, 3};
  dsrsq::Batch b{TensorView(t.data(), Shape{1, 4}), TensorView(ps.data(), Shape{1, 4}), {}, {}};
  expect_mentions(error_of([&] { model.forward(b); }), {"token id 50", "[0, 50)"});
  t[2] = 7;
  BOOST_CHECK_NO_THROW(model.forward(b));
  ps[3] = 64;
  expect_mentions(error_of([&] { model.forward(b); }), {"position 64", "max_pos=64"});
  // The same through the decode path.
  dsrsq::Arena arena("cache", 1 << 16);
  dsrsq::KVCache cache = model.new_cache(1, 8, arena);
  expect_mentions(error_of([&] { model.extend(cache, b.tokens, b.pos); }), {"position 64", "max_pos=64"});
  ps[3] = 3;
  model.extend(cache, b.tokens, b.pos);
  model.extend(cache, b.tokens, b.pos);  // 8 of 8 slots
  expect_mentions(error_of([&] { model.extend(cache, b.tokens.rows(0, 1), b.pos.rows(0, 1)); }), {"capacity 8"});
}
