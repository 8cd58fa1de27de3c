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

template <class T> hid_t type_of();  // native HDF5 type for float, double, int32, int64, uint8, uint16, uint64

class File;

// One dataset held open (results files keep their columns open for appends).
// 1-D extendible datasets grow with append(); scalar and fixed-size ones are
// overwritten in place with write_all() (both are SWMR-safe: neither creates
// objects or attributes).
class Dataset {
 public:
  Dataset() = default;
  Dataset(Id id, std::string file, std::string path) : id_(std::move(id)), file_(std::move(file)), path_(std::move(path)) {}
  hid_t id() const { return id_.get(); }
  const std::string& path() const { return path_; }
  explicit operator bool() const { return static_cast<bool>(id_); }

  std::vector<hsize_t> dims() const;
  hsize_t size() const;  // number of elements (rows for 1-D)
  // Grow a 1-D extendible dataset by n elements and write them at the end.
  template <class T>
  void append(const T* data, std::size_t n) const;
  // Overwrite the whole dataset (element count must match).
  template <class T>
  void write_all(const T* data, std::size_t n) const;
  template <class T>
  std::vector<T> read_all() const;
  // Elements [begin, begin + n) of a 1-D dataset.
  template <class T>
  std::vector<T> read_range(hsize_t begin, hsize_t n) const;
  // Shrink or grow a 1-D dataset (shrinking is not allowed under SWMR).
  void resize(hsize_t n) const;
  // Scalar fixed-length string dataset: value is truncated to the type's
  // size (the caller marks truncation); read strips trailing NULs.
  void write_fixed_string(const std::string& value) const;
  std::string read_fixed_string() const;
  std::size_t fixed_string_size() const;
  void flush() const;    // H5Dflush: raw data and metadata of this dataset
  void refresh() const;  // H5Drefresh: SWMR reader picks up the writer's changes

  [[noreturn]] void fail(const std::string& what) const;

 private:
  Id id_;
  std::string file_, path_;
};

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

  // Open a dataset held as a handle.
  Dataset dataset(const std::string& name) const;
  // 1-D chunked dataset of T with unlimited max size, initially empty.
  template <class T>
  Dataset create_extendible(const std::string& name, hsize_t chunk, bool fletcher32 = false) const;
  // Fixed-size (non-extendible) dataset of T filled with `fill`; dims empty = scalar.
  template <class T>
  Dataset create_fixed(const std::string& name, const std::vector<hsize_t>& dims, T fill) const;
  // Scalar fixed-length string dataset (size bytes, NUL padded, UTF-8).
  Dataset create_fixed_string(const std::string& name, std::size_t size, const std::string& value) const;
  // Chunked 1-D dataset written whole, with Fletcher-32 checksums so a
  // corrupted or truncated read fails instead of returning garbage.
  template <class T>
  void write_checked(const std::string& name, const T* data, std::size_t n, hsize_t chunk) const;

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
  // swmr: read -> H5F_ACC_SWMR_READ; read_write -> open to become a SWMR
  // writer again: clears the consistency flags a killed SWMR writer leaves
  // behind (what `h5clear -s` does) so a crashed run can be resumed; the
  // caller then calls start_swmr_write(). Only one writer may hold a file.
  File(const std::string& path, Mode mode, bool swmr = false);
  File(File&&) noexcept = default;
  File& operator=(File&&) noexcept = default;
  // Explicit close: flushes, then closes; throws naming the file and the
  // system error when either fails. Close every Group / Dataset of the file
  // first (open children postpone HDF5's real close and hide its errors).
  void close();
  bool is_open() const { return static_cast<bool>(id_); }
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
// Call first thing in main: HDF5 then does not close itself at exit; call
// shutdown() before returning from main instead. It skips the library's
// clean-up after a failed file close, which would crash in HDF5 1.10.
void take_over_shutdown();
void shutdown();
// The system error (strerror text, e.g. "No space left on device") on the
// HDF5 error stack of the call that just failed; "" if none.
std::string os_error_text();
std::string library_version();

}  // namespace dsrsq::h5
