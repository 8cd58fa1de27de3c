#include "data/readers.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <span>
#include <sstream>

#include "core/error.hpp"

namespace dsrsq::data {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

bool ends_with(std::string_view s, std::string_view suf) {
  return s.size() >= suf.size() && s.substr(s.size() - suf.size()) == suf;
}

std::string trim(std::string_view s) {
  std::size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

// Calls fn(record, line_no) for every non-blank line; any JSON parse error or
// wrong field type inside fn becomes an Error naming file:line.
void for_each_jsonl(const fs::path& file, std::size_t max_examples, std::vector<Example>& out,
                    const std::function<void(const json&, std::size_t)>& fn) {
  DSRSQ_INPUT_CHECK(fs::exists(file), "dataset file not found: ", file.string());
  std::ifstream in(file, std::ios::binary);
  DSRSQ_INPUT_CHECK(in.good(), "cannot open dataset file: ", file.string());
  std::string line;
  std::size_t no = 0;
  while (std::getline(in, line)) {
    ++no;
    if (max_examples && out.size() >= max_examples) break;
    if (trim(line).empty()) continue;
    try {
      const json j = json::parse(line);
      DSRSQ_INPUT_CHECK(j.is_object(), "record is not a JSON object");
      fn(j, no);
    } catch (const json::exception& e) {
      raise_input_error(detail::cat(file.string(), ":", no, ": malformed record: ", e.what()));
    } catch (const Error& e) {
      raise_input_error(detail::cat(file.string(), ":", no, ": ", e.what()));
    }
  }
  if (max_examples && out.size() > max_examples) out.resize(max_examples);
}

std::string str_or(const json& j, const char* key, const std::string& dflt = "") {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (it->is_string()) return it->get<std::string>();
  return it->dump();
}

const json& need(const json& j, const char* key) {
  auto it = j.find(key);
  DSRSQ_INPUT_CHECK(it != j.end(), "missing field '", key, "'");
  return *it;
}

std::string need_str(const json& j, const char* key) { return need(j, key).get<std::string>(); }

// An integer field as a signed value. nlohmann's get<integer>() of a float
// casts it unchecked (1e30 to std::size_t is undefined behaviour: found by
// fuzzing), so a token index must be a JSON integer.
long long need_int(const json& j, const char* key) {
  const json& v = need(j, key);
  DSRSQ_INPUT_CHECK(v.is_number_integer(), "field '", key, "' is not an integer: ", v.dump());
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    DSRSQ_INPUT_CHECK(u <= static_cast<std::uint64_t>(std::numeric_limits<long long>::max()), "field '", key,
                      "' is out of range: ", u);
  }
  return v.get<long long>();
}

std::vector<std::string> split_ws(std::string_view s) {
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
    std::size_t b = i;
    while (i < s.size() && !std::isspace(static_cast<unsigned char>(s[i]))) ++i;
    if (i > b) out.emplace_back(s.substr(b, i - b));
  }
  return out;
}

bool is_html_token(const std::string& t) { return t.size() >= 2 && t.front() == '<' && t.back() == '>'; }

std::string join_tokens(const std::vector<std::string>& toks, std::size_t b, std::size_t e, bool strip_html) {
  std::string out;
  for (std::size_t i = b; i < e && i < toks.size(); ++i) {
    if (strip_html && is_html_token(toks[i])) continue;
    if (!out.empty()) out += ' ';
    out += toks[i];
  }
  return out;
}

void add_unique(std::vector<std::string>& v, std::string s) {
  if (!s.empty() && std::find(v.begin(), v.end(), s) == v.end()) v.push_back(std::move(s));
}

// A Python function with a docstring found in source text.
struct PyFunc {
  std::string name, docstring;
  std::size_t doc_begin = 0, doc_end = 0;  // the docstring literal incl. quotes and its line
};

