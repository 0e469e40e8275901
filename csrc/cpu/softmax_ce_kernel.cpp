// CPU kernels: rows in parallel, each row's max / sum-exp / loss / gradient from one read of it
// (the later sweeps of a row hit the cache).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../softmax_ce.h"
#include "../softmax_ce_register.h"
#include "softmax_ce_cpu_isa.h"
#include "softmax_ce_simd_args.h"

namespace softmax_ce {
namespace {

// ---- Instruction-set choice: the vectorised kernels come built for AVX-512, for AVX2, and in plain vectors for
// the build's baseline ("baseline": every CPU can, the best where there is no AVX2); "generic" is the portable
// scalar kernel below alone (which, under every choice, also takes what the vectorised ones leave).

#if defined(__x86_64__) || defined(__i386__)
// F16C by CPUID (leaf 1, ECX bit 29): Clang's __builtin_cpu_supports does not know "f16c" (GCC's does).
bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
}
#endif

bool cpu_can(const std::string& name) {
  if (name == "baseline" || name == "generic") return true;
#if !(defined(__x86_64__) || defined(__i386__))
  return false;
#else
  __builtin_cpu_init();
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && cpu_can("avx2");
  if (name == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
  return false;
#endif
}

const SimdKernels* isa_kernels(const std::string& name) {
  if (name == "avx512") return &kSimdAvx512;
  if (name == "avx2") return &kSimdAvx2;
  if (name == "baseline") return &kSimdBaseline;
  return nullptr;
}

std::atomic<const SimdKernels*>& current_isa() {
  static std::atomic<const SimdKernels*> isa{[] {
    const char* env = std::getenv("SOFTMAX_CE_CPU_ISA");
    const std::string want = env ? env : "";
    if (!want.empty()) {
      TORCH_CHECK(cpu_can(want), "SOFTMAX_CE_CPU_ISA=", want, ": expected one of this CPU's instruction sets (",
                  c10::Join(", ", cpu_isas()), ")");
      return isa_kernels(want);
    }
    return isa_kernels(cpu_isas().front());
  }()};
  return isa;
}

// float64 logits in blocks of kF64Block rows swept a class at a time by the instruction set's f64_col_* (one lane
// per row), the rest per row as ce_rows does it:
// - rows whose positions are contiguous and classes strided (K-dim; (N, C) with the batch contiguous, read as one
//   item of N positions), as they lie;
// - rows of at most kF64Gathered contiguous classes (channels-last K-dim, (N, C) of few classes), copied class-major
//   into a block buffer, their gradient copied back: the row sweeps' vectors were mostly tail there.
// false: neither layout (ce_rows takes it).
// Measured (2 threads, 2026-11-28, 32768 rows, against the row sweeps): forward 2.3x faster at 12 classes, 1.25x at
// 24, even at 32, 1.1x at 40; fwd+bwd 1.9x at 5, 1.2-1.5x at 21 and 28, even at 16 and 32, 0.9x at 24 (whole
// vectors for the row sweeps), 0.8x at 40-64.
constexpr int64_t kF64Gathered = 32;

template <typename acc_t, typename target_t, bool kStats, bool kGrad, bool kProb>
bool f64_columns(const SimdKernels* k, const double* x, const RowLayout& L_in,
                 const RowParams<double, acc_t, target_t>& P, acc_t* loss_out, StatsPtrs<acc_t> stats, double* grad,
                 Factor<acc_t> factor, std::atomic<bool>& bad) {
  static_assert(std::is_same_v<acc_t, double>);
  if (k == nullptr || k->f64_col_max == nullptr || L_in.C == 0) return false;
  const bool gathered = L_in.x_sC == 1 && (!kGrad || L_in.g_sC == 1);
  if (gathered && L_in.C > kF64Gathered) return false;  // long rows: ce_rows's row sweeps
  RowLayout L = L_in;
  if (!gathered && L.S == 1 && L.x_sB == 1 && (!kGrad || L.g_sB == 1)) {  // (N, C, 1) as (1, C, N): row r stays r
    L.S = L.B, L.B = 1;
    L.x_sS = L.x_sB, L.t_sS = L.t_sB, L.g_sS = L.g_sB;
    factor.sS = factor.sB;
    L.x_sB = L.t_sB = L.g_sB = factor.sB = 0;
  }
  if (!gathered && (L.S == 1 || L.x_sS != 1 || (kGrad && L.g_sS != 1))) return false;
  const int64_t C = L.C, S = L.S, R = L.B * S;
  // Items: gathered, blocks of consecutive rows (across batch items); else blocks of positions within one item.
  const int64_t per_b = (S + kF64Block - 1) / kF64Block;
  const int64_t items = gathered ? (R + kF64Block - 1) / kF64Block : L.B * per_b;
  const acc_t W = P.weight ? *P.weight_sum : acc_t(C);
  const bool spread = kProb || P.eps != acc_t(0);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  at::parallel_for(0, items, std::max<int64_t>(1, 32768 / (C * kF64Block)), [&](int64_t begin, int64_t end) {
    std::vector<double> x_buf(gathered ? C * kF64Block : 0), g_buf(gathered && kGrad ? C * kF64Block : 0);
    for (int64_t item = begin; item < end; ++item) {
      int64_t r0, bi[kF64Block], si[kF64Block];  // the block's first row; each lane's row (b, s)
      int n;
      const double* xb;  // lane i, class c at xb[c * xs + i]; its gradient at gb[c * gs + i]
      double* gb = nullptr;
      int64_t xs, gs = 0;
      if (gathered) {
        r0 = item * kF64Block;
        n = static_cast<int>(std::min<int64_t>(kF64Block, R - r0));
        for (int i = 0; i < n; ++i) {
          bi[i] = (r0 + i) / S, si[i] = r0 + i - bi[i] * S;
          const double* xr = x + bi[i] * L.x_sB + si[i] * L.x_sS;
          for (int64_t c = 0; c < C; ++c) x_buf[c * kF64Block + i] = xr[c];
        }
        xb = x_buf.data(), xs = kF64Block;
        if (kGrad) gb = g_buf.data(), gs = kF64Block;
      } else {
        const int64_t b = item / per_b, s0 = (item - b * per_b) * kF64Block;
        r0 = b * S + s0;
        n = static_cast<int>(std::min<int64_t>(kF64Block, S - s0));
        for (int i = 0; i < n; ++i) bi[i] = b, si[i] = s0 + i;
        xb = x + b * L.x_sB + s0, xs = L.x_sC;
        if (kGrad) gb = grad + b * L.g_sB + s0, gs = L.g_sC;
      }
      int64_t t[kF64Block];
      bool ok[kF64Block];  // a target in [0, C) (or probabilities); else `fill`: 0 ignored, NaN out of range
      acc_t fill[kF64Block], w_t[kF64Block], x_t[kF64Block], m[kF64Block], q[kF64Block], A[kF64Block];
      for (int i = 0; i < n; ++i) {
        t[i] = kProb ? 0 : P.index[bi[i] * L.t_sB + si[i] * L.t_sS];
        const bool ignored = !kProb && t[i] == P.ignore_index;
        const bool outside = !kProb && !ignored && target_out_of_range(t[i], C);
        if (outside) bad.store(true, std::memory_order_relaxed);
        ok[i] = !ignored && !outside;
        fill[i] = ignored ? acc_t(0) : nan;
        if (!ok[i]) t[i] = -1;
        w_t[i] = !kProb && t[i] >= 0 && P.weight ? P.weight[t[i]] : acc_t(1);
        x_t[i] = !kProb && t[i] >= 0 ? xb[t[i] * xs + i] : acc_t(0);  // before a gradient over the logits
      }
      auto coef = [&](int i, int64_t c) {  // class c's share in lane i's row
        const target_t* yr = kProb ? P.prob + bi[i] * L.t_sB + si[i] * L.t_sS : nullptr;
        return class_coef<kProb>(P, yr, L.t_sC, c, C);
      };
      acc_t D[kF64Block];
      for (int i = 0; i < n; ++i) A[i] = 0, D[i] = 0;
      if (kStats) {
        k->f64_col_max(xb, xs, C, n, m);
        k->f64_col_sum_exp(xb, xs, C, n, m, q);
        // The spread term's sums, a class at a time over the lanes (each lane's still in class order, as ce_rows's):
        // lane by lane, each walked its C classes at a stride.
        if (spread)
          for (int64_t c = 0; c < C; ++c)
            for (int i = 0; i < n; ++i) {
              const acc_t a = coef(i, c);
              A[i] += a;
              D[i] += a * (m[i] - xb[c * xs + i]);
            }
        for (int i = 0; i < n; ++i) {
          const RowStats<acc_t> st{m[i], q[i], A[i], D[i]};
          const int64_t r = r0 + i;
          loss_out[r] = ok[i] ? row_loss<kProb>(st, std::log(st.s), x_t[i], w_t[i], P.eps, C) : fill[i];
          if (!kGrad) stats.max[r] = ok[i] ? st.m : fill[i], stats.sum[r] = ok[i] ? st.s : fill[i];
        }
      } else {
        for (int i = 0; i < n; ++i) m[i] = stats.max[r0 + i], q[i] = stats.sum[r0 + i];
        if (kProb)  // the gradient from saved stats still needs A
          for (int64_t c = 0; c < C; ++c)
            for (int i = 0; i < n; ++i) A[i] += coef(i, c);
      }
      if (kGrad) {
        RowGrad<acc_t> g[kF64Block];
        acc_t p_mul[kF64Block];
        for (int i = 0; i < n; ++i) {
          const acc_t f = factor.at(bi[i], si[i]);
          g[i] = kProb ? RowGrad<acc_t>::prob(f, A[i]) : RowGrad<acc_t>::index(f, w_t[i], W, P.eps, C);
          p_mul[i] = g[i].p_mul /= q[i];
        }
        // Ignored and out-of-range rows are swept too (their max and sum may be 0 or NaN), then filled.
        k->f64_col_exp_scale(xb, xs, gb, gs, C, n, m, p_mul);
        // g.at's operations in its order: p * p_mul, then - a_c * c_mul, then - t_sub
        if (spread)
          for (int64_t c = 0; c < C; ++c)
            for (int i = 0; i < n; ++i) gb[c * gs + i] -= coef(i, c) * g[i].c_mul;
        for (int i = 0; i < n; ++i) {
          if (!ok[i])
            for (int64_t c = 0; c < C; ++c) gb[c * gs + i] = fill[i];
          else if (!kProb)
            gb[t[i] * gs + i] -= g[i].t_sub;
        }
        if (gathered)  // the rows' gradients back where they belong (in place: over rows already read)
          for (int i = 0; i < n; ++i) {
            double* gr = grad + bi[i] * L.g_sB + si[i] * L.g_sS;
            for (int64_t c = 0; c < C; ++c) gr[c] = gb[c * gs + i];
          }
      }
    }
  });
  return true;
}

// kStats: compute the statistics and the loss from the logits (the stats written without kGrad); otherwise read
// the stats.  kGrad: write the gradient.  kProb: probability targets (B, C, S); otherwise class indices (B, S).
template <typename scalar_t, typename acc_t, typename target_t, bool kStats, bool kGrad, bool kProb>
void ce_rows(const scalar_t* x, const RowLayout& L, const RowParams<scalar_t, acc_t, target_t>& P, acc_t* loss_out,
             StatsPtrs<acc_t> stats, scalar_t* grad, Factor<acc_t> factor, std::atomic<bool>& bad) {
  const int64_t C = L.C, S = L.S;
  const acc_t W = P.weight ? *P.weight_sum : acc_t(C);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const bool spread = kProb || P.eps != acc_t(0);  // the loss has a term over every class
  // float64: the sweeps' exponentials vectorised (softmax_ce_simd_f64.h) where the CPU has an instruction set for
  // them, over the row's classes contiguous: as they lie, or copied (K-dim rows walk theirs with a stride), and the
  // gradient likewise written in place or copied out.
  const SimdKernels* f64 = std::is_same_v<scalar_t, double> ? current_isa().load() : nullptr;
  if (f64 != nullptr && f64->f64_max == nullptr) f64 = nullptr;
  if constexpr (std::is_same_v<scalar_t, double>) {
    if (f64_columns<acc_t, target_t, kStats, kGrad, kProb>(f64, x, L, P, loss_out, stats, grad, factor, bad)) return;
  }
  const bool x_copied = f64 != nullptr && L.x_sC != 1, g_copied = f64 != nullptr && kGrad && L.g_sC != 1;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, L.rows(), grain, [&](int64_t begin, int64_t end) {
    std::vector<double> x_row(x_copied ? C : 0), g_row(g_copied ? C : 0);  // this thread's copies
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / S, s = r - b * S;
      const scalar_t* xr = x + b * L.x_sB + s * L.x_sS;
      const target_t* yr = kProb ? P.prob + b * L.t_sB + s * L.t_sS : nullptr;
      scalar_t* gr = kGrad ? grad + b * L.g_sB + s * L.g_sS : nullptr;
      auto xc = [&](int64_t c) { return static_cast<acc_t>(xr[c * L.x_sC]); };
      auto ac = [&](int64_t c) { return class_coef<kProb>(P, yr, L.t_sC, c, C); };
      int64_t t = -1;
      if (!kProb) {
        t = P.index[b * L.t_sB + s * L.t_sS];
        if (t == P.ignore_index || target_out_of_range(t, C)) {
          const bool ignored = t == P.ignore_index;
          if (!ignored) bad.store(true, std::memory_order_relaxed);
          if (kStats) loss_out[r] = ignored ? acc_t(0) : nan;
          if (kStats && !kGrad) stats.max[r] = stats.sum[r] = ignored ? acc_t(0) : nan;
          if (kGrad)
            for (int64_t c = 0; c < C; ++c) gr[c * L.g_sC] = static_cast<scalar_t>(ignored ? acc_t(0) : nan);
          continue;
        }
      }
      const acc_t w_t = !kProb && P.weight ? P.weight[t] : acc_t(1);
      const scalar_t* xv = xr;  // the row's classes contiguous, for the float64 sweeps
      if constexpr (std::is_same_v<scalar_t, double>) {
        if (x_copied) {
          for (int64_t c = 0; c < C; ++c) x_row[c] = xr[c * L.x_sC];
          xv = x_row.data();
        }
      }
      RowStats<acc_t> st{-std::numeric_limits<acc_t>::infinity(), 0, 0, 0};
      acc_t base, q;  // p = e^(x - base) / q: the max and the sum, taken here or saved by the forward
      if (kStats) {
        // NaN compares false, so it never becomes the max but poisons the sum, as in PyTorch.
        if constexpr (std::is_same_v<scalar_t, double>) {
          if (f64 != nullptr) st.m = f64->f64_max(xv, C);
        }
        if (f64 == nullptr) {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t v = xc(c);
            st.m = v > st.m ? v : st.m;
          }
        }
        // Summed in double: one float accumulator over a 50k-class row drifts by ~1e-5 (the SIMD paths keep
        // one per lane, and stay at float accuracy).
        double s_sum = 0, A_sum = 0, D_sum = 0;
        if constexpr (std::is_same_v<scalar_t, double>) {
          if (f64 != nullptr) s_sum = f64->f64_sum_exp(xv, C, st.m);
        }
        for (int64_t c = 0; c < C && (f64 == nullptr || spread); ++c) {
          const acc_t v = xc(c);
          if (f64 == nullptr) s_sum += std::exp(v - st.m);
          if (spread) {
            const acc_t a = ac(c);
            A_sum += a;
            D_sum += a * (st.m - v);
          }
        }
        st.s = static_cast<acc_t>(s_sum), st.A = static_cast<acc_t>(A_sum), st.D = static_cast<acc_t>(D_sum);
        const acc_t log_s = std::log(st.s);
        if (!kGrad) stats.max[r] = st.m, stats.sum[r] = st.s;
        base = st.m, q = st.s;  // not the lse: m + log(s) drops log(s) once |m| >> 1 (1e30 + log 2 == 1e30)
        loss_out[r] = row_loss<kProb>(st, log_s, kProb ? acc_t(0) : xc(t), w_t, P.eps, C);
      } else {
        base = stats.max[r], q = stats.sum[r];
        if (kProb) {
          double A_sum = 0;
          for (int64_t c = 0; c < C; ++c) A_sum += ac(c);
          st.A = static_cast<acc_t>(A_sum);
        }
      }
      if (kGrad) {
        const acc_t f = factor.at(b, s);
        RowGrad<acc_t> g = kProb ? RowGrad<acc_t>::prob(f, st.A) : RowGrad<acc_t>::index(f, w_t, W, P.eps, C);
        g.p_mul /= q;
        if constexpr (std::is_same_v<scalar_t, double>) {
          if (f64 != nullptr) {  // g.at's operations in its order: p * p_mul, then - a_c * c_mul, then - t_sub
            double* gv = g_copied ? g_row.data() : gr;
            f64->f64_exp_scale(xv, gv, C, base, g.p_mul);
            if (spread)
              for (int64_t c = 0; c < C; ++c) gv[c] = gv[c] - ac(c) * g.c_mul;
            if (!kProb) gv[t] = gv[t] - g.t_sub;
            if (g_copied)
              for (int64_t c = 0; c < C; ++c) gr[c * L.g_sC] = gv[c];
            continue;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          const acc_t p = std::exp(xc(c) - base);
          gr[c * L.g_sC] = static_cast<scalar_t>(g.at(p, (kProb || P.eps != acc_t(0)) ? ac(c) : acc_t(0), c == t));
        }
      }
    }
  });
}

