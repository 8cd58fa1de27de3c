// The decode path of attention_fwd (few queries, Tq <= 4, over a long key set:
// src/backend/cpu/cpu_decode_attention.cpp on the CPU) against the
// double-precision reference (tests/common/reference.hpp), at odd sizes that
// cross the kernel's 64-key blocks and its per-thread key ranges, with masks
// (causal positions, shuffled keys, rows that see no key, non-causal), head
// sizes 32/64/128 and odd ones; plus its determinism for a fixed thread count.
//
// Tolerances (error analysis, as test_ops.cpp): an f32 score is a dot of HS
// terms (relative error <= HS u, u = 2^-24); the weights use a polynomial exp
// (~1e-7 relative); the output sums S weighted values per thread range plus a
// merge of <= P partials. For S <= 10^4 the per-element relative error is
// bounded by ~(HS + S/P) u ~ 3e-4 in the worst case and is ~sqrt(S) u ~ 6e-6
// typically, so the NMSE is ~1e-11; 1e-10 (test_ops.cpp's kNmse) fails on any
// real bug (a dropped block or a wrong mask moves it to >= 1e-4). In f64 the
// same bound with u = 2^-53 gives NMSE ~1e-28; 1e-24 is used.
#define BOOST_TEST_MODULE dsrsq_decode_attention
#include <boost/test/unit_test.hpp>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/reference.hpp"
#include "../common/staging.hpp"
#include "backend/backend.hpp"

using dsrsq::Shape;
using dsrsq::TensorView;
using ref::Guarded;
using ref::IVec;
using ref::Vec;

namespace {

constexpr double kNmse32 = 1e-10;
constexpr double kNmse64 = 1e-24;

enum class Mask { all_visible, causal_tail, shuffled, none_visible_rows, noncausal };

struct Case {
  std::int64_t B, T, S, NH, HS;
  Mask mask;
};

const char* mask_name(Mask m) {
  switch (m) {
    case Mask::all_visible: return "all_visible";
    case Mask::causal_tail: return "causal_tail";
    case Mask::shuffled: return "shuffled";
    case Mask::none_visible_rows: return "rows_without_keys";
    case Mask::noncausal: return "noncausal";
  }
  return "?";
}

// Keys at positions 1..S (+3b; shuffled for Mask::shuffled); queries at the
// last T key positions (causal_tail: the last keys are in the future of the
// earlier queries), after every key (all_visible), or query 0 at position 0
// (rows_without_keys: it sees nothing).
void positions(const Case& c, dsrsq::Rng& rng, IVec& qpos, IVec& kpos) {
  qpos.assign(static_cast<std::size_t>(c.B * c.T), 0);
  kpos.assign(static_cast<std::size_t>(c.B * c.S), 0);
  for (std::int64_t b = 0; b < c.B; ++b) {
    IVec kp(static_cast<std::size_t>(c.S));
    for (std::int64_t j = 0; j < c.S; ++j) kp[static_cast<std::size_t>(j)] = static_cast<std::int32_t>(j + 1 + 3 * b);
    if (c.mask == Mask::shuffled) ref::shuffle(kp, rng);
    for (std::int64_t i = 0; i < c.T; ++i) {
      std::int32_t p = static_cast<std::int32_t>(c.S + 1 + 3 * b + i);
      if (c.mask == Mask::causal_tail || c.mask == Mask::shuffled)
        p = static_cast<std::int32_t>(std::max<std::int64_t>(0, c.S - c.T + i) + 1 + 3 * b);
      if (c.mask == Mask::none_visible_rows && i == 0) p = 0;
      qpos[static_cast<std::size_t>(b * c.T + i)] = p;
    }
    std::copy(kp.begin(), kp.end(), kpos.begin() + b * c.S);
  }
}

template <class T>
struct Run {
  std::vector<T> o, lse;
};

template <class T>
Run<T> run(dsrsq::Backend& be, const Case& c, const std::vector<T>& q, const std::vector<T>& k,
           const std::vector<T>& v, IVec& qpos, IVec& kpos, bool check_guards) {
  const std::int64_t nq = c.B * c.T * c.NH * c.HS;
  Guarded<T> gq(q), gk(k), gv(v), o(nq, std::numeric_limits<T>::quiet_NaN()),
      lse(c.B * c.NH * c.T, std::numeric_limits<T>::quiet_NaN());
  Guarded<std::int32_t> gqp(qpos), gkp(kpos);
  const Shape qs{c.B, c.T, c.NH, c.HS}, ks{c.B, c.S, c.NH, c.HS};
  be.attention_fwd({TensorView(gq.data(), qs), TensorView(gk.data(), ks), TensorView(gv.data(), ks),
                    TensorView(o.data(), qs), TensorView(lse.data(), Shape{c.B, c.NH, c.T}),
                    TensorView(gqp.data(), Shape{c.B, c.T}), TensorView(gkp.data(), Shape{c.B, c.S}),
                    c.mask != Mask::noncausal, 0.0});
  if (check_guards) {
    BOOST_TEST(o.intact(), "o: guard zone overwritten");
    BOOST_TEST(lse.intact(), "lse: guard zone overwritten");
  }
  return {o.to_vector(), lse.to_vector()};
}

template <class T>
void check_case(dsrsq::Backend& be, const Case& c, double tol) {
  dsrsq::Rng rng(29, static_cast<std::uint64_t>(c.S * 7 + c.T * 3 + c.HS));
  IVec qpos, kpos;
  positions(c, rng, qpos, kpos);
  const std::int64_t nq = c.B * c.T * c.NH * c.HS, nk = c.B * c.S * c.NH * c.HS;
  // Scores of sd ~1.5 (inputs sd 1.2 / HS^(1/4) per element after scaling).
  const auto q = ref::normal<T>(nq, rng, 1.2), k = ref::normal<T>(nk, rng, 1.2), v = ref::normal<T>(nk, rng);
  const Run<T> got = run<T>(be, c, q, k, v, qpos, kpos, true);
  const ref::AttentionOut want = ref::attention(ref::to_double(q), ref::to_double(k), ref::to_double(v), qpos, kpos,
                                                c.B, c.T, c.S, c.NH, c.HS, c.mask != Mask::noncausal);
  BOOST_TEST(ref::all_finite(got.o.data(), nq), "o: NaN or Inf");
  const double eo = ref::nmse(got.o, want.o);
  BOOST_TEST(eo <= tol, "o: nmse=" << eo);
  Vec lf, lw;
  for (std::size_t i = 0; i < want.lse.size(); ++i) {
    if (std::isinf(want.lse[i])) {
      BOOST_TEST((std::isinf(static_cast<double>(got.lse[i])) && got.lse[i] < 0), "lse[" << i << "] want -inf");
    } else {
      lf.push_back(static_cast<double>(got.lse[i]));
      lw.push_back(want.lse[i]);
    }
  }
  const double el = ref::nmse(lf, lw);
  BOOST_TEST(el <= tol, "lse: nmse=" << el);
  if (c.mask == Mask::none_visible_rows)
    for (std::int64_t b = 0; b < c.B; ++b)
      for (std::int64_t h = 0; h < c.NH; ++h)
        for (std::int64_t d = 0; d < c.HS; ++d)
          BOOST_TEST(got.o[static_cast<std::size_t>(((b * c.T) * c.NH + h) * c.HS + d)] == T(0));
}

const std::vector<Case>& cases() {
  static const std::vector<Case> cs = {
      {1, 1, 1, 1, 32, Mask::all_visible},
      {1, 1, 63, 4, 32, Mask::all_visible},
      {1, 1, 65, 4, 32, Mask::all_visible},
      {1, 1, 1000, 4, 32, Mask::all_visible},
      {1, 1, 4097, 2, 64, Mask::all_visible},    // split across threads at a non-block boundary
      {1, 1, 3001, 1, 128, Mask::all_visible},
      {2, 1, 777, 3, 24, Mask::all_visible},     // B > 1, odd head size
      {1, 3, 513, 2, 32, Mask::causal_tail},     // Tq = 3: the last keys are masked for earlier queries
      {2, 4, 1029, 2, 8, Mask::shuffled},        // keys in any order
      {2, 2, 300, 2, 16, Mask::none_visible_rows},
      {1, 2, 257, 3, 32, Mask::noncausal},
  };
  return cs;
}

}  // namespace

