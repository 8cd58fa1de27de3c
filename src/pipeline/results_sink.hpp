#pragma once
// Everything the experiment records: run directory and identity, the HDF5
// results file (rank 0), checkpoints and resume, stop requests. One object so
// the driver reads as the protocol it runs.
#include <memory>
#include <string>
#include <vector>

#include "cli/options.hpp"
#include "data/tokenizer.hpp"
#include "model/transformer.hpp"
#include "pipeline/evaluator.hpp"
#include "pipeline/trainer.hpp"
#include "train/optimizer.hpp"

namespace dsrsq {

class ResultsSink {
 public:
  ResultsSink(const Options& opt, const ModelConfig& mc, const Tokenizer& tok, int rank);
  ~ResultsSink();
  ResultsSink(const ResultsSink&) = delete;
  ResultsSink& operator=(const ResultsSink&) = delete;

  bool skip() const;               // the same configuration already finished
  // Creates the results file (or reopens it to resume) once the data is known.
  void open(const std::string& dataset_hash);
  const std::string& path() const;  // the results file
  // Loads the newest checkpoint of this run, if any; returns the step to start from.
  std::int64_t restore(Transformer& model, AdamW& opt);

  void train_step(const StepStats& s);
  void val(std::int64_t step, double loss);
  void checkpoint(std::int64_t step, Transformer& model, AdamW& opt);
  bool should_stop();
  // Per-rank timings of one step, gathered: (step_time_s, comm_time_s, bytes) per world rank.
  void rank_step(std::int64_t step, const std::vector<double>& per_rank);
  void interrupted(std::int64_t step);

  // True when a resumed run already holds this method's finished results
  // (its rows are kept; evaluating it again would duplicate them).
  bool method_done_before(const std::string& method) const;
  void method_started(const std::string& method);
  void method_done(const MethodEval& r);
  void method_failed(const std::string& method, const std::string& message);
  void finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsrsq
