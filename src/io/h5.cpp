#include "io/h5.hpp"

#include <algorithm>
#include <cstring>

#include "core/error.hpp"

namespace dsrsq::h5 {

void IdTraits::destroy(hid_t id) noexcept {
  switch (H5Iget_type(id)) {
    case H5I_FILE: H5Fclose(id); break;
    case H5I_GROUP: H5Gclose(id); break;
    case H5I_DATASET: H5Dclose(id); break;
    case H5I_DATASPACE: H5Sclose(id); break;
    case H5I_DATATYPE: H5Tclose(id); break;
    case H5I_ATTR: H5Aclose(id); break;
    case H5I_GENPROP_LST: H5Pclose(id); break;
    default: break;
  }
}

template <> hid_t type_of<float>() { return H5T_NATIVE_FLOAT; }
template <> hid_t type_of<double>() { return H5T_NATIVE_DOUBLE; }
template <> hid_t type_of<std::int32_t>() { return H5T_NATIVE_INT32; }
template <> hid_t type_of<std::int64_t>() { return H5T_NATIVE_INT64; }
template <> hid_t type_of<std::uint8_t>() { return H5T_NATIVE_UINT8; }
template <> hid_t type_of<std::uint16_t>() { return H5T_NATIVE_UINT16; }
template <> hid_t type_of<std::uint64_t>() { return H5T_NATIVE_UINT64; }

void silence_errors() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

namespace {
bool g_close_failed = false;  // an H5Fclose failed: the library holds a half-closed file
}  // namespace

void take_over_shutdown() { H5dont_atexit(); }

void shutdown() {
  // HDF5 1.10 keeps the id of a file whose H5Fclose failed (e.g. disk full)
  // and crashes closing it again at termination (H5F__close_cb, rc 139).
  // After such a failure the library is left alone: every file this program
  // writes was closed (or reported) explicitly before.
  if (!g_close_failed) H5close();
}

namespace {
herr_t find_os_error(unsigned, const H5E_error2_t* e, void* out) {
  auto* s = static_cast<std::string*>(out);
  if (!s->empty() || !e->desc) return 0;
  // The sec2 driver reports a failed system call as "..., errno = 28, error message = 'No space left on device'".
  const std::string d = e->desc;
  const std::string key = "error message = '";
  const auto b = d.find(key);
  if (b == std::string::npos) return 0;
  const auto e2 = d.find('\'', b + key.size());
  *s = d.substr(b + key.size(), e2 == std::string::npos ? std::string::npos : e2 - b - key.size());
  return 0;
}
}  // namespace

std::string os_error_text() {
  std::string s;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, find_os_error, &s);
  return s;
}

namespace {
// ": <system error>" when the HDF5 error stack of the call that just failed names one.
std::string os_suffix() {
  const std::string s = os_error_text();
  return s.empty() ? "" : ": " + s;
}
}  // namespace

std::string library_version() {
  unsigned maj = 0, min = 0, rel = 0;
  H5get_libversion(&maj, &min, &rel);
  return std::to_string(maj) + "." + std::to_string(min) + "." + std::to_string(rel);
}

namespace {
std::string join(const std::string& a, const std::string& b) {
  if (a.empty() || a == "/") return "/" + b;
  return a + "/" + b;
}
Id checked(hid_t id, const Group& g, const std::string& what) {
  if (id < 0) g.fail(what);
  return Id(id);
}
}  // namespace

void Group::fail(const std::string& what) const {
  raise_input_error(detail::cat("HDF5 file '", file_, "', group '", path_.empty() ? "/" : path_, "': ", what, os_suffix()));
}

