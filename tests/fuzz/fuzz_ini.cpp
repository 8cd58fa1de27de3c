// libFuzzer harness for the --config .ini reader (src/app/ini.cpp); see
// fuzz_targets.hpp and README "Sanitizers".
#include "fuzz_targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  dsrsq::fuzz::ini_one(data, size);
  return 0;
}
