// Growth scoring shared by the linear and conv weight-side passes (linear_cpu.cpp,
// conv_cpu.cpp): the checks of exclude / counter / k, and a sink that takes tiles of a dense
// weight gradient G [M, K] as a pass produces them, stores the active blocks on the way
// (fused_weight_grad) and scores every entry (block mean for block sizes other than 1x1) that
// is not excluded into the exact top-k collector. G is never held whole by the sink.
#pragma once
#include "common.h"

namespace sk {

struct GrowArgs {
  at::Tensor exclude, counter;
  int ctype = -1;                 // counter: 0 int32, 1 int64, 2 float32, -1 none
  int64_t k = 0, gm = 0, gk = 0;  // score grid [gm, gk]
  float bonus = 0.f, eps = 1.f;
};

// Checks exclude ([M, K], or the block grid when (br, bc) != (1, 1)), counter and k for a
// weight gradient [M, K].
GrowArgs check_grow(const char* op, int64_t M, int64_t K, const at::Tensor& exclude, int64_t k,
                    const c10::optional<at::Tensor>& counter, double bonus_scale, double eps,
                    int64_t br, int64_t bc);

class GrowSink {
 public:
  // tp/mask/values: with values set, tile() stores (G ⊙ mask) on the topology's blocks into
  // values [nnzb, br, bc] (values' dtype). max_cols: the widest tile passed.
  GrowSink(const GrowArgs& a, int64_t M, int64_t K, int64_t br, int64_t bc, const Topo* tp,
           const at::Tensor* mask, at::Tensor* values, int64_t max_cols);
  // G[m0 + r, k0 + c] = ct[r * ldc + c] for r < nrows, c < ncols; the tile holds whole blocks
  // (m0, k0 multiples of br, bc; nrows, ncols too unless at the matrix edge). Any worker tid.
  void tile(const float* ct, int64_t ldc, int64_t m0, int64_t nrows, int64_t k0, int64_t ncols,
            int tid);
  // Hands worker tid's pending candidates to the collector (after its last tile).
  void flush(int tid);
  // The top-k, sorted descending: (flat indices int64 [k], scores float32 [k]).
  std::pair<at::Tensor, at::Tensor> finish();

 private:
  const GrowArgs& a_;
  int64_t M_, K_, br_, bc_, lcap_;
  const Topo* tp_;
  const uint8_t* mask_;
  char* values_;
  bool values_bf16_;
  TopK topk_;
  std::vector<Scratch<uint64_t>> lb_;
  std::vector<Scratch<float>> colsum_;
  std::vector<int64_t> ln_;
};

}  // namespace sk
