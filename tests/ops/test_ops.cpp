// Level 2 op cross-check (STYLE.md 8.6): every op of every available backend
// (dsrsq::available_backends(); each case loops over them inside
// BOOST_TEST_CONTEXT with the backend's name, as the methods' ops below) in f32
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
#include <array>
#include <span>
#include <algorithm>
#include <cstring>
#include <omp.h>
#include "core/error.hpp"

#include "../common/reference.hpp"
#include "../common/staging.hpp"
#include "backend/backend.hpp"

using dsrsq::Shape;
using dsrsq::TensorView;
using ref::Guarded;
using ref::IVec;
using ref::Vec;

namespace {

constexpr double kNmse = 1e-10;  // see the file comment
const double kNaN = std::numeric_limits<double>::quiet_NaN();

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

// The backends every case runs on: each available backend (a device backend
// through its staging front, tests/common/staging.hpp, so the cases pass host
// buffers), and the CPU backend through a staging front as well, which tests
// the front itself on every machine.
std::vector<dsrsq::Backend*> test_backends() {
  static ref::StagingBackend staged_cpu(dsrsq::cpu_backend());
  std::vector<dsrsq::Backend*> r;
  for (dsrsq::Backend* b : dsrsq::available_backends()) r.push_back(&ref::on_host(*b));
  r.push_back(&staged_cpu);
  return r;
}

template <class T>
Vec round_trip(const std::vector<T>& v) {  // the f32 inputs, seen in double
  return ref::to_double(v);
}

}  // namespace

// ---- embedding ----------------------------------------------------------------
BOOST_AUTO_TEST_CASE(embedding_fwd_bwd_f32) {
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
      struct Case { std::int64_t N, V, C; };
      for (Case c : {Case{1, 1, 1}, Case{3, 5, 3}, Case{113, 50, 1023}, Case{1025, 7, 113}, Case{1023, 300, 64},
                     Case{64, 3, 1024}}) {
        BOOST_TEST_CONTEXT(ref::name("embedding N=", c.N, " V=", c.V, " C=", c.C)) {
          dsrsq::Rng rng(11, static_cast<std::uint64_t>(c.N * 7 + c.C));
          Guarded<std::int32_t> tok(ref::randint(c.N, rng, c.V));
          Guarded<float> table(ref::normal<float>(c.V * c.C, rng));
          Guarded<float> out(c.N * c.C, static_cast<float>(kNaN));
          be.embedding_fwd({tv(tok, Shape{c.N}), tv(table, Shape{c.V, c.C}), tv(out, Shape{c.N, c.C})});
          // A gather is a copy: exact.
          expect_close("out", out, ref::embedding(tok.to_vector(), table.to_double(), c.C), 0.0);

          // Backward accumulates (+=) onto a nonzero table; repeated tokens add up
          // in f32 (N/V ~ 150 terms at most here: NMSE ~1e-13, threshold 1e-10).
          Guarded<float> dout(ref::normal<float>(c.N * c.C, rng));
          Guarded<float> dtable(ref::normal<float>(c.V * c.C, rng));
          Vec want = dtable.to_double();
          ref::embedding_bwd(tok.to_vector(), dout.to_double(), c.C, want);
          be.embedding_bwd({tv(tok, Shape{c.N}), tv(dout, Shape{c.N, c.C}), tv(dtable, Shape{c.V, c.C})});
          expect_close("dtable", dtable, want);
        }
      }
    }
}

// ---- rope -------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(rope_fwd_bwd_f32) {
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
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
          be.rope_fwd({tv(x, Shape{c.N, c.NH, c.HS}), tv(gpos, Shape{c.N}), c.theta});
          expect_close("rope_fwd", x, ref::rope(round_trip(x0), c.N, c.NH, c.HS, pos, c.theta));
          // Backward is the inverse rotation; applied to the forward output it gives x back.
          be.rope_bwd({tv(x, Shape{c.N, c.NH, c.HS}), tv(gpos, Shape{c.N}), c.theta});
          expect_close("rope_bwd(rope_fwd(x)) == x", x, round_trip(x0));
          Guarded<float> g(x0);
          be.rope_bwd({tv(g, Shape{c.N, c.NH, c.HS}), tv(gpos, Shape{c.N}), c.theta});
          expect_close("rope_bwd", g, ref::rope(round_trip(x0), c.N, c.NH, c.HS, pos, c.theta, true));
        }
      }
    }
}

// Log-length query scaling: rows at positions below the base are only rotated,
// rows beyond it also scaled by ln(pos + 1) / ln(base); the backward (the
// transposed map s R^T) is checked against the reference, whose backward is
// checked to be the adjoint of its forward: <g, fwd(x)> == <bwd(g), x>.
BOOST_AUTO_TEST_CASE(rope_log_scale_f32) {
  for (dsrsq::Backend* backend : dsrsq::available_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
      for (double base : {2.0, 64.0, 1024.0}) {
        BOOST_TEST_CONTEXT("log_base " << base) {
          const std::int64_t N = 301, NH = 3, HS = 16, n = N * NH * HS;
          dsrsq::Rng rng(41, static_cast<std::uint64_t>(base));
          IVec pos = ref::randint(N, rng, 20000);
          pos[0] = 0;
          pos[1] = static_cast<std::int32_t>(base) - 1;  // s = 1 exactly at the base
          Guarded<std::int32_t> gpos(pos);
          const std::vector<float> x0 = ref::normal<float>(n, rng), g0 = ref::normal<float>(n, rng);
          Guarded<float> x(x0), g(g0);
          be.rope_fwd({tv(x, Shape{N, NH, HS}), tv(gpos, Shape{N}), 10000.0, base});
          expect_close("rope_fwd log-scaled", x, ref::rope(round_trip(x0), N, NH, HS, pos, 10000.0, false, base));
          be.rope_bwd({tv(g, Shape{N, NH, HS}), tv(gpos, Shape{N}), 10000.0, base});
          const auto want_g = ref::rope(round_trip(g0), N, NH, HS, pos, 10000.0, true, base);
          expect_close("rope_bwd log-scaled", g, want_g);
          double lhs = 0, rhs = 0;
          const auto fx = ref::rope(round_trip(x0), N, NH, HS, pos, 10000.0, false, base);
          for (std::int64_t i = 0; i < n; ++i) {
            lhs += static_cast<double>(g0[static_cast<std::size_t>(i)]) * fx[static_cast<std::size_t>(i)];
            rhs += want_g[static_cast<std::size_t>(i)] * static_cast<double>(x0[static_cast<std::size_t>(i)]);
          }
          BOOST_TEST(std::abs(lhs - rhs) <= 1e-9 * (std::abs(lhs) + 1.0));
        }
      }
      Guarded<float> x(std::vector<float>(8, 1.0f));
      Guarded<std::int32_t> p(IVec{0, 1});
      BOOST_CHECK_THROW(be.rope_fwd({tv(x, Shape{2, 1, 4}), tv(p, Shape{2}), 10000.0, 0.5}), dsrsq::Error);
    }
}

