// One backend's ops, the shared op bodies of softmax_ce.h over that backend's parts: each backend file defines its
// parts and calls register_backend<Parts>(m) in its own TORCH_LIBRARY_IMPL.  Host compiler only (torch/library.h).
#pragma once
#include <torch/library.h>

#include <tuple>

#include "softmax_ce.h"

namespace softmax_ce {

// Parts: launch(mode, L, o); mean_scale(target, weight, ignore_index, dtype, m) -> (d, m / d, m as read; m
// undefined: 1); fold(L, o) (counts the mean's denominator in its own pass, or returns false having launched
// nothing); grad_alloc (nullptr: at::empty_like); scale_grad(grad, grad_output, grad_mul_used, predictor, changes);
// sum_rows(values, divisor, dtype).
template <typename Parts>
struct BackendOps {
  using Tensor = at::Tensor;
  using OptTensor = c10::optional<at::Tensor>;
  using OptDtype = c10::optional<at::ScalarType>;

  static std::tuple<Tensor, Tensor> forward_rows(const Tensor& logits, const Tensor& target, const OptTensor& weight,
                                                 int64_t ignore_index, double eps, const OptTensor& status) {
    return forward_rows_op(Parts::launch, logits, target, weight, ignore_index, eps, status);
  }

  static std::tuple<Tensor, Tensor> forward_backward(const Tensor& logits, const Tensor& target,
                                                     const OptTensor& weight, int64_t ignore_index, double eps,
                                                     const Tensor& grad_scale, const OptTensor& status,
                                                     const OptTensor& loss_divisor, OptDtype loss_dtype) {
    return forward_backward_op(Parts::launch, logits, target, weight, ignore_index, eps, grad_scale, status,
                               loss_divisor, loss_dtype, Parts::grad_alloc);
  }

  static Tensor forward_backward_inplace(const Tensor& logits, const Tensor& target, const OptTensor& weight,
                                         int64_t ignore_index, double eps, const Tensor& grad_scale,
                                         const OptTensor& status, const OptTensor& loss_divisor,
                                         OptDtype loss_dtype) {
    return std::get<0>(forward_backward_op(Parts::launch, logits, target, weight, ignore_index, eps, grad_scale,
                                           status, loss_divisor, loss_dtype, nullptr, /*inplace=*/true));
  }

  static Tensor backward(const Tensor& grad_rows, const Tensor& logits, const Tensor& target,
                         const OptTensor& weight, const Tensor& stats, int64_t ignore_index, double eps) {
    return backward_op(Parts::launch, grad_rows, logits, target, weight, stats, ignore_index, eps, Parts::grad_alloc);
  }

  static void backward_inplace(const Tensor& grad_rows, const Tensor& logits, const Tensor& target,
                               const OptTensor& weight, const Tensor& stats, int64_t ignore_index, double eps) {
    backward_op(Parts::launch, grad_rows, logits, target, weight, stats, ignore_index, eps, nullptr, /*inplace=*/true);
  }

  static Tensor forward_sum(const Tensor& logits, const Tensor& target, const OptTensor& weight, int64_t ignore_index,
                            double eps, const OptTensor& status, const OptTensor& loss_divisor, OptDtype loss_dtype) {
    return forward_sum_op(Parts::launch, logits, target, weight, ignore_index, eps, status, loss_divisor, loss_dtype);
  }

  static std::tuple<Tensor, Tensor> mean_forward(const Tensor& logits, const Tensor& target, const OptTensor& weight,
                                                 int64_t ignore_index, double eps, const OptTensor& status,
                                                 OptDtype loss_dtype) {
    return mean_forward_op(Parts::launch, Parts::mean_scale, logits, target, weight, ignore_index, eps, status,
                           loss_dtype);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor> mean_forward_backward(
      const Tensor& logits, const Tensor& target, const OptTensor& weight, int64_t ignore_index, double eps,
      const OptTensor& status, OptDtype loss_dtype, const OptTensor& grad_mul) {
    return mean_forward_backward_op(Parts::launch, Parts::mean_scale, Parts::fold, logits, target, weight,
                                    ignore_index, eps, status, loss_dtype, grad_mul, Parts::grad_alloc);
  }

  static std::tuple<Tensor, Tensor, Tensor> mean_forward_backward_inplace(
      const Tensor& logits, const Tensor& target, const OptTensor& weight, int64_t ignore_index, double eps,
      const OptTensor& status, OptDtype loss_dtype, const OptTensor& grad_mul) {
    auto [loss, grad, denom, used] = mean_forward_backward_op(Parts::launch, Parts::mean_scale, Parts::fold, logits,
                                                              target, weight, ignore_index, eps, status, loss_dtype,
                                                              grad_mul, nullptr, /*inplace=*/true);
    return {loss, denom, used};
  }

  // The op mean_scale: (d, 1 / d).
  static std::tuple<Tensor, Tensor> mean_scale(const Tensor& target, const OptTensor& weight, int64_t ignore_index,
                                               at::ScalarType dtype) {
    auto [d, inv, used] = Parts::mean_scale(target, weight, ignore_index, dtype, Tensor());
    return {d, inv};
  }
};

template <typename Parts>
void register_backend(torch::Library& m) {
  using Ops = BackendOps<Parts>;
  m.impl("forward_rows", &Ops::forward_rows);
  m.impl("forward_backward", &Ops::forward_backward);
  m.impl("backward", &Ops::backward);
  m.impl("forward_backward_", &Ops::forward_backward_inplace);
  m.impl("backward_", &Ops::backward_inplace);
  m.impl("scale_grad_", Parts::scale_grad);
  m.impl("sum_rows", Parts::sum_rows);
  m.impl("mean_scale", &Ops::mean_scale);
  m.impl("forward_sum", &Ops::forward_sum);
  m.impl("mean_forward", &Ops::mean_forward);
  m.impl("mean_forward_backward", &Ops::mean_forward_backward);
  m.impl("mean_forward_backward_", &Ops::mean_forward_backward_inplace);
}

}  // namespace softmax_ce
