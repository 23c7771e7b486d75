// Schemas of the sparsekern kernel ops (pytorch/extension-cpp style). The device impls are
// registered elsewhere: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cpp (CUDA). The Python custom ops
// in sparsekern/ops.py are the public ops; these `_`-prefixed ops are their kernels.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

extern "C" {
// `import sparsekern._C` loads this library, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sparsekern, m) {
  m.def("_bsr_mm(Tensor x, Tensor w, Tensor mask, Tensor[] topo, int br, int bc) -> Tensor");
  m.def("_bsr_mm_t(Tensor dy, Tensor w, Tensor mask, Tensor[] topo, int br, int bc) -> Tensor");
  m.def("_sddmm(Tensor dy, Tensor x, Tensor mask, Tensor[] topo, int br, int bc) -> Tensor");
  m.def("_grow_topk(Tensor dy, Tensor x, Tensor exclude, int k, Tensor? counter, "
        "float bonus_scale, float eps, int br, int bc) -> (Tensor, Tensor)");
  m.def("_fused_weight_grad(Tensor dy, Tensor x, Tensor mask, Tensor[] topo, int br, int bc, "
        "Tensor exclude, int k, Tensor? counter, float bonus_scale, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("_conv2d(Tensor x, Tensor w, Tensor mask, Tensor[] topo, int br, int bc, int[] stride, "
        "int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("_conv2d_grad_input(Tensor dy, Tensor w, Tensor mask, Tensor[] topo, int br, int bc, "
        "int[] input_hw, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("_conv2d_sddmm(Tensor dy, Tensor x, Tensor mask, Tensor[] topo, int br, int bc, "
        "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("_conv2d_grow_topk(Tensor dy, Tensor x, Tensor exclude, int k, Tensor? counter, "
        "float bonus_scale, float eps, int br, int bc, int[] weight_shape, int[] stride, "
        "int[] padding, int[] dilation, int groups) -> (Tensor, Tensor)");
  m.def("_conv2d_fused_weight_grad(Tensor dy, Tensor x, Tensor mask, Tensor[] topo, int br, "
        "int bc, Tensor exclude, int k, Tensor? counter, float bonus_scale, float eps, "
        "int[] stride, int[] padding, int[] dilation, int groups) -> (Tensor, Tensor, Tensor)");
}

// Meta (fake-tensor) kernels: output shapes and dtypes only, for torch.compile and opcheck.
namespace {
at::Tensor bsr_mm_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor& mask,
                       at::TensorList, int64_t, int64_t) {
  return at::empty({x.size(0), mask.size(0)}, x.options());
}
at::Tensor bsr_mm_t_meta(const at::Tensor& dy, const at::Tensor&, const at::Tensor& mask,
                         at::TensorList, int64_t, int64_t) {
  return at::empty({dy.size(0), mask.size(1)}, dy.options());
}
at::Tensor sddmm_meta(const at::Tensor&, const at::Tensor& x, const at::Tensor&,
                      at::TensorList topo, int64_t br, int64_t bc) {
  TORCH_CHECK(topo.size() == 5, "sddmm: topo must hold 5 tensors");
  return at::empty({topo[1].size(0), br, bc}, x.options());
}
at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
std::tuple<at::Tensor, at::Tensor> grow_topk_meta(const at::Tensor&, const at::Tensor& x,
                                                  const at::Tensor&, int64_t k,
                                                  const std::optional<at::Tensor>&, double,
                                                  double, int64_t, int64_t) {
  return {at::empty({k}, x.options().dtype(at::kLong)), at::empty({k}, x.options().dtype(acc_type(x)))};
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_meta(
    const at::Tensor&, const at::Tensor& x, const at::Tensor&, at::TensorList topo, int64_t br,
    int64_t bc, const at::Tensor&, int64_t k, const std::optional<at::Tensor>&, double, double) {
  TORCH_CHECK(topo.size() == 5, "fused_weight_grad: topo must hold 5 tensors");
  return {at::empty({topo[1].size(0), br, bc}, x.options()),
          at::empty({k}, x.options().dtype(at::kLong)), at::empty({k}, x.options().dtype(acc_type(x)))};
}
int64_t conv_out(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}
at::Tensor conv2d_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor& mask,
                       at::TensorList, int64_t, int64_t, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t) {
  TORCH_CHECK(x.dim() == 4 && mask.dim() == 4 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "conv2d: expected 4-D x and mask and 2-element stride/padding/dilation");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "conv2d: stride must be >= 1, got ", stride);
  return at::empty({x.size(0), mask.size(0),
                    conv_out(x.size(2), mask.size(2), stride[0], padding[0], dilation[0]),
                    conv_out(x.size(3), mask.size(3), stride[1], padding[1], dilation[1])},
                   x.options());
}
at::Tensor conv2d_grad_input_meta(const at::Tensor& dy, const at::Tensor&, const at::Tensor& mask,
                                  at::TensorList, int64_t, int64_t, at::IntArrayRef input_hw,
                                  at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                  int64_t groups) {
  TORCH_CHECK(input_hw.size() == 2 && mask.dim() == 4, "conv2d_grad_input: bad arguments");
  return at::empty({dy.size(0), mask.size(1) * groups, input_hw[0], input_hw[1]}, dy.options());
}
at::Tensor conv2d_sddmm_meta(const at::Tensor&, const at::Tensor& x, const at::Tensor&,
                             at::TensorList topo, int64_t br, int64_t bc, at::IntArrayRef,
                             at::IntArrayRef, at::IntArrayRef, int64_t) {
  TORCH_CHECK(topo.size() == 5, "conv2d_sddmm: topo must hold 5 tensors");
  return at::empty({topo[1].size(0), br, bc}, x.options());
}
std::tuple<at::Tensor, at::Tensor> conv2d_grow_topk_meta(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& exclude, int64_t k,
    const std::optional<at::Tensor>& counter, double bonus_scale, double eps, int64_t br,
    int64_t bc, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t) {
  return grow_topk_meta(dy, x, exclude, k, counter, bonus_scale, eps, br, bc);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_fused_meta(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask, at::TensorList topo,
    int64_t br, int64_t bc, const at::Tensor& exclude, int64_t k,
    const std::optional<at::Tensor>& counter, double bonus_scale, double eps, at::IntArrayRef,
    at::IntArrayRef, at::IntArrayRef, int64_t) {
  return fused_meta(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale, eps);
}
}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, Meta, m) {
  m.impl("_conv2d", &conv2d_meta);
  m.impl("_conv2d_grad_input", &conv2d_grad_input_meta);
  m.impl("_conv2d_sddmm", &conv2d_sddmm_meta);
  m.impl("_bsr_mm", &bsr_mm_meta);
  m.impl("_bsr_mm_t", &bsr_mm_t_meta);
  m.impl("_sddmm", &sddmm_meta);
  m.impl("_grow_topk", &grow_topk_meta);
  m.impl("_fused_weight_grad", &fused_meta);
  m.impl("_conv2d_grow_topk", &conv2d_grow_topk_meta);
  m.impl("_conv2d_fused_weight_grad", &conv2d_fused_meta);
}
