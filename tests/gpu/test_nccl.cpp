// NcclCommunicator on device buffers, run by CTest under `mpirun -np 2`.
//
// Exit 77 (skipped, reason printed) when any rank sees no CUDA device. NCCL
// refuses two ranks of one communicator on the same GPU, so the ranks whose
// node-local rank is below the node's device count form the NCCL communicator
// and the others sit the test out: on a one-GPU machine the communicator has
// one rank (collectives and a send/recv to itself still run), with two or more
// GPUs it has two and the timeout/abort path is exercised as well.
//
// Checks, against values computed on the host: all-reduce sum (f32, f64, i64;
// a small and a multi-chunk size), all-reduce average (f32, f64), all-gather
// (f32, f64, i64), broadcast (f32, i64, byte; two roots), a full ring of
// send/recv steps (f32), overlapping non-blocking requests, the producer-stream
// order (set_producer_stream, as the data-parallel trainer uses it), rejection of a
// host buffer, nccl_self_test, the timeout path (rank 0 waits for an
// all-reduce its peer never joins: dsrsq::Error naming the rank and the
// operation, communicator aborted) and abort().
// Ring attention (dist/ring_attention.hpp) on CUDA buffers against the CPU
// ring on the same ranks (f32, relative L2 <= 1e-4 per tensor: o, lse, dq,
// dk, dv): through the NcclCommunicator (its ranks; with one GPU the ring has
// one rank and no block travels) and, on every world rank (ranks may share a
// GPU: no NCCL), through StagedCommunicator on the CUDA backend.
#include <cuda_runtime.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_device.hpp"
#include "common/ring_case.hpp"
#include "core/error.hpp"
#include "dist/mpi.hpp"
#include "dist/nccl/nccl_communicator.hpp"
#include "dist/staged_communicator.hpp"

namespace {

using dsrsq::dist::NcclCommunicator;

int g_failed = 0;
int g_world = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failed;
    std::printf("[world %d] FAIL %s\n", g_world, what.c_str());
  } else {
    std::printf("[world %d] ok   %s\n", g_world, what.c_str());
  }
  std::fflush(stdout);
}

// A device buffer filled from / read back to the host through the
// communicator's stream (so copies are ordered with the NCCL operations).
template <class T>
class Dev {
 public:
  Dev(NcclCommunicator& c, const std::vector<T>& h) : c_(c), n_(h.size()) {
    DSRSQ_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<std::size_t>(n_, 1) * sizeof(T)));
    DSRSQ_CUDA_CHECK(cudaMemcpyAsync(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice, c.stream()));
    DSRSQ_CUDA_CHECK(cudaStreamSynchronize(c.stream()));
  }
  ~Dev() { cudaFree(p_); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  std::span<T> span() { return {p_, n_}; }
  std::span<const T> cspan() { return {p_, n_}; }
  std::vector<T> host() {
    std::vector<T> h(n_);
    DSRSQ_CUDA_CHECK(cudaMemcpyAsync(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost, c_.stream()));
    DSRSQ_CUDA_CHECK(cudaStreamSynchronize(c_.stream()));
    return h;
  }

 private:
  NcclCommunicator& c_;
  std::size_t n_;
  T* p_ = nullptr;
};

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

template <class T>
void test_all_reduce(NcclCommunicator& c, std::size_t len, const char* tname) {
  const int n = c.size(), r = c.rank();
  // Integer values below 2^24 so f32 sums are exact.
  std::vector<T> x(len);
  for (std::size_t i = 0; i < len; ++i) x[i] = static_cast<T>((r + 1) * static_cast<std::int64_t>(i % 997 + 1));
  Dev<T> d(c, x);
  c.all_reduce_sum(d.span());
  const auto got = d.host();
  std::size_t bad = 0;
  for (std::size_t i = 0; i < len; ++i) {
    const double want = static_cast<double>(n) * (n + 1) / 2 * static_cast<double>(i % 997 + 1);
    bad += static_cast<double>(got[i]) != want;
  }
  check(bad == 0, dsrsq::detail::cat("all_reduce_sum ", tname, " x ", len, " (", bad, " wrong)"));
}

