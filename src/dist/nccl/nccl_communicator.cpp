#include "dist/nccl/nccl_communicator.hpp"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "core/error.hpp"

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 14, 0)
#error "NcclCommunicator needs NCCL >= 2.14 (non-blocking communicators, ncclCommFinalize, ncclGetLastError)"
#endif

namespace dsrsq::dist {

// ---- helpers without a communicator -----------------------------------------

ncclDataType_t nccl_type(Scalar s) {
  switch (s) {
    case Scalar::f32: return ncclFloat32;
    case Scalar::f64: return ncclFloat64;
    case Scalar::i32: return ncclInt32;
    case Scalar::i64: return ncclInt64;
    case Scalar::byte: return ncclUint8;
  }
  DSRSQ_REQUIRE(false, "nccl_type: unknown Scalar ", static_cast<int>(s));
  return ncclUint8;
}

namespace {

using clock_type = std::chrono::steady_clock;

clock_type::time_point deadline_after(clock_type::time_point start, double seconds) {
  return start + std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(seconds));
}

// Polling rhythm shared by every wait: yield for the first 20 ms (an
// all-reduce of a few KB finishes in microseconds), then short sleeps that
// double up to 200 us so a waiting rank does not steal an oversubscribed core.
class Backoff {
 public:
  explicit Backoff(clock_type::time_point start) : spin_until_(start + std::chrono::milliseconds(20)) {}
  void pause() {
    if (clock_type::now() < spin_until_) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(nap_);
      nap_ = std::min(nap_ * 2, std::chrono::microseconds(200));
    }
  }

 private:
  clock_type::time_point spin_until_;
  std::chrono::microseconds nap_{10};
};

std::string nccl_text(ncclResult_t r, ncclComm_t comm) {
  std::string s = ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last && *last) s += detail::cat(" (", last, ")");
  return s;
}

}  // namespace

// ---- shared state -------------------------------------------------------------

struct NcclCommunicator::State {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  std::int64_t* scratch = nullptr;  // one device element for barrier()
  cudaStream_t producer = nullptr;  // set_producer_stream: every operation waits for it first
  ncclRedOp_t avg_f32{}, avg_f64{};
  bool have_avg_ops = false;
  bool aborted = false;
  std::string abort_reason;
  int device = -1, rank = 0, size = 1, world_rank = 0;
  std::string name;
  double timeout = kDefaultTimeout;

  State() = default;
  State(const State&) = delete;
  State& operator=(const State&) = delete;
  ~State() { teardown(); }

  std::string who() const {
    return detail::cat("world rank ", world_rank, " (rank ", rank, " of ", size, " in NCCL communicator '", name,
                       "', GPU ", device, ")");
  }

  void abort_now(const std::string& reason) noexcept {
    if (aborted) return;
    aborted = true;
    abort_reason = reason;
    if (comm) {
      cudaSetDevice(device);
      const ncclResult_t r = ncclCommAbort(comm);  // also stops NCCL kernels waiting for a dead peer
      if (r != ncclSuccess && r != ncclInProgress)
        std::fprintf(stderr, "dsrsq: %s: ncclCommAbort failed: %s\n", who().c_str(), ncclGetErrorString(r));
      comm = nullptr;
    }
  }

  // Aborts, then throws: the single exit for every failure once the NCCL
  // communicator exists.
  [[noreturn]] void fail(const std::string& what, const std::string& why) {
    abort_now(detail::cat(what, ": ", why));
    throw Error(detail::cat(error_context(), "NCCL error: ", who(), " during ", what, ": ", why,
                            ". The NCCL communicator has been aborted."));
  }

  [[noreturn]] void fail_timeout(const std::string& what, clock_type::time_point start, const char* stage) {
    const double waited = std::chrono::duration<double>(clock_type::now() - start).count();
    abort_now(detail::cat("timeout in ", what));
    throw Error(detail::cat(error_context(), "communication timeout: ", who(), " waited ", waited, " s (limit ",
                            timeout, " s, --comm_timeout) for ", what, " to ", stage,
                            "; a peer rank has probably died or stalled. The NCCL communicator has been aborted."));
  }

  void require_usable(const std::string& what) const {
    if (aborted)
      throw Error(detail::cat(error_context(), "NCCL error: ", who(), ": ", what,
                              " on a communicator aborted earlier (", abort_reason, ")"));
  }

