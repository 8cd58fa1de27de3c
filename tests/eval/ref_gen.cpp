// Writes varied metric cases with this library's scores to a JSON file, for
// ref_compare.py to recompute with NLTK and a Python SQuAD v1.1 evaluation.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/rng.hpp"
#include "eval/metrics.hpp"

using namespace dsrsq::eval;
using nlohmann::json;

namespace {

dsrsq::Rng rng(20240607);

std::size_t pick(std::size_t n) { return static_cast<std::size_t>(rng.below(n)); }
int range(int lo, int hi) { return lo + static_cast<int>(rng.below(static_cast<std::uint64_t>(hi - lo + 1))); }

Tokens random_tokens(int len, int vocab) {
  static const char* words[] = {"the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and",
                                "it", "was", "very", "big", "red", "sun", "sky", "is", "blue"};
  Tokens t;
  for (int i = 0; i < len; ++i) t.push_back(words[pick(static_cast<std::size_t>(vocab))]);
  return t;
}

Tokens mutate(Tokens t, int edits, int vocab) {
  for (int e = 0; e < edits; ++e) {
    const int op = range(0, 3);
    if (op == 0 && !t.empty()) t.erase(t.begin() + static_cast<long>(pick(t.size())));
    else if (op == 1) t.insert(t.begin() + static_cast<long>(pick(t.size() + 1)), random_tokens(1, vocab)[0]);
    else if (op == 2 && !t.empty()) t[pick(t.size())] = random_tokens(1, vocab)[0];
    else if (op == 3 && t.size() > 1) {
      const std::size_t i = pick(t.size() - 1);
      std::swap(t[i], t[i + 1]);
    }
  }
  return t;
}

json bleu_case(const std::string& kind, const std::vector<std::vector<Tokens>>& refs, const std::vector<Tokens>& hyps) {
  BleuStats st;
  for (std::size_t i = 0; i < hyps.size(); ++i) st.add(hyps[i], refs[i]);
  return {{"kind", kind}, {"refs", refs}, {"hyps", hyps}, {"bleu", corpus_bleu(refs, hyps)},
          {"bp", st.brevity_penalty()}, {"matches", st.matches}, {"totals", st.totals},
          {"hyp_len", st.hyp_len}, {"ref_len", st.ref_len}};
}

std::string random_answer(int words) {
  static const std::vector<std::string> pool{
      "The", "the", "THE", "a", "A", "an", "An", "theater", "another", "ant", "and", "Paris", "paris,",
      "France.", "(1889)", "e.g.", "dog's", "Eiffel-Tower", "tower", "x_y", "a_b", "a.", "--", "!!!", "\"quoted\"",
      "42", "3.14", "Caf\xC3\xA9", "\xC3\x89" "COLE", "na\xC3\xAFve", "\xCE\x91\xCE\x98\xCE\x97\xCE\x9D\xCE\x91",
      "\xD0\x9C\xD0\x9E\xD0\xA1\xD0\x9A\xD0\x92\xD0\x90", "a\xE2\x80\x94the", "x\xC2\xA0the", "the\xC2\xA0" "end",
      "city", "capital", "river", "Seine"};
  static const std::vector<std::string> seps{" ", " ", " ", "  ", "\t", "\n", " \n "};
  std::string s;
  if (range(0, 5) == 0) s += seps[pick(seps.size())];
  for (int i = 0; i < words; ++i) {
    if (i > 0) s += seps[pick(seps.size())];
    s += pool[pick(pool.size())];
  }
  if (range(0, 5) == 0) s += seps[pick(seps.size())];
  return s;
}

std::string perturb(const std::string& g) {
  std::string s = g;
  switch (range(0, 5)) {
    case 0: return "The " + s;
    case 1: return s + ".";
    case 2:
      for (auto& c : s)
        if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 32);
      return s;
    case 3: return s + " " + random_answer(1);
    case 4: return random_answer(range(0, 2)) + " " + s;
    default: return s;
  }
}

