#pragma once
// Data-parallel gradient reduction in buckets, overlapped with backward
// (ALGORITHMS.md section 12.5 and its corrections: PyTorch DDP semantics).
//
// Buckets. The flat gradient buffer is cut into buckets along tensor
// boundaries, in the order backward finishes the tensors: the transformer's
// layers from last to first (each layer's 16 tensors are contiguous, taken in
// reverse layout order), then the tensors final only at the end of backward
// (lm_head, lnf.*, wte). That is "reverse registration order" with the
// end-of-backward tensors moved last, i.e. the order DDP's rebuild after the
// first iteration would find. A bucket is one contiguous range of the flat
// buffer, so it is one in-place MPI_Iallreduce with no copy; a bucket ends
// when the next tensor would exceed the cap or is not adjacent in memory. The
// first bucket is capped at first_bucket_cap_bytes (1 MiB, so communication
// starts early), the others at bucket_cap_bytes (25 MiB); a single tensor
// larger than the cap gets a bucket of its own.
//
// Overlap. Transformer::on_layer_grads_ready marks a layer's tensors ready;
// buckets are launched strictly in bucket order (the same order on every rank,
// as MPI requires for collectives on one communicator) as soon as all of their
// tensors are ready, while the remaining layers run backward. finish() launches
// whatever is left (tensors never marked ready are reduced as they are, e.g.
// zero gradients of unused parameters, so no bucket can hang), waits for every
// bucket with the communicator's timeout, and resets for the next step.
//
// Scaling. Reduction::sum adds the ranks' gradients. Reduction::average
// multiplies each bucket by 1/dp as it launches, then sums (DDP's rule).
// The trainer's choice (see global_inv_norm below): every rank normalises its
// loss by the GLOBAL answer-token count and the gradients are SUMMED, so the
// reduced gradient is exactly the one-process gradient of the whole batch up
// to float reassociation (no 1/dp factor to round, for any dp).
//
// Device buffers. The flat gradient buffer may live on a device (--device cuda
// or sim): the reducer then needs a communicator whose buffer_device() is that
// device (NcclCommunicator, or StagedCommunicator: dist/staged_communicator.hpp)
// and hands it spans of device pointers, which it never dereferences itself;
// Reduction::average scales the bucket with the model's backend instead of on
// the host. The Transformer constructor checks that the communicator takes
// buffers where the gradients live.
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "dist/communicator.hpp"

namespace dsrsq {
class Backend;
class Transformer;
}

namespace dsrsq::dist {

enum class Reduction { sum, average };

struct ReducerConfig {
  std::size_t bucket_cap_bytes = std::size_t{25} << 20;       // 25 MiB
  std::size_t first_bucket_cap_bytes = std::size_t{1} << 20;  // 1 MiB
  Reduction reduction = Reduction::sum;
};

// One tensor of the flat gradient buffer and the backward event after which it
// is final: the hook's layer index (>= 0), or -1 for "end of backward".
struct GradSlot {
  std::string name;
  std::int64_t offset = 0, numel = 0;  // elements, into the flat buffer
  std::int64_t ready_layer = -1;
};

struct GradBucket {
  std::int64_t begin = 0, end = 0;  // element range [begin, end) of the flat buffer
  std::vector<std::size_t> slots;   // indices into the reducer's slots
  std::string first, last;          // names of the first and last tensor (for tables and messages)
  std::size_t bytes() const { return static_cast<std::size_t>(end - begin) * sizeof(float); }
};

// Counters for the per-rank table. Cumulative over steps.
struct ReducerStats {
  std::int64_t steps = 0;
  std::int64_t buckets_launched = 0;
  std::int64_t buckets_launched_during_backward = 0;  // launched by the hook before finish(): overlapped
  std::uint64_t payload_bytes = 0;  // bytes all-reduced (count * 4); a ring all-reduce sends about 2 (n-1)/n of this per rank
  double wait_seconds = 0;          // time spent in finish() waiting for buckets
  double last_wait_seconds = 0;     // the same for the last step
};

class GradReducer {
 public:
  // Generic form: `slots` must tile `flat_grads` without overlap (any order).
  // Buckets follow the readiness order of `ready_order` (the hook's layer
  // values in the order they will arrive); within one event, slots are taken
  // in reverse layout order.
  // The span may hold device pointers (comm.buffer_device() != cpu): only
  // Reduction::sum then (average needs a backend to scale with).
  GradReducer(Communicator& comm, std::span<float> flat_grads, std::vector<GradSlot> slots,
              std::vector<std::int64_t> ready_order, ReducerConfig cfg = {});
  // The transformer's layout: layers L-1 .. 0, then the end-of-backward tensors.
  // Does not attach; call attach(model) to drive it from backward.
  GradReducer(Communicator& comm, Transformer& model, ReducerConfig cfg = {});
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Installs the hook on model.on_layer_grads_ready (and detach() removes it).
  // The model must outlive the attachment.
  void attach(Transformer& model);
  void detach();

  // Marks the tensors of `layer` ready (-1: the end-of-backward tensors) and
  // launches every bucket that is next in order and fully ready. Also gives
  // MPI a chance to progress the buckets already in flight.
  void mark_ready(std::int64_t layer);
  // Launches the buckets not yet launched, waits for all of them (throws
  // dsrsq::Error on timeout, naming the rank and the bucket) and resets the
  // readiness for the next step. Afterwards the flat buffer holds the reduced
  // gradients, bit-identical on every rank.
  void finish();
  // DDP's no_sync: while disabled, mark_ready() and finish() do nothing, so
  // gradients accumulate locally over micro-steps.
  void set_sync(bool on) { sync_ = on; }

  const std::vector<GradBucket>& buckets() const { return buckets_; }
  const std::vector<GradSlot>& slots() const { return slots_; }
  const ReducerStats& stats() const { return stats_; }
  const ReducerConfig& config() const { return cfg_; }

 private:
  void build_buckets(const std::vector<std::int64_t>& ready_order);
  void launch_ready();
  void launch(std::size_t b);

  Communicator& comm_;
  std::span<float> grads_;  // device pointers when comm_.buffer_device() != cpu
  Backend* scale_on_ = nullptr;  // the model's backend (Reduction::average on device buffers)
  std::vector<GradSlot> slots_;
  ReducerConfig cfg_;
  std::vector<GradBucket> buckets_;
  std::map<std::int64_t, std::size_t> event_of_layer_;      // hook layer value -> index in the ready order
  std::vector<std::vector<std::size_t>> buckets_of_event_;  // per event: one bucket index per slot it readies
  std::vector<int> pending_;                                // per bucket: slots not yet ready
  std::vector<Request> requests_;
  std::vector<bool> event_seen_;
  std::size_t next_launch_ = 0;
  bool sync_ = true;
  Transformer* attached_ = nullptr;
  ReducerStats stats_;
};

// Loss normaliser for data parallelism: 1 / (sum of the loss mask over every
// rank of `dp`), 0 when that sum is 0. Pass it to Transformer::forward(batch,
// inv_norm) on every rank and reduce the gradients with Reduction::sum: rank
// r's loss is then sum_r(mask * loss) / global_sum, the ranks' losses and
// gradients add up to the one-process loss and gradient of the whole batch.
// (A collective: every dp rank must call it.)
double global_inv_norm(Communicator& dp, std::span<const float> mask);
// Sum of a per-rank scalar over `comm` (e.g. the loss for reporting).
double all_reduce_scalar(Communicator& comm, double x);

}  // namespace dsrsq::dist
