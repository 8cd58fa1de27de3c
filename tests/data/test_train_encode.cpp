// Long-context training data (issue 13): multi-query sequences supervise every
// answer, and randomized positions (Ruoss et al. 2023) are sorted, distinct,
// in range, deterministic by (seed, step), and keep padding after real tokens.
#define BOOST_TEST_MODULE train_encode
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <set>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "data/tasks.hpp"
#include "data/tokenizer.hpp"
#include "train/encode.hpp"
#include "train/trainer.hpp"

using namespace dsrsq;

static const std::string kData = DSRSQ_DATASETS_DIR;

BOOST_AUTO_TEST_CASE(all_queries_supervises_every_answer) {
  const ByteTokenizer tok;
  const auto ex = data::make_task("mq_recall",
                                  {{"datasets_dir", kData}, {"length", "400"}, {"pairs", "6"}, {"queries", "3"}, {"n", "2"}},
                                  5, data::byte_counter());
  for (const auto& e : ex) {
    const Encoded one = encode_example(e, tok, 1024);
    const Encoded all = encode_example(e, tok, 1024, true);
    BOOST_TEST(one.answer_mask.empty());
    BOOST_TEST(all.queries == 3);
    // The first query is laid out as evaluation sees it.
    BOOST_TEST(all.prompt_len == one.prompt_len);
    BOOST_TEST(std::equal(one.tokens.begin(), one.tokens.end(), all.tokens.begin()));
    BOOST_REQUIRE_EQUAL(all.answer_mask.size(), all.tokens.size());
    // The supervised tokens, read back: each answer then EOS, in order.
    std::vector<std::string> got;
    std::vector<std::int32_t> cur;
    for (std::size_t i = 0; i < all.tokens.size(); ++i) {
      if (!all.answer_mask[i]) continue;
      if (all.tokens[i] == tok.eos_id()) {
        got.push_back(tok.decode(cur));
        cur.clear();
        BOOST_TEST(all.tokens[i - 5] == tok.ans_id());  // [ANS], a 4-digit answer, EOS
        continue;
      }
      cur.push_back(all.tokens[i]);
    }
    std::vector<std::string> want{e.answers[0]};
    const std::string& more = e.meta.at("more_answers");
    for (std::size_t b = 0;;) {
      const std::size_t x = more.find(data::kListSep, b);
      want.push_back(more.substr(b, x == std::string::npos ? std::string::npos : x - b));
      if (x == std::string::npos) break;
      b = x + 1;
    }
    BOOST_TEST(got == want, boost::test_tools::per_element());
    // make_batch weighs exactly those targets 1 and the rest lm_weight.
    const HostBatch hb = make_batch({&all, &one}, tok.pad_id(), 0.25f);
    std::int64_t ones = 0;
    for (std::int64_t t = 0; t + 1 < static_cast<std::int64_t>(all.tokens.size()); ++t) {
      const float m = hb.mask[static_cast<std::size_t>(t)];
      BOOST_TEST(m == (all.answer_mask[static_cast<std::size_t>(t + 1)] ? 1.0f : 0.25f));
      ones += m == 1.0f;
    }
    BOOST_TEST(ones == static_cast<std::int64_t>(std::count(all.answer_mask.begin(), all.answer_mask.end(), 1)));
    BOOST_TEST(hb.answer_tokens == ones + static_cast<std::int64_t>(one.tokens.size()) - one.prompt_len);
    // Truncation drops context only: the whole multi-query tail survives.
    const Encoded cut = encode_example(e, tok, static_cast<std::int64_t>(all.tokens.size()) - 50, true);
    BOOST_TEST(cut.truncated == 50);
    BOOST_TEST(std::equal(cut.tokens.end() - (all.tokens.size() - 1 - static_cast<std::size_t>(all.context_tokens)),
                          cut.tokens.end(), all.tokens.end() - (all.tokens.size() - 1 - static_cast<std::size_t>(all.context_tokens))));
  }
}

BOOST_AUTO_TEST_CASE(sampled_positions) {
  Rng rng(3, 1);
  for (auto [T, range] : {std::pair<std::int64_t, std::int64_t>{10, 10}, {50, 400}, {300, 100000}, {1, 1}, {0, 5}}) {
    const auto p = sample_positions(T, range, rng);
    BOOST_REQUIRE_EQUAL(static_cast<std::int64_t>(p.size()), T);
    for (std::size_t i = 1; i < p.size(); ++i) BOOST_TEST(p[i] > p[i - 1]);  // sorted and distinct
    if (T > 0) {
      BOOST_TEST(p.front() >= 0);
      BOOST_TEST(p.back() < range);
    }
    if (T == range)
      for (std::int64_t i = 0; i < T; ++i) BOOST_TEST(p[static_cast<std::size_t>(i)] == i);
  }
  // Every position is reachable (Floyd's sampling is uniform over subsets;
  // a biased draw would never pick some): 200 draws of 4 of 8 cover all 8.
  std::set<std::int32_t> seen;
  for (int i = 0; i < 200; ++i)
    for (auto v : sample_positions(4, 8, rng)) seen.insert(v);
  BOOST_TEST(seen.size() == 8u);
  BOOST_CHECK_THROW(sample_positions(5, 4, rng), dsrsq::Error);
}

BOOST_AUTO_TEST_CASE(randomized_batch_positions) {
  Encoded a, b;
  a.tokens = {0, 5, 6, 7, 8, 9, 3};
  a.prompt_len = 5;
  b.tokens = {0, 5, 6, 3};
  b.prompt_len = 3;
  const HostBatch base = make_batch({&a, &b}, 4);
  HostBatch off = base;
  randomize_positions(off, 0.0, 1000, 9, 17);
  BOOST_TEST(off.pos == base.pos);  // p = 0: plain positions
  HostBatch x = base, y = base, z = base;
  randomize_positions(x, 1.0, 1000, 9, 17);
  randomize_positions(y, 1.0, 1000, 9, 17);
  randomize_positions(z, 1.0, 1000, 9, 18);
  BOOST_TEST(x.pos == y.pos);  // a pure function of (seed, step)
  BOOST_TEST(x.pos != z.pos);
  BOOST_TEST(x.tokens == base.tokens);
  BOOST_TEST(x.mask == base.mask);
  for (std::int64_t r = 0; r < x.B; ++r) {
    const auto* p = x.pos.data() + r * x.T;
    // Increasing over the whole row: padding (b's last columns) stays after
    // the real tokens, so the causal mask hides it from them.
    for (std::int64_t t = 1; t < x.T; ++t) BOOST_TEST(p[t] > p[t - 1]);
    BOOST_TEST(p[x.T - 1] < 1000);
  }
}
