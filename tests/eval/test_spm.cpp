#define BOOST_TEST_MODULE eval_spm
#include <boost/test/unit_test.hpp>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "data/tokenizer.hpp"

using Ids = std::vector<std::int32_t>;

namespace {
std::string model_path() {
  const char* p = std::getenv("DSRSQ_TEST_SPM_MODEL");
  BOOST_REQUIRE_MESSAGE(p != nullptr, "DSRSQ_TEST_SPM_MODEL is not set (run through ctest)");
  return p;
}
}  // namespace

BOOST_AUTO_TEST_CASE(load_and_specials) {
  dsrsq::SentencePieceTokenizer t(model_path());
  BOOST_TEST(t.name() == "sentencepiece");
  // scripts/train_tokenizer.sh layout
  BOOST_TEST(t.bos_id() == 1);
  BOOST_TEST(t.eos_id() == 2);
  BOOST_TEST(t.pad_id() == 3);
  BOOST_TEST(t.sep_id() == 4);
  BOOST_TEST(t.ans_id() == 5);
  BOOST_TEST(t.vocab_size() == t.model_pieces());
  BOOST_TEST(t.vocab_size() > 300u);
  BOOST_TEST(t.vocab_size() <= 600u);
  std::ifstream f(model_path(), std::ios::binary);
  std::ostringstream buf;
  buf << f.rdbuf();
  BOOST_TEST(t.hash() == dsrsq::fnv1a64_hex(buf.str()));
  BOOST_TEST(t.hash().size() == 16u);
  auto via_factory = dsrsq::make_tokenizer("sentencepiece", model_path());
  BOOST_TEST(via_factory->hash() == t.hash());
}

BOOST_AUTO_TEST_CASE(round_trip) {
  dsrsq::SentencePieceTokenizer t(model_path());
  const std::vector<std::string> texts{
      "the quick brown fox jumps over the lazy dog",
      "needle haystack key value record 1234.",
      "  double  spaces and\ttabs\nnew lines  ",
      "h\xC3\xA9llo w\xC3\xB6rld \xE2\x9C\x93 \xF0\x9D\x84\x9E \xE6\x97\xA5\xE6\x9C\xAC",  // not in the corpus: byte fallback
      "Zebra XYLOPHONE {}[]<>~`|^",
      "",
  };
  for (const auto& s : texts) {
    const Ids ids = t.encode(s);
    for (auto id : ids) {
      BOOST_TEST(id >= 0);
      BOOST_TEST(static_cast<std::size_t>(id) < t.vocab_size());
    }
    BOOST_TEST(t.decode(ids) == s, "round trip of '" << s << "'");
  }
  // corpus words compress well below one id per byte
  const std::string common = "the quick brown fox jumps over the lazy dog";
  BOOST_TEST(t.encode(common).size() * 3 < common.size());
}

BOOST_AUTO_TEST_CASE(special_pieces) {
  dsrsq::SentencePieceTokenizer t(model_path());
  // user-defined symbols are matched in raw text
  const Ids ids = t.encode("context<sep>query<ans>");
  int seps = 0, anss = 0;
  for (auto id : ids) {
    seps += id == t.sep_id();
    anss += id == t.ans_id();
  }
  BOOST_TEST(seps == 1);
  BOOST_TEST(anss == 1);
  // decode drops specials
  Ids with = t.encode("river city");
  with.insert(with.begin(), t.bos_id());
  with.push_back(t.eos_id());
  with.push_back(t.pad_id());
  BOOST_TEST(t.decode(with) == "river city");
  BOOST_CHECK_THROW(t.decode(Ids{static_cast<std::int32_t>(t.vocab_size())}), dsrsq::Error);
}