template <class T>
void test_all_reduce_avg(NcclCommunicator& c, const char* tname) {
  const int n = c.size(), r = c.rank();
  const std::size_t len = 4099;
  std::vector<T> x(len);
  for (std::size_t i = 0; i < len; ++i) x[i] = static_cast<T>((r + 1) * static_cast<double>(i + 1));
  Dev<T> d(c, x);
  c.all_reduce_avg(d.span());
  const auto got = d.host();
  double worst = 0;
  for (std::size_t i = 0; i < len; ++i) {
    const double want = static_cast<double>(n + 1) / 2 * static_cast<double>(i + 1);
    worst = std::fmax(worst, std::fabs(static_cast<double>(got[i]) - want) / want);
  }
  const double tol = sizeof(T) == 4 ? 1e-6 : 1e-14;
  check(worst <= tol, dsrsq::detail::cat("all_reduce_avg ", tname, " (max rel err ", worst, ")"));
}

template <class T>
void test_all_gather(NcclCommunicator& c, const char* tname) {
  const int n = c.size(), r = c.rank();
  const std::size_t len = 257;
  std::vector<T> mine(len);
  for (std::size_t i = 0; i < len; ++i) mine[i] = static_cast<T>(r * 1000 + static_cast<int>(i));
  Dev<T> dm(c, mine);
  Dev<T> da(c, std::vector<T>(len * static_cast<std::size_t>(n), static_cast<T>(-1)));
  c.all_gather(dm.cspan(), da.span());
  const auto got = da.host();
  std::size_t bad = 0;
  for (int q = 0; q < n; ++q)
    for (std::size_t i = 0; i < len; ++i)
      bad += got[static_cast<std::size_t>(q) * len + i] != static_cast<T>(q * 1000 + static_cast<int>(i));
  check(bad == 0, dsrsq::detail::cat("all_gather ", tname, " (", bad, " wrong)"));
}

template <class T>
void test_broadcast(NcclCommunicator& c, int root, const char* tname) {
  const int r = c.rank();
  const std::size_t len = 1031;
  std::vector<T> x(len);
  for (std::size_t i = 0; i < len; ++i) x[i] = r == root ? static_cast<T>((i * 7 + 3) % 251) : static_cast<T>(0);
  Dev<T> d(c, x);
  c.broadcast(d.span(), root);
  const auto got = d.host();
  std::size_t bad = 0;
  for (std::size_t i = 0; i < len; ++i) bad += got[i] != static_cast<T>((i * 7 + 3) % 251);
  check(bad == 0, dsrsq::detail::cat("broadcast ", tname, " from root ", root, " (", bad, " wrong)"));
}

// The ring-attention pattern: size() steps, each passing the block in hand to
// the next rank; at step s a rank holds the block made by rank r - s.
void test_ring(NcclCommunicator& c) {
  const int n = c.size(), r = c.rank();
  const std::size_t len = 70001;
  auto block_of = [&](int owner) {
    std::vector<float> b(len);
    for (std::size_t i = 0; i < len; ++i) b[i] = static_cast<float>(owner * 100000 + static_cast<int>(i % 50000));
    return b;
  };
  Dev<float> cur(c, block_of(r));
  Dev<float> nxt(c, std::vector<float>(len, -1.0f));
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  Dev<float>* a = &cur;
  Dev<float>* b = &nxt;
  std::size_t bad = 0;
  for (int step = 1; step <= n; ++step) {
    c.send_recv(a->cspan(), next, b->span(), prev);
    std::swap(a, b);
    const int owner = ((r - step) % n + n) % n;
    const auto got = a->host();
    const auto want = block_of(owner);
    for (std::size_t i = 0; i < len; ++i) bad += got[i] != want[i];
  }
  check(bad == 0, dsrsq::detail::cat("send_recv ring of ", n, " steps (", bad, " wrong)"));
}

