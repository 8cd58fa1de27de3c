#include "kv/rckv.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>

#include "core/error.hpp"

// LAPACK's symmetric eigensolver (OpenBLAS ships it), referenced weakly: when
// the linked BLAS has no LAPACK the pointer is null and the Jacobi solver below
// is used instead.
extern "C" void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
                        double* work, const int* lwork, int* iwork, const int* liwork, int* info, std::size_t,
                        std::size_t) __attribute__((weak));

namespace dsrsq::compress {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

std::size_t round64(std::size_t n) { return (n + 63) / 64 * 64; }

void check_samples(const char* what, const TensorView& x, std::int64_t C) {
  DSRSQ_INPUT_CHECK(x.shape.rank == 2 && x.dtype == DType::f32 && x.shape[1] == C && x.shape[0] >= 1, what,
                    ": samples must be f32 (N, C=", C, ") with N >= 1, got ", x.str());
  DSRSQ_INPUT_CHECK(x.device == Device::cpu, what, ": samples must be in host memory");
}

// Symmetric eigen-decomposition by cyclic Jacobi rotations, in place on a
// (n, n) row-major matrix: on return the diagonal of a holds the eigenvalues
// and the columns of vecs (n, n) the eigenvectors.
void jacobi_eigen(std::vector<double>& a, std::int64_t n, std::vector<double>& vecs) {
  vecs.assign(static_cast<std::size_t>(n * n), 0.0);
  for (std::int64_t i = 0; i < n; ++i) vecs[static_cast<std::size_t>(i * n + i)] = 1.0;
  auto A = [&](std::int64_t r, std::int64_t c) -> double& { return a[static_cast<std::size_t>(r * n + c)]; };
  auto V = [&](std::int64_t r, std::int64_t c) -> double& { return vecs[static_cast<std::size_t>(r * n + c)]; };
  double total = 0;
  for (double x : a) total += x * x;
  if (total == 0) return;
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (std::int64_t p = 0; p < n; ++p)
      for (std::int64_t q = p + 1; q < n; ++q) off += A(p, q) * A(p, q);
    if (off <= 1e-30 * total) break;
    for (std::int64_t p = 0; p < n; ++p)
      for (std::int64_t q = p + 1; q < n; ++q) {
        const double apq = A(p, q);
        if (apq == 0.0) continue;
        const double app = A(p, p), aqq = A(q, q);
        if (std::abs(apq) < 1e-18 * std::sqrt(std::abs(app * aqq)) ) {
          A(p, q) = A(q, p) = 0.0;
          continue;
        }
        const double theta = (aqq - app) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (std::int64_t k = 0; k < n; ++k) {  // columns p, q: A J
          const double akp = A(k, p), akq = A(k, q);
          A(k, p) = c * akp - s * akq;
          A(k, q) = s * akp + c * akq;
        }
        for (std::int64_t k = 0; k < n; ++k) {  // rows p, q: J^T (A J)
          const double apk = A(p, k), aqk = A(q, k);
          A(p, k) = c * apk - s * aqk;
          A(q, k) = s * apk + c * aqk;
        }
        A(p, q) = A(q, p) = 0.0;
        for (std::int64_t k = 0; k < n; ++k) {
          const double vkp = V(k, p), vkq = V(k, q);
          V(k, p) = c * vkp - s * vkq;
          V(k, q) = s * vkp + c * vkq;
        }
      }
  }
}

// Symmetric eigen-decomposition of a (n, n) row-major: vals (n) and vecs
// (n, n) row-major with eigenvector j in column j. LAPACK dsyevd when linked,
// else cyclic Jacobi (fine up to C ~ 256; O(C^3) per sweep with strided access).
void eigen_sym(std::vector<double> a, std::int64_t n, std::vector<double>& vals, std::vector<double>& vecs,
               bool force_jacobi = false) {
  vals.assign(static_cast<std::size_t>(n), 0.0);
  if (!force_jacobi && dsyevd_ != nullptr && n <= 46340) {
    const int ni = static_cast<int>(n);
    int info = 0, lwork = -1, liwork = -1, iwq = 0;
    double wq = 0;
    std::vector<double> ac = a;  // symmetric: row- and column-major agree
    dsyevd_("V", "U", &ni, ac.data(), &ni, vals.data(), &wq, &lwork, &iwq, &liwork, &info, 1, 1);
    if (info == 0) {
      lwork = static_cast<int>(wq) + 1;
      liwork = iwq;
      std::vector<double> work(static_cast<std::size_t>(lwork));
      std::vector<int> iwork(static_cast<std::size_t>(std::max(liwork, 1)));
      dsyevd_("V", "U", &ni, ac.data(), &ni, vals.data(), work.data(), &lwork, iwork.data(), &liwork, &info, 1, 1);
    }
    if (info == 0) {
      // Column-major output: eigenvector j is ac[j * n .. j * n + n).
      vecs.assign(static_cast<std::size_t>(n * n), 0.0);
      for (std::int64_t j = 0; j < n; ++j)
        for (std::int64_t r = 0; r < n; ++r) vecs[static_cast<std::size_t>(r * n + j)] = ac[static_cast<std::size_t>(j * n + r)];
      return;
    }
  }
  jacobi_eigen(a, n, vecs);
  for (std::int64_t i = 0; i < n; ++i) vals[static_cast<std::size_t>(i)] = a[static_cast<std::size_t>(i * n + i)];
}

// P (dc, C) = top-dc eigenvectors of X^T X (rows), U (C, dc) = P^T.
void pca_fit(const float* x, std::int64_t N, std::int64_t C, std::int64_t dc, float* P, float* U) {
  std::vector<double> m(static_cast<std::size_t>(C * C), 0.0);
#pragma omp parallel for schedule(dynamic, 4)
  for (std::int64_t i = 0; i < C; ++i) {
    double* row = m.data() + i * C;
    for (std::int64_t n = 0; n < N; ++n) {
      const float* xn = x + n * C;
      const double xi = xn[i];
      if (xi == 0.0) continue;
      for (std::int64_t j = i; j < C; ++j) row[j] += xi * static_cast<double>(xn[j]);
    }
  }
  for (std::int64_t i = 0; i < C; ++i)
    for (std::int64_t j = 0; j < i; ++j) m[static_cast<std::size_t>(i * C + j)] = m[static_cast<std::size_t>(j * C + i)];
  std::vector<double> vals, vecs;
  eigen_sym(std::move(m), C, vals, vecs);
  std::vector<std::int64_t> idx(static_cast<std::size_t>(C));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) {
    return vals[static_cast<std::size_t>(a)] > vals[static_cast<std::size_t>(b)];
  });
  for (std::int64_t r = 0; r < dc; ++r) {
    const std::int64_t col = idx[static_cast<std::size_t>(r)];
    std::int64_t big = 0;
    for (std::int64_t c = 1; c < C; ++c)
      if (std::abs(vecs[static_cast<std::size_t>(c * C + col)]) > std::abs(vecs[static_cast<std::size_t>(big * C + col)]))
        big = c;
    const double sign = vecs[static_cast<std::size_t>(big * C + col)] < 0 ? -1.0 : 1.0;
    for (std::int64_t c = 0; c < C; ++c) {
      const auto val = static_cast<float>(sign * vecs[static_cast<std::size_t>(c * C + col)]);
      P[r * C + c] = val;
      U[c * dc + r] = val;
    }
  }
}

