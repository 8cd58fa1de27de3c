#include "data/tasks.hpp"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "data/readers.hpp"

namespace dsrsq::data {
namespace fs = std::filesystem;

TokenCounter byte_counter() {
  return [](std::string_view s) { return s.size(); };
}

// ---------------------------------------------------------------- haystack
std::vector<std::string> split_sentences(std::string_view text) {
  std::vector<std::string> out;
  std::string cur;
  auto flush = [&] {
    while (!cur.empty() && cur.back() == ' ') cur.pop_back();
    if (cur.size() > 1) out.push_back(cur);
    cur.clear();
  };
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (std::isspace(static_cast<unsigned char>(c))) {
      if (!cur.empty() && cur.back() != ' ') cur += ' ';
      continue;
    }
    cur += c;
    if (c == '.' || c == '!' || c == '?') {
      std::size_t j = i + 1;
      while (j < text.size() && (text[j] == '"' || text[j] == '\'' || text[j] == ')')) cur += text[j++];
      if (j >= text.size()) {
        i = j;
        flush();
        break;
      }
      if (std::isspace(static_cast<unsigned char>(text[j]))) {
        std::size_t k = j;
        while (k < text.size() && std::isspace(static_cast<unsigned char>(text[k]))) ++k;
        if (k >= text.size() || std::isupper(static_cast<unsigned char>(text[k])) || text[k] == '"') {
          i = j - 1;
          flush();
          continue;
        }
      }
      i = j - 1;
    }
  }
  flush();
  return out;
}

Haystack Haystack::from_text(std::string_view text) { return Haystack{split_sentences(text)}; }

Haystack Haystack::from_path(const fs::path& path) {
  Haystack h;
  for (const auto& f : list_files(path, {".txt", ".json"})) {
    std::string text = read_file(f);
    if (f.extension() == ".json") {
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(text);
        text = j.at("text").get<std::string>();
      } catch (const nlohmann::json::exception& e) {
        raise_input_error(detail::cat(f.string(), ": expected a JSON object with a \"text\" field: ", e.what()));
      }
    }
    auto s = split_sentences(text);
    h.sentences.insert(h.sentences.end(), s.begin(), s.end());
  }
  DSRSQ_INPUT_CHECK(!h.sentences.empty(), "haystack ", path.string(), " has no sentences");
  return h;
}

// ---------------------------------------------------------------- quiz
namespace {
// Renders s[i..] up to `close` (consumed); first alternative at every choice;
// optional {..} parts kept when `full`.
std::string render_group(std::string_view s, std::size_t& i, bool full, char close) {
  std::string out;
  while (i < s.size()) {
    const char c = s[i];
    if (c == close) {
      ++i;
      return out;
    }
    if (c == '|') {  // skip the other alternatives of this group
      int depth = 0;
      for (++i; i < s.size(); ++i) {
        if (s[i] == '\\') {
          ++i;
          continue;
        }
        if (s[i] == '{' || s[i] == '[') ++depth;
        else if ((s[i] == '}' || s[i] == ']') && depth > 0) --depth;
        else if (depth == 0 && s[i] == close) break;
      }
      if (i < s.size()) ++i;
      return out;
    }
    ++i;
    if (c == '{') {
      std::string inner = render_group(s, i, full, '}');
      if (full) out += inner;
    } else if (c == '[') {
      out += render_group(s, i, full, ']');
    } else if (c == '\\' && i < s.size()) {
      out += s[i++];
    } else {
      out += c;
    }
  }
  return out;
}

std::vector<std::string> split_top(std::string_view s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  int depth = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '\\' && i + 1 < s.size()) {
      cur += c;
      cur += s[++i];
      continue;
    }
    if (c == '{' || c == '[') ++depth;
    if ((c == '}' || c == ']') && depth > 0) --depth;
    if (c == sep && depth == 0) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  out.push_back(cur);
  return out;
}
}  // namespace

std::vector<std::string> expand_quiz_field(std::string_view field) {
  std::vector<std::string> out;
  auto add = [&](std::string v) {
    if (!v.empty() && std::find(out.begin(), out.end(), v) == out.end()) out.push_back(std::move(v));
  };
  const auto alts = split_top(field, '|');
  for (bool full : {true, false})
    for (const auto& a : alts) {
      std::size_t i = 0;
      add(render_group(a, i, full, '\0'));
    }
  return out;
}

std::vector<QuizEntry> read_quiz(const fs::path& file) {
  std::istringstream in(read_file(file));
  std::vector<QuizEntry> out;
  std::string line, logical;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\\') {
      logical += line.substr(0, line.size() - 1);
      continue;
    }
    logical += line;
    if (!logical.empty()) {
      QuizEntry e;
      for (const auto& f : split_top(logical, ':')) e.fields.push_back(expand_quiz_field(f));
      for (auto& f : e.fields)
        if (f.empty()) f.push_back("");
      out.push_back(std::move(e));
    }
    logical.clear();
  }
  DSRSQ_INPUT_CHECK(!out.empty(), "quiz file ", file.string(), " has no entries");
  return out;
}

