// rag and attention_rag (src/methods/rag.cpp, attention_rag.cpp) and their
// shared parts in src/retrieval (chunks, bm25, focal_attention, rag_prompt):
//   - BM25 against scores computed by hand;
//   - sentence splitting and sentence-aligned chunking of known text;
//   - rag keeps the chunk holding the question's words, within the budget, in
//     document order, at contiguous (or, as an option, original) positions;
//   - the evaluator decodes a selector's renumbered prompt from the position
//     after its last one (checked against a hand-driven decode);
//   - the four memory numbers and requested/achieved bytes per example, and
//     `infeasible` below the fixed minimum ([BOS] [SEP] question [ANS] + T);
//   - attention_rag: the sentence rule on hand-made scores; the focal scorer
//     against a reference computed from the full cache's rotated q and k; its
//     selection on a tiny model is whole sentences within the budget and its
//     scoring passes are exactly what the FLOP meter counts.
// The identity at a budget holding everything (both equal `standard` token
// for token) is test_methods' every_method_and_variant_plans_and_decodes.
#define BOOST_TEST_MODULE rag
#include <boost/program_options.hpp>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <limits>
#include <numeric>

#include "eval/evaluator.hpp"
#include "kv/full.hpp"
#include "methods/method.hpp"
#include "retrieval/bm25.hpp"
#include "retrieval/chunks.hpp"
#include "retrieval/focal_attention.hpp"
#include "retrieval/rag_prompt.hpp"

using namespace dsrsq;
namespace m = dsrsq::methods;
namespace rt = dsrsq::retrieval;

namespace dsrsq::retrieval {
std::ostream& operator<<(std::ostream& os, const TokenSpan& s) { return os << "[" << s.begin << ", " << s.end << ")"; }
}  // namespace dsrsq::retrieval

namespace {

ModelConfig tiny() {
  ModelConfig c;
  c.vocab = static_cast<std::int64_t>(ByteTokenizer::kVocabSize);
  c.d_model = 16;  // 16 * 4 bytes: the full cache's arena holds exactly full_bytes
  c.n_heads = 2;
  c.n_layers = 2;
  c.d_ff = 32;
  c.max_pos = 400;
  c.validate();
  return c;
}

const ByteTokenizer& btok() {
  static const ByteTokenizer t;
  return t;
}

// The haystack sentences (each ends with ". "), the needle third.
data::Example needle_example() {
  data::Example ex;
  ex.id = "t0";
  ex.context =
      "Alpha beta gamma delta. The sky was grey over the harbour. The special magic number for brave-tiger-42 is "
      "7315. Rain fell on the quiet town. Boats rocked in the bay. Gulls cried above the pier.";
  ex.query = "What is the special magic number for brave-tiger-42?";
  ex.answers = {"7315"};
  return ex;
}

Encoded encode(const data::Example& ex) { return encode_example(ex, btok(), 400); }

std::string text_of(const std::vector<std::int32_t>& ids) { return btok().decode(ids); }

// A method of the table with its knobs set from "--key value" pairs.
struct Made {
  std::shared_ptr<m::MethodKnobs> knobs;
  std::unique_ptr<m::Method> method;
};
Made make(Transformer& model, const std::string& name, std::vector<std::string> args = {}) {
  const m::MethodInfo& info = m::find_method(name);
  Made out;
  out.knobs = info.knobs();
  boost::program_options::options_description d;
  out.knobs->describe(d);
  args.insert(args.begin(), "x");
  std::vector<const char*> av;
  for (auto& a : args) av.push_back(a.c_str());
  boost::program_options::variables_map vm;
  boost::program_options::store(boost::program_options::parse_command_line(static_cast<int>(av.size()), av.data(), d), vm);
  boost::program_options::notify(vm);
  out.knobs->validate(m::RunShape{});
  out.method = info.make(m::MethodContext{model, cpu_backend(), out.knobs.get(), AdamWConfig{}, 1});
  return out;
}

// Bytes of a budget that leaves `room` context tokens beside [BOS] [SEP] question [ANS] and T.
KVBudget budget_for_room(const ModelConfig& mc, const Encoded& enc, std::int64_t T, std::int64_t room) {
  KVBudget b;
  b.bytes = KVBudget::full_bytes(mc, 1 + enc.query_len + T + room);
  return b;
}

// Context-relative kept spans (maximal runs) of a selection's indices.
std::vector<rt::TokenSpan> kept_runs(const Selection& s, const Encoded& enc) {
  std::vector<rt::TokenSpan> runs;
  for (const std::int32_t i : s.idx) {
    if (i < 1 || i > enc.context_tokens) continue;
    const std::int64_t t = i - 1;
    if (!runs.empty() && runs.back().end == t)
      runs.back().end = t + 1;
    else
      runs.push_back({t, t + 1});
  }
  return runs;
}

// Adjacent spans joined (as kept_runs reports them).
std::vector<rt::TokenSpan> merged(const std::vector<rt::TokenSpan>& spans) {
  std::vector<rt::TokenSpan> out;
  for (const auto& s : spans)
    if (!out.empty() && out.back().end == s.begin)
      out.back().end = s.end;
    else
      out.push_back(s);
  return out;
}

// Greedy decode by hand: prompt tokens at `pos`, then T - 1 steps continuing after pos.back().
std::string hand_decode(Transformer& model, const ModelConfig& mc, const std::vector<std::int32_t>& tokens,
                        const std::vector<std::int32_t>& pos, std::int64_t T) {
  FullPolicy p(mc, cpu_backend());
  SequenceInfo info;
  info.prompt_len = static_cast<std::int64_t>(tokens.size());
  info.max_new_tokens = T;
  p.begin(info, KVBudget{});
  std::vector<std::int32_t> tk = tokens, ps = pos;
  model.extend(p, TensorView(tk.data(), Shape{1, info.prompt_len}), TensorView(ps.data(), Shape{1, info.prompt_len}));
  p.end_prefill();
  std::vector<std::int32_t> gen;
  std::int32_t next_pos = pos.back() + 1;
  for (std::int64_t s = 0; s < T; ++s) {
    const TensorView lg = model.logits();
    const float* row = lg.ptr<float>() + (lg.shape[0] - 1) * lg.shape[1];
    std::int32_t t = static_cast<std::int32_t>(std::max_element(row, row + lg.shape[1]) - row);
    if (t == btok().eos_id()) break;
    gen.push_back(t);
    if (s + 1 == T) break;
    model.extend(p, TensorView(&t, Shape{1, 1}), TensorView(&next_pos, Shape{1, 1}));
    ++next_pos;
  }
  return btok().decode(gen);
}

// A policy that forwards to another and records the positions of each
// layer-0 call (prefill, then one per decode step).
struct PositionLog final : KVPolicy {
  KVPolicy& inner;
  std::vector<std::vector<std::int32_t>> calls;
  explicit PositionLog(KVPolicy& p) : inner(p) {}
  std::string name() const override { return inner.name(); }
  void begin(const SequenceInfo& i, const KVBudget& b) override {
    calls.clear();
    inner.begin(i, b);
  }
  void attend(std::int64_t l, TensorView q, TensorView k, TensorView v, TensorView pos, TensorView out) override {
    if (l == 0) calls.emplace_back(pos.ptr<std::int32_t>(), pos.ptr<std::int32_t>() + pos.numel());
    inner.attend(l, q, k, v, pos, out);
  }
  void end_prefill() override { inner.end_prefill(); }
  KVMemory memory() const override { return inner.memory(); }
  std::size_t budget_requested_bytes() const override { return inner.budget_requested_bytes(); }
  std::size_t budget_achieved_bytes() const override { return inner.budget_achieved_bytes(); }
  double attended_tokens() const override { return inner.attended_tokens(); }
  bool infeasible() const override { return inner.infeasible(); }
};

}  // namespace

