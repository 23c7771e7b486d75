// CPU microkernels, written once with GCC vector extensions and compiled per instruction set.
// Included by kern_avx512.cpp / kern_avx2.cpp / kern_generic.cpp between a
// `#pragma GCC target(...)` push/pop, with SK_NS (namespace) and SK_VW (floats per vector)
// defined, and SK_AVX512 set where AVX-512 intrinsics may be used. Everything here has
// internal linkage or lives in sk::SK_NS, and no std:: template is instantiated here, so no
// code compiled for one ISA can be picked up by the linker for another.
#include <cstdint>
#include <cstring>

#include "kern_api.h"

namespace sk {
namespace SK_NS {
namespace {

constexpr int VW = SK_VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));

inline vf vld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void vst(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
typedef int32_t vi __attribute__((vector_size(VW * 4)));
// Broadcast (`vf{} + s` would add 0.0f, which is not an identity for -0.0f).
inline vf vset1(float s) {
  vf v = {s};
  return __builtin_shuffle(v, vi{});
}

inline float bf2f(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float ldf(const void* p, bool bf16, int64_t i) {
  return bf16 ? bf2f(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// ------------------------------------------------------------------ lanes-orientation kernel
template <int R, int NVB>
void lanes_tile(int nseg, const int32_t* off, int depth, const float* xt, const float* wp,
                int64_t wss, int64_t wos, int64_t wts, float* out, int64_t ldo, bool accumulate) {
  constexpr int TB = NVB * VW;
  vf acc[R][NVB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NVB; ++v) acc[r][v] = accumulate ? vld(out + r * ldo + v * VW) : vf{};
  if (depth == 1) {
    // element masks: one weight per segment
    int s = 0;
    if (R == 1) {
      // one output row: alternate segments between two accumulator sets, so 2 * NVB
      // independent FMA chains cover the FMA latency
      vf acc2[NVB];
#pragma GCC unroll 4
      for (int v = 0; v < NVB; ++v) acc2[v] = vf{};
      for (; s + 1 < nseg; s += 2) {
        const float* xa = xt + static_cast<int64_t>(off[s]) * TB;
        const float* xb = xt + static_cast<int64_t>(off[s + 1]) * TB;
        const vf wa = vset1(wp[s * wss]), wb = vset1(wp[(s + 1) * wss]);
#pragma GCC unroll 4
        for (int v = 0; v < NVB; ++v) {
          acc[0][v] += wa * vld(xa + v * VW);
          acc2[v] += wb * vld(xb + v * VW);
        }
      }
#pragma GCC unroll 4
      for (int v = 0; v < NVB; ++v) acc[0][v] += acc2[v];
    }
    for (; s < nseg; ++s) {
      const float* xs = xt + static_cast<int64_t>(off[s]) * TB;
      const float* ws = wp + s * wss;
      vf xv[NVB];
#pragma GCC unroll 4
      for (int v = 0; v < NVB; ++v) xv[v] = vld(xs + v * VW);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vf w = vset1(ws[r * wos]);
#pragma GCC unroll 4
        for (int v = 0; v < NVB; ++v) acc[r][v] += w * xv[v];
      }
    }
  } else {
    for (int s = 0; s < nseg; ++s) {
      const float* xs = xt + static_cast<int64_t>(off[s]) * TB;
      const float* ws = wp + s * wss;
      if (s + 1 < nseg) __builtin_prefetch(xt + static_cast<int64_t>(off[s + 1]) * TB);
      for (int t = 0; t < depth; ++t) {
        vf xv[NVB];
#pragma GCC unroll 4
        for (int v = 0; v < NVB; ++v) xv[v] = vld(xs + v * VW);
        xs += TB;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const vf w = vset1(ws[r * wos]);
#pragma GCC unroll 4
          for (int v = 0; v < NVB; ++v) acc[r][v] += w * xv[v];
        }
        ws += wts;
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NVB; ++v) vst(out + r * ldo + v * VW, acc[r][v]);
}

using lanes_tile_fn = void (*)(int, const int32_t*, int, const float*, const float*, int64_t,
                               int64_t, int64_t, float*, int64_t, bool);
template <int R>
constexpr lanes_tile_fn lanes_tiles[4] = {lanes_tile<R, 1>, lanes_tile<R, 2>, lanes_tile<R, 3>,
                                          lanes_tile<R, 4>};

void lanes_kern(int rows, int nvb, int nseg, const int32_t* off, int depth, const float* xt,
                const float* wp, int64_t wss, int64_t wos, int64_t wts, float* out, int64_t ldo,
                bool accumulate) {
  const int v = nvb - 1;
  const lanes_tile_fn tile = rows == 6   ? lanes_tiles<6>[v]
                             : rows == 8 ? lanes_tiles<8>[v]
                             : rows == 4 ? lanes_tiles<4>[v]
                             : rows == 2 ? lanes_tiles<2>[v]
                                         : lanes_tiles<1>[v];
  tile(nseg, off, depth, xt, wp, wss, wos, wts, out, ldo, accumulate);
}

// ------------------------------------------------------------------ outer-product kernel
template <int MR, int NV>
void outer_tile(int depth, const float* a, int64_t a_ks, const float* b, int64_t b_ks, float* c,
                int64_t ldc, bool accumulate) {
  vf acc[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? vld(c + r * ldc + v * VW) : vf{};
  for (int t = 0; t < depth; ++t) {
    vf bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = vld(b + v * VW);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const vf av = vset1(a[r]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
    a += a_ks;
    b += b_ks;
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) vst(c + r * ldc + v * VW, acc[r][v]);
}

// Register tiles (mr rows x nv vectors): mr*nv accumulators + nv loads + 1 broadcast.
#if SK_VW == 16
constexpr int OK_H1[] = {4, 8, 16, 24};
constexpr int OK_H2[] = {4, 8, 12};
#else
constexpr int OK_H1[] = {4, 8, 12};
constexpr int OK_H2[] = {4, 6};
#endif

int ok_mr(int nv, int64_t rows) {
  const int* h = nv == 1 ? OK_H1 : OK_H2;
  const int n = nv == 1 ? static_cast<int>(sizeof(OK_H1) / sizeof(int))
                        : static_cast<int>(sizeof(OK_H2) / sizeof(int));
  for (int i = 0; i < n; ++i)
    if (h[i] >= rows) return h[i];
  return h[n - 1];
}

void okern(int mr, int nv, int depth, const float* a, int64_t a_ks, const float* b, int64_t b_ks,
           float* c, int64_t ldc, bool accumulate) {
  if (nv == 1) {
    switch (mr) {
      case 4: outer_tile<4, 1>(depth, a, a_ks, b, b_ks, c, ldc, accumulate); return;
      case 8: outer_tile<8, 1>(depth, a, a_ks, b, b_ks, c, ldc, accumulate); return;
#if SK_VW == 16
      case 16: outer_tile<16, 1>(depth, a, a_ks, b, b_ks, c, ldc, accumulate); return;
      default: outer_tile<24, 1>(depth, a, a_ks, b, b_ks, c, ldc, accumulate); return;
#else
      default: outer_tile<12, 1>(depth, a, a_ks, b, b_ks, c, ldc, accumulate); return;
#endif
    }
  }
  switch (mr) {
    case 4: outer_tile<4, 2>(depth, a, a_ks, b, b_ks, c, ldc, accumulate); return;
#if SK_VW == 16
    case 8: outer_tile<8, 2>(depth, a, a_ks, b, b_ks, c, ldc, accumulate); return;
    default: outer_tile<12, 2>(depth, a, a_ks, b, b_ks, c, ldc, accumulate); return;
#else
    default: outer_tile<6, 2>(depth, a, a_ks, b, b_ks, c, ldc, accumulate); return;
#endif
  }
}

int lanes_nvb(int rows) {
#if SK_VW == 16
  return rows >= 8 ? 3 : 4;
#else
  return rows >= 8 ? 1 : rows >= 4 ? 2 : 4;
#endif
}

// ------------------------------------------------------------------ transposes and packs
#ifdef SK_AVX512
// 16x16 transpose of registers in place.
inline void tr16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] =
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] =
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] =
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
inline __mmask16 lanes_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}
inline __m512 load16(const void* p, bool bf16, __mmask16 m) {
  if (bf16) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(m, p);
}
inline __m256i f2bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                  _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
inline void store16(void* p, bool bf16, __m512 v, __mmask16 m) {
  if (bf16)
    _mm256_mask_storeu_epi16(p, m, f2bf16(v));
  else
    _mm512_mask_storeu_ps(p, m, v);
}
#endif

void pack_t(const void* src, bool bf16, int64_t lds, int64_t b0, int64_t nb, int64_t d0,
            int64_t nd_valid, int64_t nd, float* dst, int64_t tb) {
#ifdef SK_AVX512
  const int64_t es = bf16 ? 2 : 4;
  const char* s = static_cast<const char*>(src);
  if (tb % 16 == 0) {
    for (int64_t l0 = 0; l0 < tb; l0 += 16) {
      for (int64_t d = 0; d < nd; d += 16) {
        __m512 r[16];
        const int64_t dv = nd_valid - d;
        const __mmask16 m = dv <= 0 ? 0 : lanes_mask(dv);
        for (int i = 0; i < 16; ++i) {
          const int64_t b = b0 + l0 + i;
          r[i] = (b < nb && m) ? load16(s + (b * lds + d0 + d) * es, bf16, m) : _mm512_setzero_ps();
        }
        tr16(r);
        const int64_t dn = nd - d < 16 ? nd - d : 16;
        for (int i = 0; i < dn; ++i) _mm512_storeu_ps(dst + (d + i) * tb + l0, r[i]);
      }
    }
    return;
  }
#endif
  // 8x8 blocks: contiguous reads of 8 source columns, contiguous writes of 8 lanes
  for (int64_t l0 = 0; l0 < tb; l0 += 8)
    for (int64_t dd = 0; dd < nd; dd += 8) {
      const int64_t il = tb - l0 < 8 ? tb - l0 : 8, jl = nd - dd < 8 ? nd - dd : 8;
      float t[8][8];
      for (int64_t i = 0; i < il; ++i) {
        const int64_t b = b0 + l0 + i;
        for (int64_t j = 0; j < jl; ++j)
          t[j][i] = (b < nb && dd + j < nd_valid) ? ldf(src, bf16, b * lds + d0 + dd + j) : 0.0f;
      }
      for (int64_t j = 0; j < jl; ++j)
        for (int64_t i = 0; i < il; ++i) dst[(dd + j) * tb + l0 + i] = t[j][i];
    }
}

void store_t(const float* out, int64_t ldo, int rows, int lanes, void* y, bool bf16, int64_t ldy,
             int64_t b0, int64_t c0, bool stream) {
  const int64_t es = bf16 ? 2 : 4;
  char* yc = static_cast<char*>(y);
#ifdef SK_AVX512
  for (int r0 = 0; r0 < rows; r0 += 16) {
    const int rn = rows - r0 < 16 ? rows - r0 : 16;
    const __mmask16 m = lanes_mask(rn);
    for (int l0 = 0; l0 < lanes; l0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rn ? _mm512_loadu_ps(out + (r0 + i) * ldo + l0) : _mm512_setzero_ps();
      tr16(r);
      const int ln = lanes - l0 < 16 ? lanes - l0 : 16;
      for (int i = 0; i < ln; ++i) {
        char* dst = yc + ((b0 + l0 + i) * ldy + c0 + r0) * es;
        if (stream && !bf16 && rn == 16 && (reinterpret_cast<uintptr_t>(dst) & 63) == 0)
          _mm512_stream_ps(reinterpret_cast<float*>(dst), r[i]);  // full line: no RFO
        else
          store16(dst, bf16, r[i], m);
      }
    }
  }
#else
  // 8x8 blocks: contiguous reads of 8 lanes, contiguous writes of 8 rows
  for (int r0 = 0; r0 < rows; r0 += 8)
    for (int l0 = 0; l0 < lanes; l0 += 8) {
      const int rl = rows - r0 < 8 ? rows - r0 : 8, ll = lanes - l0 < 8 ? lanes - l0 : 8;
      float t[8][8];
      for (int r = 0; r < rl; ++r)
        for (int l = 0; l < ll; ++l) t[l][r] = out[(r0 + r) * ldo + l0 + l];
      for (int l = 0; l < ll; ++l) {
        const int64_t base = (b0 + l0 + l) * ldy + c0 + r0;
        if (bf16) {
          uint16_t* yo = reinterpret_cast<uint16_t*>(yc) + base;
          for (int r = 0; r < rl; ++r) yo[r] = f2bf(t[l][r]);
        } else {
          float* yo = reinterpret_cast<float*>(yc) + base;
          for (int r = 0; r < rl; ++r) yo[r] = t[l][r];
        }
      }
    }
  (void)es;
  (void)stream;
#endif
}

void pack_strips(const void* src, bool bf16, int64_t lds, int64_t nb, int64_t d0, int64_t nrows,
                 int mr, float* dst) {
  const int64_t ns = (nrows + mr - 1) / mr;
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t rv = nrows - s * mr < mr ? nrows - s * mr : mr;
    float* o = dst + s * nb * mr;
    if (bf16) {
      const uint16_t* p = static_cast<const uint16_t*>(src) + d0 + s * mr;
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t r = 0; r < rv; ++r) o[b * mr + r] = bf2f(p[b * lds + r]);
        for (int64_t r = rv; r < mr; ++r) o[b * mr + r] = 0.0f;
      }
    } else {
      const float* p = static_cast<const float*>(src) + d0 + s * mr;
      for (int64_t b = 0; b < nb; ++b) {
        std::memcpy(o + b * mr, p + b * lds, rv * 4);
        for (int64_t r = rv; r < mr; ++r) o[b * mr + r] = 0.0f;
      }
    }
  }
}

