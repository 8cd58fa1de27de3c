// Level 5 (mpi): the communication layer on 1, 2 and 4 ranks.
//  - the launch self-test and all-reduce / all-gather / broadcast with answers
//    known in advance (rank r contributes r + 1; integer-valued floats below
//    2^24, so every expected value is exact and compared with ==);
//  - non-blocking all-reduces completed out of order; the wait timeout fires
//    with a message naming the rank and the operation, and the request can
//    still complete afterwards;
//  - ProcessGrid: every dp x sp factorisation of the world, the rank formulas
//    and the membership of the split communicators; a bad grid is refused
//    with a message naming --dp/--sp and the world size; mpi::Comm never
//    frees MPI_COMM_WORLD;
//  - check_launcher with a fake environment;
//  - GradReducer's buckets (tiling, order, caps) and its sum/average scaling.
//  - StagedCommunicator (dist/staged_communicator.hpp) on device buffers of
//    the simulated device, whose pointers are poisoned (a host read faults),
//    so every check also proves it reaches device memory only through the
//    backend's copies: all-reduce sum (f32, f64, i64) with exact known
//    answers, blocking and two non-blocking requests completed out of order;
//    all_reduce_avg equal, bit for bit, to the host communicator's; broadcast
//    (f32, i64, bytes) from the last rank; all-gather (f64); bytes not in
//    whole multiples of 4, a host pointer and a device carrier are refused;
//    GradReducer on a sim model's gradients equals GradReducer on a CPU
//    model's with the host world, bit for bit (sum and average), and a device
//    model with a host communicator is refused by name.
//  - send_recv (point to point, the ring step) on host buffers and staged sim
//    buffers, one-sided steps, and out-of-range peers refused; its timeout
//    names the pending side and the silent peer.
#define BOOST_TEST_MODULE dsrsq_mpi_comm
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.hpp"
#include "backend/sim/sim_backend.hpp"
#include "common/errors.hpp"
#include "core/arena.hpp"
#include "core/error.hpp"
#include "dist/communicator.hpp"
#include "dist/dp_reducer.hpp"
#include "dist/staged_communicator.hpp"
#include "dist/grid.hpp"
#include "dist/mpi.hpp"
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

bool message_has_text(const std::string& m, const std::string& s) { return m.find(s) != std::string::npos; }
bool message_has(const std::exception& e, const std::string& s) { return message_has_text(e.what(), s); }

// The timeout tests' communicator: a duplicate of the world, 0.2 s timeout.
MPI_Comm dup_world() {
  MPI_Comm dup = MPI_COMM_NULL;
  DSRSQ_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  return dup;
}
struct LateComm {
  dsrsq::mpi::Comm owned{dup_world()};
  dd::MpiCommunicator c{owned.get(), "late", 0.2};
};

// The timeout tests' hand-over on MPI_COMM_WORLD: rank 1 waits (at most 30 s)
// until rank 0 says "timed out" (send_go), then joins the operation rank 0
// timed out on.
constexpr int kGoTag = 4711;
void wait_for_go() {
  int go = 0, done = 0;
  MPI_Request r = MPI_REQUEST_NULL;
  DSRSQ_MPI_CHECK(MPI_Irecv(&go, 1, MPI_INT, 0, kGoTag, MPI_COMM_WORLD, &r));
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!done && std::chrono::steady_clock::now() < give_up) {
    DSRSQ_MPI_CHECK(MPI_Test(&r, &done, MPI_STATUS_IGNORE));
    if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  BOOST_TEST(done, "rank 0 never reported its timeout");
  if (!done) {
    DSRSQ_MPI_CHECK(MPI_Cancel(&r));
    DSRSQ_MPI_CHECK(MPI_Wait(&r, MPI_STATUS_IGNORE));
  }
}
void send_go() {
  const int go = 1;
  DSRSQ_MPI_CHECK(MPI_Send(&go, 1, MPI_INT, 1, kGoTag, MPI_COMM_WORLD));
}
// Polls a request by hand (at most 30 s) after its own wait has timed out.
void poll(dd::Request& req) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!req.test() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

}  // namespace

