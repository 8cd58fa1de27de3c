// The simulated device (src/backend/sim): its memory is behind the device
// boundary, it refuses host tensors as CUDA does, its supports() list and its
// input limits are CUDA's, and its ops are the CPU backend's bit for bit.
#define BOOST_TEST_MODULE dsrsq_sim_device
#include <boost/test/unit_test.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "backend/sim/sim_backend.hpp"
#include "core/arena.hpp"
#include "core/error.hpp"
#include "core/rng.hpp"
#include "../common/errors.hpp"

using dsrsq::DType;
using dsrsq::Shape;
using dsrsq::TensorView;

namespace {

using ref::error_of;

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::vector<float> random_floats(std::size_t n, std::uint64_t seed) {
  dsrsq::Rng rng(seed, 1);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(rng.normal());
  return v;
}

}  // namespace

BOOST_AUTO_TEST_CASE(sim_memory_is_not_host_readable) {
  dsrsq::Backend& sim = dsrsq::sim::sim_backend();
  BOOST_TEST((sim.device() == dsrsq::Device::sim));
  BOOST_TEST(std::string(dsrsq::device_name(dsrsq::Device::sim)) == "sim");
  dsrsq::Arena arena("t", 1 << 12, sim.allocator());
  TensorView t = arena.allocate(Shape{3, 5}, DType::f32);
  BOOST_TEST((t.device == dsrsq::Device::sim));
  BOOST_TEST(contains(error_of([&] { (void)t.ptr<float>(); }), "host access to a tensor on device sim"));
  BOOST_TEST(contains(error_of([&] { (void)arena.zeros(Shape{2}, DType::f32); }), "Arena::zeros on a device arena"));
  // The pointer is not the host address: a raw host access (memcpy on .data,
  // bypassing ptr()) faults, as a device pointer read on the host would.
  BOOST_TEST(t.data != dsrsq::sim::host_address(t.data));
  const pid_t child = fork();
  if (child == 0) {
    std::signal(SIGSEGV, SIG_DFL);  // the fault must end the child, not reach Boost.Test's handler
    std::signal(SIGBUS, SIG_DFL);
    float sink[15];
    std::memcpy(sink, t.data, sizeof sink);
    _exit(sink[0] == 12345.0f ? 3 : 0);  // reached only if the read did not fault
  }
  int status = 0;
  BOOST_REQUIRE(child > 0 && waitpid(child, &status, 0) == child);
  BOOST_TEST((WIFSIGNALED(status) && (WTERMSIG(status) == SIGSEGV || WTERMSIG(status) == SIGBUS)),
             "a raw host read of sim memory did not fault (wait status " << status << ")");
  // A sim tag on host memory is caught where the backend takes it.
  std::vector<float> h(4);
  const TensorView forged(h.data(), Shape{4}, dsrsq::Device::sim);
  BOOST_TEST(contains(error_of([&] { sim.fill(forged, 1.0); }), "not from the sim allocator"));
}

BOOST_AUTO_TEST_CASE(copies_round_trip) {
  dsrsq::Backend& sim = dsrsq::sim::sim_backend();
  dsrsq::Arena arena("t", 1 << 12, sim.allocator());
  TensorView t = arena.allocate(Shape{2, 3}, DType::f32);
  const std::vector<float> in{1, 2, 3, 4, 5, 6};
  dsrsq::from_host<float>(sim, in, t);
  BOOST_TEST(dsrsq::to_host<float>(sim, t) == in);
  BOOST_TEST(dsrsq::to_host<float>(sim, t.rows(1, 1)) == (std::vector<float>{4, 5, 6}));
  sim.scale(t, 2.0);
  BOOST_TEST(dsrsq::to_host<float>(sim, t.rows(0, 1)) == (std::vector<float>{2, 4, 6}));
  // copy_to_host of a host tensor through sim: refused with both devices named.
  std::vector<float> h(6);
  std::vector<float> out(6);
  BOOST_TEST(contains(error_of([&] { sim.copy_to_host(TensorView(h.data(), Shape{6}), std::as_writable_bytes(std::span<float>(out))); }),
                      "copy_to_host: tensor on cpu, backend sim owns sim"));
}

BOOST_AUTO_TEST_CASE(host_tensors_are_refused_as_on_cuda) {
  dsrsq::Backend& sim = dsrsq::sim::sim_backend();
  dsrsq::Arena arena("t", 1 << 14, sim.allocator());
  TensorView x = arena.allocate(Shape{4, 8}, DType::f32), out = arena.allocate(Shape{2, 8}, DType::f32);
  sim.fill(x, 1.0);
  // Small host index arrays included: CUDA takes none either (require_device).
  std::vector<std::int32_t> idx{0, 3};
  const std::string e = error_of([&] { sim.gather_rows(dsrsq::GatherRowsArgs{x, TensorView(idx.data(), Shape{2}), out}); });
  BOOST_TEST(contains(e, "gather_rows: backend sim got a tensor on cpu"), e);
  BOOST_TEST(contains(e, "copy it to the device with copy_from_host first"), e);
  TensorView didx = arena.allocate(Shape{2}, DType::i32);
  dsrsq::from_host<std::int32_t>(sim, idx, didx);
  sim.gather_rows(dsrsq::GatherRowsArgs{x, didx, out});
  BOOST_TEST(dsrsq::to_host<float>(sim, out) == std::vector<float>(16, 1.0f));
}

