#include "io/results.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <set>
#include <sstream>
#include <variant>

#include "core/error.hpp"

namespace dsrsq::results {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr std::int64_t kUnsetInt = -1;
constexpr hsize_t kRowChunk = 512;        // rows per chunk for numeric columns
constexpr hsize_t kByteChunk = 64 * 1024;  // bytes per chunk for string streams

// A record field bound to a column: numbers, one string, or a list of
// strings (joined with kGoldSeparator).
template <class R>
struct Field {
  const char* name;
  std::variant<double R::*, std::int64_t R::*, std::string R::*, std::vector<std::string> R::*> member;
};

const std::vector<Field<TrainRecord>>& train_fields() {
  using R = TrainRecord;
  static const std::vector<Field<R>> f = {
      {"step", &R::step},
      {"epoch", &R::epoch},
      {"loss_total", &R::loss_total},
      {"loss_task", &R::loss_task},
      {"loss_retrieval", &R::loss_retrieval},
      {"loss_compression", &R::loss_compression},
      {"loss_compute", &R::loss_compute},
      {"selected_fraction", &R::selected_fraction},
      {"lr", &R::lr},
      {"grad_norm", &R::grad_norm},
      {"tokens_per_s", &R::tokens_per_s},
      {"step_time_s", &R::step_time_s},
  };
  return f;
}

const std::vector<Field<ValRecord>>& val_fields() {
  static const std::vector<Field<ValRecord>> f = {{"step", &ValRecord::step}, {"loss", &ValRecord::loss}};
  return f;
}

const std::vector<Field<RankRecord>>& rank_fields() {
  using R = RankRecord;
  static const std::vector<Field<R>> f = {{"step", &R::step},
                                          {"rank", &R::rank},
                                          {"step_time_s", &R::step_time_s},
                                          {"comm_time_s", &R::comm_time_s},
                                          {"bytes_sent", &R::bytes_sent}};
  return f;
}

const std::vector<Field<ExampleRecord>>& example_fields() {
  using R = ExampleRecord;
  static const std::vector<Field<R>> f = {
      {"id", &R::id},
      {"task", &R::task},
      {"prediction", &R::prediction},
      {"gold", &R::golds},
      {"f1", &R::f1},
      {"em", &R::em},
      {"rouge_l", &R::rouge_l},
      {"bleu", &R::bleu},
      {"context_tokens", &R::context_tokens},
      {"attended_tokens", &R::attended_tokens},
      {"ttft_s", &R::ttft_s},
      {"itl_s", &R::itl_s},
      {"kv_budget_requested_bytes", &R::kv_budget_requested_bytes},
      {"kv_budget_achieved_bytes", &R::kv_budget_achieved_bytes},
      {"kv_resident_bytes", &R::kv_resident_bytes},
      {"kv_peak_prefill_bytes", &R::kv_peak_prefill_bytes},
      {"kv_read_per_step_bytes", &R::kv_read_per_step_bytes},
      {"kv_total_bytes", &R::kv_total_bytes},
      {"meta", &R::meta},
      {"cell", &R::cell},
  };
  return f;
}

// Schema 2 files: the same columns without `cell`.
const std::vector<Field<ExampleRecord>>& example_fields_v2() {
  static const std::vector<Field<ExampleRecord>> f(example_fields().begin(), example_fields().end() - 1);
  return f;
}

const std::vector<Field<EvalSummary>>& summary_fields() {
  using R = EvalSummary;
  static const std::vector<Field<R>> f = {{"f1_mean", &R::f1_mean},           {"em_mean", &R::em_mean},
                                          {"rouge_l_mean", &R::rouge_l_mean}, {"bleu_mean", &R::bleu_mean},
                                          {"corpus_bleu", &R::corpus_bleu},   {"n_examples", &R::n_examples}};
  return f;
}

const std::vector<Field<EfficiencyRecord>>& efficiency_fields() {
  using R = EfficiencyRecord;
  static const std::vector<Field<R>> f = {{"peak_mem_bytes", &R::peak_mem_bytes},
                                          {"avg_mem_bytes", &R::avg_mem_bytes},
                                          {"process_peak_rss_bytes", &R::process_peak_rss_bytes},
                                          {"throughput_tok_s", &R::throughput_tok_s},
                                          {"context_tokens_per_s", &R::context_tokens_per_s},
                                          {"latency_s", &R::latency_s},
                                          {"itl_s", &R::itl_s},
                                          {"token_efficiency", &R::token_efficiency},
                                          {"flops", &R::flops},
                                          {"tokens_run", &R::tokens_run},
                                          {"context_tokens_served", &R::context_tokens_served},
                                          {"serve_s", &R::serve_s},
                                          {"decode_examples", &R::decode_examples}};
  return f;
}

const std::vector<Field<AdaptationRecord>>& adaptation_scalar_fields() {
  using R = AdaptationRecord;
  static const std::vector<Field<R>> f = {{"retention_auc", &R::retention_auc},
                                          {"temporal_consistency", &R::temporal_consistency},
                                          {"adaptation_speed", &R::adaptation_speed},
                                          {"n_queries", &R::n_queries}};
  return f;
}

template <class R>
bool is_string(const Field<R>& f) {
  return f.member.index() >= 2;
}

std::string join_golds(const std::vector<std::string>& golds) {
  std::string s;
  for (std::size_t i = 0; i < golds.size(); ++i) {
    DSRSQ_INPUT_CHECK(golds[i].find(kGoldSeparator) == std::string::npos,
                      "results: a gold answer contains the separator byte 0x1f: '", golds[i], "'");
    if (i) s += kGoldSeparator;
    s += golds[i];
  }
  return s;
}

std::vector<std::string> split_golds(const std::string& s) {
  std::vector<std::string> out;
  if (s.empty()) return out;  // no golds (an empty single gold is not representable; documented)
  std::size_t start = 0;
  while (true) {
    const std::size_t p = s.find(kGoldSeparator, start);
    out.push_back(s.substr(start, p == std::string::npos ? std::string::npos : p - start));
    if (p == std::string::npos) break;
    start = p + 1;
  }
  return out;
}

// Cut to at most `max` bytes (marking the cut) without splitting a UTF-8 sequence.
std::string fit(const std::string& s, std::size_t max) {
  if (s.size() <= max) return s;
  const std::string mark = kTruncatedMark;
  std::size_t n = max > mark.size() ? max - mark.size() : 0;
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return s.substr(0, n) + mark.substr(0, max - n);
}

void check_name(const std::string& kind, const std::string& name, std::set<std::string>& seen) {
  DSRSQ_INPUT_CHECK(!name.empty() && name.find('/') == std::string::npos && name != "." && name != "..",
                    "results: invalid ", kind, " name '", name, "' (must be non-empty, without '/')");
  DSRSQ_INPUT_CHECK(seen.insert(name).second, "results: duplicate ", kind, " name '", name, "'");
}

bool contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

std::string list(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s.empty() ? "(none)" : s;
}

}  // namespace