// Cold path: name the first offending target in row order, as PyTorch's message does.
void raise_bad_target(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const auto flat = target.reshape(-1);
  const int64_t* t = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i)
    TORCH_CHECK_INDEX(t[i] == ignore_index || !target_out_of_range(t[i], C), "Target ", t[i], " is out of bounds.");
  TORCH_CHECK(false, "softmax_ce_ext: an out-of-range target was flagged but not found");
}

// Transposed rows of more classes than this are staged row-major by W-row blocks (a.staged); fewer, the column
// blocks take them as they lie (measured 2026-11-28, 2 threads, medians of 41, staged against the column blocks:
// 4096x4096 float32 fwd 2x, fwd+bwd 1.4x; 2048x32000 1.3-1.4x; 2048x2048 1.25x; 4096x1000 1.05-1.2x, bfloat16
// fwd+bwd 1.15-1.5x; 1024x300 forward 1.5-2.3x slower, each row its own chain of latencies).
constexpr int64_t kStagedFrom = 512;

// Whether row (b, s) of the logits, targets, gradient and factor sits at (b * S + s) times the positions' stride:
// the batch dimension continues the positions (or there is one batch), so the rows form one (B*S, C) matrix.
bool batch_spans_positions(const RowLayout& L, const SimdArgs& a, bool grad) {
  auto spans = [&](int64_t sB, int64_t sS) { return L.B == 1 || sB == L.S * sS; };
  return spans(L.x_sB, L.x_sS) && spans(L.t_sB, L.t_sS) && (!grad || (spans(L.g_sB, L.g_sS) && spans(a.f_sB, a.f_sS)));
}

