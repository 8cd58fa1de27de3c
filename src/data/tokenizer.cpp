#include "data/tokenizer.hpp"

#include <sentencepiece_processor.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "core/error.hpp"

namespace dsrsq {

std::string fnv1a64_hex(std::string_view bytes) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

ByteTokenizer::ByteTokenizer() { specials_ = {kPad, kBos, kEos, kSep, kAns}; }

std::vector<std::int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<std::int32_t> ids;
  ids.reserve(text.size());
  for (unsigned char c : text) ids.push_back(c);
  return ids;
}

std::string ByteTokenizer::decode(std::span<const std::int32_t> ids) const {
  std::string out;
  out.reserve(ids.size());
  for (auto id : ids) {
    DSRSQ_INPUT_CHECK(id >= 0 && id < static_cast<std::int32_t>(kVocabSize), "byte tokenizer: id ", id,
                      " is outside [0, ", kVocabSize, ")");
    if (id < 256) out += static_cast<char>(id);
  }
  return out;
}

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model_path)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()), path_(model_path) {
  std::ifstream in(model_path, std::ios::binary);
  DSRSQ_INPUT_CHECK(in.good(), "sentencepiece model '", model_path, "' cannot be opened (missing or unreadable)");
  std::ostringstream buf;
  buf << in.rdbuf();
  const std::string bytes = buf.str();
  DSRSQ_INPUT_CHECK(!bytes.empty(), "sentencepiece model '", model_path, "' is empty");
  const auto st = sp_->LoadFromSerializedProto(bytes);
  DSRSQ_INPUT_CHECK(st.ok(), "sentencepiece model '", model_path, "' is not a valid model: ", st.ToString());
  hash_ = fnv1a64_hex(bytes);
  model_pieces_ = static_cast<std::size_t>(sp_->GetPieceSize());
  std::int32_t next = static_cast<std::int32_t>(model_pieces_);
  auto own_or_next = [&](int id) { return id >= 0 ? static_cast<std::int32_t>(id) : next++; };
  auto piece_or_next = [&](const char* piece) {
    const int id = sp_->PieceToId(piece);
    // PieceToId answers unk for unknown pieces; check the piece really is there.
    if (id >= 0 && !sp_->IsUnknown(id) && sp_->IdToPiece(id) == piece) return static_cast<std::int32_t>(id);
    return next++;
  };
  specials_.pad = own_or_next(sp_->pad_id());
  specials_.bos = own_or_next(sp_->bos_id());
  specials_.eos = own_or_next(sp_->eos_id());
  specials_.sep = piece_or_next(kSepPiece);
  specials_.ans = piece_or_next(kAnsPiece);
  vocab_size_ = static_cast<std::size_t>(next);
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::vector<std::int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto st = sp_->Encode(text, &ids);
  DSRSQ_REQUIRE(st.ok(), "sentencepiece encode failed (", path_, "): ", st.ToString());
  return {ids.begin(), ids.end()};
}

std::string SentencePieceTokenizer::decode(std::span<const std::int32_t> ids) const {
  std::vector<int> keep;
  keep.reserve(ids.size());
  for (auto id : ids) {
    DSRSQ_INPUT_CHECK(id >= 0 && static_cast<std::size_t>(id) < vocab_size_, "sentencepiece tokenizer: id ", id,
                      " is outside [0, ", vocab_size_, ")");
    if (!is_special(id) && static_cast<std::size_t>(id) < model_pieces_) keep.push_back(id);
  }
  std::string out;
  const auto st = sp_->Decode(keep, &out);
  DSRSQ_REQUIRE(st.ok(), "sentencepiece decode failed (", path_, "): ", st.ToString());
  return out;
}

std::unique_ptr<Tokenizer> make_tokenizer(std::string_view kind, const std::string& model_path) {
  if (kind == "byte") return std::make_unique<ByteTokenizer>();
  if (kind == "sentencepiece") {
    DSRSQ_INPUT_CHECK(!model_path.empty(), "tokenizer 'sentencepiece' needs a model file (.model)");
    return std::make_unique<SentencePieceTokenizer>(model_path);
  }
  DSRSQ_INPUT_CHECK(false, "unknown tokenizer kind '", kind, "'; valid kinds: byte, sentencepiece");
  return nullptr;
}

}  // namespace dsrsq