// ---- layernorm ----------------------------------------------------------------
BOOST_AUTO_TEST_CASE(layernorm_fwd_bwd_f32) {
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
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
          be.layernorm_fwd({tv(x, Shape{c.N, c.C}), tv(w, Shape{c.C}), tv(b, Shape{c.C}), tv(out, Shape{c.N, c.C}),
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
          be.layernorm_bwd({tv(dout, Shape{c.N, c.C}), tv(x, Shape{c.N, c.C}), tv(w, Shape{c.C}), tv(mean, Shape{c.N}),
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
}

// ---- matmul -------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(matmul_fwd_bwd_f32) {
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
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
              be.matmul_fwd(args);
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
              be.matmul_bwd({tv(dc, shp(s.M, s.N)), args.a, args.b, tv(da, args.a.shape), tv(db, args.b.shape),
                               tv(dbias, Shape{s.N}), ta, tb, sc.alpha});
              expect_close("da", da, wda);
              expect_close("db", db, wdb);
              expect_close("dbias", dbias, wdbias);
            }
          }
    }
}

// ---- linear -------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(linear_fwd_bwd_f32) {
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
      struct Case { std::int64_t N, C, OC; bool bias, dx_acc; };
      for (Case c : {Case{1, 1, 1, true, false}, Case{3, 113, 3, false, true}, Case{113, 1023, 3, true, true},
                     Case{1025, 3, 113, true, false}, Case{64, 1024, 113, true, true}, Case{1023, 64, 1, false, false}}) {
        BOOST_TEST_CONTEXT(ref::name("linear N=", c.N, " C=", c.C, " OC=", c.OC, " bias=", c.bias, " dx_accumulate=", c.dx_acc)) {
          dsrsq::Rng rng(15, static_cast<std::uint64_t>(c.N + c.C * 3 + c.OC * 7));
          Guarded<float> x(ref::normal<float>(c.N * c.C, rng)), w(ref::normal<float>(c.OC * c.C, rng)),
              bias(ref::normal<float>(c.OC, rng));
          Guarded<float> out(c.N * c.OC, static_cast<float>(kNaN));
          const Vec bd = bias.to_double();
          be.linear_fwd({tv(x, Shape{c.N, c.C}), tv(w, Shape{c.OC, c.C}), c.bias ? tv(bias, Shape{c.OC}) : TensorView{},
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
          be.linear_bwd({tv(dout, Shape{c.N, c.OC}), tv(x, Shape{c.N, c.C}), tv(w, Shape{c.OC, c.C}),
                           tv(dx, Shape{c.N, c.C}), tv(dw, Shape{c.OC, c.C}), c.bias ? tv(db, Shape{c.OC}) : TensorView{},
                           c.dx_acc});
          expect_close("dx", dx, wdx);
          expect_close("dweight", dw, wdw);
          if (c.bias) expect_close("dbias", db, wdb);
          else BOOST_TEST(db.to_double() == db0, "dbias was not requested but changed");
        }
      }
    }
}

// ---- gelu -----------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(gelu_fwd_bwd_f32) {
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
      for (std::int64_t n : {1, 3, 113, 1023, 1024, 1025, 40000}) {
        BOOST_TEST_CONTEXT(ref::name("gelu n=", n)) {
          dsrsq::Rng rng(16, static_cast<std::uint64_t>(n));
          std::vector<float> xv = ref::normal<float>(n, rng, 3.0);
          // Tails where tanh saturates (the f32 kernel clamps its argument).
          const float extremes[] = {-100.f, -20.f, -9.f, 0.f, 9.f, 20.f, 100.f};
          for (std::size_t i = 0; i < std::size(extremes) && i < xv.size(); ++i) xv[xv.size() - 1 - i] = extremes[i];
          Guarded<float> x(xv), out(n, static_cast<float>(kNaN));
          be.gelu_fwd({tv(x, Shape{n}), tv(out, Shape{n})});
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
          be.gelu_bwd({tv(dout, Shape{n}), tv(x, Shape{n}), tv(dx, Shape{n})});
          expect_close("dx", dx, want);
        }
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
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
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
          // Head sizes of the f32 micro-kernels (HS a multiple of the vector width,
          // >= 16 queries) at sizes that are not multiples of their 64-query / 64-key
          // blocks, and HS 24 and decode-sized calls, which take the BLAS path.
          {1, 200, 200, 2, 32, true, K::contiguous_end, 0.0, true},
          {1, 333, 333, 1, 64, true, K::contiguous_end, 0.0, true},
          {1, 129, 131, 1, 128, true, K::contiguous_end, 0.0, true},
          {1, 1100, 1100, 1, 64, true, K::contiguous_end, 0.0, true},    // 18 key blocks, partial dQ groups
          {2, 77, 333, 2, 64, true, K::contiguous_end, 0.0, true},       // T != S: a prefill chunk after a cache
          {1, 1, 1000, 2, 64, true, K::contiguous_end, 0.0, true},       // decode: one query, 1000 keys (BLAS path)
          {1, 3, 517, 1, 128, true, K::contiguous_end, 0.0, true},       // < 16 queries: BLAS path
          {1, 16, 1000, 2, 64, true, K::contiguous_end, 0.0, true},      // 16 queries: the micro-kernels' smallest call
          {1, 130, 517, 2, 64, true, K::shuffled, 0.0, true},            // keys in shuffled position order
          {1, 100, 60, 1, 32, true, K::late_keys, 0.0, true},            // rows 0..39 see no key
          {1, 150, 90, 1, 64, true, K::late_keys, 0.3, true},
          {2, 90, 200, 1, 128, false, K::contiguous_end, 0.0, true},     // non-causal, ragged last key block
          {3, 70, 300, 1, 64, true, K::per_batch, 0.0, true},
          {1, 113, 300, 2, 24, true, K::shuffled, 0.0, true},            // HS 24: BLAS path
          {1, 65, 129, 1, 24, true, K::contiguous_end, 0.0, true},
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
          be.attention_fwd({tv(q, qs), tv(k, ks), tv(v, ks), tv(o, qs), tv(lse, Shape{c.B, c.NH, c.T}),
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
          be.attention_bwd({tv(dout, qs), tv(q, qs), tv(k, ks), tv(v, ks), tv(o, qs), tv(lse, Shape{c.B, c.NH, c.T}),
                              tv(gq, Shape{c.B, c.T}), tv(gk, Shape{c.B, c.S}), tv(dq, qs), tv(dk, ks), tv(dv, ks), c.causal,
                              c.scale});
          expect_close("dq", dq, wdq);
          expect_close("dk", dk, wdk);
          expect_close("dv", dv, wdv);
        }
      }
    }
}

