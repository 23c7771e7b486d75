// Argument checks shared by the torch glue of every device: the CPU ops (csrc/cpu) and the CUDA
// glue (csrc/cuda/sparsekern_cuda.cpp). ATen only, no device code, so each glue includes it as
// "../checks.h". Limits that belong to one device's kernels (the CPU's 2^24 entries per block,
// CUDA's int32 indices) stay in that device's glue. Every message names the op, the argument,
// what was expected and what came.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#define SK_CHECK_CPU(op, t) \
  TORCH_CHECK((t).device().is_cpu(), op, ": " #t " must be a CPU tensor, got ", (t).device())
#define SK_CHECK_CUDA(op, t) \
  TORCH_CHECK((t).is_cuda(), op, ": " #t " must be a CUDA tensor, got one on ", (t).device())
// t on the same device as ref (the activation that decides where the op runs).
#define SK_CHECK_SAME_DEVICE(op, t, ref)                                                  \
  TORCH_CHECK((t).device() == (ref).device(), op, ": " #t " must be on ", (ref).device(), \
              " like " #ref ", got ", (t).device())
#define SK_CHECK_DIM(op, t, d) \
  TORCH_CHECK((t).dim() == (d), op, ": " #t " must be ", d, "-D, got shape ", (t).sizes())
#define SK_CHECK_DTYPE(op, t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), op, ": " #t " must be ", (dt), ", got ", (t).scalar_type())
#define SK_CHECK_BOOL(op, t) \
  TORCH_CHECK((t).scalar_type() == at::kBool, op, ": " #t " must be bool, got ", (t).scalar_type())
#define SK_CHECK_SAME_DTYPE(op, a, b) SK_CHECK_SAME_DTYPE_AS(op, a, #a, b, #b)
// For a helper whose local names differ from the schema's: an and bn are the schema names.
#define SK_CHECK_SAME_DTYPE_AS(op, a, an, b, bn)                                            \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), op, ": ", an, " and ", bn,           \
              " must have the same dtype, got ", (a).scalar_type(), " and ", (b).scalar_type())
#define SK_CHECK_SHAPE(op, t, ...)                                                            \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), op, ": " #t " must have shape ", \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())
#define SK_CHECK_BLOCK(op, br, bc)                                                           \
  TORCH_CHECK((br) >= 1 && (bc) >= 1, op, ": the block size br, bc must be >= 1, got br=", br, \
              ", bc=", bc)

namespace sk {

// The topology's tensors, in the order the ops take them.
inline constexpr const char* kTopoNames[5] = {"row_ptr", "col_idx", "col_ptr", "row_idx", "slot_t"};

// ceil(a / b) for a >= 0, b >= 1, without the overflow of (a + b - 1) / b.
inline int64_t cdiv(int64_t a, int64_t b) { return a > 0 ? (a - 1) / b + 1 : 0; }

// The topology list holds the 5 named tensors.
inline void check_topo_count(const char* op, at::TensorList topo) {
  TORCH_CHECK(topo.size() == 5, op,
              ": topo must be [row_ptr, col_idx, col_ptr, row_idx, slot_t] (5 tensors), got ",
              topo.size(), " tensors");
}

// Each topology tensor is 1-D, on `device`, and int32 (or int64 where `allow_int64`: the CPU
// ops narrow it after a range check).
inline void check_topo_tensors(const char* op, at::TensorList topo, const at::Device& device,
                               bool allow_int64) {
  for (size_t i = 0; i < 5; ++i) {
    const at::Tensor& t = topo[i];
    TORCH_CHECK(t.device() == device, op, ": topo ", kTopoNames[i], " must be on ", device,
                ", got ", t.device());
    TORCH_CHECK(t.dim() == 1, op, ": topo ", kTopoNames[i], " must be 1-D, got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kInt || (allow_int64 && t.scalar_type() == at::kLong), op,
                ": topo ", kTopoNames[i], allow_int64 ? " must be int32 or int64, got "
                                                      : " must be int32, got ",
                t.scalar_type());
  }
}

// The lengths of an [M, K] matrix's topology in (br, bc) blocks: ceil(M/br)+1 row_ptr and
// ceil(K/bc)+1 col_ptr entries, and one col_idx, row_idx and slot_t entry per block. Returns
// the number of blocks, nnzb. The values are checked by the device code that reads them.
inline int64_t check_topo_lengths(const char* op, at::TensorList topo, int64_t M, int64_t K,
                                  int64_t br, int64_t bc) {
  const int64_t nbr = cdiv(M, br), nbc = cdiv(K, bc), nnzb = topo[1].numel();
  TORCH_CHECK(topo[0].numel() == nbr + 1, op, ": topo row_ptr must have ceil(M/br)+1 = ",
              nbr + 1, " entries for M=", M, ", br=", br, ", got ", topo[0].numel());
  TORCH_CHECK(topo[2].numel() == nbc + 1, op, ": topo col_ptr must have ceil(K/bc)+1 = ",
              nbc + 1, " entries for K=", K, ", bc=", bc, ", got ", topo[2].numel());
  TORCH_CHECK(topo[3].numel() == nnzb && topo[4].numel() == nnzb, op,
              ": topo col_idx, row_idx and slot_t must have the same length, got ", nnzb, ", ",
              topo[3].numel(), ", ", topo[4].numel());
  return nnzb;
}

// The weight's layout: dense (w has the mask's shape; `dense_shape` says which, for the
// message) or bsr values [nnzb, br, bc] (3-D, the mask is not). Returns true for bsr.
inline bool check_weight_layout(const char* op, const at::Tensor& w, const at::Tensor& mask,
                                int64_t br, int64_t bc, const char* dense_shape) {
  TORCH_CHECK(w.dim() == mask.dim() || w.dim() == 3, op, ": w must be the ", dense_shape,
              " or the [nnzb, br, bc] block values, got shape ", w.sizes());
  if (w.dim() == mask.dim()) {
    TORCH_CHECK(w.sizes() == mask.sizes(), op, ": w must have the mask's shape ", mask.sizes(),
                ", got ", w.sizes());
    return false;
  }
  TORCH_CHECK(w.size(1) == br && w.size(2) == bc, op, ": w (bsr values) must be [nnzb, ", br,
              ", ", bc, "], got ", w.sizes());
  return true;
}

// The activation of bsr_mm (x [B, K], fwd) or bsr_mm_t (dy [B, M]) against the mask [M, K].
inline void check_activation_width(const char* op, const at::Tensor& act, bool fwd, int64_t M,
                                   int64_t K) {
  TORCH_CHECK(act.size(1) == (fwd ? K : M), op,
              fwd ? ": x must be [B, K] with K=" : ": dy must be [B, M] with M=", fwd ? K : M,
              fwd ? " (the mask's columns), got " : " (the mask's rows), got ", act.sizes());
}

// bsr values hold one block per topology entry.
inline void check_bsr_blocks(const char* op, const at::Tensor& w, bool bsr, int64_t nnzb) {
  TORCH_CHECK(!bsr || w.size(0) == nnzb, op, ": w (bsr values) has ", w.size(0),
              " blocks but the topology has ", nnzb);
}

// The number of entries a growth op selects.
inline void check_k(const char* op, int64_t k) {
  TORCH_CHECK_VALUE(k >= 0, op, ": k must be >= 0, got ", k);
}

// dy [B, M] and x [B, K] of a weight gradient share the batch.
inline void check_same_batch(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  TORCH_CHECK(dy.size(0) == x.size(0), op,
              ": dy [B, M] and x [B, K] must have the same batch, got ", dy.sizes(), " and ",
              x.sizes());
}

}  // namespace sk