// ---- Table: equal-length 1-D columns in one group -------------------------
//
// A string column `c` is two datasets: c_bytes (uint8 stream) and c_end
// (int64, exclusive end offset of each row). Appends write every byte stream
// and flush it before any row-level column grows, so a SWMR reader that sees
// a row's end offset also finds its bytes.
class Table {
 public:
  struct Col {
    std::string name;
    bool str = false;
    bool integer = false;
    h5::Dataset data;  // numbers, or the byte stream
    h5::Dataset end;   // string columns: end offsets
  };

  template <class R>
  static Table create(const h5::Group& g, const std::vector<Field<R>>& fields) {
    Table t;
    t.group_ = g.path();
    for (const auto& f : fields) {
      Col c;
      c.name = f.name;
      c.str = is_string(f);
      c.integer = f.member.index() == 1;
      if (c.str) {
        c.data = g.create_extendible<std::uint8_t>(c.name + "_bytes", kByteChunk);
        c.end = g.create_extendible<std::int64_t>(c.name + "_end", kRowChunk);
      } else if (c.integer) {
        c.data = g.create_extendible<std::int64_t>(c.name, kRowChunk);
      } else {
        c.data = g.create_extendible<double>(c.name, kRowChunk);
      }
      t.cols_.push_back(std::move(c));
    }
    return t;
  }

  template <class R>
  static Table open(const h5::Group& g, const std::vector<Field<R>>& fields, bool refresh) {
    Table t;
    t.group_ = g.path();
    for (const auto& f : fields) {
      Col c;
      c.name = f.name;
      c.str = is_string(f);
      c.integer = f.member.index() == 1;
      c.data = g.dataset(c.str ? c.name + "_bytes" : c.name);
      if (c.str) c.end = g.dataset(c.name + "_end");
      if (refresh) {
        c.data.refresh();
        if (c.str) c.end.refresh();
      }
      t.cols_.push_back(std::move(c));
    }
    return t;
  }

  // Complete rows: the shortest column, less any trailing rows whose string
  // bytes are not all visible yet.
  std::size_t rows() const {
    hsize_t n = std::numeric_limits<hsize_t>::max();
    for (const auto& c : cols_) n = std::min(n, c.str ? c.end.size() : c.data.size());
    if (cols_.empty()) return 0;
    for (const auto& c : cols_) {
      if (!c.str) continue;
      const hsize_t bytes = c.data.size();
      while (n > 0 && static_cast<hsize_t>(c.end.read_range<std::int64_t>(n - 1, 1)[0]) > bytes) --n;
    }
    return static_cast<std::size_t>(n);
  }