// Loss sum (not normalised) of ||U P x - x||^2 over the N rows, in f64.
double recon_sq_sum(const float* x, std::int64_t N, std::int64_t C, std::int64_t dc, const float* P, const float* U) {
  double total = 0;
#pragma omp parallel
  {
    std::vector<double> z(static_cast<std::size_t>(dc));
#pragma omp for reduction(+ : total) schedule(static)
    for (std::int64_t n = 0; n < N; ++n) {
      const float* xn = x + n * C;
      for (std::int64_t i = 0; i < dc; ++i) {
        double s = 0;
        const float* pr = P + i * C;
        for (std::int64_t c = 0; c < C; ++c) s += static_cast<double>(pr[c]) * xn[c];
        z[static_cast<std::size_t>(i)] = s;
      }
      for (std::int64_t c = 0; c < C; ++c) {
        double s = 0;
        const float* ur = U + c * dc;
        for (std::int64_t i = 0; i < dc; ++i) s += static_cast<double>(ur[i]) * z[static_cast<std::size_t>(i)];
        const double r = s - xn[c];
        total += r * r;
      }
    }
  }
  return total;
}

// dP += scale * sum_n (U^T r_n) x_n^T, dU += scale * sum_n r_n z_n^T.
void recon_grad(const float* x, std::int64_t N, std::int64_t C, std::int64_t dc, const float* P, const float* U,
                double scale, float* dP, float* dU) {
  std::vector<double> Z(static_cast<std::size_t>(N * dc)), R(static_cast<std::size_t>(N * C)),
      G(static_cast<std::size_t>(N * dc));
#pragma omp parallel for schedule(static)
  for (std::int64_t n = 0; n < N; ++n) {
    const float* xn = x + n * C;
    double* z = Z.data() + n * dc;
    double* r = R.data() + n * C;
    double* g = G.data() + n * dc;
    for (std::int64_t i = 0; i < dc; ++i) {
      double s = 0;
      for (std::int64_t c = 0; c < C; ++c) s += static_cast<double>(P[i * C + c]) * xn[c];
      z[i] = s;
    }
    for (std::int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (std::int64_t i = 0; i < dc; ++i) s += static_cast<double>(U[c * dc + i]) * z[i];
      r[c] = s - xn[c];
    }
    for (std::int64_t i = 0; i < dc; ++i) g[i] = 0;
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t i = 0; i < dc; ++i) g[i] += static_cast<double>(U[c * dc + i]) * r[c];
  }
#pragma omp parallel for schedule(static)
  for (std::int64_t c = 0; c < C; ++c) {
    std::vector<double> acc(static_cast<std::size_t>(dc), 0.0);
    for (std::int64_t n = 0; n < N; ++n) {
      const double rc = R[static_cast<std::size_t>(n * C + c)];
      const double* z = Z.data() + n * dc;
      for (std::int64_t i = 0; i < dc; ++i) acc[static_cast<std::size_t>(i)] += rc * z[i];
    }
    for (std::int64_t i = 0; i < dc; ++i) dU[c * dc + i] += static_cast<float>(scale * acc[static_cast<std::size_t>(i)]);
  }
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < dc; ++i) {
    std::vector<double> acc(static_cast<std::size_t>(C), 0.0);
    for (std::int64_t n = 0; n < N; ++n) {
      const double gi = G[static_cast<std::size_t>(n * dc + i)];
      const float* xn = x + n * C;
      for (std::int64_t c = 0; c < C; ++c) acc[static_cast<std::size_t>(c)] += gi * xn[c];
    }
    for (std::int64_t c = 0; c < C; ++c) dP[i * C + c] += static_cast<float>(scale * acc[static_cast<std::size_t>(c)]);
  }
}

}  // namespace

namespace detail {
bool lapack_eigen_available() { return dsyevd_ != nullptr; }
void symmetric_eigen(const std::vector<double>& a, std::int64_t n, std::vector<double>& vals,
                     std::vector<double>& vecs, bool force_jacobi) {
  DSRSQ_REQUIRE(n >= 1 && a.size() == static_cast<std::size_t>(n * n), "symmetric_eigen: a must be (n, n)");
  eigen_sym(a, n, vals, vecs, force_jacobi);
}
}  // namespace detail

// ---- RckvConfig -----------------------------------------------------------------

void RckvConfig::validate(const ModelConfig& model) const {
  DSRSQ_INPUT_CHECK(d_c >= 1 && d_c <= model.d_model, "rckv_d_c: the latent size must lie in [1, d_model=",
                    model.d_model, "], got ", d_c);
  DSRSQ_INPUT_CHECK(window >= 0, "rckv_window: the uncompressed window must be >= 0 tokens, got ", window);
  DSRSQ_INPUT_CHECK(tau >= 0.0 && std::isfinite(tau), "rckv_tau: the eviction temperature must be finite and >= 0, got ",
                    tau);
  DSRSQ_INPUT_CHECK(importance_decay >= 0.0 && importance_decay < 1.0,
                    "rckv_importance_decay: must lie in [0, 1), got ", importance_decay);
  if (sqa) {
    DSRSQ_INPUT_CHECK(sqa_cfg.clusters >= 1, "rckv_sqa_clusters: must be >= 1, got ", sqa_cfg.clusters);
    DSRSQ_INPUT_CHECK(sqa_cfg.top_clusters >= 1, "rckv_sqa_top_clusters: must be >= 1, got ", sqa_cfg.top_clusters);
    DSRSQ_INPUT_CHECK(sqa_cfg.lloyd_steps >= 0, "rckv_sqa_lloyd_steps: must be >= 0, got ", sqa_cfg.lloyd_steps);
  }
}

// ---- RckvProjections ------------------------------------------------------------

