// The method table (DESIGN.md section 4). Report order: the standard model's
// full cache first, then the training-free baselines, then trained methods.
#include <sstream>
#include <string>

#include "core/error.hpp"
#include "methods/method.hpp"

namespace dsrsq::methods {

// One declaration and one table line per method; each defined in its own file.
const MethodInfo& standard_method();
const MethodInfo& full_method();
const MethodInfo& sliding_window_method();
const MethodInfo& rag_method();
const MethodInfo& attention_rag_method();
const MethodInfo& razor_method();
const MethodInfo& pyramid_method();
const MethodInfo& dynamic_kv_method();
const MethodInfo& rocket_kv_method();
const MethodInfo& atskv_method();
const MethodInfo& gca_method();
const MethodInfo& dsrsq_method();

const std::vector<const MethodInfo*>& all_methods() {
  static const std::vector<const MethodInfo*> table{
      &standard_method(),
      &full_method(),
      &sliding_window_method(),
      &rag_method(),
      &attention_rag_method(),
      &razor_method(),
      &pyramid_method(),
      &dynamic_kv_method(),
      &rocket_kv_method(),
      &atskv_method(),
      &gca_method(),
      &dsrsq_method(),
  };
  return table;
}

EvalPlan KVPolicyMethod::plan(const std::string&) {
  EvalPlan p;
  p.policy = make_kv_policy(KVPolicySpec{kind_}, mc_, be_);
  return p;
}

std::string exact_str(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

std::string method_names(bool trainable_only) {
  std::string out;
  for (const MethodInfo* m : all_methods())
    if (!trainable_only || m->trainable) out += (out.empty() ? "" : ", ") + std::string(m->name);
  return out;
}

std::string device_ready_names() {
  std::string out;
  for (const MethodInfo* m : all_methods())
    if (m->device_ready) out += (out.empty() ? "" : ", ") + std::string(m->name);
  return out;
}

const MethodInfo& find_method(std::string_view name, std::string_view option) {
  for (const MethodInfo* m : all_methods())
    if (m->name == name) return *m;
  raise_input_error(detail::cat("option ", option, ": unknown method '", name, "' (the method table holds: ",
                                method_names(), ")"));
}

}  // namespace dsrsq::methods
