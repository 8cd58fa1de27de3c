#define BOOST_TEST_MODULE data_tasks
#include <boost/test/unit_test.hpp>
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>

#include "core/error.hpp"
#include "data/tasks.hpp"

namespace fs = std::filesystem;
using namespace dsrsq::data;

static const std::string kData = DSRSQ_DATASETS_DIR;

static TaskParams with_dir(TaskParams p) {
  p["datasets_dir"] = kData;
  return p;
}
static std::size_t num(const Example& e, const std::string& k) { return std::stoul(e.meta.at(k)); }

static bool same(const std::vector<Example>& a, const std::vector<Example>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].context != b[i].context || a[i].query != b[i].query || a[i].answers != b[i].answers ||
        a[i].meta != b[i].meta)
      return false;
  return true;
}

// The answer text sits in the context at meta answer_offset, inside the evidence span.
static void check_answer_at(const Example& e) {
  const std::size_t off = num(e, "answer_offset");
  BOOST_TEST_INFO(e.id << " " << e.query);
  BOOST_TEST(e.context.compare(off, e.answers[0].size(), e.answers[0]) == 0);
  BOOST_TEST(num(e, "evidence_begin") <= off);
  BOOST_TEST(off + e.answers[0].size() <= num(e, "evidence_end"));
}

static const std::map<std::string, TaskParams> kCases = {
    {"needle", {{"length", "3000"}, {"distractors", "3"}, {"n", "3"}}},
    {"kv_recall", {{"keys", "12"}, {"gap", "100"}, {"n", "3"}}},
    {"fact_stream", {{"length", "5000"}, {"events", "20"}, {"entities", "5"}, {"queries", "4"}}},
    {"var_track", {{"length", "2500"}, {"chain", "5"}, {"n", "3"}}},
    {"multi_hop", {{"length", "2500"}, {"hops", "3"}, {"n", "3"}}},
    {"mq_recall", {{"length", "2500"}, {"pairs", "12"}, {"queries", "5"}, {"n", "3"}}},
};

BOOST_AUTO_TEST_CASE(determinism_and_answers) {
  const auto ct = byte_counter();
  for (const auto& [name, p] : kCases) {
    BOOST_TEST_INFO(name);
    const auto a = make_task(name, with_dir(p), 7, ct);
    const auto b = make_task(name, with_dir(p), 7, ct);
    const auto c = make_task(name, with_dir(p), 8, ct);
    BOOST_TEST_REQUIRE(!a.empty());
    BOOST_TEST(same(a, b));
    BOOST_TEST(!same(a, c));
    for (const auto& e : a) {
      check_answer_at(e);
      BOOST_TEST(!e.query.empty());
      BOOST_TEST(e.query.back() == '?');
      BOOST_TEST(e.answers[0].size() <= 40u);  // short answers
      BOOST_TEST(e.meta.at("task") == name);
    }
  }
}

BOOST_AUTO_TEST_CASE(target_length_respected) {
  // A counter that is not bytes (whitespace words) must be honoured too.
  const TokenCounter words = [](std::string_view s) {
    std::size_t n = 0;
    bool in = false;
    for (char ch : s) {
      const bool sp = ch == ' ' || ch == '\n';
      if (!sp && !in) ++n;
      in = !sp;
    }
    return n + (s == " " ? 0 : 0);
  };
  for (std::size_t len : {1000u, 4000u, 16000u}) {
    for (const auto& name : {"needle", "var_track", "multi_hop", "fact_stream", "mq_recall"}) {
      BOOST_TEST_INFO(name << " " << len);
      auto p = kCases.at(name);
      p["length"] = std::to_string(len);
      p["n"] = "1";
      const auto e = make_task(name, with_dir(p), 3, byte_counter());
      if (std::string(name) != "fact_stream") {  // fact_stream examples are prefixes
        const double got = static_cast<double>(e[0].context.size());
        BOOST_TEST(got <= len * 1.0 + 2);
        BOOST_TEST(got >= len * 0.97);
      } else {
        BOOST_TEST(e.back().context.size() <= len + 2);
        BOOST_TEST(e.back().context.size() >= len * 0.97);
      }
    }
    auto p = kCases.at("needle");
    p["length"] = std::to_string(len / 5);
    const auto w = make_task("needle", with_dir(p), 3, words);
    const double got = static_cast<double>(words(w[0].context));
    BOOST_TEST(std::abs(got - len / 5.0) <= len / 5.0 * 0.05 + 3);
  }
}

