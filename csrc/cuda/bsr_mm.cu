// Block-sparse forward (y = x @ (W ⊙ mask)ᵀ) and grad_input (dx = dy @ (W ⊙ mask)).
//
// One kernel template serves both: a program per (batch tile, block line, output chunk), where
// the block line is a block row of W (forward, CSR view) or a block column (grad_input, CSC view
// with slot indirection, so no data is transposed). The reduction runs over the line's active
// blocks laid end to end (kmath::fwd_entry / t_entry), staged KC at a time in shared memory:
// the activation tile sA[KC][P] and the masked weight tile sW[KC][Q], converted to the fp32
// (fp64) accumulation type on load; each thread accumulates an MP x MQ register tile. Lines
// without active blocks store zeros. Block sizes of any shape, ragged edges, 1x1 included.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "kernel_math.cuh"
#include "sparsekern_cuda.h"
#include "tile_common.cuh"

namespace sparsekern {
namespace cudak {
namespace {

using kmath::OutIdx;
using kmath::RedEntry;

// act   [B, act_ld]: x (forward, act_ld = K) or dy (transposed, act_ld = M)
// w     [M, K] (dense) or [nnzb, br, bc] (bsr); mask [M, K]
// ptr/idx: row_ptr/col_idx (forward) or col_ptr/row_idx (+ slot_t) (transposed)
// out   [B, out_ld]: y (out_ld = M) or dx (out_ld = K)
// __launch_bounds__(256, 2) caps registers at 128: without the minimum, ptxas (CUDA 13) spills
// the fp64 variants on sm_90 at ~80 registers.
template <typename T, int P, int Q, int MP, int MQ, int KC, bool TRANS>
__global__ void __launch_bounds__(kThreads, 2)
spmm_kernel(const T* __restrict__ act, const T* __restrict__ w, int w_is_bsr,
            const uint8_t* __restrict__ mask, const int32_t* __restrict__ ptr,
            const int32_t* __restrict__ idx, const int32_t* __restrict__ slot_t,
            T* __restrict__ out, int64_t B, int64_t M, int64_t K, int br, int bc,
            int64_t n_btiles, int n_ochunks) {
  using Acc = typename AccOf<T>::type;
  using S = TileShape<P, Q, MP, MQ>;
  __shared__ Acc sA[KC][P + 1];
  __shared__ Acc sW[KC][Q + 1];
  __shared__ int64_t sAct[KC], sWb[KC], sMb[KC];
  __shared__ int64_t sOut[Q], sWq[Q], sMq[Q];

  const int tid = threadIdx.x;
  const int tp = tid / S::NQ, tq = tid % S::NQ;
  const int64_t cta = blockIdx.x;
  const int64_t bt = cta % n_btiles;
  const int64_t rest = cta / n_btiles;
  const int oc = int(rest % n_ochunks);
  const int64_t line = rest / n_ochunks;  // block row (forward) or block column (transposed)
  const bool bsr = w_is_bsr != 0;
  const int rdim = TRANS ? br : bc;       // reduction length contributed by one block
  const int64_t act_ld = TRANS ? M : K;
  const int64_t out_ld = TRANS ? K : M;
  const int64_t b0 = bt * P;

  for (int q = tid; q < Q; q += kThreads) {
    const int64_t o = int64_t(oc) * Q + q;
    const OutIdx oi = TRANS ? kmath::t_out(o, line, br, bc, M, K, bsr)
                            : kmath::fwd_out(o, line, br, bc, M, K, bsr);
    sOut[q] = oi.index;
    sWq[q] = oi.wq;
    sMq[q] = oi.mq;
  }
  __syncthreads();

  const int64_t begin = ptr[line];
  const int64_t len = (int64_t(ptr[line + 1]) - begin) * rdim;

  Acc acc[MP][MQ];
#pragma unroll
  for (int i = 0; i < MP; ++i)
#pragma unroll
    for (int j = 0; j < MQ; ++j) acc[i][j] = Acc(0);

  for (int64_t v0 = 0; v0 < len; v0 += KC) {
    if (tid < KC) {
      const RedEntry e = TRANS
          ? kmath::t_entry(v0 + tid, len, begin, idx, slot_t, line, br, bc, M, K, bsr)
          : kmath::fwd_entry(v0 + tid, len, begin, idx, br, bc, K, bsr);
      sAct[tid] = e.act;
      sWb[tid] = e.wbase;
      sMb[tid] = e.mbase;
    }
    __syncthreads();

    // Activations: consecutive threads walk the reduction axis (contiguous within a block).
    for (int e = tid; e < KC * P; e += kThreads) {
      const int t = e % KC, p = e / KC;
      const int64_t b = b0 + p;
      const int64_t a = sAct[t];
      sA[t][p] = (b < B && a >= 0) ? to_acc<Acc>(act[b * act_ld + a]) : Acc(0);
    }
    // Weights: forward walks the reduction axis fastest (w's contiguous axis there), transposed
    // walks the outputs fastest (contiguous along k in both layouts).
    for (int e = tid; e < KC * Q; e += kThreads) {
      const int t = TRANS ? e / Q : e % KC;
      const int q = TRANS ? e % Q : e / KC;
      Acc val = Acc(0);
      if (sAct[t] >= 0 && sOut[q] >= 0) {
        // W ⊙ mask, as the reference (w * mask.to(w.dtype))
        val = to_acc<Acc>(w[sWb[t] + sWq[q]]) * Acc(mask[sMb[t] + sMq[q]] ? 1 : 0);
      }
      sW[t][q] = val;
    }
    __syncthreads();
    tile_step<P, Q, MP, MQ, KC, Acc>(sA, sW, acc, tp, tq);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < MP; ++i) {
    const int64_t b = b0 + tp + i * S::NP;
    if (b >= B) continue;
#pragma unroll
    for (int j = 0; j < MQ; ++j) {
      const int64_t o = sOut[tq + j * S::NQ];
      if (o >= 0) out[b * out_ld + o] = FromAcc<T>::cvt(acc[i][j]);
    }
  }
}

template <typename T, int P, int Q, int MP, int MQ, bool TRANS>
cudaError_t run_spmm(const void* act, const void* w, bool w_is_bsr, const uint8_t* mask,
                     const int32_t* ptr, const int32_t* idx, const int32_t* slot_t, void* out,
                     int64_t B, int64_t M, int64_t K, int br, int bc, int64_t n_lines,
                     cudaStream_t stream) {
  constexpr int KC = sizeof(typename AccOf<T>::type) == 8 ? 16 : 32;
  const int odim = TRANS ? bc : br;
  const int64_t n_btiles = kmath::ceil_div(B, P);
  const int64_t n_ochunks = kmath::ceil_div(odim, Q);
  const int64_t grid = n_btiles * n_ochunks * n_lines;
  if (grid == 0) return cudaSuccess;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  spmm_kernel<T, P, Q, MP, MQ, KC, TRANS><<<unsigned(grid), kThreads, 0, stream>>>(
      static_cast<const T*>(act), static_cast<const T*>(w), w_is_bsr ? 1 : 0, mask, ptr, idx,
      slot_t, static_cast<T*>(out), B, M, K, br, bc, n_btiles, int(n_ochunks));
  return cudaGetLastError();
}

template <typename T, bool TRANS>
cudaError_t dispatch_spmm(const void* act, const void* w, bool w_is_bsr, const uint8_t* mask,
                          const int32_t* ptr, const int32_t* idx, const int32_t* slot_t,
                          void* out, int64_t B, int64_t M, int64_t K, int br, int bc,
                          cudaStream_t stream) {
  const int64_t n_lines = TRANS ? kmath::ceil_div(K, bc) : kmath::ceil_div(M, br);
  switch (kmath::spmm_config(TRANS ? bc : br)) {
    case 0:
      return run_spmm<T, 64, 64, 4, 4, TRANS>(act, w, w_is_bsr, mask, ptr, idx, slot_t, out, B,
                                              M, K, br, bc, n_lines, stream);
    case 1:
      return run_spmm<T, 128, 16, 4, 2, TRANS>(act, w, w_is_bsr, mask, ptr, idx, slot_t, out, B,
                                               M, K, br, bc, n_lines, stream);
    case 2:
      return run_spmm<T, 256, 4, 4, 1, TRANS>(act, w, w_is_bsr, mask, ptr, idx, slot_t, out, B,
                                              M, K, br, bc, n_lines, stream);
    default:
      return run_spmm<T, 256, 1, 1, 1, TRANS>(act, w, w_is_bsr, mask, ptr, idx, slot_t, out, B,
                                              M, K, br, bc, n_lines, stream);
  }
}

template <bool TRANS>
cudaError_t dispatch_dtype(cuda::DType dtype, const void* act, const void* w, bool w_is_bsr,
                           const uint8_t* mask, const int32_t* ptr, const int32_t* idx,
                           const int32_t* slot_t, void* out, int64_t B, int64_t M, int64_t K,
                           int br, int bc, cudaStream_t stream) {
  if (br < 1 || bc < 1 || B < 0 || M < 0 || K < 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case cuda::DType::kFloat32:
      return dispatch_spmm<float, TRANS>(act, w, w_is_bsr, mask, ptr, idx, slot_t, out, B, M, K,
                                         br, bc, stream);
    case cuda::DType::kFloat16:
      return dispatch_spmm<__half, TRANS>(act, w, w_is_bsr, mask, ptr, idx, slot_t, out, B, M,
                                          K, br, bc, stream);
    case cuda::DType::kBFloat16:
      return dispatch_spmm<__nv_bfloat16, TRANS>(act, w, w_is_bsr, mask, ptr, idx, slot_t, out,
                                                 B, M, K, br, bc, stream);
    case cuda::DType::kFloat64:
      return dispatch_spmm<double, TRANS>(act, w, w_is_bsr, mask, ptr, idx, slot_t, out, B, M,
                                          K, br, bc, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace cudak

namespace cuda {

cudaError_t launch_bsr_mm(DType dtype, const void* x, const void* w, bool w_is_bsr,
                          const uint8_t* mask, const int32_t* row_ptr, const int32_t* col_idx,
                          void* y, int64_t B, int64_t M, int64_t K, int br, int bc,
                          cudaStream_t stream) {
  return cudak::dispatch_dtype<false>(dtype, x, w, w_is_bsr, mask, row_ptr, col_idx, nullptr, y,
                                      B, M, K, br, bc, stream);
}

cudaError_t launch_bsr_mm_t(DType dtype, const void* dy, const void* w, bool w_is_bsr,
                            const uint8_t* mask, const int32_t* col_ptr, const int32_t* row_idx,
                            const int32_t* slot_t, void* dx, int64_t B, int64_t M, int64_t K,
                            int br, int bc, cudaStream_t stream) {
  return cudak::dispatch_dtype<true>(dtype, dy, w, w_is_bsr, mask, col_ptr, row_idx, slot_t, dx,
                                     B, M, K, br, bc, stream);
}

}  // namespace cuda
}  // namespace sparsekern
