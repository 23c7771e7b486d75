// Per-thread scratch, topology validation and the exact top-k collector (see common.h).
#include "common.h"

namespace sk {

namespace {
Scratch<char>* thread_scratch() {
  thread_local Scratch<char> bufs[kNumSlots];
  return bufs;
}
}  // namespace

void* scratch_bytes(int slot, size_t bytes) { return thread_scratch()[slot].get(bytes); }

void scratch_trim(size_t keep) {
  Scratch<char>* bufs = thread_scratch();
  for (int i = 0; i < kNumSlots; ++i)
    if (bufs[i].n > keep) {
      std::free(bufs[i].p);
      bufs[i].p = nullptr;
      bufs[i].n = 0;
    }
}

namespace {
enum TopoError : int {
  kOk = 0,
  kColRange,
  kColOrder,
  kRowRange,
  kRowOrder,
  kSlotRange,
  kSlotCol,
  kSlotRow,
};

// Runs check(i) -> error code over [0, n) in parallel; returns the code of the lowest failing
// i (the same message on every run, whichever worker gets there first).
template <class F>
int parallel_check(int64_t n, const F& check) {
  std::atomic<int64_t> first{n};
  at::parallel_for(0, n, 2048, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e && i < first.load(std::memory_order_relaxed); ++i)
      if (check(i) != kOk) {
        int64_t cur = first.load();
        while (i < cur && !first.compare_exchange_weak(cur, i)) {
        }
        break;
      }
  });
  const int64_t i = first.load();
  return i < n ? check(i) : kOk;
}
}  // namespace

Topo check_topology(const char* op, at::TensorList topo, int64_t M, int64_t K, int64_t br,
                    int64_t bc, bool need_csc) {
  check_topo_count(op, topo);
  check_block(op, M, K, br, bc);
  check_topo_tensors(op, topo, at::kCPU, /*allow_int64=*/true);
  Topo tp;
  tp.nbr = cdiv(M, br);
  tp.nbc = cdiv(K, bc);
  for (int i = 0; i < 5; ++i) {
    const at::Tensor& t = topo[i];
    if (t.scalar_type() == at::kLong && t.numel() > 0) {
      auto mm = at::aminmax(t);
      TORCH_CHECK(std::get<0>(mm).item<int64_t>() >= INT32_MIN &&
                      std::get<1>(mm).item<int64_t>() <= INT32_MAX,
                  op, ": topo ", kTopoNames[i], " holds values outside the int32 range");
    }
    tp.t[i] = t.to(at::kInt).contiguous();
  }
  tp.nnzb = check_topo_lengths(op, topo, M, K, br, bc);
  TORCH_CHECK(tp.nnzb <= tp.nbr * tp.nbc, op, ": topo has ", tp.nnzb, " blocks but the grid has ",
              tp.nbr * tp.nbc);
  tp.rp = tp.t[0].data_ptr<int32_t>();
  tp.ci = tp.t[1].data_ptr<int32_t>();
  tp.cp = tp.t[2].data_ptr<int32_t>();
  tp.ri = tp.t[3].data_ptr<int32_t>();
  tp.st = tp.t[4].data_ptr<int32_t>();
  const int32_t *rp = tp.rp, *ci = tp.ci, *cp = tp.cp, *ri = tp.ri, *st = tp.st;
  const int64_t nbr = tp.nbr, nbc = tp.nbc, nnzb = tp.nnzb;

  TORCH_CHECK(rp[0] == 0 && rp[nbr] == nnzb, op, ": topo row_ptr must start at 0 and end at nnzb=",
              nnzb, ", got ", rp[0], " and ", rp[nbr]);
  for (int64_t i = 0; i < nbr; ++i)
    TORCH_CHECK(rp[i] <= rp[i + 1], op, ": topo row_ptr must be non-decreasing (row_ptr[", i,
                "]=", rp[i], " > row_ptr[", i + 1, "]=", rp[i + 1], ")");
  // branch-free per row (vectorised): element-mask topologies have millions of entries
  int err = parallel_check(nbr, [&](int64_t i) -> int {
    const int32_t a = rp[i], b = rp[i + 1];
    if (a == b) return kOk;
    const uint32_t n = static_cast<uint32_t>(nbc);
    uint32_t range = static_cast<uint32_t>(ci[a]) >= n, order = 0;
    for (int32_t s = a + 1; s < b; ++s) {
      range |= static_cast<uint32_t>(ci[s]) >= n;
      order |= ci[s] <= ci[s - 1];
    }
    return range ? kColRange : order ? kColOrder : kOk;
  });
  TORCH_CHECK(err != kColRange, op, ": topo col_idx out of range [0, ", nbc, ")");
  TORCH_CHECK(err != kColOrder, op,
              ": topo col_idx must be strictly increasing within each block row");
  if (need_csc) {
    TORCH_CHECK(cp[0] == 0 && cp[nbc] == nnzb, op,
                ": topo col_ptr must start at 0 and end at nnzb=", nnzb, ", got ", cp[0], " and ",
                cp[nbc]);
    for (int64_t j = 0; j < nbc; ++j)
      TORCH_CHECK(cp[j] <= cp[j + 1], op, ": topo col_ptr must be non-decreasing (col_ptr[", j,
                  "]=", cp[j], " > col_ptr[", j + 1, "]=", cp[j + 1], ")");
    err = parallel_check(nbc, [&](int64_t j) -> int {
      for (int32_t e = cp[j]; e < cp[j + 1]; ++e) {
        if (ri[e] < 0 || ri[e] >= nbr) return kRowRange;
        if (e > cp[j] && ri[e] <= ri[e - 1]) return kRowOrder;
        if (st[e] < 0 || st[e] >= nnzb) return kSlotRange;
        if (ci[st[e]] != j) return kSlotCol;
        if (st[e] < rp[ri[e]] || st[e] >= rp[ri[e] + 1]) return kSlotRow;
      }
      return kOk;
    });
    TORCH_CHECK(err != kRowRange, op, ": topo row_idx out of range [0, ", nbr, ")");
    TORCH_CHECK(err != kRowOrder, op,
                ": topo row_idx must be strictly increasing within each block column");
    TORCH_CHECK(err != kSlotRange, op, ": topo slot_t out of range [0, ", nnzb, ")");
    TORCH_CHECK(err != kSlotCol && err != kSlotRow, op,
                ": topo slot_t must point at the CSR slot of the same block (row_idx, column)");
  }
  return tp;
}

