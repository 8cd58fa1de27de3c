// Level 2 op cross-check (STYLE.md 8.6): every op of the CPU backend in f32
// against the naive double-precision reference in tests/common/reference.hpp,
// on odd sizes, with sentinel guard zones around every output, a NaN/Inf check
// and an NMSE threshold per op. Every case runs inside BOOST_TEST_CONTEXT with
// a name that carries all of its parameters.
//
// Default threshold, and why: an f32 result has a relative rounding error of
// about 6e-8 per operation; a dot product of length K accumulates roughly
// sqrt(K) such errors, so for K ~ 1000 the per-element relative error is ~2e-6
// in the worst case and the NMSE (a squared relative error) ~1e-12..1e-11.
// 1e-10 leaves one to two orders of margin and still catches any real bug
// (a wrong index, a missing term, a dropped tile typically gives NMSE >= 1e-4).
#define BOOST_TEST_MODULE dsrsq_ops
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "../common/reference.hpp"
#include "backend/backend.hpp"

using dsrsq::Shape;
using dsrsq::TensorView;
using ref::Guarded;
using ref::IVec;
using ref::Vec;

namespace {

constexpr double kNmse = 1e-10;  // see the file comment
const double kNaN = std::numeric_limits<double>::quiet_NaN();

dsrsq::Backend& be() { return dsrsq::cpu_backend(); }

template <class T>
TensorView tv(Guarded<T>& g, Shape s) {
  BOOST_REQUIRE_EQUAL(s.numel(), g.size());
  return TensorView(g.data(), s);
}

// Guard zones intact, no NaN/Inf, NMSE within tol.
template <class T>
void expect_close(const char* what, const Guarded<T>& got, const Vec& want, double tol = kNmse) {
  BOOST_TEST(got.intact(), what << ": guard zone overwritten");
  BOOST_TEST(ref::all_finite(got.data(), got.size()), what << ": NaN or Inf in output");
  const double e = ref::nmse(got.data(), want);
  BOOST_TEST(e <= tol, what << ": nmse=" << e << " > " << tol);
}

template <class T>
Vec round_trip(const std::vector<T>& v) {  // the f32 inputs, seen in double
  return ref::to_double(v);
}

}  // namespace

// ---- embedding ----------------------------------------------------------------
BOOST_AUTO_TEST_CASE(embedding_fwd_bwd_f32) {
  struct Case { std::int64_t N, V, C; };
  for (Case c : {Case{1, 1, 1}, Case{3, 5, 3}, Case{113, 50, 1023}, Case{1025, 7, 113}, Case{1023, 300, 64},
                 Case{64, 3, 1024}}) {
    BOOST_TEST_CONTEXT(ref::name("embedding N=", c.N, " V=", c.V, " C=", c.C)) {
      dsrsq::Rng rng(11, static_cast<std::uint64_t>(c.N * 7 + c.C));
      Guarded<std::int32_t> tok(ref::randint(c.N, rng, c.V));
      Guarded<float> table(ref::normal<float>(c.V * c.C, rng));
      Guarded<float> out(c.N * c.C, static_cast<float>(kNaN));
      be().embedding_fwd({tv(tok, Shape{c.N}), tv(table, Shape{c.V, c.C}), tv(out, Shape{c.N, c.C})});
      // A gather is a copy: exact.
      expect_close("out", out, ref::embedding(tok.to_vector(), table.to_double(), c.C), 0.0);

      // Backward accumulates (+=) onto a nonzero table; repeated tokens add up
      // in f32 (N/V ~ 150 terms at most here: NMSE ~1e-13, threshold 1e-10).
      Guarded<float> dout(ref::normal<float>(c.N * c.C, rng));
      Guarded<float> dtable(ref::normal<float>(c.V * c.C, rng));
      Vec want = dtable.to_double();
      ref::embedding_bwd(tok.to_vector(), dout.to_double(), c.C, want);
      be().embedding_bwd({tv(tok, Shape{c.N}), tv(dout, Shape{c.N, c.C}), tv(dtable, Shape{c.V, c.C})});
      expect_close("dtable", dtable, want);
    }
  }
}

