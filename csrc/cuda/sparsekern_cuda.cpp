// Torch glue of the CUDA kernels: the CUDA implementations of the internal ops sparsekern::_<op>
// (schemas from sparsekern/spec.py, defined by the package before it loads _C). Built by
// setup.py only with a CUDA torch and CUDA_HOME. Each op: check the inputs (naming the
// argument) -> device guard -> allocate -> launch on the current stream. Semantics:
// sparsekern/reference.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "kernel_math.cuh"
#include "sparsekern_cuda.h"

namespace sparsekern {
namespace {

using cuda::DType;

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

DType kernel_dtype(const char* op, const at::Tensor& t, bool allow_double) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble:
      if (allow_double) return DType::kFloat64;
      break;
    default: break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), " (supported: float32, float16, "
              "bfloat16", allow_double ? ", float64)" : ")");
  return DType::kFloat32;
}

// The shared positivity check, then the CUDA kernels' int32 block sides.
void check_block(const char* op, int64_t br, int64_t bc) {
  SK_CHECK_BLOCK(op, br, bc);
  TORCH_CHECK(br <= kIntMax && bc <= kIntMax, op,
              ": the block size br, bc must fit in int32, got br=", br, ", bc=", bc);
}

const uint8_t* bool_ptr(const at::Tensor& t) {
  return reinterpret_cast<const uint8_t*>(t.const_data_ptr<bool>());
}

// The topology [row_ptr, col_idx, col_ptr, row_idx, slot_t] (int32, 1-D) of an [M, K] mask.
struct Topo {
  at::Tensor row_ptr, col_idx, col_ptr, row_idx, slot_t;
  int64_t nbr, nbc, nnzb;
};

Topo check_topo(const char* op, at::TensorList topo, int64_t M, int64_t K, int64_t br, int64_t bc,
                const at::Tensor& ref) {
  sk::check_topo_count(op, topo);
  sk::check_topo_tensors(op, topo, ref.device(), /*allow_int64=*/false);
  Topo tp;
  tp.nbr = kmath::ceil_div(M, br);
  tp.nbc = kmath::ceil_div(K, bc);
  tp.nnzb = sk::check_topo_lengths(op, topo, M, K, br, bc);
  TORCH_CHECK(tp.nnzb <= kIntMax, op, ": too many blocks for int32 indices (", tp.nnzb, ")");
  tp.row_ptr = topo[0].contiguous();
  tp.col_idx = topo[1].contiguous();
  tp.col_ptr = topo[2].contiguous();
  tp.row_idx = topo[3].contiguous();
  tp.slot_t = topo[4].contiguous();
  return tp;
}

// mask [M, K] bool on ref's device.
void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& ref) {
  SK_CHECK_DIM(op, mask, 2);
  SK_CHECK_BOOL(op, mask);
  SK_CHECK_SAME_DEVICE(op, mask, ref);
}

// w: dense [M, K] or bsr values [nnzb, br, bc], in the dtype of the activation `act` (schema
// name act_name: x or dy), on act's device. Returns true for bsr values.
bool check_weight(const char* op, const at::Tensor& w, const at::Tensor& mask, const Topo& tp,
                  int64_t br, int64_t bc, const at::Tensor& act, const char* act_name) {
  SK_CHECK_SAME_DEVICE(op, w, act);
  SK_CHECK_SAME_DTYPE_AS(op, act, act_name, w, "w");
  const bool bsr = sk::check_weight_layout(op, w, mask, br, bc, "dense [M, K] weight");
  sk::check_bsr_blocks(op, w, bsr, tp.nnzb);
  return bsr;
}

