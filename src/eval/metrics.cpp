#include "eval/metrics.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <unordered_map>

#include "core/error.hpp"

namespace dsrsq::eval {
namespace {

// One decoded UTF-8 unit: a code point and its byte span; invalid bytes come
// back one at a time with valid = false.
struct Unit {
  std::uint32_t cp;
  std::size_t len;
  bool valid;
};

Unit decode_at(std::string_view s, std::size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return {b0, 1, true};
  int n = 0;
  std::uint32_t cp = 0;
  if ((b0 & 0xE0) == 0xC0) { n = 1; cp = b0 & 0x1F; }
  else if ((b0 & 0xF0) == 0xE0) { n = 2; cp = b0 & 0x0F; }
  else if ((b0 & 0xF8) == 0xF0) { n = 3; cp = b0 & 0x07; }
  else return {b0, 1, false};
  if (i + static_cast<std::size_t>(n) >= s.size()) return {b0, 1, false};
  for (int k = 1; k <= n; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return {b0, 1, false};
    cp = (cp << 6) | (b & 0x3F);
  }
  static const std::uint32_t min_cp[4] = {0, 0x80, 0x800, 0x10000};
  if (cp < min_cp[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {b0, 1, false};
  return {cp, static_cast<std::size_t>(n) + 1, true};
}

void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

bool is_space_cp(std::uint32_t c) {
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return true;
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
         c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

bool is_ascii_punct(std::uint32_t c) {
  return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
         (c >= 0x7B && c <= 0x7E);
}

bool is_word_cp(std::uint32_t c) {
  if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  if (is_space_cp(c)) return false;
  if (c >= 0xA1 && c <= 0xBF) {
    return c == 0xAA || c == 0xB2 || c == 0xB3 || c == 0xB5 || c == 0xB9 || c == 0xBA || c == 0xBC ||
           c == 0xBD || c == 0xBE;
  }
  if (c == 0xD7 || c == 0xF7) return false;
  if (c >= 0x2010 && c <= 0x205E) return false;
  return true;
}

std::uint32_t to_lower_cp(std::uint32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
  if (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) return c + 32;
  if (c >= 0x410 && c <= 0x42F) return c + 32;
  if (c >= 0x400 && c <= 0x40F) return c + 80;
  return c;
}

// Code points of a string; invalid bytes become (byte | 0x80000000) so they
// survive re-encoding verbatim and never equal a real code point.
constexpr std::uint32_t kRawByte = 0x80000000u;
std::vector<std::uint32_t> decode(std::string_view s) {
  std::vector<std::uint32_t> out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    const Unit u = decode_at(s, i);
    out.push_back(u.valid ? u.cp : (kRawByte | u.cp));
    i += u.len;
  }
  return out;
}

std::string encode(const std::vector<std::uint32_t>& cps) {
  std::string out;
  out.reserve(cps.size());
  for (auto c : cps) {
    if (c & kRawByte) out += static_cast<char>(c & 0xFF);
    else append_utf8(out, c);
  }
  return out;
}

bool word_at(const std::vector<std::uint32_t>& v, std::size_t i) {
  if (i >= v.size()) return false;
  const auto c = v[i];
  return (c & kRawByte) ? true : is_word_cp(c);
}
bool space_at(std::uint32_t c) { return !(c & kRawByte) && is_space_cp(c); }

// Python's exact fsum (Shewchuk partials + CPython's final half-even fix).
double exact_sum(std::span<const double> xs) {
  std::vector<double> p;
  for (double x : xs) {
    std::size_t i = 0;
    for (double y : p) {
      if (std::fabs(x) < std::fabs(y)) std::swap(x, y);
      const double hi = x + y;
      const double lo = y - (hi - x);
      if (lo != 0.0) p[i++] = lo;
      x = hi;
    }
    p.resize(i);
    p.push_back(x);
  }
  std::size_t n = p.size();
  double hi = 0.0;
  if (n > 0) {
    double lo = 0.0;
    hi = p[--n];
    while (n > 0) {
      const double x = hi;
      const double y = p[--n];
      hi = x + y;
      const double yr = hi - x;
      lo = y - yr;
      if (lo != 0.0) break;
    }
    if (n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0))) {
      const double y = lo * 2.0;
      const double x = hi + y;
      const double yr = x - hi;
      if (y == yr) hi = x;
    }
  }
  return hi;
}

}  // namespace

std::string normalize_answer(std::string_view s) {
  // lower, then drop punctuation
  std::vector<std::uint32_t> a;
  for (auto c : decode(s)) {
    if (!(c & kRawByte)) {
      if (is_ascii_punct(c)) continue;
      c = to_lower_cp(c);
    }
    a.push_back(c);
  }
  // \b(a|an|the)\b -> ' '
  std::vector<std::uint32_t> b;
  b.reserve(a.size());
  for (std::size_t i = 0; i < a.size();) {
    const bool boundary_before = i == 0 || !word_at(a, i - 1);
    if (boundary_before && word_at(a, i)) {
      // Python tries the alternatives in order: "a", "an", "the", each followed by \b.
      auto is = [&](std::size_t k, std::uint32_t ch) { return k < a.size() && a[k] == ch; };
      std::size_t len = 0;
      if (is(i, 'a') && !word_at(a, i + 1)) len = 1;
      else if (is(i, 'a') && is(i + 1, 'n') && !word_at(a, i + 2)) len = 2;
      else if (is(i, 't') && is(i + 1, 'h') && is(i + 2, 'e') && !word_at(a, i + 3)) len = 3;
      if (len > 0) {
        b.push_back(' ');
        i += len;
        continue;
      }
    }
    b.push_back(a[i]);
    ++i;
  }
  // fold white space
  std::string out;
  std::vector<std::uint32_t> tok;
  auto flush = [&] {
    if (tok.empty()) return;
    if (!out.empty()) out += ' ';
    out += encode(tok);
    tok.clear();
  };
  for (auto c : b) {
    if (space_at(c)) flush();
    else tok.push_back(c);
  }
  flush();
  return out;
}

std::vector<std::string> split_whitespace(std::string_view s) {
  std::vector<std::string> out;
  std::string cur;
  for (std::size_t i = 0; i < s.size();) {
    const Unit u = decode_at(s, i);
    if (u.valid && is_space_cp(u.cp)) {
      if (!cur.empty()) out.push_back(std::move(cur));
      cur.clear();
    } else {
      cur.append(s.substr(i, u.len));
    }
    i += u.len;
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  return out;
}

std::vector<std::string> normalized_tokens(std::string_view s) {
  // normalize_answer folds white space to single ' ', so split on ' '.
  return split_whitespace(normalize_answer(s));
}

double exact_match(std::string_view pred, std::string_view gold) {
  return normalize_answer(pred) == normalize_answer(gold) ? 1.0 : 0.0;
}

double f1(std::string_view pred, std::string_view gold) {
  const auto p = normalized_tokens(pred);
  const auto g = normalized_tokens(gold);
  std::unordered_map<std::string, long long> counts;
  for (const auto& t : g) ++counts[t];
  long long same = 0;
  for (const auto& t : p) {
    auto it = counts.find(t);
    if (it != counts.end() && it->second > 0) {
      --it->second;
      ++same;
    }
  }
  if (same == 0) return 0.0;
  const double precision = 1.0 * static_cast<double>(same) / static_cast<double>(p.size());
  const double recall = 1.0 * static_cast<double>(same) / static_cast<double>(g.size());
  return (2 * precision * recall) / (precision + recall);
}

std::size_t lcs_length(std::span<const std::string> a, std::span<const std::string> b) {
  if (a.empty() || b.empty()) return 0;
  std::vector<std::size_t> row(b.size() + 1, 0);
  for (std::size_t i = 0; i < a.size(); ++i) {
    std::size_t diag = 0;  // row[j] of the previous i
    for (std::size_t j = 0; j < b.size(); ++j) {
      const std::size_t up = row[j + 1];
      row[j + 1] = a[i] == b[j] ? diag + 1 : std::max(up, row[j]);
      diag = up;
    }
  }
  return row[b.size()];
}

double rouge_l_tokens(std::span<const std::string> pred, std::span<const std::string> gold) {
  const std::size_t l = lcs_length(pred, gold);
  if (l == 0) return 0.0;
  const double p = static_cast<double>(l) / static_cast<double>(pred.size());
  const double r = static_cast<double>(l) / static_cast<double>(gold.size());
  return (2 * p * r) / (p + r);
}

double rouge_l(std::string_view pred, std::string_view gold) {
  return rouge_l_tokens(normalized_tokens(pred), normalized_tokens(gold));
}

double max_over_golds(std::string_view pred, std::span<const std::string> golds, const TextMetric& fn) {
  double best = 0.0;
  bool first = true;
  for (const auto& g : golds) {
    const double v = fn(pred, g);
    if (first || v > best) best = v;
    first = false;
  }
  return best;
}

std::size_t closest_ref_length(std::span<const Tokens> references, std::size_t hyp_len) {
  DSRSQ_REQUIRE(!references.empty(), "BLEU: a hypothesis has no reference");
  std::size_t best = references[0].size();
  auto dist = [&](std::size_t r) { return r > hyp_len ? r - hyp_len : hyp_len - r; };
  for (const auto& ref : references) {
    const std::size_t r = ref.size();
    if (dist(r) < dist(best) || (dist(r) == dist(best) && r < best)) best = r;
  }
  return best;
}

namespace {
struct VecHash {
  std::size_t operator()(const std::vector<std::string_view>& v) const {
    std::size_t h = 1469598103934665603ull;
    for (auto s : v) h = (h ^ std::hash<std::string_view>{}(s)) * 1099511628211ull;
    return h;
  }
};
using NgramCounts = std::unordered_map<std::vector<std::string_view>, long long, VecHash>;
NgramCounts count_ngrams(const Tokens& t, std::size_t n) {
  NgramCounts c;
  if (t.size() < n) return c;
  for (std::size_t i = 0; i + n <= t.size(); ++i) {
    std::vector<std::string_view> g(t.begin() + i, t.begin() + i + n);
    ++c[std::move(g)];
  }
  return c;
}
}  // namespace

void BleuStats::add(const Tokens& hypothesis, std::span<const Tokens> references) {
  DSRSQ_REQUIRE(!references.empty(), "BLEU: a hypothesis has no reference");
  for (std::size_t n = 1; n <= 4; ++n) {
    const NgramCounts hc = count_ngrams(hypothesis, n);
    NgramCounts maxc;
    for (const auto& ref : references) {
      const NgramCounts rc = count_ngrams(ref, n);
      for (const auto& [g, cnt] : hc) {
        auto it = rc.find(g);
        const long long v = it == rc.end() ? 0 : it->second;
        auto& m = maxc[g];
        m = std::max(m, v);
      }
    }
    long long num = 0, total = 0;
    for (const auto& [g, cnt] : hc) {
      num += std::min(cnt, maxc[g]);
      total += cnt;
    }
    matches[n - 1] += num;
    totals[n - 1] += std::max<long long>(1, total);
  }
  hyp_len += static_cast<long long>(hypothesis.size());
  ref_len += static_cast<long long>(closest_ref_length(references, hypothesis.size()));
  if (std::any_of(references.begin(), references.end(), [](const Tokens& r) { return r.size() >= 4; }))
    ++ref_4gram_sets;
}

double BleuStats::score_or_nan() const { return bleu4_defined() ? score() : std::nan(""); }

double example_bleu4(std::string_view pred, std::span<const std::string> golds) {
  std::vector<Tokens> refs;
  for (const auto& g : golds) refs.push_back(split_whitespace(g));
  if (std::none_of(refs.begin(), refs.end(), [](const Tokens& r) { return r.size() >= 4; })) return std::nan("");
  const Tokens hyp = split_whitespace(pred);
  if (hyp.empty()) return 0.0;
  BleuStats st;
  st.add(hyp, refs);
  return st.score();
}

std::string format_metric(double v, int digits) {
  if (std::isnan(v)) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

double BleuStats::brevity_penalty() const {
  if (hyp_len > ref_len) return 1.0;
  if (hyp_len == 0) return 0.0;
  return std::exp(1.0 - static_cast<double>(ref_len) / static_cast<double>(hyp_len));
}

double BleuStats::score() const {
  if (matches[0] == 0) return 0.0;
  double terms[4];
  for (int i = 0; i < 4; ++i) {
    const double p = matches[i] != 0 ? static_cast<double>(matches[i]) / static_cast<double>(totals[i]) : DBL_MIN;
    terms[i] = 0.25 * std::log(p);
  }
  return brevity_penalty() * std::exp(exact_sum(terms));
}

double corpus_bleu(std::span<const std::vector<Tokens>> references, std::span<const Tokens> hypotheses) {
  DSRSQ_INPUT_CHECK(references.size() == hypotheses.size(), "corpus_bleu: ", hypotheses.size(),
                    " hypotheses but ", references.size(), " reference sets");
  BleuStats st;
  for (std::size_t i = 0; i < hypotheses.size(); ++i) st.add(hypotheses[i], references[i]);
  return st.score();
}

ExampleScores score_example(std::string_view pred, std::span<const std::string> golds) {
  ExampleScores s;
  s.em = max_over_golds(pred, golds, exact_match);
  s.f1 = max_over_golds(pred, golds, f1);
  s.rouge_l = max_over_golds(pred, golds, rouge_l);
  return s;
}

ExampleScores MetricAggregator::add(std::string_view pred, std::span<const std::string> golds) {
  const ExampleScores s = score_example(pred, golds);
  examples_.push_back(s);
  sum_em_ += s.em;
  sum_f1_ += s.f1;
  sum_rl_ += s.rouge_l;
  if (!golds.empty()) {
    std::vector<Tokens> refs;
    for (const auto& g : golds) refs.push_back(split_whitespace(g));
    bleu_.add(split_whitespace(pred), refs);
  }
  return s;
}

CorpusScores MetricAggregator::result() const {
  CorpusScores c;
  c.n = examples_.size();
  if (c.n == 0) return c;
  const double n = static_cast<double>(c.n);
  c.em = sum_em_ / n;
  c.f1 = sum_f1_ / n;
  c.rouge_l = sum_rl_ / n;
  c.bleu = bleu_.score_or_nan();
  return c;
}

}  // namespace dsrsq::eval