RckvProjections::RckvProjections(const ModelConfig& model, const RckvConfig& cfg)
    : L_(model.n_layers), C_(model.d_model), dc_(cfg.d_c) {
  cfg.validate(model);
}

std::int64_t RckvProjections::num_parameters(const ModelConfig& model, const RckvConfig& cfg) {
  cfg.validate(model);
  return model.n_layers * 4 * cfg.d_c * model.d_model;
}

void RckvProjections::bind(float* params, float* grads) {
  DSRSQ_INPUT_CHECK(params != nullptr, "RckvProjections::bind: parameter buffer is null");
  params_ = params;
  grads_ = grads;
}

float* RckvProjections::at(std::int64_t l, int which) const {
  DSRSQ_REQUIRE(params_ != nullptr, "RckvProjections: bind() the parameter buffer first");
  DSRSQ_REQUIRE(l >= 0 && l < L_, "RckvProjections: layer ", l, " outside [0, ", L_, ")");
  return params_ + (l * 4 + which) * dc_ * C_;
}

std::vector<Param> RckvProjections::params() const {
  DSRSQ_REQUIRE(params_ != nullptr, "RckvProjections: bind() the parameter buffer first");
  static const char* names[4] = {"pk", "pv", "uk", "uv"};
  std::vector<Param> out;
  for (std::int64_t l = 0; l < L_; ++l)
    for (int w = 0; w < 4; ++w) {
      const std::int64_t off = (l * 4 + w) * dc_ * C_;
      const Shape s = w < 2 ? Shape{dc_, C_} : Shape{C_, dc_};
      out.push_back(Param{dsrsq::detail::cat("rckv.", l, ".", names[w]), TensorView(params_ + off, s),
                          grads_ ? TensorView(grads_ + off, s) : TensorView(), false});
    }
  return out;
}

void RckvProjections::init_orthonormal(std::uint64_t seed) {
  for (std::int64_t l = 0; l < L_; ++l)
    for (int w = 0; w < 2; ++w) {
      Rng rng(seed, static_cast<std::uint64_t>(l * 2 + w));
      std::vector<double> p(static_cast<std::size_t>(dc_ * C_));
      for (std::int64_t i = 0; i < dc_; ++i) {
        double* row = p.data() + i * C_;
        for (int attempt = 0;; ++attempt) {
          for (std::int64_t c = 0; c < C_; ++c) row[c] = rng.normal();
          // Modified Gram-Schmidt, twice for orthogonality to working precision.
          for (int pass = 0; pass < 2; ++pass)
            for (std::int64_t j = 0; j < i; ++j) {
              const double* rj = p.data() + j * C_;
              double d = 0;
              for (std::int64_t c = 0; c < C_; ++c) d += row[c] * rj[c];
              for (std::int64_t c = 0; c < C_; ++c) row[c] -= d * rj[c];
            }
          double nn = 0;
          for (std::int64_t c = 0; c < C_; ++c) nn += row[c] * row[c];
          if (nn > 1e-12 || attempt > 20) {
            const double inv = 1.0 / std::sqrt(nn);
            for (std::int64_t c = 0; c < C_; ++c) row[c] *= inv;
            break;
          }
        }
      }
      float* P = at(l, w);
      float* U = at(l, w + 2);
      for (std::int64_t i = 0; i < dc_; ++i)
        for (std::int64_t c = 0; c < C_; ++c) {
          const auto val = static_cast<float>(p[static_cast<std::size_t>(i * C_ + c)]);
          P[i * C_ + c] = val;
          U[c * dc_ + i] = val;
        }
    }
}

void RckvProjections::init_pca(std::int64_t layer, const TensorView& k, const TensorView& v) {
  DSRSQ_INPUT_CHECK(layer >= 0 && layer < L_, "rckv init_pca: layer ", layer, " outside [0, ", L_, ")");
  check_samples("rckv init_pca: k", k, C_);
  check_samples("rckv init_pca: v", v, C_);
  pca_fit(k.ptr<float>(), k.shape[0], C_, dc_, pk(layer), uk(layer));
  pca_fit(v.ptr<float>(), v.shape[0], C_, dc_, pv(layer), uv(layer));
}

double RckvProjections::compression_loss(std::int64_t layer, const TensorView& k, const TensorView& v) {
  DSRSQ_INPUT_CHECK(layer >= 0 && layer < L_, "rckv compression_loss: layer ", layer, " outside [0, ", L_, ")");
  check_samples("rckv compression_loss: k", k, C_);
  check_samples("rckv compression_loss: v", v, C_);
  DSRSQ_INPUT_CHECK(k.shape[0] == v.shape[0], "rckv compression_loss: k has ", k.shape[0], " rows, v has ", v.shape[0]);
  const std::int64_t N = k.shape[0];
  saved_layer_ = layer;
  saved_n_ = N;
  saved_k_.assign(k.ptr<float>(), k.ptr<float>() + N * C_);
  saved_v_.assign(v.ptr<float>(), v.ptr<float>() + N * C_);
  const double s = recon_sq_sum(saved_k_.data(), N, C_, dc_, pk(layer), uk(layer)) +
                   recon_sq_sum(saved_v_.data(), N, C_, dc_, pv(layer), uv(layer));
  return s / (static_cast<double>(N) * static_cast<double>(C_));
}

void RckvProjections::compression_loss_backward(double dloss) {
  DSRSQ_REQUIRE(saved_layer_ >= 0, "rckv compression_loss_backward: no compression_loss() call to differentiate");
  DSRSQ_REQUIRE(grads_ != nullptr, "rckv compression_loss_backward: bind() a gradient buffer first");
  const std::int64_t l = saved_layer_, N = saved_n_;
  const double scale = 2.0 * dloss / (static_cast<double>(N) * static_cast<double>(C_));
  auto g = [&](int w) { return grads_ + (l * 4 + w) * dc_ * C_; };
  recon_grad(saved_k_.data(), N, C_, dc_, pk(l), uk(l), scale, g(0), g(2));
  recon_grad(saved_v_.data(), N, C_, dc_, pv(l), uv(l), scale, g(1), g(3));
}

// ---- RckvPolicy -------------------------------------------------------------------