BOOST_AUTO_TEST_CASE(needle_depth_grid) {
  for (double d : {0.0, 0.25, 0.5, 0.75, 1.0}) {
    const auto e = make_task("needle", with_dir({{"length", "8000"}, {"depth", std::to_string(d)}}), 11,
                             byte_counter())[0];
    BOOST_TEST_INFO("depth " << d);
    BOOST_TEST(std::abs(std::stod(e.meta.at("actual_depth")) - d) < 0.06);
    const std::size_t off = std::stoul(e.meta.at("needle_offsets"));
    BOOST_TEST(std::abs(static_cast<double>(off) / e.context.size() - d) < 0.06);
    BOOST_TEST(e.context.compare(off, 29, "The special magic number for ") == 0);
  }
}

BOOST_AUTO_TEST_CASE(needle_variants) {
  const auto mv = make_task("needle", with_dir({{"values", "3"}, {"needles", "2"}, {"distractors", "4"}}), 5,
                            byte_counter())[0];
  BOOST_TEST(mv.query.find("all the special magic numbers") != std::string::npos);
  std::size_t commas = std::count(mv.answers[0].begin(), mv.answers[0].end(), ',');
  BOOST_TEST(commas == 2u);
  std::size_t nv = 0;
  for (std::size_t p = 0; (p = mv.meta.at("value_offsets").find(',', p)) != std::string::npos; ++p) ++nv;
  BOOST_TEST(nv == 2u);
  // every value is in the context, and distractor keys share the key stem
  std::string vals = mv.answers[0];
  for (std::size_t p = 0; p < vals.size(); p += 9) BOOST_TEST(mv.context.find(vals.substr(p, 7)) != std::string::npos);
  const std::string key = mv.query.substr(mv.query.rfind(' ') + 1, mv.query.size() - mv.query.rfind(' ') - 2);
  const std::string stem = key.substr(0, key.rfind('-') + 1);
  std::size_t stems = 0;
  for (std::size_t p = 0; (p = mv.context.find(stem, p)) != std::string::npos; ++p) ++stems;
  BOOST_TEST(stems >= 5u);  // 3 values + distractors with similar keys

  const auto q = make_task("needle", with_dir({{"source", "quiz"}, {"distractors", "5"}}), 5, byte_counter())[0];
  BOOST_TEST(q.query.find("What is the capital of ") == 0u);
  check_answer_at(q);
}

BOOST_AUTO_TEST_CASE(fact_stream_metadata) {
  const auto ex = make_task("fact_stream", with_dir(kCases.at("fact_stream")), 21, byte_counter());
  BOOST_TEST_REQUIRE(ex.size() == 12u);
  std::map<std::string, std::size_t> kinds;
  for (const auto& e : ex) {
    ++kinds[e.meta.at("query_kind")];
    const std::string box = e.meta.at("fact_id").substr(0, e.meta.at("fact_id").find('/'));
    // Scan the context: every statement about this box in time order.
    const std::string pat = "the color of " + box + " is now ";
    std::vector<std::pair<std::size_t, std::string>> said;
    for (std::size_t p = 0; (p = e.context.find(pat, p)) != std::string::npos; p += pat.size()) {
      const std::size_t v = p + pat.size();
      said.push_back({v, e.context.substr(v, e.context.find('.', v) - v)});
    }
    BOOST_TEST_REQUIRE(!said.empty());
    BOOST_TEST(e.meta.at("latest_value") == said.back().second);
    BOOST_TEST(num(e, "times_stated") == said.size());
    BOOST_TEST(num(e, "query_time") == e.context.size());
    BOOST_TEST(num(e, "age") == num(e, "query_time") - num(e, "stated_at"));
    // which statement is the answer
    const std::size_t ans = num(e, "answer_offset");
    std::size_t idx = said.size();
    for (std::size_t i = 0; i < said.size(); ++i)
      if (said[i].first == ans) idx = i;
    BOOST_TEST_REQUIRE(idx < said.size());
    BOOST_TEST(said[idx].second == e.answers[0]);
    BOOST_TEST(num(e, "updates_since") == said.size() - 1 - idx);
    BOOST_TEST((e.meta.at("updated") == "1") == (idx > 0));
    BOOST_TEST(e.meta.at("previous_value") == (idx > 0 ? said[idx - 1].second : std::string()));
    const std::size_t upd = e.context.rfind("Update ", num(e, "evidence_begin") + 1);
    BOOST_TEST(upd == num(e, "evidence_begin"));
    if (e.meta.at("query_kind") != "as_of") {
      BOOST_TEST(e.answers[0] == said.back().second);
      BOOST_TEST(num(e, "updates_since") == 0u);
    } else {
      // as of update t: the last statement with update number <= t+1
      const std::size_t t = num(e, "asof_event") + 1;
      BOOST_TEST(e.query.find("after update " + std::to_string(t) + "?") != std::string::npos);
      const std::size_t u = std::stoul(e.context.substr(num(e, "evidence_begin") + 7));
      BOOST_TEST(u <= t);
      if (idx + 1 < said.size()) {
        const std::size_t nb = e.context.rfind("Update ", said[idx + 1].first);
        BOOST_TEST(std::stoul(e.context.substr(nb + 7)) > t);
      }
    }
  }
  BOOST_TEST(kinds["latest"] == 4u);
  BOOST_TEST(kinds["as_of"] == 4u);
  BOOST_TEST(kinds["long_ago"] == 4u);
  // Query points are successive prefixes of the same stream.
  BOOST_TEST(ex[4].context.compare(0, ex[0].context.size(), ex[0].context) == 0);
  BOOST_TEST(ex[11].context.size() > ex[0].context.size());
}

BOOST_AUTO_TEST_CASE(var_and_hops) {
  const auto v = make_task("var_track", with_dir({{"chain", "4"}, {"distractor_chains", "3"}}), 2, byte_counter())[0];
  // Follow the chain back from the queried variable through the context.
  std::string var = v.query.substr(std::string("What is the value of ").size());
  var.pop_back();
  for (int hop = 0; hop < 10; ++hop) {
    const std::size_t p = v.context.find(var + " = ");
    BOOST_TEST_REQUIRE(p != std::string::npos);
    std::string rhs = v.context.substr(p + var.size() + 3);
    rhs = rhs.substr(0, rhs.find('.'));
    if (rhs.rfind("VAR ", 0) != 0) {
      BOOST_TEST(rhs == v.answers[0]);
      break;
    }
    var = rhs;
  }
  const auto h = make_task("multi_hop", with_dir({{"hops", "2"}, {"chain", "pres"}}), 4, byte_counter())[0];
  BOOST_TEST(h.query.find("Who was the successor of the successor of ") == 0u);
  const auto c = make_task("multi_hop", with_dir({{"chain", "capital"}}), 4, byte_counter())[0];
  const std::string who = c.query.substr(41, c.query.size() - 41 - 7);
  const std::size_t lp = c.context.find(who + " lives in ");
  BOOST_TEST_REQUIRE(lp != std::string::npos);
  std::string country = c.context.substr(lp + who.size() + 10);
  country = country.substr(0, country.find(". "));
  BOOST_TEST(c.context.find("The capital of " + country + " is " + c.answers[0] + ".") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(quiz_parsing) {
  const auto f = expand_quiz_field("{G{eorge} }Washington");
  BOOST_TEST(f.at(0) == "George Washington");
  BOOST_TEST((std::find(f.begin(), f.end(), "Washington") != f.end()));
  BOOST_TEST(expand_quiz_field("1789-{17}97").at(0) == "1789-1797");
  const auto a = expand_quiz_field("Vienna|Wien");
  BOOST_TEST(a.size() == 2u);
  BOOST_TEST(expand_quiz_field("Andorra la V[ell|iej]a").at(0) == "Andorra la Vella");
  const auto pres = read_quiz(fs::path(kData) / "quiz" / "pres");
  BOOST_TEST(pres.at(0).at(0) == "George Washington");
  BOOST_TEST(pres.at(0).at(3) == "John Adams");
  BOOST_TEST(pres.at(2).at(3) == "James Madison");  // continued line joined
}

BOOST_AUTO_TEST_CASE(bad_names_and_params) {
  auto msg = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const dsrsq::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const auto m = msg([] { make_task("ruler", {}, 1, byte_counter()); });
  BOOST_TEST(m.find("fact_stream") != std::string::npos);
  BOOST_TEST(msg([] { make_task("needle", with_dir({{"colour", "1"}}), 1, byte_counter()); }).find("colour") !=
             std::string::npos);
  BOOST_TEST(msg([] { make_task("needle", with_dir({{"depth", "2"}}), 1, byte_counter()); }).find("depth") !=
             std::string::npos);
}

static std::vector<std::string> split_sep(const std::string& s) {
  std::vector<std::string> out;
  if (s.empty()) return out;
  for (std::size_t b = 0;;) {
    const std::size_t e = s.find(kListSep, b);
    out.push_back(s.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) return out;
    b = e + 1;
  }
}

// Multi-query recall: every queried value is stated once in the context, in
// the statement of its key; phrase values are runs of words of the real text
// (several words, so ROUGE-L and BLEU score partial answers).
BOOST_AUTO_TEST_CASE(mq_recall_queries_and_phrases) {
  for (const std::string value : {"digits", "phrase"}) {
    BOOST_TEST_CONTEXT(value) {
      const TaskParams p = with_dir({{"length", "3000"}, {"pairs", "10"}, {"queries", "6"}, {"value", value},
                                     {"n", "4"}, {"words", "4"}});
      const auto ex = make_task("mq_recall", p, 21, byte_counter());
      BOOST_TEST(same(ex, make_task("mq_recall", p, 21, byte_counter())));
      BOOST_TEST(!same(ex, make_task("mq_recall", p, 22, byte_counter())));
      BOOST_TEST_REQUIRE(ex.size() == 4u);
      for (const auto& e : ex) {
        check_answer_at(e);
        BOOST_TEST(e.context.size() <= 3002u);
        BOOST_TEST(e.context.size() >= 2900u);
        const auto qs = split_sep(e.meta.at("more_queries")), as = split_sep(e.meta.at("more_answers"));
        BOOST_TEST_REQUIRE(qs.size() == 5u);
        BOOST_TEST_REQUIRE(as.size() == 5u);
        std::vector<std::string> all_q{e.query}, all_a{e.answers[0]};
        all_q.insert(all_q.end(), qs.begin(), qs.end());
        all_a.insert(all_a.end(), as.begin(), as.end());
        for (std::size_t i = 0; i < all_q.size(); ++i) {
          // The key of the question, its statement in the context, the value in it.
          const std::string key = all_q[i].substr(all_q[i].find(" for ") + 5, all_q[i].size() - all_q[i].find(" for ") - 6);
          const std::string stmt = value == "digits" ? "The special magic number for " + key + " is " + all_a[i] + "."
                                                     : "The passphrase for " + key + " is \"" + all_a[i] + "\".";
          BOOST_TEST(e.context.find(stmt) != std::string::npos, stmt);
          BOOST_TEST(e.context.find(key) == e.context.rfind(key));  // every key is stated once
          for (std::size_t j = 0; j < i; ++j) BOOST_TEST(all_q[j] != all_q[i]);  // distinct questions
          if (value == "phrase") {
            BOOST_TEST(std::count(all_a[i].begin(), all_a[i].end(), ' ') == 3);  // 4 words
            BOOST_TEST(all_a[i].find_first_of(".,;:!?\"") == std::string::npos);
          } else {
            BOOST_TEST(all_a[i].size() == 4u);
          }
        }
      }
    }
  }
  // Phrases come from the haystack's real sentences.
  const auto e = make_task("mq_recall", with_dir({{"length", "500"}, {"pairs", "2"}, {"queries", "1"}, {"value", "phrase"},
                                                  {"haystack", kData + "/text"}}), 3, byte_counter())[0];
  const Haystack h = Haystack::from_path(kData + "/text");
  bool found = false;
  for (const auto& s : h.sentences) found = found || s.find(e.answers[0]) != std::string::npos;
  BOOST_TEST(found, e.answers[0]);
  BOOST_CHECK_THROW(make_task("mq_recall", with_dir({{"pairs", "2"}, {"queries", "3"}}), 1, byte_counter()), dsrsq::Error);
  BOOST_CHECK_THROW(make_task("mq_recall", with_dir({{"value", "words"}}), 1, byte_counter()), dsrsq::Error);
}
