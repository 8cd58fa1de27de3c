#pragma once
// Adaptation metrics on fact streams (DESIGN.md section 7), computed from the
// per-example predictions and the generator's metadata (fact_id, stream_id,
// query_point, query_kind, age, updated, updates_since, latest_value).
//
//  retention by age   accuracy (normalised exact match) of queries binned by the
//                     age of the fact asked about (tokens since it was stated,
//                     `age`), equal-width bins over [0, max age]; retention_auc =
//                     the area under that curve with age scaled to [0, 1]
//                     (trapezoids between the bin centres, empty bins skipped).
//  temporal_consistency  over pairs of successive query points of one stream that
//                     ask about the same fact whose value did not change between
//                     them: the share of pairs whose two predictions agree
//                     (after SQuAD normalisation).
//  adaptation_speed   over `latest` queries about facts updated at least once:
//                     the share returning the new value, each weighted by
//                     1 / (1 + age / 100) so answers soon after an update count more.
#include <cstdint>
#include <vector>

#include "eval/evaluator.hpp"

namespace dsrsq {

struct AdaptationMetrics {
  std::vector<double> age_bin_edges, retention_by_age;
  std::vector<std::int64_t> queries_per_bin;
  double retention_auc = 0, temporal_consistency = 0, adaptation_speed = 0;
  std::int64_t n_queries = 0;
};

AdaptationMetrics adaptation_metrics(const MethodEval& r, int bins);

}  // namespace dsrsq
