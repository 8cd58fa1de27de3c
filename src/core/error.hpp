#pragma once
// Errors: one exception type, one [[noreturn]] raise path, check macros that
// evaluate their argument exactly once and say everything in one message
// (statement, file:line, library message, rank/host when known).
#include <sstream>
#include <stdexcept>
#include <string>

namespace dsrsq {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Rank and host are filled in once MPI is up, so every later message names them.
void set_error_context(int rank, std::string host);
std::string error_context();

[[noreturn]] void raise_error(const char* lib, const std::string& msg, const char* stmt, const char* file,
                              int line);
// An input/usage error: the message is what the user reads, no source location.
[[noreturn]] void raise_input_error(const std::string& msg);

namespace detail {
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace dsrsq

// Always-on check of inputs and invariants; throws dsrsq::Error.
#define DSRSQ_REQUIRE(cond, ...)                                                                    \
  do {                                                                                              \
    if (!(cond)) ::dsrsq::raise_error("dsrsq", ::dsrsq::detail::cat(__VA_ARGS__), #cond, __FILE__, __LINE__); \
  } while (0)

// A user-facing input error (bad option, bad file line): message only.
#define DSRSQ_INPUT_CHECK(cond, ...)                                             \
  do {                                                                           \
    if (!(cond)) ::dsrsq::raise_input_error(::dsrsq::detail::cat(__VA_ARGS__)); \
  } while (0)

#ifdef NDEBUG
#define DSRSQ_DEBUG_ASSERT(cond) ((void)0)
#else
#define DSRSQ_DEBUG_ASSERT(cond) DSRSQ_REQUIRE(cond, "debug assertion")
#endif

#define DSRSQ_MPI_CHECK(expr)                                                          \
  do {                                                                                 \
    if (int e_ = (expr); e_ != 0) {                                                    \
      ::dsrsq::raise_error("MPI", ::dsrsq::mpi_error_string(e_), #expr, __FILE__, __LINE__); \
    }                                                                                  \
  } while (0)

namespace dsrsq {
std::string mpi_error_string(int code);
}