  // The communicator's asynchronous state: ncclSuccess, ncclInProgress (an
  // operation is still being set up / enqueued), or an error (which fails).
  ncclResult_t async_state(const std::string& what) {
    ncclResult_t st = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &st);
    if (r != ncclSuccess) fail(what, detail::cat("ncclCommGetAsyncError: ", nccl_text(r, comm)));
    if (st != ncclSuccess && st != ncclInProgress)
      fail(what, detail::cat("asynchronous NCCL error: ", nccl_text(st, comm)));
    return st;
  }

  // After a call on the non-blocking communicator: fail on an error, else poll
  // until NCCL has finished the call (state ncclSuccess) or the deadline passes.
  void settle(ncclResult_t r, const std::string& what, const char* call) {
    if (r != ncclSuccess && r != ncclInProgress) fail(what, detail::cat(call, ": ", nccl_text(r, comm)));
    const auto start = clock_type::now();
    const auto deadline = deadline_after(start, timeout);
    Backoff backoff(start);
    while (async_state(what) == ncclInProgress) {
      if (clock_type::now() >= deadline) fail_timeout(what, start, "be accepted by NCCL");
      backoff.pause();
    }
  }

  void cuda(cudaError_t e, const std::string& what, const char* call) {
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(what, detail::cat(call, ": ", cudaGetErrorString(e)));
    }
  }

  // Rejects host memory and buffers on another GPU before NCCL sees them.
  void check_device_buffer(const void* p, std::size_t bytes, const std::string& what, const char* which) {
    if (bytes == 0) return;
    cudaPointerAttributes a{};
    const cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) cudaGetLastError();
    const bool device_mem = e == cudaSuccess && (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged);
    if (!device_mem)
      throw Error(detail::cat(error_context(), "NCCL communicator '", name, "' (", who(), "): ", what, ": ", which,
                              " is not GPU memory (NcclCommunicator takes device buffers: cudaMalloc or managed)"));
    if (a.type == cudaMemoryTypeDevice && a.device != device)
      throw Error(detail::cat(error_context(), "NCCL communicator '", name, "' (", who(), "): ", what, ": ", which,
                              " lives on GPU ", a.device, ", the communicator on GPU ", device));
  }

  void teardown() noexcept {
    if (device >= 0) cudaSetDevice(device);
    if (comm && !aborted) {
      bool ok = true;
      if (have_avg_ops) {
        ok = ncclRedOpDestroy(avg_f32, comm) == ncclSuccess && ncclRedOpDestroy(avg_f64, comm) == ncclSuccess;
        have_avg_ops = false;
      }
      // Finalize flushes issued operations; poll it with the deadline, so a
      // stalled peer cannot hang the destructor, then free (or abort).
      ncclResult_t r = ok ? ncclCommFinalize(comm) : ncclInternalError;
      if (r == ncclSuccess || r == ncclInProgress) {
        const auto start = clock_type::now();
        const auto deadline = deadline_after(start, timeout);
        Backoff backoff(start);
        for (;;) {
          ncclResult_t st = ncclSuccess;
          if (ncclCommGetAsyncError(comm, &st) != ncclSuccess) {
            r = ncclInternalError;
            break;
          }
          if (st != ncclInProgress) {
            r = st;
            break;
          }
          if (clock_type::now() >= deadline) {
            r = ncclInProgress;
            break;
          }
          backoff.pause();
        }
      }
      if (r == ncclSuccess) {
        ncclCommDestroy(comm);
        comm = nullptr;
      } else {
        std::fprintf(stderr, "dsrsq: %s: NCCL communicator did not finalize cleanly (%s); aborting it\n", who().c_str(),
                     r == ncclInProgress ? "timeout" : ncclGetErrorString(r));
        abort_now("finalize failed");
      }
    }
    if (scratch) cudaFree(scratch);
    scratch = nullptr;
    if (stream) cudaStreamDestroy(stream);
    stream = nullptr;
  }
};