// The ring on `gpu` with `dev_comm` against the ring on the CPU with `host`
// (the same members), on the same shard of the same data.
void ring_attention_case(dsrsq::Backend& gpu, dsrsq::dist::Communicator& dev_comm, dsrsq::dist::MpiCommunicator& host,
                         const std::string& what) {
  const int P = host.size(), NH = 2, HS = 16;
  for (const auto& [B, T] : {std::pair{1, 32}, std::pair{2, 64}}) {
    dsrsq::Rng rng(3000 + B + T);
    const std::size_t n = static_cast<std::size_t>(B) * (T * P) * NH * HS;  // T per rank: T * P in all
    const auto q = ring_case::randn<float>(rng, n), k = ring_case::randn<float>(rng, n),
               v = ring_case::randn<float>(rng, n), dout = ring_case::randn<float>(rng, n);
    const auto in = ring_case::shard_of(q, k, v, dout, B, T * P, NH, HS, P, host.rank(), true);
    const auto want = ring_case::run_ring(dsrsq::cpu_backend(), host, in);
    const auto got = ring_case::run_ring(gpu, dev_comm, in);
    const double errs[5] = {ring_case::rel_l2(std::get<0>(got), std::get<0>(want)),
                            ring_case::rel_l2(std::get<1>(got), std::get<1>(want)),
                            ring_case::rel_l2(std::get<2>(got), std::get<2>(want)),
                            ring_case::rel_l2(std::get<3>(got), std::get<3>(want)),
                            ring_case::rel_l2(std::get<4>(got), std::get<4>(want))};
    check(*std::max_element(std::begin(errs), std::end(errs)) <= 1e-4,
          dsrsq::detail::cat("ring attention ", what, " P=", P, " B=", B, " T=", T * P,
                             ": relative L2 to the CPU ring (o, lse, dq, dk, dv) ", errs[0], " ", errs[1], " ", errs[2],
                             " ", errs[3], " ", errs[4], " <= 1e-4"));
  }
}

// Through the NcclCommunicator, ordered after the CUDA backend's stream as
// the trainer orders it (experiment.cpp device_communicator).
void test_ring_attention_nccl(NcclCommunicator& c, MPI_Comm sub) {
  auto* gpu = static_cast<dsrsq::cuda::CudaBackend*>(dsrsq::device_backend(dsrsq::Device::cuda));
  if (!gpu || gpu->device_index() != c.device()) {
    check(false, dsrsq::detail::cat("ring attention over NCCL: the CUDA backend is on GPU ",
                                    gpu ? gpu->device_index() : -1, ", the communicator on GPU ", c.device()));
    return;
  }
  dsrsq::dist::MpiCommunicator host(sub, "ring-host", 60.0);
  c.set_producer_stream(gpu->stream());
  ring_attention_case(*gpu, c, host, "over NCCL");
  c.set_producer_stream(nullptr);
}

// Through StagedCommunicator on the CUDA backend, over the whole world.
void test_ring_attention_staged() {
  dsrsq::Backend* gpu = dsrsq::device_backend(dsrsq::Device::cuda);
  if (!gpu) {
    check(false, "ring attention staged: no CUDA backend");
    return;
  }
  dsrsq::dist::MpiCommunicator world(MPI_COMM_WORLD, "world", 60.0);
  dsrsq::dist::StagedCommunicator staged(*gpu, world);
  ring_attention_case(*gpu, staged, world, "staged on CUDA");
}

void test_nonblocking(NcclCommunicator& c) {
  const int n = c.size(), r = c.rank();
  Dev<double> a(c, std::vector<double>(1000, r + 1.0));
  Dev<std::int64_t> b(c, std::vector<std::int64_t>(333, r + 1));
  dsrsq::dist::Request ra = c.iall_reduce_sum(a.span());
  dsrsq::dist::Request rb = c.iall_reduce_sum(b.span());
  while (!rb.test()) {
  }
  ra.wait();
  const double want = static_cast<double>(n) * (n + 1) / 2;
  const auto ha = a.host();
  const auto hb = b.host();
  bool ok = !ra.pending() && !rb.pending();
  for (double v : ha) ok = ok && v == want;
  for (std::int64_t v : hb) ok = ok && static_cast<double>(v) == want;
  check(ok, "two overlapping non-blocking all_reduce_sum, test() then wait()");
}

// set_producer_stream: the buffer is filled by a device-to-device copy still
// queued on another stream (the CudaBackend's, in a training run) when the
// all-reduce is issued; the standing order must make NCCL wait for it.
void test_producer_stream(NcclCommunicator& c) {
  const int n = c.size(), r = c.rank();
  const std::size_t len = std::size_t{1} << 24;  // 64 MB: the copy is still running when the all-reduce is issued
  Dev<float> src(c, std::vector<float>(len, static_cast<float>(r + 1)));
  Dev<float> dst(c, std::vector<float>(len, -1000.0f));
  cudaStream_t producer = nullptr;
  DSRSQ_CUDA_CHECK(cudaStreamCreateWithFlags(&producer, cudaStreamNonBlocking));
  DSRSQ_CUDA_CHECK(cudaMemcpyAsync(dst.span().data(), src.span().data(), len * sizeof(float), cudaMemcpyDeviceToDevice,
                                   producer));
  c.set_producer_stream(producer);
  c.all_reduce_sum(dst.span());
  c.set_producer_stream(nullptr);
  DSRSQ_CUDA_CHECK(cudaStreamSynchronize(producer));
  DSRSQ_CUDA_CHECK(cudaStreamDestroy(producer));
  const auto got = dst.host();
  const float want = static_cast<float>(n * (n + 1) / 2);
  std::size_t bad = 0;
  for (float v : got) bad += v != want;
  check(bad == 0 && c.buffer_device() == dsrsq::Device::cuda,
        dsrsq::detail::cat("set_producer_stream orders the all-reduce after the producer's copy (", bad, " wrong)"));
}

