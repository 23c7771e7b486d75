// Host test of csrc/cuda/kernel_math.cuh, compiled with a plain C++ compiler (no CUDA):
//   test_kernel_math selftest          internal checks (key order, radix select, block math,
//                                      host emulations of the kernels' index walks vs naive loops)
//   test_kernel_math keys IN OUT       float32 scores -> uint64 composites (flat = position)
//   test_kernel_math grow DIR          emulate the growth top-k pipeline on DIR's inputs
//   test_kernel_math spmm DIR          emulate bsr_mm / bsr_mm_t / sddmm on DIR's inputs
// The Python test (tests/test_cuda_kernels.py) compares the file modes with sparsekern.reference.
// The emulations walk exactly the index functions the CUDA kernels call, in the kernels' order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/kernel_math.cuh"
#include "bin_io.h"

namespace km = sparsekern::kmath;

static int g_failures = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      ++g_failures;                                                          \
      if (g_failures <= 20) std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", \
                                         __FILE__, __LINE__, #cond);         \
    }                                                                        \
  } while (0)

// ----------------------------------------------------------------------------- growth emulation
struct GrowInput {
  int64_t B, M, K;
  int br, bc;
  std::vector<float> dy, x;       // [B, M], [B, K]
  std::vector<uint8_t> exclude;   // [nsr * nsc]
  std::vector<float> counter;     // empty = none
  float bonus_scale, eps;
};

struct Scored {
  bool valid;
  float s;
  int64_t flat;
};

// G sub-tile [m0, m0 + 64) x [k0, k0 + 64), zero past m_end / k_end (kernel: score_gemm).
static void host_gemm(const GrowInput& in, int64_t m0, int64_t m_end, int64_t k0, int64_t k_end,
                      float acc[km::kGrowTile][km::kGrowTile]) {
  const int T = km::kGrowTile;
  for (int p = 0; p < T; ++p)
    for (int q = 0; q < T; ++q) {
      float a = 0.0f;
      const int64_t m = m0 + p, k = k0 + q;
      if (m < m_end && k < k_end)
        for (int64_t b = 0; b < in.B; ++b) a = std::fma(in.dy[b * in.M + m], in.x[b * in.K + k], a);
      acc[p][q] = a;
    }
}

// The scores a growth program computes for `tile`, in the kernel's order (elem_tile/block_tile).
static std::vector<Scored> tile_scores(const GrowInput& in, const km::GrowGeom& geo, int64_t tile) {
  static float acc[km::kGrowTile][km::kGrowTile];
  const int T = km::kGrowTile;
  std::vector<Scored> out;
  if (!geo.block) {
    const int64_t m0 = (tile / geo.tiles_c) * T, k0 = (tile % geo.tiles_c) * T;
    host_gemm(in, m0, in.M, k0, in.K, acc);
    for (int p = 0; p < T; ++p)
      for (int q = 0; q < T; ++q) {
        const int64_t m = m0 + p, k = k0 + q, flat = m * in.K + k;
        bool valid = m < in.M && k < in.K;
        if (valid) valid = in.exclude[flat] == 0;
        float s = std::fabs(acc[p][q]);
        if (valid && !in.counter.empty())
          s = km::add_rn(s, km::growth_bonus(in.counter[flat], in.bonus_scale, in.eps));
        out.push_back({valid, s, flat});
      }
    return out;
  }
  const int br = in.br, bc = in.bc, SR = geo.sr, SC = geo.sc;
  const int64_t gr0 = (tile / geo.tiles_c) * SR, gc0 = (tile % geo.tiles_c) * SC;
  const int64_t row_base = gr0 * br, col_base = gc0 * bc;
  const int ER = SR * br, EC = SC * bc;
  const int64_t row_lim = std::min<int64_t>(in.M, row_base + ER);
  const int64_t col_lim = std::min<int64_t>(in.K, col_base + EC);
  std::vector<float> s_block(size_t(SR) * SC, 0.0f);
  static float abs_[km::kGrowTile][km::kGrowTile];
  static float rows_[km::kGrowTile][km::kMaxSegs];
  for (int i0 = 0; i0 < ER; i0 += T) {
    if (row_base + i0 >= in.M) break;
    for (int j0 = 0; j0 < EC; j0 += T) {
      if (col_base + j0 >= in.K) break;
      host_gemm(in, row_base + i0, row_lim, col_base + j0, col_lim, acc);
      for (int p = 0; p < T; ++p)
        for (int q = 0; q < T; ++q) {
          const bool inside = row_base + i0 + p < row_lim && col_base + j0 + q < col_lim;
          abs_[p][q] = inside ? std::fabs(acc[p][q]) : 0.0f;
        }
      int cb0, nseg, rb0, nrb;
      km::sub_segments(j0, EC, bc, &cb0, &nseg);
      km::sub_segments(i0, ER, br, &rb0, &nrb);
      CHECK(nseg >= 1 && (bc == 1 || nseg <= km::kMaxSegs));
      if (bc > 1) {
        for (int lr = 0; lr < T; ++lr)
          for (int sg = 0; sg < nseg; ++sg) {
            int lo, hi;
            km::segment_range(cb0 + sg, j0, bc, &lo, &hi);
            float sum = 0.0f;
            for (int q = lo; q < hi; ++q) sum = km::add_rn(sum, abs_[lr][q]);
            rows_[lr][sg] = sum;
          }
      }
      for (int rs = 0; rs < nrb; ++rs)
        for (int sg = 0; sg < nseg; ++sg) {
          int lo, hi;
          km::segment_range(rb0 + rs, i0, br, &lo, &hi);
          float sum = 0.0f;
          for (int p = lo; p < hi; ++p) sum = km::add_rn(sum, bc > 1 ? rows_[p][sg] : abs_[p][sg]);
          CHECK((rb0 + rs) < SR && (cb0 + sg) < SC);
          float& dst = s_block[size_t(rb0 + rs) * SC + cb0 + sg];
          dst = km::add_rn(dst, sum);
        }
    }
  }
  for (int idx = 0; idx < SR * SC; ++idx) {
    const int64_t gbr = gr0 + idx / SC, gbc = gc0 + idx % SC;
    const int64_t flat = gbr * geo.nsc + gbc;
    bool valid = gbr < geo.nsr && gbc < geo.nsc;
    if (valid) valid = in.exclude[flat] == 0;
    float s = 0.0f;
    if (valid) {
      s = km::block_mean(s_block[idx], km::block_extent(in.M, br, gbr),
                         km::block_extent(in.K, bc, gbc));
      if (!in.counter.empty())
        s = km::add_rn(s, km::growth_bonus(in.counter[flat], in.bonus_scale, in.eps));
    }
    out.push_back({valid, s, flat});
  }
  return out;
}