void pack_cols(const void* src, bool bf16, int64_t lds, int64_t nb, int64_t d0, int64_t ncols,
               float* dst, int64_t ldp) {
  for (int64_t b = 0; b < nb; ++b) {
    float* o = dst + b * ldp;
    if (bf16) {
      const uint16_t* p = static_cast<const uint16_t*>(src) + b * lds + d0;
      for (int64_t c = 0; c < ncols; ++c) o[c] = bf2f(p[c]);
    } else {
      std::memcpy(o, static_cast<const float*>(src) + b * lds + d0, ncols * 4);
    }
    for (int64_t c = ncols; c < ldp; ++c) o[c] = 0.0f;
  }
}

void pack_block(const void* w, bool bf16, int64_t ldw, const uint8_t* mask, int64_t ldm, int rv,
                int cv, int rows, int cols, float* dst, int64_t ldd) {
#ifdef SK_AVX512
  const int es = bf16 ? 2 : 4;
  const char* wc = static_cast<const char*>(w);
  for (int r = 0; r < rows; ++r) {
    float* o = dst + r * ldd;
    if (r >= rv) {
      for (int c = 0; c < cols; c += 16)
        _mm512_mask_storeu_ps(o + c, lanes_mask(cols - c), _mm512_setzero_ps());
      continue;
    }
    if (r + 4 < rv) {
      __builtin_prefetch(wc + (r + 4) * ldw * es);
      __builtin_prefetch(wc + ((r + 4) * ldw + cv - 1) * es);
      if (mask) __builtin_prefetch(mask + (r + 4) * ldm);
    }
    for (int c = 0; c < cols; c += 16) {
      const int vn = cv - c;
      __mmask16 lm = vn <= 0 ? 0 : lanes_mask(vn);
      if (mask) {
        const __m128i mb = _mm_maskz_loadu_epi8(lm, mask + r * ldm + c);
        lm &= _mm_test_epi8_mask(mb, mb);  // select: masked-off lanes load as 0, never W * 0
      }
      const __m512 v = load16(wc + (r * ldw + c) * es, bf16, lm);
      _mm512_mask_storeu_ps(o + c, lanes_mask(cols - c), v);
    }
  }
#else
  for (int r = 0; r < rows; ++r) {
    float* o = dst + r * ldd;
    if (r >= rv) {
      for (int c = 0; c < cols; ++c) o[c] = 0.0f;
      continue;
    }
    if (bf16) {
      const uint16_t* p = static_cast<const uint16_t*>(w) + r * ldw;
      if (mask) {
        const uint8_t* mk = mask + r * ldm;
        for (int c = 0; c < cv; ++c) o[c] = mk[c] ? bf2f(p[c]) : 0.0f;
      } else {
        for (int c = 0; c < cv; ++c) o[c] = bf2f(p[c]);
      }
    } else {
      const float* p = static_cast<const float*>(w) + r * ldw;
      if (mask) {
        const uint8_t* mk = mask + r * ldm;
        for (int c = 0; c < cv; ++c) o[c] = mk[c] ? p[c] : 0.0f;
      } else {
        for (int c = 0; c < cv; ++c) o[c] = p[c];
      }
    }
    for (int c = cv; c < cols; ++c) o[c] = 0.0f;
  }
#endif
}

