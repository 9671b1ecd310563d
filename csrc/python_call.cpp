// Direct Python entries to bsconv_fused::forward for eager calls, and the options-cache key.
//
// torch.ops.bsconv_fused.forward converts its twelve arguments through the generic schema path
// (OpOverload.__call__ in Python, then one IValue per argument): on the build machine, the
// forward of an 8-channel 1x1 image takes 18 us through torch.ops and 10.7 us through this
// entry (torch.ops.aten.convolution likewise costs ~10 us more than F.conv2d); a 64->64 8x8
// layer's forward goes from 44 to 34 us. bsconv_fused.ops.forward calls `forward` instead
// when nothing needs the Python op object: plain tensors, no torch function mode, not under
// torch.compile (which must see torch.ops to trace the op). The call still goes through the
// whole dispatcher (autograd, autocast, Python dispatch modes, tracing), as torch.ops does.
//
// `call_key` builds the key under which bsconv_fused._args remembers a call's validated
// options; `call` is the whole eager path of bsconv_fused.functional for a remembered call.
#include <Python.h>

#include <string>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "op_handles.h"

namespace {

using bsconv::OptTensor;

constexpr Py_ssize_t kTensorArgs = 7;  // x, pw1, pw2, dw, bias, scale, shift
constexpr Py_ssize_t kIntArgs = 10;    // stride (2), padding (4), dilation (2), mode, activation
constexpr Py_ssize_t kOptionArgs = 5;  // stride, padding, dilation, padding_mode, activation
constexpr Py_ssize_t kKeyArgs = 1 + kTensorArgs + kOptionArgs;  // tag, tensors, options
const char* const kNames[kTensorArgs] = {"x",       "pw1_weight", "pw2_weight", "dw_weight",
                                         "dw_bias", "mid_scale",  "mid_shift"};
constexpr bool kOptional[kTensorArgs] = {false, false, true, false, true, true, true};

// Parses the kIntArgs ints of a ConvOptions.flat_args tuple (false: a Python error is set).
bool parse_ints(PyObject* ints, int64_t (&v)[kIntArgs]) {
  TORCH_CHECK_TYPE(PyTuple_Check(ints) && PyTuple_GET_SIZE(ints) == kIntArgs,
                   "bsconv_fused._C: the options must be a tuple of ", kIntArgs, " ints");
  for (Py_ssize_t i = 0; i < kIntArgs; ++i) {
    v[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(ints, i));
    if (v[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

// The forward op through the dispatcher, the GIL released while it runs (as torch.ops does).
PyObject* run_forward(const OptTensor (&t)[kTensorArgs], const int64_t (&v)[kIntArgs]) {
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = bsconv::forward_op().call(*t[0], *t[1], t[2], *t[3], t[4], t[5], t[6],
                                  c10::IntArrayRef(v, 2), c10::IntArrayRef(v + 2, 4),
                                  c10::IntArrayRef(v + 6, 2), v[8], v[9]);
  }
  return THPVariable_Wrap(std::move(y));
}

// forward(x, pw1, pw2, dw, bias, scale, shift, ints): ints is a tuple of kIntArgs ints.
PyObject* forward(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == kTensorArgs + 1, "bsconv_fused._C.forward: expected ",
                   kTensorArgs + 1, " arguments, got ", nargs);
  OptTensor t[kTensorArgs];
  for (Py_ssize_t i = 0; i < kTensorArgs; ++i) {
    PyObject* o = args[i];
    if (o == Py_None && kOptional[i]) continue;
    TORCH_CHECK_TYPE(THPVariable_Check(o), "bsconv_fused._C.forward: ", kNames[i],
                     " must be a Tensor", kOptional[i] ? " or None" : "", ", got ",
                     Py_TYPE(o)->tp_name);
    t[i] = THPVariable_Unpack(o);
  }
  int64_t v[kIntArgs];
  if (!parse_ints(args[kTensorArgs], v)) return nullptr;
  return run_forward(t, v);
  END_HANDLE_TH_ERRORS
}

// The bytes a tensor contributes to a call key: its kind (0 None, 1 a tensor), dtype,
// device type and index, dim and sizes.
void key_tensor(std::string& k, const at::Tensor* t) {
  if (t == nullptr) {
    k.push_back(0);
    return;
  }
  const int64_t head[] = {1, int64_t(t->scalar_type()), int64_t(t->device().type()),
                          int64_t(t->device().index()), t->dim()};
  k.append(reinterpret_cast<const char*>(head), sizeof(head));
  k.append(reinterpret_cast<const char*>(t->sizes().data()), t->dim() * sizeof(int64_t));
}

// The bytes of an option: an int, a str, None, or a tuple / list of ints (false: anything
// else, a bool included, which the caller keys the slow way).
bool key_option(std::string& k, PyObject* o) {
  auto put = [&](int64_t v) { k.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  auto put_int = [&](PyObject* i) {
    if (!PyLong_CheckExact(i)) return false;
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(i, &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    put(v);
    return true;
  };
  if (o == Py_None) {
    k.push_back('n');
    return true;
  }
  if (PyLong_CheckExact(o)) {
    k.push_back('i');
    return put_int(o);
  }
  if (PyUnicode_CheckExact(o)) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(o, &n);
    if (s == nullptr) {
      PyErr_Clear();
      return false;
    }
    k.push_back('s');
    put(n);
    k.append(s, size_t(n));
    return true;
  }
  if (PyTuple_CheckExact(o) || PyList_CheckExact(o)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    PyObject** items = PySequence_Fast_ITEMS(o);
    k.push_back('t');
    put(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!put_int(items[i])) return false;
    }
    return true;
  }
  return false;
}


// The key of a call into k (args: the tag, an int naming the function, then the kTensorArgs
// tensors and the kOptionArgs options). False when an argument is not a plain Tensor /
// Parameter / None or an option is of another type: the caller keys the call in Python.
bool build_key(PyObject* const* args, std::string& k) {
  k.reserve(512);
  if (!PyLong_CheckExact(args[0]) || !key_option(k, args[0])) return false;
  for (Py_ssize_t i = 1; i <= kTensorArgs; ++i) {
    PyObject* o = args[i];
    if (o == Py_None) {
      key_tensor(k, nullptr);
    } else if (THPVariable_CheckExact(o)) {
      key_tensor(k, &THPVariable_Unpack(o));
    } else {
      return false;
    }
  }
  for (Py_ssize_t i = 1 + kTensorArgs; i < kKeyArgs; ++i) {
    if (!key_option(k, args[i])) return false;
  }
  return true;
}

// call_key(tag, x, pw1, pw2, dw, bias, scale, shift, stride, padding, dilation, padding_mode,
// mid_activation): bytes that determine the validated options of a call (the tag, the shape,
// dtype and device of every tensor and the option values), or None (see build_key). ~10x
// cheaper than the same key built from t.shape, t.dtype, t.device in Python.
PyObject* call_key(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == kKeyArgs, "bsconv_fused._C.call_key: expected ", kKeyArgs,
                   " arguments, got ", nargs);
  std::string k;
  if (!build_key(args, k)) Py_RETURN_NONE;
  return PyBytes_FromStringAndSize(k.data(), Py_ssize_t(k.size()));
  END_HANDLE_TH_ERRORS
}

// call(cache, tag, x, pw1, pw2, dw, bias, scale, shift, stride, padding, dilation,
// padding_mode, mid_activation): the fused forward of an eager call whose options are in
// cache (a dict: call_key bytes -> ConvOptions), else NotImplemented, and the caller takes
// the Python path, which validates, remembers and calls: arguments call_key does not key, a
// signature not seen yet, a torch function mode, autocast on for x's device, or a device
// without a fused kernel. The caller checks the rest (torch.compile, use_reference()).
PyObject* call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 1 + kKeyArgs && PyDict_CheckExact(args[0]),
                   "bsconv_fused._C.call: expected a dict and ", kKeyArgs, " arguments");
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  std::string k;
  if (!build_key(args + 1, k)) Py_RETURN_NOTIMPLEMENTED;
  OptTensor t[kTensorArgs];
  for (Py_ssize_t i = 0; i < kTensorArgs; ++i) {
    if (args[2 + i] != Py_None) t[i] = THPVariable_Unpack(args[2 + i]);
  }
  if (!t[0] || !t[1] || !t[3]) Py_RETURN_NOTIMPLEMENTED;  // the Python path names the error
  const c10::DeviceType dev = t[0]->device().type();
  if (dev != c10::DeviceType::CPU &&
      !(dev == c10::DeviceType::CUDA &&
        bsconv::forward_op().hasKernelForDispatchKey(c10::DispatchKey::CUDA))) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  if (at::autocast::is_autocast_enabled(dev)) Py_RETURN_NOTIMPLEMENTED;
  PyObject* key = PyBytes_FromStringAndSize(k.data(), Py_ssize_t(k.size()));
  if (key == nullptr) return nullptr;
  PyObject* opts = PyDict_GetItemWithError(args[0], key);  // borrowed
  Py_DECREF(key);
  if (opts == nullptr) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NOTIMPLEMENTED;
  }
  static PyObject* const flat_name = PyUnicode_InternFromString("flat_args");
  Py_INCREF(opts);  // kept alive while its attribute is read, whatever the dict does meanwhile
  PyObject* ints = PyObject_GetAttr(opts, flat_name);
  Py_DECREF(opts);
  if (ints == nullptr) return nullptr;
  int64_t v[kIntArgs];
  const bool ok = parse_ints(ints, v);
  Py_DECREF(ints);
  if (!ok) return nullptr;
  return run_forward(t, v);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call)), METH_FASTCALL,
     "Eager fused forward of a remembered call signature (see bsconv_fused/functional.py)."},
    {"call_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_key)),
     METH_FASTCALL, "The options-cache key of a call (see bsconv_fused/_args.py)."},
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward)),
     METH_FASTCALL, "Eager call of bsconv_fused::forward (see bsconv_fused/ops.py)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

namespace bsconv {
PyMethodDef* python_methods() { return methods; }
}  // namespace bsconv