// ---- BM25 ----------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(words_split_on_non_alphanumerics_and_lowercase) {
  const std::vector<std::string> want{"brave", "tiger", "42", "the", "end"};
  BOOST_TEST(rt::words("Brave-tiger-42? The  END.") == want, boost::test_tools::per_element());
  BOOST_TEST(rt::words(" .,;").empty());
}

// Three documents of 2, 4 and 6 words: avgdl 4, N 3. By hand (k1 1.2, b 0.75):
//   "c" (in d1 only, twice): idf ln(1 + 2.5/1.5) = ln(8/3); d1: |D| = avgdl, norm 1,
//        tf part 2 * 2.2 / (2 + 1.2) = 1.375.
//   "a" (in d0, d1): idf ln(1 + 1.5/2.5) = ln(1.6); d0: norm 0.25 + 0.75 * 2/4 = 0.625,
//        tf part 2.2 / (1 + 0.75) = 2.2/1.75; d1: tf part 2.2 / 2.2 = 1.
// A handful of double operations each: relative error below 1e-14, so 1e-12 is safe.
BOOST_AUTO_TEST_CASE(bm25_matches_hand_computed_scores) {
  const rt::Bm25 bm({{"a", "b"}, {"a", "c", "c", "d"}, {"e", "f", "g", "h", "i", "j"}});
  BOOST_TEST(bm.avgdl() == 4.0);
  const double tol = 1e-12;
  BOOST_TEST(std::abs(bm.idf("c") - std::log(8.0 / 3.0)) < tol);
  BOOST_TEST(std::abs(bm.idf("a") - std::log(1.6)) < tol);
  BOOST_TEST(std::abs(bm.idf("zzz") - std::log(1.0 + 3.5 / 0.5)) < tol);  // no document: n = 0
  const auto c = bm.scores({"c"});
  BOOST_TEST(c[0] == 0.0);
  BOOST_TEST(std::abs(c[1] - 1.375 * std::log(8.0 / 3.0)) < tol);
  BOOST_TEST(c[2] == 0.0);
  // A repeated query word counts twice; a word in no document adds nothing.
  const auto a = bm.scores({"a", "zzz", "a"});
  BOOST_TEST(std::abs(a[0] - 2 * (2.2 / 1.75) * std::log(1.6)) < tol);
  BOOST_TEST(std::abs(a[1] - 2 * 1.0 * std::log(1.6)) < tol);
  BOOST_TEST(a[2] == 0.0);
  // The sum over distinct words: "a c" on d1.
  const auto ac = bm.scores({"a", "c"});
  BOOST_TEST(std::abs(ac[1] - (std::log(1.6) + 1.375 * std::log(8.0 / 3.0))) < tol);
}

