#pragma once
// The per-run results file (DESIGN.md section 6; layout documented in
// results/README.md). Rank 0 creates the whole tree at start, switches the
// file to SWMR, then only appends rows and overwrites pre-created values, so
// h5py can follow a live run and a killed run leaves a readable file.
//
// Strings: HDF5 1.10 keeps variable-length data in the global heap, which
// SWMR's flush ordering does not cover, so per-row strings are stored as a
// uint8 byte stream `<col>_bytes` plus an int64 `<col>_end` column (exclusive
// end offset of each row's bytes). Overwritten scalars (status, end time) are
// fixed-length NUL-padded strings; a value too long ends in "...[truncated]".
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "io/h5.hpp"

namespace dsrsq::results {

inline constexpr const char* kFormatName = "dsrsq-results";
// 2: /efficiency/<m>/process_peak_rss_bytes (was peak_rss_bytes) and
// context_tokens_per_s; root attrs method_order, ablation_order, protocol;
// /eval/<m> attr backbone; meta "kv_infeasible".
// 3: evaluation cells (context size x KV budget): root group /cells, the row
// column `cell`, /eval/<m>/cells/<k>/ (state, message, summary/, efficiency/),
// and the efficiency numerators tokens_run, context_tokens_served, serve_s,
// decode_examples (so cells merge exactly). Readers take 2 and 3 (a 2 file is
// one run of one budget; its rows have no `cell`); writing (resume) needs 3.
inline constexpr std::int64_t kSchemaVersion = 3;
inline constexpr std::int64_t kOldestReadableSchema = 2;
// Gold answers of one example are joined with this byte (ASCII unit
// separator) into the `gold` string column; it may not occur in an answer.
inline constexpr char kGoldSeparator = '\x1f';
inline constexpr std::size_t kStateChars = 16;     // status state strings
inline constexpr std::size_t kMessageChars = 2048;  // status messages
inline constexpr std::size_t kTimeChars = 64;       // end_time (ISO 8601)
inline constexpr const char* kTruncatedMark = "...[truncated]";

// One evaluation cell: every method is evaluated on the test examples of one
// context size at one KV budget. Cell k is row k of /cells.
struct Cell {
  std::int64_t context_size = 0;  // the test examples generated at this size (meta context_size)
  std::string kv_budget;          // the --kv_budget entry as given ("0.25", "64KiB")
  double kv_budget_fraction = 0;  // the fraction of each example's full cache, NaN for a byte budget
  std::int64_t kv_budget_bytes = -1;  // the byte budget, -1 for a fraction
  bool operator==(const Cell&) const = default;
};

// Everything known from the resolved config when the run starts.
struct RunLayout {
  std::vector<std::string> methods;             // /eval/<m>, /efficiency/<m>; in report order (root attr method_order)
  // Per method: the weights it ran on (attr "backbone" of /eval/<m>), e.g.
  // "standard checkpoint results/standard_needle/ckpt_1800.h5" or "this run's dsrsq model".
  std::map<std::string, std::string> backbones;
  std::string protocol = "query_aware";         // root attr protocol: how the question reaches a method
  std::vector<std::string> ablation_variants;   // /ablation/<v>
  std::vector<std::string> adaptation_methods;  // /adaptation/<m>
  int world_size = 1;
  int dp = 1, sp = 1;
  int retention_bins = 8;  // /adaptation/<m>/retention_by_age length
  // Evaluation cells, in row order of every /eval/<m> (context size major,
  // budget minor); empty: no cell groups (rows carry cell 0).
  std::vector<Cell> cells;
};

struct Provenance {  // root attributes
  std::vector<std::pair<std::string, std::string>> strings;
  std::vector<std::pair<std::string, std::int64_t>> integers;
  std::vector<std::pair<std::string, double>> numbers;
};

struct ConfigRecord {
  std::vector<std::pair<std::string, std::string>> options;  // -> /config attributes
  std::string resolved_text;                                 // -> /config/resolved (fixed-length string)
};

struct TrainRecord {
  std::int64_t step = 0, epoch = 0;
  double loss_total = 0, loss_task = 0, loss_retrieval = 0, loss_compression = 0, loss_compute = 0;
  double selected_fraction = 0, lr = 0, grad_norm = 0, tokens_per_s = 0, step_time_s = 0;
  bool operator==(const TrainRecord&) const = default;
};

struct ValRecord {
  std::int64_t step = 0;
  double loss = 0;
  bool operator==(const ValRecord&) const = default;
};

struct ExampleRecord {
  std::string id, task, prediction;
  std::vector<std::string> golds;
  double f1 = 0, em = 0, rouge_l = 0, bleu = 0;
  std::int64_t context_tokens = 0, attended_tokens = 0;
  double ttft_s = 0, itl_s = 0;
  std::int64_t kv_budget_requested_bytes = 0, kv_budget_achieved_bytes = 0, kv_resident_bytes = 0,
               kv_peak_prefill_bytes = 0, kv_read_per_step_bytes = 0, kv_total_bytes = 0;
  std::string meta;  // JSON text
  std::int64_t cell = 0;  // index into /cells (schema 3; 0 when read from a schema 2 file)
  bool operator==(const ExampleRecord&) const = default;
};

// Pre-created as NaN / -1 ("not set yet").
struct EvalSummary {
  double f1_mean = 0, em_mean = 0, rouge_l_mean = 0, bleu_mean = 0, corpus_bleu = 0;
  std::int64_t n_examples = 0;
  bool operator==(const EvalSummary&) const = default;
};

// Column meanings: eval/evaluator.hpp (MethodEval) and results/README.md.
struct EfficiencyRecord {
  std::int64_t peak_mem_bytes = 0, avg_mem_bytes = 0;
  std::int64_t process_peak_rss_bytes = 0;  // scope: process lifetime (attribute "scope" says so)
  double throughput_tok_s = 0, context_tokens_per_s = 0, latency_s = 0, itl_s = 0, token_efficiency = 0, flops = 0;
  // The numerators and denominators above, so cells (or runs) merge exactly:
  // throughput = tokens_run / serve_s, context_tokens_per_s = context_tokens_served /
  // serve_s, token_efficiency is a mean over decode_examples examples (schema 3;
  // NaN / -1 when read from a schema 2 file).
  double tokens_run = 0, context_tokens_served = 0, serve_s = 0;
  std::int64_t decode_examples = 0;
  bool operator==(const EfficiencyRecord&) const = default;
};

struct AdaptationRecord {
  std::vector<double> age_bin_edges;     // retention_bins + 1 edges, tokens since the fact was stated
  std::vector<double> retention_by_age;  // retention_bins accuracies in [0, 1] (NaN: empty bin)
  std::vector<std::int64_t> queries_per_bin;  // retention_bins counts
  double retention_auc = 0, temporal_consistency = 0, adaptation_speed = 0;
  std::int64_t n_queries = 0;
  bool operator==(const AdaptationRecord&) const = default;
};

struct RankRecord {
  std::int64_t step = 0, rank = 0;
  double step_time_s = 0, comm_time_s = 0;
  std::int64_t bytes_sent = 0;
  bool operator==(const RankRecord&) const = default;
};

struct Status {
  std::string state, message;
};

class Table;  // one group of equal-length 1-D columns (results.cpp)

// Writer. Not thread-safe; rank 0 only.
class ResultsFile {
 public:
  // Create `path` (must not exist) with the whole tree, then start SWMR.
  static ResultsFile create(const std::string& path, const RunLayout& layout, const Provenance& provenance,
                            const ConfigRecord& config, std::int64_t schema_version = kSchemaVersion);
  // Reopen an existing results file to go on appending (resume). Rows of
  // /train, /val and /ranks with step > keep_through_step are dropped first
  // (they are redone from the checkpoint); pass -1 to keep everything.
  // Clears the flags a killed SWMR writer left, then starts SWMR.
  // layout (optional): the resuming run's dp x sp; when it differs from the
  // file's, the root's world_size/dp/sp become the new ones and the change is
  // appended to the root attribute layout_history ("step S: dp a sp b -> dp c sp d").
  // update (optional): root attributes this attempt changes (Slurm job id and
  // restart count of a requeued job), overwritten before SWMR writing starts.
  static ResultsFile resume(const std::string& path, std::int64_t keep_through_step = -1,
                            const RunLayout* layout = nullptr, const Provenance* update = nullptr);

