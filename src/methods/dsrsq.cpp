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
#include "methods/dsrsq_model.hpp"
#include "methods/method.hpp"

namespace dsrsq::methods {
namespace {

std::string num(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

// Defaults are the debug size; configs/paper.ini has the paper's settings.
struct DsrsqKnobs final : MethodKnobs {
  std::int64_t dsr_d_r = 32;          // retriever's reduced dimension
  double dsr_base_budget = 0.25;      // base budget in tokens (< 1: a fraction of the context)
  double dsr_alpha = 0.5;             // budget = base * (1 + alpha * complexity)
  std::int64_t dsr_span = 3;          // tokens kept after each top token
  std::int64_t dsr_conv_width = 4;    // local-context convolution taps
  double dsr_lambda = 0.1;            // reward = task score - lambda * selected fraction
  std::int64_t dsr_ppo_epochs = 4;    // PPO update epochs per sampled batch (1 = REINFORCE)
  double dsr_clip = 0.2;              // PPO clip
  std::int64_t sqa_clusters = 8;      // k-means clusters of keys per head
  std::int64_t sqa_top_clusters = 4;  // clusters each query attends to
  std::int64_t sqa_lloyd_steps = 3;
  std::int64_t rckv_d_c = 32;         // latent size per token (keys and values each)
  std::int64_t rckv_buffer = 0;       // compressed slots per layer (0: sized from --kv_budget)
  std::int64_t rckv_window = 16;      // recent tokens kept uncompressed
  double rckv_tau = 0.0;              // eviction temperature (0: evict the least important)
  bool rckv_observe = false;          // prompt tokens' importance from the question's attention (SnapKV-style)
  std::vector<double> hof_weights{1.0, 0.5, 0.3, 0.2};  // task, retrieval, compression, compute
  std::int64_t hof_ramp = 300;        // steps over which the three efficiency weights ramp up from 0

  void describe(po::options_description& d) override {
    d.add_options()
      ("dsr_d_r", po::value(&dsr_d_r)->default_value(dsr_d_r), "retriever: reduced dimension of the query and context projections")
      ("dsr_base_budget", po::value(&dsr_base_budget)->default_value(dsr_base_budget), "retriever: base budget in tokens (a value below 1 is a fraction of the context)")
      ("dsr_alpha", po::value(&dsr_alpha)->default_value(dsr_alpha), "retriever: budget = base * (1 + alpha * complexity)")
      ("dsr_span", po::value(&dsr_span)->default_value(dsr_span), "retriever: tokens kept after each top token")
      ("dsr_conv_width", po::value(&dsr_conv_width)->default_value(dsr_conv_width), "retriever: taps of the causal local-context convolution")
      ("dsr_lambda", po::value(&dsr_lambda)->default_value(dsr_lambda, "0.1"), "retriever: reward = task score - lambda * selected fraction")
      ("dsr_ppo_epochs", po::value(&dsr_ppo_epochs)->default_value(dsr_ppo_epochs), "retriever: PPO update epochs per sampled batch: the same sampled subsets are re-scored (retriever forward only, not the backbone) and updated this many times against the log-probabilities stored at sampling time, clipped at dsr_clip; 1 = REINFORCE (one on-policy update: ratio 1, the clip never acts)")
      ("dsr_clip", po::value(&dsr_clip)->default_value(dsr_clip, "0.2"), "retriever: PPO clip epsilon (ratios outside [1 - clip, 1 + clip] in the direction of the advantage give no gradient; 0: no clipping)")
      ("sqa_clusters", po::value(&sqa_clusters)->default_value(sqa_clusters), "SQA: k-means clusters of keys per head")
      ("sqa_top_clusters", po::value(&sqa_top_clusters)->default_value(sqa_top_clusters), "SQA: clusters each query attends to")
      ("sqa_lloyd_steps", po::value(&sqa_lloyd_steps)->default_value(sqa_lloyd_steps), "SQA: Lloyd iterations of k-means")
      ("rckv_d_c", po::value(&rckv_d_c)->default_value(rckv_d_c), "RCKV: latent size of keys and of values (<= d_model)")
      ("rckv_buffer", po::value(&rckv_buffer)->default_value(rckv_buffer), "RCKV: compressed slots per layer (0: sized from --kv_budget)")
      ("rckv_window", po::value(&rckv_window)->default_value(rckv_window), "RCKV: recent tokens kept uncompressed")
      ("rckv_tau", po::value(&rckv_tau)->default_value(rckv_tau), "RCKV: eviction temperature (0: evict the least important slot)")
      ("rckv_observe", po::bool_switch(&rckv_observe), "RCKV: a prompt token's importance starts at the attention the prompt's last window of queries gives it (SnapKV-style)")
      ("hof_weights", po::value(&hof_weights)->multitoken(), "HOF loss weights: task retrieval compression compute (default 1.0 0.5 0.3 0.2)")
      ("hof_ramp", po::value(&hof_ramp)->default_value(hof_ramp), "HOF: steps over which the efficiency weights ramp up from 0");
  }

  void validate(const RunShape& s) const override {
    DSRSQ_INPUT_CHECK(dsr_d_r >= 1, "option --dsr_d_r: must be >= 1, got ", dsr_d_r);
    DSRSQ_INPUT_CHECK(dsr_base_budget > 0 && std::isfinite(dsr_base_budget),
                      "option --dsr_base_budget: must be > 0 and finite (tokens, or a fraction below 1), got ", dsr_base_budget);
    DSRSQ_INPUT_CHECK(dsr_alpha >= 0 && std::isfinite(dsr_alpha), "option --dsr_alpha: must be >= 0 and finite, got ", dsr_alpha);
    DSRSQ_INPUT_CHECK(dsr_span >= 0, "option --dsr_span: must be >= 0, got ", dsr_span);
    DSRSQ_INPUT_CHECK(dsr_conv_width >= 1, "option --dsr_conv_width: must be >= 1, got ", dsr_conv_width);
    DSRSQ_INPUT_CHECK(dsr_lambda >= 0 && std::isfinite(dsr_lambda), "option --dsr_lambda: must be >= 0 and finite, got ", dsr_lambda);
    DSRSQ_INPUT_CHECK(dsr_ppo_epochs >= 1, "option --dsr_ppo_epochs: must be >= 1 (1 = REINFORCE), got ", dsr_ppo_epochs);
    DSRSQ_INPUT_CHECK(dsr_clip >= 0 && dsr_clip < 1, "option --dsr_clip: must lie in [0, 1), got ", dsr_clip);
    DSRSQ_INPUT_CHECK(sqa_clusters >= 1, "option --sqa_clusters: must be >= 1, got ", sqa_clusters);
    DSRSQ_INPUT_CHECK(sqa_clusters <= s.max_seq_len, "option --sqa_clusters: ", sqa_clusters,
                      " clusters cannot be filled by sequences of at most max_seq_len=", s.max_seq_len, " tokens");
    DSRSQ_INPUT_CHECK(sqa_top_clusters >= 1 && sqa_top_clusters <= sqa_clusters,
                      "option --sqa_top_clusters: must lie in [1, sqa_clusters=", sqa_clusters, "], got ", sqa_top_clusters);
    DSRSQ_INPUT_CHECK(sqa_lloyd_steps >= 0, "option --sqa_lloyd_steps: must be >= 0, got ", sqa_lloyd_steps);
    DSRSQ_INPUT_CHECK(s.d_model >= 1, "option --d_model: must be >= 1, got ", s.d_model);
    DSRSQ_INPUT_CHECK(rckv_d_c >= 1 && rckv_d_c <= s.d_model, "option --rckv_d_c: the latent size must lie in [1, d_model=",
                      s.d_model, "], got ", rckv_d_c);
    DSRSQ_INPUT_CHECK(rckv_buffer >= 0, "option --rckv_buffer: must be >= 0 (0: from --kv_budget), got ", rckv_buffer);
    DSRSQ_INPUT_CHECK(rckv_window >= 0, "option --rckv_window: must be >= 0, got ", rckv_window);
    DSRSQ_INPUT_CHECK(rckv_tau >= 0 && std::isfinite(rckv_tau), "option --rckv_tau: must be >= 0 and finite, got ", rckv_tau);
    DSRSQ_INPUT_CHECK(hof_weights.size() == 4,
                      "option --hof_weights: give 4 weights (task retrieval compression compute), got ", hof_weights.size());
    for (double w : hof_weights)
      DSRSQ_INPUT_CHECK(w >= 0 && std::isfinite(w), "option --hof_weights: weights must be >= 0 and finite, got ", w);
    DSRSQ_INPUT_CHECK(hof_ramp >= 0, "option --hof_ramp: must be >= 0, got ", hof_ramp);
  }

  void resolved(std::map<std::string, std::string>& kv) const override {
    kv["dsr_d_r"] = std::to_string(dsr_d_r);
    kv["dsr_base_budget"] = num(dsr_base_budget);
    kv["dsr_alpha"] = num(dsr_alpha);
    kv["dsr_span"] = std::to_string(dsr_span);
    kv["dsr_conv_width"] = std::to_string(dsr_conv_width);
    kv["dsr_lambda"] = num(dsr_lambda);
    kv["dsr_ppo_epochs"] = std::to_string(dsr_ppo_epochs);
    kv["dsr_clip"] = num(dsr_clip);
    kv["sqa_clusters"] = std::to_string(sqa_clusters);
    kv["sqa_top_clusters"] = std::to_string(sqa_top_clusters);
    kv["sqa_lloyd_steps"] = std::to_string(sqa_lloyd_steps);
    kv["rckv_d_c"] = std::to_string(rckv_d_c);
    kv["rckv_buffer"] = std::to_string(rckv_buffer);
    kv["rckv_window"] = std::to_string(rckv_window);
    kv["rckv_tau"] = num(rckv_tau);
    kv["rckv_observe"] = rckv_observe ? "true" : "false";
    std::ostringstream w;
    for (std::size_t i = 0; i < hof_weights.size(); ++i) w << (i ? " " : "") << hof_weights[i];
    kv["hof_weights"] = w.str();
    kv["hof_ramp"] = std::to_string(hof_ramp);
  }

  DsrsqSettings settings(const ModelConfig& mc, std::uint64_t seed, const AdamWConfig& adam) const {
    DsrsqSettings s;
    s.dsr.d_r = dsr_d_r;
    s.dsr.conv_width = dsr_conv_width;
    s.dsr.span = dsr_span;
    s.dsr.base_budget = dsr_base_budget;
    s.dsr.alpha = dsr_alpha;
    s.dsr.lambda = dsr_lambda;
    s.dsr.ppo_epochs = dsr_ppo_epochs;
    s.dsr.clip = dsr_clip;
    s.dsr.validate();
    s.ppo_adam = adam;  // the retriever's inner PPO updates: the backbone's hyper-parameters
    s.sqa.clusters = sqa_clusters;
    s.sqa.top_clusters = sqa_top_clusters;
    s.sqa.lloyd_steps = static_cast<int>(sqa_lloyd_steps);
    s.sqa.seed = seed;
    s.rckv.d_c = rckv_d_c;
    s.rckv.buffer = rckv_buffer;
    s.rckv.window = rckv_window;
    s.rckv.tau = rckv_tau;
    s.rckv.observe_prefill = rckv_observe;
    s.rckv.seed = seed;
    s.rckv.sqa = true;
    s.rckv.sqa_cfg = s.sqa;
    s.rckv.validate(mc);
    for (std::size_t i = 0; i < 4; ++i) s.g[i] = hof_weights.at(i);
    s.ramp = hof_ramp;
    return s;
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

  EvalPlan plan(const std::string& variant) override {
    const DsrsqVariant v = DsrsqVariant::named(variant.empty() ? "full_model" : variant);
    EvalPlan p;
    p.policy = dm_.make_policy(v);
    p.select = [this, v](const Encoded& enc) { return dm_.select_prompt(enc, v); };
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

const MethodInfo& dsrsq_method() {
  static const MethodInfo info{"dsrsq",
                               "DSR retriever + SQA cluster attention + RCKV cache, HOF loss (trains from a standard checkpoint)",
                               "DSRSQ paper",
                               Backbone::own,
                               true,
                               {"full_model", "no_dsr", "no_sqa", "no_rckv"},
                               false,
                               "its retriever scores every context token against the question",
                               &knobs,
                               &make};
  return info;
}

}  // namespace dsrsq::methods
