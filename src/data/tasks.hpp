#pragma once
// Deterministic long-context task generators over real haystack text.
// Lengths are measured by a caller-supplied token counter, so the same
// generator serves a byte tokenizer, SentencePiece or GPT-2 BPE.
//
// Common meta keys: task, seed, target_tokens, context_tokens, answer_offset
// (char offset of the answer text in context), evidence_begin/evidence_end
// (char span of the sentence that states the answer). Lists are comma joined.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "data/example.hpp"

namespace dsrsq::data {

// Separator of meta lists whose items may hold commas (more_queries, more_answers).
inline constexpr const char* kListSep = "\x1f";

using TokenCounter = std::function<std::size_t(std::string_view)>;
// One token per byte (the default job's tokenizer).
TokenCounter byte_counter();

// Sentences of real text: from a .txt file, a SOTU-style .json file ({"text":...}),
// or a directory of those (sorted by path).
struct Haystack {
  std::vector<std::string> sentences;
  static Haystack from_text(std::string_view text);
  static Haystack from_path(const std::filesystem::path& path);
};
std::vector<std::string> split_sentences(std::string_view text);

// bsdgames quiz files: `field:field:...` lines; `{x}` optional text, `[a|b]`
// and top-level `a|b` alternatives, trailing `\` continues a line. Each field
// keeps its alternatives: first the canonical spelling (optional parts kept,
// first alternative), then shorter aliases.
struct QuizEntry {
  std::vector<std::vector<std::string>> fields;
  const std::string& at(std::size_t i) const { return fields.at(i).at(0); }
};
std::vector<QuizEntry> read_quiz(const std::filesystem::path& file);
std::vector<std::string> expand_quiz_field(std::string_view field);

// Task parameters as strings (CLI friendly). Unknown keys are an error.
using TaskParams = std::map<std::string, std::string>;

// Generators. Common params: n (examples, default 1), length (target context
// tokens), datasets_dir (default: $DSRSQ_DATASETS or "datasets"), haystack
// (file/dir, default <datasets_dir>/sotu plus text/).
//  needle:     depth (0..1; -1 random; default 0.5), needles (1), values (1),
//              distractors (0), digits (7: length of the magic numbers), source (synthetic|quiz)
//  kv_recall:  keys (16), gap (filler tokens between pairs, 0 = adjacent; used
//              when length is 0)
//  fact_stream: entities (6), events (24), queries (6 query points, 3 kinds each),
//              source (synthetic|pres)
//  var_track:  chain (4), distractor_chains (2)
//  multi_hop:  hops (2), chain (pres|capital), distractors (4)
//  mq_recall:  pairs (16 key -> value statements), queries (4 asked; the first is
//              the example's query, the rest in meta more_queries/more_answers,
//              joined by kListSep), value (digits|phrase), digits (4), words (3:
//              words of a phrase value, a run of plain words of the haystack),
//              pair_tokens (0; > 0: pairs = clamp(length / pair_tokens, 1, pairs)
//              and queries = min(queries, pairs))
std::vector<Example> make_task(const std::string& name, const TaskParams& params, std::uint64_t seed,
                               const TokenCounter& count_tokens);
const std::vector<std::string>& task_names();

// One split of a synthetic task: `n` examples spread over `sizes` (the first
// n % sizes sizes get one more); every example's meta context_size is the size
// it was made for. `grid` and the needle task without a "depth" parameter: each
// size's examples spread evenly over the depths 0.1, 0.3, 0.5, 0.7, 0.9 (the
// test split's depth grid); else a needle's depth is random. Sub-seeds:
// seed * 1000 + 0, 1, ... in generation order. The dsrsq program's test split
// of run seed S is make_split(dataset, params, eval sizes, num_test,
// test_split_seed(S), true, ...): bench_long_context uses it to score the same
// examples.
std::vector<Example> make_split(const std::string& task, const TaskParams& params,
                                const std::vector<std::int64_t>& sizes, std::int64_t n, std::uint64_t seed, bool grid,
                                const TokenCounter& count_tokens);
constexpr std::uint64_t test_split_seed(std::uint64_t run_seed) { return run_seed * 3 + 2; }

}  // namespace dsrsq::data
