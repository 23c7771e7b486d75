// Exact growth top-k without the dense gradient: radix select with GEMM recomputation.
//
// Score s = |G| (unstructured) or the block mean of |G| (block_size != (1, 1)), plus
// bonus_scale / (counter + eps) when a counter is given, where G = dyᵀ x is never stored: every
// pass recomputes its score tiles in registers. Each score becomes a distinct 63-bit composite
// key (kmath::composite: order-preserving key of s, NaN highest, then the complement of the flat
// index, so ties go to the lower index). The host drives an MSD radix select over the composites
// (kmath::select_advance):
//   pass kPassFirst  : histogram of the top 11 bits of every valid composite + each tile's
//                      [min, max] composite (16 B per tile);
//   pass kPassRefine : histogram of the next bits inside the chosen bucket (only when the bucket
//                      overflows the candidate buffer; tiles that cannot reach it exit at once);
//   pass kPassEmit   : append the composites above the bucket (exactly `above` of them, <= k) and
//                      the bucket's (<= cand_cap) through warp-aggregated atomics.
// The host finishes with a top-k of the distinct candidates and a sort. Scores are bit-identical
// in every pass: one kernel per dtype/mode for all passes, fixed-order fp32 accumulation, no
// split-K, no float atomics (block sums are reduced in a fixed order in shared memory).
// Memory: 8 KB histogram + 16 B per tile + 8 B * (k + cand_cap).
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

using cuda::GrowPassArgs;
using kmath::GrowGeom;

constexpr int TS = kmath::kGrowTile;  // 64 x 64 elements of G per GEMM sub-tile
constexpr int KB = 32;                // batch rows staged per step
constexpr int MP = 4, MQ = 4;
using GS = TileShape<TS, TS, MP, MQ>;
constexpr int kMaxBlocksPerTile = TS * TS / 2;  // sr * sc when (br, bc) != (1, 1)

struct GemmSmem {
  float sP[KB][TS + 1];
  float sQ[KB][TS + 1];
};
union TileSmem {
  GemmSmem g;
  float abs_[TS][TS + 1];
};

// acc = G[m0 : m0 + 64, k0 : k0 + 64] = dy[:, m-range]ᵀ x[:, k-range], zero for m >= m_end or
// k >= k_end. Ends with a barrier when B > 0.
template <typename T>
__device__ __forceinline__ void score_gemm(const T* __restrict__ dy, const T* __restrict__ x,
                                           int64_t B, int64_t M, int64_t K, int64_t m0,
                                           int64_t m_end, int64_t k0, int64_t k_end,
                                           GemmSmem& sm, float (&acc)[MP][MQ], int tp, int tq) {
#pragma unroll
  for (int i = 0; i < MP; ++i)
#pragma unroll
    for (int j = 0; j < MQ; ++j) acc[i][j] = 0.0f;
  const int tid = threadIdx.x;
  for (int64_t b0 = 0; b0 < B; b0 += KB) {
    for (int e = tid; e < KB * TS; e += kThreads) {
      const int p = e % TS, kb = e / TS;
      const int64_t b = b0 + kb, m = m0 + p, k = k0 + p;
      sm.sP[kb][p] = (b < B && m < m_end) ? to_acc<float>(dy[b * M + m]) : 0.0f;
      sm.sQ[kb][p] = (b < B && k < k_end) ? to_acc<float>(x[b * K + k]) : 0.0f;
    }
    __syncthreads();
    tile_step<TS, TS, MP, MQ, KB, float>(sm.sP, sm.sQ, acc, tp, tq);
    __syncthreads();
  }
}

// Feed one score to the pass. Every thread of the warp must call it (warp-uniform loops).
__device__ __forceinline__ void consume(const GrowPassArgs& a, bool valid, float s, int64_t flat,
                                        uint32_t* s_hist, unsigned long long& lmin,
                                        unsigned long long& lmax) {
  const unsigned long long c = valid ? kmath::composite(kmath::float_key(s), uint64_t(flat)) : 0ull;
  if (a.pass == kmath::kPassEmit) {
    const int cls = valid ? kmath::emit_class(c, a.prefix, a.shift) : 0;
    warp_append(cls == 1, c, a.above, a.above_cap, a.counters);
    warp_append(cls == 2, c, a.cand, a.cand_cap, a.counters + 1);
  } else if (valid) {
    uint32_t d;
    if (kmath::hist_digit(c, a.prefix, a.shift, a.width, &d)) atomicAdd(&s_hist[d], 1u);
    lmin = c < lmin ? c : lmin;
    lmax = c > lmax ? c : lmax;
  }
}