void test_host_buffer_rejected(NcclCommunicator& c) {
  std::vector<float> host(16, 1.0f);
  std::string msg;
  try {
    c.all_reduce_sum(std::span<float>(host));
  } catch (const dsrsq::Error& e) {
    msg = e.what();
  }
  check(contains(msg, "not GPU memory") && !c.aborted(), "host buffer rejected with dsrsq::Error: " + msg);
}

// Rank 0 waits for an all-reduce that rank 1 never posts; with a 2 s timeout it
// must throw naming itself and the operation, and abort the communicator.
void test_timeout(NcclCommunicator& c, MPI_Comm sub) {
  const int r = c.rank();
  c.set_timeout(2.0);
  if (r == 0) {
    Dev<float> d(c, std::vector<float>(64, 1.0f));
    std::string msg;
    double waited = 0;
    const double t0 = MPI_Wtime();
    try {
      c.all_reduce_sum(d.span());
    } catch (const dsrsq::Error& e) {
      msg = e.what();
    }
    waited = MPI_Wtime() - t0;
    std::printf("[world %d] timeout message: %s\n", g_world, msg.c_str());
    check(contains(msg, "timeout") && contains(msg, "rank 0 of") && contains(msg, "all_reduce_sum(f32 x 64)") &&
              contains(msg, "aborted"),
          "a collective the peer never joins times out with the rank and operation named");
    check(waited >= 1.5 && waited < 30, dsrsq::detail::cat("timeout fired after ", waited, " s (limit 2 s)"));
    check(c.aborted(), "communicator aborted after the timeout");
    std::string again;
    try {
      c.barrier();
    } catch (const dsrsq::Error& e) {
      again = e.what();
    }
    check(contains(again, "aborted earlier"), "an operation after the abort throws: " + again);
  }
  MPI_Barrier(sub);  // the others abort only after rank 0 has timed out
  if (r != 0) {
    c.abort();
    check(c.aborted(), "peer aborted its communicator");
  }
}

// Host-side helpers: checked even without a GPU (before the skip).
void test_helpers() {
  using dsrsq::dist::local_rank_from_env;
  auto env = [](std::vector<std::pair<const char*, const char*>> vars) {
    return [vars](const char* name) -> const char* {
      for (const auto& [k, v] : vars)
        if (std::string(k) == name) return v;
      return nullptr;
    };
  };
  check(local_rank_from_env(env({})) == std::nullopt, "local_rank_from_env: nothing set");
  check(local_rank_from_env(env({{"SLURM_LOCALID", "3"}})) == 3, "local_rank_from_env: SLURM_LOCALID");
  check(local_rank_from_env(env({{"SLURM_LOCALID", "3"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}})) == 1,
        "local_rank_from_env: OMPI_COMM_WORLD_LOCAL_RANK wins over SLURM_LOCALID");
  check(local_rank_from_env(env({{"MPI_LOCALRANKID", "2"}, {"SLURM_LOCALID", "0"}})) == 2,
        "local_rank_from_env: MPI_LOCALRANKID");
  check(local_rank_from_env(env({{"OMPI_COMM_WORLD_LOCAL_RANK", "x1"}})) == std::nullopt,
        "local_rank_from_env: not a number");
  check(dsrsq::dist::select_device(5, 4) == 1 && dsrsq::dist::select_device(2, 8) == 2, "select_device: modulo");
  check(dsrsq::dist::nccl_type(dsrsq::dist::Scalar::f32) == ncclFloat32 &&
            dsrsq::dist::nccl_type(dsrsq::dist::Scalar::f64) == ncclFloat64 &&
            dsrsq::dist::nccl_type(dsrsq::dist::Scalar::i32) == ncclInt32 &&
            dsrsq::dist::nccl_type(dsrsq::dist::Scalar::i64) == ncclInt64 &&
            dsrsq::dist::nccl_type(dsrsq::dist::Scalar::byte) == ncclUint8,
        "nccl_type mapping");
}