// The vectorised path, when the instruction set, dtype and layout allow: rows whose classes are contiguous,
// or (K-dim inputs) blocks of contiguous positions.  Returns false to leave the work to the portable kernel.
template <typename scalar_t, bool kStats, bool kGrad, bool kProb>
bool launch_simd(const RowLayout& L, OpTensors& o, std::atomic<bool>& bad) {
  const SimdKernels* k = current_isa().load();
  if (k == nullptr || L.C == 0) return false;  // no classes (probability targets): the portable kernel's zeros
  const bool rows = L.x_sC == 1 && (!kGrad || L.g_sC == 1) && (!kProb || L.t_sC == 1);
  // Transposed (N, C) logits (the batch dimension contiguous: `logits.t()`, as CLIP's symmetric loss passes
  // them): the rows are the positions of one K-dim item, taken W at a time by the column blocks.
  const bool transposed = !rows && L.S == 1 && L.B > 1 && L.x_sB == 1 && (!kGrad || L.g_sB == 1) &&
                          (!kProb || L.t_sB == 1);
  const bool columns = !rows && ((L.S > 1 && L.x_sS == 1 && (!kGrad || L.g_sS == 1) && (!kProb || L.t_sS == 1)) ||
                                 transposed);
  if (!rows && !columns) return false;
  SimdArgs a{};
  a.dtype = std::is_same_v<scalar_t, float>       ? SimdDtype::kFloat
            : std::is_same_v<scalar_t, at::BFloat16> ? SimdDtype::kBFloat16
                                                     : SimdDtype::kHalf;
  a.stats = kStats;
  a.grad = kGrad;
  a.x = o.logits.data_ptr();
  a.g = kGrad ? o.grad.data_ptr() : nullptr;
  a.target = kProb ? nullptr : o.target.data_ptr<int64_t>();
  a.prob = kProb ? o.target.data_ptr() : nullptr;
  a.prob_float = kProb && o.target.scalar_type() == at::kFloat;
  a.weight = o.weight.defined() ? o.weight.data_ptr<float>() : nullptr;
  a.weight_sum = o.weight_sum.defined() ? o.weight_sum.item<float>() : static_cast<float>(L.C);
  a.eps = static_cast<float>(o.eps);
  a.ignore_index = o.ignore_index;
  a.loss = kStats ? o.loss.data_ptr<float>() : nullptr;
  const StatsPtrs<float> stats = stats_ptrs<float>(o);  // none in the training pass
  a.row_max = stats.max, a.row_sum = stats.sum;
  if (kGrad) {
    a.factor = o.factor.data_ptr<float>();
    a.f_sB = o.factor.dim() ? o.factor.stride(0) : 0;
    a.f_sS = o.factor.dim() ? o.factor.stride(1) : 0;
  }
  a.B = L.B, a.C = L.C, a.S = L.S;
  a.x_sB = L.x_sB, a.x_sC = L.x_sC, a.x_sS = L.x_sS, a.t_sB = L.t_sB, a.t_sC = L.t_sC, a.t_sS = L.t_sS;
  a.g_sB = L.g_sB, a.g_sC = L.g_sC, a.g_sS = L.g_sS;
  int flag = 0;
  a.bad = &flag;
  if (transposed) {  // (N, C, 1) as (1, C, N): the loss and stats rows, indexed b * S + s, stay where they were
    a.S = L.B, a.B = 1;
    a.x_sS = L.x_sB, a.t_sS = L.t_sB, a.g_sS = L.g_sB, a.f_sS = a.f_sB;
    a.x_sB = a.t_sB = a.g_sB = a.f_sB = 0;
    a.staged = !kProb && L.C > kStagedFrom;
  }
  if (rows && L.S > 1 && !kProb && batch_spans_positions(L, a, kGrad)) {
    // Channels-last K-dim logits (each position a row of contiguous classes, the batch continuing the positions'
    // stride): one (B*S, C) matrix, so the 16-row blocks below take short rows (8x21x256x256 float32: 5x).
    a.B = L.B * L.S, a.S = 1;
    a.x_sB = L.x_sS, a.t_sB = L.t_sS, a.g_sB = L.g_sS, a.f_sB = a.f_sS;
    a.x_sS = a.t_sS = a.g_sS = a.f_sS = 0;
  }
  // Rows of few classes, one position each (classification): width rows per item, one per lane.
  const bool small = !kProb && rows && a.S == 1 && L.C >= 1 && L.C <= small_row_classes(sizeof(scalar_t)) &&
                     k->small_rows != nullptr;
  const int64_t work = std::max<int64_t>(L.C, 1) * (rows && !small ? 1 : k->width);  // elements per item
  const int64_t items = small  ? (a.B + k->width - 1) / k->width
                        : rows ? L.rows()
                               : a.B * ((a.S + k->width - 1) / k->width);
  auto fn = small ? k->small_rows : rows ? k->rows : k->columns;
  at::parallel_for(0, items, std::max<int64_t>(1, 32768 / work), [&](int64_t b, int64_t e) { fn(a, b, e); });
  if (__atomic_load_n(&flag, __ATOMIC_RELAXED)) bad.store(true);
  return true;
}

