// The CPU hot loops, written once over a W-lane float vector (GCC vector extensions) and compiled once per
// instruction set by the files that include it, each after its own `#pragma GCC target`.  Nothing here but
// always-inline intrinsics and code with internal linkage: the linker can never hand a function built for
// AVX-512 to a caller on a CPU without it.  Same algebra as csrc/softmax_ce.h (RowGrad, row_loss).
// SCE_SIMD_BASELINE: no intrinsics at all, for the build's baseline (NEON on ARM64, SSE2 on x86-64).
#if !SCE_SIMD_BASELINE
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include <memory>
#include <type_traits>
#include <utility>

#include "softmax_ce_simd_args.h"

#ifndef SCE_SIMD_WIDTH
#error "define SCE_SIMD_WIDTH (4, 8 or 16) before including softmax_ce_simd.h"
#endif

namespace softmax_ce {
namespace {

constexpr int W = SCE_SIMD_WIDTH;
typedef float vf __attribute__((vector_size(4 * W)));
typedef int vi __attribute__((vector_size(4 * W)));
typedef unsigned vu __attribute__((vector_size(4 * W)));
typedef unsigned short vu16 __attribute__((vector_size(2 * W)));

constexpr float kInf = __builtin_inff();
constexpr float kNaN = __builtin_nanf("");

inline vf splat(float v) { return vf{} + v; }
inline vf vmax(vf m, vf v) { return v > m ? v : m; }

// exp(x) = 2^n e^r: n = round(x log2 e), r = x - n ln2 computed in two exact-ish steps (Cody-Waite, so large
// |x| keeps its low bits), |r| <= ln2/2, e^r = 1 + r + r^2 P(r) (Cephes' expf polynomial).  About 1 ulp;
// exp(-inf) = 0 exactly and NaN stays NaN.  The arguments here are x - max <= 0.
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kLog2e = 1.44269504088896341f;
constexpr float kExpLo = -87.0f;  // exp(-87) = 1.6e-38 > FLT_MIN: no subnormal result below it is computed

inline vf exp_reduced(vf x, vf n) {
  const vf r = x - n * kLn2Hi - n * kLn2Lo;
  const vf p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                1.6666665459e-1f) * r + 5.0000001201e-1f;
  return p * (r * r) + r + 1.0f;
}

#if SCE_SIMD_WIDTH == 16 && !SCE_SIMD_BASELINE
// Results under FLT_MIN are 0, as in the AVX2 path: a subnormal result costs an Intel core a microcode assist
// (~150 cycles), and every row made some (its -inf padding lanes, its first re-basing from -FLT_MAX).
inline vf vexp(vf x) {  // AVX-512: rounding and the 2^n scaling are single instructions
  const __m512 lo = _mm512_set1_ps(kExpLo);
  const __mmask16 normal = _mm512_cmp_ps_mask((__m512)x, lo, _CMP_NLT_UQ);  // x >= lo, or NaN (which stays)
  const __m512 xc = _mm512_max_ps(lo, (__m512)x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (vf)_mm512_maskz_scalef_ps(normal, (__m512)exp_reduced((vf)xc, (vf)n), n);
}
#else
inline vf vexp(vf x) {
  const vf lo = splat(kExpLo);
  const vf xc = x < lo ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
  const vf t = xc * kLog2e + magic;
  const vf p = exp_reduced(xc, t - magic);
  const vf res = (vf)((vi)p + (((vi)t - (vi)magic) << 23));
  const vf zero_below = x < lo ? splat(0.0f) : res;
  return x != x ? x : zero_below;
}
#endif

inline float exp1(float x) {
  vf v = splat(x);
  return vexp(v)[0];
}

// log(x) for the sums of exponentials here (x >= 1, or NaN): x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log(x) = e ln2 + log(m), log(1 + f) by Cephes' logf polynomial (about 1 ulp).  NaN stays NaN.
inline vf vlog(vf x) {
  const vi bits = (vi)x;
  vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const vi small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const vf z = m * m;
  vf y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m - 1.2420140846e-1f) * m +
              1.4249322787e-1f) * m - 1.6668057665e-1f) * m + 2.0000714765e-1f) * m - 2.4999993993e-1f) * m +
        3.3333331174e-1f) * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  const vf r = m + y + 0.693359375f * e;
  return x != x ? x : r;
}

// Horizontal reductions by halves (lanes i and i + N/2, then of what is left): log2(W) dependent steps where lane
// after lane took W, which were most of a row's latency at 100-500 classes.  A fixed order: deterministic.
template <int H, class V, int... I>
inline auto half_of(V v, std::integer_sequence<int, I...>) {  // lanes [H, H + N/2) as a vector of N/2 lanes
  return __builtin_shufflevector(v, v, (I + H)...);
}
template <int N, class V, class Op>
inline float by_halves(V v, Op op) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    constexpr auto lanes = std::make_integer_sequence<int, N / 2>{};
    return by_halves<N / 2>(op(half_of<0>(v, lanes), half_of<N / 2>(v, lanes)), op);
  }
}
inline float hsum(vf v) {
  return by_halves<W>(v, [](auto a, auto b) { return a + b; });
}
inline float hmax(vf v) {  // NaN never wins, as in PyTorch's max: -inf where every lane is NaN
  const float m = by_halves<W>(v, [](auto a, auto b) { return ((b > a) | (a != a)) ? b : a; });
  return m != m ? -kInf : m;
}

