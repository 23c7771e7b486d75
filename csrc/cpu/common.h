// Shared torch glue for the CPU ops: argument checks, topology validation, threading with
// FTZ/DAZ, scratch buffers and the exact top-k collector.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define SK_HAS_MXCSR 1
#endif

#include "../checks.h"
#include "kern_api.h"

// ------------------------------------------------------------------ argument checks
// The shared checks are in csrc/checks.h; the dtype rule is the CPU kernels' own.
#define SK_CHECK_FLOAT(op, t)                                                                  \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kBFloat16, op,      \
              ": " #t " must be float32 or bfloat16 (other dtypes run on the reference "       \
              "backend), got ",                                                                \
              (t).scalar_type())

namespace sk {

inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
inline bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// ------------------------------------------------------------------ sizes
// The kernels index padded rows and columns with int32 offsets and int loop counters.
constexpr int64_t kMaxExtent = INT32_MAX;

// a * b for sizes a, b >= 0; raises (naming `what`) where the product passes int64.
inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t r;
  TORCH_CHECK(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r), op, ": ", what, " = ", a,
              " * ", b, " overflows int64");
  return r;
}

// Entries per block: workspaces hold whole (padded) blocks, so a block far larger than the
// matrix would cost its full size in memory.
constexpr int64_t kMaxBlockEntries = int64_t(1) << 24;

// The block size (br, bc) of an [M, K] matrix: both >= 1, at most 2^24 entries per block, and
// the matrix padded to whole blocks, ceil(M/br)*br x ceil(K/bc)*bc, below 2^31 rows and
// columns.
inline void check_block(const char* op, int64_t M, int64_t K, int64_t br, int64_t bc) {
  SK_CHECK_BLOCK(op, br, bc);
  TORCH_CHECK(br <= kMaxBlockEntries && bc <= kMaxBlockEntries && br * bc <= kMaxBlockEntries,
              op, ": the block size br=", br, ", bc=", bc,
              " is too large: at most 2^24 entries per block (br * bc)");
  const int64_t pm = checked_mul(op, "ceil(M/br)*br", cdiv(M, br), br);
  const int64_t pk = checked_mul(op, "ceil(K/bc)*bc", cdiv(K, bc), bc);
  TORCH_CHECK(pm <= kMaxExtent && pk <= kMaxExtent, op, ": the block size br=", br, ", bc=", bc,
              " pads the [", M, ", ", K, "] weight to [", pm, ", ", pk,
              "]; the kernels take at most 2^31 - 1 padded rows and columns");
}

// ------------------------------------------------------------------ threading
// Sets flush-to-zero and denormals-are-zero for the calling thread, restores on exit.
struct FtzGuard {
#ifdef SK_HAS_MXCSR
  unsigned int old_;
  FtzGuard() : old_(_mm_getcsr()) { _mm_setcsr(old_ | 0x8040u); }
  ~FtzGuard() { _mm_setcsr(old_); }
#endif
};

inline int num_threads() { return std::max(1, at::get_num_threads()); }

// Runs f(item, tid) for item in [0, n) on up to num_threads() workers that take items from a
// shared counter (dynamic scheduling, robust to a busy core). tid < num_threads().
template <class F>
void parallel_dynamic(int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t nt = std::min<int64_t>(num_threads(), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    FtzGuard ftz;
    for (int64_t tid = t0; tid < t1; ++tid)
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i, static_cast<int>(tid));
  });
}

// Runs f(item, part) for item in [0, n) split into `parts` contiguous ranges of near-equal
// size, each taken whole by one worker and walked in increasing item order. The item -> part
// map depends only on (n, parts), so per-part partial sums reduced in part order give the same
// bits on every run (parallel_dynamic's tid depends on timing).
template <class F>
void parallel_parts(int64_t n, int64_t parts, const F& f) {
  if (n <= 0) return;
  parts = std::max<int64_t>(1, std::min(parts, n));
  parallel_dynamic(parts, [&](int64_t p, int) {
    const int64_t i0 = n * p / parts, i1 = n * (p + 1) / parts;
    for (int64_t i = i0; i < i1; ++i) f(i, static_cast<int>(p));
  });
}

// Grow-only, 64-byte aligned, uninitialised scratch.
template <class T>
struct Scratch {
  T* p = nullptr;
  size_t n = 0;
  ~Scratch() { std::free(p); }
  T* get(size_t want) {
    if (want > n) {
      std::free(p);
      size_t bytes = ((std::max<size_t>(want, 1) * sizeof(T)) + 63) / 64 * 64;
      p = static_cast<T*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(p != nullptr, "sparsekern: out of memory allocating ", bytes, " bytes");
      n = want;
    }
    return p;
  }
};

