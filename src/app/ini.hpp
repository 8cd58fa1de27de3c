#pragma once
// The .ini reader behind --config, and the option-name helpers it shares with
// the command line: a translation unit of its own (Boost.Program_options and
// the error type only), so the fuzz harness (tests/fuzz) links it without the
// pipeline.
#include <boost/program_options/options_description.hpp>
#include <string>

namespace dsrsq {

// Options are spelled with underscores; hyphens are accepted as aliases.
std::string canonical_name(std::string name);

// "; did you mean --x?" for the closest option name in desc, else "".
std::string did_you_mean(std::string name, const boost::program_options::options_description& desc);

// s without leading and trailing spaces, tabs and CRs.
std::string ini_trim(const std::string& s);

// Reads an .ini file strictly: every line is blank, a comment (# or ;), a
// [section] header or key = value naming an option of desc (not config, help
// or version). Returns the key = value text with sections dropped (a
// multi-token option's space-separated values one per line), for
// program_options::parse_config_file. Errors (dsrsq::Error) name path:line.
std::string read_ini(const std::string& path, const boost::program_options::options_description& desc);

}  // namespace dsrsq