  ResultsFile(ResultsFile&&) noexcept;
  ResultsFile& operator=(ResultsFile&&) noexcept;
  ~ResultsFile();

  const RunLayout& layout() const { return layout_; }
  const std::string& path() const { return file_->path(); }

  // Every appender / setter flushes before returning, so a SWMR reader sees it.
  void append_train(const TrainRecord& r) { append_train(std::span<const TrainRecord>(&r, 1)); }
  void append_train(std::span<const TrainRecord> rows);
  void append_val(const ValRecord& r);
  // group: "eval/<method>" or "ablation/<variant>".
  void append_example(const std::string& group, const ExampleRecord& r) {
    append_examples(group, std::span<const ExampleRecord>(&r, 1));
  }
  void append_examples(const std::string& group, std::span<const ExampleRecord> rows);
  void set_summary(const std::string& group, const EvalSummary& s);
  // group: "efficiency/<method>" or "ablation/<variant>".
  void set_efficiency(const std::string& group, const EfficiencyRecord& r);
  void set_adaptation(const std::string& method, const AdaptationRecord& r);
  // One cell of an evaluated method (/eval/<method>/cells/<cell>): its state
  // (pending | running | done | failed), and once done its summary and efficiency.
  void set_cell_status(const std::string& method, std::size_t cell, const std::string& state,
                       const std::string& message = "");
  void set_cell_result(const std::string& method, std::size_t cell, const EvalSummary& s, const EfficiencyRecord& e);
  void append_rank(const RankRecord& r) { append_ranks(std::span<const RankRecord>(&r, 1)); }
  void append_ranks(std::span<const RankRecord> rows);
  // name: "train", "eval/<method>", "ablation/<variant>" or "adaptation/<method>";
  // state: pending | running | done | failed.
  void set_status(const std::string& name, const std::string& state, const std::string& message = "");
  // state: running | done | failed; end_time: ISO 8601 text (empty while running).
  // message: why the run failed (/status/run_message; "" otherwise).
  void set_run_state(const std::string& state, const std::string& end_time = "", const std::string& message = "");
  void flush();
  void close();  // flush and close; also done by the destructor (errors there are swallowed)