int run(int world_rank, int world_size) {
  test_helpers();
  if (g_failed) return 1;
  // Skip unless every rank sees a device.
  std::string why;
  const int ndev = dsrsq::cuda::device_count(&why);
  int min_dev = 0;
  MPI_Allreduce(&ndev, &min_dev, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (min_dev == 0) {
    if (ndev == 0) std::printf("SKIP test_nccl: no CUDA device on world rank %d (%s)\n", world_rank, why.c_str());
    std::fflush(stdout);
    return 77;
  }
  int nccl_version = 0;
  ncclGetVersion(&nccl_version);
  std::printf("[world %d] %d device(s), device name %s, CUDA runtime %s, NCCL %d\n", world_rank, ndev,
              dsrsq::cuda::device_name(0).c_str(), dsrsq::cuda::runtime_version().c_str(), nccl_version);

  // One NCCL rank per GPU: ranks beyond the node's device count sit out.
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL, &node);
  int local = 0;
  MPI_Comm_rank(node, &local);
  MPI_Comm_free(&node);
  const bool in = local < ndev;
  MPI_Comm sub = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, in ? 0 : MPI_UNDEFINED, world_rank, &sub);
  if (!in) {
    std::printf("[world %d] sits out: local rank %d but only %d GPU(s) on this node (NCCL needs one GPU per rank)\n",
                world_rank, local, ndev);
  } else {
    // Device chosen by the communicator (OMPI_COMM_WORLD_LOCAL_RANK modulo the
    // device count); on one node that is the local rank used for the split.
    NcclCommunicator c(sub, "nccl-test", 60.0);
    int n = 0;
    MPI_Comm_size(sub, &n);
    std::printf("[world %d] NCCL rank %d of %d on GPU %d (world size %d)\n", world_rank, c.rank(), c.size(), c.device(),
                world_size);
    check(c.size() == n, "communicator size matches the MPI sub-communicator");
    check(c.device() == local % ndev, dsrsq::detail::cat("device chosen by local rank: GPU ", c.device()));

    test_all_reduce<float>(c, 1000, "f32");
    test_all_reduce<float>(c, (1u << 22) + 3, "f32");
    test_all_reduce<double>(c, 1000, "f64");
    test_all_reduce<double>(c, (1u << 21) + 5, "f64");
    test_all_reduce<std::int64_t>(c, 12345, "i64");
    test_all_reduce_avg<float>(c, "f32");
    test_all_reduce_avg<double>(c, "f64");
    test_all_gather<float>(c, "f32");
    test_all_gather<double>(c, "f64");
    test_all_gather<std::int64_t>(c, "i64");
    for (int root : {0, c.size() - 1}) {
      test_broadcast<float>(c, root, "f32");
      test_broadcast<std::int64_t>(c, root, "i64");
      test_broadcast<std::byte>(c, root, "byte");
    }
    test_ring(c);
    test_nonblocking(c);
    test_producer_stream(c);
    test_host_buffer_rejected(c);
    test_ring_attention_nccl(c, sub);
    dsrsq::dist::nccl_self_test(c);
    check(true, "nccl_self_test");
    c.barrier();

    if (c.size() >= 2) {
      test_timeout(c, sub);
    } else {
      std::printf("[world %d] timeout test skipped: needs two NCCL ranks (two GPUs)\n", world_rank);
      c.abort();
      std::string msg;
      try {
        c.barrier();
      } catch (const dsrsq::Error& e) {
        msg = e.what();
      }
      check(c.aborted() && contains(msg, "aborted earlier"), "abort(), then an operation throws: " + msg);
    }
    MPI_Comm_free(&sub);
  }
  // Every rank, once the NCCL ranks are done (so no rank waits on a peer that
  // is still in the NCCL tests).
  MPI_Barrier(MPI_COMM_WORLD);
  test_ring_attention_staged();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  dsrsq::mpi::Environment env(argc, argv);
  g_world = env.rank();
  int code = 0;
  try {
    code = run(env.rank(), env.size());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[world %d] test_nccl: %s\n", env.rank(), e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  if (code == 77) return 77;  // every rank: no GPU
  int failed = 0;
  MPI_Allreduce(&g_failed, &failed, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (env.rank() == 0) std::printf("test_nccl: %d check(s) failed\n", failed);
  return failed ? 1 : 0;
}
