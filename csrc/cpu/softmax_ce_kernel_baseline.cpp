// The CPU hot loops in plain vectors (GCC/Clang vector extensions, no intrinsics), built for the build's baseline
// instruction set: NEON on ARM64, SSE2 on x86-64.  The best on CPUs without AVX2 (ARM: Apple silicon, Graviton),
// where the scalar portable kernel ran 4-10x slower than PyTorch; x86 CPUs reach it by SOFTMAX_CE_CPU_ISA.
// 4 float lanes, one 128-bit register: 8 (two registers a vector) ran 3x slower under GCC 12's SSE2 lowering.
#define SCE_SIMD_WIDTH 4
#define SCE_SIMD_BASELINE 1
#include "softmax_ce_simd.h"
#include "softmax_ce_simd_f64.h"

namespace softmax_ce {
const SimdKernels kSimdBaseline = simd_kernels("baseline");
}  // namespace softmax_ce
