// CPU kernels: rows in parallel, each row's max / sum-exp / loss / gradient from one read of it
// (the later sweeps of a row hit the cache).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <vector>

#include "../softmax_ce.h"

namespace softmax_ce {
namespace {

// Upstream factor per row: a 0-d tensor broadcast (strides 0) or a (B, S) tensor.
template <typename acc_t>
struct Factor {
  const acc_t* p;
  int64_t sB, sS;
  acc_t at(int64_t b, int64_t s) const { return p[b * sB + s * sS]; }
};

// kStats: compute lse and the loss from the logits; otherwise read lse.  kGrad: write the gradient.
// kProb: probability targets (B, C, S); otherwise class indices (B, S).
template <typename scalar_t, typename acc_t, typename target_t, bool kStats, bool kGrad, bool kProb>
void ce_rows(const scalar_t* x, const RowLayout& L, const RowParams<scalar_t, acc_t, target_t>& P, acc_t* loss_out,
             acc_t* lse_io, scalar_t* grad, Factor<acc_t> factor, std::atomic<bool>& bad) {
  const int64_t C = L.C, S = L.S;
  const acc_t W = P.weight ? *P.weight_sum : acc_t(C);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const bool spread = kProb || P.eps != acc_t(0);  // the loss has a term over every class
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, L.rows(), grain, [&](int64_t begin, int64_t end) {
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
          if (kStats) loss_out[r] = lse_io[r] = ignored ? acc_t(0) : nan;
          if (kGrad)
            for (int64_t c = 0; c < C; ++c) gr[c * L.g_sC] = static_cast<scalar_t>(ignored ? acc_t(0) : nan);
          continue;
        }
      }
      const acc_t w_t = !kProb && P.weight ? P.weight[t] : acc_t(1);
      RowStats<acc_t> st{-std::numeric_limits<acc_t>::infinity(), 0, 0, 0};
      acc_t lse;
      if (kStats) {
        // NaN compares false, so it never becomes the max but poisons the sum, as in PyTorch.
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = xc(c);
          st.m = v > st.m ? v : st.m;
        }
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = xc(c);
          st.s += std::exp(v - st.m);
          if (spread) {
            const acc_t a = ac(c);
            st.A += a;
            st.D += a * (st.m - v);
          }
        }
        lse = st.m + std::log(st.s);
        lse_io[r] = lse;
        loss_out[r] = row_loss<kProb>(st, lse, kProb ? acc_t(0) : xc(t), w_t, P.eps, C);
      } else {
        lse = lse_io[r];
        if (kProb)
          for (int64_t c = 0; c < C; ++c) st.A += ac(c);
      }
      if (kGrad) {
        const acc_t f = factor.at(b, s);
        const RowGrad<acc_t> g = kProb ? RowGrad<acc_t>::prob(f, st.A) : RowGrad<acc_t>::index(f, w_t, W, P.eps, C);
        for (int64_t c = 0; c < C; ++c) {
          const acc_t p = std::exp(xc(c) - lse);
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

template <typename scalar_t, typename target_t, bool kStats, bool kGrad, bool kProb>
void launch_typed(const RowLayout& L, const OpTensors& o, std::atomic<bool>& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowParams<scalar_t, acc_t, target_t> P{kProb ? nullptr : o.target.data_ptr<int64_t>(),
                                               kProb ? o.target.data_ptr<target_t>() : nullptr,
                                     o.weight.defined() ? o.weight.data_ptr<acc_t>() : nullptr,
                                     o.weight_sum.defined() ? o.weight_sum.data_ptr<acc_t>() : nullptr,
                                     o.ignore_index,
                                     static_cast<acc_t>(o.eps),
                                     nullptr};
  Factor<acc_t> f{nullptr, 0, 0};
  if (kGrad)
    f = {o.factor.data_ptr<acc_t>(), o.factor.dim() ? o.factor.stride(0) : 0, o.factor.dim() ? o.factor.stride(1) : 0};
  ce_rows<scalar_t, acc_t, target_t, kStats, kGrad, kProb>(o.logits.data_ptr<scalar_t>(), L, P,
                                                 kStats ? o.loss.data_ptr<acc_t>() : nullptr, o.lse.data_ptr<acc_t>(),
                                                 kGrad ? o.grad.data_ptr<scalar_t>() : nullptr, f, bad);
}

template <typename scalar_t, typename target_t, bool kProb>
void launch_modes(Mode mode, const RowLayout& L, const OpTensors& o, std::atomic<bool>& bad) {
  switch (mode) {
    case Mode::kStats: return launch_typed<scalar_t, target_t, true, false, kProb>(L, o, bad);
    case Mode::kStatsGrad: return launch_typed<scalar_t, target_t, true, true, kProb>(L, o, bad);
    case Mode::kGrad: return launch_typed<scalar_t, target_t, false, true, kProb>(L, o, bad);
  }
}

// Probability targets come in the logits' dtype or in the accumulation dtype (no rounding of float32 targets).
void launch_dtypes(Mode mode, const RowLayout& L, const OpTensors& o, std::atomic<bool>& bad) {
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

void launch_cpu(Mode mode, const RowLayout& L, const OpTensors& o) {
  std::atomic<bool> bad{false};
  launch_dtypes(mode, L, o, bad);
  if (bad.load()) raise_bad_target(o.target, L.C, o.ignore_index);
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                               const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                               double eps, const at::Tensor& status) {
  return forward_op(launch_cpu, logits, target, weight, ignore_index, eps, status);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_backward_cpu(const at::Tensor& logits,
                                                                    const at::Tensor& target,
                                                                    const c10::optional<at::Tensor>& weight,
                                                                    int64_t ignore_index, double eps,
                                                                    const at::Tensor& grad_scale,
                                                                    const at::Tensor& status) {
  return forward_backward_op(launch_cpu, logits, target, weight, ignore_index, eps, grad_scale, status);
}

at::Tensor backward_cpu(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                        const c10::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                        double eps) {
  return backward_op(launch_cpu, grad_rows, logits, target, weight, lse, ignore_index, eps);
}

void scale_grad_cpu(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_grad(grad, grad_output);
  const double g = grad_output.item<double>();  // host memory: reading it costs no synchronisation
  if (g != 1.0) grad.mul_(g);
}

// Fixed blocks summed in parallel, then the block sums in order, all in double: the same bits on any number
// of threads (at::sum's split depends on it).
at::Tensor sum_rows_cpu(const at::Tensor& values) {
  const at::Tensor flat = values.contiguous().view(-1);
  constexpr int64_t kBlock = 4096;
  const int64_t n = flat.numel(), blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "sum_rows_cpu", [&] {
    const scalar_t* v = flat.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double s = 0;
        for (int64_t i = b * kBlock, e = std::min(n, i + kBlock); i < e; ++i) s += v[i];
        partial[b] = s;
      }
    });
  });
  for (double p : partial) total += p;
  return at::scalar_tensor(total, flat.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce_ext, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("forward_backward", &forward_backward_cpu);
  m.impl("backward", &backward_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
  m.impl("sum_rows", &sum_rows_cpu);
}

}  // namespace softmax_ce