BOOST_AUTO_TEST_CASE(supports_and_limits_are_cudas) {
  dsrsq::Backend& sim = dsrsq::sim::sim_backend();
  using dsrsq::OpId;
  for (int i = 0; i < static_cast<int>(OpId::count_); ++i) {
    const auto op = static_cast<OpId>(i);
    // CudaBackend::supports(): everything but these four.
    const bool cuda = op != OpId::sym_eigen && op != OpId::lowrank_recon && op != OpId::conv_project && op != OpId::host_tasks;
    BOOST_TEST(sim.supports(op) == cuda, dsrsq::op_name(op));
    if (dsrsq::Backend* gpu = dsrsq::device_backend(dsrsq::Device::cuda))
      BOOST_TEST(sim.supports(op) == gpu->supports(op), dsrsq::op_name(op));
  }
  BOOST_TEST(contains(error_of([&] { sim.host_tasks(2, [](std::int64_t) {}); }), "does not implement op 'host_tasks'"));
  dsrsq::Arena arena("t", 1 << 14, sim.allocator());
  // f64 attention: the CPU backend takes it, the CUDA kernels (and so sim) do not.
  const Shape qs{1, 2, 1, 4};
  TensorView q = arena.allocate(qs, DType::f64), o = arena.allocate(qs, DType::f64);
  TensorView lse = arena.allocate(Shape{1, 1, 2}, DType::f64), pos = arena.allocate(Shape{1, 2}, DType::i32);
  sim.fill(q, 0.5);
  dsrsq::from_host<std::int32_t>(sim, std::vector<std::int32_t>{0, 1}, pos);
  BOOST_TEST(contains(error_of([&] { sim.attention_fwd(dsrsq::AttentionArgs{q, q, q, o, lse, pos, pos, true, 0.0}); }),
                      "the CUDA kernels take f32 only"));
}

BOOST_AUTO_TEST_CASE(ops_equal_the_cpu_backend_bitwise) {
  dsrsq::Backend& sim = dsrsq::sim::sim_backend();
  dsrsq::Backend& cpu = dsrsq::cpu_backend();
  const std::int64_t B = 1, T = 37, NH = 3, HS = 16, N = B * T * NH * HS;
  const auto q = random_floats(static_cast<std::size_t>(N), 1), k = random_floats(static_cast<std::size_t>(N), 2),
             v = random_floats(static_cast<std::size_t>(N), 3);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(T));
  for (std::int64_t i = 0; i < T; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(3 * i);
  const Shape s{B, T, NH, HS};
  // CPU.
  std::vector<float> o_cpu(static_cast<std::size_t>(N)), lse_cpu(static_cast<std::size_t>(B * NH * T));
  auto qc = q, kc = k, vc = v;
  cpu.attention_fwd(dsrsq::AttentionArgs{TensorView(qc.data(), s), TensorView(kc.data(), s), TensorView(vc.data(), s),
                                         TensorView(o_cpu.data(), s), TensorView(lse_cpu.data(), Shape{B, NH, T}),
                                         TensorView(pos.data(), Shape{B, T}), TensorView(pos.data(), Shape{B, T}), true, 0.0});
  // Sim.
  dsrsq::Arena arena("t", 1 << 20, sim.allocator());
  TensorView dq = arena.allocate(s, DType::f32), dk = arena.allocate(s, DType::f32), dv = arena.allocate(s, DType::f32);
  TensorView dout = arena.allocate(s, DType::f32), dlse = arena.allocate(Shape{B, NH, T}, DType::f32);
  TensorView dpos = arena.allocate(Shape{B, T}, DType::i32);
  dsrsq::from_host<float>(sim, q, dq);
  dsrsq::from_host<float>(sim, k, dk);
  dsrsq::from_host<float>(sim, v, dv);
  dsrsq::from_host<std::int32_t>(sim, pos, dpos);
  sim.attention_fwd(dsrsq::AttentionArgs{dq, dk, dv, dout, dlse, dpos, dpos, true, 0.0});
  const auto o_sim = dsrsq::to_host<float>(sim, dout), lse_sim = dsrsq::to_host<float>(sim, dlse);
  BOOST_TEST(std::memcmp(o_sim.data(), o_cpu.data(), o_cpu.size() * sizeof(float)) == 0);
  BOOST_TEST(std::memcmp(lse_sim.data(), lse_cpu.data(), lse_cpu.size() * sizeof(float)) == 0);
  // A bias gradient (the one op sim reaches through the CPU backend's linear_bwd).
  std::vector<float> g = random_floats(static_cast<std::size_t>(T * 8), 4), db_cpu(8, 0.0f);
  std::vector<float> x(static_cast<std::size_t>(T * 5), 0.0f), w(8 * 5, 0.0f);
  cpu.linear_bwd(dsrsq::LinearGradArgs{TensorView(g.data(), Shape{T, 8}), TensorView(x.data(), Shape{T, 5}),
                                       TensorView(w.data(), Shape{8, 5}), {}, {}, TensorView(db_cpu.data(), Shape{8}), false});
  TensorView sg = arena.allocate(Shape{T, 8}, DType::f32), sx = arena.allocate(Shape{T, 5}, DType::f32);
  TensorView sw = arena.allocate(Shape{8, 5}, DType::f32), sdb = arena.allocate(Shape{8}, DType::f32);
  dsrsq::from_host<float>(sim, g, sg);
  sim.fill(sx, 0.0);
  sim.fill(sw, 0.0);
  sim.fill(sdb, 0.0);
  sim.linear_bwd(dsrsq::LinearGradArgs{sg, sx, sw, {}, {}, sdb, false});
  const auto db_sim = dsrsq::to_host<float>(sim, sdb);
  BOOST_TEST(std::memcmp(db_sim.data(), db_cpu.data(), db_cpu.size() * sizeof(float)) == 0);
}
