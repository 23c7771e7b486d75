// Runs the sparsekern CUDA kernels' own source on the CPU (tests/emu/sk_emu.h) through the
// real launchers of csrc/cuda/*.cu (their `<<<...>>>` launches rewritten by the Python test):
//   emu_driver spmm DIR DTYPE SEED   launch_bsr_mm, launch_bsr_mm_t, launch_sddmm (params.txt:
//                                    B M K br bc bsr [ops bitmask 1|2|4, default 7])
//   emu_driver grow DIR DTYPE SEED   the glue's radix-select loop over launch_grow_topk_pass
// Inputs and outputs are raw float32 / uint8 / int32 files in DIR (tests/test_cuda_kernels.py
// writes them and compares the outputs with sparsekern.reference). DTYPE: float32, float16,
// bfloat16, float64. SEED: the scheduling order of the emulated threads and blocks.
#include <cuda_runtime.h>  // tests/emu: the CPU emulation

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "kernel_math.cuh"
#include "sparsekern_cuda.h"
#include "bin_io.h"

namespace sc = sparsekern::cuda;
namespace km = sparsekern::kmath;


template <typename T> struct Conv;
template <> struct Conv<float> {
  static float in(float v) { return v; }
  static float out(float v) { return v; }
};
template <> struct Conv<double> {
  static double in(float v) { return v; }
  static float out(double v) { return float(v); }
};
template <> struct Conv<__half> {
  static __half in(float v) { return __float2half_rn(v); }
  static float out(__half v) { return __half2float(v); }
};
template <> struct Conv<__nv_bfloat16> {
  static __nv_bfloat16 in(float v) { return __float2bfloat16_rn(v); }
  static float out(__nv_bfloat16 v) { return __bfloat162float(v); }
};

template <typename T>
static std::vector<T> to_dtype(const std::vector<float>& v) {
  std::vector<T> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = Conv<T>::in(v[i]);
  return o;
}

template <typename T>
static std::vector<float> to_f32(const std::vector<T>& v) {
  std::vector<float> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = Conv<T>::out(v[i]);
  return o;
}

static void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s failed: error %d\n", what, int(e));
    std::exit(3);
  }
}

template <typename T>
static int run_spmm(const std::string& dir, sc::DType dt) {
  const std::vector<double> p = read_params(dir + "/params.txt");
  if (p.size() != 6 && p.size() != 7) return 2;
  const int64_t B = int64_t(p[0]), M = int64_t(p[1]), K = int64_t(p[2]);
  const int br = int(p[3]), bc = int(p[4]);
  const bool bsr = p[5] != 0.0;
  const int ops = p.size() == 7 ? int(p[6]) : 7;  // 1 bsr_mm, 2 bsr_mm_t, 4 sddmm
  const std::vector<T> x = to_dtype<T>(read_bin<float>(dir + "/x.bin"));
  const std::vector<T> dy = to_dtype<T>(read_bin<float>(dir + "/dy.bin"));
  const std::vector<T> w = to_dtype<T>(read_bin<float>(dir + "/w.bin"));
  const std::vector<uint8_t> mask = read_bin<uint8_t>(dir + "/mask.bin");
  const std::vector<int32_t> row_ptr = read_bin<int32_t>(dir + "/row_ptr.bin");
  const std::vector<int32_t> col_idx = read_bin<int32_t>(dir + "/col_idx.bin");
  const std::vector<int32_t> col_ptr = read_bin<int32_t>(dir + "/col_ptr.bin");
  const std::vector<int32_t> row_idx = read_bin<int32_t>(dir + "/row_idx.bin");
  const std::vector<int32_t> slot_t = read_bin<int32_t>(dir + "/slot_t.bin");
  const int64_t nnzb = int64_t(col_idx.size()), nbr = km::ceil_div(M, br);
  const T nan = Conv<T>::in(std::numeric_limits<float>::quiet_NaN());  // unwritten = NaN
  std::vector<T> y(size_t(B * M), nan), dx(size_t(B * K), nan);
  std::vector<T> g(size_t(nnzb) * br * bc, nan);
  std::vector<char> ws(sc::sddmm_workspace_bytes(nbr));
  if ((ops & 1) && !y.empty())
    check(sc::launch_bsr_mm(dt, x.data(), w.data(), bsr, mask.data(), row_ptr.data(),
                            col_idx.data(), y.data(), B, M, K, br, bc, nullptr), "bsr_mm");
  if ((ops & 2) && !dx.empty())
    check(sc::launch_bsr_mm_t(dt, dy.data(), w.data(), bsr, mask.data(), col_ptr.data(),
                              row_idx.data(), slot_t.data(), dx.data(), B, M, K, br, bc, nullptr),
          "bsr_mm_t");
  if (ops & 4)
    check(sc::launch_sddmm(dt, dy.data(), x.data(), mask.data(), row_ptr.data(), col_idx.data(),
                           nnzb, g.data(), ws.data(), B, M, K, br, bc, nullptr), "sddmm");
  write_bin(dir + "/y.bin", to_f32(y));
  write_bin(dir + "/dx.bin", to_f32(dx));
  write_bin(dir + "/sddmm.bin", to_f32(g));
  return 0;
}

