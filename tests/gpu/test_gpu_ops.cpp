// Every op the CUDA backend supports, on odd sizes, forward and backward,
// against the CPU backend and a double-precision reference (the CPU backend
// run in f64 on the same f32-representable inputs; AdamW, f32-only, by its
// formula in double). flash-attention's rule: per output,
//   err_cuda <= 2 * err_cpu + floor,   err = max |out - ref|,
// where err_cpu is the CPU backend's f32 error on the same case and floor =
// 2^-22 * max |ref| (four f32 ulps of the largest value) covers outputs the
// CPU computes exactly (copies, integer-valued sums, indices), where the rule
// then asks for exact or near-exact agreement. NaN/Inf in a CUDA output fails
// unless the reference holds the same infinity there (lse of a row without
// visible keys is -inf). Device buffers are framed by guard zones checked
// after every op (tests/common/staging.hpp).
//
// One row per (op, case, output), nccl-tests style; exit 0 when all pass, 1
// when any fails, 77 (skipped, reason printed) without a GPU.
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/staging.hpp"
#include "backend/backend.hpp"
#include "backend/cuda/cuda_device.hpp"
#include "core/rng.hpp"

using dsrsq::Backend;
using dsrsq::DType;
using dsrsq::OpId;
using dsrsq::Shape;
using dsrsq::TensorView;
using Outs = std::vector<std::vector<double>>;

namespace {

int g_rows = 0, g_failed = 0;

// f32-representable normals (so f32 and f64 runs read identical values).
std::vector<double> normals(std::int64_t n, dsrsq::Rng& rng, double sd = 1.0, double mean = 0.0) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<double>(static_cast<float>(mean + sd * rng.normal()));
  return v;
}
std::vector<std::int32_t> ints(std::int64_t n, dsrsq::Rng& rng, std::int64_t below) {
  std::vector<std::int32_t> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(below)));
  return v;
}
template <class T>
std::vector<T> as(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <class T>
std::vector<double> back(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}
template <class T>
TensorView tv(std::vector<T>& v, Shape s) {
  return TensorView(v.data(), s);
}

double diff(double a, double r) {
  if (std::isinf(r) && a == r) return 0.0;  // the same infinity (lse of an empty row)
  if (!std::isfinite(a)) return INFINITY;
  return std::fabs(a - r);
}

void check(const std::string& op, const std::string& cas, const std::string& out, const std::vector<double>& cpu,
           const std::vector<double>& gpu, const std::vector<double>& ref) {
  double ec = 0, eg = 0, mx = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    ec = std::fmax(ec, diff(cpu[i], ref[i]));
    eg = std::fmax(eg, diff(gpu[i], ref[i]));
    if (std::isfinite(ref[i])) mx = std::fmax(mx, std::fabs(ref[i]));
  }
  const double bound = 2 * ec + 0x1.0p-22 * mx;
  const bool ok = gpu.size() == ref.size() && eg <= bound;
  ++g_rows;
  g_failed += !ok;
  std::printf("%-18s %-44s %-8s %10.3e %10.3e %10.3e  %s\n", op.c_str(), cas.c_str(), out.c_str(), ec, eg, bound,
              ok ? "ok" : "FAIL");
}

// Runs `run(backend, T{})` on the CPU in f32, on the GPU in f32 and on the
// CPU in f64, and checks every output.
template <class Run>
void compare(Backend& cpu, Backend& gpu, const std::string& op, const std::string& cas,
             const std::vector<std::string>& names, Run&& run) {
  try {
    const Outs c = run(cpu, float{}), g = run(gpu, float{}), r = run(cpu, double{});
    for (std::size_t i = 0; i < names.size(); ++i) check(op, cas, names[i], c[i], g[i], r[i]);
  } catch (const std::exception& e) {
    ++g_rows;
    ++g_failed;
    std::printf("%-18s %-44s error: %s  FAIL\n", op.c_str(), cas.c_str(), e.what());
  }
}

std::string cat(std::initializer_list<std::pair<const char*, std::int64_t>> kv) {
  std::string s;
  for (auto& [k, v] : kv) s += std::string(s.empty() ? "" : " ") + k + "=" + std::to_string(v);
  return s;
}

