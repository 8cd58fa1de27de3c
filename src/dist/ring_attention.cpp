#include "dist/ring_attention.hpp"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "core/error.hpp"

namespace dsrsq::dist {

std::vector<std::int32_t> zigzag_shard(std::int64_t T, int P, int r) {
  DSRSQ_INPUT_CHECK(P >= 1, "zigzag sharding: --sp must be >= 1 (got ", P, ")");
  DSRSQ_REQUIRE(r >= 0 && r < P, "zigzag sharding: rank ", r, " outside [0, ", P, ")");
  DSRSQ_INPUT_CHECK(T >= 1 && T % (2 * static_cast<std::int64_t>(P)) == 0, "zigzag sharding: sequence length ", T,
                    " is not divisible by 2 * sp = ", 2 * P, " (--sp ", P,
                    "): pad or choose another length so that every rank holds two equal chunks");
  DSRSQ_INPUT_CHECK(T <= std::numeric_limits<std::int32_t>::max(), "zigzag sharding: sequence length ", T,
                    " exceeds the i32 position range");
  const std::int64_t c = T / (2 * static_cast<std::int64_t>(P));
  std::vector<std::int32_t> pos;
  pos.reserve(static_cast<std::size_t>(2 * c));
  for (std::int64_t chunk : {static_cast<std::int64_t>(r), static_cast<std::int64_t>(2 * P - 1 - r)})
    for (std::int64_t i = 0; i < c; ++i) pos.push_back(static_cast<std::int32_t>(chunk * c + i));
  return pos;
}

namespace {

void require_cpu(const char* op, std::initializer_list<const TensorView*> ts) {
  for (const TensorView* t : ts)
    DSRSQ_REQUIRE(t->empty() || t->device == Device::cpu, op, ": tensors must be on the CPU (MPI on host buffers)");
}

int byte_count(std::size_t n) {
  DSRSQ_REQUIRE(n <= static_cast<std::size_t>(std::numeric_limits<int>::max()), "ring attention: a block of ", n,
                " bytes exceeds MPI's int count");
  return static_cast<int>(n);
}

// Waits for all requests with the communicator's deadline (a dead or stalled
// peer ends in an Error naming this rank, the step and the peer(s) whose
// transfer is still pending, not a hang). reqs come in pairs from post_bytes:
// even entries receive from `from`, odd ones send to `to`.
void wait_all(std::vector<MPI_Request>& reqs, const MpiCommunicator& comm, const std::string& what, int to, int from) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const auto deadline =
      start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(comm.timeout_seconds()));
  const auto spin_until = start + std::chrono::milliseconds(20);
  auto nap = std::chrono::microseconds(10);
  for (;;) {
    int flag = 0;
    DSRSQ_MPI_CHECK(MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &flag, MPI_STATUSES_IGNORE));
    if (flag) {
      reqs.clear();
      return;
    }
    if (clock::now() >= deadline) {
      const double waited = std::chrono::duration<double>(clock::now() - start).count();
      bool recv_pending = false, send_pending = false;
      for (std::size_t i = 0; i < reqs.size(); ++i) {
        int done = 0;
        DSRSQ_MPI_CHECK(MPI_Test(&reqs[i], &done, MPI_STATUS_IGNORE));
        if (!done) (i % 2 == 0 ? recv_pending : send_pending) = true;
      }
      std::string peers;
      if (recv_pending)
        peers = detail::cat("nothing arrived from rank ", from, " (world rank ", comm.world_rank_of(from), ")");
      if (send_pending)
        peers += detail::cat(peers.empty() ? "" : "; ", "rank ", to, " (world rank ", comm.world_rank_of(to),
                             ") did not take what this rank sent");
      if (peers.empty()) peers = "every transfer completed at the deadline";
      throw Error(detail::cat(error_context(), "communication timeout: rank ", comm.rank(), " of ", comm.size(),
                              " (world rank ", comm.world_rank_of(comm.rank()), ") in communicator '", comm.name(),
                              "' waited ", waited, " s (limit ", comm.timeout_seconds(), " s, --comm_timeout) for ",
                              what, "; a peer rank has probably died or stalled: ", peers));
    }
    if (clock::now() < spin_until) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::microseconds(200));
    }
  }
}

