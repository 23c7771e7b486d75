// CPU implementations of the block-sparse linear ops (schemas in sparsekern/spec.py).
//
// Layouts: `w` is the dense [M, K] weight (layout "dense") or the block values [nnzb, br, bc]
// (layout "bsr"); the bool `mask` [M, K] applies in both. The effective weight (written
// W ⊙ mask below) is W where the mask is set inside a topology block and exactly 0 elsewhere,
// as the reference: masks select, never multiply, so NaN/inf in dormant entries never reach a
// result, and SDDMM outputs off the mask are 0 even where the gradient is NaN.
// Activations, weights and masks are made contiguous (a copy when they are not); the
// topology must be int32/int64 and is validated on every call before any block is read.
// Entries outside the topology's blocks are never read. Nothing is cached between calls:
// W ⊙ mask is packed on every call, so a forward costs here what it costs in training, where
// W changes every step.
//
// Kernels (kern_body.h):
// - `bsr_mm` / `bsr_mm_t`, block masks: W ⊙ mask is packed per group of block rows (columns
//   for grad_input, through the CSC view, each worker owning whole block columns) into fp32
//   blocks and broadcast against a transposed fp32 copy of the activations (batch tiles of
//   48-64 lanes; 8x3 or 6x4 register tiles), results stored through in-register transposes.
// - element masks (1x1): values gathered in CSR (grad_input: then CSC) order, one row of
//   entries against the transposed activations per output row.
// - `sddmm`: an outer-product kernel per active block over packed column panels of x and
//   strips of dy (dot products over batch tiles for element masks).
// - `grow_topk` / `fused_weight_grad`: the dense gradient is computed in 128x256 macro tiles
//   (never stored whole); each tile is scored (|G|, block means, DST-EE bonus) and filtered
//   into the exact top-k collector (common.h); the fused op stores the active blocks on the
//   way.
// - above a measured density (use_dense) the ops run MKL on the dense W ⊙ mask instead (a
//   temporary built by selection from the topology's blocks, freed on return).
// Every op gives the same bits on every run at a fixed thread count: each output element is
// summed by one worker in a fixed order.
#include <torch/library.h>

#include "common.h"
#include "grow_cpu.h"

namespace sk {
namespace {

struct Operands {
  at::Tensor w, mask;
  bool bsr = false;
  int64_t M = 0, K = 0;
};

// Checks the activation `a` [B, D] (schema name a_name: x or dy), weight `w` and mask
// against each other.
Operands check_weight(const char* op, const at::Tensor& a, const char* a_name,
                      const at::Tensor& w, const at::Tensor& mask, int64_t br, int64_t bc) {
  SK_CHECK_CPU(op, w);
  SK_CHECK_CPU(op, mask);
  SK_CHECK_BOOL(op, mask);
  SK_CHECK_DIM(op, mask, 2);
  SK_CHECK_SAME_DTYPE_AS(op, a, a_name, w, "w");
  check_block(op, mask.size(0), mask.size(1), br, bc);
  Operands o;
  o.M = mask.size(0);
  o.K = mask.size(1);
  o.bsr = check_weight_layout(op, w, mask, br, bc, "dense [M, K] weight");
  o.w = w.contiguous();
  o.mask = kernel_mask(mask);
  return o;
}

// Chunks of consecutive groups (block rows or columns) holding about `target` packed weight
// floats each.
std::vector<int64_t> group_chunks(const int32_t* gptr, int64_t ngroups, int64_t blk_floats,
                                  int64_t target) {
  std::vector<int64_t> starts{0};
  int64_t acc = 0;
  for (int64_t g = 0; g < ngroups; ++g) {
    acc += (gptr[g + 1] - gptr[g]) * blk_floats + blk_floats / 4 + 1;
    if (acc >= target && g + 1 < ngroups) {
      starts.push_back(g + 1);
      acc = 0;
    }
  }
  starts.push_back(ngroups);
  return starts;
}

// ------------------------------------------------------------------ block path
// bsr_mm and bsr_mm_t with blocks larger than 1x1, in the lanes orientation: packed weights
// are broadcast against the transposed activations, whose batch lies in the vector lanes
// (kt.lanes_kern). The op is seen as a walk over groups of blocks: block rows through the CSR view
// for the forward, block columns through the CSC view (slot_t) for bsr_mm_t. Each group gives
// blk_out output rows from segments of `depth` transposed activation rows.
struct BlockWalk {
  const KernelTable& kt;
  const Operands& o;
  const Topo& tp;
  const bool fwd, bf;
  const int64_t br, bc, bsz, es, B, M, K;
  const int64_t ngroups, blk_out, depth, Din, Dout, Din_pad;
  const int32_t* gptr;  // group -> its slots (row_ptr or col_ptr)
  const char* w0;       // the weight's bytes (dense or bsr values)
  const uint8_t* mask;  // null for an all-true mask
  BlockWalk(bool fwd_, const at::Tensor& act, const Operands& o_, const Topo& tp_, int64_t br_,
            int64_t bc_)
      : kt(kernels()),
        o(o_),
        tp(tp_),
        fwd(fwd_),
        bf(is_bf16(act)),
        br(br_),
        bc(bc_),
        bsz(br_ * bc_),
        es(bf ? 2 : 4),
        B(act.size(0)),
        M(o_.M),
        K(o_.K),
        ngroups(fwd_ ? tp_.nbr : tp_.nbc),
        blk_out(fwd_ ? br_ : bc_),
        depth(fwd_ ? bc_ : br_),
        Din(fwd_ ? K : M),
        Dout(fwd_ ? M : K),
        Din_pad((fwd_ ? tp_.nbc : tp_.nbr) * depth),
        gptr(fwd_ ? tp_.rp : tp_.cp),
        w0(static_cast<const char*>(o_.w.data_ptr())),
        mask(mask_ptr(o_.mask)) {}
};

// The register tile (rmain rows x nvb vectors) and the batch tiles of TB = nvb * vw lanes.
struct LaneTiling {
  int rmain, nvb;
  int64_t TB, ntiles;
  int64_t seg_chunk;  // segments whose activation rows fit in L1 (24 KiB)
};

// Picks the tile the kernel's register budget allows; on AVX-512 the two best tiles are 8 x 3
// and 6 x 4 (24 accumulators each), and the one that pads the batch least wins.
LaneTiling lane_tiling(const BlockWalk& w) {
  const KernelTable& kt = w.kt;
  LaneTiling t;
  t.rmain = w.blk_out >= 8 ? 8 : w.blk_out >= 4 ? 4 : w.blk_out >= 2 ? 2 : 1;
  t.nvb = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(kt.lanes_nvb(t.rmain), cdiv(w.B, kt.vw))));
  if (kt.vw == 16 && t.rmain == 8 && t.nvb == 3 && round_up(w.B, 64) < round_up(w.B, 48)) {
    t.rmain = 6;
    t.nvb = 4;
  }
  t.TB = t.nvb * kt.vw;
  t.ntiles = cdiv(w.B, t.TB);
  t.seg_chunk = std::max<int64_t>(1, (24 * 1024) / (w.depth * t.TB * 4));
  return t;
}