RckvPolicy::RckvPolicy(const ModelConfig& model, Backend& backend, const RckvProjections& proj, RckvConfig cfg)
    : mc_(model), be_(backend), proj_(proj), cfg_(std::move(cfg)),
      scratch_("rckv_scratch", std::size_t{1} << 20, backend.allocator()) {
  cfg_.validate(mc_);
  DSRSQ_INPUT_CHECK(proj.layers() == mc_.n_layers && proj.channels() == mc_.d_model && proj.latent() == cfg_.d_c,
                    "KV policy 'rckv': projections (layers ", proj.layers(), ", C ", proj.channels(), ", d_c ",
                    proj.latent(), ") do not match the model/config (layers ", mc_.n_layers, ", C ", mc_.d_model,
                    ", d_c ", cfg_.d_c, ")");
  DSRSQ_INPUT_CHECK(backend.device() == Device::cpu, "KV policy 'rckv': runs on the CPU backend only");
}

std::size_t RckvPolicy::slot_bytes() const { return 2 * static_cast<std::size_t>(cfg_.d_c) * 4 + 4 + 4; }
std::size_t RckvPolicy::window_token_bytes() const { return 2 * static_cast<std::size_t>(mc_.d_model) * 4 + 4; }

void RckvPolicy::begin(const SequenceInfo& info, const KVBudget& budget) {
  kvdetail::check_sequence(mc_, info);
  const std::int64_t total = info.prompt_len + info.max_new_tokens;
  const std::size_t requested = budget.resolve(mc_, info.budget_basis());
  begun_ = false;
  arena_.reset();
  scratch_.reset();
  scratch_.reset_peak();
  stats_.clear();
  info_ = info;
  decoding_ = false;
  sqa_active_ = false;
  requested_ = requested;

  const std::int64_t L = mc_.n_layers, B = info.batch, NH = mc_.n_heads, HS = mc_.head_size(), C = mc_.d_model,
                     dc = cfg_.d_c;
  W_ = std::min(cfg_.window, total);
  const auto Lz = static_cast<std::size_t>(L);
  m_ = cfg_.sqa ? cfg_.sqa_cfg.clusters : 0;
  if (cfg_.buffer > 0) {
    S_ = cfg_.buffer;
  } else {
    // Everything kept counts inside the budget: the window, and with SQA its
    // index (centroids and cluster sizes per layer, an assignment per slot and head).
    const std::size_t sqa_fixed = cfg_.sqa ? static_cast<std::size_t>(NH * m_ * HS + NH * m_) * 4 : 0;
    const std::size_t sqa_slot = cfg_.sqa ? static_cast<std::size_t>(NH) * 4 : 0;
    const std::size_t fixed_all = Lz * (static_cast<std::size_t>(W_) * window_token_bytes() + sqa_fixed);
    const std::size_t fit = requested > fixed_all ? (requested - fixed_all) / (Lz * (slot_bytes() + sqa_slot)) : 0;
    S_ = std::max<std::int64_t>(1, static_cast<std::int64_t>(fit));
    S_ = std::min(S_, std::max<std::int64_t>(1, total - W_));
  }
  const std::size_t sqa_row = cfg_.sqa ? static_cast<std::size_t>(NH * m_ * HS + NH * S_ + NH * m_) * 4 : 0;
  achieved_ = Lz * (static_cast<std::size_t>(S_) * slot_bytes() + static_cast<std::size_t>(W_) * window_token_bytes() +
                    sqa_row);

  // Two blocks (f32, i32) for all layers and rows.
  const std::int64_t f_row = 2 * S_ * dc + S_ + 2 * W_ * C + NH * m_ * HS;  // per (layer, row)
  const std::int64_t i_row = S_ + W_ + (cfg_.sqa ? NH * S_ + NH * m_ : 0);
  const std::int64_t nf = L * B * f_row, ni = L * B * i_row;
  arena_ = std::make_unique<Arena>("kv_cache_rckv", round64(static_cast<std::size_t>(nf) * 4) +
                                                        round64(static_cast<std::size_t>(ni) * 4),
                                   be_.allocator());
  float* fb = arena_->zeros(Shape{nf}, DType::f32).ptr<float>();
  std::int32_t* ib = arena_->allocate(Shape{ni}, DType::i32).ptr<std::int32_t>();
  std::fill_n(ib, ni, -1);
  ck_.clear(); cv_.clear(); wimp_.clear(); wk_.clear(); wv_.clear(); bpos_.clear(); wpos_.clear();
  cent_.clear(); cassign_.clear(); csize_.clear();
  for (std::int64_t l = 0; l < L; ++l) {
    ck_.push_back(fb); fb += B * S_ * dc;
    cv_.push_back(fb); fb += B * S_ * dc;
    wimp_.push_back(fb); fb += B * S_;
    wk_.push_back(fb); fb += B * W_ * C;
    wv_.push_back(fb); fb += B * W_ * C;
    cent_.push_back(fb); fb += B * NH * m_ * HS;
    bpos_.push_back(ib); ib += B * S_;
    wpos_.push_back(ib); ib += B * W_;
    cassign_.push_back(ib); ib += cfg_.sqa ? B * NH * S_ : 0;
    csize_.push_back(ib); ib += cfg_.sqa ? B * NH * m_ : 0;
  }
  m_eff_.assign(Lz, 0);
  st_.assign(Lz, LayerState{});
  rng_.clear();
  for (std::int64_t l = 0; l < L; ++l) rng_.emplace_back(cfg_.seed, static_cast<std::uint64_t>(l));
  resident_ = peak_ = 0;
  begun_ = true;
}

void RckvPolicy::reconstruct_keys(std::int64_t layer, std::int64_t b, std::int64_t n, float* dst) const {
  const std::int64_t C = mc_.d_model, dc = cfg_.d_c, NH = mc_.n_heads, HS = mc_.head_size();
  const auto l = static_cast<std::size_t>(layer);
  be_.linear_fwd(LinearArgs{TensorView(ck_[l] + b * S_ * dc, Shape{n, dc}),
                            TensorView(proj_.uk(layer), Shape{C, dc}), TensorView(), TensorView(dst, Shape{n, C})});
  be_.rope_fwd(RopeArgs{TensorView(dst, Shape{n, NH, HS}), TensorView(bpos_[l] + b * S_, Shape{n}), mc_.rope_theta});
}

std::int64_t RckvPolicy::choose_victim(const float* w, std::int64_t n, double tau, Rng& rng) {
  DSRSQ_REQUIRE(n >= 1, "rckv choose_victim: empty buffer");
  std::int64_t best = 0;
  for (std::int64_t i = 1; i < n; ++i)
    if (w[i] < w[best]) best = i;
  if (tau <= 0.0) return best;
  const double wmin = w[best];
  double total = 0;
  for (std::int64_t i = 0; i < n; ++i) total += std::exp(-(static_cast<double>(w[i]) - wmin) / tau);
  const double u = rng.uniform() * total;
  double run = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    run += std::exp(-(static_cast<double>(w[i]) - wmin) / tau);
    if (run > u) return i;
  }
  return n - 1;  // rounding at the end of the sum
}

void RckvPolicy::attend(std::int64_t layer, TensorView q, TensorView k, TensorView v, TensorView pos,
                        TensorView out) {
  kvdetail::check_attend("KV policy 'rckv'", begun_, mc_, info_.batch, layer, q, k, v, pos, out);
  const std::int64_t B = info_.batch, Tn = q.shape[1], NH = mc_.n_heads, HS = mc_.head_size(), C = mc_.d_model,
                     dc = cfg_.d_c;
  const auto l = static_cast<std::size_t>(layer);
  LayerState& st = st_[l];
  ArenaScope scope(scratch_);
  const auto* pp = pos.ptr<std::int32_t>();

  // 1. Queries rotated at their original positions (in place: caller's scratch).
  be_.rope_fwd(RopeArgs{q.reshaped(Shape{B * Tn, NH, HS}), pos.reshaped(Shape{B * Tn}), mc_.rope_theta});

  // 2. Window + new tokens: exact keys (rotated copies; k stays pre-RoPE for push()).
  const std::int64_t Sw = st.win_len + Tn;
  TensorView Kw = scratch_.allocate(Shape{B, Sw, NH, HS}, DType::f32);
  TensorView Vw = scratch_.allocate(Shape{B, Sw, NH, HS}, DType::f32);
  TensorView kpw = scratch_.allocate(Shape{B, Sw}, DType::i32);
  {
    float* kd = Kw.ptr<float>();
    float* vd = Vw.ptr<float>();
    std::int32_t* pd = kpw.ptr<std::int32_t>();
    const float* ks = k.ptr<float>();
    const float* vs = v.ptr<float>();
    const std::size_t row = static_cast<std::size_t>(C) * sizeof(float);
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t i = 0; i < st.win_len; ++i) {
        const std::int64_t r = (st.win_head + i) % W_;
        std::memcpy(kd + (b * Sw + i) * C, wk_[l] + (b * W_ + r) * C, row);
        std::memcpy(vd + (b * Sw + i) * C, wv_[l] + (b * W_ + r) * C, row);
        pd[b * Sw + i] = wpos_[l][b * W_ + r];
      }
      std::memcpy(kd + (b * Sw + st.win_len) * C, ks + b * Tn * C, row * static_cast<std::size_t>(Tn));
      std::memcpy(vd + (b * Sw + st.win_len) * C, vs + b * Tn * C, row * static_cast<std::size_t>(Tn));
      std::copy(pp + b * Tn, pp + (b + 1) * Tn, pd + b * Sw + st.win_len);
    }
  }
  // 2b. As in DSRSQ's training forward (RckvTrainTransform): new tokens this call
  // pushes out of the window (the first Tn - W) are seen by every query of the
  // call through their reconstruction U P x, the way later calls will see them.
  // Only the attention copies change: push() compresses the original k, v.
  if (cfg_.train_matched_prefill && Tn > W_) {
    const std::int64_t M = Tn - W_;
    TensorView x = scratch_.allocate(Shape{M, C}, DType::f32);
    TensorView z = scratch_.allocate(Shape{M, dc}, DType::f32);
    TensorView xh = scratch_.allocate(Shape{M, C}, DType::f32);
    const std::size_t bytes = static_cast<std::size_t>(M * C) * sizeof(float);
    for (int kind = 0; kind < 2; ++kind) {
      float* dst = (kind == 0 ? Kw : Vw).ptr<float>();
      const TensorView P(const_cast<float*>(kind == 0 ? proj_.pk(layer) : proj_.pv(layer)), Shape{dc, C});
      const TensorView U(const_cast<float*>(kind == 0 ? proj_.uk(layer) : proj_.uv(layer)), Shape{C, dc});
      for (std::int64_t b = 0; b < B; ++b) {
        float* rows = dst + (b * Sw + st.win_len) * C;
        std::memcpy(x.data, rows, bytes);
        be_.linear_fwd(LinearArgs{x, P, {}, z});
        be_.linear_fwd(LinearArgs{z, U, {}, xh});
        std::memcpy(rows, xh.data, bytes);
      }
    }
  }
  be_.rope_fwd(RopeArgs{Kw.reshaped(Shape{B * Sw, NH, HS}), kpw.reshaped(Shape{B * Sw}), mc_.rope_theta});
  // 2c. Observation-window importance of a multi-token call's tokens (SnapKV's
  // scoring, ALGORITHMS.md section 1 / 13.3 trick 9): the attention mass each new
  // token receives from the call's last max(W, 1) queries (the question, for a
  // prompt), dense softmax over the window and the call, averaged over heads
  // and those queries. push() starts a token's importance there and evicts by it.
  new_mass_.assign(static_cast<std::size_t>(B * Tn), -1.0f);
  if (cfg_.observe_prefill && Tn > 1) {
    const std::int64_t obs = std::min<std::int64_t>(Tn, std::max<std::int64_t>(W_, 1));
    const double scale = 1.0 / std::sqrt(static_cast<double>(HS));
    const float* qd = q.ptr<float>();
    const float* kd = Kw.ptr<float>();
    const std::int32_t* kp = kpw.ptr<std::int32_t>();
    for (std::int64_t b = 0; b < B; ++b) {
      std::vector<double> mass(static_cast<std::size_t>(Tn), 0.0), e(static_cast<std::size_t>(Sw));
      for (std::int64_t qi = Tn - obs; qi < Tn; ++qi)
        for (std::int64_t h = 0; h < NH; ++h) {
          const float* qv = qd + ((b * Tn + qi) * NH + h) * HS;
          double mx = -std::numeric_limits<double>::infinity();
          for (std::int64_t j = 0; j < Sw; ++j) {
            double sc = -std::numeric_limits<double>::infinity();
            if (kp[b * Sw + j] <= pp[b * Tn + qi]) {
              const float* kv = kd + (b * Sw + j) * C + h * HS;
              double d = 0;
              for (std::int64_t x = 0; x < HS; ++x) d += static_cast<double>(qv[x]) * kv[x];
              sc = d * scale;
              mx = std::max(mx, sc);
            }
            e[static_cast<std::size_t>(j)] = sc;
          }
          double Z = 0;
          for (auto& x : e) Z += (x = std::isinf(x) ? 0.0 : std::exp(x - mx));
          for (std::int64_t i = 0; i < Tn; ++i) mass[static_cast<std::size_t>(i)] += e[static_cast<std::size_t>(st.win_len + i)] / Z;
        }
      for (std::int64_t i = 0; i < Tn; ++i)
        new_mass_[static_cast<std::size_t>(b * Tn + i)] = static_cast<float>(mass[static_cast<std::size_t>(i)] / static_cast<double>(obs * NH));
    }
  }
  TensorView lse_w = scratch_.allocate(Shape{B, NH, Tn}, DType::f32);
  if (cfg_.sqa && Tn > 1) {
    // SQA over the call's tokens (and the window), as in training: k-means over
    // their keys, each query attends exactly to its top-k_c clusters.
    const attention::ClusterPlan plan = attention::cluster_plan(q, Kw, pos, kpw, cfg_.sqa_cfg);
    attention::cluster_attention_fwd(be_, plan, AttentionArgs{q, Kw, Vw, out, lse_w, pos, kpw, true, 0.0});
  } else {
    be_.attention_fwd(AttentionArgs{q, Kw, Vw, out, lse_w, pos, kpw, true, 0.0});
  }

  // 3. Buffer: reconstructed, rotated keys; latent values; merged into out.
  const std::int64_t n = st.buf_len;
  std::vector<double> buf_keys_used(static_cast<std::size_t>(B * Tn), 0.0);  // summed over heads
  if (n > 0) {
    TensorView Kb = scratch_.allocate(Shape{B, n, C}, DType::f32);
    float* kb = Kb.ptr<float>();
    for (std::int64_t b = 0; b < B; ++b) reconstruct_keys(layer, b, n, kb + b * n * C);
    const bool use_sqa = decoding_ && m_eff_[l] > 0;
    const std::int64_t me = m_eff_[l];
    const std::int64_t kc = std::min<std::int64_t>(cfg_.sqa_cfg.top_clusters, std::max<std::int64_t>(me, 1));
    const double scale = 1.0 / std::sqrt(static_cast<double>(HS));
    const double decay = cfg_.importance_decay;
    const float* qd = q.ptr<float>();
    float* od = out.ptr<float>();
    const float* lw = lse_w.ptr<float>();
    const float* cvl = cv_[l];
    const float* uv = proj_.uv(layer);
    const std::int32_t* bp = bpos_[l];
    std::vector<double> acc(static_cast<std::size_t>(B * n), 0.0);
#pragma omp parallel if (B * Tn > 1)  // one decode row: no team to wake and spin
    {
      std::vector<double> local(static_cast<std::size_t>(B * n), 0.0);
      std::vector<double> e(static_cast<std::size_t>(n)), z(static_cast<std::size_t>(dc));
      std::vector<char> chosen(static_cast<std::size_t>(std::max<std::int64_t>(me, 1)));
      std::vector<std::pair<double, std::int64_t>> cs;
#pragma omp for schedule(static)
      for (std::int64_t bi = 0; bi < B * Tn; ++bi) {
        const std::int64_t b = bi / Tn, i = bi % Tn;
        const std::int32_t qp = pp[bi];
        const double coef = (1.0 - decay) * std::pow(decay, static_cast<double>(Tn - 1 - i));
        for (std::int64_t h = 0; h < NH; ++h) {
          const float* qv = qd + (bi * NH + h) * HS;
          const std::int32_t* as = use_sqa ? cassign_[l] + (b * NH + h) * S_ : nullptr;
          if (use_sqa) {
            // Score the non-empty centroids; keep the top kc (ties: lower index).
            const float* cen = cent_[l] + (b * NH + h) * m_ * HS;
            const std::int32_t* sz = csize_[l] + (b * NH + h) * m_;
            cs.clear();
            for (std::int64_t c = 0; c < me; ++c) {
              chosen[static_cast<std::size_t>(c)] = 0;
              if (sz[c] <= 0) continue;
              double s = 0;
              for (std::int64_t d = 0; d < HS; ++d) s += static_cast<double>(qv[d]) * cen[c * HS + d];
              cs.emplace_back(-s, c);
            }
            const std::size_t take = std::min<std::size_t>(static_cast<std::size_t>(kc), cs.size());
            std::partial_sort(cs.begin(), cs.begin() + static_cast<std::ptrdiff_t>(take), cs.end());
            for (std::size_t t = 0; t < take; ++t) chosen[static_cast<std::size_t>(cs[t].second)] = 1;
          }
          double mx = kNegInf;
          std::int64_t used = 0;
          for (std::int64_t j = 0; j < n; ++j) {
            double s = kNegInf;
            const bool visible = bp[b * S_ + j] <= qp && (!as || (as[j] >= 0 && chosen[static_cast<std::size_t>(as[j])]));
            if (visible) {
              const float* kv = kb + (b * n + j) * C + h * HS;
              double d = 0;
              for (std::int64_t x = 0; x < HS; ++x) d += static_cast<double>(qv[x]) * kv[x];
              s = d * scale;
              mx = std::max(mx, s);
              ++used;
            }
            e[static_cast<std::size_t>(j)] = s;
          }
          if (used == 0) continue;  // no buffer key: the window part stands
          double Z = 0;
          for (std::int64_t j = 0; j < n; ++j) {
            double& ej = e[static_cast<std::size_t>(j)];
            ej = ej == kNegInf ? 0.0 : std::exp(ej - mx);
            Z += ej;
          }
          const double lse_b = mx + std::log(Z);
          std::fill(z.begin(), z.end(), 0.0);
          for (std::int64_t j = 0; j < n; ++j) {
            const double pj = e[static_cast<std::size_t>(j)] / Z;
            if (pj == 0.0) continue;
            const float* c = cvl + (b * S_ + j) * dc;
            for (std::int64_t x = 0; x < dc; ++x) z[static_cast<std::size_t>(x)] += pj * c[x];
          }
          const double lw_ = lw[(b * NH + h) * Tn + i];
          const double m = std::max(lse_b, lw_);
          const double ab = std::exp(lse_b - m);
          const double aw = lw_ == kNegInf ? 0.0 : std::exp(lw_ - m);
          const double fb = ab / (ab + aw), fw = aw / (ab + aw);
          float* o = od + (bi * NH + h) * HS;
          for (std::int64_t r = 0; r < HS; ++r) {
            const float* ur = uv + (h * HS + r) * dc;
            double ob = 0;
            for (std::int64_t x = 0; x < dc; ++x) ob += static_cast<double>(ur[x]) * z[static_cast<std::size_t>(x)];
            o[r] = static_cast<float>(fb * ob + fw * static_cast<double>(o[r]));
          }
          const double w = coef * fb / static_cast<double>(NH) / Z;
          double* lc = local.data() + b * n;
          for (std::int64_t j = 0; j < n; ++j) lc[j] += w * e[static_cast<std::size_t>(j)];
          buf_keys_used[static_cast<std::size_t>(bi)] += static_cast<double>(used);
        }
      }
#pragma omp critical
      for (std::size_t x = 0; x < acc.size(); ++x) acc[x] += local[x];
    }
    // Importance EMA over this call's query rows (in order).
    const double dT = std::pow(decay, static_cast<double>(Tn));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t j = 0; j < n; ++j) {
        float& w = wimp_[l][b * S_ + j];
        w = static_cast<float>(dT * w + acc[static_cast<std::size_t>(b * n + j)]);
      }
  }

  if (decoding_) {
    const std::size_t tok = 2 * static_cast<std::size_t>(C) * sizeof(float);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < Tn; ++i) {
        const std::int64_t exact = st.win_len + i + 1;
        stats_.read_bytes += static_cast<std::size_t>(n) * slot_bytes() + static_cast<std::size_t>(exact) * tok;
        stats_.keys += static_cast<double>(exact) + buf_keys_used[static_cast<std::size_t>(b * Tn + i)] / NH;
        stats_.queries += 1;
      }
    if (layer == 0) stats_.tokens += Tn;
  } else {
    peak_ = std::max(peak_, arena_->peak_bytes());
  }

  // 4. New tokens enter the window; the overflow is compressed into the buffer.
  push(layer, k, v, pos, scratch_);
}