// Loads and stores of the three dtypes, whole vectors and single elements.
struct F32 {
  using raw = float;
  static vf load(const raw* p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(raw* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
  static float get(const raw* p) { return *p; }
  static void put(raw* p, float v) { *p = v; }
};

struct BF16 {
  using raw = unsigned short;
  static vf load(const raw* p) {
    vu16 h;
    __builtin_memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
  }
  static void store(raw* p, vf v) {  // round to nearest even; NaN stays a (quiet) NaN
    const vu u = (vu)v;
    vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = v != v ? (vu{} + 0x7FC0u) : r;
    const vu16 h = __builtin_convertvector(r, vu16);
    __builtin_memcpy(p, &h, sizeof h);
  }
  static float get(const raw* p) {
    const unsigned u = static_cast<unsigned>(*p) << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
  }
  static void put(raw* p, float v) {
    vf s = splat(v);
    raw h[W];
    store(h, s);
    *p = h[0];
  }
};

#if SCE_SIMD_BASELINE
// IEEE half <-> float by integer steps (C++ compilers differ on a half type: GCC 12 has _Float16 in C++ on x86
// only).  Exact both ways, round to nearest even, NaN quiet (0x7e00); the only float arithmetic is on normal
// numbers (subnormal halves renormalised by subtracting a power of 2), so a flush-to-zero mode changes nothing.
struct F16 {
  using raw = unsigned short;
  static vf widen(vu h) {
    const vu em = (h & 0x7fffu) << 13, exp = em & (0x1fu << 23);
    vu o = em + ((127u - 15u) << 23);
    o = exp == (0x1fu << 23) ? o + ((128u - 16u) << 23) : o;  // inf / NaN: the float's top exponent
    const vf sub = (vf)(o + (1u << 23)) - (vf)(vu{} + (113u << 23));  // subnormal halves (and zero)
    o = exp == 0u ? (vu)sub : o;
    return (vf)(o | ((h & 0x8000u) << 16));
  }
  static vu narrow(vf v) {
    const vu u = (vu)v, sign = u & 0x80000000u, a = u ^ sign;
    const vu big = a > (255u << 23) ? vu{} + 0x7e00u : vu{} + 0x7c00u;  // NaN; inf and overflow
    const vu magic = vu{} + (((127u - 15u) + (23u - 10u) + 1u) << 23);
    const vu small = (vu)((vf)a + (vf)magic) - magic;  // below 2^-14: the float add rounds to nearest even
    const vu normal = (a + (((15u - 127u) << 23) + 0xfffu) + ((a >> 13) & 1u)) >> 13;
    const vu o = a >= ((127u + 16u) << 23) ? big : a < (113u << 23) ? small : normal;
    return o | (sign >> 16);
  }
#if defined(__aarch64__) && SCE_SIMD_WIDTH == 4  // ARMv8's conversions (fcvtl / fcvtn): the same results
  static vf load(const raw* p) { return (vf)vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static void store(raw* p, vf v) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32((float32x4_t)v))); }
#else
  static vf load(const raw* p) {
    vu16 h;
    __builtin_memcpy(&h, p, sizeof h);
    return widen(__builtin_convertvector(h, vu));
  }
  static void store(raw* p, vf v) {
    const vu16 h = __builtin_convertvector(narrow(v), vu16);
    __builtin_memcpy(p, &h, sizeof h);
  }
#endif
  static float get(const raw* p) { return widen(vu{} + *p)[0]; }
  static void put(raw* p, float v) { *p = static_cast<raw>(narrow(splat(v))[0]); }
};
#else
struct F16 {
  using raw = unsigned short;
  static vf load(const raw* p) {
#if SCE_SIMD_WIDTH == 16
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  }
  static void store(raw* p, vf v) {
#if SCE_SIMD_WIDTH == 16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#endif
  }
  static float get(const raw* p) { return _cvtsh_ss(*p); }
  static void put(raw* p, float v) { *p = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
};
#endif

inline bool out_of_range(int64_t t, int64_t C) { return t < 0 || t >= C; }

// The gradient coefficients of one row (RowGrad::index): f * (p * p_mul - w_c * c_mul - [c == t] * t_sub).
struct Coef {
  float p_mul, c_mul, t_sub;
};
inline Coef coef(float f, float w_t, float W_sum, float eps, int64_t C) {
  Coef k;
  k.t_sub = f * (1.0f - eps) * w_t;
  k.c_mul = eps == 0.0f ? 0.0f : f * eps / static_cast<float>(C);
  k.p_mul = eps == 0.0f ? f * w_t : k.t_sub + k.c_mul * W_sum;
  return k;
}
// As row_loss in softmax_ce.h: (m - x_t) + log(s), exact where x_t is the max.
inline float row_loss(float log_s, float m, float x_t, float w_t, float A, float D, float eps, int64_t C) {
  const float nll = w_t * ((m - x_t) + log_s);
  if (eps == 0.0f) return nll;
  return (1.0f - eps) * nll + eps / static_cast<float>(C) * (A == 0.0f ? D : A * log_s + D);
}

inline vi lanes_below(int n) {  // one compare with a constant 0, 1, .., W - 1
  vi iota;
  for (int i = 0; i < W; ++i) iota[i] = i;
  return iota < (vi{} + n);
}
#if SCE_SIMD_WIDTH == 16 && !SCE_SIMD_BASELINE
inline __mmask16 first_lanes(int n) { return static_cast<__mmask16>((1u << n) - 1); }  // lanes_below as a mask
#endif

// The first n (< W) lanes of a vector from memory, the rest `fill`; and the first n lanes back.  Masked loads
// and stores where the ISA has them (AVX-512 every dtype, AVX2 float; they never touch the lanes past n), else a
// copy: lane by lane, a row's tail cost ~150 cycles at 100 float classes, about what its 96 others did.
template <class T>
vf load_lanes(const typename T::raw* p, int n, float fill) {
  if (n == W) return T::load(p);
  using raw = typename T::raw;
#if SCE_SIMD_WIDTH == 16 && !SCE_SIMD_BASELINE
  const __mmask16 k = first_lanes(n);
  if constexpr (sizeof(raw) == 4) {
    return (vf)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), k, p);
  } else {
    raw tmp[W];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tmp), _mm256_maskz_loadu_epi16(k, p));
    return (vf)_mm512_mask_blend_ps(k, _mm512_set1_ps(fill), (__m512)T::load(tmp));
  }
