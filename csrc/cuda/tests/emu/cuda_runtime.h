// Test-only stand-in for <cuda_runtime.h>: runs the sparsekern CUDA kernels' own source on the
// CPU (see sk_emu.h). Put this directory before the CUDA include directory; the real
// cuda_runtime_api.h / cuda_fp16.h / cuda_bf16.h still provide the types and fp16/bf16 math.
#pragma once
#include "sk_emu.h"
