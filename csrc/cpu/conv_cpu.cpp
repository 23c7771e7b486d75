// CPU implementations of the block-sparse conv ops (groups == 1; schemas in
// sparsekern/spec.py). The weight is the 2-D view W [C_out, Kd = C_in*kh*kw] of the conv weight
// (dense layout) or the block values [nnzb, br, bc] (bsr layout), masked as the reference.
//
// The activations are never unfolded whole: per tile of TB output pixels of one image, an
// im2col tile [Kd][TB] holds only the rows of K-blocks some active block uses; it is exactly
// the transposed operand of the lanes kernel (kern_body.h), so the forward walks each
// block row's active blocks against it and writes NCHW rows directly. grad_input runs the same
// kernel over the CSC view (dyᵀ tiles are plain NCHW rows) and folds the tile back (col2im)
// into a per-image fp32 accumulator; the weight gradient on the active blocks transposes the
// tiles and runs the outer-product kernel per block, accumulating per part (a fixed range of
// pixel tiles, parallel_parts) and adding the parts in order: the same bits on every run at a
// fixed thread count.
// Conv growth (conv2d_grow_topk / conv2d_fused_weight_grad) computes the dense weight gradient
// in row panels from the same transposed tiles and scores them (grow_cpu.h).
// Below a crossover (conv_path: few FLOPs per call, dense-ish masks) forward, grad_input and
// the SDDMM run oneDNN on the selected W ⊙ mask instead; _conv2d_plan reports the choice.
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <functional>
#include <string>

#include "common.h"
#include "grow_cpu.h"

namespace sk {
namespace {

struct Geom {
  int64_t N, Cin, H, W, Cout, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, P, Kd;
};

// Geometry from the input's shape xs and the weight's shape ws [C_out, C_in, kh, kw].
Geom make_geom(const char* op, at::IntArrayRef xs, at::IntArrayRef ws, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(ws.size() == 4, op, ": the weight shape must have 4 entries, got ", ws);
  TORCH_CHECK(groups == 1, op, ": the C++ kernels take groups == 1 (grouped convolutions run on "
              "the reference backend), got groups=", groups);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 entries");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(stride[d] >= 1 && stride[d] <= kMaxExtent, op,
                ": stride must be in [1, 2^31 - 1], got ", stride);
    TORCH_CHECK(dilation[d] >= 1 && dilation[d] <= kMaxExtent, op,
                ": dilation must be in [1, 2^31 - 1], got ", dilation);
    TORCH_CHECK(padding[d] >= 0 && padding[d] <= kMaxExtent, op,
                ": padding must be in [0, 2^31 - 1], got ", padding);
  }
  TORCH_CHECK(ws[0] >= 0 && ws[1] >= 0 && ws[2] >= 1 && ws[3] >= 1, op,
              ": the weight (mask) shape [C_out, C_in, kh, kw] needs C_out, C_in >= 0 and "
              "kh, kw >= 1, got ", ws);
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK(xs[d] <= kMaxExtent && ws[d] <= kMaxExtent, op,
                ": every dimension of x and of the weight must be below 2^31, got x ", xs,
                " and weight ", ws);
  Geom g;
  g.N = xs[0];
  g.Cin = xs[1];
  g.H = xs[2];
  g.W = xs[3];
  g.Cout = ws[0];
  TORCH_CHECK(ws[1] == g.Cin, op, ": the weight (mask) must be [C_out, C_in, kh, kw] with C_in=",
              g.Cin, ", got ", ws);
  g.kh = ws[2];
  g.kw = ws[3];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  // all terms below 2^31 (checked above): no overflow
  g.OH = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1 >= 0 &&
                  g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1 >= 0,
              op, ": the output would be empty (input ", g.H, "x", g.W, ", kernel ", g.kh, "x",
              g.kw, ")");
  g.P = checked_mul(op, "output pixels OH*OW", g.OH, g.OW);
  g.Kd = checked_mul(op, "C_in*kh*kw", g.Cin, checked_mul(op, "kh*kw", g.kh, g.kw));
  return g;
}

struct ConvWeight {
  at::Tensor w, mask2d;  // w: [Cout, Kd] (dense) or [nnzb, br, bc]
  bool bsr = false;
};

// act: the activation (schema name act_name: x or dy).
ConvWeight check_conv_weight(const char* op, const at::Tensor& act, const char* act_name,
                             const at::Tensor& w, const at::Tensor& mask, int64_t br, int64_t bc) {
  SK_CHECK_CPU(op, w);
  SK_CHECK_CPU(op, mask);
  SK_CHECK_BOOL(op, mask);
  SK_CHECK_SAME_DTYPE_AS(op, act, act_name, w, "w");
  SK_CHECK_BLOCK(op, br, bc);
  ConvWeight cw;
  cw.bsr = check_weight_layout(op, w, mask, br, bc, "conv weight [C_out, C_in, kh, kw]");
  cw.w = cw.bsr ? w.contiguous() : w.contiguous().view({mask.size(0), -1});
  cw.mask2d = mask.contiguous().view({mask.size(0), -1});
  return cw;
}

// The topology of the weight's [C_out, Kd] view; bsr values must hold one block per entry.
Topo check_conv_topology(const char* op, const ConvWeight& cw, const at::Tensor& w,
                         at::TensorList topo, const Geom& g, int64_t br, int64_t bc,
                         bool need_csc) {
  Topo tp = check_topology(op, topo, g.Cout, g.Kd, br, bc, need_csc);
  check_bsr_blocks(op, w, cw.bsr, tp.nnzb);
  return tp;
}

// ------------------------------------------------------------------ flat path (stride 1)
// A stride-1 convolution without im2col. The input is copied once, padded, into a
// channel-major flat buffer xf[c][n*img + (h+ph)*Wp + (w+pw)] (img = Hp*Wp; Hp = H+2ph and
// Wp = W+2pw, or H+ph and W+pw where neighbours share their padding, make_flat; zeros around);
// output pixel (n, oh, ow) is the flat position p = n*img + oh*Wp + ow and tap
// (ki, kj) reads xf[c][p + ki*dh*Wp + kj*dw]: one constant offset per weight, so each output
// row is a sum of shifted input rows (kt.flat_rows, one vector load per FMA). Where the output
// rows tile the chunks (run_flat's row-aligned mode) each vector of a chunk is read at its own
// base and only output pixels are computed; otherwise several small images share a chunk and the
// positions with oh >= OH or ow >= OW are computed and dropped.
// grad_input is the same sum over the transposed weight: dy placed in the flat output domain
// (zeros elsewhere, a front margin) read at negative offsets, dx taken at the padded input's
// positions. Each output is summed by one thread in a fixed order (thread-count independent).
enum ConvOp : int { kConvFwd = 0, kConvDx = 1, kConvSddmm = 2, kConvGrow = 3 };

struct Flat {
  int64_t Wp, img, chunk, nchunks, margin, row;  // row: floats per channel of a flat buffer
};
constexpr int64_t kMaxFlatChunk = 256;

// Short copies and fills of the flat path's rows (tens of floats: inline, not libc calls).
using f32x4 = float __attribute__((vector_size(16)));
inline void copy_f32(float* d, const float* s, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    f32x4 v;
    std::memcpy(&v, s + i, 16);
    std::memcpy(d + i, &v, 16);
  }
  for (; i < n; ++i) d[i] = s[i];
}
inline void zero_f32(float* d, int64_t n) {
  const f32x4 z = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) std::memcpy(d + i, &z, 16);
  for (; i < n; ++i) d[i] = 0.0f;
}

// The padding between neighbours is shared when the kernel's reach covers it (p <= (k-1)*d,
// as for 'same' convolutions): a row's right padding is the next row's left padding and an
// image's bottom padding the next image's top, so rows are W+pw and images (H+ph)*Wp apart.
Flat make_flat(const KernelTable& kt, const Geom& g) {
  Flat f;
  const bool shared = g.ph <= (g.kh - 1) * g.dh && g.pw <= (g.kw - 1) * g.dw;
  f.Wp = g.W + (shared ? 1 : 2) * g.pw;
  f.img = (g.H + (shared ? 1 : 2) * g.ph) * f.Wp;
  f.chunk = kt.flat_chunk;
  TORCH_CHECK(f.chunk <= kMaxFlatChunk, "sparsekern: flat chunk of ", f.chunk, " floats");
  f.nchunks = cdiv(checked_mul("sparsekern conv", "the padded input", g.N, f.img), f.chunk);
  f.margin = (g.kh - 1) * g.dh * f.Wp + (g.kw - 1) * g.dw;
  f.row = (f.nchunks + 1) * f.chunk + f.margin;  // one chunk of slack (the SDDMM widens it)
  return f;
}

// Whether the flat path skips the padding positions: forward / grad_input output rows that tile
// the flat chunks (run_flat's row-aligned mode: output width a multiple of the vector width,
// plane of the chunk), SDDMM output rows a multiple of the vector width (dy read in place).
bool flat_rows_aligned(ConvOp which, const Geom& g) {
  const KernelTable& kt = kernels();
  const int64_t A = which == kConvDx ? g.H : g.OH, B = which == kConvDx ? g.W : g.OW;
  return B % kt.vw == 0 && (which == kConvSddmm || (A * B) % kt.flat_chunk == 0);
}

// The flat path computes img/P (flat over valid positions) outputs per output pixel (1 when
// row-aligned), so on small images it loses to the im2col path, whose kernels also reuse each
// load across the rows of a block: it is taken up to a ratio of 1.5 (forward and grad_input,
// element masks), 1.4 (blocks) and 1.3 (SDDMM), measured on CIFAR ResNet-18's layers (AVX2, 2
// threads; shared padding: 32x32 images 1.06, 16x16 1.13, 8x8 1.27, 4x4 1.56).
double flat_waste(ConvOp which, const Geom& g) {
  if (flat_rows_aligned(which, g)) return 1.0;
  return static_cast<double>(make_flat(kernels(), g).img) / g.P;
}

// The batch-lane layout (below) computes no padding positions; its waste is the idle lanes of
// the last group of images.
double batch_lane_waste(const Geom& g) {
  const int64_t L = kernels().flat_chunk;
  return static_cast<double>(round_up(g.N, L)) / g.N;
}

enum class ConvLayout { kIm2col, kFlat, kBatchLanes };

