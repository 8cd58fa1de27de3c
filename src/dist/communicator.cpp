#include "dist/communicator.hpp"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "dist/mpi.hpp"

namespace dsrsq {
namespace mpi {

Environment::Environment(int& argc, char**& argv, int required) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, required, &provided);
    owns_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  host_ = dist::host_name();
  set_error_context(rank_, host_);
}

Environment::~Environment() {
  if (!owns_) return;
  int finalised = 0;
  MPI_Finalized(&finalised);
  if (!finalised) MPI_Finalize();
}

}  // namespace mpi

namespace dist {

const char* scalar_name(Scalar s) {
  switch (s) {
    case Scalar::f32: return "f32";
    case Scalar::f64: return "f64";
    case Scalar::i32: return "i32";
    case Scalar::i64: return "i64";
    case Scalar::byte: return "byte";
  }
  return "?";
}

std::size_t scalar_bytes(Scalar s) {
  switch (s) {
    case Scalar::f32: case Scalar::i32: return 4;
    case Scalar::f64: case Scalar::i64: return 8;
    case Scalar::byte: return 1;
  }
  return 0;
}

namespace {

MPI_Datatype mpi_type(Scalar s) {
  switch (s) {
    case Scalar::f32: return MPI_FLOAT;
    case Scalar::f64: return MPI_DOUBLE;
    case Scalar::i32: return MPI_INT32_T;
    case Scalar::i64: return MPI_INT64_T;
    case Scalar::byte: return MPI_BYTE;
  }
  return MPI_DATATYPE_NULL;
}

int checked_count(std::size_t n, const char* op) {
  DSRSQ_REQUIRE(n <= static_cast<std::size_t>(std::numeric_limits<int>::max()), op, ": ", n,
                " elements exceed MPI's int count; split the buffer");
  return static_cast<int>(n);
}

// A pending MPI operation: one request (a collective), or a receive and a
// send (send_recv: reqs[0] receives from rank `from`, reqs[1] sends to rank
// `to`; an omitted side is MPI_REQUEST_NULL). wait() polls MPI_Test until a
// deadline: a plain MPI_Wait would block forever on a peer that died without
// taking the job down.
class MpiRequest final : public Request::Impl {
 public:
  struct Ring {  // send_recv's peers, for the timeout message
    std::string from, to;  // "rank 1 (world rank 3)"
  };
  MpiRequest(std::vector<MPI_Request> reqs, std::string what, double timeout, int world_rank, int rank, int size,
             std::string comm, const std::string& peers, std::optional<Ring> ring = std::nullopt)
      : reqs_(std::move(reqs)), what_(std::move(what)), timeout_(timeout), world_rank_(world_rank), rank_(rank),
        size_(size), comm_(std::move(comm)), peers_(peers), ring_(std::move(ring)) {}
  ~MpiRequest() override {
    bool pending = false;
    for (MPI_Request& r : reqs_) {
      if (r == MPI_REQUEST_NULL) continue;
      int flag = 0;
      MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
      pending = pending || !flag;
    }
    // Still pending: MPI may write into the buffer later, so the request is
    // left alone (leaked) rather than freed; this only happens on error paths
    // that end in MPI_Abort.
    if (pending) std::fprintf(stderr, "dsrsq: world rank %d dropped a pending %s\n", world_rank_, what_.c_str());
  }
  bool test() override {
    int flag = 0;
    DSRSQ_MPI_CHECK(MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &flag, MPI_STATUSES_IGNORE));
    return flag != 0;
  }
  void wait() override {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const auto deadline = start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(timeout_));
    // Non-blocking collectives progress only inside MPI calls (Open MPI's
    // libnbc), so poll without sleeping for the first few milliseconds, yielding
    // the core between polls, then back off with short sleeps so a waiting rank
    // does not steal an oversubscribed core from the peer it waits for.
    const auto spin_until = start + std::chrono::milliseconds(20);
    auto nap = std::chrono::microseconds(10);
    for (;;) {
      if (test()) return;
      if (clock::now() >= deadline) {
        const double waited = std::chrono::duration<double>(clock::now() - start).count();
        throw Error(detail::cat(error_context(), "communication timeout: world rank ", world_rank_, " (rank ", rank_,
                                " of ", size_, " in communicator '", comm_, "') waited ", waited, " s (limit ",
                                timeout_, " s, --comm_timeout) for ", what_,
                                " to complete; a peer rank has probably died or stalled: ", peers_text()));
      }
      if (clock::now() < spin_until) {
        sched_yield();
      } else {
        std::this_thread::sleep_for(nap);
        nap = std::min(nap * 2, std::chrono::microseconds(200));
      }
    }
  }