// ---------------------------------------------------------------- assembly
namespace {

struct Insert {
  std::string text;
  double depth;  // 0..1 fraction of the filler
};

struct Assembled {
  std::string context;
  std::vector<std::size_t> offsets;  // char offset of each insert, in input order
};

// Real filler sentences from a random start, cut to the token budget left
// after the inserts, with each insert placed at the sentence boundary nearest
// its depth. Inserts at the same boundary keep their input order.
Assembled assemble(const Haystack& h, Rng& rng, std::size_t target, const std::vector<Insert>& ins,
                   const TokenCounter& ct) {
  DSRSQ_INPUT_CHECK(!h.sentences.empty(), "empty haystack");
  const std::size_t sep = ct(" ");
  std::size_t ins_tok = 0;
  for (const auto& x : ins) ins_tok += ct(x.text) + sep;
  const std::size_t budget = target > ins_tok ? target - ins_tok : 0;
  std::vector<std::string> fill;
  std::vector<std::size_t> prefix{0};
  std::size_t used = 0;
  const std::size_t n = h.sentences.size();
  std::size_t k = rng.below(n);
  for (std::size_t guard = 0; used < budget && guard < 10 * n + 1000000; ++guard, ++k) {
    const std::string& s = h.sentences[k % n];
    const std::size_t t = ct(s) + sep;
    if (used + t <= budget) {
      fill.push_back(s);
      used += t;
      prefix.push_back(used);
      continue;
    }
    std::string part;
    std::istringstream ws(s);
    for (std::string w; ws >> w;) {
      std::string cand = part.empty() ? w : part + " " + w;
      if (used + ct(cand) + sep > budget) break;
      part = std::move(cand);
    }
    if (!part.empty()) {
      used += ct(part) + sep;
      fill.push_back(std::move(part));
      prefix.push_back(used);
    }
    break;
  }
  std::vector<std::size_t> pos(ins.size());
  for (std::size_t i = 0; i < ins.size(); ++i) {
    const double d = std::clamp(ins[i].depth, 0.0, 1.0);
    const double want = d * static_cast<double>(used);
    std::size_t best = 0;
    double bd = 1e300;
    for (std::size_t b = 0; b < prefix.size(); ++b) {
      const double dd = std::abs(static_cast<double>(prefix[b]) - want);
      if (dd < bd) bd = dd, best = b;
    }
    pos[i] = best;
  }
  std::vector<std::size_t> order(ins.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return pos[a] < pos[b]; });
  Assembled out;
  out.offsets.resize(ins.size());
  std::size_t oi = 0;
  auto put = [&](const std::string& s) {
    if (!out.context.empty()) out.context += ' ';
    out.context += s;
  };
  for (std::size_t b = 0; b <= fill.size(); ++b) {
    while (oi < order.size() && pos[order[oi]] == b) {
      if (!out.context.empty()) out.context += ' ';
      out.offsets[order[oi]] = out.context.size();
      out.context += ins[order[oi]].text;
      ++oi;
    }
    if (b < fill.size()) put(fill[b]);
  }
  return out;
}

// ---------------------------------------------------------------- params
struct Params {
  const TaskParams& p;
  std::set<std::string> used;
  std::string task;
  std::string str(const std::string& k, const std::string& d) {
    used.insert(k);
    auto it = p.find(k);
    return it == p.end() ? d : it->second;
  }
  long long integer(const std::string& k, long long d, long long lo, long long hi) {
    const std::string s = str(k, std::to_string(d));
    char* end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    DSRSQ_INPUT_CHECK(end && *end == 0 && !s.empty(), "task ", task, ": parameter ", k, "='", s,
                      "' is not an integer");
    DSRSQ_INPUT_CHECK(v >= lo && v <= hi, "task ", task, ": parameter ", k, "=", v, " outside [", lo, ", ", hi,
                      "]");
    return v;
  }
  double real(const std::string& k, double d, double lo, double hi) {
    const std::string s = str(k, std::to_string(d));
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    DSRSQ_INPUT_CHECK(end && *end == 0 && !s.empty(), "task ", task, ": parameter ", k, "='", s, "' is not a number");
    DSRSQ_INPUT_CHECK(v >= lo && v <= hi, "task ", task, ": parameter ", k, "=", v, " outside [", lo, ", ", hi, "]");
    return v;
  }
  void finish() {
    for (const auto& [k, v] : p)
      DSRSQ_INPUT_CHECK(used.count(k), "task ", task, ": unknown parameter '", k, "'");
  }
  fs::path datasets_dir() {
    const char* env = std::getenv("DSRSQ_DATASETS");
    return str("datasets_dir", env && *env ? env : "datasets");
  }
  Haystack haystack() {
    const fs::path dd = datasets_dir();
    return Haystack::from_path(str("haystack", (dd / "sotu").string()));
  }
};

const char* const kAdj[] = {"amber", "brisk", "calm", "dusty", "eager", "faint", "gilded", "hollow",
                            "ivory", "jolly", "keen", "lunar", "misty", "noble", "olive", "proud"};
const char* const kNoun[] = {"falcon", "harbor", "meadow", "lantern", "quarry", "willow", "beacon", "canyon",
                             "summit", "thicket", "orchard", "glacier", "cobalt", "ember", "fjord", "delta"};
const char* const kColors[] = {"red", "blue", "green", "yellow", "purple", "orange",
                               "black", "white", "gray", "pink", "brown", "teal"};
const char* const kGiven[] = {"Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hiro",
                              "Ines", "Jonas", "Kavya", "Lars", "Mira", "Nadia", "Omar", "Priya"};
const char* const kFamily[] = {"Abbott", "Brandt", "Castillo", "Duarte", "Eklund", "Fischer", "Garza", "Holm",
                               "Ibarra", "Jansen", "Keller", "Lindqvist", "Moreau", "Novak", "Ortega", "Petrov"};
template <class T, std::size_t N>
const char* pick(const T (&arr)[N], Rng& rng) {
  return arr[rng.below(N)];
}

std::string digits(Rng& rng, int n) {
  std::string s(1, static_cast<char>('1' + rng.below(9)));
  for (int i = 1; i < n; ++i) s += static_cast<char>('0' + rng.below(10));
  return s;
}

std::string join(const std::vector<std::string>& v, const char* sep = ",") {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : sep) + x;
  return s;
}
template <class T>
std::string join_num(const std::vector<T>& v) {
  std::vector<std::string> s;
  for (auto x : v) s.push_back(std::to_string(x));
  return join(s);
}

std::string fmt_double(double d) {
  std::ostringstream os;
  os.precision(6);
  os << d;
  return os.str();
}

