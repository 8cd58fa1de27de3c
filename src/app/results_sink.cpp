#include "app/results_sink.hpp"

#include <cblas.h>
#include <hdf5.h>
#include <mpi.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <set>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "dsrsq/build_info.hpp"
#include "io/checkpoint.hpp"
#include "io/results.hpp"
#include "io/run_dir.hpp"
#include "eval/adaptation.hpp"

extern char** environ;

namespace fs = std::filesystem;

namespace dsrsq {
namespace {

volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

results::Provenance provenance(const Options& opt, const ModelConfig& mc, const Tokenizer& tok,
                               const std::string& dataset_hash) {
  results::Provenance p;
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  char mpi[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(mpi, &len);
  std::string mpis(mpi, static_cast<std::size_t>(len));
  if (auto nl = mpis.find('\n'); nl != std::string::npos) mpis.resize(nl);
  unsigned maj = 0, min = 0, rel = 0;
  H5get_libversion(&maj, &min, &rel);
  p.strings = {{"git_sha", build::git_sha},
               {"dsrsq_version", build::version},
               {"build_type", build::build_type},
               {"command_line", opt.command_line},
               {"hostname", host},
               {"start_time", utc_now()},
               {"backend", "cpu"},
               {"device", opt.device},
               {"mpi_version", mpis},
               {"hdf5_version", std::to_string(maj) + "." + std::to_string(min) + "." + std::to_string(rel)},
               {"blas", std::string(build::blas) + ": " + openblas_get_config()},
               {"cuda", build::cuda ? "built" : "not built"},
               {"nccl", build::nccl ? "built" : "not built"},
               {"compiler", build::cxx_compiler},
               {"tokenizer", tok.name()},
               {"tokenizer_hash", tok.hash()},
               {"dataset", opt.dataset},
               {"dataset_hash", dataset_hash},
               {"metric_version", "squad-v1.1-f1-em; rouge-l-lcs-f1; nltk-corpus-bleu-4; v1"},
               {"truncation_rule", kTruncationRule},
               {"model_config", mc.str()},
               {"config_hash", opt.identity_hash()}};
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    for (const char* prefix : {"OMP_", "OPENBLAS_", "NCCL_", "SLURM_", "OMPI_COMM_WORLD_SIZE", "CUDA_VISIBLE"})
      if (kv.rfind(prefix, 0) == 0) {
        const auto eq = kv.find('=');
        p.strings.emplace_back("env." + kv.substr(0, eq), kv.substr(eq + 1));
      }
  }
  const char* job = std::getenv("SLURM_JOB_ID");
  const char* task = std::getenv("SLURM_ARRAY_TASK_ID");
  const char* restarts = std::getenv("SLURM_RESTART_COUNT");
  p.strings.emplace_back("slurm_job_id", job ? job : "");
  p.strings.emplace_back("slurm_array_task_id", task ? task : "");
  p.integers = {{"seed", static_cast<std::int64_t>(opt.seed)},
                {"slurm_restart_count", restarts ? std::atoll(restarts) : 0},
                {"n_parameters", mc.num_parameters()}};
  return p;
}

std::string meta_json(const std::map<std::string, std::string>& meta) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [k, v] : meta) j[k] = v;
  return j.dump();
}

}  // namespace

struct ResultsSink::Impl {
  const Options& opt;
  const ModelConfig& mc;
  const Tokenizer& tok;
  int rank;
  io::RunDecision decision;
  std::string run_path, h5_path;
  std::unique_ptr<results::ResultsFile> file;
  bool skip = false;
  std::int64_t resume_step = 0;
  std::optional<io::CheckpointState> pending;  // loaded by open(), applied by restore()
  std::vector<results::TrainRecord> train_buf;
  std::set<std::string> done_before;  // methods finished by an earlier attempt of this run
  bool training = false;              // /status/train is "running"

  Impl(const Options& o, const ModelConfig& m, const Tokenizer& t, int r) : opt(o), mc(m), tok(t), rank(r) {}
};

ResultsSink::ResultsSink(const Options& opt, const ModelConfig& mc, const Tokenizer& tok, int rank)
    : impl_(std::make_unique<Impl>(opt, mc, tok, rank)) {
  Impl& I = *impl_;
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGUSR1, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
  if (rank != 0) return;  // rank 0 alone owns the run directory and the results file
  I.decision = io::RunDirectory::prepare(opt.output_dir, opt.run_name, opt.identity_hash(), opt.resolved_text(),
                                         opt.overwrite);
  I.run_path = I.decision.path;
  I.h5_path = (fs::path(I.run_path) / "run.h5").string();
  std::printf("dsrsq: run directory %s: %s\n", I.run_path.c_str(), I.decision.message.c_str());
  if (I.decision.action == io::RunAction::finished_skip) {
    I.skip = true;
    return;
  }
  if (I.decision.action == io::RunAction::overwrite_pending) {
    const std::string old = io::RunDirectory::commit_overwrite(I.decision);
    std::printf("dsrsq: the previous run was moved aside to %s\n", old.c_str());
  }
}

