#pragma once
// DSRSQ's registry entry (methods/dsrsq.cpp) plus one narrow accessor for the
// studies that measure its parts directly (bench_long_context: the
// retriever's forward record, RCKV's memory while streaming). Everything else
// reaches DSRSQ through the method table like any other method.
#include "methods/dsrsq_model.hpp"
#include "methods/method.hpp"

namespace dsrsq::methods {

const MethodInfo& dsrsq_method();

// The DsrsqModel behind a method made by dsrsq_method().make(); null for any
// other method. Not for the program's own paths (they use Method's interface).
DsrsqModel* dsrsq_model_of(Method& m);

}  // namespace dsrsq::methods
