// Level 5 (mpi): StagedCommunicator (dist/staged_communicator.hpp) on device
// buffers of the simulated device, on 1, 2 and 4 ranks. Sim pointers are
// poisoned (a host read faults), so every check here also proves that the
// communicator reaches device memory only through the backend's copies.
//  - all-reduce sum (f32, f64, i64) with answers known in advance (rank r
//    contributes (r + 1)(i + 1): integer-valued, exact, compared with ==),
//    blocking and two non-blocking requests completed out of order;
//  - all_reduce_avg equal, bit for bit, to the host communicator's on the same
//    values; broadcast (f32, i64, bytes) from the last rank; all-gather (f64);
//  - bytes not in whole multiples of 4, and a host pointer, are refused;
//  - GradReducer on a sim model's gradients (tiny bucket caps, driven as
//    backward drives it) equals GradReducer on a CPU model's gradients with
//    the host world, bit for bit, for sum and average; a device model with a
//    host communicator is refused by name.
#define BOOST_TEST_MODULE dsrsq_mpi_staged
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "backend/sim/sim_backend.hpp"
#include "common/errors.hpp"
#include "core/arena.hpp"
#include "dist/communicator.hpp"
#include "dist/dp_reducer.hpp"
#include "dist/staged_communicator.hpp"
#include "model/transformer.hpp"

namespace dd = dsrsq::dist;
using dsrsq::DType;
using dsrsq::Shape;
using dsrsq::TensorView;

namespace {

dd::MpiCommunicator& world() {
  static dd::MpiCommunicator w(MPI_COMM_WORLD, "world", 60.0);
  return w;
}

dsrsq::Backend& sim() { return dsrsq::sim::sim_backend(); }

bool has(const std::string& text, const std::string& s) { return text.find(s) != std::string::npos; }

// Host values on the sim device, in an arena of their own.
struct Dev {
  dsrsq::Arena arena{"staged-test", 1 << 20, sim().allocator()};
  template <class T>
  TensorView put(const std::vector<T>& host) {
    TensorView t = arena.allocate(Shape{static_cast<std::int64_t>(host.size())}, dsrsq::dtype_of<T>());
    dsrsq::from_host<T>(sim(), host, t);
    return t;
  }
  TensorView put(std::size_t n, DType type) { return arena.allocate(Shape{static_cast<std::int64_t>(n)}, type); }
};

template <class T>
std::span<T> dspan(const TensorView& t) {
  return std::span<T>(t.device_ptr<T>(), static_cast<std::size_t>(t.numel()));
}

dsrsq::ModelConfig tiny_config() {
  dsrsq::ModelConfig c;
  c.vocab = 37;
  c.d_model = 16;
  c.n_heads = 2;
  c.n_layers = 3;
  c.d_ff = 32;
  c.max_pos = 64;
  return c;
}

}  // namespace

