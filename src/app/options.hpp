#pragma once
// Every option of the dsrsq program, settable on the command line or in an
// .ini file (--config); the command line wins. Defaults are the debug-size
// main job (configs/debug.ini spells them out).
#include <cstdint>
#include <string>
#include <vector>

namespace dsrsq {

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
  std::int64_t max_pos = 0;  // 0: max_seq_len
  std::string init_from;     // checkpoint to start from

  // Data
  std::string dataset = "needle";
  std::string data_dir;
  std::string datasets_dir = "datasets";  // committed fixtures and haystack text
  std::string tokenizer = "byte";
  std::string tokenizer_model;
  std::string gpt2_dir;  // encoder.json + vocab.bpe: also report context lengths in GPT-2 tokens
  std::vector<std::int64_t> context_sizes{64, 128, 192};  // training curriculum and test lengths (tokens)
  std::int64_t max_seq_len = 256;
  std::int64_t num_train = 6000, num_val = 64, num_test = 120;
  // key=value pairs passed to the task generator; the default applies to the
  // default dataset (needle) only: 4-digit magic numbers, learnable in minutes.
  std::vector<std::string> task_params{"digits=4"};

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
  std::int64_t checkpoint_every = 200;
  std::int64_t keep_checkpoints = 2;
  std::int64_t val_every = 100;
  std::int64_t log_every = 25;
  std::int64_t stop_after = 0;  // > 0: checkpoint and stop (exit 3) once this many steps are done; rerun resumes
  std::int64_t milestone_every = 0;  // > 0: checkpoints at multiples of this step are never pruned
  double max_walltime = 0;           // > 0: seconds; checkpoint and stop (exit 3) before this much wall time has passed

  // DSRSQ (--model dsrsq; DESIGN.md section 8). Defaults are the debug size;
  // configs/paper.ini has the paper's settings.
  std::int64_t dsr_d_r = 32;          // retriever's reduced dimension
  double dsr_base_budget = 0.25;      // base budget in tokens (< 1: a fraction of the context)
  double dsr_alpha = 0.5;             // budget = base * (1 + alpha * complexity)
  std::int64_t dsr_span = 3;          // tokens kept after each top token
  std::int64_t dsr_conv_width = 4;    // local-context convolution taps
  double dsr_lambda = 0.1;            // reward = task score - lambda * selected fraction
  std::int64_t sqa_clusters = 8;      // k-means clusters of keys per head
  std::int64_t sqa_top_clusters = 4;  // clusters each query attends to
  std::int64_t sqa_lloyd_steps = 3;
  std::int64_t rckv_d_c = 32;         // latent size per token (keys and values each)
  std::int64_t rckv_buffer = 0;       // compressed slots per layer (0: sized from --kv_budget)
  std::int64_t rckv_window = 16;      // recent tokens kept uncompressed
  double rckv_tau = 0.0;              // eviction temperature (0: evict the least important)
  bool rckv_observe = false;          // prompt tokens' importance from the question's attention (SnapKV-style)
  std::vector<double> hof_weights{1.0, 0.5, 0.3, 0.2};  // task, retrieval, compression, compute
  std::int64_t hof_ramp = 300;        // steps over which the three efficiency weights ramp up from 0
  std::vector<std::string> ablation_variants{"full_model", "no_dsr", "no_sqa", "no_rckv"};

  // Evaluation
  std::vector<std::string> methods{"full", "sliding_window"};
  std::string kv_budget = "0.5";  // fraction of the full cache, or bytes with a unit (e.g. 512KiB)
  std::int64_t max_new_tokens = 12;
  bool ablation = false;

  // Parallel
  int dp = 1, sp = 1;
  double comm_timeout = 300.0;

  // The resolved configuration as sorted "key = value" lines, and its hash
  // (run identity: everything that changes results; not output paths or --overwrite).
  std::string resolved_text() const;
  std::string identity_hash() const;
};

// Parses argv and the --config files. Throws dsrsq::Error with one clear line
// (naming the option, file and line) on bad input. Returns false when the
// program should exit 0 right away (--help, --version printed).
bool parse_options(int argc, const char* const* argv, Options& out);

std::string version_text();

}  // namespace dsrsq