void store_block(const float* src, int64_t lds, const uint8_t* mask, int64_t ldm, int rv, int cv,
                 int rows, int cols, void* dst, bool bf16, int64_t ldd) {
#ifdef SK_AVX512
  const int es = bf16 ? 2 : 4;
  char* dc = static_cast<char*>(dst);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; c += 16) {
      const int vn = r < rv ? cv - c : 0;
      __mmask16 lm = vn <= 0 ? 0 : lanes_mask(vn);
      if (mask) {
        const __m128i mb = _mm_maskz_loadu_epi8(lm, mask + r * ldm + c);
        lm &= _mm_test_epi8_mask(mb, mb);
      }
      const __m512 v = _mm512_maskz_loadu_ps(lm, src + r * lds + c);
      store16(dc + (r * ldd + c) * es, bf16, v, lanes_mask(cols - c));
    }
  }
#else
  for (int r = 0; r < rows; ++r) {
    const float* p = src + r * lds;
    const uint8_t* mk = mask ? mask + r * ldm : nullptr;
    if (bf16) {
      uint16_t* o = static_cast<uint16_t*>(dst) + r * ldd;
      if (r >= rv) {
        for (int c = 0; c < cols; ++c) o[c] = 0;
        continue;
      }
      for (int c = 0; c < cv; ++c) o[c] = (!mk || mk[c]) ? f2bf(p[c]) : 0;
      for (int c = cv; c < cols; ++c) o[c] = 0;
    } else {
      float* o = static_cast<float*>(dst) + r * ldd;
      if (r >= rv) {
        for (int c = 0; c < cols; ++c) o[c] = 0.0f;
        continue;
      }
      if (mk)
        for (int c = 0; c < cv; ++c) o[c] = mk[c] ? p[c] : 0.0f;
      else
        for (int c = 0; c < cv; ++c) o[c] = p[c];
      for (int c = cv; c < cols; ++c) o[c] = 0.0f;
    }
  }
