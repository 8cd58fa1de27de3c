// Encodes varied texts with dsrsq::Gpt2Bpe and writes texts and ids to JSON,
// for gpt2_compare.js to check against npm gpt-3-encoder itself.
#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/rng.hpp"
#include "data/tokenizer.hpp"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: eval_gpt2_gen GPT2_DIR OUT.json [TEXT_FILE...]\n";
    return 2;
  }
  std::vector<std::string> texts{
      "",
      "Hello world",
      "Hello world's  test 123!!\n\nok",
      "I'm sure they'll say we've done what you'd THINK'S right; isn't it?",
      "   leading and trailing spaces   ",
      "tabs\tand\nnew\r\nlines\n\n\n  indented",
      "def f(x):\n    return x ** 2  # square\n",
      "The year 2024, 3.14159 and 1,000,000 dollars; e-mail: a.b@c.com",
      "Caf\xC3\xA9 na\xC3\xAFve \xC3\xA9l\xC3\xA8ve, Stra\xC3\x9F" "e, \xC3\x86sir",
      "\xCE\x91\xCE\xB8\xCE\xAE\xCE\xBD\xCE\xB1 \xD0\x9C\xD0\xBE\xD1\x81\xD0\xBA\xD0\xB2\xD0\xB0",
      "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE6\x96\x87\xE7\xAB\xA0\xE3\x80\x82",
      "emoji \xF0\x9F\x98\x80\xF0\x9F\x91\x8D" " and symbols \xE2\x86\x92 \xE2\x82\xAC 5 \xC2\xB0" "C \xC2\xBD",
      "em\xE2\x80\x94" "dash \xE2\x80\x9Cquotes\xE2\x80\x9D \xE2\x80\xA6",
      "<|endoftext|> is plain text here",
      "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
      "!!!???...,,,;;;:::---___===+++",
      "URL https://example.org/path?q=1&r=two#frag",
  };
  // random mixes of pieces
  const std::vector<std::string> pieces{"the", " The", "cat", "'s", "'re", " ", "  ", "\n", "\t", "42", "7", ".",
                                        ",", "!", "(", ")", "{", "}", "\"", "'", "x_y", "CamelCase", "\xC3\xA9",
                                        "\xE2\x80\x94", "\xC2\xA0", "\xE6\x97\xA5", "\xF0\x9F\x98\x80", "-", "don't"};
  dsrsq::Rng rng(99);
  for (int c = 0; c < 60; ++c) {
    std::string s;
    for (int k = static_cast<int>(rng.below(30)); k >= 0; --k) s += pieces[rng.below(pieces.size())];
    texts.push_back(s);
  }
  for (int a = 3; a < argc; ++a) {  // whole files: real prose and code
    std::ifstream f(argv[a], std::ios::binary);
    if (!f) {
      std::cerr << "cannot read " << argv[a] << "\n";
      return 1;
    }
    texts.emplace_back(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  dsrsq::Gpt2Bpe bpe(argv[1]);
  nlohmann::json ids = nlohmann::json::array(), pre = nlohmann::json::array();
  for (const auto& t : texts) {
    ids.push_back(bpe.encode(t));
    pre.push_back(dsrsq::gpt2_pretokenize(t));
    const auto n = dsrsq::gpt2_count(t, argv[1]);
    if (!n || *n != ids.back().size()) {
      std::cerr << "gpt2_count disagrees with encode\n";
      return 1;
    }
  }
  std::ofstream out(argv[2]);
  out << nlohmann::json{{"texts", texts}, {"ids", ids}, {"pretokens", pre}}.dump() << "\n";
  std::cout << "wrote " << texts.size() << " texts (vocab " << bpe.vocab_size() << ", hash " << bpe.hash() << ")\n";
  return out ? 0 : 1;
}
