#pragma once
// The bodies of the fuzz targets, shared by the libFuzzer harnesses
// (fuzz_readers.cpp, fuzz_ini.cpp: clang, -DDSRSQ_FUZZ=ON) and the replay
// test (test_fuzz_regressions.cpp: the normal build, ctest -L unit), which
// runs every file under tests/fuzz/regressions/ through them.
//
// A target returns normally for any input: a clean dsrsq::Error (bad input,
// named) is the expected answer to garbage. A crash, a sanitizer report, a
// leak, a hang or any other exception escaping is a bug.
#include <cstddef>
#include <cstdint>

namespace dsrsq::fuzz {

// Byte 0 picks the reader (modulo the count: nq, eli5, cnn_dm story, cnn_dm
// csv, s2orc, github, codesearchnet, longbench, parse_csv); the rest is the
// file's content.
void readers_one(const std::uint8_t* data, std::size_t size);

// The input is a --config file: read_ini, then program_options'
// parse_config_file, store and notify over a description with the option
// kinds the program has (switches, strings, integers, doubles, multi-token
// lists), as parse_options does.
void ini_one(const std::uint8_t* data, std::size_t size);

}  // namespace dsrsq::fuzz
