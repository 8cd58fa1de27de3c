#include "retrieval/bm25.hpp"

#include <cmath>

#include "core/error.hpp"

namespace dsrsq::retrieval {

std::vector<std::string> words(std::string_view text) {
  std::vector<std::string> out;
  std::string cur;
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    const bool alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80;
    if (alnum) {
      cur += (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : ch;
    } else if (!cur.empty()) {
      out.push_back(std::move(cur));
      cur.clear();
    }
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  return out;
}

Bm25::Bm25(const std::vector<std::vector<std::string>>& docs, Bm25Params p) : p_(p) {
  DSRSQ_INPUT_CHECK(p.k1 >= 0 && std::isfinite(p.k1) && p.b >= 0 && p.b <= 1, "BM25: need k1 >= 0 and b in [0, 1], got k1 ",
                    p.k1, ", b ", p.b);
  double total = 0;
  for (const auto& d : docs) {
    std::map<std::string, double> tf;
    for (const auto& w : d) tf[w] += 1;
    for (const auto& [w, f] : tf) df_[w] += 1;
    len_.push_back(static_cast<double>(d.size()));
    total += static_cast<double>(d.size());
    tf_.push_back(std::move(tf));
  }
  avgdl_ = docs.empty() ? 0.0 : total / static_cast<double>(docs.size());
}

double Bm25::idf(const std::string& word) const {
  const auto it = df_.find(word);
  const double n = it == df_.end() ? 0.0 : it->second, N = static_cast<double>(tf_.size());
  return std::log(1.0 + (N - n + 0.5) / (n + 0.5));
}

std::vector<double> Bm25::scores(const std::vector<std::string>& query) const {
  std::vector<double> s(tf_.size(), 0.0);
  for (const auto& q : query) {
    if (!df_.count(q)) continue;  // in no document: adds 0 everywhere
    const double w = idf(q);
    for (std::size_t d = 0; d < tf_.size(); ++d) {
      const auto it = tf_[d].find(q);
      if (it == tf_[d].end()) continue;
      const double f = it->second;
      // avgdl > 0 here: document d holds q.
      const double norm = 1.0 - p_.b + p_.b * len_[d] / avgdl_;
      s[d] += w * f * (p_.k1 + 1.0) / (f + p_.k1 * norm);
    }
  }
  return s;
}

}  // namespace dsrsq::retrieval
