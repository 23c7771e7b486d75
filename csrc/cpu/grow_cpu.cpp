// Growth scoring shared by the linear and conv weight-side passes (see grow_cpu.h).
#include "grow_cpu.h"

namespace sk {

GrowArgs check_grow(const char* op, int64_t M, int64_t K, const at::Tensor& exclude, int64_t k,
                    const c10::optional<at::Tensor>& counter, double bonus_scale, double eps,
                    int64_t br, int64_t bc) {
  check_block(op, M, K, br, bc);
  GrowArgs a;
  a.gm = br == 1 && bc == 1 ? M : cdiv(M, br);
  a.gk = br == 1 && bc == 1 ? K : cdiv(K, bc);
  SK_CHECK_CPU(op, exclude);
  SK_CHECK_BOOL(op, exclude);
  TORCH_CHECK(exclude.dim() == 2 && exclude.size(0) == a.gm && exclude.size(1) == a.gk, op,
              ": exclude must have shape [", a.gm, ", ", a.gk,
              "] (the weight, or its block grid for block sizes other than (1, 1)), got ",
              exclude.sizes());
  TORCH_CHECK(a.gm * a.gk < (int64_t(1) << 32), op, ": the score grid has ", a.gm * a.gk,
              " entries; at most 2^32 - 1 per call (split the layer)");
  a.exclude = exclude.contiguous();
  if (counter.has_value() && counter->defined()) {
    const at::Tensor& c = *counter;
    TORCH_CHECK(c.device().is_cpu(), op, ": counter must be a CPU tensor, got ", c.device());
    TORCH_CHECK(c.sizes() == exclude.sizes(), op, ": counter must have exclude's shape ",
                exclude.sizes(), ", got ", c.sizes());
    TORCH_CHECK(!c.is_complex() && c.scalar_type() != at::kBool, op,
                ": counter must be an integer or float tensor, got ", c.scalar_type());
    at::Tensor cc = c;
    if (c.scalar_type() == at::kInt) {
      a.ctype = 0;
    } else if (c.scalar_type() == at::kLong) {
      a.ctype = 1;
    } else if (c.scalar_type() == at::kFloat) {
      a.ctype = 2;
    } else {
      // other dtypes: the reference converts to float32 first; so do we (a copy)
      cc = c.to(at::kFloat);
      a.ctype = 2;
    }
    a.counter = cc.contiguous();
  }
  a.bonus = static_cast<float>(bonus_scale);
  a.eps = static_cast<float>(eps);
  check_k(op, k);
  // count without materialising anything (a bool sum() would upcast to an int64 copy)
  const uint8_t* ex = reinterpret_cast<const uint8_t*>(a.exclude.data_ptr<bool>());
  const int64_t n = a.exclude.numel();
  std::atomic<int64_t> excluded{0};
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    int64_t c = 0;
    for (int64_t i = b; i < e; ++i) c += ex[i] != 0;
    excluded += c;
  });
  const int64_t allowed = n - excluded.load();
  TORCH_CHECK_VALUE(k <= allowed, op, ": k=", k, " exceeds the ", allowed,
                    " entries not excluded");
  a.k = k;
  return a;
}

GrowSink::GrowSink(const GrowArgs& a, int64_t M, int64_t K, int64_t br, int64_t bc,
                   const Topo* tp, const at::Tensor* mask, at::Tensor* values, int64_t max_cols)
    : a_(a),
      M_(M),
      K_(K),
      br_(br),
      bc_(bc),
      lcap_(std::max<int64_t>(8192, 2 * max_cols)),
      tp_(tp),
      mask_(mask ? mask_ptr(*mask) : nullptr),
      values_(values ? static_cast<char*>(values->data_ptr()) : nullptr),
      values_bf16_(values && is_bf16(*values)),
      topk_(a.k, std::max<int64_t>(2 * lcap_, a.k / 8)),
      lb_(num_threads()),
      colsum_(num_threads()),
      ln_(num_threads(), 0) {}