// ---- the ops ------------------------------------------------------------------
void embedding(Backend& cpu, Backend& gpu) {
  for (auto [N, V, C] : {std::array<std::int64_t, 3>{1, 1, 1}, {113, 50, 1023}, {1025, 7, 113}}) {
    dsrsq::Rng rng(1, static_cast<std::uint64_t>(N + C));
    const auto tok = ints(N, rng, V);
    const auto table = normals(V * C, rng), dout = normals(N * C, rng), dtab0 = normals(V * C, rng);
    compare(cpu, gpu, "embedding", cat({{"N", N}, {"V", V}, {"C", C}}), {"out", "dtable"}, [&](Backend& be, auto z) {
      using T = decltype(z);
      auto tk = tok;
      auto t = as<T>(table), out = std::vector<T>(static_cast<std::size_t>(N * C)), d = as<T>(dout), dt = as<T>(dtab0);
      be.embedding_fwd({tv(tk, Shape{N}), tv(t, Shape{V, C}), tv(out, Shape{N, C})});
      be.embedding_bwd({tv(tk, Shape{N}), tv(d, Shape{N, C}), tv(dt, Shape{V, C})});
      return Outs{back(out), back(dt)};
    });
  }
}

void rope(Backend& cpu, Backend& gpu) {
  for (auto [N, NH, HS, maxpos] : {std::array<std::int64_t, 4>{1, 1, 2, 1}, {113, 3, 64, 100000}, {1025, 1, 128, 1 << 20}}) {
    dsrsq::Rng rng(2, static_cast<std::uint64_t>(N + HS));
    const auto pos = ints(N, rng, maxpos);
    const auto x = normals(N * NH * HS, rng);
    compare(cpu, gpu, "rope", cat({{"N", N}, {"NH", NH}, {"HS", HS}}), {"fwd", "bwd"}, [&](Backend& be, auto z) {
      using T = decltype(z);
      auto p = pos;
      auto a = as<T>(x), b = as<T>(x);
      be.rope_fwd({tv(a, Shape{N, NH, HS}), tv(p, Shape{N}), 10000.0});
      be.rope_bwd({tv(b, Shape{N, NH, HS}), tv(p, Shape{N}), 10000.0});
      return Outs{back(a), back(b)};
    });
  }
}

void layernorm(Backend& cpu, Backend& gpu) {
  for (auto [N, C] : {std::array<std::int64_t, 2>{1, 3}, {113, 1023}, {40, 1025}}) {
    dsrsq::Rng rng(3, static_cast<std::uint64_t>(N + C));
    const auto x = normals(N * C, rng, 2.0, 3.0), w = normals(C, rng, 0.5, 1.0), b = normals(C, rng);
    const auto dout = normals(N * C, rng), dx0 = normals(N * C, rng), dw0 = normals(C, rng), db0 = normals(C, rng);
    compare(cpu, gpu, "layernorm", cat({{"N", N}, {"C", C}}), {"out", "mean", "rstd", "dx", "dw", "db"},
            [&](Backend& be, auto z) {
              using T = decltype(z);
              auto X = as<T>(x), W = as<T>(w), Bv = as<T>(b), D = as<T>(dout), dX = as<T>(dx0), dW = as<T>(dw0),
                   dB = as<T>(db0);
              std::vector<T> out(static_cast<std::size_t>(N * C)), mean(static_cast<std::size_t>(N)), rstd(mean.size());
              be.layernorm_fwd({tv(X, Shape{N, C}), tv(W, Shape{C}), tv(Bv, Shape{C}), tv(out, Shape{N, C}),
                                tv(mean, Shape{N}), tv(rstd, Shape{N}), 1e-5});
              be.layernorm_bwd({tv(D, Shape{N, C}), tv(X, Shape{N, C}), tv(W, Shape{C}), tv(mean, Shape{N}),
                                tv(rstd, Shape{N}), tv(dX, Shape{N, C}), tv(dW, Shape{C}), tv(dB, Shape{C})});
              return Outs{back(out), back(mean), back(rstd), back(dX), back(dW), back(dB)};
            });
  }
}