// The activations transposed into zero-padded batch tiles [tile][Din_pad][TB] (shared scratch):
// the kernel then reads one row of lanes per input row, and padded rows add zeros.
const float* transpose_activations(const BlockWalk& w, const LaneTiling& t, const at::Tensor& act) {
  float* xt = scratch<float>(kShared0, t.ntiles * w.Din_pad * t.TB);
  const void* ap = act.data_ptr();
  const int64_t dchunk = 256;
  const int64_t ndc = cdiv(w.Din_pad, dchunk);
  parallel_dynamic(t.ntiles * ndc, [&](int64_t item, int) {
    const int64_t tile = item / ndc, d0 = (item % ndc) * dchunk;
    const int64_t nd = std::min(dchunk, w.Din_pad - d0);
    const int64_t ndv = std::max<int64_t>(0, std::min(nd, w.Din - d0));
    w.kt.pack_t(ap, w.bf, w.Din, tile * t.TB, w.B, d0, ndv, nd,
                xt + (tile * w.Din_pad + d0) * t.TB, t.TB);
  });
  return xt;
}

// Chunk boundaries (group indices) of about 64K packed floats, at least 8 chunks per thread:
// a chunk's packed weights stay in L2 across the batch tiles, and the dynamic schedule
// balances uneven groups.
std::vector<int64_t> weight_chunks(const BlockWalk& w) {
  const int64_t total = w.tp.nnzb * w.bsz;
  const int64_t target = std::max<int64_t>(
      w.bsz, std::min<int64_t>(64 * 1024, total / std::max<int64_t>(1, 8 * num_threads())));
  return group_chunks(w.gptr, w.ngroups, w.bsz, target);
}

// Where one block's weights and mask lie, for packing it.
struct BlockSrc {
  const char* src;
  const uint8_t* mask;
  int64_t ldw;
  int rv, cv;  // valid rows and columns (fewer at the ragged matrix edge)
};

// Block of group g at walk slot s; *off receives its first transposed-activation row.
BlockSrc block_src(const BlockWalk& w, int64_t g, int64_t s, int32_t* off) {
  const int64_t i = w.fwd ? g : w.tp.ri[s];
  const int64_t j = w.fwd ? w.tp.ci[s] : g;
  const int64_t slot = w.fwd ? s : w.tp.st[s];
  *off = static_cast<int32_t>(w.fwd ? j * w.bc : i * w.br);
  BlockSrc d;
  d.rv = static_cast<int>(std::min(w.br, w.M - i * w.br));
  d.cv = static_cast<int>(std::min(w.bc, w.K - j * w.bc));
  if (w.o.bsr) {
    d.src = w.w0 + slot * w.bsz * w.es;
    d.ldw = w.bc;
  } else {
    d.src = w.w0 + (i * w.br * w.K + j * w.bc) * w.es;
    d.ldw = w.K;
  }
  d.mask = at_off(w.mask, i * w.br * w.K + j * w.bc);
  return d;
}

