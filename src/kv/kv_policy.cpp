#include "kv/kv_policy.hpp"

#include <cmath>

#include "core/error.hpp"
#include "kv/full.hpp"
#include "kv/sliding_window.hpp"

namespace dsrsq {

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

std::vector<std::string> kv_policy_names() { return {"full", "sliding_window"}; }

std::unique_ptr<KVPolicy> make_kv_policy(const std::string& name, const ModelConfig& cfg, Backend& backend) {
  if (name == "full") return std::make_unique<FullPolicy>(cfg, backend);
  if (name == "sliding_window") return std::make_unique<SlidingWindowPolicy>(cfg, backend);
  std::string valid;
  for (const auto& n : kv_policy_names()) valid += (valid.empty() ? "" : ", ") + n;
  raise_input_error(detail::cat("unknown KV-cache policy '", name, "'; valid names: ", valid));
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
