// Per-element logic of the sparsekern CUDA kernels, as __host__ __device__ functions.
//
// This header is CUDA-free when compiled by a host compiler (g++/clang++): the CUDA
// qualifiers and intrinsics are behind `__CUDACC__` / `__CUDA_ARCH__`, so a plain C++ test
// (csrc/cuda/tests/test_kernel_math.cpp) exercises exactly the code the kernels run:
//   - the total order of growth scores (order-preserving float -> uint32 keys, NaN highest,
//     -0 folded into +0) and the composite 63-bit keys that break ties to the lower flat index,
//   - the growth score itself (|G| or the block mean, plus bonus_scale / (counter + eps),
//     rounded step by step exactly as the PyTorch reference computes it),
//   - the radix-select bookkeeping (bucket choice from a histogram, tile pruning, emission),
//   - the block index math of every kernel (the "virtual reduction axis" that concatenates a
//     block row's / block column's active blocks, output offsets, ragged edges, tile sizes).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace sparsekern {
namespace kmath {

// ----------------------------------------------------------------------------- basics
SK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
SK_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
SK_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Number of rows (or columns) of block `idx` of size `b` along an axis of length `n`
// (the last block may be ragged).
SK_HD int64_t block_extent(int64_t n, int64_t b, int64_t idx) { return min64(b, n - idx * b); }

// ----------------------------------------------------------------------------- float bits
SK_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

SK_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// IEEE round-to-nearest arithmetic that the compiler may not contract into FMAs, so a score is
// rounded step by step like the PyTorch reference (and identically in every pass).
SK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SK_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
SK_HD float rcp_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(a);
#else
  return 1.0f / a;
#endif
}

// ----------------------------------------------------------------------------- growth scores
// Reference (sparsekern/reference.py): s = |G| (block mean when (br, bc) != (1, 1)), then
// s + bonus_scale / (counter + eps), which torch evaluates as
// reciprocal(counter + eps) * bonus_scale in fp32, then the add.
SK_HD float growth_bonus(float counter, float bonus_scale, float eps) {
  return mul_rn(rcp_rn(add_rn(counter, eps)), bonus_scale);
}

// Block mean: the sum of |G| over the block's true (unpadded) entries divided by their count,
// the count formed in fp32 as the reference does (rows * cols).
SK_HD float block_mean(float sum, int64_t rows, int64_t cols) {
  return div_rn(sum, mul_rn(static_cast<float>(rows), static_cast<float>(cols)));
}

// Order-preserving 32-bit key of a score: a > b  <=>  key(a) > key(b) for non-NaN a, b;
// -0 and +0 share a key (the reference folds -0 with `s + 0.0`); every NaN gets the highest key.
SK_HD uint32_t float_key(float s) {
  if (s != s) return 0xFFFFFFFFu;
  uint32_t u = float_bits(s);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inverse of float_key (the NaN key decodes to a quiet NaN, -0 to +0).
SK_HD float key_float(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key ^ 0x80000000u) : ~key;
  return bits_float(u);
}

// Composite key: (key << 31) | (2^31 - 1 - flat). Distinct for distinct flat indices; ordering
// composites descending orders scores descending with ties (and NaNs) to the lower flat index.
// Needs flat < 2^31. The largest composite is 2^63 - 1, so composites are valid int64 values.
constexpr int kIdxBits = 31;
constexpr uint64_t kIdxMask = (uint64_t(1) << kIdxBits) - 1;
constexpr int kCompositeBits = 32 + kIdxBits;  // 63
constexpr int kDigitBits = 11;                 // radix of one histogram pass (2048 bins)
constexpr int kHistBins = 1 << kDigitBits;

SK_HD uint64_t composite(uint32_t key, uint64_t flat) {
  return (uint64_t(key) << kIdxBits) | (kIdxMask - flat);
}
SK_HD int64_t composite_flat(uint64_t c) { return int64_t(kIdxMask - (c & kIdxMask)); }
SK_HD uint32_t composite_key(uint64_t c) { return uint32_t(c >> kIdxBits); }

