// ISA-neutral interface of the CPU microkernels. Each instruction set (AVX-512, AVX2, generic)
// compiles csrc/cpu/kern_body.h in its own translation unit under its own target pragma and
// exports one KernelTable; the torch glue (linear_cpu.cpp, conv_cpu.cpp) picks a table at run
// time with __builtin_cpu_supports and never includes intrinsics itself.
//
// Conventions: all packed operands are fp32; `bf16` flags mark raw bfloat16 (uint16) inputs or
// outputs, converted while packing (bf16 -> fp32 is exact) or when storing (round to nearest
// even, NaN -> 0x7FC0, as c10::BFloat16). Strides are in elements.
#pragma once
#include <cstdint>

namespace sk {

struct KernelTable {
  const char* name;
  int vw;  // floats per vector register

  // Lanes orientation (broadcast weights, vectorise over the batch, which lies in the vector
  // lanes of the transposed activations xt):
  //   out[r*ldo + l] = sum_{s<nseg} sum_{t<depth} wp[s*wss + r*wos + t*wts] * xt[(off[s]+t)*tb + l]
  // for r < rows (1, 2, 4, 6 or 8), l < nvb*vw (nvb in 1..4), tb = nvb*vw; with `accumulate`
  // the sums are added to out's previous contents.
  void (*lanes_kern)(int rows, int nvb, int nseg, const int32_t* off, int depth, const float* xt,
                     const float* wp, int64_t wss, int64_t wos, int64_t wts, float* out,
                     int64_t ldo, bool accumulate);
  // Preferred nvb for a row group of `rows` rows (register budget).
  int (*lanes_nvb)(int rows);

  // Outer-product orientation (broadcast A, vectorise over B's columns):
  //   c[r*ldc + j] (+)= sum_{t<depth} a[t*a_ks + r] * b[t*b_ks + j]  for r < mr, j < nv*vw,
  // mr a value ok_mr returns
  // (added to c's contents when `accumulate`).
  void (*okern)(int mr, int nv, int depth, const float* a, int64_t a_ks, const float* b,
                int64_t b_ks, float* c, int64_t ldc, bool accumulate);
  // Rows of the register tile for nv (1 or 2) vectors and a block of `rows` rows: the smallest
  // instantiated height >= rows, at most the register budget.
  int (*ok_mr)(int nv, int64_t rows);