BOOST_AUTO_TEST_CASE(self_test_passes) {
  BOOST_TEST(world().size() >= 1);
  BOOST_CHECK_NO_THROW(dd::comm_self_test(world()));
}

BOOST_AUTO_TEST_CASE(all_reduce_analytic) {
  const int n = world().size(), r = world().rank();
  // Large enough (1.2 MB of f32) that MPI pipelines it in segments.
  const std::size_t len = 300007;
  std::vector<float> f(len);
  std::vector<double> d(len);
  for (std::size_t i = 0; i < len; ++i) {
    f[i] = static_cast<float>((r + 1) * static_cast<int>(i % 101 + 1));
    d[i] = (r + 1) * (static_cast<double>(i) + 0.5);
  }
  world().all_reduce_sum(std::span<float>(f));
  world().all_reduce_sum(std::span<double>(d));
  const double tri = n * (n + 1) / 2.0;
  std::size_t bad_f = 0, bad_d = 0;
  for (std::size_t i = 0; i < len; ++i) {
    bad_f += static_cast<double>(f[i]) != tri * static_cast<double>(i % 101 + 1);
    bad_d += d[i] != tri * (static_cast<double>(i) + 0.5);
  }
  BOOST_TEST(bad_f == 0u);
  BOOST_TEST(bad_d == 0u);

  // Average: DDP rule (scale by 1/n, then sum); for n a power of two exact.
  std::vector<float> a(17, static_cast<float>(r + 1));
  std::vector<double> ad(5, static_cast<double>(r + 1));
  world().all_reduce_avg(std::span<float>(a));
  world().all_reduce_avg(std::span<double>(ad));
  for (float v : a) BOOST_TEST(v == (n + 1) / 2.0f);
  for (double v : ad) BOOST_TEST(v == (n + 1) / 2.0);

  std::int64_t k = r + 1;
  world().all_reduce_sum(std::span<std::int64_t>(&k, 1));
  BOOST_TEST(k == static_cast<std::int64_t>(n) * (n + 1) / 2);
}

BOOST_AUTO_TEST_CASE(nonblocking_out_of_order) {
  const int n = world().size(), r = world().rank();
  std::vector<float> a(1000, static_cast<float>(r + 1));
  std::vector<double> b(333, 2.0 * (r + 1));
  dd::Request ra = world().iall_reduce_sum(std::span<float>(a));
  dd::Request rb = world().iall_reduce_sum(std::span<double>(b));
  BOOST_TEST(ra.pending());
  rb.wait();
  ra.wait();
  BOOST_TEST(!ra.pending());
  BOOST_TEST(a.front() == n * (n + 1) / 2.0f);
  BOOST_TEST(a.back() == n * (n + 1) / 2.0f);
  BOOST_TEST(b[100] == static_cast<double>(n * (n + 1)));
  ra.wait();  // waiting on a completed request is a no-op
  BOOST_TEST(ra.test());
}

BOOST_AUTO_TEST_CASE(all_gather_and_broadcast) {
  const int n = world().size(), r = world().rank();
  const std::vector<float> mine{static_cast<float>(r + 1), static_cast<float>(-(r + 1))};
  std::vector<float> all(2 * static_cast<std::size_t>(n));
  world().all_gather(std::span<const float>(mine), std::span<float>(all));
  for (int q = 0; q < n; ++q) {
    BOOST_TEST(all[2 * q] == q + 1.0f);
    BOOST_TEST(all[2 * q + 1] == -(q + 1.0f));
  }
  const int root = n - 1;
  std::vector<double> x(7, r == root ? 3.25 : -1.0);
  world().broadcast(std::span<double>(x), root);
  for (double v : x) BOOST_TEST(v == 3.25);
  std::vector<std::byte> bytes(16, std::byte{static_cast<unsigned char>(r == 0 ? 0xAB : 0)});
  world().broadcast(std::span<std::byte>(bytes), 0);
  BOOST_TEST(std::to_integer<int>(bytes[15]) == 0xAB);
  // A wrongly sized output is refused before any communication (on every rank).
  std::vector<float> small(1);
  BOOST_CHECK_THROW(world().all_gather(std::span<const float>(mine), std::span<float>(small)), dsrsq::Error);
  world().barrier();
}

