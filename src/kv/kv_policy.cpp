#include "kv/kv_policy.hpp"

#include <cerrno>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <utility>

#include "core/error.hpp"
#include "kv/full.hpp"
#include "kv/rckv.hpp"
#include "kv/sliding_window.hpp"

namespace dsrsq {

std::unique_ptr<KVSnapshot> KVPolicy::snapshot() const {
  raise_input_error(detail::cat("policy ", name(), " cannot snapshot its cache: it does not support --protocol reuse"));
}

void KVPolicy::restore(const KVSnapshot&) {
  raise_input_error(
      detail::cat("policy ", name(), " cannot restore a cache snapshot: it does not support --protocol reuse"));
}

// f32 K and V of every layer, all heads (MHA: Hkv = NH, so NH * HS = d_model).
// Position ids and other index arrays are NOT counted (see kv/full.hpp).
std::size_t KVBudget::full_bytes(const ModelConfig& cfg, std::int64_t tokens) {
  DSRSQ_INPUT_CHECK(tokens >= 0, "KV budget: token count must be >= 0, got ", tokens);
  return static_cast<std::size_t>(cfg.n_layers) * static_cast<std::size_t>(tokens) * 2 *
         static_cast<std::size_t>(cfg.d_model) * sizeof(float);
}

std::size_t KVBudget::resolve(const ModelConfig& cfg, std::int64_t tokens) const {
  DSRSQ_INPUT_CHECK(tokens >= 1, "--kv_budget: the sequence must hold at least one token, got ", tokens);
  const std::size_t one = full_bytes(cfg, 1);
  std::size_t b = 0;
  if (bytes > 0) {
    b = bytes;
  } else {
    // Written so that NaN fails too.
    DSRSQ_INPUT_CHECK(fraction > 0.0 && fraction <= 1.0, "--kv_budget: a fraction must lie in (0, 1], got ", fraction,
                      " (give bytes with a positive byte count instead)");
    b = static_cast<std::size_t>(std::floor(fraction * static_cast<double>(full_bytes(cfg, tokens))));
  }
  return b < one ? one : b;  // never below one token's K and V in every layer
}

KVBudget KVBudget::parse(const std::string& text) {
  const char* start = text.c_str();
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(start, &end);
  const std::string unit = end ? std::string(end) : std::string();
  DSRSQ_INPUT_CHECK(end != start && !std::isspace(static_cast<unsigned char>(text.front())),
                    "option --kv_budget: '", text, "' is not a fraction in (0, 1] or a byte count with a unit (64KiB, 2MB)");
  DSRSQ_INPUT_CHECK(std::isfinite(v) && errno != ERANGE, "option --kv_budget: '", text, "' is not a finite number");
  DSRSQ_INPUT_CHECK(v > 0, "option --kv_budget: must be > 0, got '", text, "'");
  KVBudget b;
  if (unit.empty()) {
    DSRSQ_INPUT_CHECK(v <= 1.0, "option --kv_budget: '", text,
                      "' is a bare number above 1; give a fraction of the full cache in (0, 1] or bytes with a unit (",
                      text, "B, 64KiB, 2MB)");
    b.fraction = v;
    return b;
  }
  static const std::pair<const char*, double> units[] = {{"B", 1.0},          {"KiB", 1024.0}, {"MiB", 1048576.0},
                                                         {"GiB", 1073741824.0}, {"kB", 1e3},    {"KB", 1e3},
                                                         {"MB", 1e6},         {"GB", 1e9}};
  double mult = 0;
  for (const auto& [name, m] : units)
    if (unit == name) mult = m;
  DSRSQ_INPUT_CHECK(mult > 0, "option --kv_budget: unknown unit '", unit, "' in '", text,
                    "' (use B, KiB, MiB, GiB, kB, MB or GB; a bare number is a fraction in (0, 1])");
  const double bytes = std::floor(v * mult);
  DSRSQ_INPUT_CHECK(bytes >= 1, "option --kv_budget: '", text, "' is less than one byte");
  DSRSQ_INPUT_CHECK(bytes <= 9.0e15, "option --kv_budget: '", text, "' is more bytes than any machine holds");
  b.bytes = static_cast<std::size_t>(bytes);
  b.fraction = 0;
  return b;
}

std::string KVBudget::str() const {
  return bytes > 0 ? detail::cat(bytes, " bytes") : detail::cat("fraction ", fraction);
}

std::vector<std::string> kv_policy_names() { return {"full", "window"}; }

std::unique_ptr<KVPolicy> make_kv_policy(const KVPolicySpec& spec, const ModelConfig& cfg, Backend& backend) {
  if (spec.kind == "full") return std::make_unique<FullPolicy>(cfg, backend);
  if (spec.kind == "window") return std::make_unique<SlidingWindowPolicy>(cfg, backend);
  if (spec.kind == "rckv") {
    DSRSQ_REQUIRE(spec.rckv != nullptr && spec.projections != nullptr,
                  "KV policy 'rckv' needs its settings and trained projections");
    return std::make_unique<compress::RckvPolicy>(cfg, backend, *spec.projections, *spec.rckv);
  }
  raise_input_error(detail::cat("unknown KV-cache policy '", spec.kind, "'; valid kinds: full, window, rckv"));
}

std::unique_ptr<KVPolicy> make_kv_policy(const std::string& kind, const ModelConfig& cfg, Backend& backend) {
  KVPolicySpec spec;
  spec.kind = kind;
  return make_kv_policy(spec, cfg, backend);
}

namespace kvdetail {

void check_sequence(const ModelConfig& cfg, const SequenceInfo& s) {
  DSRSQ_INPUT_CHECK(s.batch >= 1, "KV policy: batch must be >= 1, got ", s.batch);
  DSRSQ_INPUT_CHECK(s.prompt_len >= 1, "KV policy: prompt_len must be >= 1, got ", s.prompt_len);
  DSRSQ_INPUT_CHECK(s.max_new_tokens >= 0, "KV policy: max_new_tokens must be >= 0, got ", s.max_new_tokens);
  DSRSQ_INPUT_CHECK(s.query_len >= 0 && s.query_len <= s.prompt_len, "KV policy: query_len ", s.query_len,
                    " must lie in [0, prompt_len=", s.prompt_len, "]");
  DSRSQ_INPUT_CHECK(s.prompt_len + s.max_new_tokens <= cfg.max_pos, "KV policy: prompt_len + max_new_tokens = ",
                    s.prompt_len + s.max_new_tokens, " exceeds max_pos=", cfg.max_pos);
}

void check_attend(const char* policy, bool begun, const ModelConfig& cfg, std::int64_t batch, std::int64_t layer,
                  const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& pos,
                  const TensorView& out) {
  DSRSQ_INPUT_CHECK(begun, policy, ": attend() before begin()");
  DSRSQ_INPUT_CHECK(layer >= 0 && layer < cfg.n_layers, policy, ": layer ", layer, " outside [0, ", cfg.n_layers, ")");
  DSRSQ_INPUT_CHECK(q.shape.rank == 4 && q.dtype == DType::f32, policy, ": q must be f32 (B, Tn, NH, HS), got ",
                    q.str());
  const Shape want{batch, q.shape[1], cfg.n_heads, cfg.head_size()};
  DSRSQ_INPUT_CHECK(q.shape == want, policy, ": q ", q.shape.str(), " does not match ", want.str(),
                    " (batch from begin())");
  for (const TensorView* t : {&k, &v, &out})
    DSRSQ_INPUT_CHECK(t->shape == want && t->dtype == DType::f32, policy, ": k/v/out ", t->str(), " must be f32 ",
                      want.str());
  DSRSQ_INPUT_CHECK(pos.shape == Shape({batch, q.shape[1]}) && pos.dtype == DType::i32, policy, ": pos ", pos.str(),
                    " must be i32 (B, Tn)");
}

}  // namespace kvdetail
}  // namespace dsrsq
