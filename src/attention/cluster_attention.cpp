// SQA cluster attention: k-means plan, then exact attention over the chosen
// clusters through the backend's attention kernel (see the header for the
// gather / log-sum-exp merge scheme and why the backward is exact).
#include "attention/cluster_attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.hpp"

namespace dsrsq::attention {
namespace {

// The backend accepts positions in [0, 2^30). Gathered positions are shifted by
// one so that 0 is free for padding queries (no key visible) and 2^30 - 1 for
// padding keys (visible to no real query).
constexpr std::int32_t kMaxPos = (std::int32_t{1} << 30) - 2;  // real positions lie in [0, kMaxPos)
constexpr std::int32_t kPadKeyPos = (std::int32_t{1} << 30) - 1;
constexpr std::int32_t kPadQueryPos = 0;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

double sqdist(const double* a, const double* b, std::int64_t d) {
  double s = 0;
  for (std::int64_t c = 0; c < d; ++c) {
    const double t = a[c] - b[c];
    s += t * t;
  }
  return s;
}

// Nearest centroid (ties: lower index); returns the squared distance.
double nearest(const double* x, const std::vector<double>& cen, std::int64_t m, std::int64_t d, std::int32_t& best) {
  double bd = std::numeric_limits<double>::infinity();
  best = 0;
  for (std::int64_t c = 0; c < m; ++c) {
    const double t = sqdist(x, cen.data() + c * d, d);
    if (t < bd) {
      bd = t;
      best = static_cast<std::int32_t>(c);
    }
  }
  return bd;
}

// Centroids = member means; empty clusters keep their centroid. Returns sizes.
std::vector<std::int64_t> update_means(const double* x, std::int64_t n, std::int64_t d, std::int64_t m,
                                       const std::vector<std::int32_t>& assign, std::vector<double>& cen) {
  std::vector<double> sum(static_cast<std::size_t>(m * d), 0.0);
  std::vector<std::int64_t> cnt(static_cast<std::size_t>(m), 0);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t c = assign[static_cast<std::size_t>(i)];
    ++cnt[static_cast<std::size_t>(c)];
    for (std::int64_t t = 0; t < d; ++t) sum[static_cast<std::size_t>(c * d + t)] += x[i * d + t];
  }
  for (std::int64_t c = 0; c < m; ++c) {
    if (cnt[static_cast<std::size_t>(c)] == 0) continue;
    const double inv = 1.0 / static_cast<double>(cnt[static_cast<std::size_t>(c)]);
    for (std::int64_t t = 0; t < d; ++t)
      cen[static_cast<std::size_t>(c * d + t)] = sum[static_cast<std::size_t>(c * d + t)] * inv;
  }
  return cnt;
}

// Double-precision copy of one (b, h) slice of a (B, L, NH, HS) tensor.
template <class T>
void load_slice(const TensorView& t, std::int64_t b, std::int64_t h, std::vector<double>& out) {
  const std::int64_t L = t.shape[1], NH = t.shape[2], HS = t.shape[3];
  const T* p = t.ptr<T>();
  out.resize(static_cast<std::size_t>(L * HS));
  for (std::int64_t j = 0; j < L; ++j)
    for (std::int64_t c = 0; c < HS; ++c)
      out[static_cast<std::size_t>(j * HS + c)] = static_cast<double>(p[((b * L + j) * NH + h) * HS + c]);
}
void load_slice_any(const TensorView& t, std::int64_t b, std::int64_t h, std::vector<double>& out) {
  if (t.dtype == DType::f32)
    load_slice<float>(t, b, h, out);
  else
    load_slice<double>(t, b, h, out);
}

// Per (b, h): keys of each cluster and the queries that chose it, both in index order.
struct Groups {
  std::vector<std::vector<std::int64_t>> keys, queries;
  std::int64_t smax = 0, tmax = 0;
};
Groups make_groups(const ClusterPlan& p, std::int64_t b, std::int64_t h) {
  Groups g;
  g.keys.resize(static_cast<std::size_t>(p.m));
  g.queries.resize(static_cast<std::size_t>(p.m));
  for (std::int64_t j = 0; j < p.S; ++j) g.keys[static_cast<std::size_t>(p.cluster_of(b, h, j))].push_back(j);
  for (std::int64_t i = 0; i < p.T; ++i) {
    const std::int32_t* ch = p.chosen_of(b, h, i);
    for (std::int64_t r = 0; r < p.kc; ++r)
      if (ch[r] >= 0) g.queries[static_cast<std::size_t>(ch[r])].push_back(i);
  }
  for (std::int64_t c = 0; c < p.m; ++c) {
    g.smax = std::max<std::int64_t>(g.smax, static_cast<std::int64_t>(g.keys[static_cast<std::size_t>(c)].size()));
    g.tmax = std::max<std::int64_t>(g.tmax, static_cast<std::int64_t>(g.queries[static_cast<std::size_t>(c)].size()));
  }
  return g;
}

// Gathered, padded layout of one (b, h): batch entry c holds cluster c.
template <class T>
struct Gathered {
  std::int64_t m, tmax, smax, HS;
  std::vector<T> q, k, v, o, lse;
  std::vector<std::int32_t> qp, kp;
};

template <class T>
void gather(const ClusterPlan& p, const Groups& g, std::int64_t b, std::int64_t h, const TensorView& q,
            const TensorView& k, const TensorView& v, const TensorView& q_pos, const TensorView& k_pos, Gathered<T>& G) {
  const std::int64_t m = p.m, HS = p.HS, NH = p.NH, T_ = p.T, S = p.S;
  G.m = m;
  G.tmax = g.tmax;
  G.smax = g.smax;
  G.HS = HS;
  G.q.assign(static_cast<std::size_t>(m * g.tmax * HS), T(0));
  G.k.assign(static_cast<std::size_t>(m * g.smax * HS), T(0));
  G.v.assign(static_cast<std::size_t>(m * g.smax * HS), T(0));
  G.qp.assign(static_cast<std::size_t>(m * g.tmax), kPadQueryPos);
  G.kp.assign(static_cast<std::size_t>(m * g.smax), kPadKeyPos);
  const T* Q = q.ptr<T>();
  const T* K = k.ptr<T>();
  const T* V = v.ptr<T>();
  const std::int32_t* QP = q_pos.ptr<std::int32_t>();
  const std::int32_t* KP = k_pos.ptr<std::int32_t>();
  for (std::int64_t c = 0; c < m; ++c) {
    const auto& qs = g.queries[static_cast<std::size_t>(c)];
    for (std::size_t r = 0; r < qs.size(); ++r) {
      const std::int64_t i = qs[r];
      std::copy_n(Q + ((b * T_ + i) * NH + h) * HS, HS, G.q.data() + (c * g.tmax + static_cast<std::int64_t>(r)) * HS);
      G.qp[static_cast<std::size_t>(c * g.tmax + static_cast<std::int64_t>(r))] = p.causal ? QP[b * T_ + i] + 1 : 1;
    }
    const auto& ks = g.keys[static_cast<std::size_t>(c)];
    for (std::size_t r = 0; r < ks.size(); ++r) {
      const std::int64_t j = ks[r];
      const std::int64_t dst = (c * g.smax + static_cast<std::int64_t>(r)) * HS;
      std::copy_n(K + ((b * S + j) * NH + h) * HS, HS, G.k.data() + dst);
      std::copy_n(V + ((b * S + j) * NH + h) * HS, HS, G.v.data() + dst);
      G.kp[static_cast<std::size_t>(c * g.smax + static_cast<std::int64_t>(r))] = p.causal ? KP[b * S + j] + 1 : 1;
    }
  }
}

void check_plan_args(const char* op, const ClusterPlan& p, const TensorView& q, const TensorView& k) {
  DSRSQ_REQUIRE(q.shape.rank == 4 && k.shape.rank == 4, op, ": q and k must be 4-D, got ", q.str(), " and ", k.str());
  DSRSQ_REQUIRE(q.shape[0] == p.B && q.shape[1] == p.T && q.shape[2] == p.NH && q.shape[3] == p.HS && k.shape[1] == p.S,
                op, ": q ", q.str(), " / k ", k.str(), " do not match the plan (B=", p.B, " T=", p.T, " S=", p.S,
                " NH=", p.NH, " HS=", p.HS, ")");
}

template <class T>
void fwd_impl(Backend& be, const ClusterPlan& p, const AttentionArgs& a) {
  const std::int64_t NH = p.NH, HS = p.HS, T_ = p.T;
  T* O = a.o.ptr<T>();
  T* LSE = a.lse.ptr<T>();
  // Running result per (b, h) in f64 (o (1,T,1,HS), lse (1,1,T)); each
  // cluster's partial is scattered to its queries' rows (lse -inf elsewhere)
  // and merged with the Backend's one log-sum-exp merge, clusters in order.
  std::vector<double> acc(static_cast<std::size_t>(T_ * HS)), L(static_cast<std::size_t>(T_));
  std::vector<T> po(static_cast<std::size_t>(T_ * HS)), pl(static_cast<std::size_t>(T_));
  const TensorView run_o(acc.data(), Shape{1, T_, 1, HS}), run_l(L.data(), Shape{1, 1, T_});
  const TensorView part_o(po.data(), Shape{1, T_, 1, HS}), part_l(pl.data(), Shape{1, 1, T_});
  Gathered<T> G;
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t h = 0; h < NH; ++h) {
      const Groups g = make_groups(p, b, h);
      std::fill(acc.begin(), acc.end(), 0.0);
      std::fill(L.begin(), L.end(), kNegInf);
      if (g.tmax > 0 && g.smax > 0) {
        gather<T>(p, g, b, h, a.q, a.k, a.v, a.q_pos, a.k_pos, G);
        G.o.assign(G.q.size(), T(0));
        G.lse.assign(static_cast<std::size_t>(p.m * g.tmax), T(0));
        const Shape qs{p.m, g.tmax, 1, HS}, ks{p.m, g.smax, 1, HS};
        be.attention_fwd({TensorView(G.q.data(), qs), TensorView(G.k.data(), ks), TensorView(G.v.data(), ks),
                          TensorView(G.o.data(), qs), TensorView(G.lse.data(), Shape{p.m, 1, g.tmax}),
                          TensorView(G.qp.data(), Shape{p.m, g.tmax}), TensorView(G.kp.data(), Shape{p.m, g.smax}),
                          /*causal=*/true, p.scale});
        for (std::int64_t c = 0; c < p.m; ++c) {
          const auto& qs_c = g.queries[static_cast<std::size_t>(c)];
          if (qs_c.empty()) continue;
          std::fill(pl.begin(), pl.end(), static_cast<T>(kNegInf));
          for (std::size_t r = 0; r < qs_c.size(); ++r) {
            const std::int64_t i = qs_c[r];
            std::copy_n(G.o.data() + (c * g.tmax + static_cast<std::int64_t>(r)) * HS, HS, po.data() + i * HS);
            pl[static_cast<std::size_t>(i)] = G.lse[static_cast<std::size_t>(c * g.tmax) + r];
          }
          be.attention_merge(AttentionMergeArgs{run_o, run_l, part_o, part_l});
        }
      }
      for (std::int64_t i = 0; i < T_; ++i) {
        T* oi = O + ((b * T_ + i) * NH + h) * HS;
        for (std::int64_t d = 0; d < HS; ++d) oi[d] = static_cast<T>(acc[static_cast<std::size_t>(i * HS + d)]);
        LSE[(b * NH + h) * T_ + i] = static_cast<T>(L[static_cast<std::size_t>(i)]);
      }
    }
}