// Prefetches a block's rows and mask rows (strided in the dense layout) while the previous
// block is packed.
void prefetch_block(const BlockWalk& w, const BlockSrc& d) {
  for (int r = 0; r < d.rv; ++r) {
    const char* p = d.src + r * d.ldw * w.es;
    __builtin_prefetch(p);
    if (d.cv * w.es > 64) __builtin_prefetch(p + d.cv * w.es - 1);
    if (d.mask) __builtin_prefetch(d.mask + r * w.K);
  }
}

// Packs the blocks of groups [g0, g1) as W ⊙ mask, fp32, natural [br][bc] order, into wb, and
// their activation offsets into off (both indexed from the chunk's first slot), so the kernel
// reads every block the same way whatever the layout, dtype or mask.
void pack_chunk(const BlockWalk& w, int64_t g0, int64_t g1, float* wb, int32_t* off) {
  const int32_t* gptr = w.gptr;
  const int64_t s0 = gptr[g0], s1 = gptr[g1];
  int64_t g = g0;
  while (g < g1 && gptr[g] == gptr[g + 1]) ++g;
  if (g == g1) return;
  BlockSrc cur = block_src(w, g, gptr[g], off + (gptr[g] - s0));
  for (int64_t s = gptr[g]; s < s1; ++s) {
    while (s >= gptr[g + 1]) ++g;
    BlockSrc nxt = cur;
    if (s + 1 < s1) {
      int64_t gn = g;
      while (s + 1 >= gptr[gn + 1]) ++gn;
      nxt = block_src(w, gn, s + 1, off + (s + 1 - s0));
      prefetch_block(w, nxt);
    }
    w.kt.pack_block(cur.src, w.bf, cur.ldw, cur.mask, w.K, cur.rv, cur.cv,
                    static_cast<int>(w.br), static_cast<int>(w.bc), wb + (s - s0) * w.bsz, w.bc);
    cur = nxt;
  }
}

// The fp32 bsr values of groups [g0, g1) read in place (the kernel's block order is the bsr
// order), with their activation offsets in off; null when the chunk touches the ragged matrix
// edge, whose blocks' padding must not be read (there it is packed). Saves the copy, ~9% of a
// 4096x4096 forward.
const float* chunk_in_place(const BlockWalk& w, int64_t g0, int64_t g1, int32_t* off) {
  const int32_t* gptr = w.gptr;
  const int64_t s0 = gptr[g0], s1 = gptr[g1];
  bool direct = g1 * w.br <= w.M || gptr[g1 - 1] == gptr[g1];
  for (int64_t s = s0; direct && s < s1; ++s) direct = (w.tp.ci[s] + 1) * w.bc <= w.K;
  if (!direct) return nullptr;
  for (int64_t s = s0; s < s1; ++s) off[s - s0] = static_cast<int32_t>(w.tp.ci[s] * w.bc);
  return reinterpret_cast<const float*>(w.w0) + s0 * w.bsz;
}

// The output rows of groups [g0, g1) for batch tile `tile`, from their packed blocks wb and
// offsets off: partial sums in a transposed tile (worker scratch), stored through in-register
// transposes.
void compute_chunk(const BlockWalk& w, const LaneTiling& t, const float* xt, int64_t tile,
                   int64_t g0, int64_t g1, const float* wb, const int32_t* off, void* y) {
  const KernelTable& kt = w.kt;
  const int32_t* gptr = w.gptr;
  const int64_t s0 = gptr[g0], bsz = w.bsz, TB = t.TB;
  const int64_t wos = w.fwd ? w.bc : 1, wts = w.fwd ? 1 : w.bc;
  float* ob = scratch<float>(kWork2, round_up(w.blk_out, 8) * TB);
  const float* xtile = xt + tile * w.Din_pad * TB;
  const int lanes = static_cast<int>(std::min(TB, w.B - tile * TB));
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t nseg = gptr[g + 1] - gptr[g];
    const float* wg = wb + (gptr[g] - s0) * bsz;
    const int32_t* og = off + (gptr[g] - s0);
    const int64_t rows_valid = std::min(w.blk_out, w.Dout - g * w.blk_out);
    // Segments in chunks whose activation rows stay in L1 while every row group of the
    // block row/column uses them; partial sums accumulate in `ob`.
    const int64_t sch = rows_valid > t.rmain ? t.seg_chunk : std::max<int64_t>(nseg, 1);
    for (int64_t sc0 = 0; sc0 < std::max<int64_t>(nseg, 1); sc0 += sch) {
      const int64_t ns = std::min(sch, nseg - sc0);
      for (int64_t r0 = 0; r0 < rows_valid;) {
        const int64_t left = rows_valid - r0;
        // rmain is 8, 6, 4, 2 or 1; 8 rows left of 6-row tiles go as 4 + 4, not 6 + 2
        const int R = (t.rmain == 6 && left == 8) ? 4
                      : left >= t.rmain            ? t.rmain
                      : left >= 4                  ? 4
                      : left >= 2                  ? 2
                                                   : 1;
        kt.lanes_kern(R, t.nvb, static_cast<int>(std::max<int64_t>(ns, 0)), og + sc0,
                 static_cast<int>(w.depth), xtile, wg + sc0 * bsz + r0 * wos, bsz, wos, wts,
                 ob + r0 * TB, TB, sc0 > 0);
        r0 += R;
      }
    }
    kt.store_t(ob, TB, static_cast<int>(rows_valid), lanes, y, w.bf, w.Dout, tile * TB,
               g * w.blk_out, true);
  }
}

