#include "train/encode.hpp"

#include <algorithm>

#include "core/error.hpp"
#include "data/tasks.hpp"

namespace dsrsq {

namespace {
std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  if (s.empty()) return out;
  std::size_t b = 0;
  for (;;) {
    const std::size_t e = s.find(data::kListSep, b);
    out.push_back(s.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) return out;
    b = e + 1;
  }
}
}  // namespace

Encoded encode_example(const data::Example& ex, const Tokenizer& tok, std::int64_t max_seq_len, bool all_queries) {
  DSRSQ_INPUT_CHECK(!ex.answers.empty(), "example '", ex.id, "' has no answer");
  std::vector<std::int32_t> ctx = tok.encode(ex.context);
  const std::vector<std::int32_t> query = tok.encode(ex.query);
  const std::vector<std::int32_t> answer = tok.encode(ex.answers.front());
  // Further [SEP] query [ANS] answer [EOS] rounds (all_queries).
  std::vector<std::vector<std::int32_t>> more_q, more_a;
  if (all_queries) {
    const auto q = ex.meta.count("more_queries") ? split_list(ex.meta.at("more_queries")) : std::vector<std::string>{};
    const auto a = ex.meta.count("more_answers") ? split_list(ex.meta.at("more_answers")) : std::vector<std::string>{};
    DSRSQ_INPUT_CHECK(q.size() == a.size(), "example '", ex.id, "': ", q.size(), " more_queries but ", a.size(),
                      " more_answers");
    for (std::size_t i = 0; i < q.size(); ++i) {
      more_q.push_back(tok.encode(q[i]));
      more_a.push_back(tok.encode(a[i]));
    }
  }
  // BOS + ctx + SEP + query + ANS + answer + EOS (+ SEP + query + ANS + answer + EOS per further query)
  std::int64_t fixed = 1 + 1 + static_cast<std::int64_t>(query.size()) + 1 + static_cast<std::int64_t>(answer.size()) + 1;
  for (std::size_t i = 0; i < more_q.size(); ++i)
    fixed += 3 + static_cast<std::int64_t>(more_q[i].size() + more_a[i].size());
  DSRSQ_INPUT_CHECK(fixed < max_seq_len, "example '", ex.id, "': query and answer alone take ", fixed,
                    " tokens, more than max_seq_len=", max_seq_len);
  Encoded e;
  const std::int64_t room = max_seq_len - fixed;
  if (static_cast<std::int64_t>(ctx.size()) > room) {
    e.truncated = static_cast<std::int64_t>(ctx.size()) - room;
    ctx.erase(ctx.begin(), ctx.begin() + e.truncated);
  }
  e.context_tokens = static_cast<std::int64_t>(ctx.size());
  e.tokens.reserve(static_cast<std::size_t>(fixed) + ctx.size());
  e.tokens.push_back(tok.bos_id());
  e.tokens.insert(e.tokens.end(), ctx.begin(), ctx.end());
  e.tokens.push_back(tok.sep_id());
  e.tokens.insert(e.tokens.end(), query.begin(), query.end());
  e.tokens.push_back(tok.ans_id());
  e.prompt_len = static_cast<std::int64_t>(e.tokens.size());
  e.query_len = static_cast<std::int64_t>(query.size()) + 2;
  e.tokens.insert(e.tokens.end(), answer.begin(), answer.end());
  e.tokens.push_back(tok.eos_id());
  if (!more_q.empty()) {
    e.answer_mask.assign(e.tokens.size(), 0);
    std::fill(e.answer_mask.begin() + e.prompt_len, e.answer_mask.end(), 1);
    for (std::size_t i = 0; i < more_q.size(); ++i) {
      e.tokens.push_back(tok.sep_id());
      e.tokens.insert(e.tokens.end(), more_q[i].begin(), more_q[i].end());
      e.tokens.push_back(tok.ans_id());
      e.answer_mask.resize(e.tokens.size(), 0);
      e.tokens.insert(e.tokens.end(), more_a[i].begin(), more_a[i].end());
      e.tokens.push_back(tok.eos_id());
      e.answer_mask.resize(e.tokens.size(), 1);
    }
    e.queries = 1 + static_cast<std::int64_t>(more_q.size());
  }
  return e;
}

