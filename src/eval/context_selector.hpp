#pragma once
// A context selector (DESIGN.md section 4): which prompt tokens enter the
// model, and at which positions. The evaluator calls it inside the time-to-
// first-token clock, so its work (retrieval, scoring passes through the
// model) counts in the latency and, through the Backend's meter, in FLOPs.
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "data/tokenizer.hpp"
#include "kv/kv_policy.hpp"
#include "train/encode.hpp"

namespace dsrsq {

// What a selector may read besides the example: the run's tokenizer (to read
// the text) and the budget the KV policy will be held to (a fraction refers
// to the full sequence: prompt + max_new_tokens).
struct SelectionEnv {
  const Tokenizer& tok;
  KVBudget budget;
  std::int64_t max_new_tokens = 0;
};

struct Selection {
  // Prompt indices that enter the model: ascending, ending with the prompt's
  // last token ([ANS]).
  std::vector<std::int32_t> idx;
  // The positions they take, one per index, ascending (RAG reads its
  // retrieved text as a fresh prompt: 0, 1, ...); empty: their original
  // positions. Decoding continues after the last one.
  std::vector<std::int32_t> pos;
  // Per-example notes (what was kept, positions used), copied into the example's meta.
  std::map<std::string, std::string> notes;
};

using ContextSelector = std::function<Selection(const Encoded&, const SelectionEnv&)>;

}  // namespace dsrsq