void linear_and_matmul(Backend& cpu, Backend& gpu) {
  for (auto [N, C, OC] : {std::array<std::int64_t, 3>{1, 1, 1}, {113, 1023, 3}, {1025, 113, 257}}) {
    dsrsq::Rng rng(4, static_cast<std::uint64_t>(N + C + OC));
    const auto x = normals(N * C, rng), w = normals(OC * C, rng), b = normals(OC, rng), dout = normals(N * OC, rng);
    const auto dx0 = normals(N * C, rng), dw0 = normals(OC * C, rng), db0 = normals(OC, rng);
    compare(cpu, gpu, "linear", cat({{"N", N}, {"C", C}, {"OC", OC}}), {"out", "dx", "dweight", "dbias"},
            [&](Backend& be, auto z) {
              using T = decltype(z);
              auto X = as<T>(x), W = as<T>(w), Bv = as<T>(b), D = as<T>(dout), dX = as<T>(dx0), dW = as<T>(dw0),
                   dB = as<T>(db0);
              std::vector<T> out(static_cast<std::size_t>(N * OC));
              be.linear_fwd({tv(X, Shape{N, C}), tv(W, Shape{OC, C}), tv(Bv, Shape{OC}), tv(out, Shape{N, OC})});
              be.linear_bwd({tv(D, Shape{N, OC}), tv(X, Shape{N, C}), tv(W, Shape{OC, C}), tv(dX, Shape{N, C}),
                             tv(dW, Shape{OC, C}), tv(dB, Shape{OC}), true});
              return Outs{back(out), back(dX), back(dW), back(dB)};
            });
  }
  // Batched, transposed, alpha/beta: the strided-batched path.
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    const std::int64_t Bt = 3, M = 113, N = 7, K = 1025;
    dsrsq::Rng rng(5, static_cast<std::uint64_t>(t));
    const auto a = normals(Bt * M * K, rng), b = normals(Bt * K * N, rng), c0 = normals(Bt * M * N, rng);
    const auto dc = normals(Bt * M * N, rng), da0 = normals(Bt * M * K, rng), db0 = normals(Bt * K * N, rng);
    compare(cpu, gpu, "matmul(batched)", cat({{"B", Bt}, {"M", M}, {"N", N}, {"K", K}, {"ta", ta}, {"tb", tb}}),
            {"c", "da", "db"}, [&](Backend& be, auto z) {
              using T = decltype(z);
              auto A = as<T>(a), Bm = as<T>(b), Cm = as<T>(c0), dC = as<T>(dc), dA = as<T>(da0), dB = as<T>(db0);
              const Shape sa = ta ? Shape{Bt, K, M} : Shape{Bt, M, K}, sb = tb ? Shape{Bt, N, K} : Shape{Bt, K, N};
              be.matmul_fwd({tv(A, sa), tv(Bm, sb), tv(Cm, Shape{Bt, M, N}), {}, ta, tb, 0.75, 0.5});
              be.matmul_bwd({tv(dC, Shape{Bt, M, N}), tv(A, sa), tv(Bm, sb), tv(dA, sa), tv(dB, sb), {}, ta, tb, 0.75});
              return Outs{back(Cm), back(dA), back(dB)};
            });
  }
}

void gelu(Backend& cpu, Backend& gpu) {
  for (std::int64_t n : {1, 3, 1023, 100003}) {
    dsrsq::Rng rng(6, static_cast<std::uint64_t>(n));
    const auto x = normals(n, rng, 3.0), dout = normals(n, rng);
    compare(cpu, gpu, "gelu", cat({{"n", n}}), {"out", "dx"}, [&](Backend& be, auto z) {
      using T = decltype(z);
      auto X = as<T>(x), D = as<T>(dout);
      std::vector<T> out(static_cast<std::size_t>(n)), dx(static_cast<std::size_t>(n));
      be.gelu_fwd({tv(X, Shape{n}), tv(out, Shape{n})});
      be.gelu_bwd({tv(D, Shape{n}), tv(X, Shape{n}), tv(dx, Shape{n})});
      return Outs{back(out), back(dx)};
    });
  }
}

enum class Pos { end, shuffled, late };