// ----------------------------------------------------------------------------- radix select
// The top-k composites are found by an MSD radix select over their 63 bits, `kDigitBits` at a
// time. A histogram pass (a full recomputation of the score tiles) counts the entries of the
// current bucket {c : c >> shift == prefix} by their next `width` bits; the host picks the digit
// holding the k-th largest, every entry in a higher digit is known to be selected ("above").
// When the chosen bucket fits the candidate buffer, one emission pass writes the `above`
// entries and the bucket's entries; the finish takes the top `need` of the bucket.
struct SelectState {
  uint64_t prefix;  // bucket: entries with (c >> shift) == prefix
  int shift;
  int width;        // digit width of the next histogram pass
  uint64_t need;    // how many of the bucket's entries are still to be selected
  uint64_t above;   // entries known to be selected (strictly above the bucket)
  uint64_t bucket;  // size of the bucket (valid after select_advance)
  uint64_t total;   // number of valid entries (from the first histogram)
  int first;        // 1 until the first histogram has been consumed
};

SK_HD SelectState select_init(uint64_t k) {
  SelectState st;
  st.prefix = 0;
  st.shift = kCompositeBits;
  st.width = kDigitBits;
  st.need = k;
  st.above = 0;
  st.bucket = 0;
  st.total = 0;
  st.first = 1;
  return st;
}

enum SelectResult : int {
  kSelectEmit = 0,          // run the emission pass with (prefix, shift)
  kSelectRefine = 1,        // run another histogram pass with (prefix, shift, width)
  kSelectTooFew = -1,       // fewer valid entries than k
  kSelectInconsistent = -2  // the histogram does not add up to the previous bucket
};

// Consume the histogram (1 << st->width bins) of the current bucket. `cap` = candidate
// buffer size (>= 1). Requires st->need >= 1.
SK_HD int select_advance(SelectState* st, const uint32_t* hist, uint64_t cap) {
  const int nb = 1 << st->width;
  uint64_t sum = 0;
  for (int d = 0; d < nb; ++d) sum += hist[d];
  if (st->first) {
    st->total = sum;
    st->first = 0;
    if (sum < st->need) return kSelectTooFew;
  } else if (sum != st->bucket) {
    return kSelectInconsistent;
  }
  uint64_t acc = 0;
  int d = nb - 1;
  for (; d > 0; --d) {
    if (acc + hist[d] >= st->need) break;
    acc += hist[d];
  }
  st->above += acc;
  st->need -= acc;
  st->bucket = hist[d];
  st->shift -= st->width;
  st->prefix = (st->prefix << st->width) | uint64_t(d);
  if (st->bucket <= cap || st->shift == 0) return kSelectEmit;
  st->width = st->shift < kDigitBits ? st->shift : kDigitBits;
  return kSelectRefine;
}

// Digit of `c` in a histogram pass, or false when `c` is outside the current bucket.
SK_HD bool hist_digit(uint64_t c, uint64_t prefix, int shift, int width, uint32_t* digit) {
  if ((c >> shift) != prefix) return false;
  *digit = uint32_t(c >> (shift - width)) & ((1u << width) - 1u);
  return true;
}

// Emission class of `c`: 1 = above the bucket (selected), 2 = in the bucket (candidate), 0 = out.
SK_HD int emit_class(uint64_t c, uint64_t prefix, int shift) {
  const uint64_t hi = c >> shift;
  return hi > prefix ? 1 : (hi == prefix ? 2 : 0);
}

// Tile pruning from the [min, max] composite of a tile's valid entries recorded by the first
// pass (an empty tile records min > max).
SK_HD bool tile_may_hist(uint64_t tmin, uint64_t tmax, uint64_t prefix, int shift) {
  if (tmin > tmax) return false;
  return (tmin >> shift) <= prefix && prefix <= (tmax >> shift);
}
SK_HD bool tile_may_emit(uint64_t tmin, uint64_t tmax, uint64_t prefix, int shift) {
  if (tmin > tmax) return false;
  return (tmax >> shift) >= prefix;
}

// Passes of the growth kernel.
enum GrowPass : int { kPassFirst = 0, kPassRefine = 1, kPassEmit = 2 };

// ----------------------------------------------------------------------------- growth tiling
// Score tile edge of the growth kernel (elements of G per GEMM sub-tile, both axes).
constexpr int kGrowTile = 64;

// A growth program owns a "super-tile" of sr x sc scores: 64 x 64 entries when unstructured,
// otherwise max(1, 64 / br) x max(1, 64 / bc) whole blocks (whose element rectangle it covers
// with 64 x 64 GEMM sub-tiles, in a fixed order, so every score is summed in a fixed order).
struct GrowGeom {
  int block;           // 1 when (br, bc) != (1, 1)
  int64_t nsr, nsc;    // score grid: [M, K] or [nbr, nbc]
  int sr, sc;          // scores per super-tile along each axis
  int64_t tiles_r, tiles_c;
};