BOOST_AUTO_TEST_CASE(bm25_degenerate_collections) {
  BOOST_TEST(rt::Bm25(std::vector<std::vector<std::string>>{}).scores({"a"}).empty());
  const auto s = rt::Bm25(std::vector<std::vector<std::string>>(2)).scores({"a"});  // no words at all: avgdl 0, every score 0
  BOOST_TEST(s.size() == 2u);
  BOOST_TEST((s[0] == 0.0 && s[1] == 0.0));
}

// ---- sentences and chunks --------------------------------------------------------

BOOST_AUTO_TEST_CASE(sentences_split_at_terminal_punctuation_and_newlines) {
  const std::string text = "The sky is blue. Pi is 3.14 today! \"Is it?\" he said.\n\nNew line here";
  const auto ids = btok().encode(text);
  const auto spans = rt::sentence_spans(ids, btok());
  std::vector<std::string> got;
  for (const auto& s : spans) got.push_back(text.substr(static_cast<std::size_t>(s.begin), static_cast<std::size_t>(s.size())));
  // "3.14" does not split; the closing quote stays with "?"; the blank line
  // after "said." is leading space of the next sentence.
  const std::vector<std::string> want{"The sky is blue.", " Pi is 3.14 today!", " \"Is it?\"", " he said.",
                                      "\n\nNew line here"};
  BOOST_TEST(got == want, boost::test_tools::per_element());
  // A newline after text ends the sentence (the newline stays with it).
  const std::string t2 = "one two\nthree";
  const auto s2 = rt::sentence_spans(btok().encode(t2), btok());
  BOOST_REQUIRE(s2.size() == 2u);
  BOOST_TEST(s2[0].end == 8);
}

BOOST_AUTO_TEST_CASE(chunks_pack_whole_sentences_and_cut_long_ones) {
  // Sentences of 5, 7, 25, 4 and 6 tokens; chunks of at most 12.
  const std::vector<rt::TokenSpan> sent{{0, 5}, {5, 12}, {12, 37}, {37, 41}, {41, 47}};
  const auto units = rt::units_within(sent, 12);
  const std::vector<rt::TokenSpan> want_units{{0, 5}, {5, 12}, {12, 24}, {24, 36}, {36, 37}, {37, 41}, {41, 47}};
  BOOST_TEST(units == want_units, boost::test_tools::per_element());
  const auto chunks = rt::pack_chunks(sent, 12);
  // 5 + 7 = 12 fits; the 25-token sentence is cut 12 + 12 + 1, and its last
  // piece packs with the next two sentences (1 + 4 + 6 = 11).
  const std::vector<rt::TokenSpan> want{{0, 12}, {12, 24}, {24, 36}, {36, 47}};
  BOOST_TEST(chunks == want, boost::test_tools::per_element());
  BOOST_CHECK_THROW(rt::pack_chunks(sent, 0), Error);
}

// ---- budget and prompt -------------------------------------------------------------

BOOST_AUTO_TEST_CASE(keep_top_fills_the_room_in_score_order_and_returns_document_order) {
  // Sizes 10, 4, 16, 5; ranking: 1, 3 (tie: the earlier first), 2, 0.
  const std::vector<rt::TokenSpan> u{{0, 10}, {10, 14}, {14, 30}, {30, 35}};
  const std::vector<double> s{0.5, 2.0, 1.0, 2.0};
  const std::vector<rt::TokenSpan> two{{10, 14}, {30, 35}};
  BOOST_TEST(rt::keep_top(u, s, 9) == two, boost::test_tools::per_element());
  BOOST_TEST(rt::keep_top(u, s, 18) == two, boost::test_tools::per_element());  // 16 and 10 do not fit in 9 left
  // 4 + 5 = 9, unit 2 (16) does not fit in 10 left, unit 0 (10) does.
  const std::vector<rt::TokenSpan> three{{0, 10}, {10, 14}, {30, 35}};
  BOOST_TEST(rt::keep_top(u, s, 19) == three, boost::test_tools::per_element());
  const std::vector<rt::TokenSpan> other{{10, 14}, {14, 30}, {30, 35}};
  BOOST_TEST(rt::keep_top(u, s, 25) == other, boost::test_tools::per_element());
  BOOST_TEST(rt::keep_top(u, s, 35).size() == 4u);
  // A top unit too large for the room is skipped, the next that fits is taken.
  const std::vector<rt::TokenSpan> small{{10, 14}};
  BOOST_TEST(rt::keep_top(u, std::vector<double>{0.5, 1.0, 3.0, 0.1}, 4) == small, boost::test_tools::per_element());
  BOOST_TEST(rt::keep_top(u, s, 3).empty());
  BOOST_TEST(rt::keep_top(u, s, -4).empty());
}

