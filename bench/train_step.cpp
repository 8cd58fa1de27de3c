// bench_train_step: our training step against PyTorch's on the identical model,
// both measured in this run, with the sgemm peak of this machine measured in
// this run as the yardstick for achieved GFLOP/s.
//
// A step = forward, masked cross-entropy, backward, global-norm clipping and
// AdamW, zeroing the gradients. FLOPs come from the cost functions in
// src/backend/backend.cpp (Transformer::train_flops): matmuls 2*M*N*K each,
// backward = 2x forward for linears, causal attention 4*T*keys*HS per head
// forward and 2.5x that backward. The same FLOP count is used for both peers,
// so the GFLOP/s columns compare useful work, not work done.
//
// Output: nccl-tests style table; last line speedup_vs_pytorch=<x>.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dsrsq/build_info.hpp"
#include "core/rng.hpp"
#include "core/timer.hpp"
#include "model/transformer.hpp"
#include "train/optimizer.hpp"

namespace {

struct Options {
  std::int64_t vocab = 512, d_model = 256, n_heads = 4, n_layers = 4, d_ff = 1024, batch = 4, seq = 1024;
  int threads = 2, repeats = 5, warmup = 1;
  bool peer = true;
  std::string python = "/usr/bin/python3";
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// sgemm peak: square products large enough to run at BLAS speed, median of repeats.
struct GemmResult {
  double gflops, max_rel_err;
};
GemmResult sgemm_peak(int n, int repeats) {
  std::vector<float> a(static_cast<std::size_t>(n) * n), b(a.size()), c(a.size());
  dsrsq::Rng rng(7);
  for (auto& x : a) x = static_cast<float>(rng.normal());
  for (auto& x : b) x = static_cast<float>(rng.normal());
  std::vector<double> t;
  for (int r = 0; r < repeats + 1; ++r) {
    dsrsq::Timer tm;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    if (r > 0) t.push_back(tm.seconds());
  }
  // Correctness: a few entries against a double dot product.
  double err = 0;
  for (int s = 0; s < 16; ++s) {
    const int i = static_cast<int>(rng.below(static_cast<std::uint64_t>(n)));
    const int j = static_cast<int>(rng.below(static_cast<std::uint64_t>(n)));
    double ref = 0, mag = 0;
    for (int k = 0; k < n; ++k) {
      ref += static_cast<double>(a[static_cast<std::size_t>(i) * n + k]) * b[static_cast<std::size_t>(k) * n + j];
      mag += std::fabs(static_cast<double>(a[static_cast<std::size_t>(i) * n + k]) * b[static_cast<std::size_t>(k) * n + j]);
    }
    err = std::max(err, std::fabs(c[static_cast<std::size_t>(i) * n + j] - ref) / mag);
  }
  return {2.0 * n * static_cast<double>(n) * n / median(t) / 1e9, err};
}

struct PeerResult {
  bool ok = false;
  std::string version, error;
  std::vector<double> times;
};

PeerResult run_pytorch(const Options& o) {
  PeerResult r;
  const std::filesystem::path script = std::filesystem::path(DSRSQ_SOURCE_DIR) / "bench" / "torch_train_step.py";
  char cmd[2048];
  std::snprintf(cmd, sizeof cmd,
                "OMP_NUM_THREADS=%d %s %s --vocab %lld --d_model %lld --n_heads %lld --n_layers %lld --d_ff %lld "
                "--batch %lld --seq %lld --threads %d --repeats %d --warmup %d",
                o.threads, o.python.c_str(), script.c_str(), static_cast<long long>(o.vocab),
                static_cast<long long>(o.d_model), static_cast<long long>(o.n_heads), static_cast<long long>(o.n_layers),
                static_cast<long long>(o.d_ff), static_cast<long long>(o.batch), static_cast<long long>(o.seq), o.threads,
                o.repeats, o.warmup);
  FILE* p = popen(cmd, "r");
  if (!p) {
    r.error = "cannot start " + o.python;
    return r;
  }
  std::string out;
  std::array<char, 4096> buf{};
  while (std::fgets(buf.data(), static_cast<int>(buf.size()), p)) out += buf.data();
  const int rc = pclose(p);
  const auto pos = out.rfind("{\"peer\"");
  if (rc != 0 || pos == std::string::npos) {
    r.error = "pytorch peer failed (exit " + std::to_string(rc) + "): " + out.substr(0, 400);
    return r;
  }
  try {
    const auto j = nlohmann::json::parse(out.substr(pos));
    r.version = j.at("torch_version").get<std::string>();
    r.times = j.at("times_s").get<std::vector<double>>();
    r.ok = !r.times.empty();
  } catch (const std::exception& e) {
    r.error = std::string("cannot parse the peer's JSON: ") + e.what();
  }
  return r;
}

void usage() {
  std::puts(
      "usage: bench_train_step [--repeats N] [--warmup N] [--threads N] [--no-peer] [--python PATH]\n"
      "                        [--vocab V] [--d_model C] [--n_heads H] [--n_layers L] [--d_ff F] [--batch B] [--seq T]");
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: option %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    auto num = [&]() -> long long {
      const std::string v = next();
      char* end = nullptr;
      const long long x = std::strtoll(v.c_str(), &end, 10);
      if (!end || *end || x <= 0) {
        std::fprintf(stderr, "error: option %s expects a positive integer, got '%s'\n", a.c_str(), v.c_str());
        std::exit(2);
      }
      return x;
    };
    if (a == "--repeats") o.repeats = static_cast<int>(num());
    else if (a == "--warmup") o.warmup = static_cast<int>(num());
    else if (a == "--threads") o.threads = static_cast<int>(num());
    else if (a == "--no-peer") o.peer = false;
    else if (a == "--python") o.python = next();
    else if (a == "--vocab") o.vocab = num();
    else if (a == "--d_model") o.d_model = num();
    else if (a == "--n_heads") o.n_heads = num();
    else if (a == "--n_layers") o.n_layers = num();
    else if (a == "--d_ff") o.d_ff = num();
    else if (a == "--batch") o.batch = num();
    else if (a == "--seq") o.seq = num();
    else if (a == "--help" || a == "-h") {
      usage();
      return 0;
    } else {
      std::fprintf(stderr, "error: unknown option '%s'\n", a.c_str());
      usage();
      return 2;
    }
  }
  try {
    omp_set_num_threads(o.threads);
    dsrsq::ModelConfig cfg;
    cfg.vocab = o.vocab;
    cfg.d_model = o.d_model;
    cfg.n_heads = o.n_heads;
    cfg.n_layers = o.n_layers;
    cfg.d_ff = o.d_ff;
    cfg.max_pos = o.seq;
    const std::int64_t B = o.batch, T = o.seq, tokens = B * T;

    std::printf("# dsrsq bench_train_step %s  git %s  %s  %s\n", dsrsq::build::version, dsrsq::build::git_sha,
                dsrsq::build::build_type, dsrsq::build::blas);
    std::printf("# model %s  batch %lld x seq %lld  fp32  AdamW + clip 1.0\n", cfg.str().c_str(),
                static_cast<long long>(B), static_cast<long long>(T));
    std::printf("# threads %d  warmup %d  repeats %d  time = median over repeats of one full training step\n",
                o.threads, o.warmup, o.repeats);

    const GemmResult peak = sgemm_peak(2048, std::max(3, o.repeats));

    dsrsq::Transformer model(cfg, dsrsq::cpu_backend());
    model.init_weights(1);
    dsrsq::AdamW opt(model.params(), model.flat_params(), dsrsq::AdamWConfig{3e-4, 0.9, 0.999, 1e-8, 0.1, 1.0},
                     dsrsq::cpu_backend());
    std::vector<std::int32_t> tok(static_cast<std::size_t>(tokens)), pos(tok.size()), tgt(tok.size());
    std::vector<float> mask(tok.size(), 1.0f);
    dsrsq::Rng rng(3);
    for (auto& t : tok) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(o.vocab)));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t) {
        const auto i = static_cast<std::size_t>(b * T + t);
        pos[i] = static_cast<std::int32_t>(t);
        tgt[i] = tok[static_cast<std::size_t>(b * T + (t + 1) % T)];
      }
    const dsrsq::Shape s{B, T};
    dsrsq::Batch batch{dsrsq::TensorView(tok.data(), s), dsrsq::TensorView(pos.data(), s),
                       dsrsq::TensorView(tgt.data(), s), dsrsq::TensorView(mask.data(), s)};
    std::vector<double> times, losses;
    bool finite = true;
    for (int r = 0; r < o.warmup + o.repeats; ++r) {
      dsrsq::Timer tm;
      model.zero_grad();
      const double loss = model.forward(batch);
      model.backward();
      const double norm = opt.step(3e-4);
      const double dt = tm.seconds();
      finite = finite && std::isfinite(loss) && std::isfinite(norm);
      if (r >= o.warmup) {
        times.push_back(dt);
        losses.push_back(loss);
      }
    }
    if (std::getenv("DSRSQ_PROFILE")) {
      dsrsq::cpu_backend().set_profiling(true);
      model.zero_grad();
      model.forward(batch);
      model.backward();
      opt.step(3e-4);
      dsrsq::cpu_backend().set_profiling(false);
      double tot = 0;
      for (const auto& e : dsrsq::cpu_backend().profile()) tot += e.seconds;
      for (const auto& e : dsrsq::cpu_backend().profile())
        std::printf("# profile %-18s %8.1f ms %5.1f%% %6lld calls\n", e.op, e.seconds * 1e3, 100 * e.seconds / tot,
                    static_cast<long long>(e.calls));
    }
    const double flops = model.train_flops(B, T);
    const double ours = median(times);
    // Correctness: finite loss and gradients, and the loss goes down on a fixed batch.
    const bool ours_ok = finite && losses.back() < losses.front();

    PeerResult peer;
    if (o.peer) peer = run_pytorch(o);

    std::printf("# sgemm peak (2048^3, %d threads): %.1f GFLOP/s  max_rel_err %.1e\n", o.threads, peak.gflops,
                peak.max_rel_err);
    std::printf("# flops per step %.3e (cost model)  activation arena peak %.1f MB  params %lld\n", flops,
                static_cast<double>(model.activation_peak_bytes()) / 1e6, static_cast<long long>(cfg.num_parameters()));
    if (peer.ok) std::printf("# peer pytorch %s (Debian python3-torch), same model, same FLOP count\n", peer.version.c_str());
    std::printf("#\n");
    std::printf("#  %-9s %10s %10s %10s %12s %9s %9s %7s\n", "impl", "median", "min", "max", "tokens/s", "GFLOP/s",
                "of_peak", "check");
    std::printf("#  %-9s %10s %10s %10s %12s %9s %9s %7s\n", "", "(ms)", "(ms)", "(ms)", "(tok/s)", "", "(%)", "");
    int failed = 0;
    auto row = [&](const char* name, const std::vector<double>& t, bool ok) {
      const double med = median(t);
      const double mn = *std::min_element(t.begin(), t.end()), mx = *std::max_element(t.begin(), t.end());
      const double gf = flops / med / 1e9;
      std::printf("   %-9s %10.1f %10.1f %10.1f %12.0f %9.1f %9.1f %7s\n", name, med * 1e3, mn * 1e3, mx * 1e3,
                  static_cast<double>(tokens) / med, gf, 100.0 * gf / peak.gflops, ok ? "ok" : "FAIL");
      failed += !ok;
    };
    row("dsrsq", times, ours_ok);
    if (peer.ok) row("pytorch", peer.times, true);
    else if (o.peer) {
      std::printf("#  pytorch peer unavailable: %s\n", peer.error.c_str());
      failed += 1;
    }
    const bool peak_ok = peak.max_rel_err < 1e-5;
    failed += !peak_ok;
    std::printf("# rows %d  failed %d  loss %.4f -> %.4f over %zu timed steps\n", peer.ok ? 2 : 1, failed,
                losses.front(), losses.back(), losses.size());
    if (peer.ok) std::printf("speedup_vs_pytorch=%.2f\n", median(peer.times) / ours);
    else std::printf("speedup_vs_pytorch=nan\n");
    return failed ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_train_step: %s\n", e.what());
    return 1;
  }
}