bool Group::exists(const std::string& name) const {
  // Check each component so a missing parent is not an error.
  std::size_t start = 0;
  while (true) {
    const std::size_t slash = name.find('/', start);
    const std::string prefix = name.substr(0, slash);
    if (H5Lexists(id(), prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return true;
}

Group Group::group(const std::string& name) const {
  if (!exists(name)) fail("missing group '" + name + "'");
  return Group(checked(H5Gopen2(id(), name.c_str(), H5P_DEFAULT), *this, "cannot open group '" + name + "'"), file_,
               join(path_, name));
}

Group Group::create_group(const std::string& name) const {
  Id lcpl(H5Pcreate(H5P_LINK_CREATE));
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  return Group(checked(H5Gcreate2(id(), name.c_str(), lcpl.get(), H5P_DEFAULT, H5P_DEFAULT), *this,
                       "cannot create group '" + name + "'"),
               file_, join(path_, name));
}

Group Group::require_group(const std::string& name) const { return exists(name) ? group(name) : create_group(name); }

template <class T>
void Group::write_raw(const std::string& name, const T* data, const std::vector<hsize_t>& dims) const {
  Id space = checked(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), *this, "dataspace for " + name);
  Id lcpl(H5Pcreate(H5P_LINK_CREATE));
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  Id ds = checked(H5Dcreate2(id(), name.c_str(), type_of<T>(), space.get(), lcpl.get(), H5P_DEFAULT, H5P_DEFAULT), *this,
                  "cannot create dataset '" + name + "'");
  if (H5Dwrite(ds.get(), type_of<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) fail("cannot write dataset '" + name + "'");
}

template <class T>
void Group::write(const std::string& name, const std::vector<T>& data, std::vector<hsize_t> dims) const {
  if (dims.empty()) dims = {static_cast<hsize_t>(data.size())};
  hsize_t n = 1;
  for (auto d : dims) n *= d;
  if (n != data.size()) fail("dataset '" + name + "': dims do not match the data size");
  write_raw(name, data.data(), dims);
}

std::vector<hsize_t> Group::dims(const std::string& name) const {
  if (!exists(name)) fail("missing dataset '" + name + "'");
  Id ds = checked(H5Dopen2(id(), name.c_str(), H5P_DEFAULT), *this, "cannot open dataset '" + name + "'");
  Id space(H5Dget_space(ds.get()));
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 0) fail("dataset '" + name + "' has an unreadable dataspace");
  std::vector<hsize_t> d(static_cast<std::size_t>(rank));
  H5Sget_simple_extent_dims(space.get(), d.data(), nullptr);
  return d;
}

template <class T>
void Group::read_raw(const std::string& name, T* data, std::size_t count) const {
  const auto d = dims(name);
  hsize_t n = 1;
  for (auto x : d) n *= x;
  if (n != count)
    fail(detail::cat("dataset '", name, "' holds ", n, " elements, expected ", count));
  Id ds = checked(H5Dopen2(id(), name.c_str(), H5P_DEFAULT), *this, "cannot open dataset '" + name + "'");
  if (H5Dread(ds.get(), type_of<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
    fail("cannot read dataset '" + name + "' (truncated or wrong type?)");
}

template <class T>
std::vector<T> Group::read(const std::string& name, std::vector<hsize_t>* dims_out) const {
  const auto d = dims(name);
  hsize_t n = 1;
  for (auto x : d) n *= x;
  std::vector<T> v(static_cast<std::size_t>(n));
  read_raw(name, v.data(), v.size());
  if (dims_out) *dims_out = d;
  return v;
}

#define DSRSQ_H5_INSTANTIATE(T)                                                                           \
  template void Group::write<T>(const std::string&, const std::vector<T>&, std::vector<hsize_t>) const; \
  template std::vector<T> Group::read<T>(const std::string&, std::vector<hsize_t>*) const;               \
  template void Group::write_raw<T>(const std::string&, const T*, const std::vector<hsize_t>&) const;    \
  template void Group::read_raw<T>(const std::string&, T*, std::size_t) const;
DSRSQ_H5_INSTANTIATE(float)
DSRSQ_H5_INSTANTIATE(double)
DSRSQ_H5_INSTANTIATE(std::int32_t)
DSRSQ_H5_INSTANTIATE(std::int64_t)
DSRSQ_H5_INSTANTIATE(std::uint8_t)
DSRSQ_H5_INSTANTIATE(std::uint16_t)
DSRSQ_H5_INSTANTIATE(std::uint64_t)
#undef DSRSQ_H5_INSTANTIATE

namespace {
Id string_type() {
  Id t(H5Tcopy(H5T_C_S1));
  H5Tset_size(t.get(), H5T_VARIABLE);
  H5Tset_cset(t.get(), H5T_CSET_UTF8);
  return t;
}
}  // namespace

Dataset Group::dataset(const std::string& name) const {
  if (!exists(name)) fail("missing dataset '" + name + "'");
  return Dataset(checked(H5Dopen2(id(), name.c_str(), H5P_DEFAULT), *this, "cannot open dataset '" + name + "'"), file_,
                 join(path_, name));
}

namespace {
Id link_props() {
  Id lcpl(H5Pcreate(H5P_LINK_CREATE));
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  return lcpl;
}
}  // namespace

template <class T>
Dataset Group::create_extendible(const std::string& name, hsize_t chunk, bool fletcher32) const {
  const hsize_t zero = 0, unlimited = H5S_UNLIMITED;
  chunk = chunk ? chunk : 1;
  Id space = checked(H5Screate_simple(1, &zero, &unlimited), *this, "dataspace for " + name);
  Id dcpl(H5Pcreate(H5P_DATASET_CREATE));
  if (H5Pset_chunk(dcpl.get(), 1, &chunk) < 0) fail("cannot set chunking for '" + name + "'");
  if (fletcher32) H5Pset_fletcher32(dcpl.get());
  Id lcpl = link_props();
  return Dataset(checked(H5Dcreate2(id(), name.c_str(), type_of<T>(), space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT),
                         *this, "cannot create dataset '" + name + "'"),
                 file_, join(path_, name));
}

template <class T>
Dataset Group::create_fixed(const std::string& name, const std::vector<hsize_t>& dims, T fill) const {
  Id space = checked(dims.empty() ? H5Screate(H5S_SCALAR)
                                  : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                     *this, "dataspace for " + name);
  Id dcpl(H5Pcreate(H5P_DATASET_CREATE));
  H5Pset_fill_value(dcpl.get(), type_of<T>(), &fill);
  H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_ALLOC);
  H5Pset_alloc_time(dcpl.get(), H5D_ALLOC_TIME_EARLY);
  Id lcpl = link_props();
  return Dataset(checked(H5Dcreate2(id(), name.c_str(), type_of<T>(), space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT),
                         *this, "cannot create dataset '" + name + "'"),
                 file_, join(path_, name));
}

namespace {
Id fixed_string_type(std::size_t size) {
  Id t(H5Tcopy(H5T_C_S1));
  H5Tset_size(t.get(), size ? size : 1);
  H5Tset_strpad(t.get(), H5T_STR_NULLPAD);
  H5Tset_cset(t.get(), H5T_CSET_UTF8);
  return t;
}
}  // namespace

Dataset Group::create_fixed_string(const std::string& name, std::size_t size, const std::string& value) const {
  Id type = fixed_string_type(size);
  Id space(H5Screate(H5S_SCALAR));
  Id dcpl(H5Pcreate(H5P_DATASET_CREATE));
  H5Pset_alloc_time(dcpl.get(), H5D_ALLOC_TIME_EARLY);
  Id lcpl = link_props();
  Dataset ds(checked(H5Dcreate2(id(), name.c_str(), type.get(), space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT), *this,
                     "cannot create dataset '" + name + "'"),
             file_, join(path_, name));
  ds.write_fixed_string(value);
  return ds;
}

template <class T>
void Group::write_checked(const std::string& name, const T* data, std::size_t n, hsize_t chunk) const {
  const hsize_t dim = n;
  chunk = std::max<hsize_t>(1, std::min<hsize_t>(chunk, std::max<hsize_t>(n, 1)));
  Id space = checked(H5Screate_simple(1, &dim, nullptr), *this, "dataspace for " + name);
  Id dcpl(H5Pcreate(H5P_DATASET_CREATE));
  if (H5Pset_chunk(dcpl.get(), 1, &chunk) < 0) fail("cannot set chunking for '" + name + "'");
  H5Pset_fletcher32(dcpl.get());
  Id lcpl = link_props();
  Id ds = checked(H5Dcreate2(id(), name.c_str(), type_of<T>(), space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT), *this,
                  "cannot create dataset '" + name + "'");
  if (n && H5Dwrite(ds.get(), type_of<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
    fail("cannot write dataset '" + name + "'");
}

#define DSRSQ_H5_INSTANTIATE2(T)                                                                                \
  template Dataset Group::create_extendible<T>(const std::string&, hsize_t, bool) const;                      \
  template Dataset Group::create_fixed<T>(const std::string&, const std::vector<hsize_t>&, T) const;          \
  template void Group::write_checked<T>(const std::string&, const T*, std::size_t, hsize_t) const;            \
  template void Dataset::append<T>(const T*, std::size_t) const;                                              \
  template void Dataset::write_all<T>(const T*, std::size_t) const;                                           \
  template std::vector<T> Dataset::read_all<T>() const;                                                       \
  template std::vector<T> Dataset::read_range<T>(hsize_t, hsize_t) const;

// ---- Dataset ----

void Dataset::fail(const std::string& what) const {
  raise_input_error(detail::cat("HDF5 file '", file_, "', dataset '", path_, "': ", what, os_suffix()));
}

std::vector<hsize_t> Dataset::dims() const {
  Id space(H5Dget_space(id()));
  const int rank = space ? H5Sget_simple_extent_ndims(space.get()) : -1;
  if (rank < 0) fail("unreadable dataspace");
  std::vector<hsize_t> d(static_cast<std::size_t>(rank));
  H5Sget_simple_extent_dims(space.get(), d.data(), nullptr);
  return d;
}

hsize_t Dataset::size() const {
  hsize_t n = 1;
  for (auto x : dims()) n *= x;
  return n;
}

void Dataset::resize(hsize_t n) const {
  if (H5Dset_extent(id(), &n) < 0) fail(detail::cat("cannot resize to ", n, " elements"));
}

template <class T>
void Dataset::append(const T* data, std::size_t n) const {
  if (n == 0) return;
  const auto d = dims();
  if (d.size() != 1) fail("append needs a 1-D dataset");
  const hsize_t start = d[0], count = n, total = d[0] + n;
  if (H5Dset_extent(id(), &total) < 0) fail("cannot extend (not chunked / not extendible?)");
  Id fspace(H5Dget_space(id()));
  H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &start, nullptr, &count, nullptr);
  Id mspace(H5Screate_simple(1, &count, nullptr));
  if (H5Dwrite(id(), type_of<T>(), mspace.get(), fspace.get(), H5P_DEFAULT, data) < 0) fail("cannot append rows");
}

template <class T>
void Dataset::write_all(const T* data, std::size_t n) const {
  if (size() != n) fail(detail::cat("holds ", size(), " elements, writing ", n));
  if (H5Dwrite(id(), type_of<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) fail("cannot write");
}

template <class T>
std::vector<T> Dataset::read_all() const {
  std::vector<T> v(static_cast<std::size_t>(size()));
  if (!v.empty() && H5Dread(id(), type_of<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()) < 0)
    fail("cannot read (truncated, corrupted or wrong type?)");
  return v;
}

template <class T>
std::vector<T> Dataset::read_range(hsize_t begin, hsize_t n) const {
  const auto d = dims();
  if (d.size() != 1 || begin + n > d[0]) fail(detail::cat("range [", begin, ", ", begin + n, ") out of bounds"));
  std::vector<T> v(static_cast<std::size_t>(n));
  if (n == 0) return v;
  Id fspace(H5Dget_space(id()));
  H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &begin, nullptr, &n, nullptr);
  Id mspace(H5Screate_simple(1, &n, nullptr));
  if (H5Dread(id(), type_of<T>(), mspace.get(), fspace.get(), H5P_DEFAULT, v.data()) < 0)
    fail("cannot read (truncated, corrupted or wrong type?)");
  return v;
}

std::size_t Dataset::fixed_string_size() const {
  Id t(H5Dget_type(id()));
  if (!t || H5Tget_class(t.get()) != H5T_STRING || H5Tis_variable_str(t.get()) > 0) fail("not a fixed-length string");
  return H5Tget_size(t.get());
}

void Dataset::write_fixed_string(const std::string& value) const {
  const std::size_t n = fixed_string_size();
  std::string buf(n, '\0');
  std::copy_n(value.data(), std::min(n, value.size()), buf.data());
  Id type = fixed_string_type(n);
  if (H5Dwrite(id(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0) fail("cannot write string");
}

std::string Dataset::read_fixed_string() const {
  const std::size_t n = fixed_string_size();
  std::string buf(n, '\0');
  Id type = fixed_string_type(n);
  if (H5Dread(id(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0) fail("cannot read string");
  buf.resize(std::strlen(buf.c_str()));
  return buf;
}

void Dataset::flush() const {
  if (H5Dflush(id()) < 0) fail("flush failed");
}

void Dataset::refresh() const {
  if (H5Drefresh(id()) < 0) fail("refresh failed (file not opened for SWMR reading?)");
}

DSRSQ_H5_INSTANTIATE2(float)
DSRSQ_H5_INSTANTIATE2(double)
DSRSQ_H5_INSTANTIATE2(std::int32_t)
DSRSQ_H5_INSTANTIATE2(std::int64_t)
DSRSQ_H5_INSTANTIATE2(std::uint8_t)
DSRSQ_H5_INSTANTIATE2(std::uint64_t)
#undef DSRSQ_H5_INSTANTIATE2

void Group::write_strings(const std::string& name, const std::vector<std::string>& v) const {
  std::vector<const char*> ptrs;
  ptrs.reserve(v.size());
  for (const auto& s : v) ptrs.push_back(s.c_str());
  Id type = string_type();
  const hsize_t n = v.size();
  Id space = checked(H5Screate_simple(1, &n, nullptr), *this, "dataspace for " + name);
  Id lcpl(H5Pcreate(H5P_LINK_CREATE));
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  Id ds = checked(H5Dcreate2(id(), name.c_str(), type.get(), space.get(), lcpl.get(), H5P_DEFAULT, H5P_DEFAULT), *this,
                  "cannot create dataset '" + name + "'");
  if (n && H5Dwrite(ds.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()) < 0)
    fail("cannot write dataset '" + name + "'");
}

std::vector<std::string> Group::read_strings(const std::string& name) const {
  const auto d = dims(name);
  hsize_t n = 1;
  for (auto x : d) n *= x;
  Id ds = checked(H5Dopen2(id(), name.c_str(), H5P_DEFAULT), *this, "cannot open dataset '" + name + "'");
  Id type = string_type();
  std::vector<char*> ptrs(static_cast<std::size_t>(n), nullptr);
  std::vector<std::string> out;
  if (n == 0) return out;
  if (H5Dread(ds.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()) < 0)
    fail("cannot read strings from '" + name + "'");
  for (char* p : ptrs) out.emplace_back(p ? p : "");
  Id space(H5Dget_space(ds.get()));
  H5Dvlen_reclaim(type.get(), space.get(), H5P_DEFAULT, ptrs.data());
  return out;
}

void Group::set_attr(const std::string& name, const std::string& value) const {
  if (H5Aexists(id(), name.c_str()) > 0) H5Adelete(id(), name.c_str());
  Id type(H5Tcopy(H5T_C_S1));
  H5Tset_size(type.get(), value.size() ? value.size() : 1);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  Id space(H5Screate(H5S_SCALAR));
  Id a = checked(H5Acreate2(id(), name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), *this,
                 "cannot create attribute '" + name + "'");
  const std::string buf = value.empty() ? std::string(1, '\0') : value;
  if (H5Awrite(a.get(), type.get(), buf.data()) < 0) fail("cannot write attribute '" + name + "'");
}

void Group::set_attr(const std::string& name, std::int64_t value) const {
  if (H5Aexists(id(), name.c_str()) > 0) H5Adelete(id(), name.c_str());
  Id space(H5Screate(H5S_SCALAR));
  Id a = checked(H5Acreate2(id(), name.c_str(), H5T_NATIVE_INT64, space.get(), H5P_DEFAULT, H5P_DEFAULT), *this,
                 "cannot create attribute '" + name + "'");
  if (H5Awrite(a.get(), H5T_NATIVE_INT64, &value) < 0) fail("cannot write attribute '" + name + "'");
}

void Group::set_attr(const std::string& name, double value) const {
  if (H5Aexists(id(), name.c_str()) > 0) H5Adelete(id(), name.c_str());
  Id space(H5Screate(H5S_SCALAR));
  Id a = checked(H5Acreate2(id(), name.c_str(), H5T_NATIVE_DOUBLE, space.get(), H5P_DEFAULT, H5P_DEFAULT), *this,
                 "cannot create attribute '" + name + "'");
  if (H5Awrite(a.get(), H5T_NATIVE_DOUBLE, &value) < 0) fail("cannot write attribute '" + name + "'");
}

bool Group::has_attr(const std::string& name) const { return H5Aexists(id(), name.c_str()) > 0; }

std::string Group::attr_string(const std::string& name) const {
  if (!has_attr(name)) fail("missing attribute '" + name + "'");
  Id a = checked(H5Aopen(id(), name.c_str(), H5P_DEFAULT), *this, "cannot open attribute '" + name + "'");
  Id ftype(H5Aget_type(a.get()));
  if (H5Tget_class(ftype.get()) != H5T_STRING) fail("attribute '" + name + "' is not a string");
  // The memory type takes the file type's character set: HDF5 does not
  // convert between ASCII and UTF-8 strings.
  const H5T_cset_t cset = H5Tget_cset(ftype.get());
  if (H5Tis_variable_str(ftype.get()) > 0) {
    Id mtype = string_type();
    H5Tset_cset(mtype.get(), cset);
    char* p = nullptr;
    if (H5Aread(a.get(), mtype.get(), &p) < 0) fail("cannot read attribute '" + name + "'");
    std::string s = p ? p : "";
    H5free_memory(p);
    return s;
  }
  const std::size_t n = H5Tget_size(ftype.get());
  std::string s(n, '\0');
  Id mtype(H5Tcopy(H5T_C_S1));
  H5Tset_size(mtype.get(), n);
  H5Tset_cset(mtype.get(), cset);
  if (H5Aread(a.get(), mtype.get(), s.data()) < 0) fail("cannot read attribute '" + name + "'");
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

std::int64_t Group::attr_int(const std::string& name) const {
  if (!has_attr(name)) fail("missing attribute '" + name + "'");
  Id a = checked(H5Aopen(id(), name.c_str(), H5P_DEFAULT), *this, "cannot open attribute '" + name + "'");
  std::int64_t v = 0;
  if (H5Aread(a.get(), H5T_NATIVE_INT64, &v) < 0) fail("cannot read attribute '" + name + "' as an integer");
  return v;
}

double Group::attr_double(const std::string& name) const {
  if (!has_attr(name)) fail("missing attribute '" + name + "'");
  Id a = checked(H5Aopen(id(), name.c_str(), H5P_DEFAULT), *this, "cannot open attribute '" + name + "'");
  double v = 0;
  if (H5Aread(a.get(), H5T_NATIVE_DOUBLE, &v) < 0) fail("cannot read attribute '" + name + "' as a number");
  return v;
}

namespace {
herr_t collect_attr(hid_t, const char* name, const H5A_info_t*, void* out) {
  static_cast<std::vector<std::string>*>(out)->emplace_back(name);
  return 0;
}
herr_t collect_link(hid_t, const char* name, const H5L_info_t*, void* out) {
  static_cast<std::vector<std::string>*>(out)->emplace_back(name);
  return 0;
}
}  // namespace

std::vector<std::string> Group::attr_names() const {
  std::vector<std::string> v;
  hsize_t idx = 0;
  H5Aiterate2(id(), H5_INDEX_NAME, H5_ITER_INC, &idx, collect_attr, &v);
  return v;
}

std::vector<std::string> Group::children() const {
  std::vector<std::string> v;
  hsize_t idx = 0;
  H5Literate(id(), H5_INDEX_NAME, H5_ITER_INC, &idx, collect_link, &v);
  return v;
}

File::File(const std::string& path, Mode mode, bool swmr) : path_(path) {
  silence_errors();
  hid_t id = H5I_INVALID_HID;
  Id fapl(H5Pcreate(H5P_FILE_ACCESS));
  // SWMR needs the latest file format.
  H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_LATEST, H5F_LIBVER_LATEST);
  switch (mode) {
    case Mode::read: {
      if (H5Fis_hdf5(path.c_str()) <= 0)
        raise_input_error(detail::cat("HDF5 file '", path, "': missing, truncated or not an HDF5 file"));
      id = H5Fopen(path.c_str(), H5F_ACC_RDONLY | (swmr ? H5F_ACC_SWMR_READ : 0), fapl.get());
      break;
    }
    case Mode::read_write: {
      if (swmr) {
        // A SWMR writer that was killed leaves the superblock's "open for
        // SWMR write" flags set; HDF5 1.10 then refuses every write open.
        // The library's own h5clear uses this fapl property to clear them.
        hbool_t clear = 1;
        if (H5Pexist(fapl.get(), "clear_status_flags") > 0) H5Pset(fapl.get(), "clear_status_flags", &clear);
      }
      id = H5Fopen(path.c_str(), H5F_ACC_RDWR, fapl.get());
      break;
    }
    case Mode::create_exclusive:
      id = H5Fcreate(path.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl.get());
      break;
    case Mode::truncate:
      id = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get());
      break;
  }
  if (id < 0) {
    const std::string os = os_error_text();
    raise_input_error(detail::cat("HDF5 file '", path, "': cannot ",
                                  mode == Mode::read || mode == Mode::read_write ? "open" : "create",
                                  os.empty() ? "" : ": " + os,
                                  " (missing, truncated, not HDF5, or locked; on NFS/Lustre without locks set "
                                  "HDF5_USE_FILE_LOCKING=FALSE; a file whose SWMR writer was killed opens only "
                                  "for SWMR reading, or after `h5clear -s`)"));
  }
  id_ = Id(id);
  hid_t g = H5Gopen2(id, "/", H5P_DEFAULT);
  root_ = Group(Id(g), path, "/");
}

void File::flush() const {
  if (H5Fflush(id(), H5F_SCOPE_GLOBAL) < 0)
    raise_input_error("HDF5 file '" + path_ + "': flush failed" + os_suffix());
}

void File::close() {
  root_ = Group();
  if (!id_) return;
  const hid_t id = id_.release();
  // H5Fclose with objects still open only marks the file for closing: the
  // real close (and its write errors) would happen later, unchecked, when the
  // last object goes. Every child must be closed first.
  const ssize_t open = H5Fget_obj_count(id, H5F_OBJ_DATASET | H5F_OBJ_GROUP | H5F_OBJ_DATATYPE | H5F_OBJ_ATTR |
                                                H5F_OBJ_LOCAL);
  // Write everything while the file is still whole, so a failure is reported with its cause.
  const bool flushed = H5Fflush(id, H5F_SCOPE_LOCAL) >= 0;
  const std::string flush_error = flushed ? "" : os_suffix();
  const bool closed = H5Fclose(id) >= 0;
  const std::string close_error = closed ? "" : os_suffix();
  if (!closed) g_close_failed = true;
  if (open > 0)
    raise_input_error(detail::cat("HDF5 file '", path_, "': closed with ", open,
                                  " objects still open (internal error: its close was postponed)"));
  if (!flushed)
    raise_input_error("HDF5 file '" + path_ + "': cannot write (data not on disk)" + flush_error);
  if (!closed)
    raise_input_error("HDF5 file '" + path_ + "': close failed (data may not be on disk)" + close_error);
}

void File::start_swmr_write() const {
  if (H5Fstart_swmr_write(id()) < 0) raise_input_error("HDF5 file '" + path_ + "': cannot start SWMR write mode");
}

}  // namespace dsrsq::h5