// Finds `def name(` at line start (any indentation) followed, on the first
// non-blank line of the body, by a triple-quoted docstring.
std::vector<PyFunc> python_functions(const std::string& src) {
  std::vector<PyFunc> out;
  std::size_t pos = 0;
  while ((pos = src.find("def ", pos)) != std::string::npos) {
    std::size_t ls = pos;
    while (ls > 0 && (src[ls - 1] == ' ' || src[ls - 1] == '\t')) --ls;
    const bool at_line_start = ls == 0 || src[ls - 1] == '\n';
    std::size_t n = pos + 4;
    std::size_t ne = n;
    while (ne < src.size() && (std::isalnum(static_cast<unsigned char>(src[ne])) || src[ne] == '_')) ++ne;
    pos += 4;
    if (!at_line_start || ne == n || ne >= src.size() || src[ne] != '(') continue;
    std::size_t colon = src.find(":\n", ne);
    if (colon == std::string::npos) continue;
    std::size_t q = colon + 2;
    while (q < src.size() && std::isspace(static_cast<unsigned char>(src[q]))) ++q;
    for (const char* quote : {"\"\"\"", "'''"}) {
      if (src.compare(q, 3, quote) != 0) continue;
      std::size_t end = src.find(quote, q + 3);
      if (end == std::string::npos) break;
      PyFunc f;
      f.name = src.substr(n, ne - n);
      f.docstring = trim(std::string_view(src).substr(q + 3, end - q - 3));
      f.doc_begin = src.rfind('\n', q) + 1;
      f.doc_end = end + 3;
      if (f.doc_end < src.size() && src[f.doc_end] == '\n') ++f.doc_end;
      out.push_back(std::move(f));
      break;
    }
  }
  return out;
}

std::string strip_docstrings(const std::string& src) {
  std::string out;
  std::size_t at = 0;
  for (const auto& f : python_functions(src)) {
    out += src.substr(at, f.doc_begin - at);
    at = f.doc_end;
  }
  return out + src.substr(at);
}

// What one reader call skipped or kept with a caveat, by reason, in order of
// first occurrence; report() sends it as ONE warning naming the counts.
struct Tally {
  Tally(std::string r, fs::path f) : reader(std::move(r)), file(std::move(f)) {}
  std::string reader;
  fs::path file;
  std::size_t records = 0;
  std::vector<std::pair<std::string, std::size_t>> notes;
  void note(const std::string& why) {
    for (auto& [w, n] : notes)
      if (w == why) {
        ++n;
        return;
      }
    notes.emplace_back(why, 1);
  }
  void report(const ReadOptions& opt, const char* unit = "records") const {
    if (notes.empty()) return;
    std::string msg = reader + " reader, " + file.string() + ":";
    for (std::size_t i = 0; i < notes.size(); ++i)
      msg += detail::cat(i ? ";" : "", " ", notes[i].second, " of ", records, " ", unit, " ", notes[i].first);
    warn(opt, msg);
  }
};

}  // namespace

void warn(const ReadOptions& opt, const std::string& msg) {
  if (opt.warn)
    opt.warn(msg);
  else
    std::fprintf(stderr, "dsrsq: warning: %s\n", msg.c_str());
}