BOOST_AUTO_TEST_CASE(context_room_is_the_budget_minus_the_fixed_part) {
  const ModelConfig mc = tiny();
  const Encoded enc = encode(needle_example());
  const std::int64_t T = 6;
  for (std::int64_t room : {-3, 0, 17, 40})
    BOOST_TEST(rt::context_room(mc, budget_for_room(mc, enc, T, room), enc, T) == room);
  // A byte short of a token: the token does not fit.
  KVBudget b = budget_for_room(mc, enc, T, 17);
  b.bytes -= 1;
  BOOST_TEST(rt::context_room(mc, b, enc, T) == 16);
  // A fraction refers to the full sequence: 1 holds the whole context.
  BOOST_TEST(rt::context_room(mc, KVBudget{}, enc, T) == enc.context_tokens);
}

// ---- rag -------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(rag_keeps_the_chunk_with_the_question_words_within_the_budget) {
  const ModelConfig mc = tiny();
  Transformer model(mc, cpu_backend());
  model.init_weights(5);
  const Encoded enc = encode(needle_example());
  const std::int64_t T = 6;
  const auto ctx = std::span<const std::int32_t>(enc.tokens).subspan(1, static_cast<std::size_t>(enc.context_tokens));
  const auto chunks = rt::pack_chunks(rt::sentence_spans(ctx, btok()), 64);
  BOOST_REQUIRE(chunks.size() >= 3u);
  rt::TokenSpan needle{-1, -1};
  for (const auto& c : chunks)
    if (text_of({ctx.begin() + c.begin, ctx.begin() + c.end}).find("7315") != std::string::npos) needle = c;
  BOOST_REQUIRE(needle.begin >= 0);

  for (const std::string positions : {"contiguous", "original"}) {
    BOOST_TEST_CONTEXT("positions " << positions) {
      Made r = make(model, "rag", {"--rag_chunk_tokens", "64", "--rag_positions", positions});
      m::EvalPlan plan = r.method->plan("");
      BOOST_REQUIRE(static_cast<bool>(plan.select));
      // Room for the needle's chunk alone: it ranks first (it holds "special magic number for brave tiger 42").
      Selection s = plan.select(enc, SelectionEnv{btok(), budget_for_room(mc, enc, T, needle.size() + 3), T});
      const std::vector<rt::TokenSpan> only{needle};
      BOOST_TEST(kept_runs(s, enc) == only, boost::test_tools::per_element());
      BOOST_TEST(s.notes.at("rag_chunks_kept") == "1");
      BOOST_TEST(s.notes.at("selector_kept_spans") == std::to_string(needle.begin) + "-" + std::to_string(needle.end));
      BOOST_TEST(s.notes.at("selector_positions") == positions);
      // [BOS] chunk [SEP] question [ANS]
      BOOST_TEST(s.idx.front() == 0);
      BOOST_TEST(s.idx.size() == static_cast<std::size_t>(1 + needle.size() + enc.query_len));
      BOOST_TEST(s.idx.back() == enc.prompt_len - 1);
      if (positions == "contiguous") {
        std::vector<std::int32_t> want(s.idx.size());
        std::iota(want.begin(), want.end(), 0);
        BOOST_TEST(s.pos == want, boost::test_tools::per_element());
      } else {
        BOOST_TEST(s.pos == s.idx, boost::test_tools::per_element());
      }
      // A larger budget: more chunks, the needle's among them, in document order, within the room.
      const std::int64_t room = needle.size() + 70;
      Selection big = plan.select(enc, SelectionEnv{btok(), budget_for_room(mc, enc, T, room), T});
      BOOST_TEST(std::is_sorted(big.idx.begin(), big.idx.end()));
      BOOST_TEST((std::adjacent_find(big.idx.begin(), big.idx.end()) == big.idx.end()));
      const auto runs = kept_runs(big, enc);
      std::int64_t kept = 0;
      bool has_needle = false;
      for (const auto& run : runs) {
        kept += run.size();
        has_needle = has_needle || (run.begin <= needle.begin && needle.end <= run.end);
      }
      BOOST_TEST(kept <= room);
      BOOST_TEST(kept > needle.size());
      BOOST_TEST(has_needle);
    }
  }
}

