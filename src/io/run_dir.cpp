#include "io/run_dir.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
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

void sync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) raise_input_error("cannot open '" + path + "' to sync it to disk: " + std::strerror(errno));
  if (::fsync(fd) != 0) {
    const int e = errno;
    ::close(fd);
    raise_input_error("cannot sync '" + path + "' to disk (fsync): " + std::strerror(e));
  }
  if (::close(fd) != 0) raise_input_error("cannot close '" + path + "': " + std::strerror(errno));
}

void sync_parent(const std::string& path) {
  const fs::path parent = fs::path(path).parent_path();
  sync_path(parent.empty() ? "." : parent.string(), true);
}

void write_file_atomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) raise_input_error("cannot write '" + tmp + "': " + std::strerror(errno));
  const char* p = content.data();
  std::size_t left = content.size();
  int err = 0;
  while (left > 0 && err == 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) err = n < 0 ? errno : EIO;
    else {
      p += n;
      left -= static_cast<std::size_t>(n);
    }
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    raise_input_error("cannot write '" + tmp + "': " + std::strerror(err));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    ::unlink(tmp.c_str());
    raise_input_error("cannot rename '" + tmp + "' to '" + path + "': " + ec.message());
  }
  sync_parent(path);
}

RunLock::RunLock(const std::string& dir) : dir_(dir) {
  // The lock is on the directory itself: taking it creates no file, so a
  // refused run leaves the directory exactly as it found it.
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) raise_input_error("cannot open run directory '" + dir + "' to lock it: " + std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int e = errno;
    ::close(fd);
    if (e == EWOULDBLOCK) {
      std::string holder = read_trimmed(fs::path(dir) / kLockFile);
      if (holder.empty()) holder = "holder not recorded yet";
      raise_input_error("run directory '" + dir + "' is in use by another dsrsq process (" + holder +
                        "); one writer per run directory: wait for it to finish, stop it, or choose another "
                        "--run_name / --output_dir");
    }
    // A file system without flock (some NFS / Lustre mounts): run unprotected, and say so.
    std::fprintf(stderr,
                 "dsrsq: warning: cannot lock run directory '%s' (flock: %s); nothing stops a second process from "
                 "writing it at the same time\n",
                 dir.c_str(), std::strerror(e));
    return;
  }
  fd_ = fd;
}

RunLock::~RunLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

void RunLock::write_holder() const {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  write_file_atomic((fs::path(dir_) / kLockFile).string(),
                    "pid " + std::to_string(::getpid()) + " host " + host + " since " + utc_stamp() + "\n");
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
    if (stored_hash(d.path) == hash && is_finished(d.path)) {  // read only: no lock needed
      d.action = RunAction::finished_skip;
      d.message = "run '" + d.path + "' already finished with this config (hash " + hash + "); skipping";
      return d;
    }
    d.lock = std::make_shared<RunLock>(d.path);
    const std::string old = stored_hash(d.path);
    bool empty = true;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.path().filename() != kLockFile) empty = false;
    if (!old.empty() && old == hash) {
      if (is_finished(d.path)) {  // finished while we waited for the lock
        d.action = RunAction::finished_skip;
        d.message = "run '" + d.path + "' already finished with this config (hash " + hash + "); skipping";
        d.lock.reset();
      } else {
        d.action = RunAction::resume;
        d.message = "resuming run '" + d.path + "' (same config, hash " + hash + ")";
        d.lock->write_holder();
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
    d.lock = std::make_shared<RunLock>(d.path);
    // Another process may have created it and written its identity first.
    const std::string old = stored_hash(d.path);
    DSRSQ_INPUT_CHECK(old.empty() || old == hash, "run directory '", d.path,
                      "' was just created by another config (hash ", old, ", this one ", hash, ")");
    if (old == hash) {
      d.lock.reset();
      return prepare(output_dir, run_name, hash, text, overwrite);
    }
  }
  d.lock->write_holder();
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
  d.lock = std::make_shared<RunLock>(d.path);  // the old directory's lock goes with it
  d.lock->write_holder();
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
