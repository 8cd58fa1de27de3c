// Golden test: the C++ engine equals PyTorch on the same weights.
// tests/reference/torch_model.py writes a fixture (format: tests/reference/README.md)
// holding a tiny model's initial weights, one batch (with non-contiguous positions
// and an answer-only loss mask), PyTorch's logits, loss and every gradient, the
// losses and gradient norms of ten AdamW steps (clipping on), and the parameters
// after them. Here the same Transformer is built on the CPU backend, loaded with
// those weights, and compared tensor by tensor with relative error
// ||ours - torch|| / ||torch|| <= 1e-4.
//
// Fixture path: the first argument after `--` (test_golden -- path.h5) or the
// environment variable DSRSQ_GOLDEN_FIXTURE (CTest sets it; a setup test writes
// the file). A missing, malformed or mismatched fixture fails the test.
#define BOOST_TEST_MODULE golden
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.hpp"
#include "io/h5.hpp"
#include "model/transformer.hpp"
#include "train/optimizer.hpp"

namespace {

constexpr double kTol = 1e-4;
constexpr std::int64_t kFormatVersion = 1;

std::string fixture_path() {
  const auto& mts = boost::unit_test::framework::master_test_suite();
  if (mts.argc > 1) return mts.argv[1];
  if (const char* e = std::getenv("DSRSQ_GOLDEN_FIXTURE"); e && *e) return e;
  BOOST_FAIL("no golden fixture: pass its path (test_golden -- fixture.h5) or set DSRSQ_GOLDEN_FIXTURE; "
             "write one with /usr/bin/python3 tests/reference/torch_model.py --out fixture.h5");
  return {};
}

// ||a - b|| / ||b||, both accumulated in double. The reference must not be all
// zeros, or the relative error would say nothing.
double rel_error(const float* a, const float* b, std::int64_t n, const std::string& what) {
  double diff = 0, ref = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    diff += d * d;
    ref += static_cast<double>(b[i]) * static_cast<double>(b[i]);
    if (!std::isfinite(a[i])) BOOST_FAIL(what << ": non-finite value " << a[i] << " at index " << i);
  }
  if (!(ref > 0)) BOOST_FAIL(what << ": the PyTorch reference is all zeros, so the comparison would be vacuous");
  return std::sqrt(diff / ref);
}

// Fixture problems throw (the test case errors out with the message); the
// negative test below relies on that.
template <class... A>
void require(bool ok, const A&... what) {
  if (!ok) {
    std::ostringstream os;
    (os << ... << what);
    throw std::runtime_error("golden fixture: " + os.str());
  }
}

double rel_scalar(double a, double b) { return std::fabs(a - b) / std::max(std::fabs(b), 1e-30); }

// Prints one line per tensor and the worst one; fails on any above tolerance.
struct Report {
  explicit Report(std::string t) : title(std::move(t)) {}
  std::string title;
  double worst = 0;
  std::string worst_name;
  int failed = 0;
  void add(const std::string& name, double err) {
    const bool ok = err <= kTol;
    failed += !ok;
    std::printf("  %-24s rel %.3e %s\n", name.c_str(), err, ok ? "ok" : "FAIL");
    if (err >= worst) worst = err, worst_name = name;
  }
  void finish() const {
    std::printf("%s: worst %s rel %.3e (tolerance %.0e), %d failed\n", title.c_str(), worst_name.c_str(), worst, kTol,
                failed);
    std::fflush(stdout);
    BOOST_TEST(failed == 0, title << ": " << failed << " tensors above tolerance, worst " << worst_name << " " << worst);
  }
};

// The fixture, validated on open, plus a model loaded with its initial weights.
struct Golden {
  std::string path;
  dsrsq::h5::File file;
  dsrsq::ModelConfig cfg;
  std::int64_t B = 0, T = 0;
  std::vector<std::string> names;
  std::vector<std::int32_t> tokens, pos, targets;
  std::vector<float> mask;
  std::unique_ptr<dsrsq::Transformer> model;