std::string read_file(const fs::path& file) {
  DSRSQ_INPUT_CHECK(fs::exists(file), "file not found: ", file.string());
  std::ifstream in(file, std::ios::binary);
  DSRSQ_INPUT_CHECK(in.good(), "cannot open file: ", file.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<fs::path> list_files(const fs::path& path, const std::vector<std::string>& exts) {
  DSRSQ_INPUT_CHECK(fs::exists(path), "data path not found: ", path.string());
  auto match = [&](const fs::path& p) {
    const std::string s = p.filename().string();
    return std::any_of(exts.begin(), exts.end(), [&](const std::string& e) { return ends_with(s, e); });
  };
  std::vector<fs::path> out;
  if (fs::is_regular_file(path)) {
    out.push_back(path);
  } else {
    for (const auto& e : fs::recursive_directory_iterator(path, fs::directory_options::follow_directory_symlink))
      if (e.is_regular_file() && match(e.path())) out.push_back(e.path());
    std::sort(out.begin(), out.end());
  }
  std::string want;
  for (const auto& e : exts) want += (want.empty() ? "" : " ") + e;
  DSRSQ_INPUT_CHECK(!out.empty(), "no data files (", want, ") under ", path.string());
  return out;
}

std::vector<std::vector<std::string>> parse_csv(std::string_view text, const std::string& where) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> row;
  std::string field;
  bool quoted = false, field_started = false;
  std::size_t line = 1, quote_line = 0;
  auto end_field = [&] {
    row.push_back(std::move(field));
    field.clear();
    field_started = false;
  };
  auto end_row = [&] {
    end_field();
    if (!(row.size() == 1 && row[0].empty())) rows.push_back(std::move(row));
    row.clear();
  };
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (quoted) {
      if (c == '"') {
        if (i + 1 < text.size() && text[i + 1] == '"') {
          field += '"';
          ++i;
        } else {
          quoted = false;
          const char nx = i + 1 < text.size() ? text[i + 1] : ',';
          DSRSQ_INPUT_CHECK(nx == ',' || nx == '\n' || nx == '\r', where, ":", line,
                            ": text after the closing quote of a CSV field");
        }
      } else {
        if (c == '\n') ++line;
        field += c;
      }
      continue;
    }
    if (c == '"' && !field_started) {
      quoted = true;
      field_started = true;
      quote_line = line;
    } else if (c == '"') {
      raise_input_error(detail::cat(where, ":", line, ": stray quote inside an unquoted CSV field"));
    } else if (c == ',') {
      end_field();
    } else if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') {
      // CRLF: the \n ends the row.
    } else if (c == '\n') {
      end_row();
      ++line;
    } else {
      field += c;
      field_started = true;
    }
  }
  DSRSQ_INPUT_CHECK(!quoted, where, ":", quote_line, ": unterminated quoted CSV field");
  if (field_started || !row.empty()) end_row();
  return rows;
}

std::vector<Example> read_nq(const fs::path& file, const ReadOptions& opt) {
  std::vector<Example> out;
  Tally t("nq", file);
  for_each_jsonl(file, opt.max_examples, out, [&](const json& j, std::size_t) {
    ++t.records;
    Example ex;
    const auto toks = split_ws(need_str(j, "document_text"));
    ex.id = str_or(j, "example_id");
    ex.query = need_str(j, "question_text");
    ex.context = join_tokens(toks, 0, toks.size(), true);
    std::string long_answer, yes_no = "NONE";
    for (const auto& a : need(j, "annotations")) {
      for (const auto& s : a.value("short_answers", json::array())) {
        const long long b = need_int(s, "start_token"), e = need_int(s, "end_token");
        DSRSQ_INPUT_CHECK(0 <= b && b <= e && static_cast<std::size_t>(e) <= toks.size(), "short answer span [", b,
                          ",", e, ") outside the document (", toks.size(), " tokens)");
        add_unique(ex.answers, join_tokens(toks, static_cast<std::size_t>(b), static_cast<std::size_t>(e), true));
      }
      const std::string yn = a.value("yes_no_answer", std::string("NONE"));
      if (yn != "NONE") yes_no = yn;
      if (a.contains("long_answer") && long_answer.empty()) {
        const auto& la = a.at("long_answer");
        const long long b = need_int(la, "start_token"), e = need_int(la, "end_token");
        if (b >= 0 && e > b) {
          DSRSQ_INPUT_CHECK(static_cast<std::size_t>(e) <= toks.size(), "long answer span outside the document");
          long_answer = join_tokens(toks, static_cast<std::size_t>(b), static_cast<std::size_t>(e), true);
        }
      }
    }
    if (ex.answers.empty() && (yes_no != "NONE" || !long_answer.empty()))
      t.note(yes_no != "NONE" ? "have no short answer (kept: scored on the yes/no answer)"
                              : "have no short answer (kept: scored on the long answer)");
    if (ex.answers.empty() && yes_no != "NONE") {
      std::string yn = yes_no;
      std::transform(yn.begin(), yn.end(), yn.begin(), [](unsigned char c) { return std::tolower(c); });
      ex.answers.push_back(yn);
    }
    if (ex.answers.empty() && !long_answer.empty()) ex.answers.push_back(long_answer);
    ex.meta["long_answer"] = long_answer;
    ex.meta["yes_no_answer"] = yes_no;
    ex.meta["example_id"] = ex.id;
    ex.meta["document_url"] = str_or(j, "document_url");
    ex.meta["format"] = "nq";
    if (ex.answers.empty()) return t.note("skipped: no short, yes/no or long answer");
    if (ex.context.empty()) t.note("have an empty document (kept: a zero-token context)");
    out.push_back(std::move(ex));
  });
  t.report(opt);
  return out;
}