void GrowSink::tile(const float* ct, int64_t ldc, int64_t m0, int64_t nrows, int64_t k0,
                    int64_t ncols, int tid) {
  const KernelTable& kt = kernels();
  const int64_t br = br_, bc = bc_, M = M_, K = K_;
  const bool elem = br == 1 && bc == 1;
  if (values_) {
    const int64_t es = values_bf16_ ? 2 : 4;
    for (int64_t i = m0 / br; i < cdiv(m0 + nrows, br); ++i) {
      const int32_t* rb = tp_->ci + tp_->rp[i];
      const int32_t* re = tp_->ci + tp_->rp[i + 1];
      const int32_t* it = std::lower_bound(rb, re, static_cast<int32_t>(k0 / bc));
      const int64_t rv = std::min(br, M - i * br);
      for (; it != re && *it * bc < k0 + ncols; ++it) {
        const int64_t j = *it, s = it - tp_->ci;
        const float* src = ct + (i * br - m0) * ldc + (j * bc - k0);
        if (elem) {
          const float v = (!mask_ || mask_[i * K + j]) ? src[0] : 0.0f;
          if (values_bf16_)
            reinterpret_cast<uint16_t*>(values_)[s] = f32_to_bf16(v);
          else
            reinterpret_cast<float*>(values_)[s] = v;
        } else {
          kt.store_block(src, ldc, at_off(mask_, i * br * K + j * bc), K, static_cast<int>(rv),
                         static_cast<int>(std::min(bc, K - j * bc)), static_cast<int>(br),
                         static_cast<int>(bc), values_ + s * br * bc * es, values_bf16_, bc);
        }
      }
    }
  }
  if (a_.k == 0) return;
  uint64_t* lbuf = lb_[tid].get(lcap_);
  int64_t& nl = ln_[tid];
  const uint8_t* ex = reinterpret_cast<const uint8_t*>(a_.exclude.data_ptr<bool>());
  const char* cnt = a_.counter.defined() ? static_cast<const char*>(a_.counter.data_ptr()) : nullptr;
  const int64_t cnt_es = a_.ctype == 1 ? 8 : 4;
  if (elem) {
    for (int64_t r = 0; r < nrows; ++r) {
      if (lcap_ - nl < ncols) flush(tid);
      const int64_t base = (m0 + r) * K + k0;
      nl += kt.filter(ct + r * ldc, ncols, ex + base, cnt ? cnt + base * cnt_es : nullptr,
                      a_.ctype, a_.bonus, a_.eps, static_cast<uint32_t>(base), topk_.threshold(),
                      lbuf + nl);
    }
    return;
  }
  const int64_t nbc = cdiv(K, bc);
  float* cs = colsum_[tid].get(ncols);
  const uint64_t thr = topk_.threshold();
  for (int64_t i = m0 / br; i < cdiv(m0 + nrows, br); ++i) {
    const int64_t rv = std::min(br, M - i * br);
    const float* crow = ct + (i * br - m0) * ldc;
    for (int64_t c = 0; c < ncols; ++c) cs[c] = 0.0f;
    for (int64_t r = 0; r < rv; ++r)
      for (int64_t c = 0; c < ncols; ++c) cs[c] += std::fabs(crow[r * ldc + c]);
    if (lcap_ - nl < cdiv(ncols, bc)) flush(tid);
    for (int64_t j = k0 / bc; j * bc < k0 + ncols; ++j) {
      const int64_t flat = i * nbc + j;
      if (ex[flat]) continue;
      const int64_t cv = std::min(bc, K - j * bc);
      float sum = 0.0f;
      for (int64_t c = 0; c < cv; ++c) sum += cs[j * bc - k0 + c];
      float s = sum / static_cast<float>(rv * cv);
      if (cnt) {
        const float cf = a_.ctype == 0   ? static_cast<float>(reinterpret_cast<const int32_t*>(cnt)[flat])
                         : a_.ctype == 1 ? static_cast<float>(reinterpret_cast<const int64_t*>(cnt)[flat])
                                         : reinterpret_cast<const float*>(cnt)[flat];
        s = s + a_.bonus * (1.0f / (cf + a_.eps));
      }
      const uint64_t key = (static_cast<uint64_t>(score_key(s)) << 32) |
                           (0xFFFFFFFFull - static_cast<uint64_t>(flat));
      if (key > thr) lbuf[nl++] = key;
    }
  }
}

void GrowSink::flush(int tid) {
  if (ln_[tid]) topk_.flush(lb_[tid].get(lcap_), ln_[tid]);
  ln_[tid] = 0;
}

std::pair<at::Tensor, at::Tensor> GrowSink::finish() {
  if (a_.k == 0)
    return {at::empty({0}, at::kLong), at::empty({0}, at::kFloat)};
  return topk_.finish();
}

}  // namespace sk