// The host loop of sparsekern_cuda.cpp grow_topk_cuda, with std::sort for the ATen finish.
template <typename T>
static int run_grow(const std::string& dir, sc::DType dt) {
  const std::vector<double> p = read_params(dir + "/params.txt");
  if (p.size() != 10) return 2;
  const int64_t B = int64_t(p[0]), M = int64_t(p[1]), K = int64_t(p[2]);
  const int br = int(p[3]), bc = int(p[4]);
  const int64_t k = int64_t(p[5]);
  const std::vector<T> dy = to_dtype<T>(read_bin<float>(dir + "/dy.bin"));
  const std::vector<T> x = to_dtype<T>(read_bin<float>(dir + "/x.bin"));
  const std::vector<uint8_t> exclude = read_bin<uint8_t>(dir + "/exclude.bin");
  std::vector<float> counter;
  if (p[7] != 0.0) counter = read_bin<float>(dir + "/counter.bin");
  const km::GrowGeom geo = km::grow_geom(M, K, br, bc);
  const int64_t n = geo.nsr * geo.nsc;
  const int64_t cand_cap = std::min<int64_t>(int64_t(p[6]), n);
  const int64_t tiles = sc::grow_topk_tiles(M, K, br, bc);
  std::vector<uint32_t> hist(km::kHistBins, 0u), counters(2, 0u);
  std::vector<unsigned long long> minmax(static_cast<size_t>(2 * tiles));
  std::vector<unsigned long long> above(static_cast<size_t>(k));
  std::vector<unsigned long long> cand(static_cast<size_t>(cand_cap));

  sc::GrowPassArgs a;
  a.dy = dy.data();
  a.x = x.data();
  a.exclude = exclude.data();
  a.counter = counter.empty() ? nullptr : counter.data();
  a.bonus_scale = float(p[8]);
  a.eps = float(p[9]);
  a.B = B;
  a.M = M;
  a.K = K;
  a.br = br;
  a.bc = bc;
  a.hist = hist.data();
  a.tile_minmax = minmax.data();
  a.above = above.data();
  a.above_cap = uint32_t(k);
  a.cand = cand.data();
  a.cand_cap = uint32_t(cand_cap);
  a.counters = counters.data();

  std::vector<int64_t> flat;
  std::vector<float> scores;
  int status = 0, passes = 0;
  if (k > 0) {
    km::SelectState st = km::select_init(uint64_t(k));
    a.pass = km::kPassFirst;
    a.prefix = st.prefix;
    a.shift = st.shift;
    a.width = st.width;
    check(sc::launch_grow_topk_pass(dt, a, nullptr), "grow pass");
    ++passes;
    for (;;) {
      status = km::select_advance(&st, hist.data(), uint64_t(cand_cap));
      if (status != km::kSelectRefine) break;
      std::fill(hist.begin(), hist.end(), 0u);
      a.pass = km::kPassRefine;
      a.prefix = st.prefix;
      a.shift = st.shift;
      a.width = st.width;
      check(sc::launch_grow_topk_pass(dt, a, nullptr), "grow pass");
      ++passes;
    }
    if (status == km::kSelectEmit) {
      a.pass = km::kPassEmit;
      a.prefix = st.prefix;
      a.shift = st.shift;
      a.width = km::kDigitBits;
      check(sc::launch_grow_topk_pass(dt, a, nullptr), "grow pass");
      ++passes;
      if (counters[0] != st.above || counters[1] != st.bucket) {
        std::fprintf(stderr, "emitted %u + %u, expected %llu + %llu\n", counters[0], counters[1],
                     (unsigned long long)st.above, (unsigned long long)st.bucket);
        return 4;
      }
      std::vector<unsigned long long> all(above.begin(), above.begin() + int64_t(st.above));
      std::vector<unsigned long long> c(cand.begin(), cand.begin() + int64_t(st.bucket));
      std::sort(c.begin(), c.end(), std::greater<unsigned long long>());
      all.insert(all.end(), c.begin(), c.begin() + int64_t(st.need));
      std::sort(all.begin(), all.end(), std::greater<unsigned long long>());
      flat.resize(all.size());
      scores.resize(all.size());
      check(sc::launch_decode_composites(all.data(), int64_t(all.size()), flat.data(),
                                         scores.data(), nullptr), "decode");
      status = 0;
    }
  }
  std::ofstream(dir + "/status.txt") << status << " " << passes << "\n";
  write_bin(dir + "/flat.bin", flat);
  write_bin(dir + "/scores.bin", scores);
  return 0;
}

template <template <typename> class Fn>
static int by_dtype(const std::string& name, const std::string& dir) {
  if (name == "float32") return Fn<float>::run(dir, sc::DType::kFloat32);
  if (name == "float16") return Fn<__half>::run(dir, sc::DType::kFloat16);
  if (name == "bfloat16") return Fn<__nv_bfloat16>::run(dir, sc::DType::kBFloat16);
  if (name == "float64") return Fn<double>::run(dir, sc::DType::kFloat64);
  std::fprintf(stderr, "unknown dtype %s\n", name.c_str());
  return 2;
}
template <typename T> struct SpmmFn {
  static int run(const std::string& d, sc::DType dt) { return run_spmm<T>(d, dt); }
};
template <typename T> struct GrowFn {
  static int run(const std::string& d, sc::DType dt) { return run_grow<T>(d, dt); }
};

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s spmm|grow DIR DTYPE SEED\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1];
  sk_emu::seed(unsigned(std::strtoul(argv[4], nullptr, 10)));
  if (mode == "spmm") return by_dtype<SpmmFn>(argv[3], argv[2]);
  if (mode == "grow") return by_dtype<GrowFn>(argv[3], argv[2]);
  return 2;
}
