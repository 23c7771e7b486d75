// The Python extension module sparsekern._C. Loading it runs the static kernel registrations of
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(sparsekern, CPU, m)) and, in CUDA builds, csrc/cuda/*.cpp
// (TORCH_LIBRARY_IMPL(sparsekern, CUDA, m)). The kernel ops' schemas (`sparsekern::_<op>`) and
// their fake (meta) functions are defined once, in Python, from sparsekern/spec.py; the package
// defines them before it loads this module.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/kern_api.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
// The CPU microkernel table the ops use now (AVX-512 > AVX2 > generic; SPARSEKERN_CPU_ISA).
std::string cpu_isa() { return sk::kernels().name; }

// The path a C++ linear op (`bsr_mm`, `bsr_mm_t` or `sddmm`) takes for a topology of `nnzb`
// blocks of br x bc in an M x K matrix: "dense" (MKL on W ⊙ mask) or "sparse".
std::string cpu_linear_path(const std::string& op, int64_t nnzb, int64_t br, int64_t bc,
                            int64_t M, int64_t K) {
  const int which = op == "bsr_mm" ? 0 : op == "bsr_mm_t" ? 1 : op == "sddmm" ? 2 : -1;
  TORCH_CHECK_VALUE(which >= 0, "_cpu_linear_path: op must be bsr_mm, bsr_mm_t or sddmm, got ",
                    op);
  return sk::linear_uses_dense(which, nnzb, br, bc, M, K) ? "dense" : "sparse";
}
}  // namespace

// Queries of the C++ decisions, for sparsekern.explain (no tensors: one catch-all kernel each).
TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.def("_cpu_isa() -> str", &cpu_isa);
  m.def("_cpu_linear_path(str op, int nnzb, int br, int bc, int M, int K) -> str",
        &cpu_linear_path);
}
