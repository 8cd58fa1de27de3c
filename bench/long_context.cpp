// bench_long_context: inference cost of the standard transformer and of DSRSQ
// on the same weights as the context grows, plus RCKV's memory while streaming,
// plus (--acc_examples) every method's accuracy beside its time and bytes.
//
// The two methods are entries of the method table (methods/registry.cpp),
// found by name and made through MethodInfo::make with their own knobs: the
// bench's options include each entry's options (knobs()->describe), so
// --dsr_d_r, --sqa_clusters, ... are the dsrsq program's own options; only
// their defaults differ: the bench starts DSRSQ's knobs at the paper's
// settings (kPaperDefaults below, parsed into the knobs before the command
// line, so --help shows them). Each is evaluated through Method::plan(""):
// Per context size N (1K, 2K, ... --max_context; N = context tokens, the prompt
// is [BOS] context [SEP] question [ANS]), each method does one prefill and then
// --decode single-token decode steps (greedy; every step is run even if EOS
// comes out, so both methods do the same number of steps):
//   select    the plan's selector, if it has one (timed as "select"; dsrsq:
//             the DSR retriever scores EVERY context token);
//   prefill   the plan's KV policy (made by plan(), counted here), the
//             selected tokens (the whole prompt without a selector) at their
//             original positions in one extend(), then end_prefill (dsrsq:
//             SQA clusters built there, included);
//   decode    the decode steps at positions prompt_len, prompt_len + 1, ...
//   standard  no selector, the "full" KV policy;
//   dsrsq     the retriever's selection through the RCKV policy.
// Time = wall clock of all of that (median of --repeats runs, each after an
// untimed 1K warm-up in the same process). KV = the policy's K/V arena after
// prefill (KVPolicy::memory(), bytes actually allocated). Peak (tracked) =
// activation-arena peak + KV peak (+ RCKV scratch peak) over the whole run; for
// DSRSQ the larger of that and the selector's memory (inference path), which is alive
// only during select_prompt. rss = peak resident set growth of the process
// that ran the measurement (every (method, N) runs in its own forked child, so
// one measurement's memory never hides another's).
// The time-growth exponent is the least-squares slope of log(time) on log(N).
//
// Streaming (DSRSQ-specific): an RckvPolicy (the DSRSQ method's settings and
// projections, through methods::dsrsq_model_of) fed --stream_tokens tokens
// (haystack text, positions 0, 1, 2, ...) through Transformer::extend in chunks
// of --stream_chunk; its memory (and the process's heap and RSS) is printed
// after 10^4, 3*10^4, 10^5, 3*10^5, 10^6 tokens. By default through a SMALLER
// model (d_model 64, 2 heads, 1 layer, d_c 32: the main model's head size and
// C/d_c) for time; --stream_same_model uses the main model.
//
// Weights: random (init_weights(seed), DsrsqModel::init(seed)) unless
// --init_from gives a checkpoint (the backbone, and each method's parameters
// through its TrainingExtension::load_params); a speed benchmark needs no trained weights,
// but the retriever's selection (and so what DSRSQ attends to) is then arbitrary.
//
// Correctness column: logits finite and every decode step run; the prefill
// logits and the generated tokens bitwise identical in every repeat (all in one
// process, each with a fresh policy); standard: KV bytes =
// KVBudget::full_bytes(prompt + decode) (up to arena rounding); dsrsq: selected
// indices sorted, unique, in the prompt, [BOS] and the question kept, KV bytes
// = the policy's achieved budget. Not a check, shown as vs_full: the largest
// |logit difference| / largest |logit| between DSRSQ's prefill and the full
// cache on the same selected tokens at the same positions (0 up to rounding
// when RCKV prefills a single call exactly; larger when the policy attends
// through SQA clusters or reconstructions during prefill, as it trains).
// Decode bandwidth (DecodeBwResult below): the contiguous caches' decode
// steps (full, window) in GB/s against a STREAM-like yardstick measured in the
// same process, and each policy's time to first token.
// Accuracy beside cost (--acc_examples N > 0; --only-accuracy runs it alone):
// every method of --acc_methods (default: every training-free method of the
// table, then each method given --method_init NAME=CKPT, its own trained
// weights) scores the dsrsq program's test split of run seed --data_seed
// (data::make_split: the same examples and prompts as `dsrsq eval`), N per
// context size, at KV budget --acc_budget under --protocol, through the
// program's evaluator (evaluate_method). Per (N, method): F1 with a bootstrap
// interval, the paired difference against the full cache with its interval
// and an exact sign test, and the same run's first-token and serving times,
// KV bytes held and read per step, and peak memory, with time and KV ratios
// to the full cache: a speed ratio beside the accuracy it costs.
// Output: nccl-tests style tables; last lines
//   dsrsq_vs_standard_time_32k=<x> kv_32k=<y> exponent=<z>
//   decode_of_bandwidth=<w> decode_of_read_bandwidth=<r>
// (z = DSRSQ's exponent). Exit code 1 when a correctness check failed; targets
// are reported met / MISSED and do not change the exit code.
#include <malloc.h>
#include <omp.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/program_options.hpp>
#include <algorithm>
#include <iostream>
#include <limits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "kv/rckv.hpp"
#include "core/omp_wait.hpp"
#include "core/rng.hpp"
#include "data/tasks.hpp"
#include "eval/evaluator.hpp"
#include "core/timer.hpp"
#include "data/tokenizer.hpp"
#include "dsrsq/build_info.hpp"
#include "io/checkpoint.hpp"
#include "kv/kv_policy.hpp"
#include "model/transformer.hpp"
#include "methods/dsrsq.hpp"
#include "methods/method.hpp"
#include "train/encode.hpp"

namespace {

using dsrsq::ByteTokenizer;

struct Options {
  std::int64_t d_model = 128, n_heads = 4, n_layers = 2, d_ff = 512;
  double rope_theta = 10000.0, attn_log_scale = 0.0;  // the main model's (as the dsrsq program's options)
  std::int64_t min_context = 1024, max_context = 32768, decode = 32;
  int threads = 2, repeats = 0;  // 0: 5 below 16K, 3 from 16K (both methods)
  std::uint64_t seed = 1;
  std::int64_t stream_tokens = 1000000, stream_chunk = 1024;
  // Streaming model: 0 = as the main model. Default d_model 64, 2 heads, 1 layer, d_ff 256,
  // RCKV d_c scaled with d_model (32: the same C/d_c = 2 and head size 32 as the main model):
  // RCKV's buffer kernel costs ~L * NH * slots * (HS + d_c) per token, and 10^6 tokens
  // through the main model take ~10-15 minutes on 2 cores. --stream_same_model restores it.
  std::int64_t stream_d_model = 64, stream_n_heads = 2, stream_n_layers = 1, stream_d_ff = 256;
  std::string haystack, init_from, question = "What did the President say about taxes, debt and the budget?";
  // Decode bandwidth section: the window policy's budget (fraction of the full
  // cache), and the yardstick arrays' size.
  double window_budget = 0.5;
  std::int64_t bw_mb = 64;
  bool decode_bw = true, only_decode_bw = false;
  // Accuracy part (acc_examples > 0): the program's needle test split scored
  // by every method of acc_methods at KV budget acc_budget.
  std::int64_t acc_examples = 0, max_new_tokens = 12;
  std::vector<std::string> acc_methods, method_init;
  std::vector<std::string> task_params{"digits=4"};  // the program's default for the needle task
  std::string acc_budget = "0.125", protocol = "query_aware", acc_json, datasets;
  std::uint64_t data_seed = 1234;
  bool only_accuracy = false;
  std::set<std::string> given;  // options set on the command line (not defaulted)
};

namespace methods = dsrsq::methods;

// The methods compared: the baseline (its ratios' denominator; the full cache)
// and the method measured against it, both entries of the method table.
constexpr std::string_view kBaseline = "standard", kCompared = "dsrsq";

// The bench's defaults for a method's knobs (the program's defaults are the
// debug size): DSRSQ at the paper's settings. Parsed into the knobs before
// their options are described, so --help shows them and the command line
// overrides them.
const std::map<std::string_view, std::vector<std::string>> kPaperDefaults{
    {"dsrsq",
     {"--dsr_d_r=128", "--dsr_span=3", "--dsr_base_budget=512", "--dsr_alpha=0.5", "--sqa_clusters=32",
      "--sqa_top_clusters=8", "--rckv_d_c=64", "--rckv_buffer=1024", "--rckv_window=16"}},
};

// One method of the comparison: its table entry and its knobs (null: none).
struct Compared {
  const methods::MethodInfo* info = nullptr;
  std::shared_ptr<methods::MethodKnobs> knobs;
  // Accuracy part, a method on its own trained weights (--method_init NAME=CKPT): that
  // checkpoint's parameters (the backbone's, or the method's own model's) and method state.
  std::string ckpt;
  std::vector<float> ckpt_params;
  std::map<std::string, std::vector<float>> ckpt_extra;
  const char* name() const { return info->name.data(); }  // the table's names are literals
};

// `args` (command-line tokens) parsed into `knobs` alone.
void set_knobs(methods::MethodKnobs& knobs, const std::vector<std::string>& args) {
  namespace po = boost::program_options;
  po::options_description d;
  knobs.describe(d);
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(d).run(), vm);
  po::notify(vm);
}

// A fresh knobs object of `info` holding `base`'s resolved values with
// `changes` (name -> value) applied.
std::shared_ptr<methods::MethodKnobs> knobs_with(const methods::MethodInfo& info, const methods::MethodKnobs& base,
                                                 const std::map<std::string, std::string>& changes) {
  namespace po = boost::program_options;
  std::map<std::string, std::string> kv;
  base.resolved(kv);
  for (const auto& [k, v] : changes) kv[k] = v;
  auto out = info.knobs();
  po::options_description d;
  out->describe(d);
  std::vector<std::string> args;
  for (const auto& [k, v] : kv) {
    const po::option_description* od = d.find_nothrow(k, false);
    if (od == nullptr) throw std::runtime_error("method " + std::string(info.name) + ": no option --" + k);
    if (od->semantic()->max_tokens() == 0) {  // a switch
      if (v == "true") args.push_back("--" + k);
      continue;
    }
    args.push_back("--" + k);
    std::istringstream is(v);  // multi-token values are space-separated
    for (std::string t; is >> t;) args.push_back(t);
  }
  set_knobs(*out, args);
  return out;
}

// A knob's resolved value.
std::string knob(const methods::MethodKnobs& k, const std::string& name) {
  std::map<std::string, std::string> kv;
  k.resolved(kv);
  const auto it = kv.find(name);
  if (it == kv.end()) throw std::runtime_error("no knob '" + name + "'");
  return it->second;
}
long long knob_int(const methods::MethodKnobs& k, const std::string& name) { return std::stoll(knob(k, name)); }
double knob_num(const methods::MethodKnobs& k, const std::string& name) { return std::stod(knob(k, name)); }

dsrsq::ModelConfig model_config(const Options& o, bool streaming = false) {
  dsrsq::ModelConfig c;
  c.vocab = static_cast<std::int64_t>(ByteTokenizer::kVocabSize);
  auto pick = [&](std::int64_t main, std::int64_t s) { return streaming && s > 0 ? s : main; };
  c.d_model = pick(o.d_model, o.stream_d_model);
  c.n_heads = pick(o.n_heads, o.stream_n_heads);
  c.n_layers = pick(o.n_layers, o.stream_n_layers);
  c.d_ff = pick(o.d_ff, o.stream_d_ff);
  if (!streaming || o.stream_d_model == 0) {  // a checkpoint's settings apply to the main model
    c.rope_theta = o.rope_theta;
    c.attn_log_base = o.attn_log_scale;
  }
  // RoPE has no table: max_pos only bounds the position check.
  c.max_pos = std::max<std::int64_t>({std::int64_t{1} << 21, o.stream_tokens + 64, o.max_context + 4096});
  c.validate();
  return c;
}

// What every measurement process inherits from the parent (read before any fork).
struct Shared {
  Options o;
  dsrsq::ModelConfig mc, smc;     // main model, streaming model
  std::vector<Compared> methods;  // {baseline, compared}
  // DSRSQ's knobs for the streaming model: the compared method's, RCKV's latent
  // size scaled with d_model (same compression ratio), d_r at most d_model.
  std::shared_ptr<methods::MethodKnobs> stream_knobs;
  std::vector<std::int32_t> hay;       // byte tokens of the haystack text, one pass
  std::vector<std::int32_t> question;  // byte tokens of the question
  std::vector<float> ckpt_params;                        // empty: random init
  std::map<std::string, std::vector<float>> ckpt_extra;  // the checkpoint's method state (load_params)
  std::vector<Compared> acc;                 // accuracy part: the methods scored, in table order
  std::vector<dsrsq::data::Example> acc_test;  // accuracy part: the test split (meta context_size)
};

