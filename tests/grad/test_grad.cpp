// Level 3 gradient checks (STYLE.md 8.6): every backward of the CPU backend,
// run in f64, against central finite differences of the backend's own f64
// forward. The scalar is L = sum(out * G) with a fixed random G (for attention
// out = o; lse carries no loss), so dL/dout = G is what backward receives.
//
// Tolerance: ||analytic - numeric|| / ||numeric|| <= 1e-6. With step h = 1e-5
// the central difference has truncation error ~h^2 |L'''| / 6 ~ 1e-10 and
// rounding error ~1e-16 |L| / h ~ 1e-10 for |L| ~ 10; the measured errors are
// ~1e-10..1e-9, so 1e-6 has three orders of margin, while any wrong term in a
// backward (a missing scale, a transposed index, a lost tile) gives >= 1e-2.
//
// The second half checks the documented accumulate rules: "+=" gradients add
// onto nonzero buffers (result == initial + gradient), "=" gradients overwrite
// whatever was there (NaN garbage gives the same bits as a zeroed buffer).
#define BOOST_TEST_MODULE dsrsq_grad
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "../common/reference.hpp"
#include "backend/backend.hpp"

using dsrsq::Shape;
using dsrsq::TensorView;
using ref::IVec;
using ref::Vec;

namespace {

constexpr double kTol = 1e-6;   // see the file comment
constexpr double kStep = 1e-5;  // finite-difference step
constexpr double kAccTol = 1e-12;  // initial + gradient, summed in another order
const double kNaN = std::numeric_limits<double>::quiet_NaN();

dsrsq::Backend& be() { return dsrsq::cpu_backend(); }

TensorView tv(Vec& v, Shape s) {
  BOOST_REQUIRE_EQUAL(s.numel(), static_cast<std::int64_t>(v.size()));
  return TensorView(v.data(), s);
}
TensorView tv(IVec& v, Shape s) {
  BOOST_REQUIRE_EQUAL(s.numel(), static_cast<std::int64_t>(v.size()));
  return TensorView(v.data(), s);
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Compare an analytic gradient with central differences of loss() in x.
void check_grad(const char* what, const Vec& analytic, Vec& x, const std::function<double()>& loss) {
  Vec num(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + kStep;
    const double lp = loss();
    x[i] = x0 - kStep;
    const double lm = loss();
    x[i] = x0;
    num[i] = (lp - lm) / (2 * kStep);
  }
  const double e = ref::rel_err(analytic, num);
  BOOST_TEST(e <= kTol, what << ": relative error " << e << " (|numeric| = " << std::sqrt(dot(num, num)) << ")");
  BOOST_TEST(std::sqrt(dot(num, num)) > 0, what << ": gradient is identically zero, the check proves nothing");
}

// r == init + g (accumulate rule).
void check_accumulated(const char* what, const Vec& result, const Vec& init, const Vec& g) {
  Vec want(init.size());
  for (std::size_t i = 0; i < init.size(); ++i) want[i] = init[i] + g[i];
  const double e = ref::rel_err(result, want);
  BOOST_TEST(e <= kAccTol, what << ": '+=' rule broken, relative error " << e);
}

// Bitwise equality (overwrite rule: garbage in the buffer must not matter).
void check_same(const char* what, const Vec& a, const Vec& b) {
  bool same = a.size() == b.size();
  for (std::size_t i = 0; same && i < a.size(); ++i) same = a[i] == b[i];
  BOOST_TEST(same, what << ": '=' rule broken, result depends on the buffer's previous contents");
}

Vec randn(std::int64_t n, dsrsq::Rng& rng, double sd = 1.0, double mean = 0.0) { return ref::normal<double>(n, rng, sd, mean); }

}  // namespace

// ---- embedding ---------------------------------------------------------------
BOOST_AUTO_TEST_CASE(embedding_grad_f64) {
  const std::int64_t N = 13, V = 5, C = 3;
  dsrsq::Rng rng(31);
  IVec tok = ref::randint(N, rng, V);  // repeats: several rows scatter into one
  tok[0] = tok[1];
  Vec table = randn(V * C, rng), G = randn(N * C, rng), out(static_cast<std::size_t>(N * C));
  auto loss = [&] {
    be().embedding_fwd({tv(tok, Shape{N}), tv(table, Shape{V, C}), tv(out, Shape{N, C})});
    return dot(out, G);
  };
  Vec dt(static_cast<std::size_t>(V * C), 0.0);
  be().embedding_bwd({tv(tok, Shape{N}), tv(G, Shape{N, C}), tv(dt, Shape{V, C})});
  check_grad("embedding dtable", dt, table, loss);

  const Vec init = randn(V * C, rng);
  Vec acc = init;
  be().embedding_bwd({tv(tok, Shape{N}), tv(G, Shape{N, C}), tv(acc, Shape{V, C})});
  check_accumulated("embedding dtable", acc, init, dt);
}

// ---- rope ----------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(rope_grad_f64) {
  struct Case { std::int64_t N, NH, HS; std::int32_t max_pos; };
  for (Case c : {Case{1, 1, 2, 3}, Case{5, 2, 8, 1000}, Case{7, 3, 6, 1 << 20}}) {
    BOOST_TEST_CONTEXT(ref::name("rope N=", c.N, " NH=", c.NH, " HS=", c.HS, " pos<", c.max_pos)) {
      dsrsq::Rng rng(32, static_cast<std::uint64_t>(c.N));
      const std::int64_t n = c.N * c.NH * c.HS;
      IVec pos = ref::randint(c.N, rng, c.max_pos);
      Vec x = randn(n, rng), G = randn(n, rng);
      const Shape s{c.N, c.NH, c.HS};
      auto loss = [&] {
        Vec y = x;
        be().rope_fwd({tv(y, s), tv(pos, Shape{c.N}), 10000.0});
        return dot(y, G);
      };
      Vec g = G;  // rope_bwd works in place on the gradient
      be().rope_bwd({tv(g, s), tv(pos, Shape{c.N}), 10000.0});
      check_grad("rope dx", g, x, loss);
    }
  }
}