TopK::TopK(int64_t k, int64_t stage) : k_(k), cap_(k + stage), hist_(1 << 16, 0) {
  storage_ = at::empty({cap_}, at::kLong);
  buf_ = reinterpret_cast<uint64_t*>(storage_.data_ptr<int64_t>());
}

void TopK::raise(uint64_t t) {
  if (t > thr_.load(std::memory_order_relaxed)) thr_.store(t, std::memory_order_relaxed);
}

// Drops staged composites at or below the threshold; if that frees too little (a huge
// boundary bin), keeps exactly the k largest.
void TopK::make_room() {
  const uint64_t t = thr_.load(std::memory_order_relaxed);
  int64_t m = 0;
  for (int64_t i = 0; i < n_; ++i)
    if (buf_[i] > t) buf_[m++] = buf_[i];
  n_ = m;
  if (n_ > k_ + (cap_ - k_) / 2) {
    std::nth_element(buf_, buf_ + (k_ - 1), buf_ + n_, std::greater<uint64_t>());
    n_ = k_;
    raise(buf_[k_ - 1]);
  }
}

void TopK::flush(const uint64_t* c, int64_t n) {
  if (k_ == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t t = thr_.load(std::memory_order_relaxed);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t v = c[i];
    if (v <= t) continue;
    if (n_ == cap_) {
      make_room();
      t = thr_.load(std::memory_order_relaxed);
      if (v <= t) continue;
    }
    buf_[n_++] = v;
    const int64_t b = static_cast<int64_t>(v >> 48);
    ++hist_[b];
    if (b >= bin_) {
      ++above_;
      if (above_ - hist_[bin_] >= k_) {
        while (above_ - hist_[bin_] >= k_) above_ -= hist_[bin_++];
        raise((static_cast<uint64_t>(bin_) << 48) - 1);
        t = thr_.load(std::memory_order_relaxed);
      }
    }
  }
}