std::vector<Example> read_eli5(const fs::path& file, const ReadOptions& opt) {
  std::vector<Example> out;
  Tally t("eli5", file);
  for_each_jsonl(file, opt.max_examples, out, [&](const json& j, std::size_t) {
    ++t.records;
    Example ex;
    ex.id = need_str(j, "q_id");
    ex.query = need_str(j, "title");
    ex.context = str_or(j, "selftext");
    const auto& a = need(j, "answers");
    const auto texts = need(a, "text").get<std::vector<std::string>>();
    std::vector<double> score(texts.size(), 0.0);
    if (a.contains("score")) {
      const auto s = a.at("score").get<std::vector<double>>();
      DSRSQ_INPUT_CHECK(s.size() == texts.size(), "answers.score has ", s.size(), " entries, answers.text ",
                        texts.size());
      score = s;
    }
    std::vector<std::size_t> order(texts.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](auto x, auto y) { return score[x] > score[y]; });
    for (auto i : order) ex.answers.push_back(texts[i]);
    ex.meta["format"] = "eli5";
    ex.meta["subreddit"] = str_or(j, "subreddit");
    if (ex.answers.empty() || trim(ex.answers.front()).empty()) return t.note("skipped: no answer text");
    if (trim(ex.context).empty()) t.note("have an empty selftext (kept: a zero-token context)");
    out.push_back(std::move(ex));
  });
  t.report(opt);
  return out;
}

namespace {
Example cnn_example(std::string id, std::string article, const std::vector<std::string>& highlights) {
  Example ex;
  ex.id = std::move(id);
  ex.context = std::move(article);
  ex.query = "Summarize the article.";
  std::string h;
  for (const auto& s : highlights) {
    std::string t = trim(s);
    if (t.empty()) continue;
    if (!h.empty()) h += ' ';
    h += t;
  }
  ex.answers.push_back(h);
  ex.meta["format"] = "cnn_dm";
  ex.meta["num_highlights"] = std::to_string(highlights.size());
  return ex;
}
}  // namespace

std::vector<Example> read_cnn_dm_story(const fs::path& file) {
  const std::string text = read_file(file);
  // Split into blank-line separated paragraphs; "@highlight" marks that the
  // next paragraph is a highlight.
  std::vector<std::string> paras;
  std::istringstream in(text);
  std::string line, cur;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (trim(line).empty()) {
      if (!cur.empty()) paras.push_back(cur);
      cur.clear();
    } else {
      cur += (cur.empty() ? "" : "\n") + line;
    }
  }
  if (!cur.empty()) paras.push_back(cur);
  std::string article;
  std::vector<std::string> hl;
  bool next_is_highlight = false;
  for (const auto& p : paras) {
    if (trim(p) == "@highlight") {
      next_is_highlight = true;
    } else if (next_is_highlight) {
      hl.push_back(p);
      next_is_highlight = false;
    } else {
      article += (article.empty() ? "" : "\n\n") + p;
    }
  }
  DSRSQ_INPUT_CHECK(!hl.empty(), file.string(), ": no @highlight in a .story file");
  std::vector<Example> out;
  out.push_back(cnn_example(file.stem().string(), article, hl));
  return out;
}