void common_meta(Example& ex, const std::string& task, std::uint64_t seed, std::size_t target,
                 const TokenCounter& ct) {
  ex.meta["task"] = task;
  ex.meta["seed"] = std::to_string(seed);
  ex.meta["target_tokens"] = std::to_string(target);
  ex.meta["context_tokens"] = std::to_string(ct(ex.context));
}

// Char offset -> token offset and depth fraction.
std::size_t tok_at(const std::string& ctx, std::size_t off, const TokenCounter& ct) {
  return ct(std::string_view(ctx).substr(0, off));
}

// Sets answer_offset and evidence span for a statement at `off` containing `answer`.
void mark_answer(Example& ex, std::size_t off, const std::string& statement, const std::string& answer) {
  const std::size_t a = statement.rfind(answer);
  DSRSQ_REQUIRE(a != std::string::npos, "answer '", answer, "' not in statement '", statement, "'");
  ex.meta["answer_offset"] = std::to_string(off + a);
  ex.meta["evidence_begin"] = std::to_string(off);
  ex.meta["evidence_end"] = std::to_string(off + statement.size());
}

// ---------------------------------------------------------------- needle
std::vector<std::vector<std::string>> capital_facts(const fs::path& quiz_dir) {
  std::vector<std::vector<std::string>> out;  // country, capital
  for (const char* f : {"africa", "america", "asia", "europe"}) {
    for (const auto& e : read_quiz(quiz_dir / f))
      if (e.fields.size() >= 2 && !e.at(0).empty() && !e.at(1).empty()) out.push_back({e.at(0), e.at(1)});
  }
  return out;
}

std::vector<Example> needle_task(Params& P, std::uint64_t seed, const TokenCounter& ct) {
  const auto n = P.integer("n", 1, 1, 1000000);
  const auto length = static_cast<std::size_t>(P.integer("length", 2000, 0, 100000000));
  const double depth = P.real("depth", 0.5, -1.0, 1.0);
  const auto needles = P.integer("needles", 1, 1, 1000);
  const auto values = P.integer("values", 1, 1, 100);
  const auto distractors = P.integer("distractors", 0, 0, 1000);
  const auto ndigits = static_cast<int>(P.integer("digits", 7, 1, 18));
  const std::string source = P.str("source", "synthetic");
  DSRSQ_INPUT_CHECK(source == "synthetic" || source == "quiz", "task needle: source must be synthetic or quiz, not '",
                    source, "'");
  DSRSQ_INPUT_CHECK(source == "synthetic" || values == 1, "task needle: values > 1 needs source=synthetic");
  const Haystack hay = P.haystack();
  std::vector<std::vector<std::string>> caps;
  if (source == "quiz") {
    caps = capital_facts(P.datasets_dir() / "quiz");
    DSRSQ_INPUT_CHECK(static_cast<std::size_t>(needles + distractors) <= caps.size(), "task needle: only ",
                      caps.size(), " quiz facts for ", needles + distractors, " needles and distractors");
  }
  P.finish();
  std::vector<Example> out;
  for (long long e = 0; e < n; ++e) {
    Rng rng(seed, static_cast<std::uint64_t>(e));
    const double d = depth < 0 ? rng.uniform() : depth;
    std::vector<Insert> ins;
    std::vector<int> role;  // 0: queried needle value, 1: other needle, 2: distractor
    std::string query;
    std::vector<std::string> answer_vals;
    if (source == "synthetic") {
      std::set<std::string> keys_used;
      auto fresh_key = [&] {
        for (;;) {
          std::string k = std::string(pick(kAdj, rng)) + "-" + pick(kNoun, rng) + "-" + std::to_string(10 + rng.below(90));
          if (keys_used.insert(k).second) return k;
        }
      };
      std::vector<std::string> keys;
      for (long long i = 0; i < needles; ++i) keys.push_back(fresh_key());
      auto stmt = [](const std::string& k, const std::string& v) {
        return "The special magic number for " + k + " is " + v + ".";
      };
      std::set<std::string> vals_used;
      auto fresh_val = [&] {
        for (;;) {
          std::string v = digits(rng, ndigits);
          if (vals_used.insert(v).second || ndigits < 3) return v;
        }
      };
      for (long long i = 0; i < needles; ++i)
        for (long long v = 0; v < values; ++v) {
          const std::string val = fresh_val();
          if (i == 0) answer_vals.push_back(val);
          ins.push_back({stmt(keys[i], val), (i == 0 && v == 0) ? d : rng.uniform()});
          role.push_back(i == 0 ? 0 : 1);
        }
      // Distractors: the queried key with another number suffix.
      const std::string stem = keys[0].substr(0, keys[0].rfind('-') + 1);
      for (long long i = 0; i < distractors; ++i) {
        std::string k;
        for (;;) {
          k = stem + std::to_string(10 + rng.below(90));
          if (keys_used.insert(k).second) break;
          k = fresh_key();
          break;
        }
        ins.push_back({stmt(k, fresh_val()), rng.uniform()});
        role.push_back(2);
      }
      query = values > 1 ? "What are all the special magic numbers for " + keys[0] + "?"
                         : "What is the special magic number for " + keys[0] + "?";
    } else {
      std::vector<std::size_t> idx(caps.size());
      std::iota(idx.begin(), idx.end(), 0);
      for (std::size_t i = idx.size(); i > 1; --i) std::swap(idx[i - 1], idx[rng.below(i)]);
      for (long long i = 0; i < needles + distractors; ++i) {
        const auto& c = caps[idx[static_cast<std::size_t>(i)]];
        ins.push_back({"The capital of " + c[0] + " is " + c[1] + ".", i == 0 ? d : rng.uniform()});
        role.push_back(i == 0 ? 0 : (i < needles ? 1 : 2));
      }
      answer_vals.push_back(caps[idx[0]][1]);
      query = "What is the capital of " + caps[idx[0]][0] + "?";
    }
    const Assembled a = assemble(hay, rng, length, ins, ct);
    Example ex;
    ex.id = "needle-" + std::to_string(seed) + "-" + std::to_string(e);
    ex.context = a.context;
    ex.query = query;
    ex.answers.push_back(join(answer_vals, ", "));
    std::vector<std::size_t> needle_off, needle_end, distr_off, val_off;
    for (std::size_t i = 0; i < ins.size(); ++i) {
      if (role[i] == 2) {
        distr_off.push_back(a.offsets[i]);
        continue;
      }
      if (role[i] == 0) {
        const std::string& v = answer_vals[needle_off.size()];
        needle_off.push_back(a.offsets[i]);
        needle_end.push_back(a.offsets[i] + ins[i].text.size());
        val_off.push_back(a.offsets[i] + ins[i].text.find(v));
      }
    }
    mark_answer(ex, a.offsets[0], ins[0].text, answer_vals[0]);
    common_meta(ex, "needle", seed, length, ct);
    const double total = static_cast<double>(ct(ex.context));
    ex.meta["depth"] = fmt_double(d);
    ex.meta["actual_depth"] = fmt_double(total > 0 ? tok_at(ex.context, a.offsets[0], ct) / total : 0.0);
    ex.meta["length"] = std::to_string(length);
    ex.meta["needle_offsets"] = join_num(needle_off);
    ex.meta["needle_ends"] = join_num(needle_end);
    ex.meta["value_offsets"] = join_num(val_off);
    ex.meta["distractor_offsets"] = join_num(distr_off);
    ex.meta["num_needles"] = std::to_string(needles);
    ex.meta["num_values"] = std::to_string(values);
    ex.meta["num_distractors"] = std::to_string(distractors);
    ex.meta["source"] = source;
    out.push_back(std::move(ex));
  }
  return out;
}

