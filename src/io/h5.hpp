#pragma once
// Thin RAII layer over the HDF5 C API: every id is a move-only handle, every
// call is checked, and errors name the file and the object. Used for results
// files, checkpoints and test fixtures.
#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/handle.hpp"

namespace dsrsq::h5 {

struct IdTraits {
  using type = hid_t;
  static constexpr hid_t null = H5I_INVALID_HID;
  static void destroy(hid_t id) noexcept;  // H5Xclose by object type
};
using Id = Handle<IdTraits>;

template <class T> hid_t type_of();  // native HDF5 type for float, double, int32, int64, uint8, uint16

class File;

// A group (or the file's root group): create / open children, read / write
// datasets and attributes. `path` names are relative to this group.
class Group {
 public:
  Group() = default;
  Group(Id id, std::string file, std::string path) : id_(std::move(id)), file_(std::move(file)), path_(std::move(path)) {}
  hid_t id() const { return id_.get(); }
  const std::string& path() const { return path_; }
  const std::string& file() const { return file_; }

  bool exists(const std::string& name) const;
  Group group(const std::string& name) const;         // open, error if missing
  Group create_group(const std::string& name) const;  // create (with parents)
  Group require_group(const std::string& name) const; // open or create

  // Whole-array datasets. dims empty = scalar-as-1-element vector.
  template <class T>
  void write(const std::string& name, const std::vector<T>& data, std::vector<hsize_t> dims = {}) const;
  template <class T>
  std::vector<T> read(const std::string& name, std::vector<hsize_t>* dims = nullptr) const;
  // Write into / read from an existing buffer of exactly `count` elements.
  template <class T>
  void write_raw(const std::string& name, const T* data, const std::vector<hsize_t>& dims) const;
  template <class T>
  void read_raw(const std::string& name, T* data, std::size_t count) const;
  std::vector<hsize_t> dims(const std::string& name) const;

  void write_strings(const std::string& name, const std::vector<std::string>& v) const;
  std::vector<std::string> read_strings(const std::string& name) const;

  // Attributes on this group.
  void set_attr(const std::string& name, const std::string& value) const;
  void set_attr(const std::string& name, std::int64_t value) const;
  void set_attr(const std::string& name, double value) const;
  bool has_attr(const std::string& name) const;
  std::string attr_string(const std::string& name) const;
  std::int64_t attr_int(const std::string& name) const;
  double attr_double(const std::string& name) const;
  std::vector<std::string> attr_names() const;
  std::vector<std::string> children() const;

  [[noreturn]] void fail(const std::string& what) const;

 private:
  Id id_;
  std::string file_, path_;
};

class File {
 public:
  enum class Mode { read, read_write, create_exclusive, truncate };
  File(const std::string& path, Mode mode, bool swmr = false);
  Group& root() { return root_; }
  const Group& root() const { return root_; }
  hid_t id() const { return id_.get(); }
  const std::string& path() const { return path_; }
  void flush() const;
  void start_swmr_write() const;

 private:
  std::string path_;
  Id id_;
  Group root_;
};

// Quiet HDF5's automatic error stack printing (we report errors ourselves).
void silence_errors();
std::string library_version();

}  // namespace dsrsq::h5