ResultsSink::~ResultsSink() = default;

bool ResultsSink::skip() const { return impl_->skip; }
const std::string& ResultsSink::path() const { return impl_->h5_path; }

void ResultsSink::open(const std::string& dataset_hash, const std::map<std::string, std::string>& backbones,
                       const std::vector<results::Cell>& cells) {
  if (impl_->rank != 0) return;
  Impl& I = *impl_;
  bool resuming = I.decision.action == io::RunAction::resume && fs::exists(I.h5_path);
  if (resuming) {
    // A results file that does not open (a write failed half-way: disk full)
    // cannot be continued: it is moved aside and the run starts over, since
    // its training rows are lost.
    std::string why;
    try {
      const results::ResultsReader prior(I.h5_path, /*swmr=*/true);
      (void)prior.layout();
    } catch (const Error& e) {
      why = e.what();
    }
    if (!why.empty()) {
      const std::string aside = I.h5_path + ".corrupt";
      std::error_code ec;
      fs::rename(I.h5_path, aside, ec);
      DSRSQ_INPUT_CHECK(!ec, "cannot move the unreadable results file '", I.h5_path, "' aside: ", ec.message());
      std::fprintf(stderr, "dsrsq: warning: the results file %s does not open (%s); it was renamed to %s and the run "
                   "starts over from step 0\n", I.h5_path.c_str(), why.c_str(), aside.c_str());
      resuming = false;
    }
  }
  if (resuming) {
    {
      // The identity must agree three ways: this config, the directory's
      // config.hash (prepare checked it) and the results file's own record.
      const results::ResultsReader prior(I.h5_path, /*swmr=*/true);
      const std::string ours = impl_->opt.identity_hash();
      const std::string theirs = prior.root().has_attr("config_hash") ? prior.root().attr_string("config_hash") : "";
      DSRSQ_INPUT_CHECK(theirs == ours, "run directory '", I.run_path, "': its ", io::kConfigHashFile, " says ", ours,
                        " but its run.h5 was written by config hash ", theirs.empty() ? "(none)" : theirs,
                        "; refusing to resume into a foreign results file (move run.h5 or the whole directory away)");
      // A killed evaluation leaves finished methods with their rows: remember them.
      for (const auto& m : prior.layout().methods)
        if (prior.status("eval/" + m).state == "done") I.done_before.insert("eval/" + m);
      for (const auto& v : prior.layout().ablation_variants)
        if (prior.status("ablation/" + v).state == "done") I.done_before.insert("ablation/" + v);
    }
    // The newest checkpoint that loads; a damaged one (a crash or a full disk
    // while an older build wrote it, a truncated copy) is renamed aside with a
    // warning and the one before it is used.
    std::vector<std::string> skipped;
    const auto all = io::list_checkpoints(I.run_path);
    for (auto it = all.rbegin(); it != all.rend() && !I.pending; ++it) {
      try {
        I.pending = io::load_checkpoint(it->second);
      } catch (const Error& e) {
        const std::string aside = it->second + ".corrupt";
        std::error_code ec;
        fs::rename(it->second, aside, ec);
        std::fprintf(stderr, "dsrsq: warning: skipping checkpoint %s: %s; %s\n", it->second.c_str(), e.what(),
                     ec ? ("could not rename it aside: " + ec.message()).c_str()
                        : ("renamed it to " + aside).c_str());
        skipped.push_back(it->second);
        continue;
      }
      DSRSQ_INPUT_CHECK(I.pending->config_hash == impl_->opt.identity_hash(), "checkpoint '", it->second,
                        "' belongs to another configuration (hash ", I.pending->config_hash, ")");
      I.resume_step = I.pending->step;
      if (!skipped.empty())
        std::fprintf(stderr, "dsrsq: warning: resuming from the newest good checkpoint %s (step %lld)\n",
                     it->second.c_str(), static_cast<long long>(I.resume_step));
    }
    if (!I.pending && !skipped.empty())
      std::fprintf(stderr, "dsrsq: warning: no readable checkpoint left in %s: training restarts from step 0\n",
                   I.run_path.c_str());
    results::RunLayout now;
    now.dp = I.opt.dp;
    now.sp = I.opt.sp;
    now.world_size = I.opt.dp * I.opt.sp;
    results::Provenance attempt;  // what a requeued Slurm job changes
    const char* job = std::getenv("SLURM_JOB_ID");
    const char* restarts = std::getenv("SLURM_RESTART_COUNT");
    attempt.strings.emplace_back("slurm_job_id", job ? job : "");
    attempt.integers.emplace_back("slurm_restart_count", restarts ? std::atoll(restarts) : 0);
    I.file = std::make_unique<results::ResultsFile>(results::ResultsFile::resume(I.h5_path, I.resume_step, &now, &attempt));
    std::printf("dsrsq: resuming %s from step %lld\n", I.h5_path.c_str(), static_cast<long long>(I.resume_step));
  } else {
    results::RunLayout layout;
    layout.methods = I.opt.methods;
    layout.backbones = backbones;
    layout.protocol = I.opt.protocol;
    layout.cells = cells;
    if (I.opt.ablation) layout.ablation_variants = I.opt.ablation_variants;
    if (I.opt.dataset == "fact_stream") layout.adaptation_methods = I.opt.methods;
    layout.world_size = I.opt.dp * I.opt.sp;
    layout.dp = I.opt.dp;
    layout.sp = I.opt.sp;
    results::ConfigRecord cfg;
    cfg.resolved_text = I.opt.resolved_text();
    std::istringstream in(cfg.resolved_text);
    std::string line;
    while (std::getline(in, line)) {
      const auto eq = line.find(" = ");
      if (eq != std::string::npos) cfg.options.emplace_back(line.substr(0, eq), line.substr(eq + 3));
    }
    if (fs::exists(I.h5_path)) fs::remove(I.h5_path);  // a fresh run directory: a stale file from a crash before any checkpoint
    I.file = std::make_unique<results::ResultsFile>(
        results::ResultsFile::create(I.h5_path, layout, provenance(I.opt, I.mc, I.tok, dataset_hash), cfg));
  }
  I.file->set_run_state("running");
  I.file->set_status("train", I.opt.command == "eval" ? "done" : "running");
  I.training = I.opt.command != "eval";
}