SK_HD GrowGeom grow_geom(int64_t M, int64_t K, int br, int bc) {
  GrowGeom g;
  g.block = (br != 1 || bc != 1) ? 1 : 0;
  if (g.block) {
    g.nsr = ceil_div(M, br);
    g.nsc = ceil_div(K, bc);
    g.sr = br >= kGrowTile ? 1 : kGrowTile / br;
    g.sc = bc >= kGrowTile ? 1 : kGrowTile / bc;
  } else {
    g.nsr = M;
    g.nsc = K;
    g.sr = kGrowTile;
    g.sc = kGrowTile;
  }
  g.tiles_r = ceil_div(g.nsr, g.sr);
  g.tiles_c = ceil_div(g.nsc, g.sc);
  return g;
}

// Blocks (column segments of width `b`) that intersect sub-tile columns [j0, j0 + 64) of a
// super-tile whose element extent is `extent`: the first segment and their count.
SK_HD void sub_segments(int j0, int extent, int b, int* first, int* count) {
  const int hi = (j0 + kGrowTile < extent ? j0 + kGrowTile : extent) - 1;
  *first = j0 / b;
  *count = hi / b - j0 / b + 1;
}

// Local range [lo, hi) of segment `s` (block s of width b) inside sub-tile [j0, j0 + 64).
SK_HD void segment_range(int s, int j0, int b, int* lo, int* hi) {
  const int a = s * b, e = (s + 1) * b;
  *lo = (a > j0 ? a : j0) - j0;
  *hi = (e < j0 + kGrowTile ? e : j0 + kGrowTile) - j0;
}

// Upper bound on column segments of a 64-wide sub-tile when bc >= 2 (sizes the shared buffer).
constexpr int kMaxSegs = kGrowTile / 2 + 1;

// ----------------------------------------------------------------------------- spmm geometry
// Forward  y[b, m]  = sum_k x[b, k]  * Weff[m, k]: a program per (batch tile, block row r,
//   chunk of the row's br outputs); the reduction runs over the "virtual axis" v of the row's
//   active blocks laid end to end: v -> (slot = row_ptr[r] + v / bc, t = v % bc).
// Transposed dx[b, k] = sum_m dy[b, m] * Weff[m, k]: a program per (batch tile, block column c,
//   chunk of the column's bc outputs); v -> (CSC entry e = col_ptr[c] + v / br, t = v % br),
//   block row row_idx[e], values slot slot_t[e] (no data transpose).
// Weff[m, k] = w[...] * mask[m, k] on active blocks, with w dense [M, K] or bsr [nnzb, br, bc].
// A reduction entry gives the activation column, and base offsets into w and mask to which the
// output's own offsets (OutIdx) are added.
struct RedEntry {
  int64_t act;    // column of x (forward) / dy (transposed); -1 = padding (past the edge/end)
  int64_t wbase;  // offset into w, add OutIdx::wq
  int64_t mbase;  // offset into mask, add OutIdx::mq
};

struct OutIdx {
  int64_t index;  // output column of y / dx; -1 = no such output (past the block or the edge)
  int64_t wq;
  int64_t mq;
};

SK_HD RedEntry fwd_entry(int64_t v, int64_t len, int64_t row_begin, const int32_t* col_idx,
                         int br, int bc, int64_t K, bool bsr) {
  RedEntry e;
  e.act = -1;
  e.wbase = 0;
  e.mbase = 0;
  if (v >= len) return e;
  const int64_t slot = row_begin + v / bc;
  const int64_t t = v % bc;
  const int64_t col = int64_t(col_idx[slot]) * bc + t;
  if (col >= K) return e;
  e.act = col;
  e.wbase = bsr ? slot * br * bc + t : col;
  e.mbase = col;
  return e;
}

SK_HD OutIdx fwd_out(int64_t i, int64_t r, int br, int bc, int64_t M, int64_t K, bool bsr) {
  OutIdx o;
  const int64_t m = r * br + i;
  if (i >= br || m >= M) {
    o.index = -1;
    o.wq = 0;
    o.mq = 0;
    return o;
  }
  o.index = m;
  o.wq = bsr ? i * bc : m * K;
  o.mq = m * K;
  return o;
}