struct GrowResult {
  int status;  // 0 ok, else a SelectResult
  std::vector<int64_t> flat;
  std::vector<float> scores;
  int passes;
};

// The host side of the glue (sparsekern_cuda.cpp grow_topk_cuda) driving emulated passes.
static GrowResult emulate_grow(const GrowInput& in, int64_t k, uint64_t cap) {
  GrowResult res{0, {}, {}, 0};
  const km::GrowGeom geo = km::grow_geom(in.M, in.K, in.br, in.bc);
  const int64_t tiles = geo.tiles_r * geo.tiles_c;
  if (k == 0) return res;
  std::vector<uint64_t> tmin(size_t(tiles), ~0ull), tmax(size_t(tiles), 0ull);
  km::SelectState st = km::select_init(uint64_t(k));
  int pass = km::kPassFirst;
  for (;;) {
    std::vector<uint32_t> hist(km::kHistBins, 0u);
    for (int64_t t = 0; t < tiles; ++t) {
      if (pass != km::kPassFirst && !km::tile_may_hist(tmin[t], tmax[t], st.prefix, st.shift))
        continue;
      for (const Scored& e : tile_scores(in, geo, t)) {
        if (!e.valid) continue;
        const uint64_t c = km::composite(km::float_key(e.s), uint64_t(e.flat));
        uint32_t d;
        if (km::hist_digit(c, st.prefix, st.shift, st.width, &d)) ++hist[d];
        if (pass == km::kPassFirst) {
          tmin[t] = std::min(tmin[t], c);
          tmax[t] = std::max(tmax[t], c);
        }
      }
    }
    ++res.passes;
    const int r = km::select_advance(&st, hist.data(), cap);
    if (r < 0) {
      res.status = r;
      return res;
    }
    if (r == km::kSelectEmit) break;
    pass = km::kPassRefine;
  }
  std::vector<uint64_t> above, cand;
  for (int64_t t = 0; t < tiles; ++t) {
    const bool go = km::tile_may_emit(tmin[t], tmax[t], st.prefix, st.shift);
    for (const Scored& e : tile_scores(in, geo, t)) {
      if (!e.valid) continue;
      const uint64_t c = km::composite(km::float_key(e.s), uint64_t(e.flat));
      const int cls = km::emit_class(c, st.prefix, st.shift);
      CHECK(go || cls == 0);  // pruned tiles hold nothing to emit
      if (!go) continue;
      if (cls == 1) above.push_back(c);
      if (cls == 2) cand.push_back(c);
    }
  }
  ++res.passes;
  CHECK(above.size() == st.above);
  CHECK(cand.size() == st.bucket);
  CHECK(cand.size() <= cap || st.shift == 0);
  std::sort(cand.begin(), cand.end(), std::greater<uint64_t>());
  CHECK(st.need >= 1 && st.need <= cand.size());
  std::vector<uint64_t> all(above);
  all.insert(all.end(), cand.begin(), cand.begin() + int64_t(st.need));
  std::sort(all.begin(), all.end(), std::greater<uint64_t>());
  for (uint64_t c : all) {
    res.flat.push_back(km::composite_flat(c));
    res.scores.push_back(km::key_float(km::composite_key(c)));
  }
  return res;
}

