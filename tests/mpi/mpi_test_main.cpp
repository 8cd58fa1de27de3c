// main() for the MPI Boost.Test executables (STYLE.md section 8.6): MPI is
// initialised around boost::unit_test::unit_test_main, every rank runs every
// test case, the pass/fail results are reduced across ranks and the exit code
// is non-zero on every rank if any rank failed.
// Output: only rank 0 prints while things pass. The other ranks write their
// Boost log into a buffer (and report nothing); a rank that failed prints its
// buffer afterwards, prefixed with its rank, so a failure seen only on rank 3
// still says what and where.
#include <boost/test/unit_test.hpp>

#include <cstdio>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

#include "dist/mpi.hpp"

bool init_unit_test();  // defined by BOOST_TEST_MODULE in the test's own file

namespace {
int g_rank = 0;
std::ostringstream g_rank_log;

// The module's own init, then (ranks other than 0) the log goes to the buffer.
// Loggers are configured from the command line before this runs, so this wins.
bool init_with_rank_log() {
  const bool ok = init_unit_test();
  if (g_rank != 0) boost::unit_test::unit_test_log.set_stream(g_rank_log);
  return ok;
}
}  // namespace

int main(int argc, char** argv) {
  dsrsq::mpi::Environment env(argc, argv);
  g_rank = env.rank();
  std::vector<std::string> args(argv, argv + argc);
  if (env.rank() != 0) {
    // Boost refuses a repeated parameter, and a rank that stops at argument
    // parsing would leave the others blocked in a collective: replace the
    // caller's report level instead of adding to it.
    std::erase_if(args, [](const std::string& a) { return a.rfind("--report_level", 0) == 0; });
    args.emplace_back("--report_level=no");
  }
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  int rc = 1;
  try {
    rc = boost::unit_test::unit_test_main(&init_with_rank_log, static_cast<int>(args.size()), cargs.data());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] test main: %s\n", env.rank(), e.what());
    MPI_Abort(MPI_COMM_WORLD, 3);
  }
  const int failed = rc != 0 ? 1 : 0;
  if (failed && env.rank() != 0) {
    std::istringstream lines(g_rank_log.str());
    for (std::string line; std::getline(lines, line);)
      if (!line.empty()) std::fprintf(stderr, "[rank %d] %s\n", env.rank(), line.c_str());
    std::fflush(stderr);
  }
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (env.rank() == 0 && any && !failed) std::fprintf(stderr, "a rank other than 0 failed (its messages are above)\n");
  return any ? 1 : 0;
}