// The batch-lane layout is taken where the flat layout has at least 1.2x the output pixels in
// positions (SDDMM: 8x8 images and smaller; the row-aligned SDDMM's spans cannot exceed a plane),
// 1.4x (forward, element grad_input: 4x4 and smaller) or 2x (block grad_input, whose im2col path
// reuses loads across a block's rows) and the batch fills the lanes better; measured
// at 1 thread, batch 64, on CIFAR ResNet-18's and the demo's layers (AVX2): the lane SDDMM
// 1.1-1.45x faster than the better of flat / im2col there, forward 1.05-1.15x on 4x4 and 2x2
// images, and 1.3-1.4x slower than flat on 32x32 (its transposes cost more than flat's copies).
// Strided convolutions: the batch-lane forward (each chunk one output pixel, read at its strided
// input base) where the output is small (P*C_out <= 2048) and not a 1x1 conv on 4x4 or more
// outputs, measured at 1 thread, batch 64 (AVX2) on the demo's and ResNet-18's strided layers:
// 8x8->4x4 3x3 0.43 vs 0.69 ms (im2col), 4x4->2x2 0.34 vs 0.93, 1x1 4x4->2x2 0.31 vs 0.46; im2col
// faster on 1x1 8x8->4x4 (0.24 vs 0.38) and ResNet-18's (8x8->4x4 512 channels 13.4 vs 14.2 ms).
// SPARSEKERN_CONV_FLAT=never|always|batch|auto (default auto) forces im2col, flat or batch lanes.
ConvLayout conv_layout(ConvOp which, const Geom& g, int64_t br, int64_t bc) {
  const bool strided = g.sh != 1 || g.sw != 1;
  if (g.N == 0 || (strided && which != kConvFwd)) return ConvLayout::kIm2col;
  if (const char* e = std::getenv("SPARSEKERN_CONV_FLAT")) {
    if (std::strcmp(e, "never") == 0) return ConvLayout::kIm2col;
    if (std::strcmp(e, "always") == 0) return strided ? ConvLayout::kIm2col : ConvLayout::kFlat;
    if (std::strcmp(e, "batch") == 0) return ConvLayout::kBatchLanes;
    TORCH_CHECK(e[0] == 0 || std::strcmp(e, "auto") == 0,
                "SPARSEKERN_CONV_FLAT must be never, always, batch or auto, got '", e, "'");
  }
  if (strided)  // forward only; small outputs (demo: 2-3x faster than im2col), not 1x1 on 4x4+
    return batch_lane_waste(g) <= 1.25 && g.P * g.Cout <= 2048 && (g.kh * g.kw > 1 || g.P <= 4)
               ? ConvLayout::kBatchLanes
               : ConvLayout::kIm2col;
  const double positions = static_cast<double>(make_flat(kernels(), g).img) / g.P;
  const double lanes_from = which == kConvSddmm ? 1.2 : which == kConvDx && (br > 1 || bc > 1) ? 2.0 : 1.4;
  if (positions >= lanes_from && batch_lane_waste(g) < positions) return ConvLayout::kBatchLanes;
  const double waste = flat_waste(which, g);
  return waste <= (which == kConvSddmm ? 1.3 : br == 1 && bc == 1 ? 1.5 : 1.4) ? ConvLayout::kFlat
                                                                            : ConvLayout::kIm2col;
}

// ------------------------------------------------------------------ dense crossover
// Below a crossover (few FLOPs, tiny images, dense-ish masks) oneDNN's dense convolution on the
// selected W ⊙ mask beats the sparse kernels. conv_path is the one place that decides, per op
// and call geometry; the ops follow it and torch.ops.sparsekern._conv2d_plan reports it.
// SPARSEKERN_DENSE_CROSSOVER=never|always|auto (default auto) overrides it.
enum class ConvPath { kSparse, kDense };

// Estimated time of the sparse kernel over the dense path's for one call (> 1: dense wins),
// fitted per op and mask kind on the demo's and CIFAR ResNet-18's layers
// (benchmarks/bench_conv_crossover.py, AMD EPYC AVX2, uniform and ERK 90%, unstructured /
// 16x16 / 32x32 blocks):
// - flat path: waste * (a * density + b), waste the flat positions per output pixel (2
//   threads);
// - im2col path: pad * (a * density + b / C_out) + c / (P * C_out). The a-term is the active
//   FMAs; the b-term the im2col / col2im / packing work, shared by a layer's C_out output
//   channels; pad the idle lanes of pixel tiles on images smaller than a tile (forward,
//   grad_input); the c-term (stride 1, element masks) the fixed cost per image tile, which
//   tiny images (the demo's 4x4 and 2x2) do not amortise (1 thread, c at 2 threads).
// The growth pass keeps its own dense kernel (oneDNN's weight gradient was up to 7x slower on
// 2x2 images).
double conv_sparse_cost(ConvOp which, const Geom& g, double density, int64_t br, int64_t bc) {
  if (which == kConvGrow) return 0.0;
  const ConvLayout layout = conv_layout(which, g, br, bc);
  if (layout != ConvLayout::kIm2col) {
    const double waste = layout == ConvLayout::kBatchLanes ? batch_lane_waste(g) : flat_waste(which, g);
    return which == kConvSddmm ? waste * (2.0 * density + 0.17) : waste * (1.3 * density + 0.2);
  }
  // oneDNN's backward-data of strided 1x1 convs lost to the sparse kernel even at density 1
  if (which == kConvDx && g.kh * g.kw == 1 && (g.sh > 1 || g.sw > 1)) return 0.0;
  static const double kElem[3][2] = {{4.0, 20.0}, {2.2, 25.0}, {2.6, 15.0}};
  static const double kBlock[3][2] = {{3.0, 5.0}, {3.0, 5.0}, {3.5, 5.0}};
  const double* c = (br == 1 && bc == 1 ? kElem : kBlock)[which];
  const int64_t vw = kernels().vw;
  const double cout = static_cast<double>(g.Cout);
  if (which == kConvSddmm) return c[0] * density + c[1] / cout;
  const double pad = static_cast<double>(round_up(g.P, vw)) / g.P;
  const bool tiny_tiles = br == 1 && bc == 1 && g.sh == 1 && g.sw == 1;
  return pad * (c[0] * density + c[1] / cout) +
         (tiny_tiles ? 512.0 / (static_cast<double>(g.P) * cout) : 0.0);
}

ConvPath conv_path(ConvOp which, const Geom& g, int64_t nnzb, int64_t br, int64_t bc) {
  if (const char* e = std::getenv("SPARSEKERN_DENSE_CROSSOVER")) {
    if (std::strcmp(e, "never") == 0) return ConvPath::kSparse;
    if (std::strcmp(e, "always") == 0) return ConvPath::kDense;
    TORCH_CHECK(e[0] == 0 || std::strcmp(e, "auto") == 0,
                "SPARSEKERN_DENSE_CROSSOVER must be never, always or auto, got '", e, "'");
  }
  if (g.N * g.P == 0 || g.Cout == 0 || g.Kd == 0) return ConvPath::kSparse;
  const double density = static_cast<double>(nnzb) * br * bc / (static_cast<double>(g.Cout) * g.Kd);
  return conv_sparse_cost(which, g, density, br, bc) > 1.0 ? ConvPath::kDense : ConvPath::kSparse;
}

const uint8_t* bytes(const at::Tensor& m) { return reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()); }

// W ⊙ mask packed fp32 per block, CSR slot order: [nnzb][br][bc], in the calling thread's
// scratch slot `slot`.
const float* pack_weight(const ConvWeight& cw, const Topo& tp, int64_t M, int64_t K, int64_t br,
                         int64_t bc, int slot) {
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(cw.w);
  const int64_t bsz = br * bc, es = bf ? 2 : 4;
  float* pp = scratch<float>(slot, tp.nnzb * bsz);
  const char* w0 = static_cast<const char*>(cw.w.data_ptr());
  const uint8_t* mk = bytes(cw.mask2d);
  if (br == 1 && bc == 1) {  // elements: one gather per row
    parallel_dynamic(cdiv(tp.nbr, 64), [&](int64_t c, int) {
      for (int64_t i = c * 64; i < std::min(tp.nbr, c * 64 + 64); ++i)
        kt.gather_vals(cw.bsr ? w0 + tp.rp[i] * es : w0, bf, !cw.bsr, mk, tp.ci + tp.rp[i],
                       tp.rp[i + 1] - tp.rp[i], i * K, pp + tp.rp[i]);
    });
    return pp;
  }
  parallel_dynamic(tp.nbr, [&](int64_t i, int) {
    for (int64_t s = tp.rp[i]; s < tp.rp[i + 1]; ++s) {
      const int64_t j = tp.ci[s];
      const char* src = cw.bsr ? w0 + s * bsz * es : w0 + (i * br * K + j * bc) * es;
      kt.pack_block(src, bf, cw.bsr ? bc : K, mk + i * br * K + j * bc, K,
                    static_cast<int>(std::min(br, M - i * br)), static_cast<int>(std::min(bc, K - j * bc)),
                    static_cast<int>(br), static_cast<int>(bc), pp + s * bsz, bc);
    }
  });
  return pp;
}

std::vector<uint8_t> needed_kblocks(const Topo& tp) {
  std::vector<uint8_t> need(tp.nbc, 0);
  for (int64_t s = 0; s < tp.nnzb; ++s) need[tp.ci[s]] = 1;
  return need;
}

std::array<int64_t, 13> geom_args(const Geom& g) {
  return {g.Cin, g.H, g.W, g.OH, g.OW, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw};
}

struct Tiling {
  int nvb, rmain;
  int64_t TB, ntp;  // lanes per tile, tiles per image
};

Tiling tiling(const KernelTable& kt, int64_t P, int64_t blk_out) {
  Tiling t;
  t.rmain = blk_out >= 8 ? 8 : blk_out >= 4 ? 4 : blk_out >= 2 ? 2 : 1;
  t.nvb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kt.lanes_nvb(t.rmain), cdiv(P, kt.vw))));
  if (kt.vw == 16 && t.rmain == 8 && t.nvb == 3 && round_up(P, 64) <= round_up(P, 48)) {
    t.rmain = 6;
    t.nvb = 4;
  }
  t.TB = t.nvb * kt.vw;
  t.ntp = cdiv(P, t.TB);
  return t;
}

void run_rows(const KernelTable& kt, const Tiling& t, int64_t nseg, const int32_t* off,
              int64_t depth, const float* xt, const float* wp, int64_t wss, int64_t wos,
              int64_t wts, int64_t rows, float* out) {
  for (int64_t r0 = 0; r0 < rows;) {
    const int64_t left = rows - r0;
    const int R = (t.rmain == 6 && left == 8) ? 4  // 8 rows: 4 + 4, not 6 + 2
                  : left >= t.rmain ? t.rmain : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    kt.lanes_kern(R, t.nvb, static_cast<int>(nseg), off, static_cast<int>(depth), xt,
                  wp + r0 * wos, wss, wos, wts, out + r0 * t.TB, t.TB, false);
    r0 += R;
  }
}

