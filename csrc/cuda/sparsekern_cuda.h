// Raw-pointer launchers of the sparsekern CUDA kernels (implemented in csrc/cuda/*.cu).
//
// Every launcher enqueues on `stream`, never synchronises, and returns the launch status.
// All tensors are contiguous, on the current device; index tensors are int32 (the topology of
// sparsekern/topology.py: CSR row_ptr/col_idx, CSC col_ptr/row_idx and slot_t = CSR slot of
// each CSC entry); `mask` is bool stored as one byte per entry. Shapes use the 2-D view:
// x [B, K], dy [B, M], weight [M, K] (dense layout) or values [nnzb, br, bc] (bsr layout).
// Products accumulate in fp32 (fp64 for fp64 inputs).
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

namespace sparsekern {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// y [B, M] = x [B, K] @ (W ⊙ mask)ᵀ, skipping inactive blocks (rows without blocks get zeros).
cudaError_t launch_bsr_mm(DType dtype, const void* x, const void* w, bool w_is_bsr,
                          const uint8_t* mask, const int32_t* row_ptr, const int32_t* col_idx,
                          void* y, int64_t B, int64_t M, int64_t K, int br, int bc,
                          cudaStream_t stream);

// dx [B, K] = dy [B, M] @ (W ⊙ mask), walking block columns through the CSC view.
cudaError_t launch_bsr_mm_t(DType dtype, const void* dy, const void* w, bool w_is_bsr,
                            const uint8_t* mask, const int32_t* col_ptr, const int32_t* row_idx,
                            const int32_t* slot_t, void* dx, int64_t B, int64_t M, int64_t K,
                            int br, int bc, cudaStream_t stream);

// Bytes of device workspace launch_sddmm needs (int32 chunk pointers, one per block row + 1).
size_t sddmm_workspace_bytes(int64_t nbr);

// out [nnzb, br, bc] = (dyᵀ x) ⊙ mask on the active blocks (zero where a block passes the edge).
cudaError_t launch_sddmm(DType dtype, const void* dy, const void* x, const uint8_t* mask,
                         const int32_t* row_ptr, const int32_t* col_idx, int64_t nnzb, void* out,
                         void* workspace, int64_t B, int64_t M, int64_t K, int br, int bc,
                         cudaStream_t stream);

// One pass of the exact growth top-k (see kernel_math.cuh, "radix select"). Scores are
// recomputed from dy and x in every pass (never stored); pass kPassFirst histograms the top
// digit of every valid composite and records each tile's [min, max] composite, kPassRefine
// histograms the next `width` bits inside the bucket (prefix, shift), kPassEmit appends the
// composites above the bucket to `above` and those in it to `cand` (counters[0], counters[1]).
struct GrowPassArgs {
  const void* dy;          // [B, M]
  const void* x;           // [B, K]
  const uint8_t* exclude;  // [nsr, nsc] bool: entries (or blocks) that may not be chosen
  const float* counter;    // [nsr, nsc] fp32 or nullptr (no bonus)
  float bonus_scale;
  float eps;
  int64_t B, M, K;
  int br, bc;
  int pass;                // kmath::GrowPass
  uint64_t prefix;
  int shift, width;
  uint32_t* hist;                  // [2048], zeroed before a histogram pass
  unsigned long long* tile_minmax; // [2 * tiles]
  unsigned long long* above;       // [above_cap]
  uint32_t above_cap;
  unsigned long long* cand;        // [cand_cap]
  uint32_t cand_cap;
  uint32_t* counters;              // [2], zeroed before the emission pass
};

int64_t grow_topk_tiles(int64_t M, int64_t K, int br, int bc);
cudaError_t launch_grow_topk_pass(DType dtype, const GrowPassArgs& args, cudaStream_t stream);

// Decode n sorted composites into flat indices (int64) and fp32 scores.
cudaError_t launch_decode_composites(const unsigned long long* composites, int64_t n,
                                     int64_t* flat, float* scores, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsekern
