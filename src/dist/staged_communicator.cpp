#include "dist/staged_communicator.hpp"

#include <cstdint>
#include <memory>
#include <vector>

#include "core/error.hpp"

namespace dsrsq::dist {
namespace {

// The device buffer as a tensor of the backend, for its copy ops. i64 travels
// as f64 (8-byte elements; the copies move bytes and never interpret them),
// bytes as i32 (whole multiples of 4 only).
TensorView device_view(Backend& be, const void* buf, std::size_t count, Scalar type, const char* op) {
  DType t = DType::f32;
  std::size_t n = count;
  switch (type) {
    case Scalar::f32: t = DType::f32; break;
    case Scalar::f64: case Scalar::i64: t = DType::f64; break;
    case Scalar::i32: t = DType::i32; break;
    case Scalar::byte:
      DSRSQ_REQUIRE(count % 4 == 0, "staged ", op, " on backend ", be.name(), ": ", count,
                    " bytes; device byte buffers are staged in whole multiples of 4 bytes");
      t = DType::i32;
      n = count / 4;
      break;
  }
  return TensorView(const_cast<void*>(buf), Shape{static_cast<std::int64_t>(n)}, t, be.device());
}

template <class T>
std::span<T> typed(std::vector<std::byte>& host, std::size_t count) {
  return std::span<T>(reinterpret_cast<T*>(host.data()), count);
}

// A staged operation in flight: the host operation on `host_`, then (once it
// completes) the copy of the staging buffer's first dev_.bytes() bytes back
// into the device buffer (an all-reduce's whole buffer, a send_recv's receive
// part; nothing when dev_ is empty).
class StagedRequest final : public Request::Impl {
 public:
  StagedRequest(Backend& be, TensorView dev, std::unique_ptr<std::vector<std::byte>> host, Request inner)
      : be_(be), dev_(dev), host_(std::move(host)), inner_(std::move(inner)) {}
  ~StagedRequest() override {
    // Still pending (error paths that end in MPI_Abort): MPI may still write
    // into the staging buffer, so it is left allocated, as MpiRequest leaves
    // its request.
    if (inner_.pending()) (void)host_.release();
  }
  bool test() override {
    if (!inner_.test()) return false;
    copy_back();
    return true;
  }
  void wait() override {
    inner_.wait();
    copy_back();
  }

