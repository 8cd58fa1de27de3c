#pragma once
// One communication interface for the distributed code (DESIGN.md section 5).
// Where the buffers of a communicator live is buffer_device(): MpiCommunicator
// works on host buffers (Device::cpu); NcclCommunicator (dist/nccl/, CUDA
// builds with NCCL) on GPU memory; StagedCommunicator (dist/staged_communicator.hpp)
// on any backend's device memory, staged through host copies onto a host
// communicator. Spans handed to a device communicator hold device pointers
// (TensorView::device_ptr): never dereferenced on the host.
//
// Every collective takes std::span, so an element count can never be mistaken
// for a byte count (STYLE.md habit 7). Every blocking collective is the
// non-blocking one followed by Request::wait(), and every wait has a deadline:
// a collective that does not complete within the communicator's timeout throws
// dsrsq::Error naming the waiting rank and the operation; main() then prints
// it and calls MPI_Abort, so a dead or stalled peer ends the job instead of
// hanging it (DESIGN.md section 5, STYLE.md habit 6).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include <mpi.h>

#include "core/tensor.hpp"

namespace dsrsq::dist {

// Element types the collectives accept.
enum class Scalar { f32, f64, i32, i64, byte };
const char* scalar_name(Scalar s);
std::size_t scalar_bytes(Scalar s);

// A pending non-blocking operation. Move-only; an empty Request is complete.
class Request {
 public:
  class Impl {
   public:
    virtual ~Impl() = default;
    virtual bool test() = 0;  // true once complete; drives progress
    virtual void wait() = 0;  // blocks until complete or throws on timeout
  };
  Request() = default;
  explicit Request(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
  Request(Request&&) noexcept = default;
  Request& operator=(Request&&) noexcept = default;
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  ~Request() = default;

  // Waits (with the communicator's timeout); afterwards the Request is empty.
  void wait();
  // Non-blocking completion check; also gives MPI a chance to progress.
  bool test();
  bool pending() const { return impl_ != nullptr; }

 private:
  std::unique_ptr<Impl> impl_;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;  // "world", "dp", "sp": appears in error messages
  virtual double timeout_seconds() const = 0;
  // Where the buffers handed to the collectives must live (cpu: host memory).
  virtual Device buffer_device() const { return Device::cpu; }

  // In-place sum over all ranks.
  Request iall_reduce_sum(std::span<float> x) { return iall_reduce_sum_impl(x.data(), x.size(), Scalar::f32); }
  Request iall_reduce_sum(std::span<double> x) { return iall_reduce_sum_impl(x.data(), x.size(), Scalar::f64); }
  Request iall_reduce_sum(std::span<std::int64_t> x) { return iall_reduce_sum_impl(x.data(), x.size(), Scalar::i64); }
  void all_reduce_sum(std::span<float> x) { iall_reduce_sum(x).wait(); }
  void all_reduce_sum(std::span<double> x) { iall_reduce_sum(x).wait(); }
  void all_reduce_sum(std::span<std::int64_t> x) { iall_reduce_sum(x).wait(); }
  // In-place average, DDP convention: each value is scaled by 1/size() first,
  // then summed (so the scaled contributions are what travel).
  void all_reduce_avg(std::span<float> x);
  void all_reduce_avg(std::span<double> x);

  // all[r * mine.size() + i] = rank r's mine[i]; all.size() must be size() * mine.size().
  void all_gather(std::span<const float> mine, std::span<float> all);
  void all_gather(std::span<const double> mine, std::span<double> all);
  void all_gather(std::span<const std::int64_t> mine, std::span<std::int64_t> all);
  // x on every rank becomes root's x.
  void broadcast(std::span<float> x, int root);
  void broadcast(std::span<double> x, int root);
  void broadcast(std::span<std::int64_t> x, int root);
  void broadcast(std::span<std::byte> x, int root);
  void barrier() { ibarrier().wait(); }

  // Point to point, one ring step: send `send` to rank `dest` and receive
  // `recv` from rank `src`, both posted at once so that neither side can block
  // the other (sending to and receiving from oneself works). dest < 0 (send
  // must then be empty) or src < 0 (recv empty) omits that side. The Request
  // completes when both sides have; `send` must stay unchanged and `recv`
  // unread until then. Messages between two ranks are matched in the order
  // they are posted, so every rank posts its exchanges in the same order.
  Request isend_recv(std::span<const float> send, int dest, std::span<float> recv, int src) {
    return send_recv_checked(send.data(), send.size(), dest, recv.data(), recv.size(), src, Scalar::f32);
  }
  Request isend_recv(std::span<const double> send, int dest, std::span<double> recv, int src) {
    return send_recv_checked(send.data(), send.size(), dest, recv.data(), recv.size(), src, Scalar::f64);
  }
  Request isend_recv(std::span<const std::int32_t> send, int dest, std::span<std::int32_t> recv, int src) {
    return send_recv_checked(send.data(), send.size(), dest, recv.data(), recv.size(), src, Scalar::i32);
  }
  Request isend_recv(std::span<const std::int64_t> send, int dest, std::span<std::int64_t> recv, int src) {
    return send_recv_checked(send.data(), send.size(), dest, recv.data(), recv.size(), src, Scalar::i64);
  }
  Request isend_recv(std::span<const std::byte> send, int dest, std::span<std::byte> recv, int src) {
    return send_recv_checked(send.data(), send.size(), dest, recv.data(), recv.size(), src, Scalar::byte);
  }
  template <class T>
  void send_recv(std::span<const T> send, int dest, std::span<T> recv, int src) {
    isend_recv(send, dest, recv, src).wait();
  }

 protected:
  virtual Request iall_reduce_sum_impl(void* buf, std::size_t count, Scalar type) = 0;
  virtual Request iall_gather_impl(const void* mine, std::size_t count, void* all, Scalar type) = 0;
  virtual Request ibroadcast_impl(void* buf, std::size_t count, Scalar type, int root) = 0;
  virtual Request ibarrier() = 0;
  // dest, src in [-1, size()), an omitted side empty, not both omitted
  // (checked by the caller).
  virtual Request isend_recv_impl(const void* send, std::size_t send_count, int dest, void* recv,
                                  std::size_t recv_count, int src, Scalar type) = 0;

 private:
  Request send_recv_checked(const void* send, std::size_t send_count, int dest, void* recv, std::size_t recv_count,
                            int src, Scalar type);
};

// Communicator over an MPI communicator (host buffers). Does not own `comm`
// (ProcessGrid owns the split communicators; MPI_COMM_WORLD is never freed).
class MpiCommunicator final : public Communicator {
 public:
  static constexpr double kDefaultTimeout = 300.0;  // seconds (--comm_timeout)
  MpiCommunicator(MPI_Comm comm, std::string name, double timeout_seconds = kDefaultTimeout);
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  double timeout_seconds() const override { return timeout_; }
  void set_timeout(double seconds);
  MPI_Comm comm() const { return comm_; }
  // The MPI_COMM_WORLD rank of this communicator's rank r.
  int world_rank_of(int r) const;
  // For timeout messages: who a collective on this communicator waits for.
  // MPI cannot tell which members have not posted a collective, so this names
  // them all ("rank 1 (world rank 3)", at most 8), and with two members says
  // that the other one is the rank that did not arrive.
  std::string missing_peers_text() const;