#else
  const vi lanes = lanes_below(n);
#if !SCE_SIMD_BASELINE
  if constexpr (sizeof(raw) == 4) return lanes ? (vf)_mm256_maskload_ps(p, (__m256i)lanes) : splat(fill);
#endif
  raw tmp[W] = {};  // no masked load (AVX2's 16-bit values, the baseline's every dtype): through a zeroed copy
  __builtin_memcpy(tmp, p, n * sizeof(raw));
  return lanes ? T::load(tmp) : splat(fill);
#endif
}
template <class T>
void store_lanes(typename T::raw* p, vf v, int n) {
  if (n == W) return T::store(p, v);
  using raw = typename T::raw;
#if SCE_SIMD_WIDTH == 16 && !SCE_SIMD_BASELINE
  const __mmask16 k = first_lanes(n);
  if constexpr (sizeof(raw) == 4) {
    _mm512_mask_storeu_ps(p, k, (__m512)v);
  } else {
    raw tmp[W];
    T::store(tmp, v);
    _mm256_mask_storeu_epi16(p, k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tmp)));
  }
#else
#if !SCE_SIMD_BASELINE
  if constexpr (sizeof(raw) == 4) return _mm256_maskstore_ps(p, (__m256i)lanes_below(n), (__m256)v);
#endif
  raw tmp[W];  // no masked store: through a copy
  T::store(tmp, v);
  __builtin_memcpy(p, tmp, n * sizeof(tmp[0]));
#endif
}

// ---- Rows whose classes are contiguous: three sweeps over the row (max; sum-exp; gradient), the later two
// from cache.  kept (the loss + gradient of rows of up to kRowKeptClasses; else nullptr): the sum sweep's
// exponentials, each chunk's relative to the running max it was summed at, so that the gradient sweep is a
// product per element (by a factor per chunk) where it loaded, converted and exponentiated again.
constexpr int kRowChunk = 16;  // vectors per chunk of the online max
constexpr int64_t kRowKeptClasses = 32768;

// The sweep that reads a row from memory prefetches kAheadBytes ahead, into the next row of the task past the
// row's end: the hardware prefetcher alone left the loads and the exponentials serial (cold 8192x1000 float32
// forward, 2 threads: 3.5 -> 2.2 ms; 4 and 8 KiB ahead measured alike, 1 KiB less, a write prefetch nothing).
constexpr int64_t kAheadBytes = 4096;
constexpr int64_t kLineBytes = 64;
struct Ahead {
  const char* row;
  int64_t bytes;
  const char* next;  // the task's next row (nullptr: none)
  void at(int64_t offset) const {  // offset: the byte of this row being read now
    const int64_t o = offset + kAheadBytes;
    if (o < bytes)
      __builtin_prefetch(row + o, 0, 3);
    else if (next != nullptr && o - bytes < bytes)
      __builtin_prefetch(next + (o - bytes), 0, 3);
  }
};

// A class's share of a probability target's loss: w ((1 - eps) y + eps / C).
inline vf prob_share(vf w, vf y, float eps, int64_t C) {
  return w * (eps == 0.0f ? y : (1.0f - eps) * y + eps / static_cast<float>(C));
}

template <class raw>
const raw* row_start(const SimdArgs& a, int64_t r) {
  const int64_t b = r / a.S, s = r - b * a.S;
  return static_cast<const raw*>(a.x) + b * a.x_sB + s * a.x_sS;
}