dsrsq::Encoded make_prompt(const Shared& sh, std::int64_t n) {
  dsrsq::Encoded e;
  e.tokens.reserve(static_cast<std::size_t>(n) + sh.question.size() + 3);
  e.tokens.push_back(ByteTokenizer::kBos);
  for (std::int64_t i = 0; i < n; ++i) e.tokens.push_back(sh.hay[static_cast<std::size_t>(i) % sh.hay.size()]);
  e.tokens.push_back(ByteTokenizer::kSep);
  e.tokens.insert(e.tokens.end(), sh.question.begin(), sh.question.end());
  e.tokens.push_back(ByteTokenizer::kAns);
  e.prompt_len = static_cast<std::int64_t>(e.tokens.size());
  e.query_len = static_cast<std::int64_t>(sh.question.size()) + 2;
  e.context_tokens = n;
  return e;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// ---- one measurement (runs in a forked child) -----------------------------------------

// A method made on `model` (the run's seed; AdamW defaults: it only evaluates),
// with the checkpoint's parameters of the method when there are any.
// Returns whether they were loaded.
std::unique_ptr<methods::Method> make_method(const Shared& sh, const Compared& c, methods::MethodKnobs* knobs,
                                             dsrsq::Transformer& model, bool load, bool* loaded = nullptr) {
  const methods::MethodContext ctx{model, dsrsq::cpu_backend(), knobs, dsrsq::AdamWConfig{}, sh.o.seed};
  auto m = c.info->make(ctx);
  bool got = false;
  if (load && !sh.ckpt_extra.empty())
    if (methods::TrainingExtension* t = m->training()) got = t->load_params(sh.ckpt_extra);
  if (loaded) *loaded = got;
  return m;
}

struct RunResult {  // plain data: sent through a pipe
  std::int32_t done = 0, ok = 0, sqa_active = 0;
  char error[480] = {};
  std::int64_t prompt_len = 0, tokens_in = 0, decoded = 0, repeats = 0;
  double total_s = 0, total_min = 0, total_max = 0, select_s = 0, prefill_s = 0, decode_s = 0;
  std::int64_t kv_bytes = 0, peak_bytes = 0, act_peak = 0, dsr_record = 0, rss_delta = 0;
  double attended = 0;   // mean keys one decode query attended to
  double vs_full = -1;   // dsrsq: max |logit diff| / max |logit| vs the full cache (-1: n/a)
};

struct OneRun {
  double select_s = 0, prefill_s = 0, decode_s = 0;
  std::int64_t tokens_in = 0, decoded = 0;
  bool finite = true, sqa = false;
  dsrsq::KVMemory kv;
  std::size_t act_peak = 0, scratch_peak = 0, achieved = 0;
  double attended = 0;
  std::vector<std::int32_t> idx;     // dsrsq: selected prompt indices
  std::vector<float> prefill_logits;  // (tokens_in, V) for dsrsq, the last row for standard; copied untimed
  std::vector<std::int32_t> gen;      // the tokens fed to the decode steps, then the last prediction
  double total() const { return select_s + prefill_s + decode_s; }
};

std::int32_t argmax_last_row(const dsrsq::TensorView& logits, bool& finite) {
  const std::int64_t rows = logits.shape[0], V = logits.shape[1];
  const float* p = logits.ptr<float>() + (rows - 1) * V;
  std::int64_t best = 0;
  for (std::int64_t j = 0; j < V; ++j) {
    finite = finite && std::isfinite(p[j]);
    if (p[j] > p[best]) best = j;
  }
  return static_cast<std::int32_t>(best);
}

// `steps` single-token extends starting with token `first` at position pos0.
double decode_loop(dsrsq::Transformer& model, dsrsq::KVPolicy& policy, std::int32_t first, std::int64_t pos0,
                   std::int64_t steps, OneRun& r) {
  r.gen.reserve(static_cast<std::size_t>(steps) + 1);
  dsrsq::Timer t;
  std::int32_t tk = first;
  for (std::int64_t s = 0; s < steps; ++s) {
    r.gen.push_back(tk);
    std::int32_t p = static_cast<std::int32_t>(pos0 + s);
    model.extend(policy, dsrsq::TensorView(&tk, dsrsq::Shape{1, 1}), dsrsq::TensorView(&p, dsrsq::Shape{1, 1}));
    tk = argmax_last_row(model.logits(), r.finite);
    ++r.decoded;
  }
  const double dt = t.seconds();
  r.gen.push_back(tk);
  return dt;
}

// One evaluation through the method's plan: its selector (timed as "select";
// none: the whole prompt), then its KV policy (made by plan(), counted in the
// prefill) through prefill and the decode steps.
OneRun run_method(methods::Method& method, dsrsq::Transformer& model, const dsrsq::Encoded& enc, std::int64_t decode) {
  OneRun r;
  dsrsq::Arena& act = model.activation_arena();
  act.reset();
  act.reset_peak();
  dsrsq::Timer tp;
  methods::EvalPlan plan = method.plan("");
  const double plan_s = tp.seconds();
  std::vector<std::int32_t> pos;
  if (plan.select) {
    dsrsq::Timer t;
    r.idx = plan.select(enc, dsrsq::SelectionEnv{ByteTokenizer(), dsrsq::KVBudget{}, decode}).idx;
    r.select_s = t.seconds();
    pos = r.idx;
  }
  dsrsq::Timer t2;
  const bool whole = !plan.select;
  if (whole) {
    pos.resize(static_cast<std::size_t>(enc.prompt_len));
    std::iota(pos.begin(), pos.end(), 0);
  }
  const auto n = static_cast<std::int64_t>(pos.size());
  std::vector<std::int32_t> tok;
  if (!whole) {
    tok.resize(pos.size());
    for (std::size_t i = 0; i < pos.size(); ++i) tok[i] = enc.tokens[static_cast<std::size_t>(pos[i])];
  }
  dsrsq::KVPolicy& policy = *plan.policy;
  dsrsq::SequenceInfo info;
  info.prompt_len = n;
  info.query_len = enc.query_len;
  info.max_new_tokens = decode;
  // The budget is a fraction of the FULL sequence's cache, whatever a selector keeps (as the evaluator).
  info.budget_tokens = enc.prompt_len + decode;
  policy.begin(info, dsrsq::KVBudget{});
  model.extend(policy, dsrsq::TensorView(whole ? enc.tokens.data() : tok.data(), dsrsq::Shape{1, n}),
               dsrsq::TensorView(pos.data(), dsrsq::Shape{1, n}));
  policy.end_prefill();
  const std::int32_t next = argmax_last_row(model.logits(), r.finite);
  r.prefill_s = plan_s + t2.seconds();
  r.tokens_in = n;
  {
    // With a selector every row (for vs_full), else the last row; copied untimed.
    const dsrsq::TensorView lg = model.logits();
    const std::int64_t V = lg.shape[1];
    r.prefill_logits.assign(lg.ptr<float>() + (whole ? (lg.shape[0] - 1) * V : 0), lg.ptr<float>() + lg.shape[0] * V);
  }
  r.decode_s = decode_loop(model, policy, next, enc.prompt_len, decode, r);
  r.kv = policy.memory();
  r.achieved = policy.budget_achieved_bytes();
  r.act_peak = act.peak_bytes();
  r.attended = policy.attended_tokens();
  if (const auto* rc = dynamic_cast<const dsrsq::compress::RckvPolicy*>(&policy)) {
    r.scratch_peak = rc->scratch_peak_bytes();
    r.sqa = rc->sqa_active();
  }
  return r;
}

// DSRSQ-specific: bytes its selector holds while it runs, recomputed outside
// the timers: the inference path's block buffers and seed heap
// (DsrScorer::select_inference, what select_prompt runs) plus the selection.
// (Before that path existed this was the training forward record, ~1.56 KB per
// context token at d_model 128, d_r 128.)
std::size_t dsr_record_bytes(dsrsq::DsrsqModel& dm, dsrsq::Transformer& model, const dsrsq::Encoded& enc) {
  std::span<const std::int32_t> ctx(enc.tokens.data() + 1, static_cast<std::size_t>(enc.context_tokens));
  const std::int64_t q0 = enc.prompt_len - enc.query_len + 1, q1 = enc.prompt_len - 1;
  std::span<const std::int32_t> q(enc.tokens.data() + q0, static_cast<std::size_t>(q1 - q0));
  dsrsq::retrieval::DsrInferenceStats st;
  const auto sel = dm.scorer().select_inference(model.param("wte").value, ctx, q, &st);
  return st.scratch_bytes + 4 * (sel.seeds.capacity() + sel.positions.capacity());
}

template <class R>
void set_error(R& res, const std::string& msg) {
  std::snprintf(res.error, sizeof res.error, "%s", msg.c_str());
}

RunResult measure(const Shared& sh, std::size_t mi, std::int64_t n_ctx, int repeats) {
  RunResult res;
  omp_set_num_threads(sh.o.threads);
  dsrsq::Transformer model(sh.mc, dsrsq::cpu_backend());
  model.init_weights(sh.o.seed);
  if (!sh.ckpt_params.empty())
    std::memcpy(model.flat_params().data, sh.ckpt_params.data(), sh.ckpt_params.size() * sizeof(float));
  const Compared& c = sh.methods.at(mi);
  const bool baseline = mi == 0;
  const auto method = make_method(sh, c, c.knobs.get(), model, true);
  dsrsq::DsrsqModel* dm = methods::dsrsq_model_of(*method);  // DSRSQ only: its retriever's record (dsr_rec)
  const dsrsq::Encoded enc = make_prompt(sh, n_ctx);
  const dsrsq::Encoded warm = make_prompt(sh, std::min<std::int64_t>(n_ctx, 1024));
  const std::size_t rss0 = dsrsq::current_rss_bytes();
  auto run = [&](const dsrsq::Encoded& e) {
    return run_method(*method, model, e, sh.o.decode);
  };
  run(warm);
  std::vector<OneRun> runs;
  for (int r = 0; r < repeats; ++r) runs.push_back(run(enc));
  const std::size_t hwm = dsrsq::peak_rss_bytes();
  std::vector<double> totals;
  for (const auto& r : runs) totals.push_back(r.total());
  const double med = median(totals);
  // The run whose total is closest to the median supplies the breakdown.
  std::size_t pick = 0;
  for (std::size_t i = 0; i < runs.size(); ++i)
    if (std::fabs(runs[i].total() - med) < std::fabs(runs[pick].total() - med)) pick = i;
  const OneRun& r = runs[pick];
  res.repeats = repeats;
  res.prompt_len = enc.prompt_len;
  res.tokens_in = r.tokens_in;
  res.decoded = r.decoded;
  res.total_s = med;
  res.total_min = *std::min_element(totals.begin(), totals.end());
  res.total_max = *std::max_element(totals.begin(), totals.end());
  res.select_s = r.select_s;
  res.prefill_s = r.prefill_s;
  res.decode_s = r.decode_s;
  res.kv_bytes = static_cast<std::int64_t>(r.kv.resident_after_prefill);
  res.act_peak = static_cast<std::int64_t>(r.act_peak);
  res.attended = r.attended;
  res.sqa_active = r.sqa;
  res.rss_delta = static_cast<std::int64_t>(hwm) - static_cast<std::int64_t>(rss0);
  const std::size_t model_phase = r.act_peak + r.kv.peak_prefill + r.scratch_peak;

  std::string why;
  bool ok = true;
  for (const auto& x : runs) ok = ok && x.finite && x.decoded == sh.o.decode;
  if (!ok) why = "non-finite logits or missing decode steps";
  for (const auto& x : runs)
    if (x.gen != runs.front().gen || x.prefill_logits.size() != runs.front().prefill_logits.size() ||
        std::memcmp(x.prefill_logits.data(), runs.front().prefill_logits.data(),
                    x.prefill_logits.size() * sizeof(float)) != 0) {
      ok = false;
      why = "repeats differ (prefill logits or generated tokens not bitwise identical)";
    }
  const std::size_t rounding = 64 * 2 * static_cast<std::size_t>(sh.mc.n_layers);
  if (baseline) {  // the full cache: KV = full_bytes
    res.peak_bytes = static_cast<std::int64_t>(model_phase);
    const std::size_t want = dsrsq::KVBudget::full_bytes(sh.mc, enc.prompt_len + sh.o.decode);
    if (r.kv.resident_after_prefill < want || r.kv.resident_after_prefill > want + rounding) {
      ok = false;
      why = "KV bytes " + std::to_string(r.kv.resident_after_prefill) + " != full_bytes " + std::to_string(want);
    }
  } else {  // the compared method: it selects (DSRSQ); KV = its achieved budget
    if (dm != nullptr) res.dsr_record = static_cast<std::int64_t>(dsr_record_bytes(*dm, model, enc));
    res.peak_bytes = static_cast<std::int64_t>(std::max<std::size_t>(model_phase, static_cast<std::size_t>(res.dsr_record)));
    const auto& idx = r.idx;
    bool sel_ok = !idx.empty() && idx.front() == 0 && std::is_sorted(idx.begin(), idx.end()) &&
                  std::adjacent_find(idx.begin(), idx.end()) == idx.end() && idx.back() == enc.prompt_len - 1 &&
                  static_cast<std::int64_t>(idx.size()) >= enc.query_len + 1;
    for (std::int64_t j = 0; sel_ok && j < enc.query_len; ++j)
      sel_ok = idx[idx.size() - 1 - static_cast<std::size_t>(j)] == enc.prompt_len - 1 - j;
    if (!sel_ok) {
      ok = false;
      why = "selected indices malformed";
    }
    const auto kv = r.kv.resident_after_prefill;
    if (kv < r.achieved || kv > r.achieved + rounding) {
      ok = false;
      why = "KV bytes " + std::to_string(kv) + " != achieved budget " + std::to_string(r.achieved);
    }
    // The same selected tokens through the baseline's (the full cache's) policy (information, not a check).
    const auto base = make_method(sh, sh.methods.front(), sh.methods.front().knobs.get(), model, false);
    const std::unique_ptr<dsrsq::KVPolicy> full = base->plan("").policy;
    dsrsq::SequenceInfo info;
    info.prompt_len = r.tokens_in;
    info.query_len = enc.query_len;
    full->begin(info, dsrsq::KVBudget{});
    std::vector<std::int32_t> tok(idx.size()), pos(idx.begin(), idx.end());
    for (std::size_t i = 0; i < idx.size(); ++i) tok[i] = enc.tokens[static_cast<std::size_t>(idx[i])];
    model.extend(*full, dsrsq::TensorView(tok.data(), dsrsq::Shape{1, r.tokens_in}),
                 dsrsq::TensorView(pos.data(), dsrsq::Shape{1, r.tokens_in}));
    const float* a = model.logits().ptr<float>();
    double diff = 0, mag = 0;
    for (std::size_t i = 0; i < r.prefill_logits.size(); ++i) {
      diff = std::max(diff, static_cast<double>(std::fabs(a[i] - r.prefill_logits[i])));
      mag = std::max(mag, static_cast<double>(std::fabs(a[i])));
    }
    res.vs_full = mag > 0 ? diff / mag : diff;
  }
  res.ok = ok;
  set_error(res, why);
  res.done = 1;
  return res;
}

// ---- streaming (runs in a forked child) ------------------------------------------------

struct StreamRow {
  std::int64_t tokens = 0;
  double seconds = 0;  // since the start of the stream
  std::int64_t kv_resident = 0, kv_allocated = 0, scratch_peak = 0, act_peak = 0, rss = 0, heap = 0, filled = 0;
};
struct StreamResult {
  std::int32_t done = 0, ok = 0, n = 0;
  char error[480] = {};
  std::int64_t slots = 0, window = 0;
  StreamRow rows[8];
};

StreamResult stream(const Shared& sh, const std::vector<std::int64_t>& milestones) {
  StreamResult res;
  omp_set_num_threads(sh.o.threads);
  dsrsq::Transformer model(sh.smc, dsrsq::cpu_backend());
  model.init_weights(sh.o.seed);
  const bool same = sh.smc.num_parameters() == sh.mc.num_parameters() && sh.smc.str() == sh.mc.str();
  if (same && !sh.ckpt_params.empty())
    std::memcpy(model.flat_params().data, sh.ckpt_params.data(), sh.ckpt_params.size() * sizeof(float));
  // DSRSQ-specific: its RCKV projections and settings, from the method made on the streaming model.
  const auto method = make_method(sh, sh.methods.back(), sh.stream_knobs.get(), model, same);
  dsrsq::DsrsqModel* dm = methods::dsrsq_model_of(*method);
  if (dm == nullptr) throw std::runtime_error("streaming: method '" + std::string(sh.methods.back().name()) + "' is not DSRSQ");
  dsrsq::compress::RckvPolicy policy(sh.smc, dsrsq::cpu_backend(), dm->projections(), dm->settings().rckv);
  const std::int64_t total = milestones.back();
  dsrsq::SequenceInfo info;
  info.prompt_len = total;
  policy.begin(info, dsrsq::KVBudget{});
  res.slots = policy.slots();
  res.window = policy.window();
  dsrsq::Arena& act = model.activation_arena();
  act.reset_peak();
  std::vector<std::int32_t> tok, pos;
  std::int64_t done = 0;
  bool finite = true;
  dsrsq::Timer t;
  for (const std::int64_t ms : milestones) {
    while (done < ms) {
      const std::int64_t c = std::min(sh.o.stream_chunk, ms - done);
      tok.resize(static_cast<std::size_t>(c));
      pos.resize(static_cast<std::size_t>(c));
      for (std::int64_t i = 0; i < c; ++i) {
        tok[static_cast<std::size_t>(i)] = sh.hay[static_cast<std::size_t>(done + i) % sh.hay.size()];
        pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(done + i);
      }
      model.extend(policy, dsrsq::TensorView(tok.data(), dsrsq::Shape{1, c}),
                   dsrsq::TensorView(pos.data(), dsrsq::Shape{1, c}));
      done += c;
    }
    argmax_last_row(model.logits(), finite);
    StreamRow& row = res.rows[res.n++];
    row.tokens = done;
    row.seconds = t.seconds();
    row.kv_resident = static_cast<std::int64_t>(policy.memory().resident_after_prefill);
    row.kv_allocated = static_cast<std::int64_t>(policy.kv_bytes_allocated());
    row.scratch_peak = static_cast<std::int64_t>(policy.scratch_peak_bytes());
    row.act_peak = static_cast<std::int64_t>(act.peak_bytes());
    row.rss = static_cast<std::int64_t>(dsrsq::current_rss_bytes());
    const struct mallinfo2 mi = mallinfo2();  // malloc'd bytes in use, all arenas
    row.heap = static_cast<std::int64_t>(mi.uordblks + mi.hblkhd);
    row.filled = policy.filled_slots(0);
  }
  res.ok = finite;
  if (!finite) set_error(res, "non-finite logits while streaming");
  res.done = 1;
  return res;
}

// ---- decode bandwidth (runs in a forked child) -------------------------------------------
//
// Per context N in 8K..32K (within --min/--max_context; the largest one alone
// when none is), in one process:
//   yardstick  STREAM-like kernels over the whole team on --bw_mb MiB f32
//              arrays (well beyond the last-level cache): copy (2 x bytes),
//              axpy y += a x (the Backend's; the triad's traffic, 3 x bytes),
//              read (f32 sum; 1 x bytes); median of 5 each. The yardstick is
//              the LARGEST of the three (a conservative denominator); the
//              decode rows are also shown against read alone (of_read), the
//              machine's rate for the access decode makes;
//   policies   "full" and "window" (StreamingLLM sinks + window at
//              --window_budget of the full cache): the prompt of make_prompt(N)
//              through Transformer::extend in one call (time to first token:
//              prefill + end_prefill), then --decode greedy steps. A forwarding
//              policy times every attend() call during decoding: one decode
//              step's attention = the sum over layers (RoPE of the new token,
//              its append, and the attention over the cache); the median over
//              steps is taken. GB/s = KVPolicy::memory().read_per_step (K/V bytes
//              one step reads, all layers) / that time.
class TimedPolicy final : public dsrsq::KVPolicy {
 public:
  explicit TimedPolicy(dsrsq::KVPolicy& p) : p_(p) {}
  std::string name() const override { return p_.name(); }
  void begin(const dsrsq::SequenceInfo& i, const dsrsq::KVBudget& b) override { p_.begin(i, b); }
  void attend(std::int64_t layer, dsrsq::TensorView q, dsrsq::TensorView k, dsrsq::TensorView v, dsrsq::TensorView pos,
              dsrsq::TensorView out) override {
    dsrsq::Timer t;
    p_.attend(layer, q, k, v, pos, out);
    step_s += t.seconds();
  }
  void end_prefill() override { p_.end_prefill(); }
  dsrsq::KVMemory memory() const override { return p_.memory(); }
  std::size_t budget_requested_bytes() const override { return p_.budget_requested_bytes(); }
  std::size_t budget_achieved_bytes() const override { return p_.budget_achieved_bytes(); }
  double attended_tokens() const override { return p_.attended_tokens(); }
  bool infeasible() const override { return p_.infeasible(); }
  double step_s = 0;  // attend() seconds since the caller last reset it

 private:
  dsrsq::KVPolicy& p_;
};

struct BwRow {
  double ttft_s = 0, step_s = 0, attend_s = 0, gbs = 0, attend_min_s = 0;
  std::int64_t cache_tokens = 0, read_bytes = 0;
};
struct DecodeBwResult {  // plain data: sent through a pipe
  std::int32_t done = 0, ok = 0;
  char error[480] = {};
  double copy_gbs = 0, axpy_gbs = 0, read_gbs = 0, best_gbs = 0;  // best: the fastest single run of any
  BwRow rows[2];  // full, window
  // Kernel alone, one layer's full cache (1, N, NH, HS), one query: the
  // blockwise attention_fwd kernel (the path decode took before) and the
  // backend's attention_fwd (the decode kernel), interleaved, medians of 21.
  double kernel_old_s = 0, kernel_new_s = 0, kernel_bytes = 0, kernel_diff = 0, kernel_old_min = 0, kernel_new_min = 0;
};

double median_of(std::vector<double> v) { return median(std::move(v)); }

DecodeBwResult measure_decode_bw(const Shared& sh, std::int64_t n_ctx) {
  DecodeBwResult res;
  omp_set_num_threads(sh.o.threads);
  dsrsq::Backend& be = dsrsq::cpu_backend();
  {
    // The yardstick's three kernels, each over the whole team (omp_get_max_threads), as STREAM runs them:
    //   copy  b = a (2 x bytes), a parallel loop (the Backend's copy is one memcpy on one thread);
    //   axpy  the Backend's y += a x (STREAM's triad traffic: two reads and one write, 3 x bytes);
    //   read  sum of a in f32, each thread over its contiguous half with 16 lane accumulators (1 x bytes):
    //         the access decode makes (reads only; the Backend's sum_squares, used before, widens every
    //         element to f64 first).
    const std::int64_t n = sh.o.bw_mb * (1 << 20) / 4;
    std::vector<float> a(static_cast<std::size_t>(n), 1.0f), b(static_cast<std::size_t>(n), 2.0f);
    const dsrsq::TensorView ta(a.data(), dsrsq::Shape{n}), tb(b.data(), dsrsq::Shape{n});
    const double bytes = 4.0 * static_cast<double>(n);
    float* pa = a.data();
    float* pb = b.data();
    std::vector<double> tc, tx, tr;
    double sink = 0;
    for (int r = 0; r < 6; ++r) {  // the first round warms the pages and the team
      dsrsq::Timer t;
#pragma omp parallel for simd schedule(static)
      for (std::int64_t i = 0; i < n; ++i) pb[i] = pa[i];
      const double c = t.seconds();
      t.reset();
      be.axpy(dsrsq::AxpyArgs{ta, tb, 1e-3});
      const double x = t.seconds();
      t.reset();
      float total = 0;
#pragma omp parallel reduction(+ : total)
      {
        const int P = omp_get_num_threads(), p = omp_get_thread_num();
        const std::int64_t i0 = n * p / P, i1 = n * (p + 1) / P;
        float lanes[16] = {};
        std::int64_t i = i0;
        for (; i + 16 <= i1; i += 16)
#pragma omp simd
          for (int l = 0; l < 16; ++l) lanes[l] += pb[i + l];
        for (; i < i1; ++i) lanes[0] += pb[i];
        for (const float v : lanes) total += v;
      }
      sink += total;
      const double rd = t.seconds();
      if (r == 0) continue;
      tc.push_back(c);
      tx.push_back(x);
      tr.push_back(rd);
    }
    res.copy_gbs = 2 * bytes / median_of(tc) / 1e9;
    res.axpy_gbs = 3 * bytes / median_of(tx) / 1e9;
    res.read_gbs = bytes / median_of(tr) / 1e9 + (sink < 0 ? 1e-12 : 0);  // sink keeps the read
    res.best_gbs = std::max({2 * bytes / *std::min_element(tc.begin(), tc.end()),
                             3 * bytes / *std::min_element(tx.begin(), tx.end()),
                             bytes / *std::min_element(tr.begin(), tr.end())}) / 1e9;
  }
  {
    const std::int64_t NH = sh.mc.n_heads, HS = sh.mc.head_size(), S = n_ctx;
    dsrsq::Rng rng(sh.o.seed, 77);
    std::vector<float> q(static_cast<std::size_t>(NH * HS)), k(static_cast<std::size_t>(S * NH * HS)), v(k.size());
    for (auto* x : {&q, &k, &v})
      for (auto& e : *x) e = static_cast<float>(rng.normal());
    std::vector<float> o1(q.size()), o2(q.size()), l1(static_cast<std::size_t>(NH)), l2(l1.size());
    std::vector<std::int32_t> qp{static_cast<std::int32_t>(S)}, kp(static_cast<std::size_t>(S));
    std::iota(kp.begin(), kp.end(), 0);
    auto args = [&](std::vector<float>& o, std::vector<float>& l) {
      return dsrsq::AttentionArgs{dsrsq::TensorView(q.data(), dsrsq::Shape{1, 1, NH, HS}),
                                  dsrsq::TensorView(k.data(), dsrsq::Shape{1, S, NH, HS}),
                                  dsrsq::TensorView(v.data(), dsrsq::Shape{1, S, NH, HS}),
                                  dsrsq::TensorView(o.data(), dsrsq::Shape{1, 1, NH, HS}),
                                  dsrsq::TensorView(l.data(), dsrsq::Shape{1, NH, 1}),
                                  dsrsq::TensorView(qp.data(), dsrsq::Shape{1, 1}),
                                  dsrsq::TensorView(kp.data(), dsrsq::Shape{1, S}), true, 0.0};
    };
    std::vector<double> told, tnew;
    for (int r = 0; r < 22; ++r) {
      dsrsq::Timer t;
      dsrsq::cpu::attention_fwd_kernel<float>(args(o1, l1));
      const double a = t.seconds();
      t.reset();
      be.attention_fwd(args(o2, l2));
      const double b = t.seconds();
      if (r == 0) continue;
      told.push_back(a);
      tnew.push_back(b);
    }
    res.kernel_old_s = median_of(told);
    res.kernel_new_s = median_of(tnew);
    res.kernel_old_min = *std::min_element(told.begin(), told.end());
    res.kernel_new_min = *std::min_element(tnew.begin(), tnew.end());
    res.kernel_bytes = 2.0 * static_cast<double>(k.size()) * sizeof(float);
    for (std::size_t i = 0; i < o1.size(); ++i)
      res.kernel_diff = std::max(res.kernel_diff, static_cast<double>(std::fabs(o1[i] - o2[i])));
  }
  dsrsq::Transformer model(sh.mc, be);
  model.init_weights(sh.o.seed);
  if (!sh.ckpt_params.empty())
    std::memcpy(model.flat_params().data, sh.ckpt_params.data(), sh.ckpt_params.size() * sizeof(float));
  const dsrsq::Encoded enc = make_prompt(sh, n_ctx);
  bool ok = true;
  for (int pi = 0; pi < 2; ++pi) {
    auto inner = dsrsq::make_kv_policy(pi == 0 ? "full" : "window", sh.mc, be);
    TimedPolicy policy(*inner);
    dsrsq::SequenceInfo info;
    info.prompt_len = enc.prompt_len;
    info.query_len = enc.query_len;
    info.max_new_tokens = sh.o.decode;
    dsrsq::KVBudget budget;
    budget.fraction = pi == 0 ? 1.0 : sh.o.window_budget;
    std::vector<std::int32_t> pos(static_cast<std::size_t>(enc.prompt_len));
    std::iota(pos.begin(), pos.end(), 0);
    model.activation_arena().reset();
    dsrsq::Timer t;
    policy.begin(info, budget);
    model.extend(policy, dsrsq::TensorView(const_cast<std::int32_t*>(enc.tokens.data()), dsrsq::Shape{1, enc.prompt_len}),
                 dsrsq::TensorView(pos.data(), dsrsq::Shape{1, enc.prompt_len}));
    policy.end_prefill();
    BwRow& row = res.rows[pi];
    row.ttft_s = t.seconds();
    bool finite = true;
    std::int32_t tk = argmax_last_row(model.logits(), finite);
    std::vector<double> steps, attends;
    for (std::int64_t s = 0; s < sh.o.decode; ++s) {
      std::int32_t p = static_cast<std::int32_t>(enc.prompt_len + s);
      policy.step_s = 0;
      dsrsq::Timer ts;
      model.extend(policy, dsrsq::TensorView(&tk, dsrsq::Shape{1, 1}), dsrsq::TensorView(&p, dsrsq::Shape{1, 1}));
      steps.push_back(ts.seconds());
      attends.push_back(policy.step_s);
      tk = argmax_last_row(model.logits(), finite);
    }
    ok = ok && finite;
    row.step_s = median_of(steps);
    row.attend_s = median_of(attends);
    row.attend_min_s = *std::min_element(attends.begin(), attends.end());
    row.read_bytes = static_cast<std::int64_t>(policy.memory().read_per_step);
    row.gbs = static_cast<double>(row.read_bytes) / row.attend_s / 1e9;
    row.cache_tokens = pi == 0 ? enc.prompt_len + sh.o.decode
                               : static_cast<std::int64_t>(policy.budget_achieved_bytes() /
                                                           dsrsq::KVBudget::full_bytes(sh.mc, 1));
  }
  res.ok = ok;
  if (!ok) set_error(res, "non-finite logits");
  res.done = 1;
  return res;
}

// ---- fork helper ---------------------------------------------------------------------
// The parent never starts an OpenMP (or OpenMP-BLAS) thread pool, so every
// child starts its own cleanly after fork().
template <class R, class F>
R in_child(F&& f) {
  std::fflush(stdout);
  std::fflush(stderr);
  int fd[2];
  if (pipe(fd) != 0) {
    R r;
    set_error(r, "pipe() failed");
    return r;
  }
  const pid_t pid = fork();
  if (pid < 0) {
    close(fd[0]);
    close(fd[1]);
    R r;
    set_error(r, "fork() failed");
    return r;
  }
  if (pid == 0) {
    close(fd[0]);
    R r;
    try {
      r = f();
    } catch (const std::exception& e) {
      set_error(r, e.what());
    }
    const char* p = reinterpret_cast<const char*>(&r);
    std::size_t left = sizeof r;
    while (left > 0) {
      const ssize_t w = write(fd[1], p, left);
      if (w <= 0) break;
      p += w;
      left -= static_cast<std::size_t>(w);
    }
    close(fd[1]);
    _exit(0);
  }
  close(fd[1]);
  R r;
  char* p = reinterpret_cast<char*>(&r);
  std::size_t got = 0;
  while (got < sizeof r) {
    const ssize_t n = read(fd[0], p + got, sizeof r - got);
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (got != sizeof r) {
    r = R{};
    set_error(r, "measurement process died (status " + std::to_string(status) + ")");
  }
  return r;
}

// ---- fits and printing -------------------------------------------------------------------

double slope_loglog(const std::vector<double>& x, const std::vector<double>& y) {
  const std::size_t n = x.size();
  if (n < 2) return std::nan("");
  double mx = 0, my = 0;
  for (std::size_t i = 0; i < n; ++i) {
    mx += std::log(x[i]);
    my += std::log(y[i]);
  }
  mx /= static_cast<double>(n);
  my /= static_cast<double>(n);
  double sxy = 0, sxx = 0;
  for (std::size_t i = 0; i < n; ++i) {
    sxy += (std::log(x[i]) - mx) * (std::log(y[i]) - my);
    sxx += (std::log(x[i]) - mx) * (std::log(x[i]) - mx);
  }
  return sxy / sxx;
}

double mb(std::int64_t bytes) { return static_cast<double>(bytes) / 1e6; }

std::string read_first(const char* path, const char* key) {
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) {
      const auto c = line.find(':');
      return c == std::string::npos ? line : line.substr(c + 2);
    }
  return "?";
}

std::string loadavg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

std::vector<std::int32_t> read_haystack(const std::string& dir) {
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const auto ext = e.path().extension().string();
    if (ext == ".json" || ext == ".txt") files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  std::string text;
  for (const auto& p : files) {
    std::ifstream f(p, std::ios::binary);
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (p.extension() == ".json") s = nlohmann::json::parse(s).at("text").get<std::string>();
    text += s;
    text += "\n\n";
  }
  if (text.empty()) throw std::runtime_error("haystack '" + dir + "' holds no .json/.txt text");
  return ByteTokenizer().encode(text);
}

// ---- accuracy beside cost (runs in a forked child) -----------------------------------------
//
// Per context N and method of --acc_methods: the dsrsq program's evaluation
// (eval/evaluator.hpp, evaluate_method through the method's EvalPlan) of the
// test split the program makes for run seed --data_seed (data::make_split with
// data::test_split_seed: the same examples, the same prompts), --acc_examples
// examples per size over the needle depth grid, at KV budget --acc_budget under
// --protocol. Training-free methods run on the --init_from checkpoint (the
// standard backbone); a method on its own weights (Backbone::own: DSRSQ, GCA,
// the ATSKV predictor) runs on its --method_init checkpoint, never on random
// weights. Per example: F1, the prediction, serve and first-token time, KV bytes
// after prefill and read per decode step, peak memory (activations + KV).
constexpr int kMaxAccExamples = 1000;
struct AccExample {
  double f1 = 0, serve_s = 0, ttft_s = 0;
  std::int64_t kv = 0, read = 0, peak = 0, tokens_in = 0;
  std::int32_t infeasible = 0;
  char prediction[44] = {};  // its first 43 bytes
  char id[44] = {};
};
struct AccResult {  // plain data: sent through a pipe
  std::int32_t done = 0, n = 0;
  char error[480] = {};
  AccExample ex[kMaxAccExamples];
};

// The test examples of context size n (meta context_size), in split order.
std::vector<dsrsq::data::Example> acc_examples_of(const Shared& sh, std::int64_t n) {
  std::vector<dsrsq::data::Example> out;
  for (const auto& e : sh.acc_test)
    if (e.meta.at("context_size") == std::to_string(n)) out.push_back(e);
  return out;
}

AccResult acc_measure(const Shared& sh, std::size_t ai, std::int64_t n_ctx) {
  AccResult res;
  omp_set_num_threads(sh.o.threads);
  const Compared& c = sh.acc.at(ai);
  const bool own = c.info->backbone == methods::Backbone::own;
  dsrsq::Transformer model(sh.mc, dsrsq::cpu_backend());
  model.init_weights(sh.o.seed);
  const std::vector<float>& params = own ? c.ckpt_params : sh.ckpt_params;
  auto load_into = [&](dsrsq::TensorView flat, const char* what) {
    if (static_cast<std::int64_t>(params.size()) != flat.numel())
      throw std::runtime_error(std::string(c.name()) + ": the checkpoint holds " + std::to_string(params.size()) +
                               " parameters, " + what + " has " + std::to_string(flat.numel()) +
                               " (its settings or the model's shape differ from the training's)");
    std::memcpy(flat.data, params.data(), params.size() * sizeof(float));
  };
  if (!c.info->own_architecture && !params.empty()) load_into(model.flat_params(), "the model");
  const methods::MethodContext ctx{model, dsrsq::cpu_backend(), c.knobs.get(), dsrsq::AdamWConfig{}, sh.o.seed};
  const auto method = c.info->make(ctx);
  if (c.info->own_architecture) load_into(method->own_model()->flat_params(), "its own model");
  if (own) {
    methods::TrainingExtension* t = method->training();
    if (t == nullptr || !t->load_params(c.ckpt_extra))
      throw std::runtime_error(std::string(c.name()) + ": '" + c.ckpt + "' holds no " + c.name() + " state");
  }
  methods::EvalPlan plan = method->plan("");
  dsrsq::EvalConfig ec;
  ec.name = c.name();
  ec.select = plan.select;
  ec.extend = plan.extend;
  ec.reset_activation_peak = plan.reset_activation_peak;
  ec.activation_peak_bytes = plan.activation_peak_bytes;
  ec.budget = dsrsq::KVBudget::parse(sh.o.acc_budget);
  ec.max_new_tokens = sh.o.max_new_tokens;
  ec.max_seq_len = sh.mc.max_pos;
  ec.query_agnostic = sh.o.protocol == "context_only";
  const auto test = acc_examples_of(sh, n_ctx);
  if (test.size() > static_cast<std::size_t>(kMaxAccExamples))
    throw std::runtime_error("more than " + std::to_string(kMaxAccExamples) + " examples per size");
  const dsrsq::MethodEval me = dsrsq::evaluate_method(model, *plan.policy, ByteTokenizer(), test, ec);
  for (const auto& e : me.examples) {
    AccExample& x = res.ex[res.n++];
    x.f1 = e.f1;
    x.serve_s = e.serve_s;
    x.ttft_s = e.ttft_s;
    x.kv = static_cast<std::int64_t>(e.kv.resident_after_prefill);
    x.read = static_cast<std::int64_t>(e.kv.read_per_step);
    x.peak = static_cast<std::int64_t>(e.peak_bytes);
    x.tokens_in = e.prompt_tokens_in;
    x.infeasible = e.infeasible;
    std::snprintf(x.prediction, sizeof x.prediction, "%s", e.prediction.c_str());
    std::snprintf(x.id, sizeof x.id, "%s", e.id.c_str());
  }
  res.done = 1;
  return res;
}

// Mean of x and a 95% percentile-bootstrap interval (2,000 resamples, fixed seed).
struct Interval {
  double mean = 0, lo = 0, hi = 0;
};
Interval bootstrap_mean(const std::vector<double>& x, std::uint64_t seed) {
  Interval r;
  if (x.empty()) return r;
  const std::size_t n = x.size();
  r.mean = std::accumulate(x.begin(), x.end(), 0.0) / static_cast<double>(n);
  dsrsq::Rng rng(seed, 13);
  std::vector<double> means(2000);
  for (double& m : means) {
    double sum = 0;
    for (std::size_t i = 0; i < n; ++i) sum += x[rng.below(n)];
    m = sum / static_cast<double>(n);
  }
  std::sort(means.begin(), means.end());
  r.lo = means[49];    // the 2.5th percentile of 2,000
  r.hi = means[1950];  // the 97.5th
  return r;
}

// Two-sided exact sign test on the paired differences d (ties dropped): for
// 0/1 scores, the exact McNemar test. 1 when every pair ties.
double sign_test_p(const std::vector<double>& d) {
  std::int64_t plus = 0, minus = 0;
  for (const double v : d) {
    if (v > 0) ++plus;
    if (v < 0) ++minus;
  }
  const std::int64_t m = plus + minus, k = std::min(plus, minus);
  if (m == 0) return 1.0;
  double tail = 0;  // P(X <= k), X ~ Binomial(m, 1/2), summed in logs
  for (std::int64_t i = 0; i <= k; ++i)
    tail += std::exp(std::lgamma(m + 1.0) - std::lgamma(i + 1.0) - std::lgamma(m - i + 1.0) - m * std::log(2.0));
  return std::min(1.0, 2 * tail);
}

// The accuracy part: one table (every size x method), rows and failures counted.
void accuracy_part(const Shared& sh, const std::vector<std::int64_t>& sizes, int& rows, int& failed) {
  const Options& o = sh.o;
  std::size_t ref = sh.acc.size();  // the full cache on the standard backbone: the reference
  for (std::size_t i = 0; i < sh.acc.size() && ref == sh.acc.size(); ++i)
    if (sh.acc[i].info->name == "full") ref = i;
  for (std::size_t i = 0; i < sh.acc.size() && ref == sh.acc.size(); ++i)
    if (sh.acc[i].info->name == kBaseline) ref = i;
  std::printf("#\n# accuracy beside cost: the dsrsq program's evaluation of its test split (task needle, run seed %llu,"
              " %lld examples per context size over the depths 0.1-0.9%s),\n# KV budget %s, %s protocol, greedy, up to "
              "%lld new tokens. Every method scores the same examples. Training-free methods: the --init_from weights;\n"
              "# a method on its own weights: its --method_init checkpoint.\n",
              static_cast<unsigned long long>(o.data_seed), static_cast<long long>(o.acc_examples),
              o.task_params.empty() ? "" : (", " + [&] {
                std::string t;
                for (const auto& x : o.task_params) t += (t.empty() ? "" : " ") + x;
                return t;
              }()).c_str(),
              o.acc_budget.c_str(), o.protocol == "context_only" ? "query-agnostic (context_only)" : "query-aware",
              static_cast<long long>(o.max_new_tokens));
  for (const Compared& c : sh.acc) {
    std::printf("#   %-14s %s\n", c.name(), c.ckpt.empty() ? (sh.o.init_from.empty() ? "random weights" : sh.o.init_from.c_str())
                                                             : c.ckpt.c_str());
    if (!c.knobs) continue;
    std::map<std::string, std::string> kv;  // the settings it runs with (an own-weights method: its training's)
    c.knobs->resolved(kv);
    std::string line;
    for (const auto& [k, v] : kv) line += (line.empty() ? "" : " ") + k + "=" + v;
    std::printf("#   %-14s   %s\n", "", line.c_str());
  }
  std::printf("# %7s %-14s %4s %7s %15s %8s %17s %8s %8s %9s %9s %8s %8s %8s %8s %6s %6s\n", "context", "method", "n",
              "F1", "95% CI", "dF1", "95% CI", "p", "ttft", "serve", "time/ref", "kv", "kv/ref", "read", "peak",
              "infeas", "check");
  std::printf("# %7s %-14s %4s %7s %15s %8s %17s %8s %8s %9s %9s %8s %8s %8s %8s %6s %6s\n", "(tok)", "", "", "", "",
              "vs ref", "", "(sign)", "(ms)", "(ms)", "(median)", "(MB)", "(mean)", "(MB)", "(MB)", "", "");
  nlohmann::json js = nlohmann::json::array();
  for (const std::int64_t n : sizes) {
    std::vector<AccResult> res;
    res.reserve(sh.acc.size());
    for (std::size_t m = 0; m < sh.acc.size(); ++m) {
      res.push_back(in_child<AccResult>([&] { return acc_measure(sh, m, n); }));
    }
    const AccResult* r0 = ref < res.size() && res[ref].done ? &res[ref] : nullptr;
    auto median_of_field = [](const AccResult& r, double AccExample::*f) {
      std::vector<double> v;
      for (int i = 0; i < r.n; ++i) v.push_back(r.ex[i].*f);
      return v.empty() ? 0.0 : median(v);
    };
    auto mean_of = [](const AccResult& r, std::int64_t AccExample::*f) {
      double s = 0;
      for (int i = 0; i < r.n; ++i) s += static_cast<double>(r.ex[i].*f);
      return r.n ? s / r.n : 0.0;
    };
    for (std::size_t m = 0; m < sh.acc.size(); ++m) {
      const AccResult& r = res[m];
      ++rows;
      if (!r.done) {
        std::printf("  %7lld %-14s ERROR %s\n", static_cast<long long>(n), sh.acc[m].name(), r.error);
        ++failed;
        continue;
      }
      std::vector<double> f1(static_cast<std::size_t>(r.n));
      for (int i = 0; i < r.n; ++i) f1[static_cast<std::size_t>(i)] = r.ex[i].f1;
      const Interval ci = bootstrap_mean(f1, 1000 + static_cast<std::uint64_t>(n));
      char dcol[64] = "-", dci[64] = "-", pcol[32] = "-", tcol[32] = "-", kcol[32] = "-";
      const bool same_examples = r0 != nullptr && r0->n == r.n;
      if (same_examples) {
        std::vector<double> d(f1.size());
        for (int i = 0; i < r.n; ++i) d[static_cast<std::size_t>(i)] = r.ex[i].f1 - r0->ex[i].f1;
        const Interval di = bootstrap_mean(d, 2000 + static_cast<std::uint64_t>(n));
        std::snprintf(dcol, sizeof dcol, "%+.3f", di.mean);
        std::snprintf(dci, sizeof dci, "[%+.3f,%+.3f]", di.lo, di.hi);
        std::snprintf(pcol, sizeof pcol, "%.3g", sign_test_p(d));
        std::snprintf(tcol, sizeof tcol, "%.3f",
                      median_of_field(r, &AccExample::serve_s) / median_of_field(*r0, &AccExample::serve_s));
        std::snprintf(kcol, sizeof kcol, "%.4f", mean_of(r, &AccExample::kv) / mean_of(*r0, &AccExample::kv));
      }
      std::int64_t infeasible = 0, peak = 0;
      bool finite = true;
      for (int i = 0; i < r.n; ++i) {
        infeasible += r.ex[i].infeasible;
        peak = std::max(peak, r.ex[i].peak);
        finite = finite && std::isfinite(r.ex[i].f1) && r.ex[i].serve_s > 0;
      }
      const std::int64_t want = static_cast<std::int64_t>(acc_examples_of(sh, n).size());
      const bool ok = finite && r.n == want;
      char ci_col[48];
      std::snprintf(ci_col, sizeof ci_col, "[%.3f,%.3f]", ci.lo, ci.hi);
      std::printf("  %7lld %-14s %4d %7.3f %15s %8s %17s %8s %8.1f %9.1f %9s %8.3f %8s %8.3f %8.2f %6lld %6s\n",
                  static_cast<long long>(n), sh.acc[m].name(), r.n, ci.mean, ci_col, dcol, dci, pcol,
                  median_of_field(r, &AccExample::ttft_s) * 1e3, median_of_field(r, &AccExample::serve_s) * 1e3, tcol,
                  mean_of(r, &AccExample::kv) / 1e6, kcol, mean_of(r, &AccExample::read) / 1e6, mb(peak),
                  static_cast<long long>(infeasible), ok ? "ok" : "FAIL");
      if (!ok) ++failed;
      nlohmann::json row{{"context", n}, {"method", sh.acc[m].name()}, {"f1", ci.mean}, {"f1_ci", {ci.lo, ci.hi}},
                         {"examples", nlohmann::json::array()}};
      for (int i = 0; i < r.n; ++i)
        row["examples"].push_back({{"id", r.ex[i].id}, {"f1", r.ex[i].f1}, {"prediction", r.ex[i].prediction},
                                   {"serve_s", r.ex[i].serve_s}, {"ttft_s", r.ex[i].ttft_s}, {"kv_bytes", r.ex[i].kv},
                                   {"read_bytes", r.ex[i].read}, {"peak_bytes", r.ex[i].peak},
                                   {"prompt_tokens_in", r.ex[i].tokens_in}, {"infeasible", r.ex[i].infeasible != 0}});
      js.push_back(std::move(row));
    }
    std::fflush(stdout);
  }
  std::printf("# ref = %s (dF1, time/ref, kv/ref are against it, on the same examples); F1: mean, 95%% bootstrap\n"
              "# interval; dF1: paired mean difference, its paired bootstrap interval, and the exact two-sided sign\n"
              "# test (McNemar's for 0/1 scores); ttft, serve: medians over examples (serve = selection + prefill +\n"
              "# decode); kv: mean K/V bytes after prefill; read: K/V bytes one decode step reads; peak: the largest\n"
              "# activations + KV (+ a selector's or own model's memory); infeas: examples whose budget the method\n"
              "# could not meet. Times are on this machine under its load: compare rows of one run.\n",
              ref < sh.acc.size() ? sh.acc[ref].name() : "none (no full or standard method listed)");
  if (!o.acc_json.empty()) {
    std::ofstream f(o.acc_json);
    f << js.dump(1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    if (!f) throw std::runtime_error("--acc_json '" + o.acc_json + "': could not be written");
  }
}

// A checkpoint's model against the bench's: every setting of ModelConfig::str()
// but max_pos (the bench's bounds every context) must agree, or the weights
// would run under another model (a RoPE base or log-length scaling the training
// did not use would go unnoticed: the parameter count is the same).
void check_model(const dsrsq::io::CheckpointState& ck, const dsrsq::ModelConfig& mc, const std::string& what) {
  auto fields = [](const std::string& text) {
    std::map<std::string, std::string> kv;
    std::istringstream is(text);
    for (std::string t; is >> t;)
      if (const auto eq = t.find('='); eq != std::string::npos) kv[t.substr(0, eq)] = t.substr(eq + 1);
    return kv;
  };
  std::string theirs;
  for (const auto& [k, v] : ck.model_config)
    if (k == "model") theirs = v;
  if (theirs.empty()) return;  // an older checkpoint without the record: the parameter count is checked
  const auto a = fields(theirs), b = fields(mc.str());
  std::string diff;
  for (const auto& [k, v] : b) {
    if (k == "max_pos") continue;
    const auto it = a.find(k);
    const std::string t = it == a.end() ? "(none)" : it->second;
    if (t != v) diff += (diff.empty() ? "" : ", ") + k + " " + t + " (the bench's: " + v + ")";
  }
  for (const auto& [k, v] : a)  // a setting the bench's model leaves at its default (attn_log_base)
    if (!b.count(k) && k.rfind("gca_", 0) != 0) diff += (diff.empty() ? "" : ", ") + k + " " + v + " (the bench's: none)";
  if (!diff.empty())
    throw std::runtime_error(what + " was trained with another model: " + diff +
                             "; pass --d_model, --n_heads, --n_layers, --d_ff, --rope_theta, --attn_log_scale as trained");
}

// A method on its own weights runs under its training's settings: its run's
// resolved configuration (config.ini beside the checkpoint) gives every knob of
// the method; a knob set on the command line must agree with it. Returns the
// knobs to use (`c.knobs` when there is no config.ini: a note says so).
std::shared_ptr<methods::MethodKnobs> training_knobs(const Compared& c, const Options& o) {
  if (!c.knobs) return c.knobs;
  const auto ini = std::filesystem::path(c.ckpt).parent_path() / "config.ini";
  std::ifstream f(ini);
  if (!f) {
    std::printf("# note: no %s beside --method_init %s: its settings are the bench's, as given\n", ini.c_str(),
                c.name());
    return c.knobs;
  }
  std::map<std::string, std::string> trained, ours, changes;
  for (std::string line; std::getline(f, line);)
    if (const auto eq = line.find(" = "); eq != std::string::npos) trained[line.substr(0, eq)] = line.substr(eq + 3);
  c.knobs->resolved(ours);
  for (const auto& [k, v] : ours) {
    const auto it = trained.find(k);
    if (it == trained.end() || it->second == v) continue;
    if (o.given.count(k))
      throw std::runtime_error("option --" + k + " " + v + ": --method_init " + c.name() + " was trained with " +
                               it->second + " (" + ini.string() + ")");
    changes[k] = it->second;
  }
  return changes.empty() ? c.knobs : knobs_with(*c.info, *c.knobs, changes);
}

// Options via Boost.Program_options (as the dsrsq program). Returns 0 to go on,
// 1 when --help was printed, 2 on a bad option (message printed).
int parse_args(int argc, char** argv, Options& o, bool& do_stream, std::vector<Compared>& cmp,
               std::vector<Compared>& acc) {
  namespace po = boost::program_options;
  bool no_stream = false, same_model = false, no_bw = false;
  // One knobs object per method of the table (the program's options), at the
  // bench's defaults; the timing part's two methods and the accuracy part share them.
  std::map<std::string_view, std::shared_ptr<methods::MethodKnobs>> knobs;
  for (const methods::MethodInfo* m : methods::all_methods()) {
    if (m->knobs == nullptr) continue;
    auto k = m->knobs();
    if (const auto it = kPaperDefaults.find(m->name); it != kPaperDefaults.end()) set_knobs(*k, it->second);
    knobs[m->name] = std::move(k);
  }
  auto compared = [&](std::string_view name, std::string_view option) {
    Compared c;
    c.info = &methods::find_method(name, option);
    if (const auto it = knobs.find(c.info->name); it != knobs.end()) c.knobs = it->second;
    return c;
  };
  for (const std::string_view name : {kBaseline, kCompared}) cmp.push_back(compared(name, "bench_long_context"));
  po::options_description d("usage: bench_long_context [options]");
  d.add_options()
    ("help,h", "print this help")
    ("max_context", po::value(&o.max_context)->default_value(o.max_context), "largest context (tokens)")
    ("min_context", po::value(&o.min_context)->default_value(o.min_context), "smallest context (tokens)")
    ("repeats", po::value(&o.repeats)->default_value(o.repeats), "repeats per (method, size) (0: 5 below 16K, 3 from 16K)")
    ("decode", po::value(&o.decode)->default_value(o.decode), "greedy decode steps after the prefill")
    ("threads", po::value(&o.threads)->default_value(o.threads), "OpenMP threads")
    ("seed", po::value(&o.seed)->default_value(o.seed), "weights seed")
    ("stream_tokens", po::value(&o.stream_tokens)->default_value(o.stream_tokens), "tokens streamed through RCKV")
    ("stream_chunk", po::value(&o.stream_chunk)->default_value(o.stream_chunk), "tokens per streaming call")
    ("no-stream", po::bool_switch(&no_stream), "skip the streaming part")
    ("no-decode-bw", po::bool_switch(&no_bw), "skip the decode-bandwidth part")
    ("only-decode-bw", po::bool_switch(&o.only_decode_bw), "only the decode-bandwidth part")
    ("window_budget", po::value(&o.window_budget)->default_value(o.window_budget),
     "decode-bandwidth part: the window policy's budget (fraction of the full cache)")
    ("bw_mb", po::value(&o.bw_mb)->default_value(o.bw_mb), "decode-bandwidth part: MiB per yardstick array")
    ("stream_same_model", po::bool_switch(&same_model), "stream through the main model (slow)")
    ("stream_d_model", po::value(&o.stream_d_model)->default_value(o.stream_d_model), "streaming model width")
    ("stream_n_heads", po::value(&o.stream_n_heads)->default_value(o.stream_n_heads), "streaming model heads")
    ("stream_n_layers", po::value(&o.stream_n_layers)->default_value(o.stream_n_layers), "streaming model layers")
    ("stream_d_ff", po::value(&o.stream_d_ff)->default_value(o.stream_d_ff), "streaming model MLP width")
    ("init_from", po::value(&o.init_from), "checkpoint to load (and its DSRSQ state)")
    ("haystack", po::value(&o.haystack), "folder of haystack text (default datasets/sotu)")
    ("d_model", po::value(&o.d_model)->default_value(o.d_model), "model width")
    ("n_heads", po::value(&o.n_heads)->default_value(o.n_heads), "heads")
    ("n_layers", po::value(&o.n_layers)->default_value(o.n_layers), "layers")
    ("d_ff", po::value(&o.d_ff)->default_value(o.d_ff), "MLP width")
    ("rope_theta", po::value(&o.rope_theta)->default_value(o.rope_theta), "RoPE base (as the checkpoint was trained: configs/long*.ini use 500000)")
    ("attn_log_scale", po::value(&o.attn_log_scale)->default_value(o.attn_log_scale), "log-length query scaling base (0: off; configs/long*.ini: 1024)")
    ("acc_examples", po::value(&o.acc_examples)->default_value(o.acc_examples),
     "accuracy part: test examples per context size (0: no accuracy part; at most 1000)")
    ("acc_methods", po::value(&o.acc_methods)->multitoken(),
     "accuracy part: methods, in the table's names (default: every training-free method, then each method given --method_init)")
    ("method_init", po::value(&o.method_init)->multitoken(),
     "accuracy part: NAME=CKPT, the checkpoint of a method on its own trained weights (dsrsq, gca, atskv); repeatable")
    ("acc_budget", po::value(&o.acc_budget)->default_value(o.acc_budget),
     "accuracy part: KV budget (the program's --kv_budget: a fraction of the full cache, or bytes with a unit)")
    ("protocol", po::value(&o.protocol)->default_value(o.protocol),
     "accuracy part: query_aware | context_only (the program's --protocol; reuse is the program's alone)")
    ("data_seed", po::value(&o.data_seed)->default_value(o.data_seed),
     "accuracy part: the program's run seed whose test split is scored (its --seed)")
    ("task_param", po::value(&o.task_params)->multitoken()->default_value(o.task_params, "digits=4"),
     "accuracy part: needle task parameters key=value, as the program's --task_param (its default: digits=4)")
    ("max_new_tokens", po::value(&o.max_new_tokens)->default_value(o.max_new_tokens),
     "accuracy part: longest generated answer (the program's --max_new_tokens)")
    ("acc_json", po::value(&o.acc_json), "accuracy part: also write every row and example to this JSON file")
    ("only-accuracy", po::bool_switch(&o.only_accuracy), "only the accuracy part")
    ("datasets_dir", po::value(&o.datasets),
     "accuracy part: committed haystack text (default: $DSRSQ_DATASETS, else the source tree's datasets)")
    ;
  // Each method's own options (the dsrsq program's), bound to its knobs, which
  // start at the bench's defaults (kPaperDefaults).
  for (const methods::MethodInfo* m : methods::all_methods()) {
    const auto it = knobs.find(m->name);
    if (it == knobs.end()) continue;
    po::options_description md(std::string(m->name) + " options (the dsrsq program's; defaults: the bench's)");
    it->second->describe(md);
    d.add(md);
  }
  try {
    po::variables_map vm;
    po::store(po::parse_command_line(argc, argv, d), vm);
    if (vm.count("help")) {
      std::cout << d << "\n";
      return 1;
    }
    po::notify(vm);
    for (const auto& [name, v] : vm)
      if (!v.defaulted()) o.given.insert(name);
    for (const auto& [name, v] : std::initializer_list<std::pair<const char*, std::int64_t>>{
             {"max_context", o.max_context}, {"min_context", o.min_context}, {"decode", o.decode},
             {"threads", o.threads}, {"stream_tokens", o.stream_tokens}, {"stream_chunk", o.stream_chunk},
             {"d_model", o.d_model}, {"n_heads", o.n_heads}, {"n_layers", o.n_layers}, {"d_ff", o.d_ff},
             {"repeats", o.repeats + 1}, {"bw_mb", o.bw_mb}})
      if (v <= 0) throw po::error(std::string("option --") + name + " is out of range");
    // The methods' own checks (the program's), against this bench's model.
    if (!(o.window_budget > 0 && o.window_budget <= 1)) throw po::error("option --window_budget must be in (0, 1]");
    const methods::RunShape shape{o.d_model, o.n_heads, o.n_layers, o.max_context, !o.init_from.empty()};
    if (!o.only_accuracy)  // the timing and streaming parts' methods
      for (const Compared& c : cmp)
        if (c.knobs) c.knobs->validate(shape);
    // The accuracy part's methods and checkpoints.
    if (o.acc_examples < 0 || o.acc_examples > 1000) throw po::error("option --acc_examples must be in [0, 1000]");
    if (o.max_new_tokens <= 0) throw po::error("option --max_new_tokens is out of range");
    if (o.protocol != "query_aware" && o.protocol != "context_only")
      throw po::error("option --protocol: unknown value '" + o.protocol + "' (valid: query_aware, context_only)");
    dsrsq::KVBudget::parse(o.acc_budget);  // its message names --kv_budget, the program's option
    if (o.only_accuracy && o.acc_examples == 0) throw po::error("option --only-accuracy needs --acc_examples > 0");
    std::map<std::string, std::string> inits;  // method -> checkpoint
    for (const std::string& mi : o.method_init) {
      const auto eq = mi.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == mi.size())
        throw po::error("option --method_init: '" + mi + "' is not NAME=CHECKPOINT");
      const std::string name = mi.substr(0, eq);
      const methods::MethodInfo& info = methods::find_method(name, "--method_init");
      if (info.backbone != methods::Backbone::own)
        throw po::error("option --method_init: '" + name + "' is training-free: it runs on the --init_from weights");
      if (!inits.emplace(name, mi.substr(eq + 1)).second) throw po::error("option --method_init: '" + name + "' is given twice");
    }
    std::vector<std::string> names = o.acc_methods;
    if (names.empty()) {
      for (const methods::MethodInfo* m : methods::all_methods())
        if ((m->backbone == methods::Backbone::standard && !m->trainable) || inits.count(std::string(m->name)))
          if (o.protocol == "query_aware" || m->query_agnostic) names.emplace_back(m->name);
    }
    for (std::size_t i = 0; i < names.size(); ++i) {
      Compared c = compared(names[i], "--acc_methods");
      for (std::size_t j = 0; j < i; ++j)
        if (names[j] == names[i]) throw po::error("option --acc_methods: '" + names[i] + "' is given twice");
      if (c.info->backbone == methods::Backbone::own) {
        const auto it = inits.find(names[i]);
        if (it == inits.end())
          throw po::error("option --acc_methods: '" + names[i] + "' runs on its own trained weights: give --method_init " +
                          names[i] + "=CHECKPOINT");
        c.ckpt = it->second;
      }
      if (o.protocol == "context_only" && !c.info->query_agnostic)
        throw po::error("option --protocol context_only: method '" + names[i] + "' has no query-agnostic form (" +
                        std::string(c.info->needs_question) + ")");
      methods::RunShape own_shape = shape;  // a method's own checkpoint is its --init_from
      own_shape.init_from = shape.init_from || !c.ckpt.empty();
      if (c.knobs) c.knobs->validate(own_shape);
      acc.push_back(std::move(c));
    }
    for (const auto& [name, path] : inits)
      if (std::none_of(acc.begin(), acc.end(), [&](const Compared& c) { return c.info->name == name; }))
        throw po::error("option --method_init: '" + name + "' is not among --acc_methods");
  } catch (const std::exception& e) {  // po::error, or a method's input error (its message starts "error: ")
    const std::string w = e.what();
    std::fprintf(stderr, "%s%s\n", w.rfind("error: ", 0) == 0 ? "" : "error: ", w.c_str());
    return 2;
  }
  do_stream = !no_stream && !o.only_decode_bw && !o.only_accuracy;
  o.decode_bw = !no_bw && !o.only_accuracy;
  if (same_model) o.stream_d_model = o.stream_n_heads = o.stream_n_layers = o.stream_d_ff = 0;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  dsrsq::ensure_passive_omp_wait(argv);  // the engine's wait policy (core/omp_wait.hpp), before any OpenMP
  Options o;
  bool do_stream = true;
  std::vector<Compared> cmp, acc;
  if (const int rc = parse_args(argc, argv, o, do_stream, cmp, acc); rc != 0) return rc == 1 ? 0 : 2;
  try {
    if (o.min_context > o.max_context) throw std::runtime_error("--min_context exceeds --max_context");
    Shared sh;
    sh.o = o;
    sh.mc = model_config(o);
    sh.smc = model_config(o, true);
    sh.methods = cmp;
    const methods::MethodKnobs& dk = *sh.methods.back().knobs;  // DSRSQ's (the header and the streaming study)
    sh.stream_knobs = knobs_with(
        *sh.methods.back().info, dk,
        {{"rckv_d_c", std::to_string(std::max<long long>(1, knob_int(dk, "rckv_d_c") * sh.smc.d_model / sh.mc.d_model))},
         {"dsr_d_r", std::to_string(std::min<long long>(knob_int(dk, "dsr_d_r"), sh.smc.d_model))}});
    if (o.haystack.empty()) o.haystack = std::string(DSRSQ_SOURCE_DIR) + "/datasets/sotu";
    sh.o = o;
    sh.hay = read_haystack(o.haystack);
    sh.question = ByteTokenizer().encode(o.question);
    std::string weights = "random (init_weights(" + std::to_string(o.seed) + "), DsrsqModel::init(" +
                          std::to_string(o.seed) + "))";
    if (!o.init_from.empty()) {
      auto ck = dsrsq::io::load_checkpoint(o.init_from);
      if (static_cast<std::int64_t>(ck.params.size()) != sh.mc.num_parameters())
        throw std::runtime_error("--init_from '" + o.init_from + "' holds " + std::to_string(ck.params.size()) +
                                 " parameters, this model has " + std::to_string(sh.mc.num_parameters()) +
                                 " (pass matching --d_model/--n_heads/--n_layers/--d_ff)");
      check_model(ck, sh.mc, "--init_from '" + o.init_from + "'");
      sh.ckpt_params = std::move(ck.params);
      weights = o.init_from + " (step " + std::to_string(ck.step) + ")";
      sh.ckpt_extra = std::move(ck.extra);
      // Whether the compared method's TrainingExtension::load_params takes them (in a child: no thread pool
      // here). Not for the accuracy part alone: it loads each method's state itself.
      if (!o.only_accuracy) {
        struct Probe {
          std::int32_t done = 0, loaded = 0;
          char error[480] = {};
        };
        const Probe p = in_child<Probe>([&] {
          Probe r;
          dsrsq::Transformer model(sh.mc, dsrsq::cpu_backend());
          bool loaded = false;
          make_method(sh, sh.methods.back(), sh.methods.back().knobs.get(), model, true, &loaded);
          r.loaded = loaded;
          r.done = 1;
          return r;
        });
        if (!p.done) throw std::runtime_error(std::string("--init_from: ") + p.error);
        weights += p.loaded ? ", retriever and RCKV projections from it"
                            : ", retriever and RCKV projections random (no DSRSQ state in the checkpoint)";
      }
    }

    std::vector<std::int64_t> sizes;
    for (std::int64_t n = o.min_context; n <= o.max_context; n *= 2) sizes.push_back(n);
    if (o.acc_examples > 0) {
      // The accuracy part: each own-weights method's checkpoint, and the program's test split.
      sh.acc = acc;
      for (Compared& c : sh.acc) {
        if (c.ckpt.empty()) continue;
        dsrsq::io::CheckpointState ck;
        try {
          ck = dsrsq::io::load_checkpoint(c.ckpt);
        } catch (const std::exception& e) {
          throw std::runtime_error("--method_init " + std::string(c.name()) + "=" + c.ckpt + ": " + e.what());
        }
        check_model(ck, sh.mc, "--method_init " + std::string(c.name()) + "=" + c.ckpt);
        c.ckpt_params = std::move(ck.params);
        c.ckpt_extra = std::move(ck.extra);
        c.knobs = training_knobs(c, o);
      }
      dsrsq::data::TaskParams tp;
      std::string dir = o.datasets;
      if (dir.empty()) dir = std::getenv("DSRSQ_DATASETS") ? std::getenv("DSRSQ_DATASETS") : DSRSQ_SOURCE_DIR "/datasets";
      tp["datasets_dir"] = dir;
      for (const auto& kv : o.task_params) {
        const auto eq = kv.find('=');
        if (eq == std::string::npos || eq == 0) throw std::runtime_error("--task_param '" + kv + "' is not key=value");
        tp[kv.substr(0, eq)] = kv.substr(eq + 1);
      }
      sh.acc_test = dsrsq::data::make_split("needle", tp, sizes, o.acc_examples * static_cast<std::int64_t>(sizes.size()),
                                            dsrsq::data::test_split_seed(o.data_seed), true, dsrsq::data::byte_counter());
    }
    std::vector<std::int64_t> milestones;
    for (std::int64_t m = 10000; m <= o.stream_tokens; m *= 10) {  // 10^4, 3*10^4, 10^5, ...
      milestones.push_back(m);
      if (3 * m <= o.stream_tokens) milestones.push_back(3 * m);
    }
    std::sort(milestones.begin(), milestones.end());
    milestones.erase(std::unique(milestones.begin(), milestones.end()), milestones.end());
    if (milestones.empty() || milestones.back() != o.stream_tokens) milestones.push_back(o.stream_tokens);
    if (milestones.size() > 8) milestones.erase(milestones.begin(), milestones.end() - 8);

    char host[256] = "?";
    gethostname(host, sizeof host);
    std::printf("# dsrsq bench_long_context %s  git %s  %s  %s\n", dsrsq::build::version, dsrsq::build::git_sha,
                dsrsq::build::build_type, dsrsq::build::blas);
    std::printf("# host %s  cpu %s  threads %d  OMP_WAIT_POLICY=%s  loadavg at start %s\n", host,
                read_first("/proc/cpuinfo", "model name").c_str(), o.threads,
                std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "(unset)", loadavg().c_str());
    std::printf("# model %s  params %lld  fp32\n", sh.mc.str().c_str(),
                static_cast<long long>(sh.mc.num_parameters()));
    std::printf("# weights %s\n", weights.c_str());
    if (!o.only_accuracy)  // the timing and streaming parts' DSRSQ (the accuracy part prints its methods' own)
      std::printf("# dsrsq: DSR d_r %lld conv %lld span %lld base_budget %g alpha %.2f | SQA clusters %lld top %lld "
                "lloyd %d | RCKV d_c %lld buffer %lld window %lld tau %.1f sqa on\n",
                knob_int(dk, "dsr_d_r"), knob_int(dk, "dsr_conv_width"), knob_int(dk, "dsr_span"),
                knob_num(dk, "dsr_base_budget"), knob_num(dk, "dsr_alpha"), knob_int(dk, "sqa_clusters"),
                knob_int(dk, "sqa_top_clusters"), static_cast<int>(knob_int(dk, "sqa_lloyd_steps")),
                knob_int(dk, "rckv_d_c"), knob_int(dk, "rckv_buffer"), knob_int(dk, "rckv_window"),
                knob_num(dk, "rckv_tau"));
    // The timing part (not with --only-decode-bw or --only-accuracy).
    const bool timing = !o.only_decode_bw && !o.only_accuracy;
    if (timing) {
      std::printf("# prompt [BOS] context(N haystack byte tokens, %s, %zu tokens one pass) [SEP] question(%zu) [ANS]; "
                  "prefill + %lld greedy decode steps\n",
                  o.haystack.c_str(), sh.hay.size(), sh.question.size(), static_cast<long long>(o.decode));
      std::printf("# repeats %s; each (method, N) in its own process after an untimed 1K warm-up\n",
                  o.repeats > 0 ? std::to_string(o.repeats).c_str() : "5 below 16K, 3 from 16K, both methods (time = median, min shown)");
      std::printf("#\n");
      std::printf("# %7s %-9s %7s %9s %9s %8s %9s %8s %7s %8s %8s %8s %8s %8s %6s\n", "context", "method", "in_tok",
                  "total", "min", "select", "prefill", "decode", "keys/q", "kv", "peak", "rss", "dsr_rec", "vs_full",
                  "check");
      std::printf("# %7s %-9s %7s %9s %9s %8s %9s %8s %7s %8s %8s %8s %8s %8s %6s\n", "(tok)", "", "(tok)", "(ms)",
                  "(ms)", "(ms)", "(ms)", "(ms)", "", "(MB)", "(MB)", "(MB)", "(MB)", "", "");
    }
    int failed = 0, rows = 0;
    std::vector<RunResult> stdr, dsr;
    for (const std::int64_t n : timing ? sizes : std::vector<std::int64_t>{}) {
      const int rep = o.repeats > 0 ? o.repeats : (n >= 16384 ? 3 : 5);
      for (std::size_t m = 0; m < sh.methods.size(); ++m) {
        RunResult r = in_child<RunResult>([&] { return measure(sh, m, n, rep); });
        ++rows;
        if (!r.done) {
          std::printf("  %7lld %-9s  ERROR %s\n", static_cast<long long>(n), sh.methods[m].name(), r.error);
          ++failed;
        } else {
          char vf[32] = "-";
          if (r.vs_full >= 0) std::snprintf(vf, sizeof vf, "%.1e", r.vs_full);
          std::printf("  %7lld %-9s %7lld %9.1f %9.1f %8.1f %9.1f %8.1f %7.0f %8.3f %8.2f %8.1f %8.2f %8s %6s\n",
                      static_cast<long long>(n), sh.methods[m].name(), static_cast<long long>(r.tokens_in), r.total_s * 1e3,
                      r.total_min * 1e3, r.select_s * 1e3, r.prefill_s * 1e3, r.decode_s * 1e3, r.attended,
                      mb(r.kv_bytes), mb(r.peak_bytes), mb(r.rss_delta), mb(r.dsr_record), vf, r.ok ? "ok" : "FAIL");
          if (!r.ok) {
            std::printf("#   ^ %s\n", r.error);
            ++failed;
          }
        }
        std::fflush(stdout);
        (m == 0 ? stdr : dsr).push_back(r);
      }
    }
    double time32 = std::nan(""), kv32 = std::nan(""), e_dsr = std::nan("");
    if (timing) {
      std::printf("# total: median over repeats (select/prefill/decode: the run closest to it); in_tok: tokens through\n"
                  "# the model at prefill; keys/q: mean keys one decode query attends to;\n"
                  "# kv: K/V bytes held after prefill; peak: tracked (activations + KV + RCKV scratch, or the DSR\n"
                  "# record if larger); rss: peak RSS growth of the measuring process; dsr_rec: DSR selector memory\n"
                  "# (inference path: block buffers + seed heap + selection);\n"
                  "# vs_full: DSRSQ prefill logits vs the full cache on the same selected tokens (max rel. difference).\n");
      std::printf("#\n# %7s %11s %9s %11s %10s %15s %15s\n", "context", "time_ratio", "kv_ratio", "peak_ratio",
                  "rss_ratio", "dsrsq_total_ms", "of_it_select_%");
      std::printf("# %7s %11s %9s %11s %10s %15s %15s\n", "(tok)", "dsrsq/std", "dsrsq/std", "dsrsq/std", "dsrsq/std",
                  "", "");
      std::vector<double> xs, ts_std, ts_dsr;
      for (std::size_t i = 0; i < std::min(stdr.size(), dsr.size()); ++i) {
        const RunResult &s = stdr[i], &d = dsr[i];
        if (!s.done || !d.done) continue;
        const double tr = d.total_s / s.total_s, kr = static_cast<double>(d.kv_bytes) / static_cast<double>(s.kv_bytes);
        const double pr = static_cast<double>(d.peak_bytes) / static_cast<double>(s.peak_bytes);
        const double rr = static_cast<double>(d.rss_delta) / static_cast<double>(std::max<std::int64_t>(1, s.rss_delta));
        std::printf("  %7lld %11.4f %9.4f %11.4f %10.4f %15.1f %15.1f\n", static_cast<long long>(sizes[i]), tr, kr, pr, rr,
                    d.total_s * 1e3, 100.0 * d.select_s / d.total_s);
        xs.push_back(static_cast<double>(sizes[i]));
        ts_std.push_back(s.total_s);
        ts_dsr.push_back(d.total_s);
        if (sizes[i] == 32768) {
          time32 = tr;
          kv32 = kr;
        }
      }
      const double e_std = slope_loglog(xs, ts_std);
      e_dsr = slope_loglog(xs, ts_dsr);
      std::printf("#\n# time-growth exponent (least-squares slope of log time on log N over %zu sizes %lld..%lld):\n",
                  xs.size(), static_cast<long long>(sizes.front()), static_cast<long long>(sizes.back()));
      std::printf("#   standard %.3f   dsrsq %.3f\n", e_std, e_dsr);
      if (xs.size() >= 3) {
        // Local slopes between the two largest sizes: where the growth is heading.
        const std::size_t k = xs.size();
        const std::vector<double> xl{xs[k - 2], xs[k - 1]};
        std::printf("#   between the two largest sizes: standard %.3f   dsrsq %.3f\n",
                    slope_loglog(xl, {ts_std[k - 2], ts_std[k - 1]}), slope_loglog(xl, {ts_dsr[k - 2], ts_dsr[k - 1]}));
      }
    }

    // Streaming.
    double stream_change = std::nan(""), rss_change = std::nan("");
    if (do_stream) {
      const bool same = sh.smc.str() == sh.mc.str();
      std::printf("#\n# streaming: RckvPolicy (d_c %lld, buffer %lld slots x %lld layers, window %lld), chunks of %lld "
                  "tokens, positions 0..; SQA off (no end_prefill while streaming)\n",
                  knob_int(*sh.stream_knobs, "rckv_d_c"), knob_int(*sh.stream_knobs, "rckv_buffer"),
                  static_cast<long long>(sh.smc.n_layers), knob_int(*sh.stream_knobs, "rckv_window"),
                  static_cast<long long>(o.stream_chunk));
      std::printf("# streaming model: %s\n", same ? "the model above (same weights)"
                                                   : ("SMALLER than the model above, for time: " + sh.smc.str() +
                                                      " (random weights, seed " + std::to_string(o.seed) + ")").c_str());
      std::printf("# %9s %10s %10s %12s %12s %12s %9s %9s %9s %7s\n", "streamed", "time", "tok/s", "kv_resident",
                  "scratch_pk", "act_peak", "heap", "rss", "filled", "check");
      std::printf("# %9s %10s %10s %12s %12s %12s %9s %9s %9s %7s\n", "(tok)", "(s)", "", "(bytes)", "(bytes)",
                  "(bytes)", "(MB)", "(MB)", "(slots)", "");
      StreamResult s = in_child<StreamResult>([&] { return stream(sh, milestones); });
      if (!s.done) {
        std::printf("  ERROR %s\n", s.error);
        ++failed;
      } else {
        double kv_lo = 1e300, kv_hi = 0, tr_lo = 1e300, tr_hi = 0, rss_lo = 1e300, rss_hi = 0;
        double prev_t = 0;
        std::int64_t prev_n = 0;
        for (int i = 0; i < s.n; ++i) {
          const StreamRow& r = s.rows[i];
          const double tracked = static_cast<double>(r.kv_resident + r.scratch_peak + r.act_peak);
          kv_lo = std::min(kv_lo, static_cast<double>(r.kv_resident));
          kv_hi = std::max(kv_hi, static_cast<double>(r.kv_resident));
          tr_lo = std::min(tr_lo, tracked);
          tr_hi = std::max(tr_hi, tracked);
          rss_lo = std::min(rss_lo, static_cast<double>(r.rss));
          rss_hi = std::max(rss_hi, static_cast<double>(r.rss));
          std::printf("  %9lld %10.2f %10.0f %12lld %12lld %12lld %9.1f %9.1f %9lld %7s\n", static_cast<long long>(r.tokens),
                      r.seconds, static_cast<double>(r.tokens - prev_n) / (r.seconds - prev_t),
                      static_cast<long long>(r.kv_resident), static_cast<long long>(r.scratch_peak),
                      static_cast<long long>(r.act_peak), mb(r.heap), mb(r.rss), static_cast<long long>(r.filled),
                      s.ok ? "ok" : "FAIL");
          prev_t = r.seconds;
          prev_n = r.tokens;
          ++rows;
        }
        stream_change = std::max(kv_hi / kv_lo - 1.0, tr_hi / tr_lo - 1.0);
        rss_change = rss_hi / rss_lo - 1.0;
        std::printf("# max relative change over the milestones: kv_resident %.4f%%  kv+scratch+activations %.4f%%  "
                    "process rss %.2f%%\n",
                    100 * (kv_hi / kv_lo - 1.0), 100 * (tr_hi / tr_lo - 1.0), 100 * rss_change);
        std::printf("# (the RCKV arena is allocated once at begin(): %lld slots x %lld layers; scratch and activations "
                    "are bounded by the chunk size)\n",
                    static_cast<long long>(s.slots), static_cast<long long>(sh.smc.n_layers));
        std::printf("# heap/rss growth, if any: the CPU backend's RoPE cos/sin cache (f64, grown to the largest position "
                    "seen, capped at 2^15 positions = %.1f MB at head size %lld), not the KV cache\n",
                    mb(static_cast<std::int64_t>((std::int64_t{1} << 15) * (sh.smc.head_size() / 2) * 16)),
                    static_cast<long long>(sh.smc.head_size()));
        if (!s.ok) {
          std::printf("#   ^ %s\n", s.error);
          ++failed;
        }
      }
    }

    // Decode bandwidth (decode steps of the contiguous caches against the same process's memory bandwidth).
    double decode_of_bw = std::nan(""), decode_of_read = std::nan(""), ttft_ratio = std::nan("");
    if (o.decode_bw) {
      std::vector<std::int64_t> bw_sizes;
      for (const std::int64_t n : sizes)
        if (n >= 8192 && n <= 32768) bw_sizes.push_back(n);
      if (bw_sizes.empty()) bw_sizes.push_back(sizes.back());
      std::printf("#\n# decode bandwidth: one decode step's attention (every layer: RoPE + append + attention over the "
                  "cache, median of %lld steps)\n# against the same process's STREAM-like yardstick on %lld MiB f32 "
                  "arrays, all threads (copy 2x bytes, axpy y+=ax 3x bytes,\n# read = f32 sum 1x bytes; "
                  "median of 5; yardstick = the largest). window = StreamingLLM sinks + window at %.3f of the\n# full "
                  "cache. ttft = prefill of the whole prompt in one extend() + end_prefill.\n",
                  static_cast<long long>(o.decode), static_cast<long long>(o.bw_mb), o.window_budget);
      std::printf("# %7s %-7s %8s %8s %8s %8s %9s %9s %8s %9s %8s %8s %9s %9s %8s %7s %6s\n", "context", "policy",
                  "cache", "copy", "axpy", "read", "ttft", "ttft/full", "step", "attend", "kv_read", "GB/s", "of_bw",
                  "of_bw_min", "of_read", "load1", "check");
      std::printf("# %7s %-7s %8s %8s %8s %8s %9s %9s %8s %9s %8s %8s %9s %9s %8s %7s %6s\n", "(tok)", "", "(tok)",
                  "(GB/s)", "(GB/s)", "(GB/s)", "(ms)", "", "(ms)", "(ms)", "(MB)", "", "", "", "", "", "");
      double worst = std::numeric_limits<double>::infinity(), worst_read = worst;
      for (const std::int64_t n : bw_sizes) {
        const DecodeBwResult r = in_child<DecodeBwResult>([&] { return measure_decode_bw(sh, n); });
        ++rows;
        if (!r.done) {
          std::printf("  %7lld ERROR %s\n", static_cast<long long>(n), r.error);
          ++failed;
          continue;
        }
        const double yard = std::max({r.copy_gbs, r.axpy_gbs, r.read_gbs});
        std::string load = loadavg();
        load = load.substr(0, load.find(' '));
        for (int pi = 0; pi < 2; ++pi) {
          const BwRow& w = r.rows[pi];
          const double of = w.gbs / yard, of_read = w.gbs / r.read_gbs;
          worst = std::min(worst, of);
          worst_read = std::min(worst_read, of_read);
          const double of_min = static_cast<double>(w.read_bytes) / w.attend_min_s / 1e9 / r.best_gbs;
          std::printf("  %7lld %-7s %8lld %8.2f %8.2f %8.2f %9.1f %9.3f %8.3f %9.3f %8.2f %8.2f %9.3f %9.3f %8.3f %7s %6s\n",
                      static_cast<long long>(n), pi == 0 ? "full" : "window", static_cast<long long>(w.cache_tokens),
                      r.copy_gbs, r.axpy_gbs, r.read_gbs, w.ttft_s * 1e3, w.ttft_s / r.rows[0].ttft_s, w.step_s * 1e3,
                      w.attend_s * 1e3, mb(w.read_bytes), w.gbs, of, of_min, of_read, load.c_str(), r.ok ? "ok" : "FAIL");
        }
        for (int kk = 0; kk < 2; ++kk) {
          const double ts = kk == 0 ? r.kernel_old_s : r.kernel_new_s, g = r.kernel_bytes / ts / 1e9;
          const double gmin = r.kernel_bytes / (kk == 0 ? r.kernel_old_min : r.kernel_new_min) / 1e9;
          std::printf("  %7lld %-7s %8lld %8.2f %8.2f %8.2f %9s %9s %8s %9.3f %8.2f %8.2f %9.3f %9.3f %8.3f %7s %6s\n",
                      static_cast<long long>(n), kk == 0 ? "k_block" : "k_decode", static_cast<long long>(n), r.copy_gbs,
                      r.axpy_gbs, r.read_gbs, "-", "-", "-", ts * 1e3, r.kernel_bytes / 1e6, g, g / yard, gmin / r.best_gbs,
                      g / r.read_gbs, load.c_str(), r.kernel_diff < 1e-4 ? "ok" : "DIFF");
        }
        if (n == bw_sizes.back()) ttft_ratio = r.rows[1].ttft_s / r.rows[0].ttft_s;
        if (!r.ok) {
          std::printf("#   ^ %s\n", r.error);
          ++failed;
        }
        std::fflush(stdout);
      }
      if (std::isfinite(worst)) decode_of_bw = worst;
      if (std::isfinite(worst_read)) decode_of_read = worst_read;
      std::printf("# of_bw = GB/s / max(copy, axpy, read); decode_of_bandwidth = the smallest of_bw over the full and\n"
                  "# window rows (the target's measure). of_read = GB/s / read: against the machine's read-only\n"
                  "# streaming rate, the access decode makes; decode_of_read_bandwidth = its smallest over those rows.\n"
                  "# k_block / k_decode: the attention kernel alone on one layer's full cache, one query (the\n"
                  "# blockwise kernel decode used before / the decode kernel attention_fwd now dispatches to),\n"
                  "# interleaved, median of 21; check: their outputs agree within 1e-4. They reread one layer's cache,\n"
                  "# so part of it comes from the L3 (all of it at 8K-16K). of_bw_min: the fastest step\n"
                  "# (or kernel call) against the fastest yardstick run: on a loaded machine the medians measure the\n"
                  "# scheduler as much as the memory.\n");
    }

    if (o.acc_examples > 0) accuracy_part(sh, sizes, rows, failed);

    // Targets (reported, never tuned toward).
    auto verdict = [](bool measured, bool met) { return !measured ? "not measured" : (met ? "met" : "MISSED"); };
    std::printf("#\n# targets:\n");
    std::printf("#   time ratio at 32K <= 0.15      : %-8.4f %s\n", time32, verdict(!std::isnan(time32), time32 <= 0.15));
    std::printf("#   KV ratio at 32K <= 0.125       : %-8.4f %s\n", kv32, verdict(!std::isnan(kv32), kv32 <= 0.125));
    std::printf("#   dsrsq exponent <= 1.15         : %-8.3f %s\n", e_dsr, verdict(!std::isnan(e_dsr), e_dsr <= 1.15));
    std::printf("#   streaming memory within 1%%     : %-8.4f %s (process rss %.2f%%: %s)\n",
                std::isnan(stream_change) ? std::nan("") : 100 * stream_change,
                verdict(!std::isnan(stream_change), stream_change <= 0.01), 100 * rss_change,
                std::isnan(rss_change) ? "not measured" : (rss_change <= 0.01 ? "within" : "not within"));
    std::printf("#   decode of bandwidth >= 0.60    : %-8.3f %s\n", decode_of_bw,
                verdict(!std::isnan(decode_of_bw), decode_of_bw >= 0.60));
    std::printf("#   window ttft / full <= 1.2      : %-8.3f %s\n", ttft_ratio,
                verdict(!std::isnan(ttft_ratio), ttft_ratio <= 1.2));
    std::printf("# rows %d  failed %d  loadavg at end %s\n", rows, failed, loadavg().c_str());
    std::printf("dsrsq_vs_standard_time_32k=%.4f kv_32k=%.4f exponent=%.3f\n", time32, kv32, e_dsr);
    std::printf("decode_of_bandwidth=%.3f decode_of_read_bandwidth=%.3f\n", decode_of_bw, decode_of_read);
    return failed ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_long_context: %s\n", e.what());
    return 1;
  }
}