// The CPU attention is deterministic by construction (fixed partition of work,
// partial dQ per key-block group summed in group order, no float atomics): the
// same inputs give bitwise the same o, lse, dq, dk, dv for any thread count.
BOOST_AUTO_TEST_CASE(attention_cpu_same_bits_for_any_thread_count) {
  dsrsq::Backend& be = dsrsq::cpu_backend();
  for (std::int64_t HS : {std::int64_t{24}, std::int64_t{64}}) {
    const AttnCase c{2, 300, 300, 3, HS, true, PosKind::per_batch, 0.0, true};
    BOOST_TEST_CONTEXT(ref::name("attention threads HS=", HS)) {
      dsrsq::Rng rng(19, static_cast<std::uint64_t>(HS));
      IVec qpos, kpos;
      make_positions(c, rng, qpos, kpos);
      const std::int64_t nq = c.B * c.T * c.NH * c.HS, nk = c.B * c.S * c.NH * c.HS;
      const std::vector<float> q = ref::normal<float>(nq, rng, 1.2), k = ref::normal<float>(nk, rng, 1.2),
                               v = ref::normal<float>(nk, rng), dout = ref::normal<float>(nq, rng);
      const Shape qs{c.B, c.T, c.NH, c.HS}, ks{c.B, c.S, c.NH, c.HS};
      auto run = [&](int threads) {
        const int saved = omp_get_max_threads();
        omp_set_num_threads(threads);
        std::vector<float> qq = q, kk = k, vv = v, dd = dout, o(static_cast<std::size_t>(nq)),
                           lse(static_cast<std::size_t>(c.B * c.NH * c.T)), dq(static_cast<std::size_t>(nq), 0.0f),
                           dk(static_cast<std::size_t>(nk), 0.0f), dv(static_cast<std::size_t>(nk), 0.0f);
        IVec qp = qpos, kp = kpos;
        be.attention_fwd({TensorView(qq.data(), qs), TensorView(kk.data(), ks), TensorView(vv.data(), ks),
                          TensorView(o.data(), qs), TensorView(lse.data(), Shape{c.B, c.NH, c.T}),
                          TensorView(qp.data(), Shape{c.B, c.T}), TensorView(kp.data(), Shape{c.B, c.S}), true, 0.0});
        be.attention_bwd({TensorView(dd.data(), qs), TensorView(qq.data(), qs), TensorView(kk.data(), ks),
                          TensorView(vv.data(), ks), TensorView(o.data(), qs), TensorView(lse.data(), Shape{c.B, c.NH, c.T}),
                          TensorView(qp.data(), Shape{c.B, c.T}), TensorView(kp.data(), Shape{c.B, c.S}),
                          TensorView(dq.data(), qs), TensorView(dk.data(), ks), TensorView(dv.data(), ks), true, 0.0});
        omp_set_num_threads(saved);
        std::vector<float> all;
        for (const auto* x : {&o, &lse, &dq, &dk, &dv}) all.insert(all.end(), x->begin(), x->end());
        return all;
      };
      const std::vector<float> one = run(1);
      for (int threads : {2, 3}) {
        const std::vector<float> many = run(threads);
        BOOST_TEST(std::memcmp(one.data(), many.data(), one.size() * sizeof(float)) == 0,
                   threads << " threads differ from 1 thread");
      }
    }
  }
}

// ---- cross-entropy ------------------------------------------------------------
BOOST_AUTO_TEST_CASE(cross_entropy_fwd_bwd_f32) {
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
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
          const double loss = be.cross_entropy_fwd(
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
          be.cross_entropy_bwd({tv(logits, Shape{c.N, c.V}), tv(gt, Shape{c.N}), tv(mask, Shape{c.N}),
                                  tv(dl, Shape{c.N, c.V}), inv_norm, c.dloss});
          expect_close("dlogits", dl, ref::cross_entropy_bwd(logits.to_double(), tgt, mask.to_double(), c.N, c.V, inv_norm, c.dloss));
          for (std::int64_t n = 0; n < c.N; ++n)
            if (maskd[static_cast<std::size_t>(n)] == 0)
              for (std::int64_t j = 0; j < c.V; ++j) BOOST_TEST_REQUIRE(dl[n * c.V + j] == 0.0f);
        }
      }
    }
}

// ---- adamw -----------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(adamw_f32) {
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
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
          be.adamw(a);
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
}

BOOST_AUTO_TEST_CASE(adamw_decay_is_decoupled_f32) {
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
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
      be.adamw(a);
      Vec want(p0);
      for (auto& x : want) x *= 1.0 - 0.1 * 0.5;
      expect_close("params", p, want, 1e-13);
    }
}