  template <class R>
  void append(const std::vector<Field<R>>& fields, std::span<const R> rows) {
    if (rows.empty()) return;
    const std::size_t n = rows.size();
    // An append interrupted by an HDF5 error can leave row-level columns
    // uneven; refuse rather than misalign rows (stray string bytes past the
    // last end offset are harmless: offsets continue from the stream end).
    const std::size_t base = this->rows();
    for (auto& c : cols_) {
      if ((c.str ? c.end.size() : c.data.size()) != base) fail("columns are uneven (interrupted append?)");
    }
    // 1. String bytes, flushed before anything that counts rows.
    std::vector<std::vector<std::int64_t>> ends(fields.size());
    for (std::size_t k = 0; k < fields.size(); ++k) {
      if (!cols_[k].str) continue;
      std::string bytes;
      std::int64_t off = static_cast<std::int64_t>(cols_[k].data.size());
      for (const R& r : rows) {
        std::string s = std::visit(
            [&](auto m) -> std::string {
              using M = decltype(m);
              if constexpr (std::is_same_v<M, std::string R::*>) return r.*m;
              else if constexpr (std::is_same_v<M, std::vector<std::string> R::*>) return join_golds(r.*m);
              else return {};
            },
            fields[k].member);
        bytes += s;
        off += static_cast<std::int64_t>(s.size());
        ends[k].push_back(off);
      }
      cols_[k].data.append(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
      cols_[k].data.flush();
    }
    // 2. Row-level columns.
    std::vector<double> dv(n);
    std::vector<std::int64_t> iv(n);
    for (std::size_t k = 0; k < fields.size(); ++k) {
      if (cols_[k].str) {
        cols_[k].end.append(ends[k].data(), n);
        continue;
      }
      if (auto m = std::get_if<double R::*>(&fields[k].member)) {
        for (std::size_t i = 0; i < n; ++i) dv[i] = rows[i].**m;
        cols_[k].data.append(dv.data(), n);
      } else if (auto mi = std::get_if<std::int64_t R::*>(&fields[k].member)) {
        for (std::size_t i = 0; i < n; ++i) iv[i] = rows[i].**mi;
        cols_[k].data.append(iv.data(), n);
      }
    }
  }

  template <class R>
  std::vector<R> read(const std::vector<Field<R>>& fields) const {
    const std::size_t n = rows();
    std::vector<R> out(n);
    if (n == 0) return out;
    for (std::size_t k = 0; k < fields.size(); ++k) {
      const Col& c = cols_[k];
      if (c.str) {
        const auto e = c.end.read_range<std::int64_t>(0, n);
        const auto b = c.data.read_range<std::uint8_t>(0, static_cast<hsize_t>(e[n - 1]));
        std::int64_t start = 0;
        for (std::size_t i = 0; i < n; ++i) {
          if (e[i] < start || e[i] > static_cast<std::int64_t>(b.size())) fail("corrupt end offsets in " + c.name + "_end");
          std::string s(reinterpret_cast<const char*>(b.data()) + start, static_cast<std::size_t>(e[i] - start));
          start = e[i];
          if (auto m = std::get_if<std::string R::*>(&fields[k].member)) out[i].**m = std::move(s);
          else if (auto mv = std::get_if<std::vector<std::string> R::*>(&fields[k].member)) out[i].**mv = split_golds(s);
        }
      } else if (auto m = std::get_if<double R::*>(&fields[k].member)) {
        const auto v = c.data.read_range<double>(0, n);
        for (std::size_t i = 0; i < n; ++i) out[i].**m = v[i];
      } else if (auto mi = std::get_if<std::int64_t R::*>(&fields[k].member)) {
        const auto v = c.data.read_range<std::int64_t>(0, n);
        for (std::size_t i = 0; i < n; ++i) out[i].**mi = v[i];
      }
    }
    return out;
  }

  // Keep the first n rows (not allowed under SWMR: used before it starts).
  void truncate(std::size_t n) {
    for (auto& c : cols_) {
      if (c.str) {
        const std::int64_t bytes = n ? c.end.read_range<std::int64_t>(n - 1, 1)[0] : 0;
        c.end.resize(n);
        c.data.resize(static_cast<hsize_t>(bytes));
      } else {
        c.data.resize(n);
      }
    }
  }

  // Rows whose `step` column is <= step (steps are appended in order).
  std::size_t rows_through_step(std::int64_t step) const {
    const std::size_t n = rows();
    const auto it = std::find_if(cols_.begin(), cols_.end(), [](const Col& c) { return c.name == "step"; });
    if (it == cols_.end() || n == 0) return n;
    const auto s = it->data.read_range<std::int64_t>(0, n);
    std::size_t keep = 0;
    while (keep < n && s[keep] <= step) ++keep;
    return keep;
  }

  [[noreturn]] void fail(const std::string& what) const {
    raise_input_error(detail::cat("results table '", group_, "': ", what));
  }

 private:
  std::string group_;
  std::vector<Col> cols_;
};

namespace {

// Scalar records (summary, efficiency, adaptation scalars): one scalar
// dataset per field, pre-created as NaN / -1.
template <class R>
void create_scalars(const h5::Group& g, const std::vector<Field<R>>& fields) {
  for (const auto& f : fields) {
    if (f.member.index() == 1) g.create_fixed<std::int64_t>(f.name, {}, kUnsetInt);
    else g.create_fixed<double>(f.name, {}, kNaN);
  }
}

template <class R>
void write_scalars(const h5::Group& g, const std::vector<Field<R>>& fields, const R& r) {
  for (const auto& f : fields) {
    h5::Dataset ds = g.dataset(f.name);
    if (auto m = std::get_if<double R::*>(&f.member)) ds.write_all(&(r.**m), 1);
    else if (auto mi = std::get_if<std::int64_t R::*>(&f.member)) ds.write_all(&(r.**mi), 1);
  }
}

// A field the group lacks (a schema 2 file's efficiency numerators) reads as unset.
template <class R>
void read_scalars(const h5::Group& g, const std::vector<Field<R>>& fields, R& r, bool refresh) {
  for (const auto& f : fields) {
    if (!g.exists(f.name)) {
      if (auto m = std::get_if<double R::*>(&f.member)) r.**m = kNaN;
      else if (auto mi = std::get_if<std::int64_t R::*>(&f.member)) r.**mi = kUnsetInt;
      continue;
    }
    h5::Dataset ds = g.dataset(f.name);
    if (refresh) ds.refresh();
    if (auto m = std::get_if<double R::*>(&f.member)) r.**m = ds.read_all<double>().at(0);
    else if (auto mi = std::get_if<std::int64_t R::*>(&f.member)) r.**mi = ds.read_all<std::int64_t>().at(0);
  }
}

void create_status(const h5::Group& status, const std::string& name) {
  auto g = status.create_group(name);
  g.create_fixed_string("state", kStateChars, "pending");
  g.create_fixed_string("message", kMessageChars, "");
}

// An efficiency group: its scalars, and the scope of the one figure that is not per method.
void create_efficiency_group(const h5::Group& g) {
  create_scalars(g, efficiency_fields());
  g.set_attr("process_peak_rss_bytes_scope",
             std::string("process lifetime: the process's peak RSS (VmHWM) when this method finished, training "
                         "and every method evaluated before it included; peak_mem_bytes is this method's own"));
}

void create_eval_group(const h5::Group& g) {
  Table::create(g, example_fields());
  create_scalars(g.create_group("summary"), summary_fields());
}

// Reading takes schema 2 and 3; writing into a file (resume) needs this build's.
void check_format(const h5::Group& root, const std::string& path, bool writing) {
  if (!root.has_attr("format") || root.attr_string("format") != kFormatName)
    raise_input_error(detail::cat("results file '", path,
                                  "': not a dsrsq results file (root attribute 'format' is not '", kFormatName, "')"));
  const auto v = root.has_attr("schema_version") ? root.attr_int("schema_version") : -1;
  if (writing && v != kSchemaVersion)
    raise_input_error(detail::cat("results file '", path, "': schema_version ", v, ", this build writes ",
                                  kSchemaVersion, " and cannot append to it"));
  if (v < kOldestReadableSchema || v > kSchemaVersion)
    raise_input_error(detail::cat("results file '", path, "': schema_version ", v, ", this build reads ",
                                  kOldestReadableSchema, " to ", kSchemaVersion));
}

const std::vector<Field<ExampleRecord>>& example_fields_of(const h5::Group& root) {
  return root.attr_int("schema_version") >= 3 ? example_fields() : example_fields_v2();
}

std::string cell_group(const std::string& method, std::size_t cell) {
  return "eval/" + method + "/cells/" + std::to_string(cell);
}

RunLayout layout_of(const h5::Group& r) {
  RunLayout l;
  l.world_size = static_cast<int>(r.attr_int("world_size"));
  l.dp = static_cast<int>(r.attr_int("dp"));
  l.sp = static_cast<int>(r.attr_int("sp"));
  l.retention_bins = static_cast<int>(r.attr_int("retention_bins"));
  l.methods = r.group("eval").children();
  if (r.has_attr("method_order")) {  // the run's order (children() are sorted by name)
    std::vector<std::string> ordered;
    std::istringstream words(r.attr_string("method_order"));
    for (std::string w; words >> w;) ordered.push_back(w);
    if (std::is_permutation(ordered.begin(), ordered.end(), l.methods.begin(), l.methods.end())) l.methods = ordered;
  }
  for (const auto& m : l.methods) {
    const auto g = r.group("eval/" + m);
    if (g.has_attr("backbone")) l.backbones[m] = g.attr_string("backbone");
  }
  if (r.has_attr("protocol")) l.protocol = r.attr_string("protocol");
  l.ablation_variants = r.group("ablation").children();
  if (r.has_attr("ablation_order")) {
    std::vector<std::string> ordered;
    std::istringstream words(r.attr_string("ablation_order"));
    for (std::string w; words >> w;) ordered.push_back(w);
    if (std::is_permutation(ordered.begin(), ordered.end(), l.ablation_variants.begin(), l.ablation_variants.end()))
      l.ablation_variants = ordered;
  }
  l.adaptation_methods = r.group("adaptation").children();
  if (r.exists("cells")) {
    const auto g = r.group("cells");
    const auto cs = g.read<std::int64_t>("context_size");
    const auto fr = g.read<double>("kv_budget_fraction");
    const auto by = g.read<std::int64_t>("kv_budget_bytes");
    std::vector<std::string> texts;
    std::istringstream words(g.has_attr("kv_budget") ? g.attr_string("kv_budget") : "");
    for (std::string w; words >> w;) texts.push_back(w);
    if (cs.size() != fr.size() || cs.size() != by.size() || cs.size() != texts.size())
      raise_input_error(detail::cat("results file: /cells columns have different lengths (", cs.size(), ", ",
                                    fr.size(), ", ", by.size(), ", ", texts.size(), " budget texts)"));
    for (std::size_t k = 0; k < cs.size(); ++k) l.cells.push_back(Cell{cs[k], texts[k], fr[k], by[k]});
  }
  return l;
}

}  // namespace

// ---- ResultsFile -----------------------------------------------------------

ResultsFile::ResultsFile() = default;
ResultsFile::ResultsFile(ResultsFile&&) noexcept = default;
ResultsFile& ResultsFile::operator=(ResultsFile&&) noexcept = default;
ResultsFile::~ResultsFile() {
  try {
    close();
  } catch (...) {
    // Destructors never throw; an explicit close() reports.
  }
}

ResultsFile ResultsFile::create(const std::string& path, const RunLayout& layout, const Provenance& provenance,
                                const ConfigRecord& config, std::int64_t schema_version) {
  {
    std::set<std::string> m, v, a;
    for (const auto& x : layout.methods) check_name("method", x, m);
    for (const auto& x : layout.ablation_variants) check_name("ablation variant", x, v);
    for (const auto& x : layout.adaptation_methods) check_name("adaptation method", x, a);
    DSRSQ_INPUT_CHECK(layout.retention_bins > 0, "results: retention_bins must be positive, got ",
                      layout.retention_bins);
    DSRSQ_INPUT_CHECK(layout.world_size >= 1 && layout.dp >= 1 && layout.sp >= 1,
                      "results: world_size, dp and sp must be >= 1");
    for (const auto& c : layout.cells)
      DSRSQ_INPUT_CHECK(c.context_size > 0 && !c.kv_budget.empty() &&
                            c.kv_budget.find_first_of(" \t\n") == std::string::npos,
                        "results: a cell needs a positive context size and a budget text without spaces, got ",
                        c.context_size, " / '", c.kv_budget, "'");
  }
  ResultsFile rf;
  rf.layout_ = layout;
  rf.file_ = std::make_unique<h5::File>(path, h5::File::Mode::create_exclusive);
  try {
    rf.build(provenance, config, schema_version);
  } catch (...) {
    // A half-built tree is useless (SWMR cannot add to it later): remove it.
    rf.tables_.clear();
    rf.file_.reset();
    std::remove(path.c_str());
    throw;
  }
  return rf;
}

void ResultsFile::build(const Provenance& provenance, const ConfigRecord& config, std::int64_t schema_version) {
  const RunLayout& layout = layout_;
  ResultsFile& rf = *this;
  const h5::Group& root = rf.file_->root();

  static const std::set<std::string> reserved = {"format", "schema_version", "world_size", "dp", "sp", "retention_bins"};
  root.set_attr("format", std::string(kFormatName));
  root.set_attr("schema_version", schema_version);
  root.set_attr("world_size", static_cast<std::int64_t>(layout.world_size));
  root.set_attr("dp", static_cast<std::int64_t>(layout.dp));
  root.set_attr("sp", static_cast<std::int64_t>(layout.sp));
  root.set_attr("retention_bins", static_cast<std::int64_t>(layout.retention_bins));
  auto check_key = [&](const std::string& k) {
    DSRSQ_INPUT_CHECK(!k.empty() && !reserved.count(k), "results: provenance key '", k, "' is empty or reserved");
  };
  for (const auto& [k, v] : provenance.strings) check_key(k), root.set_attr(k, v);
  for (const auto& [k, v] : provenance.integers) check_key(k), root.set_attr(k, v);
  for (const auto& [k, v] : provenance.numbers) check_key(k), root.set_attr(k, v);
  if (!root.has_attr("hdf5_version")) root.set_attr("hdf5_version", h5::library_version());

  auto cfg = root.create_group("config");
  for (const auto& [k, v] : config.options) {
    DSRSQ_INPUT_CHECK(!k.empty(), "results: empty config option name");
    cfg.set_attr(k, v);
  }
  cfg.create_fixed_string("resolved", std::max<std::size_t>(1, config.resolved_text.size()), config.resolved_text);

  auto status = root.create_group("status");
  status.create_fixed_string("run_state", kStateChars, "running");
  status.create_fixed_string("end_time", kTimeChars, "");
  status.create_fixed_string("run_message", kMessageChars, "");
  create_status(status, "train");
  for (const auto& m : layout.methods) create_status(status, "eval/" + m);
  for (const auto& v : layout.ablation_variants) create_status(status, "ablation/" + v);
  for (const auto& a : layout.adaptation_methods) create_status(status, "adaptation/" + a);

  Table::create(root.create_group("train"), train_fields());
  Table::create(root.create_group("val"), val_fields());
  Table::create(root.create_group("ranks"), rank_fields());
  root.create_group("eval");
  root.create_group("efficiency");
  root.create_group("ablation");
  root.create_group("adaptation");
  {
    std::string order;
    for (const auto& m : layout.methods) order += (order.empty() ? "" : " ") + m;
    root.set_attr("method_order", order);
    std::string variants;
    for (const auto& v : layout.ablation_variants) variants += (variants.empty() ? "" : " ") + v;
    root.set_attr("ablation_order", variants);
    root.set_attr("protocol", layout.protocol);
  }
  {
    // The cell table, written once: cell k's context size and budget.
    auto g = root.create_group("cells");
    std::vector<std::int64_t> cs, by;
    std::vector<double> fr;
    std::string texts;
    for (const auto& c : layout.cells) {
      cs.push_back(c.context_size);
      fr.push_back(c.kv_budget_fraction);
      by.push_back(c.kv_budget_bytes);
      texts += (texts.empty() ? "" : " ") + c.kv_budget;
    }
    if (cs.empty()) {  // no cells (a layout made by hand): empty columns
      g.create_fixed<std::int64_t>("context_size", {0}, 0);
      g.create_fixed<double>("kv_budget_fraction", {0}, kNaN);
      g.create_fixed<std::int64_t>("kv_budget_bytes", {0}, kUnsetInt);
    } else {
      g.write("context_size", cs, {cs.size()});
      g.write("kv_budget_fraction", fr, {fr.size()});
      g.write("kv_budget_bytes", by, {by.size()});
    }
    g.set_attr("kv_budget", texts);
  }
  for (const auto& m : layout.methods) {
    auto g = root.create_group("eval/" + m);
    create_eval_group(g);
    if (auto it = layout.backbones.find(m); it != layout.backbones.end()) g.set_attr("backbone", it->second);
    create_efficiency_group(root.create_group("efficiency/" + m));
    for (std::size_t k = 0; k < layout.cells.size(); ++k) {
      auto c = g.create_group("cells/" + std::to_string(k));
      c.create_fixed_string("state", kStateChars, "pending");
      c.create_fixed_string("message", kMessageChars, "");
      create_scalars(c.create_group("summary"), summary_fields());
      create_efficiency_group(c.create_group("efficiency"));
    }
  }
  for (const auto& v : layout.ablation_variants) {
    auto g = root.create_group("ablation/" + v);
    create_eval_group(g);
    create_efficiency_group(g.create_group("efficiency"));
  }
  const auto bins = static_cast<hsize_t>(layout.retention_bins);
  for (const auto& a : layout.adaptation_methods) {
    auto g = root.create_group("adaptation/" + a);
    g.create_fixed<double>("age_bin_edges", {bins + 1}, kNaN);
    g.create_fixed<double>("retention_by_age", {bins}, kNaN);
    g.create_fixed<std::int64_t>("queries_per_bin", {bins}, 0);
    create_scalars(g, adaptation_scalar_fields());
  }
  rf.file_->flush();
  rf.file_->start_swmr_write();
  rf.open_tables();
}

ResultsFile ResultsFile::resume(const std::string& path, std::int64_t keep_through_step, const RunLayout* layout,
                                const Provenance* update) {
  ResultsFile rf;
  rf.file_ = std::make_unique<h5::File>(path, h5::File::Mode::read_write, /*swmr=*/true);
  check_format(rf.file_->root(), path, /*writing=*/true);
  rf.layout_ = layout_of(rf.file_->root());
  if (update) {
    const auto& root = rf.file_->root();
    for (const auto& [k, v] : update->strings) root.set_attr(k, v);
    for (const auto& [k, v] : update->integers) root.set_attr(k, v);
  }
  if (layout && (layout->dp != rf.layout_.dp || layout->sp != rf.layout_.sp)) {
    // Attributes can change only before SWMR writing starts: now.
    const auto& root = rf.file_->root();
    std::string hist = root.has_attr("layout_history") ? root.attr_string("layout_history") : "";
    hist += (hist.empty() ? "" : "; ") + std::string("step ") + std::to_string(std::max<std::int64_t>(0, keep_through_step)) +
            ": dp " + std::to_string(rf.layout_.dp) + " sp " + std::to_string(rf.layout_.sp) + " -> dp " +
            std::to_string(layout->dp) + " sp " + std::to_string(layout->sp);
    root.set_attr("layout_history", hist);
    root.set_attr("world_size", static_cast<std::int64_t>(layout->dp * layout->sp));
    root.set_attr("dp", static_cast<std::int64_t>(layout->dp));
    root.set_attr("sp", static_cast<std::int64_t>(layout->sp));
    rf.layout_.world_size = layout->dp * layout->sp;
    rf.layout_.dp = layout->dp;
    rf.layout_.sp = layout->sp;
  }
  if (keep_through_step >= 0) {
    // Shrinking is not allowed under SWMR, so drop redone rows first.
    for (const char* name : {"train", "val", "ranks"}) {
      const auto g = rf.file_->root().group(name);
      Table t = name == std::string("train") ? Table::open(g, train_fields(), false)
                : name == std::string("val") ? Table::open(g, val_fields(), false)
                                             : Table::open(g, rank_fields(), false);
      t.truncate(t.rows_through_step(keep_through_step));
    }
  } else {
    // Even on a plain resume, cut columns back to whole rows.
    for (const char* name : {"train", "val", "ranks"}) {
      const auto g = rf.file_->root().group(name);
      Table t = name == std::string("train") ? Table::open(g, train_fields(), false)
                : name == std::string("val") ? Table::open(g, val_fields(), false)
                                             : Table::open(g, rank_fields(), false);
      t.truncate(t.rows());
    }
  }
  // Example rows of a method or variant that did not finish are redone by the
  // resumed run: drop them so they are not recorded twice.
  auto drop_unfinished = [&](const std::string& kind, const std::vector<std::string>& names) {
    for (const auto& n : names) {
      const auto st = rf.file_->root().group("status/" + kind + "/" + n).dataset("state").read_fixed_string();
      if (st == "done") continue;
      Table t = Table::open(rf.file_->root().group(kind + "/" + n), example_fields(), false);
      t.truncate(0);
      if (kind == "eval")  // its cells are evaluated again too
        for (std::size_t k = 0; k < rf.layout_.cells.size(); ++k) {
          const auto c = rf.file_->root().group(cell_group(n, k));
          c.dataset("state").write_fixed_string("pending");
          c.dataset("message").write_fixed_string("");
        }
    }
  };
  drop_unfinished("eval", rf.layout_.methods);
  drop_unfinished("ablation", rf.layout_.ablation_variants);
  rf.file_->flush();
  rf.file_->start_swmr_write();
  rf.open_tables();
  rf.set_run_state("running");
  return rf;
}

void ResultsFile::open_tables() {
  const auto& root = file_->root();
  tables_["train"] = std::make_unique<Table>(Table::open(root.group("train"), train_fields(), false));
  tables_["val"] = std::make_unique<Table>(Table::open(root.group("val"), val_fields(), false));
  tables_["ranks"] = std::make_unique<Table>(Table::open(root.group("ranks"), rank_fields(), false));
  for (const auto& m : layout_.methods)
    tables_["eval/" + m] = std::make_unique<Table>(Table::open(root.group("eval/" + m), example_fields(), false));
  for (const auto& v : layout_.ablation_variants)
    tables_["ablation/" + v] =
        std::make_unique<Table>(Table::open(root.group("ablation/" + v), example_fields(), false));
}

Table& ResultsFile::table(const std::string& key) {
  DSRSQ_INPUT_CHECK(file_, "results: file is closed");
  const auto it = tables_.find(key);
  DSRSQ_INPUT_CHECK(it != tables_.end(), "results file '", path(), "': no table '", key,
                    "' in the run layout (methods: ", list(layout_.methods),
                    "; ablation variants: ", list(layout_.ablation_variants), ")");
  return *it->second;
}

void ResultsFile::append_train(std::span<const TrainRecord> rows) {
  table("train").append(train_fields(), rows);
  flush();
}

void ResultsFile::append_val(const ValRecord& r) {
  table("val").append(val_fields(), std::span<const ValRecord>(&r, 1));
  flush();
}

void ResultsFile::append_examples(const std::string& group, std::span<const ExampleRecord> rows) {
  DSRSQ_INPUT_CHECK(group.rfind("eval/", 0) == 0 || group.rfind("ablation/", 0) == 0, "results file '", path(),
                    "': append_example needs 'eval/<method>' or 'ablation/<variant>', got '", group, "'");
  table(group).append(example_fields(), rows);
  flush();
}

void ResultsFile::append_ranks(std::span<const RankRecord> rows) {
  table("ranks").append(rank_fields(), rows);
  flush();
}

void ResultsFile::set_summary(const std::string& group, const EvalSummary& s) {
  table(group);  // validates the name
  write_scalars(file_->root().group(group + "/summary"), summary_fields(), s);
  flush();
}

void ResultsFile::set_efficiency(const std::string& group, const EfficiencyRecord& r) {
  DSRSQ_INPUT_CHECK(file_, "results: file is closed");
  std::string target;
  if (group.rfind("efficiency/", 0) == 0 && contains(layout_.methods, group.substr(11))) target = group;
  else if (group.rfind("ablation/", 0) == 0 && contains(layout_.ablation_variants, group.substr(9)))
    target = group + "/efficiency";
  DSRSQ_INPUT_CHECK(!target.empty(), "results file '", path(), "': no efficiency group '", group,
                    "' in the run layout (use efficiency/<method> with methods: ", list(layout_.methods),
                    ", or ablation/<variant> with variants: ", list(layout_.ablation_variants), ")");
  write_scalars(file_->root().group(target), efficiency_fields(), r);
  flush();
}

void ResultsFile::set_adaptation(const std::string& method, const AdaptationRecord& r) {
  DSRSQ_INPUT_CHECK(file_, "results: file is closed");
  DSRSQ_INPUT_CHECK(contains(layout_.adaptation_methods, method), "results file '", path(),
                    "': no adaptation method '", method, "' in the run layout (", list(layout_.adaptation_methods),
                    ")");
  const auto bins = static_cast<std::size_t>(layout_.retention_bins);
  DSRSQ_INPUT_CHECK(r.age_bin_edges.size() == bins + 1 && r.retention_by_age.size() == bins &&
                        r.queries_per_bin.size() == bins,
                    "results: adaptation '", method, "' needs ", bins + 1, " age_bin_edges and ", bins,
                    " retention_by_age / queries_per_bin values, got ", r.age_bin_edges.size(), ", ",
                    r.retention_by_age.size(), ", ", r.queries_per_bin.size());
  const auto g = file_->root().group("adaptation/" + method);
  g.dataset("age_bin_edges").write_all(r.age_bin_edges.data(), bins + 1);
  g.dataset("retention_by_age").write_all(r.retention_by_age.data(), bins);
  g.dataset("queries_per_bin").write_all(r.queries_per_bin.data(), bins);
  write_scalars(g, adaptation_scalar_fields(), r);
  flush();
}

void ResultsFile::set_status(const std::string& name, const std::string& state, const std::string& message) {
  DSRSQ_INPUT_CHECK(file_, "results: file is closed");
  static const std::set<std::string> states = {"pending", "running", "done", "failed", "interrupted"};
  DSRSQ_INPUT_CHECK(states.count(state), "results: status state must be pending|running|done|failed|interrupted, got '",
                    state, "'");
  const auto slash = name.find('/');
  const std::string kind = name.substr(0, slash), item = slash == std::string::npos ? "" : name.substr(slash + 1);
  const bool known = name == "train" || (kind == "eval" && contains(layout_.methods, item)) ||
                     (kind == "ablation" && contains(layout_.ablation_variants, item)) ||
                     (kind == "adaptation" && contains(layout_.adaptation_methods, item));
  DSRSQ_INPUT_CHECK(known, "results file '", path(), "': no status entry '", name,
                    "' in the run layout (use train, eval/<method>, ablation/<variant> or adaptation/<method>; "
                    "methods: ",
                    list(layout_.methods), "; variants: ", list(layout_.ablation_variants),
                    "; adaptation: ", list(layout_.adaptation_methods), ")");
  const auto g = file_->root().group("status/" + name);
  g.dataset("state").write_fixed_string(state);
  g.dataset("message").write_fixed_string(fit(message, kMessageChars));
  flush();
}

void ResultsFile::set_cell_status(const std::string& method, std::size_t cell, const std::string& state,
                                  const std::string& message) {
  DSRSQ_INPUT_CHECK(file_, "results: file is closed");
  static const std::set<std::string> states = {"pending", "running", "done", "failed", "interrupted"};
  DSRSQ_INPUT_CHECK(states.count(state), "results: cell state must be pending|running|done|failed|interrupted, got '",
                    state, "'");
  DSRSQ_INPUT_CHECK(contains(layout_.methods, method) && cell < layout_.cells.size(), "results file '", path(),
                    "': no cell ", cell, " of method '", method, "' in the run layout (methods: ", list(layout_.methods),
                    "; ", layout_.cells.size(), " cells)");
  const auto g = file_->root().group(cell_group(method, cell));
  g.dataset("state").write_fixed_string(state);
  g.dataset("message").write_fixed_string(fit(message, kMessageChars));
  flush();
}

void ResultsFile::set_cell_result(const std::string& method, std::size_t cell, const EvalSummary& s,
                                  const EfficiencyRecord& e) {
  DSRSQ_INPUT_CHECK(file_, "results: file is closed");
  DSRSQ_INPUT_CHECK(contains(layout_.methods, method) && cell < layout_.cells.size(), "results file '", path(),
                    "': no cell ", cell, " of method '", method, "' in the run layout");
  const auto g = file_->root().group(cell_group(method, cell));
  write_scalars(g.group("summary"), summary_fields(), s);
  write_scalars(g.group("efficiency"), efficiency_fields(), e);
  set_cell_status(method, cell, "done");
}

void ResultsFile::set_run_state(const std::string& state, const std::string& end_time, const std::string& message) {
  DSRSQ_INPUT_CHECK(file_, "results: file is closed");
  DSRSQ_INPUT_CHECK(state == "running" || state == "done" || state == "failed" || state == "interrupted",
                    "results: run state must be running|done|failed|interrupted, got '", state, "'");
  const auto g = file_->root().group("status");
  g.dataset("run_state").write_fixed_string(state);
  g.dataset("end_time").write_fixed_string(fit(end_time, kTimeChars));
  // Files made before run_message existed (schema 2 without it) keep only the state.
  if (g.exists("run_message")) g.dataset("run_message").write_fixed_string(fit(message, kMessageChars));
  flush();
}

void ResultsFile::flush() {
  DSRSQ_INPUT_CHECK(file_, "results: file is closed");
  file_->flush();
}

void ResultsFile::close() {
  if (!file_) return;
  tables_.clear();
  auto f = std::move(file_);
  f->close();
}

// ---- ResultsReader ---------------------------------------------------------

ResultsReader::ResultsReader(const std::string& path, bool swmr) : file_(path, h5::File::Mode::read, swmr) {
  check_format(file_.root(), path, /*writing=*/false);
}

ResultsReader::~ResultsReader() = default;

std::string ResultsReader::format_name() const { return root().attr_string("format"); }
std::int64_t ResultsReader::schema_version() const { return root().attr_int("schema_version"); }

RunLayout ResultsReader::layout() const { return layout_of(root()); }

namespace {
bool swmr_open(const h5::File& f) {
  unsigned intent = 0;
  H5Fget_intent(f.id(), &intent);
  return (intent & H5F_ACC_SWMR_READ) != 0;
}
}  // namespace

std::size_t ResultsReader::rows(const std::string& name) const {
  const bool rf = swmr_open(file_);
  const auto g = root().group(name);
  if (name == "train") return Table::open(g, train_fields(), rf).rows();
  if (name == "val") return Table::open(g, val_fields(), rf).rows();
  if (name == "ranks") return Table::open(g, rank_fields(), rf).rows();
  return Table::open(g, example_fields_of(root()), rf).rows();
}

std::vector<TrainRecord> ResultsReader::train() const {
  return Table::open(root().group("train"), train_fields(), swmr_open(file_)).read(train_fields());
}
std::vector<ValRecord> ResultsReader::val() const {
  return Table::open(root().group("val"), val_fields(), swmr_open(file_)).read(val_fields());
}
std::vector<RankRecord> ResultsReader::ranks() const {
  return Table::open(root().group("ranks"), rank_fields(), swmr_open(file_)).read(rank_fields());
}
std::vector<ExampleRecord> ResultsReader::examples(const std::string& group) const {
  const auto& fields = example_fields_of(root());
  return Table::open(root().group(group), fields, swmr_open(file_)).read(fields);
}

EvalSummary ResultsReader::summary(const std::string& group) const {
  EvalSummary s;
  read_scalars(root().group(group + "/summary"), summary_fields(), s, swmr_open(file_));
  return s;
}

EfficiencyRecord ResultsReader::efficiency(const std::string& group) const {
  EfficiencyRecord r;
  const std::string target = group.rfind("ablation/", 0) == 0 ? group + "/efficiency" : group;
  read_scalars(root().group(target), efficiency_fields(), r, swmr_open(file_));
  return r;
}

AdaptationRecord ResultsReader::adaptation(const std::string& method) const {
  AdaptationRecord r;
  const auto g = root().group("adaptation/" + method);
  const bool rf = swmr_open(file_);
  auto rd = [&](const char* n) {
    auto ds = g.dataset(n);
    if (rf) ds.refresh();
    return ds;
  };
  r.age_bin_edges = rd("age_bin_edges").read_all<double>();
  r.retention_by_age = rd("retention_by_age").read_all<double>();
  r.queries_per_bin = rd("queries_per_bin").read_all<std::int64_t>();
  read_scalars(g, adaptation_scalar_fields(), r, rf);
  return r;
}

Status ResultsReader::status(const std::string& name) const {
  const auto g = root().group("status/" + name);
  auto s = g.dataset("state"), m = g.dataset("message");
  if (swmr_open(file_)) s.refresh(), m.refresh();
  return {s.read_fixed_string(), m.read_fixed_string()};
}

Status ResultsReader::cell_status(const std::string& method, std::size_t cell) const {
  const auto g = root().group(cell_group(method, cell));
  auto s = g.dataset("state"), m = g.dataset("message");
  if (swmr_open(file_)) s.refresh(), m.refresh();
  return {s.read_fixed_string(), m.read_fixed_string()};
}

EvalSummary ResultsReader::cell_summary(const std::string& method, std::size_t cell) const {
  EvalSummary s;
  read_scalars(root().group(cell_group(method, cell) + "/summary"), summary_fields(), s, swmr_open(file_));
  return s;
}

EfficiencyRecord ResultsReader::cell_efficiency(const std::string& method, std::size_t cell) const {
  EfficiencyRecord r;
  read_scalars(root().group(cell_group(method, cell) + "/efficiency"), efficiency_fields(), r, swmr_open(file_));
  return r;
}

Status ResultsReader::run_state() const {
  const auto g = root().group("status");
  auto s = g.dataset("run_state"), t = g.dataset("end_time");
  if (swmr_open(file_)) s.refresh(), t.refresh();
  return {s.read_fixed_string(), t.read_fixed_string()};
}

std::map<std::string, std::string> ResultsReader::config_options() const {
  std::map<std::string, std::string> m;
  const auto g = root().group("config");
  for (const auto& k : g.attr_names()) m[k] = g.attr_string(k);
  return m;
}

std::string ResultsReader::config_text() const { return root().group("config").dataset("resolved").read_fixed_string(); }

}  // namespace dsrsq::results
