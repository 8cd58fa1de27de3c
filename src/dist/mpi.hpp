#pragma once
// Thin MPI helpers shared by the distributed code: the RAII owners of the
// MPI environment and of communicators we create, and the C++ -> MPI type map.
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/handle.hpp"

namespace dsrsq::mpi {

// Owns a communicator made by MPI_Comm_split/dup. The predefined communicators
// (MPI_COMM_WORLD, MPI_COMM_SELF) are never freed, even if one is handed in.
struct CommTraits {
  using type = MPI_Comm;
  static inline const MPI_Comm null = MPI_COMM_NULL;
  static void destroy(MPI_Comm c) noexcept {
    if (c == MPI_COMM_WORLD || c == MPI_COMM_SELF) return;
    MPI_Comm_free(&c);  // a failure here cannot be reported from a destructor
  }
};
using Comm = Handle<CommTraits>;

// MPI_Init_thread / MPI_Finalize. Constructed first in main, destroyed last.
// Does not finalize when MPI was already initialised by someone else.
class Environment {
 public:
  Environment(int& argc, char**& argv, int required = MPI_THREAD_FUNNELED);
  ~Environment();
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;
  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& host() const { return host_; }

 private:
  bool owns_ = false;
  int rank_ = 0, size_ = 1;
  std::string host_;
};

// C++ scalar -> MPI datatype.
template <class T>
MPI_Datatype type_of();
template <> inline MPI_Datatype type_of<float>() { return MPI_FLOAT; }
template <> inline MPI_Datatype type_of<double>() { return MPI_DOUBLE; }
template <> inline MPI_Datatype type_of<std::int32_t>() { return MPI_INT32_T; }
template <> inline MPI_Datatype type_of<std::int64_t>() { return MPI_INT64_T; }
template <> inline MPI_Datatype type_of<std::byte>() { return MPI_BYTE; }

}  // namespace dsrsq::mpi
