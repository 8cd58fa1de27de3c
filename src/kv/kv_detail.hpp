#pragma once
// Helpers shared by the KV policies (not part of the public API).
#include "kv/kv_policy.hpp"

namespace dsrsq::kvdetail {

// Input checks: throw dsrsq::Error with a message naming the policy.
void check_sequence(const ModelConfig& cfg, const SequenceInfo& s);
void check_attend(const char* policy, bool begun, const ModelConfig& cfg, std::int64_t batch, std::int64_t layer,
                  const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& pos,
                  const TensorView& out);

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

}  // namespace dsrsq::kvdetail