// ---- rope -------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(rope_fwd_bwd_f32) {
  struct Case { std::int64_t N, NH, HS; std::int32_t max_pos; double theta; };
  for (Case c : {Case{1, 1, 2, 1, 10000.0}, Case{3, 2, 4, 5, 10000.0}, Case{113, 3, 64, 100000, 10000.0},
                 Case{1023, 2, 16, 4096, 500000.0}, Case{1025, 1, 128, 1 << 20, 10000.0}, Case{300, 4, 32, 2048, 10.0}}) {
    BOOST_TEST_CONTEXT(ref::name("rope N=", c.N, " NH=", c.NH, " HS=", c.HS, " pos<", c.max_pos, " theta=", c.theta)) {
      dsrsq::Rng rng(12, static_cast<std::uint64_t>(c.N * 3 + c.HS));
      const std::int64_t n = c.N * c.NH * c.HS;
      IVec pos = ref::randint(c.N, rng, c.max_pos);
      Guarded<std::int32_t> gpos(pos);
      const std::vector<float> x0 = ref::normal<float>(n, rng);
      // Angles are computed in double by both sides and rounded once to f32:
      // per-element error ~1e-7, NMSE ~1e-14; threshold kNmse.
      Guarded<float> x(x0);
      be().rope_fwd({tv(x, Shape{c.N, c.NH, c.HS}), tv(gpos, Shape{c.N}), c.theta});
      expect_close("rope_fwd", x, ref::rope(round_trip(x0), c.N, c.NH, c.HS, pos, c.theta));
      // Backward is the inverse rotation; applied to the forward output it gives x back.
      be().rope_bwd({tv(x, Shape{c.N, c.NH, c.HS}), tv(gpos, Shape{c.N}), c.theta});
      expect_close("rope_bwd(rope_fwd(x)) == x", x, round_trip(x0));
      Guarded<float> g(x0);
      be().rope_bwd({tv(g, Shape{c.N, c.NH, c.HS}), tv(gpos, Shape{c.N}), c.theta});
      expect_close("rope_bwd", g, ref::rope(round_trip(x0), c.N, c.NH, c.HS, pos, c.theta, true));
    }
  }
}

// ---- layernorm ----------------------------------------------------------------
BOOST_AUTO_TEST_CASE(layernorm_fwd_bwd_f32) {
  struct Case { std::int64_t N, C; double mean; };
  for (Case c : {Case{1, 1, 0.0}, Case{3, 3, 0.5}, Case{113, 1023, 3.0}, Case{7, 1024, -2.0}, Case{5, 1025, 10.0},
                 Case{40, 1025, 1.0}}) {
    BOOST_TEST_CONTEXT(ref::name("layernorm N=", c.N, " C=", c.C, " input_mean=", c.mean)) {
      dsrsq::Rng rng(13, static_cast<std::uint64_t>(c.N * 5 + c.C));
      const double eps = 1e-5;
      Guarded<float> x(ref::normal<float>(c.N * c.C, rng, 2.0, c.mean));
      Guarded<float> w(ref::normal<float>(c.C, rng, 0.5, 1.0)), b(ref::normal<float>(c.C, rng));
      Guarded<float> out(c.N * c.C, static_cast<float>(kNaN)), mean(c.N, static_cast<float>(kNaN)),
          rstd(c.N, static_cast<float>(kNaN));
      be().layernorm_fwd({tv(x, Shape{c.N, c.C}), tv(w, Shape{c.C}), tv(b, Shape{c.C}), tv(out, Shape{c.N, c.C}),
                          tv(mean, Shape{c.N}), tv(rstd, Shape{c.N}), eps});
      const ref::LayerNormOut r = ref::layernorm(x.to_double(), w.to_double(), b.to_double(), c.N, c.C, eps);
      // Statistics in f32 over C <= 1025 values, two-pass: NMSE ~1e-13.
      expect_close("out", out, r.out);
      expect_close("mean", mean, r.mean);
      expect_close("rstd", rstd, r.rstd);

      // Backward: all three gradients accumulate (+=) onto nonzero buffers.
      Guarded<float> dout(ref::normal<float>(c.N * c.C, rng));
      Guarded<float> dx(ref::normal<float>(c.N * c.C, rng)), dw(ref::normal<float>(c.C, rng)),
          db(ref::normal<float>(c.C, rng));
      Vec wdx = dx.to_double(), wdw = dw.to_double(), wdb = db.to_double();
      ref::layernorm_bwd(dout.to_double(), x.to_double(), w.to_double(), c.N, c.C, eps, wdx, wdw, wdb);
      be().layernorm_bwd({tv(dout, Shape{c.N, c.C}), tv(x, Shape{c.N, c.C}), tv(w, Shape{c.C}), tv(mean, Shape{c.N}),
                          tv(rstd, Shape{c.N}), tv(dx, Shape{c.N, c.C}), tv(dw, Shape{c.C}), tv(db, Shape{c.C})});
      if (c.C > 1) {
        expect_close("dx", dx, wdx);
      } else {
        // C = 1: the row is constant after normalisation, so dx's increment is
        // exactly 0 in theory; the kernel returns the rounding residual of
        // dn - mean(dn) (FMA-contracted) times rstd = 1/sqrt(eps) ~ 316. Judge it
        // against that natural scale, rstd * |dout * w|, instead of against 0.
        const Vec d0 = dout.to_double(), w0 = w.to_double();
        for (std::int64_t n = 0; n < c.N; ++n) {
          const double scale = r.rstd[static_cast<std::size_t>(n)] * std::abs(d0[static_cast<std::size_t>(n)] * w0[0]);
          BOOST_TEST(std::abs(dx[n] - wdx[static_cast<std::size_t>(n)]) <= 1e-6 * scale + 1e-6,
                     "dx[" << n << "] = " << dx[n] << ", want " << wdx[static_cast<std::size_t>(n)]);
        }
        BOOST_TEST(dx.intact());
      }
      expect_close("dweight", dw, wdw);
      expect_close("dbias", db, wdb);
    }
  }
}