 private:
  // Collectives: the communicator's text. send_recv: which side is still pending.
  std::string peers_text() {
    if (!ring_) return peers_;
    std::string text;
    for (std::size_t i = 0; i < reqs_.size(); ++i) {
      int done = 1;
      if (reqs_[i] != MPI_REQUEST_NULL) DSRSQ_MPI_CHECK(MPI_Test(&reqs_[i], &done, MPI_STATUS_IGNORE));
      if (done) continue;
      text += i == 0 ? detail::cat(text.empty() ? "" : "; ", "nothing arrived from ", ring_->from)
                     : detail::cat(text.empty() ? "" : "; ", ring_->to, " did not take what this rank sent");
    }
    return text.empty() ? "every transfer completed at the deadline" : text;
  }
  std::vector<MPI_Request> reqs_;
  std::string what_;
  double timeout_;
  int world_rank_, rank_, size_;
  std::string comm_, peers_;
  std::optional<Ring> ring_;
};

}  // namespace

void Request::wait() {
  if (!impl_) return;
  impl_->wait();
  impl_.reset();
}

bool Request::test() {
  if (!impl_) return true;
  if (!impl_->test()) return false;
  impl_.reset();
  return true;
}

void Communicator::all_reduce_avg(std::span<float> x) {
  const float s = 1.0f / static_cast<float>(size());
  for (auto& v : x) v *= s;
  all_reduce_sum(x);
}

void Communicator::all_reduce_avg(std::span<double> x) {
  const double s = 1.0 / static_cast<double>(size());
  for (auto& v : x) v *= s;
  all_reduce_sum(x);
}

#define DSRSQ_GATHER_CHECK(mine, all)                                                                        \
  DSRSQ_REQUIRE((all).size() == (mine).size() * static_cast<std::size_t>(size()), "all_gather on '", name(), \
                "': output holds ", (all).size(), " elements, expected size() * ", (mine).size(), " = ",       \
                (mine).size() * static_cast<std::size_t>(size()))

void Communicator::all_gather(std::span<const float> mine, std::span<float> all) {
  DSRSQ_GATHER_CHECK(mine, all);
  iall_gather_impl(mine.data(), mine.size(), all.data(), Scalar::f32).wait();
}
void Communicator::all_gather(std::span<const double> mine, std::span<double> all) {
  DSRSQ_GATHER_CHECK(mine, all);
  iall_gather_impl(mine.data(), mine.size(), all.data(), Scalar::f64).wait();
}
void Communicator::all_gather(std::span<const std::int64_t> mine, std::span<std::int64_t> all) {
  DSRSQ_GATHER_CHECK(mine, all);
  iall_gather_impl(mine.data(), mine.size(), all.data(), Scalar::i64).wait();
}
#undef DSRSQ_GATHER_CHECK

void Communicator::broadcast(std::span<float> x, int root) { ibroadcast_impl(x.data(), x.size(), Scalar::f32, root).wait(); }
void Communicator::broadcast(std::span<double> x, int root) { ibroadcast_impl(x.data(), x.size(), Scalar::f64, root).wait(); }
void Communicator::broadcast(std::span<std::int64_t> x, int root) {
  ibroadcast_impl(x.data(), x.size(), Scalar::i64, root).wait();
}
void Communicator::broadcast(std::span<std::byte> x, int root) { ibroadcast_impl(x.data(), x.size(), Scalar::byte, root).wait(); }