#endif
}

inline float hsum(vf v) {
#ifdef SK_AVX512
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  // pairwise halves: log2(VW) dependent adds instead of VW
  float t[VW];
  __builtin_memcpy(t, &v, sizeof(t));
#pragma GCC unroll 4
  for (int w = VW / 2; w >= 1; w /= 2)
#pragma GCC unroll 8
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
#endif
}

template <int NVB>
void dot_row_t(const float* a, const float* xt, const int32_t* col, int64_t n, float* acc) {
  constexpr int TB = NVB * VW;
  vf av[NVB];
#pragma GCC unroll 4
  for (int v = 0; v < NVB; ++v) av[v] = vld(a + v * VW);
  for (int64_t e = 0; e < n; ++e) {
    const float* xs = xt + static_cast<int64_t>(col[e]) * TB;
    if (e + 4 < n) __builtin_prefetch(xt + static_cast<int64_t>(col[e + 4]) * TB);
    vf s = av[0] * vld(xs);
#pragma GCC unroll 4
    for (int v = 1; v < NVB; ++v) s += av[v] * vld(xs + v * VW);
    acc[e] += hsum(s);
  }
}

void dot_row(int nvb, const float* a, const float* xt, const int32_t* col, int64_t n, float* acc) {
  switch (nvb) {
    case 1: dot_row_t<1>(a, xt, col, n, acc); break;
    case 2: dot_row_t<2>(a, xt, col, n, acc); break;
    case 3: dot_row_t<3>(a, xt, col, n, acc); break;
    default: dot_row_t<4>(a, xt, col, n, acc); break;
  }
}

// Outer-product form of the element-mask SDDMM: the a (dy row) vector is loaded once per 8
// entries and multiplied into 8 register accumulators that live over the whole pixel chunk
// (nsub tiles), so the loop issues 9 loads per 8 FMAs and one horizontal sum per entry and chunk.
template <int NC, int NVB>
inline void sddmm_group(int nsub, const float* a, int64_t lda, const float* xt, int64_t ldx,
                        const int32_t* col, int64_t col0, float* acc) {
  constexpr int TB = NVB * VW;
  vf s[NC];
  const float* xp[NC];
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) {
    s[j] = vf{};
    xp[j] = xt + (static_cast<int64_t>(col[j]) - col0) * TB;
  }
  for (int g = 0; g < nsub; ++g) {
    const float* ag = a + g * lda;
    const int64_t xo = g * ldx;
#pragma GCC unroll 4
    for (int v = 0; v < NVB; ++v) {
      const vf d = vld(ag + v * VW);
#pragma GCC unroll 8
      for (int j = 0; j < NC; ++j) s[j] += d * vld(xp[j] + xo + v * VW);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) acc[j] += hsum(s[j]);
}

template <int NVB>
void sddmm_row_t(int nsub, const float* a, int64_t lda, const float* xt, int64_t ldx,
                 const int32_t* col, int64_t n, int64_t col0, float* acc) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) sddmm_group<8, NVB>(nsub, a, lda, xt, ldx, col + e, col0, acc + e);
  if (e + 4 <= n) {
    sddmm_group<4, NVB>(nsub, a, lda, xt, ldx, col + e, col0, acc + e);
    e += 4;
  }
  if (e + 2 <= n) {
    sddmm_group<2, NVB>(nsub, a, lda, xt, ldx, col + e, col0, acc + e);
    e += 2;
  }
  if (e < n) sddmm_group<1, NVB>(nsub, a, lda, xt, ldx, col + e, col0, acc + e);
}

void sddmm_row(int nvb, int nsub, const float* a, int64_t lda, const float* xt, int64_t ldx,
               const int32_t* col, int64_t n, int64_t col0, float* acc) {
  switch (nvb) {
    case 1: sddmm_row_t<1>(nsub, a, lda, xt, ldx, col, n, col0, acc); break;
    case 2: sddmm_row_t<2>(nsub, a, lda, xt, ldx, col, n, col0, acc); break;
    case 3: sddmm_row_t<3>(nsub, a, lda, xt, ldx, col, n, col0, acc); break;
    default: sddmm_row_t<4>(nsub, a, lda, xt, ldx, col, n, col0, acc); break;
  }
}

