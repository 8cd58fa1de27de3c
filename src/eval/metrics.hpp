#pragma once
// Evaluation metrics (DESIGN.md section 7): SQuAD v1.1 exact match and token
// F1, ROUGE-L, and corpus BLEU-4 matching NLTK's corpus_bleu.
//
// Text normalisation (normalize_answer) follows the official SQuAD v1.1
// evaluation script, in its order: lower case, drop punctuation, replace the
// whole words "a", "an", "the" by a space, fold white space to single spaces.
// Input is UTF-8. What is exact and what is approximated w.r.t. Python 3 str:
//  - lower case: ASCII, Latin-1 Supplement (U+00C0..U+00DE except U+00D7),
//    Greek U+0391..U+03A9 (Σ always to σ, where Python writes a final ς) and
//    Cyrillic U+0400..U+042F; other code points are
//    kept as they are (Python lowers every cased script).
//  - punctuation: exactly Python's string.punctuation (the 32 ASCII marks);
//    non-ASCII punctuation such as U+2014 is kept, as in SQuAD.
//  - word boundaries for the article rule (regex \b): ASCII letters, digits
//    and '_' are word characters; non-ASCII code points count as word
//    characters except white space (below), U+00A1..U+00BF (minus the
//    alphanumeric U+00AA,B2,B3,B5,B9,BA,BC,BD,BE), U+00D7, U+00F7 and the
//    General Punctuation block U+2010..U+205E.
//  - white space (str.split()): ASCII \t\n\v\f\r, space, \x1c..\x1f, and
//    U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028, U+2029, U+202F, U+205F,
//    U+3000.
// Invalid UTF-8 bytes are kept verbatim and treated as word characters.
#include <cstddef>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsrsq::eval {

std::string normalize_answer(std::string_view s);
// Split on the white space listed above (Python's str.split() with no argument).
std::vector<std::string> split_whitespace(std::string_view s);
// normalize_answer(s) split into tokens: the tokens of F1 and ROUGE-L.
std::vector<std::string> normalized_tokens(std::string_view s);

// 1.0 when the normalised strings are equal, else 0.0.
double exact_match(std::string_view pred, std::string_view gold);
// SQuAD v1.1 token F1 on normalized_tokens: common = multiset intersection;
// 0 when nothing is in common, which includes an empty prediction, an empty
// gold and both empty (v1.1 rule; SQuAD v2 would score both-empty as 1).
// Otherwise (2*p*r)/(p+r) with p = common/|pred|, r = common/|gold|,
// evaluated in that order so results equal the Python script bit for bit.
double f1(std::string_view pred, std::string_view gold);
// ROUGE-L F-measure (beta = 1) on normalized_tokens: L = LCS length,
// p = L/|pred|, r = L/|gold|, (2*p*r)/(p+r); 0 when L == 0 (so also when either
// side is empty).
double rouge_l(std::string_view pred, std::string_view gold);
// Token-level ROUGE-L on caller-supplied tokens (no normalisation).
double rouge_l_tokens(std::span<const std::string> pred, std::span<const std::string> gold);
std::size_t lcs_length(std::span<const std::string> a, std::span<const std::string> b);

using TextMetric = std::function<double(std::string_view, std::string_view)>;
// max over gold answers of fn(pred, gold); 0.0 when golds is empty.
double max_over_golds(std::string_view pred, std::span<const std::string> golds, const TextMetric& fn);

// Corpus BLEU-4 equal to nltk.translate.bleu_score.corpus_bleu(refs, hyps) with
// its defaults (weights 0.25 x 4, no smoothing, auto_reweigh off):
//  - per n in 1..4, clipped n-gram matches (hypothesis count clipped by the max
//    count in any one reference) and max(1, hypothesis n-grams) are summed
//    over the corpus;
//  - reference length per hypothesis = the reference length closest to the
//    hypothesis length, the shorter one on a tie; BP = 1 if c > r, 0 if c == 0,
//    else exp(1 - r/c) on corpus totals;
//  - 0 when there is no unigram match in the whole corpus (also for an empty
//    corpus); a zero higher-order precision is replaced by DBL_MIN as NLTK's
//    method0 does, so the score is tiny (about 1e-77) but not 0;
//  - the log-sum is exactly rounded like math.fsum.
// references[i] are the references of hypotheses[i]; sizes must agree and
// every hypothesis needs at least one reference (dsrsq::Error otherwise).
using Tokens = std::vector<std::string>;
struct BleuStats {
  long long matches[4] = {0, 0, 0, 0};   // clipped n-gram matches, n = 1..4
  long long totals[4] = {0, 0, 0, 0};    // max(1, hypothesis n-grams) summed
  long long hyp_len = 0;
  long long ref_len = 0;                  // closest reference lengths summed
  long long ref_4gram_sets = 0;           // hypotheses with some reference of >= 4 tokens
  void add(const Tokens& hypothesis, std::span<const Tokens> references);
  double score() const;                   // corpus BLEU-4 from the totals (NLTK's value)
  double brevity_penalty() const;
  // BLEU-4 is defined on this corpus: some reference has >= 4 tokens. When none
  // has, no 4-gram can ever match (the reference side of every 4-gram precision
  // is empty: clipped matches are 0 whatever is predicted), so BLEU-4 measures
  // nothing on this task (e.g. one-token answers); NLTK then returns 0 or a
  // DBL_MIN artefact such as 1e-231. See score_or_nan.
  bool bleu4_defined() const { return ref_4gram_sets > 0; }
  // score() when bleu4_defined(), else NaN ("n/a" in tables: format_metric).
  double score_or_nan() const;
};
double corpus_bleu(std::span<const std::vector<Tokens>> references, std::span<const Tokens> hypotheses);
// NLTK's closest_ref_length: min over references of (|len - hyp_len|, len).
std::size_t closest_ref_length(std::span<const Tokens> references, std::size_t hyp_len);

// BLEU-4 of one example (its own corpus of one) on split_whitespace tokens of
// the raw prediction and golds: NaN when no gold has >= 4 tokens (n/a, as
// above), 0 for an empty prediction, else corpus_bleu of the one pair.
double example_bleu4(std::string_view pred, std::span<const std::string> golds);

// A metric for a table: "n/a" for NaN (not computable, e.g. BLEU-4 on answers
// shorter than 4 tokens), else printf("%.<digits>f") (inf prints as "inf").
std::string format_metric(double v, int digits = 4);

// Per-example scores (each the max over the gold answers) and a corpus
// aggregate: em/f1/rouge_l are means over examples, bleu is corpus BLEU-4 on
// split_whitespace tokens of the raw (un-normalised) prediction and golds, the
// golds being the references; NaN (n/a) when no gold in the corpus has >= 4
// tokens (BleuStats::bleu4_defined).
struct ExampleScores {
  double em = 0, f1 = 0, rouge_l = 0;
};
ExampleScores score_example(std::string_view pred, std::span<const std::string> golds);

struct CorpusScores {
  std::size_t n = 0;
  double em = 0, f1 = 0, rouge_l = 0, bleu = 0;
};
class MetricAggregator {
 public:
  // Scores one example, remembers it and returns its scores.
  ExampleScores add(std::string_view pred, std::span<const std::string> golds);
  const std::vector<ExampleScores>& examples() const { return examples_; }
  CorpusScores result() const;

 private:
  std::vector<ExampleScores> examples_;
  BleuStats bleu_;
  double sum_em_ = 0, sum_f1_ = 0, sum_rl_ = 0;
};

}  // namespace dsrsq::eval