// ----------------------------------------------------------------------------- spmm emulation
struct SpmmInput {
  int64_t B, M, K;
  int br, bc;
  bool bsr;
  std::vector<float> x, dy, w;  // x [B, K], dy [B, M], w dense [M, K] or bsr [nnzb, br, bc]
  std::vector<uint8_t> mask;    // [M, K]
  std::vector<int32_t> row_ptr, col_idx, col_ptr, row_idx, slot_t;
};

static const int kSpmmQ[4] = {64, 16, 4, 1};
static const int kKC = 32;

// bsr_mm (trans = false) or bsr_mm_t (trans = true) along the kernel's walk; checks that every
// output is written exactly once.
static std::vector<float> emulate_spmm(const SpmmInput& in, bool trans) {
  const int64_t B = in.B, M = in.M, K = in.K;
  const int br = in.br, bc = in.bc;
  const int odim = trans ? bc : br, rdim = trans ? br : bc;
  const int Q = kSpmmQ[km::spmm_config(odim)];
  const int64_t n_lines = trans ? km::ceil_div(K, bc) : km::ceil_div(M, br);
  const int64_t n_ochunks = km::ceil_div(odim, Q);
  const std::vector<float>& act = trans ? in.dy : in.x;
  const int64_t act_ld = trans ? M : K, out_ld = trans ? K : M;
  const std::vector<int32_t>& ptr = trans ? in.col_ptr : in.row_ptr;
  std::vector<float> out(size_t(B * out_ld), std::numeric_limits<float>::quiet_NaN());
  std::vector<int> writes(out.size(), 0);
  for (int64_t line = 0; line < n_lines; ++line) {
    const int64_t begin = ptr[line];
    const int64_t len = (int64_t(ptr[line + 1]) - begin) * rdim;
    for (int64_t oc = 0; oc < n_ochunks; ++oc)
      for (int q = 0; q < Q; ++q) {
        const int64_t o = oc * Q + q;
        const km::OutIdx oi = trans ? km::t_out(o, line, br, bc, M, K, in.bsr)
                                    : km::fwd_out(o, line, br, bc, M, K, in.bsr);
        if (oi.index < 0) continue;
        for (int64_t b = 0; b < B; ++b) {
          float acc = 0.0f;
          for (int64_t v0 = 0; v0 < len; v0 += kKC)
            for (int t = 0; t < kKC; ++t) {
              const km::RedEntry e =
                  trans ? km::t_entry(v0 + t, len, begin, in.row_idx.data(), in.slot_t.data(),
                                      line, br, bc, M, K, in.bsr)
                        : km::fwd_entry(v0 + t, len, begin, in.col_idx.data(), br, bc, K, in.bsr);
              if (e.act < 0) continue;
              const float mv = in.mask[size_t(e.mbase + oi.mq)] ? 1.0f : 0.0f;
              const float wv = in.w[size_t(e.wbase + oi.wq)] * mv;
              acc = std::fma(act[size_t(b * act_ld + e.act)], wv, acc);
            }
          out[size_t(b * out_ld + oi.index)] = acc;
          ++writes[size_t(b * out_ld + oi.index)];
        }
      }
  }
  for (int n : writes) CHECK(n == 1);
  return out;
}