std::vector<Example> read_cnn_dm_csv(const fs::path& file, const ReadOptions& opt) {
  const auto rows = parse_csv(read_file(file), file.string());
  DSRSQ_INPUT_CHECK(!rows.empty(), file.string(), ": empty CSV file");
  const auto& hdr = rows[0];
  auto col = [&](const char* name) -> std::size_t {
    auto it = std::find(hdr.begin(), hdr.end(), name);
    DSRSQ_INPUT_CHECK(it != hdr.end(), file.string(), ":1: CSV header lacks column '", name, "'");
    return static_cast<std::size_t>(it - hdr.begin());
  };
  const std::size_t ci = col("id"), ca = col("article"), ch = col("highlights");
  std::vector<Example> out;
  Tally t("cnn_dm", file);
  for (std::size_t r = 1; r < rows.size(); ++r) {
    if (opt.max_examples && out.size() >= opt.max_examples) break;
    ++t.records;
    DSRSQ_INPUT_CHECK(rows[r].size() == hdr.size(), file.string(), ": record ", r + 1, " has ", rows[r].size(),
                      " fields, the header ", hdr.size());
    std::vector<std::string> hl;
    std::istringstream hs(rows[r][ch]);
    for (std::string l; std::getline(hs, l);) hl.push_back(l);
    Example ex = cnn_example(rows[r][ci], rows[r][ca], hl);
    if (ex.answers.front().empty()) {
      t.note("skipped: no highlight text");
      continue;
    }
    if (trim(ex.context).empty()) t.note("have an empty article (kept: a zero-token context)");
    out.push_back(std::move(ex));
  }
  t.report(opt);
  return out;
}

std::vector<Example> read_s2orc(const fs::path& file, const ReadOptions& opt) {
  std::vector<Example> out;
  Tally t("s2orc", file);
  for_each_jsonl(file, opt.max_examples, out, [&](const json& j, std::size_t) {
    ++t.records;
    Example ex;
    ex.id = str_or(j, "paper_id");
    DSRSQ_INPUT_CHECK(!ex.id.empty(), "missing field 'paper_id'");
    const std::string title = str_or(j, "title");
    ex.context = title;
    std::string last_section;
    std::size_t cites = 0;
    for (const auto& p : need(j, "body_text")) {
      const std::string sec = str_or(p, "section");
      std::string chunk;
      if (sec != last_section && !sec.empty()) chunk += sec + "\n";
      last_section = sec;
      chunk += need_str(p, "text");
      ex.context += (ex.context.empty() ? "" : "\n\n") + chunk;
      if (p.contains("cite_spans")) cites += p.at("cite_spans").size();
    }
    ex.query = "Write the abstract of the paper.";
    ex.answers.push_back(str_or(j, "abstract"));
    ex.meta["format"] = "s2orc";
    ex.meta["title"] = title;
    ex.meta["num_cite_spans"] = std::to_string(cites);
    ex.meta["num_bib_entries"] = std::to_string(j.contains("bib_entries") && j.at("bib_entries").is_object()
                                                    ? j.at("bib_entries").size()
                                                    : 0);
    if (trim(ex.answers.front()).empty()) return t.note("skipped: no abstract");
    if (trim(ex.context).empty()) t.note("have no title or body text (kept: a zero-token context)");
    out.push_back(std::move(ex));
  });
  t.report(opt);
  return out;
}

