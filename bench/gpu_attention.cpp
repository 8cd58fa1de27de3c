// bench_gpu_attention: the CUDA backend's causal attention, forward and
// backward, at T = 1K..16K (batch 1, 16 heads of size 64, positions 0..T-1,
// fp32), against the same run's cublasSgemm peak (a 4096^3 product through
// the backend's matmul, fp32 in fp32: no TF32), nccl-tests style.
//
// FLOPs come from the cost model only (attention_cost in
// src/backend/backend.cpp: fwd = 4*HS*(visible pairs) per head, causal
// T(T+1)/2 pairs; bwd = 2.5 x fwd, FlashAttention-2's count; our backward runs
// 3.5 x fwd of tile products, see kernels/attention_bwd.cu, but is credited
// with 2.5 as every implementation is). Time: CUDA events on the backend's
// stream, median over repeats after warm-up, of the kernels alone (the
// launchers of kernels/attention_*.cu, which GFLOP/s and %peak use) and of the
// whole Backend call (fwd_call, bwd_call: adds the boundary check, which copies
// the positions to the host and so synchronises the stream).
// Check column: relative RMS error on a slice against a double reference
// computed here on the host (head 0: o, lse and dq of 8 query rows; dk, dv of
// the last 4 key rows), ok when fwd <= 10 sqrt(T) eps32, bwd <= 100 sqrt(T) eps32
// (bench/attention.cpp's rule). Exit 1 when a check fails, 77 without a GPU.
// Summary line: attention_fwd_of_peak=<x> attention_bwd_of_peak=<y> (median
// over T >= 4K of GFLOP/s over the sgemm peak).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_device.hpp"
#include "backend/cuda/kernels/kernels.hpp"
#include "core/rng.hpp"
#include "dsrsq/build_info.hpp"

using dsrsq::Shape;
using dsrsq::TensorView;

