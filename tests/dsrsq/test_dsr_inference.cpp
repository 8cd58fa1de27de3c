// DSR's inference-only selection (DsrScorer::select_inference) against the
// training path (select(forward_tokens(...), nullptr)): the same budget, the
// same seeds in the same order and the same positions, for contexts that are
// shorter than, equal to and longer than one inference block (crossing the
// block boundary, where the convolution needs the previous block's rows), with
// heavy score ties (a 7-token vocabulary and conv width 1 make many rows
// identical: ties must go to the lower index, as top_k does), budgets below and
// above the context, 1 and 2 threads; and its memory: the block buffers and
// the seed heap only, independent of the context length.
// Equality is exact by construction: both paths compute each row's score with
// the same operations (the conv_project op is row-independent; row_score is
// shared), so no tolerance is involved.
#define BOOST_TEST_MODULE dsrsq_dsr_inference
#include <boost/test/unit_test.hpp>

#include <omp.h>

#include <cstdint>
#include <vector>

#include "core/rng.hpp"
#include "retrieval/dsr_scorer.hpp"

namespace dr = dsrsq::retrieval;
using dsrsq::Shape;
using dsrsq::TensorView;

BOOST_AUTO_TEST_CASE(inference_selection_equals_training_selection) {
  const std::int64_t C = 24, blk = dr::DsrScorer::kInferenceBlock;
  struct Case {
    std::int64_t d_r, conv, span, vocab;
    double base_budget;
    float budget_b;  // budget head bias (complexity = sigmoid of it)
  };
  const Case cases[] = {
      {16, 4, 3, 61, 64, 0.0f},     // the paper's shape, small
      {16, 1, 0, 7, 0.1, 1.5f},     // ties everywhere: identical tokens score identically
      {8, 3, 2, 7, 0.05, -2.0f},    // ties of repeated 3-grams
      {5, 2, 1, 61, 1e9, 0.0f},     // budget >= N: everything, nothing scored
  };
  for (const Case& cs : cases)
    for (std::int64_t n : {std::int64_t{1}, std::int64_t{5}, blk - 1, blk, blk + 1, 2 * blk + 7})
      for (int threads : {1, 2})
        BOOST_TEST_CONTEXT("d_r=" << cs.d_r << " conv=" << cs.conv << " span=" << cs.span << " vocab=" << cs.vocab
                                  << " base=" << cs.base_budget << " N=" << n << " threads=" << threads) {
          omp_set_num_threads(threads);
          dr::DsrConfig cfg;
          cfg.d_r = cs.d_r;
          cfg.conv_width = cs.conv;
          cfg.span = cs.span;
          cfg.base_budget = cs.base_budget;
          dr::DsrScorer sc(C, cfg);
          std::vector<float> params(static_cast<std::size_t>(sc.num_parameters()));
          sc.bind(params.data(), nullptr);
          sc.init(3);
          // A non-trivial budget head: weights on the query features and a bias.
          dsrsq::Rng rng(static_cast<std::uint64_t>(n * 13 + cs.vocab), 2);
          for (auto& p : sc.params())
            if (p.name == "dsr.budget_w")
              for (std::int64_t i = 0; i < p.value.numel(); ++i) p.value.ptr<float>()[i] = static_cast<float>(0.3 * rng.normal());
            else if (p.name == "dsr.budget_b")
              p.value.ptr<float>()[0] = cs.budget_b;
          std::vector<float> wte(static_cast<std::size_t>(cs.vocab * C));
          for (auto& x : wte) x = static_cast<float>(rng.normal());
          std::vector<std::int32_t> ctx(static_cast<std::size_t>(n)), query(9);
          for (auto& t : ctx) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(cs.vocab)));
          for (auto& t : query) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(cs.vocab)));
          const TensorView table(wte.data(), Shape{cs.vocab, C});

          const dr::DsrForward f = sc.forward_tokens(table, ctx, query);
          const dr::DsrSelection want = dr::select(f, nullptr);
          dr::DsrInferenceStats st;
          const dr::DsrSelection got = sc.select_inference(table, ctx, query, &st);
          BOOST_TEST(got.budget.budget == want.budget.budget);
          BOOST_TEST(got.budget.mu == want.budget.mu);
          BOOST_TEST(got.full == want.full);
          BOOST_TEST(got.k == want.k);
          BOOST_TEST(got.seeds == want.seeds, boost::test_tools::per_element());
          BOOST_TEST(got.positions == want.positions, boost::test_tools::per_element());
          BOOST_TEST(got.selected_fraction == want.selected_fraction);
          if (cs.base_budget > 1e8) BOOST_TEST(got.full);
          // Memory: the block buffers ((block + W - 1) rows of C f32 and d_r f64) and
          // the heap of k seeds; nothing grows with N beyond one block.
          const std::int64_t rows = std::min(n, blk) + cs.conv - 1;
          const std::size_t bound = static_cast<std::size_t>(rows * (4 * C + 8 * cs.d_r) + 16 * got.k);
          BOOST_TEST(st.scratch_bytes <= bound);
        }
  omp_set_num_threads(omp_get_num_procs());
}
