#pragma once
// Ring attention test cases shared by tests/mpi/test_mpi_ring.cpp (CPU and
// sim) and tests/gpu/test_nccl.cpp (CUDA): random data, one rank's zigzag
// shard of it, and the ring's forward and backward run on any backend with
// any communicator whose buffers live there.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <vector>

#include "backend/backend.hpp"
#include "core/arena.hpp"
#include "core/rng.hpp"
#include "dist/communicator.hpp"
#include "dist/ring_attention.hpp"

namespace ring_case {

namespace dd = dsrsq::dist;
using dsrsq::Shape;
using dsrsq::TensorView;

template <class F>
double rel_l2(const std::vector<F>& a, const std::vector<F>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(ref[i]);
    num += d * d;
    den += static_cast<double>(ref[i]) * static_cast<double>(ref[i]);
  }
  return std::sqrt(num) / std::sqrt(std::max(den, 1e-300));
}

template <class F>
std::vector<F> randn(dsrsq::Rng& rng, std::size_t n) {
  std::vector<F> x(n);
  for (auto& e : x) e = static_cast<F>(rng.normal());
  return x;
}

// Rows of a (B, T, NH*HS) tensor at the given positions -> (B, Tl, NH*HS).
template <class F>
std::vector<F> take_rows(const std::vector<F>& full, int B, int T, int row, const std::vector<std::int32_t>& pos) {
  const int Tl = static_cast<int>(pos.size());
  std::vector<F> out(static_cast<std::size_t>(B) * Tl * row);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Tl; ++i)
      std::copy_n(&full[(static_cast<std::size_t>(b) * T + pos[i]) * row], row,
                  &out[(static_cast<std::size_t>(b) * Tl + i) * row]);
  return out;
}

// One rank's zigzag shard of a (B, T, NH, HS) problem, on the host.
template <class F>
struct Shard {
  int B = 0, Tl = 0, NH = 0, HS = 0;
  bool causal = true;
  std::vector<F> q, k, v, dout;
  std::vector<std::int32_t> pos;  // (B, Tl) global positions
};

template <class F>
Shard<F> shard_of(const std::vector<F>& q, const std::vector<F>& k, const std::vector<F>& v,
                  const std::vector<F>& dout, int B, int T, int NH, int HS, int P, int r, bool causal) {
  const int row = NH * HS;
  const auto pos = dd::zigzag_shard(T, P, r);
  Shard<F> s{B, T / P, NH, HS, causal, take_rows(q, B, T, row, pos), take_rows(k, B, T, row, pos),
             take_rows(v, B, T, row, pos), take_rows(dout, B, T, row, pos), {}};
  s.pos.resize(static_cast<std::size_t>(B) * s.Tl);
  for (int b = 0; b < B; ++b) std::copy(pos.begin(), pos.end(), s.pos.begin() + static_cast<std::ptrdiff_t>(b) * s.Tl);
  return s;
}

// The ring's results on this rank, read back to the host: o, lse, dq, dk, dv.
template <class F>
using RingOut = std::tuple<std::vector<F>, std::vector<F>, std::vector<F>, std::vector<F>, std::vector<F>>;

// ring_attention_fwd then _bwd on `be`'s device with `comm` (which must take
// buffers there): the shard goes into backend memory through from_host, the
// results come back through to_host (on sim a host read of the device
// tensors would fault). o and lse start as 7 (the forward must overwrite
// them), dq, dk, dv as 0.
template <class F>
RingOut<F> run_ring(dsrsq::Backend& be, dd::Communicator& comm, const Shard<F>& in) {
  const Shape ls{in.B, in.Tl, in.NH, in.HS}, lse_shape{in.B, in.NH, in.Tl};
  const auto dt = dsrsq::dtype_of<F>();
  dsrsq::Arena arena("ring-test", 1 << 20, be.allocator());
  auto put = [&](const std::vector<F>& h) {
    TensorView t = arena.allocate(ls, dt);
    dsrsq::from_host<F>(be, h, t);
    return t;
  };
  auto filled = [&](const Shape& s, double value) {
    TensorView t = arena.allocate(s, dt);
    be.fill(t, value);
    return t;
  };
  const TensorView lp = arena.allocate(Shape{in.B, in.Tl}, dsrsq::DType::i32);
  dsrsq::from_host<std::int32_t>(be, in.pos, lp);
  dsrsq::AttentionArgs a{put(in.q), put(in.k), put(in.v), filled(ls, 7), filled(lse_shape, 7), lp, lp, in.causal};
  dd::ring_attention_fwd(be, comm, a);
  dsrsq::AttentionGradArgs g;
  g.dout = put(in.dout);
  g.q = a.q;
  g.k = a.k;
  g.v = a.v;
  g.o = a.o;
  g.lse = a.lse;
  g.q_pos = g.k_pos = lp;
  g.dq = filled(ls, 0);
  g.dk = filled(ls, 0);
  g.dv = filled(ls, 0);
  g.causal = in.causal;
  dd::ring_attention_bwd(be, comm, g);
  return {dsrsq::to_host<F>(be, a.o), dsrsq::to_host<F>(be, a.lse), dsrsq::to_host<F>(be, g.dq),
          dsrsq::to_host<F>(be, g.dk), dsrsq::to_host<F>(be, g.dv)};
}

}  // namespace ring_case