// ---- layernorm -------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(layernorm_grad_f64) {
  struct Case { std::int64_t N, C; };
  for (Case c : {Case{1, 2}, Case{3, 7}, Case{6, 33}}) {
    BOOST_TEST_CONTEXT(ref::name("layernorm N=", c.N, " C=", c.C)) {
      dsrsq::Rng rng(33, static_cast<std::uint64_t>(c.C));
      Vec x = randn(c.N * c.C, rng, 1.5, 0.7), w = randn(c.C, rng, 0.5, 1.0), b = randn(c.C, rng);
      Vec G = randn(c.N * c.C, rng), out(x.size()), mean(static_cast<std::size_t>(c.N)), rstd(mean.size());
      auto fwd = [&] {
        be().layernorm_fwd({tv(x, Shape{c.N, c.C}), tv(w, Shape{c.C}), tv(b, Shape{c.C}), tv(out, Shape{c.N, c.C}),
                            tv(mean, Shape{c.N}), tv(rstd, Shape{c.N}), 1e-5});
        return dot(out, G);
      };
      fwd();
      Vec dx(x.size(), 0.0), dw(w.size(), 0.0), db(b.size(), 0.0);
      auto bwd = [&](Vec& gx, Vec& gw, Vec& gb) {
        be().layernorm_bwd({tv(G, Shape{c.N, c.C}), tv(x, Shape{c.N, c.C}), tv(w, Shape{c.C}), tv(mean, Shape{c.N}),
                            tv(rstd, Shape{c.N}), tv(gx, Shape{c.N, c.C}), tv(gw, Shape{c.C}), tv(gb, Shape{c.C})});
      };
      bwd(dx, dw, db);
      // dx, dweight, dbias are all "+=".
      const Vec ix = randn(c.N * c.C, rng), iw = randn(c.C, rng), ib = randn(c.C, rng);
      Vec ax = ix, aw = iw, ab = ib;
      bwd(ax, aw, ab);
      check_accumulated("layernorm dx", ax, ix, dx);
      check_accumulated("layernorm dweight", aw, iw, dw);
      check_accumulated("layernorm dbias", ab, ib, db);
      check_grad("layernorm dx", dx, x, fwd);
      check_grad("layernorm dweight", dw, w, fwd);
      check_grad("layernorm dbias", db, b, fwd);
    }
  }
}