// sddmm along the kernel's walk (chunk scan, upper-bound grid, find_row, column decode).
static std::vector<float> emulate_sddmm(const SpmmInput& in) {
  const int64_t B = in.B, M = in.M, K = in.K;
  const int br = in.br, bc = in.bc;
  const int64_t nbr = km::ceil_div(M, br), nnzb = int64_t(in.col_idx.size());
  const int cfg = km::sddmm_config(br);
  const int P = km::sddmm_tile_rows(cfg), Q = km::sddmm_tile_cols(cfg);
  std::vector<float> out(size_t(nnzb) * br * bc, std::numeric_limits<float>::quiet_NaN());
  std::vector<int> writes(out.size(), 0);
  if (nnzb == 0) return out;
  std::vector<int32_t> chunk_ptr(size_t(nbr + 1), 0);
  for (int64_t r = 0; r < nbr; ++r)
    chunk_ptr[r + 1] = chunk_ptr[r] +
        int32_t(km::sddmm_row_chunks(int64_t(in.row_ptr[r + 1]) - in.row_ptr[r], bc, Q));
  const int64_t n_rchunks = km::ceil_div(br, P);
  const int64_t grid = km::sddmm_chunk_bound(nnzb, nbr, bc, Q) * n_rchunks;
  CHECK(chunk_ptr[nbr] * n_rchunks <= grid);
  for (int64_t cta = 0; cta < grid; ++cta) {
    const int rc = int(cta % n_rchunks);
    const int64_t work = cta / n_rchunks;
    if (work >= chunk_ptr[nbr]) continue;
    const int64_t r = km::find_row(chunk_ptr.data(), nbr, work);
    CHECK(chunk_ptr[r] <= work && work < chunk_ptr[r + 1]);
    const int64_t lc = work - chunk_ptr[r];
    const int64_t begin = in.row_ptr[r];
    const int64_t len = (int64_t(in.row_ptr[r + 1]) - begin) * bc;
    for (int p = 0; p < P; ++p) {
      const int64_t bi = int64_t(rc) * P + p;
      if (bi >= br) continue;
      const int64_t m = r * br + bi;
      const int64_t row = m < M ? m : -1;
      for (int q = 0; q < Q; ++q) {
        const km::SddmmCol c = km::sddmm_col(lc * Q + q, len, begin, in.col_idx.data(), br, bc, K);
        if (c.obase < 0) continue;
        float acc = 0.0f;
        if (row >= 0 && c.col >= 0)
          for (int64_t b = 0; b < B; ++b)
            acc = std::fma(in.dy[size_t(b * M + row)], in.x[size_t(b * K + c.col)], acc);
        float val = 0.0f;
        if (row >= 0 && c.col >= 0) val = acc * (in.mask[size_t(row * K + c.col)] ? 1.0f : 0.0f);
        out[size_t(c.obase + bi * bc)] = val;
        ++writes[size_t(c.obase + bi * bc)];
      }
    }
  }
  for (int n : writes) CHECK(n == 1);
  return out;
}

// ----------------------------------------------------------------------------- self tests
static std::vector<float> special_floats() {
  const float inf = std::numeric_limits<float>::infinity();
  const float den = std::numeric_limits<float>::denorm_min();
  return {-inf, -3.5f, -1.0f, -den, -0.0f, 0.0f, den, 1e-30f, 0.5f, 1.0f, 1.0000001f, 3.5f,
          std::numeric_limits<float>::max(), inf};
}

static void test_keys() {
  const std::vector<float> v = special_floats();
  for (float a : v)
    for (float b : v) {
      CHECK((a < b) == (km::float_key(a) < km::float_key(b)));
      CHECK((a == b) == (km::float_key(a) == km::float_key(b)));
    }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float neg_nan = km::bits_float(km::float_bits(nan) | 0x80000000u);
  CHECK(km::float_key(nan) == 0xFFFFFFFFu);
  CHECK(km::float_key(neg_nan) == 0xFFFFFFFFu);
  for (float a : v) {
    CHECK(km::float_key(a) < km::float_key(nan));
    const float back = km::key_float(km::float_key(a));
    CHECK(km::float_bits(back) == km::float_bits(a + 0.0f));  // -0 folds to +0
  }
  CHECK(std::isnan(km::key_float(km::float_key(nan))));
  // random bit patterns: order and round trip
  std::mt19937 rng(7);
  for (int i = 0; i < 20000; ++i) {
    const float a = km::bits_float(uint32_t(rng())), b = km::bits_float(uint32_t(rng()));
    if (a != a || b != b) continue;
    CHECK((a < b) == (km::float_key(a) < km::float_key(b)));
    CHECK(km::float_bits(km::key_float(km::float_key(a))) == km::float_bits(a + 0.0f));
  }
  // composites: the score decides, then the lower flat index wins; round trip
  const uint64_t big = km::kIdxMask;
  CHECK(km::composite(km::float_key(1.0f), 5) > km::composite(km::float_key(1.0f), 6));
  CHECK(km::composite(km::float_key(2.0f), big) > km::composite(km::float_key(1.0f), 0));
  CHECK(km::composite(km::float_key(nan), 9) > km::composite(km::float_key(INFINITY), 0));
  CHECK(km::composite(0xFFFFFFFFu, 0) == uint64_t(INT64_MAX));
  for (uint64_t f : {uint64_t(0), uint64_t(1), uint64_t(12345), big}) {
    const uint64_t c = km::composite(0x9ABCDEF0u, f);
    CHECK(km::composite_flat(c) == int64_t(f));
    CHECK(km::composite_key(c) == 0x9ABCDEF0u);
  }
  // the bonus is rounded like torch: reciprocal(counter + eps) * bonus_scale, then the add
  // (7 + 1e-3, 0.7) is a case where bonus_scale / (counter + eps) would round differently
  CHECK(km::growth_bonus(7.0f, 0.7f, 1e-3f) == (1.0f / (7.0f + 1e-3f)) * 0.7f);
  CHECK(km::growth_bonus(7.0f, 0.7f, 1e-3f) != 0.7f / (7.0f + 1e-3f));
  CHECK(km::block_mean(10.0f, 2, 3) == 10.0f / 6.0f);
  CHECK(km::block_extent(10, 4, 2) == 2 && km::block_extent(10, 4, 1) == 4);
}

