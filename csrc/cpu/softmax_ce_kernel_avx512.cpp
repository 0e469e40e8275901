// The CPU hot loops built for AVX-512 F/BW/VL/DQ (16 float lanes); chosen at run time when the CPU has them.
#if !(defined(__x86_64__) || defined(__i386__))
// Not an x86 CPU: nothing to build; the dispatcher never picks this.
#include "softmax_ce_simd_args.h"
namespace softmax_ce {
const SimdKernels kSimdAvx512{"avx512", 16, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                               nullptr, nullptr, nullptr};
}  // namespace softmax_ce
#else

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

#define SCE_SIMD_WIDTH 16
// GCC 12's own AVX-512 headers self-initialise an "undefined" source (`__m512 __Y = __Y;`), which its
// -Wmaybe-uninitialized then reports once per inlined intrinsic (132 lines per build): a false positive.  Where
// inlining makes the path certain, the same line reports as -Wuninitialized (vexp, once the float64 columns came).
// Ignored for the lines of the headers that include them only: the float64 lanes below keep both warnings.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include "softmax_ce_simd.h"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include "softmax_ce_simd_f64.h"

namespace softmax_ce {
const SimdKernels kSimdAvx512 = simd_kernels("avx512");
}  // namespace softmax_ce

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // x86
