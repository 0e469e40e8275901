// The baseline kernels (softmax_ce_kernel_baseline.cpp) on another architecture, without torch: built by
// test_arm_baseline.py with a cross-compiler and run under QEMU.  Exits 1 when a kernel's loss or gradient is
// off a float64 reference by more than its dtype's bound, or when the CPU's float16 conversions (ARM64: fcvtl /
// fcvtn) differ from the integer steps (F16::widen / narrow) that x86's test checks against PyTorch.
#include "softmax_ce_kernel_baseline.cpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using namespace softmax_ce;

namespace {

float from_bits(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
unsigned bits_of(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
// The inputs rounded to 2-byte values, and the gradients read back, by the kernels' own single-element steps.
template <class T>
unsigned short to_raw(float f) {
  unsigned short h;
  T::put(&h, f);
  return h;
}

enum Kind { kRows, kColumns, kSmall };
const char* kDtype[] = {"float32", "bfloat16", "float16"};
const char* kKind[] = {"rows", "columns", "small rows"};

struct Worst { double loss = 0, grad = 0; };

// One case: N rows (or positions) of C classes in dtype d, every 7th target ignored, smoothing eps, weights or
// not, a per-row upstream factor; the training pass (loss and gradient) against float64.
void run_case(int d, Kind kind, int64_t N, int64_t C, float eps, bool weighted, std::mt19937& rng, Worst& w) {
  std::normal_distribution<float> normal(0.f, 3.f);
  const int64_t E = N * C;
  std::vector<float> x(E);
  std::vector<unsigned short> xh(E);
  for (int64_t i = 0; i < E; ++i) {
    x[i] = normal(rng);
    if (d == 1) xh[i] = to_raw<BF16>(x[i]), x[i] = BF16::get(&xh[i]);
    if (d == 2) xh[i] = to_raw<F16>(x[i]), x[i] = F16::get(&xh[i]);
  }
  std::vector<int64_t> t(N);
  for (int64_t n = 0; n < N; ++n) t[n] = n % 7 == 3 ? -100 : static_cast<int64_t>(rng() % C);
  std::vector<float> cw(C, 1.f), loss(N), f(N);
  float wsum = static_cast<float>(C);
  if (weighted) {
    wsum = 0;
    for (auto& v : cw) v = 0.5f + static_cast<float>(rng() % 100) / 100.f, wsum += v;
  }
  for (auto& v : f) v = 0.25f + static_cast<float>(rng() % 7);
  std::vector<float> g(E);
  std::vector<unsigned short> gh(E);
  int bad = 0;
  SimdArgs a{};
  a.dtype = static_cast<SimdDtype>(d);
  a.stats = a.grad = true;
  a.x = d == 0 ? static_cast<const void*>(x.data()) : xh.data();
  a.g = d == 0 ? static_cast<void*>(g.data()) : gh.data();
  a.target = t.data();
  a.weight = weighted ? cw.data() : nullptr;
  a.weight_sum = wsum;
  a.eps = eps;
  a.ignore_index = -100;
  a.loss = loss.data();
  a.factor = f.data();
  a.bad = &bad;
  a.C = C;
  int64_t sN, sC;  // element (n, c) at n * sN + c * sC
  if (kind == kColumns) {  // (1, C, N): the positions contiguous
    a.B = 1, a.S = N, a.x_sC = a.g_sC = N, a.x_sS = a.g_sS = 1, a.t_sS = 1, a.f_sS = 1;
    sN = 1, sC = N;
  } else {
    a.B = N, a.S = 1, a.x_sB = a.g_sB = C, a.x_sC = a.g_sC = 1, a.t_sB = 1, a.f_sB = 1;
    sN = C, sC = 1;
  }
  const int64_t blocks = (N + kSimdBaseline.width - 1) / kSimdBaseline.width;
  if (kind == kRows) kSimdBaseline.rows(a, 0, N);
  if (kind == kColumns) kSimdBaseline.columns(a, 0, blocks);
  if (kind == kSmall) kSimdBaseline.small_rows(a, 0, blocks);
  for (int64_t n = 0; n < N; ++n) {
    const bool ignored = t[n] == -100;
    double m = -INFINITY, s = 0, D = 0;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<double>(x[n * sN + c * sC]));
    for (int64_t c = 0; c < C; ++c) {
      const double v = x[n * sN + c * sC];
      s += std::exp(v - m), D += cw[c] * (m - v);
    }
    const double log_s = std::log(s), w_t = ignored ? 0 : cw[t[n]];
    const double ref = ignored ? 0 : (1 - eps) * w_t * (m - x[n * sN + t[n] * sC] + log_s) + eps / C * (wsum * log_s + D);
    w.loss = std::max(w.loss, std::fabs(loss[n] - ref) / (1 + std::fabs(ref)));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = n * sN + c * sC;
      const double p = std::exp(x[i] - m) / s;
      const double gref = ignored ? 0
                                  : f[n] * (((1 - eps) * w_t + eps / C * wsum) * p - eps / C * cw[c] -
                                            (c == t[n] ? (1 - eps) * w_t : 0));
      const float got = d == 0 ? g[i] : d == 1 ? BF16::get(&gh[i]) : F16::get(&gh[i]);
      w.grad = std::max(w.grad, std::fabs(got - gref) / (f[n] * (1 + std::fabs(gref))));
    }
  }
}

bool kernels_match_float64() {
  std::mt19937 rng(7);
  const int64_t classes[] = {1, 3, 10, 33, 100, 517, 4099};
  const double loss_bound = 2e-6, grad_bound[] = {1e-5, 8e-3, 1e-3};  // a 2-byte gradient's rounding: 2^-8, 2^-11
  bool ok = true;
  for (int d = 0; d < 3; ++d)
    for (Kind kind : {kRows, kColumns, kSmall}) {
      Worst w;
      for (int64_t C : classes) {
        if (kind == kSmall && C > small_row_classes(d == 0 ? 4 : 2)) continue;
        for (int v = 0; v < 4; ++v) run_case(d, kind, 37 + 11 * v, C, v & 1 ? 0.1f : 0.f, v & 2, rng, w);
      }
      const bool good = w.loss <= loss_bound && w.grad <= grad_bound[d];
      std::printf("%s %s %s: loss %.3g, gradient %.3g\n", good ? "ok" : "FAIL", kDtype[d], kKind[kind], w.loss, w.grad);
      ok = ok && good;
    }
  return ok;
}

// F16::load / store (the CPU's conversions where it has them) against F16::widen / narrow: every half, and
// floats at a stride through all 2^32 bit patterns plus the edges (NaN only has to stay a NaN of its sign).
bool f16_conversions_match() {
  long bad = 0;
  for (unsigned h = 0; h < 65536; h += kSimdBaseline.width) {
    unsigned short in[16];
    vu bits;
    for (int i = 0; i < W; ++i) in[i] = static_cast<unsigned short>(h + i), bits[i] = h + i;
    const vf a = F16::load(in), b = F16::widen(bits);
    for (int i = 0; i < W; ++i)
      if (bits_of(a[i]) != bits_of(b[i]) && !(a[i] != a[i] && b[i] != b[i])) ++bad;
  }
  std::vector<unsigned> floats;
  for (unsigned long u = 0; u < (1ul << 32); u += 4099) floats.push_back(static_cast<unsigned>(u));
  for (unsigned e : {0x00000000u, 0x33000000u, 0x33000001u, 0x387fc000u, 0x38800000u, 0x477fe000u, 0x477fefffu,
                     0x477ff000u, 0x7f800000u, 0x7f800001u, 0x7fc00000u, 0xffffffffu})
    floats.push_back(e), floats.push_back(e ^ 0x80000000u);
  for (size_t k = 0; k + W <= floats.size(); k += W) {
    vf v;
    for (int i = 0; i < W; ++i) v[i] = from_bits(floats[k + i]);
    unsigned short out[16];
    F16::store(out, v);
    const vu ref = F16::narrow(v);
    for (int i = 0; i < W; ++i) {
      const unsigned u = floats[k + i];
      const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
      const bool same = nan ? (out[i] & 0x7fffu) > 0x7c00u && (out[i] >> 15) == (u >> 31) : out[i] == ref[i];
      if (!same) ++bad;
    }
  }
  std::printf("%s float16 conversions: %ld mismatches\n", bad ? "FAIL" : "ok", bad);
  return bad == 0;
}

}  // namespace

int main() {
  const bool a = kernels_match_float64(), b = f16_conversions_match();
  return a && b ? 0 : 1;
}
