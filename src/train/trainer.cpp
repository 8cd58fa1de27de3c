#include "train/trainer.hpp"


#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "core/rng.hpp"
#include "dist/dp_reducer.hpp"
#include "dist/ring_attention.hpp"
#include "core/timer.hpp"

namespace dsrsq {

Trainer::Trainer(TrainableModel& model, AdamW& opt, TrainConfig cfg, const std::vector<std::vector<Encoded>>& pools,
                 const std::vector<Encoded>& val, std::int32_t pad_id, DataParallel dp, MethodHooks hooks)
    : model_(model), opt_(opt), cfg_(cfg), pools_(pools), val_(val), pad_(pad_id), dp_(std::move(dp)),
      hooks_(std::move(hooks)) {
  DSRSQ_INPUT_CHECK(cfg_.batch_size % dp_.size() == 0, "option --batch_size ", cfg_.batch_size,
                    " must be divisible by --dp ", dp_.size(), " (each rank takes an equal shard)");
  DSRSQ_INPUT_CHECK(!pools_.empty(), "trainer: no training data");
  DSRSQ_INPUT_CHECK(cfg_.random_positions >= 0 && cfg_.random_positions <= 1,
                    "option --random_positions: must lie in [0, 1], got ", cfg_.random_positions);
  if (cfg_.random_positions > 0) {
    std::int64_t longest = 0;
    for (const auto& p : pools_)
      for (const auto& e : p) longest = std::max<std::int64_t>(longest, static_cast<std::int64_t>(e.tokens.size()));
    // position_range <= max_pos is checked where the model's shape is known (experiment.cpp).
    DSRSQ_INPUT_CHECK(cfg_.position_range >= longest, "option --position_range: ", cfg_.position_range,
                      " positions cannot hold a training sequence of ", longest, " tokens");
  }
  for (const auto& p : pools_) DSRSQ_INPUT_CHECK(!p.empty(), "trainer: an empty training pool");
}

std::int64_t Trainer::steps_per_epoch() const {
  std::int64_t n = 0;
  for (const auto& p : pools_) n += static_cast<std::int64_t>(p.size());
  return (n + cfg_.batch_size - 1) / cfg_.batch_size;
}

std::vector<const Encoded*> Trainer::batch_for_step(std::int64_t s) const {
  Rng rng(cfg_.seed, 0x7A11 + static_cast<std::uint64_t>(s));
  const std::int64_t np = static_cast<std::int64_t>(pools_.size());
  std::int64_t unlocked = np - 1;
  const double phase = cfg_.curriculum * static_cast<double>(cfg_.steps);
  if (phase > 0) unlocked = std::min<std::int64_t>(np - 1, static_cast<std::int64_t>(static_cast<double>(s) / phase * static_cast<double>(np)));
  const auto& pool = pools_[static_cast<std::size_t>(rng.below(static_cast<std::uint64_t>(unlocked + 1)))];
  std::vector<const Encoded*> out;
  out.reserve(static_cast<std::size_t>(cfg_.batch_size));
  for (std::int64_t i = 0; i < cfg_.batch_size; ++i)
    out.push_back(&pool[static_cast<std::size_t>(rng.below(pool.size()))]);
  return out;
}

HostBatch Trainer::local_batch(const std::vector<const Encoded*>& seqs, float lm_weight, std::int64_t step,
                               bool training) const {
  // Sequence parallelism needs T divisible by 2 sp; without it no padding (a
  // different row count changes BLAS blocking and so the float rounding).
  const int P = dp_.sp_size();
  const std::int64_t multiple = P > 1 ? 2 * P : 1;
  HostBatch hb = hooks_.make_batch ? hooks_.make_batch(seqs, step, lm_weight, multiple, training)
                                   : make_batch(seqs, pad_, lm_weight, multiple);
  if (training && cfg_.random_positions > 0)
    randomize_positions(hb, cfg_.random_positions, cfg_.position_range, cfg_.seed, step);
  if (P == 1) return hb;
  return shard_batch(hb, dist::zigzag_shard(hb.T, P, dp_.sp_rank()));
}

double Trainer::validation_loss() {
  if (val_.empty()) return std::nan("");
  double total = 0, count = 0;
  for (std::size_t i = 0; i < val_.size(); i += static_cast<std::size_t>(cfg_.batch_size)) {
    std::vector<const Encoded*> seqs;
    for (std::size_t j = i; j < std::min(val_.size(), i + static_cast<std::size_t>(cfg_.batch_size)); ++j)
      seqs.push_back(&val_[j]);
    HostBatch hb = local_batch(seqs, 0.0f, 0, false);
    if (hooks_.before_forward) hooks_.before_forward(hb, false);
    // inv_norm 1: the sum of answer-token losses; averaged over all of them below.
    total += model_.forward(hb.view(), 1.0);
    count += static_cast<double>(hb.answer_tokens);
  }
  if (dp_.sp_comm) {  // every sp rank holds a shard of each sequence
    double tc[2] = {total, count};
    dp_.sp_comm->all_reduce_sum(std::span<double>(tc, 2));
    total = tc[0];
    count = tc[1];
  }
  return count > 0 ? total / count : std::nan("");
}

std::int64_t Trainer::run(std::int64_t start_step, const TrainCallbacks& cb) {
  // Test hook (tests only): the loss of this 1-based step reads as NaN.
  const char* nan_env = std::getenv("DSRSQ_TEST_NAN_AT_STEP");
  const std::int64_t nan_step = nan_env ? std::atoll(nan_env) : -1;
  Timer wall;
  double ema_dt = 0;
  std::int64_t s = start_step;
  for (; s < cfg_.steps; ++s) {
    if (cb.should_stop && cb.should_stop()) break;
    Timer t;
    auto seqs = batch_for_step(s);
    if (dp_.comm) {  // this rank's contiguous shard of the global batch
      const std::size_t per = seqs.size() / static_cast<std::size_t>(dp_.size());
      seqs = std::vector<const Encoded*>(seqs.begin() + static_cast<std::ptrdiff_t>(per * dp_.rank()),
                                         seqs.begin() + static_cast<std::ptrdiff_t>(per * (dp_.rank() + 1)));
    }
    HostBatch hb = local_batch(seqs, static_cast<float>(cfg_.lm_weight), s, true);
    const double lr = lr_schedule(s, cfg_.steps, cfg_.warmup, cfg_.lr);
    model_.zero_grad();
    const double inv_norm = dp_.all() ? dist::global_inv_norm(*dp_.all(), hb.mask) : 0.0;
    if (hooks_.before_forward) hooks_.before_forward(hb, true);
    double loss = model_.forward(hb.view(), inv_norm);
    model_.backward(hooks_.task_weight);
    if (dp_.reduce_gradients) dp_.reduce_gradients();
    StepStats extra;
    if (hooks_.after_backward) {
      // Per sequence: mean answer-token loss over all sp shards of it.
      std::vector<double> sums(static_cast<std::size_t>(2 * hb.B), 0.0);
      const std::vector<float> rl = model_.host_row_losses();
      for (std::int64_t b = 0; b < hb.B; ++b)
        for (std::int64_t t = 0; t < hb.T; ++t)
          if (hb.is_answer[static_cast<std::size_t>(b * hb.T + t)]) {
            sums[static_cast<std::size_t>(2 * b)] += rl[b * hb.T + t];
            sums[static_cast<std::size_t>(2 * b + 1)] += 1;
          }
      if (dp_.sp_comm) dp_.sp_comm->all_reduce_sum(std::span<double>(sums));
      std::vector<double> answer_loss(static_cast<std::size_t>(hb.B));
      for (std::int64_t b = 0; b < hb.B; ++b)
        answer_loss[static_cast<std::size_t>(b)] =
            sums[static_cast<std::size_t>(2 * b + 1)] > 0 ? sums[static_cast<std::size_t>(2 * b)] / sums[static_cast<std::size_t>(2 * b + 1)] : 0.0;
      hooks_.after_backward(s, hb, answer_loss, extra);
    }
    const double norm = opt_.step(lr);
    if (hooks_.extra_step) hooks_.extra_step(lr);
    const double dt = t.seconds();
    ema_dt = ema_dt == 0 ? dt : 0.9 * ema_dt + 0.1 * dt;
    StepStats st = extra;
    st.step = s;
    st.epoch = s / std::max<std::int64_t>(1, steps_per_epoch());
    {
      const std::vector<float> rl = model_.host_row_losses();
      double local[4] = {loss, 0.0, static_cast<double>(hb.answer_tokens), static_cast<double>(hb.B * hb.T)};
      for (std::size_t i = 0; i < hb.is_answer.size(); ++i)
        if (hb.is_answer[i]) local[1] += rl[i];
      if (dp_.all()) dp_.all()->all_reduce_sum(std::span<double>(local, 4));  // ranks' losses add up to the global one
      loss = local[0] * hooks_.task_weight + extra.loss;  // extra.loss: the method's weighted extra terms
      st.loss = loss;
      st.task_loss = local[2] > 0 ? local[1] / local[2] : 0.0;
      st.answer_tokens = static_cast<std::int64_t>(local[2]);
      st.tokens = static_cast<std::int64_t>(local[3]);
    }
    if (s + 1 == nan_step) st.loss = loss = std::nan("");
    // A non-finite loss or gradient norm poisons the parameters (the update
    // is already applied): stop before anything records or checkpoints it.
    // Every rank sees the same all-reduced values, so all stop together.
    if (!std::isfinite(loss) || !std::isfinite(norm))
      raise_input_error(detail::cat("training diverged at step ", s + 1, ": ", std::isfinite(loss) ? "" : "non-finite ",
                                    "loss ", loss, ", ", std::isfinite(norm) ? "" : "non-finite ", "gradient norm ",
                                    norm, " (lr ", lr, "); no checkpoint was written from this state (try a lower "
                                    "--learning_rate, a longer --warmup or --clip_norm)"));
    st.comm_seconds = dp_.last_comm_seconds ? dp_.last_comm_seconds() : 0.0;
    st.lr = lr;
    st.grad_norm = norm;
    st.step_time_s = dt;
    st.tokens_per_s = static_cast<double>(st.tokens) / dt;
    st.gflops = model_.train_flops(hb.B, hb.T * dp_.sp_size()) * dp_.size() / dt / 1e9;
    if (cb.on_step) cb.on_step(st);
    if (dp_.rank() == 0 && ((s + 1) % cfg_.log_every == 0 || s + 1 == cfg_.steps)) {
      const double eta = ema_dt * static_cast<double>(cfg_.steps - s - 1);
      char comm[48] = "";
      if (dp_.all()) std::snprintf(comm, sizeof comm, " (compute %.1f + comm %.1f)", (dt - st.comm_seconds) * 1e3, st.comm_seconds * 1e3);
      std::printf("step %5lld/%lld | loss %.4f (answer %.4f) | lr %.2e | norm %.3f | %6.1f ms%s | %7.0f tok/s | %5.1f GFLOP/s (%4.1f%% of the start's sgemm %.0f) | ETA %.0f s\n",
                  static_cast<long long>(s + 1), static_cast<long long>(cfg_.steps), loss, st.task_loss, lr, norm, dt * 1e3,
                  comm, st.tokens_per_s, st.gflops, cfg_.peak_gflops > 0 ? 100.0 * st.gflops / cfg_.peak_gflops : 0.0,
                  cfg_.peak_gflops, eta);
      std::fflush(stdout);
    }
    if (cfg_.val_every > 0 && ((s + 1) % cfg_.val_every == 0 || s + 1 == cfg_.steps) && !val_.empty()) {
      const double vl = validation_loss();  // every rank, on the whole validation set: identical
      if (dp_.rank() == 0) {
        std::printf("step %5lld/%lld | validation loss %.4f\n", static_cast<long long>(s + 1),
                    static_cast<long long>(cfg_.steps), vl);
        std::fflush(stdout);  // a log read while the run goes on shows it at once
      }
      if (cb.on_val) cb.on_val(s + 1, vl);
    }
    if (cb.on_checkpoint && cb.checkpoint_every > 0 && (s + 1) % cb.checkpoint_every == 0 && s + 1 < cfg_.steps)
      cb.on_checkpoint(s + 1);
  }
  if (cb.on_checkpoint) cb.on_checkpoint(s);
  return s;
}

std::vector<std::int32_t> sample_positions(std::int64_t T, std::int64_t range, Rng& rng) {
  DSRSQ_REQUIRE(T >= 0 && T <= range, "sample_positions: ", T, " positions out of ", range);
  // Floyd: for j in [range - T, range) add a uniform draw of [0, j], or j if
  // it was drawn; every T-subset is equally likely.
  std::vector<std::int32_t> out;
  out.reserve(static_cast<std::size_t>(T));
  std::vector<std::uint8_t> taken;
  const bool dense = range <= 64 * T + 4096;  // a bitmap when it is small, else a sorted probe
  if (dense) taken.assign(static_cast<std::size_t>(range), 0);
  std::vector<std::int32_t> sorted;
  for (std::int64_t j = range - T; j < range; ++j) {
    auto v = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(j) + 1));
    bool hit;
    if (dense) {
      hit = taken[static_cast<std::size_t>(v)] != 0;
    } else {
      hit = std::binary_search(sorted.begin(), sorted.end(), v);
    }
    if (hit) v = static_cast<std::int32_t>(j);
    if (dense) taken[static_cast<std::size_t>(v)] = 1;
    else sorted.insert(std::upper_bound(sorted.begin(), sorted.end(), v), v);
    out.push_back(v);
  }
  std::sort(out.begin(), out.end());
  return out;
}

