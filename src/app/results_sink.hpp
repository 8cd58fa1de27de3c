#pragma once
// Everything the experiment records: run directory and identity, the HDF5
// results file (rank 0), checkpoints and resume, stop requests. One object so
// the driver reads as the protocol it runs.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "app/options.hpp"
#include "data/tokenizer.hpp"
#include "model/transformer.hpp"
#include "eval/evaluator.hpp"
#include "io/results.hpp"
#include "train/trainer.hpp"
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
  // backbones: per evaluated method, the weights it runs on (/eval/<m> attr).
  // cells: the evaluation cells (eval context size x KV budget), /cells.
  void open(const std::string& dataset_hash, const std::map<std::string, std::string>& backbones = {},
            const std::vector<results::Cell>& cells = {});
  const std::string& path() const;  // the results file
  // Loads the newest checkpoint of this run, if any; returns the step to start from.
  // extra (may be null) receives the checkpoint's extra arrays (DSRSQ state).
  std::int64_t restore(TrainableModel& model, AdamW& opt, std::map<std::string, std::vector<float>>* extra = nullptr);

  void train_step(const StepStats& s);
  void val(std::int64_t step, double loss);
  // extra: arrays stored beside the model (DSRSQ's retriever, projections, their optimizer).
  void checkpoint(std::int64_t step, TrainableModel& model, AdamW& opt,
                  const std::map<std::string, std::vector<float>>& extra = {});
  bool should_stop();
  // Per-rank timings of one step, gathered: (step_time_s, comm_time_s, bytes) per world rank.
  void rank_step(std::int64_t step, const std::vector<double>& per_rank);
  void interrupted(std::int64_t step);
  // A stop signal arrived during evaluation: the run is "interrupted" (rerun evaluates what is left).
  void interrupted_eval();

  // True when a resumed run already holds this method's finished results
  // (its rows are kept; evaluating it again would duplicate them).
  // kind: "eval" (/eval/<method>) or "ablation" (/ablation/<variant>; r.method names the variant).
  bool method_done_before(const std::string& method, const std::string& kind = "eval") const;
  void method_started(const std::string& method, const std::string& kind = "eval");
  // One cell of a method: its rows (tagged with the cell) and, for kind
  // "eval", the cell's state, summary and efficiency (/eval/<m>/cells/<cell>).
  void cell_started(const std::string& method, const std::string& kind, std::size_t cell);
  void cell_done(const MethodEval& r, const std::string& kind, std::size_t cell);
  void cell_failed(const std::string& method, const std::string& kind, std::size_t cell, const std::string& message);
  // The method over all its cells (rows already written by cell_done): summary,
  // efficiency, adaptation and status "done".
  void method_done(const MethodEval& r, const std::string& kind = "eval");
  void method_failed(const std::string& method, const std::string& message, const std::string& kind = "eval");
  void finish();
  // A fatal error after the run directory exists: the run (and training, if
  // it was running) become "failed" with the message; never throws. False
  // when there was no results file open to record it in (e.g. a refused resume).
  bool failed(const std::string& message);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsrsq
