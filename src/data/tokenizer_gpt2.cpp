// GPT-2 byte-level BPE (see tokenizer.hpp): pre-tokenise, map bytes to the
// vocabulary's byte symbols, apply merges by rank.
#include <array>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "core/error.hpp"
#include "data/tokenizer.hpp"

namespace dsrsq {
namespace {

struct Cp {
  std::uint32_t cp;  // code point, or the byte for an invalid byte
  std::size_t pos, len;
  bool valid;
};

std::vector<Cp> decode_utf8(std::string_view s) {
  std::vector<Cp> out;
  for (std::size_t i = 0; i < s.size();) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    std::size_t n = 0;
    std::uint32_t cp = b0;
    if (b0 >= 0x80) {
      if ((b0 & 0xE0) == 0xC0) { n = 1; cp = b0 & 0x1F; }
      else if ((b0 & 0xF0) == 0xE0) { n = 2; cp = b0 & 0x0F; }
      else if ((b0 & 0xF8) == 0xF0) { n = 3; cp = b0 & 0x07; }
      bool ok = n > 0 && i + n < s.size();
      for (std::size_t k = 1; ok && k <= n; ++k) {
        const auto b = static_cast<unsigned char>(s[i + k]);
        ok = (b & 0xC0) == 0x80;
        cp = (cp << 6) | (b & 0x3F);
      }
      static const std::uint32_t min_cp[4] = {0, 0x80, 0x800, 0x10000};
      if (ok && (cp < min_cp[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) ok = false;
      if (!ok) {
        out.push_back({b0, i, 1, false});
        ++i;
        continue;
      }
    }
    out.push_back({cp, i, n + 1, true});
    i += n + 1;
  }
  return out;
}

// JavaScript \s (with the u flag).
bool js_space(std::uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000 || c == 0xFEFF;
}

bool is_number(std::uint32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  if (c == 0xB2 || c == 0xB3 || c == 0xB9 || (c >= 0xBC && c <= 0xBE)) return true;
  static const std::uint32_t ranges[][2] = {
      {0x0660, 0x0669}, {0x06F0, 0x06F9}, {0x07C0, 0x07C9}, {0x0966, 0x096F}, {0x09E6, 0x09EF}, {0x0A66, 0x0A6F},
      {0x0AE6, 0x0AEF}, {0x0B66, 0x0B6F}, {0x0BE6, 0x0BF2}, {0x0C66, 0x0C6F}, {0x0CE6, 0x0CEF}, {0x0D66, 0x0D6F},
      {0x0E50, 0x0E59}, {0x0ED0, 0x0ED9}, {0x0F20, 0x0F33}, {0x1040, 0x1049}, {0x17E0, 0x17E9}, {0x1810, 0x1819},
      {0x2070, 0x2070}, {0x2074, 0x2079}, {0x2080, 0x2089}, {0x2150, 0x2182}, {0x2185, 0x2189}, {0x2460, 0x249B},
      {0x24EA, 0x24FF}, {0x2776, 0x2793}, {0x3007, 0x3007}, {0x3021, 0x3029}, {0x3038, 0x303A}, {0x3192, 0x3195},
      {0x3220, 0x3229}, {0x3248, 0x324F}, {0x3251, 0x325F}, {0x3280, 0x3289}, {0x32B1, 0x32BF}, {0xFF10, 0xFF19},
      {0x1D7CE, 0x1D7FF}, {0x1F100, 0x1F10C}};
  for (const auto& r : ranges)
    if (c >= r[0] && c <= r[1]) return true;
  return false;
}

bool is_letter(std::uint32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  if (c < 0x100) return c == 0xAA || c == 0xB5 || c == 0xBA || (c >= 0xC0 && c != 0xD7 && c != 0xF7);
  if (js_space(c) || is_number(c)) return false;
  // Blocks that hold no letters (marks, punctuation, symbols, emoji, private use).
  static const std::uint32_t non_letter[][2] = {
      {0x02C2, 0x02C5}, {0x02D2, 0x02DF}, {0x02E5, 0x02EB}, {0x02ED, 0x02ED}, {0x02EF, 0x036F}, {0x0375, 0x0375},
      {0x037E, 0x037E}, {0x0384, 0x0385}, {0x0387, 0x0387}, {0x03F6, 0x03F6}, {0x0482, 0x0489}, {0x055A, 0x055F},
      {0x0589, 0x058A}, {0x0591, 0x05CF}, {0x0600, 0x061F}, {0x064B, 0x065F}, {0x066A, 0x066D}, {0x06D4, 0x06D4},
      {0x0900, 0x0903}, {0x093A, 0x094F}, {0x0964, 0x0965}, {0x2000, 0x2070}, {0x207A, 0x207F}, {0x208A, 0x208F},
      {0x20A0, 0x20FF}, {0x2100, 0x2101}, {0x2103, 0x2106}, {0x2108, 0x2109}, {0x2114, 0x2114}, {0x2116, 0x2118},
      {0x211E, 0x2123}, {0x2125, 0x2125}, {0x2127, 0x2127}, {0x2129, 0x2129}, {0x212E, 0x212E}, {0x213A, 0x213B},
      {0x2140, 0x2144}, {0x214A, 0x214D}, {0x214F, 0x214F}, {0x218A, 0x2BFF}, {0x2E00, 0x2E7F}, {0x3000, 0x3004},
      {0x3008, 0x3020}, {0x302A, 0x3030}, {0x3036, 0x3037}, {0x303D, 0x303F}, {0x3099, 0x309C}, {0x30A0, 0x30A0},
      {0x30FB, 0x30FB}, {0xD800, 0xF8FF}, {0xFE00, 0xFE6F}, {0xFF00, 0xFF20}, {0xFF3B, 0xFF40}, {0xFF5B, 0xFF65},
      {0xFFF0, 0xFFFF}, {0x1F000, 0x1FAFF}, {0xE0000, 0x10FFFF}};
  for (const auto& r : non_letter)
    if (c >= r[0] && c <= r[1]) return false;
  return true;
}

enum class Cls { letter, number, space, other };
Cls classify(const Cp& c) {
  if (!c.valid) return Cls::other;
  if (js_space(c.cp)) return Cls::space;
  if (is_letter(c.cp)) return Cls::letter;
  if (is_number(c.cp)) return Cls::number;
  return Cls::other;
}

// Pre-token boundaries as [begin, end) indexes into the code point array.
template <class Emit>
void pretokenize(const std::vector<Cp>& cps, Emit&& emit) {
  const std::size_t n = cps.size();
  std::vector<Cls> cls(n);
  for (std::size_t i = 0; i < n; ++i) cls[i] = classify(cps[i]);
  auto is_ch = [&](std::size_t k, char ch) { return k < n && cps[k].valid && cps[k].cp == static_cast<std::uint32_t>(ch); };
  std::size_t i = 0;
  while (i < n) {
    // 's|'t|'re|'ve|'m|'ll|'d
    if (is_ch(i, '\'')) {
      std::size_t len = 0;
      if (is_ch(i + 1, 's') || is_ch(i + 1, 't') || is_ch(i + 1, 'm') || is_ch(i + 1, 'd')) len = 2;
      else if ((is_ch(i + 1, 'r') && is_ch(i + 2, 'e')) || (is_ch(i + 1, 'v') && is_ch(i + 2, 'e')) ||
               (is_ch(i + 1, 'l') && is_ch(i + 2, 'l')))
        len = 3;
      if (len) {
        emit(i, i + len);
        i += len;
        continue;
      }
    }
    // ' ?X+' for X = letter, number, other
    bool done = false;
    for (Cls x : {Cls::letter, Cls::number, Cls::other}) {
      std::size_t start = n;
      if (is_ch(i, ' ') && i + 1 < n && cls[i + 1] == x) start = i + 1;
      else if (cls[i] == x) start = i;
      if (start == n) continue;
      std::size_t e = start;
      while (e < n && cls[e] == x) ++e;
      emit(i, e);
      i = e;
      done = true;
      break;
    }
    if (done) continue;
    // \s+(?!\S) then \s+
    std::size_t e = i;
    while (e < n && cls[e] == Cls::space) ++e;
    DSRSQ_REQUIRE(e > i, "gpt2 pre-tokenizer made no progress");
    if (e < n && e - i > 1) e -= 1;
    emit(i, e);
    i = e;
  }
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DSRSQ_INPUT_CHECK(in.good(), "GPT-2 BPE file '", path, "' cannot be opened");
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256+k.
std::array<std::uint32_t, 256> byte_to_cp() {
  std::array<std::uint32_t, 256> m{};
  std::uint32_t next = 256;
  for (std::uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    m[b] = printable ? b : next++;
  }
  return m;
}

}  // namespace

struct Gpt2Bpe::Impl {
  std::unordered_map<std::string, std::int32_t> vocab;  // raw bytes -> id
  std::unordered_map<std::uint64_t, std::pair<std::int32_t, std::int32_t>> merges;  // (a,b) -> (rank, merged id)
  std::int32_t byte_id[256];
  std::string hash;
  mutable std::mutex mu;
  mutable std::unordered_map<std::string, std::vector<std::int32_t>> cache;

  std::vector<std::int32_t> bpe(const std::string& bytes) const {
    std::vector<std::int32_t> w;
    w.reserve(bytes.size());
    for (unsigned char b : bytes) w.push_back(byte_id[b]);
    while (w.size() > 1) {
      std::int32_t best_rank = -1, best_a = 0, best_b = 0, merged = 0;
      for (std::size_t k = 0; k + 1 < w.size(); ++k) {
        auto it = merges.find((static_cast<std::uint64_t>(w[k]) << 32) | static_cast<std::uint32_t>(w[k + 1]));
        if (it != merges.end() && (best_rank < 0 || it->second.first < best_rank)) {
          best_rank = it->second.first;
          best_a = w[k];
          best_b = w[k + 1];
          merged = it->second.second;
        }
      }
      if (best_rank < 0) break;
      std::vector<std::int32_t> nw;
      nw.reserve(w.size());
      for (std::size_t k = 0; k < w.size();) {
        if (w[k] == best_a && k + 1 < w.size() && w[k + 1] == best_b) {
          nw.push_back(merged);
          k += 2;
        } else {
          nw.push_back(w[k++]);
        }
      }
      w.swap(nw);
    }
    return w;
  }
};

Gpt2Bpe::Gpt2Bpe(const std::string& dir) : impl_(std::make_unique<Impl>()) {
  const std::string enc_path = dir + "/encoder.json", bpe_path = dir + "/vocab.bpe";
  const std::string enc_text = read_file(enc_path), bpe_text = read_file(bpe_path);
  impl_->hash = fnv1a64_hex(enc_text + bpe_text);
  const auto b2c = byte_to_cp();
  std::map<std::uint32_t, unsigned char> c2b;
  for (int b = 0; b < 256; ++b) c2b[b2c[b]] = static_cast<unsigned char>(b);
  // A vocabulary string (byte symbols in UTF-8) back to raw bytes.
  auto to_bytes = [&](const std::string& sym, const std::string& file) {
    std::string raw;
    for (const auto& c : decode_utf8(sym)) {
      auto it = c2b.find(c.cp);
      DSRSQ_INPUT_CHECK(c.valid && it != c2b.end(), "GPT-2 BPE file '", file, "': '", sym,
                        "' is not made of byte symbols");
      raw += static_cast<char>(it->second);
    }
    return raw;
  };
  nlohmann::json enc;
  try {
    enc = nlohmann::json::parse(enc_text);
  } catch (const std::exception& e) {
    DSRSQ_INPUT_CHECK(false, "GPT-2 BPE file '", enc_path, "' is not valid JSON: ", e.what());
  }
  DSRSQ_INPUT_CHECK(enc.is_object() && !enc.empty(), "GPT-2 BPE file '", enc_path, "' is not a JSON object");
  for (auto it = enc.begin(); it != enc.end(); ++it) {
    DSRSQ_INPUT_CHECK(it.value().is_number_integer(), "GPT-2 BPE file '", enc_path, "': id of '", it.key(),
                      "' is not an integer");
    if (it.key() == "<|endoftext|>") continue;
    impl_->vocab[to_bytes(it.key(), enc_path)] = it.value().get<std::int32_t>();
  }
  for (int b = 0; b < 256; ++b) {
    auto it = impl_->vocab.find(std::string(1, static_cast<char>(b)));
    DSRSQ_INPUT_CHECK(it != impl_->vocab.end(), "GPT-2 BPE file '", enc_path, "' lacks byte ", b);
    impl_->byte_id[b] = it->second;
  }
  std::istringstream lines(bpe_text);
  std::string line;
  std::int32_t rank = 0;
  bool first = true;
  while (std::getline(lines, line)) {
    if (first && line.rfind("#version", 0) == 0) {
      first = false;
      continue;
    }
    first = false;
    if (line.empty()) continue;
    std::istringstream parts(line);
    std::string a, b, extra;
    parts >> a >> b;
    DSRSQ_INPUT_CHECK(!a.empty() && !b.empty() && !(parts >> extra), "GPT-2 BPE file '", bpe_path,
                      "': bad merge line '", line, "'");
    const std::string ra = to_bytes(a, bpe_path), rb = to_bytes(b, bpe_path);
    auto ia = impl_->vocab.find(ra), ib = impl_->vocab.find(rb), im = impl_->vocab.find(ra + rb);
    DSRSQ_INPUT_CHECK(ia != impl_->vocab.end() && ib != impl_->vocab.end() && im != impl_->vocab.end(),
                      "GPT-2 BPE file '", bpe_path, "': merge '", line, "' uses symbols missing from ", enc_path);
    const std::uint64_t key = (static_cast<std::uint64_t>(ia->second) << 32) | static_cast<std::uint32_t>(ib->second);
    impl_->merges.emplace(key, std::make_pair(rank++, im->second));
  }
  DSRSQ_INPUT_CHECK(rank > 0, "GPT-2 BPE file '", bpe_path, "' holds no merges");
}

Gpt2Bpe::~Gpt2Bpe() = default;
Gpt2Bpe::Gpt2Bpe(Gpt2Bpe&&) noexcept = default;

std::size_t Gpt2Bpe::vocab_size() const { return impl_->vocab.size() + 1; }
const std::string& Gpt2Bpe::hash() const { return impl_->hash; }

std::vector<std::int32_t> Gpt2Bpe::encode(std::string_view text) const {
  std::vector<std::int32_t> out;
  const auto cps = decode_utf8(text);
  pretokenize(cps, [&](std::size_t b, std::size_t e) {
    const std::size_t pb = cps[b].pos, pe = cps[e - 1].pos + cps[e - 1].len;
    std::string piece(text.substr(pb, pe - pb));
    std::lock_guard<std::mutex> lock(impl_->mu);
    auto it = impl_->cache.find(piece);
    if (it == impl_->cache.end()) {
      if (impl_->cache.size() > 200000) impl_->cache.clear();
      it = impl_->cache.emplace(piece, impl_->bpe(piece)).first;
    }
    out.insert(out.end(), it->second.begin(), it->second.end());
  });
  return out;
}

std::vector<std::string> gpt2_pretokenize(std::string_view text) {
  std::vector<std::string> out;
  const auto cps = decode_utf8(text);
  pretokenize(cps, [&](std::size_t b, std::size_t e) {
    const std::size_t pb = cps[b].pos, pe = cps[e - 1].pos + cps[e - 1].len;
    out.emplace_back(text.substr(pb, pe - pb));
  });
  return out;
}

std::optional<std::size_t> gpt2_count(std::string_view text, const std::string& dir) {
  if (dir.empty()) return std::nullopt;
  {
    std::ifstream a(dir + "/encoder.json"), b(dir + "/vocab.bpe");
    if (!a.good() || !b.good()) return std::nullopt;
  }
  static std::mutex mu;
  static std::map<std::string, std::unique_ptr<Gpt2Bpe>> loaded;
  const Gpt2Bpe* bpe = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto& slot = loaded[dir];
    if (!slot) slot = std::make_unique<Gpt2Bpe>(dir);
    bpe = slot.get();
  }
  return bpe->count(text);
}

}  // namespace dsrsq