  // Transposing pack: dst[d*tb + l] = src[(b0+l)*lds + d0 + d] for d < nd, l < tb; zero where
  // b0+l >= nb or d >= nd_valid.
  void (*pack_t)(const void* src, bool bf16, int64_t lds, int64_t b0, int64_t nb, int64_t d0,
                 int64_t nd_valid, int64_t nd, float* dst, int64_t tb);
  // Transposing store: y[(b0+l)*ldy + c0 + r] = out[r*ldo + l] for r < rows, l < lanes;
  // `stream` allows non-temporal stores of full aligned lines (outputs not read soon).
  void (*store_t)(const float* out, int64_t ldo, int rows, int lanes, void* y, bool bf16,
                  int64_t ldy, int64_t b0, int64_t c0, bool stream);
  // Strip pack: dst[(s*nb + b)*mr + r] = src[b*lds + d0 + s*mr + r] for rows s*mr+r < nrows,
  // 0 beyond, s < ceil(nrows/mr).
  void (*pack_strips)(const void* src, bool bf16, int64_t lds, int64_t nb, int64_t d0,
                      int64_t nrows, int mr, float* dst);
  // Column pack: dst[b*ldp + c] = src[b*lds + d0 + c] for c < ncols, 0 for ncols <= c < ldp.
  void (*pack_cols)(const void* src, bool bf16, int64_t lds, int64_t nb, int64_t d0,
                    int64_t ncols, float* dst, int64_t ldp);
  // Masked block copy: dst[r*ldd + c] = mask[r*ldm + c] ? w[r*ldw + c] : 0 for r < rv, c < cv;
  // 0 for r < rows, c < cols outside that. mask may be null (all true). Masks select, never
  // multiply, so NaN/inf in masked-off entries never reach dst (here and below).
  void (*pack_block)(const void* w, bool bf16, int64_t ldw, const uint8_t* mask, int64_t ldm,
                     int rv, int cv, int rows, int cols, float* dst, int64_t ldd);
  // Block store: dst[r*ldd + c] = mask[r*ldm + c] ? src[r*lds + c] : 0 (0 where r >= rv, c >= cv)
  // for r < rows, c < cols; dst fp32 or bf16. mask may be null.
  void (*store_block)(const float* src, int64_t lds, const uint8_t* mask, int64_t ldm, int rv,
                      int cv, int rows, int cols, void* dst, bool bf16, int64_t ldd);
  // Dot products over a batch tile: for each entry e < n,
  //   acc[e] += sum_{l<tb} a[l] * xt[col[e]*tb + l]     (tb = nvb*vw)
  void (*dot_row)(int nvb, const float* a, const float* xt, const int32_t* col, int64_t n,
                  float* acc);
  // Element-mask SDDMM over a chunk of nsub batch tiles (outer-product form): for e < n,
  //   acc[e] += sum_{g<nsub} sum_{l<tb} a[g*lda + l] * xt[g*ldx + (col[e]-col0)*tb + l]
  // (tb = nvb*vw), summed in a fixed order.
  void (*sddmm_row)(int nvb, int nsub, const float* a, int64_t lda, const float* xt, int64_t ldx,
                    const int32_t* col, int64_t n, int64_t col0, float* acc);
  // Growth filter on one row segment of an fp32 gradient tile: for j < n with excl[j] == 0,
  // score s = |g[j]| (+ bonus(j)) + 0.0f, key = ordered(s) (NaN highest), composite
  // c = key << 32 | (0xFFFFFFFF - (flat0 + j)); appends c to out when c > thr. Returns count.
  // counter (may be null): ctype 0 = int32, 1 = int64, 2 = float32;
  // bonus(j) = bonus_scale * (1 / ((float)counter[j] + eps)).
  int64_t (*filter)(const float* g, int64_t n, const uint8_t* excl, const void* counter,
                    int ctype, float bonus_scale, float eps, uint32_t flat0, uint64_t thr,
                    uint64_t* out);
  // Element gather: dst[e] = mask[base + col[e]] ? w[(dense ? base + col[e] : e)] : 0 for e < n
  // (w dense row-major or compact values; mask may be null).
  void (*gather_vals)(const void* w, bool bf16, bool dense, const uint8_t* mask,
                      const int32_t* col, int64_t n, int64_t base, float* dst);
  // Element-mask rows: y[m*tb + l] = sum_{s in [rp[m], rp[m+1])} vals[s] * xt[col[s]*tb + l]
  // for m in [m0, m1), l < tb = nvb*vw.
  void (*elem_rows)(int nvb, const float* xt, const float* vals, const int32_t* col,
                    const int32_t* rp, int64_t m0, int64_t m1, float* y);
  // Convolution tiles. geom = {Cin, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw}; rows
  // kidx = (cin, ki, kj) of the unfolded input for the K-blocks with need[kidx / bc] set.
  // im2col: dst[kidx*tb + l] = x_n[cin, ih, iw] for output pixel p0 + l (0 outside the image,
  // for l >= lanes and for rows kd <= kidx < kd_pad).
  void (*im2col)(const void* xn, bool bf16, const int64_t* geom, int64_t p0, int64_t lanes,
                 const uint8_t* need, int64_t bc, int64_t kd_pad, float* dst, int64_t tb);
  // col2im (the adjoint, accumulating): dxn[cin, ih, iw] += du[kidx*tb + l].
  void (*col2im)(const float* du, const int64_t* geom, int64_t p0, int64_t lanes,
                 const uint8_t* need, int64_t bc, float* dxn, int64_t tb);
  // Convert fp32 -> bf16 (RNE) or copy.
  void (*convert_out)(const float* src, int64_t n, void* dst, bool bf16);
  // Flat-domain rows of a stride-1 convolution (conv_cpu.cpp's flat path), one chunk of
  // flat_chunk positions in vectors of vw, vector v read at its own base p0[v]: for r < rows,
  // out[r*ldo + v*vw + t] (+)= sum over entries e in [bounds[r*bstride], bounds[r*bstride + 1])
  // of val[e] * src[idx[e] + p0[v] + t], t < vw, entries summed in order (added to out's
  // contents when `accumulate`).
  int flat_chunk;
  void (*flat_rows)(const float* src, const int64_t* idx, const float* val,
                    const int64_t* bounds, int64_t bstride, int64_t rows, const int64_t* p0,
                    float* out, int64_t ldo, bool accumulate);
  // Flat-domain SDDMM over one span of nv vectors: for r < rows and the entries e of row r
  // (bounds as flat_rows), acc[e] += sum_{v < nv, t < vw} a[r*lda + v*vw + t] *
  // src[idx[e] + xb[v] + t], each sum in a fixed order.
  void (*flat_sddmm)(const float* a, int64_t lda, const float* src, const int64_t* idx,
                     const int64_t* bounds, int64_t bstride, int64_t rows, const int64_t* xb,
                     int64_t nv, float* acc);
  // Flat-domain rows in groups of 4 sharing their entries' inputs (block masks): for g <
  // groups, r < 4, out[(4g+r)*ldo + v*vw + t] (+)= sum over entries e in [bounds[g*bstride],
  // bounds[g*bstride + 1]) of w4[4e + r] * src[idx[e] + p0[v] + t] (vectors as flat_rows).
  void (*flat_rows4)(const float* src, const int64_t* idx, const float* w4,
                     const int64_t* bounds, int64_t bstride, int64_t groups, const int64_t* p0,
                     float* out, int64_t ldo, bool accumulate);
  // Flat-domain SDDMM in row groups of 4 (block masks): for g < groups, the entries e of group
  // g (bounds as flat_rows4) and r < 4, acc[4e + r] += sum_{v < nv, t < vw}
  // a[(4g + r)*lda + v*vw + t] * src[idx[e] + xb[v] + t].
  void (*flat_sddmm4)(const float* a, int64_t lda, const float* src, const int64_t* idx,
                      const int64_t* bounds, int64_t bstride, int64_t groups, const int64_t* xb,
                      int64_t nv, float* acc);
};

const KernelTable* kernels_avx512();  // nullptr when not compiled in
const KernelTable* kernels_avx2();
const KernelTable* kernels_generic();

// The table for this CPU (AVX-512 > AVX2 > generic); SPARSEKERN_CPU_ISA=avx512|avx2|generic
// forces one (for tests of the fallbacks).
const KernelTable& kernels();

// Whether the C++ linear op `which` (0 bsr_mm, 1 bsr_mm_t, 2 sddmm) runs MKL on the dense
// W ⊙ mask for nnzb active br x bc blocks of an M x K weight (use_dense in linear_cpu.cpp).
bool linear_uses_dense(int which, int64_t nnzb, int64_t br, int64_t bc, int64_t M, int64_t K);

// Order-preserving 32-bit key of a float score (NaN highest). Inline, ISA-neutral.
inline uint32_t score_key(float s) {
  s = s + 0.0f;  // folds -0 into +0
  uint32_t u;
  __builtin_memcpy(&u, &s, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFFFFFu;  // NaN
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float key_score(uint32_t k) {
  uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float s;
  __builtin_memcpy(&s, &u, 4);
  return s;
}

}  // namespace sk