 private:
  ResultsFile();
  void build(const Provenance& provenance, const ConfigRecord& config, std::int64_t schema_version);
  void open_tables();
  Table& table(const std::string& key);

  std::unique_ptr<h5::File> file_;
  RunLayout layout_;
  std::map<std::string, std::unique_ptr<Table>> tables_;
};

// Reader (tests, analysis in C++). swmr = open for SWMR reading while a
// writer may still be appending: every read then refreshes the datasets it
// touches (H5Drefresh), so each call sees the writer's latest flush.
class ResultsReader {
 public:
  explicit ResultsReader(const std::string& path, bool swmr = false);
  ~ResultsReader();

  std::string format_name() const;
  std::int64_t schema_version() const;
  RunLayout layout() const;
  const h5::Group& root() const { return file_.root(); }

  // Complete rows visible now (min over the table's columns). table: "train",
  // "val", "ranks", "eval/<m>", "ablation/<v>".
  std::size_t rows(const std::string& table) const;
  std::vector<TrainRecord> train() const;
  std::vector<ValRecord> val() const;
  std::vector<RankRecord> ranks() const;
  std::vector<ExampleRecord> examples(const std::string& group) const;
  EvalSummary summary(const std::string& group) const;
  EfficiencyRecord efficiency(const std::string& group) const;
  AdaptationRecord adaptation(const std::string& method) const;
  Status status(const std::string& name) const;
  // Cells (schema 3): /eval/<method>/cells/<cell>.
  Status cell_status(const std::string& method, std::size_t cell) const;
  EvalSummary cell_summary(const std::string& method, std::size_t cell) const;
  EfficiencyRecord cell_efficiency(const std::string& method, std::size_t cell) const;
  Status run_state() const;  // {state, end_time}
  std::map<std::string, std::string> config_options() const;
  std::string config_text() const;

 private:
  h5::File file_;
};

}  // namespace dsrsq::results
