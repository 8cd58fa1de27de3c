#pragma once
// error_of(f): the message of the dsrsq::Error that f throws. A test failure
// (and "") when f throws nothing; a failure (and its message) when it throws
// another exception. Include after <boost/test/unit_test.hpp>.
#include <boost/test/unit_test.hpp>

#include <exception>
#include <string>

#include "core/error.hpp"

namespace ref {

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const dsrsq::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    BOOST_ERROR("threw a non-dsrsq exception: " << e.what());
    return e.what();
  }
  BOOST_ERROR("expected a dsrsq::Error, nothing was thrown");
  return {};
}

}  // namespace ref
