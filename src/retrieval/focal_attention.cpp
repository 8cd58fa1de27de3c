#include "retrieval/focal_attention.hpp"

#include "kv/kv_detail.hpp"

namespace dsrsq::retrieval {

FocalAttentionScorer::FocalAttentionScorer(const ModelConfig& cfg, Backend& backend)
    : cfg_(cfg), be_(backend), scratch_("focal_scratch", std::size_t{1} << 20, backend.allocator()) {}

void FocalAttentionScorer::begin(const SequenceInfo& info, const KVBudget&) {
  kvdetail::check_sequence(cfg_, info);
  DSRSQ_INPUT_CHECK(info.batch == 1, "focal attention scorer: batch must be 1, got ", info.batch);
  n_ = info.prompt_len;
  layers_done_ = 0;
  mass_.assign(static_cast<std::size_t>(n_), 0.0);
  scratch_.reset();
  begun_ = true;
}

void FocalAttentionScorer::attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos,
                                  TensorView out) {
  kvdetail::check_attend("focal attention scorer", begun_, cfg_, 1, layer, q, k, v, pos, out);
  const std::int64_t Tn = q.shape[1], NH = cfg_.n_heads, HS = cfg_.head_size();
  DSRSQ_INPUT_CHECK(Tn == n_ && layer == layers_done_, "focal attention scorer: the prompt of ", n_,
                    " tokens must come in one call (got ", Tn, " tokens at layer ", layer, ")");
  ArenaScope scope(scratch_);
  be_.rope_fwd(RopeArgs{q.reshaped(Shape{Tn, NH, HS}), pos.reshaped(Shape{Tn}), cfg_.rope_theta, cfg_.attn_log_base});
  be_.rope_fwd(RopeArgs{k.reshaped(Shape{Tn, NH, HS}), pos.reshaped(Shape{Tn}), cfg_.rope_theta});
  TensorView lse = scratch_.allocate(Shape{1, NH, Tn}, DType::f32);
  be_.attention_fwd(AttentionArgs{q, k, v, out, lse, pos, pos, true, 0.0});

  // The focal row alone: q's last token, at the last position.
  const TensorView q_last = q.reshaped(Shape{Tn, NH * HS}).rows(Tn - 1, 1).reshaped(Shape{1, 1, NH, HS});
  const TensorView pos_last = pos.reshaped(Shape{Tn}).rows(Tn - 1, 1).reshaped(Shape{1, 1});
  double one = 1.0;
  TensorView m = scratch_.allocate(Shape{1, Tn}, DType::f64);
  TensorView row_weight(&one, Shape{1});
  if (be_.device() != Device::cpu) {  // the op takes its weights on the backend
    row_weight = scratch_.allocate(Shape{1}, DType::f64);
    from_host<double>(be_, std::span<const double>(&one, 1), row_weight);
  }
  be_.attention_mass(AttentionMassArgs{q_last, k, pos_last, pos, row_weight, m,
                                       static_cast<double>(cfg_.n_layers * NH)});
  std::vector<double> host(static_cast<std::size_t>(Tn));
  be_.copy_to_host(m, std::as_writable_bytes(std::span<double>(host)));
  for (std::int64_t j = 0; j < Tn; ++j) mass_[static_cast<std::size_t>(j)] += host[static_cast<std::size_t>(j)];
  ++layers_done_;
}

const std::vector<double>& FocalAttentionScorer::focal_mass() const {
  DSRSQ_INPUT_CHECK(begun_ && layers_done_ == cfg_.n_layers, "focal attention scorer: the scores are read before the "
                    "prompt went through all ", cfg_.n_layers, " layers (", layers_done_, " done)");
  return mass_;
}

}  // namespace dsrsq::retrieval