// Scores of an unstructured super-tile: 64 x 64 entries straight from the GEMM registers.
template <typename T>
__device__ __forceinline__ void elem_tile(const GrowPassArgs& a, const GrowGeom& geo,
                                          int64_t tile, TileSmem& ts, uint32_t* s_hist,
                                          unsigned long long& lmin, unsigned long long& lmax) {
  const int tid = threadIdx.x;
  const int tp = tid / GS::NQ, tq = tid % GS::NQ;
  const int64_t m0 = (tile / geo.tiles_c) * TS, k0 = (tile % geo.tiles_c) * TS;
  float acc[MP][MQ];
  score_gemm<T>(static_cast<const T*>(a.dy), static_cast<const T*>(a.x), a.B, a.M, a.K, m0, a.M,
                k0, a.K, ts.g, acc, tp, tq);
#pragma unroll
  for (int i = 0; i < MP; ++i) {
#pragma unroll
    for (int j = 0; j < MQ; ++j) {
      const int64_t m = m0 + tp + i * GS::NP, k = k0 + tq + j * GS::NQ;
      const int64_t flat = m * a.K + k;
      bool valid = m < a.M && k < a.K;
      if (valid) valid = a.exclude[flat] == 0;
      float s = fabsf(acc[i][j]);
      if (valid && a.counter != nullptr)
        s = kmath::add_rn(s, kmath::growth_bonus(a.counter[flat], a.bonus_scale, a.eps));
      consume(a, valid, s, flat, s_hist, lmin, lmax);
    }
  }
}

// Scores of a block super-tile: sr x sc whole blocks. Their element rectangle is covered by
// 64 x 64 GEMM sub-tiles in a fixed order; |G| of a sub-tile goes to shared memory, is summed
// per (row, block column) segment, then per block over rows, into s_block — each sum by one
// thread in a fixed order, so the result does not depend on scheduling.
template <typename T>
__device__ __forceinline__ void block_tile(const GrowPassArgs& a, const GrowGeom& geo,
                                           int64_t tile, TileSmem& ts, uint32_t* s_hist,
                                           unsigned long long& lmin, unsigned long long& lmax) {
  __shared__ float s_rows[TS][kmath::kMaxSegs];
  __shared__ float s_block[kMaxBlocksPerTile];
  const int tid = threadIdx.x;
  const int tp = tid / GS::NQ, tq = tid % GS::NQ;
  const int br = a.br, bc = a.bc;
  const int SR = geo.sr, SC = geo.sc;
  const int64_t gr0 = (tile / geo.tiles_c) * SR, gc0 = (tile % geo.tiles_c) * SC;
  const int64_t row_base = gr0 * br, col_base = gc0 * bc;
  const int ER = SR * br, EC = SC * bc;  // element extent of the super-tile
  const int64_t row_lim = kmath::min64(a.M, row_base + ER);
  const int64_t col_lim = kmath::min64(a.K, col_base + EC);

  for (int i = tid; i < SR * SC; i += kThreads) s_block[i] = 0.0f;

  for (int i0 = 0; i0 < ER; i0 += TS) {
    if (row_base + i0 >= a.M) break;
    for (int j0 = 0; j0 < EC; j0 += TS) {
      if (col_base + j0 >= a.K) break;
      __syncthreads();  // previous sub-tile's readers of ts / s_rows are done
      float acc[MP][MQ];
      score_gemm<T>(static_cast<const T*>(a.dy), static_cast<const T*>(a.x), a.B, a.M, a.K,
                    row_base + i0, row_lim, col_base + j0, col_lim, ts.g, acc, tp, tq);
#pragma unroll
      for (int i = 0; i < MP; ++i)
#pragma unroll
        for (int j = 0; j < MQ; ++j) {
          const int p = tp + i * GS::NP, q = tq + j * GS::NQ;
          const bool in = row_base + i0 + p < row_lim && col_base + j0 + q < col_lim;
          ts.abs_[p][q] = in ? fabsf(acc[i][j]) : 0.0f;
        }
      __syncthreads();
      int cb0, nseg, rb0, nrb;
      kmath::sub_segments(j0, EC, bc, &cb0, &nseg);
      kmath::sub_segments(i0, ER, br, &rb0, &nrb);
      if (bc > 1) {
        for (int item = tid; item < TS * nseg; item += kThreads) {
          const int lr = item / nseg, sg = item % nseg;
          int lo, hi;
          kmath::segment_range(cb0 + sg, j0, bc, &lo, &hi);
          float sum = 0.0f;
          for (int q = lo; q < hi; ++q) sum = kmath::add_rn(sum, ts.abs_[lr][q]);
          s_rows[lr][sg] = sum;
        }
        __syncthreads();
      }
      for (int item = tid; item < nrb * nseg; item += kThreads) {
        const int rs = item / nseg, sg = item % nseg;
        int lo, hi;
        kmath::segment_range(rb0 + rs, i0, br, &lo, &hi);
        float sum = 0.0f;
        for (int p = lo; p < hi; ++p)
          sum = kmath::add_rn(sum, bc > 1 ? s_rows[p][sg] : ts.abs_[p][sg]);
        float& dst = s_block[(rb0 + rs) * SC + cb0 + sg];
        dst = kmath::add_rn(dst, sum);
      }
    }
  }
  __syncthreads();

  const int64_t nbr = geo.nsr, nbc = geo.nsc;
  for (int base = 0; base < SR * SC; base += kThreads) {
    const int idx = base + tid;
    const int64_t gbr = gr0 + idx / SC, gbc = gc0 + idx % SC;
    const int64_t flat = gbr * nbc + gbc;
    bool valid = idx < SR * SC && gbr < nbr && gbc < nbc;
    if (valid) valid = a.exclude[flat] == 0;
    float s = 0.0f;
    if (valid) {
      s = kmath::block_mean(s_block[idx], kmath::block_extent(a.M, br, gbr),
                            kmath::block_extent(a.K, bc, gbc));
      if (a.counter != nullptr)
        s = kmath::add_rn(s, kmath::growth_bonus(a.counter[flat], a.bonus_scale, a.eps));
    }
    consume(a, valid, s, flat, s_hist, lmin, lmax);
  }
}

