// "dsrsq" (DESIGN.md section 8): the standard backbone plus the DSR retriever
// (which context tokens enter), SQA cluster attention (training attention and
// decode over the buffer) and the RCKV cache, trained with the HOF loss from a
// standard checkpoint. The model itself is methods/dsrsq_model.*; this file
// is its registry entry: knobs, the training extension (extra parameters and
// their AdamW, hooks into the trainer, checkpoint state) and the evaluation
// plans of the method and its ablation variants.
#include <algorithm>
#include <memory>
#include <sstream>

#include "core/error.hpp"
#include "methods/dsrsq.hpp"

namespace dsrsq::methods {
namespace {

// A double default as --help shows it (6 significant digits: "0.1", not
// lexical_cast's "0.10000000000000001"), from the bound value, so a caller that
// sets the knobs before describing them (bench_long_context) sees its own.
std::string shown(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// The options bind straight to the parts' settings (no field-by-field copy).
// Defaults are the debug size; configs/paper.ini has the paper's settings.
struct DsrsqKnobs final : MethodKnobs {
  DsrsqSettings s;
  std::vector<double> hof_weights{1.0, 0.5, 0.3, 0.2};  // task, retrieval, compression, compute
  bool rckv_observe = false;
  std::string dsr_positions = "original";

  DsrsqKnobs() {
    s.dsr.d_r = 32;
    s.dsr.conv_width = 4;
    s.dsr.span = 3;
    s.dsr.base_budget = 0.25;
    s.dsr.alpha = 0.5;
    s.dsr.lambda = 0.1;
    s.dsr.ppo_epochs = 4;
    s.dsr.clip = 0.2;
    s.sqa.clusters = 8;
    s.sqa.top_clusters = 4;
    s.sqa.lloyd_steps = 3;
    s.rckv.d_c = 32;
    s.rckv.buffer = 0;
    s.rckv.window = 16;
    s.rckv.tau = 0.0;
    s.ramp = 300;
  }

  void describe(po::options_description& d) override {
    d.add_options()
      ("dsr_d_r", po::value(&s.dsr.d_r)->default_value(s.dsr.d_r), "retriever: reduced dimension of the query and context projections")
      ("dsr_base_budget", po::value(&s.dsr.base_budget)->default_value(s.dsr.base_budget, shown(s.dsr.base_budget)), "retriever: base budget in tokens (a value below 1 is a fraction of the context)")
      ("dsr_alpha", po::value(&s.dsr.alpha)->default_value(s.dsr.alpha, shown(s.dsr.alpha)), "retriever: budget = base * (1 + alpha * complexity)")
      ("dsr_span", po::value(&s.dsr.span)->default_value(s.dsr.span), "retriever: tokens kept after each top token")
      ("dsr_conv_width", po::value(&s.dsr.conv_width)->default_value(s.dsr.conv_width), "retriever: taps of the causal local-context convolution")
      ("dsr_lambda", po::value(&s.dsr.lambda)->default_value(s.dsr.lambda, shown(s.dsr.lambda)), "retriever: reward = task score - lambda * selected fraction")
      ("dsr_ppo_epochs", po::value(&s.dsr.ppo_epochs)->default_value(s.dsr.ppo_epochs), "retriever: PPO update epochs per sampled batch: the same sampled subsets are re-scored (retriever forward only, not the backbone) and updated this many times against the log-probabilities stored at sampling time, clipped at dsr_clip; 1 = REINFORCE (one on-policy update: ratio 1, the clip never acts)")
      ("dsr_clip", po::value(&s.dsr.clip)->default_value(s.dsr.clip, shown(s.dsr.clip)), "retriever: PPO clip epsilon (ratios outside [1 - clip, 1 + clip] in the direction of the advantage give no gradient; 0: no clipping)")
      ("sqa_clusters", po::value(&s.sqa.clusters)->default_value(s.sqa.clusters), "SQA: k-means clusters of keys per head")
      ("sqa_top_clusters", po::value(&s.sqa.top_clusters)->default_value(s.sqa.top_clusters), "SQA: clusters each query attends to")
      ("sqa_lloyd_steps", po::value(&s.sqa.lloyd_steps)->default_value(s.sqa.lloyd_steps), "SQA: Lloyd iterations of k-means")
      ("rckv_d_c", po::value(&s.rckv.d_c)->default_value(s.rckv.d_c), "RCKV: latent size of keys and of values (<= d_model)")
      ("rckv_buffer", po::value(&s.rckv.buffer)->default_value(s.rckv.buffer), "RCKV: compressed slots per layer (0: sized from --kv_budget)")
      ("rckv_window", po::value(&s.rckv.window)->default_value(s.rckv.window), "RCKV: recent tokens kept uncompressed")
      ("rckv_tau", po::value(&s.rckv.tau)->default_value(s.rckv.tau, shown(s.rckv.tau)), "RCKV: eviction temperature (0: evict the least important slot)")
      ("rckv_observe", po::bool_switch(&rckv_observe), "RCKV: a prompt token's importance comes from the attention the prompt's last window of queries gives it (SnapKV-style); off: from the attention every prompt query gives it at prefill")
      ("hof_weights", po::value(&hof_weights)->multitoken(), "HOF loss weights: task retrieval compression compute (default 1.0 0.5 0.3 0.2)")
      ("hof_ramp", po::value(&s.ramp)->default_value(s.ramp), "HOF: steps over which the efficiency weights ramp up from 0")
      ("dsr_positions", po::value(&dsr_positions)->default_value(dsr_positions), "positions of the retriever's selected tokens, in training and inference: original (each keeps its position in the full prompt) | compact (0..n-1 in selection order: relative distances no longer than the selection)");
  }

  void validate(const RunShape& shape) const override {
    const auto& r = s.dsr;
    DSRSQ_INPUT_CHECK(r.d_r >= 1, "option --dsr_d_r: must be >= 1, got ", r.d_r);
    DSRSQ_INPUT_CHECK(r.base_budget > 0 && std::isfinite(r.base_budget),
                      "option --dsr_base_budget: must be > 0 and finite (tokens, or a fraction below 1), got ", r.base_budget);
    DSRSQ_INPUT_CHECK(r.alpha >= 0 && std::isfinite(r.alpha), "option --dsr_alpha: must be >= 0 and finite, got ", r.alpha);
    DSRSQ_INPUT_CHECK(r.span >= 0, "option --dsr_span: must be >= 0, got ", r.span);
    DSRSQ_INPUT_CHECK(r.conv_width >= 1, "option --dsr_conv_width: must be >= 1, got ", r.conv_width);
    DSRSQ_INPUT_CHECK(r.lambda >= 0 && std::isfinite(r.lambda), "option --dsr_lambda: must be >= 0 and finite, got ", r.lambda);
    DSRSQ_INPUT_CHECK(r.ppo_epochs >= 1, "option --dsr_ppo_epochs: must be >= 1 (1 = REINFORCE), got ", r.ppo_epochs);
    DSRSQ_INPUT_CHECK(r.clip >= 0 && r.clip < 1, "option --dsr_clip: must lie in [0, 1), got ", r.clip);
    const auto& q = s.sqa;
    DSRSQ_INPUT_CHECK(q.clusters >= 1, "option --sqa_clusters: must be >= 1, got ", q.clusters);
    DSRSQ_INPUT_CHECK(q.clusters <= shape.max_seq_len, "option --sqa_clusters: ", q.clusters,
                      " clusters cannot be filled by sequences of at most max_seq_len=", shape.max_seq_len, " tokens");
    DSRSQ_INPUT_CHECK(q.top_clusters >= 1 && q.top_clusters <= q.clusters,
                      "option --sqa_top_clusters: must lie in [1, sqa_clusters=", q.clusters, "], got ", q.top_clusters);
    DSRSQ_INPUT_CHECK(q.lloyd_steps >= 0, "option --sqa_lloyd_steps: must be >= 0, got ", q.lloyd_steps);
    DSRSQ_INPUT_CHECK(shape.d_model >= 1, "option --d_model: must be >= 1, got ", shape.d_model);
    const auto& c = s.rckv;
    DSRSQ_INPUT_CHECK(c.d_c >= 1 && c.d_c <= shape.d_model, "option --rckv_d_c: the latent size must lie in [1, d_model=",
                      shape.d_model, "], got ", c.d_c);
    DSRSQ_INPUT_CHECK(c.buffer >= 0, "option --rckv_buffer: must be >= 0 (0: from --kv_budget), got ", c.buffer);
    DSRSQ_INPUT_CHECK(c.window >= 0, "option --rckv_window: must be >= 0, got ", c.window);
    DSRSQ_INPUT_CHECK(c.tau >= 0 && std::isfinite(c.tau), "option --rckv_tau: must be >= 0 and finite, got ", c.tau);
    DSRSQ_INPUT_CHECK(hof_weights.size() == 4,
                      "option --hof_weights: give 4 weights (task retrieval compression compute), got ", hof_weights.size());
    for (double w : hof_weights)
      DSRSQ_INPUT_CHECK(w >= 0 && std::isfinite(w), "option --hof_weights: weights must be >= 0 and finite, got ", w);
    DSRSQ_INPUT_CHECK(s.ramp >= 0, "option --hof_ramp: must be >= 0, got ", s.ramp);
    DSRSQ_INPUT_CHECK(dsr_positions == "original" || dsr_positions == "compact",
                      "option --dsr_positions: must be original or compact, got '", dsr_positions, "'");
  }

  void resolved(std::map<std::string, std::string>& kv) const override {
    kv["dsr_d_r"] = std::to_string(s.dsr.d_r);
    kv["dsr_base_budget"] = exact_str(s.dsr.base_budget);
    kv["dsr_alpha"] = exact_str(s.dsr.alpha);
    kv["dsr_span"] = std::to_string(s.dsr.span);
    kv["dsr_conv_width"] = std::to_string(s.dsr.conv_width);
    kv["dsr_lambda"] = exact_str(s.dsr.lambda);
    kv["dsr_ppo_epochs"] = std::to_string(s.dsr.ppo_epochs);
    kv["dsr_clip"] = exact_str(s.dsr.clip);
    kv["sqa_clusters"] = std::to_string(s.sqa.clusters);
    kv["sqa_top_clusters"] = std::to_string(s.sqa.top_clusters);
    kv["sqa_lloyd_steps"] = std::to_string(s.sqa.lloyd_steps);
    kv["rckv_d_c"] = std::to_string(s.rckv.d_c);
    kv["rckv_buffer"] = std::to_string(s.rckv.buffer);
    kv["rckv_window"] = std::to_string(s.rckv.window);
    kv["rckv_tau"] = exact_str(s.rckv.tau);
    kv["rckv_observe"] = rckv_observe ? "true" : "false";
    std::ostringstream w;
    for (std::size_t i = 0; i < hof_weights.size(); ++i) w << (i ? " " : "") << hof_weights[i];
    kv["hof_weights"] = w.str();
    kv["hof_ramp"] = std::to_string(s.ramp);
    kv["dsr_positions"] = dsr_positions;
  }

  // The parts' settings of this run: the bound values plus what follows from them.
  DsrsqSettings settings(const ModelConfig& mc, std::uint64_t seed, const AdamWConfig& adam) const {
    DsrsqSettings out = s;
    out.dsr.validate();
    out.ppo_adam = adam;  // the retriever's inner PPO updates: the backbone's hyper-parameters
    out.sqa.seed = seed;
    out.rckv.observe_prefill = rckv_observe;
    out.compact_positions = dsr_positions == "compact";
    out.rckv.seed = seed;
    out.rckv.sqa = true;
    out.rckv.sqa_cfg = out.sqa;
    out.rckv.validate(mc);
    for (std::size_t i = 0; i < 4; ++i) out.g[i] = hof_weights.at(i);
    return out;
  }
};

// The retriever and RCKV projections beside the backbone, with their own AdamW
// (the backbone's hyper-parameters).
class Dsrsq final : public Method, public TrainingExtension {
 public:
  explicit Dsrsq(const MethodContext& c)
      : model_(c.model),
        be_(c.backend),
        dm_(c.model, static_cast<const DsrsqKnobs*>(c.knobs)->settings(c.model.config(), c.seed, c.adam), c.backend) {
    dm_.init(c.seed);
    adam_ = std::make_unique<AdamW>(dm_.extra_params(), dm_.extra_flat(), c.adam, c.backend);
  }

  TrainingExtension* training() override { return this; }
  DsrsqModel& model() { return dm_; }

  EvalPlan plan(const std::string& variant) override {
    const DsrsqVariant v = DsrsqVariant::named(variant.empty() ? "full_model" : variant);
    EvalPlan p;
    p.policy = dm_.make_policy(v);
    const bool compact = dm_.compact_positions();
    p.select = [this, v, compact](const Encoded& enc, const SelectionEnv&) {
      Selection s{dm_.select_prompt(enc, v), {}, {}};
      if (compact) s.pos = dsr_positions(s.idx, true);  // 0..n-1 in selection order
      s.notes["selector_positions"] = compact ? "compact" : "original";
      return s;
    };
    return p;
  }

  // ---- TrainingExtension ----
  void save(std::map<std::string, std::vector<float>>& extra) const override {
    dm_.save(extra, adam_->m(), adam_->v(), adam_->steps());
  }
  bool restore(const std::map<std::string, std::vector<float>>& extra) override {
    const std::int64_t steps = dm_.load(extra, adam_->m(), adam_->v());
    if (steps < 0) return false;
    adam_->set_steps(steps);
    return true;
  }
  bool load_params(const std::map<std::string, std::vector<float>>& extra) override { return dm_.load_params(extra); }
  void init_from_data(const std::vector<const Encoded*>& calib, std::int32_t pad_id) override {
    // RCKV projections from the backbone's own keys and values (PCA).
    dm_.init_projections_pca(calib, pad_id);
  }
  void broadcast(dist::Communicator& world, int root) override {
    std::int64_t steps = adam_->steps();
    world.broadcast(std::span<std::int64_t>(&steps, 1), root);
    adam_->set_steps(steps);
    for (TensorView t : {dm_.extra_flat(), adam_->m(), adam_->v()})
      world.broadcast(std::span<float>(t.ptr<float>(), static_cast<std::size_t>(t.numel())), root);
    double b[2] = {dm_.baseline().initialized() ? 1.0 : 0.0, dm_.baseline().value()};
    world.broadcast(std::span<double>(b, 2), root);
    dm_.baseline() = retrieval::MovingAverageBaseline(dm_.settings().dsr.baseline_decay);
    if (b[0] > 0) dm_.baseline().update(b[1]);
    dm_.broadcast_ppo_state(world, root);
  }
  void attach(MethodHooks& hooks, const TrainEnv& env) override {
    model_.save_pre_rope_keys = true;  // the compression loss reads them
    // SQA is the training attention (ring attention takes its place under sp).
    if (!env.attention_taken) model_.attention_override = dm_.sqa_override();
    dm_.set_sp_comm(env.sp_comm);
    const DsrsqSettings& ds = dm_.settings();
    hooks.task_weight = ds.g[0];
    const std::int32_t pad = env.pad_id;
    const std::uint64_t seed = env.seed;
    hooks.make_batch = [this, pad, seed](const std::vector<const Encoded*>& seqs, std::int64_t step, float lm,
                                         std::int64_t mult, bool training) {
      return dm_.training_batch(
          seqs, pad, lm,
          training ? std::optional<std::uint64_t>(seed * 1000003ull + static_cast<std::uint64_t>(step)) : std::nullopt,
          mult);
    };
    dist::Communicator* world = env.world;
    const bool lead = env.sp_lead;
    const double global_batch = env.global_batch;
    const auto lr_at = env.lr_at;
    hooks.after_backward = [this, world, lead, global_batch, lr_at](std::int64_t step, const HostBatch& local,
                                                                    const std::vector<double>& answer_loss, StepStats& st) {
      const HofTerms h = dm_.hof_terms(step, local, answer_loss, world, lead, global_batch,
                                       lr_at ? std::optional<double>(lr_at(step)) : std::nullopt);
      const DsrsqSettings& s = dm_.settings();
      st.loss_retrieval = h.retrieval;
      st.loss_compression = h.compression;
      st.loss_compute = h.compute;
      st.selected_fraction = h.selected_fraction;
      st.loss = h.ramp * (s.g[1] * h.retrieval + s.g[2] * h.compression + s.g[3] * h.compute);
    };
    hooks.extra_step = [this](double lr) { adam_->step(lr); };
    // RCKV in the training forward: the backbone reads reconstructed K/V where inference will.
    model_.kv_transform = dm_.kv_transform();
    hooks.before_forward = [this](const HostBatch& local, bool training) {
      if (training) dm_.zero_extra_grad();  // the task loss reaches P and U through the transform
      dm_.kv_transform()->set_rows(local.compress);
    };
  }
  void detach() override {
    if (model_.attention_override == dm_.sqa_override()) model_.attention_override = nullptr;
    model_.kv_transform = nullptr;
    model_.save_pre_rope_keys = false;
    dm_.set_sp_comm(nullptr);  // rank 0 evaluates alone
  }

 private:
  Transformer& model_;
  Backend& be_;
  DsrsqModel dm_;
  std::unique_ptr<AdamW> adam_;
};

std::shared_ptr<MethodKnobs> knobs() { return std::make_shared<DsrsqKnobs>(); }
std::unique_ptr<Method> make(const MethodContext& c) {
  DSRSQ_REQUIRE(c.knobs != nullptr, "dsrsq: made without its settings");
  return std::make_unique<Dsrsq>(c);
}

}  // namespace

DsrsqModel* dsrsq_model_of(Method& m) {
  auto* d = dynamic_cast<Dsrsq*>(&m);
  return d ? &d->model() : nullptr;
}

const MethodInfo& dsrsq_method() {
  static const MethodInfo info{.name = "dsrsq",
                               .summary = "DSR retriever + SQA cluster attention + RCKV cache, HOF loss (trains from a standard checkpoint)",
                               .source = "DSRSQ paper",
                               .backbone = Backbone::own,
                               .trainable = true,
                               .variants = {"full_model", "no_dsr", "no_sqa", "no_rckv"},
                               .query_agnostic = false,
                               .needs_question = "its retriever scores every context token against the question",
                               .knobs = &knobs,
                               .make = &make,
                               .device_note = "its DSR scorer, RCKV cache and SQA clustering run on the CPU backend and need ops the "
                                              "CUDA backend does not implement: conv_project, sym_eigen, lowrank_recon, host_tasks"};
  return info;
}

}  // namespace dsrsq::methods
