#pragma once
// Argument checks at the C++ boundary. They raise ArgError, which the module turns into ValueError, so a
// caller that bypasses the Python checks still gets an exception rather than a crash.
#include <stdexcept>
#include <string>

#include "common/tensor_view.h"

namespace fastcv {

struct ArgError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// The messages are built only when a check fails: checks run on every call, and a std::string per
// check would cost a heap allocation each.
inline void check_arg(bool ok, const char* message) {
  if (!ok) throw ArgError(message);
}
// The argument's name followed by what it must be: check_arg(ok, "weight", " must be contiguous").
inline void check_arg(bool ok, const char* arg, const char* what) {
  if (!ok) throw ArgError(std::string(arg) + what);
}
void check_shape(const TensorView& t, const char* arg, std::initializer_list<int64_t> sizes);  // -1 = any
void check_dtype(const TensorView& t, const char* arg, DType dtype);
void check_device(const TensorView& t, const char* arg, DeviceType device);
void check_contiguous(const TensorView& t, const char* arg);

}  // namespace fastcv