// ------------------------------------------------------------------ growth filter
inline float bonus_of(const void* counter, int ctype, int64_t j, float bs, float eps) {
  float c = ctype == 0   ? static_cast<float>(static_cast<const int32_t*>(counter)[j])
            : ctype == 1 ? static_cast<float>(static_cast<const int64_t*>(counter)[j])
                         : static_cast<const float*>(counter)[j];
  return bs * (1.0f / (c + eps));
}

int64_t filter(const float* g, int64_t n, const uint8_t* excl, const void* counter, int ctype,
               float bs, float eps, uint32_t flat0, uint64_t thr, uint64_t* out) {
  int64_t cnt = 0;
  int64_t j = 0;
#ifdef SK_AVX512
  const __m512i thr_hi = _mm512_set1_epi32(static_cast<int>(thr >> 32));
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512 vbs = _mm512_set1_ps(bs), veps = _mm512_set1_ps(eps), one = _mm512_set1_ps(1.0f);
  alignas(64) uint32_t keys[16];
  for (; j < n; j += 16) {
    __mmask16 valid = lanes_mask(n - j);
    const __m128i ex = _mm_maskz_loadu_epi8(valid, excl + j);
    valid &= static_cast<__mmask16>(~_mm_test_epi8_mask(ex, ex));
    if (!valid) continue;
    __m512 s = _mm512_abs_ps(_mm512_maskz_loadu_ps(valid, g + j));
    if (counter) {
      __m512 c;
      if (ctype == 0) {
        c = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(valid, static_cast<const int32_t*>(counter) + j));
      } else if (ctype == 1) {
        const int64_t* p = static_cast<const int64_t*>(counter) + j;
        __m256 lo = _mm512_cvtepi64_ps(_mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid), p));
        __m256 hi = _mm512_cvtepi64_ps(_mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid >> 8), p + 8));
        c = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
      } else {
        c = _mm512_maskz_loadu_ps(valid, static_cast<const float*>(counter) + j);
      }
      s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_div_ps(one, _mm512_add_ps(c, veps)), vbs));
    }
    s = _mm512_add_ps(s, _mm512_setzero_ps());
    const __m512i u = _mm512_castps_si512(s);
    __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
    key = _mm512_mask_mov_epi32(key, _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), _mm512_set1_epi32(-1));
    uint32_t m = _mm512_mask_cmpge_epu32_mask(valid, key, thr_hi);
    if (!m) continue;
    _mm512_store_si512(keys, key);
    while (m) {
      const int l = __builtin_ctz(m);
      m &= m - 1;
      const uint64_t c = (static_cast<uint64_t>(keys[l]) << 32) |
                         (0xFFFFFFFFull - (flat0 + static_cast<uint32_t>(j + l)));
      if (c > thr) out[cnt++] = c;
    }
  }
#else
  for (; j < n; ++j) {
    if (excl[j]) continue;
    float s = __builtin_fabsf(g[j]);
    if (counter) s = s + bonus_of(counter, ctype, j, bs, eps);
    const uint64_t c = (static_cast<uint64_t>(score_key(s)) << 32) |
                       (0xFFFFFFFFull - (flat0 + static_cast<uint32_t>(j)));
    if (c > thr) out[cnt++] = c;
  }
#endif
  return cnt;
}

void gather_vals(const void* w, bool bf16, bool dense, const uint8_t* mask, const int32_t* col,
                 int64_t n, int64_t base, float* dst) {
  int64_t e = 0;
#ifdef SK_AVX512
  if (!bf16 && dense && base >= 3) {
    const float* wb = static_cast<const float*>(w) + base;
    for (; e + 16 <= n; e += 16) {
      const __m512i ix = _mm512_loadu_si512(col + e);
      __m512 v = _mm512_i32gather_ps(ix, wb, 4);
      if (mask) {
        // mask bytes: gather the dwords ending at each byte (base >= 3, so never before the
        // buffer) and test their top byte
        const __m512i mb = _mm512_i32gather_epi32(ix, mask + base - 3, 1);
        const __mmask16 on = _mm512_test_epi32_mask(mb, _mm512_set1_epi32(static_cast<int>(0xFF000000u)));
        v = _mm512_maskz_mov_ps(on, v);
      }
      _mm512_storeu_ps(dst + e, v);
    }
  }
#endif
  for (; e < n; ++e) {
    const int64_t c = base + col[e];
    const float v = ldf(w, bf16, dense ? c : e);
    dst[e] = (!mask || mask[c]) ? v : 0.0f;
  }
}

template <int NVB>
void elem_rows_t(const float* xt, const float* vals, const int32_t* col, const int32_t* rp,
                 int64_t m0, int64_t m1, float* y) {
  constexpr int TB = NVB * VW;
  for (int64_t m = m0; m < m1; ++m) {
    int32_t s = rp[m];
    const int32_t e = rp[m + 1];
    vf a0[NVB], a1[NVB];
#pragma GCC unroll 4
    for (int v = 0; v < NVB; ++v) a0[v] = a1[v] = vf{};
    for (; s + 1 < e; s += 2) {
      const float* x0 = xt + static_cast<int64_t>(col[s]) * TB;
      const float* x1 = xt + static_cast<int64_t>(col[s + 1]) * TB;
      const vf w0 = vset1(vals[s]), w1 = vset1(vals[s + 1]);
#pragma GCC unroll 4
      for (int v = 0; v < NVB; ++v) {
        a0[v] += w0 * vld(x0 + v * VW);
        a1[v] += w1 * vld(x1 + v * VW);
      }
    }
    if (s < e) {
      const float* x0 = xt + static_cast<int64_t>(col[s]) * TB;
      const vf w0 = vset1(vals[s]);
#pragma GCC unroll 4
      for (int v = 0; v < NVB; ++v) a0[v] += w0 * vld(x0 + v * VW);
    }
#pragma GCC unroll 4
    for (int v = 0; v < NVB; ++v) vst(y + m * TB + v * VW, a0[v] + a1[v]);
  }
}