std::int64_t ResultsSink::restore(TrainableModel& model, AdamW& opt, std::map<std::string, std::vector<float>>* extra) {
  if (impl_->rank != 0) return 0;
  Impl& I = *impl_;
  if (!I.pending) return 0;
  const io::CheckpointState& ck = *I.pending;
  DSRSQ_INPUT_CHECK(static_cast<std::int64_t>(ck.params.size()) == model.flat_params().numel(),
                    "checkpoint holds ", ck.params.size(), " parameters, the model has ", model.flat_params().numel());
  from_host<float>(model.backend(), ck.params, model.flat_params());
  if (!ck.adam_m.empty()) {
    from_host<float>(opt.backend(), ck.adam_m, opt.m());
    from_host<float>(opt.backend(), ck.adam_v, opt.v());
  }
  opt.set_steps(ck.adam_steps);
  if (extra) *extra = ck.extra;
  I.pending.reset();
  return I.resume_step;
}

void ResultsSink::train_step(const StepStats& s) {
  if (impl_->rank != 0) return;
  Impl& I = *impl_;
  results::TrainRecord r;
  r.step = s.step + 1;
  r.epoch = s.epoch;
  r.loss_total = s.loss;
  r.loss_task = s.task_loss;
  r.loss_retrieval = s.loss_retrieval;
  r.loss_compression = s.loss_compression;
  r.loss_compute = s.loss_compute;
  r.selected_fraction = s.selected_fraction;
  r.lr = s.lr;
  r.grad_norm = s.grad_norm;
  r.tokens_per_s = s.tokens_per_s;
  r.step_time_s = s.step_time_s;
  I.train_buf.push_back(r);
  // Batch the appends: one flush per 10 steps keeps the overhead negligible.
  if (I.train_buf.size() >= 10) {
    I.file->append_train(I.train_buf);
    I.train_buf.clear();
  }
}

void ResultsSink::val(std::int64_t step, double loss) {
  if (impl_->rank != 0) return;
  Impl& I = *impl_;
  if (!I.train_buf.empty()) {
    I.file->append_train(I.train_buf);
    I.train_buf.clear();
  }
  I.file->append_val(results::ValRecord{step, loss});
}