// out [B, Dout] = act [B, Din] @ (W ⊙ mask)ᵀ (fwd) or act @ (W ⊙ mask) (not fwd), the block
// path: transpose the activations, then per chunk of groups (one worker each) pack or point
// at the weights and compute every batch tile.
void run_lanes(bool fwd, const at::Tensor& act, const Operands& o, const Topo& tp, int64_t br,
               int64_t bc, at::Tensor& out) {
  const BlockWalk w(fwd, act, o, tp, br, bc);
  const LaneTiling t = lane_tiling(w);
  const float* xt = transpose_activations(w, t, act);
  const std::vector<int64_t> chunks = weight_chunks(w);
  const int64_t nchunks = static_cast<int64_t>(chunks.size()) - 1;
  const bool in_place = fwd && o.bsr && !w.bf && w.mask == nullptr;
  void* y = out.data_ptr();
  parallel_dynamic(nchunks, [&](int64_t c, int) {
    const int64_t g0 = chunks[c], g1 = chunks[c + 1];
    const int64_t nslots = w.gptr[g1] - w.gptr[g0];
    int32_t* off = scratch<int32_t>(kWork1, nslots);
    const float* wb = in_place ? chunk_in_place(w, g0, g1, off) : nullptr;
    if (!wb) {
      float* packed = scratch<float>(kWork0, nslots * w.bsz);
      pack_chunk(w, g0, g1, packed, off);
      wb = packed;
    }
    for (int64_t tile = 0; tile < t.ntiles; ++tile)
      compute_chunk(w, t, xt, tile, g0, g1, wb, off, y);
  });
}

// ------------------------------------------------------------------ dense fallback
// Density of the active blocks above which MKL on the dense W ⊙ mask beats the sparse
// kernels, measured on the project's 2-vCPU AVX-512 machine at 4096x4096, batch 256 (see the
// README); on the AVX2 machine (2 threads, 128..4096 square and 768x3072 layers, batch 64..1024)
// the element forward and grad_input won up to density ~0.5, so there they fall back above
// 0.45. SPARSEKERN_DENSE_THRESHOLD overrides it for every op (> 1 never falls back, 0 always
// does).
enum Which { kFwd = 0, kDx = 1, kSddmm = 2 };
bool use_dense(Which which, const Topo& tp, int64_t br, int64_t bc, int64_t M, int64_t K) {
  if (M == 0 || K == 0) return false;
  double thr;
  if (const char* e = std::getenv("SPARSEKERN_DENSE_THRESHOLD")) {
    thr = std::atof(e);
  } else {
    // fwd, grad_input, sddmm. Sparse time grows with density while the fallback costs about
    // 1.3x a dense matmul (W ⊙ mask is materialised first): measured crossovers.
    static const double elem512[3] = {0.25, 0.25, 0.25};  // 1x1
    static const double elem256[3] = {0.45, 0.45, 0.25};
    const double* elem = kernels().vw == 16 ? elem512 : elem256;
    static const double small[3] = {0.45, 0.45, 0.35};  // a block side < 8
    static const double large[3] = {1.01, 0.85, 1.01};  // never for fwd / sddmm
    thr = (br == 1 && bc == 1) ? elem[which] : (br < 8 || bc < 8) ? small[which] : large[which];
  }
  const double density = static_cast<double>(tp.nnzb) * br * bc / (static_cast<double>(M) * K);
  return density > thr;
}

