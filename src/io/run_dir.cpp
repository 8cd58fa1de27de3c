#include "io/run_dir.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.hpp"

namespace dsrsq::io {

namespace fs = std::filesystem;

std::string config_hash(const std::string& text) {
  std::uint64_t h = 14695981039346656037ull;  // FNV-1a 64 offset basis
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;  // FNV prime
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

const char* to_string(RunAction a) {
  switch (a) {
    case RunAction::fresh: return "fresh";
    case RunAction::resume: return "resume";
    case RunAction::finished_skip: return "finished_skip";
    case RunAction::overwrite_pending: return "overwrite_pending";
  }
  return "?";
}

namespace {

std::string read_trimmed(const fs::path& p) {
  std::ifstream in(p);
  if (!in) return "";
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

void fsync_path(const fs::path& p, bool dir) {
  const int fd = ::open(p.c_str(), dir ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

void write_identity(const fs::path& dir, const std::string& hash, const std::string& text) {
  write_file_atomic((dir / kConfigTextFile).string(), text);
  // The hash last: a directory with config.hash has its full identity.
  write_file_atomic((dir / kConfigHashFile).string(), hash + "\n");
}

std::string utc_stamp() {
  const std::time_t t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%SZ", &tm);
  return buf;
}

}  // namespace

void write_file_atomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    DSRSQ_INPUT_CHECK(out, "cannot write '", tmp, "'");
    out.write(content.data(), static_cast<std::streamsize>(content.size()));
    out.flush();
    DSRSQ_INPUT_CHECK(out, "cannot write '", tmp, "' (disk full?)");
  }
  fsync_path(tmp, false);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  DSRSQ_INPUT_CHECK(!ec, "cannot rename '", tmp, "' to '", path, "': ", ec.message());
  fsync_path(fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path(), true);
}

RunDecision RunDirectory::prepare(const std::string& output_dir, const std::string& run_name,
                                  const std::string& hash, const std::string& text, bool overwrite) {
  DSRSQ_INPUT_CHECK(!run_name.empty() && run_name.find('/') == std::string::npos && run_name != "." &&
                        run_name != "..",
                    "invalid run name '", run_name, "' (must be non-empty, without '/')");
  DSRSQ_INPUT_CHECK(!hash.empty(), "run directory: empty config hash");
  RunDecision d;
  const fs::path dir = fs::path(output_dir) / run_name;
  d.path = dir.string();
  d.config_hash = hash;
  d.config_text = text;
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    DSRSQ_INPUT_CHECK(fs::is_directory(dir, ec), "run directory '", d.path, "' exists and is not a directory");
    const std::string old = stored_hash(d.path);
    const bool empty = fs::is_empty(dir, ec);
    if (!old.empty() && old == hash) {
      if (is_finished(d.path)) {
        d.action = RunAction::finished_skip;
        d.message = "run '" + d.path + "' already finished with this config (hash " + hash + "); skipping";
      } else {
        d.action = RunAction::resume;
        d.message = "resuming run '" + d.path + "' (same config, hash " + hash + ")";
      }
      return d;
    }
    if (!empty) {
      const std::string what = old.empty() ? "holds files but no " + std::string(kConfigHashFile)
                                           : "was made by another config (hash " + old + ", this one " + hash + ")";
      DSRSQ_INPUT_CHECK(overwrite, "run directory '", d.path, "' ", what,
                        "; pass --overwrite to replace it or choose another --output_dir");
      d.action = RunAction::overwrite_pending;
      d.old_hash = old;
      d.message = "run directory '" + d.path + "' " + what + "; it will be moved aside (--overwrite)";
      return d;
    }
  } else {
    fs::create_directories(dir, ec);
    DSRSQ_INPUT_CHECK(!ec, "cannot create run directory '", d.path, "': ", ec.message());
  }
  write_identity(dir, hash, text);
  d.action = RunAction::fresh;
  d.message = "starting run '" + d.path + "' (config hash " + hash + ")";
  return d;
}

std::string RunDirectory::commit_overwrite(RunDecision& d) {
  DSRSQ_INPUT_CHECK(d.action == RunAction::overwrite_pending, "commit_overwrite: run '", d.path, "' is ",
                    to_string(d.action), ", not overwrite_pending");
  const fs::path dir(d.path);
  std::string aside = d.path + ".replaced-" + utc_stamp();
  std::error_code ec;
  for (int n = 1; fs::exists(aside, ec); ++n) aside = d.path + ".replaced-" + utc_stamp() + "-" + std::to_string(n);
  fs::rename(dir, aside, ec);
  DSRSQ_INPUT_CHECK(!ec, "cannot move run directory '", d.path, "' aside to '", aside, "': ", ec.message());
  fs::create_directories(dir, ec);
  DSRSQ_INPUT_CHECK(!ec, "cannot create run directory '", d.path, "': ", ec.message());
  write_identity(dir, d.config_hash, d.config_text);
  d.action = RunAction::fresh;
  d.message = "moved the old run aside to '" + aside + "'; starting run '" + d.path + "'";
  return aside;
}

void RunDirectory::mark_finished(const std::string& run_path) {
  write_file_atomic((fs::path(run_path) / kFinishedFile).string(), utc_stamp() + "\n");
}

bool RunDirectory::is_finished(const std::string& run_path) {
  std::error_code ec;
  return fs::exists(fs::path(run_path) / kFinishedFile, ec);
}

std::string RunDirectory::stored_hash(const std::string& run_path) {
  return read_trimmed(fs::path(run_path) / kConfigHashFile);
}

}  // namespace dsrsq::io