// ---- element-wise and reductions ------------------------------------------------
BOOST_AUTO_TEST_CASE(elementwise_f32) {
  for (dsrsq::Backend* backend : test_backends())
    BOOST_TEST_CONTEXT("backend " << backend->name()) {
      dsrsq::Backend& be = *backend;
      for (std::int64_t n : {1, 3, 113, 1023, 1024, 1025, 40000}) {
        BOOST_TEST_CONTEXT(ref::name("elementwise n=", n)) {
          dsrsq::Rng rng(21, static_cast<std::uint64_t>(n));
          Guarded<float> x(ref::normal<float>(n, rng)), y(ref::normal<float>(n, rng));
          Vec want = y.to_double();
          for (std::int64_t i = 0; i < n; ++i) want[static_cast<std::size_t>(i)] += -0.5 * x[i];
          be.axpy({tv(x, Shape{n}), tv(y, Shape{n}), -0.5});
          expect_close("axpy", y, want, 1e-13);  // one fma-free f32 op per element

          // sum_squares accumulates in double: relative error ~1e-15.
          double ss = 0;
          for (std::int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
          BOOST_TEST(std::abs(be.sum_squares(tv(x, Shape{n})) - ss) <= 1e-12 * ss);

          Guarded<float> z(n, static_cast<float>(kNaN));
          be.copy(tv(x, Shape{n}), tv(z, Shape{n}));
          expect_close("copy", z, x.to_double(), 0.0);
          be.scale(tv(z, Shape{n}), 0.25);  // exact: power of two
          Vec xs = x.to_double();
          for (auto& e : xs) e *= 0.25;
          expect_close("scale", z, xs, 0.0);
          be.fill(tv(z, Shape{n}), 1.5);
          expect_close("fill", z, Vec(static_cast<std::size_t>(n), 1.5), 0.0);
          be.fill(tv(z, Shape{n}), 0.0);
          expect_close("fill0", z, Vec(static_cast<std::size_t>(n), 0.0), 0.0);
          Guarded<std::int32_t> iz(n, 7);
          be.fill(tv(iz, Shape{n}), 3.0);
          BOOST_TEST(iz.intact());
          for (std::int64_t i = 0; i < n; ++i) BOOST_TEST_REQUIRE(iz[i] == 3);
        }
      }
    }
}

// =============================================================================
// The methods' ops (DESIGN.md section 4, "The Backend boundary"), run on EVERY
// available backend (ggml's test-backend-ops habit) against double references,
// on odd sizes. Tolerances are derived, never read off this machine:
//   u32 = 2^-24, u64 = 2^-53 (unit roundoff). A length-n sum of products in
//   precision u has |err| <= n u sum|x_i y_i| (Higham, Thm 3.1, first order).
//   Each check below states which bound it uses and the multiple taken.
// =============================================================================
namespace {
constexpr double u32 = 1.0 / 16777216.0;          // 2^-24
constexpr double u64 = 1.0 / 9007199254740992.0;  // 2^-53
using dsrsq::Backend;
// test_backends(): every available backend (through a staging front for a
// device backend) and the CPU through a staging front.
std::vector<Backend*> backends() { return test_backends(); }
// Ops a backend leaves out (supports() false) are skipped with a message, not failed.
bool skip_unsupported(Backend& b, dsrsq::OpId op) {
  if (b.supports(op)) return false;
  BOOST_TEST_MESSAGE(b.name() << ": op " << dsrsq::op_name(op) << " not supported, skipped");
  return true;
}
}  // namespace

BOOST_AUTO_TEST_CASE(methods_ops_every_backend_supports_them) {
  for (Backend* b : backends())
    for (int op = 0; op < static_cast<int>(dsrsq::OpId::count_); ++op)
      if (b->name() == "cpu") BOOST_TEST(b->supports(static_cast<dsrsq::OpId>(op)), dsrsq::op_name(static_cast<dsrsq::OpId>(op)));
}

// gather / scatter-add: copies and integer-valued sums: exact.
BOOST_AUTO_TEST_CASE(gather_scatter_rows) {
  for (Backend* b : backends())
    for (auto [N, M, C] : {std::array<std::int64_t, 3>{7, 13, 33}, {13, 7, 1}, {33, 33, 7}}) {
      BOOST_TEST_CONTEXT(b->name() << " gather/scatter N=" << N << " M=" << M << " C=" << C) {
        dsrsq::Rng rng(5, static_cast<std::uint64_t>(N * M + C));
        Guarded<float> src(N * C);
        for (std::int64_t i = 0; i < N * C; ++i) src.data()[i] = static_cast<float>(rng.below(17)) - 8.f;
        Guarded<std::int32_t> idx(ref::randint(M, rng, N));
        Guarded<float> dst(M * C, static_cast<float>(kNaN));
        b->gather_rows({tv(src, Shape{N, C}), tv(idx, Shape{M}), tv(dst, Shape{M, C})});
        Vec want(static_cast<std::size_t>(M * C));
        for (std::int64_t m = 0; m < M; ++m)
          for (std::int64_t c = 0; c < C; ++c)
            want[static_cast<std::size_t>(m * C + c)] = src.data()[idx.data()[m] * C + c];
        expect_close("gather", dst, want, 0.0);
        // Backward: dsrc += scatter(ddst); integer values: every sum exact.
        Guarded<float> dsrc(N * C, 1.0f);
        Vec want2(static_cast<std::size_t>(N * C), 1.0);
        for (std::int64_t m = 0; m < M; ++m)
          for (std::int64_t c = 0; c < C; ++c)
            want2[static_cast<std::size_t>(idx.data()[m] * C + c)] += dst.data()[m * C + c];
        b->scatter_add_rows({tv(dst, Shape{M, C}), tv(idx, Shape{M}), tv(dsrc, Shape{N, C})});
        expect_close("scatter_add", dsrc, want2, 0.0);
      }
    }
}

// Attention merge, f32 running + f32 partial (ring) and f32 + f64 partial (RCKV).
// Reference in double. Per element the f32 result ca*xa + cb*xb carries the
// rounding of wa, wb (exp: <= 1 ulp each, plus the subtraction l - m: its
// error is amplified by exp into |l - m| u32 relative), ws, ca, cb (2 each) and
// the final product-sum (2): |err| <= (8 + 2 |l - m|) u32 (|ca xa| + |cb xb|);
// we allow 2x that. lse = m + log(ws): ws carries <= (3 + |l - m|) u32
// relative error, which log turns into that much ABSOLUTE error, plus the
// final addition's u32 (|m| + log ws): |err| <= u32 (4 + |l - m| + |m| + log ws); 2x.
BOOST_AUTO_TEST_CASE(attention_merge_every_backend) {
  for (Backend* be : backends())
    for (bool f64_partial : {false, true})
      for (auto [B, T, NH, HS] : {std::array<std::int64_t, 4>{1, 7, 3, 13}, {2, 13, 1, 7}, {1, 33, 2, 5}}) {
        BOOST_TEST_CONTEXT(be->name() << " merge B=" << B << " T=" << T << " NH=" << NH << " HS=" << HS
                                      << " partial=" << (f64_partial ? "f64" : "f32")) {
          dsrsq::Rng rng(7, static_cast<std::uint64_t>(T * HS));
          const std::int64_t no = B * T * NH * HS, nl = B * NH * T;
          Guarded<float> o(ref::normal<float>(no, rng)), lse(ref::normal<float>(nl, rng, 3.0));
          std::vector<double> ob = ref::normal<double>(no, rng), lb = ref::normal<double>(nl, rng, 3.0);
          // Guards: a few rows at -inf on either side, one on both.
          lse.data()[0] = -INFINITY;
          lb[1 % nl] = -INFINITY;
          lse.data()[nl - 1] = -INFINITY;
          lb[static_cast<std::size_t>(nl - 1)] = -INFINITY;
          std::vector<float> obf(ob.begin(), ob.end()), lbf(lb.begin(), lb.end());
          if (!f64_partial) {
            ob.assign(obf.begin(), obf.end());
            lb.assign(lbf.begin(), lbf.end());
          }
          Vec o0 = o.to_double(), l0 = lse.to_double();
          Vec want_o(static_cast<std::size_t>(no)), want_l(static_cast<std::size_t>(nl)), bound_o(want_o.size()),
              bound_l(want_l.size());
          for (std::int64_t bb = 0; bb < B; ++bb)
            for (std::int64_t h = 0; h < NH; ++h)
              for (std::int64_t t = 0; t < T; ++t) {
                const std::size_t li = static_cast<std::size_t>((bb * NH + h) * T + t);
                const double la = l0[li], lbv = lb[li], m = std::max(la, lbv);
                const double wa = la == -INFINITY ? 0 : std::exp(la - m), wb = lbv == -INFINITY ? 0 : std::exp(lbv - m);
                want_l[li] = m == -INFINITY ? -INFINITY : m + std::log(wa + wb);
                const double spread = (wa != 0 && wb != 0) ? std::max(std::abs(la - m), std::abs(lbv - m)) : 0.0;
                bound_l[li] = m == -INFINITY ? 0 : 2 * u32 * (4 + spread + std::abs(m) + std::log(wa + wb));
                for (std::int64_t d = 0; d < HS; ++d) {
                  const std::size_t oi = static_cast<std::size_t>(((bb * T + t) * NH + h) * HS + d);
                  if (m == -INFINITY) {
                    want_o[oi] = 0;
                    continue;
                  }
                  const double ta = wa / (wa + wb) * (wa ? o0[oi] : 0), tb = wb / (wa + wb) * (wb ? ob[oi] : 0);
                  want_o[oi] = ta + tb;
                  const double amp = (wa != 0 && wb != 0) ? std::max(std::abs(la - m), std::abs(lbv - m)) : 0.0;
                  bound_o[oi] = 2 * (8 + 2 * amp) * u32 *
                                (std::abs(ta) + std::abs(tb));
                }
              }
          if (f64_partial)
            be->attention_merge({tv(o, Shape{B, T, NH, HS}), tv(lse, Shape{B, NH, T}),
                                 TensorView(ob.data(), Shape{B, T, NH, HS}), TensorView(lb.data(), Shape{B, NH, T})});
          else
            be->attention_merge({tv(o, Shape{B, T, NH, HS}), tv(lse, Shape{B, NH, T}),
                                 TensorView(obf.data(), Shape{B, T, NH, HS}), TensorView(lbf.data(), Shape{B, NH, T})});
          BOOST_TEST(o.intact());
          BOOST_TEST(lse.intact());
          for (std::size_t i = 0; i < want_o.size(); ++i)
            BOOST_TEST(std::abs(o.data()[i] - want_o[i]) <= bound_o[i] + 1e-300, "o[" << i << "] got " << o.data()[i] << " want " << want_o[i] << " bound " << bound_o[i]);
          for (std::size_t i = 0; i < want_l.size(); ++i) {
            if (want_l[i] == -INFINITY) {
              BOOST_TEST(lse.data()[i] == -INFINITY);
              continue;
            }
            BOOST_TEST(std::abs(lse.data()[i] - want_l[i]) <= bound_l[i] + u32 * std::abs(want_l[i]),
                       "lse[" << i << "] got " << lse.data()[i] << " want " << want_l[i] << " bound " << bound_l[i]);
          }
        }
      }
}

// Latent attention and attention mass: f32 inputs (exact in f64), all
// arithmetic in f64: a sum of n terms errs by <= n u64 sum|terms|; exp/log add
// a few u64 relative. With n <= 33 keys/latents and two chained sums (scores,
// then the weighted latent sum, then the up-projection: three levels) the
// bound is <= 3 * 33 * u64 * (sum of |terms|) ~ 1e-14 relative to the term
// magnitude M (here M <= 50); we allow 1e-12 * (1 + |ref|) absolute, i.e. ~100x
// the derived bound, still 10^4 below an error of one f32 ulp.
BOOST_AUTO_TEST_CASE(latent_attention_and_mass_every_backend) {
  for (Backend* be : backends())
    for (auto [B, T, S, NH, HS, dc] : {std::array<std::int64_t, 6>{1, 7, 13, 3, 5, 7}, {2, 1, 33, 2, 7, 13}, {1, 13, 7, 1, 13, 33}}) {
      BOOST_TEST_CONTEXT(be->name() << " latent B=" << B << " T=" << T << " S=" << S << " NH=" << NH << " HS=" << HS
                                    << " dc=" << dc) {
        dsrsq::Rng rng(9, static_cast<std::uint64_t>(S * dc));
        const std::int64_t Sp = S + 2;  // latent rows beyond S are not read
        auto q = ref::normal<float>(B * T * NH * HS, rng), k = ref::normal<float>(B * S * NH * HS, rng);
        auto lat = ref::normal<float>(B * Sp * dc, rng), up = ref::normal<float>(NH * HS * dc, rng);
        auto lo = ref::normal<float>(B * NH * T, rng);
        std::vector<std::int32_t> qp(static_cast<std::size_t>(B * T)), kp(static_cast<std::size_t>(B * Sp), -1);
        for (std::int64_t bb = 0; bb < B; ++bb) {
          for (std::int64_t i = 0; i < T; ++i) qp[static_cast<std::size_t>(bb * T + i)] = static_cast<std::int32_t>(S / 2 + i);
          for (std::int64_t j = 0; j < S; ++j) kp[static_cast<std::size_t>(bb * Sp + j)] = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(S)));
        }
        std::vector<double> rw(static_cast<std::size_t>(T));
        for (auto& x : rw) x = rng.uniform();
        std::vector<double> o(static_cast<std::size_t>(B * T * NH * HS)), lse(static_cast<std::size_t>(B * NH * T)),
            mass(static_cast<std::size_t>(B * S), 0.5), used(static_cast<std::size_t>(B * T));
        dsrsq::LatentAttentionArgs a;
        a.q = TensorView(q.data(), Shape{B, T, NH, HS});
        a.k = TensorView(k.data(), Shape{B, S, NH, HS});
        a.q_pos = TensorView(qp.data(), Shape{B, T});
        a.k_pos = TensorView(kp.data(), Shape{B, Sp});
        a.latent = TensorView(lat.data(), Shape{B, Sp, dc});
        a.up = TensorView(up.data(), Shape{NH * HS, dc});
        a.o = TensorView(o.data(), Shape{B, T, NH, HS});
        a.lse = TensorView(lse.data(), Shape{B, NH, T});
        a.lse_other = TensorView(lo.data(), Shape{B, NH, T});
        a.row_weight = TensorView(rw.data(), Shape{T});
        a.mass = TensorView(mass.data(), Shape{B, S});
        a.used = TensorView(used.data(), Shape{B, T});
        const double scale = 1.0 / std::sqrt(static_cast<double>(HS));
        if (!skip_unsupported(*be, dsrsq::OpId::latent_attention)) {
          be->latent_attention_fwd(a);
          std::vector<double> wmass(static_cast<std::size_t>(B * S), 0.5);
          for (std::int64_t bb = 0; bb < B; ++bb)
            for (std::int64_t i = 0; i < T; ++i) {
              double nvis = 0;
              for (std::int64_t h = 0; h < NH; ++h) {
                std::vector<double> s;
                std::vector<std::int64_t> js;
                for (std::int64_t j = 0; j < S; ++j)
                  if (kp[static_cast<std::size_t>(bb * Sp + j)] <= qp[static_cast<std::size_t>(bb * T + i)]) {
                    double d = 0;
                    for (std::int64_t x = 0; x < HS; ++x)
                      d += static_cast<double>(q[static_cast<std::size_t>(((bb * T + i) * NH + h) * HS + x)]) *
                           k[static_cast<std::size_t>(((bb * S + j) * NH + h) * HS + x)];
                    s.push_back(d * scale);
                    js.push_back(j);
                  }
                nvis += static_cast<double>(s.size());
                const std::size_t li = static_cast<std::size_t>((bb * NH + h) * T + i);
                if (s.empty()) {
                  BOOST_TEST(lse[li] == -INFINITY);
                  continue;
                }
                const double mx = *std::max_element(s.begin(), s.end());
                double Z = 0;
                for (double x : s) Z += std::exp(x - mx);
                const double L = mx + std::log(Z);
                BOOST_TEST(std::abs(lse[li] - L) <= 1e-12 * (1 + std::abs(L)));
                const double lw = lo[li], m = std::max(L, lw);
                const double fb = std::exp(L - m) / (std::exp(L - m) + std::exp(lw - m));
                for (std::int64_t r = 0; r < HS; ++r) {
                  double want = 0;
                  for (std::size_t t = 0; t < s.size(); ++t) {
                    double proj = 0;
                    for (std::int64_t x = 0; x < dc; ++x)
                      proj += static_cast<double>(up[static_cast<std::size_t>((h * HS + r) * dc + x)]) *
                              lat[static_cast<std::size_t>((bb * Sp + js[t]) * dc + x)];
                    want += std::exp(s[t] - L) * proj;
                  }
                  const double got = o[static_cast<std::size_t>(((bb * T + i) * NH + h) * HS + r)];
                  BOOST_TEST(std::abs(got - want) <= 1e-12 * (1 + std::abs(want)));
                }
                for (std::size_t t = 0; t < s.size(); ++t)
                  wmass[static_cast<std::size_t>(bb * S + js[t])] += rw[static_cast<std::size_t>(i)] * fb * std::exp(s[t] - L) / NH;
              }
              BOOST_TEST(used[static_cast<std::size_t>(bb * T + i)] == nvis);
            }
          for (std::size_t j = 0; j < wmass.size(); ++j) BOOST_TEST(std::abs(mass[j] - wmass[j]) <= 1e-12 * (1 + wmass[j]));
        }

        if (!skip_unsupported(*be, dsrsq::OpId::attention_mass)) {
          // attention_mass on the same q, k (dense causal softmax, divisor NH).
          std::vector<double> am(static_cast<std::size_t>(B * S), kNaN);
          std::vector<std::int32_t> kp2(static_cast<std::size_t>(B * S));
          for (std::int64_t bb = 0; bb < B; ++bb)
            for (std::int64_t j = 0; j < S; ++j) kp2[static_cast<std::size_t>(bb * S + j)] = kp[static_cast<std::size_t>(bb * Sp + j)];
          be->attention_mass({a.q, a.k, a.q_pos, TensorView(kp2.data(), Shape{B, S}), a.row_weight,
                              TensorView(am.data(), Shape{B, S}), static_cast<double>(NH)});
          std::vector<double> want_am(static_cast<std::size_t>(B * S), 0.0);
          for (std::int64_t bb = 0; bb < B; ++bb)
            for (std::int64_t i = 0; i < T; ++i)
              for (std::int64_t h = 0; h < NH; ++h) {
                std::vector<double> s(static_cast<std::size_t>(S), -INFINITY);
                double mx = -INFINITY;
                for (std::int64_t j = 0; j < S; ++j)
                  if (kp2[static_cast<std::size_t>(bb * S + j)] <= qp[static_cast<std::size_t>(bb * T + i)]) {
                    double d = 0;
                    for (std::int64_t x = 0; x < HS; ++x)
                      d += static_cast<double>(q[static_cast<std::size_t>(((bb * T + i) * NH + h) * HS + x)]) *
                           k[static_cast<std::size_t>(((bb * S + j) * NH + h) * HS + x)];
                    s[static_cast<std::size_t>(j)] = d * scale;
                    mx = std::max(mx, d * scale);
                  }
                if (mx == -INFINITY) continue;
                double Z = 0;
                for (double x : s) Z += x == -INFINITY ? 0 : std::exp(x - mx);
                for (std::int64_t j = 0; j < S; ++j)
                  if (s[static_cast<std::size_t>(j)] != -INFINITY)
                    want_am[static_cast<std::size_t>(bb * S + j)] += rw[static_cast<std::size_t>(i)] * std::exp(s[static_cast<std::size_t>(j)] - mx) / Z / NH;
              }
          for (std::size_t j = 0; j < am.size(); ++j) BOOST_TEST(std::abs(am[j] - want_am[j]) <= 1e-12 * (1 + want_am[j]));
        }
      }
    }
}