Request Communicator::send_recv_checked(const void* send, std::size_t send_count, int dest, void* recv,
                                        std::size_t recv_count, int src, Scalar type) {
  DSRSQ_REQUIRE(dest >= -1 && dest < size() && src >= -1 && src < size(), "send_recv on '", name(), "': dest ", dest,
                " / src ", src, " outside [-1, ", size(), ")");
  DSRSQ_REQUIRE(dest >= 0 || send_count == 0, "send_recv on '", name(), "': no destination but ", send_count,
                " elements to send");
  DSRSQ_REQUIRE(src >= 0 || recv_count == 0, "send_recv on '", name(), "': no source but room for ", recv_count,
                " elements");
  if (dest < 0 && src < 0) return Request();
  return isend_recv_impl(send, send_count, dest, recv, recv_count, src, type);
}

// ---- MpiCommunicator --------------------------------------------------------

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, double timeout_seconds)
    : comm_(comm), name_(std::move(name)) {
  DSRSQ_REQUIRE(comm != MPI_COMM_NULL, "communicator '", name_, "' is MPI_COMM_NULL");
  set_timeout(timeout_seconds);
  DSRSQ_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  DSRSQ_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  DSRSQ_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_));
  // Which peers a timed-out collective may be waiting for, built once.
  auto who = [&](int r) { return detail::cat("rank ", r, " (world rank ", world_rank_of(r), ")"); };
  if (size_ == 2) {
    peers_text_ = detail::cat("this rank posted it, so the one that did not is the other member, ", who(1 - rank_));
  } else {
    std::string list;
    int listed = 0;
    for (int r = 0; r < size_ && listed < 8; ++r)
      if (r != rank_) list += (listed++ ? ", " : "") + who(r);
    if (size_ - 1 > listed) list += detail::cat(", ... (", size_ - 1 - listed, " more)");
    peers_text_ = detail::cat("MPI cannot tell which of the other members has not posted it: ", list);
  }
}

int MpiCommunicator::world_rank_of(int r) const {
  MPI_Group mine = MPI_GROUP_NULL, world = MPI_GROUP_NULL;
  DSRSQ_MPI_CHECK(MPI_Comm_group(comm_, &mine));
  DSRSQ_MPI_CHECK(MPI_Comm_group(MPI_COMM_WORLD, &world));
  int w = MPI_UNDEFINED;
  DSRSQ_MPI_CHECK(MPI_Group_translate_ranks(mine, 1, &r, world, &w));
  MPI_Group_free(&mine);
  MPI_Group_free(&world);
  return w;
}

std::string MpiCommunicator::missing_peers_text() const { return peers_text_; }

void MpiCommunicator::set_timeout(double seconds) {
  DSRSQ_INPUT_CHECK(std::isfinite(seconds) && seconds > 0, "--comm_timeout must be a positive number of seconds, got ",
                    seconds);
  timeout_ = seconds;
}

Request MpiCommunicator::make_request(MPI_Request req, std::string what) {
  return Request(std::make_unique<MpiRequest>(std::vector<MPI_Request>{req}, std::move(what), timeout_, world_rank_,
                                              rank_, size_, name_, peers_text_));
}

Request MpiCommunicator::iall_reduce_sum_impl(void* buf, std::size_t count, Scalar type) {
  const int n = checked_count(count, "all_reduce_sum");
  MPI_Request req = MPI_REQUEST_NULL;
  DSRSQ_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf, n, mpi_type(type), MPI_SUM, comm_, &req));
  return make_request(req, detail::cat("all_reduce_sum(", scalar_name(type), " x ", count, ")"));
}