void elem_rows(int nvb, const float* xt, const float* vals, const int32_t* col,
               const int32_t* rp, int64_t m0, int64_t m1, float* y) {
  switch (nvb) {
    case 1: elem_rows_t<1>(xt, vals, col, rp, m0, m1, y); break;
    case 2: elem_rows_t<2>(xt, vals, col, rp, m0, m1, y); break;
    case 3: elem_rows_t<3>(xt, vals, col, rp, m0, m1, y); break;
    default: elem_rows_t<4>(xt, vals, col, rp, m0, m1, y); break;
  }
}

// A piece of an output-pixel tile for one kernel tap (ki, kj), stride-1 columns: lanes
// [l, l + n) (n <= 16, one output row) read x[cin][off + t] for t in [lo, hi), zero elsewhere
// (off = ih * W + iw0; lo = hi = 0 when the input row ih is padding). The same for every
// input channel, so im2col/col2im build the pieces once per tap and loop over the channels.
struct Piece {
  int64_t off;
  int32_t l, n, lo, hi;
};
constexpr int kMaxPieces = 64 + 8;  // tb <= 64 lanes, a split at every row and every 16 lanes

int tap_pieces(const int64_t* g, int64_t p0, int64_t lanes, int64_t ki, int64_t kj, Piece* out) {
  const int64_t H = g[1], W = g[2], OW = g[4], sh = g[7], ph = g[9], pw = g[10], dh = g[11],
                dw = g[12];
  int np = 0;
  int64_t l = 0, oh = p0 / OW, ow = p0 % OW;
  while (l < lanes) {
    const int64_t run = OW - ow < lanes - l ? OW - ow : lanes - l;
    const int64_t ih = oh * sh - ph + ki * dh, iw0 = ow - pw + kj * dw;
    const bool row_ok = ih >= 0 && ih < H;
    for (int64_t t0 = 0; t0 < run; t0 += 16) {
      Piece& q = out[np++];
      q.l = static_cast<int32_t>(l + t0);
      q.n = static_cast<int32_t>(run - t0 < 16 ? run - t0 : 16);
      q.off = ih * W + iw0 + t0;
      int64_t lo = -(iw0 + t0), hi = W - (iw0 + t0);  // valid t in [lo, hi)
      lo = lo < 0 ? 0 : lo;
      hi = hi > q.n ? q.n : hi;
      if (!row_ok || hi <= lo) lo = hi = 0;
      q.lo = static_cast<int32_t>(lo);
      q.hi = static_cast<int32_t>(hi);
    }
    l += run;
    ow = 0;
    ++oh;
  }
  return np;
}

// K-block (kidx / bc) of the unfolded rows kidx = kidx0 + cin * step, cin = 0, 1, ..., without
// a division per row.
struct KBlockWalk {
  int64_t q, r, sq, sr, bc;
  KBlockWalk(int64_t kidx0, int64_t step, int64_t bc_)
      : q(kidx0 / bc_), r(kidx0 % bc_), sq(step / bc_), sr(step % bc_), bc(bc_) {}
  void next() {
    q += sq;
    r += sr;
    if (r >= bc) {
      r -= bc;
      ++q;
    }
  }
};

#ifdef SK_AVX512
inline __mmask16 range_mask(int lo, int hi) {
  return static_cast<__mmask16>(lanes_mask(hi) & ~lanes_mask(lo));
}
#endif

// The general walk (any stride) shared by im2col and col2im: f(kidx, l, src) for every row
// kidx of a needed K-block and output lane l < lanes, src = the input element's offset in the
// image, (cin * H + ih) * W + iw, or -1 where the tap falls in the padding.
template <class F>
void walk_strided(const int64_t* g, int64_t p0, int64_t lanes, const uint8_t* need, int64_t bc,
                  const F& f) {
  const int64_t Cin = g[0], H = g[1], W = g[2], OW = g[4], kh = g[5], kw = g[6], sh = g[7],
                sw = g[8], ph = g[9], pw = g[10], dh = g[11], dw = g[12];
  const int64_t oh0 = p0 / OW, ow0 = p0 % OW;
  int64_t kidx = 0;
  for (int64_t cin = 0; cin < Cin; ++cin)
    for (int64_t ki = 0; ki < kh; ++ki)
      for (int64_t kj = 0; kj < kw; ++kj, ++kidx) {
        if (!need[kidx / bc]) continue;
        int64_t l = 0, oh = oh0, ow = ow0;
        while (l < lanes) {
          const int64_t run = OW - ow < lanes - l ? OW - ow : lanes - l;
          const int64_t ih = oh * sh - ph + ki * dh;
          for (int64_t t = 0; t < run; ++t) {
            const int64_t iw = (ow + t) * sw - pw + kj * dw;
            f(kidx, l + t, ih >= 0 && ih < H && iw >= 0 && iw < W ? (cin * H + ih) * W + iw : -1);
          }
          l += run;
          ow = 0;
          ++oh;
        }
      }
}