// ---- matmul -------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(matmul_fwd_bwd_f32) {
  struct Size { std::int64_t batch, M, N, K; };
  struct Scal { double alpha, beta; bool bias; };
  int idx = 0;
  for (Size s : {Size{0, 1, 1, 1}, Size{0, 3, 113, 1023}, Size{0, 1023, 3, 113}, Size{0, 113, 1025, 3},
                 Size{3, 113, 3, 1024}, Size{2, 1, 1024, 113}, Size{4, 7, 5, 3}})
    for (int t = 0; t < 4; ++t)
      for (Scal sc : {Scal{1.0, 0.0, false}, Scal{0.75, 0.5, true}, Scal{-1.5, 0.0, true}}) {
        const bool ta = t & 1, tb = t & 2;
        const bool batched = s.batch > 0;
        const std::int64_t nb = batched ? s.batch : 1;
        BOOST_TEST_CONTEXT(ref::name("matmul batch=", s.batch, " M=", s.M, " N=", s.N, " K=", s.K, " ta=", ta,
                                     " tb=", tb, " alpha=", sc.alpha, " beta=", sc.beta, " bias=", sc.bias)) {
          dsrsq::Rng rng(14, static_cast<std::uint64_t>(idx++));
          auto shp = [&](std::int64_t r, std::int64_t cc) { return batched ? Shape{nb, r, cc} : Shape{r, cc}; };
          Guarded<float> a(ref::normal<float>(nb * s.M * s.K, rng)), b(ref::normal<float>(nb * s.K * s.N, rng));
          Guarded<float> bias(ref::normal<float>(s.N, rng));
          // beta = 0 means c is not read ("c ="): pre-fill it with NaN to prove it.
          Guarded<float> c(sc.beta != 0 ? ref::normal<float>(nb * s.M * s.N, rng)
                                        : std::vector<float>(static_cast<std::size_t>(nb * s.M * s.N), static_cast<float>(kNaN)));
          Vec want = c.to_double();
          const Vec bd = bias.to_double();
          ref::matmul(a.to_double(), b.to_double(), want, sc.bias ? &bd : nullptr, nb, s.M, s.N, s.K, ta, tb, sc.alpha,
                      sc.beta);
          dsrsq::MatmulArgs args{tv(a, ta ? shp(s.K, s.M) : shp(s.M, s.K)), tv(b, tb ? shp(s.N, s.K) : shp(s.K, s.N)),
                                 tv(c, shp(s.M, s.N)), sc.bias ? tv(bias, Shape{s.N}) : TensorView{}, ta, tb, sc.alpha,
                                 sc.beta};
          be().matmul_fwd(args);
          expect_close("c", c, want);

          // Backward: da +=, db +=, dbias += onto nonzero buffers.
          Guarded<float> dc(ref::normal<float>(nb * s.M * s.N, rng));
          Guarded<float> da(ref::normal<float>(nb * s.M * s.K, rng)), db(ref::normal<float>(nb * s.K * s.N, rng)),
              dbias(ref::normal<float>(s.N, rng));
          Vec wda = da.to_double(), wdb = db.to_double(), wdbias = dbias.to_double();
          {
            // d op(a) = alpha dc op(b)^T, d op(b) = alpha op(a)^T dc; transpose back when stored transposed.
            const Vec A = a.to_double(), B = b.to_double(), DC = dc.to_double();
            for (std::int64_t p = 0; p < nb; ++p) {
              for (std::int64_t i = 0; i < s.M; ++i)
                for (std::int64_t k = 0; k < s.K; ++k) {
                  double g = 0;
                  for (std::int64_t j = 0; j < s.N; ++j)
                    g += DC[static_cast<std::size_t>(p * s.M * s.N + i * s.N + j)] *
                         (tb ? B[static_cast<std::size_t>(p * s.K * s.N + j * s.K + k)]
                             : B[static_cast<std::size_t>(p * s.K * s.N + k * s.N + j)]);
                  wda[static_cast<std::size_t>(p * s.M * s.K + (ta ? k * s.M + i : i * s.K + k))] += sc.alpha * g;
                }
              for (std::int64_t k = 0; k < s.K; ++k)
                for (std::int64_t j = 0; j < s.N; ++j) {
                  double g = 0;
                  for (std::int64_t i = 0; i < s.M; ++i)
                    g += (ta ? A[static_cast<std::size_t>(p * s.M * s.K + k * s.M + i)]
                             : A[static_cast<std::size_t>(p * s.M * s.K + i * s.K + k)]) *
                         DC[static_cast<std::size_t>(p * s.M * s.N + i * s.N + j)];
                  wdb[static_cast<std::size_t>(p * s.K * s.N + (tb ? j * s.K + k : k * s.N + j))] += sc.alpha * g;
                }
              for (std::int64_t i = 0; i < s.M; ++i)
                for (std::int64_t j = 0; j < s.N; ++j)
                  wdbias[static_cast<std::size_t>(j)] += DC[static_cast<std::size_t>(p * s.M * s.N + i * s.N + j)];
            }
          }
          be().matmul_bwd({tv(dc, shp(s.M, s.N)), args.a, args.b, tv(da, args.a.shape), tv(db, args.b.shape),
                           tv(dbias, Shape{s.N}), ta, tb, sc.alpha});
          expect_close("da", da, wda);
          expect_close("db", db, wdb);
          expect_close("dbias", dbias, wdbias);
        }
      }
}