// ---- linear ------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(linear_grad_f64) {
  struct Case { std::int64_t N, C, OC; bool bias; };
  for (Case c : {Case{1, 1, 1, true}, Case{5, 7, 3, true}, Case{4, 3, 9, false}}) {
    BOOST_TEST_CONTEXT(ref::name("linear N=", c.N, " C=", c.C, " OC=", c.OC, " bias=", c.bias)) {
      dsrsq::Rng rng(34, static_cast<std::uint64_t>(c.N * 10 + c.C));
      Vec x = randn(c.N * c.C, rng), w = randn(c.OC * c.C, rng), b = randn(c.OC, rng), G = randn(c.N * c.OC, rng);
      Vec out(static_cast<std::size_t>(c.N * c.OC));
      auto fwd = [&] {
        be().linear_fwd({tv(x, Shape{c.N, c.C}), tv(w, Shape{c.OC, c.C}), c.bias ? tv(b, Shape{c.OC}) : TensorView{},
                         tv(out, Shape{c.N, c.OC})});
        return dot(out, G);
      };
      auto bwd = [&](Vec& gx, Vec& gw, Vec& gb, bool acc) {
        be().linear_bwd({tv(G, Shape{c.N, c.OC}), tv(x, Shape{c.N, c.C}), tv(w, Shape{c.OC, c.C}), tv(gx, Shape{c.N, c.C}),
                         tv(gw, Shape{c.OC, c.C}), c.bias ? tv(gb, Shape{c.OC}) : TensorView{}, acc});
      };
      Vec dx(x.size(), 0.0), dw(w.size(), 0.0), db(b.size(), 0.0);
      bwd(dx, dw, db, false);
      check_grad("linear dx", dx, x, fwd);
      check_grad("linear dweight", dw, w, fwd);
      if (c.bias) check_grad("linear dbias", db, b, fwd);

      // dx: "=" without dx_accumulate (garbage ignored), "+=" with it; dweight, dbias "+=".
      Vec gx(x.size(), kNaN), gw(w.size(), 0.0), gb(b.size(), 0.0);
      bwd(gx, gw, gb, false);
      check_same("linear dx (dx_accumulate=false)", gx, dx);
      const Vec ix = randn(c.N * c.C, rng), iw = randn(c.OC * c.C, rng), ib = randn(c.OC, rng);
      Vec ax = ix, aw = iw, ab = ib;
      bwd(ax, aw, ab, true);
      check_accumulated("linear dx (dx_accumulate=true)", ax, ix, dx);
      check_accumulated("linear dweight", aw, iw, dw);
      if (c.bias) check_accumulated("linear dbias", ab, ib, db);
      else check_same("linear dbias (not requested)", ab, ib);
    }
  }
}

// ---- matmul ----------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(matmul_grad_f64) {
  struct Case { std::int64_t batch, M, N, K; double alpha, beta; bool bias; };
  int idx = 0;
  for (Case c : {Case{0, 3, 4, 5, 1.0, 0.0, false}, Case{0, 1, 1, 1, 1.0, 0.0, true}, Case{0, 4, 3, 2, 0.7, 0.0, true},
                 Case{2, 3, 5, 4, 1.0, 0.0, false}, Case{3, 2, 3, 4, -1.3, 0.5, true}})
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2, batched = c.batch > 0;
      const std::int64_t nb = batched ? c.batch : 1;
      BOOST_TEST_CONTEXT(ref::name("matmul batch=", c.batch, " M=", c.M, " N=", c.N, " K=", c.K, " ta=", ta, " tb=", tb,
                                   " alpha=", c.alpha, " beta=", c.beta, " bias=", c.bias)) {
        dsrsq::Rng rng(35, static_cast<std::uint64_t>(idx++));
        auto shp = [&](std::int64_t r, std::int64_t cc) { return batched ? Shape{nb, r, cc} : Shape{r, cc}; };
        const Shape sa = ta ? shp(c.K, c.M) : shp(c.M, c.K), sb = tb ? shp(c.N, c.K) : shp(c.K, c.N),
                    sc = shp(c.M, c.N);
        Vec a = randn(nb * c.M * c.K, rng), b = randn(nb * c.K * c.N, rng), bias = randn(c.N, rng);
        const Vec c0 = randn(nb * c.M * c.N, rng);
        Vec G = randn(nb * c.M * c.N, rng), cbuf(c0.size());
        auto fwd = [&] {
          cbuf = c0;  // beta reads c: restore it before every forward
          be().matmul_fwd({tv(a, sa), tv(b, sb), tv(cbuf, sc), c.bias ? tv(bias, Shape{c.N}) : TensorView{}, ta, tb,
                           c.alpha, c.beta});
          return dot(cbuf, G);
        };
        Vec da(a.size(), 0.0), db(b.size(), 0.0), dbias(bias.size(), 0.0);
        be().matmul_bwd({tv(G, sc), tv(a, sa), tv(b, sb), tv(da, sa), tv(db, sb),
                         c.bias ? tv(dbias, Shape{c.N}) : TensorView{}, ta, tb, c.alpha});
        check_grad("matmul da", da, a, fwd);
        check_grad("matmul db", db, b, fwd);
        if (c.bias) check_grad("matmul dbias", dbias, bias, fwd);
        // da, db, dbias are all "+=".
        const Vec ia = randn(nb * c.M * c.K, rng), ib = randn(nb * c.K * c.N, rng), ibias = randn(c.N, rng);
        Vec aa = ia, ab = ib, abias = ibias;
        be().matmul_bwd({tv(G, sc), tv(a, sa), tv(b, sb), tv(aa, sa), tv(ab, sb),
                         c.bias ? tv(abias, Shape{c.N}) : TensorView{}, ta, tb, c.alpha});
        check_accumulated("matmul da", aa, ia, da);
        check_accumulated("matmul db", ab, ib, db);
        if (c.bias) check_accumulated("matmul dbias", abias, ibias, dbias);
      }
    }
}