template <typename scalar_t, typename target_t, bool kStats, bool kGrad, bool kProb>
void launch_typed(const RowLayout& L, OpTensors& o, std::atomic<bool>& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (launch_simd<scalar_t, kStats, kGrad, kProb>(L, o, bad)) return;
  }
  const auto P = row_params<scalar_t, acc_t, target_t>(o, kProb);
  const Factor<acc_t> f = factor_of<acc_t>(o);
  ce_rows<scalar_t, acc_t, target_t, kStats, kGrad, kProb>(o.logits.data_ptr<scalar_t>(), L, P,
                                                 kStats ? o.loss.data_ptr<acc_t>() : nullptr, stats_ptrs<acc_t>(o),
                                                 kGrad ? o.grad.data_ptr<scalar_t>() : nullptr, f, bad);
}

template <typename scalar_t, typename target_t, bool kProb>
void launch_modes(Mode mode, const RowLayout& L, OpTensors& o, std::atomic<bool>& bad) {
  switch (mode) {
    case Mode::kStats: return launch_typed<scalar_t, target_t, true, false, kProb>(L, o, bad);
    case Mode::kStatsGrad: return launch_typed<scalar_t, target_t, true, true, kProb>(L, o, bad);
    case Mode::kGrad: return launch_typed<scalar_t, target_t, false, true, kProb>(L, o, bad);
  }
}

