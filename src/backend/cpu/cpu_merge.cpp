// The attention merge: the one log-sum-exp rule that ring attention, SQA
// cluster attention and RCKV use to combine partial attention results.
// Rule and shapes: AttentionMergeArgs in backend/backend.hpp. No backward (the
// backward of a merged attention runs each part's attention_bwd with the merged
// lse). Arithmetic type A is the wider of the running (F) and partial (P) dtypes.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "backend/cpu/cpu_backend.hpp"

namespace dsrsq::cpu {
namespace {

template <class F, class P>
void merge_t(const AttentionMergeArgs& a) {
  using A = std::conditional_t<(sizeof(P) > sizeof(F)), P, F>;
  const std::int64_t B = a.o.shape[0], T = a.o.shape[1], NH = a.o.shape[2], HS = a.o.shape[3];
  F* O = a.o.ptr<F>();
  F* L = a.lse.ptr<F>();
  const P* Ob = a.o_b.ptr<P>();
  const P* Lb = a.lse_b.ptr<P>();
  constexpr A ninf = -std::numeric_limits<A>::infinity();
  constexpr A pinf = std::numeric_limits<A>::infinity();
  // Rows are independent: the thread count cannot change a result.
#pragma omp parallel for collapse(2) schedule(static) if (B * T * NH * HS > kParallelMin)
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < NH; ++h)
      for (std::int64_t t = 0; t < T; ++t) {
        const std::int64_t li = (b * NH + h) * T + t;
        F* orow = O + ((b * T + t) * NH + h) * HS;
        const P* brow = Ob + ((b * T + t) * NH + h) * HS;
        A la = static_cast<A>(L[li]), lb = static_cast<A>(Lb[li]);
        if (la == pinf) la = ninf;
        if (lb == pinf) lb = ninf;
        const A m = std::max(la, lb);
        if (m == ninf) {
          L[li] = static_cast<F>(ninf);
          std::fill(orow, orow + HS, F(0));
          continue;
        }
        const A wa = la == ninf ? A(0) : std::exp(la - m);
        const A wb = lb == ninf ? A(0) : std::exp(lb - m);
        const A ws = wa + wb;  // >= 1: the side at m has weight 1
        L[li] = static_cast<F>(m + std::log(ws));
        const A ca = wa / ws, cb = wb / ws;
        for (std::int64_t i = 0; i < HS; ++i) {
          const A xa = wa == A(0) ? A(0) : static_cast<A>(orow[i]);
          const A xb = wb == A(0) ? A(0) : static_cast<A>(brow[i]);
          orow[i] = static_cast<F>(ca * xa + cb * xb);
        }
      }
}

}  // namespace

void CpuBackend::attention_merge_impl(const AttentionMergeArgs& a) {
  if (a.o.dtype == DType::f32 && a.o_b.dtype == DType::f32)
    merge_t<float, float>(a);
  else if (a.o.dtype == DType::f32)
    merge_t<float, double>(a);
  else if (a.o_b.dtype == DType::f32)
    merge_t<double, float>(a);
  else
    merge_t<double, double>(a);
}

}  // namespace dsrsq::cpu
