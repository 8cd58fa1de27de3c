#pragma once
// KV-cache policies: what a method keeps from prefill into decoding, and how
// decode-time attention reads it. The model calls attend() once per layer for
// every extend() (prefill or one decode step), handing over the new tokens'
// queries, keys and values BEFORE RoPE plus their original positions; the
// policy applies RoPE the way it needs (original positions, or StreamingLLM's
// positions inside the cache), stores what it keeps and writes the attention
// output. So a policy fully owns its cache layout and its memory figure.
//
// Memory is reported from bytes the policy actually allocated (its arena),
// never from counts of non-zero entries (DESIGN.md section 9):
//   resident_after_prefill  KV bytes held when prefill ends
//   peak_prefill            the most KV bytes held at any time during prefill
//   read_per_step           KV bytes read by one decode step (mean over steps)
//   total                   resident plus anything offloaded (none for GPU/CPU-resident policies)
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "core/arena.hpp"
#include "model/config.hpp"

namespace dsrsq {

struct KVMemory {
  std::size_t resident_after_prefill = 0;
  std::size_t peak_prefill = 0;
  std::size_t read_per_step = 0;
  std::size_t total = 0;
};

// The budget a run asks for: a fraction of the full cache of this sequence
// (prompt + generated tokens), or absolute bytes (bytes > 0 wins).
struct KVBudget {
  double fraction = 1.0;
  std::size_t bytes = 0;
  // Bytes of the full cache for a sequence of `tokens` tokens under `cfg` (f32 K and V).
  static std::size_t full_bytes(const ModelConfig& cfg, std::int64_t tokens);
  // Resolve to a byte count for a sequence of `tokens` tokens.
  std::size_t resolve(const ModelConfig& cfg, std::int64_t tokens) const;
  // Parses --kv_budget strictly: a fraction of the full cache in (0, 1]
  // ("0.125", "1"), or a byte count with a unit ("65536B", "64KiB", "2MiB",
  // "1GiB", "64kB", "2MB", "1GB"; fractional counts round down to whole
  // bytes, at least 1). A bare number above 1 is refused (bytes or a typo?),
  // and so are zero, negatives, non-finite values and other units; the
  // message names the option.
  static KVBudget parse(const std::string& text);
  std::string str() const;  // "fraction 0.125" or "65536 bytes"
};

// What a policy learns when a new sequence starts.
struct SequenceInfo {
  std::int64_t batch = 1;
  std::int64_t prompt_len = 0;      // N: context + query tokens
  std::int64_t query_len = 0;       // the last query_len prompt tokens are the question
  std::int64_t max_new_tokens = 0;  // T
  // Tokens the KV budget refers to (a fraction budget is of their full cache):
  // 0 means prompt_len + max_new_tokens. A context selector that feeds fewer
  // tokens than the full prompt sets it to the full prompt + T.
  std::int64_t budget_tokens = 0;
  std::int64_t budget_basis() const { return budget_tokens > 0 ? budget_tokens : prompt_len + max_new_tokens; }
};

// An opaque copy of a policy's whole state (KVPolicy::snapshot): its cache
// contents, index structures, importance, RNG state and statistics. Only the
// policy object that took it can restore it.
class KVSnapshot {
 public:
  virtual ~KVSnapshot() = default;
  // Bytes the snapshot holds: the copied KV arena (same allocator, so device
  // memory on a device backend) plus the host index state (positions, ...).
  virtual std::size_t bytes() const = 0;
};

class KVPolicy {
 public:
  virtual ~KVPolicy() = default;
  virtual std::string name() const = 0;

  // Drop all state and start a sequence (every example starts clean).
  virtual void begin(const SequenceInfo& info, const KVBudget& budget) = 0;
  // One layer, new tokens: q, k, v (B, Tn, NH, HS) pre-RoPE; pos i32 (B, Tn)
  // original positions; out (B, Tn, NH, HS) written. q and k are the caller's
  // scratch: a policy may overwrite them (e.g. rotate them in place).
  virtual void attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos,
                      TensorView out) = 0;
  // Called once after the prompt has been processed, before decoding.
  virtual void end_prefill() {}

  // Bytes for the whole batch (B sequences), from the policy's K/V arena.
  virtual KVMemory memory() const = 0;
  // Budget asked for and what the policy holds (bytes, after prefill), per
  // sequence (one batch row), in the units of KVBudget::full_bytes.
  virtual std::size_t budget_requested_bytes() const = 0;
  virtual std::size_t budget_achieved_bytes() const = 0;
  // Mean number of keys one query attended to during decoding (token efficiency numerator).
  virtual double attended_tokens() const = 0;
  // After begin(): true when the policy cannot meet the requested budget (its
  // fixed minimum is larger, so budget_achieved_bytes() > requested). The
  // evaluator records such a cell as `infeasible` (DESIGN.md section 9).
  virtual bool infeasible() const { return false; }
  // After a sequence: the policy's own per-example records (e.g. Razor's
  // protected heads), "key" -> "value", merged into the example's results
  // meta by the evaluator. Default: none.
  virtual std::map<std::string, std::string> meta() const { return {}; }

  // The reuse protocol ("compress once, ask many", DESIGN.md section 9): after
  // a context has been prefilled, snapshot() copies the policy's whole state;
  // restore() puts this policy back into exactly that state (as many times as
  // asked), so a question extended after restore() gives bitwise what a fresh
  // policy that prefilled the context and then that question gives, memory
  // figures included. Default: throws a dsrsq::Error naming the policy.
  virtual std::unique_ptr<KVSnapshot> snapshot() const;
  virtual void restore(const KVSnapshot& snap);
};

// The one factory of KV-cache policies. Kinds (policy names, not method
// names: a method in src/methods picks a kind and its settings):
//   "full"    every token's K and V (kv/full.hpp)
//   "window"  attention sinks + a sliding window, StreamingLLM positions (kv/sliding_window.hpp)
//   "rckv"    the rotating compressive low-rank cache (kv/rckv.hpp): needs
//             `rckv` settings and the trained `projections`
namespace compress {
struct RckvConfig;
class RckvProjections;
}  // namespace compress
struct KVPolicySpec {
  std::string kind = "full";
  const compress::RckvConfig* rckv = nullptr;               // rckv: settings (copied)
  const compress::RckvProjections* projections = nullptr;   // rckv: read at every call (training updates show)
};
std::unique_ptr<KVPolicy> make_kv_policy(const KVPolicySpec& spec, const ModelConfig& cfg, Backend& backend);
// The kinds that need no settings ("full", "window").
std::unique_ptr<KVPolicy> make_kv_policy(const std::string& kind, const ModelConfig& cfg, Backend& backend);
std::vector<std::string> kv_policy_names();  // the kinds that need no settings

}  // namespace dsrsq
