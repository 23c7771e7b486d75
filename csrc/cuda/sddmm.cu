// SDDMM on the active blocks: out[slot] = ((dyᵀ x) ⊙ mask)[block of slot], [nnzb, br, bc].
//
// Work list of row groups: a program per (chunk of Q virtual columns of a block row, chunk of P
// of the block's rows). A block row's active blocks are laid end to end (kmath::sddmm_col), so
// one dy panel [B, P] is loaded once per stage and multiplied with the gathered x columns of
// several blocks at once (or a long run of 1x1 entries); no program is spent on inactive blocks.
// The reduction over the batch is staged KB rows at a time in shared memory and accumulated in
// registers (fp32, fp64 for fp64). Programs are numbered through chunk_ptr, the prefix sum of the
// rows' chunk counts, built on the device by a one-program scan (no host sync: the grid is an
// upper bound and surplus programs exit). Entries past the matrix edge are stored as zeros.
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

constexpr int kScanThreads = 1024;

// chunk_ptr[0] = 0, chunk_ptr[r + 1] = sum_{r' <= r} ceil(nnz(r') * bc / tile_cols).
__global__ void __launch_bounds__(kScanThreads)
sddmm_chunks_kernel(const int32_t* __restrict__ row_ptr, int64_t nbr, int bc, int tile_cols,
                    int32_t* __restrict__ chunk_ptr) {
  __shared__ int32_t warp_sums[kScanThreads / 32];
  __shared__ int32_t carry;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {
    carry = 0;
    chunk_ptr[0] = 0;
  }
  __syncthreads();
  for (int64_t base = 0; base < nbr; base += kScanThreads) {
    const int64_t r = base + tid;
    int32_t v = 0;
    if (r < nbr) {
      v = int32_t(kmath::sddmm_row_chunks(int64_t(row_ptr[r + 1]) - row_ptr[r], bc, tile_cols));
    }
    // inclusive scan: within the warp, then across warp totals
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int32_t n = __shfl_up_sync(0xffffffffu, v, off);
      if (lane >= off) v += n;
    }
    if (lane == 31) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
      int32_t s = warp_sums[lane];
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int32_t n = __shfl_up_sync(0xffffffffu, s, off);
        if (lane >= off) s += n;
      }
      warp_sums[lane] = s;
    }
    __syncthreads();
    const int32_t incl = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + v;
    if (r < nbr) chunk_ptr[r + 1] = incl;
    __syncthreads();
    if (tid == kScanThreads - 1) carry = incl;
    __syncthreads();
  }
}

template <typename T, int P, int Q, int MP, int MQ, int KB>
__global__ void __launch_bounds__(kThreads)
sddmm_kernel(const T* __restrict__ dy, const T* __restrict__ x, const uint8_t* __restrict__ mask,
             const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ col_idx,
             const int32_t* __restrict__ chunk_ptr, T* __restrict__ out, int64_t B, int64_t M,
             int64_t K, int br, int bc, int64_t nbr, int n_rchunks) {
  using Acc = typename AccOf<T>::type;
  using S = TileShape<P, Q, MP, MQ>;
  __shared__ Acc sP[KB][P + 1];
  __shared__ Acc sQ[KB][Q + 1];
  __shared__ int64_t sRow[P];            // global row m of tile row p, -1 past the edge
  __shared__ int64_t sCol[Q], sOb[Q];    // kmath::SddmmCol of tile column q

  const int tid = threadIdx.x;
  const int tp = tid / S::NQ, tq = tid % S::NQ;
  const int64_t cta = blockIdx.x;
  const int rc = int(cta % n_rchunks);
  const int64_t work = cta / n_rchunks;
  if (work >= chunk_ptr[nbr]) return;  // surplus program of the upper-bound grid
  const int64_t r = kmath::find_row(chunk_ptr, nbr, work);
  const int64_t lc = work - chunk_ptr[r];
  const int64_t begin = row_ptr[r];
  const int64_t len = (int64_t(row_ptr[r + 1]) - begin) * bc;
  const int i0 = rc * P;

  for (int p = tid; p < P; p += kThreads) {
    const int64_t i = i0 + p;
    const int64_t m = r * br + i;
    sRow[p] = (i < br && m < M) ? m : -1;
  }
  for (int q = tid; q < Q; q += kThreads) {
    const kmath::SddmmCol c = kmath::sddmm_col(lc * Q + q, len, begin, col_idx, br, bc, K);
    sCol[q] = c.col;
    sOb[q] = c.obase;
  }
  __syncthreads();

  Acc acc[MP][MQ];
#pragma unroll
  for (int i = 0; i < MP; ++i)
#pragma unroll
    for (int j = 0; j < MQ; ++j) acc[i][j] = Acc(0);

  for (int64_t b0 = 0; b0 < B; b0 += KB) {
    for (int e = tid; e < KB * P; e += kThreads) {  // dy: contiguous along the block's rows
      const int p = e % P, kb = e / P;
      const int64_t b = b0 + kb, m = sRow[p];
      sP[kb][p] = (b < B && m >= 0) ? to_acc<Acc>(dy[b * M + m]) : Acc(0);
    }
    for (int e = tid; e < KB * Q; e += kThreads) {  // x: contiguous within each block
      const int q = e % Q, kb = e / Q;
      const int64_t b = b0 + kb, c = sCol[q];
      sQ[kb][q] = (b < B && c >= 0) ? to_acc<Acc>(x[b * K + c]) : Acc(0);
    }
    __syncthreads();
    tile_step<P, Q, MP, MQ, KB, Acc>(sP, sQ, acc, tp, tq);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < MP; ++i) {
    const int p = tp + i * S::NP;
    const int64_t bi = int64_t(i0) + p;  // row inside the block
    if (bi >= br) continue;
    const int64_t m = sRow[p];
#pragma unroll
    for (int j = 0; j < MQ; ++j) {
      const int q = tq + j * S::NQ;
      const int64_t ob = sOb[q], c = sCol[q];
      if (ob < 0) continue;
      Acc val = Acc(0);
      // (dyᵀ x) ⊙ mask, as the reference (g * mask); zero pad past the edge
      if (m >= 0 && c >= 0) val = acc[i][j] * Acc(mask[m * K + c] ? 1 : 0);
      out[ob + bi * bc] = FromAcc<T>::cvt(val);
    }
  }
}

