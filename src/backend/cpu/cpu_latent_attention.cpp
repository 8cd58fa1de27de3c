// Latent-space attention (RCKV's compressed buffer) and the attention-mass
// statistic (importance of keys). Forward only: both serve inference.
// Shapes and definitions: LatentAttentionArgs / AttentionMassArgs in
// backend/backend.hpp. Scores are f64 dot products of f32 values.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"

namespace dsrsq::cpu {
namespace {
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
}  // namespace

void CpuBackend::latent_attention_fwd_impl(const LatentAttentionArgs& a) {
  const std::int64_t B = a.q.shape[0], T = a.q.shape[1], NH = a.q.shape[2], HS = a.q.shape[3], n = a.k.shape[1];
  const std::int64_t Sp = a.latent.shape[1], dc = a.latent.shape[2];
  const bool use_sqa = !a.centroids.empty();
  const std::int64_t M = use_sqa ? a.centroids.shape[2] : 0, me = use_sqa ? a.clusters : 0;
  const std::int64_t Sa = use_sqa ? a.assign.shape[2] : 0;
  const std::int64_t kc = use_sqa ? std::min<std::int64_t>(a.top_clusters, std::max<std::int64_t>(me, 1)) : 0;
  const double scale = a.scale > 0 ? a.scale : 1.0 / std::sqrt(static_cast<double>(HS));
  const float* qd = a.q.ptr<float>();
  const float* kb = a.k.ptr<float>();
  const std::int32_t* pp = a.q_pos.ptr<std::int32_t>();
  const std::int32_t* bp = a.k_pos.ptr<std::int32_t>();
  const float* cvl = a.latent.ptr<float>();
  const float* uv = a.up.ptr<float>();
  double* od = a.o.ptr<double>();
  double* ld = a.lse.ptr<double>();
  const float* lw = a.lse_other.empty() ? nullptr : a.lse_other.ptr<float>();
  const double* rw = a.mass.empty() ? nullptr : a.row_weight.ptr<double>();
  double* mass = a.mass.empty() ? nullptr : a.mass.ptr<double>();
  double* used_out = a.used.empty() ? nullptr : a.used.ptr<double>();
  const float* cent = use_sqa ? a.centroids.ptr<float>() : nullptr;
  const std::int32_t* cassign = use_sqa ? a.assign.ptr<std::int32_t>() : nullptr;
  const std::int32_t* csize = use_sqa ? a.sizes.ptr<std::int32_t>() : nullptr;
  if (used_out) std::fill(used_out, used_out + B * T, 0.0);

  // Per-thread mass partials, added in thread order afterwards (deterministic
  // for a fixed thread count; one thread for a single decode row).
  const bool par = B * T > 1 && B * T * n * NH * HS > kParallelMin;
  const int nt = par ? omp_get_max_threads() : 1;
  std::vector<std::vector<double>> partial(static_cast<std::size_t>(mass ? nt : 0));
#pragma omp parallel num_threads(nt)
  {
    std::vector<double> local(static_cast<std::size_t>(mass ? B * n : 0), 0.0);
    std::vector<double> e(static_cast<std::size_t>(n)), z(static_cast<std::size_t>(dc));
    std::vector<char> chosen(static_cast<std::size_t>(std::max<std::int64_t>(me, 1)));
    std::vector<std::pair<double, std::int64_t>> cs;
#pragma omp for schedule(static)
    for (std::int64_t bi = 0; bi < B * T; ++bi) {
      const std::int64_t b = bi / T, i = bi % T;
      const std::int32_t qp = pp[bi];
      for (std::int64_t h = 0; h < NH; ++h) {
        const float* qv = qd + (bi * NH + h) * HS;
        double* o = od + (bi * NH + h) * HS;
        double& lse_out = ld[(b * NH + h) * T + i];
        const std::int32_t* as = use_sqa ? cassign + (b * NH + h) * Sa : nullptr;
        if (use_sqa) {
          // Score the non-empty centroids; keep the top kc (ties: lower index).
          const float* cen = cent + (b * NH + h) * M * HS;
          const std::int32_t* sz = csize + (b * NH + h) * M;
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
          const bool visible = bp[b * Sp + j] <= qp && (!as || (as[j] >= 0 && chosen[static_cast<std::size_t>(as[j])]));
          if (visible) {
            const float* kv = kb + (b * n + j) * NH * HS + h * HS;
            double d = 0;
            for (std::int64_t x = 0; x < HS; ++x) d += static_cast<double>(qv[x]) * kv[x];
            s = d * scale;
            mx = std::max(mx, s);
            ++used;
          }
          e[static_cast<std::size_t>(j)] = s;
        }
        if (used == 0) {  // no visible key: "nothing" for the merge
          std::fill(o, o + HS, 0.0);
          lse_out = kNegInf;
          continue;
        }
        double Z = 0;
        for (std::int64_t j = 0; j < n; ++j) {
          double& ej = e[static_cast<std::size_t>(j)];
          ej = ej == kNegInf ? 0.0 : std::exp(ej - mx);
          Z += ej;
        }
        const double lse_b = mx + std::log(Z);
        lse_out = lse_b;
        std::fill(z.begin(), z.end(), 0.0);
        for (std::int64_t j = 0; j < n; ++j) {
          const double pj = e[static_cast<std::size_t>(j)] / Z;
          if (pj == 0.0) continue;
          const float* c = cvl + (b * Sp + j) * dc;
          for (std::int64_t x = 0; x < dc; ++x) z[static_cast<std::size_t>(x)] += pj * c[x];
        }
        for (std::int64_t r = 0; r < HS; ++r) {
          const float* ur = uv + (h * HS + r) * dc;
          double ob = 0;
          for (std::int64_t x = 0; x < dc; ++x) ob += static_cast<double>(ur[x]) * z[static_cast<std::size_t>(x)];
          o[r] = ob;
        }
        if (used_out) used_out[bi] += static_cast<double>(used);
        if (mass) {
          // This part's share of the softmax merged with the other part
          // (the weights of the attention merge).
          double fb = 1.0;
          if (lw) {
            const double lw_ = lw[(b * NH + h) * T + i];
            const double m = std::max(lse_b, lw_);
            const double ab = std::exp(lse_b - m);
            const double aw = lw_ == kNegInf ? 0.0 : std::exp(lw_ - m);
            fb = ab / (ab + aw);
          }
          const double w = rw[i] * fb / static_cast<double>(NH) / Z;
          double* lc = local.data() + b * n;
          for (std::int64_t j = 0; j < n; ++j) lc[j] += w * e[static_cast<std::size_t>(j)];
        }
      }
    }
    if (mass) partial[static_cast<std::size_t>(omp_get_thread_num())] = std::move(local);
  }
  if (mass)
    for (const auto& p : partial)
      for (std::size_t x = 0; x < p.size(); ++x) mass[x] += p[x];
}

void CpuBackend::attention_mass_impl(const AttentionMassArgs& a) {
  const std::int64_t B = a.q.shape[0], T = a.q.shape[1], NH = a.q.shape[2], HS = a.q.shape[3], S = a.k.shape[1];
  const double scale = a.scale > 0 ? a.scale : 1.0 / std::sqrt(static_cast<double>(HS));
  const float* qd = a.q.ptr<float>();
  const float* kd = a.k.ptr<float>();
  const std::int32_t* qp = a.q_pos.ptr<std::int32_t>();
  const std::int32_t* kp = a.k_pos.ptr<std::int32_t>();
  const double* rw = a.row_weight.ptr<double>();
  double* mass = a.mass.ptr<double>();
  auto score = [&](std::int64_t b, std::int64_t i, std::int64_t h, std::int64_t j) {
    const float* qv = qd + ((b * T + i) * NH + h) * HS;
    const float* kv = kd + ((b * S + j) * NH + h) * HS;
    double d = 0;
    for (std::int64_t x = 0; x < HS; ++x) d += static_cast<double>(qv[x]) * kv[x];
    return d * scale;
  };
  // Pass 1: per (b, i, h) the row maximum and normaliser (rows independent).
  std::vector<double> mxs(static_cast<std::size_t>(B * T * NH), kNegInf), Zs(mxs.size(), 0.0);
  const bool par = B * T * S * NH * HS > kParallelMin;
#pragma omp parallel for schedule(static) if (par)
  for (std::int64_t r = 0; r < B * T * NH; ++r) {
    const std::int64_t b = r / (T * NH), i = (r / NH) % T, h = r % NH;
    if (rw[i] == 0.0) continue;
    double mx = kNegInf;
    for (std::int64_t j = 0; j < S; ++j)
      if (kp[b * S + j] <= qp[b * T + i]) mx = std::max(mx, score(b, i, h, j));
    double Z = 0;
    if (mx != kNegInf)
      for (std::int64_t j = 0; j < S; ++j)
        if (kp[b * S + j] <= qp[b * T + i]) Z += std::exp(score(b, i, h, j) - mx);
    mxs[static_cast<std::size_t>(r)] = mx;
    Zs[static_cast<std::size_t>(r)] = Z;
  }
  // Pass 2: per key, its mass summed over queries i (in order), then heads.
#pragma omp parallel for schedule(static) if (par)
  for (std::int64_t bj = 0; bj < B * S; ++bj) {
    const std::int64_t b = bj / S, j = bj % S;
    double m = 0;
    for (std::int64_t i = 0; i < T; ++i) {
      if (rw[i] == 0.0 || kp[bj] > qp[b * T + i]) continue;
      for (std::int64_t h = 0; h < NH; ++h) {
        const std::size_t r = static_cast<std::size_t>((b * T + i) * NH + h);
        if (mxs[r] == kNegInf) continue;
        m += rw[i] * (std::exp(score(b, i, h, j) - mxs[r]) / Zs[r]);
      }
    }
    mass[bj] = m / a.divisor;
  }
}

}  // namespace dsrsq::cpu