// ---- gelu -----------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(gelu_grad_f64) {
  const std::int64_t n = 101;
  dsrsq::Rng rng(36);
  Vec x = randn(n, rng, 2.5), G = randn(n, rng), out(static_cast<std::size_t>(n));
  auto fwd = [&] {
    be().gelu_fwd({tv(x, Shape{n}), tv(out, Shape{n})});
    return dot(out, G);
  };
  Vec dx(static_cast<std::size_t>(n), 0.0);
  be().gelu_bwd({tv(G, Shape{n}), tv(x, Shape{n}), tv(dx, Shape{n})});
  check_grad("gelu dx", dx, x, fwd);
  Vec gx(static_cast<std::size_t>(n), kNaN);  // "=": garbage is overwritten
  be().gelu_bwd({tv(G, Shape{n}), tv(x, Shape{n}), tv(gx, Shape{n})});
  check_same("gelu dx", gx, dx);
}

// ---- attention ----------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(attention_grad_f64) {
  enum Kind { end, shuffled, late, per_batch };
  struct Case { std::int64_t B, T, S, NH, HS; bool causal; Kind kind; double scale; const char* what; };
  const std::vector<Case> cases = {
      {1, 5, 5, 2, 4, true, end, 0.0, "T=S causal"},
      {2, 4, 9, 2, 4, true, end, 0.0, "S>T queries at the end of keys"},
      {1, 6, 11, 1, 4, true, shuffled, 0.0, "shuffled key positions"},
      {2, 5, 7, 2, 4, false, shuffled, 0.0, "non-causal"},
      {1, 7, 6, 1, 4, true, late, 0.0, "rows without visible keys"},
      {2, 6, 8, 1, 4, true, per_batch, 0.3, "per-batch positions, explicit scale"},
      {1, 70, 140, 1, 2, true, end, 0.0, "crossing the 64-row / 128-key tiles"},
  };
  int idx = 0;
  for (const Case& c : cases) {
    BOOST_TEST_CONTEXT(ref::name("attention ", c.what, ": B=", c.B, " T=", c.T, " S=", c.S, " NH=", c.NH, " HS=", c.HS,
                                 " causal=", c.causal, " scale=", c.scale)) {
      dsrsq::Rng rng(37, static_cast<std::uint64_t>(idx++));
      IVec qpos(static_cast<std::size_t>(c.B * c.T)), kpos(static_cast<std::size_t>(c.B * c.S));
      for (std::int64_t b = 0; b < c.B; ++b) {
        IVec kp(static_cast<std::size_t>(c.S));
        const int off = c.kind == per_batch ? static_cast<int>(b) * 5 : 0;
        for (std::int64_t j = 0; j < c.S; ++j) kp[static_cast<std::size_t>(j)] = off + static_cast<std::int32_t>(j);
        for (std::int64_t i = 0; i < c.T; ++i)
          qpos[static_cast<std::size_t>(b * c.T + i)] = off + static_cast<std::int32_t>(c.S - c.T + i);
        if (c.kind == shuffled || (c.kind == per_batch && b == 1)) ref::shuffle(kp, rng);
        if (c.kind == late) {  // keys at 3..; queries at 0..T-1: rows 0..2 see nothing
          for (std::int64_t j = 0; j < c.S; ++j) kp[static_cast<std::size_t>(j)] = 3 + static_cast<std::int32_t>(j);
          for (std::int64_t i = 0; i < c.T; ++i) qpos[static_cast<std::size_t>(b * c.T + i)] = static_cast<std::int32_t>(i);
        }
        std::copy(kp.begin(), kp.end(), kpos.begin() + b * c.S);
      }
      const Shape qs{c.B, c.T, c.NH, c.HS}, ks{c.B, c.S, c.NH, c.HS}, ls{c.B, c.NH, c.T};
      Vec q = randn(qs.numel(), rng), k = randn(ks.numel(), rng), v = randn(ks.numel(), rng), G = randn(qs.numel(), rng);
      Vec o(static_cast<std::size_t>(qs.numel())), lse(static_cast<std::size_t>(ls.numel()));
      auto fwd = [&] {
        be().attention_fwd({tv(q, qs), tv(k, ks), tv(v, ks), tv(o, qs), tv(lse, ls), tv(qpos, Shape{c.B, c.T}),
                            tv(kpos, Shape{c.B, c.S}), c.causal, c.scale});
        return dot(o, G);
      };
      fwd();
      if (c.kind == late) BOOST_TEST((std::isinf(lse[0]) && lse[0] < 0), "row 0 should see no key");
      auto bwd = [&](Vec& dq, Vec& dk, Vec& dv) {
        be().attention_bwd({tv(G, qs), tv(q, qs), tv(k, ks), tv(v, ks), tv(o, qs), tv(lse, ls), tv(qpos, Shape{c.B, c.T}),
                            tv(kpos, Shape{c.B, c.S}), tv(dq, qs), tv(dk, ks), tv(dv, ks), c.causal, c.scale});
      };
      Vec dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0);
      bwd(dq, dk, dv);
      // dq, dk, dv are all "+=".
      const Vec iq = randn(qs.numel(), rng), ik = randn(ks.numel(), rng), iv = randn(ks.numel(), rng);
      Vec aq = iq, ak = ik, av = iv;
      bwd(aq, ak, av);
      check_accumulated("attention dq", aq, iq, dq);
      check_accumulated("attention dk", ak, ik, dk);
      check_accumulated("attention dv", av, iv, dv);
      check_grad("attention dq", dq, q, fwd);
      check_grad("attention dk", dk, k, fwd);
      check_grad("attention dv", dv, v, fwd);
    }
  }
}