void attention(Backend& cpu, Backend& gpu) {
  struct Case {
    std::int64_t B, T, S, NH, HS;
    bool causal;
    Pos pos;
    double scale;
  };
  for (const Case c : {Case{1, 113, 113, 3, 64, true, Pos::end, 0.0}, Case{2, 77, 333, 2, 64, true, Pos::end, 0.0},
                       Case{1, 1, 1000, 2, 64, true, Pos::end, 0.0}, Case{1, 3, 517, 1, 128, true, Pos::end, 0.0},
                       Case{1, 200, 300, 2, 128, true, Pos::shuffled, 0.0}, Case{1, 100, 60, 2, 32, true, Pos::late, 0.0},
                       Case{2, 90, 200, 1, 256, false, Pos::end, 0.0}, Case{1, 65, 129, 1, 24, true, Pos::end, 0.3},
                       Case{1, 1023, 1025, 1, 8, true, Pos::end, 0.0}, Case{1, 1, 1, 1, 2, true, Pos::end, 0.0}}) {
    dsrsq::Rng rng(7, static_cast<std::uint64_t>(c.T * 131 + c.S + c.HS));
    std::vector<std::int32_t> qp(static_cast<std::size_t>(c.B * c.T)), kp(static_cast<std::size_t>(c.B * c.S));
    for (std::int64_t b = 0; b < c.B; ++b) {
      for (std::int64_t j = 0; j < c.S; ++j)
        kp[static_cast<std::size_t>(b * c.S + j)] = static_cast<std::int32_t>(c.pos == Pos::late ? 40 + j : j);
      for (std::int64_t i = 0; i < c.T; ++i)
        qp[static_cast<std::size_t>(b * c.T + i)] =
            static_cast<std::int32_t>(c.pos == Pos::late ? i : std::max<std::int64_t>(0, c.S - c.T) + std::min(i, c.S - 1));
      if (c.pos == Pos::shuffled)
        for (std::int64_t j = c.S - 1; j > 0; --j)
          std::swap(kp[static_cast<std::size_t>(b * c.S + j)],
                    kp[static_cast<std::size_t>(b * c.S + static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(j + 1))))]);
    }
    const std::int64_t nq = c.B * c.T * c.NH * c.HS, nk = c.B * c.S * c.NH * c.HS;
    const auto q = normals(nq, rng, 1.2), k = normals(nk, rng, 1.2), v = normals(nk, rng), dout = normals(nq, rng);
    const auto dq0 = normals(nq, rng), dk0 = normals(nk, rng), dv0 = normals(nk, rng);
    const std::string name = cat({{"B", c.B}, {"T", c.T}, {"S", c.S}, {"NH", c.NH}, {"HS", c.HS}, {"causal", c.causal},
                                  {"pos", static_cast<int>(c.pos)}});
    compare(cpu, gpu, "attention", name, {"o", "lse", "dq", "dk", "dv"}, [&](Backend& be, auto z) {
      using T = decltype(z);
      auto Q = as<T>(q), K = as<T>(k), V = as<T>(v), D = as<T>(dout), dQ = as<T>(dq0), dK = as<T>(dk0), dV = as<T>(dv0);
      auto QP = qp, KP = kp;
      std::vector<T> o(static_cast<std::size_t>(nq)), lse(static_cast<std::size_t>(c.B * c.NH * c.T));
      const Shape qs{c.B, c.T, c.NH, c.HS}, ks{c.B, c.S, c.NH, c.HS}, ls{c.B, c.NH, c.T};
      be.attention_fwd({tv(Q, qs), tv(K, ks), tv(V, ks), tv(o, qs), tv(lse, ls), tv(QP, Shape{c.B, c.T}),
                        tv(KP, Shape{c.B, c.S}), c.causal, c.scale});
      be.attention_bwd({tv(D, qs), tv(Q, qs), tv(K, ks), tv(V, ks), tv(o, qs), tv(lse, ls), tv(QP, Shape{c.B, c.T}),
                        tv(KP, Shape{c.B, c.S}), tv(dQ, qs), tv(dK, ks), tv(dV, ks), c.causal, c.scale});
      return Outs{back(o), back(lse), back(dQ), back(dK), back(dV)};
    });
  }
}