  explicit Golden(const std::string& p) : path(p), file(p, dsrsq::h5::File::Mode::read) {
    const auto& root = file.root();
    require(root.attr_string("format") == "dsrsq-golden", path, " is not a dsrsq golden fixture");
    require(root.attr_int("format_version") == kFormatVersion, path, ": format_version ", root.attr_int("format_version"), ", this test reads ", kFormatVersion);
    const auto c = root.group("config");
    cfg.vocab = c.attr_int("vocab");
    cfg.d_model = c.attr_int("d_model");
    cfg.n_heads = c.attr_int("n_heads");
    cfg.n_layers = c.attr_int("n_layers");
    cfg.d_ff = c.attr_int("d_ff");
    cfg.max_pos = c.attr_int("max_pos");
    cfg.tied_embedding = c.attr_int("tied_embedding") != 0;
    cfg.rope_theta = c.attr_double("rope_theta");
    cfg.ln_eps = c.attr_double("ln_eps");
    B = c.attr_int("batch");
    T = c.attr_int("seq");
    std::printf("fixture %s: torch %s, %s, B=%lld T=%lld\n", path.c_str(), root.attr_string("torch_version").c_str(),
                cfg.str().c_str(), static_cast<long long>(B), static_cast<long long>(T));
    const auto n = static_cast<std::size_t>(B * T);
    tokens.resize(n), pos.resize(n), targets.resize(n), mask.resize(n);
    root.read_raw("tokens", tokens.data(), n);
    root.read_raw("pos", pos.data(), n);
    root.read_raw("targets", targets.data(), n);
    root.read_raw("mask", mask.data(), n);
    names = root.read_strings("param_names");

    model = std::make_unique<dsrsq::Transformer>(cfg, dsrsq::cpu_backend());
    const auto params = model->params();
    require(names.size() == params.size(), path, " lists ", names.size(), " parameters, the model has ", params.size());
    for (std::size_t i = 0; i < params.size(); ++i) {
      require(names[i] == params[i].name, "parameter ", i, ": fixture has '", names[i], "', the model '", params[i].name, "'");
      load(root, "params/" + names[i], params[i].value);
    }
  }

  // Reads dataset `name` into t after checking its shape equals t's.
  static void load(const dsrsq::h5::Group& g, const std::string& name, const dsrsq::TensorView& t) {
    const auto d = g.dims(name);
    dsrsq::Shape s;
    s.rank = static_cast<int>(d.size());
    require(s.rank <= dsrsq::Shape::kMaxDims, name, ": rank ", s.rank);
    for (std::size_t k = 0; k < d.size(); ++k) s.d[k] = static_cast<std::int64_t>(d[k]);
    require((s == t.shape), name, ": fixture shape ", s.str(), ", expected ", t.shape.str());
    g.read_raw(name, t.ptr<float>(), static_cast<std::size_t>(t.numel()));
  }
  std::vector<float> read_like(const std::string& name, const dsrsq::TensorView& t) const {
    std::vector<float> v(static_cast<std::size_t>(t.numel()));
    load(file.root(), name, dsrsq::TensorView(v.data(), t.shape));
    return v;
  }