// Radix select over an explicit composite list vs a full sort.
static void test_select() {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 400; ++trial) {
    const int n = 1 + int(rng() % 3000);
    const int distinct = 1 + int(rng() % 40);  // heavy ties
    std::vector<uint64_t> comp;
    for (int i = 0; i < n; ++i) {
      const float s = (rng() % 17 == 0) ? std::numeric_limits<float>::quiet_NaN()
                                        : float(int(rng() % distinct)) - 3.0f;
      comp.push_back(km::composite(km::float_key(s), uint64_t(i) * 977u % (uint64_t(1) << 31)));
    }
    std::sort(comp.begin(), comp.end());
    comp.erase(std::unique(comp.begin(), comp.end()), comp.end());
    const uint64_t k = 1 + rng() % comp.size();
    const uint64_t cap = 1 + rng() % 64;
    km::SelectState st = km::select_init(k);
    int guard = 0, r;
    for (;;) {
      std::vector<uint32_t> hist(km::kHistBins, 0u);
      for (uint64_t c : comp) {
        uint32_t d;
        if (km::hist_digit(c, st.prefix, st.shift, st.width, &d)) ++hist[d];
      }
      r = km::select_advance(&st, hist.data(), cap);
      if (r != km::kSelectRefine || ++guard > 8) break;
    }
    CHECK(r == km::kSelectEmit);
    CHECK(guard <= 6);
    std::vector<uint64_t> above, cand;
    for (uint64_t c : comp) {
      const int cls = km::emit_class(c, st.prefix, st.shift);
      if (cls == 1) above.push_back(c);
      if (cls == 2) cand.push_back(c);
    }
    CHECK(above.size() == st.above && cand.size() == st.bucket && st.above + st.need == k);
    CHECK(cand.size() <= cap || st.shift == 0);
    std::sort(cand.begin(), cand.end(), std::greater<uint64_t>());
    std::vector<uint64_t> got(above);
    got.insert(got.end(), cand.begin(), cand.begin() + int64_t(st.need));
    std::sort(got.begin(), got.end(), std::greater<uint64_t>());
    std::vector<uint64_t> want(comp.rbegin(), comp.rbegin() + int64_t(k));
    CHECK(got == want);
  }
  // too few entries, and an inconsistent second histogram
  std::vector<uint32_t> hist(km::kHistBins, 0u);
  hist[5] = 3;
  km::SelectState st = km::select_init(4);
  CHECK(km::select_advance(&st, hist.data(), 100) == km::kSelectTooFew);
  hist[5] = 300;
  st = km::select_init(4);
  CHECK(km::select_advance(&st, hist.data(), 10) == km::kSelectRefine);
  CHECK(st.bucket == 300 && st.above == 0 && st.need == 4 && st.shift == 52 && st.prefix == 5);
  hist[5] = 299;  // the refinement must re-count the same 300 entries
  CHECK(km::select_advance(&st, hist.data(), 10) == km::kSelectInconsistent);
  // pruning predicates
  CHECK(!km::tile_may_hist(5, 4, 0, 63) && !km::tile_may_emit(5, 4, 0, 63));
  CHECK(km::tile_may_hist(uint64_t(3) << 52, uint64_t(7) << 52, 5, 52));
  CHECK(!km::tile_may_hist(uint64_t(6) << 52, uint64_t(7) << 52, 5, 52));
  CHECK(km::tile_may_emit(uint64_t(1) << 52, uint64_t(6) << 52, 5, 52));
  CHECK(!km::tile_may_emit(uint64_t(1) << 52, uint64_t(4) << 52, 5, 52));
}

