// "razor" (RazorAttention, ALGORITHMS.md section 6 and its corrections):
// retrieval heads, found once per model by a calibration run on random tokens
// (a segment repeated several times: echo and induction attention per (layer,
// head), kv/razor.hpp), keep every token; the other heads keep N0 sinks, the
// recent L_h tokens sized from --kv_budget and one compensation slot.
// Training-free, on the standard checkpoint. The calibration runs when the
// method is made (once per evaluated model) and its cost, the scores and the
// protected heads of each example are recorded in the example's meta.
#include <cstdio>
#include <sstream>

#include "core/error.hpp"
#include "kv/razor.hpp"
#include "methods/method.hpp"

namespace dsrsq::methods {
namespace {

std::string shown(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

struct RazorKnobs final : MethodKnobs {
  std::int64_t sinks = 4;        // N0 (the prototype's default)
  double induction = 0.14;       // fraction of all (layer, head) pairs
  double echo = 0.01;
  std::int64_t segment = 0;      // 0: min(2500, max_pos / 4)
  std::int64_t repeats = 4;

  void describe(po::options_description& d) override {
    d.add_options()
      ("razor_sinks", po::value(&sinks)->default_value(sinks), "attention sinks (first tokens) every non-retrieval head keeps")
      ("razor_induction_fraction", po::value(&induction)->default_value(induction, shown(induction)), "fraction of the model's (layer, head) pairs protected as induction heads (at least one when > 0)")
      ("razor_echo_fraction", po::value(&echo)->default_value(echo, shown(echo)), "fraction of the model's (layer, head) pairs protected as echo heads (at least one when > 0)")
      ("razor_calib_segment", po::value(&segment)->default_value(segment), "calibration: random tokens per segment (0: min(2500, max_pos / 4))")
      ("razor_calib_repeats", po::value(&repeats)->default_value(repeats), "calibration: times the segment is repeated");
  }
  void validate(const RunShape& shape) const override {
    DSRSQ_INPUT_CHECK(sinks >= 0, "option --razor_sinks: must be >= 0, got ", sinks);
    DSRSQ_INPUT_CHECK(induction >= 0 && induction <= 1, "option --razor_induction_fraction: must lie in [0, 1], got ", induction);
    DSRSQ_INPUT_CHECK(echo >= 0 && echo <= 1, "option --razor_echo_fraction: must lie in [0, 1], got ", echo);
    DSRSQ_INPUT_CHECK(repeats >= 2, "option --razor_calib_repeats: must be >= 2 (echo and induction need an earlier copy), got ", repeats);
    DSRSQ_INPUT_CHECK(segment == 0 || segment >= 2, "option --razor_calib_segment: must be 0 (automatic) or >= 2, got ", segment);
    DSRSQ_INPUT_CHECK(segment == 0 || segment * repeats <= shape.max_seq_len, "option --razor_calib_segment: ", segment,
                      " x --razor_calib_repeats ", repeats, " tokens exceed max_seq_len=", shape.max_seq_len);
  }
  void resolved(std::map<std::string, std::string>& kv) const override {
    kv["razor_sinks"] = std::to_string(sinks);
    kv["razor_induction_fraction"] = exact_str(induction);
    kv["razor_echo_fraction"] = exact_str(echo);
    kv["razor_calib_segment"] = std::to_string(segment);
    kv["razor_calib_repeats"] = std::to_string(repeats);
  }
};

std::string scores_str(const std::vector<double>& v) {
  std::string s;
  char buf[32];
  for (std::size_t i = 0; i < v.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%s%.4g", i ? " " : "", v[i]);
    s += buf;
  }
  return s;
}

class Razor final : public Method {
 public:
  explicit Razor(const MethodContext& c) : mc_(c.model.config()), be_(c.backend) {
    const RazorKnobs def;
    const RazorKnobs& k = c.knobs ? *static_cast<const RazorKnobs*>(c.knobs) : def;
    const std::int64_t seg = k.segment > 0 ? k.segment : razor::default_segment(mc_.max_pos);
    const razor::HeadScores hs = razor::calibrate(c.model, seg, k.repeats, c.seed);
    s_.sinks = k.sinks;
    s_.protect = razor::protected_heads(hs, k.induction, k.echo);
    auto& m = s_.calibration_meta;
    m["razor_calibration_tokens"] = std::to_string(hs.tokens);
    m["razor_calibration_s"] = exact_str(hs.seconds);
    m["razor_calibration_flops"] = exact_str(hs.flops);
    m["razor_calibrated_heads"] = razor::head_list(s_.protect, mc_.n_heads);
    m["razor_induction_scores"] = scores_str(hs.induction);
    m["razor_echo_scores"] = scores_str(hs.echo);
    std::printf("razor: calibrated on %lld random tokens (%.2f s, %.3g FLOPs); protected heads %s\n",
                static_cast<long long>(hs.tokens), hs.seconds, hs.flops, m["razor_calibrated_heads"].c_str());
  }
  EvalPlan plan(const std::string&) override {
    EvalPlan p;
    p.policy = std::make_unique<RazorPolicy>(mc_, be_, s_);
    return p;
  }

 private:
  ModelConfig mc_;
  Backend& be_;
  razor::Settings s_;
};

std::shared_ptr<MethodKnobs> knobs() { return std::make_shared<RazorKnobs>(); }
std::unique_ptr<Method> make(const MethodContext& c) { return std::make_unique<Razor>(c); }

}  // namespace

const MethodInfo& razor_method() {
  static const MethodInfo info{.name = "razor",
                               .summary = "RazorAttention: retrieval heads (echo/induction, calibrated on random tokens) keep all; "
                                          "others keep sinks + recent + a compensation slot, sized from --kv_budget",
                               .source = "Tang et al. 2024, arXiv 2407.15891",
                               .knobs = &knobs,
                               .make = &make,
                               .device_ready = true};
  return info;
}

}  // namespace dsrsq::methods