json qa_case(const std::string& pred, const std::vector<std::string>& golds) {
  json em_each = json::array(), f1_each = json::array(), rl_each = json::array(), norm_golds = json::array();
  for (const auto& g : golds) {
    em_each.push_back(exact_match(pred, g));
    f1_each.push_back(f1(pred, g));
    rl_each.push_back(rouge_l(pred, g));
    norm_golds.push_back(normalize_answer(g));
  }
  const ExampleScores s = score_example(pred, golds);
  return {{"pred", pred}, {"golds", golds}, {"norm_pred", normalize_answer(pred)}, {"norm_golds", norm_golds},
          {"em_each", em_each}, {"f1_each", f1_each}, {"rl_each", rl_each},
          {"em", s.em}, {"f1", s.f1}, {"rouge_l", s.rouge_l}};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: eval_ref_gen OUT.json\n";
    return 2;
  }
  json bleu = json::array();
  std::vector<std::vector<Tokens>> all_refs;
  std::vector<Tokens> all_hyps;
  auto add = [&](const std::string& kind, const std::vector<std::vector<Tokens>>& r, const std::vector<Tokens>& h) {
    bleu.push_back(bleu_case(kind, r, h));
    all_refs.insert(all_refs.end(), r.begin(), r.end());
    all_hyps.insert(all_hyps.end(), h.begin(), h.end());
  };
  // random tokens from small vocabularies
  for (int c = 0; c < 20; ++c) {
    std::vector<std::vector<Tokens>> r;
    std::vector<Tokens> h;
    const int vocab = range(2, 8), n = range(1, 5);
    for (int i = 0; i < n; ++i) {
      std::vector<Tokens> refs;
      for (int k = range(1, 4); k > 0; --k) refs.push_back(random_tokens(range(1, 15), vocab));
      r.push_back(refs);
      h.push_back(random_tokens(range(0, 14), vocab));
    }
    add("random", r, h);
  }
  // hypotheses edited from a reference: high-order matches, multiple references
  for (int c = 0; c < 20; ++c) {
    std::vector<std::vector<Tokens>> r;
    std::vector<Tokens> h;
    const int vocab = range(6, 20), n = range(1, 6);
    for (int i = 0; i < n; ++i) {
      std::vector<Tokens> refs{random_tokens(range(5, 20), vocab)};
      for (int k = range(0, 3); k > 0; --k) refs.push_back(mutate(refs[0], range(1, 4), vocab));
      r.push_back(refs);
      h.push_back(mutate(refs[pick(refs.size())], range(0, 3), vocab));
    }
    add("edited", r, h);
  }
  // short hypotheses (prefixes): brevity penalty
  for (int c = 0; c < 10; ++c) {
    std::vector<std::vector<Tokens>> r;
    std::vector<Tokens> h;
    for (int i = range(1, 3); i > 0; --i) {
      const Tokens ref = random_tokens(range(8, 20), 12);
      r.push_back({ref, mutate(ref, 2, 12)});
      h.emplace_back(ref.begin(), ref.begin() + range(4, 7));
    }
    add("short", r, h);
  }
  // zero precisions: disjoint unigrams; or unigram matches but no 4-gram match
  for (int c = 0; c < 5; ++c) {
    add("zero_unigram", {{random_tokens(range(1, 8), 5)}}, {Tokens(static_cast<std::size_t>(range(1, 6)), "zzz")});
    Tokens ref = random_tokens(range(4, 10), 20), hyp = ref;
    std::reverse(hyp.begin(), hyp.end());
    add("zero_4gram", {{ref}}, {hyp});
  }
  // repeated words (clipping), ties in closest reference length, empty hypotheses
  for (int c = 0; c < 5; ++c) {
    add("repeat", {{Tokens{"the", "cat", "the", "mat"}, Tokens{"the", "the", "the", "dog", "sat"}}},
        {Tokens(static_cast<std::size_t>(range(2, 9)), "the")});
    const Tokens base = random_tokens(6, 4);
    Tokens longer = base;
    longer.insert(longer.end(), {"on", "on"});
    Tokens shorter(base.begin(), base.begin() + 4);
    add("tie", {{longer, shorter}, {base}}, {base, mutate(base, 1, 4)});
    add("empty_hyp", {{random_tokens(5, 6)}, {random_tokens(3, 6)}}, {Tokens{}, random_tokens(4, 6)});
  }
  json big = bleu_case("whole_corpus", all_refs, all_hyps);

  // QA: predictions derived from golds (case, articles, punctuation) and random
  json qa = json::array();
  for (int c = 0; c < 120; ++c) {
    std::vector<std::string> golds;
    for (int k = range(1, 3); k > 0; --k) golds.push_back(random_answer(range(0, 4)));
    std::string pred = range(0, 2) == 0 ? random_answer(range(0, 5)) : perturb(golds[pick(golds.size())]);
    qa.push_back(qa_case(pred, golds));
  }
  for (const char* p : {"", " ", "the", "a an the", "!!!", "The Eiffel Tower", "\xC2\xA0"}) {
    qa.push_back(qa_case(p, {"", "the", "Eiffel Tower", "eiffel tower!"}));
  }

  std::ofstream out(argv[1]);
  out << json{{"bleu", bleu}, {"bleu_whole", big}, {"qa", qa}}.dump(1) << "\n";
  if (!out) {
    std::cerr << "eval_ref_gen: cannot write " << argv[1] << "\n";
    return 1;
  }
  std::cout << "wrote " << bleu.size() << " BLEU corpora and " << qa.size() << " QA cases to " << argv[1] << "\n";
  return 0;
}