namespace {
// LSD radix sort of n 64-bit keys, descending, in 16-bit digits: 4 passes, so the result
// ends back in `a`; `tmp` holds n keys.
void radix_sort_desc(uint64_t* a, uint64_t* tmp, int64_t n) {
  std::vector<int64_t> cnt(1 << 16);
  uint64_t* src = a;
  uint64_t* dst = tmp;
  for (int pass = 0; pass < 4; ++pass) {
    const int sh = 16 * pass;
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++cnt[(~src[i] >> sh) & 0xFFFF];
    int64_t sum = 0;
    for (auto& c : cnt) {
      const int64_t v = c;
      c = sum;
      sum += v;
    }
    for (int64_t i = 0; i < n; ++i) dst[cnt[(~src[i] >> sh) & 0xFFFF]++] = src[i];
    std::swap(src, dst);
  }
}
}  // namespace

std::pair<at::Tensor, at::Tensor> TopK::finish() {
  if (n_ > k_) {
    std::nth_element(buf_, buf_ + (k_ - 1), buf_ + n_, std::greater<uint64_t>());
    n_ = k_;
  }
  at::Tensor idx = at::empty({n_}, at::kLong);
  at::Tensor sc = at::empty({n_}, at::kFloat);
  int64_t* ip = idx.data_ptr<int64_t>();
  radix_sort_desc(buf_, reinterpret_cast<uint64_t*>(ip), n_);
  float* sp = sc.data_ptr<float>();
  for (int64_t i = 0; i < n_; ++i) {
    ip[i] = static_cast<int64_t>(0xFFFFFFFFull - (buf_[i] & 0xFFFFFFFFull));
    sp[i] = key_score(static_cast<uint32_t>(buf_[i] >> 32));
  }
  storage_ = at::Tensor();
  return {idx, sc};
}

// ------------------------------------------------------------------ dense fallback
at::Tensor dense_weight(const at::Tensor& w, bool bsr, const uint8_t* mask, const Topo& tp,
                        int64_t M, int64_t K, int64_t br, int64_t bc) {
  at::Tensor wd = at::empty({M, K}, w.options().dtype(at::kFloat));
  const bool bf = is_bf16(w);
  const int64_t bsz = br * bc;
  float* d = wd.data_ptr<float>();
  const void* w0 = w.data_ptr();
  at::parallel_for(0, tp.nbr, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t rv = std::min(br, M - i * br);
      for (int64_t r = 0; r < rv; ++r) {
        const int64_t m = i * br + r;
        float* drow = d + m * K;
        std::memset(drow, 0, K * sizeof(float));
        const uint8_t* mrow = at_off(mask, m * K);
        for (int64_t s = tp.rp[i]; s < tp.rp[i + 1]; ++s) {
          const int64_t j0 = tp.ci[s] * bc, cv = std::min(bc, K - j0);
          const int64_t src = bsr ? s * bsz + r * bc : m * K + j0;
          for (int64_t c = 0; c < cv; ++c)
            if (!mrow || mrow[j0 + c])
              drow[j0 + c] = bf ? static_cast<float>(static_cast<const c10::BFloat16*>(w0)[src + c])
                                : static_cast<const float*>(w0)[src + c];
        }
      }
    }
  });
  return wd;
}

void gather_dense(const at::Tensor& G, const uint8_t* mask, const Topo& tp, int64_t br,
                  int64_t bc, at::Tensor& values) {
  const KernelTable& kt = kernels();
  const bool bf = is_bf16(values);
  const int64_t M = G.size(0), K = G.size(1), es = bf ? 2 : 4;
  const float* gp = G.data_ptr<float>();
  char* vp = static_cast<char*>(values.data_ptr());
  parallel_dynamic(tp.nbr, [&](int64_t i, int) {
    for (int64_t s = tp.rp[i]; s < tp.rp[i + 1]; ++s) {
      const int64_t j = tp.ci[s];
      kt.store_block(gp + i * br * K + j * bc, K, at_off(mask, i * br * K + j * bc), K,
                     static_cast<int>(std::min(br, M - i * br)),
                     static_cast<int>(std::min(bc, K - j * bc)), static_cast<int>(br),
                     static_cast<int>(bc), vp + s * br * bc * es, bf, bc);
    }
  });
}

}  // namespace sk
