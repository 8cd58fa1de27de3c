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

#include "core/rng.hpp"
#include "core/timer.hpp"
#include "data/readers.hpp"
#include "data/tasks.hpp"
#include "data/tokenizer.hpp"
#include "dist/dp_reducer.hpp"
#include "dist/grid.hpp"
#include "dist/ring_attention.hpp"
#include "methods/dsrsq_model.hpp"
#include "io/checkpoint.hpp"
#include "io/run_dir.hpp"
#include "kv/kv_policy.hpp"
#include "eval/evaluator.hpp"
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

// Examples of one split. Synthetic tasks: `n` examples spread over the context
// sizes (and, for needle, over a depth grid); real datasets: read from --data_dir.
std::vector<data::Example> make_split(const Options& opt, const Tokenizer& tok, std::int64_t n, std::uint64_t seed,
                                      bool grid) {
  if (opt.dataset == "nq" || opt.dataset == "eli5" || opt.dataset == "cnn_dm" || opt.dataset == "github" ||
      opt.dataset == "codesearchnet" || opt.dataset == "s2orc" || opt.dataset == "longbench") {
    data::ReadOptions ro;
    auto all = data::load_dataset(opt.dataset, opt.data_dir, ro);
    Rng rng(seed);
    std::vector<data::Example> out;
    for (std::int64_t i = 0; i < n && !all.empty(); ++i) out.push_back(all[rng.below(all.size())]);
    return out;
  }
  const data::TokenCounter count = [&tok](std::string_view s) { return tok.encode(s).size(); };
  std::vector<data::Example> out;
  const std::size_t nsizes = opt.context_sizes.size();
  const std::vector<double> depths{0.1, 0.3, 0.5, 0.7, 0.9};
  std::uint64_t sub = 0;
  for (std::size_t si = 0; si < nsizes; ++si) {
    const std::int64_t per_size = n / static_cast<std::int64_t>(nsizes) + (static_cast<std::int64_t>(si) < n % static_cast<std::int64_t>(nsizes) ? 1 : 0);
    if (per_size == 0) continue;
    data::TaskParams p = task_params(opt);
    p["length"] = std::to_string(opt.context_sizes[si]);
    if (opt.dataset == "needle" && grid && !p.count("depth")) {
      for (std::size_t di = 0; di < depths.size(); ++di) {
        const std::int64_t k = per_size / static_cast<std::int64_t>(depths.size()) + (static_cast<std::int64_t>(di) < per_size % static_cast<std::int64_t>(depths.size()) ? 1 : 0);
        if (k == 0) continue;
        p["n"] = std::to_string(k);
        std::ostringstream d;
        d << depths[di];
        p["depth"] = d.str();
        auto v = data::make_task(opt.dataset, p, seed * 1000 + sub++, count);
        out.insert(out.end(), v.begin(), v.end());
      }
    } else {
      if (opt.dataset == "needle" && !p.count("depth")) p["depth"] = "-1";
      p["n"] = std::to_string(per_size);
      auto v = data::make_task(opt.dataset, p, seed * 1000 + sub++, count);
      out.insert(out.end(), v.begin(), v.end());
    }
  }
  return out;
}