// Raw host storage for a travelling block: k, v (and dk, dv in backward) as
// bytes of the tensors' dtype, and the key positions.
struct Block {
  std::vector<std::byte> k, v, dk, dv;
  std::vector<std::int32_t> pos;
};

TensorView view_of(std::vector<std::byte>& buf, const TensorView& like) {
  return TensorView(buf.data(), like.shape, like.dtype, Device::cpu);
}

constexpr int kTagK = 0x7A11, kTagV = 0x7A12, kTagPos = 0x7A13, kTagDK = 0x7A14, kTagDV = 0x7A15;

void post_bytes(std::vector<MPI_Request>& reqs, const void* send, void* recv, std::size_t n, int to, int from,
                int tag, MPI_Comm c) {
  reqs.emplace_back();
  DSRSQ_MPI_CHECK(MPI_Irecv(recv, byte_count(n), MPI_BYTE, from, tag, c, &reqs.back()));
  reqs.emplace_back();
  DSRSQ_MPI_CHECK(MPI_Isend(send, byte_count(n), MPI_BYTE, to, tag, c, &reqs.back()));
}

// Posts the exchange of a block's k, v and positions: send `cur` to the next
// rank, receive the previous rank's into `nxt`.
void post_kv(std::vector<MPI_Request>& reqs, Block& cur, Block& nxt, int to, int from, MPI_Comm c) {
  post_bytes(reqs, cur.k.data(), nxt.k.data(), cur.k.size(), to, from, kTagK, c);
  post_bytes(reqs, cur.v.data(), nxt.v.data(), cur.v.size(), to, from, kTagV, c);
  post_bytes(reqs, cur.pos.data(), nxt.pos.data(), cur.pos.size() * sizeof(std::int32_t), to, from, kTagPos, c);
}

Block make_block(const TensorView& k, const TensorView& v, const TensorView& k_pos, bool with_grads) {
  Block b;
  b.k.resize(k.bytes());
  b.v.resize(v.bytes());
  b.pos.resize(static_cast<std::size_t>(k_pos.numel()));
  if (with_grads) {
    b.dk.assign(k.bytes(), std::byte{0});
    b.dv.assign(v.bytes(), std::byte{0});
  }
  return b;
}

void fill_block(Block& b, const TensorView& k, const TensorView& v, const TensorView& k_pos) {
  std::memcpy(b.k.data(), k.data, k.bytes());
  std::memcpy(b.v.data(), v.data, v.bytes());
  std::memcpy(b.pos.data(), k_pos.ptr<std::int32_t>(), b.pos.size() * sizeof(std::int32_t));
}

}  // namespace

void merge_attention_partial(TensorView o, TensorView lse, const TensorView& o_b, const TensorView& lse_b) {
  const char* op = "merge_attention_partial";
  DSRSQ_REQUIRE(o.shape.rank == 4, op, ": o must be (B, T, NH, HS), got ", o.str());
  const std::int64_t B = o.shape[0], T = o.shape[1], NH = o.shape[2];
  check_shape(op, "o_b", o_b, o.shape);
  check_shape(op, "lse", lse, Shape{B, NH, T});
  check_shape(op, "lse_b", lse_b, Shape{B, NH, T});
  for (const TensorView* t : std::initializer_list<const TensorView*>{&lse, &o_b, &lse_b}) check_same_dtype(op, "o_b/lse/lse_b", *t, o);
  require_cpu(op, {&o, &lse, &o_b, &lse_b});
  DSRSQ_REQUIRE(o.dtype == DType::f32 || o.dtype == DType::f64, op, ": o must be f32 or f64, got ", o.str());
  // The one log-sum-exp merge (Backend::attention_merge): host buffers here.
  cpu_backend().attention_merge(AttentionMergeArgs{o, lse, o_b, lse_b});
}

