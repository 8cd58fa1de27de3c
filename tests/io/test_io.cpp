// Results file round trips and errors, run identity decisions, checkpoints.
#define BOOST_TEST_MODULE dsrsq_io
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "io/checkpoint.hpp"
#include "io/h5.hpp"
#include "io/results.hpp"
#include "io/run_dir.hpp"

namespace fs = std::filesystem;
using namespace dsrsq;
using namespace dsrsq::results;

namespace {

// A fresh, empty scratch directory per test, removed afterwards.
struct Scratch {
  fs::path dir;
  explicit Scratch(const std::string& name) {
    dir = fs::temp_directory_path() / ("dsrsq_io_" + std::to_string(::getpid()) + "_" + name);
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string operator/(const std::string& f) const { return (dir / f).string(); }
};

// Expect a dsrsq::Error whose message contains every needle.
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

RunLayout test_layout() {
  RunLayout l;
  l.methods = {"full", "dsrsq"};
  l.backbones["full"] = "standard checkpoint s.h5";
  l.ablation_variants = {"no_dsr"};
  l.adaptation_methods = {"dsrsq"};
  l.world_size = 4;
  l.dp = 2;
  l.sp = 2;
  l.retention_bins = 4;
  return l;
}

ResultsFile make_file(const std::string& path) {
  Provenance p;
  p.strings = {{"git_sha", "abc123"}, {"hostname", "node01"}};
  p.integers = {{"slurm_restart_count", 2}};
  p.numbers = {{"metric_version", 1.5}};
  ConfigRecord c;
  c.options = {{"model.d_model", "256"}, {"train.lr", "3e-4"}};
  c.resolved_text = "[model]\nd_model = 256\n[train]\nlr = 3e-4\n";
  return ResultsFile::create(path, test_layout(), p, c);
}

ExampleRecord example(int i) {
  ExampleRecord e;
  e.id = "q" + std::to_string(i);
  e.task = i % 2 ? "quiz" : "sotu";
  e.prediction = i == 0 ? "" : "Paris, café naïve \xe2\x9c\x93 #" + std::to_string(i);
  e.golds = i == 1 ? std::vector<std::string>{} : std::vector<std::string>{"Paris", "the city of Paris", "x"};
  e.f1 = 0.25 * i;
  e.em = i % 2;
  e.rouge_l = 0.1 + i;
  e.bleu = 0.01 * i;
  e.context_tokens = 1000 + i;
  e.attended_tokens = 100 + i;
  e.ttft_s = 0.5 + i;
  e.itl_s = 0.02;
  e.kv_budget_requested_bytes = 1 << 20;
  e.kv_budget_achieved_bytes = (1 << 20) - i;
  e.kv_resident_bytes = 12345 + i;
  e.kv_peak_prefill_bytes = 99999 + i;
  e.kv_read_per_step_bytes = 777 + i;
  e.kv_total_bytes = 888888 + i;
  e.meta = "{\"i\": " + std::to_string(i) + ", \"s\": \"a\\nb\"}";
  return e;
}

}  // namespace

BOOST_AUTO_TEST_CASE(results_round_trip_every_record) {
  Scratch s("rt");
  const std::string path = s / "run.h5";
  std::vector<TrainRecord> train;
  for (int i = 0; i < 700; ++i) {  // more than one chunk (512 rows)
    TrainRecord t;
    t.step = i;
    t.epoch = i / 100;
    t.loss_total = 10.0 / (i + 1);
    t.loss_task = 1 + i;
    t.loss_retrieval = 2 + i;
    t.loss_compression = 3 + i;
    t.loss_compute = 4 + i;
    t.selected_fraction = 0.5;
    t.lr = 1e-4 * i;
    t.grad_norm = std::sqrt(i);
    t.tokens_per_s = 1e5;
    t.step_time_s = 0.1;
    train.push_back(t);
  }
  std::vector<ExampleRecord> ex;
  for (int i = 0; i < 5; ++i) ex.push_back(example(i));
  EvalSummary sum{0.5, 0.25, 0.4, 0.1, 0.12, 5};
  EfficiencyRecord eff{1 << 30, 1 << 29, 3LL << 30, 1234.5, 4321.5, 0.25, 0.01, 0.125, 1e15};
  AdaptationRecord ad;
  ad.age_bin_edges = {0, 100, 1000, 10000, 100000};
  ad.retention_by_age = {1.0, 0.75, 0.5, NAN};
  ad.queries_per_bin = {10, 20, 30, 0};
  ad.retention_auc = 0.6;
  ad.temporal_consistency = 0.9;
  ad.adaptation_speed = 0.3;
  ad.n_queries = 60;
  {
    auto rf = make_file(path);
    rf.append_train(std::span<const TrainRecord>(train.data(), 300));
    for (std::size_t i = 300; i < train.size(); ++i) rf.append_train(train[i]);
    rf.append_val({10, 2.5});
    rf.append_val({20, 2.25});
    rf.append_examples("eval/full", std::span<const ExampleRecord>(ex.data(), 3));
    rf.append_example("eval/full", ex[3]);
    rf.append_example("ablation/no_dsr", ex[4]);
    rf.set_summary("eval/full", sum);
    rf.set_summary("ablation/no_dsr", EvalSummary{1, 1, 1, 1, 1, 1});
    rf.set_efficiency("efficiency/dsrsq", eff);
    rf.set_efficiency("ablation/no_dsr", EfficiencyRecord{1, 2, 3, 4, 4.5, 5, 6, 7, 8});
    rf.set_adaptation("dsrsq", ad);
    rf.append_rank({5, 0, 0.1, 0.01, 1000});
    rf.append_rank({5, 1, 0.2, 0.02, 2000});
    rf.set_status("eval/full", "done");
    rf.set_status("ablation/no_dsr", "failed", std::string(5000, 'x'));
    rf.set_status("train", "running", "step 699");
    rf.set_run_state("done", "2025-01-01T00:00:00Z");
    rf.close();
  }
  ResultsReader r(path);
  BOOST_TEST(r.format_name() == "dsrsq-results");
  BOOST_TEST(r.schema_version() == results::kSchemaVersion);
  const auto l = r.layout();
  // The run's order (root attr method_order), not HDF5's name order; backbones and protocol kept.
  BOOST_TEST(l.methods == (std::vector<std::string>{"full", "dsrsq"}), boost::test_tools::per_element());
  BOOST_TEST(l.backbones.at("full") == "standard checkpoint s.h5");
  BOOST_TEST(l.backbones.count("dsrsq") == 0u);
  BOOST_TEST(l.protocol == "query_aware");
  BOOST_TEST(l.ablation_variants == test_layout().ablation_variants);
  BOOST_TEST(l.world_size == 4);
  BOOST_TEST(l.retention_bins == 4);
  BOOST_TEST(r.root().attr_string("git_sha") == "abc123");
  BOOST_TEST(r.root().attr_int("slurm_restart_count") == 2);
  BOOST_TEST(r.root().attr_double("metric_version") == 1.5);
  BOOST_TEST(r.config_options().at("train.lr") == "3e-4");
  BOOST_TEST(r.config_text() == "[model]\nd_model = 256\n[train]\nlr = 3e-4\n");

  BOOST_TEST(r.rows("train") == 700u);
  BOOST_TEST((r.train() == train));
  BOOST_TEST((r.val() == std::vector<ValRecord>{{10, 2.5}, {20, 2.25}}));
  const auto got = r.examples("eval/full");
  BOOST_REQUIRE_EQUAL(got.size(), 4u);
  for (int i = 0; i < 4; ++i) BOOST_TEST((got[i] == ex[i]), "example " << i);
  BOOST_TEST(got[1].golds.empty());
  BOOST_TEST(got[0].golds.size() == 3u);
  BOOST_TEST((r.examples("ablation/no_dsr") == std::vector<ExampleRecord>{ex[4]}));
  BOOST_TEST(r.rows("eval/dsrsq") == 0u);
  BOOST_TEST((r.summary("eval/full") == sum));
  BOOST_TEST(r.summary("ablation/no_dsr").n_examples == 1);
  const auto unset = r.summary("eval/dsrsq");  // pre-created, never set
  BOOST_TEST(std::isnan(unset.f1_mean));
  BOOST_TEST(unset.n_examples == -1);
  BOOST_TEST((r.efficiency("efficiency/dsrsq") == eff));
  // The process-lifetime figure says so on every efficiency group.
  BOOST_TEST(r.root().group("efficiency/dsrsq").attr_string("process_peak_rss_bytes_scope").rfind("process lifetime", 0) == 0u);
  BOOST_TEST(r.root().group("ablation/no_dsr/efficiency").has_attr("process_peak_rss_bytes_scope"));
  BOOST_TEST(r.efficiency("ablation/no_dsr").flops == 8.0);
  BOOST_TEST(std::isnan(r.efficiency("efficiency/full").latency_s));
  const auto ad2 = r.adaptation("dsrsq");
  BOOST_TEST(ad2.age_bin_edges == ad.age_bin_edges, boost::test_tools::per_element());
  BOOST_TEST(ad2.retention_by_age[2] == 0.5);
  BOOST_TEST(std::isnan(ad2.retention_by_age[3]));
  BOOST_TEST(ad2.queries_per_bin == ad.queries_per_bin, boost::test_tools::per_element());
  BOOST_TEST(ad2.n_queries == 60);
  BOOST_TEST(ad2.temporal_consistency == 0.9);
  BOOST_TEST((r.ranks() == std::vector<RankRecord>{{5, 0, 0.1, 0.01, 1000}, {5, 1, 0.2, 0.02, 2000}}));
  BOOST_TEST(r.status("eval/full").state == "done");
  BOOST_TEST(r.status("eval/dsrsq").state == "pending");
  const auto failed = r.status("ablation/no_dsr");
  BOOST_TEST(failed.state == "failed");
  BOOST_TEST(failed.message.size() == kMessageChars);
  BOOST_TEST(failed.message.ends_with(kTruncatedMark));
  BOOST_TEST(r.status("train").message == "step 699");
  BOOST_TEST(r.run_state().state == "done");
  BOOST_TEST(r.run_state().message == "2025-01-01T00:00:00Z");
}

BOOST_AUTO_TEST_CASE(results_names_outside_layout_are_errors) {
  Scratch s("names");
  auto rf = make_file(s / "run.h5");
  expect_error([&] { rf.append_example("eval/nope", example(0)); }, {"eval/nope", "full", "dsrsq"});
  expect_error([&] { rf.append_example("efficiency/full", example(0)); }, {"efficiency/full"});
  expect_error([&] { rf.set_summary("eval/nope", {}); }, {"eval/nope"});
  expect_error([&] { rf.set_efficiency("efficiency/nope", {}); }, {"efficiency/nope"});
  expect_error([&] { rf.set_efficiency("eval/full", {}); }, {"eval/full"});
  expect_error([&] { rf.set_adaptation("full", {}); }, {"full"});
  AdaptationRecord bad;
  bad.age_bin_edges = {0, 1};
  bad.retention_by_age = {1};
  bad.queries_per_bin = {1};
  expect_error([&] { rf.set_adaptation("dsrsq", bad); }, {"dsrsq", "5 age_bin_edges"});
  expect_error([&] { rf.set_status("ablation/full", "done"); }, {"ablation/full"});
  expect_error([&] { rf.set_status("eval/full", "finished"); }, {"finished"});
  expect_error([&] { rf.set_run_state("pending"); }, {"pending"});
  ExampleRecord e = example(2);
  e.golds = {"a\x1f" "b"};
  expect_error([&] { rf.append_example("eval/full", e); }, {"separator"});
  rf.close();
  // The failed calls wrote nothing.
  ResultsReader r(s / "run.h5");
  BOOST_TEST(r.rows("eval/full") == 0u);

  RunLayout dup = test_layout();
  dup.methods = {"a", "a"};
  expect_error([&] { ResultsFile::create(s / "dup.h5", dup, {}, {}); }, {"duplicate", "'a'"});
  RunLayout slash = test_layout();
  slash.ablation_variants = {"x/y"};
  expect_error([&] { ResultsFile::create(s / "slash.h5", slash, {}, {}); }, {"x/y"});
  BOOST_TEST(!fs::exists(s / "dup.h5"));
  expect_error([&] { make_file(s / "run.h5"); }, {"run.h5"});  // exists: never clobbered
  // A foreign HDF5 file is not a results file.
  { h5::File f(s / "foreign.h5", h5::File::Mode::create_exclusive); }
  expect_error([&] { ResultsReader r2(s / "foreign.h5"); }, {"foreign.h5", "not a dsrsq results file"});
}

BOOST_AUTO_TEST_CASE(results_resume_drops_redone_rows) {
  Scratch s("resume");
  const std::string path = s / "run.h5";
  {
    auto rf = make_file(path);
    for (int i = 0; i < 10; ++i) rf.append_train(TrainRecord{.step = i, .loss_total = double(i)});
    rf.append_val({4, 1.0});
    rf.append_val({8, 2.0});
    rf.append_example("eval/full", example(2));
    rf.set_status("eval/full", "done");
    rf.append_example("eval/dsrsq", example(5));  // dsrsq never finished: redone after resume
    // no close: the destructor closes
  }
  {
    auto rf = ResultsFile::resume(path, 5);  // checkpoint at step 5: steps 6..9 are redone
    BOOST_TEST(rf.layout().methods.size() == 2u);
    for (int i = 6; i < 12; ++i) rf.append_train(TrainRecord{.step = i, .loss_total = 100.0 + i});
    rf.append_example("eval/full", example(3));
    rf.close();
  }
  ResultsReader r(path);
  const auto t = r.train();
  BOOST_REQUIRE_EQUAL(t.size(), 12u);
  for (int i = 0; i < 12; ++i) {
    BOOST_TEST(t[i].step == i);
    BOOST_TEST(t[i].loss_total == (i <= 5 ? double(i) : 100.0 + i));
  }
  BOOST_TEST((r.val() == std::vector<ValRecord>{{4, 1.0}}));
  const auto ex = r.examples("eval/full");  // a finished method keeps its rows
  BOOST_REQUIRE_EQUAL(ex.size(), 2u);
  BOOST_TEST((ex[0] == example(2)));
  BOOST_TEST((ex[1] == example(3)));
  BOOST_TEST(r.examples("eval/dsrsq").empty());  // an unfinished one's rows are dropped
  BOOST_TEST(r.run_state().state == "running");
}

// ---- run identity ----------------------------------------------------------

BOOST_AUTO_TEST_CASE(config_hash_is_stable) {
  BOOST_TEST(io::config_hash("") == "cbf29ce484222325");  // FNV-1a 64 offset basis
  BOOST_TEST(io::config_hash("a") == "af63dc4c8601ec8c");  // published FNV-1a test vector
  BOOST_TEST(io::config_hash("lr=1") != io::config_hash("lr=2"));
}

BOOST_AUTO_TEST_CASE(run_directory_decisions) {
  Scratch s("rundir");
  const std::string out = s.dir.string();
  const std::string text_a = "lr = 1\n", text_b = "lr = 2\n";
  const std::string ha = io::config_hash(text_a), hb = io::config_hash(text_b);

  auto d = io::RunDirectory::prepare(out, "r1", ha, text_a, false);
  BOOST_TEST(io::to_string(d.action) == "fresh");
  BOOST_TEST(d.path == s / "r1");
  BOOST_TEST(io::RunDirectory::stored_hash(d.path) == ha);
  std::ofstream(s / "r1/run.h5") << "progress";
  // One writer per directory: while d holds the lock, another prepare is
  // refused naming the holder (this process: flock conflicts across open files).
  BOOST_TEST(d.lock);
  expect_error([&] { io::RunDirectory::prepare(out, "r1", ha, text_a, false); },
               {d.path, "in use", "pid " + std::to_string(::getpid()), "host "});
  d.lock.reset();  // released: the next prepare takes it

  d = io::RunDirectory::prepare(out, "r1", ha, text_a, false);
  BOOST_TEST(io::to_string(d.action) == "resume");
  d.lock.reset();
  d = io::RunDirectory::prepare(out, "r1", ha, text_a, true);  // --overwrite never discards a matching run
  BOOST_TEST(io::to_string(d.action) == "resume");
  d.lock.reset();

  expect_error([&] { io::RunDirectory::prepare(out, "r1", hb, text_b, false); },
               {d.path, "--overwrite", "--output_dir", ha, hb});
  BOOST_TEST(fs::exists(s / "r1/run.h5"));

  auto p = io::RunDirectory::prepare(out, "r1", hb, text_b, true);
  BOOST_TEST(io::to_string(p.action) == "overwrite_pending");
  BOOST_TEST(p.old_hash == ha);
  // Nothing touched until commit.
  BOOST_TEST(fs::exists(s / "r1/run.h5"));
  BOOST_TEST(io::RunDirectory::stored_hash(p.path) == ha);
  const std::string aside = io::RunDirectory::commit_overwrite(p);
  BOOST_TEST(io::to_string(p.action) == "fresh");
  BOOST_TEST(fs::exists(fs::path(aside) / "run.h5"));
  BOOST_TEST(!fs::exists(s / "r1/run.h5"));
  BOOST_TEST(io::RunDirectory::stored_hash(p.path) == hb);
  std::ifstream in(s / "r1/config.ini");
  std::string text((std::istreambuf_iterator<char>(in)), {});
  BOOST_TEST(text == text_b);
  expect_error([&] { io::RunDirectory::commit_overwrite(p); }, {"not overwrite_pending"});

  io::RunDirectory::mark_finished(p.path);
  // A finished run is skipped without taking the lock (nothing is written).
  d = io::RunDirectory::prepare(out, "r1", hb, text_b, false);
  BOOST_TEST(io::to_string(d.action) == "finished_skip");
  BOOST_TEST(!d.lock);
  p.lock.reset();
  BOOST_TEST(d.message.find("finished") != std::string::npos);

  // An empty existing directory is fresh; one with unknown files is refused.
  fs::create_directories(s / "r2");
  BOOST_TEST(io::to_string(io::RunDirectory::prepare(out, "r2", ha, text_a, false).action) == "fresh");
  fs::create_directories(s / "r3");
  std::ofstream(s / "r3/notes.txt") << "mine";
  expect_error([&] { io::RunDirectory::prepare(out, "r3", ha, text_a, false); }, {"r3", "no config.hash"});
  expect_error([&] { io::RunDirectory::prepare(out, "a/b", ha, text_a, false); }, {"a/b"});
}

// ---- checkpoints -----------------------------------------------------------

namespace {
io::CheckpointState make_state(std::size_t n) {
  io::CheckpointState s;
  s.config_hash = "0123456789abcdef";
  s.model_config = {{"d_model", "64"}, {"n_layers", "2"}};
  s.step = 1234;
  s.epoch = 3;
  s.data_cursor = {7, 8, -1};
  s.rng_states = {0xdeadbeefcafef00dull, ~0ull, 0};
  s.adam_steps = 1234;
  for (std::size_t i = 0; i < n; ++i) {
    s.params.push_back(std::sin(float(i)) * 1e-3f);
    s.adam_m.push_back(float(i) * 1e-7f);
    s.adam_v.push_back(std::nextafter(float(i), 1e30f));
  }
  s.params[0] = -0.0f;
  s.params[1] = std::numeric_limits<float>::denorm_min();
  s.params[2] = std::numeric_limits<float>::infinity();
  s.extra["dsr_baseline"] = {1.5f, 2.5f};
  s.extra["empty"] = {};
  return s;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
}  // namespace

BOOST_AUTO_TEST_CASE(checkpoint_round_trip_bitwise) {
  Scratch s("ckpt");
  const auto st = make_state(3'000'000);  // > 2 checksummed chunks
  const std::string path = io::checkpoint_path(s.dir.string(), st.step);
  BOOST_TEST(fs::path(path).filename() == "ckpt_1234.h5");
  io::save_checkpoint(path, st);
  BOOST_TEST(!fs::exists(path + ".tmp"));
  const auto ld = io::load_checkpoint(path);
  BOOST_TEST(ld.format == "dsrsq-checkpoint");
  BOOST_TEST(ld.format_version == 1);
  BOOST_TEST(ld.config_hash == st.config_hash);
  BOOST_TEST((ld.model_config == st.model_config));
  BOOST_TEST(ld.step == 1234);
  BOOST_TEST(ld.epoch == 3);
  BOOST_TEST(ld.adam_steps == 1234);
  BOOST_TEST(ld.data_cursor == st.data_cursor, boost::test_tools::per_element());
  BOOST_TEST(ld.rng_states == st.rng_states, boost::test_tools::per_element());
  BOOST_TEST(same_bits(ld.params, st.params));
  BOOST_TEST(same_bits(ld.adam_m, st.adam_m));
  BOOST_TEST(same_bits(ld.adam_v, st.adam_v));
  BOOST_TEST(std::signbit(ld.params[0]));
  BOOST_REQUIRE_EQUAL(ld.extra.size(), 2u);
  BOOST_TEST(same_bits(ld.extra.at("dsr_baseline"), st.extra.at("dsr_baseline")));
  BOOST_TEST(ld.extra.at("empty").empty());

  // Overwriting the same step replaces the file atomically.
  auto st2 = make_state(10);
  st2.adam_m.clear();
  st2.adam_v.clear();
  io::save_checkpoint(path, st2);
  const auto ld2 = io::load_checkpoint(path);
  BOOST_TEST(same_bits(ld2.params, st2.params));
  BOOST_TEST(ld2.adam_m.empty());

  auto badsz = make_state(10);
  badsz.adam_v.pop_back();
  expect_error([&] { io::save_checkpoint(s / "x.h5", badsz); }, {"x.h5", "adam_v"});
  BOOST_TEST(!fs::exists(s / "x.h5"));
}

BOOST_AUTO_TEST_CASE(damaged_checkpoints_give_one_clear_error) {
  Scratch s("ckptbad");
  const std::string good = s / "ckpt_10.h5";
  io::save_checkpoint(good, make_state(200'000));
  const auto size = fs::file_size(good);

  // Truncated to half.
  fs::copy_file(good, s / "half.h5");
  fs::resize_file(s / "half.h5", size / 2);
  expect_error([&] { io::load_checkpoint(s / "half.h5"); }, {"half.h5", "cannot load checkpoint"});
  // Truncated to the superblock only.
  fs::copy_file(good, s / "tiny.h5");
  fs::resize_file(s / "tiny.h5", 64);
  expect_error([&] { io::load_checkpoint(s / "tiny.h5"); }, {"tiny.h5", "cannot load checkpoint"});
  // A flipped byte inside the parameter data: the Fletcher-32 checksum catches it.
  {
    fs::copy_file(good, s / "flip.h5");
    std::fstream f(s / "flip.h5", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(size / 2));
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(size / 2));
    f.write(&c, 1);
  }
  expect_error([&] { io::load_checkpoint(s / "flip.h5"); }, {"flip.h5", "cannot load checkpoint"});
  // A valid HDF5 file without our layout.
  {
    h5::File f(s / "foreign.h5", h5::File::Mode::create_exclusive);
    f.root().write<float>("weights", {1, 2, 3});
  }
  expect_error([&] { io::load_checkpoint(s / "foreign.h5"); }, {"foreign.h5", "no 'format' attribute"});
  // Our format attribute but a missing group.
  {
    h5::File f(s / "partial.h5", h5::File::Mode::create_exclusive);
    f.root().set_attr("format", std::string("dsrsq-checkpoint"));
    f.root().set_attr("format_version", std::int64_t{1});
    f.root().create_group("model_config");
  }
  expect_error([&] { io::load_checkpoint(s / "partial.h5"); }, {"partial.h5", "missing group '/buffers'"});
  // A results file is HDF5 but the wrong format.
  make_file(s / "results.h5").close();
  expect_error([&] { io::load_checkpoint(s / "results.h5"); }, {"results.h5", "wrong format 'dsrsq-results'"});
  // Wrong sizes.
  {
    fs::copy_file(good, s / "sizes.h5");
    h5::File f(s / "sizes.h5", h5::File::Mode::read_write);
    f.root().set_attr("n_params", std::int64_t{7});
  }
  expect_error([&] { io::load_checkpoint(s / "sizes.h5"); }, {"sizes.h5", "wrong sizes"});
  // Not HDF5 at all; missing.
  std::ofstream(s / "text.h5") << "step = 10\nthis is not a checkpoint\n";
  expect_error([&] { io::load_checkpoint(s / "text.h5"); }, {"text.h5", "not an HDF5 file"});
  expect_error([&] { io::load_checkpoint(s / "missing.h5"); }, {"missing.h5", "no such file"});
  // The good one still loads.
  BOOST_TEST(io::load_checkpoint(good).params.size() == 200'000u);
}

BOOST_AUTO_TEST_CASE(prune_keeps_latest_and_milestones) {
  Scratch s("prune");
  const std::string dir = s.dir.string();
  for (int step : {100, 200, 300, 400, 500, 600, 700, 1000, 1100, 1200})
    std::ofstream(io::checkpoint_path(dir, step)) << "x";
  for (const char* other : {"ckpt_50.h5.tmp", "ckpt_x.h5", "notes.txt", "ckpt_.h5", "ckpt_20.h5.bak"})
    std::ofstream(s / other) << "keep";
  BOOST_TEST(io::list_checkpoints(dir).size() == 10u);
  BOOST_TEST(*io::latest_checkpoint(dir) == io::checkpoint_path(dir, 1200));  // numeric, not lexical
  const auto removed = io::prune_checkpoints(dir, 3, 500);
  BOOST_TEST(removed.size() == 6u);  // 100..400, 600, 700
  std::set<std::int64_t> left;
  for (const auto& [step, p] : io::list_checkpoints(dir)) left.insert(step);
  // Last three (1000, 1100, 1200) plus the milestones 500 and 1000.
  BOOST_TEST((left == std::set<std::int64_t>{500, 1000, 1100, 1200}));
  for (const char* other : {"ckpt_50.h5.tmp", "ckpt_x.h5", "notes.txt", "ckpt_.h5", "ckpt_20.h5.bak"})
    BOOST_TEST(fs::exists(s / other), other);
  // No milestones: only the last 2 stay.
  io::prune_checkpoints(dir, 2, 0);
  BOOST_TEST(io::list_checkpoints(dir).size() == 2u);
  expect_error([&] { io::prune_checkpoints(dir, 0, 0); }, {"keep_last"});
  BOOST_TEST(!io::latest_checkpoint((s.dir / "none").string()).has_value());
}