// The dense path's operands: W ⊙ mask as a dense fp32 conv weight, activations in fp32.
at::Tensor dense_conv_weight(const ConvWeight& cw, const Topo& tp, const Geom& g, int64_t br,
                             int64_t bc) {
  return dense_weight(cw.w, cw.bsr, bytes(cw.mask2d), tp, g.Cout, g.Kd, br, bc)
      .view({g.Cout, g.Cin, g.kh, g.kw});
}
at::Tensor as_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// How the flat kernels address a buffer: `row` floats per channel, a tap moves `wrow` floats per
// kernel row and `wpix` per kernel column; entries are bucketed by `group` source channels.
struct FlatView {
  int64_t row, wrow, wpix, group;
};

int64_t tap_offset(const Geom& g, const FlatView& v, int64_t k) {
  const int64_t t = k % (g.kh * g.kw);
  return (t / g.kw) * g.dh * v.wrow + (t % g.kw) * g.dw * v.wpix;
}

// Writes the flat buffer dst [C][f.row] from src (fp32 or bf16) [N, C, A, B]: rows of image n,
// channel c go to dst[c][base + n*img + a*Wp + lead .. + B], zeros everywhere else (written in
// one sequential pass: the gaps between rows, then the rows).
void fill_flat(const Flat& f, const char* src, bool bf, int64_t N, int64_t C, int64_t A,
               int64_t B, int64_t base, int64_t lead, float* dst) {
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* row = dst + c * f.row;
      int64_t done = 0;  // dst positions [0, done) are written
      for (int64_t n = 0; n < N; ++n)
        for (int64_t a = 0; a < A; ++a) {
          const int64_t at = base + n * f.img + a * f.Wp + lead;
          zero_f32(row + done, at - done);
          float* d = row + at;
          const int64_t so = ((n * C + c) * A + a) * B;
          if (bf) {
            const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src) + so;
            for (int64_t i = 0; i < B; ++i) {
              const uint32_t u = static_cast<uint32_t>(s16[i]) << 16;
              std::memcpy(d + i, &u, 4);
            }
          } else {
            copy_f32(d, reinterpret_cast<const float*>(src) + so, B);
          }
          done = at + B;
        }
      std::memset(row + done, 0, (f.row - done) * sizeof(float));
    }
  });
}

// The entries of the flat sums: per output row, bucketed by source channel group (groups of
// `group` channels, so the rows of one group's input window stay in L1 while every output row
// passes over it), in the builder's order inside a bucket. Row r's bucket g is
// [bounds[r*(ngroups+1) + g], bounds[r*(ngroups+1) + g + 1]). val holds the weight (forward,
// grad_input) or the output position (SDDMM). Zero weights (masked-off entries of a block,
// zero values) are left out of the forward and grad_input: they add nothing to finite inputs,
// and rows with non-finite inputs are recomputed by the reference (ops._dispatch).
template <class T>
struct FlatEntries {
  int64_t ngroups;
  std::vector<int64_t> bounds, idx;
  std::vector<T> val;
};

// walk(r, emit) calls emit(bucket, idx, val) for row r's entries in order (bucket: source
// channel / group).
template <class T, class Walk>
FlatEntries<T> flat_entries(int64_t rows, int64_t channels, int64_t group, const Walk& walk) {
  FlatEntries<T> fe;
  fe.ngroups = std::max<int64_t>(1, cdiv(channels, group));
  const int64_t bs = fe.ngroups + 1;
  fe.bounds.assign(rows * bs, 0);
  at::parallel_for(0, rows, 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r)
      walk(r, [&](int64_t b, int64_t, T) { ++fe.bounds[r * bs + b + 1]; });
  });
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < bs; ++g) {
      total += fe.bounds[r * bs + g];
      fe.bounds[r * bs + g] = total;
    }
  fe.idx.resize(std::max<int64_t>(1, total));
  fe.val.resize(std::max<int64_t>(1, total));
  at::parallel_for(0, rows, 16, [&](int64_t a, int64_t b) {
    std::vector<int64_t> cur(bs);
    for (int64_t r = a; r < b; ++r) {
      std::copy(fe.bounds.begin() + r * bs, fe.bounds.begin() + (r + 1) * bs, cur.begin());
      walk(r, [&](int64_t b, int64_t idx, T v) {
        int64_t& e = cur[b];
        fe.idx[e] = idx;
        fe.val[e++] = v;
      });
    }
  });
  return fe;
}

// Source channels per bucket: their windows (chunk + margin floats each) fill ~16 KiB.
FlatView flat_view(const Flat& f) {
  return {f.row, f.Wp, 1, std::max<int64_t>(1, (int64_t(16) << 10) / (4 * (f.chunk + f.margin)))};
}

// Forward: row co holds (W[co, k], ci(k)*row + offset(k)) for its active k, in k order.
// Bucket and flat offset of every weight column k of the forward / SDDMM entries (the divisions
// once per column, not per entry: they were ~15% of a 512-channel 4x4 forward).
struct ColTable {
  std::vector<int64_t> bucket, off;
};

ColTable col_table(const Geom& g, const FlatView& f) {
  ColTable t;
  t.bucket.resize(g.Kd);
  t.off.resize(g.Kd);
  const int64_t khw = g.kh * g.kw;
  for (int64_t k = 0; k < g.Kd; ++k) {
    t.bucket[k] = k / khw / f.group;
    t.off[k] = k / khw * f.row + tap_offset(g, f, k);
  }
  return t;
}

FlatEntries<float> forward_entries(const Geom& g, const FlatView& f, const Topo& tp,
                                   const float* pp, int64_t br, int64_t bc) {
  const int64_t bsz = br * bc;
  const ColTable ct = col_table(g, f);
  return flat_entries<float>(g.Cout, g.Cin, f.group, [&](int64_t co, auto&& emit) {
    const int64_t i = co / br, r = co % br;
    for (int64_t s = tp.rp[i]; s < tp.rp[i + 1]; ++s)
      for (int64_t c = 0; c < bc; ++c) {
        const int64_t k = tp.ci[s] * bc + c;
        const float v = pp[s * bsz + r * bc + c];
        if (k < g.Kd && v != 0.0f) emit(ct.bucket[k], ct.off[k], v);
      }
  });
}

// Forward with rows in groups of 4 (block masks; the rows4 kernels): group q holds
// (W[4q..4q+3, k], ci(k)*row + offset(k)) for the k active in any of its rows.
using W4 = std::array<float, 4>;
FlatEntries<W4> forward_entries4(const Geom& g, const FlatView& f, const Topo& tp,
                                 const float* pp, int64_t br, int64_t bc) {
  const int64_t bsz = br * bc;
  const ColTable ct = col_table(g, f);
  return flat_entries<W4>(cdiv(g.Cout, 4), g.Cin, f.group, [&](int64_t q, auto&& emit) {
    const int64_t i = 4 * q / br, r0 = 4 * q % br;
    for (int64_t s = tp.rp[i]; s < tp.rp[i + 1]; ++s)
      for (int64_t c = 0; c < bc; ++c) {
        const int64_t k = tp.ci[s] * bc + c;
        const float* w = pp + s * bsz + r0 * bc + c;
        const W4 v = {w[0], w[bc], w[2 * bc], w[3 * bc]};
        if (k < g.Kd && (v[0] != 0.0f || v[1] != 0.0f || v[2] != 0.0f || v[3] != 0.0f))
          emit(ct.bucket[k], ct.off[k], v);
      }
  });
}

// grad_input: row ci holds (W[co, k], co*row + base - offset(k)) for its taps k (in k order)
// and their active co (in co order), from the CSC view.
FlatEntries<float> grad_input_entries(const Geom& g, const FlatView& f, int64_t base,
                                      const Topo& tp, const float* pp, int64_t br, int64_t bc) {
  const int64_t bsz = br * bc, khw = g.kh * g.kw;
  return flat_entries<float>(g.Cin, g.Cout, f.group, [&](int64_t ci, auto&& emit) {
    for (int64_t k = ci * khw; k < (ci + 1) * khw; ++k) {
      const int64_t j = k / bc, c = k % bc, off = base - tap_offset(g, f, k);
      for (int64_t e = tp.cp[j]; e < tp.cp[j + 1]; ++e)
        for (int64_t r = 0; r < br; ++r) {
          const int64_t co = static_cast<int64_t>(tp.ri[e]) * br + r;
          if (co >= g.Cout) break;
          const float v = pp[static_cast<int64_t>(tp.st[e]) * bsz + r * bc + c];
          if (v != 0.0f) emit(co / f.group, co * f.row + off, v);
        }
    }
  });
}

// Runs the flat sums and writes out[(n*rows + r)*A*B + (a-a0)*B + (b-b0)] for the output pixels
// (n, a, b), flat position n*img + a*Wp + b (a0 <= a < a0 + A, b0 <= b < b0 + B).
// Row-aligned (B a multiple of the vector width, A*B of the chunk): each chunk is flat_chunk
// consecutive pixels of one output plane, each vector read at its pixels' flat base (no padding
// positions computed), summed in a tile whose rows are then copied whole (summing straight
// into out was slower: its rows, a plane apart, share cache sets). Otherwise chunk by chunk over
// the flat positions into a tile whose pixels are then stored.
// compute(out, ldo, bases, np, r0, r1) fills rows [r0, r1) of out [rows][ldo] at np chunks, the
// vectors of chunk p read at bases[p*nv + v] (nv vectors per chunk).
template <class Compute>
void run_flat(const KernelTable& kt, const Flat& f, const Compute& compute, int64_t rows,
              int64_t N, int64_t a0, int64_t A, int64_t b0, int64_t B, char* out, bool bf) {
  const int64_t es = bf ? 2 : 4, plane = A * B, nv = f.chunk / kt.vw;
  if (B % kt.vw == 0 && plane % f.chunk == 0) {  // as flat_rows_aligned
    const int64_t cpp = plane / f.chunk;  // chunks per plane
    parallel_dynamic(N * cpp, [&](int64_t c, int) {
      const int64_t n = c / cpp, q0 = c % cpp * f.chunk;
      float* tile = scratch<float>(kWork0, round_up(rows, 4) * f.chunk);
      int64_t bases[kMaxFlatChunk];
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t q = q0 + v * kt.vw;
        bases[v] = n * f.img + (q / B + a0) * f.Wp + q % B + b0;
      }
      compute(tile, f.chunk, bases, 1, 0, rows);
      for (int64_t r = 0; r < rows; ++r) {
        char* o = out + ((n * rows + r) * plane + q0) * es;
        if (bf)
          kt.convert_out(tile + r * f.chunk, f.chunk, o, true);
        else
          copy_f32(reinterpret_cast<float*>(o), tile + r * f.chunk, f.chunk);
      }
    });
    return;
  }
  parallel_dynamic(f.nchunks, [&](int64_t c, int) {
    const int64_t p0 = c * f.chunk;
    float* tile = scratch<float>(kWork0, round_up(rows, 4) * f.chunk);
    int64_t bases[kMaxFlatChunk];
    for (int64_t v = 0; v < nv; ++v) bases[v] = p0 + v * kt.vw;
    compute(tile, f.chunk, bases, 1, 0, rows);
    int64_t seg[3 * kMaxFlatChunk], ns = 0;  // (tile offset, output offset, length)
    for (int64_t q = p0; q < std::min(p0 + f.chunk, N * f.img);) {
      const int64_t n = q / f.img, a = q % f.img / f.Wp, b = q % f.img % f.Wp;
      const int64_t row_end = std::min(p0 + f.chunk, q - b + f.Wp);
      if (a < a0 || a >= a0 + A || b >= b0 + B) {
        q = row_end;
        continue;
      }
      if (b < b0) {
        q += b0 - b;
        continue;
      }
      const int64_t len = std::min(row_end, q + (b0 + B - b)) - q;
      seg[3 * ns] = q - p0;
      seg[3 * ns + 1] = n * rows * plane + (a - a0) * B + (b - b0);
      seg[3 * ns++ + 2] = len;
      q += len;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* t = tile + r * f.chunk;
      char* o = out + r * plane * es;
      for (int64_t i = 0; i < ns; ++i) {
        const int64_t* sg = seg + 3 * i;
        if (bf)
          kt.convert_out(t + sg[0], sg[2], o + sg[1] * es, true);
        else
          copy_f32(reinterpret_cast<float*>(o) + sg[1], t + sg[0], sg[2]);
      }
    }
  });
}