// Through the evaluator: the prompt the selector chose, decoded from the
// position after its last one, equals a decode by hand; the four memory
// numbers and requested/achieved bytes are those of a full cache over the
// retrieved prompt; below the fixed minimum the cell is infeasible.
BOOST_AUTO_TEST_CASE(rag_through_the_evaluator_memory_budget_and_infeasible) {
  const ModelConfig mc = tiny();
  Transformer model(mc, cpu_backend());
  model.init_weights(11);
  const data::Example ex = needle_example();
  const Encoded enc = encode(ex);
  const std::int64_t T = 5;
  for (const std::string positions : {"contiguous", "original"}) {
    BOOST_TEST_CONTEXT("positions " << positions) {
      Made r = make(model, "rag", {"--rag_chunk_tokens", "32", "--rag_positions", positions});
      m::EvalPlan plan = r.method->plan("");
      EvalConfig cfg;
      cfg.name = "rag";
      cfg.select = plan.select;
      cfg.max_new_tokens = T;
      cfg.max_seq_len = 400;
      cfg.budget = budget_for_room(mc, enc, T, 50);
      PositionLog log(*plan.policy);
      const MethodEval me = evaluate_method(model, log, btok(), {ex}, cfg);
      BOOST_REQUIRE(me.examples.size() == 1u);
      const ExampleEval& e = me.examples[0];
      const Selection s = plan.select(enc, SelectionEnv{btok(), cfg.budget, T});
      const auto n_in = static_cast<std::int64_t>(s.idx.size());
      BOOST_TEST(e.prompt_tokens_in == n_in);
      BOOST_TEST(n_in <= 1 + 50 + enc.query_len);
      BOOST_TEST(e.meta.at("selector_positions") == positions);
      BOOST_TEST(e.meta.count("rag_chunks_kept") == 1u);
      BOOST_TEST(!e.infeasible);
      BOOST_TEST(e.budget_requested == cfg.budget.bytes);
      BOOST_TEST(e.budget_achieved == KVBudget::full_bytes(mc, n_in + T));
      BOOST_TEST(e.budget_achieved <= e.budget_requested);
      BOOST_TEST(e.kv.resident_after_prefill == e.budget_achieved);
      BOOST_TEST(e.kv.peak_prefill == e.budget_achieved);
      BOOST_TEST(e.kv.total == e.budget_achieved);
      if (e.generated_tokens > 1) {
        BOOST_TEST(e.kv.read_per_step > 0u);
        BOOST_TEST(e.kv.read_per_step <= e.budget_achieved);
      }
      // Prefill at the selection's positions, then one call per decode step
      // continuing after its last position.
      const std::vector<std::int32_t>& want_pos = s.pos.empty() ? s.idx : s.pos;
      BOOST_REQUIRE(log.calls.size() == static_cast<std::size_t>(std::max<std::int64_t>(1, e.generated_tokens)));
      BOOST_TEST(log.calls[0] == want_pos, boost::test_tools::per_element());
      for (std::size_t c = 1; c < log.calls.size(); ++c) {
        BOOST_REQUIRE(log.calls[c].size() == 1u);
        BOOST_TEST(log.calls[c][0] == want_pos.back() + static_cast<std::int32_t>(c));
      }
      if (positions == "contiguous") BOOST_TEST(want_pos.back() == n_in - 1);
      else BOOST_TEST(want_pos.back() == enc.prompt_len - 1);
      std::vector<std::int32_t> tokens;
      for (auto i : s.idx) tokens.push_back(enc.tokens[static_cast<std::size_t>(i)]);
      BOOST_TEST(e.prediction == hand_decode(model, mc, tokens, s.pos.empty() ? s.idx : s.pos, T));
    }
  }
  // Below [BOS] [SEP] question [ANS] + T: nothing fits, recorded, not a crash.
  for (const std::string name : {"rag", "attention_rag"}) {
    BOOST_TEST_CONTEXT(name) {
      Made r = make(model, name);
      m::EvalPlan plan = r.method->plan("");
      EvalConfig cfg;
      cfg.name = name;
      cfg.select = plan.select;
      cfg.max_new_tokens = T;
      cfg.max_seq_len = 400;
      cfg.budget = budget_for_room(mc, enc, T, -1);
      const MethodEval me = evaluate_method(model, *plan.policy, btok(), {ex}, cfg);
      const ExampleEval& e = me.examples.at(0);
      BOOST_TEST(e.infeasible);
      BOOST_TEST(me.infeasible_examples == 1);
      BOOST_TEST(e.meta.at("kv_infeasible") == "true");
      BOOST_TEST(e.prompt_tokens_in == 1 + enc.query_len);
      BOOST_TEST(e.budget_achieved > e.budget_requested);
      // Exactly the fixed minimum: feasible, no context.
      cfg.budget = budget_for_room(mc, enc, T, 0);
      const ExampleEval& f = evaluate_method(model, *plan.policy, btok(), {ex}, cfg).examples.at(0);
      BOOST_TEST(!f.infeasible);
      BOOST_TEST(f.prompt_tokens_in == 1 + enc.query_len);
      BOOST_TEST(f.budget_achieved == f.budget_requested);
    }
  }
}

// ---- attention_rag -------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(sentence_rule_keeps_whole_sentences_of_the_top_tokens) {
  const double ninf = -std::numeric_limits<double>::infinity();
  const std::vector<rt::TokenSpan> units{{0, 5}, {5, 12}, {12, 20}};
  // Sinks (-inf) at 0..2; the top token (0.9) sits in unit 1, the next (0.5) in unit 2.
  std::vector<double> s{ninf, ninf, ninf, 0.1, 0.2, 0.05, 0.05, 0.9, 0.01, 0.01, 0.01, 0.01,
                        0.01, 0.01, 0.5, 0.01, 0.01, 0.01, 0.01, 0.01};
  // Unit scores 0.2, 0.9, 0.5 (sizes 5, 7, 8).
  const std::vector<rt::TokenSpan> one{{5, 12}};
  BOOST_TEST(rt::keep_best_units(units, s, 11) == one, boost::test_tools::per_element());  // 8 and 5 do not fit in 4
  const std::vector<rt::TokenSpan> top_and_first{{0, 5}, {5, 12}};
  BOOST_TEST(rt::keep_best_units(units, s, 14) == top_and_first, boost::test_tools::per_element());  // 8 skipped
  const std::vector<rt::TokenSpan> two{{5, 12}, {12, 20}};
  BOOST_TEST(rt::keep_best_units(units, s, 15) == two, boost::test_tools::per_element());
  const std::vector<rt::TokenSpan> first{{0, 5}};
  BOOST_TEST(rt::keep_best_units(units, s, 6) == first, boost::test_tools::per_element());  // the top ones do not fit
  BOOST_TEST(rt::keep_best_units(units, s, 4).empty());
  BOOST_TEST(rt::keep_best_units(units, s, 20).size() == 3u);
}

