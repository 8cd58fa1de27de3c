// "pyramid" (PyramidKV, ALGORITHMS.md section 7 as kvpress computes it):
// SnapKV observation-window scores (window max(question length, 8), max
// pooling with kernel 7 as PyramidKV's LongBench runner), per-layer budgets
// falling linearly from the bottom layer to the top with their sum fixed by
// --kv_budget (kv/pyramid.hpp). Training-free, on the standard checkpoint.
#include <sstream>

#include "core/error.hpp"
#include "kv/pyramid.hpp"
#include "methods/method.hpp"

namespace dsrsq::methods {
namespace {

struct PyramidKnobs final : MethodKnobs {
  std::int64_t window = 0;
  std::int64_t kernel = 7;
  std::string pool = "max";
  double beta = 20;

  void describe(po::options_description& d) override {
    d.add_options()
      ("pyramid_window", po::value(&window)->default_value(window), "observation window (last prompt tokens; 0: max(question length, 8))")
      ("pyramid_kernel", po::value(&kernel)->default_value(kernel), "pooling kernel of the window scores (odd)")
      ("pyramid_pool", po::value(&pool)->default_value(pool), "pooling of the window scores: max or avg")
      ("pyramid_beta", po::value(&beta)->default_value(beta, "20"), "top layer's budget = (C - w) / beta before the fix-up (>= 1)");
  }
  void validate(const RunShape&) const override {
    DSRSQ_INPUT_CHECK(window >= 0, "option --pyramid_window: must be >= 0 (0: max(question length, 8)), got ", window);
    DSRSQ_INPUT_CHECK(kernel >= 1 && kernel % 2 == 1, "option --pyramid_kernel: must be odd and >= 1, got ", kernel);
    DSRSQ_INPUT_CHECK(pool == "max" || pool == "avg", "option --pyramid_pool: must be max or avg, got '", pool, "'");
    DSRSQ_INPUT_CHECK(beta >= 1 && std::isfinite(beta), "option --pyramid_beta: must be >= 1 and finite, got ", beta);
  }
  void resolved(std::map<std::string, std::string>& kv) const override {
    kv["pyramid_window"] = std::to_string(window);
    kv["pyramid_kernel"] = std::to_string(kernel);
    kv["pyramid_pool"] = pool;
    kv["pyramid_beta"] = exact_str(beta);
  }
  pyramid::Settings settings() const {
    pyramid::Settings s;
    s.window = window;
    s.kernel = kernel;
    s.pool = pool == "avg" ? snapkv::Pool::avg : snapkv::Pool::max;
    s.beta = beta;
    return s;
  }
};

std::shared_ptr<MethodKnobs> knobs() { return std::make_shared<PyramidKnobs>(); }
std::unique_ptr<Method> make(const MethodContext& c) { return std::make_unique<SettingsPolicyMethod<PyramidPolicy, PyramidKnobs>>(c); }

}  // namespace

const MethodInfo& pyramid_method() {
  static const MethodInfo info{.name = "pyramid",
                               .summary = "PyramidKV: SnapKV window scores, per-layer budgets falling linearly bottom to top, "
                                          "sized from --kv_budget",
                               .source = "Cai et al. 2024, arXiv 2406.02069 (budgets as kvpress)",
                               .knobs = &knobs,
                               .make = &make,
                               .device_ready = true};
  return info;
}

}  // namespace dsrsq::methods
