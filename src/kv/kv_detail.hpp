#pragma once
// Helpers shared by the KV policies (not part of the public API).
#include <algorithm>
#include <memory>
#include <vector>

#include "core/error.hpp"
#include "kv/kv_policy.hpp"

namespace dsrsq::kvdetail {

// Input checks: throw dsrsq::Error with a message naming the policy.
void check_sequence(const ModelConfig& cfg, const SequenceInfo& s);
void check_attend(const char* policy, bool begun, const ModelConfig& cfg, std::int64_t batch, std::int64_t layer,
                  const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& pos,
                  const TensorView& out);

// Small host index arrays (positions, stream indices) a policy builds for a
// backend op: on the CPU backend the host vector itself; on a device a copy
// in an arena of their own (not the policy's KV or scratch arena: index
// arrays are not KV bytes, and the figures stay the same on every backend).
// reset() at the start of each attend(): earlier copies are dead by then.
class DeviceIndices {
 public:
  explicit DeviceIndices(Backend& be) : be_(&be), arena_("kv_indices", std::size_t{1} << 16, be.allocator()) {}
  void reset() { arena_.reset(); }
  // v's first s.numel() values as an i32 tensor of shape s on the backend.
  TensorView operator()(std::vector<std::int32_t>& v, Shape s) {
    DSRSQ_REQUIRE(static_cast<std::size_t>(s.numel()) <= v.size(), "DeviceIndices: ", v.size(), " values for ", s.str());
    if (be_->device() == Device::cpu) return TensorView(v.data(), s);
    TensorView d = arena_.allocate(s, DType::i32);
    be_->copy_from_host(std::as_bytes(std::span<const std::int32_t>(v.data(), static_cast<std::size_t>(s.numel()))), d);
    return d;
  }

 private:
  Backend* be_;
  Arena arena_;
};

// A host-built argument of one op call (positions, row weights): on the CPU
// backend a view of the host data itself, on a device a copy in `scratch`
// (the caller's ArenaScope releases it).
template <class T>
TensorView op_arg(Backend& be, Arena& scratch, T* data, Shape s) {
  const TensorView h(data, s);
  if (be.device() == Device::cpu) return h;
  TensorView d = scratch.allocate(s, dtype_of<T>());
  be.copy_from_host(std::as_bytes(std::span<const T>(data, static_cast<std::size_t>(s.numel()))), d);
  return d;
}

// Decode-time traffic: per decode token (counted once, at layer 0) the K/V
// bytes its attention reads in every layer and every batch row, and the keys
// one query attends to (averaged over layers and rows).
struct DecodeStats {
  std::size_t read_bytes = 0;  // summed over all decode attend() calls
  double keys = 0;             // summed keys per (layer, query token)
  std::int64_t queries = 0;    // (layer, query token) pairs
  std::int64_t tokens = 0;     // decode tokens (layer 0)
  void clear() { *this = DecodeStats{}; }
  std::size_t read_per_step() const { return tokens ? read_bytes / static_cast<std::size_t>(tokens) : 0; }
  double attended() const { return queries ? keys / static_cast<double>(queries) : 0.0; }
};

// The four memory numbers of a policy whose K/V live in one arena per
// sequence: before end_prefill() the arena's current figures, after it the
// figures frozen at the end of prefill (resident, peak) plus decode traffic.
inline KVMemory arena_memory(const Arena* arena, bool decoding, std::size_t resident, std::size_t peak,
                             const DecodeStats& stats) {
  KVMemory m;
  const std::size_t held = arena ? arena->used_bytes() : 0;
  m.resident_after_prefill = decoding ? resident : held;
  m.peak_prefill = decoding ? peak : (arena ? arena->peak_bytes() : 0);
  m.read_per_step = stats.read_per_step();
  m.total = m.resident_after_prefill;  // nothing is offloaded
  return m;
}

// A copy of one contiguous block of a policy's KV arena, in memory from the
// same allocator (so on the device for a device backend), for snapshots.
struct BlockCopy {
  std::unique_ptr<Arena> arena;
  TensorView data;
  void save(Backend& be, const TensorView& src) {
    const std::size_t n = static_cast<std::size_t>(src.numel()) * dtype_size(src.dtype);
    arena = std::make_unique<Arena>("kv_snapshot", std::max<std::size_t>(n, 64), be.allocator());
    data = arena->allocate(src.shape, src.dtype);
    be.copy(src, data);
  }
  void load(Backend& be, const TensorView& dst) const { be.copy(data, dst); }
  std::size_t bytes() const { return arena ? arena->used_bytes() : 0; }
};

// The snapshot of a policy whose state is POD-like: `State` holds every
// scalar and host vector, `blocks` the arena contents.
template <class State>
struct PolicySnapshot final : KVSnapshot {
  const void* owner = nullptr;
  State state;
  std::vector<BlockCopy> blocks;
  std::size_t host_bytes = 0;
  std::size_t bytes() const override {
    std::size_t n = host_bytes;
    for (const auto& b : blocks) n += b.bytes();
    return n;
  }
};

// The snapshot `snap` was taken by `owner` (a policy restores only its own),
// as the concrete type T: throws naming the policy otherwise.
template <class T>
const T& snapshot_of(const KVSnapshot& snap, const void* owner, const char* policy) {
  const auto* s = dynamic_cast<const T*>(&snap);
  DSRSQ_INPUT_CHECK(s != nullptr && s->owner == owner, "KV policy '", policy,
                    "': restore() of a snapshot this policy object did not take");
  return *s;
}

inline bool same_sequence(const SequenceInfo& a, const SequenceInfo& b) {
  return a.batch == b.batch && a.prompt_len == b.prompt_len && a.query_len == b.query_len &&
         a.max_new_tokens == b.max_new_tokens && a.budget_tokens == b.budget_tokens;
}

}  // namespace dsrsq::kvdetail
