#include "app/ini.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "core/error.hpp"

namespace po = boost::program_options;

namespace dsrsq {

// Options are spelled with underscores; hyphens are accepted as aliases
// (--dry-run is --dry_run, --no-report is --no_report).
std::string canonical_name(std::string name) {
  std::replace(name.begin(), name.end(), '-', '_');
  return name;
}

namespace {
std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}
}  // namespace

// "; did you mean --x?" for the closest option name (a few edits away, or one the name starts), else "".
std::string did_you_mean(std::string name, const po::options_description& desc) {
  while (!name.empty() && name.front() == '-') name.erase(0, 1);
  name = canonical_name(name.substr(0, name.find('=')));
  std::string best;
  std::size_t best_d = std::max<std::size_t>(2, name.size() / 4) + 1;
  for (const auto& opt : desc.options()) {
    const std::string& cand = opt->long_name();
    if (cand.empty()) continue;
    std::size_t d = edit_distance(name, cand);
    if (d > 0 && name.size() >= 3 && cand.rfind(name, 0) == 0) d = std::min<std::size_t>(d, 1);
    if (d < best_d) {
      best_d = d;
      best = cand;
    }
  }
  return best.empty() ? "" : "; did you mean --" + best + "?";
}

std::string ini_trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}

// Reads an .ini file strictly: every line is blank, a comment (# or ;), a
// [section] header or key = value naming a known option. Returns the
// key = value text with sections dropped, for program_options to parse.
std::string read_ini(const std::string& path, const po::options_description& desc) {
  std::error_code ec;
  DSRSQ_INPUT_CHECK(!std::filesystem::is_directory(path, ec), "config file '", path, "' is a directory");
  std::ifstream f(path);
  DSRSQ_INPUT_CHECK(f.good(), "config file '", path, "' cannot be read: ", std::strerror(errno));
  std::ostringstream out;
  std::string line;
  int n = 0;
  while (std::getline(f, line)) {
    ++n;
    const std::string t = ini_trim(line);
    if (t.empty() || t[0] == '#' || t[0] == ';') continue;
    if (t.front() == '[') {
      DSRSQ_INPUT_CHECK(t.back() == ']' && t.size() > 2, path, ":", n, ": malformed section header '", t, "'");
      continue;
    }
    const auto eq = t.find('=');
    DSRSQ_INPUT_CHECK(eq != std::string::npos && eq > 0, path, ":", n, ": malformed line '", t,
                      "' (expected key = value)");
    const std::string key = canonical_name(ini_trim(t.substr(0, eq)));
    const std::string value = ini_trim(t.substr(eq + 1));
    DSRSQ_INPUT_CHECK(key.find_first_of(" \t") == std::string::npos, path, ":", n, ": malformed key '", key, "'");
    DSRSQ_INPUT_CHECK(desc.find_nothrow(key, false) != nullptr, path, ":", n, ": unknown option '", key, "'",
                      did_you_mean(key, desc));
    DSRSQ_INPUT_CHECK(key != "config" && key != "help" && key != "version", path, ":", n, ": option '", key,
                      "' is not allowed in a config file");
    // Multi-token options are written space-separated on one line in the file.
    std::istringstream vs(value);
    std::string tok;
    bool any = false;
    const bool multi = desc.find(key, false).semantic()->max_tokens() > 1;
    if (multi) {
      while (vs >> tok) {
        out << key << " = " << tok << "\n";
        any = true;
      }
      DSRSQ_INPUT_CHECK(any, path, ":", n, ": option '", key, "' needs a value");
    } else {
      out << key << " = " << value << "\n";
    }
  }
  return out.str();
}

}  // namespace dsrsq
