// "rag" (ALGORITHMS.md section 3 and its positions correction): traditional
// retrieval-augmented generation with a BM25 retriever. The context is cut
// into sentence-aligned chunks (retrieval/chunks), each scored against the
// question by BM25 (retrieval/bm25: k1 1.2, b 0.75, IDF from the context's own
// chunks, words from the decoded chunk text); the best-scoring chunks are
// taken until the byte budget is full -- the budget pays for a full cache over
// [BOS] chunks [SEP] question [ANS] plus the generated tokens -- put back in
// document order and read as that prompt, with positions 0, 1, ... (the
// retrieved text is the prompt the model reads) or, as an option, their
// original positions. Training-free, on the standard checkpoint; the
// retrieval runs inside the time-to-first-token clock.

#include "core/error.hpp"
#include "methods/method.hpp"
#include "retrieval/bm25.hpp"
#include "retrieval/chunks.hpp"
#include "retrieval/rag_prompt.hpp"

namespace dsrsq::methods {
namespace {

namespace rt = retrieval;

struct RagKnobs final : MethodKnobs {
  std::int64_t chunk_tokens = 32;  // debug size; the paper-size config uses 256
  std::string positions = "contiguous";

  void describe(po::options_description& d) override {
    d.add_options()
      ("rag_chunk_tokens", po::value(&chunk_tokens)->default_value(chunk_tokens), "chunk size in tokens: whole sentences are packed up to it (a longer sentence is cut); 32 at debug size, 256 at paper size")
      ("rag_positions", po::value(&positions)->default_value(positions), "positions of the retrieved prompt: contiguous (0, 1, ...: the retrieved text read as a prompt of its own) or original (each token's position in the full prompt)");
  }
  void validate(const RunShape&) const override {
    DSRSQ_INPUT_CHECK(chunk_tokens >= 1, "option --rag_chunk_tokens: must be >= 1, got ", chunk_tokens);
    DSRSQ_INPUT_CHECK(positions == "contiguous" || positions == "original",
                      "option --rag_positions: must be contiguous or original, got '", positions, "'");
  }
  void resolved(std::map<std::string, std::string>& kv) const override {
    kv["rag_chunk_tokens"] = std::to_string(chunk_tokens);
    kv["rag_positions"] = positions;
  }
};

class Rag final : public Method {
 public:
  Rag(const MethodContext& c, const RagKnobs& k) : mc_(c.model.config()), be_(c.backend), k_(k) { k_.validate({}); }

  EvalPlan plan(const std::string&) override {
    EvalPlan p;
    p.policy = make_kv_policy(KVPolicySpec{"full"}, mc_, be_);
    p.select = [this](const Encoded& enc, const SelectionEnv& env) { return select(enc, env); };
    return p;
  }

  Selection select(const Encoded& enc, const SelectionEnv& env) const {
    DSRSQ_INPUT_CHECK(enc.query_len >= 2, "rag: the prompt must end in [SEP] question [ANS]");
    const auto ctx = std::span<const std::int32_t>(enc.tokens).subspan(1, static_cast<std::size_t>(enc.context_tokens));
    const std::vector<rt::TokenSpan> chunks = rt::pack_chunks(rt::sentence_spans(ctx, env.tok), k_.chunk_tokens);
    std::vector<std::vector<std::string>> docs;
    for (const rt::TokenSpan& c : chunks)
      docs.push_back(rt::words(env.tok.decode(ctx.subspan(static_cast<std::size_t>(c.begin), static_cast<std::size_t>(c.size())))));
    // The question: the tokens between [SEP] and [ANS].
    const auto q = std::span<const std::int32_t>(enc.tokens).subspan(
        static_cast<std::size_t>(enc.prompt_len - enc.query_len + 1), static_cast<std::size_t>(enc.query_len - 2));
    const std::vector<double> scores = rt::Bm25(docs).scores(rt::words(env.tok.decode(q)));
    const std::int64_t room = rt::context_room(mc_, env.budget, enc, env.max_new_tokens);
    const std::vector<rt::TokenSpan> kept = rt::keep_top(chunks, scores, room);

    const bool contiguous = k_.positions == "contiguous";
    rt::RagPrompt rp = rt::rag_prompt(enc, kept, contiguous);
    Selection s{std::move(rp.idx), std::move(rp.pos), {}};
    std::int64_t kept_tokens = 0;
    for (const auto& c : kept) kept_tokens += c.size();
    s.notes["selector_positions"] = k_.positions;
    s.notes["rag_chunks"] = std::to_string(chunks.size());
    s.notes["rag_chunks_kept"] = std::to_string(kept.size());
    s.notes["rag_context_kept"] = std::to_string(kept_tokens);
    s.notes["rag_context_room"] = std::to_string(room);
    s.notes["selector_kept_spans"] = rt::spans_text(kept);
    return s;
  }

 private:
  ModelConfig mc_;
  Backend& be_;
  RagKnobs k_;  // a copy: the plan outlives nothing it needs
};

std::shared_ptr<MethodKnobs> knobs() { return std::make_shared<RagKnobs>(); }
std::unique_ptr<Method> make(const MethodContext& c) {
  static const RagKnobs defaults;
  return std::make_unique<Rag>(c, c.knobs ? static_cast<const RagKnobs&>(*c.knobs) : defaults);
}

}  // namespace

const MethodInfo& rag_method() {
  static const MethodInfo info{.name = "rag",
                               .summary = "BM25-retrieved sentence-aligned chunks up to --kv_budget, in document order, full cache over them",
                               .source = "DSRSQ paper (traditional RAG baseline)",
                               .query_agnostic = false,
                               .needs_question = "its retriever scores the context's chunks against the question",
                               .knobs = &knobs,
                               .make = &make,
                               .device_ready = true};
  return info;
}

}  // namespace dsrsq::methods
