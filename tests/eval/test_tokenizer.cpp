#define BOOST_TEST_MODULE eval_tokenizer
#include <boost/test/unit_test.hpp>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "data/tokenizer.hpp"
#include "../common/errors.hpp"

using dsrsq::ByteTokenizer;
using Ids = std::vector<std::int32_t>;

using ref::error_of;

BOOST_AUTO_TEST_CASE(byte_round_trip) {
  ByteTokenizer t;
  const std::string s = "h\xC3\xA9llo w\xC3\xB6rld \xE2\x9C\x93 \xF0\x9D\x84\x9E \xE6\x97\xA5\xE6\x9C\xAC\n";
  const Ids ids = t.encode(s);
  BOOST_TEST(ids.size() == s.size());
  BOOST_TEST(ids[0] == 'h');
  BOOST_TEST(ids[1] == 0xC3);
  BOOST_TEST(t.decode(ids) == s);
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  const Ids all_ids = t.encode(all);
  for (int b = 0; b < 256; ++b) BOOST_TEST(all_ids[b] == b);
  BOOST_TEST(t.decode(all_ids) == all);
  BOOST_TEST(t.encode("").empty());
}

BOOST_AUTO_TEST_CASE(byte_specials) {
  ByteTokenizer t;
  BOOST_TEST(t.vocab_size() == 261u);
  BOOST_TEST(t.pad_id() == 256);
  BOOST_TEST(t.bos_id() == 257);
  BOOST_TEST(t.eos_id() == 258);
  BOOST_TEST(t.sep_id() == 259);
  BOOST_TEST(t.ans_id() == 260);
  BOOST_TEST(t.is_special(259));
  BOOST_TEST(!t.is_special(255));
  BOOST_TEST(t.name() == "byte");
  BOOST_TEST(t.hash() == "byte-v1");
  const Ids ids{t.bos_id(), 'a', t.sep_id(), 'b', t.ans_id(), 'c', t.eos_id(), t.pad_id()};
  BOOST_TEST(t.decode(ids) == "abc");
  BOOST_CHECK_THROW(t.decode(Ids{261}), dsrsq::Error);
  BOOST_CHECK_THROW(t.decode(Ids{-1}), dsrsq::Error);
}

BOOST_AUTO_TEST_CASE(fnv) {
  BOOST_TEST(dsrsq::fnv1a64_hex("") == "cbf29ce484222325");
  BOOST_TEST(dsrsq::fnv1a64_hex("a") == "af63dc4c8601ec8c");
  BOOST_TEST(dsrsq::fnv1a64_hex("foobar") == "85944171f73967e8");
}

BOOST_AUTO_TEST_CASE(factory) {
  auto b = dsrsq::make_tokenizer("byte");
  BOOST_TEST(b->name() == "byte");
  BOOST_TEST(b->vocab_size() == 261u);
  const std::string e1 = error_of([] { dsrsq::make_tokenizer("gpt9"); });
  BOOST_TEST(e1.find("gpt9") != std::string::npos);
  BOOST_TEST(e1.find("byte, sentencepiece") != std::string::npos);
  const std::string e2 = error_of([] { dsrsq::make_tokenizer("sentencepiece", "/nonexistent/dir/x.model"); });
  BOOST_TEST(e2.find("/nonexistent/dir/x.model") != std::string::npos);
  BOOST_TEST(!error_of([] { dsrsq::make_tokenizer("sentencepiece", ""); }).empty());
  // a corrupt model names the file
  const std::string bad = "eval_corrupt_test.model";
  {
    std::ofstream f(bad, std::ios::binary);
    f << "this is not a sentencepiece model \x01\x02\x03";
  }
  const std::string e3 = error_of([&] { dsrsq::make_tokenizer("sentencepiece", bad); });
  BOOST_TEST(e3.find(bad) != std::string::npos);
  std::remove(bad.c_str());
}

BOOST_AUTO_TEST_CASE(gpt2_pretokenizer) {
  using V = std::vector<std::string>;
  BOOST_TEST(dsrsq::gpt2_pretokenize("Hello world's  test 123!!\n\nok") ==
             (V{"Hello", " world", "'s", " ", " test", " 123", "!!", "\n", "\n", "ok"}));
  BOOST_TEST(dsrsq::gpt2_pretokenize("  x  ") == (V{" ", " x", "  "}));
  BOOST_TEST(dsrsq::gpt2_pretokenize("I'LL we'll") == (V{"I", "'", "LL", " we", "'ll"}));
  BOOST_TEST(dsrsq::gpt2_pretokenize("").empty());
  BOOST_TEST(dsrsq::gpt2_pretokenize("Caf\xC3\xA9 42\xC2\xBD") == (V{"Caf\xC3\xA9", " 42\xC2\xBD"}));
  BOOST_TEST(!dsrsq::gpt2_count("x", "").has_value());
  BOOST_TEST(!dsrsq::gpt2_count("x", "/nonexistent/gpt2").has_value());
  const std::string e = error_of([] { dsrsq::Gpt2Bpe b("/nonexistent/gpt2"); });
  BOOST_TEST(e.find("/nonexistent/gpt2/encoder.json") != std::string::npos);
}
