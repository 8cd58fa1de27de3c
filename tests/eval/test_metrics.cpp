#define BOOST_TEST_MODULE eval_metrics
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "eval/metrics.hpp"

using namespace dsrsq::eval;
using Strs = std::vector<std::string>;

BOOST_AUTO_TEST_CASE(normalize_basic) {
  BOOST_TEST(normalize_answer("The  Quick, brown-fox!") == "quick brownfox");
  BOOST_TEST(normalize_answer("an apple a day") == "apple day");
  BOOST_TEST(normalize_answer("theater another ant and") == "theater another ant and");
  BOOST_TEST(normalize_answer("A") == "");
  BOOST_TEST(normalize_answer("  \t\n ") == "");
  BOOST_TEST(normalize_answer("") == "");
  BOOST_TEST(normalize_answer("THE the ThE") == "");
  // punctuation goes first, so "a.b" -> "ab" and "a_b" -> "ab" ('_' is punctuation)
  BOOST_TEST(normalize_answer("x a.b a_b") == "x ab ab");
  // "a-" loses the dash and then is an article
  BOOST_TEST(normalize_answer("a- the, an.") == "");
  BOOST_TEST(normalize_answer("Café ÉCOLE") == "café école");
  // em dash is not ASCII punctuation (kept) but is a word boundary
  BOOST_TEST(normalize_answer("x a\u2014the y") == "x \u2014 y");
  // no-break space is white space
  BOOST_TEST(normalize_answer("x\u00a0the\u00a0y") == "x y");
}

BOOST_AUTO_TEST_CASE(split) {
  BOOST_TEST(split_whitespace(" a  b\tc\n") == (Strs{"a", "b", "c"}));
  BOOST_TEST(split_whitespace("").empty());
  BOOST_TEST(normalized_tokens("The cat, the hat") == (Strs{"cat", "hat"}));
}