// Per-thread scratch kept between calls. Fresh multi-megabyte temporaries are mmapped and
// page-faulted in on every call (a fifth of a 4096x4096 forward went to the kernel's page
// fault handler), so the ops take their temporaries from here. Shared slots belong to the
// thread that called the op (buffers every worker reads), worker slots to each worker; a slot
// holds one buffer at a time, its contents are undefined on return, and it only grows (to the
// largest layer's temporaries).
enum Slot : int { kShared0 = 0, kShared1, kShared2, kShared3, kWork0, kWork1, kWork2, kWork3, kNumSlots };
void* scratch_bytes(int slot, size_t bytes);
// Frees the calling thread's scratch buffers above `keep` bytes.
void scratch_trim(size_t keep);
// Put at the top of an op: when the op returns, the calling thread's buffers above 64 MiB are
// freed, so one huge call does not leave its temporaries resident (the calling thread holds
// the large shared buffers; worker buffers are per chunk or tile).
struct ScratchScope {
  ~ScratchScope() { scratch_trim(size_t(64) << 20); }
};
template <class T>
T* scratch(int slot, int64_t n) {
  TORCH_CHECK(n >= 0 && static_cast<uint64_t>(n) <= (uint64_t(1) << 56) / sizeof(T),
              "sparsekern: scratch buffer of ", n, " elements is out of range");
  return static_cast<T*>(scratch_bytes(slot, static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T)));
}

// ------------------------------------------------------------------ masks
// The mask as the kernels take it: contiguous, or undefined when it is an all-true view (every
// stride 0, value true: `torch.ones((), dtype=bool).expand(M, K)`), which layout="bsr" modules
// pass since their masks are constant on blocks. An undefined mask reads as all true, so the
// kernels skip the per-element multiply and need not read M*K bytes.
inline bool is_all_true_view(const at::Tensor& m) {
  if (m.numel() == 0 || m.scalar_type() != at::kBool) return false;
  for (int64_t d = 0; d < m.dim(); ++d)
    if (m.stride(d) != 0) return false;
  return *m.data_ptr<bool>();
}
inline at::Tensor kernel_mask(const at::Tensor& m) {
  return is_all_true_view(m) ? at::Tensor() : m.contiguous();
}
inline const uint8_t* mask_ptr(const at::Tensor& m) {
  return m.defined() ? reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()) : nullptr;
}
// p + off, or null for an all-true (null) mask.
inline const uint8_t* at_off(const uint8_t* p, int64_t off) { return p ? p + off : nullptr; }

// ------------------------------------------------------------------ topology
// Validated int32 views of [row_ptr, col_idx, col_ptr, row_idx, slot_t].
struct Topo {
  at::Tensor t[5];
  const int32_t *rp = nullptr, *ci = nullptr, *cp = nullptr, *ri = nullptr, *st = nullptr;
  int64_t nbr = 0, nbc = 0, nnzb = 0;
};

// Checks shapes, ranges and consistency of the topology of an [M, K] matrix in (br, bc)
// blocks: row_ptr/col_ptr start at 0, are non-decreasing and end at nnzb; col_idx strictly
// increasing within each block row and < nbc; with need_csc also row_idx strictly increasing
// within each block column and < nbr, and slot_t[e] a CSR slot of row row_idx[e] whose column
// is the CSC column (so slot_t is a permutation). Raises on the first violation found.
Topo check_topology(const char* op, at::TensorList topo, int64_t M, int64_t K, int64_t br,
                    int64_t bc, bool need_csc);

// ------------------------------------------------------------------ dense fallback
// The effective weight W ⊙ mask of an [M, K] matrix as a dense fp32 tensor: W (the dense
// [M, K] weight, or the [nnzb, br, bc] block values when `bsr`) where the mask (null: all
// true) is set inside a topology block, 0 elsewhere — selected, so NaN/inf in dormant entries
// stay out. A plain temporary, freed when the caller drops it.
at::Tensor dense_weight(const at::Tensor& w, bool bsr, const uint8_t* mask, const Topo& tp,
                        int64_t M, int64_t K, int64_t br, int64_t bc);
// values[s] = G ⊙ mask on block s, from a dense fp32 G [M, K] (mask null: all true).
void gather_dense(const at::Tensor& G, const uint8_t* mask, const Topo& tp, int64_t br,
                  int64_t bc, at::Tensor& values);

// ------------------------------------------------------------------ exact top-k
// Collects the k largest distinct 64-bit composites (score key << 32 | ~flat). Workers filter
// against threshold() into local buffers and flush them here. A histogram of the top 16 bits
// of every accepted composite gives a running lower bound: once k composites are known to lie
// in bins >= b, nothing below bin b can be in the top k, so the threshold rises as the data
// arrives (no sort). The staging buffer is compacted against that bound when full, and only
// trimmed with nth_element if the boundary bin alone overflows it. finish() selects exactly k
// and radix-sorts them, using the index output as the radix buffer (memory: (k + stage) * 8
// bytes + a 256 KB histogram + the outputs).
class TopK {
 public:
  TopK(int64_t k, int64_t stage);
  uint64_t threshold() const { return thr_.load(std::memory_order_relaxed); }
  void flush(const uint64_t* c, int64_t n);
  // Sorted descending; returns (flat indices int64 [k], scores float32 [k]).
  std::pair<at::Tensor, at::Tensor> finish();

 private:
  void make_room();
  void raise(uint64_t t);
  int64_t k_, cap_, n_ = 0;
  at::Tensor storage_;
  uint64_t* buf_;
  std::vector<int32_t> hist_;
  int64_t bin_ = 0, above_ = 0;  // above_ = accepted composites in bins >= bin_
  std::atomic<uint64_t> thr_{0};
  std::mutex mu_;
};

}  // namespace sk
