// 16-byte chunks of a row: the unit every fast CUDA kernel loads and stores (E elements of 4 or 2 bytes).
// A row that does not start on 16 bytes is read as the aligned chunks covering it: chunk k holds elements
// k*E - shift ... k*E - shift + E-1, and the lanes outside [0, C) are masked.  Those chunks never cross a
// 16-byte boundary of the allocation, so they stay inside it.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace softmax_ce {
namespace chunks {

template <typename T>
struct Chunk;

template <>
struct Chunk<float> {
  static constexpr int E = 4;
  __device__ static void unpack(const uint4& u, float (&v)[E]) {
    v[0] = __uint_as_float(u.x), v[1] = __uint_as_float(u.y), v[2] = __uint_as_float(u.z), v[3] = __uint_as_float(u.w);
  }
  __device__ static uint4 pack(const float (&v)[E]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
};

// bfloat16 is the high half of a float: widening is a shift; narrowing rounds to nearest even, as c10 does.
template <>
struct Chunk<c10::BFloat16> {
  static constexpr int E = 8;
  __device__ static void unpack(const uint4& u, float (&v)[E]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) v[2 * i] = __uint_as_float(w[i] << 16), v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
  __device__ static uint32_t pair(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint4 pack(const float (&v)[E]) {
    return make_uint4(pair(v[0], v[1]), pair(v[2], v[3]), pair(v[4], v[5]), pair(v[6], v[7]));
  }
  // The larger of two packed pairs, lane by lane (exact; a NaN loses to a number, as in fmaxf).
  __device__ static uint32_t max_pairs(uint32_t a, uint32_t b) {
    const __nv_bfloat162 r = __hmax2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                     *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static float max_of_pair(uint32_t p) { return fmaxf(__uint_as_float(p << 16), __uint_as_float(p & 0xffff0000u)); }
};

template <>
struct Chunk<c10::Half> {
  static constexpr int E = 8;
  __device__ static void unpack(const uint4& u, float (&v)[E]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
  }
  __device__ static uint32_t pair(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint4 pack(const float (&v)[E]) {
    return make_uint4(pair(v[0], v[1]), pair(v[2], v[3]), pair(v[4], v[5]), pair(v[6], v[7]));
  }
  __device__ static uint32_t max_pairs(uint32_t a, uint32_t b) {  // as for bfloat16
    const __half2 r = __hmax2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static float max_of_pair(uint32_t p) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&p));
    return fmaxf(f.x, f.y);
  }
};

// max(m, the chunk's values), with no lane masked.  2-byte types compare packed pairs and widen one: 7
// instructions per 8 values where unpacking them all took 16 (the max sweeps are arithmetic-bound in bf16).
template <typename T>
__device__ __forceinline__ float chunk_max(const uint4& u, float m) {
  if constexpr (Chunk<T>::E == 8) {
    const uint32_t p = Chunk<T>::max_pairs(Chunk<T>::max_pairs(u.x, u.y), Chunk<T>::max_pairs(u.z, u.w));
    return fmaxf(m, Chunk<T>::max_of_pair(p));
  } else {
    return fmaxf(fmaxf(m, fmaxf(__uint_as_float(u.x), __uint_as_float(u.y))),
                 fmaxf(__uint_as_float(u.z), __uint_as_float(u.w)));
  }
}

// Where a row's chunks start: the aligned chunk holding element 0, and how many elements precede it there.
template <typename T>
struct RowChunks {
  const uint4* base;
  int shift;
  int64_t count;  // chunks covering elements [0, C)
  __device__ RowChunks(const T* row, int64_t C) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(row);
    base = reinterpret_cast<const uint4*>(a & ~uintptr_t(15));
    shift = static_cast<int>((a & 15) / sizeof(T));
    count = (C + shift + Chunk<T>::E - 1) / Chunk<T>::E;
  }
  __device__ int64_t first_class(int64_t k) const { return k * Chunk<T>::E - shift; }
};

// Tuning pdl (softmax_ce_launch.cuh): wait for the kernel before this one and its memory (a no-op unless launched
// programmatically); let the kernel after this one launch.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// At every kernel's start but the two that work before waiting (mean_scale's finish, the warp rows' early reads).
__device__ __forceinline__ void pdl_start() {
  pdl_wait();
  pdl_trigger();
}

// A hint that the 16 bytes at p are read soon: their line brought into L2 (no register, nothing written).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Loads that stream (the logits are read once per kernel) and stores that should not push them out of L2.
__device__ __forceinline__ uint4 load_stream(const uint4* p) { return __ldcs(p); }
__device__ __forceinline__ void store_stream(uint4* p, const uint4& v) { __stcs(p, v); }

// 2^x in one special-function instruction (relative error about 2^-22; results below 2^-126 flush to 0).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
constexpr float kLog2e = 1.4426950408889634f;
// kLog2e = kLog2eHi + kLog2eLo exactly, 12 significant bits each: a product with an 11-bit value is exact.
constexpr float kLog2eHi = 0x1.714p+0f;
constexpr float kLog2eLo = 0x1.476p-12f;

// 2^((x - b) log2 e) as ex2(fmaf(x, kLog2e, c)) * k: one FFMA per element instead of a subtraction and a
// product, with the bits of the subtraction kept.  c = -b' kLog2eHi is exact for b' = b cut to 11 significant
// bits (every bfloat16/half b is its own b'), and k = 2^(b' kLog2eHi - b kLog2e) is one accurate exp2f per row,
// its argument formed exactly but for one rounding ((b' - b) and b' kLog2eLo are exact).  For |b| < 2^12 only
// (fits), where ex2's argument is off from (x - b) log2 e by at most ~7: no overflow, nothing that matters flushed.
struct Exp2Base {
  float c, k;
  Exp2Base() = default;  // set before it is used
  __device__ static bool fits(float b) { return fabsf(b) < 0x1p12f; }  // false for inf and NaN
  __device__ explicit Exp2Base(float b) {
    const float b11 = __uint_as_float(__float_as_uint(b) & 0xffffe000u);
    c = -b11 * kLog2eHi;
    k = exp2f(fmaf(b11 - b, kLog2e, -b11 * kLog2eLo));
  }
  // 2^((v - b) log2 e), b the base this was made of: folded (still to be multiplied by k), or the subtraction kept.
  template <bool kFolded>
  __device__ float term(float v, float b) const {
    return ex2(kFolded ? fmaf(v, kLog2e, c) : (v - b) * kLog2e);
  }
};

// A loop in its two compiled forms: sweep(std::true_type{}) with the exponent arguments folded, else
// sweep(std::false_type{}) with the subtraction kept.
template <class F>
__device__ __forceinline__ void folded_or_not(bool fold, F&& sweep) {
  if (fold)
    sweep(std::true_type{});
  else
    sweep(std::false_type{});
}

// p * p_mul for a chunk's values, p = 2^((v - b) log2 e): folded by `base` (Exp2Base of b), or not.
template <bool kFolded, int E>
__device__ __forceinline__ void chunk_p(float (&out)[E], const float (&v)[E], float b, const Exp2Base& base,
                                        float p_mul) {
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = base.term<kFolded>(v[e], b) * p_mul;
}

// 16 bytes from global to shared memory without passing through registers (sm_80+), and the wait for them.
// Before sm_80 (Volta, Turing: no cp.async) a plain 16-byte load and store: the copy lands when it is issued, which
// is within the window an asynchronous one may land in, so the same barriers order it; the waits are then no-ops.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SOFTMAX_CE_CP_ASYNC 1
#else
#define SOFTMAX_CE_CP_ASYNC 0
#endif
__device__ __forceinline__ void copy_async16(void* smem, const void* gmem) {
#if SOFTMAX_CE_CP_ASYNC
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}
__device__ __forceinline__ void copy_async_wait_all() {
#if SOFTMAX_CE_CP_ASYNC
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Copies issued since the last commit form a group; wait_prior waits for every group but the newest.
__device__ __forceinline__ void copy_async_commit() {
#if SOFTMAX_CE_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void copy_async_wait_prior() {
#if SOFTMAX_CE_CP_ASYNC
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
#endif
}
// Waits until at most the newest N groups are still in flight.
template <int N>
__device__ __forceinline__ void copy_async_wait_all_but() {
#if SOFTMAX_CE_CP_ASYNC
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#undef SOFTMAX_CE_CP_ASYNC

// Stores chunk k of a gradient row (values v for classes first .. first+E-1): one 16-byte store when the
// chunk lies inside [0, C) and the gradient row has the logits' alignment; element by element otherwise.
template <typename T>
__device__ __forceinline__ void store_chunk(T* grow, const RowChunks<T>& xk, bool same_shift, int64_t k, int64_t C,
                                            const float (&v)[Chunk<T>::E]) {
  constexpr int E = Chunk<T>::E;
  const int64_t first = xk.first_class(k);
  if (same_shift && first >= 0 && first + E <= C) {
    store_stream(reinterpret_cast<uint4*>(grow + first), Chunk<T>::pack(v));
    return;
  }
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (first + e >= 0 && first + e < C) grow[first + e] = static_cast<T>(v[e]);
}

}  // namespace chunks
}  // namespace softmax_ce
