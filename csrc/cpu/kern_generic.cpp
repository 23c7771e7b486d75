// Portable build of the microkernels (kern_body.h): GCC vector extensions, 4 floats per
// vector (SSE2 on x86-64, scalar code elsewhere). The fallback when neither AVX2 nor
// AVX-512 is available, and the code path tests can force with SPARSEKERN_CPU_ISA=generic.
#define SK_NS generic
#define SK_VW 4
#define SK_NAME "generic"
#include "kern_body.h"
#include <cstdlib>
#include <cstring>
namespace sk {
const KernelTable* kernels_generic() { return &generic::table; }

// Chosen on every call (a getenv and two cached flags), so tests can switch ISAs.
const KernelTable& kernels() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has512 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  }();
  static const bool has2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
#else
  const bool has512 = false, has2 = false;
#endif
  const KernelTable* t512 = kernels_avx512();
  const KernelTable* t2 = kernels_avx2();
  const char* env = std::getenv("SPARSEKERN_CPU_ISA");
  if (env && std::strcmp(env, "generic") == 0) return *kernels_generic();
  if (env && std::strcmp(env, "avx2") == 0 && has2 && t2) return *t2;
  if (has512 && t512) return *t512;
  if (has2 && t2) return *t2;
  return *kernels_generic();
}
}  // namespace sk