// top-k and k-means assign: integer-valued data with deliberate ties: exact
// indices, ties to the lower index.
BOOST_AUTO_TEST_CASE(topk_and_kmeans_assign_every_backend) {
  for (Backend* be : backends())
    for (auto [R, N, K] : {std::array<std::int64_t, 3>{7, 13, 5}, {13, 7, 7}, {3, 33, 1}}) {
      BOOST_TEST_CONTEXT(be->name() << " topk R=" << R << " N=" << N << " k=" << K) {
        dsrsq::Rng rng(3, static_cast<std::uint64_t>(N));
        std::vector<float> x(static_cast<std::size_t>(R * N));
        for (auto& v : x) v = static_cast<float>(rng.below(5));  // many ties
        Guarded<std::int32_t> idx(R * K, -7);
        be->topk({TensorView(x.data(), Shape{R, N}), tv(idx, Shape{R, K})});
        BOOST_TEST(idx.intact());
        for (std::int64_t r = 0; r < R; ++r) {
          std::vector<std::int32_t> id(static_cast<std::size_t>(N));
          std::iota(id.begin(), id.end(), 0);
          std::stable_sort(id.begin(), id.end(), [&](std::int32_t p, std::int32_t q) { return x[static_cast<std::size_t>(r * N + p)] > x[static_cast<std::size_t>(r * N + q)]; });
          for (std::int64_t t = 0; t < K; ++t) BOOST_TEST(idx.data()[r * K + t] == id[static_cast<std::size_t>(t)]);
        }
      }
    }
  for (Backend* be : backends())
    for (auto [G, N, M, D] : {std::array<std::int64_t, 4>{1, 13, 7, 3}, {3, 7, 13, 1}, {2, 33, 5, 7}}) {
      BOOST_TEST_CONTEXT(be->name() << " kmeans_assign G=" << G << " N=" << N << " M=" << M << " D=" << D) {
        dsrsq::Rng rng(4, static_cast<std::uint64_t>(N * M));
        std::vector<float> x(static_cast<std::size_t>(G * N * D)), c(static_cast<std::size_t>(G * M * D));
        for (auto& v : x) v = static_cast<float>(rng.below(4));
        for (auto& v : c) v = static_cast<float>(rng.below(4));
        const std::int64_t used_m = M - 1;  // the last centroid is not in use
        std::vector<std::int32_t> as(static_cast<std::size_t>(G * N));
        std::vector<double> dist(as.size());
        be->kmeans_assign({TensorView(x.data(), Shape{G, N, D}), TensorView(c.data(), Shape{G, M, D}),
                           TensorView(as.data(), Shape{G, N}), TensorView(dist.data(), Shape{G, N}), used_m});
        for (std::int64_t g = 0; g < G; ++g)
          for (std::int64_t n = 0; n < N; ++n) {
            std::int64_t best = 0;
            double bd = INFINITY;
            for (std::int64_t k = 0; k < used_m; ++k) {
              double d2 = 0;
              for (std::int64_t t = 0; t < D; ++t) {
                const double d = x[static_cast<std::size_t>((g * N + n) * D + t)] - c[static_cast<std::size_t>((g * M + k) * D + t)];
                d2 += d * d;
              }
              if (d2 < bd) { bd = d2; best = k; }
            }
            BOOST_TEST(as[static_cast<std::size_t>(g * N + n)] == best);
            BOOST_TEST(dist[static_cast<std::size_t>(g * N + n)] == bd);  // small integers: exact
          }
      }
    }
}

