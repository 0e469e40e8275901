// Shared by the CPU and CUDA kernels: the row layout and the per-row loss/gradient algebra.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace softmax_ce {

// Logits are viewed as (B, C, S): a row is one (b, s) pair, its C classes C-strided.
// (N, C) input: B = N, S = 1.  (N, C, d1..dk) input: B = N, S = d1*...*dk.
struct RowLayout {
  int64_t B, C, S;
  int64_t x_sB, x_sC, x_sS;  // logits strides, in elements
  int64_t t_sB, t_sS;        // target strides (0 for an expanded target)
  int64_t g_sB, g_sC, g_sS;  // gradient strides (the gradient is laid out like dense logits)
  C10_HOST_DEVICE int64_t rows() const { return B * S; }
};

// Everything a row needs besides its logits.  All pointers may be device pointers.
template <typename acc_t>
struct RowParams {
  const int64_t* target;
  const acc_t* weight;      // C class weights, or nullptr
  const acc_t* weight_sum;  // sum of weight (only read when smoothing and weight)
  int64_t ignore_index;
  acc_t eps;                // label smoothing, already clamped to [0, 1]
};

// Loss of one row from its statistics:
//   (1-eps) * w_t * (lse - x_t) + eps/C * (W * lse - sum_c w_c x_c)
// which is PyTorch's label-smoothed, weighted NLL of log_softmax (W = C, w = 1 unweighted).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t row_loss(acc_t lse, acc_t x_t, acc_t w_t, acc_t W, acc_t sum_wx, acc_t eps,
                                      int64_t C) {
  acc_t loss = w_t * (lse - x_t);
  if (eps == acc_t(0)) return loss;
  return (acc_t(1) - eps) * loss + eps / acc_t(C) * (W * lse - sum_wx);
}

// d loss / d x_c = f * (p_c * p_mul - w_c * c_mul - [c == t] * t_sub), f being the upstream factor.
template <typename acc_t>
struct RowGrad {
  acc_t p_mul, c_mul, t_sub;
  C10_HOST_DEVICE RowGrad(acc_t f, acc_t w_t, acc_t W, acc_t eps, int64_t C) {
    t_sub = f * (acc_t(1) - eps) * w_t;
    c_mul = eps == acc_t(0) ? acc_t(0) : f * eps / acc_t(C);
    p_mul = eps == acc_t(0) ? f * w_t : t_sub + c_mul * W;
  }
  C10_HOST_DEVICE acc_t at(acc_t p, acc_t w_c, bool is_target) const {
    acc_t g = p * p_mul - w_c * c_mul;
    return is_target ? g - t_sub : g;
  }
};

// A target outside [0, C) that is not ignore_index.
C10_HOST_DEVICE inline bool target_out_of_range(int64_t t, int64_t C) { return t < 0 || t >= C; }

// Validates the kernels' tensor contract and reads the layout off the tensors.
// logits: (B, C, S), any strides; target: (B, S) int64, any strides; weight: (C,) contiguous in acc dtype.
inline RowLayout check_and_layout(const at::Tensor& logits, const at::Tensor& target,
                                  const c10::optional<at::Tensor>& weight, const char* op) {
  TORCH_CHECK(logits.dim() == 3, op, ": expected logits viewed as (B, C, S), got ", logits.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": expected floating-point logits, got ",
              logits.scalar_type());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": expected int64 target, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == logits.size(0) && target.size(1) == logits.size(2), op,
              ": expected target of shape (", logits.size(0), ", ", logits.size(2), "), got ", target.sizes());
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(), " but logits on ",
              logits.device());
  if (weight.has_value()) {
    const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == logits.size(1) && weight->is_contiguous(), op,
                ": expected a contiguous weight of ", logits.size(1), " elements, got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == acc, op, ": expected weight in ", acc, ", got ", weight->scalar_type());
    TORCH_CHECK(weight->device() == logits.device(), op, ": weight is on ", weight->device(), " but logits on ",
                logits.device());
  }
  return RowLayout{logits.size(0),   logits.size(1),   logits.size(2),   logits.stride(0),
                   logits.stride(1), logits.stride(2), target.stride(0), target.stride(1),
                   0,                0,                0};
}

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---- Op bodies shared by the backends: checks and allocation here, the kernels behind `launch`. ----

enum class Mode { kStats, kStatsGrad, kGrad };  // loss+lse; loss+lse+grad; grad from a saved lse

// What a backend's launch(mode, layout, tensors) receives.  factor is the gradient's upstream multiplier:
// 0-d (broadcast to every row) or (B, S); both in the accumulation dtype.
struct OpTensors {
  at::Tensor logits, target, loss, lse, grad, factor, weight, weight_sum;
  int64_t ignore_index;
  double eps;
};