namespace {

using State = NcclCommunicator::State;

// A pending NCCL operation: an event recorded on the communicator's stream
// right after the operation. Holds the state, so the communicator's resources
// outlive every Request made from it.
class NcclRequest final : public Request::Impl {
 public:
  NcclRequest(std::shared_ptr<State> s, cudaEvent_t ev, std::string what)
      : s_(std::move(s)), ev_(ev), what_(std::move(what)) {}
  ~NcclRequest() override {
    if (!ev_) return;
    if (!done_ && !s_->aborted) {
      cudaSetDevice(s_->device);
      if (cudaEventQuery(ev_) == cudaErrorNotReady)
        std::fprintf(stderr, "dsrsq: %s dropped a pending %s (its buffers must stay allocated until it completes)\n",
                     s_->who().c_str(), what_.c_str());
      cudaGetLastError();
    }
    cudaEventDestroy(ev_);
  }
  bool test() override {
    if (done_) return true;
    s_->require_usable(detail::cat("waiting for ", what_));
    cudaSetDevice(s_->device);
    s_->async_state(what_);  // throws (after aborting) on an asynchronous error
    const cudaError_t e = cudaEventQuery(ev_);
    if (e == cudaSuccess) return done_ = true;
    if (e == cudaErrorNotReady) return false;
    s_->cuda(e, what_, "cudaEventQuery");
    return false;
  }
  void wait() override {
    const auto start = clock_type::now();
    const auto deadline = deadline_after(start, s_->timeout);
    Backoff backoff(start);
    for (;;) {
      if (test()) return;
      if (clock_type::now() >= deadline) s_->fail_timeout(what_, start, "complete");
      backoff.pause();
    }
  }

 private:
  std::shared_ptr<State> s_;
  cudaEvent_t ev_;
  std::string what_;
  bool done_ = false;
};

void stream_waits(State& s, cudaStream_t waiter, cudaStream_t producer, const std::string& what);

// Runs `enqueue` (one NCCL call or group, returning its ncclResult_t), waits
// until NCCL has accepted it, and returns a Request on an event recorded after it.
// With a producer stream set, stream() first waits for the work enqueued on it.

template <class F>
Request issue(const std::shared_ptr<State>& s, const std::string& what, const char* call, F&& enqueue) {
  s->cuda(cudaSetDevice(s->device), what, "cudaSetDevice");
  if (s->producer) stream_waits(*s, s->stream, s->producer, what);
  s->settle(enqueue(), what, call);
  cudaEvent_t ev = nullptr;
  s->cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), what, "cudaEventCreateWithFlags");
  const cudaError_t e = cudaEventRecord(ev, s->stream);
  if (e != cudaSuccess) {
    cudaEventDestroy(ev);
    s->cuda(e, what, "cudaEventRecord");
  }
  return Request(std::make_unique<NcclRequest>(s, ev, what));
}

std::string op_name(const char* op, Scalar type, std::size_t count) {
  return detail::cat(op, "(", scalar_name(type), " x ", count, ")");
}

}  // namespace

// ---- construction -------------------------------------------------------------

NcclCommunicator::NcclCommunicator(const MpiCommunicator& mpi, int device)
    : NcclCommunicator(mpi.comm(), mpi.name(), mpi.timeout_seconds(), device) {}

