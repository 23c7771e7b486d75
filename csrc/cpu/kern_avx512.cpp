// AVX-512 build of the microkernels (kern_body.h). Selected at run time when the CPU has
// avx512f/bw/vl/dq and fma.
#include "kern_api.h"
#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 reports the masked-load intrinsics' undefined passthrough operands as uninitialised
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,bmi,bmi2,f16c")
#define SK_NS avx512
#define SK_VW 16
#define SK_AVX512 1
#define SK_NAME "avx512"
#include "kern_body.h"
#pragma GCC pop_options
namespace sk {
const KernelTable* kernels_avx512() { return &avx512::table; }
}  // namespace sk
#else
namespace sk {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace sk
#endif
