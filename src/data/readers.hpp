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
#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "data/example.hpp"

namespace dsrsq::data {

struct ReadOptions {
  std::size_t max_examples = 0;  // 0: all
};

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

// nq|eli5|cnn_dm|github|codesearchnet|s2orc|longbench; data_dir is a file or a
// directory searched recursively (.jsonl/.json; cnn_dm: .story and .csv).
std::vector<Example> load_dataset(const std::string& name, const std::filesystem::path& data_dir,
                                  const ReadOptions& opt = {});
const std::vector<std::string>& dataset_names();

}  // namespace dsrsq::data
