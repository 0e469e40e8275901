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
    double tail[WD];
    for (int i = 0; i < WD; ++i) tail[i] = c + i < C ? x[c + i] : -__builtin_inf();
    const vd e = vexp_d(load_d(tail) - mv);
    for (int i = 0; i < WD && c + i < C; ++i) out += e[i];
  }
  return out;
}

// g_c = e^(x_c - base) * mul for the C contiguous classes (the gradient's p_c * p_mul; the caller adds the rest).
void f64_exp_scale(const double* x, double* g, int64_t C, double base, double mul) {
  const vd bv = splat_d(base), mv = splat_d(mul);
  int64_t c = 0;
  for (; c + WD <= C; c += WD) store_d(g + c, vexp_d(load_d(x + c) - bv) * mv);
  if (c < C) {
    double tail[WD];
    for (int i = 0; i < WD; ++i) tail[i] = c + i < C ? x[c + i] : base;
    const vd e = vexp_d(load_d(tail) - bv) * mv;
    for (int i = 0; i < WD && c + i < C; ++i) g[c + i] = e[i];
  }
}

}  // namespace
}  // namespace softmax_ce