// Rank 0 waits for an all-reduce that rank 1 has not joined: with a 0.2 s
// timeout the wait throws, naming the rank, the communicator and the
// operation; the request stays pending and, once rank 1 joins, completes.
// No race: rank 1 joins only after rank 0 TELLS it (a message on another
// communicator) that its wait has timed out, so a descheduled rank 0 on a
// loaded machine cannot find the all-reduce already complete (the old version
// slept 0.6 s against the 0.2 s timeout: a 0.4 s margin). Should the timeout
// never fire (a bug), rank 1 gives up waiting for the message after 30 s
// (150x the timeout) and joins, rank 0's wait then completes without a throw,
// and the test fails instead of hanging.
BOOST_AUTO_TEST_CASE(wait_timeout_names_rank_and_operation) {
  if (world().size() < 2) return;
  LateComm late;
  dd::MpiCommunicator& c = late.c;
  std::vector<float> x(10, 1.0f);
  if (c.rank() == 1) wait_for_go();  // at most 30 s for rank 0's "timed out" before joining
  dd::Request req = c.iall_reduce_sum(std::span<float>(x));
  if (c.rank() == 0) {
    bool threw = false;
    try {
      req.wait();
    } catch (const dsrsq::Error& e) {
      threw = true;
      BOOST_TEST(message_has(e, "communication timeout"), e.what());
      BOOST_TEST(message_has(e, "world rank 0"), e.what());
      BOOST_TEST(message_has(e, "'late'"), e.what());
      BOOST_TEST(message_has(e, "all_reduce_sum(f32 x 10)"), e.what());
      // The late rank is named: for certain with two ranks, among the candidates otherwise.
      BOOST_TEST(message_has(e, "rank 1 (world rank 1)"), e.what());
      BOOST_TEST(message_has(e, c.size() == 2 ? "the one that did not is the other member"
                                              : "MPI cannot tell which of the other members"),
                 e.what());
    }
    BOOST_TEST(threw);
    BOOST_TEST(req.pending());
    c.set_timeout(30.0);
    send_go();  // now let the late rank arrive: the same request then completes
  }
  poll(req);  // the request carries the timeout it was made with
  BOOST_TEST(!req.pending());
  BOOST_TEST(x[0] == static_cast<float>(c.size()));
}

// The same for send_recv: rank 0 receives from rank 1, which sends only after
// rank 0's wait has timed out; the message says which side is pending and
// names the peer (ranks >= 2 take no part).
BOOST_AUTO_TEST_CASE(send_recv_timeout_names_the_silent_peer) {
  if (world().size() < 2) return;
  LateComm late;
  dd::MpiCommunicator& c = late.c;
  std::vector<float> x{1.5f, 2.5f, 3.5f}, y(3, 0.0f);
  if (c.rank() == 1) {
    wait_for_go();
    c.send_recv(std::span<const float>(x), 0, std::span<float>(), -1);
  } else if (c.rank() == 0) {
    dd::Request req = c.isend_recv(std::span<const float>(), -1, std::span<float>(y), 1);
    const std::string m = ref::error_of([&] { req.wait(); });
    BOOST_TEST(message_has_text(m, "communication timeout"), m);
    BOOST_TEST(message_has_text(m, "send_recv(f32: 0 to rank -1, 3 from rank 1)"), m);
    BOOST_TEST(message_has_text(m, "nothing arrived from rank 1 (world rank 1)"), m);
    BOOST_TEST(!message_has_text(m, "did not take"), m);
    send_go();
    poll(req);
    BOOST_TEST(!req.pending());
    BOOST_TEST((y == x));
  }
}

