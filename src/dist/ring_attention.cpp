#include "dist/ring_attention.hpp"

#include <cstddef>
#include <initializer_list>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "core/arena.hpp"
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

// Every tensor on the backend's device, and a communicator that takes buffers there.
void require_device(const char* op, Backend& be, const Communicator* comm,
                    std::initializer_list<const TensorView*> ts) {
  for (const TensorView* t : ts)
    DSRSQ_REQUIRE(t->empty() || t->device == be.device(), op, ": tensor ", t->str(),
                  " is not on the backend's device (", device_name(be.device()), ")");
  if (comm)
    DSRSQ_REQUIRE(comm->buffer_device() == be.device(), op, ": communicator '", comm->name(), "' takes ",
                  device_name(comm->buffer_device()), " buffers but the tensors live on ", device_name(be.device()),
                  " (a device run needs a device communicator)");
}

// A travelling block on the backend: k, v, the key positions and (backward)
// the dk, dv accumulators that follow them.
struct Block {
  TensorView k, v, pos, dk, dv;
};

Block make_block(Backend& be, Arena& arena, const TensorView& k, const TensorView& v, const TensorView& k_pos,
                 bool with_grads) {
  Block b;
  b.k = arena.allocate(k.shape, k.dtype);
  b.v = arena.allocate(v.shape, v.dtype);
  b.pos = arena.allocate(k_pos.shape, k_pos.dtype);
  if (with_grads) {
    b.dk = arena.allocate(k.shape, k.dtype);
    b.dv = arena.allocate(v.shape, v.dtype);
    be.fill(b.dk, 0.0);
    be.fill(b.dv, 0.0);
  }
  return b;
}

// Scratch for two blocks (and `extra` bytes: the forward's partial o_b, lse_b)
// in one chunk of the backend's memory: at most 12 tensors, each rounded up
// to the arena's 64-byte alignment.
Arena block_arena(Backend& be, const TensorView& k, const TensorView& v, const TensorView& k_pos, bool with_grads,
                  std::size_t extra) {
  const std::size_t per_block = (with_grads ? 2 : 1) * (k.bytes() + v.bytes()) + k_pos.bytes();
  return Arena("ring attention blocks", 2 * per_block + extra + 12 * 64, be.allocator());
}

// send -> rank `to`, recv <- rank `from`: the tensor's bytes (device pointers
// are passed on, never read here).
Request exchange(Communicator& comm, const TensorView& send, int to, const TensorView& recv, int from) {
  return comm.isend_recv(std::span<const std::byte>(static_cast<const std::byte*>(send.data), send.bytes()), to,
                         std::span<std::byte>(static_cast<std::byte*>(recv.data), recv.bytes()), from);
}

// Posts the exchange of a block's k, v and positions: send `cur` to the next
// rank, receive the previous rank's into `nxt`.
void post_kv(std::vector<Request>& reqs, Communicator& comm, const Block& cur, const Block& nxt, int to, int from) {
  reqs.push_back(exchange(comm, cur.k, to, nxt.k, from));
  reqs.push_back(exchange(comm, cur.v, to, nxt.v, from));
  reqs.push_back(exchange(comm, cur.pos, to, nxt.pos, from));
}

// Waits for every request (each with the communicator's deadline); a timeout
// names the step on top of the rank and peer the communicator names.
void wait_all(std::vector<Request>& reqs, const std::string& what) {
  for (Request& r : reqs) {
    try {
      r.wait();
    } catch (const Error& e) {
      throw Error(detail::cat(e.what(), " (during ", what, ")"));
    }
  }
  reqs.clear();
}

}  // namespace

void merge_attention_partial(TensorView o, TensorView lse, const TensorView& o_b, const TensorView& lse_b,
                             Backend& be) {
  const char* op = "merge_attention_partial";
  DSRSQ_REQUIRE(o.shape.rank == 4, op, ": o must be (B, T, NH, HS), got ", o.str());
  const std::int64_t B = o.shape[0], T = o.shape[1], NH = o.shape[2];
  check_shape(op, "o_b", o_b, o.shape);
  check_shape(op, "lse", lse, Shape{B, NH, T});
  check_shape(op, "lse_b", lse_b, Shape{B, NH, T});
  for (const TensorView* t : std::initializer_list<const TensorView*>{&lse, &o_b, &lse_b}) check_same_dtype(op, "o_b/lse/lse_b", *t, o);
  require_device(op, be, nullptr, {&o, &lse, &o_b, &lse_b});
  DSRSQ_REQUIRE(o.dtype == DType::f32 || o.dtype == DType::f64, op, ": o must be f32 or f64, got ", o.str());
  // The one log-sum-exp merge (Backend::attention_merge).
  be.attention_merge(AttentionMergeArgs{o, lse, o_b, lse_b});
}

