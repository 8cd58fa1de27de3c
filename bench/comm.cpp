// bench_comm: data-parallel communication, measured under mpirun.
//
//  1. All-reduce table (nccl-tests style): for each size, the gradient
//     reducer's path (src/dist/dp_reducer.cpp: the buffer cut into buckets,
//     non-blocking all-reduces launched one after another, then waited for)
//     against one raw MPI_Allreduce of the same bytes. algbw = bytes / time;
//     busbw = algbw * 2 (n - 1) / n (nccl-tests doc/PERFORMANCE.md, all-reduce).
//     Correctness: rank r contributes r + 1 everywhere; the sum is n (n + 1) / 2.
//  2. Training step, data parallel against one rank at the same per-rank batch:
//     every rank trains the same small model on `batch` sequences per rank;
//     "dp1" is the step time of world rank 0 training alone (the other ranks
//     wait at a barrier), "dpN" the step time when all ranks train with the
//     gradients reduced by GradReducer (overlapped with backward). Each rank
//     uses OMP_NUM_THREADS threads; with one thread per rank on N cores the
//     ratio measures communication and imbalance, not a change in compute.
// Last line: dp2_over_dp1=<x> (world size 2; dpN_over_dp1 otherwise).
#include <mpi.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/rng.hpp"
#include "core/timer.hpp"
#include "dist/dp_reducer.hpp"
#include "dist/grid.hpp"
#include "dsrsq/build_info.hpp"
#include "model/transformer.hpp"
#include "train/optimizer.hpp"

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Max over ranks of a per-rank time (the critical path).
double max_over_ranks(double t) {
  double m = 0;
  MPI_Allreduce(&t, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}

struct Row {
  std::size_t bytes;
  double ours_us, raw_us;
  bool ok;
};

Row allreduce_row(dsrsq::dist::Communicator& comm, std::size_t count, std::size_t bucket_floats, int iters) {
  const int rank = comm.rank(), n = comm.size();
  std::vector<float> buf(count);
  auto fill = [&] { std::fill(buf.begin(), buf.end(), static_cast<float>(rank + 1)); };
  const float expect = static_cast<float>(n * (n + 1) / 2);
  std::vector<double> ours, raw;
  bool ok = true;
  for (int it = 0; it < iters + 1; ++it) {
    fill();
    MPI_Barrier(MPI_COMM_WORLD);
    dsrsq::Timer t;
    std::vector<dsrsq::dist::Request> reqs;
    for (std::size_t off = 0; off < count; off += bucket_floats)
      reqs.push_back(comm.iall_reduce_sum(std::span<float>(buf.data() + off, std::min(bucket_floats, count - off))));
    for (auto& r : reqs) r.wait();
    const double dt = max_over_ranks(t.seconds());
    for (float x : buf) ok = ok && x == expect;
    fill();
    MPI_Barrier(MPI_COMM_WORLD);
    dsrsq::Timer t2;
    MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    const double dt2 = max_over_ranks(t2.seconds());
    for (float x : buf) ok = ok && x == expect;
    if (it > 0) {
      ours.push_back(dt);
      raw.push_back(dt2);
    }
  }
  int okall = ok ? 1 : 0, all = 0;
  MPI_Allreduce(&okall, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return {count * sizeof(float), median(ours) * 1e6, median(raw) * 1e6, all == 1};
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  int rc = 0;
  try {
    int iters = 5, steps = 6;
    std::int64_t batch = 4, seq = 256;
    for (int i = 1; i + 1 < argc; i += 2) {
      const std::string a = argv[i];
      if (a == "--iters") iters = std::atoi(argv[i + 1]);
      else if (a == "--steps") steps = std::atoi(argv[i + 1]);
      else if (a == "--batch") batch = std::atoll(argv[i + 1]);
      else if (a == "--seq") seq = std::atoll(argv[i + 1]);
      else throw dsrsq::Error("bench_comm: unknown option '" + a + "' (--iters --steps --batch --seq)");
    }
    DSRSQ_INPUT_CHECK(world >= 2, "bench_comm: run it under mpirun with at least 2 ranks");
    dsrsq::dist::ProcessGrid grid(MPI_COMM_WORLD, world, 1, 120.0);
    dsrsq::dist::comm_self_test(grid.world());
    auto& comm = grid.dp_comm();
    const double factor = 2.0 * (world - 1) / world;
    if (rank == 0) {
      std::printf("# dsrsq bench_comm %s  git %s  %s  ranks %d  threads/rank %d\n", dsrsq::build::version,
                  dsrsq::build::git_sha, dsrsq::build::build_type, world, omp_get_max_threads());
      std::printf("# all-reduce, f32 sum; ours = buckets of 1 MiB launched non-blocking then waited; raw = one MPI_Allreduce\n");
      std::printf("# time = median over %d iterations of the max over ranks; busbw = algbw * 2(n-1)/n\n#\n", iters);
      std::printf("#  %12s %11s %9s %9s %11s %9s %9s %8s %7s\n", "size", "ours_time", "algbw", "busbw", "raw_time",
                  "algbw", "busbw", "ratio", "check");
      std::printf("#  %12s %11s %9s %9s %11s %9s %9s %8s %7s\n", "(B)", "(us)", "(GB/s)", "(GB/s)", "(us)", "(GB/s)",
                  "(GB/s)", "ours/raw", "");
    }
    int failed = 0, rows = 0;
    for (std::size_t count : {std::size_t{1} << 10, std::size_t{1} << 14, std::size_t{1} << 18, std::size_t{1} << 20,
                              std::size_t{1} << 22}) {
      const Row r = allreduce_row(comm, count, std::size_t{1} << 18, iters);
      ++rows;
      failed += !r.ok;
      if (rank == 0) {
        const double a1 = static_cast<double>(r.bytes) / r.ours_us / 1e3, a2 = static_cast<double>(r.bytes) / r.raw_us / 1e3;
        std::printf("   %12zu %11.1f %9.2f %9.2f %11.1f %9.2f %9.2f %8.2f %7s\n", r.bytes, r.ours_us, a1, a1 * factor,
                    r.raw_us, a2, a2 * factor, r.ours_us / r.raw_us, r.ok ? "ok" : "FAIL");
      }
    }

    // Training step: dp1 (rank 0 alone) against dpN (every rank, reduced gradients).
    dsrsq::ModelConfig cfg;
    cfg.vocab = 256;
    cfg.d_model = 128;
    cfg.n_heads = 4;
    cfg.n_layers = 2;
    cfg.d_ff = 512;
    cfg.max_pos = seq;
    dsrsq::Transformer model(cfg, dsrsq::cpu_backend());
    model.init_weights(1);
    dsrsq::AdamW opt(model.params(), model.flat_params(), dsrsq::AdamWConfig{1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0},
                     dsrsq::cpu_backend());
    std::vector<std::int32_t> tok(static_cast<std::size_t>(batch * seq)), pos(tok.size()), tgt(tok.size());
    std::vector<float> mask(tok.size(), 1.0f);
    dsrsq::Rng rng(11, static_cast<std::uint64_t>(rank));
    for (auto& t : tok) t = static_cast<std::int32_t>(rng.below(256));
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t t = 0; t < seq; ++t) {
        pos[static_cast<std::size_t>(b * seq + t)] = static_cast<std::int32_t>(t);
        tgt[static_cast<std::size_t>(b * seq + t)] = tok[static_cast<std::size_t>(b * seq + (t + 1) % seq)];
      }
    const dsrsq::Shape s{batch, seq};
    dsrsq::Batch bt{dsrsq::TensorView(tok.data(), s), dsrsq::TensorView(pos.data(), s), dsrsq::TensorView(tgt.data(), s),
                    dsrsq::TensorView(mask.data(), s)};
    // dp1: rank 0 alone.
    std::vector<double> t1;
    if (rank == 0)
      for (int i = 0; i < steps + 1; ++i) {
        dsrsq::Timer t;
        model.zero_grad();
        model.forward(bt);
        model.backward();
        opt.step(1e-3);
        if (i > 0) t1.push_back(t.seconds());
      }
    MPI_Barrier(MPI_COMM_WORLD);
    // dpN: every rank from the same start (fresh weights and optimizer state),
    // gradients summed in overlapped buckets.
    model.init_weights(1);
    dsrsq::AdamW opt2(model.params(), model.flat_params(), dsrsq::AdamWConfig{1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0},
                      dsrsq::cpu_backend());
    dsrsq::dist::GradReducer reducer(comm, model, dsrsq::dist::ReducerConfig{});
    reducer.attach(model);
    std::vector<double> tn;
    std::vector<float> p0(static_cast<std::size_t>(model.flat_params().numel()));
    for (int i = 0; i < steps + 1; ++i) {
      MPI_Barrier(MPI_COMM_WORLD);
      dsrsq::Timer t;
      model.zero_grad();
      const double inv = dsrsq::dist::global_inv_norm(comm, mask);
      model.forward(bt, inv);
      model.backward();
      reducer.finish();
      opt2.step(1e-3);
      const double dt = max_over_ranks(t.seconds());
      if (i > 0) tn.push_back(dt);
    }
    reducer.detach();
    // Check: parameters bit-identical across ranks after the dpN steps.
    std::copy(model.flat_params().ptr<float>(), model.flat_params().ptr<float>() + p0.size(), p0.begin());
    comm.broadcast(std::span<float>(p0), 0);
    int same = std::equal(p0.begin(), p0.end(), model.flat_params().ptr<float>()) ? 1 : 0, all_same = 0;
    MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    failed += !all_same;
    if (rank == 0) {
      const double m1 = median(t1), mn = median(tn);
      std::printf("#\n# training step: d_model 128, 2 layers, %lld x %lld tokens per rank, fp32, AdamW\n",
                  static_cast<long long>(batch), static_cast<long long>(seq));
      std::printf("#  %-6s %10s %12s %10s %7s\n", "layout", "step_ms", "tokens/s", "vs_dp1", "check");
      std::printf("   %-6s %10.1f %12.0f %10.3f %7s\n", "dp1", m1 * 1e3, static_cast<double>(batch * seq) / m1, 1.0, "ok");
      std::printf("   dp%-4d %10.1f %12.0f %10.3f %7s\n", world, mn * 1e3,
                  static_cast<double>(batch * seq * world) / mn, mn / m1, all_same ? "ok" : "FAIL");
      std::printf("# rows %d  failed %d  overlapped buckets %lld of %lld\n", rows + 2, failed,
                  static_cast<long long>(reducer.stats().buckets_launched_during_backward),
                  static_cast<long long>(reducer.stats().buckets_launched));
      std::printf("dp%d_over_dp1=%.3f\n", world, mn / m1);
    }
    rc = failed ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] bench_comm: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}