// Element masks (1x1 blocks). fwd: y [B, M] = x [B, K] @ (W ⊙ mask)ᵀ; otherwise
// dx [B, K] = dy [B, M] @ (W ⊙ mask). W ⊙ mask is gathered in CSR order (dense rows read in
// order; for dx then permuted to CSC order by slot_t), the activations are transposed into
// batch tiles of nvb vectors (64 lanes AVX-512, 32 AVX2), and each output row takes all its
// entries in one pass against the tile (Din x TB, held in L2) into a transposed output tile.
// Walking the reduction dimension in L1-sized chunks with per-row cursors measured no faster
// for 128-1024 columns at 4096x4096, batch 256, 90%, nor (AVX2, 1 thread, batch 1024, 90%)
// for bands of 128-1024 columns at 3072x768; software prefetch of the entries' tile rows 8 or
// 16 entries ahead measured no faster there either.
void run_elem(bool fwd, const at::Tensor& act, const Operands& o, const Topo& tp,
              at::Tensor& out) {
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(act);
  const int64_t B = act.size(0), M = o.M, K = o.K;
  const int64_t Din = fwd ? K : M, Dout = fwd ? M : K;
  const int32_t* optr = fwd ? tp.rp : tp.cp;  // output row -> entries
  const int32_t* icol = fwd ? tp.ci : tp.ri;  // entry -> input row
  const int nvb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4, cdiv(B, kt.vw))));
  const int64_t TB = nvb * kt.vw, ntiles = cdiv(B, TB);
  const int nt = num_threads();
  const int64_t es = bf ? 2 : 4;
  float* vals = scratch<float>(kShared0, tp.nnzb);
  const void* wp0 = o.w.data_ptr();
  const uint8_t* mk = mask_ptr(o.mask);
  parallel_dynamic(cdiv(M, 64), [&](int64_t c, int) {
    for (int64_t m = c * 64; m < std::min(M, c * 64 + 64); ++m)
      kt.gather_vals(o.bsr ? static_cast<const char*>(wp0) + tp.rp[m] * es : wp0, bf, !o.bsr, mk,
                     tp.ci + tp.rp[m], tp.rp[m + 1] - tp.rp[m], m * K, vals + tp.rp[m]);
  });
  if (!fwd) {
    float* csc = scratch<float>(kShared1, tp.nnzb);
    const int64_t piece = 1 << 16;
    parallel_dynamic(cdiv(tp.nnzb, piece), [&](int64_t c, int) {
      const int64_t e0 = c * piece, n = std::min(piece, tp.nnzb - e0);
      kt.gather_vals(vals, false, true, nullptr, tp.st + e0, n, 0, csc + e0);
    });
    vals = csc;
  }
  // With at least 4 batch tiles per worker, each item takes a whole tile and transposes it
  // just before its rows read it, so they read it from L2, not L3 (Linear 3072->768, batch
  // 1024, 90%, 1 thread AVX2: forward 26 -> 22 ms; grad_input of 768->3072 27 -> 23 ms);
  // otherwise all tiles are transposed first and the items split the output rows.
  const bool own_tile = ntiles >= 4 * nt;
  float* xt = nullptr;
  if (!own_tile) {
    xt = scratch<float>(kShared2, ntiles * Din * TB);
    const int64_t dchunk = 256, ndk = cdiv(Din, dchunk);
    parallel_dynamic(ntiles * ndk, [&](int64_t item, int) {
      const int64_t tile = item / ndk, d0 = (item % ndk) * dchunk, nd = std::min(dchunk, Din - d0);
      kt.pack_t(act.data_ptr(), bf, Din, tile * TB, B, d0, nd, nd, xt + (tile * Din + d0) * TB, TB);
    });
  }
  const std::vector<int64_t> ranges =
      own_tile ? std::vector<int64_t>{0, Dout}
               : group_chunks(optr, Dout, 1, std::max<int64_t>(4096, tp.nnzb / (4 * nt)));
  const int64_t nr = static_cast<int64_t>(ranges.size()) - 1;
  float* yt = own_tile ? nullptr : scratch<float>(kShared3, ntiles * Dout * TB);
  void* yp = out.data_ptr();
  // Each item owns its slice of the transposed output, so nothing is shared.
  parallel_dynamic(ntiles * nr, [&](int64_t item, int) {
    const int64_t tile = item / nr, r = item % nr;
    const int64_t m0 = ranges[r], m1 = ranges[r + 1];
    const float* xo;
    float* yo;
    if (own_tile) {
      float* buf = scratch<float>(kWork0, Din * TB);
      kt.pack_t(act.data_ptr(), bf, Din, tile * TB, B, 0, Din, Din, buf, TB);
      xo = buf;
      yo = scratch<float>(kWork1, Dout * TB);
    } else {
      xo = xt + tile * Din * TB;
      yo = yt + tile * Dout * TB;
    }
    kt.elem_rows(nvb, xo, vals, icol, optr, m0, m1, yo);
    for (int64_t c0 = m0; c0 < m1; c0 += 256)
      kt.store_t(yo + c0 * TB, TB, static_cast<int>(std::min<int64_t>(256, m1 - c0)),
                 static_cast<int>(std::min(TB, B - tile * TB)), yp, bf, Dout, tile * TB, c0, true);
  });
}