// Timeout messages name peers by communicator rank AND world rank: a
// communicator in reversed order maps its rank r to world rank size-1-r.
BOOST_AUTO_TEST_CASE(missing_peers_named_by_world_rank) {
  const int n = world().size(), w = world().rank();
  MPI_Comm rev = MPI_COMM_NULL;
  DSRSQ_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, 0, n - 1 - w, &rev));
  dsrsq::mpi::Comm owned(rev);
  dd::MpiCommunicator c(owned.get(), "reversed", 10.0);
  BOOST_TEST(c.rank() == n - 1 - w);
  for (int r = 0; r < n; ++r) BOOST_TEST(c.world_rank_of(r) == n - 1 - r);
  const std::string t = c.missing_peers_text();
  if (n == 2) {
    BOOST_TEST(t.find(dsrsq::detail::cat("rank ", 1 - c.rank(), " (world rank ", 1 - w, ")")) != std::string::npos, t);
  } else if (n > 2) {
    for (int r = 0; r < n; ++r)
      if (r != c.rank())
        BOOST_TEST(t.find(dsrsq::detail::cat("rank ", r, " (world rank ", n - 1 - r, ")")) != std::string::npos, t);
  }
}

BOOST_AUTO_TEST_CASE(process_grid_factorisations) {
  const int n = world().size(), w = world().rank();
  for (int sp = 1; sp <= n; ++sp) {
    if (n % sp) continue;
    const int dp = n / sp;
    dd::ProcessGrid g(MPI_COMM_WORLD, dp, sp, 30.0);
    BOOST_TEST(g.world_rank() == w);
    BOOST_TEST(g.dp_rank() == w / sp);
    BOOST_TEST(g.sp_rank() == w % sp);
    BOOST_TEST(g.dp_comm().size() == dp);
    BOOST_TEST(g.sp_comm().size() == sp);
    BOOST_TEST(g.dp_comm().rank() == g.dp_rank());
    BOOST_TEST(g.sp_comm().rank() == g.sp_rank());
    // Membership: the dp group of world rank w is {w % sp + k * sp}, the sp
    // group is {(w / sp) * sp + j}, each in rank order.
    const std::int64_t me = w;
    std::vector<std::int64_t> dpm(static_cast<std::size_t>(dp)), spm(static_cast<std::size_t>(sp));
    g.dp_comm().all_gather(std::span<const std::int64_t>(&me, 1), std::span<std::int64_t>(dpm));
    g.sp_comm().all_gather(std::span<const std::int64_t>(&me, 1), std::span<std::int64_t>(spm));
    for (int k = 0; k < dp; ++k) BOOST_TEST(dpm[k] == w % sp + k * sp, "dp=" << dp << " sp=" << sp << " k=" << k);
    for (int j = 0; j < sp; ++j) BOOST_TEST(spm[j] == (w / sp) * sp + j, "dp=" << dp << " sp=" << sp << " j=" << j);
    dd::comm_self_test(g.dp_comm());
    dd::comm_self_test(g.sp_comm());
  }
}

BOOST_AUTO_TEST_CASE(process_grid_refuses_bad_shapes) {
  const int n = world().size();
  for (auto [dp, sp] : std::vector<std::pair<int, int>>{{n + 1, 1}, {n, 2}, {0, n}, {n, -1}}) {
    try {
      dd::ProcessGrid g(MPI_COMM_WORLD, dp, sp);
      BOOST_ERROR("grid dp=" << dp << " sp=" << sp << " on " << n << " ranks was accepted");
    } catch (const dsrsq::Error& e) {
      BOOST_TEST(message_has(e, "--dp"), e.what());
      BOOST_TEST(message_has(e, "--sp"), e.what());
      if (dp >= 1 && sp >= 1) BOOST_TEST(message_has(e, "world size of " + std::to_string(n)), e.what());
    }
  }
  BOOST_CHECK_NO_THROW(dd::validate_grid(2, 3, 6));
  BOOST_CHECK_THROW(dd::validate_grid(2, 3, 4), dsrsq::Error);
  world().barrier();
}