// Probability targets come in the logits' dtype or in the accumulation dtype (no rounding of float32 targets).
void launch_dtypes(Mode mode, const RowLayout& L, OpTensors& o, std::atomic<bool>& bad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.logits.scalar_type(), "softmax_ce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!o.target.is_floating_point())
      launch_modes<scalar_t, scalar_t, false>(mode, L, o, bad);
    else if (o.target.scalar_type() == o.logits.scalar_type())
      launch_modes<scalar_t, scalar_t, true>(mode, L, o, bad);
    else
      launch_modes<scalar_t, acc_t, true>(mode, L, o, bad);
  });
}

at::Tensor sum_rows_cpu(const at::Tensor& values, const c10::optional<at::Tensor>& divisor,
                        c10::optional<at::ScalarType> dtype);

void launch_cpu(Mode mode, const RowLayout& L, OpTensors& o) {
  const bool sum = sum_only(mode, o);
  if (sum) row_outputs(mode, o);
  std::atomic<bool> bad{false};
  launch_dtypes(mode, L, o, bad);
  if (bad.load()) raise_bad_target(o.target, L.C, o.ignore_index);
  if (sum) {  // the divisor and the dtype folded in, as on CUDA
    const c10::optional<at::Tensor> divisor =
        o.loss_divisor.defined() ? c10::optional<at::Tensor>(o.loss_divisor) : c10::nullopt;
    o.loss_sum = sum_rows_cpu(o.loss, divisor, o.loss_dtype);
    o.loss_finished = true;
  }
}

