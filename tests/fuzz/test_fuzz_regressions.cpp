// Replays the fuzz regression inputs (tests/fuzz/regressions/<target>/*: each
// a crash libFuzzer found, kept after the fix, or a hand-made edge case)
// through the fuzz targets in the normal build. A target must return for
// every input (a clean dsrsq::Error inside is fine); a crash fails the test.
#define BOOST_TEST_MODULE fuzz_regressions
#include <boost/test/unit_test.hpp>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "fuzz_targets.hpp"

namespace fs = std::filesystem;

static std::vector<fs::path> inputs(const char* target) {
  std::vector<fs::path> out;
  const fs::path dir = fs::path(DSRSQ_FUZZ_REGRESSIONS) / target;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename() != "README.md") out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

static std::string bytes_of(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

static void replay(const char* target, void (*fn)(const std::uint8_t*, std::size_t)) {
  const auto files = inputs(target);
  BOOST_TEST(!files.empty());
  for (const auto& f : files) {
    BOOST_TEST_CONTEXT(f.string()) {
      const std::string b = bytes_of(f);
      BOOST_CHECK_NO_THROW(fn(reinterpret_cast<const std::uint8_t*>(b.data()), b.size()));
    }
  }
}

BOOST_AUTO_TEST_CASE(readers_regressions) { replay("readers", dsrsq::fuzz::readers_one); }

BOOST_AUTO_TEST_CASE(ini_regressions) { replay("ini", dsrsq::fuzz::ini_one); }
