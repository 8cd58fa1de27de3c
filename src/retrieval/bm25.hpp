#pragma once
// BM25 (Robertson et al.; ALGORITHMS.md section 3 and its RAG correction):
// the retriever of the rag method, scoring a context's chunks against the
// question with no pretrained encoder. The collection is the context's own
// chunks, so IDF comes from them:
//   idf(t)      = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))     (Lucene's form: never negative)
//   score(D, Q) = sum over the question's words t (a repeated word counts again)
//                   idf(t) * f(t, D) (k1 + 1) / (f(t, D) + k1 (1 - b + b |D| / avgdl))
// with N chunks, n_t of them holding t, f(t, D) the count of t in D, |D| its
// word count and avgdl the mean word count; k1 = 1.2, b = 0.75. A word absent
// from every chunk scores 0. Host arithmetic in double (text statistics, not
// tensor data).
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace dsrsq::retrieval {

// The words of a text: maximal runs of ASCII letters and digits and of bytes
// >= 0x80 (UTF-8 letters of other scripts stay inside words), ASCII letters
// lower-cased. "brave-tiger-42?" -> brave, tiger, 42.
std::vector<std::string> words(std::string_view text);

struct Bm25Params {
  double k1 = 1.2, b = 0.75;
};

class Bm25 {
 public:
  // docs: each document's words.
  explicit Bm25(const std::vector<std::vector<std::string>>& docs, Bm25Params p = {});
  double idf(const std::string& word) const;
  // The score of every document against the query's words.
  std::vector<double> scores(const std::vector<std::string>& query) const;
  std::size_t documents() const { return tf_.size(); }
  double avgdl() const { return avgdl_; }

 private:
  Bm25Params p_;
  std::vector<std::map<std::string, double>> tf_;  // per document: word -> count
  std::vector<double> len_;                        // per document: word count
  std::map<std::string, double> df_;               // word -> documents holding it
  double avgdl_ = 0;
};

}  // namespace dsrsq::retrieval