// ---------------------------------------------------------------- multi-query recall
// Multi-query associative recall (Arora et al. 2023, "Zoology") over real
// text: `pairs` key -> value statements at random depths, `queries` of them
// asked. The first query is the example's query; the others ride in meta
// more_queries / more_answers (joined by kListSep) so training can put every
// query after the context and supervise every answer (encode_example with
// all_queries). value=digits states values as the needle task does (same
// sentence and question), value=phrase takes `words` consecutive words of the
// haystack as the value, so answers are phrases that ROUGE-L and BLEU can score.
std::vector<std::string> phrase_words(const std::string& sentence) {
  std::vector<std::string> out;
  std::istringstream ws(sentence);
  for (std::string w; ws >> w;) {
    std::string clean;
    for (char c : w)
      if (std::isalnum(static_cast<unsigned char>(c)) || c == '\'' || c == '-') clean += c;
    // Words carrying sentence punctuation or nothing alphabetic are cut out:
    // a phrase is a run of plain words.
    const bool plain = !clean.empty() && clean.size() == w.size() && std::isalpha(static_cast<unsigned char>(clean[0]));
    out.push_back(plain ? clean : std::string());
  }
  return out;
}

std::vector<Example> mq_task(Params& P, std::uint64_t seed, const TokenCounter& ct) {
  const auto n = P.integer("n", 1, 1, 1000000);
  const auto length = static_cast<std::size_t>(P.integer("length", 2000, 0, 100000000));
  auto pairs = P.integer("pairs", 16, 1, 10000);
  auto queries = P.integer("queries", 4, 1, 10000);
  DSRSQ_INPUT_CHECK(queries <= pairs, "task mq_recall: queries (", queries, ") must be <= pairs (", pairs, ")");
  // pair_tokens > 0: one statement per pair_tokens of context, at most
  // `pairs` (and as many queries, at most `queries`), so short and long
  // contexts of a curriculum hold statements at the same density.
  const auto pair_tokens = P.integer("pair_tokens", 0, 0, 100000000);
  if (pair_tokens > 0) {
    pairs = std::clamp<long long>(static_cast<long long>(length) / pair_tokens, 1, pairs);
    queries = std::min(queries, pairs);
  }
  const std::string value = P.str("value", "digits");
  DSRSQ_INPUT_CHECK(value == "digits" || value == "phrase", "task mq_recall: value must be digits or phrase, not '",
                    value, "'");
  const auto ndigits = static_cast<int>(P.integer("digits", 4, 1, 18));
  const auto nwords = static_cast<std::size_t>(P.integer("words", 3, 1, 12));
  const Haystack hay = P.haystack();
  P.finish();
  // Phrase candidates: every run of nwords plain words in the haystack.
  std::vector<std::string> phrases;
  if (value == "phrase") {
    for (const auto& s : hay.sentences) {
      const auto w = phrase_words(s);
      for (std::size_t i = 0; i + nwords <= w.size(); ++i) {
        bool ok = true;
        std::string ph;
        for (std::size_t j = i; j < i + nwords && ok; ++j) {
          ok = !w[j].empty();
          ph += (j > i ? " " : "") + w[j];
        }
        if (ok) phrases.push_back(std::move(ph));
      }
    }
    DSRSQ_INPUT_CHECK(phrases.size() >= static_cast<std::size_t>(pairs), "task mq_recall: the haystack has only ",
                      phrases.size(), " phrases of ", nwords, " plain words for ", pairs, " pairs");
  }
  std::vector<Example> out;
  for (long long e = 0; e < n; ++e) {
    Rng rng(seed, static_cast<std::uint64_t>(e));
    std::set<std::string> keys_used, vals_used;
    std::vector<std::string> keys, vals;
    std::vector<Insert> ins;
    for (long long i = 0; i < pairs; ++i) {
      std::string k;
      do k = std::string(pick(kAdj, rng)) + "-" + pick(kNoun, rng) + "-" + std::to_string(10 + rng.below(90));
      while (!keys_used.insert(k).second);
      // Distinct values, so every answer names one statement (the tries bound
      // protects tiny value spaces: 1 digit has 9 values).
      std::string v;
      for (int tries = 0; tries < 1000; ++tries) {
        v = value == "digits" ? digits(rng, ndigits) : phrases[rng.below(phrases.size())];
        if (vals_used.insert(v).second) break;
      }
      keys.push_back(k);
      vals.push_back(v);
      ins.push_back({value == "digits" ? "The special magic number for " + k + " is " + v + "."
                                       : "The passphrase for " + k + " is \"" + v + "\".",
                     rng.uniform()});
    }
    // Queried pairs: a random subset, asked in random order.
    std::vector<std::size_t> order(static_cast<std::size_t>(pairs));
    std::iota(order.begin(), order.end(), 0);
    for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
    order.resize(static_cast<std::size_t>(queries));
    auto question = [&](std::size_t i) {
      return value == "digits" ? "What is the special magic number for " + keys[i] + "?"
                               : "What is the passphrase for " + keys[i] + "?";
    };
    const Assembled a = assemble(hay, rng, length, ins, ct);
    Example ex;
    ex.id = "mq_recall-" + std::to_string(seed) + "-" + std::to_string(e);
    ex.context = a.context;
    const std::size_t q0 = order[0];
    ex.query = question(q0);
    ex.answers.push_back(vals[q0]);
    mark_answer(ex, a.offsets[q0], ins[q0].text, vals[q0]);
    common_meta(ex, "mq_recall", seed, length, ct);
    std::vector<std::string> mq, ma;
    std::vector<std::size_t> qoff;
    for (std::size_t j = 0; j < order.size(); ++j) {
      qoff.push_back(a.offsets[order[j]]);
      if (j == 0) continue;
      mq.push_back(question(order[j]));
      ma.push_back(vals[order[j]]);
    }
    ex.meta["more_queries"] = join(mq, kListSep);
    ex.meta["more_answers"] = join(ma, kListSep);
    ex.meta["num_pairs"] = std::to_string(pairs);
    ex.meta["num_queries"] = std::to_string(queries);
    ex.meta["value"] = value;
    ex.meta["pair_offsets"] = join_num(a.offsets);
    ex.meta["query_offsets"] = join_num(qoff);
    ex.meta["actual_depth"] = fmt_double(ex.context.empty() ? 0.0
                                         : static_cast<double>(tok_at(ex.context, a.offsets[q0], ct)) /
                                               static_cast<double>(std::max<std::size_t>(1, ct(ex.context))));
    out.push_back(std::move(ex));
  }
  return out;
}