void ring_attention_fwd(Backend& be, Communicator& comm, const AttentionArgs& local) {
  const char* op = "ring_attention_fwd";
  require_device(op, be, &comm, {&local.q, &local.k, &local.v, &local.o, &local.lse, &local.q_pos, &local.k_pos});
  const int P = comm.size(), r = comm.rank();
  const int to = (r + 1) % P, from = (r - 1 + P) % P;

  // Running result lives in local.o / local.lse; the partial of one block in
  // o_b / lse_b (on the backend, same dtype).
  Arena arena = block_arena(be, local.k, local.v, local.k_pos, false, local.o.bytes() + local.lse.bytes());
  const TensorView o_b = arena.allocate(local.o.shape, local.o.dtype);
  const TensorView lse_b = arena.allocate(local.lse.shape, local.lse.dtype);
  be.fill(local.o, 0.0);
  be.fill(local.lse, -std::numeric_limits<double>::infinity());

  const Block blocks[2] = {make_block(be, arena, local.k, local.v, local.k_pos, false),
                           make_block(be, arena, local.k, local.v, local.k_pos, false)};
  be.copy(local.k, blocks[0].k);
  be.copy(local.v, blocks[0].v);
  be.copy(local.k_pos, blocks[0].pos);
  std::vector<Request> reqs;
  for (int s = 0; s < P; ++s) {
    const Block& cur = blocks[s % 2];
    const Block& nxt = blocks[(s + 1) % 2];
    if (s + 1 < P) post_kv(reqs, comm, cur, nxt, to, from);  // overlap: next block in flight during this step
    AttentionArgs a = local;
    a.k = cur.k;
    a.v = cur.v;
    a.k_pos = cur.pos;
    a.o = o_b;
    a.lse = lse_b;
    be.attention_fwd(a);
    merge_attention_partial(local.o, local.lse, o_b, lse_b, be);
    wait_all(reqs, detail::cat(op, " K/V exchange of step ", s + 1, " of ", P - 1));
  }
}

void ring_attention_bwd(Backend& be, Communicator& comm, const AttentionGradArgs& local) {
  const char* op = "ring_attention_bwd";
  require_device(op, be, &comm,
                 {&local.dout, &local.q, &local.k, &local.v, &local.o, &local.lse, &local.q_pos, &local.k_pos,
                  &local.dq, &local.dk, &local.dv});
  const int P = comm.size(), r = comm.rank();
  const int to = (r + 1) % P, from = (r - 1 + P) % P;
  if (P == 1) {
    be.attention_bwd(local);
    return;
  }
  Arena arena = block_arena(be, local.k, local.v, local.k_pos, true, 0);
  const Block blocks[2] = {make_block(be, arena, local.k, local.v, local.k_pos, true),
                           make_block(be, arena, local.k, local.v, local.k_pos, true)};
  be.copy(local.k, blocks[0].k);
  be.copy(local.v, blocks[0].v);
  be.copy(local.k_pos, blocks[0].pos);
  std::vector<Request> kv_reqs, grad_reqs;
  for (int s = 0; s < P; ++s) {
    const Block& cur = blocks[s % 2];
    const Block& nxt = blocks[(s + 1) % 2];
    // K/V of the next step travel while this step computes.
    if (s + 1 < P) post_kv(kv_reqs, comm, cur, nxt, to, from);
    AttentionGradArgs a = local;  // dq += locally, with the global o and lse
    a.k = cur.k;
    a.v = cur.v;
    a.k_pos = cur.pos;
    a.dk = cur.dk;
    a.dv = cur.dv;
    be.attention_bwd(a);
    // The block's dk/dv accumulator follows its K/V: after P sends it is back
    // at its owner (the last send carries it home). nxt.dk/dv are free: their
    // previous contents were sent at step s-1 and that exchange has completed.
    grad_reqs.push_back(exchange(comm, cur.dk, to, nxt.dk, from));
    grad_reqs.push_back(exchange(comm, cur.dv, to, nxt.dv, from));
    wait_all(kv_reqs, detail::cat(op, " K/V exchange of step ", s + 1, " of ", P - 1));
    wait_all(grad_reqs, detail::cat(op, " dK/dV exchange of step ", s + 1, " of ", P));
  }
  // After P steps the block at index P % 2 holds this rank's own dk/dv.
  const Block& home = blocks[P % 2];
  be.axpy(AxpyArgs{home.dk, local.dk, 1.0});
  be.axpy(AxpyArgs{home.dv, local.dv, 1.0});
}

}  // namespace dsrsq::dist