// bsr_mm (fwd: y [B, M] = act @ (W ⊙ mask)ᵀ) and bsr_mm_t (dx [B, K] = act @ (W ⊙ mask)) after
// the entry points checked `act`: the weight, mask and topology checks, then MKL on the dense
// W ⊙ mask above the measured density, the element-mask path or the block path.
at::Tensor run_mm(bool fwd, const char* op, const at::Tensor& act_in, const at::Tensor& w,
                  const at::Tensor& mask, at::TensorList topo, int64_t br, int64_t bc) {
  Operands o = check_weight(op, act_in, fwd ? "x" : "dy", w, mask, br, bc);
  const int64_t dout = fwd ? o.M : o.K;
  check_activation_width(op, act_in, fwd, o.M, o.K);
  Topo tp = check_topology(op, topo, o.M, o.K, br, bc, !fwd);
  check_bsr_blocks(op, w, o.bsr, tp.nnzb);
  at::Tensor act = act_in.contiguous();
  at::Tensor out = at::empty({act.size(0), dout}, act.options());
  if (out.numel() == 0) return out;
  if (use_dense(fwd ? kFwd : kDx, tp, br, bc, o.M, o.K)) {
    const at::Tensor wd = dense_weight(o.w, o.bsr, mask_ptr(o.mask), tp, o.M, o.K, br, bc);
    out.copy_(at::matmul(act.to(at::kFloat), fwd ? wd.t() : wd));
  } else if (br == 1 && bc == 1) {
    run_elem(fwd, act, o, tp, out);
  } else {
    run_lanes(fwd, act, o, tp, br, bc, out);
  }
  return out;
}

at::Tensor bsr_mm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mask,
                      at::TensorList topo, int64_t br, int64_t bc) {
  const char* op = "sparsekern::_bsr_mm";
  ScratchScope scope;
  SK_CHECK_CPU(op, x);
  SK_CHECK_DIM(op, x, 2);
  SK_CHECK_FLOAT(op, x);
  return run_mm(true, op, x, w, mask, topo, br, bc);
}

at::Tensor bsr_mm_t_cpu(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& mask,
                        at::TensorList topo, int64_t br, int64_t bc) {
  const char* op = "sparsekern::_bsr_mm_t";
  ScratchScope scope;
  SK_CHECK_CPU(op, dy);
  SK_CHECK_DIM(op, dy, 2);
  SK_CHECK_FLOAT(op, dy);
  return run_mm(false, op, dy, w, mask, topo, br, bc);
}

// ------------------------------------------------------------------ weight side
struct GradArgs {
  at::Tensor dy, x;
  int64_t B = 0, M = 0, K = 0;
};

GradArgs check_grad_inputs(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  SK_CHECK_CPU(op, dy);
  SK_CHECK_CPU(op, x);
  SK_CHECK_DIM(op, dy, 2);
  SK_CHECK_DIM(op, x, 2);
  SK_CHECK_FLOAT(op, x);
  SK_CHECK_SAME_DTYPE(op, dy, x);
  check_same_batch(op, dy, x);
  GradArgs g;
  g.dy = dy.contiguous();
  g.x = x.contiguous();
  g.B = x.size(0);
  g.M = dy.size(1);
  g.K = x.size(1);
  return g;
}