// Pass positions: 0 is [BOS], chunk token t sits at 1 + (t - chunk begin).
BOOST_AUTO_TEST_CASE(focal_token_scores_leave_the_sinks_out) {
  const double ninf = -std::numeric_limits<double>::infinity();
  const std::vector<rt::TokenSpan> chunks{{0, 3}, {3, 5}};
  // Passes of 3 + 1 + 2 (question) and 2 + 1 + 2 tokens.
  const std::vector<std::vector<double>> mass{{0.5, 0.2, 0.1, 0.05, 0.1, 0.05}, {0.6, 0.3, 0.04, 0.03, 0.03}};
  const std::vector<double> s0 = rt::focal_token_scores(chunks, mass, 0, 5);
  const std::vector<double> want0{0.2, 0.1, 0.05, 0.3, 0.04};
  BOOST_TEST(s0 == want0, boost::test_tools::per_element());
  BOOST_TEST(rt::focal_token_scores(chunks, mass, 1, 5) == want0, boost::test_tools::per_element());  // [BOS] only
  const std::vector<double> want2{ninf, 0.1, 0.05, ninf, 0.04};
  BOOST_TEST(rt::focal_token_scores(chunks, mass, 2, 5) == want2, boost::test_tools::per_element());
  const std::vector<double> want3{ninf, ninf, 0.05, ninf, ninf};
  BOOST_TEST(rt::focal_token_scores(chunks, mass, 3, 5) == want3, boost::test_tools::per_element());
  // The sink rule changes the kept sentence: unit {3, 5} wins on token 3 unless it is a sink.
  const std::vector<rt::TokenSpan> units{{0, 3}, {3, 5}};
  const std::vector<rt::TokenSpan> second{{3, 5}}, first{{0, 3}};
  BOOST_TEST(rt::keep_best_units(units, s0, 3) == second, boost::test_tools::per_element());
  BOOST_TEST(rt::keep_best_units(units, want2, 3) == first, boost::test_tools::per_element());
}

namespace {

// A full cache that also records each layer's rotated q and k (the full
// policy rotates them in place in the caller's buffers).
struct Recorder final : KVPolicy {
  FullPolicy inner;
  std::vector<std::vector<float>> q, k;
  Recorder(const ModelConfig& mc) : inner(mc, cpu_backend()) {}
  std::string name() const override { return "recorder"; }
  void begin(const SequenceInfo& i, const KVBudget& b) override {
    q.clear();
    k.clear();
    inner.begin(i, b);
  }
  void attend(std::int64_t l, TensorView tq, TensorView tk, TensorView v, TensorView pos, TensorView out) override {
    inner.attend(l, tq, tk, v, pos, out);
    q.emplace_back(tq.ptr<float>(), tq.ptr<float>() + tq.numel());
    k.emplace_back(tk.ptr<float>(), tk.ptr<float>() + tk.numel());
  }
  KVMemory memory() const override { return inner.memory(); }
  std::size_t budget_requested_bytes() const override { return 0; }
  std::size_t budget_achieved_bytes() const override { return 0; }
  double attended_tokens() const override { return 0; }
};

}  // namespace

