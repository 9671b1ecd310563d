// Op schemas of the bsconv_fused library. One forward/backward pair covers both variants:
// BSConv-U passes its projection as pw1_weight with pw2_weight = None; BSConv-S passes both.
//
// padding is (top, bottom, left, right); padding_mode and activation are the codes of
// csrc/common/bsconv_math.h. backward's output_mask and results follow the order
// (x, pw1_weight, pw2_weight, dw_weight, dw_bias, mid_scale, mid_shift); gradients that were not
// asked for come back as empty tensors.
#include <Python.h>
#include <torch/library.h>

namespace bsconv {
PyMethodDef* python_methods();  // python_call.cpp
}

extern "C" {
// Importing the module loads the library, whose static initializers register the ops with the
// dispatcher; its one function is the eager entry of the forward op (python_call.cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          bsconv::python_methods()};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(bsconv_fused, m) {
  m.def(
      "forward(Tensor x, Tensor pw1_weight, Tensor? pw2_weight, Tensor dw_weight, "
      "Tensor? dw_bias, Tensor? mid_scale, Tensor? mid_shift, int[2] stride, int[4] padding, "
      "int[2] dilation, int padding_mode, int activation) -> Tensor");
  m.def(
      "backward(Tensor grad_y, Tensor x, Tensor pw1_weight, Tensor? pw2_weight, "
      "Tensor dw_weight, Tensor? dw_bias, Tensor? mid_scale, Tensor? mid_shift, int[2] stride, "
      "int[4] padding, int[2] dilation, int padding_mode, int activation, bool[7] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