template <typename T, int P, int Q, int MP, int MQ>
cudaError_t run_sddmm(const void* dy, const void* x, const uint8_t* mask, const int32_t* row_ptr,
                      const int32_t* col_idx, int64_t nnzb, void* out, int32_t* chunk_ptr,
                      int64_t B, int64_t M, int64_t K, int br, int bc, int64_t nbr,
                      cudaStream_t stream) {
  constexpr int KB = sizeof(typename AccOf<T>::type) == 8 ? 16 : 32;
  const int64_t chunks = kmath::sddmm_chunk_bound(nnzb, nbr, bc, Q);
  if (chunks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  sddmm_chunks_kernel<<<1, kScanThreads, 0, stream>>>(row_ptr, nbr, bc, Q, chunk_ptr);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t n_rchunks = kmath::ceil_div(br, P);
  const int64_t grid = chunks * n_rchunks;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  sddmm_kernel<T, P, Q, MP, MQ, KB><<<unsigned(grid), kThreads, 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), mask, row_ptr, col_idx, chunk_ptr,
      static_cast<T*>(out), B, M, K, br, bc, nbr, int(n_rchunks));
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_sddmm(const void* dy, const void* x, const uint8_t* mask,
                           const int32_t* row_ptr, const int32_t* col_idx, int64_t nnzb,
                           void* out, int32_t* chunk_ptr, int64_t B, int64_t M, int64_t K, int br,
                           int bc, cudaStream_t stream) {
  const int64_t nbr = kmath::ceil_div(M, br);
  switch (kmath::sddmm_config(br)) {
    case 0:
      return run_sddmm<T, 64, 64, 4, 4>(dy, x, mask, row_ptr, col_idx, nnzb, out, chunk_ptr, B,
                                        M, K, br, bc, nbr, stream);
    case 1:
      return run_sddmm<T, 16, 128, 2, 4>(dy, x, mask, row_ptr, col_idx, nnzb, out, chunk_ptr, B,
                                         M, K, br, bc, nbr, stream);
    case 2:
      return run_sddmm<T, 4, 256, 1, 4>(dy, x, mask, row_ptr, col_idx, nnzb, out, chunk_ptr, B,
                                        M, K, br, bc, nbr, stream);
    default:
      return run_sddmm<T, 1, 256, 1, 1>(dy, x, mask, row_ptr, col_idx, nnzb, out, chunk_ptr, B,
                                        M, K, br, bc, nbr, stream);
  }
}

}  // namespace
}  // namespace cudak

namespace cuda {

size_t sddmm_workspace_bytes(int64_t nbr) { return size_t(nbr + 1) * sizeof(int32_t); }

cudaError_t launch_sddmm(DType dtype, const void* dy, const void* x, const uint8_t* mask,
                         const int32_t* row_ptr, const int32_t* col_idx, int64_t nnzb, void* out,
                         void* workspace, int64_t B, int64_t M, int64_t K, int br, int bc,
                         cudaStream_t stream) {
  if (br < 1 || bc < 1 || B < 0 || M < 0 || K < 0 || nnzb < 0) return cudaErrorInvalidValue;
  if (nnzb == 0) return cudaSuccess;
  int32_t* chunk_ptr = static_cast<int32_t*>(workspace);
  switch (dtype) {
    case DType::kFloat32:
      return cudak::dispatch_sddmm<float>(dy, x, mask, row_ptr, col_idx, nnzb, out, chunk_ptr, B,
                                          M, K, br, bc, stream);
    case DType::kFloat16:
      return cudak::dispatch_sddmm<__half>(dy, x, mask, row_ptr, col_idx, nnzb, out, chunk_ptr,
                                           B, M, K, br, bc, stream);
    case DType::kBFloat16:
      return cudak::dispatch_sddmm<__nv_bfloat16>(dy, x, mask, row_ptr, col_idx, nnzb, out,
                                                  chunk_ptr, B, M, K, br, bc, stream);
    case DType::kFloat64:
      return cudak::dispatch_sddmm<double>(dy, x, mask, row_ptr, col_idx, nnzb, out, chunk_ptr,
                                           B, M, K, br, bc, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsekern
