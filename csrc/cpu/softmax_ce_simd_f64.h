// The float64 rows' three sweeps (max, sum of exponentials, exponentials times a factor) over W/2-lane double
// vectors, for the portable kernel's rows of contiguous classes: its std::exp per element made float64 2-3x slower
// than PyTorch's (vectorised) log_softmax.  Included by the instruction-set files after softmax_ce_simd.h (W).
#include "softmax_ce_simd_args.h"

namespace softmax_ce {
namespace {

constexpr int WD = W / 2;  // doubles per vector: 8 (AVX-512), 4 (AVX2)
typedef double vd __attribute__((vector_size(8 * WD)));
typedef long long vl __attribute__((vector_size(8 * WD)));

inline vd splat_d(double v) { return vd{} + v; }
inline vd load_d(const double* p) {
  vd v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store_d(double* p, vd v) { __builtin_memcpy(p, &v, sizeof v); }
// The first k (<= WD) lanes from p, the rest `fill` (never reading past them); and the first k back.
inline vd load_k(const double* p, int k, double fill) {
  if (k == WD) return load_d(p);
  double t[WD];
  for (int i = 0; i < WD; ++i) t[i] = i < k ? p[i] : fill;
  return load_d(t);
}
inline void store_k(double* p, vd v, int k) {
  if (k == WD) return store_d(p, v);
  for (int i = 0; i < k; ++i) p[i] = v[i];
}

// e^x for x <= 0 or NaN (here x - max): 2^n e^r with n = round(x log2 e) by the 1.5 * 2^52 trick (whose low bits
// then hold n), r = x - n ln2 in two steps (fdlibm's split of ln2: n * hi is exact), |r| <= ln2/2, and e^r by its
// Taylor series to r^13 (truncation < 5e-18 relative): about 1 ulp.  e^x for x below -708 is 0 (e^-708 = 3.3e-308,
// just above DBL_MIN), as the float paths flush theirs (no subnormal arithmetic); e^-inf = 0, NaN stays NaN.  (x above 709, outside the contract,
// gives e^709: the exponent never wraps.)
inline vd vexp_d(vd x) {
  const vd lo = splat_d(-708.0), hi = splat_d(709.0);  // e^-708 = 3.3e-308, above DBL_MIN
  vd xc = x < lo ? lo : x;  // NaN compares false: kept
  xc = xc > hi ? hi : xc;
  const vd magic = splat_d(6755399441055744.0);  // 1.5 * 2^52
  const vd t = xc * 1.4426950408889634 + magic;
  const vd n = t - magic;
  const vd r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  vd p = splat_d(1.0 / 6227020800.0);  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const vl k = (vl)t - (vl)magic;  // n, exactly
  const vd scale = (vd)((k + 1023) << 52);
  const vd res = p * scale;
  return x < lo ? splat_d(0.0) : res;
}

// The row's max: NaN never wins, as in PyTorch's max (and the portable kernel's).
double f64_max(const double* x, int64_t C) {
  vd m = splat_d(-__builtin_inf());
  int64_t c = 0;
  for (; c + WD <= C; c += WD) {
    const vd v = load_d(x + c);
    m = v > m ? v : m;
  }
  double out = -__builtin_inf();
  for (int i = 0; i < WD; ++i) out = m[i] > out ? m[i] : out;
  for (; c < C; ++c) out = x[c] > out ? x[c] : out;
  return out;
}

// sum_c e^(x_c - m), in lanes, then lane by lane in a fixed order (deterministic), then the tail.
double f64_sum_exp(const double* x, int64_t C, double m) {
  vd s = splat_d(0.0);
  const vd mv = splat_d(m);
  int64_t c = 0;
  for (; c + WD <= C; c += WD) s += vexp_d(load_d(x + c) - mv);
  double out = 0;
  for (int i = 0; i < WD; ++i) out += s[i];
  if (c < C) {
    const vd e = vexp_d(load_k(x + c, static_cast<int>(C - c), -__builtin_inf()) - mv);
    for (int i = 0; i < WD && c + i < C; ++i) out += e[i];
  }
  return out;
}

// g_c = e^(x_c - base) * mul for the C contiguous classes (the gradient's p_c * p_mul; the caller adds the rest).
void f64_exp_scale(const double* x, double* g, int64_t C, double base, double mul) {
  const vd bv = splat_d(base), mv = splat_d(mul);
  int64_t c = 0;
  for (; c + WD <= C; c += WD) store_d(g + c, vexp_d(load_d(x + c) - bv) * mv);
  if (c < C) store_k(g + c, vexp_d(load_k(x + c, static_cast<int>(C - c), base) - bv) * mv, static_cast<int>(C - c));
}

// ---- K-dim float64 (positions contiguous, classes at stride sC): n <= kF64Block positions, one lane each, walking
// the classes in order, so each position's sum runs in the portable kernel's order.  Each position copied out as a
// row of its own took 2.6-4.2x PyTorch's forward time (4x21x128x128 to 8x5x256x256, 2 threads, 2026-11-28).
constexpr int kF64Vecs = kF64Block / WD;

inline int lanes_of(int n, int j) {  // the lanes of vector j in a block of n positions
  const int k = n - j * WD;
  return k < 0 ? 0 : k < WD ? k : WD;
}

// m[i] = the max over the classes of position i (NaN never wins, as in PyTorch's max).
void f64_col_max(const double* x, int64_t sC, int64_t C, int n, double* m) {
  vd acc[kF64Vecs];
  for (int j = 0; j < kF64Vecs; ++j) acc[j] = splat_d(-__builtin_inf());
  for (int64_t c = 0; c < C; ++c)
    for (int j = 0; j < kF64Vecs; ++j) {
      const int k = lanes_of(n, j);
      if (k == 0) break;
      const vd v = load_k(x + c * sC + j * WD, k, -__builtin_inf());
      acc[j] = v > acc[j] ? v : acc[j];
    }
  for (int j = 0; j < kF64Vecs && lanes_of(n, j); ++j) store_k(m + j * WD, acc[j], lanes_of(n, j));
}

// s[i] = sum over the classes, in order, of e^(x - m[i]).
void f64_col_sum_exp(const double* x, int64_t sC, int64_t C, int n, const double* m, double* s) {
  vd acc[kF64Vecs], mv[kF64Vecs];
  for (int j = 0; j < kF64Vecs; ++j) acc[j] = splat_d(0.0), mv[j] = load_k(m + j * WD, lanes_of(n, j), 0.0);
  for (int64_t c = 0; c < C; ++c)
    for (int j = 0; j < kF64Vecs; ++j) {
      const int k = lanes_of(n, j);
      if (k == 0) break;
      acc[j] += vexp_d(load_k(x + c * sC + j * WD, k, 0.0) - mv[j]);
    }
  for (int j = 0; j < kF64Vecs && lanes_of(n, j); ++j) store_k(s + j * WD, acc[j], lanes_of(n, j));
}

// g[c * g_sC + i] = e^(x[c * sC + i] - base[i]) * mul[i] (g may be x itself: each element is read, then written).
void f64_col_exp_scale(const double* x, int64_t sC, double* g, int64_t g_sC, int64_t C, int n, const double* base,
                       const double* mul) {
  vd bv[kF64Vecs], mv[kF64Vecs];
  for (int j = 0; j < kF64Vecs; ++j) {
    bv[j] = load_k(base + j * WD, lanes_of(n, j), 0.0);
    mv[j] = load_k(mul + j * WD, lanes_of(n, j), 0.0);
  }
  for (int64_t c = 0; c < C; ++c)
    for (int j = 0; j < kF64Vecs; ++j) {
      const int k = lanes_of(n, j);
      if (k == 0) break;
      store_k(g + c * g_sC + j * WD, vexp_d(load_k(x + c * sC + j * WD, k, 0.0) - bv[j]) * mv[j], k);
    }
}

// This instruction set's table: every entry of softmax_ce_simd.h and of this file, W float lanes.
constexpr SimdKernels simd_kernels(const char* name) {
  return SimdKernels{name,        W,           rows_entry,      columns_entry,   small_rows_entry, f64_max,
                     f64_sum_exp, f64_exp_scale, scale_entry, f64_col_max, f64_col_sum_exp, f64_col_exp_scale};
}

}  // namespace
}  // namespace softmax_ce
