#pragma once
// AttentionRAG's scoring pass (ALGORITHMS.md section 4): the attention the
// prompt's LAST token (the focal token, [ANS] in our prompts) gives every
// earlier token, averaged over layers and heads:
//   mass[j] = (1 / (L * NH)) * sum_l sum_h softmax_{l,h}(q_last . k / sqrt(HS))[j]
// A KV policy for one prefill call through the real model: per layer it
// rotates q and k with their positions (RoPE, as the full cache does),
// computes the layer's ordinary causal attention over the call's own tokens
// (so later layers see exactly what the standard model computes) and adds the
// focal row's attention mass (Backend::attention_mass on that one query row,
// so the FLOP meter counts one row, not the whole matrix).
//
// It keeps no cache: the call's K and V are the model's activations, and
// nothing survives the call, so its memory figures are 0 and it cannot decode.
#include <vector>

#include "core/arena.hpp"
#include "kv/kv_policy.hpp"

namespace dsrsq::retrieval {

class FocalAttentionScorer final : public KVPolicy {
 public:
  FocalAttentionScorer(const ModelConfig& cfg, Backend& backend);
  std::string name() const override { return "focal_attention_scorer"; }
  // Batch 1; the whole prompt must come in one extend() call.
  void begin(const SequenceInfo& info, const KVBudget& budget) override;
  void attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos, TensorView out) override;
  KVMemory memory() const override { return {}; }
  std::size_t budget_requested_bytes() const override { return 0; }
  std::size_t budget_achieved_bytes() const override { return 0; }
  double attended_tokens() const override { return 0; }

  // After the call: the focal token's mass on each prompt token (prompt_len
  // values, summing to 1 up to rounding: the focal row's softmax covers them all).
  const std::vector<double>& focal_mass() const;

 private:
  ModelConfig cfg_;
  Backend& be_;
  Arena scratch_;
  std::int64_t n_ = 0, layers_done_ = 0;
  bool begun_ = false;
  std::vector<double> mass_;
};

}  // namespace dsrsq::retrieval