NcclCommunicator::NcclCommunicator(MPI_Comm comm, std::string name, double timeout_seconds, int device)
    : s_(std::make_shared<State>()) {
  // Bootstrap traffic (agreement, device keys, the unique id) goes through an
  // MpiCommunicator, so every step of the setup has the same deadline.
  MpiCommunicator boot(comm, name, timeout_seconds);
  State& s = *s_;
  s.name = std::move(name);
  s.timeout = boot.timeout_seconds();
  s.rank = boot.rank();
  s.size = boot.size();
  DSRSQ_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &s.world_rank));

  // Every rank reports whether it has a usable device before anyone enters
  // NCCL, so a rank without a GPU ends all ranks with one message instead of
  // leaving the others in ncclCommInitRank until the deadline.
  auto agree = [&](const std::string& local_problem, const char* step) {
    std::int64_t bad = local_problem.empty() ? 0 : 1;
    boot.all_reduce_sum(std::span<std::int64_t>(&bad, 1));
    if (!local_problem.empty())
      throw Error(detail::cat(error_context(), "NCCL communicator '", s.name, "': world rank ", s.world_rank, ": ",
                              local_problem));
    if (bad > 0)
      throw Error(detail::cat(error_context(), "NCCL communicator '", s.name, "': ", bad, " rank(s) failed at ", step,
                              " (see their messages); world rank ", s.world_rank, " gives up too"));
  };

  // Node-local rank (node_local_rank: the launcher's, else how many lower
  // ranks of `comm` share this host, through the deadline-guarded all-gather,
  // so no rank can hang here on a dead peer). Every rank takes part.
  const std::string host = host_name();
  const int node_rank = node_local_rank(boot);

  std::string problem;
  int count = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    cudaGetLastError();
    problem = detail::cat("no CUDA device (cudaGetDeviceCount: ", cudaGetErrorString(e), ")");
  } else if (count == 0) {
    problem = "no CUDA device (cudaGetDeviceCount gave 0)";
  }
  if (problem.empty()) {
    if (device < 0) device = select_device(node_rank, count);
    if (device >= count) {
      problem = detail::cat("device ", device, " requested but only ", count, " visible");
    } else if (const cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
      cudaGetLastError();
      problem = detail::cat("cudaSetDevice(", device, "): ", cudaGetErrorString(e));
    }
  }
  s.device = problem.empty() ? device : -1;
  agree(problem, "device selection");

  // NCCL refuses two ranks on one GPU ("Duplicate GPU detected"); say which
  // ranks collide, in the same words on every rank.
  {
    std::array<char, 32> bus{};
    if (const cudaError_t e = cudaDeviceGetPCIBusId(bus.data(), static_cast<int>(bus.size()), s.device);
        e != cudaSuccess) {
      cudaGetLastError();
      std::snprintf(bus.data(), bus.size(), "device-%d", s.device);
    }
    const std::int64_t mine = text_key(host + "/" + bus.data());
    std::vector<std::int64_t> keys(static_cast<std::size_t>(s.size));
    boot.all_gather(std::span<const std::int64_t>(&mine, 1), std::span<std::int64_t>(keys));
    for (int a = 0; a < s.size; ++a)
      for (int b = a + 1; b < s.size; ++b)
        if (keys[static_cast<std::size_t>(a)] == keys[static_cast<std::size_t>(b)])
          throw Error(detail::cat(error_context(), "NCCL communicator '", s.name, "': ranks ", a, " and ", b,
                                  " would share one GPU (this rank: GPU ", s.device, ", bus ", bus.data(),
                                  "); NCCL needs a distinct GPU per rank. Run at most as many ranks per node as "
                                  "GPUs, or give each task its own GPU (CUDA_VISIBLE_DEVICES, --gpus-per-task)."));
  }

  // Local resources before NCCL, so a failure here is a local error.
  problem.clear();
  if (const cudaError_t e = cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking); e != cudaSuccess) {
    problem = detail::cat("cudaStreamCreateWithFlags: ", cudaGetErrorString(e));
  } else if (const cudaError_t e2 = cudaMalloc(reinterpret_cast<void**>(&s.scratch), sizeof(std::int64_t));
             e2 != cudaSuccess) {
    problem = detail::cat("cudaMalloc(scratch): ", cudaGetErrorString(e2));
  } else if (const cudaError_t e3 = cudaMemset(s.scratch, 0, sizeof(std::int64_t)); e3 != cudaSuccess) {
    problem = detail::cat("cudaMemset(scratch): ", cudaGetErrorString(e3));
  }
  if (!problem.empty()) cudaGetLastError();
  agree(problem, "CUDA stream/buffer setup");

  // Rank 0 makes the unique id; it travels with a success flag so a failure on
  // rank 0 ends every rank with the reason.
  struct Boot {
    ncclUniqueId id;
    char error[200];
  } msg{};
  if (s.rank == 0) {
    if (const ncclResult_t r = ncclGetUniqueId(&msg.id); r != ncclSuccess)
      std::snprintf(msg.error, sizeof msg.error, "ncclGetUniqueId: %s", nccl_text(r, nullptr).c_str());
  }
  boot.broadcast(std::as_writable_bytes(std::span<Boot>(&msg, 1)), 0);
  if (msg.error[0])
    throw Error(detail::cat(error_context(), "NCCL communicator '", s.name, "': rank 0 could not create the NCCL id: ",
                            msg.error));

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every call returns at once; we poll with the deadline
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 23, 0)
  config.commName = s.name.c_str();  // shows in NCCL_DEBUG logs
