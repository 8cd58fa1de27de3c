#pragma once
// Training checkpoints: one HDF5 file per save, written to <path>.tmp and
// renamed into place, so a crash never leaves a half-written file under the
// real name. Buffers are chunked with Fletcher-32 checksums: a damaged file
// fails to load with one dsrsq::Error naming the file and the problem.
//
// Layout (format "dsrsq-checkpoint", version 1):
//   /                attrs: format, format_version, config_hash, step, epoch, adam_steps, n_params
//   /model_config    attrs: one string per model option
//   /data_cursor     int64[n]      position of each data stream
//   /rng_states      uint64[n]     generator states
//   /buffers/params, /buffers/adam_m, /buffers/adam_v   float32[n_params] (adam_* may be empty)
//   /extra/<name>    float32[k]    anything else (DSR baselines, ...)
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace dsrsq::io {

inline constexpr const char* kCheckpointFormat = "dsrsq-checkpoint";
inline constexpr std::int64_t kCheckpointVersion = 1;

struct CheckpointState {
  std::string format = kCheckpointFormat;  // filled by load; save always writes the constants
  std::int64_t format_version = kCheckpointVersion;
  std::string config_hash;
  std::vector<std::pair<std::string, std::string>> model_config;
  std::int64_t step = 0, epoch = 0;
  std::vector<std::int64_t> data_cursor;
  std::vector<std::uint64_t> rng_states;
  std::vector<float> params, adam_m, adam_v;  // adam_m / adam_v: empty or params.size()
  std::int64_t adam_steps = 0;
  std::map<std::string, std::vector<float>> extra;
};

void save_checkpoint(const std::string& path, const CheckpointState& state);
CheckpointState load_checkpoint(const std::string& path);

// <dir>/ckpt_<step>.h5 — the only names prune_checkpoints() touches.
std::string checkpoint_path(const std::string& dir, std::int64_t step);
// (step, path) of every ckpt_<step>.h5 in dir, by increasing step.
std::vector<std::pair<std::int64_t, std::string>> list_checkpoints(const std::string& dir);
std::optional<std::string> latest_checkpoint(const std::string& dir);
// Keep the keep_last newest checkpoints plus every one whose step is a
// multiple of milestone_every (0 = no milestones); delete the other
// ckpt_<step>.h5 files. Returns the deleted paths. Other files are never touched.
std::vector<std::string> prune_checkpoints(const std::string& dir, int keep_last, std::int64_t milestone_every);

}  // namespace dsrsq::io