// values[s] = ((dyᵀ x) ⊙ mask) on block s, for the blocks of block rows [i0, i1).
void run_sddmm(const GradArgs& g, const at::Tensor& mask, const Topo& tp, int64_t br, int64_t bc,
               at::Tensor& values) {
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(g.x);
  const int64_t B = g.B, M = g.M, K = g.K;
  const uint8_t* mk = mask_ptr(mask);
  const int nt = num_threads();
  const int64_t es = bf ? 2 : 4;
  char* vp = static_cast<char*>(values.data_ptr());

  if (br == 1 && bc == 1) {
    // Element masks: outer-product form (kt.sddmm_row) over chunks of batch tiles of the
    // transposed operands; the chunks depend only on the sizes (thread-count independent).
    const int nvb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4, cdiv(B, kt.vw))));
    const int64_t TB = nvb * kt.vw, ntiles = cdiv(B, TB);
    float* dyt = scratch<float>(kShared0, ntiles * M * TB);
    float* xt = scratch<float>(kShared1, ntiles * K * TB);
    float* acc = scratch<float>(kShared2, tp.nnzb);
    std::memset(acc, 0, tp.nnzb * sizeof(float));
    const int64_t dchunk = 256;
    const int64_t ndm = cdiv(M, dchunk), ndk = cdiv(K, dchunk);
    parallel_dynamic(ntiles * (ndm + ndk), [&](int64_t item, int) {
      const int64_t tile = item / (ndm + ndk), r = item % (ndm + ndk);
      const bool isx = r >= ndm;
      const int64_t D = isx ? K : M, d0 = (isx ? r - ndm : r) * dchunk;
      const int64_t nd = std::min(dchunk, D - d0);
      kt.pack_t(isx ? g.x.data_ptr() : g.dy.data_ptr(), bf, D, tile * TB, B, d0, nd, nd,
                (isx ? xt + tile * K * TB : dyt + tile * M * TB) + d0 * TB, TB);
    });
    const std::vector<int64_t> chunks =
        group_chunks(tp.rp, tp.nbr, 1, std::max<int64_t>(1024, tp.nnzb / (8 * nt)));
    // batch tiles summed per horizontal sum: their x tiles take ~4 MiB (L3; each row's entries
    // read x at random columns, so an L2-sized chunk would leave one tile per sum)
    const int64_t nsub = std::max<int64_t>(1, (int64_t(4) << 20) / (4 * K * TB));
    parallel_dynamic(static_cast<int64_t>(chunks.size()) - 1, [&](int64_t c, int) {
      const int64_t m0 = chunks[c], m1 = chunks[c + 1];
      for (int64_t t0 = 0; t0 < ntiles; t0 += nsub) {
        const int ns = static_cast<int>(std::min(nsub, ntiles - t0));
        for (int64_t m = m0; m < m1; ++m)
          kt.sddmm_row(nvb, ns, dyt + (t0 * M + m) * TB, M * TB, xt + t0 * K * TB, K * TB,
                       tp.ci + tp.rp[m], tp.rp[m + 1] - tp.rp[m], 0, acc + tp.rp[m]);
      }
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t s = tp.rp[m]; s < tp.rp[m + 1]; ++s) {
          const float v = (!mk || mk[m * K + tp.ci[s]]) ? acc[s] : 0.0f;
          if (bf)
            reinterpret_cast<uint16_t*>(vp)[s] = f32_to_bf16(v);
          else
            reinterpret_cast<float*>(vp)[s] = v;
        }
    });
    return;
  }

  const int nv = bc > kt.vw ? 2 : 1;
  const int64_t cw = nv * kt.vw, bcp = round_up(bc, cw);
  const int mr = kt.ok_mr(nv, br);
  const int64_t nstrips = cdiv(br, mr);
  // Column panels of x per block column: [nbc][B][bcp].
  float* xp = scratch<float>(kShared0, tp.nbc * B * bcp);
  parallel_dynamic(tp.nbc, [&](int64_t j, int) {
    kt.pack_cols(g.x.data_ptr(), bf, K, B, j * bc, std::min(bc, K - j * bc), xp + j * B * bcp, bcp);
  });
  parallel_dynamic(tp.nbr, [&](int64_t i, int) {
    if (tp.rp[i] == tp.rp[i + 1]) return;
    float* dp = scratch<float>(kWork0, nstrips * B * mr);
    float* ct = scratch<float>(kWork1, nstrips * mr * bcp);
    const int64_t rv = std::min(br, M - i * br);
    kt.pack_strips(g.dy.data_ptr(), bf, M, B, i * br, rv, mr, dp);
    for (int64_t s = tp.rp[i]; s < tp.rp[i + 1]; ++s) {
      const int64_t j = tp.ci[s];
      for (int64_t st = 0; st < nstrips; ++st)
        for (int64_t c0 = 0; c0 < bcp; c0 += cw)
          kt.okern(mr, nv, static_cast<int>(B), dp + st * B * mr, mr, xp + j * B * bcp + c0, bcp,
                   ct + st * mr * bcp + c0, bcp, false);
      kt.store_block(ct, bcp, at_off(mk, i * br * K + j * bc), K, static_cast<int>(rv),
                     static_cast<int>(std::min(bc, K - j * bc)), static_cast<int>(br),
                     static_cast<int>(bc), vp + s * br * bc * es, bf, bc);
    }
  });
}

at::Tensor sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask,
                     at::TensorList topo, int64_t br, int64_t bc) {
  const char* op = "sparsekern::_sddmm";
  ScratchScope scope;
  GradArgs g = check_grad_inputs(op, dy, x);
  SK_CHECK_CPU(op, mask);
  SK_CHECK_BOOL(op, mask);
  SK_CHECK_SHAPE(op, mask, g.M, g.K);
  Topo tp = check_topology(op, topo, g.M, g.K, br, bc, false);
  at::Tensor m = kernel_mask(mask);
  at::Tensor values = at::empty({tp.nnzb, br, bc}, g.x.options());
  if (values.numel() == 0) return values;
  if (use_dense(kSddmm, tp, br, bc, g.M, g.K))
    gather_dense(at::matmul(g.dy.to(at::kFloat).t(), g.x.to(at::kFloat)), mask_ptr(m), tp, br, bc, values);
  else
    run_sddmm(g, m, tp, br, bc, values);
  return values;
}