void cross_entropy(Backend& cpu, Backend& gpu) {
  for (auto [N, V] : {std::array<std::int64_t, 2>{1, 1}, {113, 1023}, {37, 50257}}) {
    dsrsq::Rng rng(8, static_cast<std::uint64_t>(N + V));
    const auto logits = normals(N * V, rng, 3.0);
    const auto tgt = ints(N, rng, V);
    std::vector<double> mask(static_cast<std::size_t>(N));
    for (auto& m : mask) m = rng.below(4) == 0 ? 0.0 : 1.0;
    compare(cpu, gpu, "cross_entropy", cat({{"N", N}, {"V", V}}), {"losses", "total", "dlogits"},
            [&](Backend& be, auto z) {
              using T = decltype(z);
              auto L = as<T>(logits), M = as<T>(mask);
              auto tg = tgt;
              std::vector<T> losses(static_cast<std::size_t>(N)), dl(static_cast<std::size_t>(N * V));
              const double total = be.cross_entropy_fwd({tv(L, Shape{N, V}), tv(tg, Shape{N}), tv(M, Shape{N}),
                                                         tv(losses, Shape{N}), 1.0 / static_cast<double>(N)});
              be.cross_entropy_bwd({tv(L, Shape{N, V}), tv(tg, Shape{N}), tv(M, Shape{N}), tv(dl, Shape{N, V}),
                                    1.0 / static_cast<double>(N), 0.7});
              return Outs{back(losses), {total}, back(dl)};
            });
  }
}

void adamw(Backend& cpu, Backend& gpu) {
  for (std::int64_t n : {1, 1023, 100003}) {
    dsrsq::Rng rng(9, static_cast<std::uint64_t>(n));
    const auto p = normals(n, rng), g = normals(n, rng), m = normals(n, rng, 0.1);
    auto v = normals(n, rng, 0.1);
    for (auto& x : v) x = std::fabs(x);
    const double lr = 3e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1, gs = 0.5;
    const std::int64_t step = 7;
    compare(cpu, gpu, "adamw", cat({{"n", n}}), {"params", "m", "v"}, [&](Backend& be, auto z) {
      using T = decltype(z);
      if constexpr (std::is_same_v<T, float>) {
        auto P = as<float>(p), G = as<float>(g), M = as<float>(m), Vv = as<float>(v);
        be.adamw({tv(P, Shape{n}), tv(G, Shape{n}), tv(M, Shape{n}), tv(Vv, Shape{n}), lr, b1, b2, eps, wd, gs, step});
        return Outs{back(P), back(M), back(Vv)};
      } else {  // the formula in double (the op is f32-only)
        auto P = p, M = m, Vv = v;
        const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
        for (std::size_t i = 0; i < P.size(); ++i) {
          const double gi = g[i] * gs;
          M[i] = b1 * M[i] + (1 - b1) * gi;
          Vv[i] = b2 * Vv[i] + (1 - b2) * gi * gi;
          P[i] -= lr * ((M[i] / bc1) / (std::sqrt(Vv[i] / bc2) + eps) + wd * P[i]);
        }
        return Outs{P, M, Vv};
      }
    });
  }
}

void elementwise(Backend& cpu, Backend& gpu) {
  for (std::int64_t n : {1, 3, 1023, 1000003}) {
    dsrsq::Rng rng(10, static_cast<std::uint64_t>(n));
    const auto x = normals(n, rng), y = normals(n, rng);
    compare(cpu, gpu, "axpy/fill/copy/scale/ssq", cat({{"n", n}}), {"axpy", "fill", "copy", "scale", "sumsq"},
            [&](Backend& be, auto z) {
              using T = decltype(z);
              auto X = as<T>(x), Y = as<T>(y), F = as<T>(y), Cp = std::vector<T>(static_cast<std::size_t>(n)),
                   S = as<T>(x);
              be.axpy({tv(X, Shape{n}), tv(Y, Shape{n}), -0.75});
              be.fill(tv(F, Shape{n}), 1.25);
              be.copy(tv(X, Shape{n}), tv(Cp, Shape{n}));
              be.scale(tv(S, Shape{n}), 0.3);
              const double ss = be.sum_squares(tv(X, Shape{n}));
              return Outs{back(Y), back(F), back(Cp), back(S), {ss}};
            });
  }
}

void rows(Backend& cpu, Backend& gpu) {
  for (auto [N, M, C] : {std::array<std::int64_t, 3>{7, 13, 33}, {13, 7, 1}, {1000, 3001, 65}}) {
    dsrsq::Rng rng(11, static_cast<std::uint64_t>(N + M + C));
    const auto src = normals(N * C, rng), dst0 = normals(N * C, rng);
    const auto idx = ints(M, rng, N);
    compare(cpu, gpu, "gather/scatter", cat({{"N", N}, {"M", M}, {"C", C}}), {"gather", "scatter"},
            [&](Backend& be, auto z) {
              using T = decltype(z);
              auto S = as<T>(src), D0 = as<T>(dst0);
              auto I = idx;
              std::vector<T> g(static_cast<std::size_t>(M * C));
              be.gather_rows({tv(S, Shape{N, C}), tv(I, Shape{M}), tv(g, Shape{M, C})});
              be.scatter_add_rows({tv(g, Shape{M, C}), tv(I, Shape{M}), tv(D0, Shape{N, C})});
              return Outs{back(g), back(D0)};
            });
  }
}

