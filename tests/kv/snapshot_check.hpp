#pragma once
// Shared by test_kv and test_rckv: the reuse protocol's contract for one
// policy (KVPolicy::snapshot / restore). Prefill a context A, snapshot,
// answer question 1; restore, answer question 2; restore again, answer
// question 2 and question 1 again. Every answer must equal bitwise what a
// fresh policy that prefilled A and then that question gives, with the same
// memory figures, budget and attended-token statistics. A restore after the
// policy began another sequence (its layout rebuilt) must give the same.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "kv/kv_policy.hpp"
#include "model/transformer.hpp"

namespace dsrsq::testing {

struct Answer {
  std::vector<float> logits;  // (B, question + T, V): the question's logits, then each decode step's
  KVMemory mem;
  double attended = 0;
  std::size_t requested = 0, achieved = 0;
  bool infeasible = false;
};

// Extend `ctx` (B, n) at positions 0..n-1 in `chunks` calls.
inline void prefill_context(Transformer& m, KVPolicy& pol, const std::vector<std::int32_t>& ctx, std::int64_t B,
                            std::int64_t chunks) {
  const auto n = static_cast<std::int64_t>(ctx.size()) / B;
  std::int64_t done = 0;
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t k = c + 1 == chunks ? n - done : n / chunks;
    std::vector<std::int32_t> tok(static_cast<std::size_t>(B * k)), pos(tok.size());
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < k; ++t) {
        tok[static_cast<std::size_t>(b * k + t)] = ctx[static_cast<std::size_t>(b * n + done + t)];
        pos[static_cast<std::size_t>(b * k + t)] = static_cast<std::int32_t>(done + t);
      }
    m.extend(pol, TensorView(tok.data(), Shape{B, k}), TensorView(pos.data(), Shape{B, k}));
    done += k;
  }
}

// The question q (B, n) at positions at..at+n-1 in one call, end_prefill, then T greedy steps.
inline Answer answer_question(Transformer& m, KVPolicy& pol, const std::vector<std::int32_t>& q, std::int64_t B,
                              std::int64_t at, std::int64_t T) {
  const std::int64_t V = m.config().vocab, n = static_cast<std::int64_t>(q.size()) / B;
  Answer a;
  std::vector<std::int32_t> tok = q, pos(q.size());
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < n; ++t) pos[static_cast<std::size_t>(b * n + t)] = static_cast<std::int32_t>(at + t);
  m.extend(pol, TensorView(tok.data(), Shape{B, n}), TensorView(pos.data(), Shape{B, n}));
  const float* lg = m.logits().ptr<float>();
  a.logits.assign(lg, lg + B * n * V);
  pol.end_prefill();
  std::vector<std::int32_t> last(static_cast<std::size_t>(B));
  for (std::int64_t b = 0; b < B; ++b) {
    const float* row = lg + (b * n + n - 1) * V;
    last[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(std::max_element(row, row + V) - row);
  }
  for (std::int64_t s = 0; s < T; ++s) {
    std::vector<std::int32_t> p(static_cast<std::size_t>(B), static_cast<std::int32_t>(at + n + s));
    m.extend(pol, TensorView(last.data(), Shape{B, 1}), TensorView(p.data(), Shape{B, 1}));
    const float* l1 = m.logits().ptr<float>();
    a.logits.insert(a.logits.end(), l1, l1 + B * V);
    for (std::int64_t b = 0; b < B; ++b)
      last[static_cast<std::size_t>(b)] =
          static_cast<std::int32_t>(std::max_element(l1 + b * V, l1 + (b + 1) * V) - (l1 + b * V));
  }
  a.mem = pol.memory();
  a.attended = pol.attended_tokens();
  a.requested = pol.budget_requested_bytes();
  a.achieved = pol.budget_achieved_bytes();
  a.infeasible = pol.infeasible();
  return a;
}

