#pragma once
// SQA cluster attention (DESIGN.md section 8): per (batch, head), k-means over
// the keys (m clusters, a few Lloyd steps, deterministic given a seed); every
// query scores the centroids by dot product and attends EXACTLY to the union of
// the keys of its top-k_c clusters (softmax over that union, scale 1/sqrt(HS)
// by default), causal-by-position mask respected.
//
// Two steps, so the (non-differentiable) choice can be held fixed:
//   plan = cluster_plan(q, k, q_pos, k_pos, cfg)      k-means + cluster choice
//   cluster_attention_fwd(be, plan, args)              o, lse   (args as for Backend::attention_fwd)
//   cluster_attention_bwd(be, plan, grad_args)         dq, dk, dv +=  (choice treated as constant)
//
// How it runs: the clusters partition the keys, so attention over the union of
// chosen clusters = a log-sum-exp merge of per-cluster partial attentions. Per
// (b, h) the queries that chose cluster c and the keys of cluster c are
// gathered into batch entry c of one padded Backend::attention_fwd call
// (B' = m, NH' = 1); real positions are shifted by +1, padding keys get position
// 2^30 - 1 and padding queries 0, so the backend's causal mask hides them and its
// block skipping avoids most padded work. Backward calls Backend::attention_bwd on the same
// gathered layout but with the MERGED o and lse of each query, which makes the
// backend recompute the global probabilities P_ij = exp(s_ij - lse_i) and
// D_i = dO_i . O_i, so each cluster's call yields exactly its keys' share of
// the exact-attention gradient; dq is summed over a query's clusters.
//
// Causality: with cfg.causal, a query only considers ELIGIBLE clusters (non-
// empty and holding at least one key with k_pos <= q_pos), and inside chosen
// clusters the usual mask k_pos <= q_pos applies. Note that the centroids are
// computed over all keys of the (b, h) (DESIGN: "centroids reused across
// queries"), so in a causal prefill the CHOICE of clusters may depend on future
// keys (never their values or scores): with a fixed plan, perturbing future keys
// or values changes nothing. For decoding (all keys in the past) this is moot.
//
// Requirements: positions in [0, 2^30 - 2) (the backend's range minus the two
// padding sentinels); q/k/v f32 or f64 (as the backend).
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "core/rng.hpp"

namespace dsrsq::attention {

// ---- k-means (Lloyd) ---------------------------------------------------------
// x: n points of dimension d, row-major (n, d). m clusters. Init: k-means++
// seeding drawn from rng (deterministic given the rng state). One Lloyd step =
// centroid update (mean of members; an empty cluster is re-seeded at the point
// farthest from its own centroid that has not been used for re-seeding in this
// step) followed by nearest-centroid reassignment (ties: lower index). After the
// last step the centroids are set to the means of the final assignment (empty
// clusters keep their position). Every stage does not increase the within-
// cluster sum of squares (WCSS); wcss_history holds WCSS after the initial
// assignment, after every Lloyd step, and after the final centroid update.
struct KMeansResult {
  std::int64_t n = 0, d = 0, m = 0;
  std::vector<double> centroids;     // (m, d)
  std::vector<std::int32_t> assign;  // (n) in [0, m)
  std::vector<std::int64_t> sizes;   // (m)
  std::vector<double> wcss_history;  // steps + 2 entries, non-increasing
  double wcss() const { return wcss_history.empty() ? 0.0 : wcss_history.back(); }
};
KMeansResult kmeans(const double* x, std::int64_t n, std::int64_t d, std::int64_t m, int lloyd_steps, Rng& rng);
// Within-cluster sum of squares of an assignment against given centroids.
double kmeans_wcss(const double* x, std::int64_t n, std::int64_t d, const std::vector<double>& centroids,
                   const std::vector<std::int32_t>& assign);

// ---- plan ----------------------------------------------------------------------
struct ClusterAttentionConfig {
  std::int64_t clusters = 32;     // m
  std::int64_t top_clusters = 8;  // k_c (>= m: every eligible cluster, i.e. dense attention)
  int lloyd_steps = 3;
  std::uint64_t seed = 0;  // k-means init of (b, h) uses Rng(seed, b * NH + h)
  bool causal = true;
  double scale = 0.0;  // <= 0: 1/sqrt(HS)
};

// Token-efficiency figures of a plan.
struct ClusterAttentionStats {
  std::int64_t query_rows = 0;       // B * NH * T
  std::int64_t visible_pairs = 0;    // (query, key) pairs dense causal attention would use
  std::int64_t attended_pairs = 0;   // pairs this plan uses (visible keys in chosen clusters)
  std::int64_t chosen_clusters = 0;  // sum over query rows of clusters chosen
  // attended_pairs / visible_pairs: fraction of keys attended (1 = dense).
  double key_fraction() const { return visible_pairs ? double(attended_pairs) / double(visible_pairs) : 0.0; }
  // Mean over query rows of (clusters chosen / m): the active-cluster fraction.
  double active_cluster_fraction(std::int64_t m) const {
    return query_rows && m ? double(chosen_clusters) / (double(query_rows) * double(m)) : 0.0;
  }
};

struct ClusterPlan {
  std::int64_t B = 0, T = 0, S = 0, NH = 0, HS = 0, m = 0, kc = 0;
  bool causal = true;
  double scale = 0.0;                   // resolved (> 0)
  std::vector<std::int32_t> assign;     // (B, NH, S): cluster of each key
  std::vector<double> centroids;        // (B, NH, m, HS)
  std::vector<std::int32_t> chosen;     // (B, NH, T, kc): chosen clusters, best first; -1 pads
  std::vector<double> wcss;             // (B, NH): final within-cluster sum of squares
  ClusterAttentionStats stats;
  std::int32_t cluster_of(std::int64_t b, std::int64_t h, std::int64_t j) const {
    return assign[static_cast<std::size_t>((b * NH + h) * S + j)];
  }
  const std::int32_t* chosen_of(std::int64_t b, std::int64_t h, std::int64_t i) const {
    return chosen.data() + ((b * NH + h) * T + i) * kc;
  }
  // Whether key j is attended by query i in head h (chosen cluster and visible).
  bool attends(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j, const std::int32_t* q_pos,
               const std::int32_t* k_pos) const;
};

// q (B,T,NH,HS), k (B,S,NH,HS), q_pos i32 (B,T), k_pos i32 (B,S).
ClusterPlan cluster_plan(const TensorView& q, const TensorView& k, const TensorView& q_pos, const TensorView& k_pos,
                         const ClusterAttentionConfig& cfg);

// Forward: writes a.o (B,T,NH,HS) and a.lse (B,NH,T) (natural log, -inf and o = 0
// for a row that attends no key). a.causal and a.scale are ignored: the plan's
// are used. Exact softmax over the union of the chosen clusters' visible keys.
void cluster_attention_fwd(Backend& be, const ClusterPlan& plan, const AttentionArgs& a);
// Backward: dq, dk, dv += gradient of the exact attention over the chosen keys
// (the choice is constant). a.o and a.lse are those written by the forward.
void cluster_attention_bwd(Backend& be, const ClusterPlan& plan, const AttentionGradArgs& a);

}  // namespace dsrsq::attention
