#include "core/error.hpp"

#include <mpi.h>

namespace dsrsq {
namespace {
int g_rank = -1;
std::string g_host;
}  // namespace

void set_error_context(int rank, std::string host) {
  g_rank = rank;
  g_host = std::move(host);
}

std::string error_context() {
  if (g_rank < 0) return {};
  return detail::cat("[rank ", g_rank, " on ", g_host, "] ");
}

void raise_error(const char* lib, const std::string& msg, const char* stmt, const char* file, int line) {
  throw Error(detail::cat(error_context(), lib, " error: ", msg, " (", stmt, " at ", file, ":", line, ")"));
}

void raise_input_error(const std::string& msg) { throw Error(detail::cat(error_context(), "error: ", msg)); }

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return "unknown MPI error " + std::to_string(code);
  return std::string(buf, static_cast<std::size_t>(len));
}

}  // namespace dsrsq