static void test_geometry() {
  // segments of a 64-wide sub-tile partition its columns inside the super-tile
  for (int b = 1; b <= 200; ++b) {
    const int S = b >= km::kGrowTile ? 1 : km::kGrowTile / b;
    const int extent = S * b;
    std::vector<int> cover(size_t(extent), 0);
    for (int j0 = 0; j0 < extent; j0 += km::kGrowTile) {
      int first, count;
      km::sub_segments(j0, extent, b, &first, &count);
      CHECK(b == 1 || count <= km::kMaxSegs);
      CHECK(first + count <= S);
      for (int s = first; s < first + count; ++s) {
        int lo, hi;
        km::segment_range(s, j0, b, &lo, &hi);
        CHECK(lo < hi && hi <= km::kGrowTile);
        for (int q = lo; q < hi; ++q) {
          CHECK(j0 + q >= s * b && j0 + q < (s + 1) * b);
          ++cover[size_t(j0 + q)];
        }
      }
    }
    for (int c : cover) CHECK(c == 1);
  }
  const km::GrowGeom g1 = km::grow_geom(100, 130, 1, 1);
  CHECK(!g1.block && g1.nsr == 100 && g1.nsc == 130 && g1.tiles_r == 2 && g1.tiles_c == 3);
  const km::GrowGeom g2 = km::grow_geom(100, 130, 3, 100);
  CHECK(g2.block && g2.nsr == 34 && g2.nsc == 2 && g2.sr == 21 && g2.sc == 1 &&
        g2.tiles_r == 2 && g2.tiles_c == 2);
  // find_row with empty rows
  const int32_t ptr[] = {0, 2, 2, 2, 5, 6, 6};
  const int64_t want[] = {0, 0, 3, 3, 3, 4};
  for (int w = 0; w < 6; ++w) CHECK(km::find_row(ptr, 6, w) == want[w]);
  CHECK(km::spmm_config(64) == 0 && km::spmm_config(17) == 0 && km::spmm_config(16) == 1 &&
        km::spmm_config(5) == 1 && km::spmm_config(4) == 2 && km::spmm_config(2) == 2 &&
        km::spmm_config(1) == 3);
}

// Random masks and topologies (built here like sparsekern/topology.py) for the spmm emulations.
static SpmmInput random_spmm(std::mt19937& rng, bool bsr) {
  SpmmInput in;
  in.B = 1 + rng() % 5;
  in.M = 1 + rng() % 70;
  in.K = 1 + rng() % 70;
  const int sizes[] = {1, 2, 3, 4, 5, 8, 16, 17, 32, 64, 70};
  in.br = sizes[rng() % 11];
  in.bc = sizes[rng() % 11];
  in.bsr = bsr;
  const int64_t nbr = km::ceil_div(in.M, in.br), nbc = km::ceil_div(in.K, in.bc);
  const double density = double(rng() % 5) / 4.0;
  std::uniform_real_distribution<double> U(0.0, 1.0);
  std::vector<uint8_t> bm(size_t(nbr * nbc));
  for (auto& b : bm) b = U(rng) < density;
  in.mask.assign(size_t(in.M * in.K), 0);
  for (int64_t m = 0; m < in.M; ++m)
    for (int64_t k = 0; k < in.K; ++k)
      in.mask[size_t(m * in.K + k)] = bm[size_t((m / in.br) * nbc + k / in.bc)] && (rng() % 4 != 0);
  in.row_ptr.assign(size_t(nbr + 1), 0);
  for (int64_t r = 0; r < nbr; ++r)
    for (int64_t c = 0; c < nbc; ++c)
      if (bm[size_t(r * nbc + c)]) {
        in.col_idx.push_back(int32_t(c));
        ++in.row_ptr[size_t(r + 1)];
      }
  for (int64_t r = 0; r < nbr; ++r) in.row_ptr[size_t(r + 1)] += in.row_ptr[size_t(r)];
  in.col_ptr.assign(size_t(nbc + 1), 0);
  for (int64_t c = 0; c < nbc; ++c) {
    for (int64_t r = 0; r < nbr; ++r)
      for (int32_t s = in.row_ptr[size_t(r)]; s < in.row_ptr[size_t(r + 1)]; ++s)
        if (in.col_idx[size_t(s)] == c) {
          in.row_idx.push_back(int32_t(r));
          in.slot_t.push_back(s);
        }
    in.col_ptr[size_t(c + 1)] = int32_t(in.row_idx.size());
  }
  auto val = [&]() { return float(int(rng() % 7) - 3); };
  in.x.resize(size_t(in.B * in.K));
  in.dy.resize(size_t(in.B * in.M));
  for (auto& v : in.x) v = val();
  for (auto& v : in.dy) v = val();
  const int64_t nnzb = int64_t(in.col_idx.size());
  in.w.resize(bsr ? size_t(nnzb) * in.br * in.bc : size_t(in.M * in.K));
  for (auto& v : in.w) v = val();
  return in;
}

