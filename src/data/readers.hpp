#pragma once
// Readers for the real long-context dataset formats. Each returns Examples
// with (context, query, answers) defined per format:
//   nq            Natural Questions simplified JSONL. context = document_text
//                 without HTML tag tokens (<P>, </H1>...), query = question_text,
//                 answers = short answers (token spans, all annotations), else
//                 "yes"/"no", else the long answer text. meta: long_answer,
//                 example_id, yes_no_answer, document_url.
//   eli5          ELI5 JSONL. context = selftext (often empty), query = title,
//                 answers = answers.text ordered by score (highest first).
//   cnn_dm        CNN/DailyMail: *.story files (article, then @highlight
//                 blocks; id = file stem) or CSV (id, article, highlights; RFC
//                 4180 quoting). context = article, query = "Summarize the
//                 article.", answers = [highlights joined by " "].
//   s2orc         S2ORC JSONL. context = title + body sections ("section\ntext"),
//                 query = "Write the abstract of the paper.", answers = [abstract].
//   github        GitHub code / The Stack JSONL. For each Python function with a
//                 docstring: context = the file with that docstring removed,
//                 query = the docstring, answers = [function name]. A file with no
//                 such function gives one example: query = "Which programming
//                 language is this file written in?", answers = [lang].
//   codesearchnet CodeSearchNet JSONL. Functions of one (repo, path) form the
//                 module; context = all its functions with docstrings removed,
//                 query = docstring, answers = [func_name without class prefix].
//   longbench     LongBench JSONL: context, query = input, answers; meta: length,
//                 dataset, language, all_classes (JSON), _id.
// Errors (dsrsq::Error): a missing path names it; a malformed line names the
// file and its 1-based line number.
// Skipped and degenerate records: a record that gives no answer to score (nq
// with no short, yes/no or long answer; eli5 with no answer text; s2orc with no
// abstract; cnn_dm with no highlight text; longbench with no answers; github
// with no language to ask about) is skipped, codesearchnet functions without a
// docstring are skipped, and records kept with an empty context (eli5's
// selftext is often empty: a zero-token context) or without a short answer
// (nq) are counted. Each reader call (one file) reports these ONCE, as one
// warning with the counts ("skipped 2 of 40 records: no answer; ..."),
// through ReadOptions::warn.
#include <cstddef>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "data/example.hpp"
#include "data/tokenizer.hpp"

namespace dsrsq::data {

struct ReadOptions {
  std::size_t max_examples = 0;  // 0: all
  // Receives each reader's one warning (see above); empty: printed to stderr
  // as "dsrsq: warning: ...".
  std::function<void(const std::string&)> warn;
};

// Sends `msg` to opt.warn, or prints it to stderr when opt.warn is empty.
void warn(const ReadOptions& opt, const std::string& msg);

std::vector<Example> read_nq(const std::filesystem::path& file, const ReadOptions& opt = {});
std::vector<Example> read_eli5(const std::filesystem::path& file, const ReadOptions& opt = {});
std::vector<Example> read_cnn_dm_story(const std::filesystem::path& file);
std::vector<Example> read_cnn_dm_csv(const std::filesystem::path& file, const ReadOptions& opt = {});
std::vector<Example> read_s2orc(const std::filesystem::path& file, const ReadOptions& opt = {});
std::vector<Example> read_github(const std::filesystem::path& file, const ReadOptions& opt = {});
std::vector<Example> read_codesearchnet(const std::filesystem::path& file, const ReadOptions& opt = {});
std::vector<Example> read_longbench(const std::filesystem::path& file, const ReadOptions& opt = {});

// RFC 4180 CSV: comma separated, fields optionally in double quotes, "" is a
// quote inside a quoted field, quoted fields may hold commas and newlines;
// CRLF or LF row ends. `where` names the source in error messages.
std::vector<std::vector<std::string>> parse_csv(std::string_view text, const std::string& where = "<csv>");

// Whole file as bytes; error naming the path when it cannot be read.
std::string read_file(const std::filesystem::path& file);

// Files under `path` (itself if a file) whose name ends in one of `exts`,
// recursively, sorted by path. Error if the path does not exist or nothing matches.
std::vector<std::filesystem::path> list_files(const std::filesystem::path& path,
                                              const std::vector<std::string>& exts);

// The last `n` tokens of `text` under `tok` (the truncation rule: the oldest
// tokens are dropped), as text that encodes to at most n tokens; a text of at
// most n tokens is returned as is. A byte-level cut inside a UTF-8 character
// drops that character's remaining bytes. *before (if given): text's tokens.
// Real datasets' contexts are cut to --context_sizes with it.
std::string keep_last_tokens(std::string_view text, const Tokenizer& tok, std::size_t n,
                             std::size_t* before = nullptr);

// nq|eli5|cnn_dm|github|codesearchnet|s2orc|longbench; data_dir is a file or a
// directory searched recursively (.jsonl/.json; cnn_dm: .story and .csv).
std::vector<Example> load_dataset(const std::string& name, const std::filesystem::path& data_dir,
                                  const ReadOptions& opt = {});
const std::vector<std::string>& dataset_names();

}  // namespace dsrsq::data
