// Device-side building blocks shared by the sparsekern CUDA kernels (nvcc only): element
// conversions, the register-tiled shared-memory outer-product step, warp-aggregated appends.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace sparsekern {
namespace cudak {

constexpr int kThreads = 256;  // every kernel runs 256 threads per program

// ----------------------------------------------------------------------------- conversions
template <typename Acc> __device__ __forceinline__ Acc to_acc(float v) { return Acc(v); }
template <typename Acc> __device__ __forceinline__ Acc to_acc(double v) { return Acc(v); }
template <typename Acc> __device__ __forceinline__ Acc to_acc(__half v) {
  return Acc(__half2float(v));
}
template <typename Acc> __device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) {
  return Acc(__bfloat162float(v));
}

template <typename T> struct FromAcc;
template <> struct FromAcc<float> {
  __device__ __forceinline__ static float cvt(float v) { return v; }
};
template <> struct FromAcc<double> {
  __device__ __forceinline__ static double cvt(double v) { return v; }
};
template <> struct FromAcc<__half> {
  __device__ __forceinline__ static __half cvt(float v) { return __float2half_rn(v); }
};
template <> struct FromAcc<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};

// Accumulation type: fp64 for fp64 inputs, fp32 otherwise (as the reference).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// ----------------------------------------------------------------------------- tile step
// One program computes a P x Q output tile: C[p][q] += sum_kk sP[kk][p] * sQ[kk][q] over a
// staged reduction chunk of KC. Thread (tp, tq) owns the MP x MQ outputs
// p = tp + a * NP, q = tq + c * NQ (strided, so a warp reads consecutive shared words).
// Both tiles are stored reduction-major with one word of padding per row.
template <int P, int Q, int MP, int MQ>
struct TileShape {
  static constexpr int NP = P / MP;
  static constexpr int NQ = Q / MQ;
  static_assert(NP * MP == P && NQ * MQ == Q, "tile must split evenly");
  static_assert(NP * NQ == kThreads, "tile must use every thread once");
  static constexpr int PP = P + 1;  // padded row lengths of the shared tiles
  static constexpr int QP = Q + 1;
};

template <int P, int Q, int MP, int MQ, int KC, typename Acc>
__device__ __forceinline__ void tile_step(const Acc (*sP)[P + 1], const Acc (*sQ)[Q + 1],
                                          Acc (&acc)[MP][MQ], int tp, int tq) {
  using S = TileShape<P, Q, MP, MQ>;
#pragma unroll 4
  for (int kk = 0; kk < KC; ++kk) {
    Acc a[MP], b[MQ];
#pragma unroll
    for (int i = 0; i < MP; ++i) a[i] = sP[kk][tp + i * S::NP];
#pragma unroll
    for (int j = 0; j < MQ; ++j) b[j] = sQ[kk][tq + j * S::NQ];
#pragma unroll
    for (int i = 0; i < MP; ++i)
#pragma unroll
      for (int j = 0; j < MQ; ++j) acc[i][j] = fma_acc(a[i], b[j], acc[i][j]);
  }
}

// ----------------------------------------------------------------------------- appends
// Warp-aggregated append: every lane of the warp must call it (warp-uniform control flow).
// Slots past `cap` are counted but not written (the host checks the counter).
__device__ __forceinline__ void warp_append(bool pred, unsigned long long value,
                                            unsigned long long* buf, uint32_t cap,
                                            uint32_t* counter) {
  const unsigned mask = __ballot_sync(0xffffffffu, pred);
  if (mask == 0u) return;
  const int lane = threadIdx.x & 31;
  const int leader = __ffs(mask) - 1;
  uint32_t base = 0;
  if (lane == leader) base = atomicAdd(counter, uint32_t(__popc(mask)));
  base = __shfl_sync(0xffffffffu, base, leader);
  if (pred) {
    const uint32_t pos = base + uint32_t(__popc(mask & ((1u << lane) - 1u)));
    if (pos < cap) buf[pos] = value;
  }
}

}  // namespace cudak
}  // namespace sparsekern
