// Operator schemas of the mmfuse_fast extension and the Python module that loads them.
//
// Importing `mmfuse_fast._C` runs the static TORCH_LIBRARY registrations below (schemas) and those of
// cpu/crop_resize_cpu.cpp (CPU kernels) and, in a CUDA build, cuda/crop_resize_cuda.cpp (CUDA kernels). Fake
// (meta) kernels and autograd formulas are registered from Python, in mmfuse_fast/ops/_extension.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module: everything the extension offers goes through torch.ops.mmfuse.*.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mmfuse_fast C++/CUDA kernels, registered as torch.ops.mmfuse.*", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mmfuse, m) {
  m.set_python_module("mmfuse_fast.ops._extension");
  // out[k, c, i, j] = bilinear sample of images[box_index[k], c] at
  //   x = x1 + (j + 0.5) * (x2 - x1) / out_w - 0.5,  y = y1 + (i + 0.5) * (y2 - y1) / out_h - 0.5,
  // the point clamped to [0, W - 1] x [0, H - 1]; boxes = (x1, y1, x2, y2) in pixel-edge coordinates.
  m.def("crop_resize(Tensor images, Tensor boxes, Tensor box_index, SymInt out_h, SymInt out_w) -> Tensor");
  // Gradient of crop_resize with respect to images, shape (n, C, height, width), dtype of grad_out.
  m.def("crop_resize_backward(Tensor grad_out, Tensor boxes, Tensor box_index, SymInt n, SymInt height, "
        "SymInt width) -> Tensor");
}
