#include "fuzz_targets.hpp"

#include <unistd.h>

#include <boost/program_options.hpp>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "app/ini.hpp"
#include "core/error.hpp"
#include "data/readers.hpp"

namespace fs = std::filesystem;
namespace po = boost::program_options;

namespace dsrsq::fuzz {
namespace {

// One scratch folder per process (libFuzzer -jobs/-workers run several), in
// /dev/shm when there is one: a disk-backed /tmp costs an order of magnitude
// in executions per second. Removed at a normal exit (the replay test); libFuzzer
// ends with _Exit, so after a fuzzing run the folder (one small file) stays.
struct Scratch {
  fs::path dir;
  Scratch() {
    const fs::path base = fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    dir = base / ("dsrsq_fuzz_" + std::to_string(::getpid()));
    fs::create_directories(dir);
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

fs::path write_scratch(const char* ext, std::string_view bytes) {
  static const Scratch scratch;
  const fs::path p = scratch.dir / (std::string("input") + ext);
  std::ofstream(p, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return p;
}

// Option kinds the program has: switches, strings, integers, doubles and
// multi-token lists, named as in src/app/options.cpp.
struct Bound {
  std::string command = "run", model, dataset, tokenizer;
  bool dry_run = false, debug = false;
  std::int64_t d_model = 0, n_heads = 0, n_layers = 0, d_ff = 0, steps = 0, batch_size = 0, max_seq_len = 0;
  std::int64_t num_train = 0, num_val = 0, num_test = 0, val_every = 0, log_every = 0, checkpoint_every = 0;
  std::int64_t max_new_tokens = 0, warmup = 0;
  int threads = 0;
  double learning_rate = 0, weight_decay = 0;
  std::vector<std::int64_t> context_sizes;
  std::vector<std::string> methods, task_params, config;
};

void describe(Bound& v, po::options_description& desc) {
  desc.add_options()
    ("help,h", "")("version", "")
    ("command", po::value(&v.command)->default_value(v.command), "")
    ("config", po::value(&v.config)->composing(), "")
    ("dry_run", po::bool_switch(&v.dry_run), "")("debug", po::bool_switch(&v.debug), "")
    ("seed", po::value<std::string>()->default_value("0"), "")
    ("threads", po::value(&v.threads)->default_value(v.threads), "")
    ("model", po::value(&v.model), "")("dataset", po::value(&v.dataset), "")("tokenizer", po::value(&v.tokenizer), "")
    ("d_model", po::value(&v.d_model), "")("n_heads", po::value(&v.n_heads), "")("n_layers", po::value(&v.n_layers), "")
    ("d_ff", po::value(&v.d_ff), "")("steps", po::value(&v.steps), "")("batch_size", po::value(&v.batch_size), "")
    ("max_seq_len", po::value(&v.max_seq_len), "")("num_train", po::value(&v.num_train), "")
    ("num_val", po::value(&v.num_val), "")("num_test", po::value(&v.num_test), "")
    ("val_every", po::value(&v.val_every), "")("log_every", po::value(&v.log_every), "")
    ("checkpoint_every", po::value(&v.checkpoint_every), "")("max_new_tokens", po::value(&v.max_new_tokens), "")
    ("warmup", po::value(&v.warmup), "")
    ("learning_rate", po::value(&v.learning_rate), "")("weight_decay", po::value(&v.weight_decay), "")
    ("context_sizes", po::value(&v.context_sizes)->multitoken(), "")
    ("methods", po::value(&v.methods)->multitoken(), "")
    ("task_param", po::value(&v.task_params)->composing(), "");
}

}  // namespace


void readers_one(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return;
  const unsigned pick = data[0] % 9u;
  const std::string_view body(reinterpret_cast<const char*>(data) + 1, size - 1);
  data::ReadOptions opt;
  opt.warn = [](const std::string&) {};
  opt.max_examples = (data[0] / 9u) % 2u ? 2 : 0;  // the max_examples path too
  try {
    switch (pick) {
      case 0: data::read_nq(write_scratch(".jsonl", body), opt); break;
      case 1: data::read_eli5(write_scratch(".jsonl", body), opt); break;
      case 2: data::read_cnn_dm_story(write_scratch(".story", body)); break;
      case 3: data::read_cnn_dm_csv(write_scratch(".csv", body), opt); break;
      case 4: data::read_s2orc(write_scratch(".jsonl", body), opt); break;
      case 5: data::read_github(write_scratch(".jsonl", body), opt); break;
      case 6: data::read_codesearchnet(write_scratch(".jsonl", body), opt); break;
      case 7: data::read_longbench(write_scratch(".jsonl", body), opt); break;
      default: data::parse_csv(body, "<fuzz>"); break;
    }
  } catch (const dsrsq::Error&) {
    // clean input error
  }
}

void ini_one(const std::uint8_t* data, std::size_t size) {
  const fs::path p = write_scratch(".ini", std::string_view(reinterpret_cast<const char*>(data), size));
  // The description is built once (each input's notify overwrites the bound
  // values), not per input: the harness measures the reader, not its setup.
  static Bound v;
  static po::options_description desc;
  static const bool described = (describe(v, desc), true);
  (void)described;
  try {
    std::istringstream text(read_ini(p.string(), desc));
    po::variables_map vm;
    po::store(po::parse_config_file(text, desc), vm);
    po::notify(vm);
  } catch (const dsrsq::Error&) {
  } catch (const po::error&) {
    // parse_options turns these into a dsrsq::Error naming the file
  }
}

}  // namespace dsrsq::fuzz