BOOST_AUTO_TEST_CASE(staged_all_reduce_exact) {
  const int n = world().size(), r = world().rank();
  dd::StagedCommunicator staged(sim(), world());
  BOOST_TEST((staged.buffer_device() == dsrsq::Device::sim));
  BOOST_TEST(staged.size() == n);
  BOOST_TEST(staged.rank() == r);
  constexpr std::size_t kLen = 70001;  // several MPI segments
  std::vector<float> f(kLen);
  std::vector<double> d(kLen);
  std::vector<float> f2(kLen);
  for (std::size_t i = 0; i < kLen; ++i) {
    f[i] = static_cast<float>((r + 1) * static_cast<int>(i % 997 + 1));
    d[i] = (r + 1) * (static_cast<double>(i) + 1.0);
    f2[i] = static_cast<float>(r + 1);
  }
  Dev dev;
  const TensorView tf = dev.put(f), td = dev.put(d), tf2 = dev.put(f2);
  const TensorView ti = dev.put(std::vector<float>(2, 0.0f));  // 8 bytes: one i64 staged as f64
  const std::int64_t mine = (r + 1) * std::int64_t{1000000007};
  sim().copy_from_host(std::as_bytes(std::span<const std::int64_t>(&mine, 1)), ti);
  staged.all_reduce_sum(dspan<float>(tf));
  // Two in flight, completed in the other order.
  dd::Request rd = staged.iall_reduce_sum(dspan<double>(td));
  dd::Request rf2 = staged.iall_reduce_sum(dspan<float>(tf2));
  rf2.wait();
  rd.wait();
  staged.all_reduce_sum(std::span<std::int64_t>(static_cast<std::int64_t*>(ti.data), 1));
  const double tri = n * (n + 1) / 2.0;
  const auto hf = dsrsq::to_host<float>(sim(), tf);
  const auto hd = dsrsq::to_host<double>(sim(), td);
  const auto hf2 = dsrsq::to_host<float>(sim(), tf2);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < kLen; ++i) {
    bad += hf[i] != static_cast<float>(tri * static_cast<double>(i % 997 + 1));
    bad += hd[i] != tri * (static_cast<double>(i) + 1.0);
    bad += hf2[i] != static_cast<float>(tri);
  }
  BOOST_TEST(bad == 0u);
  std::int64_t got = 0;
  sim().copy_to_host(ti, std::as_writable_bytes(std::span<std::int64_t>(&got, 1)));
  BOOST_TEST(got == static_cast<std::int64_t>(tri) * std::int64_t{1000000007});
}

BOOST_AUTO_TEST_CASE(staged_average_broadcast_gather) {
  const int n = world().size(), r = world().rank();
  dd::StagedCommunicator staged(sim(), world());
  Dev dev;
  // Average: the same values through the host world and through staging.
  std::vector<float> v(1003);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = 0.1f * static_cast<float>(i + 1) / static_cast<float>(r + 3);
  const TensorView tv = dev.put(v);
  staged.all_reduce_avg(dspan<float>(tv));
  world().all_reduce_avg(std::span<float>(v));
  BOOST_TEST((dsrsq::to_host<float>(sim(), tv) == v));
  // Broadcast from the last rank: f32, i64 (as 8-byte elements), bytes.
  const int root = n - 1;
  const TensorView bf = dev.put(std::vector<float>{r == root ? 2.5f : -1.0f, r == root ? 7.0f : -1.0f});
  staged.broadcast(dspan<float>(bf), root);
  BOOST_TEST((dsrsq::to_host<float>(sim(), bf) == std::vector<float>{2.5f, 7.0f}));
  const TensorView bi = dev.put(1, DType::f64);
  const std::int64_t val = r == root ? 4242424242424242 : -1;
  sim().copy_from_host(std::as_bytes(std::span<const std::int64_t>(&val, 1)), bi);
  staged.broadcast(std::span<std::int64_t>(static_cast<std::int64_t*>(bi.data), 1), root);
  std::int64_t out = 0;
  sim().copy_to_host(bi, std::as_writable_bytes(std::span<std::int64_t>(&out, 1)));
  BOOST_TEST(out == 4242424242424242);
  const TensorView bb = dev.put(std::vector<std::int32_t>{r == root ? 0x01020304 : 0, r == root ? -5 : 0});
  staged.broadcast(std::span<std::byte>(static_cast<std::byte*>(bb.data), 8), root);
  BOOST_TEST((dsrsq::to_host<std::int32_t>(sim(), bb) == std::vector<std::int32_t>{0x01020304, -5}));
  // All-gather: slot q holds rank q's values.
  const TensorView gm = dev.put(std::vector<double>{r + 0.5, -(r + 1.0)});
  const TensorView ga = dev.put(2 * static_cast<std::size_t>(n), DType::f64);
  staged.all_gather(std::span<const double>(dspan<double>(gm)), dspan<double>(ga));
  const auto all = dsrsq::to_host<double>(sim(), ga);
  for (int q = 0; q < n; ++q) {
    BOOST_TEST(all[2 * static_cast<std::size_t>(q)] == q + 0.5);
    BOOST_TEST(all[2 * static_cast<std::size_t>(q) + 1] == -(q + 1.0));
  }
  staged.barrier();
}

