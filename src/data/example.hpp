#pragma once
// One task example: the model reads context, then query, then must produce
// one of the answers (DESIGN.md section 3). meta carries everything a metric
// needs (positions, depths, fact ages...), as strings so it serialises as is.
#include <map>
#include <string>
#include <vector>

namespace dsrsq::data {

struct Example {
  std::string id;
  std::string context;
  std::string query;
  std::vector<std::string> answers;  // alternatives; the first is the reference
  std::map<std::string, std::string> meta;
};

}  // namespace dsrsq::data