// ------------------------------------------------------------------ growth (dense pass)
// One pass over the dense gradient G = dyᵀ x in macro tiles: each tile goes to the growth
// sink (scored into the top-k, and the active blocks stored when `values` is given).
std::pair<at::Tensor, at::Tensor> run_dense_pass(const GradArgs& g, const GrowArgs& a,
                                                 int64_t br, int64_t bc, const Topo* tp,
                                                 const at::Tensor* mask, at::Tensor* values) {
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(g.x);
  const int64_t B = g.B, M = g.M, K = g.K;
  const int nv = 2;
  const int64_t cw = nv * kt.vw;
  const int mr = kt.ok_mr(nv, 1 << 20);
  const int64_t Mc = br * cdiv(std::max<int64_t>(128, br), br);
  const int64_t Nc = bc * cdiv(std::max<int64_t>(256, bc), bc);
  const int64_t Ncp = round_up(Nc, cw);
  const int64_t nstrips = cdiv(Mc, mr);
  const int64_t nmp = cdiv(M, Mc), nkp = cdiv(K, Nc);
  const int64_t mgroup = 4;
  const int64_t nmg = cdiv(nmp, mgroup);
  GrowSink sink(a, M, K, br, bc, tp, mask, values, Ncp);

  parallel_dynamic(nkp * nmg, [&](int64_t item, int tid) {
    const int64_t kp = item / nmg, mg = item % nmg;
    const int64_t k0 = kp * Nc, ncols = std::min(Nc, K - k0);
    float* xp = scratch<float>(kWork0, B * Ncp);
    float* dp = scratch<float>(kWork1, B * nstrips * mr);
    float* ct = scratch<float>(kWork2, nstrips * mr * Ncp);
    kt.pack_cols(g.x.data_ptr(), bf, K, B, k0, ncols, xp, Ncp);
    const int64_t ncp_used = round_up(ncols, cw);
    for (int64_t mp = mg * mgroup; mp < std::min(nmp, (mg + 1) * mgroup); ++mp) {
      const int64_t m0 = mp * Mc, nrows = std::min(Mc, M - m0);
      kt.pack_strips(g.dy.data_ptr(), bf, M, B, m0, nrows, mr, dp);
      for (int64_t st = 0; st < cdiv(nrows, mr); ++st)
        for (int64_t c0 = 0; c0 < ncp_used; c0 += cw)
          kt.okern(mr, nv, static_cast<int>(B), dp + st * B * mr, mr, xp + c0, Ncp,
                   ct + st * mr * Ncp + c0, Ncp, false);
      sink.tile(ct, Ncp, m0, nrows, k0, ncols, tid);
    }
    sink.flush(tid);
  });
  return sink.finish();
}

std::tuple<at::Tensor, at::Tensor> grow_topk_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                 const at::Tensor& exclude, int64_t k,
                                                 const c10::optional<at::Tensor>& counter,
                                                 double bonus_scale, double eps, int64_t br,
                                                 int64_t bc) {
  const char* op = "sparsekern::_grow_topk";
  ScratchScope scope;
  GradArgs g = check_grad_inputs(op, dy, x);
  GrowArgs a = check_grow(op, g.M, g.K, exclude, k, counter, bonus_scale, eps, br, bc);
  if (k == 0)
    return {at::empty({0}, x.options().dtype(at::kLong)), at::empty({0}, x.options().dtype(at::kFloat))};
  auto r = run_dense_pass(g, a, br, bc, nullptr, nullptr, nullptr);
  return {r.first, r.second};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_weight_grad_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask, at::TensorList topo,
    int64_t br, int64_t bc, const at::Tensor& exclude, int64_t k,
    const c10::optional<at::Tensor>& counter, double bonus_scale, double eps) {
  const char* op = "sparsekern::_fused_weight_grad";
  ScratchScope scope;
  GradArgs g = check_grad_inputs(op, dy, x);
  SK_CHECK_CPU(op, mask);
  SK_CHECK_BOOL(op, mask);
  SK_CHECK_SHAPE(op, mask, g.M, g.K);
  GrowArgs a = check_grow(op, g.M, g.K, exclude, k, counter, bonus_scale, eps, br, bc);
  Topo tp = check_topology(op, topo, g.M, g.K, br, bc, false);
  at::Tensor m = kernel_mask(mask);
  at::Tensor values = at::empty({tp.nnzb, br, bc}, g.x.options());
  if (k == 0) {
    if (values.numel() && use_dense(kSddmm, tp, br, bc, g.M, g.K))
      gather_dense(at::matmul(g.dy.to(at::kFloat).t(), g.x.to(at::kFloat)), mask_ptr(m), tp, br, bc, values);
    else if (values.numel())
      run_sddmm(g, m, tp, br, bc, values);
    return {values, at::empty({0}, x.options().dtype(at::kLong)),
            at::empty({0}, x.options().dtype(at::kFloat))};
  }
  auto r = run_dense_pass(g, a, br, bc, &tp, &m, &values);
  return {values, r.first, r.second};
}

}  // namespace

bool linear_uses_dense(int which, int64_t nnzb, int64_t br, int64_t bc, int64_t M, int64_t K) {
  Topo tp;
  tp.nnzb = nnzb;
  return use_dense(static_cast<Which>(which), tp, br, bc, M, K);
}
}  // namespace sk

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("_bsr_mm", &sk::bsr_mm_cpu);
  m.impl("_bsr_mm_t", &sk::bsr_mm_t_cpu);
  m.impl("_sddmm", &sk::sddmm_cpu);
  m.impl("_grow_topk", &sk::grow_topk_cpu);
  m.impl("_fused_weight_grad", &sk::fused_weight_grad_cpu);
}