template <class T>
void bwd_impl(Backend& be, const ClusterPlan& p, const AttentionGradArgs& a) {
  const std::int64_t NH = p.NH, HS = p.HS, T_ = p.T, S = p.S;
  const T* O = a.o.ptr<T>();
  const T* LSE = a.lse.ptr<T>();
  const T* DO = a.dout.ptr<T>();
  T* DQ = a.dq.ptr<T>();
  T* DK = a.dk.ptr<T>();
  T* DV = a.dv.ptr<T>();
  Gathered<T> G;
  std::vector<T> gdo, gdq, gdk, gdv;
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t h = 0; h < NH; ++h) {
      const Groups g = make_groups(p, b, h);
      if (g.tmax == 0 || g.smax == 0) continue;
      gather<T>(p, g, b, h, a.q, a.k, a.v, a.q_pos, a.k_pos, G);
      G.o.assign(G.q.size(), T(0));
      G.lse.assign(static_cast<std::size_t>(p.m * g.tmax), static_cast<T>(kNegInf));
      gdo.assign(G.q.size(), T(0));
      for (std::int64_t c = 0; c < p.m; ++c) {
        const auto& qs_c = g.queries[static_cast<std::size_t>(c)];
        for (std::size_t r = 0; r < qs_c.size(); ++r) {
          const std::int64_t i = qs_c[r], dst = (c * g.tmax + static_cast<std::int64_t>(r)) * HS;
          const std::int64_t src = ((b * T_ + i) * NH + h) * HS;
          std::copy_n(O + src, HS, G.o.data() + dst);
          std::copy_n(DO + src, HS, gdo.data() + dst);
          G.lse[static_cast<std::size_t>(c * g.tmax) + r] = LSE[(b * NH + h) * T_ + i];
        }
      }
      gdq.assign(G.q.size(), T(0));
      gdk.assign(G.k.size(), T(0));
      gdv.assign(G.v.size(), T(0));
      const Shape qs{p.m, g.tmax, 1, HS}, ks{p.m, g.smax, 1, HS};
      be.attention_bwd({TensorView(gdo.data(), qs), TensorView(G.q.data(), qs), TensorView(G.k.data(), ks),
                        TensorView(G.v.data(), ks), TensorView(G.o.data(), qs),
                        TensorView(G.lse.data(), Shape{p.m, 1, g.tmax}), TensorView(G.qp.data(), Shape{p.m, g.tmax}),
                        TensorView(G.kp.data(), Shape{p.m, g.smax}), TensorView(gdq.data(), qs),
                        TensorView(gdk.data(), ks), TensorView(gdv.data(), ks), /*causal=*/true, p.scale});
      for (std::int64_t c = 0; c < p.m; ++c) {
        const auto& qs_c = g.queries[static_cast<std::size_t>(c)];
        for (std::size_t r = 0; r < qs_c.size(); ++r) {
          const T* src = gdq.data() + (c * g.tmax + static_cast<std::int64_t>(r)) * HS;
          T* dst = DQ + ((b * T_ + qs_c[r]) * NH + h) * HS;
          for (std::int64_t d = 0; d < HS; ++d) dst[d] += src[d];
        }
        const auto& ks_c = g.keys[static_cast<std::size_t>(c)];
        for (std::size_t r = 0; r < ks_c.size(); ++r) {
          const std::int64_t off = (c * g.smax + static_cast<std::int64_t>(r)) * HS;
          const std::int64_t dst = ((b * S + ks_c[r]) * NH + h) * HS;
          for (std::int64_t d = 0; d < HS; ++d) {
            DK[dst + d] += gdk[static_cast<std::size_t>(off + d)];
            DV[dst + d] += gdv[static_cast<std::size_t>(off + d)];
          }
        }
      }
    }
}

}  // namespace

double kmeans_wcss(const double* x, std::int64_t n, std::int64_t d, const std::vector<double>& centroids,
                   const std::vector<std::int32_t>& assign) {
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i)
    s += sqdist(x + i * d, centroids.data() + static_cast<std::int64_t>(assign[static_cast<std::size_t>(i)]) * d, d);
  return s;
}

KMeansResult kmeans(const double* x, std::int64_t n, std::int64_t d, std::int64_t m, int lloyd_steps, Rng& rng) {
  DSRSQ_REQUIRE(m >= 1 && n >= 1 && d >= 1, "kmeans: need n, d, m >= 1 (n=", n, " d=", d, " m=", m, ")");
  KMeansResult r;
  r.n = n;
  r.d = d;
  r.m = m;
  r.centroids.assign(static_cast<std::size_t>(m * d), 0.0);
  r.assign.assign(static_cast<std::size_t>(n), 0);
  // k-means++ seeding: first centre uniform, then proportional to D(x)^2. When
  // every point already coincides with a centre (D = 0), the remaining centres
  // copy the first one and end up empty.
  std::vector<double> dist(static_cast<std::size_t>(n));
  const std::int64_t first = static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(n)));
  std::copy_n(x + first * d, d, r.centroids.begin());
  for (std::int64_t i = 0; i < n; ++i) dist[static_cast<std::size_t>(i)] = sqdist(x + i * d, x + first * d, d);
  for (std::int64_t c = 1; c < m; ++c) {
    const double total = std::accumulate(dist.begin(), dist.end(), 0.0);
    std::int64_t pick = first;
    if (total > 0) {
      const double u = rng.uniform() * total;
      double run = 0;
      pick = -1;
      for (std::int64_t i = 0; i < n; ++i) {
        run += dist[static_cast<std::size_t>(i)];
        if (dist[static_cast<std::size_t>(i)] > 0 && run > u) {
          pick = i;
          break;
        }
      }
      if (pick < 0)  // rounding at the end of the sum: the last point with D > 0
        for (std::int64_t i = n - 1; i >= 0 && pick < 0; --i)
          if (dist[static_cast<std::size_t>(i)] > 0) pick = i;
    }
    std::copy_n(x + pick * d, d, r.centroids.begin() + c * d);
    for (std::int64_t i = 0; i < n; ++i)
      dist[static_cast<std::size_t>(i)] = std::min(dist[static_cast<std::size_t>(i)], sqdist(x + i * d, x + pick * d, d));
  }
  auto assign_all = [&] {
    double s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += nearest(x + i * d, r.centroids, m, d, r.assign[static_cast<std::size_t>(i)]);
    return s;
  };
  r.wcss_history.push_back(assign_all());
  for (int step = 0; step < lloyd_steps; ++step) {
    const std::vector<std::int64_t> cnt = update_means(x, n, d, m, r.assign, r.centroids);
    // Re-seed empty clusters at the points farthest from their own centroid.
    std::vector<char> used(static_cast<std::size_t>(n), 0);
    for (std::int64_t c = 0; c < m; ++c) {
      if (cnt[static_cast<std::size_t>(c)] > 0) continue;
      double bd = 0;
      std::int64_t bi = -1;
      for (std::int64_t i = 0; i < n; ++i) {
        if (used[static_cast<std::size_t>(i)]) continue;
        const double t = sqdist(x + i * d, r.centroids.data() + r.assign[static_cast<std::size_t>(i)] * d, d);
        if (t > bd) {
          bd = t;
          bi = i;
        }
      }
      if (bi < 0) continue;  // every point sits on its centroid: nothing to gain
      used[static_cast<std::size_t>(bi)] = 1;
      std::copy_n(x + bi * d, d, r.centroids.begin() + c * d);
    }
    r.wcss_history.push_back(assign_all());
  }
  r.sizes = update_means(x, n, d, m, r.assign, r.centroids);
  r.wcss_history.push_back(kmeans_wcss(x, n, d, r.centroids, r.assign));
  return r;
}