BOOST_AUTO_TEST_CASE(staged_refusals) {
  dd::StagedCommunicator staged(sim(), world());
  Dev dev;
  const TensorView t = dev.put(std::vector<std::int32_t>{1, 2});
  // Byte buffers move as whole 4-byte elements. (Every rank refuses before
  // any collective starts, so no rank is left waiting.)
  BOOST_TEST(has(ref::error_of([&] { staged.broadcast(std::span<std::byte>(static_cast<std::byte*>(t.data), 6), 0); }),
                 "whole multiples of 4 bytes"));
  // A host pointer is not a sim pointer: the backend's copy refuses it.
  std::vector<float> host(4, 1.0f);
  BOOST_TEST(!ref::error_of([&] { staged.all_reduce_sum(std::span<float>(host)); }).empty());
  // A staged communicator carried by another device communicator is refused.
  BOOST_TEST(has(ref::error_of([&] { dd::StagedCommunicator twice(sim(), staged); }), "must work on host buffers"));
}

// GradReducer on sim gradients equals GradReducer on CPU gradients, bit for bit.
BOOST_AUTO_TEST_CASE(reducer_on_sim_equals_reducer_on_cpu) {
  const int r = world().rank();
  dsrsq::Transformer cpu_model(tiny_config(), dsrsq::cpu_backend());
  dsrsq::Transformer sim_model(tiny_config(), sim());
  const std::int64_t len = cpu_model.flat_grads().numel();
  BOOST_TEST(sim_model.flat_grads().numel() == len);
  dd::StagedCommunicator staged(sim(), world());
  for (auto mode : {dd::Reduction::sum, dd::Reduction::average}) {
    dd::ReducerConfig cfg;
    cfg.first_bucket_cap_bytes = 1 << 10;
    cfg.bucket_cap_bytes = 4 << 10;
    cfg.reduction = mode;
    dd::GradReducer on_cpu(world(), cpu_model, cfg);
    dd::GradReducer on_sim(staged, sim_model, cfg);
    BOOST_TEST(on_sim.buckets().size() == on_cpu.buckets().size());
    BOOST_TEST(on_sim.buckets().size() >= 4u);
    on_sim.attach(sim_model);
    for (int step = 0; step < 2; ++step) {
      // Rank- and step-dependent values that are not exactly representable sums.
      std::vector<float> g(static_cast<std::size_t>(len));
      for (std::size_t i = 0; i < g.size(); ++i)
        g[i] = 0.001f * static_cast<float>((i * 7919 + static_cast<std::size_t>(r) * 104729 + step * 13) % 2003) - 1.0f;
      std::copy(g.begin(), g.end(), cpu_model.flat_grads().ptr<float>());
      dsrsq::from_host<float>(sim(), g, sim_model.flat_grads());
      for (dd::GradReducer* red : {&on_cpu, &on_sim}) {
        for (std::int64_t l = tiny_config().n_layers - 1; l >= 0; --l) red->mark_ready(l);
        red->mark_ready(-1);
        red->finish();
      }
      const float* want = cpu_model.flat_grads().ptr<float>();
      const auto got = dsrsq::to_host<float>(sim(), sim_model.flat_grads());
      BOOST_TEST(std::memcmp(got.data(), want, got.size() * sizeof(float)) == 0,
                 "step " << step << (mode == dd::Reduction::sum ? " (sum)" : " (average)"));
    }
    BOOST_TEST(on_sim.stats().buckets_launched_during_backward == on_sim.stats().buckets_launched);
    on_sim.detach();
  }
  // The sim model's gradients cannot go to a host communicator.
  BOOST_TEST(has(ref::error_of([&] { dd::GradReducer wrong(world(), sim_model); }),
                 "a device run needs a device communicator"));
}