// Dense effective weight of an SpmmInput.
static std::vector<float> effective(const SpmmInput& in) {
  std::vector<float> W(size_t(in.M * in.K), 0.0f);
  const int64_t nbr = km::ceil_div(in.M, in.br);
  for (int64_t r = 0; r < nbr; ++r)
    for (int32_t s = in.row_ptr[size_t(r)]; s < in.row_ptr[size_t(r + 1)]; ++s)
      for (int i = 0; i < in.br; ++i)
        for (int j = 0; j < in.bc; ++j) {
          const int64_t m = r * in.br + i, k = int64_t(in.col_idx[size_t(s)]) * in.bc + j;
          if (m >= in.M || k >= in.K) continue;
          const float w = in.bsr ? in.w[(size_t(s) * in.br + i) * in.bc + j]
                                 : in.w[size_t(m * in.K + k)];
          W[size_t(m * in.K + k)] = in.mask[size_t(m * in.K + k)] ? w : 0.0f;
        }
  return W;
}

static void test_spmm() {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const SpmmInput in = random_spmm(rng, trial % 2 == 1);
    const std::vector<float> W = effective(in);
    const std::vector<float> y = emulate_spmm(in, false), dx = emulate_spmm(in, true);
    for (int64_t b = 0; b < in.B; ++b) {
      for (int64_t m = 0; m < in.M; ++m) {
        float s = 0;
        for (int64_t k = 0; k < in.K; ++k)
          s += in.x[size_t(b * in.K + k)] * W[size_t(m * in.K + k)];
        CHECK(y[size_t(b * in.M + m)] == s);
      }
      for (int64_t k = 0; k < in.K; ++k) {
        float s = 0;
        for (int64_t m = 0; m < in.M; ++m)
          s += in.dy[size_t(b * in.M + m)] * W[size_t(m * in.K + k)];
        CHECK(dx[size_t(b * in.K + k)] == s);
      }
    }
    const std::vector<float> g = emulate_sddmm(in);
    const int64_t nbr = km::ceil_div(in.M, in.br);
    for (int64_t r = 0; r < nbr; ++r)
      for (int32_t s = in.row_ptr[size_t(r)]; s < in.row_ptr[size_t(r + 1)]; ++s)
        for (int i = 0; i < in.br; ++i)
          for (int j = 0; j < in.bc; ++j) {
            const int64_t m = r * in.br + i, k = int64_t(in.col_idx[size_t(s)]) * in.bc + j;
            float want = 0.0f;
            if (m < in.M && k < in.K && in.mask[size_t(m * in.K + k)])
              for (int64_t b = 0; b < in.B; ++b)
                want += in.dy[size_t(b * in.M + m)] * in.x[size_t(b * in.K + k)];
            CHECK(g[(size_t(s) * in.br + i) * in.bc + j] == want);
          }
  }
}

// Growth emulation vs a direct computation of the same scores and a full sort.
static void test_grow() {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 60; ++trial) {
    GrowInput in;
    in.B = 1 + rng() % 4;
    in.M = 1 + rng() % 150;
    in.K = 1 + rng() % 150;
    const int sizes[] = {1, 1, 1, 2, 3, 4, 7, 16, 64, 65, 100};
    in.br = sizes[rng() % 11];
    in.bc = sizes[rng() % 11];
    in.dy.resize(size_t(in.B * in.M));
    in.x.resize(size_t(in.B * in.K));
    for (auto& v : in.dy) v = float(int(rng() % 5) - 2);
    for (auto& v : in.x) v = float(int(rng() % 5) - 2);
    const km::GrowGeom geo = km::grow_geom(in.M, in.K, in.br, in.bc);
    const int64_t n = geo.nsr * geo.nsc;
    in.exclude.resize(size_t(n));
    for (auto& e : in.exclude) e = rng() % 3 == 0;
    in.bonus_scale = 0.7f;
    in.eps = 1e-3f;
    if (trial % 3 == 0) {
      in.counter.resize(size_t(n));
      for (auto& c : in.counter) c = float(rng() % 4);
    }
    int64_t allowed = 0;
    for (auto e : in.exclude) allowed += e == 0;
    // direct scores
    std::vector<float> s(size_t(n), 0.0f);
    for (int64_t r = 0; r < geo.nsr; ++r)
      for (int64_t c = 0; c < geo.nsc; ++c) {
        float sum = 0.0f;
        const int64_t rows = geo.block ? km::block_extent(in.M, in.br, r) : 1;
        const int64_t cols = geo.block ? km::block_extent(in.K, in.bc, c) : 1;
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; ++j) {
            const int64_t m = (geo.block ? r * in.br : r) + i, k = (geo.block ? c * in.bc : c) + j;
            float g = 0.0f;
            for (int64_t b = 0; b < in.B; ++b)
              g += in.dy[size_t(b * in.M + m)] * in.x[size_t(b * in.K + k)];
            sum += std::fabs(g);
          }
        float v = geo.block ? km::block_mean(sum, rows, cols) : sum;
        if (!in.counter.empty())
          v = v + (1.0f / (in.counter[size_t(r * geo.nsc + c)] + in.eps)) * in.bonus_scale;
        s[size_t(r * geo.nsc + c)] = v;
      }
    std::vector<int64_t> order;
    for (int64_t i = 0; i < n; ++i)
      if (!in.exclude[size_t(i)]) order.push_back(i);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return s[size_t(a)] > s[size_t(b)]; });
    const int64_t k = allowed == 0 ? 0 : 1 + int64_t(rng() % uint64_t(allowed));
    const uint64_t cap = 1 + rng() % 8;
    const GrowResult res = emulate_grow(in, k, cap);
    CHECK(res.status == 0);
    CHECK(int64_t(res.flat.size()) == k);
    for (int64_t i = 0; i < k && i < int64_t(res.flat.size()); ++i) {
      CHECK(res.flat[size_t(i)] == order[size_t(i)]);
      CHECK(res.scores[size_t(i)] == s[size_t(order[size_t(i)])]);
    }
    if (allowed < n) CHECK(emulate_grow(in, allowed + 1, cap).status == km::kSelectTooFew);
  }
}