void merge(Backend& cpu, Backend& gpu) {
  const std::int64_t B = 2, T = 33, NH = 3, HS = 65;
  dsrsq::Rng rng(12, 1);
  const auto o = normals(B * T * NH * HS, rng), ob = normals(B * T * NH * HS, rng);
  auto l = normals(B * NH * T, rng, 3.0), lb = normals(B * NH * T, rng, 3.0);
  l[0] = -INFINITY;   // one side empty
  lb[1] = -INFINITY;  // the other side empty
  l[2] = lb[2] = -INFINITY;
  compare(cpu, gpu, "attention_merge", cat({{"B", B}, {"T", T}, {"NH", NH}, {"HS", HS}}), {"o", "lse"},
          [&](Backend& be, auto z) {
            using T_ = decltype(z);
            auto O = as<T_>(o), Ob = as<T_>(ob), L = as<T_>(l), Lb = as<T_>(lb);
            be.attention_merge({tv(O, Shape{B, T, NH, HS}), tv(L, Shape{B, NH, T}), tv(Ob, Shape{B, T, NH, HS}),
                                tv(Lb, Shape{B, NH, T})});
            return Outs{back(O), back(L)};
          });
}

void select_ops(Backend& cpu, Backend& gpu) {
  for (auto [R, N, K] : {std::array<std::int64_t, 3>{7, 13, 5}, {3, 4099, 257}, {1, 33000, 2048}}) {
    dsrsq::Rng rng(13, static_cast<std::uint64_t>(N));
    std::vector<double> x(static_cast<std::size_t>(R * N));
    for (auto& v : x) v = static_cast<double>(rng.below(50));  // many ties
    x[1] = NAN;
    compare(cpu, gpu, "topk", cat({{"R", R}, {"N", N}, {"k", K}}), {"idx"}, [&](Backend& be, auto) {
      auto X = as<float>(x);  // f32 on every run (the CUDA kernel is f32-only; indices are exact)
      std::vector<std::int32_t> idx(static_cast<std::size_t>(R * K));
      be.topk({tv(X, Shape{R, N}), tv(idx, Shape{R, K})});
      return Outs{back(idx)};
    });
  }
  for (auto [G, N, M, D] : {std::array<std::int64_t, 4>{1, 13, 3, 5}, {6, 1001, 17, 64}}) {
    dsrsq::Rng rng(14, static_cast<std::uint64_t>(N));
    const auto x = normals(G * N * D, rng), c = normals(G * M * D, rng);
    compare(cpu, gpu, "kmeans_assign", cat({{"G", G}, {"N", N}, {"M", M}, {"D", D}}), {"assign", "dist"},
            [&](Backend& be, auto z) {
              using T = decltype(z);
              auto X = as<T>(x), Cc = as<T>(c);
              std::vector<std::int32_t> as_(static_cast<std::size_t>(G * N));
              std::vector<double> dist(as_.size());
              be.kmeans_assign({tv(X, Shape{G, N, D}), tv(Cc, Shape{G, M, D}), tv(as_, Shape{G, N}), tv(dist, Shape{G, N}), 0});
              return Outs{back(as_), dist};
            });
  }
  // Latent attention (RCKV's buffer), with and without clusters (SQA at decode),
  // with the mass statistic merged against another partial, and the used counts.
  for (auto [B, T, S, NH, HS, dc, M] : {std::array<std::int64_t, 7>{1, 7, 13, 3, 5, 7, 0}, {2, 3, 300, 4, 64, 33, 0},
                                        {2, 5, 257, 3, 32, 16, 9}, {1, 1, 1000, 2, 64, 64, 40}}) {
    dsrsq::Rng rng(17, static_cast<std::uint64_t>(S * dc + M));
    const std::int64_t Sp = S + 3, clusters = M > 0 ? M - 1 : 0, top = M > 0 ? 3 : 0;
    const auto q = normals(B * T * NH * HS, rng), k = normals(B * S * NH * HS, rng), lat = normals(B * Sp * dc, rng),
               up = normals(NH * HS * dc, rng), lo = normals(B * NH * T, rng), cen = normals(B * NH * std::max<std::int64_t>(M, 1) * HS, rng);
    std::vector<std::int32_t> qp(static_cast<std::size_t>(B * T)), kp(static_cast<std::size_t>(B * Sp), 1 << 29);
    std::vector<std::int32_t> assign(static_cast<std::size_t>(B * NH * Sp), -1), sizes(static_cast<std::size_t>(B * NH * std::max<std::int64_t>(M, 1)), 0);
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t i = 0; i < T; ++i) qp[static_cast<std::size_t>(b * T + i)] = static_cast<std::int32_t>(S / 2 + i);
      for (std::int64_t j = 0; j < S; ++j) kp[static_cast<std::size_t>(b * Sp + j)] = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(S)));
    }
    if (M > 0)
      for (std::int64_t g = 0; g < B * NH; ++g)
        for (std::int64_t j = 0; j < S; ++j) {
          const std::int64_t c = static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(M + 1))) - 1;  // -1: unassigned
          assign[static_cast<std::size_t>(g * Sp + j)] = static_cast<std::int32_t>(c);
          if (c >= 0 && c != 2) ++sizes[static_cast<std::size_t>(g * M + c)];  // cluster 2 stays empty
        }
    std::vector<double> rw(static_cast<std::size_t>(T));
    for (auto& x : rw) x = rng.uniform();
    compare(cpu, gpu, "latent_attention",
            cat({{"B", B}, {"T", T}, {"S", S}, {"NH", NH}, {"HS", HS}, {"dc", dc}, {"M", M}}),
            {"o", "lse", "mass", "used"}, [&](Backend& be, auto) {
              auto Q = as<float>(q), K = as<float>(k), Lt = as<float>(lat), U = as<float>(up), Lo = as<float>(lo),
                   Cn = as<float>(cen);
              auto QP = qp, KP = kp, As = assign, Sz = sizes;
              auto W = rw;
              std::vector<double> o(static_cast<std::size_t>(B * T * NH * HS), NAN), lse(static_cast<std::size_t>(B * NH * T), NAN),
                  mass(static_cast<std::size_t>(B * S), 0.25), used(static_cast<std::size_t>(B * T), NAN);
              dsrsq::LatentAttentionArgs a;
              a.q = tv(Q, Shape{B, T, NH, HS});
              a.k = tv(K, Shape{B, S, NH, HS});
              a.q_pos = tv(QP, Shape{B, T});
              a.k_pos = tv(KP, Shape{B, Sp});
              a.latent = tv(Lt, Shape{B, Sp, dc});
              a.up = tv(U, Shape{NH * HS, dc});
              a.o = tv(o, Shape{B, T, NH, HS});
              a.lse = tv(lse, Shape{B, NH, T});
              a.lse_other = tv(Lo, Shape{B, NH, T});
              a.row_weight = tv(W, Shape{T});
              a.mass = tv(mass, Shape{B, S});
              a.used = tv(used, Shape{B, T});
              if (M > 0) {
                a.centroids = tv(Cn, Shape{B, NH, M, HS});
                a.assign = tv(As, Shape{B, NH, Sp});
                a.sizes = tv(Sz, Shape{B, NH, M});
                a.clusters = clusters;
                a.top_clusters = top;
              }
              be.latent_attention_fwd(a);
              return Outs{o, lse, mass, used};
            });
  }
  for (auto [B, T, S, NH, HS] : {std::array<std::int64_t, 5>{1, 7, 13, 3, 5}, {2, 65, 300, 4, 64}}) {
    dsrsq::Rng rng(16, static_cast<std::uint64_t>(S));
    const auto q = normals(B * T * NH * HS, rng), k = normals(B * S * NH * HS, rng);
    std::vector<std::int32_t> qp(static_cast<std::size_t>(B * T)), kp(static_cast<std::size_t>(B * S));
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t i = 0; i < T; ++i) qp[static_cast<std::size_t>(b * T + i)] = static_cast<std::int32_t>(S / 2 + i);
      for (std::int64_t j = 0; j < S; ++j) kp[static_cast<std::size_t>(b * S + j)] = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(S)));
    }
    std::vector<double> rw(static_cast<std::size_t>(T));
    for (auto& x : rw) x = rng.below(4) == 0 ? 0.0 : rng.uniform();  // some rows skipped
    compare(cpu, gpu, "attention_mass", cat({{"B", B}, {"T", T}, {"S", S}, {"NH", NH}, {"HS", HS}}), {"mass"},
            [&](Backend& be, auto) {
              auto Q = as<float>(q), K = as<float>(k);  // f32 in, f64 out on every run
              auto QP = qp, KP = kp;
              auto W = rw;
              std::vector<double> mass(static_cast<std::size_t>(B * S), NAN);
              be.attention_mass({tv(Q, Shape{B, T, NH, HS}), tv(K, Shape{B, S, NH, HS}), tv(QP, Shape{B, T}),
                                 tv(KP, Shape{B, S}), tv(W, Shape{T}), tv(mass, Shape{B, S}), static_cast<double>(NH)});
              return Outs{mass};
            });
  }
  for (auto [N, C] : {std::array<std::int64_t, 2>{13, 7}, {4097, 65}}) {
    dsrsq::Rng rng(15, static_cast<std::uint64_t>(N));
    const auto x = normals(N * C, rng);
    compare(cpu, gpu, "gram", cat({{"N", N}, {"C", C}}), {"g"}, [&](Backend& be, auto) {
      auto X = as<float>(x);  // f32 rows in, f64 out on every run
      std::vector<double> g(static_cast<std::size_t>(C * C));
      be.gram({tv(X, Shape{N, C}), tv(g, Shape{C, C})});
      return Outs{g};
    });
  }
}

}  // namespace