void RckvPolicy::push(std::int64_t layer, const TensorView& k, const TensorView& v, const TensorView& pos,
                      Arena& scratch) {
  const std::int64_t B = info_.batch, Tn = k.shape[1], C = mc_.d_model, dc = cfg_.d_c;
  const auto l = static_cast<std::size_t>(layer);
  LayerState& st = st_[l];
  const float* ks = k.ptr<float>();
  const float* vs = v.ptr<float>();
  const auto* pp = pos.ptr<std::int32_t>();
  const std::size_t row = static_cast<std::size_t>(C) * sizeof(float);

  const std::int64_t E = std::max<std::int64_t>(0, st.win_len + Tn - W_);
  const std::int64_t e_w = std::min(st.win_len, E), e_n = E - e_w;
  TensorView Ck, Cv;
  std::vector<std::int32_t> epos(static_cast<std::size_t>(B * E));
  if (E > 0) {
    TensorView X = scratch.allocate(Shape{B * E, C}, DType::f32);
    TensorView Y = scratch.allocate(Shape{B * E, C}, DType::f32);
    float* xd = X.ptr<float>();
    float* yd = Y.ptr<float>();
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t e = 0; e < e_w; ++e) {
        const std::int64_t r = (st.win_head + e) % W_;
        std::memcpy(xd + (b * E + e) * C, wk_[l] + (b * W_ + r) * C, row);
        std::memcpy(yd + (b * E + e) * C, wv_[l] + (b * W_ + r) * C, row);
        epos[static_cast<std::size_t>(b * E + e)] = wpos_[l][b * W_ + r];
      }
      for (std::int64_t e = 0; e < e_n; ++e) {
        std::memcpy(xd + (b * E + e_w + e) * C, ks + (b * Tn + e) * C, row);
        std::memcpy(yd + (b * E + e_w + e) * C, vs + (b * Tn + e) * C, row);
        epos[static_cast<std::size_t>(b * E + e_w + e)] = pp[b * Tn + e];
      }
    }
    Ck = scratch.allocate(Shape{B * E, dc}, DType::f32);
    Cv = scratch.allocate(Shape{B * E, dc}, DType::f32);
    be_.linear_fwd(LinearArgs{X, TensorView(proj_.pk(layer), Shape{dc, C}), TensorView(), Ck});
    be_.linear_fwd(LinearArgs{Y, TensorView(proj_.pv(layer), Shape{dc, C}), TensorView(), Cv});
  }

  // Window ring: drop the e_w oldest, append the new tokens that stay.
  if (W_ > 0) {
    st.win_head = (st.win_head + e_w) % W_;
    st.win_len -= e_w;
    for (std::int64_t t = e_n; t < Tn; ++t) {
      const std::int64_t r = (st.win_head + st.win_len) % W_;
      for (std::int64_t b = 0; b < B; ++b) {
        std::memcpy(wk_[l] + (b * W_ + r) * C, ks + (b * Tn + t) * C, row);
        std::memcpy(wv_[l] + (b * W_ + r) * C, vs + (b * Tn + t) * C, row);
        wpos_[l][b * W_ + r] = pp[b * Tn + t];
      }
      ++st.win_len;
    }
  }

  // Buffer: free slot, else evict (per row).
  const float* ckd = E > 0 ? Ck.ptr<float>() : nullptr;
  const float* cvd = E > 0 ? Cv.ptr<float>() : nullptr;
  std::vector<float> cand(static_cast<std::size_t>(S_ + 1));
  for (std::int64_t e = 0; e < E; ++e) {
    const bool room = st.buf_len < S_;
    const std::int64_t filled = st.buf_len;
    for (std::int64_t b = 0; b < B; ++b) {
      float* w = wimp_[l] + b * S_;
      double mean = 0;
      if (filled > 0) {
        for (std::int64_t j = 0; j < filled; ++j) mean += w[j];
        mean /= static_cast<double>(filled);
      }
      // A token of this call with an observation-window mass starts there, and
      // competes for its place: when the buffer is full and it is the least
      // important (or drawn, tau > 0), it is the one evicted (never stored).
      const bool observed = e >= e_w && new_mass_.size() == static_cast<std::size_t>(B * Tn) &&
                            new_mass_[static_cast<std::size_t>(b * Tn + (e - e_w))] >= 0.0f;
      const float w_new = observed ? new_mass_[static_cast<std::size_t>(b * Tn + (e - e_w))] : static_cast<float>(mean);
      std::int64_t slot = filled;
      if (!room) {
        if (observed) {
          std::copy(w, w + S_, cand.begin());
          cand[static_cast<std::size_t>(S_)] = w_new;
          slot = choose_victim(cand.data(), S_ + 1, cfg_.tau, rng_[l]);
          if (slot == S_) continue;  // the incoming token is the least important: dropped
        } else {
          slot = choose_victim(w, S_, cfg_.tau, rng_[l]);
        }
      }
      std::memcpy(ck_[l] + (b * S_ + slot) * dc, ckd + (b * E + e) * dc, static_cast<std::size_t>(dc) * sizeof(float));
      std::memcpy(cv_[l] + (b * S_ + slot) * dc, cvd + (b * E + e) * dc, static_cast<std::size_t>(dc) * sizeof(float));
      bpos_[l][b * S_ + slot] = epos[static_cast<std::size_t>(b * E + e)];
      w[slot] = w_new;
      if (m_eff_[l] > 0) assign_slot(layer, b, slot);
    }
    if (room) ++st.buf_len;
  }
}