// Gradient buffers of many MiB: in 2 MiB pages, and kept for reuse once freed.  A fresh buffer costs a page
// fault per page touched plus the kernel's zeroing, which for an LLM-sized gradient takes longer than the
// whole kernel; a training loop frees each step's gradient (zero_grad) and asks for the same size again.
// At most kCacheBlocks freed blocks are kept, the most recently freed (SOFTMAX_CE_CPU_GRAD_CACHE=0: none);
// empty_grad_cache() drops them.  A request takes the smallest kept block that holds it, if at most twice its
// size (a batch of another length reuses the last one's block).
class GradBlockCache {
 public:
  struct Block {
    void* p;
    size_t len;
  };
  static GradBlockCache& get() {
    static GradBlockCache* cache = new GradBlockCache();  // never destroyed: deleters may run at exit
    return *cache;
  }
  Block take(size_t len) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->len >= len && it->len / 2 <= len && (best == free_.end() || it->len < best->len)) best = it;
    if (best == free_.end()) return {nullptr, 0};
    const Block b = *best;
    free_.erase(best);
    return b;
  }
  void give(void* p, size_t len) {
    void* drop = p;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (enabled_) {
        // Full: the oldest goes (it kept a size a loop that moved on no longer asks for: each new size
        // then faulted in a fresh buffer per call, 512x32000 float32 fwd+bwd 14 -> 120 ms here).
        drop = free_.size() < kCacheBlocks ? nullptr : free_.front().p;
        if (drop != nullptr) free_.erase(free_.begin());
        free_.push_back({p, len});
      }
    }
    std::free(drop);
  }
  std::vector<int64_t> sizes() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<int64_t> out;
    for (const Block& b : free_) out.push_back(static_cast<int64_t>(b.len));
    return out;
  }
  void clear() {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
    }
    for (auto& block : drop) std::free(block.p);
  }

 private:
  static constexpr size_t kCacheBlocks = 2;
  GradBlockCache() {
    const char* env = std::getenv("SOFTMAX_CE_CPU_GRAD_CACHE");
    enabled_ = !(env && std::string(env) == "0");
  }
  std::mutex mu_;
  std::vector<Block> free_;
  bool enabled_ = true;
};