// Batch-lane layout (stride-1 convolutions whose batch fills the lanes): images in groups of
// L = the flat chunk (64 floats on AVX2), one float per image, so a pixel of a group is L
// consecutive floats, the flat kernels' chunk is one pixel of L images, every tap offset is a
// multiple of L (aligned loads) and only real output pixels are computed (the flat layout also
// computes its padding positions: 1.27x the pixels on 8x8 images, 1.56x on 4x4, 2.25x on 2x2).
// Images past N are zero lanes.
struct BatchLanes {
  int64_t L, G, Hp, Wp, img, row;  // img: pixels of a group's image; row: floats per channel
};

BatchLanes make_batch_lanes(const Geom& g, int64_t Hp, int64_t Wp) {
  BatchLanes l;
  l.L = kernels().flat_chunk;
  l.G = cdiv(g.N, l.L);
  l.Hp = Hp;
  l.Wp = Wp;
  l.img = Hp * Wp;
  l.row = checked_mul("sparsekern conv", "the batch-lane buffer", l.G * l.img, l.L);
  return l;
}

// A bucket's windows (kh*kw taps of L floats per channel) fill ~48 KiB (L2-resident; smaller
// buckets leave too few entries per row and bucket: measured on 8x8 and 4x4 images).
FlatView batch_lane_view(const Geom& g, const BatchLanes& l) {
  return {l.row, l.Wp * l.L, l.L,
          std::max<int64_t>(1, (int64_t(48) << 10) / (4 * l.L * g.kh * g.kw))};
}

// Writes dst [C][l.row] from src (fp32 or bf16) [N, C, A, B]: pixel (a, b) of image n, channel
// c goes to lane n % L of pixel (top + a, left + b) of group n / L; zeros everywhere else.
void fill_batch_lanes(const BatchLanes& l, const char* src, bool bf, int64_t N, int64_t C, int64_t A,
                int64_t B, int64_t top, int64_t left, float* dst) {
  const KernelTable& kt = kernels();
  const int64_t L = l.L;
  at::parallel_for(0, C * l.G, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i / l.G, grp = i % l.G, n0 = grp * L;
      float* d0 = dst + c * l.row + grp * l.img * L;
      for (int64_t h = 0; h < l.Hp; ++h) {
        float* d = d0 + h * l.Wp * L;
        const int64_t a = h - top;
        if (a < 0 || a >= A) {
          zero_f32(d, l.Wp * L);
          continue;
        }
        zero_f32(d, left * L);
        zero_f32(d + (left + B) * L, (l.Wp - left - B) * L);
        // image n0 + i, row a is the transposed operand's row i (kt.pack_t: lanes past N zero)
        kt.pack_t(src, bf, C * A * B, n0, N, (c * A + a) * B, B, B, d + left * L, L);
      }
    }
  });
}

// Runs the flat sums for a run of up to 64 output pixels of one group and a block of rows at a
// time (pixels: as many as keep the tile [rows padded to 4][pixels][L] within ~512 KiB, its rows
// padded by 16 floats so they do not share cache sets; rows split, in multiples of 4, until
// there are 4 tasks per thread: tiny images have one run per group) and writes the tile to
// out [N, rows, plane]: per (row, image) the run's pixels are consecutive. pix(q) is output
// pixel q's position in a group's image; compute as run_flat's, called pixel by pixel.
template <class Compute, class Pix>
void run_batch_lanes(const KernelTable& kt, const BatchLanes& l, const Compute& compute, int64_t rows,
               int64_t N, int64_t plane, const Pix& pix, char* out, bool bf) {
  constexpr int64_t kMaxPix = 64;
  const int64_t L = l.L, rows4 = round_up(rows, 4);
  const int64_t np = std::max<int64_t>(
      1, std::min({plane, kMaxPix, (int64_t(512) << 10) / (4 * rows4 * L)}));
  const int64_t ldo = np * L + 16, nruns = l.G * cdiv(plane, np);
  const int64_t rb = round_up(cdiv(rows4, cdiv(4 * num_threads(), nruns)), 4);
  const int64_t nrb = cdiv(rows4, rb);
  parallel_dynamic(nruns * nrb, [&](int64_t item, int) {
    const int64_t run = item / nrb, r0 = item % nrb * rb, r1 = std::min(rows, r0 + rb);
    const int64_t grp = run / cdiv(plane, np), q0 = run % cdiv(plane, np) * np;
    const int64_t n = std::min(np, plane - q0), n0 = grp * L, nl = std::min(L, N - n0);
    float* tile = scratch<float>(kWork0, rows4 * ldo);
    int64_t bases[kMaxFlatChunk];
    for (int64_t p = 0; p < n; ++p) {
      const int64_t p0 = (grp * l.img + pix(q0 + p)) * L;
      for (int64_t v = 0; v < L / kt.vw; ++v) bases[v] = p0 + v * kt.vw;
      compute(tile + p * L, ldo, bases, 1, r0, r1);
    }
    for (int64_t r = r0; r < r1; ++r)  // pixels x images -> out[n0 + i][r][q0 + q]
      kt.store_t(tile + r * ldo, L, static_cast<int>(n), static_cast<int>(nl), out, bf, rows * plane,
                 n0, r * plane + q0, false);
  });
}

// The computes of run_flat / run_batch_lanes, bucket by bucket: rows [r0, r1) (element entries) or
// their groups of 4 rows (forward_entries4; r0 a multiple of 4), at each of the np chunks.
auto flat_rows_of(const KernelTable& kt, const float* src, const FlatEntries<float>& fe) {
  return [&kt, src, &fe](float* tile, int64_t ldo, const int64_t* bases, int64_t np, int64_t r0,
                         int64_t r1) {
    const int64_t bs = fe.ngroups + 1, nv = kt.flat_chunk / kt.vw;
    for (int64_t gi = 0; gi < fe.ngroups; ++gi)
      for (int64_t p = 0; p < np; ++p)
        kt.flat_rows(src, fe.idx.data(), fe.val.data(), fe.bounds.data() + r0 * bs + gi, bs,
                     r1 - r0, bases + p * nv, tile + r0 * ldo + p * kt.flat_chunk, ldo, gi > 0);
  };
}

auto flat_rows4_of(const KernelTable& kt, const float* src, const FlatEntries<W4>& fe) {
  return [&kt, src, &fe](float* tile, int64_t ldo, const int64_t* bases, int64_t np, int64_t r0,
                         int64_t r1) {
    const int64_t bs = fe.ngroups + 1, g0 = r0 / 4, g1 = cdiv(r1, 4), nv = kt.flat_chunk / kt.vw;
    for (int64_t gi = 0; gi < fe.ngroups; ++gi)
      for (int64_t p = 0; p < np; ++p)
        kt.flat_rows4(src, fe.idx.data(), fe.val.front().data(), fe.bounds.data() + g0 * bs + gi,
                      bs, g1 - g0, bases + p * nv, tile + 4 * g0 * ldo + p * kt.flat_chunk, ldo,
                      gi > 0);
  };
}

at::Tensor conv2d_flat(const Geom& g, const at::Tensor& x, const Topo& tp, const float* pp,
                       int64_t br, int64_t bc, bool batch, at::Tensor& y) {
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(x);
  const char* x0 = static_cast<const char*>(x.data_ptr());
  char* y0 = static_cast<char*>(y.data_ptr());
  if (batch) {
    const BatchLanes l = make_batch_lanes(g, g.H + 2 * g.ph, g.W + 2 * g.pw);
    float* xf = scratch<float>(kShared1, checked_mul("sparsekern conv", "the batch-lane input", g.Cin, l.row));
    fill_batch_lanes(l, x0, bf, g.N, g.Cin, g.H, g.W, g.ph, g.pw, xf);
    auto pix = [&](int64_t q) { return q / g.OW * g.sh * l.Wp + q % g.OW * g.sw; };
    const FlatView v = batch_lane_view(g, l);
    if (br % 4 == 0 && bc > 1)
      run_batch_lanes(kt, l, flat_rows4_of(kt, xf, forward_entries4(g, v, tp, pp, br, bc)),
                g.Cout, g.N, g.OH * g.OW, pix, y0, bf);
    else
      run_batch_lanes(kt, l, flat_rows_of(kt, xf, forward_entries(g, v, tp, pp, br, bc)), g.Cout,
                g.N, g.OH * g.OW, pix, y0, bf);
    return y;
  }
  const Flat f = make_flat(kt, g);
  float* xf = scratch<float>(kShared1, g.Cin * f.row);
  fill_flat(f, x0, bf, g.N, g.Cin, g.H, g.W, g.ph * f.Wp, g.pw, xf);
  const FlatView v = flat_view(f);
  if (br % 4 == 0 && bc > 1)  // blocks: rows in groups of 4 share every input load
    run_flat(kt, f, flat_rows4_of(kt, xf, forward_entries4(g, v, tp, pp, br, bc)),
             g.Cout, g.N, 0, g.OH, 0, g.OW, y0, bf);
  else
    run_flat(kt, f, flat_rows_of(kt, xf, forward_entries(g, v, tp, pp, br, bc)), g.Cout,
             g.N, 0, g.OH, 0, g.OW, y0, bf);
  return y;
}