void ResultsSink::checkpoint(std::int64_t step, TrainableModel& model, AdamW& opt,
                             const std::map<std::string, std::vector<float>>& extra) {
  if (impl_->rank != 0) return;
  Impl& I = *impl_;
  if (!I.train_buf.empty()) {
    I.file->append_train(I.train_buf);
    I.train_buf.clear();
  }
  io::CheckpointState ck;
  ck.config_hash = I.opt.identity_hash();
  ck.model_config = {{"model", model.config_str()}};
  ck.step = step;
  ck.data_cursor = {step};
  ck.params = to_host<float>(model.backend(), model.flat_params());
  ck.adam_m = to_host<float>(opt.backend(), opt.m());
  ck.adam_v = to_host<float>(opt.backend(), opt.v());
  ck.adam_steps = opt.steps();
  ck.extra = extra;
  const std::string path = io::checkpoint_path(I.run_path, step);
  io::save_checkpoint(path, ck);
  // Rolling retention: the newest keep_checkpoints, plus every milestone.
  io::prune_checkpoints(I.run_path, static_cast<int>(std::max<std::int64_t>(1, I.opt.keep_checkpoints)),
                        I.opt.milestone_every);
  I.file->flush();
}

bool ResultsSink::should_stop() { return g_stop_signal != 0; }

void ResultsSink::rank_step(std::int64_t step, const std::vector<double>& per_rank) {
  if (impl_->rank != 0) return;
  std::vector<results::RankRecord> rows;
  for (std::size_t r = 0; r + 2 < per_rank.size(); r += 3)
    rows.push_back(results::RankRecord{step, static_cast<std::int64_t>(r / 3), per_rank[r], per_rank[r + 1],
                                       static_cast<std::int64_t>(per_rank[r + 2])});
  impl_->file->append_ranks(rows);
}

void ResultsSink::interrupted(std::int64_t step) {
  if (impl_->rank != 0) return;
  Impl& I = *impl_;
  const std::string why = g_stop_signal ? "signal " + std::to_string(static_cast<int>(g_stop_signal))
                                         : "--stop_after " + std::to_string(I.opt.stop_after);
  I.file->set_status("train", "interrupted", why + " at step " + std::to_string(step) + "; rerun to resume");
  I.file->set_run_state("interrupted", utc_now());
}

void ResultsSink::interrupted_eval() {
  if (impl_->rank != 0) return;
  impl_->file->set_run_state("interrupted", utc_now());
  impl_->file->flush();
}

bool ResultsSink::method_done_before(const std::string& method, const std::string& kind) const {
  return impl_->done_before.count(kind + "/" + method) > 0;
}

void ResultsSink::method_started(const std::string& method, const std::string& kind) {
  if (impl_->rank != 0) return;
  Impl& I = *impl_;
  if (I.opt.command != "eval") I.file->set_status("train", "done");
  I.training = false;
  I.file->set_status(kind + "/" + method, "running");
}

namespace {

std::vector<results::ExampleRecord> example_rows(const MethodEval& r, std::int64_t cell) {
  std::vector<results::ExampleRecord> rows;
  rows.reserve(r.examples.size());
  for (const auto& e : r.examples) {
    results::ExampleRecord x;
    x.id = e.id;
    x.task = e.task;
    x.prediction = e.prediction;
    x.golds = e.golds;
    x.f1 = e.f1;
    x.em = e.em;
    x.rouge_l = e.rouge_l;
    x.bleu = e.bleu;
    x.context_tokens = e.context_tokens;
    x.attended_tokens = static_cast<std::int64_t>(std::llround(e.attended_tokens));
    x.ttft_s = e.ttft_s;
    x.itl_s = e.itl_s;
    x.kv_budget_requested_bytes = static_cast<std::int64_t>(e.budget_requested);
    x.kv_budget_achieved_bytes = static_cast<std::int64_t>(e.budget_achieved);
    x.kv_resident_bytes = static_cast<std::int64_t>(e.kv.resident_after_prefill);
    x.kv_peak_prefill_bytes = static_cast<std::int64_t>(e.kv.peak_prefill);
    x.kv_read_per_step_bytes = static_cast<std::int64_t>(e.kv.read_per_step);
    x.kv_total_bytes = static_cast<std::int64_t>(e.kv.total);
    x.meta = meta_json(e.meta);
    x.cell = cell;
    rows.push_back(std::move(x));
  }
  return rows;
}

results::EvalSummary summary_of(const MethodEval& r) {
  results::EvalSummary s;
  s.f1_mean = r.f1;
  s.em_mean = r.em;
  s.rouge_l_mean = r.rouge_l;
  double bleu_mean = 0;
  for (const auto& e : r.examples) bleu_mean += e.bleu;
  s.bleu_mean = r.examples.empty() ? 0.0 : bleu_mean / static_cast<double>(r.examples.size());
  s.corpus_bleu = r.bleu;
  s.n_examples = static_cast<std::int64_t>(r.examples.size());
  return s;
}

results::EfficiencyRecord efficiency_of(const MethodEval& r) {
  results::EfficiencyRecord eff;
  eff.peak_mem_bytes = static_cast<std::int64_t>(r.peak_mem_bytes);
  eff.avg_mem_bytes = static_cast<std::int64_t>(r.avg_mem_bytes);
  eff.process_peak_rss_bytes = static_cast<std::int64_t>(r.process_peak_rss_bytes);  // scope: process lifetime
  eff.throughput_tok_s = r.throughput_tok_s;            // tokens run through the model / serve time
  eff.context_tokens_per_s = r.context_tokens_per_s;    // full prompt tokens / serve time
  eff.latency_s = r.latency_s;
  eff.itl_s = r.itl_s;
  eff.token_efficiency = r.token_efficiency;
  eff.flops = r.flops;
  eff.tokens_run = r.tokens_run;
  eff.context_tokens_served = r.context_tokens_served;
  eff.serve_s = r.serve_s;
  std::int64_t decode = 0;  // token_efficiency's examples (score_and_aggregate: those with full_keys > 0)
  for (const auto& e : r.examples) decode += e.full_keys > 0 ? 1 : 0;
  eff.decode_examples = decode;
  return eff;
}

}  // namespace