Request MpiCommunicator::iall_gather_impl(const void* mine, std::size_t count, void* all, Scalar type) {
  const int n = checked_count(count, "all_gather");
  MPI_Request req = MPI_REQUEST_NULL;
  DSRSQ_MPI_CHECK(MPI_Iallgather(mine, n, mpi_type(type), all, n, mpi_type(type), comm_, &req));
  return make_request(req, detail::cat("all_gather(", scalar_name(type), " x ", count, ")"));
}

Request MpiCommunicator::ibroadcast_impl(void* buf, std::size_t count, Scalar type, int root) {
  DSRSQ_REQUIRE(root >= 0 && root < size_, "broadcast on '", name_, "': root ", root, " outside [0, ", size_, ")");
  const int n = checked_count(count, "broadcast");
  MPI_Request req = MPI_REQUEST_NULL;
  DSRSQ_MPI_CHECK(MPI_Ibcast(buf, n, mpi_type(type), root, comm_, &req));
  return make_request(req, detail::cat("broadcast(", scalar_name(type), " x ", count, ", root ", root, ")"));
}

Request MpiCommunicator::ibarrier() {
  MPI_Request req = MPI_REQUEST_NULL;
  DSRSQ_MPI_CHECK(MPI_Ibarrier(comm_, &req));
  return make_request(req, "barrier");
}

Request MpiCommunicator::isend_recv_impl(const void* send, std::size_t send_count, int dest, void* recv,
                                         std::size_t recv_count, int src, Scalar type) {
  // One tag: messages between two ranks match in posting order (MPI's
  // non-overtaking rule), which the interface asks of its callers.
  constexpr int kTag = 0x7A11;
  std::vector<MPI_Request> reqs(2, MPI_REQUEST_NULL);  // [receive, send]
  const MPI_Datatype t = mpi_type(type);
  if (src >= 0) DSRSQ_MPI_CHECK(MPI_Irecv(recv, checked_count(recv_count, "send_recv"), t, src, kTag, comm_, &reqs[0]));
  if (dest >= 0)
    DSRSQ_MPI_CHECK(MPI_Isend(send, checked_count(send_count, "send_recv"), t, dest, kTag, comm_, &reqs[1]));
  auto who = [&](int r) {
    return r < 0 ? std::string("nobody") : detail::cat("rank ", r, " (world rank ", world_rank_of(r), ")");
  };
  MpiRequest::Ring ring{who(src), who(dest)};
  return Request(std::make_unique<MpiRequest>(
      std::move(reqs),
      detail::cat("send_recv(", scalar_name(type), ": ", send_count, " to rank ", dest, ", ", recv_count,
                  " from rank ", src, ")"),
      timeout_, world_rank_, rank_, size_, name_, peers_text_, std::move(ring)));
}

// ---- launch checks ----------------------------------------------------------