// Symmetric eigen (LAPACK and Jacobi): backward-stable solvers leave a residual
// ||A v - l v|| <= c n u64 ||A||_F with c a small constant (Golub & Van Loan
// 8.1/8.5); we allow c = 100. Orthonormality of V to the same order.
// Gram X^T X in f64 of f32 rows: products exact in f64, a length-N sum errs by
// <= N u64 sum|x_i x_j|; we check against that bound times 2.
BOOST_AUTO_TEST_CASE(sym_eigen_and_gram_every_backend) {
  for (Backend* be : backends())
    for (auto [N, C] : {std::array<std::int64_t, 2>{13, 7}, {33, 13}, {7, 33}})
      for (bool jacobi : {false, true}) {
        BOOST_TEST_CONTEXT(be->name() << " gram+eigen N=" << N << " C=" << C << (jacobi ? " jacobi" : " lapack")) {
          dsrsq::Rng rng(6, static_cast<std::uint64_t>(N * C));
          auto x = ref::normal<float>(N * C, rng);
          std::vector<double> g(static_cast<std::size_t>(C * C)), vals(static_cast<std::size_t>(C)), vecs(g.size());
          be->gram({TensorView(x.data(), Shape{N, C}), TensorView(g.data(), Shape{C, C})});
          for (std::int64_t i = 0; i < C; ++i)
            for (std::int64_t j = 0; j < C; ++j) {
              double s = 0, sa = 0;
              for (std::int64_t n = 0; n < N; ++n) {
                const double p = static_cast<double>(x[static_cast<std::size_t>(n * C + i)]) * x[static_cast<std::size_t>(n * C + j)];
                s += p;
                sa += std::abs(p);
              }
              BOOST_TEST(std::abs(g[static_cast<std::size_t>(i * C + j)] - s) <= 2 * N * u64 * sa);
            }
          if (skip_unsupported(*be, dsrsq::OpId::sym_eigen)) continue;
          be->sym_eigen({TensorView(g.data(), Shape{C, C}), TensorView(vals.data(), Shape{C}),
                         TensorView(vecs.data(), Shape{C, C}), jacobi});
          double fro = 0;
          for (double v : g) fro += v * v;
          fro = std::sqrt(fro);
          double worst = 0, worst_orth = 0;
          for (std::int64_t j = 0; j < C; ++j) {
            double r2 = 0;
            for (std::int64_t i = 0; i < C; ++i) {
              double av = 0;
              for (std::int64_t t = 0; t < C; ++t) av += g[static_cast<std::size_t>(i * C + t)] * vecs[static_cast<std::size_t>(t * C + j)];
              const double r = av - vals[static_cast<std::size_t>(j)] * vecs[static_cast<std::size_t>(i * C + j)];
              r2 += r * r;
            }
            worst = std::max(worst, std::sqrt(r2));
            for (std::int64_t jj = 0; jj < C; ++jj) {
              double d = 0;
              for (std::int64_t i = 0; i < C; ++i) d += vecs[static_cast<std::size_t>(i * C + j)] * vecs[static_cast<std::size_t>(i * C + jj)];
              worst_orth = std::max(worst_orth, std::abs(d - (j == jj ? 1.0 : 0.0)));
            }
          }
          BOOST_TEST(worst <= 100 * C * u64 * fro);
          BOOST_TEST(worst_orth <= 100 * C * u64);
        }
      }
}