// ---------------------------------------------------------------- kv recall
std::vector<Example> kv_task(Params& P, std::uint64_t seed, const TokenCounter& ct) {
  const auto n = P.integer("n", 1, 1, 1000000);
  const auto keys = P.integer("keys", 16, 1, 100000);
  const auto gap = static_cast<std::size_t>(P.integer("gap", 0, 0, 100000000));
  auto length = static_cast<std::size_t>(P.integer("length", 0, 0, 100000000));
  const Haystack hay = (length > 0 || gap > 0) ? P.haystack() : Haystack{{"unused."}};
  P.str("haystack", "");
  P.str("datasets_dir", "");
  P.finish();
  std::vector<Example> out;
  for (long long e = 0; e < n; ++e) {
    Rng rng(seed, static_cast<std::uint64_t>(e));
    std::set<std::string> used;
    std::vector<std::string> ks, vs;
    while (static_cast<long long>(ks.size()) < keys) {
      std::string k;
      for (int i = 0; i < 5; ++i) k += static_cast<char>('a' + rng.below(26));
      if (used.insert(k).second) {
        ks.push_back(k);
        vs.push_back(digits(rng, 4));
      }
    }
    const std::size_t qi = rng.below(ks.size());
    Example ex;
    std::vector<std::size_t> offs;
    std::size_t target = length;
    if (length == 0 && gap == 0) {
      for (std::size_t i = 0; i < ks.size(); ++i) {
        if (i) ex.context += ", ";
        offs.push_back(ex.context.size());
        ex.context += ks[i] + ": " + vs[i];
      }
      ex.context += ".";
      target = ct(ex.context);
    } else {
      std::vector<Insert> ins;
      std::size_t pair_tok = 0;
      for (std::size_t i = 0; i < ks.size(); ++i) {
        ins.push_back({ks[i] + ": " + vs[i] + ".", (static_cast<double>(i) + 0.5) / static_cast<double>(ks.size())});
        pair_tok += ct(ins.back().text) + ct(" ");
      }
      if (target == 0) target = pair_tok + gap * ks.size();
      const Assembled a = assemble(hay, rng, target, ins, ct);
      ex.context = a.context;
      offs = a.offsets;
    }
    ex.id = "kv_recall-" + std::to_string(seed) + "-" + std::to_string(e);
    ex.query = "What is the value paired with the key " + ks[qi] + "?";
    ex.answers.push_back(vs[qi]);
    const std::string stmt = ks[qi] + ": " + vs[qi];
    mark_answer(ex, offs[qi], stmt, ": " + vs[qi]);
    ex.meta["answer_offset"] = std::to_string(offs[qi] + ks[qi].size() + 2);
    common_meta(ex, "kv_recall", seed, target, ct);
    ex.meta["num_keys"] = std::to_string(keys);
    ex.meta["gap"] = std::to_string(gap);
    ex.meta["key_index"] = std::to_string(qi);
    ex.meta["key_offsets"] = join_num(offs);
    out.push_back(std::move(ex));
  }
  return out;
}