// Y: the probability targets' loads (F32, or T for targets in the logits' dtype); void: class indices.  With
// probabilities every class has a share a_c = w_c ((1 - eps) y_c + eps / C) of the loss (kSpread), and no class
// a one-hot term: loss = A log(s) + D, gradient f (p A - a_c).
template <class T, bool kSpread, class Y = void>
void row_contiguous(const SimdArgs& a, int64_t r, vf* kept, const typename T::raw* next) {
  using raw = typename T::raw;
  constexpr bool kProb = !std::is_void_v<Y>;
  static_assert(!kProb || kSpread, "probabilities spread the loss over every class");
  constexpr int64_t kLine = kLineBytes / sizeof(raw);  // elements per cache line
  const int64_t C = a.C, b = r / a.S, s = r - b * a.S;
  const raw* x = row_start<raw>(a, r);
  const Ahead ahead{reinterpret_cast<const char*>(x), C * static_cast<int64_t>(sizeof(raw)),
                    reinterpret_cast<const char*>(next)};
  raw* g = a.grad ? static_cast<raw*>(a.g) + b * a.g_sB + s * a.g_sS : nullptr;
  const int64_t t = kProb ? -1 : a.target[b * a.t_sB + s * a.t_sS];
  if (!kProb && (t == a.ignore_index || out_of_range(t, C))) {
    const bool ignored = t == a.ignore_index;
    if (!ignored) __atomic_store_n(a.bad, 1, __ATOMIC_RELAXED);
    const float v = ignored ? 0.0f : kNaN;
    if (a.stats) a.loss[r] = v;
    if (a.stats && a.row_max) a.row_max[r] = a.row_sum[r] = v;
    if (g) {
      int64_t c = 0;
      for (; c + W <= C; c += W) T::store(g + c, splat(v));
      for (; c < C; ++c) T::put(g + c, v);
    }
    return;
  }
  const float w_t = !kProb && a.weight ? a.weight[t] : 1.0f;
  const float x_t = kProb ? 0.0f : T::get(x + t);  // read before the gradient sweep, which may overwrite it (in place)
  const int64_t full = C - C % W;  // classes in whole vectors; the last `tail` go in one padded vector
  const int tail = static_cast<int>(C - full);
  const vi in_tail = lanes_below(tail);
  // Each class's share of the spread term: w_c (class indices), w_c ((1 - eps) y_c + eps / C) (probabilities).
  auto weights = [&](int64_t c, int n) {
    const vf w = a.weight ? load_lanes<F32>(a.weight + c, n, 0.0f) : splat(1.0f);
    if constexpr (kProb) {
      using yraw = typename Y::raw;
      const yraw* y = static_cast<const yraw*>(a.prob) + b * a.t_sB + s * a.t_sS + c;
      return prob_share(w, load_lanes<Y>(y, n, 0.0f), a.eps, C);
    }
    return w;
  };
  // The gradient's p = e^(x - base) / q: the max and the sum, taken here or saved by the forward (not the lse:
  // m + log(s) drops log(s) once |m| >> 1, 1e30 + log 2 == 1e30).
  float base, q, m = -__FLT_MAX__, sum = 0.0f, A = 0.0f;
  float chunk_m[kRowKeptClasses / (kRowChunk * W) + 1];  // kept: the max each chunk's (and the tail's) were taken at
  const int64_t tail_slot = (full + kRowChunk * W - 1) / (kRowChunk * W);  // the tail's, after the whole chunks'
  if (a.stats) {
    // One pass: per chunk of kRowChunk vectors (in L1), its max; when the running max m grows, the sums so far
    // are re-based (s *= e^(m_old - m), D += (m - m_old) A); then the chunk's exps.  m starts at the lowest
    // finite value, so exp(-inf - m) is 0, never (-inf) - (-inf).
    constexpr int kChunk = kRowChunk;
    vf vs = {}, vA = {}, vD = {};
    auto rebase = [&](float cmax) {
      if (!(cmax > m)) return;
      if (m != -__FLT_MAX__) vs *= exp1(m - cmax);  // the first chunk's: nothing summed yet, no exponential to wait for
      if (kSpread) vD += vA == 0.0f ? splat(0.0f) : (cmax - m) * vA;  // no inf * 0 on the first chunk
      m = cmax;
    };
    auto accumulate = [&](vf v, vf w, vi lanes, int64_t c) {
      const vf e = vexp(v - m);
      if (kept) kept[c / W] = e;
      vs += e;
      if (kSpread) {
        w = lanes ? w : splat(0.0f);
        vA += w;
        vD += lanes ? w * (m - v) : splat(0.0f);
      }
    };
    const vi all = lanes_below(W);
    for (int64_t c = 0; c < full; c += kChunk * W) {  // the last chunk may be short
      const int64_t end = c + kChunk * W < full ? c + kChunk * W : full;
      for (int64_t j = c; j < end; j += kLine) ahead.at(j * sizeof(raw));
      vf cm = T::load(x + c);
      for (int64_t j = c + W; j < end; j += W) cm = vmax(cm, T::load(x + j));
      if (end == full && tail) cm = vmax(cm, load_lanes<T>(x + full, tail, -kInf));
      rebase(hmax(cm));
      if (kept) chunk_m[c / (kChunk * W)] = m;
      for (int64_t j = c; j < end; j += W) accumulate(T::load(x + j), kSpread ? weights(j, W) : vf{}, all, j);
    }
    if (tail) {  // padding: -inf adds exp(-inf) = 0 to the sum, and nothing to A or D
      const vf v = load_lanes<T>(x + full, tail, -kInf);
      if (full == 0) rebase(hmax(v));
      if (kept) chunk_m[tail_slot] = m;
      accumulate(v, kSpread ? weights(full, tail) : vf{}, in_tail, full);
    }
    // PyTorch subtracts the max: a +inf in the row makes inf - inf = NaN (exp(inf - inf) above gave it).
    sum = hsum(vs);
    const float log_s = __builtin_logf(sum);
    if (a.row_max) a.row_max[r] = m, a.row_sum[r] = sum;
    base = m, q = sum;
    A = hsum(vA);
    const float D = hsum(vD);
    a.loss[r] = kProb ? (A == 0.0f ? D : A * log_s + D) : row_loss(log_s, m, x_t, w_t, A, D, a.eps, C);
  } else {
    base = a.row_max[r], q = a.row_sum[r];
    if (kProb && g) {  // the gradient from saved stats still needs A
      vf vA = {};
      for (int64_t c = 0; c < full; c += W) vA += weights(c, W);
      if (tail) vA += in_tail ? weights(full, tail) : splat(0.0f);  // lanes past the row: 0, not eps / C
      A = hsum(vA);
    }
  }
  if (g) {
    const float f_row = a.factor[b * a.f_sB + s * a.f_sS];
    const Coef k = kProb ? Coef{f_row * A, f_row, 0.0f} : coef(f_row, w_t, a.weight_sum, a.eps, C);
    const float p_mul = k.p_mul / q;
    const vf vl = splat(base), vp = splat(p_mul), vc = splat(k.c_mul);
    // kept: p * p_mul = e^(x - m_chunk) * e^(m_chunk - m) * p_mul / sum, one factor per chunk (the exponential
    // skipped where the chunk's max is the row's: e^0 is 1 exactly)
    auto chunk_factor = [&](float cm) { return splat(cm == m ? p_mul : exp1(cm - m) * p_mul); };
    vf f = {};
    for (int64_t c = 0; c < full; c += W) {
      if (!a.stats && c % kLine == 0) ahead.at(c * sizeof(raw));  // the gradient from saved stats: x from memory
      if (kept && c % (kRowChunk * W) == 0) f = chunk_factor(chunk_m[c / (kRowChunk * W)]);
      vf gv = kept ? kept[c / W] * f : vexp(T::load(x + c) - vl) * vp;
      if (kSpread) gv -= weights(c, W) * vc;
      T::store(g + c, gv);
    }
    if (tail) {
      if (kept) f = chunk_factor(chunk_m[tail_slot]);
      vf gv = kept ? kept[full / W] * f : vexp(load_lanes<T>(x + full, tail, 0.0f) - vl) * vp;
      if (kSpread) gv -= weights(full, tail) * vc;
      store_lanes<T>(g + full, gv, tail);
    }
    // The target class, recomputed with its one-hot term.
    if (!kProb) T::put(g + t, exp1(x_t - base) * p_mul - w_t * k.c_mul - k.t_sub);
  }
}