namespace {

struct DevBuf {  // device memory from the backend's allocator
  dsrsq::Backend& be;
  void* p;
  DevBuf(dsrsq::Backend& b, std::size_t bytes) : be(b), p(b.allocator().allocate(bytes)) {}
  ~DevBuf() { be.allocator().deallocate(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  TensorView view(Shape s, dsrsq::DType t) const { return TensorView(p, s, t, dsrsq::Device::cuda); }
};

template <class T>
void upload(dsrsq::Backend& be, const std::vector<T>& h, const TensorView& d) {
  be.copy_from_host(std::as_bytes(std::span<const T>(h)), d);
}
template <class T>
std::vector<T> download(dsrsq::Backend& be, const TensorView& d) {
  std::vector<T> h(static_cast<std::size_t>(d.numel()));
  be.copy_to_host(d, std::as_writable_bytes(std::span<T>(h)));
  return h;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? NAN : v[v.size() / 2];
}

// Median milliseconds of `f` over `repeats` runs after `warmup`, CUDA events on `s`.
template <class F>
double time_ms(cudaStream_t s, int warmup, int repeats, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  cudaEvent_t a, b;
  DSRSQ_CUDA_CHECK(cudaEventCreate(&a));
  DSRSQ_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    DSRSQ_CUDA_CHECK(cudaStreamSynchronize(s));
    DSRSQ_CUDA_CHECK(cudaEventRecord(a, s));
    f();
    DSRSQ_CUDA_CHECK(cudaEventRecord(b, s));
    DSRSQ_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    DSRSQ_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return median(t);
}

struct Peak {
  double gflops, max_rel_err;
};

Peak sgemm_peak(dsrsq::cuda::CudaBackend& be, std::int64_t n) {
  dsrsq::Rng rng(1, 1);
  std::vector<float> a(static_cast<std::size_t>(n * n)), b(a.size());
  for (auto& x : a) x = static_cast<float>(rng.normal());
  for (auto& x : b) x = static_cast<float>(rng.normal());
  const std::size_t bytes = sizeof(float) * a.size();
  DevBuf A(be, bytes), B(be, bytes), C(be, bytes);
  const TensorView ta = A.view(Shape{n, n}, dsrsq::DType::f32), tb = B.view(Shape{n, n}, dsrsq::DType::f32),
                   tc = C.view(Shape{n, n}, dsrsq::DType::f32);
  upload(be, a, ta);
  upload(be, b, tb);
  const double ms = time_ms(be.stream(), 2, 10, [&] { be.matmul_fwd({ta, tb, tc, {}, false, false, 1.0, 0.0}); });
  const std::vector<float> c = download<float>(be, tc);
  double err = 0;
  for (int t = 0; t < 16; ++t) {  // a few entries against a double dot product
    const std::int64_t i = (t * 977) % n, j = (t * 131 + 7) % n;
    double s = 0, sa = 0;
    for (std::int64_t k = 0; k < n; ++k) {
      s += static_cast<double>(a[static_cast<std::size_t>(i * n + k)]) * b[static_cast<std::size_t>(k * n + j)];
      sa += std::fabs(static_cast<double>(a[static_cast<std::size_t>(i * n + k)]) * b[static_cast<std::size_t>(k * n + j)]);
    }
    err = std::max(err, std::fabs(c[static_cast<std::size_t>(i * n + j)] - s) / sa);
  }
  return {2.0 * static_cast<double>(n) * n * n / (ms * 1e-3) / 1e9, err};
}

// Host double reference of one query row of head h (positions 0..T-1, causal).
struct RowRef {
  std::vector<double> p, o;  // p over keys 0..i, o (HS)
  double lse;
};
RowRef ref_row(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v, std::int64_t T,
               std::int64_t NH, std::int64_t HS, std::int64_t h, std::int64_t i, double scale) {
  RowRef r;
  r.p.resize(static_cast<std::size_t>(i + 1));
  double mx = -INFINITY;
  for (std::int64_t j = 0; j <= i; ++j) {
    double s = 0;
    for (std::int64_t d = 0; d < HS; ++d)
      s += static_cast<double>(q[static_cast<std::size_t>((i * NH + h) * HS + d)]) * k[static_cast<std::size_t>((j * NH + h) * HS + d)];
    r.p[static_cast<std::size_t>(j)] = s * scale;
    mx = std::max(mx, s * scale);
  }
  double sum = 0;
  for (auto& x : r.p) sum += std::exp(x - mx);
  r.lse = mx + std::log(sum);
  r.o.assign(static_cast<std::size_t>(HS), 0.0);
  for (std::int64_t j = 0; j <= i; ++j) {
    double& pj = r.p[static_cast<std::size_t>(j)];
    pj = std::exp(pj - r.lse);
    for (std::int64_t d = 0; d < HS; ++d) r.o[static_cast<std::size_t>(d)] += pj * v[static_cast<std::size_t>((j * NH + h) * HS + d)];
  }
  (void)T;
  return r;
}

struct Row {
  std::int64_t T;
  double fwd_ms, bwd_ms, fwd_err, bwd_err, fwd_flops, fwd_call_ms, bwd_call_ms;
};

Row run(dsrsq::cuda::CudaBackend& be, std::int64_t T, std::int64_t NH, std::int64_t HS, int warmup, int repeats) {
  dsrsq::Rng rng(7, static_cast<std::uint64_t>(T));
  const std::int64_t n = T * NH * HS;
  auto normals = [&](double sd) {
    std::vector<float> x(static_cast<std::size_t>(n));
    for (auto& e : x) e = static_cast<float>(sd * rng.normal());
    return x;
  };
  const std::vector<float> q = normals(1.2), k = normals(1.2), v = normals(1.0), dout = normals(1.0);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(T));
  for (std::int64_t i = 0; i < T; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  const std::size_t fb = sizeof(float) * static_cast<std::size_t>(n);
  DevBuf Q(be, fb), K(be, fb), V(be, fb), O(be, fb), DO(be, fb), DQ(be, fb), DK(be, fb), DV(be, fb),
      L(be, sizeof(float) * static_cast<std::size_t>(NH * T)), P(be, sizeof(std::int32_t) * static_cast<std::size_t>(T));
  const Shape s4{1, T, NH, HS};
  const auto f32 = dsrsq::DType::f32;
  const TensorView tq = Q.view(s4, f32), tk = K.view(s4, f32), tv = V.view(s4, f32), to = O.view(s4, f32),
                   tdo = DO.view(s4, f32), tdq = DQ.view(s4, f32), tdk = DK.view(s4, f32), tdv = DV.view(s4, f32),
                   tl = L.view(Shape{1, NH, T}, f32), tp = P.view(Shape{1, T}, dsrsq::DType::i32);
  upload(be, q, tq);
  upload(be, k, tk);
  upload(be, v, tv);
  upload(be, dout, tdo);
  upload(be, pos, tp);
  const dsrsq::AttentionArgs fa{tq, tk, tv, to, tl, tp, tp, true, 0.0};
  const dsrsq::AttentionGradArgs ba{tdo, tq, tk, tv, to, tl, tp, tp, tdq, tdk, tdv, true, 0.0};

  // Checked run: forward, then backward into zeroed gradients.
  be.attention_fwd(fa);
  for (const TensorView* g : {&tdq, &tdk, &tdv}) be.fill(*g, 0.0);
  be.attention_bwd(ba);
  const std::vector<float> o = download<float>(be, to), lse = download<float>(be, tl), dq = download<float>(be, tdq),
                           dk = download<float>(be, tdk), dv = download<float>(be, tdv);
  const double scale = 1.0 / std::sqrt(static_cast<double>(HS));
  const std::int64_t h = 0;
  double fe2 = 0, fr2 = 0, be2 = 0, br2 = 0;
  auto acc = [](double& e2, double& r2, double got, double want) {
    e2 += (got - want) * (got - want);
    r2 += want * want;
  };
  // dO_i . O_i and the row's gradient terms, from the reference row.
  auto row_terms = [&](std::int64_t i, const RowRef& r) {
    double D = 0;
    for (std::int64_t d = 0; d < HS; ++d) D += static_cast<double>(dout[static_cast<std::size_t>((i * NH + h) * HS + d)]) * r.o[static_cast<std::size_t>(d)];
    std::vector<double> ds(static_cast<std::size_t>(i + 1));
    for (std::int64_t j = 0; j <= i; ++j) {
      double dp = 0;
      for (std::int64_t d = 0; d < HS; ++d)
        dp += static_cast<double>(dout[static_cast<std::size_t>((i * NH + h) * HS + d)]) * v[static_cast<std::size_t>((j * NH + h) * HS + d)];
      ds[static_cast<std::size_t>(j)] = r.p[static_cast<std::size_t>(j)] * (dp - D) * scale;
    }
    return ds;
  };
  for (std::int64_t t = 0; t < 8; ++t) {
    const std::int64_t i = t == 7 ? T - 1 : (t * T) / 7;
    const RowRef r = ref_row(q, k, v, T, NH, HS, h, i, scale);
    for (std::int64_t d = 0; d < HS; ++d) acc(fe2, fr2, o[static_cast<std::size_t>((i * NH + h) * HS + d)], r.o[static_cast<std::size_t>(d)]);
    acc(fe2, fr2, lse[static_cast<std::size_t>(h * T + i)], r.lse);
    const std::vector<double> ds = row_terms(i, r);
    for (std::int64_t d = 0; d < HS; ++d) {
      double want = 0;
      for (std::int64_t j = 0; j <= i; ++j) want += ds[static_cast<std::size_t>(j)] * k[static_cast<std::size_t>((j * NH + h) * HS + d)];
      acc(be2, br2, dq[static_cast<std::size_t>((i * NH + h) * HS + d)], want);
    }
  }
  // dk, dv of the last 4 keys: only queries i >= j see them.
  const std::int64_t j0 = std::max<std::int64_t>(0, T - 4);
  std::vector<double> wdk(static_cast<std::size_t>((T - j0) * HS), 0.0), wdv(wdk.size(), 0.0);
  for (std::int64_t i = j0; i < T; ++i) {
    const RowRef r = ref_row(q, k, v, T, NH, HS, h, i, scale);
    const std::vector<double> ds = row_terms(i, r);
    for (std::int64_t j = j0; j <= i; ++j)
      for (std::int64_t d = 0; d < HS; ++d) {
        wdk[static_cast<std::size_t>((j - j0) * HS + d)] += ds[static_cast<std::size_t>(j)] * q[static_cast<std::size_t>((i * NH + h) * HS + d)];
        wdv[static_cast<std::size_t>((j - j0) * HS + d)] += r.p[static_cast<std::size_t>(j)] * dout[static_cast<std::size_t>((i * NH + h) * HS + d)];
      }
  }
  for (std::int64_t j = j0; j < T; ++j)
    for (std::int64_t d = 0; d < HS; ++d) {
      acc(be2, br2, dk[static_cast<std::size_t>((j * NH + h) * HS + d)], wdk[static_cast<std::size_t>((j - j0) * HS + d)]);
      acc(be2, br2, dv[static_cast<std::size_t>((j * NH + h) * HS + d)], wdv[static_cast<std::size_t>((j - j0) * HS + d)]);
    }

  Row row{T, 0, 0, std::sqrt(fe2 / fr2), std::sqrt(be2 / br2),
          dsrsq::attention_cost(1, T, T, NH, HS, true, false).flops, 0, 0};
  // The kernels alone (as CudaBackend::attention_*_impl launches them).
  const dsrsq::cuda::AttentionDims d{1, T, T, NH, HS, true, static_cast<float>(scale)};
  DevBuf Dv(be, sizeof(float) * static_cast<std::size_t>(NH * T));
  auto fp = [](const TensorView& t) { return t.device_ptr<float>(); };
  const auto* pp = tp.device_ptr<std::int32_t>();
  row.fwd_ms = time_ms(be.stream(), warmup, repeats, [&] {
    dsrsq::cuda::attention_fwd(fp(tq), fp(tk), fp(tv), fp(to), fp(tl), pp, pp, d, be.stream());
  });
  row.bwd_ms = time_ms(be.stream(), warmup, repeats, [&] {
    dsrsq::cuda::attention_bwd(fp(tdo), fp(tq), fp(tk), fp(tv), fp(to), fp(tl), pp, pp, fp(tdq), fp(tdk), fp(tdv),
                               static_cast<float*>(Dv.p), d, be.stream());
  });
  // The Backend calls (boundary checks included).
  row.fwd_call_ms = time_ms(be.stream(), 1, repeats, [&] { be.attention_fwd(fa); });
  row.bwd_call_ms = time_ms(be.stream(), 1, repeats, [&] { be.attention_bwd(ba); });
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t max_t = 16384;
  int repeats = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--max-t" && i + 1 < argc) max_t = std::atoll(argv[++i]);
    else if (a == "--repeats" && i + 1 < argc) repeats = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench_gpu_attention [--max-t T (16384)] [--repeats N (5)]\nerror: unknown option '%s'\n",
                   a.c_str());
      return 2;
    }
  }
  std::string why;
  if (dsrsq::cuda::device_count(&why) == 0) {
    std::printf("# bench_gpu_attention: no GPU (%s): skipped\n", why.c_str());
    return 77;
  }
  try {
    dsrsq::cuda::CudaBackend* be = nullptr;
    for (dsrsq::Backend* b : dsrsq::available_backends())
      if (auto* c = dynamic_cast<dsrsq::cuda::CudaBackend*>(b)) be = c;
    if (!be) {
      std::printf("# bench_gpu_attention: a GPU answers but available_backends() has no CUDA backend\n");
      return 1;
    }
    const std::int64_t NH = 16, HS = 64;
    std::printf("# dsrsq bench_gpu_attention %s  git %s  %s  CUDA runtime %s\n", dsrsq::build::version,
                dsrsq::build::git_sha, dsrsq::build::build_type, dsrsq::cuda::runtime_version().c_str());
    std::printf("# device %s (%s)\n", std::string(be->name()).c_str(), dsrsq::cuda::device_name(be->device_index()).c_str());
    std::printf("# causal self-attention, batch 1, NH %lld, HS %lld, positions 0..T-1, fp32; warmup 2, repeats %d,\n"
                "#   time = median of CUDA-event times of the kernels; *_call = the Backend call (boundary checks too)\n",
                static_cast<long long>(NH), static_cast<long long>(HS), repeats);
    std::printf("# FLOPs (cost model): fwd = 4*HS*T(T+1)/2 per head, bwd = 2.5 x fwd\n");
    const Peak peak = sgemm_peak(*be, 4096);
    std::printf("# cublasSgemm peak (4096^3 via the backend's matmul, CUBLAS_DEFAULT_MATH): %.1f GFLOP/s  max_rel_err %.1e\n",
                peak.gflops, peak.max_rel_err);
    std::printf("# check: relative RMS error on a slice (head 0: o, lse, dq of 8 rows; dk, dv of the last 4 keys)\n"
                "#   against a double reference; ok when fwd <= 10 sqrt(T) eps32 and bwd <= 100 sqrt(T) eps32\n#\n");
    std::printf("#  %6s %10s %9s %7s %10s %9s %7s %9s %9s %9s %9s %6s\n", "T", "fwd_time", "fwd", "fwd", "bwd_time",
                "bwd", "bwd", "fwd_call", "bwd_call", "fwd_err", "bwd_err", "check");
    std::printf("#  %6s %10s %9s %7s %10s %9s %7s %9s %9s %9s %9s %6s\n", "(tok)", "(ms)", "GFLOP/s", "%peak", "(ms)",
                "GFLOP/s", "%peak", "(ms)", "(ms)", "(rel)", "(rel)", "");
    int rows = 0, failed = 0;
    std::vector<double> ff, bf;
    for (std::int64_t T = 1024; T <= max_t; T *= 2) {
      const Row r = run(*be, T, NH, HS, 2, repeats);
      const double eps = std::sqrt(static_cast<double>(T)) * 5.96e-8;
      const bool ok = r.fwd_err <= 10 * eps && r.bwd_err <= 100 * eps;
      const double gf = r.fwd_flops / (r.fwd_ms * 1e-3) / 1e9, gb = 2.5 * r.fwd_flops / (r.bwd_ms * 1e-3) / 1e9;
      ++rows;
      failed += !ok;
      std::printf("   %6lld %10.3f %9.1f %7.1f %10.3f %9.1f %7.1f %9.3f %9.3f %9.1e %9.1e %6s\n",
                  static_cast<long long>(T), r.fwd_ms, gf, 100 * gf / peak.gflops, r.bwd_ms, gb, 100 * gb / peak.gflops,
                  r.fwd_call_ms, r.bwd_call_ms, r.fwd_err, r.bwd_err, ok ? "ok" : "FAIL");
      std::fflush(stdout);
      if (T >= 4096) {
        ff.push_back(gf / peak.gflops);
        bf.push_back(gb / peak.gflops);
      }
    }
    std::printf("# rows %d  failed %d  %s\n", rows, failed, failed ? "FAIL" : "PASS");
    std::printf("attention_fwd_of_peak=%.3f attention_bwd_of_peak=%.3f sgemm_gflops=%.0f\n", median(ff), median(bf),
                peak.gflops);
    return failed ? 1 : 0;
  } catch (const std::exception& e) {
    std::printf("# bench_gpu_attention: error: %s\n", e.what());
    return 1;
  }
}