at::Tensor grad_alloc_cpu(const at::Tensor& logits) {
#if defined(__linux__)
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(logits.numel()) * logits.element_size();
  // Dense layouts of any order (channels-last too): the block takes the logits' strides, as empty_like would.
  if (logits.is_non_overlapping_and_dense() && bytes >= 4 * kHuge) {
    const size_t want = (bytes + kHuge - 1) / kHuge * kHuge;
    GradBlockCache::Block b = GradBlockCache::get().take(want);
    if (b.p == nullptr) {
      b.len = want;
      if (posix_memalign(&b.p, kHuge, want) == 0)
        madvise(b.p, want, MADV_HUGEPAGE);  // a hint: without transparent huge pages they are simply 4 KiB
      else
        b.p = nullptr;
    }
    if (b.p != nullptr) {
      const size_t len = b.len;
      return at::from_blob(b.p, logits.sizes(), logits.strides(), [len](void* q) { GradBlockCache::get().give(q, len); },
                           logits.options());
    }
  }
#endif
  return at::empty_like(logits, at::MemoryFormat::Preserve);
}

void scale_grad_cpu(const at::Tensor& grad, const at::Tensor& grad_output,
                    const c10::optional<at::Tensor>& grad_mul_used, const c10::optional<at::Tensor>& predictor,
                    const c10::optional<at::Tensor>& changes) {
  check_scale_grad(grad, grad_output, grad_mul_used, predictor, changes);
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(grad.scalar_type()), "scale_grad_cpu", [&] {
    using acc_t = scalar_t;
    // host memory: reading them costs no synchronisation; g in the accumulation dtype, as CUDA's kernel reads it
    const acc_t g = static_cast<acc_t>(grad_output.item<double>());
    const acc_t used = grad_mul_used.has_value() ? *grad_mul_used->data_ptr<acc_t>() : acc_t(1);
    if (predictor.has_value())
      update_predictor(predictor->data_ptr<acc_t>(), g, changes.has_value() ? changes->data_ptr<int64_t>() : nullptr);
    if (g == used) return;
    const acc_t r = g / used;
    const SimdKernels* k = current_isa().load();
    const auto dt = grad.scalar_type();
    if (k != nullptr && k->scale != nullptr && grad.is_non_overlapping_and_dense() &&
        (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf)) {  // float accumulation
      // a dense block of numel elements from data_ptr, whatever the strides' order
      const SimdDtype sd = dt == at::kFloat ? SimdDtype::kFloat : dt == at::kBFloat16 ? SimdDtype::kBFloat16
                                                                                      : SimdDtype::kHalf;
      char* base = static_cast<char*>(grad.data_ptr());
      const int64_t es = grad.element_size();
      at::parallel_for(0, grad.numel(), int64_t{1} << 16, [&](int64_t b, int64_t e) {
        k->scale(sd, base + b * es, e - b, static_cast<float>(r));
      });
    } else if (dt == at::kBFloat16 || dt == at::kHalf) {  // ATen rounds the scalar to the 2-byte dtype first
      grad.copy_(grad.to(at::kFloat).mul_(static_cast<double>(r)));
    } else {
      grad.mul_(static_cast<double>(r));
    }
  });
}

// Fixed blocks summed in parallel, then the block sums in order, all in double: the same bits on any number
// of threads (at::sum's split depends on it).  The division and the cast are done here, in the values' dtype
// then one rounding to dtype, as ATen's ops would (two dispatches fewer per call: small calls are host time).
at::Tensor sum_rows_cpu(const at::Tensor& values, const c10::optional<at::Tensor>& divisor,
                        c10::optional<at::ScalarType> dtype) {
  check_loss_finish(divisor, dtype, values.scalar_type(), values.device(), "sum_rows");
  const at::Tensor dense = values.contiguous();
  constexpr int64_t kBlock = 4096;
  const int64_t n = dense.numel(), blocks = (n + kBlock - 1) / kBlock;
  at::Tensor out = at::empty({}, values.options().dtype(dtype.value_or(values.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "sum_rows_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* v = dense.data_ptr<acc_t>();
    std::vector<double> partial(blocks, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double s = 0;
        for (int64_t i = b * kBlock, e = std::min(n, i + kBlock); i < e; ++i) s += v[i];
        partial[b] = s;
      }
    });
    double total = 0;
    for (double p : partial) total += p;
    acc_t loss = static_cast<acc_t>(total);
    if (divisor.has_value()) loss = loss / *divisor->data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sum_rows_cpu", [&] {
      *out.data_ptr<scalar_t>() = static_cast<scalar_t>(loss);
    });
  });
  return out;
}