// Low-rank reconstruction loss (fwd f64 sum; bwd into f32 grads) and
// causal conv + projection (fwd f64; bwd into f32 grads), against double
// references. f64 parts: sums of <= C*dc (<= 33*13) terms: bound n u64 sum|.|
// (~5e-14 relative); the f32 gradient outputs add one rounding of the
// accumulation dst + g (u32 relative to |dst| + |g|): we check
// |got - want| <= 2 u32 (|dst0| + |g|) + 1e-12 |g|.
BOOST_AUTO_TEST_CASE(lowrank_recon_and_conv_project_every_backend) {
  for (Backend* be : backends())
    for (auto [N, C, dc] : {std::array<std::int64_t, 3>{7, 13, 5}, {13, 7, 7}, {33, 13, 3}}) {
      BOOST_TEST_CONTEXT(be->name() << " recon N=" << N << " C=" << C << " dc=" << dc) {
        if (skip_unsupported(*be, dsrsq::OpId::lowrank_recon)) continue;  // (conv_project below is skipped with it)
        dsrsq::Rng rng(8, static_cast<std::uint64_t>(N * C * dc));
        auto x = ref::normal<float>(N * C, rng), P = ref::normal<float>(dc * C, rng), U = ref::normal<float>(C * dc, rng);
        auto dP = ref::normal<float>(dc * C, rng), dU = ref::normal<float>(C * dc, rng);
        const auto dP0 = dP, dU0 = dU;
        const double scale = 0.37;
        const TensorView X(x.data(), Shape{N, C}), Pv(P.data(), Shape{dc, C}), Uv(U.data(), Shape{C, dc});
        const double got = be->lowrank_recon_fwd({X, Pv, Uv});
        be->lowrank_recon_bwd({X, Pv, Uv, TensorView(dP.data(), Shape{dc, C}), TensorView(dU.data(), Shape{C, dc}), scale});
        double want = 0;
        std::vector<double> gP(static_cast<std::size_t>(dc * C), 0.0), gU(static_cast<std::size_t>(C * dc), 0.0);
        for (std::int64_t n = 0; n < N; ++n) {
          std::vector<double> z(static_cast<std::size_t>(dc), 0.0), r(static_cast<std::size_t>(C), 0.0), ur(static_cast<std::size_t>(dc), 0.0);
          for (std::int64_t i = 0; i < dc; ++i)
            for (std::int64_t c = 0; c < C; ++c) z[static_cast<std::size_t>(i)] += static_cast<double>(P[static_cast<std::size_t>(i * C + c)]) * x[static_cast<std::size_t>(n * C + c)];
          for (std::int64_t c = 0; c < C; ++c) {
            for (std::int64_t i = 0; i < dc; ++i) r[static_cast<std::size_t>(c)] += static_cast<double>(U[static_cast<std::size_t>(c * dc + i)]) * z[static_cast<std::size_t>(i)];
            r[static_cast<std::size_t>(c)] -= x[static_cast<std::size_t>(n * C + c)];
            want += r[static_cast<std::size_t>(c)] * r[static_cast<std::size_t>(c)];
          }
          for (std::int64_t c = 0; c < C; ++c)
            for (std::int64_t i = 0; i < dc; ++i) {
              ur[static_cast<std::size_t>(i)] += static_cast<double>(U[static_cast<std::size_t>(c * dc + i)]) * r[static_cast<std::size_t>(c)];
              gU[static_cast<std::size_t>(c * dc + i)] += scale * r[static_cast<std::size_t>(c)] * z[static_cast<std::size_t>(i)];
            }
          for (std::int64_t i = 0; i < dc; ++i)
            for (std::int64_t c = 0; c < C; ++c) gP[static_cast<std::size_t>(i * C + c)] += scale * ur[static_cast<std::size_t>(i)] * x[static_cast<std::size_t>(n * C + c)];
        }
        BOOST_TEST(std::abs(got - want) <= 1e-12 * want);
        for (std::size_t i = 0; i < gP.size(); ++i)
          BOOST_TEST(std::abs(dP[i] - (dP0[i] + gP[i])) <= 2 * u32 * (std::abs(dP0[i]) + std::abs(gP[i])) + 1e-12 * std::abs(gP[i]));
        for (std::size_t i = 0; i < gU.size(); ++i)
          BOOST_TEST(std::abs(dU[i] - (dU0[i] + gU[i])) <= 2 * u32 * (std::abs(dU0[i]) + std::abs(gU[i])) + 1e-12 * std::abs(gU[i]));
      }
      const std::int64_t W = 3, R = dc;
      BOOST_TEST_CONTEXT(be->name() << " conv_project N=" << N << " C=" << C << " W=" << W << " R=" << R) {
        if (skip_unsupported(*be, dsrsq::OpId::conv_project)) continue;
        dsrsq::Rng rng(10, static_cast<std::uint64_t>(N * C));
        auto e = ref::normal<float>(N * C, rng), taps = ref::normal<float>(W * C, rng), w = ref::normal<float>(R * C, rng);
        std::vector<double> r(static_cast<std::size_t>(N * R)), dr = ref::normal<double>(N * R, rng);
        auto dw = ref::normal<float>(R * C, rng), dt = ref::normal<float>(W * C, rng);
        const auto dw0 = dw, dt0 = dt;
        const double weight = 0.61;
        const TensorView E(e.data(), Shape{N, C}), Tp(taps.data(), Shape{W, C}), Wv(w.data(), Shape{R, C});
        be->conv_project_fwd({E, Tp, Wv, TensorView(r.data(), Shape{N, R})});
        be->conv_project_bwd({E, Tp, Wv, TensorView(dr.data(), Shape{N, R}), TensorView(dw.data(), Shape{R, C}),
                              TensorView(dt.data(), Shape{W, C}), weight});
        std::vector<double> ep(static_cast<std::size_t>(N * C), 0.0), gw(static_cast<std::size_t>(R * C), 0.0), gt(static_cast<std::size_t>(W * C), 0.0);
        for (std::int64_t i = 0; i < N; ++i)
          for (std::int64_t t = 0; t < W && t <= i; ++t)
            for (std::int64_t c = 0; c < C; ++c) ep[static_cast<std::size_t>(i * C + c)] += static_cast<double>(taps[static_cast<std::size_t>(t * C + c)]) * e[static_cast<std::size_t>((i - t) * C + c)];
        for (std::int64_t i = 0; i < N; ++i)
          for (std::int64_t j = 0; j < R; ++j) {
            double s = 0, sa = 0;
            for (std::int64_t c = 0; c < C; ++c) {
              s += w[static_cast<std::size_t>(j * C + c)] * ep[static_cast<std::size_t>(i * C + c)];
              sa += std::abs(w[static_cast<std::size_t>(j * C + c)] * ep[static_cast<std::size_t>(i * C + c)]);
            }
            BOOST_TEST(std::abs(r[static_cast<std::size_t>(i * R + j)] - s) <= 2 * (C + W) * u64 * sa * 4);
            for (std::int64_t c = 0; c < C; ++c) {
              gw[static_cast<std::size_t>(j * C + c)] += weight * dr[static_cast<std::size_t>(i * R + j)] * ep[static_cast<std::size_t>(i * C + c)];
              for (std::int64_t t = 0; t < W && t <= i; ++t)
                gt[static_cast<std::size_t>(t * C + c)] += weight * dr[static_cast<std::size_t>(i * R + j)] * w[static_cast<std::size_t>(j * C + c)] * e[static_cast<std::size_t>((i - t) * C + c)];
            }
          }
        for (std::size_t i = 0; i < gw.size(); ++i)
          BOOST_TEST(std::abs(dw[i] - (dw0[i] + gw[i])) <= 2 * u32 * (std::abs(dw0[i]) + std::abs(gw[i])) + 1e-12 * std::abs(gw[i]));
        for (std::size_t i = 0; i < gt.size(); ++i)
          BOOST_TEST(std::abs(dt[i] - (dt0[i] + gt[i])) <= 2 * u32 * (std::abs(dt0[i]) + std::abs(gt[i])) + 1e-11 * (1 + std::abs(gt[i])));
      }
    }
}