// ---- linear -------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(linear_fwd_bwd_f32) {
  struct Case { std::int64_t N, C, OC; bool bias, dx_acc; };
  for (Case c : {Case{1, 1, 1, true, false}, Case{3, 113, 3, false, true}, Case{113, 1023, 3, true, true},
                 Case{1025, 3, 113, true, false}, Case{64, 1024, 113, true, true}, Case{1023, 64, 1, false, false}}) {
    BOOST_TEST_CONTEXT(ref::name("linear N=", c.N, " C=", c.C, " OC=", c.OC, " bias=", c.bias, " dx_accumulate=", c.dx_acc)) {
      dsrsq::Rng rng(15, static_cast<std::uint64_t>(c.N + c.C * 3 + c.OC * 7));
      Guarded<float> x(ref::normal<float>(c.N * c.C, rng)), w(ref::normal<float>(c.OC * c.C, rng)),
          bias(ref::normal<float>(c.OC, rng));
      Guarded<float> out(c.N * c.OC, static_cast<float>(kNaN));
      const Vec bd = bias.to_double();
      be().linear_fwd({tv(x, Shape{c.N, c.C}), tv(w, Shape{c.OC, c.C}), c.bias ? tv(bias, Shape{c.OC}) : TensorView{},
                       tv(out, Shape{c.N, c.OC})});
      expect_close("out", out, ref::linear(x.to_double(), w.to_double(), c.bias ? &bd : nullptr, c.N, c.C, c.OC));

      // dx = (or += with dx_accumulate) dout @ w; dweight += dout^T x; dbias += sum of rows.
      Guarded<float> dout(ref::normal<float>(c.N * c.OC, rng));
      Guarded<float> dx(c.dx_acc ? ref::normal<float>(c.N * c.C, rng)
                                 : std::vector<float>(static_cast<std::size_t>(c.N * c.C), static_cast<float>(kNaN)));
      Guarded<float> dw(ref::normal<float>(c.OC * c.C, rng)), db(ref::normal<float>(c.OC, rng));
      Vec wdx = c.dx_acc ? dx.to_double() : Vec(static_cast<std::size_t>(c.N * c.C), 0.0);
      Vec wdw = dw.to_double(), wdb = db.to_double();
      const Vec db0 = db.to_double();
      const Vec D = dout.to_double(), X = x.to_double(), W = w.to_double();
      ref::matmul(D, W, wdx, nullptr, 1, c.N, c.C, c.OC, false, false, 1.0, 1.0);
      ref::matmul(D, X, wdw, nullptr, 1, c.OC, c.C, c.N, true, false, 1.0, 1.0);
      for (std::int64_t n = 0; n < c.N; ++n)
        for (std::int64_t o = 0; o < c.OC; ++o) wdb[static_cast<std::size_t>(o)] += D[static_cast<std::size_t>(n * c.OC + o)];
      be().linear_bwd({tv(dout, Shape{c.N, c.OC}), tv(x, Shape{c.N, c.C}), tv(w, Shape{c.OC, c.C}),
                       tv(dx, Shape{c.N, c.C}), tv(dw, Shape{c.OC, c.C}), c.bias ? tv(db, Shape{c.OC}) : TensorView{},
                       c.dx_acc});
      expect_close("dx", dx, wdx);
      expect_close("dweight", dw, wdw);
      if (c.bias) expect_close("dbias", db, wdb);
      else BOOST_TEST(db.to_double() == db0, "dbias was not requested but changed");
    }
  }
}