SK_HD RedEntry t_entry(int64_t v, int64_t len, int64_t col_begin, const int32_t* row_idx,
                       const int32_t* slot_t, int64_t c, int br, int bc, int64_t M, int64_t K,
                       bool bsr) {
  RedEntry e;
  e.act = -1;
  e.wbase = 0;
  e.mbase = 0;
  if (v >= len) return e;
  const int64_t ent = col_begin + v / br;
  const int64_t t = v % br;
  const int64_t m = int64_t(row_idx[ent]) * br + t;
  if (m >= M) return e;
  e.act = m;
  e.wbase = bsr ? int64_t(slot_t[ent]) * br * bc + t * bc : m * K + c * bc;
  e.mbase = m * K + c * bc;
  return e;
}

SK_HD OutIdx t_out(int64_t j, int64_t c, int br, int bc, int64_t M, int64_t K, bool bsr) {
  (void)br;
  (void)M;
  (void)bsr;
  OutIdx o;
  const int64_t k = c * bc + j;
  if (j >= bc || k >= K) {
    o.index = -1;
    o.wq = 0;
    o.mq = 0;
    return o;
  }
  o.index = k;
  o.wq = j;
  o.mq = j;
  return o;
}

// Tile configuration of the spmm kernels by the number of outputs per block line
// (br forward, bc transposed): 0 = 64 batch x 64 outputs, 1 = 128 x 16, 2 = 256 x 4, 3 = 256 x 1.
SK_HD int spmm_config(int odim) { return odim > 16 ? 0 : odim > 4 ? 1 : odim > 1 ? 2 : 3; }

// ----------------------------------------------------------------------------- sddmm geometry
// SDDMM: a program per (chunk of a block row's virtual columns, chunk of the block's rows).
// Virtual column v of block row r -> (slot = row_ptr[r] + v / bc, t = v % bc); the result for
// block row i lands at out[slot * br * bc + i * bc + t]. Programs are numbered through the
// prefix sum `chunk_ptr` of the rows' chunk counts.
struct SddmmCol {
  int64_t col;   // column of x; -1 = past the matrix edge (the output is a zero pad)
  int64_t obase; // out offset slot * br * bc + t; -1 = past the row's last block
};

SK_HD SddmmCol sddmm_col(int64_t v, int64_t len, int64_t row_begin, const int32_t* col_idx,
                         int br, int bc, int64_t K) {
  SddmmCol s;
  if (v >= len) {
    s.col = -1;
    s.obase = -1;
    return s;
  }
  const int64_t slot = row_begin + v / bc;
  const int64_t t = v % bc;
  const int64_t col = int64_t(col_idx[slot]) * bc + t;
  s.col = col < K ? col : -1;
  s.obase = slot * br * bc + t;
  return s;
}

SK_HD int64_t sddmm_row_chunks(int64_t nnz_row, int bc, int tile_cols) {
  return ceil_div(nnz_row * bc, tile_cols);
}

// Upper bound on the number of chunks of all rows (the grid is launched without a host sync).
SK_HD int64_t sddmm_chunk_bound(int64_t nnzb, int64_t nbr, int bc, int tile_cols) {
  return ceil_div(nnzb * bc, tile_cols) + nbr;
}

// The block row of work item w: the r with ptr[r] <= w < ptr[r + 1] (ptr non-decreasing,
// ptr[0] = 0, w < ptr[n]); unique, since an empty row (ptr[r] == ptr[r + 1]) holds no item.
SK_HD int64_t find_row(const int32_t* ptr, int64_t n, int64_t w) {
  int64_t lo = 0, hi = n;  // invariant: ptr[lo] <= w < ptr[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (int64_t(ptr[mid]) <= w) lo = mid; else hi = mid;
  }
  return lo;
}

// Tile configuration of the sddmm kernel by br: 0 = 64 rows x 64 columns, 1 = 16 x 128,
// 2 = 4 x 256, 3 = 1 x 256.
SK_HD int sddmm_config(int br) { return br > 16 ? 0 : br > 4 ? 1 : br > 1 ? 2 : 3; }
SK_HD int sddmm_tile_rows(int cfg) { return cfg == 0 ? 64 : cfg == 1 ? 16 : cfg == 2 ? 4 : 1; }
SK_HD int sddmm_tile_cols(int cfg) { return cfg == 0 ? 64 : cfg == 1 ? 128 : 256; }

}  // namespace kmath
}  // namespace sparsekern