void RckvPolicy::assign_slot(std::int64_t layer, std::int64_t b, std::int64_t slot) {
  const std::int64_t NH = mc_.n_heads, HS = mc_.head_size(), C = mc_.d_model, dc = cfg_.d_c;
  const auto l = static_cast<std::size_t>(layer);
  std::vector<float> key(static_cast<std::size_t>(C));
  std::int32_t p = bpos_[l][b * S_ + slot];
  be_.linear_fwd(LinearArgs{TensorView(ck_[l] + (b * S_ + slot) * dc, Shape{1, dc}),
                            TensorView(proj_.uk(layer), Shape{C, dc}), TensorView(), TensorView(key.data(), Shape{1, C})});
  be_.rope_fwd(RopeArgs{TensorView(key.data(), Shape{1, NH, HS}), TensorView(&p, Shape{1}), mc_.rope_theta});
  const std::int64_t me = m_eff_[l];
  for (std::int64_t h = 0; h < NH; ++h) {
    const float* cen = cent_[l] + (b * NH + h) * m_ * HS;
    std::int64_t best = 0;
    double bd = std::numeric_limits<double>::infinity();
    for (std::int64_t c = 0; c < me; ++c) {
      double d2 = 0;
      for (std::int64_t x = 0; x < HS; ++x) {
        const double d = static_cast<double>(key[static_cast<std::size_t>(h * HS + x)]) - cen[c * HS + x];
        d2 += d * d;
      }
      if (d2 < bd) {
        bd = d2;
        best = c;
      }
    }
    std::int32_t& a = cassign_[l][(b * NH + h) * S_ + slot];
    std::int32_t* sz = csize_[l] + (b * NH + h) * m_;
    if (a >= 0) --sz[a];
    a = static_cast<std::int32_t>(best);
    ++sz[best];
  }
}

