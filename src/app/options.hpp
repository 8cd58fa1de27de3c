#pragma once
// Every option of the dsrsq program, settable on the command line or in an
// .ini file (--config); the command line wins. Defaults are the debug-size
// main job (configs/debug.ini spells them out).
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace dsrsq {
namespace methods {
class MethodKnobs;
}

struct Options {
  // General
  std::string command = "run";  // train | eval | run
  std::vector<std::string> config_files;
  std::string command_line;  // as typed (provenance)
  bool dry_run = false;
  bool overwrite = false;
  bool resume = false;  // require an unfinished run of this configuration to continue
  bool debug = false;
  bool no_report = false;  // skip analysis/report.py at the end
  std::string output_dir = "results";
  std::string run_name;  // default: <model>_<dataset>
  std::uint64_t seed = 1234;
  std::string device = "cpu";
  int threads = 0;  // 0: OMP_NUM_THREADS or all cores

  // Model
  std::string model = "standard";
  std::int64_t d_model = 128, n_heads = 4, n_layers = 2, d_ff = 512;
  std::int64_t max_pos = 0;  // 0: auto_max_pos()
  double rope_theta = 10000.0;  // RoPE base
  double attn_log_scale = 0.0;  // log-length query scaling base (0: off)
  std::string init_from;     // checkpoint to start from

  // Data
  std::string dataset = "needle";
  std::string data_dir;
  std::string datasets_dir = "datasets";  // committed fixtures and haystack text
  std::string tokenizer = "byte";
  std::string tokenizer_model;
  std::string gpt2_dir;  // encoder.json + vocab.bpe: also report context lengths in GPT-2 tokens
  std::vector<std::int64_t> context_sizes{64, 128, 192};  // training curriculum (and the test lengths by default)
  // Test lengths: one evaluation cell per size (and budget); empty on the
  // command line: context_sizes (filled in by parse_options).
  std::vector<std::int64_t> eval_context_sizes;
  // Longest training prompt + answer. Not given and the largest training size
  // does not fit under the default: largest size + kAutoHeadroom.
  std::int64_t max_seq_len = 256;
  // Room for [BOS] [SEP] question [ANS] answer beside the context: what the
  // defaults leave (256 - 192); used where max_seq_len / max_pos follow the sizes.
  static constexpr std::int64_t kAutoHeadroom = 64;
  std::int64_t num_train = 6000, num_val = 64, num_test = 120;
  // key=value pairs passed to the task generator; the default applies to the
  // default dataset (needle) only: 4-digit magic numbers, learnable in minutes.
  std::vector<std::string> task_params{"digits=4"};
  // Training and validation data from another synthetic task (empty: --dataset),
  // with its own generator parameters (issue 13: train on mq_recall, test on needle).
  std::string train_dataset;
  std::vector<std::string> train_task_params;

  // Training
  std::int64_t num_epochs = 0;  // > 0: train for epochs instead of steps
  std::int64_t steps = 1800;
  std::int64_t batch_size = 16;
  double learning_rate = 3e-3;
  std::int64_t warmup = 50;
  double weight_decay = 0.01;
  double clip_norm = 1.0;
  double curriculum = 0.5;
  double lm_weight = 0.1;   // weight of the LM loss on context and query tokens  // fraction of steps over which longer contexts are phased in
  double random_positions = 0.0;    // probability a training sequence gets sampled positions (Ruoss et al. 2023)
  std::int64_t position_range = 0;  // positions are sampled from [0, position_range) (0: the model's max_pos)
  std::int64_t checkpoint_every = 200;
  std::int64_t keep_checkpoints = 2;
  std::int64_t val_every = 100;
  std::int64_t log_every = 25;
  std::int64_t stop_after = 0;  // > 0: checkpoint and stop (exit 3) once this many steps are done; rerun resumes
  std::int64_t milestone_every = 0;  // > 0: checkpoints at multiples of this step are never pruned
  double max_walltime = 0;           // > 0: seconds; checkpoint and stop (exit 3) before this much wall time has passed

  // Each method's own settings (src/methods; under its heading in --help),
  // by method name. Shared by copies of these options.
  std::map<std::string, std::shared_ptr<methods::MethodKnobs>> knobs;
  // Ablation variants of the trained method (--ablation); empty: all of them.
  std::vector<std::string> ablation_variants;

  // Evaluation
  std::vector<std::string> methods;  // empty: default_methods(model)
  static std::vector<std::string> default_methods(const std::string& model);
  std::string protocol = "query_aware";  // query_aware | context_only | reuse
  // KV budgets (one evaluation cell per budget and eval context size): each a
  // fraction of the full cache or bytes with a unit (e.g. 512KiB).
  std::vector<std::string> kv_budget{"0.5"};
  std::int64_t max_new_tokens = 12;
  bool ablation = false;

  // Parallel
  int dp = 1, sp = 1;
  double comm_timeout = 300.0;

  // Warnings found while parsing (e.g. a method's option for a method the run
  // does not use); rank 0 prints them.
  std::vector<std::string> warnings;

  // The resolved configuration as sorted "key = value" lines, and its hash
  // (run identity: everything that changes results; not output paths or --overwrite).
  std::string resolved_text() const;
  // The model's position limit: --max_pos when given, else the larger of
  // max_seq_len and the largest eval context size + the room training sizes
  // have under max_seq_len (so evaluating longer contexts needs no option).
  std::int64_t auto_max_pos() const;
  std::string identity_hash() const;
};

// Parses argv and the --config files. Throws dsrsq::Error with one clear line
// (naming the option, file and line) on bad input. Returns false when the
// program should exit 0 right away (--help, --version printed).
bool parse_options(int argc, const char* const* argv, Options& out);

std::string version_text();

}  // namespace dsrsq