std::vector<Example> read_github(const fs::path& file, const ReadOptions& opt) {
  std::vector<Example> out;
  std::size_t rec = 0;
  Tally t("github", file);
  for_each_jsonl(file, opt.max_examples, out, [&](const json& j, std::size_t) {
    ++t.records;
    const std::string content = need_str(j, "content");
    const std::string path = str_or(j, "path", str_or(j, "max_stars_repo_path"));
    const std::string repo = str_or(j, "repo_name", str_or(j, "max_stars_repo_name"));
    const std::string lang = str_or(j, "lang", str_or(j, "language"));
    const std::string base = repo + "/" + path;
    auto fill_meta = [&](Example& ex) {
      ex.meta["format"] = "github";
      ex.meta["path"] = path;
      ex.meta["repo_name"] = repo;
      ex.meta["lang"] = lang;
      ex.meta["license"] = str_or(j, "license");
    };
    std::vector<PyFunc> fns;
    if (lang == "Python" || lang == "python" || ends_with(path, ".py")) fns = python_functions(content);
    if (fns.empty() && trim(lang).empty()) {
      t.note("skipped: no Python function with a docstring and no language to ask about");
    } else if (fns.empty()) {
      Example ex;
      ex.id = base.empty() ? "github-" + std::to_string(rec) : base;
      ex.context = content;
      ex.query = "Which programming language is this file written in?";
      ex.answers.push_back(lang);
      fill_meta(ex);
      out.push_back(std::move(ex));
    }
    for (const auto& f : fns) {
      Example ex;
      ex.id = base + "#" + f.name;
      ex.context = content.substr(0, f.doc_begin) + content.substr(f.doc_end);
      ex.query = f.docstring;
      ex.answers.push_back(f.name);
      fill_meta(ex);
      out.push_back(std::move(ex));
    }
    if (trim(content).empty()) t.note("have empty content (kept: a zero-token context)");
    ++rec;
  });
  t.report(opt);
  return out;
}

std::vector<Example> read_codesearchnet(const fs::path& file, const ReadOptions& opt) {
  struct Fn {
    std::string repo, path, name, code, doc, lang;
  };
  std::vector<Fn> fns;
  std::vector<Example> unused;  // the callback collects into `fns`, not into this vector
  for_each_jsonl(file, 0, unused, [&](const json& j, std::size_t) {
    Fn f;
    f.repo = need_str(j, "repo");
    f.path = need_str(j, "path");
    f.name = need_str(j, "func_name");
    f.code = need_str(j, "code");
    f.doc = trim(need_str(j, "docstring"));
    f.lang = str_or(j, "language");
    fns.push_back(std::move(f));
  });
  // Group by module, in order of first appearance.
  std::vector<std::pair<std::string, std::string>> modules;
  std::map<std::pair<std::string, std::string>, std::string> module_text;
  for (const auto& f : fns) {
    auto key = std::make_pair(f.repo, f.path);
    if (!module_text.count(key)) modules.push_back(key);
    auto& m = module_text[key];
    m += (m.empty() ? "" : "\n\n") + (f.lang == "python" ? strip_docstrings(f.code) : f.code);
  }
  std::vector<Example> out;
  Tally t("codesearchnet", file);
  for (const auto& f : fns) {
    if (opt.max_examples && out.size() >= opt.max_examples) break;
    ++t.records;
    if (f.doc.empty()) {
      t.note("skipped: no docstring");
      continue;
    }
    Example ex;
    ex.id = f.repo + "/" + f.path + "#" + f.name;
    ex.context = module_text[{f.repo, f.path}];
    ex.query = f.doc;
    const auto dot = f.name.rfind('.');
    ex.answers.push_back(dot == std::string::npos ? f.name : f.name.substr(dot + 1));
    ex.meta["format"] = "codesearchnet";
    ex.meta["repo"] = f.repo;
    ex.meta["path"] = f.path;
    ex.meta["func_name"] = f.name;
    ex.meta["language"] = f.lang;
    out.push_back(std::move(ex));
  }
  t.report(opt, "functions");
  return out;
}

