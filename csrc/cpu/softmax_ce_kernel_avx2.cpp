// The CPU hot loops built for AVX2 + FMA + F16C (8 float lanes); chosen at run time when the CPU has them.
#if !(defined(__x86_64__) || defined(__i386__))
// Not an x86 CPU: nothing to build; the dispatcher never picks this.
#include "softmax_ce_simd_args.h"
namespace softmax_ce {
const SimdKernels kSimdAvx2{"avx2", 8, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                               nullptr, nullptr, nullptr};
}  // namespace softmax_ce
#else

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#endif

#define SCE_SIMD_WIDTH 8
#include "softmax_ce_simd.h"
#include "softmax_ce_simd_f64.h"

namespace softmax_ce {
const SimdKernels kSimdAvx2 = simd_kernels("avx2");
}  // namespace softmax_ce

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // x86
