// sk_emu: a CPU emulation of the CUDA execution model, for testing kernels without a GPU.
//
// Every CUDA thread of a block is a cooperative fiber (ucontext) on one OS thread; blocks run
// one after another (in a shuffled order). __syncthreads() parks a fiber until every live fiber
// of the block is parked there; warp intrinsics (__ballot_sync, __shfl_sync, __shfl_up_sync)
// park it until all 32 lanes of its warp reached the same intrinsic, then deliver the lanes'
// values. Between barriers the runnable fibers run to their next barrier in a random order
// (seeded), so a missing barrier (a read of shared memory another thread has not written yet in
// this phase) changes results from seed to seed. A barrier some fibers can never reach (a
// divergent __syncthreads or warp op) aborts with a message. __shared__ variables become
// function-local statics: one block runs at a time, so they behave as shared memory. Atomics
// are plain read-modify-writes (fibers are never preempted). Kernel launches
// `k<<<grid, block, smem, stream>>>(args)` must be rewritten to
// `::sk_emu::launch(::sk_emu::Cfg(grid, block, smem, stream), &k, args)` (a regex does it in
// tests/test_cuda_kernels.py). 1-D grids and blocks only.
#pragma once

#include <cuda_runtime_api.h>  // the real one: cudaError_t, cudaStream_t
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace sk_emu {

struct Idx {
  unsigned x, y, z;
};

enum State { kRun, kWaitBlock, kWaitWarp, kDone };
enum WarpOp { kBallot = 1, kShfl = 2, kShflUp = 3 };

struct Fiber {
  ucontext_t ctx;
  State st;
  unsigned tid;
  int op, arg;
  uint64_t val, res;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t main_ctx;
  Fiber* cur = nullptr;
  unsigned block = 0, block_dim = 0, grid_dim = 0;
  const std::function<void()>* body = nullptr;
  std::mt19937 rng{1};
  bool shuffle = true;
  uint64_t barriers = 0;  // statistics: released block barriers
};

inline Scheduler& sched() {
  static Scheduler s;
  return s;
}

inline void seed(unsigned s, bool shuffle = true) {
  sched().rng.seed(s);
  sched().shuffle = shuffle;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "sk_emu: %s (block %u)\n", what, sched().block);
  std::abort();
}

inline Idx thread_idx() { return {sched().cur->tid, 0, 0}; }
inline Idx block_idx() { return {sched().block, 0, 0}; }
inline Idx block_dim() { return {sched().block_dim, 1, 1}; }
inline Idx grid_dim() { return {sched().grid_dim, 1, 1}; }

inline void park(State st) {
  Scheduler& s = sched();
  s.cur->st = st;
  swapcontext(&s.cur->ctx, &s.main_ctx);
}

inline void syncthreads() { park(kWaitBlock); }

inline uint64_t warp_op(unsigned mask, int op, uint64_t val, int arg) {
  if (mask != 0xffffffffu) fail("warp op with a partial mask is not emulated");
  Fiber* f = sched().cur;
  f->op = op;
  f->val = val;
  f->arg = arg;
  park(kWaitWarp);
  return f->res;
}

// Complete every warp whose lanes all wait at a warp op; true if any was completed.
inline bool resolve_warps() {
  Scheduler& s = sched();
  bool any = false;
  for (unsigned w0 = 0; w0 < s.block_dim; w0 += 32) {
    const unsigned w1 = std::min(w0 + 32, s.block_dim);
    bool waiting = false, ready = true;
    for (unsigned t = w0; t < w1; ++t) {
      waiting |= s.fibers[t].st == kWaitWarp;
      ready &= s.fibers[t].st == kWaitWarp && s.fibers[t].op == s.fibers[w0].op;
    }
    if (!waiting || !ready) continue;
    if (w1 - w0 != 32) fail("warp op in a partial warp");
    uint64_t ballot = 0;
    for (unsigned l = 0; l < 32; ++l) ballot |= uint64_t(s.fibers[w0 + l].val != 0) << l;
    for (unsigned l = 0; l < 32; ++l) {
      Fiber& f = s.fibers[w0 + l];
      switch (f.op) {
        case kBallot: f.res = ballot; break;
        case kShfl: f.res = s.fibers[w0 + (unsigned(f.arg) & 31u)].val; break;
        case kShflUp: f.res = int(l) >= f.arg ? s.fibers[w0 + l - unsigned(f.arg)].val : f.val; break;
        default: fail("unknown warp op");
      }
      f.st = kRun;
    }
    any = true;
  }
  return any;
}

