#pragma once
// NcclCommunicator: the Communicator interface (dist/communicator.hpp) over
// NCCL, for buffers in GPU memory (DESIGN.md section 5). Built only when CUDA
// and NCCL are found (CMake target dsrsq_nccl, compile definition
// DSRSQ_HAVE_NCCL=1); the CPU library dsrsq_dist never includes this header.
//
// Bootstrap. The constructor is collective over an MPI communicator: every
// rank picks its GPU (local rank modulo the visible device count, see
// local_rank_from_env), rank 0 makes an ncclUniqueId and broadcasts it over MPI
// (with the communicator's deadline), the ranks check that no two of them share
// a GPU (NCCL refuses duplicate devices in one communicator: with one GPU per
// node run one rank per node, or use CUDA_VISIBLE_DEVICES / Slurm
// --gpus-per-task), and the NCCL communicator is created in non-blocking mode
// (ncclConfig_t::blocking = 0), polled up to the deadline.
//
// Buffers. Every span handed to a collective must point to device memory of
// this communicator's device (cudaMalloc, or managed memory). Host memory is
// rejected with a dsrsq::Error (checked with cudaPointerGetAttributes) instead
// of faulting inside a kernel. Operations are enqueued on stream(), a
// non-blocking stream this communicator owns: data produced on another stream
// must be ordered first with wait_for(producer_stream), and consumers on other
// streams must wait for the Request (or call consumers_wait(stream)).
//
// Requests and deadlines. Issuing an operation returns once NCCL has enqueued
// it on stream() (in non-blocking mode NCCL may first need its peers to set up
// connections; that wait has the deadline too). The returned Request owns a
// CUDA event recorded after the operation; test() queries it and the
// communicator's asynchronous error, wait() polls both until the deadline
// (timeout_seconds()). On a timeout, an NCCL asynchronous error, or a failed
// CUDA call, the NCCL communicator is aborted (ncclCommAbort, which also stops
// NCCL kernels spinning on a dead peer) and dsrsq::Error is thrown naming the
// world rank, the rank in this communicator, the communicator's name, the
// device and the operation. After an abort every further operation throws; the
// caller is expected to end the job (main prints the error and calls MPI_Abort).
//
// Supported:
//   all_reduce_sum   f32, f64, i64 (in place; interface overloads)
//   all_reduce_avg   f32, f64 on the device: each value is scaled by 1/size()
//                    before the sum (NCCL PreMulSum), the DDP convention of
//                    Communicator::all_reduce_avg. Call it on an
//                    NcclCommunicator (static type): the base-class version
//                    scales on the host and must not be given device spans.
//   all_gather       f32, f64, i64 (in-place use allowed when mine is the
//                    rank's slot of all, as in NCCL)
//   broadcast        f32, f64, i64, byte (in place)
//   barrier          a one-element all-reduce on the device, then a host wait
//   send_recv        f32, f64, i32, i64, byte: one send and one receive fused
//                    in an ncclGroupStart/End (the ring step; sending to and
//                    receiving from oneself works); either side may be omitted
//                    (peer -1). Ring attention's K/V/position exchanges.
// Not supported: all-gather-v (unequal counts), reduce-scatter, reductions
// other than sum/avg, i32 reductions (no interface overload), host buffers,
// CUDA-graph capture of the operations, use from several threads at once (one
// thread drives a communicator; NCCL also forbids concurrent calls on one
// communicator), recovery after an abort (ncclCommShrink/revoke are not used),
// and two ranks of one communicator on the same GPU.
#include <cuda_runtime.h>
#include <nccl.h>
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "dist/communicator.hpp"

namespace dsrsq::dist {

// local_rank_from_env, node_local_rank and select_device (one GPU per rank)
// are in dist/communicator.hpp.

// ncclDataType_t for a Scalar (byte -> ncclUint8).
ncclDataType_t nccl_type(Scalar s);

class NcclCommunicator final : public Communicator {
 public:
  static constexpr double kDefaultTimeout = 300.0;  // seconds, as MpiCommunicator (--comm_timeout)

  // Collective over `comm` (not owned, only used during construction).
  // device < 0: chosen from the node-local rank (local_rank_from_env, else the
  // rank among the ranks of `comm` on this host) modulo cudaGetDeviceCount.
  NcclCommunicator(MPI_Comm comm, std::string name, double timeout_seconds = kDefaultTimeout, int device = -1);
  // Same, over an existing MpiCommunicator's communicator, name and timeout.
  explicit NcclCommunicator(const MpiCommunicator& mpi, int device = -1);
  // Flushes and frees the NCCL communicator (ncclCommFinalize, polled up to the
  // deadline, then ncclCommDestroy; ncclCommAbort if that fails). Not collective.
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override;
  int size() const override;
  const std::string& name() const override;
  double timeout_seconds() const override;
  void set_timeout(double seconds);

  Device buffer_device() const override { return Device::cuda; }
  int device() const;
  cudaStream_t stream() const;
  ncclComm_t nccl_comm() const;
  bool aborted() const;
  // Aborts the NCCL communicator now (idempotent). Pending operations end;
  // later operations throw.
  void abort();

  // Stream ordering: make stream() wait for the work already enqueued on
  // `producer`, or make `consumer` wait for the work already enqueued on stream().
  void wait_for(cudaStream_t producer);
  void consumers_wait(cudaStream_t consumer);
  // Standing order (nullptr: none): every operation issued from now on first
  // makes stream() wait for the work enqueued on `producer` at that moment
  // (wait_for). The data-parallel trainer sets the CudaBackend's stream, whose
  // kernels write the gradients and parameters the operations read; results
  // reach that stream's later kernels through Request::wait (a host wait).
  void set_producer_stream(cudaStream_t producer);

  // Device-side average (see the header comment); hides the host-side base versions.
  Request iall_reduce_avg(std::span<float> x);
  Request iall_reduce_avg(std::span<double> x);
  void all_reduce_avg(std::span<float> x) { iall_reduce_avg(x).wait(); }
  void all_reduce_avg(std::span<double> x) { iall_reduce_avg(x).wait(); }

  // send_recv (one ring step, fused in one NCCL group so neither side can
  // deadlock the other) is the interface's isend_recv / send_recv.

  struct State;  // shared with pending Requests (defined in the .cpp)

 protected:
  Request iall_reduce_sum_impl(void* buf, std::size_t count, Scalar type) override;
  Request iall_gather_impl(const void* mine, std::size_t count, void* all, Scalar type) override;
  Request ibroadcast_impl(void* buf, std::size_t count, Scalar type, int root) override;
  Request ibarrier() override;
  Request isend_recv_impl(const void* send, std::size_t send_count, int dest, void* recv, std::size_t recv_count,
                          int src, Scalar type) override;

 private:
  std::shared_ptr<State> s_;
};

// The launch self-test of comm_self_test (communicator.hpp) on device buffers:
// f32/f64/i64 sums, a broadcast, an all-gather, a ring send/recv and a barrier,
// each checked exactly on every rank. Throws dsrsq::Error naming the first mismatch.
void nccl_self_test(NcclCommunicator& comm);

}  // namespace dsrsq::dist