// grad_input in the batch-lane layout: dy pixel (oh, ow) at (oh + T, ow + S) of a group's image
// (T = (kh-1)*dh, S = (kw-1)*dw zero rows / columns around it), dx pixel (ih, iw) read from
// (ih + ph + T, iw + pw + S) minus each tap's offset.
at::Tensor conv2d_grad_input_flat(const Geom& g, const at::Tensor& dy, const Topo& tp,
                                  const float* pp, int64_t br, int64_t bc, bool batch,
                                  at::Tensor& dx) {
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(dy);
  const char* dy0 = static_cast<const char*>(dy.data_ptr());
  char* dx0 = static_cast<char*>(dx.data_ptr());
  if (batch) {
    const int64_t T = (g.kh - 1) * g.dh, S = (g.kw - 1) * g.dw;
    const BatchLanes l = make_batch_lanes(g, g.OH + 2 * T, g.OW + 2 * S);
    float* dyf = scratch<float>(kShared1, checked_mul("sparsekern conv", "the batch-lane input", g.Cout, l.row));
    fill_batch_lanes(l, dy0, bf, g.N, g.Cout, g.OH, g.OW, T, S, dyf);
    const FlatEntries<float> fe =
        grad_input_entries(g, batch_lane_view(g, l), (T * l.Wp + S) * l.L, tp, pp, br, bc);
    run_batch_lanes(kt, l, flat_rows_of(kt, dyf, fe), g.Cin, g.N, g.H * g.W,
              [&](int64_t q) { return (q / g.W + g.ph) * l.Wp + q % g.W + g.pw; }, dx0, bf);
    return dx;
  }
  const Flat f = make_flat(kt, g);
  float* dyf = scratch<float>(kShared1, g.Cout * f.row);
  fill_flat(f, dy0, bf, g.N, g.Cout, g.OH, g.OW, f.margin, 0, dyf);
  const FlatEntries<float> fe = grad_input_entries(g, flat_view(f), f.margin, tp, pp, br, bc);
  run_flat(kt, f, flat_rows_of(kt, dyf, fe), g.Cin, g.N, g.ph, g.H, g.pw, g.W, dx0, bf);
  return dx;
}

at::Tensor conv2d_cpu(const at::Tensor& x_arg, const at::Tensor& w, const at::Tensor& mask,
                      at::TensorList topo, int64_t br, int64_t bc, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "sparsekern::_conv2d";
  ScratchScope scope;
  {
    const at::Tensor& x = x_arg;  // the schema's name in the messages
    SK_CHECK_CPU(op, x);
    SK_CHECK_DIM(op, x, 4);
    SK_CHECK_FLOAT(op, x);
  }
  SK_CHECK_DIM(op, mask, 4);
  Geom g = make_geom(op, x_arg.sizes(), mask.sizes(), stride, padding, dilation, groups);
  ConvWeight cw = check_conv_weight(op, x_arg, "x", w, mask, br, bc);
  const Topo tp = check_conv_topology(op, cw, w, topo, g, br, bc, false);
  at::Tensor x = x_arg.contiguous();
  at::Tensor y = at::empty({g.N, g.Cout, g.OH, g.OW}, x.options());
  if (y.numel() == 0) return y;
  if (conv_path(kConvFwd, g, tp.nnzb, br, bc) == ConvPath::kDense)
    return at::convolution(as_f32(x), dense_conv_weight(cw, tp, g, br, bc), {}, stride, padding,
                           dilation, false, {0, 0}, 1)
        .to(x.scalar_type())
        .contiguous();
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(x);
  const int64_t bsz = br * bc, es = bf ? 2 : 4;
  const float* pp = pack_weight(cw, tp, g.Cout, g.Kd, br, bc, kShared0);
  const ConvLayout layout = conv_layout(kConvFwd, g, br, bc);
  if (layout != ConvLayout::kIm2col)
    return conv2d_flat(g, x, tp, pp, br, bc, layout == ConvLayout::kBatchLanes, y);
  std::vector<int32_t> off(std::max<int64_t>(1, tp.nnzb));
  for (int64_t s = 0; s < tp.nnzb; ++s) off[s] = static_cast<int32_t>(tp.ci[s] * bc);
  const std::vector<uint8_t> need = needed_kblocks(tp);
  const std::array<int64_t, 13> ga = geom_args(g);
  const Tiling t = tiling(kt, g.P, br);
  const int64_t kd_pad = tp.nbc * bc;
  const char* x0 = static_cast<const char*>(x.data_ptr());
  char* y0 = static_cast<char*>(y.data_ptr());
  parallel_dynamic(g.N * t.ntp, [&](int64_t item, int) {
    const int64_t n = item / t.ntp, p0 = (item % t.ntp) * t.TB;
    const int64_t lanes = std::min(t.TB, g.P - p0);
    float* u = scratch<float>(kWork0, kd_pad * t.TB);
    float* o = scratch<float>(kWork1, round_up(br, 8) * t.TB);
    kt.im2col(x0 + n * g.Cin * g.H * g.W * es, bf, ga.data(), p0, lanes, need.data(), bc, kd_pad, u, t.TB);
    for (int64_t i = 0; i < tp.nbr; ++i) {
      const int64_t rows = std::min(br, g.Cout - i * br);
      run_rows(kt, t, tp.rp[i + 1] - tp.rp[i], off.data() + tp.rp[i], bc, u, pp + tp.rp[i] * bsz,
               bsz, bc, 1, rows, o);
      for (int64_t r = 0; r < rows; ++r)
        kt.convert_out(o + r * t.TB, lanes, y0 + ((n * g.Cout + i * br + r) * g.P + p0) * es, bf);
    }
  });
  return y;
}

at::Tensor conv2d_grad_input_cpu(const at::Tensor& dy_in, const at::Tensor& w,
                                 const at::Tensor& mask, at::TensorList topo, int64_t br,
                                 int64_t bc, at::IntArrayRef input_hw, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const char* op = "sparsekern::_conv2d_grad_input";
  ScratchScope scope;
  {
    const at::Tensor& dy = dy_in;  // the schema's name in the messages
    SK_CHECK_CPU(op, dy);
    SK_CHECK_DIM(op, dy, 4);
    SK_CHECK_FLOAT(op, dy);
  }
  TORCH_CHECK(input_hw.size() == 2, op, ": input_hw must have 2 entries");
  SK_CHECK_DIM(op, mask, 4);
  Geom g = make_geom(op, {dy_in.size(0), mask.size(1), input_hw[0], input_hw[1]}, mask.sizes(),
                     stride, padding, dilation, groups);
  TORCH_CHECK(dy_in.size(1) == g.Cout && dy_in.size(2) == g.OH && dy_in.size(3) == g.OW, op,
              ": dy must be [N, ", g.Cout, ", ", g.OH, ", ", g.OW, "], got ", dy_in.sizes());
  ConvWeight cw = check_conv_weight(op, dy_in, "dy", w, mask, br, bc);
  const Topo tp = check_conv_topology(op, cw, w, topo, g, br, bc, true);
  at::Tensor dy = dy_in.contiguous();
  at::Tensor dx = at::empty({g.N, g.Cin, g.H, g.W}, dy.options());
  if (dx.numel() == 0) return dx;
  if (conv_path(kConvDx, g, tp.nnzb, br, bc) == ConvPath::kDense) {
    const at::Tensor wd = dense_conv_weight(cw, tp, g, br, bc);
    const at::Tensor shape_only = at::empty({g.N, g.Cin, g.H, g.W}, wd.options());  // never read
    return std::get<0>(at::convolution_backward(as_f32(dy), shape_only, wd, c10::nullopt, stride,
                                                padding, dilation, false, {0, 0}, 1,
                                                {true, false, false}))
        .to(dy.scalar_type())
        .contiguous();
  }
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(dy);
  const int64_t bsz = br * bc, es = bf ? 2 : 4;
  const float* pp = pack_weight(cw, tp, g.Cout, g.Kd, br, bc, kShared0);
  const ConvLayout layout = conv_layout(kConvDx, g, br, bc);
  if (layout != ConvLayout::kIm2col)
    return conv2d_grad_input_flat(g, dy, tp, pp, br, bc, layout == ConvLayout::kBatchLanes, dx);
  // CSC-ordered copy of the packed blocks
  float* pt = scratch<float>(kShared1, tp.nnzb * bsz);
  at::parallel_for(0, tp.nnzb, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::memcpy(pt + i * bsz, pp + tp.st[i] * bsz, bsz * sizeof(float));
  });
  std::vector<int32_t> off(std::max<int64_t>(1, tp.nnzb));
  for (int64_t e = 0; e < tp.nnzb; ++e) off[e] = static_cast<int32_t>(tp.ri[e] * br);
  const std::vector<uint8_t> need = needed_kblocks(tp);
  const std::array<int64_t, 13> ga = geom_args(g);
  const Tiling t = tiling(kt, g.P, bc);
  const int64_t kd_pad = tp.nbc * bc;
  const char* dy0 = static_cast<const char*>(dy.data_ptr());
  char* dx0 = static_cast<char*>(dx.data_ptr());
  const int64_t img = g.Cin * g.H * g.W;
  parallel_dynamic(g.N, [&](int64_t n, int) {
    // dyᵀ tile with rows up to nbr*br (the kernel reads whole blocks; rows >= Cout are zero)
    float* dyt = scratch<float>(kWork0, tp.nbr * br * t.TB);
    std::memset(dyt + g.Cout * t.TB, 0, (tp.nbr * br - g.Cout) * t.TB * sizeof(float));
    float* du = scratch<float>(kWork1, kd_pad * t.TB);
    float* acc = bf ? scratch<float>(kWork2, img) : reinterpret_cast<float*>(dx0) + n * img;
    std::memset(acc, 0, img * sizeof(float));
    for (int64_t tile = 0; tile < t.ntp; ++tile) {
      const int64_t p0 = tile * t.TB, lanes = std::min(t.TB, g.P - p0);
      kt.pack_cols(dy0 + n * g.Cout * g.P * es, bf, g.P, g.Cout, p0, lanes, dyt, t.TB);
      for (int64_t j = 0; j < tp.nbc; ++j) {
        if (!need[j]) continue;
        const int64_t rows = std::min(bc, g.Kd - j * bc);
        run_rows(kt, t, tp.cp[j + 1] - tp.cp[j], off.data() + tp.cp[j], br, dyt,
                 pt + tp.cp[j] * bsz, bsz, 1, bc, rows, du + j * bc * t.TB);
      }
      kt.col2im(du, ga.data(), p0, lanes, need.data(), bc, acc, t.TB);
    }
    if (bf) kt.convert_out(acc, img, dx0 + n * img * es, true);
  });
  return dx;
}