void comm_self_test(Communicator& comm) {
  const int n = comm.size(), r = comm.rank();
  const double expect = static_cast<double>(n) * (n + 1) / 2;
  auto fail = [&](const std::string& what, double got, double want) {
    throw Error(detail::cat(error_context(), "communication self-test failed on communicator '", comm.name(), "' (rank ",
                            r, " of ", n, "): ", what, " gave ", got, ", expected ", want));
  };
  constexpr std::size_t kLen = 1000;  // several MPI segments' worth would be bigger; this checks element order
  std::vector<float> f(kLen);
  std::vector<double> d(kLen);
  for (std::size_t i = 0; i < kLen; ++i) {
    f[i] = static_cast<float>((r + 1) * static_cast<double>(i + 1));
    d[i] = (r + 1) * static_cast<double>(i + 1);
  }
  std::int64_t one = r + 1;
  comm.all_reduce_sum(std::span<float>(f));
  comm.all_reduce_sum(std::span<double>(d));
  comm.all_reduce_sum(std::span<std::int64_t>(&one, 1));
  if (static_cast<double>(one) != expect) fail("all_reduce_sum(i64)", static_cast<double>(one), expect);
  for (std::size_t i = 0; i < kLen; ++i) {
    const double want = expect * static_cast<double>(i + 1);
    if (static_cast<double>(f[i]) != want) fail(detail::cat("all_reduce_sum(f32)[", i, "]"), f[i], want);
    if (d[i] != want) fail(detail::cat("all_reduce_sum(f64)[", i, "]"), d[i], want);
  }
  std::int64_t b = (r == 0) ? 4242 : -1;
  comm.broadcast(std::span<std::int64_t>(&b, 1), 0);
  if (b != 4242) fail("broadcast(i64) from rank 0", static_cast<double>(b), 4242);
  const std::int64_t mine = r + 1;
  std::vector<std::int64_t> all(static_cast<std::size_t>(n));
  comm.all_gather(std::span<const std::int64_t>(&mine, 1), std::span<std::int64_t>(all));
  for (int q = 0; q < n; ++q)
    if (all[static_cast<std::size_t>(q)] != q + 1)
      fail(detail::cat("all_gather(i64)[", q, "]"), static_cast<double>(all[static_cast<std::size_t>(q)]), q + 1);
  comm.barrier();
}

void check_launcher(int world_size, const EnvLookup& getenv) {
  if (world_size != 1) return;
  auto lookup = [&](const char* name) -> const char* { return getenv ? getenv(name) : std::getenv(name); };
  // Open MPI's mpirun sets OMPI_COMM_WORLD_SIZE for exactly the processes it
  // launched, so when it is present it alone decides (an intentional 1-rank
  // mpirun inside a multi-task Slurm allocation is fine). Otherwise SLURM_NTASKS
  // (srun sets it to the step's task count) is the launcher's word.
  const char* var = "OMPI_COMM_WORLD_SIZE";
  const char* v = lookup(var);
  if (!v || !*v) {
    var = "SLURM_NTASKS";
    v = lookup(var);
  }
  if (!v || !*v) return;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  if (end == v || *end != '\0') return;  // not a number: nothing to compare
  if (n > 1)
    raise_input_error(detail::cat("launcher/MPI mismatch: MPI reports a world of 1 process but ", var, "=", v,
                                  ", so every process believes it is rank 0. The program was probably built against "
                                  "a different MPI than the launcher's, or srun ran without PMIx (use srun "
                                  "--mpi=pmix, or mpirun from the same MPI)."));
}

std::optional<int> local_rank_from_env(const EnvLookup& getenv) {
  auto lookup = [&](const char* name) -> const char* { return getenv ? getenv(name) : std::getenv(name); };
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    const char* v = lookup(var);
    if (!v || !*v) continue;
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    if (end == v || *end != '\0' || n < 0 || n > 1'000'000) return std::nullopt;
    return static_cast<int>(n);
  }
  return std::nullopt;
}

int select_device(int local_rank, int device_count) {
  DSRSQ_REQUIRE(device_count > 0, "select_device: no CUDA device");
  DSRSQ_REQUIRE(local_rank >= 0, "select_device: negative local rank ", local_rank);
  return local_rank % device_count;
}

std::string host_name() {
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  return host;
}

std::int64_t text_key(const std::string& text) {
  std::uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return static_cast<std::int64_t>(h & 0x7fffffffffffffffULL);
}

int node_local_rank(Communicator& comm) {
  // Always gathered, so every rank takes part whichever way it decides.
  const std::int64_t mine = text_key(host_name());
  std::vector<std::int64_t> hosts(static_cast<std::size_t>(comm.size()));
  comm.all_gather(std::span<const std::int64_t>(&mine, 1), std::span<std::int64_t>(hosts));
  int same_host_below = 0;
  for (int q = 0; q < comm.rank(); ++q) same_host_below += hosts[static_cast<std::size_t>(q)] == mine;
  return local_rank_from_env().value_or(same_host_below);
}

}  // namespace dist
}  // namespace dsrsq