std::vector<Example> read_longbench(const fs::path& file, const ReadOptions& opt) {
  std::vector<Example> out;
  Tally t("longbench", file);
  for_each_jsonl(file, opt.max_examples, out, [&](const json& j, std::size_t) {
    ++t.records;
    Example ex;
    ex.id = need_str(j, "_id");
    ex.context = need_str(j, "context");
    ex.query = need_str(j, "input");
    ex.answers = need(j, "answers").get<std::vector<std::string>>();
    ex.meta["format"] = "longbench";
    ex.meta["length"] = str_or(j, "length");
    ex.meta["dataset"] = str_or(j, "dataset");
    ex.meta["language"] = str_or(j, "language");
    ex.meta["all_classes"] = j.contains("all_classes") ? j.at("all_classes").dump() : "null";
    if (ex.answers.empty() || trim(ex.answers.front()).empty()) return t.note("skipped: no answers");
    if (trim(ex.context).empty()) t.note("have an empty context (kept: a zero-token context)");
    out.push_back(std::move(ex));
  });
  t.report(opt);
  return out;
}

std::string keep_last_tokens(std::string_view text, const Tokenizer& tok, std::size_t n, std::size_t* before) {
  const std::vector<std::int32_t> ids = tok.encode(text);
  if (before) *before = ids.size();
  if (ids.size() <= n) return std::string(text);
  std::size_t k = n;
  for (;;) {
    std::string s = tok.decode(std::span<const std::int32_t>(ids).last(k));
    // A byte-level cut can land inside a UTF-8 character: drop its continuation bytes.
    std::size_t b = 0;
    while (b < s.size() && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) ++b;
    s.erase(0, b);
    const std::size_t got = tok.encode(s).size();
    if (got <= n || k == 0) return s;
    k -= std::min(k, got - n);  // a subword tokenizer may re-split the cut text into more tokens
  }
}

const std::vector<std::string>& dataset_names() {
  static const std::vector<std::string> names{"nq", "eli5", "cnn_dm", "github", "codesearchnet", "s2orc", "longbench"};
  return names;
}

std::vector<Example> load_dataset(const std::string& name, const fs::path& data_dir, const ReadOptions& opt) {
  using Reader = std::vector<Example> (*)(const fs::path&, const ReadOptions&);
  Reader reader = nullptr;
  if (name == "nq") reader = read_nq;
  else if (name == "eli5") reader = read_eli5;
  else if (name == "github") reader = read_github;
  else if (name == "codesearchnet") reader = read_codesearchnet;
  else if (name == "s2orc") reader = read_s2orc;
  else if (name == "longbench") reader = read_longbench;
  else if (name != "cnn_dm") {
    std::string valid;
    for (const auto& n : dataset_names()) valid += (valid.empty() ? "" : ", ") + n;
    raise_input_error(detail::cat("unknown dataset '", name, "'; valid names: ", valid));
  }
  std::vector<Example> out;
  auto take = [&](std::vector<Example> v) {
    for (auto& e : v) {
      if (opt.max_examples && out.size() >= opt.max_examples) return;
      out.push_back(std::move(e));
    }
  };
  if (!reader) {  // cnn_dm
    for (const auto& f : list_files(data_dir, {".story", ".csv"})) {
      if (opt.max_examples && out.size() >= opt.max_examples) break;
      take(ends_with(f.string(), ".csv") ? read_cnn_dm_csv(f, opt) : read_cnn_dm_story(f));
    }
    return out;
  }
  for (const auto& f : list_files(data_dir, {".jsonl", ".json"})) {
    if (opt.max_examples && out.size() >= opt.max_examples) break;
    take(reader(f, opt));
  }
  return out;
}

}  // namespace dsrsq::data
