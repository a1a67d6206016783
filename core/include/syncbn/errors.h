// Exceptions the core throws. Messages name the argument, what was expected and what
// came; the Python bindings map TypeError/ValueError to the Python exceptions of the
// same name.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace syncbn {

struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// A communicator or backend failed (MPI error code, callback raised, ...).
struct CommError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Ranks reduced different things in one all-reduce (another layer, operation, channel
// axis, channel count or call count): every rank throws it, judged from the reduced
// fingerprint alone, before any output or running statistic is written.
struct CollectiveMismatchError : CommError {
  using CommError::CommError;
};

namespace detail {
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

template <class E = ValueError, class... Args>
[[noreturn]] void fail(const Args&... args) {
  throw E(detail::cat(args...));
}

}  // namespace syncbn