 private:
  void copy_back() {
    if (done_) return;
    if (dev_.numel() > 0) be_.copy_from_host(std::span<const std::byte>(*host_).first(dev_.bytes()), dev_);
    done_ = true;
  }
  Backend& be_;
  TensorView dev_;
  std::unique_ptr<std::vector<std::byte>> host_;
  Request inner_;
  bool done_ = false;
};

template <class T>
void staged_avg(Backend& be, Communicator& host, std::span<T> x) {
  const TensorView dev(x.data(), Shape{static_cast<std::int64_t>(x.size())}, dtype_of<T>(), be.device());
  std::vector<T> h(x.size());
  be.copy_to_host(dev, std::as_writable_bytes(std::span<T>(h)));
  host.all_reduce_avg(std::span<T>(h));
  be.copy_from_host(std::as_bytes(std::span<const T>(h)), dev);
}

}  // namespace

StagedCommunicator::StagedCommunicator(Backend& be, Communicator& host) : be_(be), host_(host) {
  DSRSQ_REQUIRE(host.buffer_device() == Device::cpu, "StagedCommunicator: the carrying communicator '", host.name(),
                "' must work on host buffers, it takes ", device_name(host.buffer_device()));
}

void StagedCommunicator::all_reduce_avg(std::span<float> x) { staged_avg(be_, host_, x); }
void StagedCommunicator::all_reduce_avg(std::span<double> x) { staged_avg(be_, host_, x); }

Request StagedCommunicator::iall_reduce_sum_impl(void* buf, std::size_t count, Scalar type) {
  const TensorView dev = device_view(be_, buf, count, type, "all_reduce_sum");
  auto host = std::make_unique<std::vector<std::byte>>(dev.bytes());
  be_.copy_to_host(dev, *host);
  Request inner;
  switch (type) {
    case Scalar::f32: inner = host_.iall_reduce_sum(typed<float>(*host, count)); break;
    case Scalar::f64: inner = host_.iall_reduce_sum(typed<double>(*host, count)); break;
    case Scalar::i64: inner = host_.iall_reduce_sum(typed<std::int64_t>(*host, count)); break;
    case Scalar::i32: case Scalar::byte:
      DSRSQ_REQUIRE(false, "all_reduce_sum on '", name(), "': no ", scalar_name(type), " reduction in the interface");
  }
  return Request(std::make_unique<StagedRequest>(be_, dev, std::move(host), std::move(inner)));
}

Request StagedCommunicator::iall_gather_impl(const void* mine, std::size_t count, void* all, Scalar type) {
  const TensorView dmine = device_view(be_, mine, count, type, "all_gather");
  const TensorView dall = device_view(be_, all, count * static_cast<std::size_t>(size()), type, "all_gather");
  std::vector<std::byte> hmine(dmine.bytes()), hall(dall.bytes());
  be_.copy_to_host(dmine, hmine);
  const std::size_t n = count * static_cast<std::size_t>(size());
  switch (type) {
    case Scalar::f32: host_.all_gather(typed<const float>(hmine, count), typed<float>(hall, n)); break;
    case Scalar::f64: host_.all_gather(typed<const double>(hmine, count), typed<double>(hall, n)); break;
    case Scalar::i64:
      host_.all_gather(typed<const std::int64_t>(hmine, count), typed<std::int64_t>(hall, n));
      break;
    case Scalar::i32: case Scalar::byte:
      DSRSQ_REQUIRE(false, "all_gather on '", name(), "': no ", scalar_name(type), " all-gather in the interface");
  }
  be_.copy_from_host(hall, dall);
  return Request();
}

Request StagedCommunicator::ibroadcast_impl(void* buf, std::size_t count, Scalar type, int root) {
  const TensorView dev = device_view(be_, buf, count, type, "broadcast");
  std::vector<std::byte> host(dev.bytes());
  if (rank() == root) be_.copy_to_host(dev, host);
  switch (type) {
    case Scalar::f32: host_.broadcast(typed<float>(host, count), root); break;
    case Scalar::f64: host_.broadcast(typed<double>(host, count), root); break;
    case Scalar::i64: host_.broadcast(typed<std::int64_t>(host, count), root); break;
    case Scalar::i32: case Scalar::byte: host_.broadcast(std::span<std::byte>(host), root); break;
  }
  be_.copy_from_host(host, dev);
  return Request();
}

Request StagedCommunicator::isend_recv_impl(const void* send, std::size_t send_count, int dest, void* recv,
                                            std::size_t recv_count, int src, Scalar type) {
  // Staging buffer: [receive | send]. The send part is copied out now and the
  // host send_recv posted at once; the receive part goes back to the device
  // when the Request completes. Bytes on the host: MPI moves them unread.
  const TensorView dsend = device_view(be_, send, send_count, type, "send_recv");
  const TensorView drecv = device_view(be_, recv, recv_count, type, "send_recv");
  auto host = std::make_unique<std::vector<std::byte>>(drecv.bytes() + dsend.bytes());
  const std::span<std::byte> hrecv = std::span<std::byte>(*host).first(drecv.bytes());
  const std::span<std::byte> hsend = std::span<std::byte>(*host).subspan(drecv.bytes());
  if (send_count > 0) be_.copy_to_host(dsend, hsend);
  Request inner = host_.isend_recv(std::span<const std::byte>(hsend), dest, hrecv, src);
  return Request(std::make_unique<StagedRequest>(be_, drecv, std::move(host), std::move(inner)));
}

Request StagedCommunicator::ibarrier() {
  host_.barrier();
  return Request();
}

}  // namespace dsrsq::dist