// ---- gelu -----------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(gelu_fwd_bwd_f32) {
  for (std::int64_t n : {1, 3, 113, 1023, 1024, 1025, 40000}) {
    BOOST_TEST_CONTEXT(ref::name("gelu n=", n)) {
      dsrsq::Rng rng(16, static_cast<std::uint64_t>(n));
      std::vector<float> xv = ref::normal<float>(n, rng, 3.0);
      // Tails where tanh saturates (the f32 kernel clamps its argument).
      const float extremes[] = {-100.f, -20.f, -9.f, 0.f, 9.f, 20.f, 100.f};
      for (std::size_t i = 0; i < std::size(extremes) && i < xv.size(); ++i) xv[xv.size() - 1 - i] = extremes[i];
      Guarded<float> x(xv), out(n, static_cast<float>(kNaN));
      be().gelu_fwd({tv(x, Shape{n}), tv(out, Shape{n})});
      // tanh through an exp with ~1e-7 relative error: NMSE ~1e-14, threshold kNmse.
      expect_close("out", out, ref::gelu(x.to_double()));
      // Elementwise as well: absolute error below 1e-6 * max(1, |x|) everywhere (the tails included).
      for (std::int64_t i = 0; i < n; ++i)
        BOOST_TEST(std::abs(out[i] - ref::gelu(x[i])) <= 1e-6 * std::max(1.0, std::abs(static_cast<double>(x[i]))),
                   "gelu(" << x[i] << ") = " << out[i] << ", want " << ref::gelu(x[i]));
      // Backward overwrites dx: pre-filled with NaN.
      Guarded<float> dout(ref::normal<float>(n, rng)), dx(n, static_cast<float>(kNaN));
      Vec want(static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n; ++i) want[static_cast<std::size_t>(i)] = dout[i] * ref::gelu_grad(x[i]);
      be().gelu_bwd({tv(dout, Shape{n}), tv(x, Shape{n}), tv(dx, Shape{n})});
      expect_close("dx", dx, want);
    }
  }
}

