#include "app/experiment.hpp"

#include <mpi.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <sstream>

#include "core/error.hpp"
#include "dsrsq/build_info.hpp"
#include "core/rng.hpp"
#include "core/timer.hpp"
#include "data/readers.hpp"
#include "data/tasks.hpp"
#include "data/tokenizer.hpp"
#include "dist/dp_reducer.hpp"
#include "dist/grid.hpp"
#include "dist/ring_attention.hpp"
#include "dist/staged_communicator.hpp"
#ifdef DSRSQ_HAVE_CUDA
#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_device.hpp"
#endif
#ifdef DSRSQ_HAVE_NCCL
#include "dist/nccl/nccl_communicator.hpp"
#endif
#include "methods/method.hpp"
#include "io/checkpoint.hpp"
#include "io/results.hpp"
#include "io/run_dir.hpp"
#include "kv/kv_policy.hpp"
#include "eval/evaluator.hpp"
#include "eval/metrics.hpp"
#include "app/results_sink.hpp"
#include "train/trainer.hpp"

namespace fs = std::filesystem;

namespace dsrsq {
namespace {

data::TaskParams task_params(const Options& opt) {
  data::TaskParams p;
  p["datasets_dir"] = opt.datasets_dir;
  for (const auto& kv : opt.task_params) {
    const auto eq = kv.find('=');
    p[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  return p;
}

bool is_real_dataset(const std::string& name) {
  const auto& names = data::dataset_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}

// The records of a real dataset, read once per run. Records no split can use
// are dropped with ONE warning naming how many of how many: those whose query
// and first answer alone leave no room under --max_seq_len (training needs
// [BOS] [SEP] query [ANS] answer [EOS] < max_seq_len; evaluation needs
// [BOS] [SEP] query [ANS] + max_new_tokens < max_seq_len). The readers warn
// about the records they skip themselves. `talk`: this rank prints warnings.
std::vector<data::Example> load_real(const Options& opt, const Tokenizer& tok, bool talk) {
  data::ReadOptions ro;
  ro.warn = [talk](const std::string& w) {
    if (talk) std::fprintf(stderr, "dsrsq: warning: %s\n", w.c_str());
  };
  auto all = data::load_dataset(opt.dataset, opt.data_dir, ro);
  // Refused here, before the run directory exists (an empty file used to fail in the trainer).
  DSRSQ_INPUT_CHECK(!all.empty(), "option --data_dir: the ", opt.dataset, " files under '", opt.data_dir,
                    "' hold no records");
  const std::size_t total = all.size();
  std::vector<data::Example> keep;
  keep.reserve(total);
  for (auto& e : all) {
    const auto q = static_cast<std::int64_t>(tok.encode(e.query).size());
    const auto a = static_cast<std::int64_t>(tok.encode(e.answers.front()).size());
    if (q + a + 4 < opt.max_seq_len && q + 3 + opt.max_new_tokens < opt.max_seq_len) keep.push_back(std::move(e));
  }
  if (keep.size() < total && talk)
    std::fprintf(stderr,
                 "dsrsq: warning: dataset %s: skipped %zu of %zu records whose query and answer alone (or query and "
                 "--max_new_tokens %lld) leave no room for context under --max_seq_len %lld\n",
                 opt.dataset.c_str(), total - keep.size(), total, static_cast<long long>(opt.max_new_tokens),
                 static_cast<long long>(opt.max_seq_len));
  DSRSQ_INPUT_CHECK(!keep.empty(), "option --data_dir: none of the ", total, " ", opt.dataset, " records under '",
                    opt.data_dir, "' fits --max_seq_len ", opt.max_seq_len, " (query and answer alone are too long)");
  return keep;
}

// Examples of one split: `n` examples spread over `sizes` (the first
// n % sizes sizes get one more). Every example's meta context_size is the size
// it was made for (an evaluation cell's examples are those of its size). Synthetic tasks build contexts of each size
// (and, for needle, over a depth grid). Real datasets (`real`: load_real)
// draw records with replacement (seeded) and cut each context to its size by
// the truncation rule (oldest tokens dropped); a shorter context stays as is.
// meta context_size: the size asked for; context_tokens_read: the record's
// context tokens before the cut.
std::vector<data::Example> make_split(const Options& opt, const std::vector<std::int64_t>& sizes, const Tokenizer& tok,
                                      std::int64_t n, std::uint64_t seed, bool grid,
                                      const std::vector<data::Example>* real = nullptr) {
  if (is_real_dataset(opt.dataset)) {
    DSRSQ_REQUIRE(real && !real->empty(), "make_split: real dataset records not loaded");
    Rng rng(seed);
    std::vector<data::Example> out;
    const auto nsizes = static_cast<std::int64_t>(sizes.size());
    for (std::int64_t si = 0; si < nsizes; ++si) {
      const std::int64_t per_size = n / nsizes + (si < n % nsizes ? 1 : 0);
      const auto size = static_cast<std::size_t>(sizes[static_cast<std::size_t>(si)]);
      for (std::int64_t i = 0; i < per_size; ++i) {
        data::Example e = (*real)[rng.below(real->size())];
        std::size_t before = 0;
        e.context = data::keep_last_tokens(e.context, tok, size, &before);
        e.meta["context_size"] = std::to_string(size);
        e.meta["context_tokens_read"] = std::to_string(before);
        out.push_back(std::move(e));
      }
    }
    return out;
  }
  const data::TokenCounter count = [&tok](std::string_view s) { return tok.encode(s).size(); };
  return data::make_split(opt.dataset, task_params(opt), sizes, n, seed, grid, count);
}

void print_tables(const std::vector<MethodEval>& results, const std::string& caption,
                  const std::map<std::string, std::string>& backbones = {}) {
  std::printf("\nTask performance (test split; %s)\n", caption.c_str());
  std::printf("  %-16s %8s %8s %8s %8s %8s  %s\n", "method", "F1", "EM", "ROUGE-L", "BLEU-4", "n", "KV budget");
  for (const auto& r : results) {
    // A budget the method could not meet (a full cache cannot shrink; a fixed
    // minimum above the budget) is shown as infeasible, never as met.
    const std::string budget = r.infeasible_examples == 0 ? "met"
                               : detail::cat("infeasible on ", r.infeasible_examples, "/", r.examples.size());
    std::printf("  %-16s %8s %8s %8s %8s %8zu  %s\n", r.method.c_str(), eval::format_metric(r.f1).c_str(),
                eval::format_metric(r.em).c_str(), eval::format_metric(r.rouge_l).c_str(),
                eval::format_metric(r.bleu).c_str(), r.examples.size(), budget.c_str());
  }
  std::printf("\nEfficiency (means over examples; MB = 10^6 bytes; memory = this method's activations + KV; KV per\n"
              "example after prefill and read per decode step; tok/s = tokens it ran through the model per second,\n"
              "ctx/s = context tokens served per second)\n");
  std::printf("  %-16s %12s %12s %12s %12s %10s %10s %10s %10s\n", "method", "peak_MB", "avg_MB", "KV_res_MB",
              "KV_read_MB", "tok/s", "ctx/s", "TTFT_ms", "tok_eff");
  for (const auto& r : results) {
    double kv_res = 0, kv_read = 0;
    for (const auto& e : r.examples) {
      kv_res += static_cast<double>(e.kv.resident_after_prefill);
      kv_read += static_cast<double>(e.kv.read_per_step);
    }
    const double n = std::max<double>(1.0, static_cast<double>(r.examples.size()));
    std::printf("  %-16s %12.3f %12.3f %12.4f %12.4f %10.0f %10.0f %10.2f %10.3f\n", r.method.c_str(), r.peak_mem_bytes / 1e6,
                r.avg_mem_bytes / 1e6, kv_res / n / 1e6, kv_read / n / 1e6, r.throughput_tok_s, r.context_tokens_per_s,
                r.latency_s * 1e3, r.token_efficiency);
  }
  bool any = false;
  for (const auto& r : results)
    if (auto it = backbones.find(r.method); it != backbones.end()) {
      if (!any) std::printf("\nBackbones (the weights each method ran on)\n");
      any = true;
      std::printf("  %-16s %s\n", r.method.c_str(), it->second.c_str());
    }
  std::printf("\n");
}

// The report (analysis/report.py) next to run.h5; it prints Tables 1 and 2.
// A missing Python stack is reported, not fatal: run.h5 is the record.
void write_report(const std::string& h5) {
  const fs::path dir = fs::path(h5).parent_path() / "report";
  const fs::path tool = fs::path(DSRSQ_SOURCE_DIR) / "analysis" / "report.py";
  const std::string cmd = "/usr/bin/python3 '" + tool.string() + "' '" + h5 + "' -o '" + dir.string() + "' --print";
  std::fflush(stdout);
  const int rc = std::system(cmd.c_str());
  if (rc != 0)
    std::printf("dsrsq: the report tool failed (exit %d); run it by hand: %s\n", rc, cmd.c_str());
  else
    std::printf("dsrsq: report in %s/report.md\n", dir.c_str());
}

// The run's data: the test split every method is scored on, training pools by
// context length (shortest first), the validation split.
struct Splits {
  std::vector<data::Example> test;
  std::vector<std::vector<Encoded>> pools;
  std::vector<Encoded> val;
};

Splits build_data(const Options& opt, const Tokenizer& tok, bool talk) {
  Splits d;
  std::vector<data::Example> real_records;
  if (is_real_dataset(opt.dataset)) real_records = load_real(opt, tok, talk);
  const std::vector<data::Example>* real = real_records.empty() ? nullptr : &real_records;
  d.test = make_split(opt, opt.eval_context_sizes, tok, opt.num_test, data::test_split_seed(opt.seed), true, real);
  if (!opt.gpt2_dir.empty()) {
    // Context lengths also in GPT-2 tokens, as the literature reports them.
    const Gpt2Bpe bpe(opt.gpt2_dir);
    double sum = 0;
    for (auto& e : d.test) {
      const std::size_t n = bpe.count(e.context);
      e.meta["context_gpt2_tokens"] = std::to_string(n);
      sum += static_cast<double>(n);
    }
    std::printf("dsrsq: test contexts average %.1f GPT-2 tokens\n",
                d.test.empty() ? 0.0 : sum / static_cast<double>(d.test.size()));
  }
  if (opt.command == "eval") return d;
  // Training and validation: --train_dataset when set (every query of a
  // multi-query sequence supervised), else --dataset.
  Options tr = opt;
  if (!opt.train_dataset.empty()) {
    tr.dataset = opt.train_dataset;
    tr.task_params = opt.train_task_params;
  }
  for (std::size_t si = 0; si < opt.context_sizes.size(); ++si) {
    const auto ex = make_split(tr, {opt.context_sizes[si]}, tok,
                               std::max<std::int64_t>(1, opt.num_train / static_cast<std::int64_t>(opt.context_sizes.size())),
                               opt.seed * 3 + 0 + 7919 * si, false, real);
    std::vector<Encoded> enc;
    for (const auto& e : ex) enc.push_back(encode_example(e, tok, opt.max_seq_len, true));
    d.pools.push_back(std::move(enc));
  }
  for (const auto& e : make_split(tr, opt.context_sizes, tok, opt.num_val, opt.seed * 3 + 1, false, real))
    d.val.push_back(encode_example(e, tok, opt.max_seq_len, true));
  return d;
}

std::string dataset_hash(const std::vector<data::Example>& test) {
  // Dataset identity: a hash over the test split (what every method is scored on).
  std::string all;
  for (const auto& e : test) {
    all += e.id + '\x1f' + e.context + '\x1f' + e.query + '\x1f';
    for (const auto& a : e.answers) all += a + '\x1e';
  }
  return fnv1a64_hex(all);
}

// --dry-run: the resolved configuration, a memory estimate and the plan, from the table.
void print_plan(const Options& opt, const ModelConfig& mc, const std::vector<KVBudget>& budgets) {
  std::printf("# resolved configuration (hash %s)\n%s", opt.identity_hash().c_str(), opt.resolved_text().c_str());
  const double P = static_cast<double>(mc.num_parameters()) * 4;
  const double N = static_cast<double>(opt.batch_size * opt.max_seq_len);
  const double act = N * 4.0 * static_cast<double>(mc.n_layers) * (10.0 * static_cast<double>(mc.d_model) + 2.0 * static_cast<double>(mc.d_ff)) +
                     N * 4.0 * 2.0 * static_cast<double>(mc.vocab);
  std::printf("# memory estimate per rank (bytes)\n");
  std::printf("parameters        %14.0f\ngradients         %14.0f\noptimizer_state   %14.0f\nactivations       %14.0f\n", P, P,
              2 * P, act);
  // Every method is asked for the same bytes; one that cannot shrink (a full
  // cache) holds more and records it; one that cannot meet it is infeasible.
  const double full = static_cast<double>(KVBudget::full_bytes(mc, opt.max_seq_len));
  std::printf("kv_full_cache     %14.0f   (at max_seq_len %lld)\n", full, static_cast<long long>(opt.max_seq_len));
  for (const auto& budget : budgets)
    for (const auto& m : opt.methods)
      std::printf("kv_budget[%s] %*s%14.0f   (%s)\n", m.c_str(),
                  static_cast<int>(std::max<std::size_t>(1, 6 - std::min<std::size_t>(6, m.size()))), "",
                  static_cast<double>(budget.resolve(mc, opt.max_seq_len)), budget.str().c_str());
  std::printf("# plan\n");
  const methods::MethodInfo& trained = methods::find_method(opt.model, "--model");
  if (opt.command != "eval") std::printf("train     %-16s %s\n", opt.model.c_str(), std::string(trained.summary).c_str());
  for (const auto& m : opt.methods) {
    const methods::MethodInfo& info = methods::find_method(m);
    std::printf("evaluate  %-16s %s [%s]\n", m.c_str(), std::string(info.summary).c_str(),
                info.backbone == methods::Backbone::own ? "own weights" : "standard checkpoint");
  }
  std::printf("cells     %zu per method: eval context sizes", opt.eval_context_sizes.size() * opt.kv_budget.size());
  for (auto c : opt.eval_context_sizes) std::printf(" %lld", static_cast<long long>(c));
  std::printf(" x kv budgets");
  for (const auto& b : opt.kv_budget) std::printf(" %s", b.c_str());
  std::printf(" (max_pos %lld)\n", static_cast<long long>(mc.max_pos));
  if (opt.ablation)
    for (const auto& v : opt.ablation_variants) std::printf("ablation  %s/%s\n", opt.model.c_str(), v.c_str());
}

// Which weights each evaluated method runs on (DESIGN.md section 9,
// "Backbones"): training-free methods on the standard checkpoint. In a run
// that trains a method with its own weights that is the --init_from
// checkpoint it started from, when that is a standard checkpoint; otherwise
// the row says it runs on this run's backbone.
std::map<std::string, std::string> backbone_texts(const Options& opt, bool init_is_standard) {
  const methods::MethodInfo& trained = methods::find_method(opt.model, "--model");
  std::map<std::string, std::string> out;
  for (const auto& m : opt.methods) {
    const methods::MethodInfo& info = methods::find_method(m);
    if (info.backbone == methods::Backbone::own) {
      out[m] = opt.command == "eval" ? "the " + m + " checkpoint " + opt.init_from : "this run's " + m + " model";
    } else if (trained.backbone == methods::Backbone::standard) {
      out[m] = opt.command == "eval" ? "standard checkpoint " + opt.init_from : "this run's standard model";
    } else if (init_is_standard) {
      out[m] = "standard checkpoint " + opt.init_from + " (the one " + opt.model + " started from)";
    } else {
      out[m] = "this run's " + opt.model + " backbone (NOT the standard model: no standard --init_from checkpoint)";
    }
  }
  return out;
}

// Training: the trainer with the trained method's extension attached, checkpoints,
// per-rank timings and stop requests. Returns the last completed step + 1.
std::int64_t train(const Options& opt, Transformer& model, TrainableModel& tm, AdamW& adam, methods::TrainingExtension* ext,
                   const Splits& data, const Tokenizer& tok, dist::ProcessGrid* grid, dist::Communicator* tensors,
                   dist::Communicator* sp_tensors, ResultsSink& sink, std::int64_t start, std::int64_t& total_steps) {
  const int world = grid ? grid->world().size() : 1;
  TrainConfig tc;
  std::int64_t per_epoch = 0;
  for (const auto& p : data.pools) per_epoch += static_cast<std::int64_t>(p.size());
  per_epoch = (per_epoch + opt.batch_size - 1) / opt.batch_size;
  tc.steps = opt.num_epochs > 0 ? opt.num_epochs * per_epoch : opt.steps;
  total_steps = tc.steps;
  tc.batch_size = opt.batch_size;
  tc.warmup = opt.warmup;
  tc.lr = opt.learning_rate;
  tc.curriculum = opt.curriculum;
  tc.lm_weight = opt.lm_weight;
  tc.random_positions = opt.random_positions;
  tc.position_range = opt.position_range > 0 ? opt.position_range : model.config().max_pos;
  tc.val_every = opt.val_every;
  tc.log_every = opt.log_every;
  tc.seed = opt.seed;
  tc.peak_gflops = measure_sgemm_peak();
  std::printf("dsrsq: training %s (%lld parameters) for %lld steps from step %lld; sgemm now %.0f GFLOP/s (the progress line's yardstick)\n",
              tm.config_str().c_str(), static_cast<long long>(tm.flat_params().numel()), static_cast<long long>(tc.steps),
              static_cast<long long>(start), tc.peak_gflops);
  DataParallel dp;
  std::unique_ptr<dist::GradReducer> reducer;
  std::unique_ptr<dist::RingAttention> ring;
  if (grid) {
    // Every rank's gradient is a partial sum of the global one (its dp shard
    // of sequences, its sp shard of their tokens): sum over the whole world,
    // on the communicator that takes the model's buffers (`tensors`: the host
    // world on the CPU, a device communicator on a device). The loss
    // normaliser, losses and counters stay host scalars on the host world.
    reducer = std::make_unique<dist::GradReducer>(*tensors, model);
    reducer->attach(model);
    dp.comm = &grid->dp_comm();
    dp.world = &grid->world();
    if (opt.sp > 1) {
      dp.sp_comm = &grid->sp_comm();
      // K/V blocks travel on the communicator that takes the model's buffers
      // (`sp_tensors`: the host sp communicator on the CPU, a device one on a device).
      ring = std::make_unique<dist::RingAttention>(model.backend(), *sp_tensors);
      model.attention_override = ring.get();
    }
    dp.reduce_gradients = [&] { reducer->finish(); };
    dp.last_comm_seconds = [&] { return reducer->stats().last_wait_seconds; };
  }
  MethodHooks hooks;
  if (ext) {
    methods::TrainEnv env;
    env.world = grid ? &grid->world() : nullptr;
    env.sp_comm = grid && opt.sp > 1 ? &grid->sp_comm() : nullptr;
    env.sp_lead = !grid || grid->sp_rank() == 0;
    env.attention_taken = model.attention_override != nullptr;
    env.global_batch = static_cast<double>(opt.batch_size);
    env.seed = opt.seed;
    env.pad_id = tok.pad_id();
    env.lr_at = [tc](std::int64_t step) { return lr_schedule(step, tc.steps, tc.warmup, tc.lr); };
    ext->attach(hooks, env);
  }
  Trainer trainer(tm, adam, tc, data.pools, data.val, tok.pad_id(), dp, hooks);
  TrainCallbacks cb;
  cb.on_val = [&](std::int64_t step, double vl) { sink.val(step, vl); };
  cb.checkpoint_every = opt.checkpoint_every;
  cb.on_checkpoint = [&](std::int64_t step) {
    std::map<std::string, std::vector<float>> extra;
    if (ext) ext->save(extra);
    sink.checkpoint(step, tm, adam, extra);
  };
  std::int64_t step_now = start;
  std::int64_t bytes_before = 0, ring_bytes_before = 0;
  cb.on_step = [&](const StepStats& s) {
    step_now = s.step + 1;
    sink.train_step(s);
    if (grid) {  // per-rank timings -> /ranks (gathered to rank 0)
      // bytes_sent: this step's all-reduced payload times the ring factor 2 (n-1)/n.
      // Plus the ring attention's K/V and dK/dV traffic under sp (and validation's).
      const std::int64_t bytes = static_cast<std::int64_t>(reducer->stats().payload_bytes);
      const std::int64_t ring_bytes = ring ? ring->bytes_sent() : 0;
      const double ring_factor = 2.0 * (world - 1) / world;
      const double mine[3] = {s.step_time_s, s.comm_seconds,
                              ring_factor * static_cast<double>(bytes - bytes_before) +
                                  static_cast<double>(ring_bytes - ring_bytes_before)};
      bytes_before = bytes;
      ring_bytes_before = ring_bytes;
      std::vector<double> all(static_cast<std::size_t>(3 * world));
      grid->world().all_gather(std::span<const double>(mine, 3), std::span<double>(all));
      sink.rank_step(s.step + 1, all);
    }
  };
  Timer walltime;
  double slowest_step = 0;
  std::int64_t steps_seen = start;
  cb.should_stop = [&] {
    // --max_walltime: stop while the next step and a checkpoint still fit
    // (twice the slowest step so far, plus 5 % of the limit for the checkpoint).
    bool out_of_time = false;
    if (opt.max_walltime > 0) {
      const double now = walltime.seconds();
      if (step_now > steps_seen) {
        slowest_step = std::max(slowest_step, now / static_cast<double>(std::max<std::int64_t>(1, step_now - start)));
        steps_seen = step_now;
      }
      out_of_time = now + 2 * slowest_step + 0.05 * opt.max_walltime >= opt.max_walltime;
    }
    // Every rank must stop at the same step boundary: agree with one all-reduce.
    double stop = (sink.should_stop() || out_of_time || (opt.stop_after > 0 && step_now >= opt.stop_after)) ? 1.0 : 0.0;
    if (grid) stop = dist::all_reduce_scalar(grid->world(), stop);
    return stop > 0;
  };
  const std::int64_t done = trainer.run(start, cb);
  if (reducer) reducer->detach();
  if (ext) ext->detach();
  model.attention_override = nullptr;
  return done;
}

// The run's evaluation cells: every eval context size x every KV budget
// (context size major), the order of rows in every /eval/<m>.
std::vector<results::Cell> eval_cells(const Options& opt) {
  std::vector<results::Cell> out;
  for (auto c : opt.eval_context_sizes)
    for (const auto& b : opt.kv_budget) {
      const KVBudget kb = KVBudget::parse(b);
      results::Cell cell;
      cell.context_size = c;
      cell.kv_budget = b;
      cell.kv_budget_fraction = kb.bytes > 0 ? std::nan("") : kb.fraction;
      cell.kv_budget_bytes = kb.bytes > 0 ? static_cast<std::int64_t>(kb.bytes) : -1;
      out.push_back(cell);
    }
  return out;
}

// Several evaluations of one method as one: its examples in order, scored and
// aggregated again (the summary columns come from the examples alone).
MethodEval merged(const std::string& name, const std::vector<const MethodEval*>& parts) {
  MethodEval all;
  all.method = name;
  for (const MethodEval* p : parts) {
    all.examples.insert(all.examples.end(), p->examples.begin(), p->examples.end());
    all.wall_s += p->wall_s;
    all.process_peak_rss_bytes = std::max(all.process_peak_rss_bytes, p->process_peak_rss_bytes);
  }
  score_and_aggregate(all);
  return all;
}

// One GPU per rank (--device cuda with more than one rank): the node-local
// rank modulo the visible devices becomes the current device before the CUDA
// backend is made (it takes the current device). A collective over `world`.
void choose_rank_gpu(dist::MpiCommunicator& world) {
  const int local = dist::node_local_rank(world);
#ifdef DSRSQ_HAVE_CUDA
  // No GPU: nothing to choose; run_backend then says so.
  if (const int count = cuda::device_count(); count > 0) DSRSQ_CUDA_CHECK(cudaSetDevice(dist::select_device(local, count)));
#else
  (void)local;
#endif
}

// The host communicator `host` (the world, or the sp ring) on the backend's
// device buffers, or nullptr on the CPU (a host communicator takes host
// buffers as they are). A collective over `host`. CUDA with NCCL:
// NcclCommunicator on the backend's GPU, ordered after the backend's stream,
// checked by its launch self-test. sim, and CUDA without NCCL:
// StagedCommunicator (host copies through the backend, MPI on `host`).
std::unique_ptr<dist::Communicator> device_communicator(Backend& be, dist::MpiCommunicator& host) {
  if (be.device() == Device::cpu) return nullptr;
#ifdef DSRSQ_HAVE_NCCL
  if (be.device() == Device::cuda) {
    auto& gpu = static_cast<cuda::CudaBackend&>(be);
    auto nccl = std::make_unique<dist::NcclCommunicator>(host, gpu.device_index());
    nccl->set_producer_stream(gpu.stream());
    dist::nccl_self_test(*nccl);
    return nccl;
  }
#endif
  return std::make_unique<dist::StagedCommunicator>(be, host);
}

// The backend of --device (options.cpp has checked the methods and the grid).
Backend& run_backend(const std::string& device) {
  const Device d = device == "cuda" ? Device::cuda : device == "sim" ? Device::sim : Device::cpu;
  Backend* be = device_backend(d);
  DSRSQ_INPUT_CHECK(be != nullptr, "option --device ", device, ": ",
                    build::cuda ? "no GPU answers on this machine" : "this build has no CUDA backend");
  return *be;
}

// Evaluation on rank 0: every method of --methods on its backbone, then the
// trained method's ablation variants on the same weights. Each method is
// evaluated in every cell (eval context size x KV budget) on the same test
// examples of that size; a failing cell is recorded and the others go on.
// Returns false when a stop signal cut it short (finished methods are kept).
bool evaluate_all(const Options& opt, const ModelConfig& mc, Transformer& model, methods::Method& trained_method,
                  Transformer* standard_backbone, const std::map<std::string, std::string>& backbones,
                  const Tokenizer& tok, const std::vector<data::Example>& test, ResultsSink& sink,
                  std::vector<std::string>& failed) {
  const std::vector<results::Cell> cells = eval_cells(opt);
  const std::size_t nb = opt.kv_budget.size();
  std::vector<KVBudget> budgets;
  for (const auto& b : opt.kv_budget) budgets.push_back(KVBudget::parse(b));
  // The test examples of each eval context size (meta context_size, set by make_split).
  std::vector<std::vector<data::Example>> by_size(opt.eval_context_sizes.size());
  for (const auto& e : test) {
    const auto it = e.meta.find("context_size");
    DSRSQ_REQUIRE(it != e.meta.end(), "test example '", e.id, "' has no meta context_size");
    const auto pos = std::find(opt.eval_context_sizes.begin(), opt.eval_context_sizes.end(), std::stoll(it->second));
    DSRSQ_REQUIRE(pos != opt.eval_context_sizes.end(), "test example '", e.id, "' has an unknown context size");
    by_size[static_cast<std::size_t>(pos - opt.eval_context_sizes.begin())].push_back(e);
  }
  EvalConfig ec;
  ec.max_new_tokens = opt.max_new_tokens;
  ec.max_seq_len = mc.max_pos;
  ec.query_agnostic = opt.protocol == "context_only" || opt.protocol == "reuse";
  ec.reuse = opt.protocol == "reuse";
  bool stopped = false;
  // results[b]: per method, its evaluation at budget b over every context size (printed tables).
  using PerBudget = std::vector<std::vector<MethodEval>>;
  auto evaluate = [&](const std::string& name, const std::string& kind, const std::function<methods::EvalPlan()>& plan,
                      Transformer& weights, PerBudget& out) {
    if (stopped || sink.should_stop()) {  // a stop signal during evaluation: stop between cells
      stopped = true;
      return;
    }
    if (sink.method_done_before(name, kind)) {
      std::printf("dsrsq: %s/%s was evaluated by an earlier attempt of this run; its results are kept\n", kind.c_str(),
                  name.c_str());
      return;
    }
    sink.method_started(name, kind);
    std::vector<MethodEval> done(cells.size());
    std::vector<bool> ok(cells.size(), false);
    std::string errors;
    std::int64_t group_base = 0;  // reuse protocol: groups of the cells before this one
    try {
      EvalConfig e = ec;
      e.name = name;
      methods::EvalPlan p = plan();
      e.select = p.select;
      e.extend = p.extend;
      e.reset_activation_peak = p.reset_activation_peak;
      e.activation_peak_bytes = p.activation_peak_bytes;
      for (std::size_t k = 0; k < cells.size() && !stopped; ++k) {
        if (sink.should_stop()) {
          stopped = true;
          break;
        }
        e.budget = budgets[k % nb];
        sink.cell_started(name, kind, k);
        try {
          Timer t;
          done[k] = evaluate_method(weights, *p.policy, tok, by_size[k / nb], e);
          if (ec.reuse) {
            // Reuse groups are numbered per evaluation: continue the numbering
            // over the method's cells so meta reuse_group names one shared
            // compression among all of the method's rows.
            std::int64_t next = group_base;
            for (auto& x : done[k].examples)
              if (auto it = x.meta.find("reuse_group"); it != x.meta.end()) {
                const std::int64_t g = group_base + std::stoll(it->second);
                it->second = std::to_string(g);
                next = std::max(next, g + 1);
              }
            group_base = next;
          }
          std::printf("dsrsq: evaluated %s%-16s context %lld, KV budget %s: F1 %.4f EM %.4f on %zu examples%s (%.1f s)\n",
                      kind == "eval" ? "" : "ablation variant ", name.c_str(),
                      static_cast<long long>(cells[k].context_size), cells[k].kv_budget.c_str(), done[k].f1, done[k].em,
                      done[k].examples.size(),
                      done[k].infeasible_examples ? detail::cat(", infeasible on ", done[k].infeasible_examples).c_str()
                                                  : "",
                      t.seconds());
          sink.cell_done(done[k], kind, k);
          ok[k] = true;
        } catch (const std::exception& ex) {
          const std::string where = detail::cat("context ", cells[k].context_size, ", KV budget ", cells[k].kv_budget);
          std::printf("dsrsq: %s %s (%s) FAILED: %s\n", kind.c_str(), name.c_str(), where.c_str(), ex.what());
          sink.cell_failed(name, kind, k, ex.what());
          errors += (errors.empty() ? "" : "; ") + where + ": " + ex.what();
        }
      }
    } catch (const std::exception& ex) {  // the method could not be set up: every cell fails
      errors = ex.what();
      std::printf("dsrsq: %s %s FAILED: %s\n", kind.c_str(), name.c_str(), ex.what());
      for (std::size_t k = 0; k < cells.size(); ++k) sink.cell_failed(name, kind, k, ex.what());
    }
    if (stopped) return;  // the method stays "running": a rerun evaluates it again
    std::vector<const MethodEval*> all;
    for (std::size_t k = 0; k < cells.size(); ++k)
      if (ok[k]) all.push_back(&done[k]);
    if (!errors.empty()) {
      sink.method_failed(name, errors, kind);
      failed.push_back(kind == "eval" ? name : kind + "/" + name);
    } else {
      sink.method_done(merged(name, all), kind);
    }
    for (std::size_t b = 0; b < nb; ++b) {
      std::vector<const MethodEval*> parts;
      for (std::size_t k = b; k < cells.size(); k += nb)
        if (ok[k]) parts.push_back(&done[k]);
      if (!parts.empty()) out[b].push_back(merged(name, parts));
    }
  };
  auto caption = [&](std::size_t b) {
    return "KV budget " + opt.kv_budget[b] + " (" + budgets[b].str() + " of each example's full cache), " +
           (ec.reuse ? "reuse protocol (compress once, ask many): each method compresses a shared context once, "
                       "without the questions, and answers each of its questions from a copy of that cache; latency "
                       "= restore + question + first token, the compression counted once per context in serving time"
            : ec.query_agnostic
                ? "query-agnostic protocol: each method compresses the context, then the question is appended"
                : "query-aware protocol: the question is in the prompt every method compresses") +
           (opt.eval_context_sizes.size() > 1 ? ", all eval context sizes" : "");
  };
  PerBudget results(nb);
  for (const auto& m : opt.methods) {
    const methods::MethodInfo& info = methods::find_method(m);
    if (m == opt.model) {
      evaluate(m, "eval", [&] { return trained_method.plan(""); }, model, results);
      continue;
    }
    Transformer& weights = info.backbone == methods::Backbone::standard && standard_backbone ? *standard_backbone : model;
    methods::MethodContext ctx{weights, weights.backend(), nullptr, AdamWConfig{}, opt.seed};
    if (auto it = opt.knobs.find(m); it != opt.knobs.end()) ctx.knobs = it->second.get();
    std::unique_ptr<methods::Method> method;
    evaluate(m, "eval", [&] {
      method = info.make(ctx);
      return method->plan("");
    }, weights, results);
  }
  for (std::size_t b = 0; b < nb; ++b) print_tables(results[b], caption(b), backbones);
  if (opt.ablation) {
    PerBudget ablation(nb);
    for (const auto& v : opt.ablation_variants)
      evaluate(v, "ablation", [&] { return trained_method.plan(v); }, model, ablation);
    std::printf("\nablation (%s variants on the same weights)\n", opt.model.c_str());
    for (std::size_t b = 0; b < nb; ++b) print_tables(ablation[b], caption(b));
  }
  return !stopped;
}

}  // namespace

int run_experiment(const Options& opt, int rank, int world) {
  dist::validate_grid(opt.dp, opt.sp, world);
  DSRSQ_INPUT_CHECK(opt.sp == 1 || opt.max_seq_len >= 2 * opt.sp, "option --sp ", opt.sp,
                    ": the zigzag split cuts every sequence into 2 sp = ", 2 * opt.sp,
                    " chunks, so --max_seq_len (", opt.max_seq_len, ") must be at least that");
  DSRSQ_INPUT_CHECK(opt.batch_size % opt.dp == 0, "option --batch_size ", opt.batch_size, " must be divisible by --dp ",
                    opt.dp, " (each rank trains on an equal shard)");
  // Only rank 0 talks: the others' progress lines would repeat it. Errors go
  // to stderr on every rank, prefixed with the rank.
  if (rank != 0) std::freopen("/dev/null", "w", stdout);
  if (rank == 0)
    for (const auto& w : opt.warnings) std::fprintf(stderr, "dsrsq: warning: %s\n", w.c_str());
  std::unique_ptr<dist::ProcessGrid> grid;
  if (world > 1) {
    grid = std::make_unique<dist::ProcessGrid>(MPI_COMM_WORLD, opt.dp, opt.sp, opt.comm_timeout);
    dist::comm_self_test(grid->world());
  }
  if (opt.threads > 0) omp_set_num_threads(opt.threads);
  if (grid && opt.device == "cuda") choose_rank_gpu(grid->world());
  Backend& be = run_backend(opt.device);  // before anything is written: a missing GPU is an input error
  // The world communicator on the backend's buffers (gradients, parameter
  // broadcasts): the host world itself on the CPU.
  std::unique_ptr<dist::Communicator> device_world = grid ? device_communicator(be, grid->world()) : nullptr;
  dist::Communicator* tensors = device_world ? device_world.get() : grid ? &grid->world() : nullptr;
  // The sp communicator on the backend's buffers (ring attention's exchanges), likewise.
  std::unique_ptr<dist::Communicator> device_sp =
      grid && opt.sp > 1 ? device_communicator(be, grid->sp_comm()) : nullptr;
  dist::Communicator* sp_tensors = device_sp ? device_sp.get() : grid && opt.sp > 1 ? &grid->sp_comm() : nullptr;

  auto tok = make_tokenizer(opt.tokenizer, opt.tokenizer_model);
  ModelConfig mc;
  mc.vocab = static_cast<std::int64_t>(tok->vocab_size());
  mc.d_model = opt.d_model;
  mc.n_heads = opt.n_heads;
  mc.n_layers = opt.n_layers;
  mc.d_ff = opt.d_ff;
  mc.rope_theta = opt.rope_theta;
  mc.attn_log_base = opt.attn_log_scale;
  // Sequence parallelism pads batches to a multiple of 2 sp tokens; the limit
  // follows the eval context sizes when --max_pos is not given.
  mc.max_pos = opt.max_pos ? opt.max_pos : (opt.auto_max_pos() + 2 * opt.sp - 1) / (2 * opt.sp) * (2 * opt.sp);
  mc.validate();
  DSRSQ_INPUT_CHECK(opt.position_range <= mc.max_pos, "option --position_range: ", opt.position_range,
                    " exceeds the model's max_pos ", mc.max_pos, " (raise --max_pos)");
  std::vector<KVBudget> budgets;
  for (const auto& b : opt.kv_budget) budgets.push_back(KVBudget::parse(b));
  const methods::MethodInfo& trained = methods::find_method(opt.model, "--model");

  if (opt.dry_run) {
    print_plan(opt, mc, budgets);
    return 0;
  }

  // Every input (data files, --init_from) is read and checked before the run
  // directory is created or touched: a bad input leaves no trace. A finished
  // run with this config is skipped without reading anything.
  const std::string run_path = (fs::path(opt.output_dir) / opt.run_name).string();
  const bool finished = io::RunDirectory::stored_hash(run_path) == opt.identity_hash() &&
                        io::RunDirectory::is_finished(run_path);
  if (finished) {
    ResultsSink sink(opt, mc, *tok, rank);
    if (sink.skip()) return 0;
  }
  DSRSQ_INPUT_CHECK(!opt.resume || (io::RunDirectory::stored_hash(run_path) == opt.identity_hash() &&
                                    io::latest_checkpoint(run_path).has_value()),
                    "option --resume: no unfinished run of this configuration with a checkpoint in '", run_path, "'");

  Timer total;
  // ---- data ----
  std::printf("dsrsq: dataset %s, tokenizer %s (vocab %lld), context sizes", opt.dataset.c_str(), tok->name().c_str(),
              static_cast<long long>(mc.vocab));
  for (auto c : opt.context_sizes) std::printf(" %lld", static_cast<long long>(c));
  if (opt.eval_context_sizes != opt.context_sizes) {
    std::printf(" (evaluation:");
    for (auto c : opt.eval_context_sizes) std::printf(" %lld", static_cast<long long>(c));
    std::printf(")");
  }
  std::printf(", max_seq_len %lld, max_pos %lld\n", static_cast<long long>(opt.max_seq_len),
              static_cast<long long>(mc.max_pos));
  const Splits data = build_data(opt, *tok, rank == 0);
  std::optional<io::CheckpointState> init;
  if (!opt.init_from.empty()) {
    init = io::load_checkpoint(opt.init_from);
    // An own-architecture method (GCA) also accepts its own checkpoints (checked once its model exists).
    DSRSQ_INPUT_CHECK(trained.own_architecture || static_cast<std::int64_t>(init->params.size()) == mc.num_parameters(), "option --init_from: '",
                      opt.init_from, "' holds ", init->params.size(), " parameters, this model has ",
                      mc.num_parameters());
  }
  // A checkpoint with no method state beside the backbone is a standard one.
  const bool init_is_standard = init && init->extra.empty();
  // A method with its own architecture (GCA) never trains the Transformer:
  // the other methods need a standard checkpoint to run on.
  for (const auto& m : opt.methods)
    DSRSQ_INPUT_CHECK(!trained.own_architecture || m == opt.model || init_is_standard, "option --methods: '", m,
                      "' runs on the standard model, which --model ", opt.model, " does not train: pass a standard ",
                      "checkpoint with --init_from, or --methods ", opt.model);
  const auto backbones = backbone_texts(opt, init_is_standard);

  ResultsSink sink(opt, mc, *tok, rank);
  if (sink.skip()) return 0;
  // From here on the run directory exists: a fatal error is recorded in run.h5
  // (run_state "failed" with the message) before it reaches main (exit 1).
  try {
    sink.open(dataset_hash(data.test), backbones, eval_cells(opt));
    std::printf("dsrsq: %zu training pools, %zu validation, %zu test examples (%.1f s)\n", data.pools.size(),
                data.val.size(), data.test.size(), total.seconds());

    // ---- model: the backbone and the trained method (its extension, if any) ----
    Transformer model(mc, be);
    model.init_weights(opt.seed);
    AdamWConfig ac;
    ac.lr = opt.learning_rate;
    ac.weight_decay = opt.weight_decay;
    ac.clip_norm = opt.clip_norm;
    methods::MethodContext ctx{model, be, nullptr, ac, opt.seed};
    if (auto it = opt.knobs.find(opt.model); it != opt.knobs.end()) ctx.knobs = it->second.get();
    std::unique_ptr<methods::Method> method = trained.make(ctx);
    methods::TrainingExtension* ext = method->training();
    // A method with an architecture of its own (GCA) trains, checkpoints and
    // evaluates that model; the Transformer then only serves the other methods.
    TrainableModel& tm = method->own_model() ? *method->own_model() : static_cast<TrainableModel&>(model);
    DSRSQ_INPUT_CHECK(!method->own_model() || !grid, "--model ", opt.model, ": its own model trains in one process (--dp 1 --sp 1)");
    AdamW adam(tm.params(), tm.flat_params(), ac, be);
    DSRSQ_INPUT_CHECK(!init || static_cast<std::int64_t>(init->params.size()) == mc.num_parameters() ||
                          static_cast<std::int64_t>(init->params.size()) == tm.flat_params().numel(),
                      "option --init_from: '", opt.init_from, "' holds ", init->params.size(), " parameters, neither a ",
                      "standard model (", mc.num_parameters(), ") nor this ", opt.model, " model (", tm.flat_params().numel(), ")");

    std::map<std::string, std::vector<float>> extra_ck;
    std::int64_t start = sink.restore(tm, adam, &extra_ck);
    if (ext && !extra_ck.empty())
      DSRSQ_INPUT_CHECK(ext->restore(extra_ck) || start == 0, "checkpoint of this ", opt.model, " run holds no ",
                        opt.model, " state");
    if (grid) {
      // Rank 0 read the checkpoint (if any): every rank starts from its state.
      std::int64_t st[2] = {start, adam.steps()};
      grid->world().broadcast(std::span<std::int64_t>(st, 2), 0);
      start = st[0];
      adam.set_steps(st[1]);
      // Parameters and AdamW moments live where the backend keeps them: the
      // communicator of the model's buffers (device pointers on a device).
      for (TensorView t : {model.flat_params(), adam.m(), adam.v()})
        tensors->broadcast(std::span<float>(t.device_ptr<float>(), static_cast<std::size_t>(t.numel())), 0);
      // A method's extra state is host state (the methods that keep device
      // state train in one process: they refuse a world of more than one).
      if (ext) ext->broadcast(grid->world(), 0);
    }
    // The standard backbone of training-free methods when this run trains a
    // method with its own weights from a standard checkpoint.
    std::unique_ptr<Transformer> standard;
    if (init && init_is_standard && trained.backbone == methods::Backbone::own && rank == 0 && opt.command != "train") {
      standard = std::make_unique<Transformer>(mc, be);
      from_host<float>(be, init->params, standard->flat_params());
    }
    // An own-architecture method started from a standard checkpoint keeps its
    // own initialisation (the checkpoint is the other methods' backbone),
    // unless its setting says it starts what it shares with the standard model from it.
    const bool own_init =
        init && start == 0 && static_cast<std::int64_t>(init->params.size()) == tm.flat_params().numel();
    if (own_init) {
      from_host<float>(tm.backend(), init->params, tm.flat_params());
      std::printf("dsrsq: initialised from %s (step %lld)\n", opt.init_from.c_str(), static_cast<long long>(init->step));
    }
    if (ext && method->own_model() && start == 0 && !own_init && ext->starts_from_standard()) {
      // (options.cpp's check made sure --init_from is given)
      DSRSQ_INPUT_CHECK(init_is_standard, "option --init_from: '", opt.init_from, "' is not a standard checkpoint, and ",
                        opt.model, " is set to start from one");
      std::unique_ptr<Transformer> from;  // the evaluation's copy when there is one
      if (!standard) {
        from = std::make_unique<Transformer>(mc, be);
        from_host<float>(be, init->params, from->flat_params());
      }
      ext->start_from_standard(standard ? *standard : *from);
      std::printf("dsrsq: %s starts from the standard model %s (step %lld): the parameters they share\n",
                  opt.model.c_str(), opt.init_from.c_str(), static_cast<long long>(init->step));
    }
    // A checkpoint of the trained method also carries its own parameters (e.g.
    // evaluating a trained DSRSQ model: dsrsq eval --model dsrsq --init_from ...).
    const bool method_init = ext && init && start == 0 && ext->load_params(init->extra);
    if (method_init) std::printf("dsrsq: the %s parameters come from %s too\n", opt.model.c_str(), opt.init_from.c_str());
    init.reset();
    if (ext && start == 0 && !data.pools.empty() && !method_init) {
      std::vector<const Encoded*> calib;
      for (const auto& e : data.pools.back()) {
        if (calib.size() >= 16) break;
        calib.push_back(&e);
      }
      ext->init_from_data(calib, tok->pad_id());
    }

    if (opt.command != "eval") {
      std::int64_t steps = 0;
      const std::int64_t done =
          train(opt, model, tm, adam, ext, data, *tok, grid.get(), tensors, sp_tensors, sink, start, steps);
      if (done < steps) {
        std::printf("dsrsq: stopped at step %lld of %lld; rerun the same command to resume\n",
                    static_cast<long long>(done), static_cast<long long>(steps));
        sink.interrupted(done);
        // Leave together: a launcher that kills the job when one rank exits non-zero
        // (srun --kill-on-bad-exit) must not cut rank 0's checkpoint short.
        if (grid) MPI_Barrier(MPI_COMM_WORLD);
        return 3;
      }
    }

    // ---- evaluation ----
    // Rank 0 evaluates (every rank holds the same parameters); the others wait.
    bool eval_stopped = false;
    std::vector<std::string> failed;
    if (opt.command != "train" && rank == 0)
      eval_stopped = !evaluate_all(opt, mc, model, *method, standard.get(), backbones, *tok, data.test, sink, failed);
    if (eval_stopped) {
      std::printf("dsrsq: stopped by a signal during evaluation; finished methods are kept, rerun to evaluate the rest\n");
      sink.interrupted_eval();
    }
    int stop_all = eval_stopped ? 1 : 0;
    if (grid) {
      MPI_Barrier(MPI_COMM_WORLD);  // no timeout: evaluation on rank 0 may take long
      MPI_Bcast(&stop_all, 1, MPI_INT, 0, MPI_COMM_WORLD);
    }
    if (stop_all) return 3;
    if (!failed.empty()) {
      // Not finished: rerunning the same command keeps the methods that are
      // done and evaluates the failed ones again.
      std::string names;
      for (const auto& f : failed) names += (names.empty() ? "" : ", ") + f;
      const std::string msg = detail::cat(failed.size(), " of the requested evaluations failed: ", names,
                                          " (messages in /status/eval/<method>/message); rerun the same command to "
                                          "retry them");
      sink.failed(msg);
      std::fflush(stdout);
      std::fprintf(stderr, "dsrsq: %s\n", msg.c_str());
      if (opt.command != "train" && !opt.no_report && rank == 0) write_report(sink.path());
      return 1;
    }
    sink.finish();
    std::printf("dsrsq: done in %.1f s; results in %s\n", total.seconds(), sink.path().c_str());
    if (opt.command != "train" && !opt.no_report && rank == 0) write_report(sink.path());
    return 0;
  } catch (const std::exception& e) {
    // Refused before run.h5 was opened (a foreign run.h5, a checkpoint of
    // another config): nothing ran, the error stays an input error (exit 2).
    if (!sink.failed(e.what())) throw;
    throw RunFailed(e.what());
  }
}

}  // namespace dsrsq