bool ClusterPlan::attends(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j, const std::int32_t* q_pos,
                          const std::int32_t* k_pos) const {
  if (causal && k_pos[b * S + j] > q_pos[b * T + i]) return false;
  const std::int32_t c = cluster_of(b, h, j);
  const std::int32_t* ch = chosen_of(b, h, i);
  return std::find(ch, ch + kc, c) != ch + kc;
}

ClusterPlan cluster_plan(const TensorView& q, const TensorView& k, const TensorView& q_pos, const TensorView& k_pos,
                         const ClusterAttentionConfig& cfg) {
  const char* op = "cluster_plan";
  DSRSQ_REQUIRE(q.shape.rank == 4 && k.shape.rank == 4, op, ": q and k must be 4-D, got ", q.str(), " and ", k.str());
  DSRSQ_REQUIRE(q.dtype == k.dtype && (q.dtype == DType::f32 || q.dtype == DType::f64), op,
                ": q and k must share a float dtype, got ", q.str(), " and ", k.str());
  ClusterPlan p;
  p.B = q.shape[0];
  p.T = q.shape[1];
  p.NH = q.shape[2];
  p.HS = q.shape[3];
  p.S = k.shape[1];
  DSRSQ_REQUIRE(k.shape[0] == p.B && k.shape[2] == p.NH && k.shape[3] == p.HS, op, ": k ", k.str(),
                " does not match q ", q.str());
  check_shape(op, "q_pos", q_pos, Shape{p.B, p.T});
  check_shape(op, "k_pos", k_pos, Shape{p.B, p.S});
  check_dtype(op, "q_pos", q_pos, DType::i32);
  check_dtype(op, "k_pos", k_pos, DType::i32);
  DSRSQ_REQUIRE(cfg.clusters >= 1 && cfg.top_clusters >= 1 && cfg.lloyd_steps >= 0, op,
                ": need clusters >= 1, top_clusters >= 1, lloyd_steps >= 0");
  p.m = cfg.clusters;
  p.kc = std::min(cfg.top_clusters, cfg.clusters);
  p.causal = cfg.causal;
  p.scale = cfg.scale > 0 ? cfg.scale : 1.0 / std::sqrt(static_cast<double>(p.HS));
  const std::int64_t B = p.B, T_ = p.T, S = p.S, NH = p.NH, HS = p.HS, m = p.m, kc = p.kc;
  p.assign.assign(static_cast<std::size_t>(B * NH * S), 0);
  p.centroids.assign(static_cast<std::size_t>(B * NH * m * HS), 0.0);
  p.chosen.assign(static_cast<std::size_t>(B * NH * T_ * kc), -1);
  p.wcss.assign(static_cast<std::size_t>(B * NH), 0.0);
  const std::int32_t* QP = q_pos.ptr<std::int32_t>();
  const std::int32_t* KP = k_pos.ptr<std::int32_t>();
  for (std::int64_t t = 0; t < B * T_; ++t)
    DSRSQ_REQUIRE(QP[t] >= 0 && QP[t] < kMaxPos, op, ": q_pos ", QP[t], " outside [0, 2^30 - 2)");
  for (std::int64_t t = 0; t < B * S; ++t)
    DSRSQ_REQUIRE(KP[t] >= 0 && KP[t] < kMaxPos, op, ": k_pos ", KP[t], " outside [0, 2^30 - 2)");

  std::vector<ClusterAttentionStats> st(static_cast<std::size_t>(B * NH));
  // One host task per (b, h): k-means, then each query's clusters (host
  // tensors: the CPU backend schedules them).
  cpu_backend().host_tasks(B * NH, [&](std::int64_t bh) {
    const std::int64_t b = bh / NH, h = bh % NH;
    ClusterAttentionStats& s = st[static_cast<std::size_t>(bh)];
    std::vector<double> kd, qd;
    load_slice_any(k, b, h, kd);
    load_slice_any(q, b, h, qd);
    std::int32_t* asg = p.assign.data() + bh * S;
    double* cen = p.centroids.data() + bh * m * HS;
    // Cluster sizes and each cluster's sorted key positions (for eligibility and counts).
    std::vector<std::vector<std::int32_t>> cpos(static_cast<std::size_t>(m));
    if (S > 0) {
      Rng rng(cfg.seed, static_cast<std::uint64_t>(bh));
      const KMeansResult km = kmeans(kd.data(), S, HS, m, cfg.lloyd_steps, rng);
      std::copy(km.assign.begin(), km.assign.end(), asg);
      std::copy(km.centroids.begin(), km.centroids.end(), cen);
      p.wcss[static_cast<std::size_t>(bh)] = km.wcss();
      for (std::int64_t j = 0; j < S; ++j) cpos[static_cast<std::size_t>(asg[j])].push_back(KP[b * S + j]);
    }
    for (auto& v : cpos) std::sort(v.begin(), v.end());
    std::vector<std::int32_t> allpos(KP + b * S, KP + b * S + S);
    std::sort(allpos.begin(), allpos.end());
    auto visible_in = [&](const std::vector<std::int32_t>& sorted, std::int32_t qp) -> std::int64_t {
      if (!p.causal) return static_cast<std::int64_t>(sorted.size());
      return std::upper_bound(sorted.begin(), sorted.end(), qp) - sorted.begin();
    };
    std::vector<std::pair<double, std::int32_t>> cand;
    for (std::int64_t i = 0; i < T_; ++i) {
      const std::int32_t qp = QP[b * T_ + i];
      const double* qi = qd.data() + i * HS;
      cand.clear();
      for (std::int64_t c = 0; c < m; ++c) {
        const auto& cp = cpos[static_cast<std::size_t>(c)];
        if (cp.empty() || (p.causal && cp.front() > qp)) continue;  // not eligible
        double sc = 0;
        for (std::int64_t t = 0; t < HS; ++t) sc += qi[t] * cen[c * HS + t];
        cand.emplace_back(sc, static_cast<std::int32_t>(c));
      }
      const std::int64_t take = std::min<std::int64_t>(kc, static_cast<std::int64_t>(cand.size()));
      std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), [](const auto& x, const auto& y) {
        return x.first > y.first || (x.first == y.first && x.second < y.second);
      });
      std::int32_t* ch = p.chosen.data() + (bh * T_ + i) * kc;
      for (std::int64_t r = 0; r < take; ++r) {
        ch[r] = cand[static_cast<std::size_t>(r)].second;
        s.attended_pairs += visible_in(cpos[static_cast<std::size_t>(ch[r])], qp);
      }
      s.visible_pairs += visible_in(allpos, qp);
      s.chosen_clusters += take;
      s.query_rows += 1;
    }
  });
  // Host work outside the ops, in the FLOP meter: k-means (the initial
  // assignment and one per Lloyd step) and each query's centroid scores.
  cpu_backend().count_flops(kmeans_assign_cost(B * NH, S, m, HS, sizeof(double)).flops *
                                static_cast<double>(cfg.lloyd_steps + 1) +
                            2.0 * static_cast<double>(B * NH * T_ * m * HS));
  for (const auto& s : st) {
    p.stats.query_rows += s.query_rows;
    p.stats.visible_pairs += s.visible_pairs;
    p.stats.attended_pairs += s.attended_pairs;
    p.stats.chosen_clusters += s.chosen_clusters;
  }
  return p;
}

