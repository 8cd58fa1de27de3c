#pragma once
// Run identity (DESIGN.md section 6): a run directory carries the hash and
// text of the resolved config, and a `finished` marker once the run is done.
// Starting a run whose directory exists: same hash and unfinished -> resume;
// same hash and finished -> skip; different hash -> refuse unless
// --overwrite. Slurm requeues rerun the same command line, so --overwrite
// never discards a directory whose hash matches (that is a resume / skip).
#include <memory>
#include <string>

namespace dsrsq::io {

inline constexpr const char* kConfigHashFile = "config.hash";
inline constexpr const char* kConfigTextFile = "config.ini";
inline constexpr const char* kFinishedFile = "finished";
inline constexpr const char* kLockFile = "lock";  // who holds the directory: "pid <pid> host <host> since <time>"

// One writer per run directory: an advisory lock (flock) on the directory
// itself, held for the life of this object (the kernel drops it when the
// process dies, so a stale lock never blocks). acquire() throws naming the
// holder's pid and host (from <dir>/lock) when another process holds it.
class RunLock {
 public:
  RunLock() = default;
  explicit RunLock(const std::string& dir);  // acquires
  ~RunLock();
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;
  // Record this process as the holder in <dir>/lock (once the directory is ours to write).
  void write_holder() const;
  bool held() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
  std::string dir_;
};

// Stable 64-bit FNV-1a of the text, as 16 lower-case hex digits.
std::string config_hash(const std::string& text);

enum class RunAction {
  fresh,              // new (or empty) directory: identity files written, start from scratch
  resume,             // same config, not finished: resume from the latest checkpoint
  finished_skip,      // same config, finished: nothing to do
  overwrite_pending,  // different config and overwrite requested: call commit_overwrite() once the
                      // new config is validated; nothing has been touched yet
};
const char* to_string(RunAction a);

struct RunDecision {
  RunAction action = RunAction::fresh;
  std::string path;     // <output_dir>/<run_name>
  std::string message;  // one line for the log
  std::string old_hash; // overwrite_pending: the hash found in the directory
  std::string config_hash, config_text;  // what prepare() was given (commit_overwrite writes them)
  // The directory's lock, held for every action but finished_skip; keep the
  // decision (or this pointer) alive for the whole run.
  std::shared_ptr<RunLock> lock;
};

class RunDirectory {
 public:
  // Decide what to do with <output_dir>/<run_name>, under the directory's
  // lock (RunLock; refused naming the holder when another process has it).
  // Creates the directory
  // and writes config.hash / config.ini only for `fresh`. Throws
  // dsrsq::Error when the directory holds another config (or unknown files)
  // and overwrite is false: the message names the directory and says to pass
  // --overwrite or another --output_dir.
  static RunDecision prepare(const std::string& output_dir, const std::string& run_name,
                             const std::string& config_hash, const std::string& config_text, bool overwrite);
  // For overwrite_pending: move the old directory aside to
  // <output_dir>/<run_name>.replaced-<UTC time>[-n] (never deletes), create a
  // fresh one with the new identity files. Returns the moved-aside path.
  static std::string commit_overwrite(RunDecision& decision);
  // Mark the run finished (atomically creates the marker).
  static void mark_finished(const std::string& run_path);
  static bool is_finished(const std::string& run_path);
  // The hash recorded in the directory ("" if none).
  static std::string stored_hash(const std::string& run_path);
};

// Write a small file atomically: <path>.tmp, fsync, rename, fsync of the
// directory. Every step is checked: the error names the path and the system
// error ("No space left on device").
void write_file_atomic(const std::string& path, const std::string& content);
// fsync a file or directory; throws naming the path and the system error.
void sync_path(const std::string& path, bool directory);
// fsync the directory holding path (a rename into it is then durable).
void sync_parent(const std::string& path);

}  // namespace dsrsq::io