void ResultsSink::cell_started(const std::string& method, const std::string& kind, std::size_t cell) {
  if (impl_->rank != 0 || kind != "eval") return;
  impl_->file->set_cell_status(method, cell, "running");
}

void ResultsSink::cell_done(const MethodEval& r, const std::string& kind, std::size_t cell) {
  if (impl_->rank != 0) return;
  Impl& I = *impl_;
  const auto rows = example_rows(r, static_cast<std::int64_t>(cell));
  I.file->append_examples(kind + "/" + r.method, rows);
  if (kind == "eval") I.file->set_cell_result(r.method, cell, summary_of(r), efficiency_of(r));
}

void ResultsSink::cell_failed(const std::string& method, const std::string& kind, std::size_t cell,
                              const std::string& message) {
  if (impl_->rank != 0 || kind != "eval") return;
  impl_->file->set_cell_status(method, cell, "failed", message);
}

void ResultsSink::method_done(const MethodEval& r, const std::string& kind) {
  if (impl_->rank != 0) return;
  Impl& I = *impl_;
  const std::string g = kind + "/" + r.method;
  I.file->set_summary(g, summary_of(r));
  I.file->set_efficiency(kind == "eval" ? "efficiency/" + r.method : g, efficiency_of(r));
  if (I.opt.dataset == "fact_stream" && kind == "eval") {
    const AdaptationMetrics a = adaptation_metrics(r, 8);
    results::AdaptationRecord ar;
    ar.age_bin_edges = a.age_bin_edges;
    ar.retention_by_age = a.retention_by_age;
    ar.queries_per_bin = a.queries_per_bin;
    ar.retention_auc = a.retention_auc;
    ar.temporal_consistency = a.temporal_consistency;
    ar.adaptation_speed = a.adaptation_speed;
    ar.n_queries = a.n_queries;
    I.file->set_adaptation(r.method, ar);
    I.file->set_status("adaptation/" + r.method, "done");
  }
  I.file->set_status(g, "done");
}

void ResultsSink::method_failed(const std::string& method, const std::string& message, const std::string& kind) {
  if (impl_->rank != 0) return;
  Impl& I = *impl_;
  I.file->set_status(kind + "/" + method, "failed", message);
  if (I.opt.dataset == "fact_stream" && kind == "eval") I.file->set_status("adaptation/" + method, "failed", message);
}

bool ResultsSink::failed(const std::string& message) {
  if (impl_->rank != 0) return false;
  Impl& I = *impl_;
  if (!I.file) return false;
  try {
    I.train_buf.clear();  // rows of a failed state are not worth another failing write
    if (I.training) I.file->set_status("train", "failed", message);
  } catch (...) {
  }
  try {
    I.file->set_run_state("failed", utc_now(), message);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsrsq: could not record the failure in %s either: %s\n", I.h5_path.c_str(), e.what());
  }
  try {
    I.file->close();
  } catch (...) {
  }
  I.file.reset();
  return true;
}

void ResultsSink::finish() {
  if (impl_->rank != 0) return;
  Impl& I = *impl_;
  if (!I.train_buf.empty()) {
    I.file->append_train(I.train_buf);
    I.train_buf.clear();
  }
  I.file->set_run_state("done", utc_now());
  I.file->close();
  io::RunDirectory::mark_finished(I.run_path);
}

}  // namespace dsrsq
