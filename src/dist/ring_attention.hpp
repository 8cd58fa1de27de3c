#pragma once
// Ring attention with zigzag load balancing over the sequence-parallel (sp)
// communicator (ALGORITHMS.md sections 12.1 and 12.2 and the merge correction
// near its top).
//
// Sharding: a length-T sequence is cut into 2P chunks of T/(2P) tokens; sp rank
// r holds chunks r and 2P-1-r, so every rank has the same share of causal
// work. Each rank keeps the GLOBAL positions of its tokens (for RoPE and the
// causal mask); the attention ops mask by explicit positions, so no special
// case per half is needed for correctness.
//
// Forward: the rank's K/V block (with its positions) travels around the ring
// (P-1 exchanges; the next exchange is posted before the current block is
// computed). Each step gives a partial (O_b, lse_b) of the local queries
// against the current block, merged into the running (O, lse) by the guarded
// rule (merge_attention_partial).
//
// Backward: with the merged global o and lse every block's attention_bwd is
// exact. dq accumulates locally; each block's dk/dv contribution is added into
// a buffer that travels with the block and is back at its owner after P
// steps, where it is added to the rank's dk/dv.
//
// Every rank of `comm` must call these with the same shapes (B, T/P, NH, HS),
// dtype, causal and scale.
//
// Devices: the tensors live on the backend's device and `comm` must take
// buffers there (comm.buffer_device() == be.device()): MpiCommunicator for
// the CPU, NcclCommunicator on CUDA with NCCL, StagedCommunicator for sim and
// CUDA without NCCL. The travelling blocks and the partial (o_b, lse_b) are
// allocated on the backend, exchanged with Communicator::isend_recv, copied
// and merged with the backend's ops (copy, attention_merge, axpy): no host
// read of device data. On the CPU the arithmetic is the same op sequence as
// on any other backend, so a sim run equals a CPU run bit for bit.
//
// Waits on the ring exchanges have the communicator's timeout and throw
// dsrsq::Error naming the rank, the peer and the step.
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "dist/communicator.hpp"
#include "model/transformer.hpp"

namespace dsrsq::dist {

// Global positions of the tokens sp rank r holds: chunk r then chunk 2P-1-r,
// each T/(2P) tokens, in increasing order. Throws an input error naming --sp
// and the length unless T >= 1 is divisible by 2P (P >= 1, 0 <= r < P).
std::vector<std::int32_t> zigzag_shard(std::int64_t T, int P, int r);

// Guarded merge of a partial (o_b, lse_b) into the running (o, lse), in place,
// per row (b, t, h) in the tensors' dtype (fp32 for f32, f64 for f64):
//   lse = +inf (either side) is read as -inf (FlashAttention-2 convention);
//   m = max(lse, lse_b); m = -inf -> (o = 0, lse = -inf);
//   else w_a = exp(lse - m), w_b = exp(lse_b - m) (0 for a -inf side; the o of
//   an empty side is never read), lse = m + log(w_a + w_b),
//   o = (w_a o + w_b o_b) / (w_a + w_b).
// o, o_b: (B, T, NH, HS); lse, lse_b: (B, NH, T). The merge is
// be.attention_merge; all four tensors live on be's device.
void merge_attention_partial(TensorView o, TensorView lse, const TensorView& o_b, const TensorView& lse_b,
                             Backend& be = cpu_backend());

// local: the rank's zigzag q, k, v (B, T/P, NH, HS) with their global
// positions q_pos, k_pos (B, T/P); writes local.o and local.lse (the merged
// result over the whole sequence). local.causal and local.scale are honoured.
void ring_attention_fwd(Backend& be, Communicator& comm, const AttentionArgs& local);

// local: as the forward, plus dout, and o, lse from ring_attention_fwd.
// dq, dk, dv ACCUMULATE (+=) like attention_bwd: dq gets the gradient of the
// local queries over all keys, dk/dv the gradient of the local keys/values
// from all queries of the sequence.
void ring_attention_bwd(Backend& be, Communicator& comm, const AttentionGradArgs& local);

// The model's training attention as ring attention over `comm` (sequence
// parallelism): each rank's batch holds its zigzag shard of every sequence.
// `comm` takes buffers on the model's device (see the header comment).
// bytes_sent() counts what this rank sends: per forward (P-1) K/V blocks with
// their positions, per backward the same plus P dK/dV accumulators.
class RingAttention : public AttentionOverride {
 public:
  RingAttention(Backend& be, Communicator& comm) : be_(be), comm_(comm) {}
  void forward(std::int64_t, const AttentionArgs& a) override {
    ring_attention_fwd(be_, comm_, a);
    bytes_ += (comm_.size() - 1) * block_bytes(a.k, a.v, a.k_pos);
  }
  void backward(std::int64_t, const AttentionGradArgs& a) override {
    ring_attention_bwd(be_, comm_, a);
    bytes_ += (comm_.size() - 1) * block_bytes(a.k, a.v, a.k_pos) +
              comm_.size() * static_cast<std::int64_t>(a.k.bytes() + a.v.bytes());
  }
  std::int64_t bytes_sent() const { return bytes_; }

 private:
  static std::int64_t block_bytes(const TensorView& k, const TensorView& v, const TensorView& pos) {
    return static_cast<std::int64_t>(k.bytes() + v.bytes() + pos.bytes());
  }
  Backend& be_;
  Communicator& comm_;
  std::int64_t bytes_ = 0;
};

}  // namespace dsrsq::dist