// row_contiguous's kept exponentials: the loss + gradient of rows of up to kRowKeptClasses (else none), per task.
inline std::unique_ptr<vf[]> row_kept_buffer(const SimdArgs& a) {
  const bool keep = a.stats && a.grad && a.C <= kRowKeptClasses;
  return std::unique_ptr<vf[]>(keep ? new vf[(a.C + W - 1) / W] : nullptr);
}

template <class T, bool kSpread, class Y = void>
void rows_impl(const SimdArgs& a, int64_t begin, int64_t end) {
  const std::unique_ptr<vf[]> kept = row_kept_buffer(a);  // per task, reused row after row
  using raw = typename T::raw;
  for (int64_t r = begin; r < end; ++r)
    row_contiguous<T, kSpread, Y>(a, r, kept.get(), r + 1 < end ? row_start<raw>(a, r + 1) : nullptr);
}

// ---- Positions contiguous, classes strided (K-dim inputs): W positions at a time, one lane each, walking
// the classes; the block of W*C values stays in cache between the sweeps.  The loss + gradient of up to
// kKeptClasses classes keeps each exponential of the sum sweep (a float per element, on the stack) and the
// gradient sweep multiplies it by p_mul / sum, where it loaded, converted and exponentiated again.
constexpr int64_t kKeptClasses = 256;

