// AVX2 + FMA build of the microkernels (kern_body.h).
#include "kern_api.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <cstdint>
#include <cstring>
#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
#define SK_NS avx2
#define SK_VW 8
#define SK_NAME "avx2"
#include "kern_body.h"
#pragma GCC pop_options
namespace sk {
const KernelTable* kernels_avx2() { return &avx2::table; }
}  // namespace sk
#else
namespace sk {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace sk
#endif