inline void trampoline() {
  (*sched().body)();
  sched().cur->st = kDone;  // uc_link returns to the scheduler
}

inline void run_block(unsigned block) {
  Scheduler& s = sched();
  s.block = block;
  const unsigned n = s.block_dim;
  constexpr size_t kStack = 64 * 1024;  // kernels keep big arrays in (static) shared memory
  s.fibers.assign(n, Fiber{});
  if (s.stacks.size() < n) s.stacks.resize(n);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    if (s.stacks[t].size() != kStack) s.stacks[t].assign(kStack, 0);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks[t].data();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &s.main_ctx;
    makecontext(&f.ctx, trampoline, 0);
    f.st = kRun;
    f.tid = t;
  }
  std::vector<unsigned> order;
  for (;;) {
    order.clear();
    for (unsigned t = 0; t < n; ++t)
      if (s.fibers[t].st == kRun) order.push_back(t);
    if (order.empty()) {
      bool all_done = true, all_block = true;
      for (const Fiber& f : s.fibers) {
        all_done &= f.st == kDone;
        all_block &= f.st == kDone || f.st == kWaitBlock;
      }
      if (all_done) break;
      if (resolve_warps()) continue;
      if (!all_block) fail("deadlock: a warp op some lanes never reach, or divergent barrier");
      for (Fiber& f : s.fibers)
        if (f.st == kWaitBlock) f.st = kRun;
      ++s.barriers;
      continue;
    }
    if (s.shuffle) std::shuffle(order.begin(), order.end(), s.rng);
    for (unsigned t : order) {
      s.cur = &s.fibers[t];
      swapcontext(&s.main_ctx, &s.cur->ctx);
    }
  }
  s.cur = nullptr;
}

struct Cfg {
  unsigned grid, block;
  Cfg(unsigned g, unsigned b, size_t smem = 0, cudaStream_t = nullptr) : grid(g), block(b) {
    if (smem != 0) fail("dynamic shared memory is not emulated");
  }
};

template <typename... P, typename... A>
cudaError_t launch(Cfg c, void (*kernel)(P...), A&&... args) {
  Scheduler& s = sched();
  if (c.block == 0 || c.block > 1024) return cudaErrorInvalidConfiguration;
  const std::function<void()> body = [&]() { kernel(args...); };
  s.body = &body;
  s.block_dim = c.block;
  s.grid_dim = c.grid;
  std::vector<unsigned> blocks(c.grid);
  for (unsigned b = 0; b < c.grid; ++b) blocks[b] = b;
  if (s.shuffle) std::shuffle(blocks.begin(), blocks.end(), s.rng);
  for (unsigned b : blocks) run_block(b);
  s.body = nullptr;
  return cudaSuccess;
}

}  // namespace sk_emu

#define threadIdx (::sk_emu::thread_idx())
#define blockIdx (::sk_emu::block_idx())
#define blockDim (::sk_emu::block_dim())
#define gridDim (::sk_emu::grid_dim())
#define cudaGetLastError() (cudaSuccess)

inline void __syncthreads() { ::sk_emu::syncthreads(); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __ballot_sync(unsigned mask, bool pred) {
  return unsigned(::sk_emu::warp_op(mask, ::sk_emu::kBallot, pred ? 1u : 0u, 0));
}
template <typename T>
inline T sk_emu_from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
template <typename T>
inline uint64_t sk_emu_to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  return sk_emu_from_bits<T>(::sk_emu::warp_op(mask, ::sk_emu::kShfl, sk_emu_to_bits(v), src));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  return sk_emu_from_bits<T>(
      ::sk_emu::warp_op(mask, ::sk_emu::kShflUp, sk_emu_to_bits(v), int(delta)));
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = std::min(old, v);
  return old;
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = std::max(old, v);
  return old;
}