// Y: as for row_contiguous (probability targets, positions contiguous in them too; void: class indices).
// hold: without a gradient, keep the max sweep's values for the sum sweep (see below).
template <class T, bool kSpread, class Y = void>
void column_block(const SimdArgs& a, int64_t b, int64_t s0, int n, bool hold) {
  using raw = typename T::raw;
  constexpr bool kProb = !std::is_void_v<Y>;
  static_assert(!kProb || kSpread, "probabilities spread the loss over every class");
  const int64_t C = a.C;
  const raw* x = static_cast<const raw*>(a.x) + b * a.x_sB + s0;
  raw* g = a.grad ? static_cast<raw*>(a.g) + b * a.g_sB + s0 : nullptr;
  float* loss = a.loss + b * a.S + s0;
  float* row_max = a.row_max ? a.row_max + b * a.S + s0 : nullptr;  // the stats: none in the training pass
  float* row_sum = a.row_sum ? a.row_sum + b * a.S + s0 : nullptr;
  vi ok = {}, tv = {};  // lanes with a valid target; the target class per lane (-1 where none)
  vf fill = {}, vwt = {}, vxt = {};  // what invalid lanes get (0 ignored, NaN out of range); w_t; x_t
  for (int i = 0; i < n && !kProb; ++i) {
    const int64_t t = a.target[b * a.t_sB + (s0 + i) * a.t_sS];
    const bool ignored = t == a.ignore_index, bad = !ignored && out_of_range(t, C);
    if (bad) __atomic_store_n(a.bad, 1, __ATOMIC_RELAXED);
    if (ignored || bad) {
      fill[i] = bad ? kNaN : 0.0f;
      tv[i] = -1;
      continue;
    }
    ok[i] = -1;
    tv[i] = static_cast<int>(t);
    vwt[i] = a.weight ? a.weight[t] : 1.0f;
    vxt[i] = T::get(x + t * a.x_sC + i);
  }
  for (int i = kProb ? 0 : n; i < W; ++i) tv[i] = -1;
  if (kProb) ok = lanes_below(n);
  // Class c's share of the spread term per lane: w_c, or w_c ((1 - eps) y_c + eps / C) with probabilities.
  auto share = [&](int64_t c) {
    const float w = a.weight ? a.weight[c] : 1.0f;
    if constexpr (kProb) {
      using yraw = typename Y::raw;
      const yraw* y = static_cast<const yraw*>(a.prob) + b * a.t_sB + c * a.t_sC + s0;
      return prob_share(splat(w), load_lanes<Y>(y, n, 0.0f), a.eps, C);
    }
    return splat(w);
  };
  vf vbase, vs, vA = {};  // the gradient's p = e^(x - base) / s: the max and the sum, taken here or saved
  vf kept[kKeptClasses];  // keep: e^(x - max) per class, [c][lane] (16 KiB at W = 16); else the values, held
  const bool keep = a.stats && g && C <= kKeptClasses;
  if (a.stats) {
    vf vm = splat(-kInf);
    // Without a gradient the max sweep's values are held for the sum sweep, which read them again from their C
    // strided lines (K-dim forward 0.86-0.97x, 1 thread); the training pass, which also stores the exponentials
    // and the gradient, measured up to 1.5x slower holding them, and float blocks already copied into L1 1.1x.
    const bool held = hold && !keep && C <= kKeptClasses;
    for (int64_t c = 0; c < C; ++c) {
      const vf v = load_lanes<T>(x + c * a.x_sC, n, 0.0f);
      if (held) kept[c] = v;
      vm = vmax(vm, v);
    }
    vf vD = {};
    vs = vf{};
    for (int64_t c = 0; c < C; ++c) {
      const vf v = held ? kept[c] : load_lanes<T>(x + c * a.x_sC, n, 0.0f);
      const vf e = vexp(v - vm);
      if (keep) kept[c] = e;
      vs += e;
      if (kSpread) {
        const vf w = share(c);
        vA += w;
        vD += w * (vm - v);
      }
    }
    const vf vlog_s = vlog(vs);
    vbase = vm;  // not the lse: m + log(s) drops log(s) once |m| >> 1
    vf vloss = vwt * ((vm - vxt) + vlog_s);  // as row_loss: exact where x_t is the max
    if (kProb) vloss = vA == 0.0f ? vD : vA * vlog_s + vD;
    else if (a.eps != 0.0f) vloss = (1.0f - a.eps) * vloss + a.eps / static_cast<float>(C) * (vA * vlog_s + vD);
    store_lanes<F32>(loss, ok ? vloss : fill, n);
    if (row_max) {
      store_lanes<F32>(row_max, ok ? vm : fill, n);
      store_lanes<F32>(row_sum, ok ? vs : fill, n);
    }
  } else {
    vbase = load_lanes<F32>(row_max, n, 0.0f);
    vs = load_lanes<F32>(row_sum, n, 1.0f);
    if (kProb && g)  // the gradient from saved stats still needs A
      for (int64_t c = 0; c < C; ++c) vA += share(c);
  }
  if (g) {
    vf f;  // the upstream factor per lane: broadcast, contiguous, or strided
    if (a.f_sS == 0) {
      f = splat(a.factor[b * a.f_sB]);
    } else if (a.f_sS == 1) {
      f = load_lanes<F32>(a.factor + b * a.f_sB + s0, n, 0.0f);
    } else {
      f = vf{};
      for (int i = 0; i < n; ++i) f[i] = a.factor[b * a.f_sB + (s0 + i) * a.f_sS];
    }
    const vf vt = f * (1.0f - a.eps) * vwt;  // the same algebra as coef(), per lane (probabilities: f A, f)
    const vf vc = kProb ? f : a.eps == 0.0f ? splat(0.0f) : f * (a.eps / static_cast<float>(C));
    const vf vp = kProb ? f * vA : a.eps == 0.0f ? f * vwt : vt + vc * a.weight_sum;
    const vf vq = vp / vs;  // p * p_mul = e^(x - base) * p_mul / sum (keep: the kept e^(x - max))
    for (int64_t c = 0; c < C; ++c) {
      const vf p = (keep ? kept[c] : vexp(load_lanes<T>(x + c * a.x_sC, n, 0.0f) - vbase)) * vq;
      vf gv = p - (kSpread ? share(c) : splat(1.0f)) * vc;
      gv = tv == static_cast<int>(c) ? gv - vt : gv;
      store_lanes<T>(g + c * a.g_sC, ok ? gv : fill, n);
    }
  }
}

template <class T, bool kSpread, class Y = void>
void columns_impl(const SimdArgs& a, int64_t begin, int64_t end) {
  const int64_t per_b = (a.S + W - 1) / W;
  for (int64_t k = begin; k < end; ++k) {
    const int64_t b = k / per_b, s0 = (k - b * per_b) * W;
    column_block<T, kSpread, Y>(a, b, s0, static_cast<int>(a.S - s0 < W ? a.S - s0 : W), true);
  }
}

