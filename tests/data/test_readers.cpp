#define BOOST_TEST_MODULE data_readers
#include <boost/test/unit_test.hpp>
#include <filesystem>
#include <fstream>

#include "core/error.hpp"
#include "data/readers.hpp"
#include "../common/errors.hpp"

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using namespace dsrsq::data;

static const fs::path kFix = fs::path(DSRSQ_DATASETS_DIR) / "fixtures";

using ref::error_of;

// Writes `file` with its line `line` (1-based) replaced by broken JSON.
static fs::path corrupt_copy(const fs::path& src, std::size_t line) {
  const fs::path dst = fs::temp_directory_path() / ("dsrsq_corrupt_" + src.filename().string());
  std::ifstream in(src);
  std::ofstream out(dst);
  std::string l;
  for (std::size_t i = 1; std::getline(in, l); ++i) out << (i == line ? std::string("{\"broken\": ") : l) << "\n";
  return dst;
}

static void check_errors(const std::string& name, const fs::path& file,
                         std::vector<Example> (*reader)(const fs::path&, const ReadOptions&)) {
  const auto bad = corrupt_copy(file, 2);
  const std::string msg = error_of([&] { reader(bad, {}); });
  BOOST_TEST_INFO(name << ": " << msg);
  BOOST_TEST(msg.find(bad.string() + ":2:") != std::string::npos);
  const std::string miss = error_of([&] { reader(kFix / "no_such_file.jsonl", {}); });
  BOOST_TEST(miss.find("no_such_file.jsonl") != std::string::npos);
  fs::remove(bad);
}

BOOST_AUTO_TEST_CASE(nq_fields) {
  const auto f = kFix / "nq" / "nq-simplified.jsonl";
  const auto v = read_nq(f);
  BOOST_TEST_REQUIRE(v.size() == 4u);
  BOOST_TEST(v[0].id == "9001");
  BOOST_TEST(v[0].query == "how many years is the term of a united states senator");
  BOOST_TEST(v[0].answers.at(0) == "six Years;");
  BOOST_TEST(v[0].context.find("<P>") == std::string::npos);
  BOOST_TEST(v[0].context.find("for six Years;") != std::string::npos);
  BOOST_TEST(v[0].meta.at("long_answer").find("The Senate of the United States shall be composed") == 0u);
  BOOST_TEST(v[3].answers.at(0) == "yes");  // yes/no answer, no short span
  check_errors("nq", f, read_nq);
}

BOOST_AUTO_TEST_CASE(eli5_fields) {
  const auto f = kFix / "eli5" / "eli5.jsonl";
  const auto v = read_eli5(f);
  BOOST_TEST_REQUIRE(v.size() == 3u);
  BOOST_TEST(v[0].query == "How are senators chosen and how long do they serve?");
  BOOST_TEST(v[1].context == "I keep hearing 'We the People'.");
  // answers ordered by score: 9 before 2
  BOOST_TEST(v[2].answers.at(0) == "The Congress, not the President.");
  BOOST_TEST(v[2].answers.size() == 2u);
  check_errors("eli5", f, read_eli5);
}