template <typename T, bool BLOCK>
__global__ void __launch_bounds__(kThreads) grow_topk_kernel(GrowPassArgs a, GrowGeom geo) {
  __shared__ TileSmem ts;
  __shared__ uint32_t s_hist[kmath::kHistBins];
  __shared__ unsigned long long s_min, s_max;
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x;

  if (a.pass != kmath::kPassFirst) {  // prune tiles that cannot reach the bucket
    const unsigned long long tmin = a.tile_minmax[2 * tile], tmax = a.tile_minmax[2 * tile + 1];
    const bool go = a.pass == kmath::kPassEmit
                        ? kmath::tile_may_emit(tmin, tmax, a.prefix, a.shift)
                        : kmath::tile_may_hist(tmin, tmax, a.prefix, a.shift);
    if (!go) return;
  }
  const bool hist_pass = a.pass != kmath::kPassEmit;
  const int nbins = 1 << a.width;
  if (hist_pass) {
    for (int i = tid; i < nbins; i += kThreads) s_hist[i] = 0u;
  }
  if (tid == 0) {
    s_min = ~0ull;
    s_max = 0ull;
  }
  __syncthreads();

  unsigned long long lmin = ~0ull, lmax = 0ull;
  if constexpr (BLOCK) {
    block_tile<T>(a, geo, tile, ts, s_hist, lmin, lmax);
  } else {
    elem_tile<T>(a, geo, tile, ts, s_hist, lmin, lmax);
  }

  if (!hist_pass) return;
  if (a.pass == kmath::kPassFirst && lmin <= lmax) {
    atomicMin(&s_min, lmin);
    atomicMax(&s_max, lmax);
  }
  __syncthreads();
  for (int i = tid; i < nbins; i += kThreads) {
    const uint32_t n = s_hist[i];
    if (n != 0u) atomicAdd(&a.hist[i], n);
  }
  if (a.pass == kmath::kPassFirst && tid == 0) {
    a.tile_minmax[2 * tile] = s_min;
    a.tile_minmax[2 * tile + 1] = s_max;
  }
}

__global__ void decode_kernel(const unsigned long long* __restrict__ comp, int64_t n,
                              int64_t* __restrict__ flat, float* __restrict__ scores) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const unsigned long long c = comp[i];
    flat[i] = kmath::composite_flat(c);
    scores[i] = kmath::key_float(kmath::composite_key(c));
  }
}

template <typename T>
cudaError_t run_grow(const GrowPassArgs& a, cudaStream_t stream) {
  const GrowGeom geo = kmath::grow_geom(a.M, a.K, a.br, a.bc);
  const int64_t tiles = geo.tiles_r * geo.tiles_c;
  if (tiles == 0) return cudaSuccess;
  if (tiles > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (geo.block) {
    grow_topk_kernel<T, true><<<unsigned(tiles), kThreads, 0, stream>>>(a, geo);
  } else {
    grow_topk_kernel<T, false><<<unsigned(tiles), kThreads, 0, stream>>>(a, geo);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace cudak

namespace cuda {

int64_t grow_topk_tiles(int64_t M, int64_t K, int br, int bc) {
  const kmath::GrowGeom geo = kmath::grow_geom(M, K, br, bc);
  return geo.tiles_r * geo.tiles_c;
}

cudaError_t launch_grow_topk_pass(DType dtype, const GrowPassArgs& args, cudaStream_t stream) {
  if (args.br < 1 || args.bc < 1 || args.B < 0 || args.M < 0 || args.K < 0) {
    return cudaErrorInvalidValue;
  }
  if (args.pass < kmath::kPassFirst || args.pass > kmath::kPassEmit || args.shift < 0 ||
      args.shift > kmath::kCompositeBits || args.width < 1 || args.width > kmath::kDigitBits ||
      (args.pass != kmath::kPassEmit && args.width > args.shift)) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DType::kFloat32: return cudak::run_grow<float>(args, stream);
    case DType::kFloat16: return cudak::run_grow<__half>(args, stream);
    case DType::kBFloat16: return cudak::run_grow<__nv_bfloat16>(args, stream);
    case DType::kFloat64: break;  // fp64 scores would need 64-bit keys: not supported
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_decode_composites(const unsigned long long* composites, int64_t n,
                                     int64_t* flat, float* scores, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = kmath::min64(kmath::ceil_div(n, threads), 4096);
  cudak::decode_kernel<<<unsigned(blocks), threads, 0, stream>>>(composites, n, flat, scores);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparsekern
