// "atskv" (ALGORITHMS.md section 11): a learned per-layer relevance predictor
// with quantile thresholds under a hard byte cap and a passive tier
// (kv/atskv.hpp). Its backbone is the standard checkpoint it starts from,
// FROZEN: `--model atskv` runs the trainer with the backbone's loss weight 0
// and puts the backbone's parameters back after every optimizer step, while
// each training step records up to --atskv_train_seqs of the step's sequences
// teacher-forced through the frozen backbone (features and KVzap-style targets)
// and takes one Adam step of the predictor's mean squared error (the logged
// loss). The predictor is saved with the run's checkpoints ("atskv.*") and
// read back by --init_from. Evaluating atskv without a trained predictor at a
// budget that evicts is an error (an untrained predictor is a random rule).
#include <cstring>
#include <memory>
#include <sstream>

#include "core/error.hpp"
#include "kv/atskv.hpp"
#include "methods/method.hpp"

namespace dsrsq::methods {
namespace {

struct AtskvKnobs final : MethodKnobs {
  AtskvConfig c;
  std::int64_t hidden = 32;
  double lr = 3e-3;
  std::int64_t train_seqs = 2;

  void describe(po::options_description& d) override {
    d.add_options()
      ("atskv_window", po::value(&c.window)->default_value(c.window), "ATSKV: observation window of the attention feature (0: max(question length, 8))")
      ("atskv_beta", po::value(&c.beta)->default_value(c.beta, "1"), "ATSKV: threshold tau = beta * quantile(r, q)")
      ("atskv_q_min", po::value(&c.q_min)->default_value(c.q_min, "0.1"), "ATSKV: dropped-fraction quantile without memory pressure")
      ("atskv_q_max", po::value(&c.q_max)->default_value(c.q_max, "0.5"), "ATSKV: dropped-fraction quantile at or above the memory target")
      ("atskv_ema", po::value(&c.ema)->default_value(c.ema, "0.8"), "ATSKV: moving average of the quantile (from the seed's initial sparsity 0.7)")
      ("atskv_promote_slots", po::value(&c.promote_slots)->default_value(c.promote_slots), "ATSKV: promotion slots per row and layer for passive tokens whose score rises (taken from the budget)")
      ("atskv_hidden", po::value(&hidden)->default_value(hidden), "ATSKV: hidden units of the predictor's MLP")
      ("atskv_lr", po::value(&lr)->default_value(lr, "0.003"), "ATSKV: Adam learning rate of the predictor")
      ("atskv_train_seqs", po::value(&train_seqs)->default_value(train_seqs), "ATSKV: sequences of each training step recorded through the frozen backbone for the predictor");
  }
  void validate(const RunShape&) const override {
    c.validate();
    DSRSQ_INPUT_CHECK(hidden >= 1, "option --atskv_hidden: must be >= 1, got ", hidden);
    DSRSQ_INPUT_CHECK(lr > 0 && std::isfinite(lr), "option --atskv_lr: must be > 0 and finite, got ", lr);
    DSRSQ_INPUT_CHECK(train_seqs >= 1, "option --atskv_train_seqs: must be >= 1, got ", train_seqs);
  }
  void resolved(std::map<std::string, std::string>& kv) const override {
    kv["atskv_window"] = std::to_string(c.window);
    kv["atskv_beta"] = exact_str(c.beta);
    kv["atskv_q_min"] = exact_str(c.q_min);
    kv["atskv_q_max"] = exact_str(c.q_max);
    kv["atskv_ema"] = exact_str(c.ema);
    kv["atskv_promote_slots"] = std::to_string(c.promote_slots);
    kv["atskv_hidden"] = std::to_string(hidden);
    kv["atskv_lr"] = exact_str(lr);
    kv["atskv_train_seqs"] = std::to_string(train_seqs);
  }
};

class Atskv final : public Method, public TrainingExtension {
 public:
  explicit Atskv(const MethodContext& c)
      : model_(c.model), be_(c.backend), k_(c.knobs ? *static_cast<const AtskvKnobs*>(c.knobs) : AtskvKnobs{}),
        pred_(c.model.config(), k_.hidden, c.seed) {
    k_.validate(RunShape{});
  }

  TrainingExtension* training() override { return this; }

  EvalPlan plan(const std::string&) override {
    // An untrained predictor is refused by the policy as soon as it would evict (a budget that holds everything needs none).
    EvalPlan p;
    p.policy = std::make_unique<AtskvPolicy>(model_.config(), be_, k_.c, pred_);
    return p;
  }