BOOST_AUTO_TEST_CASE(cnn_dm_story_and_csv) {
  const auto stories = load_dataset("cnn_dm", kFix / "cnn_dm" / "stories");
  BOOST_TEST_REQUIRE(stories.size() == 4u);
  const auto csv = read_cnn_dm_csv(kFix / "cnn_dm" / "cnn_dm.csv");
  BOOST_TEST_REQUIRE(csv.size() == 4u);
  for (const auto& s : stories) {
    auto it = std::find_if(csv.begin(), csv.end(), [&](const Example& c) { return c.id == s.id; });
    BOOST_TEST_REQUIRE((it != csv.end()));
    BOOST_TEST(it->context == s.context);  // same article through both forms
    BOOST_TEST(it->answers.at(0) == s.answers.at(0));
    BOOST_TEST(s.context.find("@highlight") == std::string::npos);
    BOOST_TEST(s.query == "Summarize the article.");
  }
  const std::string miss = error_of([] { load_dataset("cnn_dm", kFix / "nope"); });
  BOOST_TEST(miss.find("nope") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(csv_quotes_and_newlines) {
  const auto rows = parse_csv("a,b,c\r\n1,\"x, \"\"quoted\"\"\ny\",\r\n\"\",2,\"3\"\n");
  BOOST_TEST_REQUIRE(rows.size() == 3u);
  BOOST_TEST(rows[1].size() == 3u);
  BOOST_TEST(rows[1][1] == "x, \"quoted\"\ny");
  BOOST_TEST(rows[1][2] == "");
  BOOST_TEST(rows[2][0] == "");
  BOOST_TEST(rows[2][2] == "3");
  BOOST_TEST(error_of([] { parse_csv("a\n\"open\n", "t.csv"); }).find("t.csv:2") != std::string::npos);
  BOOST_TEST(!error_of([] { parse_csv("a,b\"c\n"); }).empty());
}

BOOST_AUTO_TEST_CASE(s2orc_fields) {
  const auto f = kFix / "s2orc" / "s2orc.jsonl";
  const auto v = read_s2orc(f);
  BOOST_TEST_REQUIRE(v.size() == 3u);
  BOOST_TEST(v[0].id == "17870917");
  BOOST_TEST(v[0].answers.at(0).find("We the People") == 0u);
  BOOST_TEST(v[0].context.find("Article I, Section 1\nAll legislative Powers") != std::string::npos);
  BOOST_TEST(v[0].meta.at("num_cite_spans") == "1");
  BOOST_TEST(v[0].meta.at("num_bib_entries") == "1");
  check_errors("s2orc", f, read_s2orc);
}

BOOST_AUTO_TEST_CASE(code_fields) {
  const auto f = kFix / "github" / "the_stack.jsonl";
  const auto v = read_github(f);
  BOOST_TEST_REQUIRE(v.size() == 6u);  // 3 + 2 functions, 1 C file
  BOOST_TEST(v[0].answers.at(0) == "count_words");
  BOOST_TEST(v[0].query == "Return the number of whitespace-separated words in text.");
  BOOST_TEST(v[0].context.find(v[0].query) == std::string::npos);  // docstring removed
  BOOST_TEST(v[0].context.find("def longest_line") != std::string::npos);
  BOOST_TEST(v[5].answers.at(0) == "C");
  check_errors("github", f, read_github);

  const auto g = kFix / "codesearchnet" / "python_test_0.jsonl";
  const auto c = read_codesearchnet(g);
  BOOST_TEST_REQUIRE(c.size() == 5u);
  BOOST_TEST(c[1].answers.at(0) == "longest_line");
  BOOST_TEST(c[1].query == "Return the longest line of text (the first one on ties).");
  BOOST_TEST(c[1].context.find("def count_words") != std::string::npos);  // whole module
  BOOST_TEST(c[1].context.find("\"\"\"") == std::string::npos);
  BOOST_TEST(c[3].context.find("def count_words") == std::string::npos);  // other module
  check_errors("codesearchnet", g, read_codesearchnet);
}

BOOST_AUTO_TEST_CASE(longbench_fields) {
  const auto f = kFix / "longbench" / "longbench.jsonl";
  const auto v = read_longbench(f);
  BOOST_TEST_REQUIRE(v.size() == 3u);
  BOOST_TEST(v[1].answers.at(0) == "the Senate");
  BOOST_TEST(v[1].context.find("The Senate shall have the sole Power to try all Impeachments.") != std::string::npos);
  BOOST_TEST(v[2].meta.at("all_classes").find("George Washington") != std::string::npos);
  BOOST_TEST(v[0].meta.at("all_classes") == "null");
  check_errors("longbench", f, read_longbench);
}

BOOST_AUTO_TEST_CASE(dispatcher) {
  for (const auto& n : dataset_names()) {
    const std::string dir = n == "nq" ? "nq" : n;
    BOOST_TEST_INFO(n);
    BOOST_TEST(!load_dataset(n, kFix / dir).empty());
  }
  ReadOptions two;
  two.max_examples = 2;
  BOOST_TEST(load_dataset("nq", kFix / "nq", two).size() == 2u);
  const std::string msg = error_of([] { load_dataset("squad", kFix); });
  BOOST_TEST(msg.find("squad") != std::string::npos);
  BOOST_TEST(msg.find("longbench") != std::string::npos);
}

// ---- skipped and degenerate records: one warning per reader call, with counts

struct Warnings {
  std::vector<std::string> got;
  ReadOptions opt() {
    ReadOptions o;
    o.warn = [this](const std::string& w) { got.push_back(w); };
    return o;
  }
};

static fs::path write_lines(const std::string& name, const std::vector<std::string>& lines) {
  const fs::path p = fs::temp_directory_path() / name;
  std::ofstream out(p);
  for (const auto& l : lines) out << l << "\n";
  return p;
}

static std::vector<std::string> lines_of(const fs::path& f) {
  std::ifstream in(f);
  std::vector<std::string> v;
  for (std::string l; std::getline(in, l);)
    if (!l.empty()) v.push_back(l);
  return v;
}

BOOST_AUTO_TEST_CASE(eli5_empty_selftext_warned_once_with_counts) {
  Warnings w;
  const auto v = read_eli5(kFix / "eli5" / "eli5.jsonl", w.opt());
  BOOST_TEST(v.size() == 3u);  // kept
  BOOST_TEST_REQUIRE(w.got.size() == 1u);
  BOOST_TEST_INFO(w.got[0]);
  BOOST_TEST(w.got[0].find("eli5.jsonl") != std::string::npos);
  BOOST_TEST(w.got[0].find("2 of 3 records have an empty selftext") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(nq_no_short_answer_and_no_answer) {
  Warnings w;
  BOOST_TEST(read_nq(kFix / "nq" / "nq-simplified.jsonl", w.opt()).size() == 4u);
  BOOST_TEST_REQUIRE(w.got.size() == 1u);
  BOOST_TEST(w.got[0].find("1 of 4 records have no short answer (kept: scored on the yes/no answer)") !=
             std::string::npos);

  // Two copies of record 4 with no yes/no and no long answer either: skipped, counted once.
  auto lines = lines_of(kFix / "nq" / "nq-simplified.jsonl");
  auto no_answer = nlohmann::json::parse(lines.at(3));
  for (auto& a : no_answer["annotations"]) {
    a["yes_no_answer"] = "NONE";
    a["long_answer"] = {{"start_token", -1}, {"end_token", -1}, {"candidate_index", -1}};
  }
  lines.push_back(no_answer.dump());
  lines.push_back(no_answer.dump());
  const auto f = write_lines("dsrsq_nq_no_answer.jsonl", lines);
  Warnings w2;
  const auto v = read_nq(f, w2.opt());
  BOOST_TEST(v.size() == 4u);
  for (const auto& e : v) BOOST_TEST(!e.answers.empty());
  BOOST_TEST_REQUIRE(w2.got.size() == 1u);
  BOOST_TEST_INFO(w2.got[0]);
  BOOST_TEST(w2.got[0].find("1 of 6 records have no short answer") != std::string::npos);
  BOOST_TEST(w2.got[0].find("2 of 6 records skipped: no short, yes/no or long answer") != std::string::npos);
  fs::remove(f);
}

// Token indices must be JSON integers: a float such as 1e30 was cast to
// std::size_t unchecked (undefined behaviour, found by fuzz_readers; its input
// is tests/fuzz/regressions/readers/nq_float_token_index). Now a clean error
// naming the field and the line.
BOOST_AUTO_TEST_CASE(nq_token_index_must_be_integer) {
  const std::string doc = R"("document_text":"a b c","question_text":"q")";
  for (const std::string& span : {std::string(R"("start_token":1e30,"end_token":2)"),
                                  std::string(R"("start_token":0,"end_token":1.5)"),
                                  std::string(R"("start_token":-1,"end_token":2)"),
                                  std::string(R"("start_token":0,"end_token":18446744073709551615)")}) {
    BOOST_TEST_CONTEXT(span) {
      const auto f = write_lines("dsrsq_nq_float_index.jsonl",
                                 {"{" + doc + R"(,"annotations":[{"short_answers":[{)" + span + "}]}]}"});
      const std::string err = error_of([&] { read_nq(f); });
      BOOST_TEST(err.find("dsrsq_nq_float_index.jsonl:1: ") != std::string::npos, err);
      fs::remove(f);
    }
  }
  const auto f = write_lines("dsrsq_nq_float_index.jsonl",
                             {"{" + doc + R"(,"annotations":[{"long_answer":{"start_token":0.5,"end_token":2}}]})"});
  BOOST_TEST(error_of([&] { read_nq(f); }).find("field 'start_token' is not an integer") != std::string::npos);
  fs::remove(f);
}

BOOST_AUTO_TEST_CASE(skips_counted_in_other_readers) {
  // longbench: empty answers skipped, empty context kept.
  auto lb = lines_of(kFix / "longbench" / "longbench.jsonl");
  auto j = nlohmann::json::parse(lb.at(0));
  j["answers"] = nlohmann::json::array();
  auto k = nlohmann::json::parse(lb.at(1));
  k["context"] = "";
  lb.push_back(j.dump());
  lb.push_back(k.dump());
  const auto f = write_lines("dsrsq_lb_skips.jsonl", lb);
  Warnings w;
  BOOST_TEST(read_longbench(f, w.opt()).size() == 4u);
  BOOST_TEST_REQUIRE(w.got.size() == 1u);
  BOOST_TEST_INFO(w.got[0]);
  BOOST_TEST(w.got[0].find("1 of 5 records skipped: no answers; 1 of 5 records have an empty context") !=
             std::string::npos);
  fs::remove(f);

  // codesearchnet: functions with no docstring.
  auto cs = lines_of(kFix / "codesearchnet" / "python_test_0.jsonl");
  auto d = nlohmann::json::parse(cs.at(0));
  d["docstring"] = "  ";
  cs[0] = d.dump();
  const auto g = write_lines("dsrsq_cs_skips.jsonl", cs);
  Warnings w2;
  BOOST_TEST(read_codesearchnet(g, w2.opt()).size() == 4u);
  BOOST_TEST_REQUIRE(w2.got.size() == 1u);
  BOOST_TEST(w2.got[0].find("1 of 5 functions skipped: no docstring") != std::string::npos);
  fs::remove(g);

  // Clean fixtures: no warning.
  Warnings none;
  read_longbench(kFix / "longbench" / "longbench.jsonl", none.opt());
  read_s2orc(kFix / "s2orc" / "s2orc.jsonl", none.opt());
  read_github(kFix / "github" / "the_stack.jsonl", none.opt());
  read_cnn_dm_csv(kFix / "cnn_dm" / "cnn_dm.csv", none.opt());
  BOOST_TEST(none.got.empty());
}

BOOST_AUTO_TEST_CASE(keep_last_tokens_cuts_oldest) {
  const dsrsq::ByteTokenizer tok;
  std::size_t before = 0;
  BOOST_TEST(keep_last_tokens("abcdef", tok, 3, &before) == "def");
  BOOST_TEST(before == 6u);
  BOOST_TEST(keep_last_tokens("abc", tok, 3) == "abc");
  BOOST_TEST(keep_last_tokens("abc", tok, 0).empty());
  // A cut inside a two-byte character drops its tail byte: at most n tokens, valid UTF-8.
  BOOST_TEST(keep_last_tokens("x\xC3\xA9yz", tok, 3) == "yz");
  BOOST_TEST(keep_last_tokens("x\xC3\xA9yz", tok, 4) == "\xC3\xA9yz");
  // Real records: the NQ document cut to 64 tokens is its last 64 bytes.
  const auto v = read_nq(kFix / "nq" / "nq-simplified.jsonl");
  const std::string cut = keep_last_tokens(v[0].context, tok, 64, &before);
  BOOST_TEST(before == v[0].context.size());
  BOOST_TEST(tok.encode(cut).size() <= 64u);
  BOOST_TEST(v[0].context.substr(v[0].context.size() - cut.size()) == cut);
}