// ---- W x W tiles transposed in registers (raw values: float or 16-bit): log2(W) butterfly stages of W
// two-source shuffles, W log2 W in all, ~0.25 per element at W = 16 where element copies took ~2.
// mix<S, high>: lanes j with (j & S) == 0 take a's lane j (low) or j + S (high), the others b's j - S or j.
template <class V, int S, bool kHigh, int... J>
inline V mix(V a, V b, std::integer_sequence<int, J...>) {
  return __builtin_shufflevector(a, b, ((J & S) ? (kHigh ? W + J : W + J - S) : (kHigh ? J + S : J))...);
}

template <class V, int S = 1>
inline void transpose_stages(V (&r)[W]) {
  if constexpr (S < W) {
    constexpr auto lanes = std::make_integer_sequence<int, W>{};
    for (int i = 0; i < W; ++i) {
      if (i & S) continue;
      const V a = r[i], b = r[i + S];
      r[i] = mix<V, S, false>(a, b, lanes);
      r[i + S] = mix<V, S, true>(a, b, lanes);
    }
    transpose_stages<V, S * 2>(r);
  }
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i, j < W.
template <class raw>
inline void transpose_tile(const raw* src, int64_t src_stride, raw* dst, int64_t dst_stride) {
  typedef raw V __attribute__((vector_size(sizeof(raw) * W)));
  V r[W];
  for (int i = 0; i < W; ++i) __builtin_memcpy(&r[i], src + i * src_stride, sizeof(V));
  transpose_stages(r);
  for (int j = 0; j < W; ++j) __builtin_memcpy(dst + j * dst_stride, &r[j], sizeof(V));
}

// ---- Rows of few classes (S == 1): W rows at a time through transposed copies in L1, one row per lane, by
// column_block.  A row on its own is a chain of dependent latencies (the first re-basing's exponential,
// horizontal max and sums, log, exp of x_t): ~300 cycles whatever C, 0.1 us per 10-class row here (2026-11-27).
// Blocks prefetched ahead (cold, 2 threads, against none: 131072x32 float32 forward 1.3-1.45x, fwd+bwd 1.25x;
// 65536x64 bfloat16 1.15-1.3x / 1.1-1.2x; 2 blocks ahead a little better than 1).
constexpr int64_t kAheadSmallBlocks = 2;

template <class T, bool kSpread>
void small_rows_impl(const SimdArgs& a, int64_t begin, int64_t end) {
  using raw = typename T::raw;
  raw xb[kSmallRowClasses * W], gb[kSmallRowClasses * W];  // [c * W + lane]
  const int64_t C = a.C, rows = a.B;
  const raw* x = static_cast<const raw*>(a.x);
  raw* g = static_cast<raw*>(a.g);
  constexpr int64_t kLine = kLineBytes / sizeof(raw);
  for (int64_t k = begin; k < end; ++k) {
    const int64_t r0 = k * W;
    const int n = static_cast<int>(rows - r0 < W ? rows - r0 : W);
    if (k + kAheadSmallBlocks < end) {  // the block kAheadSmallBlocks on, line by line (why: see Ahead)
      const raw* ahead = x + (r0 + kAheadSmallBlocks * W) * a.x_sB;
      for (int i = 0; i < W; ++i)
        for (int64_t c = 0; c < C; c += kLine) __builtin_prefetch(ahead + i * a.x_sB + c, 0, 3);
    }
    const int64_t tiled = n == W ? C / W * W : 0;  // whole W x W tiles by registers, the rest element-wise
    for (int64_t c = 0; c < tiled; c += W) transpose_tile(x + r0 * a.x_sB + c, a.x_sB, xb + c * W, W);
    for (int i = 0; i < n; ++i)
      for (int64_t c = tiled; c < C; ++c) xb[c * W + i] = x[(r0 + i) * a.x_sB + c];
    SimdArgs t = a;  // the block as W positions of one batch entry: classes W apart in the buffers
    t.x = xb;
    t.g = a.grad ? gb : nullptr;
    t.x_sB = t.g_sB = 0;
    t.x_sC = t.g_sC = W;
    t.target = a.target + r0 * a.t_sB;
    t.t_sB = 0;
    t.t_sS = a.t_sB;
    t.loss = a.loss ? a.loss + r0 : nullptr;
    t.row_max = a.row_max ? a.row_max + r0 : nullptr;
    t.row_sum = a.row_sum ? a.row_sum + r0 : nullptr;
    t.S = W;  // loss / stats at b * S + s0 + i with b = s0 = 0
    if (a.grad) {
      t.factor = a.factor + r0 * a.f_sB;
      t.f_sB = 0;
      t.f_sS = a.f_sB;
    }
    column_block<T, kSpread>(t, 0, 0, n, sizeof(raw) == 2);  // 2-byte values: held as floats, converted once
    if (a.grad) {
      for (int64_t c = 0; c < tiled; c += W) transpose_tile(gb + c * W, W, g + r0 * a.g_sB + c, a.g_sB);
      for (int i = 0; i < n; ++i)
        for (int64_t c = tiled; c < C; ++c) g[(r0 + i) * a.g_sB + c] = gb[c * W + i];
    }
  }
}

// ---- Transposed rows of many classes (a.staged: the column blocks' layout, B == 1, positions = rows): W rows at
// a time copied row-major into buffers by W x W tiles, swept by row_contiguous, the gradient copied back.  Each
// class line of the block is read once and written once (the column blocks read it in every sweep, one page
// per class: page walks).  Class indices only.
template <class T, bool kSpread>
void staged_rows_impl(const SimdArgs& a, int64_t begin, int64_t end) {
  using raw = typename T::raw;
  const int64_t C = a.C;
  std::unique_ptr<raw[]> xb(new raw[W * C]), gb(a.grad ? new raw[W * C] : nullptr);  // [row * C + c]
  const std::unique_ptr<vf[]> kept = row_kept_buffer(a);
  const raw* x = static_cast<const raw*>(a.x);
  raw* g = static_cast<raw*>(a.g);
  const int64_t per_b = (a.S + W - 1) / W;
  for (int64_t k = begin; k < end; ++k) {
    const int64_t s0 = (k % per_b) * W;  // B == 1
    const int n = static_cast<int>(a.S - s0 < W ? a.S - s0 : W);
    const int64_t tiled = n == W ? C / W * W : 0;  // whole W x W tiles by registers, the rest element-wise
    for (int64_t c = 0; c < tiled; c += W) transpose_tile(x + c * a.x_sC + s0, a.x_sC, xb.get() + c, C);
    for (int i = 0; i < n; ++i)
      for (int64_t c = tiled; c < C; ++c) xb[i * C + c] = x[c * a.x_sC + s0 + i];
    SimdArgs t = a;  // the block as n contiguous rows
    t.x = xb.get();
    t.g = gb.get();
    t.B = n, t.S = 1;
    t.x_sB = t.g_sB = C;
    t.x_sC = t.g_sC = 1;
    t.x_sS = t.g_sS = 0;
    t.target = a.target + s0 * a.t_sS;
    t.t_sB = a.t_sS, t.t_sS = 0;
    t.loss = a.loss ? a.loss + s0 : nullptr;
    t.row_max = a.row_max ? a.row_max + s0 : nullptr;
    t.row_sum = a.row_sum ? a.row_sum + s0 : nullptr;
    if (a.grad) {
      t.factor = a.factor + s0 * a.f_sS;
      t.f_sB = a.f_sS, t.f_sS = 0;
    }
    for (int i = 0; i < n; ++i) row_contiguous<T, kSpread>(t, i, kept.get(), nullptr);
    if (a.grad) {
      for (int64_t c = 0; c < tiled; c += W) transpose_tile(gb.get() + c, C, g + c * a.g_sC + s0, a.g_sC);
      for (int i = 0; i < n; ++i)
        for (int64_t c = tiled; c < C; ++c) g[c * a.g_sC + s0 + i] = gb[i * C + c];
    }
  }
}

// One entry per kernel: dispatch on dtype and on whether the loss has a term over every class (spread).
template <class Run>
void by_dtype(const SimdArgs& a, Run&& run) {
  const bool spread = a.eps != 0.0f;
  const auto with = [&](auto dtype) { spread ? run(dtype, std::true_type{}) : run(dtype, std::false_type{}); };
  switch (a.dtype) {
    case SimdDtype::kFloat: return with(F32{});
    case SimdDtype::kBFloat16: return with(BF16{});
    case SimdDtype::kHalf: return with(F16{});
  }
}

// Probability targets: run(T, Y), Y the targets' loads (F32 for float32 targets, else T, the logits' dtype).
template <class Run>
void by_prob_dtype(const SimdArgs& a, Run&& run) {
  by_dtype(a, [&](auto t, auto) { a.prob_float ? run(t, F32{}) : run(t, t); });
}

void rows_entry(const SimdArgs& a, int64_t begin, int64_t end) {
  if (a.prob != nullptr)
    return by_prob_dtype(a, [&](auto t, auto y) { rows_impl<decltype(t), true, decltype(y)>(a, begin, end); });
  by_dtype(a, [&](auto t, auto spread) { rows_impl<decltype(t), decltype(spread)::value>(a, begin, end); });
}

void small_rows_entry(const SimdArgs& a, int64_t begin, int64_t end) {
  by_dtype(a, [&](auto t, auto spread) { small_rows_impl<decltype(t), decltype(spread)::value>(a, begin, end); });
}

// g[i] *= r over n contiguous elements, rounded to their dtype once (scale_grad_'s pass where the guess of
// grad_output missed: ATen's bfloat16 multiply by a scalar moved ~3.6 GB/s on this 2-core machine, 2026-11-28).
template <class T>
void scale_impl(void* g, int64_t n, float r) {
  auto* p = static_cast<typename T::raw*>(g);
  const vf s = splat(r);
  int64_t i = 0;
  for (; i + W <= n; i += W) T::store(p + i, T::load(p + i) * s);
  for (; i < n; ++i) T::put(p + i, T::get(p + i) * r);
}

void scale_entry(SimdDtype dtype, void* g, int64_t n, float r) {
  switch (dtype) {
    case SimdDtype::kFloat: return scale_impl<F32>(g, n, r);
    case SimdDtype::kBFloat16: return scale_impl<BF16>(g, n, r);
    case SimdDtype::kHalf: return scale_impl<F16>(g, n, r);
  }
}

void columns_entry(const SimdArgs& a, int64_t begin, int64_t end) {
  if (a.staged)
    return by_dtype(a, [&](auto t, auto spread) { staged_rows_impl<decltype(t), decltype(spread)::value>(a, begin, end); });
  if (a.prob != nullptr)
    return by_prob_dtype(a, [&](auto t, auto y) { columns_impl<decltype(t), true, decltype(y)>(a, begin, end); });
  by_dtype(a, [&](auto t, auto spread) { columns_impl<decltype(t), decltype(spread)::value>(a, begin, end); });
}

}  // namespace
}  // namespace softmax_ce