// ---- cross-entropy ---------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(cross_entropy_grad_f64) {
  struct Case { std::int64_t N, V; double inv_norm, dloss; };
  for (Case c : {Case{1, 2, 1.0, 1.0}, Case{6, 5, 0.2, 1.0}, Case{9, 11, 0.37, -2.5}}) {
    BOOST_TEST_CONTEXT(ref::name("cross_entropy N=", c.N, " V=", c.V, " inv_norm=", c.inv_norm, " dloss=", c.dloss)) {
      dsrsq::Rng rng(38, static_cast<std::uint64_t>(c.N));
      Vec logits = randn(c.N * c.V, rng, 2.0), mask(static_cast<std::size_t>(c.N)), losses(mask.size());
      IVec tgt = ref::randint(c.N, rng, c.V);
      for (std::int64_t n = 0; n < c.N; ++n) {
        mask[static_cast<std::size_t>(n)] = n == 0 ? 1.0 : (n % 3 == 1 ? 0.0 : (n % 3 == 2 ? 0.5 : 1.0));
        if (mask[static_cast<std::size_t>(n)] == 0) tgt[static_cast<std::size_t>(n)] = 1 << 20;  // ignored row
      }
      auto fwd = [&] {
        return c.dloss * be().cross_entropy_fwd({tv(logits, Shape{c.N, c.V}), tv(tgt, Shape{c.N}), tv(mask, Shape{c.N}),
                                                 tv(losses, Shape{c.N}), c.inv_norm});
      };
      Vec dl(logits.size(), 0.0);
      auto bwd = [&](Vec& d) {
        be().cross_entropy_bwd({tv(logits, Shape{c.N, c.V}), tv(tgt, Shape{c.N}), tv(mask, Shape{c.N}),
                                tv(d, Shape{c.N, c.V}), c.inv_norm, c.dloss});
      };
      bwd(dl);
      check_grad("cross_entropy dlogits", dl, logits, fwd);
      Vec g(logits.size(), kNaN);  // "=": garbage is overwritten (masked rows too)
      bwd(g);
      check_same("cross_entropy dlogits", g, dl);
    }
  }
}