void im2col(const void* xn, bool bf16, const int64_t* g, int64_t p0, int64_t lanes,
            const uint8_t* need, int64_t bc, int64_t kd_pad, float* dst, int64_t tb) {
  const int64_t Cin = g[0], H = g[1], W = g[2], kh = g[5], kw = g[6], sw = g[8];
  const int64_t es = bf16 ? 2 : 4;
  const char* x = static_cast<const char*>(xn);
  if (sw == 1) {
    Piece pc[kMaxPieces];
    for (int64_t ki = 0; ki < kh; ++ki)
      for (int64_t kj = 0; kj < kw; ++kj) {
        const int np = tap_pieces(g, p0, lanes, ki, kj, pc);
        KBlockWalk kb(ki * kw + kj, kh * kw, bc);
        for (int64_t cin = 0; cin < Cin; ++cin, kb.next()) {
          if (!need[kb.q]) continue;
          const int64_t kidx = (cin * kh + ki) * kw + kj;
          float* row = dst + kidx * tb;
          const char* plane = x + cin * H * W * es;
          for (int i = 0; i < np; ++i) {
            const Piece& q = pc[i];
#ifdef SK_AVX512
            _mm512_mask_storeu_ps(row + q.l, lanes_mask(q.n),
                                  load16(plane + q.off * es, bf16, range_mask(q.lo, q.hi)));
#else
            // branch-free runs (zeros, copy, zeros): the compiler vectorises each
            float* r = row + q.l;
            for (int t = 0; t < q.lo; ++t) r[t] = 0.0f;
            if (bf16) {
              const uint16_t* src = reinterpret_cast<const uint16_t*>(plane) + q.off;
              for (int t = q.lo; t < q.hi; ++t) r[t] = bf2f(src[t]);
            } else {
              const float* src = reinterpret_cast<const float*>(plane) + q.off;
              for (int t = q.lo; t < q.hi; ++t) r[t] = src[t];
            }
            for (int t = q.lo < q.hi ? q.hi : 0; t < q.n; ++t) r[t] = 0.0f;
#endif
          }
          for (int64_t l = lanes; l < tb; ++l) row[l] = 0.0f;
        }
      }
  } else {
    walk_strided(g, p0, lanes, need, bc, [&](int64_t kidx, int64_t l, int64_t src) {
      dst[kidx * tb + l] = src < 0 ? 0.0f : ldf(xn, bf16, src);
    });
    for (int64_t kidx = 0; kidx < Cin * kh * kw; ++kidx)
      if (need[kidx / bc])
        for (int64_t l = lanes; l < tb; ++l) dst[kidx * tb + l] = 0.0f;
  }
  for (int64_t kidx = Cin * kh * kw; kidx < kd_pad; ++kidx)
    if (need[kidx / bc])
      for (int64_t l = 0; l < tb; ++l) dst[kidx * tb + l] = 0.0f;
}

void col2im(const float* du, const int64_t* g, int64_t p0, int64_t lanes, const uint8_t* need,
            int64_t bc, float* dxn, int64_t tb) {
  const int64_t Cin = g[0], H = g[1], W = g[2], kh = g[5], kw = g[6], sw = g[8];
  if (sw == 1) {
    Piece pc[kMaxPieces];
    for (int64_t ki = 0; ki < kh; ++ki)
      for (int64_t kj = 0; kj < kw; ++kj) {
        // channels innermost: consecutive read-modify-writes of dx then touch different
        // planes (pieces of one plane are adjacent rows, and a masked load right after a
        // masked store to the neighbouring row stalls on store forwarding)
        const int np = tap_pieces(g, p0, lanes, ki, kj, pc);
        for (int i = 0; i < np; ++i) {
          const Piece& q = pc[i];
          if (q.hi <= q.lo) continue;
#ifdef SK_AVX512
          const __mmask16 m = range_mask(q.lo, q.hi);
#endif
          KBlockWalk kb(ki * kw + kj, kh * kw, bc);
          for (int64_t cin = 0; cin < Cin; ++cin, kb.next()) {
            if (!need[kb.q]) continue;
            const int64_t kidx = (cin * kh + ki) * kw + kj;
            const float* row = du + kidx * tb + q.l;
            float* o = dxn + cin * H * W + q.off;
#ifdef SK_AVX512
            _mm512_mask_storeu_ps(o, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o),
                                                      _mm512_maskz_loadu_ps(m, row)));
#else
            for (int t = q.lo; t < q.hi; ++t) o[t] += row[t];
#endif
          }
        }
      }
    return;
  }
  walk_strided(g, p0, lanes, need, bc, [&](int64_t kidx, int64_t l, int64_t src) {
    if (src >= 0) dxn[src] += du[kidx * tb + l];
  });
}

// Flat-domain rows (stride-1 convolution without im2col, conv_cpu.cpp): for r < rows,
//   out[r*ldo + v*VW + t] (+)= sum_{e in [bounds[r*bstride], bounds[r*bstride + 1])} val[e] *
//                              src[idx[e] + p0[v] + t],
// v < kFlatVecs, t < VW, entries summed in order (8 independent FMA chains cover the latency).
constexpr int kFlatVecs = 8;
void flat_rows(const float* src, const int64_t* idx, const float* val, const int64_t* bounds,
               int64_t bstride, int64_t rows, const int64_t* p0, float* out, int64_t ldo,
               bool accumulate) {
  const float* xs[kFlatVecs];
#pragma GCC unroll 8
  for (int v = 0; v < kFlatVecs; ++v) xs[v] = src + p0[v];
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * ldo;
    vf acc[kFlatVecs];
#pragma GCC unroll 8
    for (int v = 0; v < kFlatVecs; ++v) acc[v] = accumulate ? vld(o + v * VW) : vf{};
    const int64_t e1 = bounds[r * bstride + 1];
    for (int64_t e = bounds[r * bstride]; e < e1; ++e) {
      const int64_t i = idx[e];
      const vf w = vset1(val[e]);
#pragma GCC unroll 8
      for (int v = 0; v < kFlatVecs; ++v) acc[v] += w * vld(xs[v] + i);
    }
#pragma GCC unroll 8
    for (int v = 0; v < kFlatVecs; ++v) vst(o + v * VW, acc[v]);
  }
}

