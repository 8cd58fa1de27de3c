#include "io/checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <set>

#include "core/error.hpp"
#include "io/h5.hpp"
#include "io/run_dir.hpp"

namespace dsrsq::io {

namespace fs = std::filesystem;

namespace {

constexpr hsize_t kChunk = 1 << 20;  // elements per checksummed chunk (4 MiB of f32)

// An error's text without its "[rank/host] error: " prefix, to nest it in another message.
std::string bare(const std::exception& e) {
  const std::string m = e.what();
  const auto p = m.find("error: ");
  return p == std::string::npos ? m : m.substr(p + 7);
}

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  raise_input_error("cannot load checkpoint '" + path + "': " + what);
}

// Reads every buffer of a just-written checkpoint back, one checksummed chunk
// at a time (no second copy of the model in memory), and checks the sizes.
void verify_written(const std::string& path, const CheckpointState& s) {
  h5::File f(path, h5::File::Mode::read);
  const auto& root = f.root();
  auto same = [&](const std::string& what, std::size_t got, std::size_t want) {
    DSRSQ_INPUT_CHECK(got == want, "checkpoint '", path, "' reads back ", got, " values of ", what, ", ", want,
                      " were written");
  };
  DSRSQ_INPUT_CHECK(root.attr_int("step") == s.step, "checkpoint '", path, "' reads back another step");
  same("data_cursor", root.dataset("data_cursor").read_all<std::int64_t>().size(), s.data_cursor.size());
  same("rng_states", root.dataset("rng_states").read_all<std::uint64_t>().size(), s.rng_states.size());
  auto floats = [&](const std::string& name, std::size_t want) {
    const h5::Dataset d = root.dataset(name);
    const hsize_t n = d.size();
    same(name, static_cast<std::size_t>(n), want);
    for (hsize_t b = 0; b < n; b += kChunk) (void)d.read_range<float>(b, std::min<hsize_t>(kChunk, n - b));
  };
  floats("buffers/params", s.params.size());
  floats("buffers/adam_m", s.adam_m.size());
  floats("buffers/adam_v", s.adam_v.size());
  for (const auto& [k, v] : s.extra) floats("extra/" + k, v.size());
  f.close();
}

}  // namespace

void save_checkpoint(const std::string& path, const CheckpointState& s) {
  const std::size_t n = s.params.size();
  DSRSQ_INPUT_CHECK(s.adam_m.empty() || s.adam_m.size() == n, "save_checkpoint '", path, "': adam_m has ",
                    s.adam_m.size(), " values, params ", n);
  DSRSQ_INPUT_CHECK(s.adam_v.size() == s.adam_m.size(), "save_checkpoint '", path, "': adam_v has ", s.adam_v.size(),
                    " values, adam_m ", s.adam_m.size());
  const std::string tmp = path + ".tmp";
  try {
    {
      h5::File f(tmp, h5::File::Mode::truncate);
      {
        // Every group closes before the file (an open child postpones the
        // real close, and its write errors would be lost).
        const auto& root = f.root();
        root.set_attr("format", std::string(kCheckpointFormat));
        root.set_attr("format_version", kCheckpointVersion);
        root.set_attr("config_hash", s.config_hash);
        root.set_attr("step", s.step);
        root.set_attr("epoch", s.epoch);
        root.set_attr("adam_steps", s.adam_steps);
        root.set_attr("n_params", static_cast<std::int64_t>(n));
        {
          auto mc = root.create_group("model_config");
          for (const auto& [k, v] : s.model_config) mc.set_attr(k, v);
        }
        root.write_checked("data_cursor", s.data_cursor.data(), s.data_cursor.size(), kChunk);
        root.write_checked("rng_states", s.rng_states.data(), s.rng_states.size(), kChunk);
        {
          auto b = root.create_group("buffers");
          b.write_checked("params", s.params.data(), n, kChunk);
          b.write_checked("adam_m", s.adam_m.data(), s.adam_m.size(), kChunk);
          b.write_checked("adam_v", s.adam_v.data(), s.adam_v.size(), kChunk);
        }
        {
          auto e = root.create_group("extra");
          for (const auto& [k, v] : s.extra) {
            DSRSQ_INPUT_CHECK(!k.empty() && k.find('/') == std::string::npos,
                              "save_checkpoint: invalid extra buffer name '", k, "'");
            e.write_checked(k, v.data(), v.size(), kChunk);
          }
        }
      }
      f.close();  // flush + close, both checked
    }
    sync_path(tmp, false);
    // Read it back before it gets its final name: a file named ckpt_N.h5 is
    // always complete (every buffer passes its Fletcher-32 checksums).
    verify_written(tmp, s);
  } catch (const std::exception& e) {
    std::remove(tmp.c_str());
    raise_input_error(std::string("cannot write checkpoint '") + path + "' (nothing was renamed; the previous "
                      "checkpoints are untouched): " + bare(e));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    raise_input_error("save_checkpoint: cannot rename '" + tmp + "' to '" + path + "': " + ec.message());
  }
  sync_parent(path);
}