Batch HostBatch::view() {
  const Shape s{B, T};
  return Batch{TensorView(tokens.data(), s), TensorView(pos.data(), s), TensorView(targets.data(), s),
               TensorView(mask.data(), s)};
}

HostBatch make_batch(const std::vector<const Encoded*>& seqs, std::int32_t pad_id, float lm_weight,
                     std::int64_t pad_multiple) {
  HostBatch hb;
  hb.B = static_cast<std::int64_t>(seqs.size());
  for (const auto* s : seqs) hb.T = std::max<std::int64_t>(hb.T, static_cast<std::int64_t>(s->tokens.size()) - 1);
  if (pad_multiple > 1) hb.T = (hb.T + pad_multiple - 1) / pad_multiple * pad_multiple;
  const std::size_t n = static_cast<std::size_t>(hb.B * hb.T);
  hb.tokens.assign(n, pad_id);
  hb.pos.assign(n, 0);
  hb.targets.assign(n, pad_id);
  hb.mask.assign(n, 0.0f);
  hb.is_answer.assign(n, 0);
  for (std::int64_t b = 0; b < hb.B; ++b) {
    const Encoded& e = *seqs[static_cast<std::size_t>(b)];
    const std::int64_t L = static_cast<std::int64_t>(e.tokens.size()) - 1;  // inputs: all but the last token
    for (std::int64_t t = 0; t < hb.T; ++t) {
      const std::size_t i = static_cast<std::size_t>(b * hb.T + t);
      hb.pos[i] = static_cast<std::int32_t>(t);
      if (t < L) {
        hb.tokens[i] = e.tokens[static_cast<std::size_t>(t)];
        hb.targets[i] = e.tokens[static_cast<std::size_t>(t + 1)];
        // Position t predicts token t+1: an answer token or EOS when t+1 >= prompt_len
        // (of any query, when the sequence holds several).
        const bool answer = e.answer_mask.empty() ? t + 1 >= e.prompt_len
                                                  : e.answer_mask[static_cast<std::size_t>(t + 1)] != 0;
        if (answer) {
          hb.mask[i] = 1.0f;
          hb.is_answer[i] = 1;
          ++hb.answer_tokens;
        } else {
          hb.mask[i] = lm_weight;
        }
      }
    }
  }
  return hb;
}

HostBatch shard_batch(const HostBatch& hb, const std::vector<std::int32_t>& columns) {
  HostBatch out;
  out.B = hb.B;
  out.T = static_cast<std::int64_t>(columns.size());
  const std::size_t n = static_cast<std::size_t>(out.B * out.T);
  out.tokens.resize(n);
  out.pos.resize(n);
  out.targets.resize(n);
  out.mask.resize(n);
  out.is_answer.resize(n);
  if (!hb.compress.empty()) out.compress.resize(n);
  for (std::int64_t b = 0; b < hb.B; ++b)
    for (std::int64_t j = 0; j < out.T; ++j) {
      const std::int64_t t = columns[static_cast<std::size_t>(j)];
      DSRSQ_REQUIRE(t >= 0 && t < hb.T, "shard_batch: column ", t, " outside [0, ", hb.T, ")");
      const auto src = static_cast<std::size_t>(b * hb.T + t), dst = static_cast<std::size_t>(b * out.T + j);
      out.tokens[dst] = hb.tokens[src];
      out.pos[dst] = hb.pos[src];
      out.targets[dst] = hb.targets[src];
      out.mask[dst] = hb.mask[src];
      out.is_answer[dst] = hb.is_answer[src];
      if (!hb.compress.empty()) out.compress[dst] = hb.compress[src];
      out.answer_tokens += hb.is_answer[src];
    }
  return out;
}

}  // namespace dsrsq