#endif
  const std::string init = detail::cat("communicator initialisation (", s.size, " ranks)");
  const ncclResult_t r = ncclCommInitRankConfig(&s.comm, s.size, msg.id, s.rank, &config);
  if (r != ncclSuccess && r != ncclInProgress && s.comm == nullptr)
    throw Error(detail::cat(error_context(), "NCCL error: ", s.who(), " during ", init,
                            ": ncclCommInitRankConfig: ", nccl_text(r, nullptr)));
  s.settle(r, init, "ncclCommInitRankConfig");

  // The DDP average: each value times 1/size, then summed.
  float inv32 = 1.0f / static_cast<float>(s.size);
  double inv64 = 1.0 / static_cast<double>(s.size);
  s.settle(ncclRedOpCreatePreMulSum(&s.avg_f32, &inv32, ncclFloat32, ncclScalarHostImmediate, s.comm),
           "creating the average operator", "ncclRedOpCreatePreMulSum");
  s.settle(ncclRedOpCreatePreMulSum(&s.avg_f64, &inv64, ncclFloat64, ncclScalarHostImmediate, s.comm),
           "creating the average operator", "ncclRedOpCreatePreMulSum");
  s.have_avg_ops = true;
}

NcclCommunicator::~NcclCommunicator() = default;  // State tears down when the last Request lets go

int NcclCommunicator::rank() const { return s_->rank; }
int NcclCommunicator::size() const { return s_->size; }
const std::string& NcclCommunicator::name() const { return s_->name; }
double NcclCommunicator::timeout_seconds() const { return s_->timeout; }
int NcclCommunicator::device() const { return s_->device; }
cudaStream_t NcclCommunicator::stream() const { return s_->stream; }
ncclComm_t NcclCommunicator::nccl_comm() const { return s_->comm; }
bool NcclCommunicator::aborted() const { return s_->aborted; }
void NcclCommunicator::abort() { s_->abort_now("abort() called"); }

void NcclCommunicator::set_timeout(double seconds) {
  DSRSQ_INPUT_CHECK(std::isfinite(seconds) && seconds > 0, "--comm_timeout must be a positive number of seconds, got ",
                    seconds);
  s_->timeout = seconds;
}

void NcclCommunicator::wait_for(cudaStream_t producer) {
  s_->cuda(cudaSetDevice(s_->device), "wait_for", "cudaSetDevice");
  stream_waits(*s_, s_->stream, producer, "wait_for");
}

void NcclCommunicator::consumers_wait(cudaStream_t consumer) {
  s_->cuda(cudaSetDevice(s_->device), "consumers_wait", "cudaSetDevice");
  stream_waits(*s_, consumer, s_->stream, "consumers_wait");
}

void NcclCommunicator::set_producer_stream(cudaStream_t producer) { s_->producer = producer; }

namespace {

// `waiter` waits for the work enqueued on `producer` so far (an event recorded
// on producer; destroying it right away is fine, the wait still holds).
void stream_waits(State& s, cudaStream_t waiter, cudaStream_t producer, const std::string& what) {
  cudaEvent_t ev = nullptr;
  s.cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), what, "cudaEventCreateWithFlags");
  const cudaError_t e1 = cudaEventRecord(ev, producer);
  const cudaError_t e2 = e1 == cudaSuccess ? cudaStreamWaitEvent(waiter, ev, 0) : e1;
  cudaEventDestroy(ev);
  s.cuda(e2, what, "cudaEventRecord/cudaStreamWaitEvent");
}

}  // namespace

// ---- operations ---------------------------------------------------------------

Request NcclCommunicator::iall_reduce_sum_impl(void* buf, std::size_t count, Scalar type) {
  const std::string what = op_name("all_reduce_sum", type, count);
  s_->require_usable(what);
  s_->check_device_buffer(buf, count * scalar_bytes(type), what, "the buffer");
  return issue(s_, what, "ncclAllReduce", [&] {
    return ncclAllReduce(buf, buf, count, nccl_type(type), ncclSum, s_->comm, s_->stream);
  });
}

Request NcclCommunicator::iall_reduce_avg(std::span<float> x) {
  const std::string what = op_name("all_reduce_avg", Scalar::f32, x.size());
  s_->require_usable(what);
  s_->check_device_buffer(x.data(), x.size_bytes(), what, "the buffer");
  return issue(s_, what, "ncclAllReduce", [&] {
    return ncclAllReduce(x.data(), x.data(), x.size(), ncclFloat32, s_->avg_f32, s_->comm, s_->stream);
  });
}

