// libFuzzer harness for the dataset readers (src/data/readers.cpp); see
// fuzz_targets.hpp and README "Sanitizers".
#include "fuzz_targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  dsrsq::fuzz::readers_one(data, size);
  return 0;
}
