// dsrsq main (engine stage): trains the debug-size model on a built-in toy
// associative-recall task and prints the loss falling. The full pipeline
// (tasks from real text, evaluation, HDF5 results) replaces this toy.
#include <mpi.h>
#include <omp.h>

#include <cstdio>
#include <vector>

#include "core/rng.hpp"
#include "core/timer.hpp"
#include "dsrsq/build_info.hpp"
#include "model/transformer.hpp"
#include "train/optimizer.hpp"

namespace {

// Sequence: k1 v1 k2 v2 ... kP vP SEP kq -> predict vq. Keys in [0,16), values in [16,32).
void make_batch(dsrsq::Rng& rng, int B, int pairs, std::vector<std::int32_t>& tok, std::vector<std::int32_t>& pos,
                std::vector<std::int32_t>& tgt, std::vector<float>& mask) {
  const int T = 2 * pairs + 2;
  tok.assign(static_cast<std::size_t>(B * T), 0);
  pos.assign(tok.size(), 0);
  tgt.assign(tok.size(), 0);
  mask.assign(tok.size(), 0.0f);
  for (int b = 0; b < B; ++b) {
    std::vector<int> keys;
    while (static_cast<int>(keys.size()) < pairs) {
      const int k = static_cast<int>(rng.below(16));
      bool dup = false;
      for (int x : keys) dup = dup || x == k;
      if (!dup) keys.push_back(k);
    }
    std::vector<int> vals;
    for (int i = 0; i < pairs; ++i) vals.push_back(16 + static_cast<int>(rng.below(16)));
    const int q = static_cast<int>(rng.below(static_cast<std::uint64_t>(pairs)));
    std::int32_t* t = tok.data() + b * T;
    for (int i = 0; i < pairs; ++i) {
      t[2 * i] = keys[static_cast<std::size_t>(i)];
      t[2 * i + 1] = vals[static_cast<std::size_t>(i)];
    }
    t[2 * pairs] = 32;
    t[2 * pairs + 1] = keys[static_cast<std::size_t>(q)];
    for (int i = 0; i < T; ++i) pos[static_cast<std::size_t>(b * T + i)] = i;
    tgt[static_cast<std::size_t>(b * T + T - 1)] = vals[static_cast<std::size_t>(q)];
    mask[static_cast<std::size_t>(b * T + T - 1)] = 1.0f;
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 0;
  try {
    dsrsq::ModelConfig cfg;
    cfg.vocab = 33;
    cfg.d_model = 64;
    cfg.n_heads = 4;
    cfg.n_layers = 2;
    cfg.d_ff = 256;
    cfg.max_pos = 64;
    const int B = 32, pairs = 3, steps = 600;
    std::printf("dsrsq %s (%s): toy associative recall, %d pairs, model %s, %d threads\n", dsrsq::build::version,
                dsrsq::build::git_sha, pairs, cfg.str().c_str(), omp_get_max_threads());
    dsrsq::Transformer model(cfg, dsrsq::cpu_backend());
    model.init_weights(42);
    dsrsq::AdamW opt(model.params(), model.flat_params(), dsrsq::AdamWConfig{3e-3, 0.9, 0.99, 1e-8, 0.01, 1.0},
                     dsrsq::cpu_backend());
    dsrsq::Rng rng(1);
    std::vector<std::int32_t> tok, pos, tgt;
    std::vector<float> mask;
    const dsrsq::Shape s{B, 2 * pairs + 2};
    dsrsq::Timer timer;
    double avg = 0;
    for (int step = 0; step < steps; ++step) {
      make_batch(rng, B, pairs, tok, pos, tgt, mask);
      dsrsq::Batch batch{dsrsq::TensorView(tok.data(), s), dsrsq::TensorView(pos.data(), s),
                         dsrsq::TensorView(tgt.data(), s), dsrsq::TensorView(mask.data(), s)};
      model.zero_grad();
      const double loss = model.forward(batch);
      model.backward();
      const double norm = opt.step(dsrsq::lr_schedule(step, steps, 50, 3e-3));
      avg += loss;
      if ((step + 1) % 50 == 0) {
        std::printf("step %4d/%d | loss %.4f (mean of last 50) | grad norm %.3f | %.1f s\n", step + 1, steps, avg / 50,
                    norm, timer.seconds());
        avg = 0;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    rc = 1;
  }
  MPI_Finalize();
  return rc;
}