BOOST_AUTO_TEST_CASE(comm_handle_never_frees_world) {
  { dsrsq::mpi::Comm w(MPI_COMM_WORLD); }
  { dsrsq::mpi::Comm s(MPI_COMM_SELF); }
  MPI_Comm dup = MPI_COMM_NULL;
  DSRSQ_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  dsrsq::mpi::Comm a(dup);
  dsrsq::mpi::Comm b(std::move(a));
  BOOST_TEST(!a);
  BOOST_TEST(b.get() == dup);
  b.reset();  // frees the duplicate, collectively
  BOOST_TEST(!b);
  BOOST_CHECK_NO_THROW(dd::comm_self_test(world()));  // MPI_COMM_WORLD is still alive
}

BOOST_AUTO_TEST_CASE(check_launcher_fake_env) {
  using Env = std::map<std::string, std::string>;
  auto lookup = [](const Env& env) {
    return [env](const char* k) -> const char* {
      const auto it = env.find(k);
      return it == env.end() ? nullptr : it->second.c_str();
    };
  };
  // Mismatch: MPI says 1 process, the launcher says more.
  for (const Env& env : {Env{{"OMPI_COMM_WORLD_SIZE", "2"}}, Env{{"SLURM_NTASKS", "4"}}}) {
    try {
      dd::check_launcher(1, lookup(env));
      BOOST_ERROR("mismatch not detected for " << env.begin()->first);
    } catch (const dsrsq::Error& e) {
      BOOST_TEST(message_has(e, env.begin()->first + "=" + env.begin()->second), e.what());
      BOOST_TEST(message_has(e, "rank 0"), e.what());
    }
  }
  // Consistent or absent: no error.
  BOOST_CHECK_NO_THROW(dd::check_launcher(1, lookup(Env{})));
  BOOST_CHECK_NO_THROW(dd::check_launcher(1, lookup(Env{{"OMPI_COMM_WORLD_SIZE", "1"}})));
  BOOST_CHECK_NO_THROW(dd::check_launcher(1, lookup(Env{{"SLURM_NTASKS", "1"}})));
  BOOST_CHECK_NO_THROW(dd::check_launcher(4, lookup(Env{{"OMPI_COMM_WORLD_SIZE", "4"}, {"SLURM_NTASKS", "4"}})));
  // A one-rank mpirun inside a larger Slurm allocation is intended: mpirun's word wins.
  BOOST_CHECK_NO_THROW(dd::check_launcher(1, lookup(Env{{"OMPI_COMM_WORLD_SIZE", "1"}, {"SLURM_NTASKS", "8"}})));
  BOOST_CHECK_NO_THROW(dd::check_launcher(1, lookup(Env{{"SLURM_NTASKS", "garbage"}})));
  // The real environment of this (correctly launched) job passes.
  BOOST_CHECK_NO_THROW(dd::check_launcher(world().size()));
}

// One GPU per rank: the node-local rank. Under mpirun on this one host the
// launcher's local rank is the world rank, and counting by host names agrees.
BOOST_AUTO_TEST_CASE(node_local_rank_one_host) {
  BOOST_TEST(dd::node_local_rank(world()) == world().rank());
  BOOST_TEST(dd::text_key("host-a") == dd::text_key("host-a"));
  BOOST_TEST(dd::text_key("host-a") != dd::text_key("host-b"));
  BOOST_TEST(dd::text_key(dd::host_name()) >= 0);
}

namespace {
dsrsq::ModelConfig tiny_config() {
  dsrsq::ModelConfig c;
  c.vocab = 50;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_layers = 3;
  c.d_ff = 64;
  c.max_pos = 128;
  return c;
}
// Caps small enough that the tiny model's gradients fill several buckets.
dd::ReducerConfig small_buckets(dd::Reduction mode, std::size_t first_cap, std::size_t cap) {
  dd::ReducerConfig cfg;
  cfg.first_bucket_cap_bytes = first_cap;
  cfg.bucket_cap_bytes = cap;
  cfg.reduction = mode;
  return cfg;
}
}  // namespace