 protected:
  Request iall_reduce_sum_impl(void* buf, std::size_t count, Scalar type) override;
  Request iall_gather_impl(const void* mine, std::size_t count, void* all, Scalar type) override;
  Request ibroadcast_impl(void* buf, std::size_t count, Scalar type, int root) override;
  Request ibarrier() override;
  Request isend_recv_impl(const void* send, std::size_t send_count, int dest, void* recv, std::size_t recv_count,
                          int src, Scalar type) override;

 private:
  Request make_request(MPI_Request req, std::string what);
  MPI_Comm comm_;
  std::string name_;
  double timeout_;
  int rank_ = 0, size_ = 1, world_rank_ = 0;
  std::string peers_text_;  // missing_peers_text(), built once
};

// Launch self-test (STYLE.md habit 4): every rank contributes r + 1 (as f32,
// f64 and i64, plus a vector whose element i is (r + 1) * (i + 1)); the sums
// must equal n(n+1)/2 (times i + 1) exactly on every rank, and a broadcast and
// an all-gather must deliver the known values. Throws dsrsq::Error naming the
// first mismatch. Integer-valued floats below 2^24 make the f32 answer exact.
void comm_self_test(Communicator& comm);

// Launcher check: throws dsrsq::Error when MPI reports a world of 1 but the
// launcher says more (OMPI_COMM_WORLD_SIZE when set, else SLURM_NTASKS), i.e.
// every process believes it is rank 0 (a binary built against another MPI,
// or srun without PMIx). `getenv` is injectable for tests.
using EnvLookup = std::function<const char*(const char*)>;
void check_launcher(int world_size, const EnvLookup& getenv = {});

// One GPU per rank. The node-local rank the launcher reports:
// OMPI_COMM_WORLD_LOCAL_RANK when set (mpirun, also inside a Slurm allocation),
// else MPI_LOCALRANKID (MPICH/Hydra), else SLURM_LOCALID (srun). The first
// variable that is set decides; nullopt when none is set or its value is not a
// non-negative integer.
std::optional<int> local_rank_from_env(const EnvLookup& getenv = {});
// The node-local rank of this rank of `comm`: local_rank_from_env, else the
// number of lower ranks of `comm` on this host (host names compared through a
// deadline-guarded all-gather). A collective: every rank of `comm` calls it.
int node_local_rank(Communicator& comm);
// The device a rank uses: local_rank modulo device_count (device_count > 0).
int select_device(int local_rank, int device_count);
// This machine's host name, and a 64-bit key of a text (FNV-1a: host names,
// "host/PCI bus id") for comparing such texts across ranks as integers.
std::string host_name();
std::int64_t text_key(const std::string& text);

}  // namespace dsrsq::dist