Request NcclCommunicator::iall_reduce_avg(std::span<double> x) {
  const std::string what = op_name("all_reduce_avg", Scalar::f64, x.size());
  s_->require_usable(what);
  s_->check_device_buffer(x.data(), x.size_bytes(), what, "the buffer");
  return issue(s_, what, "ncclAllReduce", [&] {
    return ncclAllReduce(x.data(), x.data(), x.size(), ncclFloat64, s_->avg_f64, s_->comm, s_->stream);
  });
}

Request NcclCommunicator::iall_gather_impl(const void* mine, std::size_t count, void* all, Scalar type) {
  const std::string what = op_name("all_gather", type, count);
  s_->require_usable(what);
  s_->check_device_buffer(mine, count * scalar_bytes(type), what, "the input");
  s_->check_device_buffer(all, count * scalar_bytes(type) * static_cast<std::size_t>(s_->size), what, "the output");
  return issue(s_, what, "ncclAllGather", [&] {
    return ncclAllGather(mine, all, count, nccl_type(type), s_->comm, s_->stream);
  });
}

Request NcclCommunicator::ibroadcast_impl(void* buf, std::size_t count, Scalar type, int root) {
  DSRSQ_REQUIRE(root >= 0 && root < s_->size, "broadcast on '", s_->name, "': root ", root, " outside [0, ", s_->size,
                ")");
  const std::string what = detail::cat("broadcast(", scalar_name(type), " x ", count, ", root ", root, ")");
  s_->require_usable(what);
  s_->check_device_buffer(buf, count * scalar_bytes(type), what, "the buffer");
  return issue(s_, what, "ncclBroadcast", [&] {
    return ncclBroadcast(buf, buf, count, nccl_type(type), root, s_->comm, s_->stream);
  });
}

Request NcclCommunicator::ibarrier() {
  s_->require_usable("barrier");
  return issue(s_, "barrier", "ncclAllReduce",
               [&] { return ncclAllReduce(s_->scratch, s_->scratch, 1, ncclInt64, ncclSum, s_->comm, s_->stream); });
}

Request NcclCommunicator::isend_recv_impl(const void* send, std::size_t send_count, int dest, void* recv,
                                          std::size_t recv_count, int src, Scalar type) {
  // dest, src, the counts: checked by Communicator::send_recv_checked.
  const std::string what = detail::cat("send_recv(", scalar_name(type), ": ", send_count, " to rank ", dest, ", ",
                                       recv_count, " from rank ", src, ")");
  s_->require_usable(what);
  s_->check_device_buffer(send, send_count * scalar_bytes(type), what, "the send buffer");
  s_->check_device_buffer(recv, recv_count * scalar_bytes(type), what, "the receive buffer");
  const ncclDataType_t t = nccl_type(type);
  return issue(s_, what, "ncclGroupStart/ncclSend/ncclRecv/ncclGroupEnd", [&] {
    ncclResult_t first = ncclGroupStart();
    if (first != ncclSuccess) return first;
    if (dest >= 0) first = ncclSend(send, send_count, t, dest, s_->comm, s_->stream);
    if (src >= 0) {
      const ncclResult_t r = ncclRecv(recv, recv_count, t, src, s_->comm, s_->stream);
      if (first == ncclSuccess) first = r;
    }
    const ncclResult_t end = ncclGroupEnd();  // always close the group, even after an error inside it
    return first != ncclSuccess && first != ncclInProgress ? first : end;
  });
}

// ---- launch self-test -----------------------------------------------------------

namespace {

// A device copy of a host vector, moved through the communicator's stream so
// it is ordered before the operations that use it.
template <class T>
class DeviceVec {
 public:
  DeviceVec(NcclCommunicator& c, const std::vector<T>& host) : c_(c), n_(host.size()) {
    check(cudaSetDevice(c.device()), "cudaSetDevice");
    check(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<std::size_t>(n_, 1) * sizeof(T)), "cudaMalloc");
    check(cudaMemcpyAsync(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice, c.stream()), "cudaMemcpyAsync");
    check(cudaStreamSynchronize(c.stream()), "cudaStreamSynchronize");
  }
  ~DeviceVec() { cudaFree(p_); }
  DeviceVec(const DeviceVec&) = delete;
  DeviceVec& operator=(const DeviceVec&) = delete;
  std::span<T> span() { return {p_, n_}; }
  // Call after the operations on it have been waited for.
  std::vector<T> host() {
    std::vector<T> h(n_);
    check(cudaMemcpyAsync(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost, c_.stream()), "cudaMemcpyAsync");
    check(cudaStreamSynchronize(c_.stream()), "cudaStreamSynchronize");
    return h;
  }