// Host access checks the device; host <-> backend copies round-trip exactly.
BOOST_AUTO_TEST_CASE(host_access_checks_device) {
  float buf[6] = {1, 2, 3, 4, 5, 6};
  const TensorView on_gpu(buf, Shape{2, 3}, dsrsq::Device::cuda);
  BOOST_CHECK_THROW(on_gpu.ptr<float>(), dsrsq::Error);
  BOOST_CHECK_NO_THROW(on_gpu.device_ptr<float>());  // a backend's own kernels
  for (Backend* be : dsrsq::available_backends()) {  // the backends themselves, not staging fronts
    // The CPU backend refuses a CUDA-marked tensor rather than memcpy it.
    std::vector<std::byte> host(sizeof(buf));
    if (be->device() == dsrsq::Device::cpu) BOOST_CHECK_THROW(be->copy_to_host(on_gpu, host), dsrsq::Error);
    void* mem = be->allocator().allocate(sizeof(buf));  // the backend's own memory (device memory on a GPU)
    const TensorView t(mem, Shape{2, 3}, dsrsq::DType::f32, be->device());
    be->copy_from_host(std::as_bytes(std::span<const float>(buf, 6)), t);
    std::vector<float> back(6, -1.f);
    be->copy_to_host(t, std::as_writable_bytes(std::span<float>(back)));
    be->allocator().deallocate(mem);
    for (int i = 0; i < 6; ++i) BOOST_TEST(back[static_cast<std::size_t>(i)] == buf[i]);
  }
}
