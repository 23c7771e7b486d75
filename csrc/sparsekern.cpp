// The Python extension module sparsekern._C. Loading it runs the static kernel registrations of
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(sparsekern, CPU, m)) and, in CUDA builds, csrc/cuda/*.cpp
// (TORCH_LIBRARY_IMPL(sparsekern, CUDA, m)). The kernel ops' schemas (`sparsekern::_<op>`) and
// their fake (meta) functions are defined once, in Python, from sparsekern/spec.py; the package
// defines them before it loads this module.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