 private:
  static void check(cudaError_t e, const char* call) {
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw Error(detail::cat(error_context(), "NCCL self-test: ", call, ": ", cudaGetErrorString(e)));
    }
  }
  NcclCommunicator& c_;
  std::size_t n_;
  T* p_ = nullptr;
};

}  // namespace

void nccl_self_test(NcclCommunicator& comm) {
  const int n = comm.size(), r = comm.rank();
  const double expect = static_cast<double>(n) * (n + 1) / 2;
  auto fail = [&](const std::string& what, double got, double want) {
    throw Error(detail::cat(error_context(), "NCCL self-test failed on communicator '", comm.name(), "' (rank ", r,
                            " of ", n, ", GPU ", comm.device(), "): ", what, " gave ", got, ", expected ", want));
  };
  constexpr std::size_t kLen = 1000;
  std::vector<float> f(kLen);
  std::vector<double> d(kLen);
  for (std::size_t i = 0; i < kLen; ++i) {
    f[i] = static_cast<float>((r + 1) * static_cast<double>(i + 1));
    d[i] = (r + 1) * static_cast<double>(i + 1);
  }
  DeviceVec<float> df(comm, f);
  DeviceVec<double> dd(comm, d);
  DeviceVec<std::int64_t> di(comm, std::vector<std::int64_t>{r + 1});
  Request rf = comm.iall_reduce_sum(df.span());
  Request rd = comm.iall_reduce_sum(dd.span());
  Request ri = comm.iall_reduce_sum(di.span());
  rf.wait();
  rd.wait();
  ri.wait();
  const auto hi = di.host();
  if (static_cast<double>(hi[0]) != expect) fail("all_reduce_sum(i64)", static_cast<double>(hi[0]), expect);
  const auto hf = df.host();
  const auto hd = dd.host();
  for (std::size_t i = 0; i < kLen; ++i) {
    const double want = expect * static_cast<double>(i + 1);
    if (static_cast<double>(hf[i]) != want) fail(detail::cat("all_reduce_sum(f32)[", i, "]"), hf[i], want);
    if (hd[i] != want) fail(detail::cat("all_reduce_sum(f64)[", i, "]"), hd[i], want);
  }
  DeviceVec<std::int64_t> db(comm, std::vector<std::int64_t>{r == 0 ? 4242 : -1});
  comm.broadcast(db.span(), 0);
  if (const auto hb = db.host(); hb[0] != 4242) fail("broadcast(i64) from rank 0", static_cast<double>(hb[0]), 4242);
  DeviceVec<std::int64_t> mine(comm, std::vector<std::int64_t>{r + 1});
  DeviceVec<std::int64_t> all(comm, std::vector<std::int64_t>(static_cast<std::size_t>(n), -1));
  comm.all_gather(std::span<const std::int64_t>(mine.span()), all.span());
  const auto ha = all.host();
  for (int q = 0; q < n; ++q)
    if (ha[static_cast<std::size_t>(q)] != q + 1)
      fail(detail::cat("all_gather(i64)[", q, "]"), static_cast<double>(ha[static_cast<std::size_t>(q)]), q + 1);
  // One ring step: rank r sends r + 1 to r + 1 and receives from r - 1.
  DeviceVec<std::int64_t> out(comm, std::vector<std::int64_t>{r + 1});
  DeviceVec<std::int64_t> in(comm, std::vector<std::int64_t>{-1});
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  comm.send_recv(std::span<const std::int64_t>(out.span()), next, in.span(), prev);
  if (const auto hr = in.host(); hr[0] != prev + 1) fail("send_recv(i64) from the previous rank", static_cast<double>(hr[0]), prev + 1);
  comm.barrier();
}

}  // namespace dsrsq::dist