// ----------------------------------------------------------------------------- modes
static int mode_keys(const std::string& in_path, const std::string& out_path) {
  const std::vector<float> s = read_bin<float>(in_path);
  std::vector<uint64_t> c(s.size());
  for (size_t i = 0; i < s.size(); ++i) c[i] = km::composite(km::float_key(s[i]), i);
  write_bin(out_path, c);
  return 0;
}

static int mode_grow(const std::string& dir) {
  const std::vector<double> p = read_params(dir + "/params.txt");
  if (p.size() != 10) return 2;
  GrowInput in;
  in.B = int64_t(p[0]);
  in.M = int64_t(p[1]);
  in.K = int64_t(p[2]);
  in.br = int(p[3]);
  in.bc = int(p[4]);
  const int64_t k = int64_t(p[5]);
  const uint64_t cap = uint64_t(p[6]);
  const bool has_counter = p[7] != 0.0;
  in.bonus_scale = float(p[8]);
  in.eps = float(p[9]);
  in.dy = read_bin<float>(dir + "/dy.bin");
  in.x = read_bin<float>(dir + "/x.bin");
  in.exclude = read_bin<uint8_t>(dir + "/exclude.bin");
  if (has_counter) in.counter = read_bin<float>(dir + "/counter.bin");
  const GrowResult res = emulate_grow(in, k, cap);
  std::ofstream(dir + "/status.txt") << res.status << " " << res.passes << "\n";
  write_bin(dir + "/flat.bin", res.flat);
  write_bin(dir + "/scores.bin", res.scores);
  return g_failures ? 1 : 0;
}

static int mode_spmm(const std::string& dir) {
  const std::vector<double> p = read_params(dir + "/params.txt");
  if (p.size() != 6) return 2;
  SpmmInput in;
  in.B = int64_t(p[0]);
  in.M = int64_t(p[1]);
  in.K = int64_t(p[2]);
  in.br = int(p[3]);
  in.bc = int(p[4]);
  in.bsr = p[5] != 0.0;
  in.x = read_bin<float>(dir + "/x.bin");
  in.dy = read_bin<float>(dir + "/dy.bin");
  in.w = read_bin<float>(dir + "/w.bin");
  in.mask = read_bin<uint8_t>(dir + "/mask.bin");
  in.row_ptr = read_bin<int32_t>(dir + "/row_ptr.bin");
  in.col_idx = read_bin<int32_t>(dir + "/col_idx.bin");
  in.col_ptr = read_bin<int32_t>(dir + "/col_ptr.bin");
  in.row_idx = read_bin<int32_t>(dir + "/row_idx.bin");
  in.slot_t = read_bin<int32_t>(dir + "/slot_t.bin");
  write_bin(dir + "/y.bin", emulate_spmm(in, false));
  write_bin(dir + "/dx.bin", emulate_spmm(in, true));
  write_bin(dir + "/sddmm.bin", emulate_sddmm(in));
  return g_failures ? 1 : 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "selftest";
  int rc = 0;
  if (mode == "selftest") {
    test_keys();
    test_select();
    test_geometry();
    test_spmm();
    test_grow();
    std::printf("selftest: %d failure(s)\n", g_failures);
    rc = g_failures ? 1 : 0;
  } else if (mode == "keys" && argc == 4) {
    rc = mode_keys(argv[2], argv[3]);
  } else if (mode == "grow" && argc == 3) {
    rc = mode_grow(argv[2]);
  } else if (mode == "spmm" && argc == 3) {
    rc = mode_spmm(argv[2]);
  } else {
    std::fprintf(stderr, "usage: %s selftest | keys IN OUT | grow DIR | spmm DIR\n", argv[0]);
    return 2;
  }
  if (g_failures) std::fprintf(stderr, "%d CHECK failure(s)\n", g_failures);
  return rc;
}
