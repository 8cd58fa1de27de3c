#pragma once
// StagedCommunicator: the Communicator interface on a backend's device buffers
// (DESIGN.md section 5), carried by a host communicator. It serves the
// simulated device (--device sim) and CUDA builds without NCCL; with NCCL a
// CUDA run uses NcclCommunicator instead (dist/nccl/).
//
// Every operation copies the device buffer into a host staging buffer through
// the backend's copy_to_host, runs the host communicator's collective on it,
// and copies the result back with copy_from_host. The device pointer is never
// read on the host (on sim it is poisoned: a host read would fault), and the
// host communicator's collective is the one a host run makes, on the same
// values: a sim run reduces its gradients bit for bit as a CPU run does.
//
// Overlap: iall_reduce_sum copies the buffer out and starts the host
// all-reduce at once; the copy back happens when the Request completes
// (test() or wait()), so the gradient buckets still travel while backward
// goes on. Each Request owns its staging buffer. isend_recv (ring attention's
// exchanges) likewise copies the send buffer out and posts the host send_recv
// at once; the received bytes go back to the device when the Request
// completes. all_gather and broadcast are blocking (the data-parallel code
// calls only the blocking forms).
//
// all_reduce_avg (hiding the base version, which would scale device memory on
// the host) scales the staged copy on the host exactly as
// Communicator::all_reduce_avg does, then sums.
//
// Element types: f32, f64, i64 (copied as 8-byte elements) and i32; byte
// buffers (broadcast, send_recv) only in whole multiples of 4 bytes (the
// backend's copies take whole f32/i32 elements); anything else raises
// dsrsq::Error naming the operation.
#include <cstddef>
#include <span>
#include <string>

#include "backend/backend.hpp"
#include "dist/communicator.hpp"

namespace dsrsq::dist {

class StagedCommunicator final : public Communicator {
 public:
  // `be`: the backend owning the buffers (its device is buffer_device());
  // `host`: the communicator that moves the staged copies (not owned; must
  // outlive this one and every Request made from it).
  StagedCommunicator(Backend& be, Communicator& host);

  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  const std::string& name() const override { return host_.name(); }
  double timeout_seconds() const override { return host_.timeout_seconds(); }
  Device buffer_device() const override { return be_.device(); }
  Backend& backend() const { return be_; }

  void all_reduce_avg(std::span<float> x);
  void all_reduce_avg(std::span<double> x);

 protected:
  Request iall_reduce_sum_impl(void* buf, std::size_t count, Scalar type) override;
  Request iall_gather_impl(const void* mine, std::size_t count, void* all, Scalar type) override;
  Request ibroadcast_impl(void* buf, std::size_t count, Scalar type, int root) override;
  Request ibarrier() override;
  Request isend_recv_impl(const void* send, std::size_t send_count, int dest, void* recv, std::size_t recv_count,
                          int src, Scalar type) override;

 private:
  Backend& be_;
  Communicator& host_;
};

}  // namespace dsrsq::dist