// ---------------------------------------------------------------- variable tracking
std::vector<Example> var_task(Params& P, std::uint64_t seed, const TokenCounter& ct) {
  const auto n = P.integer("n", 1, 1, 1000000);
  const auto chain = P.integer("chain", 4, 1, 1000);
  const auto dchains = P.integer("distractor_chains", 2, 0, 1000);
  const auto length = static_cast<std::size_t>(P.integer("length", 2000, 0, 100000000));
  const Haystack hay = P.haystack();
  P.finish();
  std::vector<Example> out;
  for (long long e = 0; e < n; ++e) {
    Rng rng(seed, static_cast<std::uint64_t>(e));
    std::set<std::string> names, vals;
    auto fresh = [&](std::set<std::string>& used, auto gen) {
      for (;;) {
        std::string s = gen();
        if (used.insert(s).second) return s;
      }
    };
    std::vector<Insert> ins;
    std::vector<std::string> chain0;
    std::string value0;
    std::vector<std::size_t> chain0_idx;
    for (long long c = 0; c <= dchains; ++c) {
      std::vector<double> ds(static_cast<std::size_t>(chain));
      for (auto& d : ds) d = rng.uniform();
      std::sort(ds.begin(), ds.end());
      std::string prev;
      const std::string val = fresh(vals, [&] { return digits(rng, 5); });
      for (long long i = 0; i < chain; ++i) {
        const std::string nm = fresh(names, [&] {
          std::string s = "VAR ";
          for (int k = 0; k < 5; ++k) s += static_cast<char>('A' + rng.below(26));
          return s;
        });
        const std::string rhs = i == 0 ? val : prev;
        if (c == 0) {
          chain0.push_back(nm);
          chain0_idx.push_back(ins.size());
        }
        ins.push_back({nm + " = " + rhs + ".", ds[static_cast<std::size_t>(i)]});
        prev = nm;
      }
      if (c == 0) value0 = val;
    }
    const Assembled a = assemble(hay, rng, length, ins, ct);
    Example ex;
    ex.id = "var_track-" + std::to_string(seed) + "-" + std::to_string(e);
    ex.context = a.context;
    ex.query = "What is the value of " + chain0.back() + "?";
    ex.answers.push_back(value0);
    mark_answer(ex, a.offsets[chain0_idx[0]], ins[chain0_idx[0]].text, " = " + value0);
    ex.meta["answer_offset"] = std::to_string(a.offsets[chain0_idx[0]] + chain0[0].size() + 3);
    common_meta(ex, "var_track", seed, length, ct);
    std::vector<std::size_t> ev;
    for (auto i : chain0_idx) ev.push_back(a.offsets[i]);
    ex.meta["chain"] = join(chain0);
    ex.meta["chain_offsets"] = join_num(ev);
    ex.meta["chain_length"] = std::to_string(chain);
    ex.meta["distractor_chains"] = std::to_string(dchains);
    out.push_back(std::move(ex));
  }
  return out;
}

// ---------------------------------------------------------------- multi-hop
std::vector<Example> hop_task(Params& P, std::uint64_t seed, const TokenCounter& ct) {
  const auto n = P.integer("n", 1, 1, 1000000);
  const std::string kind = P.str("chain", "pres");
  DSRSQ_INPUT_CHECK(kind == "pres" || kind == "capital", "task multi_hop: chain must be pres or capital, not '", kind,
                    "'");
  const auto hops = P.integer("hops", 2, 1, 40);
  DSRSQ_INPUT_CHECK(kind == "pres" || hops == 2, "task multi_hop: chain=capital has exactly 2 hops");
  const auto distractors = P.integer("distractors", 4, 0, 1000);
  const auto length = static_cast<std::size_t>(P.integer("length", 2000, 0, 100000000));
  const Haystack hay = P.haystack();
  const fs::path quiz = P.datasets_dir() / "quiz";
  P.finish();
  std::vector<QuizEntry> pres;
  std::vector<std::vector<std::string>> caps;
  if (kind == "pres") {
    pres = read_quiz(quiz / "pres");
    DSRSQ_INPUT_CHECK(static_cast<std::size_t>(hops) < pres.size(), "task multi_hop: hops too large");
  } else {
    caps = capital_facts(quiz);
  }
  std::vector<Example> out;
  for (long long e = 0; e < n; ++e) {
    Rng rng(seed, static_cast<std::uint64_t>(e));
    std::vector<Insert> ins;
    std::vector<std::size_t> chain_idx;
    Example ex;
    std::string answer, answer_stmt;
    if (kind == "pres") {
      // pres[i].at(3) is the successor of pres[i].at(0); chains follow file order.
      std::size_t start = 0;
      for (;;) {
        start = rng.below(pres.size() - static_cast<std::size_t>(hops) + 1);
        bool ok = true;
        for (long long h = 0; h < hops; ++h) ok = ok && pres[start + h].fields.size() >= 4 && !pres[start + h].at(3).empty();
        if (ok) break;
      }
      auto stmt = [&](const QuizEntry& q) { return "The successor of " + q.at(0) + " as president was " + q.at(3) + "."; };
      std::set<std::size_t> in_chain;
      for (long long h = 0; h < hops; ++h) {
        chain_idx.push_back(ins.size());
        in_chain.insert(start + h);
        ins.push_back({stmt(pres[start + h]), rng.uniform()});
      }
      for (long long d = 0, tries = 0; d < distractors && tries < 10000; ++tries) {
        const std::size_t j = rng.below(pres.size());
        if (in_chain.count(j) || pres[j].fields.size() < 4 || pres[j].at(3).empty()) continue;
        in_chain.insert(j);
        ins.push_back({stmt(pres[j]), rng.uniform()});
        ++d;
      }
      std::string q = pres[start].at(0);
      for (long long h = 0; h < hops; ++h) q = "the successor of " + q;
      ex.query = "Who was " + q + "?";
      const auto& last = pres[start + static_cast<std::size_t>(hops) - 1];
      answer = last.at(3);
      ex.answers = last.fields[3];
      ex.meta["start"] = pres[start].at(0);
    } else {
      std::vector<std::size_t> idx(caps.size());
      std::iota(idx.begin(), idx.end(), 0);
      for (std::size_t i = idx.size(); i > 1; --i) std::swap(idx[i - 1], idx[rng.below(i)]);
      std::set<std::string> people;
      auto person = [&] {
        for (;;) {
          std::string p = std::string(pick(kGiven, rng)) + " " + pick(kFamily, rng);
          if (people.insert(p).second) return p;
        }
      };
      DSRSQ_INPUT_CHECK(static_cast<std::size_t>(distractors) + 1 <= idx.size(), "task multi_hop: too many distractors");
      std::string who;
      for (long long i = 0; i <= distractors; ++i) {
        const auto& c = caps[idx[static_cast<std::size_t>(i)]];
        const std::string p = person();
        if (i == 0) {
          who = p;
          chain_idx = {ins.size(), ins.size() + 1};
          answer = c[1];
        }
        ins.push_back({p + " lives in " + c[0] + ".", rng.uniform()});
        ins.push_back({"The capital of " + c[0] + " is " + c[1] + ".", rng.uniform()});
      }
      ex.query = "What is the capital of the country where " + who + " lives?";
      ex.answers = {answer};
      ex.meta["start"] = who;
    }
    const Assembled a = assemble(hay, rng, length, ins, ct);
    ex.id = "multi_hop-" + std::to_string(seed) + "-" + std::to_string(e);
    ex.context = a.context;
    mark_answer(ex, a.offsets[chain_idx.back()], ins[chain_idx.back()].text, answer);
    const std::size_t last = ins[chain_idx.back()].text.rfind(answer);
    ex.meta["answer_offset"] = std::to_string(a.offsets[chain_idx.back()] + last);
    common_meta(ex, "multi_hop", seed, length, ct);
    std::vector<std::size_t> ev;
    for (auto i : chain_idx) ev.push_back(a.offsets[i]);
    ex.meta["chain"] = kind;
    ex.meta["hops"] = std::to_string(hops);
    ex.meta["hop_offsets"] = join_num(ev);
    ex.meta["num_distractors"] = std::to_string(distractors);
    out.push_back(std::move(ex));
  }
  return out;
}