// The scorer's mass: the last row's softmax per layer and head, averaged, from
// the same model run through a full cache. Both runs compute every layer with
// attention_fwd over the same keys (the full cache's empty slots are masked),
// so hidden states agree to f32 rounding (~1e-7 relative) and q.k logits
// (|q.k| / sqrt(HS) of order 1 with these weights) to ~1e-6; a softmax moves
// by at most that much, so 1e-5 on masses <= 1 is safe. They sum to 1.
BOOST_AUTO_TEST_CASE(focal_scorer_matches_a_reference_from_the_full_cache) {
  const ModelConfig mc = tiny();
  Transformer model(mc, cpu_backend());
  model.init_weights(3);
  const std::int64_t N = 23, NH = mc.n_heads, HS = mc.head_size(), L = mc.n_layers;
  std::vector<std::int32_t> tok(N), pos(N);
  for (std::int64_t i = 0; i < N; ++i) {
    tok[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(40 + (i * 13) % 60);
    pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  }
  SequenceInfo info;
  info.prompt_len = N;
  rt::FocalAttentionScorer sc(mc, cpu_backend());
  sc.begin(info, KVBudget{});
  model.extend(sc, TensorView(tok.data(), Shape{1, N}), TensorView(pos.data(), Shape{1, N}));
  const std::vector<double> got = sc.focal_mass();
  const std::vector<float> logits_sc(model.logits().ptr<float>(), model.logits().ptr<float>() + model.logits().numel());

  Recorder rec(mc);
  rec.begin(info, KVBudget{});
  model.extend(rec, TensorView(tok.data(), Shape{1, N}), TensorView(pos.data(), Shape{1, N}));
  std::vector<double> want(static_cast<std::size_t>(N), 0.0);
  for (std::int64_t l = 0; l < L; ++l)
    for (std::int64_t h = 0; h < NH; ++h) {
      std::vector<double> z(static_cast<std::size_t>(N));
      double mx = -1e300;
      for (std::int64_t j = 0; j < N; ++j) {
        double d = 0;
        for (std::int64_t x = 0; x < HS; ++x)
          d += static_cast<double>(rec.q[l][static_cast<std::size_t>(((N - 1) * NH + h) * HS + x)]) *
               rec.k[l][static_cast<std::size_t>((j * NH + h) * HS + x)];
        z[static_cast<std::size_t>(j)] = d / std::sqrt(static_cast<double>(HS));
        mx = std::max(mx, z[static_cast<std::size_t>(j)]);
      }
      double Z = 0;
      for (auto& v : z) Z += (v = std::exp(v - mx));
      for (std::int64_t j = 0; j < N; ++j) want[static_cast<std::size_t>(j)] += z[static_cast<std::size_t>(j)] / Z / static_cast<double>(L * NH);
    }
  double sum = 0;
  for (std::int64_t j = 0; j < N; ++j) {
    BOOST_TEST(std::abs(got[static_cast<std::size_t>(j)] - want[static_cast<std::size_t>(j)]) < 1e-5, "token " << j);
    sum += got[static_cast<std::size_t>(j)];
  }
  BOOST_TEST(std::abs(sum - 1.0) < 1e-12);
  // The scoring pass is the standard model: its logits are the full cache's.
  const float* lf = model.logits().ptr<float>();
  float worst = 0;
  for (std::size_t i = 0; i < logits_sc.size(); ++i) worst = std::max(worst, std::abs(logits_sc[i] - lf[i]));
  BOOST_TEST(worst < 1e-4f);
  // The prompt must come in one call.
  sc.begin(info, KVBudget{});
  BOOST_CHECK_THROW(model.extend(sc, TensorView(tok.data(), Shape{1, 5}), TensorView(pos.data(), Shape{1, 5})), Error);
}

// On a tiny model: whole sentences within the budget, in document order; one
// scoring pass per chunk, counted exactly by the FLOP meter; the kept
// sentence set is what reference scores (full-cache q and k per chunk, the
// first `sinks` positions of each pass left out) rank first. Several sink
// counts and budgets, so that an off-by-one in the sink rule shows.
BOOST_AUTO_TEST_CASE(attention_rag_selection_on_a_tiny_model) {
  const ModelConfig mc = tiny();
  Transformer model(mc, cpu_backend());
  model.init_weights(9);
  // Sharper attention than at initialisation (q.k logits of order 1, not
  // 0.01): the focal row then singles out tokens by content and position,
  // so the ranking depends on which positions count as sinks.
  for (Param& p : model.params())
    if (p.name.ends_with("attn.wq") || p.name.ends_with("attn.wk")) cpu_backend().scale(p.value, 12.0);
  const Encoded enc = encode(needle_example());
  const std::int64_t T = 4, chunk = 40;
  const auto ctx = std::span<const std::int32_t>(enc.tokens).subspan(1, static_cast<std::size_t>(enc.context_tokens));
  const auto sentences = rt::sentence_spans(ctx, btok());
  const auto units = rt::units_within(sentences, chunk);
  const auto chunks = rt::pack_chunks(sentences, chunk);

  // Reference: each chunk's [BOS] chunk [SEP] question [ANS] through a full
  // cache; the last row's attention from its rotated q and k, summed over
  // layers and heads (the scorer's mean times L * NH: the same ranking).
  const std::int64_t NH = mc.n_heads, HS = mc.head_size(), L = mc.n_layers;
  std::vector<std::vector<double>> pass_mass;  // per chunk, per pass position
  for (const auto& c : chunks) {
    std::vector<std::int32_t> tk{enc.tokens[0]};
    tk.insert(tk.end(), ctx.begin() + c.begin, ctx.begin() + c.end);
    tk.insert(tk.end(), enc.tokens.begin() + (enc.prompt_len - enc.query_len), enc.tokens.begin() + enc.prompt_len);
    const auto n = static_cast<std::int64_t>(tk.size());
    std::vector<std::int32_t> ps(tk.size());
    std::iota(ps.begin(), ps.end(), 0);
    Recorder rec(mc);
    SequenceInfo info;
    info.prompt_len = n;
    rec.begin(info, KVBudget{});
    model.extend(rec, TensorView(tk.data(), Shape{1, n}), TensorView(ps.data(), Shape{1, n}));
    std::vector<double> mass(static_cast<std::size_t>(n), 0.0);
    for (std::int64_t l = 0; l < L; ++l)
      for (std::int64_t h = 0; h < NH; ++h) {
        std::vector<double> z(static_cast<std::size_t>(n));
        double mx = -1e300, Z = 0;
        for (std::int64_t j = 0; j < n; ++j) {
          double d = 0;
          for (std::int64_t x = 0; x < HS; ++x)
            d += static_cast<double>(rec.q[l][static_cast<std::size_t>(((n - 1) * NH + h) * HS + x)]) *
                 rec.k[l][static_cast<std::size_t>((j * NH + h) * HS + x)];
          mx = std::max(mx, z[static_cast<std::size_t>(j)] = d / std::sqrt(static_cast<double>(HS)));
        }
        for (auto& v : z) Z += (v = std::exp(v - mx));
        for (std::int64_t j = 0; j < n; ++j) mass[static_cast<std::size_t>(j)] += z[static_cast<std::size_t>(j)] / Z;
      }
    pass_mass.push_back(std::move(mass));
  }

  int compared = 0;
  for (const std::int64_t sinks : {1, 2, 3, 4, 6})
    for (const std::int64_t room : {25, 45, 70, 110}) {
      BOOST_TEST_CONTEXT("sinks " << sinks << ", room " << room) {
        Made a = make(model, "attention_rag",
                      {"--attention_rag_chunk_tokens", std::to_string(chunk), "--attention_rag_sinks", std::to_string(sinks)});
        m::EvalPlan plan = a.method->plan("");
        const double f0 = cpu_backend().flops_counted();
        const Selection s = plan.select(enc, SelectionEnv{btok(), budget_for_room(mc, enc, T, room), T});
        const double flops = cpu_backend().flops_counted() - f0;

        // Whole units, within the room, in document order.
        const auto runs = kept_runs(s, enc);
        std::int64_t kept = 0;
        for (const auto& r : runs) {
          kept += r.size();
          bool starts = false, ends = false;
          for (const auto& u : units) {
            starts = starts || u.begin == r.begin;
            ends = ends || u.end == r.end;
          }
          BOOST_TEST((starts && ends), "kept run [" << r.begin << ", " << r.end << ") cuts a sentence");
        }
        BOOST_TEST(kept <= room);
        BOOST_TEST(std::is_sorted(s.idx.begin(), s.idx.end()));
        BOOST_TEST(s.notes.at("attention_rag_scoring_passes") == std::to_string(chunks.size()));

        // FLOPs: per chunk pass of n tokens, the model's prefill (as test_methods'
        // flop_meter_counts_the_model_exactly) plus one focal row of attention mass per layer.
        const double C = static_cast<double>(mc.d_model), F = static_cast<double>(mc.d_ff), V = static_cast<double>(mc.vocab);
        double want_flops = 0;
        std::int64_t scored = 0;
        for (const auto& c : chunks) {
          const std::int64_t n = 1 + c.size() + enc.query_len;
          scored += n;
          want_flops += static_cast<double>(n) * (static_cast<double>(mc.n_layers) * (8 * C * C + 4 * C * F) + 2 * C * V) +
                        static_cast<double>(mc.n_layers) *
                            (attention_cost(1, n, n, mc.n_heads, mc.head_size(), true, false).flops +
                             attention_mass_cost(1, 1, n, mc.n_heads, mc.head_size()).flops);
        }
        BOOST_TEST(flops == want_flops);
        BOOST_TEST(s.notes.at("attention_rag_scoring_tokens") == std::to_string(scored));

        // The reference's token scores, sentence scores and ranked prefix; skipped
        // when two sentences tie within the reference's error (either order is right).
        std::vector<double> score(static_cast<std::size_t>(enc.context_tokens), -std::numeric_limits<double>::infinity());
        for (std::size_t ci = 0; ci < chunks.size(); ++ci)
          for (std::int64_t t = chunks[ci].begin; t < chunks[ci].end; ++t)
            if (1 + t - chunks[ci].begin >= sinks)
              score[static_cast<std::size_t>(t)] = pass_mass[ci][static_cast<std::size_t>(1 + t - chunks[ci].begin)];
        std::vector<double> best;
        for (const auto& u : units) best.push_back(*std::max_element(score.begin() + u.begin, score.begin() + u.end));
        // Ambiguous when two sentences adjacent in the ranking lie within the
        // reference's error and swapping them changes what fits.
        const auto want = rt::keep_top(units, best, room);
        std::vector<std::size_t> order(best.size());
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) { return best[x] > best[y]; });
        bool close = false;
        for (std::size_t i = 1; i < order.size(); ++i) {
          const double hi = best[order[i - 1]], lo = best[order[i]];
          if (!std::isfinite(hi) || hi - lo >= 1e-4 * static_cast<double>(L * NH)) continue;
          std::vector<double> swapped = best;
          std::swap(swapped[order[i - 1]], swapped[order[i]]);
          close = close || rt::keep_top(units, swapped, room) != want;
        }
        if (!close) {
          ++compared;
          BOOST_TEST(runs == merged(want), boost::test_tools::per_element());
        }
      }
    }
  BOOST_TEST(compared >= 10, "only " << compared << " of 20 cases could be compared with the reference");
}
