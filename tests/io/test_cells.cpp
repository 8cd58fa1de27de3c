// Evaluation cells in the results file (schema 3, results/README.md "Cells"):
// the cell table, the per-row cell column, per-cell state/summary/efficiency,
// resume resetting an unfinished method's cells, and reading schema 2.
#define BOOST_TEST_MODULE dsrsq_cells
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "io/results.hpp"

namespace fs = std::filesystem;
using namespace dsrsq;
using namespace dsrsq::results;

namespace {

struct Scratch {
  fs::path dir;
  explicit Scratch(const std::string& name) {
    dir = fs::temp_directory_path() / ("dsrsq_cells_" + std::to_string(::getpid()) + "_" + name);
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string operator/(const std::string& f) const { return (dir / f).string(); }
};

template <class F>
void expect_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) BOOST_CHECK_MESSAGE(msg.find(n) != std::string::npos, "'" << n << "' not in: " << msg);
    return;
  }
  BOOST_FAIL("expected a dsrsq::Error");
}

RunLayout layout() {
  RunLayout l;
  l.methods = {"full", "sliding_window"};
  l.cells = {Cell{64, "0.5", 0.5, -1}, Cell{64, "64KiB", std::nan(""), 65536}, Cell{128, "0.5", 0.5, -1},
             Cell{128, "64KiB", std::nan(""), 65536}};
  return l;
}

ResultsFile make(const std::string& path, std::int64_t version = kSchemaVersion) {
  ConfigRecord cfg;
  cfg.options = {{"kv_budget", "0.5 64KiB"}};
  cfg.resolved_text = "kv_budget = 0.5 64KiB\n";
  return ResultsFile::create(path, layout(), Provenance{}, cfg, version);
}

ExampleRecord row(const std::string& id, std::int64_t cell) {
  ExampleRecord e;
  e.id = id;
  e.task = "needle";
  e.prediction = "1234";
  e.golds = {"1234"};
  e.f1 = e.em = 1;
  e.meta = "{}";
  e.cell = cell;
  return e;
}

bool same_cell(const Cell& a, const Cell& b) {  // NaN fractions compare equal
  return a.context_size == b.context_size && a.kv_budget == b.kv_budget && a.kv_budget_bytes == b.kv_budget_bytes &&
         (a.kv_budget_fraction == b.kv_budget_fraction ||
          (std::isnan(a.kv_budget_fraction) && std::isnan(b.kv_budget_fraction)));
}

}  // namespace

BOOST_AUTO_TEST_CASE(cells_round_trip) {
  Scratch s("rt");
  const std::string path = s / "run.h5";
  EvalSummary sum{0.5, 0.25, 0.5, 0.1, 0.2, 2};
  EfficiencyRecord eff;
  eff.peak_mem_bytes = 10;
  eff.throughput_tok_s = 123.5;
  eff.tokens_run = 247;
  eff.serve_s = 2;
  eff.context_tokens_served = 200;
  eff.decode_examples = 2;
  {
    ResultsFile f = make(path);
    for (std::int64_t k = 0; k < 4; ++k) {
      const std::vector<ExampleRecord> rows{row("a" + std::to_string(k / 2), k), row("b" + std::to_string(k / 2), k)};
      f.append_examples("eval/full", rows);
    }
    f.set_cell_result("full", 1, sum, eff);
    f.set_cell_status("full", 2, "failed", "out of memory");
    expect_error([&] { f.set_cell_status("full", 4, "done"); }, {"no cell 4", "full"});
    expect_error([&] { f.set_cell_status("standard", 0, "done"); }, {"no cell 0 of method 'standard'"});
    expect_error([&] { f.set_cell_status("full", 0, "finished"); }, {"cell state", "finished"});
    f.close();
  }
  ResultsReader r(path);
  BOOST_TEST(r.schema_version() == 3);
  const auto l = r.layout();
  BOOST_REQUIRE(l.cells.size() == 4u);
  for (std::size_t k = 0; k < 4; ++k) BOOST_TEST(same_cell(l.cells[k], layout().cells[k]));
  const auto ex = r.examples("eval/full");
  BOOST_REQUIRE(ex.size() == 8u);
  for (std::size_t i = 0; i < ex.size(); ++i) BOOST_TEST(ex[i].cell == static_cast<std::int64_t>(i / 2));
  BOOST_TEST(r.cell_status("full", 0).state == "pending");
  BOOST_TEST(r.cell_status("full", 1).state == "done");
  BOOST_TEST(r.cell_status("full", 2).state == "failed");
  BOOST_TEST(r.cell_status("full", 2).message == "out of memory");
  BOOST_TEST((r.cell_summary("full", 1) == sum));
  BOOST_TEST((r.cell_efficiency("full", 1) == eff));
  BOOST_TEST(r.examples("eval/sliding_window").empty());
}

BOOST_AUTO_TEST_CASE(resume_resets_the_cells_of_an_unfinished_method) {
  Scratch s("resume");
  const std::string path = s / "run.h5";
  {
    ResultsFile f = make(path);
    f.set_status("eval/full", "done");
    f.append_examples("eval/full", std::vector<ExampleRecord>{row("a", 0)});
    f.set_cell_result("full", 0, EvalSummary{}, EfficiencyRecord{});
    f.set_status("eval/sliding_window", "running");
    f.append_examples("eval/sliding_window", std::vector<ExampleRecord>{row("a", 0)});
    f.set_cell_result("sliding_window", 0, EvalSummary{}, EfficiencyRecord{});
    f.close();
  }
  { ResultsFile f = ResultsFile::resume(path); }
  ResultsReader r(path);
  BOOST_TEST(r.cell_status("full", 0).state == "done");  // a finished method keeps its cells
  BOOST_TEST(r.examples("eval/full").size() == 1u);
  BOOST_TEST(r.cell_status("sliding_window", 0).state == "pending");  // redone by the resumed run
  BOOST_TEST(r.examples("eval/sliding_window").empty());
}

BOOST_AUTO_TEST_CASE(schema_2_reads_but_is_not_appended_to) {
  Scratch s("v2");
  const std::string path = s / "run.h5";
  { ResultsFile f = make(path, 2); }
  {
    ResultsReader r(path);
    BOOST_TEST(r.schema_version() == 2);
    BOOST_TEST(r.rows("eval/full") == 0u);
  }
  expect_error([&] { (void)ResultsFile::resume(path); }, {"schema_version 2", "cannot append"});
  Scratch t("v1");
  const std::string old = t / "run.h5";
  { ResultsFile f = make(old, 1); }
  expect_error([&] { ResultsReader x(old); }, {"schema_version 1", "reads 2 to 3"});
}
