#pragma once
// Trainer: AdamW with warm-up + cosine decay, clipping, answer-only loss,
// validation loss, a short-to-long context curriculum, progress lines.
//
// Determinism: the batch of step s is a pure function of (seed, s): pool p is
// drawn among the pools unlocked at s (pool i unlocks at s = i/npools *
// curriculum * steps), then batch_size examples are drawn from it, all with
// Rng(seed, s). So a run resumed at step s sees exactly the batches the
// uninterrupted run saw; with fixed threads the arithmetic is bitwise equal.
// An epoch is as many sequences as the training set holds (--num_epochs sets
// steps = epochs * ceil(train / batch)).
#include <cstdint>
#include <functional>
#include <vector>

#include "core/rng.hpp"
#include "dist/communicator.hpp"
#include "model/transformer.hpp"
#include "train/encode.hpp"
#include "train/optimizer.hpp"

namespace dsrsq {

struct TrainConfig {
  std::int64_t steps = 100, batch_size = 8, warmup = 10;
  double lr = 1e-3, curriculum = 0.5;
  double lm_weight = 0.0;  // weight of the context/query LM term (answer tokens weigh 1)
  // Randomized positions (Ruoss et al. 2023): each training sequence, with
  // probability random_positions, gets sorted distinct position ids drawn
  // uniformly from [0, position_range) instead of 0..T-1, so short sequences
  // show the relative distances of long ones. Validation keeps 0..T-1.
  double random_positions = 0.0;
  std::int64_t position_range = 0;
  std::int64_t val_every = 50, log_every = 10;
  std::uint64_t seed = 0;
  // The sgemm rate measured once at start (progress line). On a shared machine
  // the start may be loaded and a step faster: the share can pass 100%.
  double peak_gflops = 0;
};

// loss: the optimised objective (answer tokens weigh 1, context/query tokens
// lm_weight); task_loss: mean loss over answer tokens only.
struct StepStats {
  std::int64_t step = 0, epoch = 0;
  double loss = 0, task_loss = 0, lr = 0, grad_norm = 0, step_time_s = 0, tokens_per_s = 0, gflops = 0;
  std::int64_t tokens = 0, answer_tokens = 0;  // over all dp ranks
  double comm_seconds = 0;                      // this rank's wait for gradient buckets
  // Extra loss terms of a method (DSRSQ's HOF; unweighted) and the selected fraction.
  double loss_retrieval = 0, loss_compression = 0, loss_compute = 0, selected_fraction = 0;
};

// A method with its own batch construction and extra loss terms (DSRSQ).
struct MethodHooks {
  // The (unsharded) batch of these sequences, padded to a multiple of
  // pad_multiple; training = false for validation. Null: make_batch.
  std::function<HostBatch(const std::vector<const Encoded*>&, std::int64_t step, float lm_weight,
                          std::int64_t pad_multiple, bool training)> make_batch;
  // After the backbone's backward and gradient reduction, before the optimizer:
  // extra terms and their gradients. answer_loss: per sequence of the batch,
  // its mean answer-token loss over the whole sequence. Fills st's extra fields
  // and may add to st.loss (the reported total).
  std::function<void(std::int64_t step, const HostBatch& local, const std::vector<double>& answer_loss, StepStats& st)>
      after_backward;
  // Right before every forward (training and validation) with the batch this
  // rank computes (e.g. to zero extra gradients and hand over per-token data).
  std::function<void(const HostBatch& local, bool training)> before_forward;
  // The extra parameters' optimizer step at the step's learning rate.
  std::function<void(double lr)> extra_step;
  double task_weight = 1.0;  // weight of the backbone's loss (HOF g1)
};

// Data parallelism: every rank draws the same global batch for step s and
// trains on its contiguous shard (batch_size / dp sequences). The loss is
// normalised by the GLOBAL loss-mask sum and gradients are summed by the
// reducer (src/dist/dp_reducer.hpp), so dp ranks compute the one-process
// update of the whole batch up to float reassociation.
//
// Sequence parallelism (sp > 1): the sp ranks of one replica share its shard of
// sequences; each holds the zigzag columns of every sequence (batches padded
// to a multiple of 2 sp), attention runs as ring attention (the model's
// attention_override), the loss is normalised by the mask sum over the whole
// world, and gradients are summed over the whole world (dp x sp).
// The communicators here carry host values only (the loss normaliser, losses,
// counters, validation sums); the device-resident gradients go through
// reduce_gradients (a GradReducer on a device communicator when the model
// lives on a device: app/experiment.cpp).
struct DataParallel {
  dist::Communicator* comm = nullptr;       // the dp communicator; null: one rank
  dist::Communicator* sp_comm = nullptr;    // the sp communicator; null: sp = 1
  dist::Communicator* world = nullptr;      // dp x sp (loss normaliser, statistics); null: comm
  std::function<void()> reduce_gradients;  // waits for the reducer's buckets (GradReducer::finish)
  std::function<double()> last_comm_seconds;
  int rank() const { return comm ? comm->rank() : 0; }
  int size() const { return comm ? comm->size() : 1; }
  int sp_rank() const { return sp_comm ? sp_comm->rank() : 0; }
  int sp_size() const { return sp_comm ? sp_comm->size() : 1; }
  dist::Communicator* all() const { return world ? world : comm; }
};

struct TrainCallbacks {
  std::function<void(const StepStats&)> on_step;
  std::function<void(std::int64_t step, double val_loss)> on_val;
  // Called after step `step` completed when a checkpoint is due (and at the end).
  std::function<void(std::int64_t step)> on_checkpoint;
  std::int64_t checkpoint_every = 0;
  // Polled at every step boundary; true stops training after a checkpoint.
  std::function<bool()> should_stop;
};

class Trainer {
 public:
  // pools: training sequences grouped by context length, shortest first.
  Trainer(TrainableModel& model, AdamW& opt, TrainConfig cfg, const std::vector<std::vector<Encoded>>& pools,
          const std::vector<Encoded>& val, std::int32_t pad_id, DataParallel dp = {}, MethodHooks hooks = {});

  // Runs steps [start_step, cfg.steps). Returns the last completed step + 1.
  std::int64_t run(std::int64_t start_step, const TrainCallbacks& cb);
  double validation_loss();
  // The sequences of step s (exposed for tests).
  std::vector<const Encoded*> batch_for_step(std::int64_t s) const;
  std::int64_t steps_per_epoch() const;

 private:
  TrainableModel& model_;
  AdamW& opt_;
  TrainConfig cfg_;
  const std::vector<std::vector<Encoded>>& pools_;
  const std::vector<Encoded>& val_;
  std::int32_t pad_;
  DataParallel dp_;
  MethodHooks hooks_;
  // The batch of these sequences this rank computes (its sp shard).
  HostBatch local_batch(const std::vector<const Encoded*>& seqs, float lm_weight, std::int64_t step, bool training) const;
};

// Sorted distinct positions, T of [0, range), uniform over such subsets
// (Floyd's sampling), from rng. Needs T <= range.
std::vector<std::int32_t> sample_positions(std::int64_t T, std::int64_t range, Rng& rng);
// Replaces, with probability p per row (all from Rng(seed, step)), the row's
// positions by sample_positions(T, range): padding columns included, so they
// stay after the row's real tokens and the causal mask keeps them unseen.
void randomize_positions(HostBatch& hb, double p, std::int64_t range, std::uint64_t seed, std::int64_t step);

// sgemm GFLOP/s of this machine now (square 1024 products, best of 3), for
// the progress line's "of peak" figure.
double measure_sgemm_peak();

}  // namespace dsrsq
