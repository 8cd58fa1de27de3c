// SWMR: a forked writer appends rows slowly; this process follows it with the
// C++ reader and with h5py (/usr/bin/python3 swmr_reader.py), kills the
// writer with SIGKILL, and checks that the file still holds every row seen
// before the kill, reads from h5py, and can be resumed. Every wait is bounded.
#define BOOST_TEST_MODULE dsrsq_swmr
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "io/results.hpp"

namespace fs = std::filesystem;
using namespace dsrsq;
using namespace dsrsq::results;
using Clock = std::chrono::steady_clock;

namespace {

const char* kPython = "/usr/bin/python3";

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct Proc {
  int code = -1;  // exit status, or 128 + signal
  bool timed_out = false;
  std::string out;
};

// Run argv with stdout+stderr captured; SIGKILL it after timeout_s.
Proc run_process(const std::vector<std::string>& argv, double timeout_s, const fs::path& log) {
  const pid_t pid = ::fork();
  BOOST_REQUIRE(pid >= 0);
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  Proc p;
  const auto t0 = Clock::now();
  int status = 0;
  while (true) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (since(t0) > timeout_s) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      p.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  p.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream in(log);
  std::stringstream ss;
  ss << in.rdbuf();
  p.out = ss.str();
  return p;
}

ExampleRecord example(std::int64_t i) {
  ExampleRecord e;
  e.id = "q" + std::to_string(i);
  e.task = "quiz";
  e.prediction = "pred " + std::to_string(i) + " caf\xc3\xa9 \xe2\x9c\x93";
  e.golds = {"a" + std::to_string(i), "b" + std::to_string(i)};
  e.f1 = static_cast<double>(i) / 1000.0;
  e.meta = "{}";
  return e;
}

TrainRecord train_row(std::int64_t i) {
  TrainRecord t;
  t.step = i;
  t.loss_total = 0.5 * static_cast<double>(i);
  t.lr = 1e-3;
  return t;
}

// The writer, in a forked child: never returns.
[[noreturn]] void writer_main(const std::string& path, int max_rows, int period_ms) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test
  try {
    RunLayout l;
    l.methods = {"full"};
    auto rf = ResultsFile::create(path, l, Provenance{{{"hostname", "test"}}, {}, {}}, ConfigRecord{{}, "x = 1\n"});
    rf.set_status("train", "running");
    for (int i = 0; i < max_rows; ++i) {
      rf.append_train(train_row(i));
      if (i % 4 == 0) rf.append_example("eval/full", example(i));
      std::this_thread::sleep_for(std::chrono::milliseconds(period_ms));
    }
    rf.close();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "writer failed: %s\n", e.what());
    ::_exit(2);
  }
  ::_exit(0);
}

// Rows visible to a C++ SWMR reader, with their contents checked.
std::size_t check_rows(ResultsReader& r) {
  const auto t = r.train();
  for (std::size_t i = 0; i < t.size(); ++i) {
    if (t[i].step != static_cast<std::int64_t>(i) || t[i].loss_total != 0.5 * static_cast<double>(i)) {
      BOOST_ERROR("train row " << i << " is wrong: step " << t[i].step << " loss " << t[i].loss_total);
      break;
    }
  }
  const auto ex = r.examples("eval/full");
  for (std::size_t k = 0; k < ex.size(); ++k) {
    if (!(ex[k] == example(static_cast<std::int64_t>(4 * k)))) {
      BOOST_ERROR("example " << k << " is wrong: id '" << ex[k].id << "' prediction '" << ex[k].prediction << "'");
      break;
    }
  }
  return t.size();
}

bool have_h5py() {
  if (!fs::exists(kPython)) return false;
  const auto p = run_process({kPython, "-c", "import h5py"}, 60, fs::temp_directory_path() / "dsrsq_h5py_probe.log");
  return p.code == 0;
}

}  // namespace

BOOST_AUTO_TEST_CASE(live_readers_kill_and_resume) {
  const auto t_start = Clock::now();
  const fs::path dir = fs::temp_directory_path() / ("dsrsq_swmr_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "run.h5").string();
  const std::string script = std::string(DSRSQ_IO_TEST_DIR) + "/swmr_reader.py";
  const bool python = have_h5py();
  if (!python) BOOST_TEST_MESSAGE("WARNING: /usr/bin/python3 with h5py not found; h5py checks skipped");

  // 1. Writer: 10 ms per row, at most 4000 rows (40 s) even if never killed.
  const pid_t writer = ::fork();
  BOOST_REQUIRE(writer >= 0);
  if (writer == 0) writer_main(path, 4000, 10);

  // 2. Follow it from C++: the row count must grow while it runs.
  std::vector<std::size_t> seen;
  {
    const auto t0 = Clock::now();
    std::unique_ptr<ResultsReader> r;
    while (since(t0) < 30 && (seen.size() < 4 || seen.back() < 20)) {
      try {
        if (!r) r = std::make_unique<ResultsReader>(path, /*swmr=*/true);
        const std::size_t n = check_rows(*r);
        if (seen.empty() || n > seen.back()) seen.push_back(n);
      } catch (const Error&) {
        // Not created or not in SWMR mode yet.
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    BOOST_TEST_MESSAGE("C++ SWMR reader saw row counts growing: " << seen.size() << " distinct, last " << seen.back());
  }
  BOOST_REQUIRE_MESSAGE(seen.size() >= 4 && seen.back() >= 20, "C++ SWMR reader did not see /train grow");

  // 3. Follow it from h5py.
  if (python) {
    const auto p = run_process({kPython, script, "live", path, std::to_string(seen.back() + 30), "40"}, 60,
                               dir / "live.log");
    BOOST_TEST_MESSAGE("h5py live reader: " << p.out);
    BOOST_TEST(!p.timed_out);
    BOOST_TEST(p.code == 0, "h5py live reader failed: " << p.out);
  }

  // 4. Kill the writer mid-run.
  std::size_t before_kill = 0;
  {
    ResultsReader r(path, true);
    before_kill = check_rows(r);
  }
  BOOST_TEST(::kill(writer, SIGKILL) == 0);
  int status = 0;
  ::waitpid(writer, &status, 0);
  BOOST_TEST((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL), "writer was not alive when killed (status "
                                                                     << status << ")");
  BOOST_TEST(before_kill < 4000u);

  // 5. The killed file still holds every row seen before the kill.
  std::size_t after_kill = 0;
  {
    ResultsReader r(path, true);
    after_kill = check_rows(r);
    BOOST_TEST(after_kill >= before_kill);
    BOOST_TEST(r.status("train").state == "running");
    BOOST_TEST(r.run_state().state == "running");  // never reached done: readers can tell
  }
  if (python) {
    const auto p = run_process({kPython, script, "final", path, std::to_string(before_kill)}, 60, dir / "final.log");
    BOOST_TEST_MESSAGE("h5py after SIGKILL: " << p.out);
    BOOST_TEST(p.code == 0, "h5py could not read the killed file: " << p.out);
  }

  // 6. Resume the killed file (checkpoint at step 10) and finish it.
  {
    auto rf = ResultsFile::resume(path, 10);
    for (int i = 11; i < 25; ++i) rf.append_train(train_row(i));
    rf.set_status("train", "done");
    rf.set_run_state("done", "2025-01-01T00:00:00Z");
    rf.close();
  }
  {
    ResultsReader r(path);  // plain (non-SWMR) open of the finished file
    BOOST_TEST(check_rows(r) == 25u);
    // eval/full never reached "done": resume drops its rows (the run redoes them).
    BOOST_TEST(r.examples("eval/full").empty());
    BOOST_TEST(r.run_state().state == "done");
  }
  if (python) {
    const auto p = run_process({kPython, script, "final", path, "25", "done"}, 60, dir / "resumed.log");
    BOOST_TEST(p.code == 0, "h5py could not read the resumed file: " << p.out);
    BOOST_TEST(p.out.find("rows 25") != std::string::npos, p.out);
  }
  BOOST_TEST_MESSAGE("test_swmr took " << since(t_start) << " s (rows before kill " << before_kill << ", after "
                                       << after_kill << ")");
  std::error_code ec;
  fs::remove_all(dir, ec);
}