int main() {
  std::string why;
  if (dsrsq::cuda::device_count(&why) == 0) {
    std::printf("SKIP test_gpu_ops: %s\n", why.c_str());
    return 77;
  }
  Backend* dev = nullptr;
  for (Backend* b : dsrsq::available_backends())
    if (b->device() == dsrsq::Device::cuda) dev = b;
  if (!dev) {
    std::printf("FAIL test_gpu_ops: a GPU is present but available_backends() has no CUDA backend\n");
    return 1;
  }
  std::printf("# test_gpu_ops: %s (%s, CUDA runtime %s) against cpu and an f64 reference\n",
              std::string(dev->name()).c_str(), dsrsq::cuda::device_name(0).c_str(),
              dsrsq::cuda::runtime_version().c_str());
  std::printf("# unsupported (skipped):");
  for (int op = 0; op < static_cast<int>(OpId::count_); ++op)
    if (!dev->supports(static_cast<OpId>(op))) std::printf(" %s", dsrsq::op_name(static_cast<OpId>(op)));
  std::printf("\n#%-17s %-44s %-8s %10s %10s %10s  %s\n", "op", "case", "output", "err_cpu", "err_cuda", "bound",
              "check");
  Backend& cpu = dsrsq::cpu_backend();
  Backend& gpu = ref::on_host(*dev);
  embedding(cpu, gpu);
  rope(cpu, gpu);
  layernorm(cpu, gpu);
  linear_and_matmul(cpu, gpu);
  gelu(cpu, gpu);
  attention(cpu, gpu);
  cross_entropy(cpu, gpu);
  adamw(cpu, gpu);
  elementwise(cpu, gpu);
  rows(cpu, gpu);
  merge(cpu, gpu);
  select_ops(cpu, gpu);
  // A refused op names itself (never runs on the host instead).
  for (int op = 0; op < static_cast<int>(OpId::count_); ++op)
    if (!dev->supports(static_cast<OpId>(op)) && static_cast<OpId>(op) == OpId::sym_eigen) {
      std::vector<double> a(4, 1.0), vals(2), vecs(4);
      bool named = false;
      try {
        gpu.sym_eigen({tv(a, Shape{2, 2}), tv(vals, Shape{2}), tv(vecs, Shape{2, 2})});
      } catch (const std::exception& e) {
        named = std::string(e.what()).find("sym_eigen") != std::string::npos;
      }
      ++g_rows;
      g_failed += !named;
      std::printf("%-18s %-44s %-8s %10s %10s %10s  %s\n", "sym_eigen", "refused with the op's name", "-", "-", "-", "-",
                  named ? "ok" : "FAIL");
    }
  std::printf("# rows %d  failed %d  %s\n", g_rows, g_failed, g_failed ? "FAIL" : "PASS");
  return g_failed ? 1 : 0;
}