inline at::Tensor row_buffer(const at::Tensor& logits) {
  return at::empty({logits.size(0), logits.size(2)}, logits.options().dtype(acc_dtype(logits.scalar_type())));
}

// The gradient takes the logits' strides when they are dense (no copy-back for permuted inputs).
inline at::Tensor grad_like(const at::Tensor& logits, RowLayout& L) {
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Preserve);
  L.g_sB = grad.stride(0);
  L.g_sC = grad.stride(1);
  L.g_sS = grad.stride(2);
  return grad;
}

inline OpTensors op_tensors(const at::Tensor& logits, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, int64_t ignore_index, double eps) {
  OpTensors o;
  o.logits = logits;
  o.target = target;
  o.ignore_index = ignore_index;
  o.eps = eps;
  if (weight.has_value()) {
    o.weight = *weight;
    o.weight_sum = weight->sum();  // stays on the device: no synchronisation
  }
  return o;
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> forward_op(Launch launch, const at::Tensor& logits, const at::Tensor& target,
                                              const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                              double eps) {
  RowLayout L = check_and_layout(logits, target, weight, "forward");
  OpTensors o = op_tensors(logits, target, weight, ignore_index, eps);
  o.loss = row_buffer(logits);
  o.lse = row_buffer(logits);
  launch(Mode::kStats, L, o);
  return {o.loss, o.lse};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_backward_op(Launch launch, const at::Tensor& logits,
                                                                   const at::Tensor& target,
                                                                   const c10::optional<at::Tensor>& weight,
                                                                   int64_t ignore_index, double eps,
                                                                   const at::Tensor& grad_scale) {
  RowLayout L = check_and_layout(logits, target, weight, "forward_backward");
  const auto acc = acc_dtype(logits.scalar_type());
  TORCH_CHECK(grad_scale.dim() == 0 && grad_scale.scalar_type() == acc && grad_scale.device() == logits.device(),
              "forward_backward: expected a 0-d grad_scale in ", acc, " on ", logits.device(), ", got ",
              grad_scale.sizes(), " ", grad_scale.scalar_type(), " on ", grad_scale.device());
  OpTensors o = op_tensors(logits, target, weight, ignore_index, eps);
  o.loss = row_buffer(logits);
  o.lse = row_buffer(logits);
  o.grad = grad_like(logits, L);
  o.factor = grad_scale;
  launch(Mode::kStatsGrad, L, o);
  return {o.loss, o.lse, o.grad};
}

template <typename Launch>
at::Tensor backward_op(Launch launch, const at::Tensor& grad_rows, const at::Tensor& logits,
                       const at::Tensor& target, const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                       int64_t ignore_index, double eps) {
  RowLayout L = check_and_layout(logits, target, weight, "backward");
  const auto acc = acc_dtype(logits.scalar_type());
  TORCH_CHECK(grad_rows.sizes() == target.sizes() && grad_rows.scalar_type() == acc &&
                  grad_rows.device() == logits.device(),
              "backward: expected grad_rows of shape ", target.sizes(), " in ", acc, " on ", logits.device(),
              ", got ", grad_rows.sizes(), " ", grad_rows.scalar_type(), " on ", grad_rows.device());
  TORCH_CHECK(lse.sizes() == target.sizes() && lse.is_contiguous() && lse.scalar_type() == acc &&
                  lse.device() == logits.device(),
              "backward: expected a contiguous lse of shape ", target.sizes(), " in ", acc, " on ",
              logits.device(), ", got ", lse.sizes(), " ", lse.scalar_type(), " on ", lse.device());
  OpTensors o = op_tensors(logits, target, weight, ignore_index, eps);
  o.lse = lse;
  o.grad = grad_like(logits, L);
  o.factor = grad_rows;
  launch(Mode::kGrad, L, o);
  return o.grad;
}

inline void check_scale_grad(const at::Tensor& grad, const at::Tensor& grad_output) {
  const auto acc = acc_dtype(grad.scalar_type());
  TORCH_CHECK(grad_output.numel() == 1 && grad_output.scalar_type() == acc && grad_output.device() == grad.device(),
              "scale_grad_: expected a one-element grad_output in ", acc, " on ", grad.device(), ", got ",
              grad_output.sizes(), " ", grad_output.scalar_type(), " on ", grad_output.device());
  TORCH_CHECK(grad.is_non_overlapping_and_dense(), "scale_grad_: expected a dense gradient buffer");
}

}  // namespace softmax_ce
