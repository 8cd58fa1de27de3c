#include "eval/adaptation.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <tuple>

#include "eval/metrics.hpp"

namespace dsrsq {
namespace {
std::string get(const std::map<std::string, std::string>& m, const char* k) {
  auto it = m.find(k);
  return it == m.end() ? std::string() : it->second;
}
double num(const std::map<std::string, std::string>& m, const char* k) {
  const std::string s = get(m, k);
  return s.empty() ? std::nan("") : std::atof(s.c_str());
}
}  // namespace

AdaptationMetrics adaptation_metrics(const MethodEval& r, int bins) {
  AdaptationMetrics a;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  double max_age = 0;
  for (const auto& e : r.examples)
    if (double age = num(e.meta, "age"); std::isfinite(age)) max_age = std::max(max_age, age);
  const double width = max_age > 0 ? max_age / bins : 1.0;
  for (int i = 0; i <= bins; ++i) a.age_bin_edges.push_back(width * i);
  std::vector<double> hits(static_cast<std::size_t>(bins), 0.0);
  a.queries_per_bin.assign(static_cast<std::size_t>(bins), 0);
  double speed_num = 0, speed_den = 0;
  // (stream, fact) -> [(query_point, updates_since, normalised prediction, latest value)]
  std::map<std::pair<std::string, std::string>, std::vector<std::tuple<int, std::string, std::string>>> asked;
  for (const auto& e : r.examples) {
    const double age = num(e.meta, "age");
    if (!std::isfinite(age)) continue;
    ++a.n_queries;
    const double correct = e.em;
    auto b = static_cast<std::size_t>(std::min<double>(bins - 1, std::floor(age / width)));
    hits[b] += correct;
    ++a.queries_per_bin[b];
    const std::string kind = get(e.meta, "query_kind");
    if (kind == "latest" && get(e.meta, "updated") == "1") {
      const double w = 1.0 / (1.0 + age / 100.0);
      speed_num += w * correct;
      speed_den += w;
    }
    if (kind == "latest")
      asked[{get(e.meta, "stream_id"), get(e.meta, "fact_id")}].emplace_back(
          std::atoi(get(e.meta, "query_point").c_str()), get(e.meta, "latest_value"),
          eval::normalize_answer(e.prediction));
  }
  for (int i = 0; i < bins; ++i)
    a.retention_by_age.push_back(a.queries_per_bin[static_cast<std::size_t>(i)]
                                     ? hits[static_cast<std::size_t>(i)] / static_cast<double>(a.queries_per_bin[static_cast<std::size_t>(i)])
                                     : nan);
  // Area under retention vs normalised age (bin centres in [0, 1]).
  double area = 0, prev_x = -1, prev_y = 0, first_x = -1, last_x = -1;
  for (int i = 0; i < bins; ++i) {
    const double y = a.retention_by_age[static_cast<std::size_t>(i)];
    if (!std::isfinite(y)) continue;
    const double x = (i + 0.5) / bins;
    if (prev_x >= 0) area += 0.5 * (x - prev_x) * (y + prev_y);
    else first_x = x;
    prev_x = x;
    prev_y = y;
    last_x = x;
  }
  if (first_x >= 0) a.retention_auc = last_x > first_x ? area / (last_x - first_x) : prev_y;
  else a.retention_auc = nan;
  // Temporal consistency: successive asks of an unchanged fact.
  double agree = 0, pairs = 0;
  for (auto& [key, v] : asked) {
    std::sort(v.begin(), v.end());
    for (std::size_t i = 1; i < v.size(); ++i)
      if (std::get<1>(v[i]) == std::get<1>(v[i - 1])) {
        pairs += 1;
        agree += std::get<2>(v[i]) == std::get<2>(v[i - 1]) ? 1.0 : 0.0;
      }
  }
  a.temporal_consistency = pairs > 0 ? agree / pairs : nan;
  a.adaptation_speed = speed_den > 0 ? speed_num / speed_den : nan;
  return a;
}

}  // namespace dsrsq