// ---------------------------------------------------------------- fact stream
std::vector<Example> stream_task(Params& P, std::uint64_t seed, const TokenCounter& ct) {
  const auto n = P.integer("n", 1, 1, 1000000);
  const auto entities = P.integer("entities", 6, 1, 90);
  const auto events = P.integer("events", 24, 1, 100000);
  DSRSQ_INPUT_CHECK(events >= entities, "task fact_stream: events (", events, ") must be >= entities (", entities, ")");
  const auto queries = P.integer("queries", 6, 1, 100000);
  DSRSQ_INPUT_CHECK(queries <= events, "task fact_stream: queries must be <= events");
  const auto length = static_cast<std::size_t>(P.integer("length", 4000, 0, 100000000));
  const Haystack hay = P.haystack();
  P.finish();
  const std::size_t E = static_cast<std::size_t>(events);
  std::vector<Example> out;
  for (long long s = 0; s < n; ++s) {
    Rng rng(seed, static_cast<std::uint64_t>(s));
    std::vector<int> ids;
    std::set<int> idset;
    while (static_cast<long long>(ids.size()) < entities) {
      const int id = 1 + static_cast<int>(rng.below(99));
      if (idset.insert(id).second) ids.push_back(id);
    }
    // Events: every entity stated once first (shuffled), then overwrites.
    std::vector<std::size_t> ent(E);
    std::vector<std::string> val(E);
    std::vector<std::string> current(ids.size());
    std::vector<std::size_t> first(ids.size());
    std::iota(first.begin(), first.end(), 0);
    for (std::size_t i = first.size(); i > 1; --i) std::swap(first[i - 1], first[rng.below(i)]);
    std::vector<Insert> ins;
    constexpr std::size_t kColorsN = sizeof(kColors) / sizeof(kColors[0]);
    for (std::size_t k = 0; k < E; ++k) {
      ent[k] = k < first.size() ? first[k] : rng.below(ids.size());
      std::string v;
      do v = kColors[rng.below(kColorsN)];
      while (v == current[ent[k]]);
      current[ent[k]] = v;
      val[k] = v;
      const double lo = static_cast<double>(k) / static_cast<double>(E);
      ins.push_back({"Update " + std::to_string(k + 1) + ": the color of box " + std::to_string(ids[ent[k]]) +
                         " is now " + v + ".",
                     lo + 0.5 * rng.uniform() / static_cast<double>(E)});
    }
    const Assembled a = assemble(hay, rng, length, ins, ct);
    const std::string stream_id = "fact_stream-" + std::to_string(seed) + "-" + std::to_string(s);
    // Last statement of entity x at or before event k (-1 if none).
    auto last_stmt = [&](std::size_t x, std::size_t k) -> long long {
      for (long long i = static_cast<long long>(k); i >= 0; --i)
        if (ent[static_cast<std::size_t>(i)] == x) return i;
      return -1;
    };
    for (long long q = 0; q < queries; ++q) {
      const std::size_t qe = static_cast<std::size_t>((q + 1) * events / queries) - 1;  // after event qe
      std::size_t cut = qe + 1 < E ? a.offsets[qe + 1] : a.context.size();
      while (cut > 0 && a.context[cut - 1] == ' ') --cut;
      const std::string prefix = a.context.substr(0, cut);
      const std::size_t qtime = ct(prefix);
      std::vector<std::size_t> seen;  // entities stated by qe
      for (std::size_t x = 0; x < ids.size(); ++x)
        if (last_stmt(x, qe) >= 0) seen.push_back(x);
      auto emit = [&](const std::string& kind, std::size_t x, std::size_t stated, long long asof) {
        Example ex;
        ex.id = stream_id + "-q" + std::to_string(q) + "-" + kind;
        ex.context = prefix;
        const std::string box = "box " + std::to_string(ids[x]);
        if (kind == "as_of")
          ex.query = "What was the color of " + box + " right after update " + std::to_string(asof + 1) + "?";
        else
          ex.query = "What is the color of " + box + " now?";
        ex.answers.push_back(val[stated]);
        mark_answer(ex, a.offsets[stated], ins[stated].text, " is now " + val[stated]);
        ex.meta["answer_offset"] = std::to_string(a.offsets[stated] + ins[stated].text.rfind(val[stated]));
        common_meta(ex, "fact_stream", seed, length, ct);
        const long long prev = stated > 0 ? last_stmt(x, stated - 1) : -1;
        std::size_t times = 0, since = 0;
        for (std::size_t k = 0; k <= qe; ++k)
          if (ent[k] == x) {
            ++times;
            if (k > stated) ++since;
          }
        const std::size_t st_tok = tok_at(prefix, a.offsets[stated], ct);
        ex.meta["stream_id"] = stream_id;
        ex.meta["query_point"] = std::to_string(q);
        ex.meta["query_event"] = std::to_string(qe);
        ex.meta["query_time"] = std::to_string(qtime);
        ex.meta["fact_id"] = box + "/color";
        ex.meta["query_kind"] = kind;
        ex.meta["stated_event"] = std::to_string(stated);
        ex.meta["stated_at"] = std::to_string(st_tok);
        ex.meta["age"] = std::to_string(qtime - st_tok);
        ex.meta["updated"] = prev >= 0 ? "1" : "0";
        ex.meta["previous_value"] = prev >= 0 ? val[static_cast<std::size_t>(prev)] : "";
        ex.meta["previous_stated_at"] =
            prev >= 0 ? std::to_string(tok_at(prefix, a.offsets[static_cast<std::size_t>(prev)], ct)) : "";
        ex.meta["updates_since"] = std::to_string(since);
        ex.meta["times_stated"] = std::to_string(times);
        ex.meta["asof_event"] = asof >= 0 ? std::to_string(asof) : "";
        ex.meta["latest_value"] = val[static_cast<std::size_t>(last_stmt(x, qe))];
        out.push_back(std::move(ex));
      };
      // latest: alternately the entity just updated and a random one.
      const std::size_t xl = (q % 2 == 0) ? ent[qe] : seen[rng.below(seen.size())];
      emit("latest", xl, static_cast<std::size_t>(last_stmt(xl, qe)), -1);
      // as_of: an entity stated at some event r, asked as of an event t in [r, qe].
      const std::size_t r = rng.below(qe + 1);
      const std::size_t t = r + rng.below(qe - r + 1);
      emit("as_of", ent[r], static_cast<std::size_t>(last_stmt(ent[r], t)), static_cast<long long>(t));
      // long_ago: the entity whose latest statement is the oldest.
      std::size_t xo = seen[0];
      for (auto x : seen)
        if (last_stmt(x, qe) < last_stmt(xo, qe)) xo = x;
      emit("long_ago", xo, static_cast<std::size_t>(last_stmt(xo, qe)), -1);
    }
  }
  return out;
}

}  // namespace

