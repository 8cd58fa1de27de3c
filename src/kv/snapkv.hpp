#pragma once
// Observation-window scoring, the "SnapKV core" (ALGORITHMS.md section 1),
// shared by PyramidKV, DynamicKV and RocketKV stage 1. Per (sequence, head)
// row r = b * NH + h, with the last w tokens of the call as the window:
//   A = softmax(Qw K^T * scale) over the call's keys, causal by position
//       (f64 scores of the f32 post-RoPE values: the Backend's attention_mass);
//   s[j] = sum_i A[i, j] for the prefix tokens j < Tn - w;
//   pooled along j (pool1d: stride 1, same length, kernel/2 padding each side).
// The engine's model is MHA (one KV head per query head: G = 1), so the GQA
// aggregation of the references (kvpress mean, RocketKV sum) is the identity
// and every head selects for itself (ALGORITHMS.md 0.1's GQA rule).
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "core/arena.hpp"

namespace dsrsq::snapkv {

enum class Pool { avg, max };

// Same-length 1-D pooling of x with an odd kernel (stride 1, kernel/2 on each
// side). Out-of-range entries are left out (max: of the in-range ones; avg:
// the sum of the in-range ones divided by the kernel, as PyTorch's avg_pool1d
// with zero padding and count_include_pad=True, the references' call).
// kernel 1: the identity. Throws on an even or non-positive kernel.
std::vector<double> pool1d(const std::vector<double>& x, std::int64_t kernel, Pool pool);

// Window scores of every row of one layer's call: q, k (B, Tn, NH, HS) f32
// post-RoPE; pos i32 (B, Tn). Returns rows x (Tn - w) scores (row-major), pooled.
// w must lie in [1, Tn). Runs attention_mass on the backend (heads as batch
// rows; its FLOPs are counted), scratch from `scratch` (rewound on return).
std::vector<double> window_scores(Backend& be, Arena& scratch, const TensorView& q, const TensorView& k,
                                  const TensorView& pos, std::int64_t w, std::int64_t kernel, Pool pool);

// The top `n` of `scores` (n <= size), ties to the lower index, returned in
// ascending index order (position order: ALGORITHMS.md 0.2's engine rule).
std::vector<std::int32_t> top_in_order(const double* scores, std::int64_t size, std::int64_t n);

// SnapKV's keep list of one row: the top (keep - w) prefix tokens by score plus
// the whole window [Tn - w, Tn), ascending; keep >= Tn keeps every token.
// keep must be >= w.
std::vector<std::int32_t> keep_with_window(const double* scores, std::int64_t tn, std::int64_t w, std::int64_t keep);

// The observation window of the engine's prompts (ALGORITHMS.md corrections,
// "Scale to our models"): max(question length, 8), at most tn - 1.
std::int64_t default_window(std::int64_t query_len, std::int64_t tn);

}  // namespace dsrsq::snapkv
