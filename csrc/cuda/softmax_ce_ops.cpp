// The CUDA dispatch key's ops: the shared op bodies of softmax_ce.h over launch_cuda (softmax_ce_kernel.cu).
// A C++ file, not CUDA: torch/library.h costs nvcc ~35 s per architecture pass, the host compiler one parse.
#include <torch/library.h>

#include <tuple>

#include "softmax_ce_launch.cuh"

namespace softmax_ce {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                double eps, const c10::optional<at::Tensor>& status) {
  return forward_op(launch_cuda, logits, target, weight, ignore_index, eps, status);
}

std::tuple<at::Tensor, at::Tensor> forward_backward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                         const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                         double eps, const at::Tensor& grad_scale,
                                                         const c10::optional<at::Tensor>& status,
                                                         const c10::optional<at::Tensor>& loss_divisor,
                                                         c10::optional<at::ScalarType> loss_dtype) {
  return forward_backward_op(launch_cuda, logits, target, weight, ignore_index, eps, grad_scale, status,
                             loss_divisor, loss_dtype);
}

at::Tensor backward_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                         const c10::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                         double eps) {
  return backward_op(launch_cuda, grad_rows, logits, target, weight, lse, ignore_index, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mean_forward_backward_cuda(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t ignore_index,
    double eps, const c10::optional<at::Tensor>& status, c10::optional<at::ScalarType> loss_dtype) {
  return mean_forward_backward_op(launch_cuda, mean_scale_cuda, fold_mean_cuda, logits, target, weight, ignore_index,
                                  eps, status, loss_dtype);
}

at::Tensor forward_sum_cuda(const at::Tensor& logits, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                            const c10::optional<at::Tensor>& status, const c10::optional<at::Tensor>& loss_divisor,
                            c10::optional<at::ScalarType> loss_dtype) {
  return forward_sum_op(launch_cuda, logits, target, weight, ignore_index, eps, status, loss_divisor, loss_dtype);
}

std::tuple<at::Tensor, at::Tensor> mean_forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                     const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                     double eps, const c10::optional<at::Tensor>& status,
                                                     c10::optional<at::ScalarType> loss_dtype) {
  return mean_forward_op(launch_cuda, mean_scale_cuda, logits, target, weight, ignore_index, eps, status, loss_dtype);
}

std::tuple<at::Tensor, at::Tensor> mean_forward_backward_inplace_cuda(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t ignore_index,
    double eps, const c10::optional<at::Tensor>& status, c10::optional<at::ScalarType> loss_dtype) {
  auto [loss, grad, denom] = mean_forward_backward_op(launch_cuda, mean_scale_cuda, fold_mean_cuda, logits, target,
                                                      weight, ignore_index, eps, status, loss_dtype, nullptr,
                                                      /*inplace=*/true);
  return {loss, denom};
}

at::Tensor forward_backward_inplace_cuda(const at::Tensor& logits, const at::Tensor& target,
                                        const c10::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                                        const at::Tensor& grad_scale, const c10::optional<at::Tensor>& status,
                                        const c10::optional<at::Tensor>& loss_divisor,
                                        c10::optional<at::ScalarType> loss_dtype) {
  return std::get<0>(forward_backward_op(launch_cuda, logits, target, weight, ignore_index, eps, grad_scale, status,
                                         loss_divisor, loss_dtype, nullptr, /*inplace=*/true));
}

void backward_inplace_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                         const c10::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                         double eps) {
  backward_op(launch_cuda, grad_rows, logits, target, weight, lse, ignore_index, eps, nullptr, /*inplace=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce_ext, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("forward_backward", &forward_backward_cuda);
  m.impl("backward", &backward_cuda);
  m.impl("forward_backward_", &forward_backward_inplace_cuda);
  m.impl("backward_", &backward_inplace_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
  m.impl("sum_rows", &sum_rows_cuda);
  m.impl("mean_scale", &mean_scale_cuda);
  m.impl("forward_sum", &forward_sum_cuda);
  m.impl("mean_forward", &mean_forward_cuda);
  m.impl("mean_forward_backward", &mean_forward_backward_cuda);
  m.impl("mean_forward_backward_", &mean_forward_backward_inplace_cuda);
}

}  // namespace softmax_ce