  // ---- TrainingExtension ----
  void save(std::map<std::string, std::vector<float>>& extra) const override {
    pred_.save(extra, true);
    extra["atskv.cost"] = {static_cast<float>(seconds_), static_cast<float>(flops_), static_cast<float>(rows_)};
  }
  bool restore(const std::map<std::string, std::vector<float>>& extra) override {
    trained_ = pred_.load(extra, true);
    if (trained_ && extra.count("atskv.cost") && extra.at("atskv.cost").size() == 3) {
      seconds_ = extra.at("atskv.cost")[0];
      flops_ = extra.at("atskv.cost")[1];
      rows_ = extra.at("atskv.cost")[2];
    }
    return trained_;
  }
  bool load_params(const std::map<std::string, std::vector<float>>& extra) override {
    trained_ = pred_.load(extra, false);
    return trained_;
  }
  void broadcast(dist::Communicator& world, int) override {
    DSRSQ_INPUT_CHECK(world.size() == 1, "method atskv: its predictor trains in one process (got a world of ",
                      world.size(), " ranks)");
  }
  void attach(MethodHooks& hooks, const TrainEnv& env) override {
    DSRSQ_INPUT_CHECK(env.world == nullptr || env.world->size() == 1,
                      "method atskv: its predictor trains in one process (run it with dp = sp = 1)");
    // The backbone stays as it started: no loss of its own, and its
    // parameters are put back after each optimizer step (weight decay moves them).
    const TensorView flat = model_.flat_params();
    frozen_ = to_host<float>(model_.backend(), flat);
    hooks.task_weight = 0.0;
    const std::int32_t pad = env.pad_id;
    hooks.make_batch = [this, pad](const std::vector<const Encoded*>& seqs, std::int64_t step, float lm,
                                   std::int64_t mult, bool training) {
      if (training) {
        pending_ = seqs;
        train_step_ = step + 1;
      } else if (train_step_ != last_val_step_) {  // the trainer validates with step 0: one line per round
        // Validation: the predictor's error on up to 8 validation sequences
        // (recorded once: the backbone is frozen), a held-out measure of its fit.
        last_val_step_ = train_step_;
        for (std::size_t i = 0; i < seqs.size() && val_.size() < 8; ++i) val_.push_back(atskv::record(model_, *seqs[i], k_.c.window));
        std::printf("dsrsq: atskv predictor held-out MSE %.4f at step %lld (%zu validation sequences)\n",
                    atskv::mse(pred_, val_), static_cast<long long>(train_step_), val_.size());
      }
      return make_batch(seqs, pad, lm, mult);
    };
    hooks.before_forward = [this](const HostBatch&, bool training) {
      if (!training || pending_.empty()) return;
      std::vector<atskv::Sample> samples;
      for (std::size_t i = 0; i < pending_.size() && static_cast<std::int64_t>(i) < k_.train_seqs; ++i)
        samples.push_back(atskv::record(model_, *pending_[i], k_.c.window));
      pending_.clear();
      const double f0 = be_.flops_counted();
      const atskv::TrainStats st = atskv::train(pred_, samples, 1, k_.lr);
      last_loss_ = st.loss.front();
      seconds_ += st.seconds;
      flops_ += st.flops + (be_.flops_counted() - f0);
      rows_ += static_cast<double>(st.rows);
      be_.count_flops(st.flops);
      trained_ = true;
    };
    hooks.after_backward = [this](std::int64_t, const HostBatch&, const std::vector<double>&, StepStats& st) {
      st.loss = last_loss_;  // the predictor's mean squared error (the backbone's loss has weight 0)
    };
    hooks.extra_step = [this](double) {
      const TensorView flat = model_.flat_params();
      from_host<float>(model_.backend(), frozen_, flat);
    };
  }
  void detach() override {
    std::printf("dsrsq: atskv predictor trained on %.0f token rows, %.3g FLOPs of its own, %.1f s (backbone frozen)\n",
                rows_, flops_, seconds_);
    frozen_.clear();
    pending_.clear();
  }

 private:
  Transformer& model_;
  Backend& be_;
  AtskvKnobs k_;
  atskv::Predictor pred_;
  bool trained_ = false;
  std::vector<float> frozen_;
  std::vector<const Encoded*> pending_;
  std::vector<atskv::Sample> val_;
  std::int64_t last_val_step_ = -1, train_step_ = 0;
  double last_loss_ = 0, seconds_ = 0, flops_ = 0, rows_ = 0;
};

std::shared_ptr<MethodKnobs> knobs() { return std::make_shared<AtskvKnobs>(); }
std::unique_ptr<Method> make(const MethodContext& c) { return std::make_unique<Atskv>(c); }

}  // namespace

const MethodInfo& atskv_method() {
  static const MethodInfo info{.name = "atskv",
                               .summary = "ATSKV: learned token relevance, quantile threshold under a byte cap, passive tier (predictor trained on a frozen standard backbone)",
                               .source = "ATSKV study (chchenhui/mlrbench proposal, fixed as in ALGORITHMS.md 11)",
                               .backbone = Backbone::own,
                               .trainable = true,
                               .knobs = &knobs,
                               .make = &make,
                               .device_ready = true};
  return info;
}

}  // namespace dsrsq::methods
