#pragma once
// Shared by the tests of the evicting policies of the ATSKV study
// (test_dynamic_kv, test_rocket_kv, test_atskv): a small random model whose
// attention is far from uniform, and a prefill + greedy decode driver.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.hpp"
#include "kv/kv_policy.hpp"
#include "model/transformer.hpp"

namespace dsrsq::testing {

inline ModelConfig evict_cfg(std::int64_t layers = 2) {
  ModelConfig c;
  c.vocab = 61;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_layers = layers;
  c.d_ff = 64;
  c.max_pos = 512;
  return c;
}

// Weights large enough that attention is far from uniform (GPT-2 init makes every policy look alike).
inline std::unique_ptr<Transformer> evict_model(const ModelConfig& cfg, std::uint64_t seed) {
  auto m = std::make_unique<Transformer>(cfg, cpu_backend());
  Rng rng(seed, 7);
  for (auto& p : m->params()) {
    const bool norm_w = p.name.find("ln") != std::string::npos && p.name.find("weight") != std::string::npos;
    if (norm_w) continue;
    const double sd = p.decay ? 0.25 : 0.05;
    float* v = p.value.ptr<float>();
    for (std::int64_t i = 0; i < p.value.numel(); ++i) v[i] = static_cast<float>(sd * rng.normal());
  }
  return m;
}

inline std::vector<std::int32_t> evict_tokens(std::int64_t n, std::int64_t vocab, std::uint64_t seed) {
  Rng rng(seed, 3);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab)));
  return t;
}

struct EvictRun {
  std::vector<std::int32_t> generated;  // (B, T)
  KVMemory mem_prefill, mem_end;
};

// begin, prefill the (B, N) prompt in one call, end_prefill, T greedy steps.
// `after_prefill` runs between end_prefill and the first decode step.
// `room`: generated tokens the sequence announces beyond the T decoded here.
template <class F>
EvictRun evict_run(Transformer& m, KVPolicy& pol, const std::vector<std::int32_t>& prompt, std::int64_t B,
                   std::int64_t N, std::int64_t query_len, std::int64_t T, const KVBudget& budget, F&& after_prefill,
                   std::int64_t room = 0) {
  const std::int64_t V = m.config().vocab;
  pol.begin(SequenceInfo{B, N, query_len, T + room}, budget);
  std::vector<std::int32_t> tok = prompt, pos(static_cast<std::size_t>(B * N));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < N; ++t) pos[static_cast<std::size_t>(b * N + t)] = static_cast<std::int32_t>(t);
  m.extend(pol, TensorView(tok.data(), Shape{B, N}), TensorView(pos.data(), Shape{B, N}));
  pol.end_prefill();
  EvictRun r;
  r.mem_prefill = pol.memory();
  after_prefill();
  std::vector<std::int32_t> last(static_cast<std::size_t>(B));
  auto argmax_rows = [&](std::int64_t rows_per_b) {
    const float* lg = m.logits().ptr<float>();
    for (std::int64_t b = 0; b < B; ++b) {
      const float* row = lg + (b * rows_per_b + rows_per_b - 1) * V;
      last[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(std::max_element(row, row + V) - row);
    }
  };
  argmax_rows(N);
  r.generated.assign(static_cast<std::size_t>(B * T), 0);
  for (std::int64_t s = 0; s < T; ++s) {
    for (std::int64_t b = 0; b < B; ++b) r.generated[static_cast<std::size_t>(b * T + s)] = last[static_cast<std::size_t>(b)];
    std::vector<std::int32_t> p(static_cast<std::size_t>(B), static_cast<std::int32_t>(N + s));
    m.extend(pol, TensorView(last.data(), Shape{B, 1}), TensorView(p.data(), Shape{B, 1}));
    argmax_rows(1);
  }
  r.mem_end = pol.memory();
  return r;
}

inline EvictRun evict_run(Transformer& m, KVPolicy& pol, const std::vector<std::int32_t>& prompt, std::int64_t B,
                          std::int64_t N, std::int64_t query_len, std::int64_t T, const KVBudget& budget) {
  return evict_run(m, pol, prompt, B, N, query_len, T, budget, [] {});
}

}  // namespace dsrsq::testing