BOOST_AUTO_TEST_CASE(bucket_layout) {
  dsrsq::Transformer m(tiny_config(), dsrsq::cpu_backend());
  dd::ReducerConfig cfg;
  cfg.first_bucket_cap_bytes = 4 << 10;
  cfg.bucket_cap_bytes = 12 << 10;
  dd::GradReducer red(world(), m, cfg);
  const auto& bs = red.buckets();
  BOOST_TEST(bs.size() >= 6u);
  // Buckets tile the buffer: each slot in exactly one bucket, each bucket contiguous.
  std::vector<int> hits(static_cast<std::size_t>(m.flat_grads().numel()), 0);
  for (const auto& b : bs) {
    std::int64_t covered = 0;
    for (std::size_t s : b.slots) covered += red.slots()[s].numel;
    BOOST_TEST(covered == b.end - b.begin, b.first);
    for (std::int64_t i = b.begin; i < b.end; ++i) ++hits[static_cast<std::size_t>(i)];
  }
  BOOST_TEST(std::count(hits.begin(), hits.end(), 1) == static_cast<long>(hits.size()));
  // Caps: a bucket exceeds its cap only when it is a single tensor.
  for (std::size_t b = 0; b < bs.size(); ++b) {
    const std::size_t cap = b == 0 ? cfg.first_bucket_cap_bytes : cfg.bucket_cap_bytes;
    BOOST_TEST((bs[b].bytes() <= cap || bs[b].slots.size() == 1), "bucket " << b << " " << bs[b].bytes());
  }
  // Order: the first bucket starts with the last layer's last tensor; layers
  // come last-to-first; the end-of-backward tensors (wte, lnf) come last.
  BOOST_TEST(bs.front().first == "h.2.mlp.bproj");
  std::int64_t prev_layer = 3;
  bool in_tail = false;
  for (const auto& b : bs) {
    for (std::size_t s : b.slots) {
      const std::int64_t l = red.slots()[s].ready_layer;
      if (l < 0) {
        in_tail = true;
      } else {
        BOOST_TEST(!in_tail, "layer tensor " << red.slots()[s].name << " after the end-of-backward tensors");
        BOOST_TEST(l <= prev_layer);
        prev_layer = l;
      }
    }
  }
  BOOST_TEST(bs.back().first == "wte");
  // Default caps: one bucket per readiness run (the model is tiny).
  dd::GradReducer big(world(), m);
  BOOST_TEST(big.config().bucket_cap_bytes == std::size_t{25} << 20);
  BOOST_TEST(big.config().first_bucket_cap_bytes == std::size_t{1} << 20);
  BOOST_TEST(big.buckets().size() == 3u);  // layers | lnf (not adjacent to wte) | wte
}

// Reducer arithmetic with known answers: every gradient of rank r is r + 1.
BOOST_AUTO_TEST_CASE(reducer_sum_and_average) {
  const int n = world().size(), r = world().rank();
  dsrsq::Transformer m(tiny_config(), dsrsq::cpu_backend());
  float* g = m.flat_grads().ptr<float>();
  const std::int64_t len = m.flat_grads().numel();
  for (auto mode : {dd::Reduction::sum, dd::Reduction::average}) {
    const dd::ReducerConfig cfg = small_buckets(mode, 2 << 10, 8 << 10);
    dd::GradReducer red(world(), m, cfg);
    for (int step = 0; step < 2; ++step) {
      std::fill(g, g + len, static_cast<float>(r + 1));
      // Drive it as backward would: layers last to first, then the end.
      for (std::int64_t l = m.config().n_layers - 1; l >= 0; --l) red.mark_ready(l);
      red.mark_ready(-1);
      red.finish();
      const float want = mode == dd::Reduction::sum ? n * (n + 1) / 2.0f : (n + 1) / 2.0f;
      BOOST_TEST(std::count(g, g + len, want) == len);
    }
    BOOST_TEST(red.stats().steps == 2);
    BOOST_TEST(red.stats().buckets_launched == static_cast<std::int64_t>(2 * red.buckets().size()));
    BOOST_TEST(red.stats().payload_bytes == 2u * static_cast<std::uint64_t>(len) * 4u);
    // The last layer's buckets went out from the hook, before the end of backward.
    BOOST_TEST(red.stats().buckets_launched_during_backward == red.stats().buckets_launched);
  }
  // Marking a layer twice in one step is an error (accumulation needs set_sync(false)).
  dd::GradReducer red(world(), m);
  red.mark_ready(2);
  BOOST_CHECK_THROW(red.mark_ready(2), dsrsq::Error);
  BOOST_CHECK_THROW(red.mark_ready(7), dsrsq::Error);
  red.finish();  // launches the rest: no bucket is left behind
  red.set_sync(false);
  red.mark_ready(2);
  red.mark_ready(2);
  red.finish();
  BOOST_TEST(red.stats().steps == 1);
}