// A conv mask [C_out, C_in, kh, kw] (bool, CPU) and the block size.
void check_conv_mask(const char* op, const at::Tensor& mask, int64_t br, int64_t bc) {
  SK_CHECK_CPU(op, mask);
  SK_CHECK_BOOL(op, mask);
  SK_CHECK_BLOCK(op, br, bc);
  SK_CHECK_DIM(op, mask, 4);
}

struct ConvGrad {
  Geom g;
  at::Tensor dy, x;
};

// Checks dy [N, C_out, OH, OW] and x [N, C_in, H, W] of a weight-side op against the weight
// shape ws.
ConvGrad check_conv_grad(const char* op, const at::Tensor& dy, const at::Tensor& x,
                         at::IntArrayRef ws, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups) {
  SK_CHECK_CPU(op, x);
  SK_CHECK_CPU(op, dy);
  SK_CHECK_DIM(op, x, 4);
  SK_CHECK_DIM(op, dy, 4);
  SK_CHECK_FLOAT(op, x);
  SK_CHECK_SAME_DTYPE(op, dy, x);
  ConvGrad c;
  c.g = make_geom(op, x.sizes(), ws, stride, padding, dilation, groups);
  const Geom& g = c.g;
  TORCH_CHECK(dy.size(0) == g.N && dy.size(1) == g.Cout && dy.size(2) == g.OH && dy.size(3) == g.OW,
              op, ": dy must be [", g.N, ", ", g.Cout, ", ", g.OH, ", ", g.OW, "], got ",
              dy.sizes());
  c.x = x.contiguous();
  c.dy = dy.contiguous();
  return c;
}

// The dense weight gradient [C_out, Kd] (fp32, oneDNN) of the dense path.
at::Tensor dense_weight_grad(const ConvGrad& cg) {
  const Geom& g = cg.g;
  const at::Tensor shape_only =  // never read
      at::empty({g.Cout, g.Cin, g.kh, g.kw}, cg.x.options().dtype(at::kFloat));
  return std::get<1>(at::convolution_backward(
                         as_f32(cg.dy), as_f32(cg.x), shape_only, c10::nullopt, {g.sh, g.sw},
                         {g.ph, g.pw}, {g.dh, g.dw}, false, {0, 0}, 1, {false, true, false}))
      .contiguous()
      .view({g.Cout, g.Kd});
}

// Operand tiles of the weight-side passes for output pixels [p0, p0 + lanes) of image n:
// the im2col tile u [kd_pad][TB] (rows of the K-blocks of width nb with need set) and dy rows
// dyt [Cout][TB]; with `transpose` also ut [TB][ldu] (those K-blocks) and dytt [TB][ldd], their
// overrun columns zeroed. Worker scratch slots 0-3.
struct WeightTiles {
  float *u, *ut, *dyt, *dytt;
};
WeightTiles weight_tiles(const KernelTable& kt, const Geom& g, const Tiling& t, const char* x0,
                         const char* dy0, bool bf, int64_t n, int64_t p0, const uint8_t* need,
                         int64_t nb, int64_t kd_pad, int64_t ldu, int64_t ldd, bool transpose) {
  const int64_t es = bf ? 2 : 4, lanes = std::min(t.TB, g.P - p0);
  const std::array<int64_t, 13> ga = geom_args(g);
  WeightTiles w;
  w.u = scratch<float>(kWork0, kd_pad * t.TB);
  w.ut = scratch<float>(kWork1, t.TB * ldu);
  w.dyt = scratch<float>(kWork2, g.Cout * t.TB);
  w.dytt = scratch<float>(kWork3, t.TB * ldd);
  kt.im2col(x0 + n * g.Cin * g.H * g.W * es, bf, ga.data(), p0, lanes, need, nb, kd_pad, w.u, t.TB);
  kt.pack_cols(dy0 + n * g.Cout * g.P * es, bf, g.P, g.Cout, p0, lanes, w.dyt, t.TB);
  if (!transpose) return w;
  for (int64_t l = 0; l < t.TB; ++l) {
    std::memset(w.ut + l * ldu + kd_pad, 0, (ldu - kd_pad) * sizeof(float));
    std::memset(w.dytt + l * ldd + g.Cout, 0, (ldd - g.Cout) * sizeof(float));
  }
  for (int64_t j = 0; j < cdiv(kd_pad, nb); ++j)
    if (need[j])
      kt.store_t(w.u + j * nb * t.TB, t.TB, static_cast<int>(nb), static_cast<int>(t.TB), w.ut,
                 false, ldu, 0, j * nb, false);
  kt.store_t(w.dyt, t.TB, static_cast<int>(g.Cout), static_cast<int>(t.TB), w.dytt, false, ldd, 0,
             0, false);
  return w;
}

// rs[m*(nr+1) + r]: the first CSR slot of row m with a column >= r*KR (r < nr), and the
// row's end at r = nr (columns are strictly increasing within a row).
std::vector<int64_t> range_starts(const Topo& tp, int64_t M, int64_t nr, int64_t KR) {
  std::vector<int64_t> rs(M * (nr + 1));
  at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      int64_t s = tp.rp[m];
      for (int64_t r = 0; r < nr; ++r) {
        while (s < tp.rp[m + 1] && tp.ci[s] < r * KR) ++s;
        rs[m * (nr + 1) + r] = s;
      }
      rs[m * (nr + 1) + nr] = tp.rp[m + 1];
    }
  });
  return rs;
}

// Element-mask weight gradient into per-part sums acc0 [nt][nnz] (outer-product form). The
// pixels are walked in chunks of G tiles of TB pixels (tiles of several images when the images
// are small); per chunk the dy rows [G][Cout][TB] are packed once and the im2col rows are built
// one channel range at a time, sized to stay in L2 while every output channel's active entries
// in that range run kt.sddmm_row against them. Parts are fixed ranges of tiles, each walked in
// order, so the sums do not change from run to run at a fixed thread count.
void conv_sddmm_elem(const KernelTable& kt, const Geom& g, const Topo& tp, const char* x0,
                     const char* dy0, bool bf, int nt, float* acc0) {
  constexpr int64_t kChunkPixels = 128, kTileFloats = 16384;
  const int64_t es = bf ? 2 : 4, khw = g.kh * g.kw;
  const int nvb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4, cdiv(g.P, kt.vw))));
  const int64_t TB = nvb * kt.vw, ntp = cdiv(g.P, TB);
  const int64_t G = std::max<int64_t>(1, kChunkPixels / TB);
  const int64_t cr = std::max<int64_t>(1, std::min(g.Cin, kTileFloats / (G * TB * khw)));
  const int64_t nr = cdiv(g.Cin, cr), KR = cr * khw;
  const std::vector<int64_t> rs = range_starts(tp, g.Cout, nr, KR);
  std::array<int64_t, 13> ga = geom_args(g);
  const int64_t nitems = g.N * ntp;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(nt, nitems));
  const uint8_t one = 1;
  parallel_dynamic(parts, [&](int64_t part, int) {
    const int64_t i0 = nitems * part / parts, i1 = nitems * (part + 1) / parts;
    float* dyt = scratch<float>(kWork0, G * g.Cout * TB);
    float* u = scratch<float>(kWork1, G * KR * TB);
    float* acc = acc0 + part * tp.nnzb;
    std::array<int64_t, 13> gr = ga;
    for (int64_t c0 = i0; c0 < i1; c0 += G) {
      const int64_t gn = std::min(G, i1 - c0);
      for (int64_t q = 0; q < gn; ++q) {
        const int64_t n = (c0 + q) / ntp, p0 = ((c0 + q) % ntp) * TB;
        kt.pack_cols(dy0 + n * g.Cout * g.P * es, bf, g.P, g.Cout, p0, std::min(TB, g.P - p0),
                     dyt + q * g.Cout * TB, TB);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t ch0 = r * cr, cn = std::min(cr, g.Cin - ch0);
        gr[0] = cn;
        for (int64_t q = 0; q < gn; ++q) {
          const int64_t n = (c0 + q) / ntp, p0 = ((c0 + q) % ntp) * TB;
          kt.im2col(x0 + (n * g.Cin + ch0) * g.H * g.W * es, bf, gr.data(), p0,
                    std::min(TB, g.P - p0), &one, cn * khw, cn * khw, u + q * KR * TB, TB);
        }
        for (int64_t m = 0; m < g.Cout; ++m) {
          const int64_t s0 = rs[m * (nr + 1) + r], s1 = rs[m * (nr + 1) + r + 1];
          if (s1 > s0)
            kt.sddmm_row(nvb, static_cast<int>(gn), dyt + m * TB, g.Cout * TB, u, KR * TB,
                         tp.ci + s0, s1 - s0, ch0 * khw, acc + s0);
        }
      }
    }
  });
}