void ring_attention_fwd(Backend& be, MpiCommunicator& comm, const AttentionArgs& local) {
  const char* op = "ring_attention_fwd";
  require_cpu(op, {&local.q, &local.k, &local.v, &local.o, &local.lse, &local.q_pos, &local.k_pos});
  const int P = comm.size(), r = comm.rank();
  const int to = (r + 1) % P, from = (r - 1 + P) % P;
  const MPI_Comm c = comm.comm();

  // Running result lives in local.o / local.lse; the partial of one block in
  // o_b / lse_b (host buffers of the same dtype).
  std::vector<std::byte> ob_buf(local.o.bytes()), lb_buf(local.lse.bytes());
  TensorView o_b = view_of(ob_buf, local.o), lse_b = view_of(lb_buf, local.lse);
  be.fill(local.o, 0.0);
  be.fill(local.lse, -std::numeric_limits<double>::infinity());

  Block blocks[2] = {make_block(local.k, local.v, local.k_pos, false),
                     make_block(local.k, local.v, local.k_pos, false)};
  fill_block(blocks[0], local.k, local.v, local.k_pos);
  std::vector<MPI_Request> reqs;
  for (int s = 0; s < P; ++s) {
    Block& cur = blocks[s % 2];
    Block& nxt = blocks[(s + 1) % 2];
    if (s + 1 < P) post_kv(reqs, cur, nxt, to, from, c);  // overlap: next block in flight during this step
    AttentionArgs a = local;
    a.k = view_of(cur.k, local.k);
    a.v = view_of(cur.v, local.v);
    a.k_pos = TensorView(cur.pos.data(), local.k_pos.shape);
    a.o = o_b;
    a.lse = lse_b;
    be.attention_fwd(a);
    merge_attention_partial(local.o, local.lse, o_b, lse_b);
    if (!reqs.empty()) wait_all(reqs, comm, detail::cat(op, " K/V exchange of step ", s + 1, " of ", P - 1), to, from);
  }
}

void ring_attention_bwd(Backend& be, MpiCommunicator& comm, const AttentionGradArgs& local) {
  const char* op = "ring_attention_bwd";
  require_cpu(op, {&local.dout, &local.q, &local.k, &local.v, &local.o, &local.lse, &local.q_pos, &local.k_pos,
                   &local.dq, &local.dk, &local.dv});
  const int P = comm.size(), r = comm.rank();
  const int to = (r + 1) % P, from = (r - 1 + P) % P;
  const MPI_Comm c = comm.comm();
  if (P == 1) {
    be.attention_bwd(local);
    return;
  }
  Block blocks[2] = {make_block(local.k, local.v, local.k_pos, true), make_block(local.k, local.v, local.k_pos, true)};
  fill_block(blocks[0], local.k, local.v, local.k_pos);
  std::vector<MPI_Request> kv_reqs, grad_reqs;
  for (int s = 0; s < P; ++s) {
    Block& cur = blocks[s % 2];
    Block& nxt = blocks[(s + 1) % 2];
    // K/V of the next step travel while this step computes.
    if (s + 1 < P) post_kv(kv_reqs, cur, nxt, to, from, c);
    AttentionGradArgs a = local;  // dq += locally, with the global o and lse
    a.k = view_of(cur.k, local.k);
    a.v = view_of(cur.v, local.v);
    a.k_pos = TensorView(cur.pos.data(), local.k_pos.shape);
    a.dk = view_of(cur.dk, local.k);
    a.dv = view_of(cur.dv, local.v);
    be.attention_bwd(a);
    // The block's dk/dv accumulator follows its K/V: after P sends it is back
    // at its owner (the last send carries it home). nxt.dk/dv are free: their
    // previous contents were sent at step s-1 and that exchange has completed.
    post_bytes(grad_reqs, cur.dk.data(), nxt.dk.data(), cur.dk.size(), to, from, kTagDK, c);
    post_bytes(grad_reqs, cur.dv.data(), nxt.dv.data(), cur.dv.size(), to, from, kTagDV, c);
    if (!kv_reqs.empty()) wait_all(kv_reqs, comm, detail::cat(op, " K/V exchange of step ", s + 1, " of ", P - 1), to, from);
    wait_all(grad_reqs, comm, detail::cat(op, " dK/dV exchange of step ", s + 1, " of ", P), to, from);
  }
  // After P steps the block at index P % 2 holds this rank's own dk/dv.
  Block& home = blocks[P % 2];
  be.axpy(AxpyArgs{view_of(home.dk, local.k), local.dk, 1.0});
  be.axpy(AxpyArgs{view_of(home.dv, local.v), local.dv, 1.0});
}

}  // namespace dsrsq::dist
