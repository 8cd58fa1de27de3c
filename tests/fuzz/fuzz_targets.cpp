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
// in executions per second. Removed at exit.
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
  std::string command = "run", model, dataset, tokenizer;
  bool dry_run = false, debug = false;
  std::int64_t d_model = 0, n_heads = 0, n_layers = 0, d_ff = 0, steps = 0, batch_size = 0, max_seq_len = 0;
  std::int64_t num_train = 0, num_val = 0, num_test = 0, val_every = 0, log_every = 0, checkpoint_every = 0;
  std::int64_t max_new_tokens = 0, warmup = 0;
  int threads = 0;
  double learning_rate = 0, weight_decay = 0;
  std::vector<std::int64_t> context_sizes;
  std::vector<std::string> methods, task_params, config;
  po::options_description desc;
  desc.add_options()
    ("help,h", "")("version", "")
    ("command", po::value(&command)->default_value(command), "")
    ("config", po::value(&config)->composing(), "")
    ("dry_run", po::bool_switch(&dry_run), "")("debug", po::bool_switch(&debug), "")
    ("seed", po::value<std::string>()->default_value("0"), "")
    ("threads", po::value(&threads)->default_value(threads), "")
    ("model", po::value(&model), "")("dataset", po::value(&dataset), "")("tokenizer", po::value(&tokenizer), "")
    ("d_model", po::value(&d_model), "")("n_heads", po::value(&n_heads), "")("n_layers", po::value(&n_layers), "")
    ("d_ff", po::value(&d_ff), "")("steps", po::value(&steps), "")("batch_size", po::value(&batch_size), "")
    ("max_seq_len", po::value(&max_seq_len), "")("num_train", po::value(&num_train), "")
    ("num_val", po::value(&num_val), "")("num_test", po::value(&num_test), "")
    ("val_every", po::value(&val_every), "")("log_every", po::value(&log_every), "")
    ("checkpoint_every", po::value(&checkpoint_every), "")("max_new_tokens", po::value(&max_new_tokens), "")
    ("warmup", po::value(&warmup), "")
    ("learning_rate", po::value(&learning_rate), "")("weight_decay", po::value(&weight_decay), "")
    ("context_sizes", po::value(&context_sizes)->multitoken(), "")
    ("methods", po::value(&methods)->multitoken(), "")
    ("task_param", po::value(&task_params)->composing(), "");
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