const std::vector<std::string>& task_names() {
  static const std::vector<std::string> names{"needle", "kv_recall", "fact_stream", "var_track", "multi_hop",
                                              "mq_recall"};
  return names;
}

std::vector<Example> make_task(const std::string& name, const TaskParams& params, std::uint64_t seed,
                               const TokenCounter& count_tokens) {
  DSRSQ_INPUT_CHECK(static_cast<bool>(count_tokens), "make_task: no token counter");
  Params P{params, {}, name};
  if (name == "needle") return needle_task(P, seed, count_tokens);
  if (name == "kv_recall") return kv_task(P, seed, count_tokens);
  if (name == "fact_stream") return stream_task(P, seed, count_tokens);
  if (name == "var_track") return var_task(P, seed, count_tokens);
  if (name == "multi_hop") return hop_task(P, seed, count_tokens);
  if (name == "mq_recall") return mq_task(P, seed, count_tokens);
  raise_input_error(detail::cat("unknown task '", name, "'; valid names: ", join(task_names(), ", ")));
}

std::vector<Example> make_split(const std::string& task, const TaskParams& params,
                                const std::vector<std::int64_t>& sizes, std::int64_t n, std::uint64_t seed, bool grid,
                                const TokenCounter& count_tokens) {
  std::vector<Example> out;
  const auto nsizes = static_cast<std::int64_t>(sizes.size());
  const std::vector<double> depths{0.1, 0.3, 0.5, 0.7, 0.9};
  const auto nd = static_cast<std::int64_t>(depths.size());
  std::uint64_t sub = 0;
  for (std::int64_t si = 0; si < nsizes; ++si) {
    const std::int64_t per_size = n / nsizes + (si < n % nsizes ? 1 : 0);
    if (per_size == 0) continue;
    TaskParams p = params;
    p["length"] = std::to_string(sizes[static_cast<std::size_t>(si)]);
    const std::size_t first = out.size();
    if (task == "needle" && grid && !p.count("depth")) {
      for (std::int64_t di = 0; di < nd; ++di) {
        const std::int64_t k = per_size / nd + (di < per_size % nd ? 1 : 0);
        if (k == 0) continue;
        p["n"] = std::to_string(k);
        std::ostringstream d;
        d << depths[static_cast<std::size_t>(di)];
        p["depth"] = d.str();
        auto v = make_task(task, p, seed * 1000 + sub++, count_tokens);
        out.insert(out.end(), v.begin(), v.end());
      }
    } else {
      if (task == "needle" && !p.count("depth")) p["depth"] = "-1";
      p["n"] = std::to_string(per_size);
      auto v = make_task(task, p, seed * 1000 + sub++, count_tokens);
      out.insert(out.end(), v.begin(), v.end());
    }
    for (std::size_t i = first; i < out.size(); ++i)
      out[i].meta["context_size"] = std::to_string(sizes[static_cast<std::size_t>(si)]);
  }
  return out;
}

}  // namespace dsrsq::data