// Flat-domain rows in groups of 4 (block masks: the 4 rows share each loaded input vector):
// for g < groups, r < 4,
//   out[(4g + r)*ldo + v*VW + t] (+)= sum_{e in [bounds[g*bstride], bounds[g*bstride + 1])}
//                                     w4[4e + r] * src[idx[e] + p0[v] + t]   (as flat_rows).
void flat_rows4(const float* src, const int64_t* idx, const float* w4, const int64_t* bounds,
                int64_t bstride, int64_t groups, const int64_t* p0, float* out, int64_t ldo,
                bool accumulate) {
  constexpr int V = 2;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t e0 = bounds[g * bstride], e1 = bounds[g * bstride + 1];
    for (int v0 = 0; v0 < kFlatVecs; v0 += V) {
      const float* xs[V];
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) xs[v] = src + p0[v0 + v];
      vf acc[4][V];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r)
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v)
          acc[r][v] = accumulate ? vld(out + (4 * g + r) * ldo + (v0 + v) * VW) : vf{};
      for (int64_t e = e0; e < e1; ++e) {
        vf xv[V];
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) xv[v] = vld(xs[v] + idx[e]);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const vf w = vset1(w4[4 * e + r]);
#pragma GCC unroll 2
          for (int v = 0; v < V; ++v) acc[r][v] += w * xv[v];
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r)
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) vst(out + (4 * g + r) * ldo + (v0 + v) * VW, acc[r][v]);
    }
  }
}

// Flat-domain SDDMM over one span of nv vectors (conv_cpu.cpp's flat and lane paths): for
// r < rows and the entries e of row r (bounds as flat_rows),
//   acc[e] += sum_{v < nv, t < VW} a[r*lda + v*VW + t] * src[idx[e] + xb[v] + t]
// (a contiguous, each x vector at its own base) in the outer-product form: each a vector is
// loaded once for up to 8 entries.
template <int NC>
inline void flat_sddmm_group(const float* ar, const float* const* xs, const int64_t* xb,
                             int64_t nv, float* acc) {
  vf s[NC];
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) s[j] = vf{};
  for (int64_t v = 0; v < nv; ++v) {
    const vf d = vld(ar + v * VW);
    const int64_t o = xb[v];
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) s[j] += d * vld(xs[j] + o);
  }
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) acc[j] += hsum(s[j]);
}

void flat_sddmm(const float* a, int64_t lda, const float* src, const int64_t* idx,
                const int64_t* bounds, int64_t bstride, int64_t rows, const int64_t* xb,
                int64_t nv, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * lda;
    const int64_t e1 = bounds[r * bstride + 1];
    for (int64_t e = bounds[r * bstride]; e < e1; e += 8) {
      const float* xs[8];
      const int n = static_cast<int>(e1 - e < 8 ? e1 - e : 8);
      for (int j = 0; j < n; ++j) xs[j] = src + idx[e + j];
      switch (n) {
        case 8: flat_sddmm_group<8>(ar, xs, xb, nv, acc + e); break;
        case 7: flat_sddmm_group<7>(ar, xs, xb, nv, acc + e); break;
        case 6: flat_sddmm_group<6>(ar, xs, xb, nv, acc + e); break;
        case 5: flat_sddmm_group<5>(ar, xs, xb, nv, acc + e); break;
        case 4: flat_sddmm_group<4>(ar, xs, xb, nv, acc + e); break;
        case 3: flat_sddmm_group<3>(ar, xs, xb, nv, acc + e); break;
        case 2: flat_sddmm_group<2>(ar, xs, xb, nv, acc + e); break;
        default: flat_sddmm_group<1>(ar, xs, xb, nv, acc + e); break;
      }
    }
  }
}

// Flat-domain SDDMM in row groups of 4 (block masks): for g < groups, the entries e of group g
// (bounds as flat_rows4) and r < 4,
//   acc[4e + r] += sum_{v < nv, t < VW} a[(4g + r)*lda + v*VW + t] * src[idx[e] + xb[v] + t]
// (as flat_sddmm), two entries at a time: 6 loads per 8 FMAs.
template <int NE>
inline void flat_sddmm4_pair(const float* a, int64_t lda, const float* const* xs,
                             const int64_t* xb, int64_t nv, float* acc) {
  vf s[4][NE];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NE; ++j) s[r][j] = vf{};
  for (int64_t v = 0; v < nv; ++v) {
    vf xv[NE];
    const int64_t o = xb[v];
#pragma GCC unroll 2
    for (int j = 0; j < NE; ++j) xv[j] = vld(xs[j] + o);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const vf d = vld(a + r * lda + v * VW);
#pragma GCC unroll 2
      for (int j = 0; j < NE; ++j) s[r][j] += d * xv[j];
    }
  }
#pragma GCC unroll 2
  for (int j = 0; j < NE; ++j)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[4 * j + r] += hsum(s[r][j]);
}

void flat_sddmm4(const float* a, int64_t lda, const float* src, const int64_t* idx,
                 const int64_t* bounds, int64_t bstride, int64_t groups, const int64_t* xb,
                 int64_t nv, float* acc) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* ag = a + 4 * g * lda;
    const int64_t e1 = bounds[g * bstride + 1];
    int64_t e = bounds[g * bstride];
    for (; e + 1 < e1; e += 2) {
      const float* xs[2] = {src + idx[e], src + idx[e + 1]};
      flat_sddmm4_pair<2>(ag, lda, xs, xb, nv, acc + 4 * e);
    }
    if (e < e1) {
      const float* xs[1] = {src + idx[e]};
      flat_sddmm4_pair<1>(ag, lda, xs, xb, nv, acc + 4 * e);
    }
  }
}

void convert_out(const float* src, int64_t n, void* dst, bool bf16) {
  if (!bf16) {
    if (src != dst) std::memcpy(dst, src, n * 4);
    return;
  }
  uint16_t* o = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) o[i] = f2bf(src[i]);
}

}  // namespace

extern const KernelTable table;
const KernelTable table = {
    SK_NAME,     VW,        lanes_kern, lanes_nvb,   okern,       ok_mr,   pack_t,
    store_t,     pack_strips, pack_cols, pack_block, store_block, dot_row, sddmm_row, filter,
    gather_vals, elem_rows, im2col,    col2im,     convert_out, kFlatVecs * VW, flat_rows,
    flat_sddmm, flat_rows4, flat_sddmm4,
};

}  // namespace SK_NS
}  // namespace sk
