#include "common/pyview.h"

#include <string>

namespace py = pybind11;

namespace fastcv {
namespace {

// What view_from_tensor reads, looked up once: attribute names as interned strings, torch.Tensor and
// the dtypes DType names (in DType's order). Every call of every op converts its tensors here, so the
// reads are plain CPython calls, not pybind casts.
struct Torch {
  PyObject* tensor_type;
  PyObject* dtypes[8];
  PyObject *data_ptr, *shape, *stride, *dtype, *is_cuda, *is_cpu, *get_device, *device;
};

const Torch& torch_names() {
  static const Torch names = [] {
    py::gil_scoped_acquire gil;  // first use may come from a call that released it
    const py::module_ torch = py::module_::import("torch");
    Torch t;
    t.tensor_type = py::object(torch.attr("Tensor")).release().ptr();
    const char* dtypes[8] = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "bool", "uint8"};
    for (int i = 0; i < 8; ++i) t.dtypes[i] = py::object(torch.attr(dtypes[i])).release().ptr();
    t.data_ptr = PyUnicode_InternFromString("data_ptr");
    t.shape = PyUnicode_InternFromString("shape");
    t.stride = PyUnicode_InternFromString("stride");
    t.dtype = PyUnicode_InternFromString("dtype");
    t.is_cuda = PyUnicode_InternFromString("is_cuda");
    t.is_cpu = PyUnicode_InternFromString("is_cpu");
    t.get_device = PyUnicode_InternFromString("get_device");
    t.device = PyUnicode_InternFromString("device");
    return t;
  }();
  return names;
}

// A new reference, or the Python error raised.
py::object owned(PyObject* p) {
  if (!p) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(p);
}

int64_t to_int(PyObject* p) {
  const long long v = PyLong_AsLongLong(p);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

// sizes or strides (a tuple of ints) into out; returns the count.
int read_dims(const py::object& dims, int64_t* out, const char* what) {
  check_arg(PyTuple_Check(dims.ptr()), what, " of a tensor must be a tuple");
  const Py_ssize_t n = PyTuple_GET_SIZE(dims.ptr());
  check_arg(n <= kMaxDims, "fastcv's kernels take tensors of at most 8 dimensions");
  for (Py_ssize_t d = 0; d < n; ++d) out[d] = to_int(PyTuple_GET_ITEM(dims.ptr(), d));
  return int(n);
}

}  // namespace

bool is_tensor(py::handle obj) {
  const int r = PyObject_IsInstance(obj.ptr(), torch_names().tensor_type);
  if (r < 0) throw py::error_already_set();
  return r == 1;
}

TensorView view_from_tensor(py::handle obj) {
  const Torch& t = torch_names();
  PyObject* o = obj.ptr();
  TensorView v;
  v.data = PyLong_AsVoidPtr(owned(PyObject_CallMethodNoArgs(o, t.data_ptr)).ptr());
  if (!v.data && PyErr_Occurred()) throw py::error_already_set();
  v.ndim = read_dims(owned(PyObject_GetAttr(o, t.shape)), v.sizes, "shape");
  check_arg(read_dims(owned(PyObject_CallMethodNoArgs(o, t.stride)), v.strides, "stride") == v.ndim,
            "tensor strides must match its sizes");
  const py::object dtype = owned(PyObject_GetAttr(o, t.dtype));
  int code = 0;
  while (code < 8 && t.dtypes[code] != dtype.ptr()) ++code;
  if (code == 8)
    throw ArgError("fastcv's kernels take float32, float64, float16, bfloat16, int64, int32, bool and uint8 tensors, "
                   "got " + std::string(py::str(dtype)));
  v.dtype = DType(code);
  if (owned(PyObject_GetAttr(o, t.is_cpu)).ptr() == Py_True) {  // the index of a CPU tensor is -1
    v.device = DeviceType::CPU;
    v.device_index = -1;
  } else if (owned(PyObject_GetAttr(o, t.is_cuda)).ptr() == Py_True) {
    v.device = DeviceType::CUDA;
    v.device_index = int32_t(to_int(owned(PyObject_CallMethodNoArgs(o, t.get_device)).ptr()));
  } else {
    throw ArgError("fastcv's kernels run on CPU and CUDA tensors, got one on " +
                   std::string(py::str(owned(PyObject_GetAttr(o, t.device)))));
  }
  return v;
}

void read_named_ints(py::handle obj, const char* what, const char* const* names, int n, PyObject** checked,
                     int64_t* out) {
  PyObject* o = obj.ptr();
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(o));
  if (type != *checked) {  // first sight of this type: its fields must be ours, in our order
    bool ok = PyTuple_Check(o) && PyTuple_GET_SIZE(o) == n && PyObject_HasAttrString(type, "_fields");
    if (ok) {
      const py::tuple fields = py::reinterpret_steal<py::tuple>(PyObject_GetAttrString(type, "_fields"));
      for (int i = 0; ok && i < n; ++i) ok = py::str(fields[size_t(i)]).cast<std::string>() == names[i];
    }
    if (!ok) {
      std::string expected;
      for (int i = 0; i < n; ++i) expected += (i ? ", " : "") + std::string(names[i]);
      throw ArgError(std::string(what) + " must be a NamedTuple of ints with the fields (" + expected + "), got " +
                     std::string(py::repr(obj)));
    }
    Py_INCREF(type);  // kept: the remembered type must outlive the pointer comparison
    *checked = type;
  }
  for (int i = 0; i < n; ++i) out[i] = to_int(PyTuple_GET_ITEM(o, i));
}

}  // namespace fastcv