void RckvPolicy::build_clusters() {
  const std::int64_t L = mc_.n_layers, B = info_.batch, NH = mc_.n_heads, HS = mc_.head_size(), C = mc_.d_model;
  for (std::int64_t layer = 0; layer < L; ++layer) {
    const auto l = static_cast<std::size_t>(layer);
    const std::int64_t n = st_[l].buf_len;
    m_eff_[l] = 0;
    if (n == 0) continue;
    const std::int64_t me = std::min(m_, n);
    std::vector<float> keys(static_cast<std::size_t>(n * C));
    std::vector<double> x(static_cast<std::size_t>(n * HS));
    for (std::int64_t b = 0; b < B; ++b) {
      reconstruct_keys(layer, b, n, keys.data());
      for (std::int64_t h = 0; h < NH; ++h) {
        for (std::int64_t j = 0; j < n; ++j)
          for (std::int64_t d = 0; d < HS; ++d)
            x[static_cast<std::size_t>(j * HS + d)] = keys[static_cast<std::size_t>(j * C + h * HS + d)];
        Rng rng(cfg_.sqa_cfg.seed, static_cast<std::uint64_t>((layer * B + b) * NH + h));
        const attention::KMeansResult km = attention::kmeans(x.data(), n, HS, me, cfg_.sqa_cfg.lloyd_steps, rng);
        float* cen = cent_[l] + (b * NH + h) * m_ * HS;
        for (std::int64_t i = 0; i < me * HS; ++i) cen[i] = static_cast<float>(km.centroids[static_cast<std::size_t>(i)]);
        std::int32_t* as = cassign_[l] + (b * NH + h) * S_;
        std::int32_t* sz = csize_[l] + (b * NH + h) * m_;
        std::fill_n(as, S_, -1);
        std::fill_n(sz, m_, 0);
        for (std::int64_t j = 0; j < n; ++j) {
          as[j] = km.assign[static_cast<std::size_t>(j)];
          ++sz[as[j]];
        }
      }
    }
    m_eff_[l] = me;
    sqa_active_ = true;
  }
}

void RckvPolicy::end_prefill() {
  DSRSQ_INPUT_CHECK(begun_, "KV policy 'rckv': end_prefill() before begin()");
  if (cfg_.sqa) build_clusters();
  decoding_ = true;
  resident_ = arena_->used_bytes();
  peak_ = std::max(peak_, arena_->peak_bytes());
}

KVMemory RckvPolicy::memory() const {
  return kvdetail::arena_memory(arena_.get(), decoding_, resident_, peak_, stats_);
}

std::vector<std::int32_t> RckvPolicy::slot_positions(std::int64_t layer, std::int64_t b) const {
  DSRSQ_INPUT_CHECK(begun_ && layer >= 0 && layer < mc_.n_layers && b >= 0 && b < info_.batch,
                    "rckv: slot_positions(", layer, ", ", b, ") out of range");
  const auto l = static_cast<std::size_t>(layer);
  std::vector<std::int32_t> r(static_cast<std::size_t>(S_), -1);
  for (std::int64_t j = 0; j < st_[l].buf_len; ++j) r[static_cast<std::size_t>(j)] = bpos_[l][b * S_ + j];
  return r;
}

std::vector<float> RckvPolicy::slot_importance(std::int64_t layer, std::int64_t b) const {
  DSRSQ_INPUT_CHECK(begun_ && layer >= 0 && layer < mc_.n_layers && b >= 0 && b < info_.batch,
                    "rckv: slot_importance(", layer, ", ", b, ") out of range");
  const auto l = static_cast<std::size_t>(layer);
  return std::vector<float>(wimp_[l] + b * S_, wimp_[l] + (b + 1) * S_);
}

void RckvPolicy::set_slot_importance(std::int64_t layer, std::int64_t b, const std::vector<float>& w) {
  DSRSQ_INPUT_CHECK(begun_ && layer >= 0 && layer < mc_.n_layers && b >= 0 && b < info_.batch &&
                        static_cast<std::int64_t>(w.size()) <= S_,
                    "rckv: set_slot_importance(", layer, ", ", b, ") out of range");
  std::copy(w.begin(), w.end(), wimp_[static_cast<std::size_t>(layer)] + b * S_);
}

}  // namespace dsrsq::compress