BOOST_AUTO_TEST_CASE(decode_attention_matches_reference) {
  for (dsrsq::Backend* backend : dsrsq::available_backends())
    for (int threads : {1, 2, 3})
      for (const Case& c : cases())
        BOOST_TEST_CONTEXT(ref::name("backend ", backend->name(), " threads=", threads, " B=", c.B, " Tq=", c.T,
                                     " S=", c.S, " NH=", c.NH, " HS=", c.HS, " mask=", mask_name(c.mask))) {
          omp_set_num_threads(threads);
          // A device backend takes the case's host buffers through its staging
          // front (tests/common/staging.hpp); its attention is f32 only.
          check_case<float>(ref::on_host(*backend), c, kNmse32);
          if (backend->device() == dsrsq::Device::cpu) check_case<double>(*backend, c, kNmse64);
        }
  omp_set_num_threads(omp_get_num_procs());
}

// The key ranges and the merge order depend only on (S, thread count): the
// same call twice gives the same bits; a different thread count changes only
// the rounding (within the reference tolerance above).
BOOST_AUTO_TEST_CASE(decode_attention_deterministic_per_thread_count) {
  dsrsq::Backend& be = dsrsq::cpu_backend();
  const Case c{1, 1, 5000, 4, 32, Mask::all_visible};
  dsrsq::Rng rng(31, 1);
  IVec qpos, kpos;
  positions(c, rng, qpos, kpos);
  const auto q = ref::normal<float>(c.T * c.NH * c.HS, rng, 1.2), k = ref::normal<float>(c.S * c.NH * c.HS, rng, 1.2),
             v = ref::normal<float>(c.S * c.NH * c.HS, rng);
  for (int threads : {1, 2, 4}) {
    omp_set_num_threads(threads);
    const Run<float> a = run<float>(be, c, q, k, v, qpos, kpos, false), b = run<float>(be, c, q, k, v, qpos, kpos, false);
    BOOST_TEST_CONTEXT("threads=" << threads) {
      BOOST_TEST(std::memcmp(a.o.data(), b.o.data(), a.o.size() * sizeof(float)) == 0);
      BOOST_TEST(std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * sizeof(float)) == 0);
    }
  }
  omp_set_num_threads(omp_get_num_procs());
}