// The SDDMM on the flat path: values[pos(e)] = sum_p dyf[co][p] * xf[ci(k)][p + offset(k)] for
// the active (mask-selected) entries e = (co, k) of the blocks, dyf being dy in the flat output
// domain (zero at the dropped positions). The flat positions are split into parts that depend
// only on the sizes; each part sums its chunks in order and the parts are added in order, so the
// bits do not depend on the thread count.
void conv2d_sddmm_flat(const Geom& g, const at::Tensor& x, const at::Tensor& dy, const Topo& tp,
                       const uint8_t* mk, int64_t br, int64_t bc, bool batch, at::Tensor& values) {
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(x);
  const int64_t bsz = br * bc;
  const bool rows4 = br % 4 == 0 && bc > 1;  // blocks: 4 dy rows share every input load
  const int64_t nrows = rows4 ? round_up(g.Cout, 4) : g.Cout;
  const char* x0 = static_cast<const char*>(x.data_ptr());
  const char* dy0 = static_cast<const char*>(dy.data_ptr());
  // Spans: batch lanes, one output row of a group (dy in x's geometry); flat row-aligned (fp32,
  // output rows a multiple of the vector width), up to 8 chunks of one output plane with dy read
  // in place (no copy, no padding positions); else 8 chunks of flat positions (dy in x's
  // geometry). span(sp, xb) gives the span's first dy value of row 0 and fills its x bases.
  FlatView f;
  const float* xf;
  const float* dyf;
  int64_t lda, nspans, maxv;
  std::function<const float*(int64_t, int64_t*, int64_t*)> span;
  const bool in_place = !batch && !bf && g.OW % kt.vw == 0 && (!rows4 || g.Cout % 4 == 0);
  if (batch) {
    const BatchLanes l = make_batch_lanes(g, g.H + 2 * g.ph, g.W + 2 * g.pw);
    f = batch_lane_view(g, l);
    float* xl = scratch<float>(kShared1, checked_mul("sparsekern conv", "the batch-lane input", g.Cin, l.row));
    fill_batch_lanes(l, x0, bf, g.N, g.Cin, g.H, g.W, g.ph, g.pw, xl);
    float* dyl = scratch<float>(kShared2, checked_mul("sparsekern conv", "the batch-lane input", nrows, l.row));
    fill_batch_lanes(l, dy0, bf, g.N, g.Cout, g.OH, g.OW, 0, 0, dyl);
    std::memset(dyl + g.Cout * l.row, 0, (nrows - g.Cout) * l.row * sizeof(float));
    xf = xl;
    dyf = dyl;
    lda = l.row;
    nspans = l.G * g.OH;
    maxv = g.OW * l.L / kt.vw;
    span = [l, maxv, vw = kt.vw, dyf, OH = g.OH](int64_t sp, int64_t* xb, int64_t* nv) {
      const int64_t p0 = (sp / OH * l.img + sp % OH * l.Wp) * l.L;
      for (int64_t v = 0; v < maxv; ++v) xb[v] = p0 + v * vw;
      *nv = maxv;
      return dyf + p0;
    };
  } else {
    // spans of up to 8 chunks (one horizontal sum per entry and 64 vectors: 1.05-1.15x faster
    // than 2 chunks on ResNet-18's 32x32 and 16x16 layers, AVX2), rows long enough for the last
    // span, buckets sized by the span's windows
    Flat fl = make_flat(kt, g);
    const int64_t len = 8 * fl.chunk;
    maxv = len / kt.vw;
    nspans = cdiv(fl.nchunks * fl.chunk, len);
    fl.row = std::max(fl.row, nspans * len + fl.margin);
    f = flat_view(fl);
    f.group = std::max<int64_t>(1, (int64_t(16) << 10) / (4 * (len + fl.margin)));
    float* xfl = scratch<float>(kShared1, g.Cin * fl.row);
    fill_flat(fl, x0, bf, g.N, g.Cin, g.H, g.W, g.ph * fl.Wp, g.pw, xfl);
    xf = xfl;
    if (in_place) {
      const int64_t plane = g.OH * g.OW, spp = cdiv(plane, len);  // spans per plane
      dyf = dy.data_ptr<float>();
      lda = plane;
      nspans = g.N * spp;
      span = [fl, plane, spp, len, vw = kt.vw, dyf, OW = g.OW, Cout = g.Cout](
                 int64_t sp, int64_t* xb, int64_t* nv) {
        const int64_t n = sp / spp, q0 = sp % spp * len;
        *nv = (std::min(len, plane - q0)) / vw;
        for (int64_t v = 0; v < *nv; ++v) {
          const int64_t q = q0 + v * vw;
          xb[v] = n * fl.img + q / OW * fl.Wp + q % OW;
        }
        return dyf + n * Cout * plane + q0;
      };
    } else {
      float* dyfl = scratch<float>(kShared2, nrows * fl.row);
      fill_flat(fl, dy0, bf, g.N, g.Cout, g.OH, g.OW, 0, 0, dyfl);
      std::memset(dyfl + g.Cout * fl.row, 0, (nrows - g.Cout) * fl.row * sizeof(float));
      dyf = dyfl;
      lda = fl.row;
      span = [len, maxv, vw = kt.vw, dyf](int64_t sp, int64_t* xb, int64_t* nv) {
        for (int64_t v = 0; v < maxv; ++v) xb[v] = sp * len + v * vw;
        *nv = maxv;
        return dyf + sp * len;
      };
    }
  }
  auto selected = [&](int64_t co, int64_t k) {
    return co < g.Cout && (mk == nullptr || mk[co * g.Kd + k]);
  };
  // the entries' output positions: one per row (-1: none), 4 per entry with rows4
  using P4 = std::array<int64_t, 4>;
  const ColTable ct = col_table(g, f);
  FlatEntries<P4> fe = flat_entries<P4>(
      rows4 ? nrows / 4 : g.Cout, g.Cin, f.group, [&](int64_t q, auto&& emit) {
        const int64_t co0 = rows4 ? 4 * q : q, i = co0 / br, r0 = co0 % br;
        for (int64_t s = tp.rp[i]; s < tp.rp[i + 1]; ++s)
          for (int64_t c = 0; c < bc; ++c) {
            const int64_t k = tp.ci[s] * bc + c;
            if (k >= g.Kd) continue;
            P4 pos = {-1, -1, -1, -1};
            bool any = false;
            for (int r = 0; r < (rows4 ? 4 : 1); ++r)
              if (selected(co0 + r, k)) {
                pos[r] = s * bsz + (r0 + r) * bc + c;
                any = true;
              }
            if (any) emit(ct.bucket[k], ct.off[k], pos);
          }
      });
  const int64_t ne = fe.bounds.back(), width = rows4 ? 4 : 1, nacc = std::max<int64_t>(1, ne * width);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(nspans, 8));
  float* acc0 = scratch<float>(kShared3, checked_mul("sparsekern::_conv2d_sddmm",
                                                     "partial sums", parts, nacc));
  parallel_dynamic(parts, [&](int64_t part, int) {
    float* acc = acc0 + part * nacc;
    std::memset(acc, 0, nacc * sizeof(float));
    std::vector<int64_t> xb(maxv);
    const int64_t s0 = nspans * part / parts, s1 = nspans * (part + 1) / parts;
    for (int64_t sp = s0; sp < s1; ++sp) {
      int64_t nv = 0;
      const float* a = span(sp, xb.data(), &nv);
      for (int64_t gi = 0; gi < fe.ngroups; ++gi) {
        const int64_t* b = fe.bounds.data() + gi;
        if (rows4)
          kt.flat_sddmm4(a, lda, xf, fe.idx.data(), b, fe.ngroups + 1, nrows / 4, xb.data(), nv,
                         acc);
        else
          kt.flat_sddmm(a, lda, xf, fe.idx.data(), b, fe.ngroups + 1, g.Cout, xb.data(), nv, acc);
      }
    }
  });
  values.zero_();
  char* vp = static_cast<char*>(values.data_ptr());
  at::parallel_for(0, ne, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t r = 0; r < width; ++r) {
        const int64_t pos = fe.val[i][r];
        if (pos < 0) continue;
        float v = acc0[i * width + r];
        for (int64_t part = 1; part < parts; ++part) v += acc0[part * nacc + i * width + r];
        kt.convert_out(&v, 1, vp + pos * (bf ? 2 : 4), bf);
      }
  });
}

at::Tensor conv2d_sddmm_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                            const at::Tensor& mask, at::TensorList topo, int64_t br, int64_t bc,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
  const char* op = "sparsekern::_conv2d_sddmm";
  ScratchScope scope;
  check_conv_mask(op, mask, br, bc);
  const ConvGrad cg = check_conv_grad(op, dy_in, x_in, mask.sizes(), stride, padding, dilation,
                                      groups);
  const Geom& g = cg.g;
  const at::Tensor &x = cg.x, &dy = cg.dy;
  Topo tp = check_topology(op, topo, g.Cout, g.Kd, br, bc, false);
  at::Tensor mask2d = mask.contiguous().view({g.Cout, g.Kd});
  at::Tensor values = at::empty({tp.nnzb, br, bc}, x.options());
  if (values.numel() == 0) return values;
  if (conv_path(kConvSddmm, g, tp.nnzb, br, bc) == ConvPath::kDense) {
    gather_dense(dense_weight_grad(cg), bytes(mask2d), tp, br, bc,
                 values);
    return values;
  }
  const ConvLayout layout = conv_layout(kConvSddmm, g, br, bc);
  if (layout != ConvLayout::kIm2col) {
    conv2d_sddmm_flat(g, x, dy, tp, bytes(mask2d), br, bc, layout == ConvLayout::kBatchLanes, values);
    return values;
  }
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(x);
  const int64_t bsz = br * bc, es = bf ? 2 : 4;
  const std::vector<uint8_t> need = needed_kblocks(tp);
  const Tiling t = tiling(kt, g.P, 16);
  const int nv = bc > kt.vw ? 2 : 1;
  const int64_t cw = nv * kt.vw, bcp = round_up(bc, cw);
  const int mr = kt.ok_mr(nv, br);
  const int64_t nstrips = cdiv(br, mr);
  const int64_t kd_pad = tp.nbc * bc;
  const int64_t ldu = kd_pad + bcp;                       // transposed tile row: Kd + overrun
  const int64_t ldd = tp.nbr * br + nstrips * mr;         // transposed dy row: Cout + overrun
  // Per-part fp32 sums, one padded [nstrips*mr][bcp] tile per block (okern accumulates);
  // element masks keep one sum per entry (conv_sddmm_elem). Parts are fixed
  // ranges of pixel tiles (parallel_parts), reduced in part order: the same bits every run.
  const int64_t nitems = g.N * t.ntp;
  const int nt = static_cast<int>(std::min<int64_t>(num_threads(), std::max<int64_t>(1, nitems)));
  const bool elem = br == 1 && bc == 1;
  const int64_t tsz = elem ? 1 : nstrips * mr * bcp;
  float* acc0 = scratch<float>(kShared0, checked_mul(op, "partial sums", nt, tp.nnzb * tsz));
  at::parallel_for(0, nt * tp.nnzb, 64, [&](int64_t b, int64_t e) {
    std::memset(acc0 + b * tsz, 0, (e - b) * tsz * sizeof(float));
  });
  const char* x0 = static_cast<const char*>(x.data_ptr());
  const char* dy0 = static_cast<const char*>(dy.data_ptr());
  // SPARSEKERN_CONV_SDDMM=dot selects the former dot-product form (in-process A/B benchmarks)
  const char* form = std::getenv("SPARSEKERN_CONV_SDDMM");
  const bool dot_form = form && std::strcmp(form, "dot") == 0;
  if (elem && !dot_form)
    conv_sddmm_elem(kt, g, tp, x0, dy0, bf, nt, acc0);
  else
    parallel_parts(nitems, nt, [&](int64_t item, int tid) {
    const int64_t n = item / t.ntp, p0 = (item % t.ntp) * t.TB;
    const int64_t lanes = std::min(t.TB, g.P - p0);
    const WeightTiles w = weight_tiles(kt, g, t, x0, dy0, bf, n, p0, need.data(), bc, kd_pad, ldu,
                                       ldd, !elem);
    float* acc = acc0 + tid * tp.nnzb * tsz;
    if (elem) {
      for (int64_t i = 0; i < g.Cout; ++i)
        kt.dot_row(t.nvb, w.dyt + i * t.TB, w.u, tp.ci + tp.rp[i], tp.rp[i + 1] - tp.rp[i],
                   acc + tp.rp[i]);
      return;
    }
    for (int64_t i = 0; i < tp.nbr; ++i) {
      for (int64_t s = tp.rp[i]; s < tp.rp[i + 1]; ++s) {
        const int64_t j = tp.ci[s];
        float* a = acc + s * tsz;
        for (int64_t st = 0; st < nstrips; ++st)
          for (int64_t c0 = 0; c0 < bcp; c0 += cw)
            kt.okern(mr, nv, static_cast<int>(lanes), w.dytt + i * br + st * mr, ldd,
                     w.ut + j * bc + c0, ldu, a + st * mr * bcp + c0, bcp, true);
      }
    }
  });
  // reduce the per-thread sums, mask, convert
  const uint8_t* mk = bytes(mask2d);
  char* vp = static_cast<char*>(values.data_ptr());
  at::parallel_for(0, tp.nbr, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t s = tp.rp[i]; s < tp.rp[i + 1]; ++s) {
        float* a = acc0 + s * tsz;
        for (int th = 1; th < nt; ++th) {
          const float* o = acc0 + th * tp.nnzb * tsz + s * tsz;
          for (int64_t q = 0; q < tsz; ++q) a[q] += o[q];
        }
        const int64_t j = tp.ci[s];
        kt.store_block(a, elem ? 1 : bcp, mk + i * br * g.Kd + j * bc, g.Kd,
                       static_cast<int>(std::min(br, g.Cout - i * br)),
                       static_cast<int>(std::min(bc, g.Kd - j * bc)), static_cast<int>(br),
                       static_cast<int>(bc), vp + s * bsz * es, bf, bc);
      }
  });
  return values;
}