// Fixed blocks of targets, each summed in order, then the blocks in order: independent of the thread count.
// {denominator, 1 / denominator} of reduction='mean' in `dtype`: the count of the targets that are not
// ignore_index, or their summed class weight (rounded to the weight's dtype first, as a weight-dtype sum would be).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mean_scale_cpu(const at::Tensor& target,
                                                              const c10::optional<at::Tensor>& weight,
                                                              int64_t ignore_index, at::ScalarType dtype,
                                                              const at::Tensor& numerator) {
  check_mean_scale(target, weight, dtype);
  constexpr int64_t kBlock = 4096;
  const IndexRows rows = index_rows(target);  // no structured bindings: lambdas capture these (C++17)
  const int64_t B = rows.B, S = rows.S, sB = rows.sB, sS = rows.sS;
  const int64_t n = B * S, blocks = (n + kBlock - 1) / kBlock;
  const int64_t* t = target.data_ptr<int64_t>();
  const bool dense = sS == 1 && sB == S;
  auto target_at = [&](int64_t i) { return dense ? t[i] : t[(i / S) * sB + (i % S) * sS]; };  // dense: no division
  at::Tensor denom = at::empty({}, target.options().dtype(dtype)), inv = at::empty({}, target.options().dtype(dtype));
  at::Tensor used = at::empty({}, target.options().dtype(dtype));
  auto write = [&](auto total) {  // {d, m / d, m}: m the numerator's value (its dtype is dtype), else 1
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mean_scale_cpu", [&] {
      const scalar_t d = static_cast<scalar_t>(total);
      const scalar_t m = numerator.defined() ? *numerator.data_ptr<scalar_t>() : scalar_t(1);
      *denom.data_ptr<scalar_t>() = d;
      *inv.data_ptr<scalar_t>() = static_cast<scalar_t>(m / d);
      *used.data_ptr<scalar_t>() = m;
    });
  };
  if (!weight.has_value()) {
    std::vector<int64_t> partial(blocks, 0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t k = b0; k < b1; ++k)
        for (int64_t i = k * kBlock, e = std::min(n, i + kBlock); i < e; ++i)
          partial[k] += target_at(i) != ignore_index;
    });
    int64_t total = 0;
    for (int64_t p : partial) total += p;
    write(total);
    return {denom, inv, used};
  }
  std::vector<double> partial(blocks, 0.0);
  const int64_t C = weight->numel();
  AT_DISPATCH_FLOATING_TYPES(weight->scalar_type(), "mean_scale_cpu", [&] {
    const scalar_t* w = weight->data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t k = b0; k < b1; ++k)
        for (int64_t i = k * kBlock, e = std::min(n, i + kBlock); i < e; ++i) {
          const int64_t c = target_at(i);
          if (c != ignore_index && c >= 0 && c < C) partial[k] += w[c];
        }
    });
    double total = 0;
    for (double p : partial) total += p;
    write(static_cast<scalar_t>(total));
  });
  return {denom, inv, used};
}

bool no_fold(const RowLayout&, OpTensors&) { return false; }  // the CPU counts the denominator first

// The CPU's parts of the ops (softmax_ce_register.h builds the ops from them).
struct CpuParts {
  static constexpr auto launch = &launch_cpu;
  static constexpr auto mean_scale = &mean_scale_cpu;
  static constexpr auto fold = &no_fold;
  static constexpr GradAlloc grad_alloc = &grad_alloc_cpu;  // 2 MiB pages, blocks reused
  static constexpr auto scale_grad = &scale_grad_cpu;
  static constexpr auto sum_rows = &sum_rows_cpu;
};

}  // namespace

void empty_grad_cache() { GradBlockCache::get().clear(); }
std::vector<int64_t> grad_cache_sizes() { return GradBlockCache::get().sizes(); }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (const char* name : {"avx512", "avx2", "baseline", "generic"})
    if (cpu_can(name)) out.emplace_back(name);
  return out;
}

std::string cpu_isa() {
  const SimdKernels* k = current_isa().load();
  return k ? k->name : "generic";
}

std::string set_cpu_isa(const std::string& name) {
  TORCH_CHECK_VALUE(cpu_can(name), "set_cpu_isa: expected one of this CPU's instruction sets (",
                    c10::Join(", ", cpu_isas()), "), got '", name, "'");
  std::string previous = cpu_isa();
  current_isa().store(isa_kernels(name));
  return previous;
}

TORCH_LIBRARY_IMPL(softmax_ce_ext, CPU, m) { register_backend<CpuParts>(m); }

}  // namespace softmax_ce
