// Causal depthwise convolution + projection (DSR's context encoder), forward
// and backward side by side. Shapes and rules: ConvProjectArgs in
// backend/backend.hpp.  fwd: r = (overwrite).  bwd: dw +=, dtaps += (weighted).
// Both run in f64 from f32 inputs; lanes are independent channels or
// projection rows, so no sum is reassociated by vectorisation or threads.
#include <algorithm>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"

namespace dsrsq::cpu {
namespace {
std::size_t sz(std::int64_t v) { return static_cast<std::size_t>(v); }
constexpr std::int64_t kChannelBlock = 16;
constexpr std::int64_t kRowTile = 4, kLaneTile = 16;  // forward register tile: 4 x 16 f64 = 8 AVX-512 registers
}  // namespace

void CpuBackend::conv_project_fwd_impl(const ConvProjectArgs& a) {
  const std::int64_t N = a.e.shape[0], C = a.e.shape[1], W = a.taps.shape[0], R = a.w.shape[0];
  const float* E = a.e.ptr<float>();
  const float* at = a.taps.ptr<float>();
  const float* wc = a.w.ptr<float>();
  double* rout = a.r.ptr<double>();
  // W_c transposed to (C, d_r) in f64, so r_i = sum_c e'_i[c] W_c[:, c] runs over
  // independent lanes j (vectorises without reassociating any sum).
  std::vector<double> wct(sz(C * R));
  for (std::int64_t j = 0; j < R; ++j)
    for (std::int64_t c = 0; c < C; ++c) wct[sz(c * R + j)] = wc[j * C + c];
  // Register tiles of kRowTile rows x kLaneTile lanes j: each W_c^T load
  // feeds kRowTile rows (the loop was bound by loading and storing r_i for
  // every channel). Every r_i[j] is still 0 + sum over c = 0, 1, ... in
  // order, the same operations as one row at a time, so the tiling (and the
  // thread count) changes no bit.
  const std::int64_t ntiles = (N + kRowTile - 1) / kRowTile;
#pragma omp parallel if (N * R * C > (1 << 16))
  {
    std::vector<double> e(sz(kRowTile * C));
#pragma omp for schedule(static)
    for (std::int64_t tile = 0; tile < ntiles; ++tile) {
      const std::int64_t i0 = tile * kRowTile, nr = std::min(kRowTile, N - i0);
      for (std::int64_t r = 0; r < nr; ++r) {
        const std::int64_t i = i0 + r;
        double* er = e.data() + r * C;
        std::fill(er, er + C, 0.0);
        for (std::int64_t t = 0; t < W && t <= i; ++t) {
          const float* row = E + (i - t) * C;
          const float* tap = at + t * C;
          for (std::int64_t c = 0; c < C; ++c) er[c] += static_cast<double>(tap[c]) * row[c];
        }
      }
      for (std::int64_t j0 = 0; j0 < R; j0 += kLaneTile) {
        const std::int64_t nj = std::min(kLaneTile, R - j0);
        if (nr == kRowTile && nj == kLaneTile) {
          double acc[kRowTile][kLaneTile] = {};
          for (std::int64_t c = 0; c < C; ++c) {
            const double* w = wct.data() + c * R + j0;
            for (std::int64_t r = 0; r < kRowTile; ++r) {
              const double ec = e[sz(r * C + c)];
#pragma omp simd
              for (std::int64_t jj = 0; jj < kLaneTile; ++jj) acc[r][jj] += ec * w[jj];
            }
          }
          for (std::int64_t r = 0; r < kRowTile; ++r) std::copy(acc[r], acc[r] + kLaneTile, rout + (i0 + r) * R + j0);
        } else {  // edge tiles: the same sums, one row at a time
          for (std::int64_t r = 0; r < nr; ++r) {
            double* ri = rout + (i0 + r) * R + j0;
            std::fill(ri, ri + nj, 0.0);
            for (std::int64_t c = 0; c < C; ++c) {
              const double ec = e[sz(r * C + c)];
              const double* w = wct.data() + c * R + j0;
              for (std::int64_t jj = 0; jj < nj; ++jj) ri[jj] += ec * w[jj];
            }
          }
        }
      }
    }
  }
}

void CpuBackend::conv_project_bwd_impl(const ConvProjectGradArgs& a) {
  const std::int64_t N = a.e.shape[0], C = a.e.shape[1], W = a.taps.shape[0], R = a.w.shape[0];
  const float* wc = a.w.ptr<float>();
  const float* at = a.taps.ptr<float>();
  const float* E = a.e.ptr<float>();
  const double* dR = a.dr.ptr<double>();
  float* gw = a.dw.ptr<float>();
  float* gt = a.dtaps.ptr<float>();
  const double weight = a.weight;
  // By channel block (every channel's e'_i[c] depends on channel c only):
  //   dW_c[j, c] = sum_i dR[i, j] e'_i[c],  de'_i[c] = sum_j W_c[j, c] dR[i, j],
  //   da_t[c] = sum_i de'_i[c] E[i - t, c].
  const std::int64_t nblocks = (C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel if (N * R * C > (1 << 16))
  {
    constexpr std::int64_t B = kChannelBlock;
    std::vector<double> dwc(sz(R * B)), da(sz(W * B)), wblk(sz(R * B));
    double e[B], de[B];
#pragma omp for schedule(static)
    for (std::int64_t blk = 0; blk < nblocks; ++blk) {
      const std::int64_t c0 = blk * B, nc = std::min(B, C - c0);
      std::fill(dwc.begin(), dwc.end(), 0.0);
      std::fill(da.begin(), da.end(), 0.0);
      // This block's columns of W_c, zero-padded to B lanes.
      for (std::int64_t j = 0; j < R; ++j)
        for (std::int64_t cc = 0; cc < B; ++cc) wblk[sz(j * B + cc)] = cc < nc ? wc[j * C + c0 + cc] : 0.0;
      for (std::int64_t i = 0; i < N; ++i) {
        const double* dri = dR + i * R;
        for (std::int64_t cc = 0; cc < B; ++cc) e[cc] = de[cc] = 0.0;
        for (std::int64_t t = 0; t < W && t <= i; ++t) {
          const float* row = E + (i - t) * C + c0;
          const float* tap = at + t * C + c0;
          for (std::int64_t cc = 0; cc < nc; ++cc) e[cc] += static_cast<double>(tap[cc]) * row[cc];
        }
        for (std::int64_t j = 0; j < R; ++j) {
          const double d = dri[j];
          if (d == 0.0) continue;
          const double* w = wblk.data() + j * B;
          double* acc = dwc.data() + j * B;
#pragma omp simd
          for (std::int64_t cc = 0; cc < B; ++cc) {  // independent lanes: no sum is reordered
            acc[cc] += d * e[cc];
            de[cc] += w[cc] * d;
          }
        }
        for (std::int64_t t = 0; t < W && t <= i; ++t) {
          const float* row = E + (i - t) * C + c0;
          double* acc = da.data() + t * B;
          for (std::int64_t cc = 0; cc < nc; ++cc) acc[cc] += de[cc] * row[cc];
        }
      }
      for (std::int64_t j = 0; j < R; ++j)
        for (std::int64_t cc = 0; cc < nc; ++cc) gw[j * C + c0 + cc] += static_cast<float>(weight * dwc[sz(j * B + cc)]);
      for (std::int64_t t = 0; t < W; ++t)
        for (std::int64_t cc = 0; cc < nc; ++cc) gt[t * C + c0 + cc] += static_cast<float>(weight * da[sz(t * B + cc)]);
    }
  }
}

}  // namespace dsrsq::cpu