  dsrsq::Batch batch() {
    const dsrsq::Shape s{B, T};
    return dsrsq::Batch{dsrsq::TensorView(tokens.data(), s), dsrsq::TensorView(pos.data(), s),
                        dsrsq::TensorView(targets.data(), s), dsrsq::TensorView(mask.data(), s)};
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(forward_backward_match_pytorch) {
  Golden g(fixture_path());
  auto& m = *g.model;
  m.zero_grad();
  const double loss = m.forward(g.batch());
  m.backward();

  Report fwd("forward");
  const auto logits_ref = g.read_like("logits", m.logits());
  fwd.add("logits", rel_error(m.logits().ptr<float>(), logits_ref.data(), m.logits().numel(), "logits"));
  const auto loss_ref = g.file.root().read<double>("loss");
  BOOST_TEST_REQUIRE(loss_ref.size() == 1u);
  std::printf("  loss ours %.9f torch %.9f\n", loss, loss_ref[0]);
  fwd.add("loss", rel_scalar(loss, loss_ref[0]));
  fwd.finish();

  Report bwd("gradients");
  for (const auto& p : m.params()) {
    const auto ref = g.read_like("grad/" + p.name, p.grad);
    bwd.add(p.name, rel_error(p.grad.ptr<float>(), ref.data(), p.grad.numel(), "grad/" + p.name));
  }
  bwd.finish();
}

BOOST_AUTO_TEST_CASE(adamw_ten_steps_match_pytorch) {
  Golden g(fixture_path());
  auto& m = *g.model;
  const auto ag = g.file.root().group("adamw");
  dsrsq::AdamWConfig oc;
  oc.lr = ag.attr_double("lr");
  oc.beta1 = ag.attr_double("beta1");
  oc.beta2 = ag.attr_double("beta2");
  oc.eps = ag.attr_double("eps");
  oc.weight_decay = ag.attr_double("weight_decay");
  oc.clip_norm = ag.attr_double("clip_norm");
  const std::int64_t steps = ag.attr_int("steps");
  const auto losses_ref = ag.read<double>("losses");
  const auto norms_ref = ag.read<double>("grad_norms");
  const auto clipped_ref = ag.read<std::int32_t>("clipped");
  BOOST_TEST_REQUIRE((steps > 0 && losses_ref.size() == static_cast<std::size_t>(steps) &&
                      norms_ref.size() == losses_ref.size() && clipped_ref.size() == losses_ref.size()),
                     "adamw group: steps=" << steps << " but " << losses_ref.size() << " losses, " << norms_ref.size()
                                           << " norms, " << clipped_ref.size() << " clip flags");
  BOOST_TEST_REQUIRE(std::count(clipped_ref.begin(), clipped_ref.end(), 1) > 0,
                     "the fixture never clips: the clipping path would go untested");

  dsrsq::AdamW opt(m.params(), m.flat_params(), oc, m.backend());
  Report rep("adamw steps");
  const auto batch = g.batch();
  for (std::int64_t s = 0; s < steps; ++s) {
    const auto i = static_cast<std::size_t>(s);
    m.zero_grad();
    const double loss = m.forward(batch);
    m.backward();
    const double norm = opt.step(oc.lr);
    const bool clipped = oc.clip_norm > 0 && norm > oc.clip_norm;
    std::printf("  step %lld: loss ours %.7f torch %.7f | grad norm ours %.7f torch %.7f | clipped %d/%d\n",
                static_cast<long long>(s), loss, losses_ref[i], norm, norms_ref[i], int(clipped), clipped_ref[i]);
    rep.add("loss[" + std::to_string(s) + "]", rel_scalar(loss, losses_ref[i]));
    rep.add("grad_norm[" + std::to_string(s) + "]", rel_scalar(norm, norms_ref[i]));
    BOOST_TEST(int(clipped) == clipped_ref[i], "step " << s << ": clipping decision differs from PyTorch");
  }
  for (const auto& p : m.params()) {
    const auto ref = g.read_like("final/" + p.name, p.value);
    rep.add("final " + p.name, rel_error(p.value.ptr<float>(), ref.data(), p.value.numel(), "final/" + p.name));
  }
  rep.finish();
}

// A fixture that is missing or not a golden fixture must stop the test, not pass it.
BOOST_AUTO_TEST_CASE(bad_fixture_is_rejected) {
  BOOST_CHECK_THROW(Golden("/nonexistent/golden_fixture.h5"), std::exception);
  const std::string tmp = fixture_path() + ".bad.h5";
  {
    dsrsq::h5::File f(tmp, dsrsq::h5::File::Mode::truncate);
    f.root().set_attr("format", std::string("not-golden"));
    f.root().set_attr("format_version", std::int64_t{1});
  }
  BOOST_CHECK_THROW(Golden{tmp}, std::runtime_error);
  {
    dsrsq::h5::File f(tmp, dsrsq::h5::File::Mode::truncate);
    f.root().set_attr("format", std::string("dsrsq-golden"));
    f.root().set_attr("format_version", std::int64_t{kFormatVersion + 1});
  }
  BOOST_CHECK_THROW(Golden{tmp}, std::runtime_error);
  std::remove(tmp.c_str());
}