inline void check_same(const Answer& got, const Answer& want) {
  BOOST_TEST(got.logits.size() == want.logits.size());
  BOOST_TEST((got.logits == want.logits));  // bitwise
  BOOST_TEST(got.mem.resident_after_prefill == want.mem.resident_after_prefill);
  BOOST_TEST(got.mem.peak_prefill == want.mem.peak_prefill);
  BOOST_TEST(got.mem.read_per_step == want.mem.read_per_step);
  BOOST_TEST(got.mem.total == want.mem.total);
  BOOST_TEST(got.attended == want.attended);
  BOOST_TEST(got.requested == want.requested);
  BOOST_TEST(got.achieved == want.achieved);
  BOOST_TEST(got.infeasible == want.infeasible);
}

// `make` builds a fresh policy of the kind under test.
inline void check_snapshot_reuse(Transformer& m, const std::function<std::unique_ptr<KVPolicy>()>& make,
                                 const KVBudget& budget, std::int64_t B, const std::vector<std::int32_t>& ctx,
                                 const std::vector<std::int32_t>& q1, const std::vector<std::int32_t>& q2,
                                 std::int64_t T, std::int64_t chunks) {
  const auto nctx = static_cast<std::int64_t>(ctx.size()) / B;
  const auto n1 = static_cast<std::int64_t>(q1.size()) / B, n2 = static_cast<std::int64_t>(q2.size()) / B;
  // As the evaluator does: the policy learns nothing of the questions
  // (query_len 0); the sequence has room for the longest one.
  const SequenceInfo info{B, nctx + std::max(n1, n2), 0, T};
  auto fresh_answer = [&](const std::vector<std::int32_t>& q) {
    auto f = make();
    f->begin(info, budget);
    prefill_context(m, *f, ctx, B, chunks);
    return answer_question(m, *f, q, B, nctx, T);
  };
  const Answer f1 = fresh_answer(q1), f2 = fresh_answer(q2);

  auto pol = make();
  pol->begin(info, budget);
  prefill_context(m, *pol, ctx, B, chunks);
  const KVMemory before = pol->memory();
  auto snap = pol->snapshot();
  BOOST_REQUIRE(snap != nullptr);
  // The snapshot holds at least the resident cache.
  BOOST_TEST(snap->bytes() >= before.resident_after_prefill);
  BOOST_TEST_MESSAGE(pol->name() << ": snapshot " << snap->bytes() << " bytes, resident "
                                 << before.resident_after_prefill << " bytes");
  const Answer a1 = answer_question(m, *pol, q1, B, nctx, T);
  pol->restore(*snap);
  const KVMemory after = pol->memory();
  BOOST_TEST(after.resident_after_prefill == before.resident_after_prefill);
  BOOST_TEST(after.peak_prefill == before.peak_prefill);
  const Answer a2 = answer_question(m, *pol, q2, B, nctx, T);
  pol->restore(*snap);
  const Answer a2b = answer_question(m, *pol, q2, B, nctx, T);
  pol->restore(*snap);
  const Answer a1b = answer_question(m, *pol, q1, B, nctx, T);
  BOOST_TEST_CONTEXT("question 1") { check_same(a1, f1); }
  BOOST_TEST_CONTEXT("question 2 after restore") { check_same(a2, f2); }
  BOOST_TEST_CONTEXT("question 2, restored twice") { check_same(a2b, f2); }
  BOOST_TEST_CONTEXT("question 1, restored three times") { check_same(a1b, f1); }
  BOOST_TEST((a1.logits != a2.logits));  // the two questions really differ
  // Another sequence in between (another layout): restore() rebuilds it.
  pol->begin(SequenceInfo{B, nctx / 2 + 3, 2, T + 1}, KVBudget{0.5, 0});
  prefill_context(m, *pol, std::vector<std::int32_t>(static_cast<std::size_t>(B * (nctx / 2 + 3)), 1), B, 1);
  pol->restore(*snap);
  const Answer a2c = answer_question(m, *pol, q2, B, nctx, T);
  BOOST_TEST_CONTEXT("question 2 after another sequence") { check_same(a2c, f2); }
}

}  // namespace dsrsq::testing