// ---- StagedCommunicator: device buffers of the simulated device --------------
namespace {

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
    const dd::ReducerConfig cfg = small_buckets(mode, 1 << 10, 4 << 10);
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

// Point to point (ring attention's exchanges): one ring step on host buffers
// (f32, i32) and on sim buffers through StagedCommunicator (f32, bytes; two
// in flight completed in the other order), with values known in advance; a
// chain whose ends omit one side; out-of-range peers refused on every rank
// before anything is posted.
BOOST_AUTO_TEST_CASE(send_recv_ring_step_host_and_staged) {
  const int n = world().size(), r = world().rank();
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  const auto fr = static_cast<float>(r), fp = static_cast<float>(prev);
  std::vector<float> out{fr + 0.5f, -(fr + 1.0f)}, in(2, -7.0f);
  world().send_recv(std::span<const float>(out), next, std::span<float>(in), prev);
  BOOST_TEST((in == std::vector<float>{fp + 0.5f, -(fp + 1.0f)}));
  const std::int32_t iout = 3 * r + 1;
  std::int32_t iin = -1;
  world().isend_recv(std::span<const std::int32_t>(&iout, 1), next, std::span<std::int32_t>(&iin, 1), prev).wait();
  BOOST_TEST(iin == 3 * prev + 1);
  // Chain 0 -> 1 -> ... -> n-1: rank 0 only sends, rank n-1 only receives.
  const std::int64_t cv = 100 + r;
  std::int64_t got = -1;
  const bool sends = r + 1 < n, receives = r > 0;
  world().send_recv(std::span<const std::int64_t>(&cv, sends ? 1 : 0), sends ? r + 1 : -1,
                    std::span<std::int64_t>(&got, receives ? 1 : 0), receives ? r - 1 : -1);
  BOOST_TEST(got == (receives ? 100 + r - 1 : -1));

  dd::StagedCommunicator staged(sim(), world());
  Dev dev;
  const TensorView sa = dev.put(std::vector<float>{fr + 0.25f, fr * 2}), ra = dev.put(2, DType::f32);
  const TensorView sb = dev.put(std::vector<std::int32_t>{r, -r, 0x01020304}), rb = dev.put(3, DType::i32);
  auto bytes = [](const TensorView& t) { return std::span<std::byte>(static_cast<std::byte*>(t.data), t.bytes()); };
  dd::Request qa = staged.isend_recv(std::span<const float>(dspan<float>(sa)), next, dspan<float>(ra), prev);
  dd::Request qb = staged.isend_recv(std::span<const std::byte>(bytes(sb)), next, bytes(rb), prev);
  qb.wait();
  qa.wait();
  BOOST_TEST((dsrsq::to_host<float>(sim(), ra) == std::vector<float>{fp + 0.25f, fp * 2}));
  BOOST_TEST((dsrsq::to_host<std::int32_t>(sim(), rb) == std::vector<std::int32_t>{prev, -prev, 0x01020304}));

  BOOST_TEST(has(ref::error_of([&] { world().send_recv(std::span<const float>(out), n, std::span<float>(in), prev); }),
                 "outside [-1, "));
  const std::span<const float> send_a = dspan<float>(sa);
  BOOST_TEST(has(ref::error_of([&] { staged.send_recv(send_a, -1, dspan<float>(ra), prev); }),
                 "no destination but 2 elements to send"));
}