// The dense weight gradient G [C_out, Kd] in row panels of at most kPanelFloats entries (the
// whole G for most layers): each part (a fixed range of pixel tiles) sums its tiles' outer
// products (transposed dy and im2col tiles, as conv2d_sddmm) into its own panel, the panels
// are added in part order and handed to the growth sink. Memory: one panel per thread, never
// the unfolded input.
std::pair<at::Tensor, at::Tensor> conv_dense_pass(const ConvGrad& cg, const GrowArgs& a,
                                                  int64_t br, int64_t bc, const Topo* tp,
                                                  const at::Tensor* mask2d, at::Tensor* values) {
  constexpr int64_t kPanelFloats = int64_t(1) << 19;
  const KernelTable& kt = kernels();
  const Geom& g = cg.g;
  if (g.Cout == 0 || g.Kd == 0) {  // an empty gradient: no blocks, nothing to rank (k == 0)
    GrowSink sink(a, g.Cout, g.Kd, br, bc, tp, mask2d, values, 1);
    return sink.finish();
  }
  if (conv_path(kConvGrow, g, g.Cout * g.Kd, 1, 1) == ConvPath::kDense) {
    const at::Tensor G = dense_weight_grad(cg);
    GrowSink sink(a, g.Cout, g.Kd, br, bc, tp, mask2d, values, g.Kd);
    const int64_t chunk = br * std::max<int64_t>(1, 16 / br);
    const float* gp = G.data_ptr<float>();
    parallel_dynamic(cdiv(g.Cout, chunk), [&](int64_t c, int tid) {
      const int64_t a0 = c * chunk;
      sink.tile(gp + a0 * g.Kd, g.Kd, a0, std::min(chunk, g.Cout - a0), 0, g.Kd, tid);
      sink.flush(tid);
    });
    return sink.finish();
  }
  const bool bf = is_bf16(cg.x);
  const int nv = 2;
  const int64_t cw = nv * kt.vw;
  const int mr = kt.ok_mr(nv, 1 << 20);
  const int64_t ldk = round_up(g.Kd, cw);          // panel row: Kd + zero overrun
  const int64_t ldd = round_up(g.Cout, mr) + mr;   // transposed dy row: Cout + zero overrun
  const int64_t prows = std::min(round_up(g.Cout, br),
                                 br * std::max<int64_t>(1, kPanelFloats / (ldk * br)));
  const int64_t pstr = round_up(prows, mr);        // rows held per panel (whole strips)
  const Tiling t = tiling(kt, g.P, 16);
  const std::vector<uint8_t> need(cdiv(ldk, cw), 1);
  const int64_t nitems = g.N * t.ntp;
  const int nt = static_cast<int>(std::min<int64_t>(num_threads(), std::max<int64_t>(1, nitems)));
  float* acc0 = scratch<float>(kShared0, nt * pstr * ldk);
  const char* x0 = static_cast<const char*>(cg.x.data_ptr());
  const char* dy0 = static_cast<const char*>(cg.dy.data_ptr());
  GrowSink sink(a, g.Cout, g.Kd, br, bc, tp, mask2d, values, g.Kd);
  for (int64_t r0 = 0; r0 < g.Cout; r0 += prows) {
    const int64_t nrows = std::min(prows, g.Cout - r0);
    at::parallel_for(0, nt * pstr, 16, [&](int64_t b, int64_t e) {
      std::memset(acc0 + b * ldk, 0, (e - b) * ldk * sizeof(float));
    });
    parallel_parts(nitems, nt, [&](int64_t item, int tid) {
      const int64_t n = item / t.ntp, p0 = (item % t.ntp) * t.TB;
      const int64_t lanes = std::min(t.TB, g.P - p0);
      const WeightTiles w = weight_tiles(kt, g, t, x0, dy0, bf, n, p0, need.data(), cw, ldk, ldk,
                                         ldd, true);
      float* acc = acc0 + tid * pstr * ldk;
      for (int64_t st = 0; st < cdiv(nrows, mr); ++st)
        for (int64_t c0 = 0; c0 < ldk; c0 += cw)
          kt.okern(mr, nv, static_cast<int>(lanes), w.dytt + r0 + st * mr, ldd, w.ut + c0, ldk,
                   acc + st * mr * ldk + c0, ldk, true);
    });
    // sum the workers' panels, then score / store them in block-row chunks
    const int64_t chunk = br * std::max<int64_t>(1, 16 / br);
    const int64_t nch = cdiv(nrows, chunk);
    parallel_dynamic(nch, [&](int64_t c, int tid) {
      const int64_t a0 = c * chunk, a1 = std::min(nrows, a0 + chunk);
      float* dst = acc0 + a0 * ldk;
      for (int th = 1; th < nt; ++th) {
        const float* src = acc0 + (th * pstr + a0) * ldk;
        for (int64_t q = 0; q < (a1 - a0) * ldk; ++q) dst[q] += src[q];
      }
      sink.tile(dst, ldk, r0 + a0, a1 - a0, 0, g.Kd, tid);
      sink.flush(tid);
    });
  }
  return sink.finish();
}

std::tuple<at::Tensor, at::Tensor> conv2d_grow_topk_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& exclude, int64_t k,
    const c10::optional<at::Tensor>& counter, double bonus_scale, double eps, int64_t br,
    int64_t bc, at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  const char* op = "sparsekern::_conv2d_grow_topk";
  ScratchScope scope;
  SK_CHECK_BLOCK(op, br, bc);
  const ConvGrad cg = check_conv_grad(op, dy, x, weight_shape, stride, padding, dilation, groups);
  GrowArgs a = check_grow(op, cg.g.Cout, cg.g.Kd, exclude, k, counter, bonus_scale, eps, br, bc);
  if (k == 0)
    return {at::empty({0}, x.options().dtype(at::kLong)), at::empty({0}, x.options().dtype(at::kFloat))};
  auto r = conv_dense_pass(cg, a, br, bc, nullptr, nullptr, nullptr);
  return {r.first, r.second};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_fused_weight_grad_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask, at::TensorList topo,
    int64_t br, int64_t bc, const at::Tensor& exclude, int64_t k,
    const c10::optional<at::Tensor>& counter, double bonus_scale, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "sparsekern::_conv2d_fused_weight_grad";
  ScratchScope scope;
  check_conv_mask(op, mask, br, bc);
  const ConvGrad cg = check_conv_grad(op, dy, x, mask.sizes(), stride, padding, dilation, groups);
  GrowArgs a = check_grow(op, cg.g.Cout, cg.g.Kd, exclude, k, counter, bonus_scale, eps, br, bc);
  Topo tp = check_topology(op, topo, cg.g.Cout, cg.g.Kd, br, bc, false);
  at::Tensor m = mask.contiguous().view({cg.g.Cout, cg.g.Kd});
  at::Tensor values = at::empty({tp.nnzb, br, bc}, cg.x.options());
  auto r = conv_dense_pass(cg, a, br, bc, &tp, &m, &values);
  return {values, r.first, r.second};
}

// torch.ops.sparsekern._conv2d_plan: the path ("sparse" or "dense") the C++ conv op `op`
// takes for these shapes (x_shape: the forward input [N, C_in, H, W]; nnzb: the topology's
// active blocks, unused by the growth ops, whose pass is dense either way).
std::string conv2d_plan(c10::string_view op_name, at::IntArrayRef x_shape,
                        at::IntArrayRef weight_shape, int64_t nnzb, int64_t br, int64_t bc,
                        at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups) {
  const char* op = "sparsekern::_conv2d_plan";
  static const std::pair<const char*, ConvOp> kOps[] = {
      {"conv2d", kConvFwd}, {"conv2d_grad_input", kConvDx}, {"conv2d_sddmm", kConvSddmm},
      {"conv2d_grow_topk", kConvGrow}, {"conv2d_fused_weight_grad", kConvGrow}};
  const ConvOp* which = nullptr;
  for (const auto& o : kOps)
    if (op_name == o.first) which = &o.second;
  TORCH_CHECK(which, op, ": op must be one of conv2d, conv2d_grad_input, conv2d_sddmm, "
              "conv2d_grow_topk, conv2d_fused_weight_grad, got '", std::string(op_name), "'");
  TORCH_CHECK(x_shape.size() == 4, op, ": x_shape must have 4 entries, got ", x_shape);
  TORCH_CHECK(nnzb >= 0, op, ": nnzb must be >= 0, got ", nnzb);
  check_block(op, weight_shape.size() == 4 ? weight_shape[0] : 0,
              weight_shape.size() == 4 ? weight_shape[1] * weight_shape[2] * weight_shape[3] : 0,
              br, bc);
  const Geom g = make_geom(op, x_shape, weight_shape, stride, padding, dilation, groups);
  return conv_path(*which, g, nnzb, br, bc) == ConvPath::kDense ? "dense" : "sparse";
}

}  // namespace
}  // namespace sk

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("_conv2d", &sk::conv2d_cpu);
  m.impl("_conv2d_grad_input", &sk::conv2d_grad_input_cpu);
  m.impl("_conv2d_sddmm", &sk::conv2d_sddmm_cpu);
  m.impl("_conv2d_grow_topk", &sk::conv2d_grow_topk_cpu);
  m.impl("_conv2d_fused_weight_grad", &sk::conv2d_fused_weight_grad_cpu);
}

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.def("_conv2d_plan(str op, int[] x_shape, int[] weight_shape, int nnzb, int br, int bc, "
        "int[] stride, int[] padding, int[] dilation, int groups) -> str",
        &sk::conv2d_plan);
}