void print_tables(const std::vector<MethodEval>& results, const std::string& budget) {
  std::printf("\nTask performance (test split, KV budget %s)\n", budget.c_str());
  std::printf("  %-16s %8s %8s %8s %8s %8s\n", "method", "F1", "EM", "ROUGE-L", "BLEU", "n");
  for (const auto& r : results)
    std::printf("  %-16s %8.4f %8.4f %8.4f %8.4f %8zu\n", r.method.c_str(), r.f1, r.em, r.rouge_l, r.bleu,
                r.examples.size());
  std::printf("\nEfficiency (means over examples; memory = activations + KV)\n");
  std::printf("  %-16s %12s %12s %12s %12s %10s %10s %10s\n", "method", "peak_MB", "avg_MB", "KV_resident", "KV_read/step",
              "tok/s", "TTFT_ms", "tok_eff");
  for (const auto& r : results) {
    double kv_res = 0, kv_read = 0;
    for (const auto& e : r.examples) {
      kv_res += static_cast<double>(e.kv.resident_after_prefill);
      kv_read += static_cast<double>(e.kv.read_per_step);
    }
    const double n = std::max<double>(1.0, static_cast<double>(r.examples.size()));
    std::printf("  %-16s %12.3f %12.3f %12.0f %12.0f %10.0f %10.2f %10.3f\n", r.method.c_str(), r.peak_mem_bytes / 1e6,
                r.avg_mem_bytes / 1e6, kv_res / n, kv_read / n, r.throughput_tok_s, r.latency_s * 1e3,
                r.token_efficiency);
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
  std::unique_ptr<dist::ProcessGrid> grid;
  if (world > 1) {
    grid = std::make_unique<dist::ProcessGrid>(MPI_COMM_WORLD, opt.dp, opt.sp, opt.comm_timeout);
    dist::comm_self_test(grid->world());
  }
  if (opt.threads > 0) omp_set_num_threads(opt.threads);

  auto tok = make_tokenizer(opt.tokenizer, opt.tokenizer_model);
  ModelConfig mc;
  mc.vocab = static_cast<std::int64_t>(tok->vocab_size());
  mc.d_model = opt.d_model;
  mc.n_heads = opt.n_heads;
  mc.n_layers = opt.n_layers;
  mc.d_ff = opt.d_ff;
  // Sequence parallelism pads batches to a multiple of 2 sp tokens.
  mc.max_pos = opt.max_pos ? opt.max_pos : (opt.max_seq_len + 2 * opt.sp - 1) / (2 * opt.sp) * (2 * opt.sp);
  mc.validate();
  const KVBudget budget = parse_kv_budget(opt.kv_budget);

  if (opt.dry_run) {
    std::printf("# resolved configuration (hash %s)\n%s", opt.identity_hash().c_str(), opt.resolved_text().c_str());
    const double P = static_cast<double>(mc.num_parameters()) * 4;
    const double N = static_cast<double>(opt.batch_size * opt.max_seq_len);
    const double act = N * 4.0 * static_cast<double>(mc.n_layers) * (10.0 * static_cast<double>(mc.d_model) + 2.0 * static_cast<double>(mc.d_ff)) +
                       N * 4.0 * 2.0 * static_cast<double>(mc.vocab);
    std::printf("# memory estimate per rank (bytes)\n");
    std::printf("parameters        %14.0f\ngradients         %14.0f\noptimizer_state   %14.0f\nactivations       %14.0f\n", P, P,
                2 * P, act);
    for (const auto& m : opt.methods) {
      const double full = static_cast<double>(KVBudget::full_bytes(mc, opt.max_seq_len));
      const double b = m == "full" ? full : static_cast<double>(budget.resolve(mc, opt.max_seq_len));
      std::printf("kv_cache[%s] %*s%14.0f   (at max_seq_len %lld)\n", m.c_str(), static_cast<int>(std::max<std::size_t>(1, 6 - std::min<std::size_t>(6, m.size()))), "", b,
                  static_cast<long long>(opt.max_seq_len));
    }
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
  std::printf(", max_seq_len %lld\n", static_cast<long long>(opt.max_seq_len));
  auto test = make_split(opt, *tok, opt.num_test, opt.seed * 3 + 2, true);
  if (!opt.gpt2_dir.empty()) {
    // Context lengths also in GPT-2 tokens, as the literature reports them.
    const Gpt2Bpe bpe(opt.gpt2_dir);
    double sum = 0;
    for (auto& e : test) {
      const std::size_t n = bpe.count(e.context);
      e.meta["context_gpt2_tokens"] = std::to_string(n);
      sum += static_cast<double>(n);
    }
    std::printf("dsrsq: test contexts average %.1f GPT-2 tokens\n", test.empty() ? 0.0 : sum / static_cast<double>(test.size()));
  }
  std::vector<std::vector<Encoded>> pools;
  std::vector<Encoded> val;
  if (opt.command != "eval") {
    const Options& o = opt;
    for (std::size_t si = 0; si < o.context_sizes.size(); ++si) {
      Options one = o;
      one.context_sizes = {o.context_sizes[si]};
      const auto ex = make_split(one, *tok, std::max<std::int64_t>(1, o.num_train / static_cast<std::int64_t>(o.context_sizes.size())),
                                 o.seed * 3 + 0 + 7919 * si, false);
      std::vector<Encoded> enc;
      for (const auto& e : ex) enc.push_back(encode_example(e, *tok, o.max_seq_len));
      pools.push_back(std::move(enc));
    }
    for (const auto& e : make_split(opt, *tok, opt.num_val, opt.seed * 3 + 1, false))
      val.push_back(encode_example(e, *tok, opt.max_seq_len));
  }
  std::optional<io::CheckpointState> init;
  if (!opt.init_from.empty()) {
    init = io::load_checkpoint(opt.init_from);
    DSRSQ_INPUT_CHECK(static_cast<std::int64_t>(init->params.size()) == mc.num_parameters(), "option --init_from: '",
                      opt.init_from, "' holds ", init->params.size(), " parameters, this model has ",
                      mc.num_parameters());
  }

  ResultsSink sink(opt, mc, *tok, rank);
  if (sink.skip()) return 0;
  {
    // Dataset identity: a hash over the test split (what every method is scored on).
    std::string all;
    for (const auto& e : test) {
      all += e.id + '\x1f' + e.context + '\x1f' + e.query + '\x1f';
      for (const auto& a : e.answers) all += a + '\x1e';
    }
    sink.open(fnv1a64_hex(all));
  }
  std::printf("dsrsq: %zu training pools, %zu validation, %zu test examples (%.1f s)\n", pools.size(), val.size(),
              test.size(), total.seconds());

  // ---- model ----
  Transformer model(mc, cpu_backend());
  model.init_weights(opt.seed);
  AdamWConfig ac;
  ac.lr = opt.learning_rate;
  ac.weight_decay = opt.weight_decay;
  ac.clip_norm = opt.clip_norm;
  AdamW adam(model.params(), model.flat_params(), ac, cpu_backend());
  // DSRSQ: the retriever and RCKV projections beside the backbone, with their own AdamW.
  std::unique_ptr<DsrsqModel> dm;
  std::unique_ptr<AdamW> adam_extra;
  if (opt.model == "dsrsq") {
    dm = std::make_unique<DsrsqModel>(model, DsrsqSettings::from_options(opt, mc), cpu_backend());
    dm->init(opt.seed);
    adam_extra = std::make_unique<AdamW>(dm->extra_params(), dm->extra_flat(), ac, cpu_backend());
  }
  std::map<std::string, std::vector<float>> extra_ck;
  std::int64_t start = sink.restore(model, adam, &extra_ck);
  if (dm && !extra_ck.empty()) {
    const std::int64_t steps = dm->load(extra_ck, adam_extra->m(), adam_extra->v());
    DSRSQ_INPUT_CHECK(steps >= 0 || start == 0, "checkpoint of this DSRSQ run holds no DSRSQ state");
    if (steps >= 0) adam_extra->set_steps(steps);
  }
  if (grid) {
    // Rank 0 read the checkpoint (if any): every rank starts from its state.
    std::int64_t st[3] = {start, adam.steps(), adam_extra ? adam_extra->steps() : 0};
    grid->world().broadcast(std::span<std::int64_t>(st, 3), 0);
    start = st[0];
    adam.set_steps(st[1]);
    for (TensorView t : {model.flat_params(), adam.m(), adam.v()})
      grid->world().broadcast(std::span<float>(t.ptr<float>(), static_cast<std::size_t>(t.numel())), 0);
    if (dm) {
      adam_extra->set_steps(st[2]);
      for (TensorView t : {dm->extra_flat(), adam_extra->m(), adam_extra->v()})
        grid->world().broadcast(std::span<float>(t.ptr<float>(), static_cast<std::size_t>(t.numel())), 0);
      double b[2] = {dm->baseline().initialized() ? 1.0 : 0.0, dm->baseline().value()};
      grid->world().broadcast(std::span<double>(b, 2), 0);
      dm->baseline() = retrieval::MovingAverageBaseline(dm->settings().dsr.baseline_decay);
      if (b[0] > 0) dm->baseline().update(b[1]);
    }
  }
  if (init && start == 0) {
    std::memcpy(model.flat_params().data, init->params.data(), init->params.size() * sizeof(float));
    std::printf("dsrsq: initialised from %s (step %lld)\n", opt.init_from.c_str(), static_cast<long long>(init->step));
  }
  // A DSRSQ checkpoint also carries the retriever and the RCKV projections
  // (e.g. evaluating a trained DSRSQ model: dsrsq eval --model dsrsq --init_from ...).
  const bool dsrsq_init = dm && init && start == 0 && dm->load_params(init->extra);
  if (dsrsq_init) std::printf("dsrsq: the retriever and RCKV projections come from %s too\n", opt.init_from.c_str());
  init.reset();
  if (dm && start == 0 && !pools.empty() && !dsrsq_init) {
    // RCKV projections from the backbone's own keys and values (PCA).
    std::vector<const Encoded*> calib;
    for (const auto& e : pools.back()) {
      if (calib.size() >= 16) break;
      calib.push_back(&e);
    }
    dm->init_projections_pca(calib, tok->pad_id());
  }

  if (opt.command != "eval") {
    TrainConfig tc;
    std::int64_t per_epoch = 0;
    for (const auto& p : pools) per_epoch += static_cast<std::int64_t>(p.size());
    per_epoch = (per_epoch + opt.batch_size - 1) / opt.batch_size;
    tc.steps = opt.num_epochs > 0 ? opt.num_epochs * per_epoch : opt.steps;
    tc.batch_size = opt.batch_size;
    tc.warmup = opt.warmup;
    tc.lr = opt.learning_rate;
    tc.curriculum = opt.curriculum;
    tc.lm_weight = opt.lm_weight;
    tc.val_every = opt.val_every;
    tc.log_every = opt.log_every;
    tc.seed = opt.seed;
    tc.peak_gflops = measure_sgemm_peak();
    std::printf("dsrsq: training %s (%lld parameters) for %lld steps from step %lld; sgemm peak now %.0f GFLOP/s\n",
                mc.str().c_str(), static_cast<long long>(mc.num_parameters()), static_cast<long long>(tc.steps),
                static_cast<long long>(start), tc.peak_gflops);
    DataParallel dp;
    std::unique_ptr<dist::GradReducer> reducer;
    std::unique_ptr<dist::RingAttention> ring;
    if (grid) {
      // Every rank's gradient is a partial sum of the global one (its dp shard
      // of sequences, its sp shard of their tokens): sum over the whole world.
      reducer = std::make_unique<dist::GradReducer>(grid->world(), model);
      reducer->attach(model);
      dp.comm = &grid->dp_comm();
      dp.world = &grid->world();
      if (opt.sp > 1) {
        dp.sp_comm = &grid->sp_comm();
        ring = std::make_unique<dist::RingAttention>(cpu_backend(), grid->sp_comm());
        model.attention_override = ring.get();
      }
      dp.reduce_gradients = [&] { reducer->finish(); };
      dp.last_comm_seconds = [&] { return reducer->stats().last_wait_seconds; };
    }
    MethodHooks hooks;
    if (dm) {
      model.save_pre_rope_keys = true;  // the compression loss reads them
      // SQA is the training attention (ring attention takes its place under sp).
      if (!model.attention_override) model.attention_override = dm->sqa_override();
      if (grid && opt.sp > 1) dm->set_sp_comm(&grid->sp_comm());
      const DsrsqSettings& ds = dm->settings();
      hooks.task_weight = ds.g[0];
      const std::int32_t pad = tok->pad_id();
      hooks.make_batch = [&dm, pad, &opt](const std::vector<const Encoded*>& seqs, std::int64_t step, float lm,
                                          std::int64_t mult, bool training) {
        return dm->training_batch(seqs, pad, lm,
                                  training ? std::optional<std::uint64_t>(opt.seed * 1000003ull + static_cast<std::uint64_t>(step))
                                           : std::nullopt,
                                  mult);
      };
      hooks.after_backward = [&](std::int64_t step, const HostBatch& local, const std::vector<double>& answer_loss,
                                 StepStats& st) {
        const bool lead = !grid || grid->sp_rank() == 0;
        const HofTerms h = dm->hof_terms(step, local, answer_loss, grid ? &grid->world() : nullptr, lead,
                                         static_cast<double>(opt.batch_size));
        st.loss_retrieval = h.retrieval;
        st.loss_compression = h.compression;
        st.loss_compute = h.compute;
        st.selected_fraction = h.selected_fraction;
        st.loss = h.ramp * (ds.g[1] * h.retrieval + ds.g[2] * h.compression + ds.g[3] * h.compute);
      };
      hooks.extra_step = [&](double lr) { adam_extra->step(lr); };
      // RCKV in the training forward: the backbone reads reconstructed K/V where inference will.
      model.kv_transform = dm->kv_transform();
      hooks.before_forward = [&](const HostBatch& local, bool training) {
        if (training) dm->zero_extra_grad();  // the task loss reaches P and U through the transform
        dm->kv_transform()->set_rows(local.compress);
      };
    }
    Trainer trainer(model, adam, tc, pools, val, tok->pad_id(), dp, hooks);
    TrainCallbacks cb;
    cb.on_val = [&](std::int64_t step, double vl) { sink.val(step, vl); };
    cb.checkpoint_every = opt.checkpoint_every;
    cb.on_checkpoint = [&](std::int64_t step) {
      std::map<std::string, std::vector<float>> extra;
      if (dm) dm->save(extra, adam_extra->m(), adam_extra->v(), adam_extra->steps());
      sink.checkpoint(step, model, adam, extra);
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
    model.attention_override = nullptr;
    model.kv_transform = nullptr;
    if (dm) dm->set_sp_comm(nullptr);  // rank 0 evaluates alone
    model.save_pre_rope_keys = false;
    if (done < tc.steps) {
      std::printf("dsrsq: stopped at step %lld of %lld; rerun the same command to resume\n",
                  static_cast<long long>(done), static_cast<long long>(tc.steps));
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
  if (opt.command != "train" && rank == 0) {
    EvalConfig ec;
    ec.budget = budget;
    ec.max_new_tokens = opt.max_new_tokens;
    ec.max_seq_len = mc.max_pos;
    std::vector<MethodEval> results;
    // One evaluation: a method of --methods ("eval") or a DSRSQ variant ("ablation").
    auto evaluate = [&](const std::string& name, const std::string& kind, std::vector<MethodEval>& out) {
      if (eval_stopped || sink.should_stop()) {  // a stop signal during evaluation: stop between methods
        eval_stopped = true;
        return;
      }
      if (sink.method_done_before(name, kind)) {
        std::printf("dsrsq: %s/%s was evaluated by an earlier attempt of this run; its results are kept\n", kind.c_str(),
                    name.c_str());
        return;
      }
      sink.method_started(name, kind);
      try {
        EvalConfig e = ec;
        e.name = name;
        std::unique_ptr<KVPolicy> policy;
        if (name == "dsrsq" || kind == "ablation") {
          const DsrsqVariant v = DsrsqVariant::named(name == "dsrsq" ? "full_model" : name);
          policy = dm->make_policy(v);
          e.select = [&dm, v](const Encoded& enc) { return dm->select_prompt(enc, v); };
        } else {
          // Every method gets the same budget; `full` cannot shrink, so it records
          // the request and holds the whole cache (achieved > requested).
          policy = make_kv_policy(name, mc, cpu_backend());
        }
        Timer t;
        out.push_back(evaluate_method(model, *policy, *tok, test, e));
        std::printf("dsrsq: evaluated %s%-16s F1 %.4f EM %.4f on %zu examples (%.1f s)\n",
                    kind == "eval" ? "" : "ablation variant ", name.c_str(), out.back().f1, out.back().em,
                    out.back().examples.size(), t.seconds());
        sink.method_done(out.back(), kind);
      } catch (const std::exception& ex) {
        std::printf("dsrsq: %s %s FAILED: %s\n", kind.c_str(), name.c_str(), ex.what());
        sink.method_failed(name, ex.what(), kind);
      }
    };
    for (const auto& m : opt.methods) evaluate(m, "eval", results);
    print_tables(results, opt.kv_budget);
    if (opt.ablation) {
      std::vector<MethodEval> ablation;
      for (const auto& v : opt.ablation_variants) evaluate(v, "ablation", ablation);
      std::printf("\nablation (DSRSQ variants on the same weights, KV budget %s)\n", opt.kv_budget.c_str());
      print_tables(ablation, opt.kv_budget);
    }
  }
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
  sink.finish();
  std::printf("dsrsq: done in %.1f s; results in %s\n", total.seconds(), sink.path().c_str());
  if (opt.command != "train" && !opt.no_report && rank == 0) write_report(sink.path());
  return 0;
}

}  // namespace dsrsq