// ---- attention ------------------------------------------------------------------
namespace {

enum class PosKind { contiguous_end, shuffled, late_keys, per_batch };

struct AttnCase {
  std::int64_t B, T, S, NH, HS;
  bool causal;
  PosKind kind;
  double scale;
  bool check_bwd;
};

const char* kind_name(PosKind k) {
  switch (k) {
    case PosKind::contiguous_end: return "queries_at_end";
    case PosKind::shuffled: return "shuffled_keys";
    case PosKind::late_keys: return "late_keys(rows_without_keys)";
    case PosKind::per_batch: return "per_batch_positions";
  }
  return "?";
}

// Positions per batch: keys and queries for the case's kind.
void make_positions(const AttnCase& c, dsrsq::Rng& rng, IVec& qpos, IVec& kpos) {
  qpos.assign(static_cast<std::size_t>(c.B * c.T), 0);
  kpos.assign(static_cast<std::size_t>(c.B * c.S), 0);
  for (std::int64_t b = 0; b < c.B; ++b) {
    PosKind k = c.kind;
    std::int32_t off = 0;
    if (k == PosKind::per_batch) {  // batch 0 at the end of the keys, 1 shuffled, 2 offset by 1000 with gaps, ...
      k = b % 3 == 1 ? PosKind::shuffled : PosKind::contiguous_end;
      off = b % 3 == 2 ? 1000 : 0;
    }
    IVec kp(static_cast<std::size_t>(c.S)), qp(static_cast<std::size_t>(c.T));
    // Keys 0..S-1 (x2 + off for the gapped batches); queries at the last T key positions.
    const int stride = off ? 2 : 1;
    for (std::int64_t j = 0; j < c.S; ++j) kp[static_cast<std::size_t>(j)] = off + stride * static_cast<std::int32_t>(j);
    for (std::int64_t i = 0; i < c.T; ++i)
      qp[static_cast<std::size_t>(i)] = kp[static_cast<std::size_t>(std::max<std::int64_t>(0, c.S - c.T) + std::min(i, c.S - 1))];
    if (k == PosKind::shuffled) ref::shuffle(kp, rng);
    if (k == PosKind::late_keys) {
      // Keys sit at positions 40.. , queries at 0..T-1: the first 40 query rows see nothing.
      for (std::int64_t j = 0; j < c.S; ++j) kp[static_cast<std::size_t>(j)] = 40 + static_cast<std::int32_t>(j);
      for (std::int64_t i = 0; i < c.T; ++i) qp[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
    }
    std::copy(kp.begin(), kp.end(), kpos.begin() + b * c.S);
    std::copy(qp.begin(), qp.end(), qpos.begin() + b * c.T);
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(attention_fwd_bwd_f32) {
  using K = PosKind;
  const std::vector<AttnCase> cases = {
      {1, 1, 1, 1, 2, true, K::contiguous_end, 0.0, true},
      {1, 3, 3, 2, 4, true, K::contiguous_end, 0.0, true},
      {1, 113, 113, 3, 16, true, K::contiguous_end, 0.0, true},
      {1, 1023, 1023, 1, 8, true, K::contiguous_end, 0.0, false},    // T = S causal across 16 query tiles
      {2, 64, 1025, 2, 16, true, K::contiguous_end, 0.0, true},      // S > T: queries at the end of keys
      {1, 1023, 1025, 1, 8, true, K::contiguous_end, 0.0, true},     // crosses every 64 / 128 boundary
      {1, 129, 1024, 2, 8, true, K::contiguous_end, 0.25, true},     // explicit scale
      {1, 113, 300, 2, 8, true, K::shuffled, 0.0, true},             // keys in shuffled position order
      {1, 200, 1025, 1, 8, true, K::shuffled, 0.0, false},
      {2, 113, 257, 2, 8, false, K::contiguous_end, 0.0, true},      // non-causal
      {1, 65, 129, 1, 4, false, K::late_keys, 0.0, true},            // non-causal ignores positions
      {1, 100, 60, 2, 8, true, K::late_keys, 0.0, true},             // rows 0..39 see no key
      {1, 300, 200, 1, 8, true, K::late_keys, 0.0, false},
      {3, 70, 300, 2, 8, true, K::per_batch, 0.0, true},             // B > 1, different positions per batch
  };
  for (const AttnCase& c : cases) {
    BOOST_TEST_CONTEXT(ref::name("attention B=", c.B, " T=", c.T, " S=", c.S, " NH=", c.NH, " HS=", c.HS,
                                 " causal=", c.causal, " positions=", kind_name(c.kind), " scale=", c.scale)) {
      dsrsq::Rng rng(17, static_cast<std::uint64_t>(c.T * 131 + c.S));
      IVec qpos, kpos;
      make_positions(c, rng, qpos, kpos);
      const std::int64_t nq = c.B * c.T * c.NH * c.HS, nk = c.B * c.S * c.NH * c.HS;
      // Scores of sd ~1.5: softmax neither uniform nor one-hot.
      Guarded<float> q(ref::normal<float>(nq, rng, 1.2)), k(ref::normal<float>(nk, rng, 1.2)),
          v(ref::normal<float>(nk, rng));
      Guarded<std::int32_t> gq(qpos), gk(kpos);
      Guarded<float> o(nq, static_cast<float>(kNaN)), lse(c.B * c.NH * c.T, static_cast<float>(kNaN));
      const Shape qs{c.B, c.T, c.NH, c.HS}, ks{c.B, c.S, c.NH, c.HS};
      be().attention_fwd({tv(q, qs), tv(k, ks), tv(v, ks), tv(o, qs), tv(lse, Shape{c.B, c.NH, c.T}),
                          tv(gq, Shape{c.B, c.T}), tv(gk, Shape{c.B, c.S}), c.causal, c.scale});
      const ref::AttentionOut r = ref::attention(q.to_double(), k.to_double(), v.to_double(), qpos, kpos, c.B, c.T,
                                                 c.S, c.NH, c.HS, c.causal, c.scale);
      // o: softmax-weighted sums, exp to ~1e-7: NMSE ~1e-13, threshold kNmse.
      expect_close("o", o, r.o);
      // lse: -inf exactly where the reference has no visible key (and then o == 0
      // exactly), finite elsewhere with NMSE <= kNmse over the finite entries.
      BOOST_TEST(lse.intact(), "lse: guard zone overwritten");
      Vec lf, lw;
      std::int64_t empty_rows = 0;
      for (std::int64_t i = 0; i < lse.size(); ++i) {
        const double want = r.lse[static_cast<std::size_t>(i)];
        if (std::isinf(want)) {
          ++empty_rows;
          BOOST_TEST((std::isinf(lse[i]) && lse[i] < 0), "lse[" << i << "] = " << lse[i] << ", want -inf");
        } else {
          BOOST_TEST(std::isfinite(lse[i]), "lse[" << i << "] = " << lse[i] << " not finite");
          lf.push_back(lse[i]);
          lw.push_back(want);
        }
      }
      if (c.kind == K::late_keys && c.causal) BOOST_TEST(empty_rows == c.B * c.NH * 40, "rows without keys: " << empty_rows);
      const double le = ref::nmse(lf, lw);
      BOOST_TEST(le <= kNmse, "lse: nmse=" << le);
      for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t h = 0; h < c.NH; ++h)
          for (std::int64_t i = 0; i < c.T; ++i)
            if (std::isinf(r.lse[static_cast<std::size_t>((b * c.NH + h) * c.T + i)]))
              for (std::int64_t d = 0; d < c.HS; ++d)
                BOOST_TEST(o[((b * c.T + i) * c.NH + h) * c.HS + d] == 0.0f, "o of an empty row is not 0");

      if (!c.check_bwd) continue;
      // Backward (+=) onto nonzero dq, dk, dv. dS = P (dP - D) subtracts two
      // f32 dot products of similar size, so single elements lose a few more
      // digits than in the forward; aggregated NMSE stays ~1e-12, threshold kNmse.
      Guarded<float> dout(ref::normal<float>(nq, rng));
      Guarded<float> dq(ref::normal<float>(nq, rng)), dk(ref::normal<float>(nk, rng)), dv(ref::normal<float>(nk, rng));
      Vec wdq = dq.to_double(), wdk = dk.to_double(), wdv = dv.to_double();
      ref::attention_bwd(dout.to_double(), q.to_double(), k.to_double(), v.to_double(), qpos, kpos, c.B, c.T, c.S, c.NH,
                         c.HS, c.causal, c.scale, wdq, wdk, wdv);
      be().attention_bwd({tv(dout, qs), tv(q, qs), tv(k, ks), tv(v, ks), tv(o, qs), tv(lse, Shape{c.B, c.NH, c.T}),
                          tv(gq, Shape{c.B, c.T}), tv(gk, Shape{c.B, c.S}), tv(dq, qs), tv(dk, ks), tv(dv, ks), c.causal,
                          c.scale});
      expect_close("dq", dq, wdq);
      expect_close("dk", dk, wdk);
      expect_close("dv", dv, wdv);
    }
  }
}

// ---- cross-entropy ------------------------------------------------------------
BOOST_AUTO_TEST_CASE(cross_entropy_fwd_bwd_f32) {
  struct Case { std::int64_t N, V; double inv_norm; double dloss; };
  for (Case c : {Case{1, 1, 1.0, 1.0}, Case{3, 3, 0.0, 1.0}, Case{113, 1023, 0.0, 0.5}, Case{7, 1024, 0.37, 2.0},
                 Case{33, 1025, 0.0, 1.0}, Case{64, 1025, 1.0, -1.0}}) {
    BOOST_TEST_CONTEXT(ref::name("cross_entropy N=", c.N, " V=", c.V, " inv_norm=", c.inv_norm, " dloss=", c.dloss)) {
      dsrsq::Rng rng(18, static_cast<std::uint64_t>(c.N * 17 + c.V));
      Guarded<float> logits(ref::normal<float>(c.N * c.V, rng, 3.0));
      IVec tgt = ref::randint(c.N, rng, c.V);
      Vec maskd(static_cast<std::size_t>(c.N));
      double msum = 0;
      for (std::int64_t n = 0; n < c.N; ++n) {
        // A mix of 0 (tokens without loss), 1 and fractional weights; row 0 always counts.
        const double u = rng.uniform();
        maskd[static_cast<std::size_t>(n)] = n == 0 ? 1.0 : (u < 0.3 ? 0.0 : (u < 0.8 ? 1.0 : 0.25));
        if (maskd[static_cast<std::size_t>(n)] == 0) tgt[static_cast<std::size_t>(n)] = -5;  // any value allowed there
        msum += maskd[static_cast<std::size_t>(n)];
      }
      const double inv_norm = c.inv_norm > 0 ? c.inv_norm : 1.0 / msum;
      Guarded<float> mask(std::vector<float>(maskd.begin(), maskd.end()));
      Guarded<std::int32_t> gt(tgt);
      Guarded<float> losses(c.N, static_cast<float>(kNaN));
      const double loss = be().cross_entropy_fwd(
          {tv(logits, Shape{c.N, c.V}), tv(gt, Shape{c.N}), tv(mask, Shape{c.N}), tv(losses, Shape{c.N}), inv_norm});
      Vec wl;
      const double want = ref::cross_entropy(logits.to_double(), tgt, mask.to_double(), c.N, c.V, inv_norm, &wl);
      // Row losses log(sum exp) + max - logit in f32: NMSE ~1e-14; the total is
      // summed in double: relative error ~1e-7, threshold 1e-6.
      expect_close("losses", losses, wl);
      BOOST_TEST(std::abs(loss - want) <= 1e-6 * std::max(1.0, std::abs(want)), "loss " << loss << " want " << want);
      for (std::int64_t n = 0; n < c.N; ++n)
        if (maskd[static_cast<std::size_t>(n)] == 0) BOOST_TEST(losses[n] == 0.0f, "masked row " << n << " loss != 0");

      // Backward overwrites dlogits: pre-filled with NaN.
      Guarded<float> dl(c.N * c.V, static_cast<float>(kNaN));
      be().cross_entropy_bwd({tv(logits, Shape{c.N, c.V}), tv(gt, Shape{c.N}), tv(mask, Shape{c.N}),
                              tv(dl, Shape{c.N, c.V}), inv_norm, c.dloss});
      expect_close("dlogits", dl, ref::cross_entropy_bwd(logits.to_double(), tgt, mask.to_double(), c.N, c.V, inv_norm, c.dloss));
      for (std::int64_t n = 0; n < c.N; ++n)
        if (maskd[static_cast<std::size_t>(n)] == 0)
          for (std::int64_t j = 0; j < c.V; ++j) BOOST_TEST_REQUIRE(dl[n * c.V + j] == 0.0f);
    }
  }
}

// ---- adamw -----------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(adamw_f32) {
  struct Case { std::int64_t n, step; double wd, grad_scale; };
  for (Case c : {Case{1, 1, 0.0, 1.0}, Case{3, 1, 0.1, 1.0}, Case{113, 7, 0.1, 0.5}, Case{1023, 2, 0.0, 1.0},
                 Case{1024, 100, 0.01, 1.0}, Case{1025, 3, 0.1, 2.0}, Case{40000, 5, 0.1, 1.0}}) {
    BOOST_TEST_CONTEXT(ref::name("adamw n=", c.n, " step=", c.step, " weight_decay=", c.wd, " grad_scale=", c.grad_scale)) {
      dsrsq::Rng rng(19, static_cast<std::uint64_t>(c.n + c.step));
      Guarded<float> p(ref::normal<float>(c.n, rng)), g(ref::normal<float>(c.n, rng));
      // Moments as after a few steps (v > 0); for step 1 they start at zero.
      Guarded<float> m(c.step == 1 ? std::vector<float>(static_cast<std::size_t>(c.n), 0.f) : ref::normal<float>(c.n, rng, 0.1));
      Guarded<float> v(c.step == 1 ? std::vector<float>(static_cast<std::size_t>(c.n), 0.f)
                                   : ref::uniform<float>(c.n, rng, 1e-4, 1e-2));
      Vec rp = p.to_double(), rm = m.to_double(), rv = v.to_double();
      const Vec p0 = rp;
      ref::AdamWRef ra;
      ra.lr = 1e-2;
      ra.wd = c.wd;
      ra.grad_scale = c.grad_scale;
      ra.step = c.step;
      ref::adamw(rp, g.to_double(), rm, rv, ra);
      dsrsq::AdamWArgs a;
      a.params = tv(p, Shape{c.n});
      a.grads = tv(g, Shape{c.n});
      a.m = tv(m, Shape{c.n});
      a.v = tv(v, Shape{c.n});
      a.lr = ra.lr;
      a.weight_decay = c.wd;
      a.grad_scale = c.grad_scale;
      a.step = c.step;
      be().adamw(a);
      // Element-wise f32 formula: relative error ~1e-7 per element, NMSE ~1e-14.
      expect_close("params", p, rp, 1e-12);
      expect_close("m", m, rm, 1e-12);
      expect_close("v", v, rv, 1e-12);
      // The update itself (p - p0, size ~lr = 1e-2) carries the rounding of p
      // (~6e-8 * |p|): relative error ~1e-5, NMSE ~1e-10; threshold 1e-8.
      Vec du(p0.size()), dw(p0.size());
      for (std::size_t i = 0; i < p0.size(); ++i) {
        du[i] = static_cast<double>(p[static_cast<std::int64_t>(i)]) - p0[i];
        dw[i] = rp[i] - p0[i];
      }
      const double e = ref::nmse(du, dw);
      BOOST_TEST(e <= 1e-8, "update nmse=" << e);
    }
  }
}

BOOST_AUTO_TEST_CASE(adamw_decay_is_decoupled_f32) {
  // With zero gradient and zero moments the Adam term vanishes, so torch's
  // AdamW gives exactly p * (1 - lr * wd); coupled (L2) decay would not.
  const std::int64_t n = 1025;
  dsrsq::Rng rng(20);
  Guarded<float> p(ref::normal<float>(n, rng)), g(n, 0.f), m(n, 0.f), v(n, 0.f);
  const Vec p0 = p.to_double();
  dsrsq::AdamWArgs a;
  a.params = tv(p, Shape{n});
  a.grads = tv(g, Shape{n});
  a.m = tv(m, Shape{n});
  a.v = tv(v, Shape{n});
  a.lr = 0.1;
  a.weight_decay = 0.5;
  a.step = 3;
  be().adamw(a);
  Vec want(p0);
  for (auto& x : want) x *= 1.0 - 0.1 * 0.5;
  expect_close("params", p, want, 1e-13);
}

// ---- element-wise and reductions ------------------------------------------------
BOOST_AUTO_TEST_CASE(elementwise_f32) {
  for (std::int64_t n : {1, 3, 113, 1023, 1024, 1025, 40000}) {
    BOOST_TEST_CONTEXT(ref::name("elementwise n=", n)) {
      dsrsq::Rng rng(21, static_cast<std::uint64_t>(n));
      Guarded<float> x(ref::normal<float>(n, rng)), y(ref::normal<float>(n, rng));
      Vec want = y.to_double();
      for (std::int64_t i = 0; i < n; ++i) want[static_cast<std::size_t>(i)] += -0.5 * x[i];
      be().axpy({tv(x, Shape{n}), tv(y, Shape{n}), -0.5});
      expect_close("axpy", y, want, 1e-13);  // one fma-free f32 op per element

      // sum_squares accumulates in double: relative error ~1e-15.
      double ss = 0;
      for (std::int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
      BOOST_TEST(std::abs(be().sum_squares(tv(x, Shape{n})) - ss) <= 1e-12 * ss);

      Guarded<float> z(n, static_cast<float>(kNaN));
      be().copy(tv(x, Shape{n}), tv(z, Shape{n}));
      expect_close("copy", z, x.to_double(), 0.0);
      be().scale(tv(z, Shape{n}), 0.25);  // exact: power of two
      Vec xs = x.to_double();
      for (auto& e : xs) e *= 0.25;
      expect_close("scale", z, xs, 0.0);
      be().fill(tv(z, Shape{n}), 1.5);
      expect_close("fill", z, Vec(static_cast<std::size_t>(n), 1.5), 0.0);
      be().fill(tv(z, Shape{n}), 0.0);
      expect_close("fill0", z, Vec(static_cast<std::size_t>(n), 0.0), 0.0);
      Guarded<std::int32_t> iz(n, 7);
      be().fill(tv(iz, Shape{n}), 3.0);
      BOOST_TEST(iz.intact());
      for (std::int64_t i = 0; i < n; ++i) BOOST_TEST_REQUIRE(iz[i] == 3);
    }
  }
}