// ----------------------------------------------------------------------------- ops
at::Tensor bsr_mm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mask,
                       at::TensorList topo, int64_t br, int64_t bc) {
  const char* op = "sparsekern::_bsr_mm";
  SK_CHECK_CUDA(op, x);
  SK_CHECK_DIM(op, x, 2);
  check_block(op, br, bc);
  check_mask(op, mask, x);
  const int64_t B = x.size(0), M = mask.size(0), K = mask.size(1);
  sk::check_activation_width(op, x, /*fwd=*/true, M, K);
  const DType dt = kernel_dtype(op, x, /*allow_double=*/true);
  c10::cuda::CUDAGuard guard(x.device());
  const Topo tp = check_topo(op, topo, M, K, br, bc, x);
  const bool bsr = check_weight(op, w, mask, tp, br, bc, x, "x");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), mc = mask.contiguous();
  at::Tensor y = at::empty({B, M}, x.options());
  if (y.numel() == 0) return y;
  C10_CUDA_CHECK(cuda::launch_bsr_mm(dt, xc.const_data_ptr(), wc.const_data_ptr(), bsr,
                                     bool_ptr(mc), tp.row_ptr.const_data_ptr<int32_t>(),
                                     tp.col_idx.const_data_ptr<int32_t>(), y.mutable_data_ptr(),
                                     B, M, K, int(br), int(bc),
                                     c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

at::Tensor bsr_mm_t_cuda(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& mask,
                         at::TensorList topo, int64_t br, int64_t bc) {
  const char* op = "sparsekern::_bsr_mm_t";
  SK_CHECK_CUDA(op, dy);
  SK_CHECK_DIM(op, dy, 2);
  check_block(op, br, bc);
  check_mask(op, mask, dy);
  const int64_t B = dy.size(0), M = mask.size(0), K = mask.size(1);
  sk::check_activation_width(op, dy, /*fwd=*/false, M, K);
  const DType dt = kernel_dtype(op, dy, /*allow_double=*/true);
  c10::cuda::CUDAGuard guard(dy.device());
  const Topo tp = check_topo(op, topo, M, K, br, bc, dy);
  const bool bsr = check_weight(op, w, mask, tp, br, bc, dy, "dy");
  const at::Tensor dyc = dy.contiguous(), wc = w.contiguous(), mc = mask.contiguous();
  at::Tensor dx = at::empty({B, K}, dy.options());
  if (dx.numel() == 0) return dx;
  C10_CUDA_CHECK(cuda::launch_bsr_mm_t(
      dt, dyc.const_data_ptr(), wc.const_data_ptr(), bsr, bool_ptr(mc),
      tp.col_ptr.const_data_ptr<int32_t>(), tp.row_idx.const_data_ptr<int32_t>(),
      tp.slot_t.const_data_ptr<int32_t>(), dx.mutable_data_ptr(), B, M, K, int(br), int(bc),
      c10::cuda::getCurrentCUDAStream().stream()));
  return dx;
}

// dy [B, M] and x [B, K] on one CUDA device with one dtype.
void check_pair(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  SK_CHECK_CUDA(op, x);
  SK_CHECK_DIM(op, dy, 2);
  SK_CHECK_DIM(op, x, 2);
  SK_CHECK_SAME_DEVICE(op, dy, x);
  sk::check_same_batch(op, dy, x);
  SK_CHECK_SAME_DTYPE(op, dy, x);
}

at::Tensor sddmm_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask,
                      at::TensorList topo, int64_t br, int64_t bc) {
  const char* op = "sparsekern::_sddmm";
  check_pair(op, dy, x);
  check_block(op, br, bc);
  check_mask(op, mask, x);
  const int64_t B = x.size(0), M = mask.size(0), K = mask.size(1);
  TORCH_CHECK(dy.size(1) == M && x.size(1) == K, op, ": dy must be [B, ", M, "] and x [B, ", K,
              "] for a ", mask.sizes(), " mask, got ", dy.sizes(), " and ", x.sizes());
  const DType dt = kernel_dtype(op, x, /*allow_double=*/true);
  c10::cuda::CUDAGuard guard(x.device());
  const Topo tp = check_topo(op, topo, M, K, br, bc, x);
  at::Tensor out = at::empty({tp.nnzb, br, bc}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous(), mc = mask.contiguous();
  at::Tensor ws = at::empty({static_cast<int64_t>(cuda::sddmm_workspace_bytes(tp.nbr))},
                            x.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::launch_sddmm(dt, dyc.const_data_ptr(), xc.const_data_ptr(), bool_ptr(mc),
                                    tp.row_ptr.const_data_ptr<int32_t>(),
                                    tp.col_idx.const_data_ptr<int32_t>(), tp.nnzb,
                                    out.mutable_data_ptr(), ws.mutable_data_ptr(), B, M, K,
                                    int(br), int(bc), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> grow_topk_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                  const at::Tensor& exclude, int64_t k,
                                                  const std::optional<at::Tensor>& counter,
                                                  double bonus_scale, double eps, int64_t br,
                                                  int64_t bc) {
  const char* op = "sparsekern::_grow_topk";
  check_pair(op, dy, x);
  check_block(op, br, bc);
  const int64_t B = x.size(0), M = dy.size(1), K = x.size(1);
  const DType dt = kernel_dtype(op, x, /*allow_double=*/false);
  const kmath::GrowGeom geo = kmath::grow_geom(M, K, int(br), int(bc));
  const int64_t n = geo.nsr * geo.nsc;
  SK_CHECK_BOOL(op, exclude);
  SK_CHECK_SAME_DEVICE(op, exclude, x);
  TORCH_CHECK(exclude.numel() == n, op, ": exclude must have one entry per score ([", geo.nsr,
              ", ", geo.nsc, "] for block size (", br, ", ", bc, ")), got shape ",
              exclude.sizes());
  TORCH_CHECK(n <= int64_t(kmath::kIdxMask) + 1, op, ": at most 2^31 scores per call, got ", n,
              " (split the layer into row panels)");
  sk::check_k(op, k);
  at::Tensor counter_f;
  if (counter.has_value()) {
    SK_CHECK_SAME_DEVICE(op, (*counter), x);
    TORCH_CHECK(counter->numel() == n, op, ": counter must have one entry per score ([", geo.nsr,
                ", ", geo.nsc, "]), got shape ", counter->sizes());
    counter_f = counter->to(at::kFloat).contiguous();
  }
  c10::cuda::CUDAGuard guard(x.device());
  const auto idx_opts = x.options().dtype(at::kLong);
  at::Tensor flat = at::empty({k}, idx_opts);
  at::Tensor scores = at::empty({k}, x.options().dtype(at::kFloat));
  if (k == 0) return {flat, scores};
  TORCH_CHECK_VALUE(k <= n, op, ": k=", k, " exceeds the ", n, " scores");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous(), exc = exclude.contiguous();
  const int64_t tiles = cuda::grow_topk_tiles(M, K, int(br), int(bc));
  const int64_t cand_cap = std::min<int64_t>(std::max<int64_t>(k, int64_t(1) << 16), n);
  at::Tensor hist = at::zeros({kmath::kHistBins}, x.options().dtype(at::kInt));
  at::Tensor counters = at::zeros({2}, x.options().dtype(at::kInt));
  at::Tensor minmax = at::empty({2 * tiles}, idx_opts);
  at::Tensor above = at::empty({k}, idx_opts);
  at::Tensor cand = at::empty({cand_cap}, idx_opts);

  cuda::GrowPassArgs a;
  a.dy = dyc.const_data_ptr();
  a.x = xc.const_data_ptr();
  a.exclude = bool_ptr(exc);
  a.counter = counter_f.defined() ? counter_f.const_data_ptr<float>() : nullptr;
  a.bonus_scale = static_cast<float>(bonus_scale);
  a.eps = static_cast<float>(eps);
  a.B = B;
  a.M = M;
  a.K = K;
  a.br = int(br);
  a.bc = int(bc);
  a.hist = reinterpret_cast<uint32_t*>(hist.mutable_data_ptr<int32_t>());
  a.tile_minmax = reinterpret_cast<unsigned long long*>(minmax.mutable_data_ptr<int64_t>());
  a.above = reinterpret_cast<unsigned long long*>(above.mutable_data_ptr<int64_t>());
  a.above_cap = uint32_t(k);
  a.cand = reinterpret_cast<unsigned long long*>(cand.mutable_data_ptr<int64_t>());
  a.cand_cap = uint32_t(cand_cap);
  a.counters = reinterpret_cast<uint32_t*>(counters.mutable_data_ptr<int32_t>());

  // Radix select: histogram passes until the bucket holding the k-th score fits the buffer.
  kmath::SelectState st = kmath::select_init(uint64_t(k));
  a.pass = kmath::kPassFirst;
  a.prefix = st.prefix;
  a.shift = st.shift;
  a.width = st.width;
  C10_CUDA_CHECK(cuda::launch_grow_topk_pass(dt, a, stream));
  for (;;) {
    const at::Tensor h = hist.to(at::kCPU);  // waits for the pass
    const int r = kmath::select_advance(
        &st, reinterpret_cast<const uint32_t*>(h.const_data_ptr<int32_t>()), uint64_t(cand_cap));
    TORCH_CHECK_VALUE(r != kmath::kSelectTooFew, "grow_topk: k=", k, " exceeds the ", st.total,
                      " entries not excluded");
    TORCH_CHECK(r != kmath::kSelectInconsistent, op,
                ": internal error: scores were not reproduced exactly across passes");
    if (r == kmath::kSelectEmit) break;
    hist.zero_();
    a.pass = kmath::kPassRefine;
    a.prefix = st.prefix;
    a.shift = st.shift;
    a.width = st.width;
    C10_CUDA_CHECK(cuda::launch_grow_topk_pass(dt, a, stream));
  }
  a.pass = kmath::kPassEmit;
  a.prefix = st.prefix;
  a.shift = st.shift;
  a.width = kmath::kDigitBits;
  C10_CUDA_CHECK(cuda::launch_grow_topk_pass(dt, a, stream));
  const at::Tensor cnt = counters.to(at::kCPU);
  const int32_t* c = cnt.const_data_ptr<int32_t>();
  TORCH_CHECK(uint64_t(uint32_t(c[0])) == st.above && uint64_t(uint32_t(c[1])) == st.bucket, op,
              ": internal error: emitted ", uint32_t(c[0]), " + ", uint32_t(c[1]),
              " composites, expected ", st.above, " + ", st.bucket);

  // Finish: the top `need` of the (distinct) bucket candidates join the entries above it;
  // composites sorted descending = scores descending, ties to the lower flat index.
  const at::Tensor chosen = std::get<0>(
      at::topk(cand.narrow(0, 0, int64_t(st.bucket)), int64_t(st.need), 0, true, false));
  const at::Tensor all = at::cat({above.narrow(0, 0, int64_t(st.above)), chosen});
  const at::Tensor sorted = std::get<0>(all.sort(0, /*descending=*/true));
  C10_CUDA_CHECK(cuda::launch_decode_composites(
      reinterpret_cast<const unsigned long long*>(sorted.const_data_ptr<int64_t>()), k,
      flat.mutable_data_ptr<int64_t>(), scores.mutable_data_ptr<float>(), stream));
  return {flat, scores};
}

// sddmm and grow_topk: two kernel passes over dy/x, neither writes the dense gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_weight_grad_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask, at::TensorList topo,
    int64_t br, int64_t bc, const at::Tensor& exclude, int64_t k,
    const std::optional<at::Tensor>& counter, double bonus_scale, double eps) {
  at::Tensor vals = sddmm_cuda(dy, x, mask, topo, br, bc);
  auto [flat, scores] = grow_topk_cuda(dy, x, exclude, k, counter, bonus_scale, eps, br, bc);
  return {vals, flat, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("_bsr_mm", TORCH_FN(bsr_mm_cuda));
  m.impl("_bsr_mm_t", TORCH_FN(bsr_mm_t_cuda));
  m.impl("_sddmm", TORCH_FN(sddmm_cuda));
  m.impl("_grow_topk", TORCH_FN(grow_topk_cuda));
  m.impl("_fused_weight_grad", TORCH_FN(fused_weight_grad_cuda));
}

}  // namespace sparsekern