void randomize_positions(HostBatch& hb, double p, std::int64_t range, std::uint64_t seed, std::int64_t step) {
  Rng rng(seed ^ 0x706F736974696F6Eull, static_cast<std::uint64_t>(step));  // "position": not the batch stream
  for (std::int64_t b = 0; b < hb.B; ++b) {
    if (rng.uniform() >= p) continue;
    const auto pos = sample_positions(hb.T, range, rng);
    std::copy(pos.begin(), pos.end(), hb.pos.begin() + b * hb.T);
  }
}

double measure_sgemm_peak() {
  // One warm-up product, then the best of three: the best is the fairest
  // estimate of the peak when the other core is intermittently busy.
  const int n = 1536;
  std::vector<float> a(static_cast<std::size_t>(n) * n, 0.5f), b(a.size(), 0.25f), c(a.size());
  double best = 0;
  // Not the run's work: the FLOP meter is put back afterwards, so every
  // backend's meter starts the run from the same value (a sim run and a CPU
  // run then meter bit-identical FLOPs, non-integer costs included).
  Backend& cpu = cpu_backend();
  const double meter = cpu.flops_counted();
  for (int r = 0; r < 4; ++r) {
    Timer t;
    cpu.matmul_fwd(MatmulArgs{TensorView(a.data(), Shape{n, n}), TensorView(b.data(), Shape{n, n}),
                              TensorView(c.data(), Shape{n, n}), TensorView()});
    if (r > 0) best = std::max(best, 2.0 * n * static_cast<double>(n) * n / t.seconds() / 1e9);
  }
  cpu.reset_flops();
  cpu.count_flops(meter);
  return best;
}

}  // namespace dsrsq