BOOST_AUTO_TEST_CASE(em_f1) {
  BOOST_TEST(exact_match("The Cat.", "cat") == 1.0);
  BOOST_TEST(exact_match("cat", "cats") == 0.0);
  BOOST_TEST(exact_match("", "the") == 1.0);  // both normalise to ""
  BOOST_TEST(f1("the cat sat", "cat sat on mat") == 2.0 / 3.0, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(f1("x x y", "x y y") == 2.0 / 3.0, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(f1("x", "x") == 1.0);
  // SQuAD v1.1: no common token -> 0, including empty sides
  BOOST_TEST(f1("", "cat") == 0.0);
  BOOST_TEST(f1("cat", "") == 0.0);
  BOOST_TEST(f1("", "") == 0.0);
  BOOST_TEST(f1("the", "a") == 0.0);
  BOOST_TEST(f1("dog", "cat") == 0.0);
  // clipped counts: one "x" in gold
  const double p = 1.0 / 3.0, r = 1.0;
  BOOST_TEST(f1("x x x", "x") == (2 * p * r) / (p + r));
}

BOOST_AUTO_TEST_CASE(rouge) {
  BOOST_TEST(lcs_length(Strs{"w", "x", "y", "z"}, Strs{"w", "y", "z", "q"}) == 3u);
  BOOST_TEST(lcs_length(Strs{}, Strs{"a"}) == 0u);
  BOOST_TEST(rouge_l("w x y z", "w y z q") == 0.75);
  const double p = 2.0 / 2.0, r = 2.0 / 5.0;
  BOOST_TEST(rouge_l("y z", "w x y q z") == (2 * p * r) / (p + r));
  BOOST_TEST(rouge_l("z y", "y z") == 0.5);  // order matters, unlike F1
  BOOST_TEST(f1("z y", "y z") == 1.0);
  BOOST_TEST(rouge_l("", "") == 0.0);
  BOOST_TEST(rouge_l("The Cat", "cat!") == 1.0);
}

BOOST_AUTO_TEST_CASE(max_over) {
  const Strs golds{"dog", "the cat", "cat sat"};
  BOOST_TEST(max_over_golds("Cat", golds, exact_match) == 1.0);
  BOOST_TEST(max_over_golds("cat sat down", golds, f1) == 0.8, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(max_over_golds("cat", Strs{}, f1) == 0.0);
}

namespace {
std::vector<Tokens> refs1(Tokens r) { return {std::move(r)}; }
}  // namespace

BOOST_AUTO_TEST_CASE(bleu) {
  const Tokens s{"a", "b", "c", "d", "e"};
  std::vector<std::vector<Tokens>> refs{refs1(s)};
  std::vector<Tokens> hyps{s};
  BOOST_TEST(corpus_bleu(refs, hyps) == 1.0);
  // no unigram match -> exactly 0
  hyps = {Tokens{"x", "y", "z", "w"}};
  BOOST_TEST(corpus_bleu(refs, hyps) == 0.0);
  // brevity penalty only: precisions 1, c = 4, r = 8
  refs = {refs1(Tokens{"a", "b", "c", "d", "e", "f", "g", "h"})};
  hyps = {Tokens{"a", "b", "c", "d"}};
  BOOST_TEST(corpus_bleu(refs, hyps) == std::exp(1.0 - 2.0), boost::test_tools::tolerance(1e-15));
  // zero 4-gram precision: NLTK's method0 uses DBL_MIN -> tiny, not 0
  refs = {refs1(Tokens{"a", "b", "c", "x", "d", "e", "f"})};
  hyps = {Tokens{"a", "b", "c", "d", "e", "f", "q"}};
  const double tiny = corpus_bleu(refs, hyps);
  BOOST_TEST(tiny > 0.0);
  BOOST_TEST(tiny < 1e-70);
  // clipping: hypothesis "the" x4 against one "the" in the reference
  BleuStats st;
  st.add(Tokens{"the", "the", "the", "the"}, refs1(Tokens{"the", "cat"}));
  BOOST_TEST(st.matches[0] == 1);
  BOOST_TEST(st.totals[0] == 4);
  BOOST_TEST(st.totals[3] == 1);
  BOOST_TEST(st.ref_len == 2);
  // closest reference length: tie between 3 and 5 for 4 -> the shorter one
  const std::vector<Tokens> two{Tokens(5, "a"), Tokens(3, "a")};
  BOOST_TEST(closest_ref_length(two, 4) == 3u);
  BOOST_TEST(closest_ref_length(two, 5) == 5u);
  // empty corpus and size mismatch
  BOOST_TEST(corpus_bleu(std::vector<std::vector<Tokens>>{}, std::vector<Tokens>{}) == 0.0);
  hyps = {s, s};
  BOOST_CHECK_THROW(corpus_bleu(refs, hyps), dsrsq::Error);
  BOOST_CHECK_THROW(st.add(s, std::vector<Tokens>{}), dsrsq::Error);
}

// BLEU-4 is n/a (NaN) when no reference of the corpus has >= 4 tokens: no
// 4-gram can match whatever is predicted (the needle task's one-token answers,
// where NLTK's value is a DBL_MIN artefact such as 1e-231 or 0).
BOOST_AUTO_TEST_CASE(bleu4_not_applicable) {
  // One-token answers: NLTK's value is not 0 but a meaningless tiny number.
  BleuStats st;
  st.add(Tokens{"42"}, refs1(Tokens{"42"}));
  st.add(Tokens{"7"}, refs1(Tokens{"7"}));
  BOOST_TEST(st.score() > 0.0);
  BOOST_TEST(st.score() < 1e-200);
  BOOST_TEST(!st.bleu4_defined());
  BOOST_TEST(std::isnan(st.score_or_nan()));
  // Long hypotheses against short references: still n/a (the reference side decides).
  BleuStats st2;
  st2.add(Tokens{"a", "b", "c", "d", "e"}, refs1(Tokens{"a", "b"}));
  BOOST_TEST(std::isnan(st2.score_or_nan()));
  // One reference of >= 4 tokens anywhere in the corpus makes it defined, with NLTK's value.
  st2.add(Tokens{"a", "b"}, std::vector<Tokens>{Tokens{"x"}, Tokens{"a", "b", "c", "d"}});
  BOOST_TEST(st2.bleu4_defined());
  BOOST_TEST(st2.score_or_nan() == st2.score());
  // Per example and in the aggregator.
  BOOST_TEST(std::isnan(example_bleu4("42", Strs{"42"})));
  BOOST_TEST(std::isnan(example_bleu4("", Strs{"42", "forty two"})));
  BOOST_TEST(example_bleu4("", Strs{"a b c d"}) == 0.0);
  BOOST_TEST(example_bleu4("a b c d", Strs{"a b c d"}) == 1.0);
  BOOST_TEST(example_bleu4("a b c d e", Strs{"z", "a b c d e"}) ==
             corpus_bleu(std::vector<std::vector<Tokens>>{{Tokens{"z"}, Tokens{"a", "b", "c", "d", "e"}}},
                         std::vector<Tokens>{Tokens{"a", "b", "c", "d", "e"}}));
  MetricAggregator agg;
  agg.add("42", Strs{"42"});
  agg.add("7 8", Strs{"7"});
  BOOST_TEST(std::isnan(agg.result().bleu));
  agg.add("the cat sat on the mat", Strs{"the cat sat on the mat"});
  BOOST_TEST(!std::isnan(agg.result().bleu));
  // Tables print n/a, never 0 or 1e-231.
  BOOST_TEST(format_metric(std::nan("")) == "n/a");
  BOOST_TEST(format_metric(0.25) == "0.2500");
  BOOST_TEST(format_metric(0.123456, 2) == "0.12");
  BOOST_TEST(format_metric(1.4e-231) == "0.0000");
}

BOOST_AUTO_TEST_CASE(aggregator) {
  MetricAggregator agg;
  const auto a = agg.add("The cat sat on the mat", Strs{"cat sat on mat"});
  BOOST_TEST(a.em == 1.0);
  BOOST_TEST(a.f1 == 1.0);
  const auto b = agg.add("dog", Strs{"cat", "a dog"});
  BOOST_TEST(b.em == 1.0);
  const auto c = agg.add("bird", Strs{"cat"});
  BOOST_TEST(c.em == 0.0);
  BOOST_TEST(c.rouge_l == 0.0);
  BOOST_TEST(agg.examples().size() == 3u);
  const auto r = agg.result();
  BOOST_TEST(r.n == 3u);
  BOOST_TEST(r.em == 2.0 / 3.0, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(r.f1 == 2.0 / 3.0, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(r.bleu >= 0.0);
  BOOST_TEST(r.bleu <= 1.0);
  BOOST_TEST(MetricAggregator{}.result().n == 0u);
}