CheckpointState load_checkpoint(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) bad(path, "no such file");
  if (!fs::is_regular_file(path, ec)) bad(path, "not a regular file");
  h5::silence_errors();
  if (H5Fis_hdf5(path.c_str()) <= 0) bad(path, "not an HDF5 file");
  CheckpointState s;
  try {
    h5::File f(path, h5::File::Mode::read);
    const auto& root = f.root();
    if (!root.has_attr("format")) bad(path, "not a dsrsq checkpoint (no 'format' attribute on '/')");
    s.format = root.attr_string("format");
    if (s.format != kCheckpointFormat)
      bad(path, "wrong format '" + s.format + "' (expected '" + kCheckpointFormat + "')");
    s.format_version = root.attr_int("format_version");
    if (s.format_version != kCheckpointVersion)
      bad(path, "format version " + std::to_string(s.format_version) + ", this build reads " +
                    std::to_string(kCheckpointVersion));
    for (const char* g : {"model_config", "buffers", "extra"})
      if (!root.exists(g)) bad(path, std::string("missing group '/") + g + "'");
    for (const char* d : {"data_cursor", "rng_states", "buffers/params", "buffers/adam_m", "buffers/adam_v"})
      if (!root.exists(d)) bad(path, std::string("missing dataset '/") + d + "'");
    s.config_hash = root.attr_string("config_hash");
    s.step = root.attr_int("step");
    s.epoch = root.attr_int("epoch");
    s.adam_steps = root.attr_int("adam_steps");
    const auto n_params = root.attr_int("n_params");
    const auto mc = root.group("model_config");
    for (const auto& k : mc.attr_names()) s.model_config.emplace_back(k, mc.attr_string(k));
    s.data_cursor = root.dataset("data_cursor").read_all<std::int64_t>();
    s.rng_states = root.dataset("rng_states").read_all<std::uint64_t>();
    const auto b = root.group("buffers");
    s.params = b.dataset("params").read_all<float>();
    s.adam_m = b.dataset("adam_m").read_all<float>();
    s.adam_v = b.dataset("adam_v").read_all<float>();
    if (static_cast<std::int64_t>(s.params.size()) != n_params)
      bad(path, "wrong sizes: /buffers/params has " + std::to_string(s.params.size()) + " values, n_params says " +
                    std::to_string(n_params));
    if ((!s.adam_m.empty() && s.adam_m.size() != s.params.size()) || s.adam_v.size() != s.adam_m.size())
      bad(path, "wrong sizes: adam_m " + std::to_string(s.adam_m.size()) + ", adam_v " +
                    std::to_string(s.adam_v.size()) + ", params " + std::to_string(s.params.size()));
    const auto e = root.group("extra");
    for (const auto& k : e.children()) s.extra[k] = e.dataset(k).read_all<float>();
  } catch (const Error& err) {
    const std::string msg = err.what();
    if (msg.rfind("cannot load checkpoint", 0) == 0) throw;
    bad(path, "unreadable (truncated or corrupted?): " + msg);
  }
  return s;
}

std::string checkpoint_path(const std::string& dir, std::int64_t step) {
  DSRSQ_INPUT_CHECK(step >= 0, "checkpoint step must be >= 0, got ", step);
  return (fs::path(dir) / ("ckpt_" + std::to_string(step) + ".h5")).string();
}

namespace {
// ckpt_<digits>.h5 exactly; returns -1 otherwise.
std::int64_t step_of(const std::string& name) {
  const std::string pre = "ckpt_", post = ".h5";
  if (name.size() <= pre.size() + post.size() || name.rfind(pre, 0) != 0 ||
      name.compare(name.size() - post.size(), post.size(), post) != 0)
    return -1;
  const std::string digits = name.substr(pre.size(), name.size() - pre.size() - post.size());
  if (digits.empty() || digits.size() > 18 || !std::all_of(digits.begin(), digits.end(), [](char c) {
        return c >= '0' && c <= '9';
      }))
    return -1;
  return std::stoll(digits);
}
}  // namespace

std::vector<std::pair<std::int64_t, std::string>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<std::int64_t, std::string>> v;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return v;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (!entry.is_regular_file(ec)) continue;
    const auto step = step_of(entry.path().filename().string());
    if (step >= 0) v.emplace_back(step, entry.path().string());
  }
  std::sort(v.begin(), v.end());
  return v;
}

std::optional<std::string> latest_checkpoint(const std::string& dir) {
  const auto v = list_checkpoints(dir);
  if (v.empty()) return std::nullopt;
  return v.back().second;
}

std::vector<std::string> prune_checkpoints(const std::string& dir, int keep_last, std::int64_t milestone_every) {
  DSRSQ_INPUT_CHECK(keep_last >= 1, "prune_checkpoints: keep_last must be >= 1, got ", keep_last);
  DSRSQ_INPUT_CHECK(milestone_every >= 0, "prune_checkpoints: milestone_every must be >= 0, got ", milestone_every);
  const auto all = list_checkpoints(dir);
  std::vector<std::string> removed;
  const std::size_t first_kept = all.size() > static_cast<std::size_t>(keep_last) ? all.size() - keep_last : 0;
  for (std::size_t i = 0; i < first_kept; ++i) {
    const auto& [step, p] = all[i];
    if (milestone_every > 0 && step % milestone_every == 0) continue;
    std::error_code ec;
    if (fs::remove(p, ec)) removed.push_back(p);
  }
  return removed;
}

}  // namespace dsrsq::io