void cluster_attention_fwd(Backend& be, const ClusterPlan& plan, const AttentionArgs& a) {
  const char* op = "cluster_attention_fwd";
  check_plan_args(op, plan, a.q, a.k);
  check_shape(op, "o", a.o, Shape{plan.B, plan.T, plan.NH, plan.HS});
  check_shape(op, "lse", a.lse, Shape{plan.B, plan.NH, plan.T});
  check_shape(op, "v", a.v, Shape{plan.B, plan.S, plan.NH, plan.HS});
  if (a.q.dtype == DType::f32)
    fwd_impl<float>(be, plan, a);
  else
    fwd_impl<double>(be, plan, a);
}

void cluster_attention_bwd(Backend& be, const ClusterPlan& plan, const AttentionGradArgs& a) {
  const char* op = "cluster_attention_bwd";
  check_plan_args(op, plan, a.q, a.k);
  const Shape qs{plan.B, plan.T, plan.NH, plan.HS}, ks{plan.B, plan.S, plan.NH, plan.HS};
  check_shape(op, "dout", a.dout, qs);
  check_shape(op, "o", a.o, qs);
  check_shape(op, "lse", a.lse, Shape{plan.B, plan.NH, plan.T});
  check_shape(op, "dq", a.dq, qs);
  check_shape(op, "dk", a.dk, ks);
  check_shape(op, "dv", a.dv, ks);
  if (a.q.dtype == DType::f32)
    bwd_impl<float>(be, plan, a);
  else
    bwd_impl<double>(be, plan, a);
}

}  // namespace dsrsq::attention
