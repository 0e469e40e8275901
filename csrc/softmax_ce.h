// Shared by the CPU and CUDA kernels: the row layout and the per-row loss/gradient algebra.
#pragma once

// The tensor and the three factory ops used here, not ATen.h: each CUDA file parses this (3x per arch) in ~10 s less.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/TensorOperators.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace softmax_ce {

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Logits are viewed as (B, C, S): a row is one (b, s) pair, its C classes C-strided.
// (N, C) input: B = N, S = 1.  (N, C, d1..dk) input: B = N, S = d1*...*dk.
struct RowLayout {
  int64_t B, C, S;
  int64_t x_sB, x_sC, x_sS;  // logits strides, in elements
  int64_t t_sB, t_sC, t_sS;  // target strides: (B, S) class indices (t_sC unused) or (B, C, S) probabilities
  int64_t g_sB, g_sC, g_sS;  // gradient strides (the gradient is laid out like dense logits)
  C10_HOST_DEVICE int64_t rows() const { return B * S; }
};

// Everything a row needs besides its logits.  All pointers may be device pointers.
template <typename scalar_t, typename acc_t, typename target_t = scalar_t>
struct RowParams {
  const int64_t* index;     // class-index targets, or nullptr
  const target_t* prob;     // probability targets (the logits' or the accumulation dtype), or nullptr
  const acc_t* weight;      // C class weights, or nullptr
  const acc_t* weight_sum;  // sum of weight (read with class indices, smoothing and weight)
  int64_t ignore_index;
  acc_t eps;                // label smoothing, already clamped to [0, 1]
  int64_t* status;          // CUDA: {flag, value} of an out-of-range target (CPU raises instead)
};

// Class c's share a_c of the distributed part of a row's loss, sum_c a_c * (lse - x_c):
// probabilities: w_c * ((1-eps) y_c + eps/C); class indices (the smoothing term, scaled by eps/C later): w_c.
template <bool kProb, typename scalar_t, typename acc_t, typename target_t>
C10_HOST_DEVICE inline acc_t class_coef(const RowParams<scalar_t, acc_t, target_t>& P, const target_t* yr,
                                        int64_t y_sC, int64_t c, int64_t C) {
  const acc_t w = P.weight ? P.weight[c] : acc_t(1);
  if (!kProb) return w;
  const acc_t y = static_cast<acc_t>(yr[c * y_sC]);
  return w * (P.eps == acc_t(0) ? y : (acc_t(1) - P.eps) * y + P.eps / acc_t(C));
}

// eps / C: on the GPU a 2-ulp division without the IEEE slow-path subroutine (its saved registers spilled).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t per_class(acc_t eps, int64_t C) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, float>) return __fdividef(eps, static_cast<float>(C));
#endif
  return eps / acc_t(C);
}

// Row statistics.  m: the max; s: sum exp(x - m); A: sum a_c; D: sum a_c * (m - x_c).
// Keeping D relative to the max makes sum a_c (lse - x_c) = A * log(s) + D a sum of non-negative terms:
// no inf - inf for logits near the float range, no cancellation.  (A == 0: no term over the classes, even
// where log(s) is -inf, as for C == 0.)
template <typename acc_t>
struct RowStats {
  acc_t m, s, A, D;
  C10_HOST_DEVICE acc_t spread(acc_t log_s) const { return A == acc_t(0) ? D : A * log_s + D; }
};

// The row's loss, from log_s = log(s) (lse = m + log_s).  Class index t: (1-eps) w_t ((m - x_t) + log_s) +
// eps/C * spread; (m - x_t) first, as PyTorch does, is exact where x_t is the max: a loss near 0 keeps its
// digits instead of one ulp of |lse|.  Probabilities: spread.
template <bool kProb, typename acc_t>
C10_HOST_DEVICE inline acc_t row_loss(const RowStats<acc_t>& st, acc_t log_s, acc_t x_t, acc_t w_t, acc_t eps,
                                      int64_t C) {
  if (kProb) return st.spread(log_s);
  const acc_t nll = w_t * ((st.m - x_t) + log_s);
  if (eps == acc_t(0)) return nll;
  return (acc_t(1) - eps) * nll + per_class(eps, C) * st.spread(log_s);
}

// d loss / d x_c = f * (p_c * p_mul - a_c * c_mul - [c == t] * t_sub), f being the upstream factor.
template <typename acc_t>
struct RowGrad {
  acc_t p_mul, c_mul, t_sub;
  // Class index t with weight w_t; W = sum of the class weights (C unweighted).
  C10_HOST_DEVICE static RowGrad index(acc_t f, acc_t w_t, acc_t W, acc_t eps, int64_t C) {
    RowGrad g;
    g.t_sub = f * (acc_t(1) - eps) * w_t;
    g.c_mul = eps == acc_t(0) ? acc_t(0) : f * per_class(eps, C);
    g.p_mul = eps == acc_t(0) ? f * w_t : g.t_sub + g.c_mul * W;
    return g;
  }
  // Probabilities: A = sum_c a_c.
  C10_HOST_DEVICE static RowGrad prob(acc_t f, acc_t A) { return RowGrad{f * A, f, acc_t(0)}; }
  C10_HOST_DEVICE acc_t at(acc_t p, acc_t a_c, bool is_target) const {
    const acc_t g = p * p_mul - a_c * c_mul;
    return is_target ? g - t_sub : g;
  }
};

// Sizes or strides for an error message, formatted here: streaming an IntArrayRef into TORCH_CHECK crashed
// (segfault inside c10's operator<<) under torch 2.11 on the GPU machine, 2026-11-26.
inline std::string dims(c10::IntArrayRef d) {
  std::string out = "[";
  for (size_t i = 0; i < d.size(); ++i) out += (i ? ", " : "") + std::to_string(d[i]);
  return out + "]";
}

// A target outside [0, C) that is not ignore_index.
C10_HOST_DEVICE inline bool target_out_of_range(int64_t t, int64_t C) { return t < 0 || t >= C; }

// Positions per row of logits (B, C, S), or 1 for (B, C): the per-row buffers are (B, S).
inline int64_t positions_of(const at::Tensor& logits) { return logits.dim() == 3 ? logits.size(2) : 1; }
// The position stride of a (B, C, S) tensor (logits, probabilities, gradient), or of a (B, C) one read as the
// (B, C, 1) view reshape makes: the class stride (the same kernel paths as that view).
inline int64_t position_stride(const at::Tensor& t) { return t.dim() == 3 ? t.stride(2) : t.stride(1); }

// Class indices (B, S), or (B,) beside (B, C) logits, as (B, S) sizes and strides: a (B,) target reads as the
// (B, 1) view reshape gives, whose second stride is the first.
struct IndexRows {
  int64_t B, S, sB, sS;
};
inline IndexRows index_rows(const at::Tensor& target) {
  if (target.dim() == 1) return {target.size(0), 1, target.stride(0), target.stride(0)};
  return {target.size(0), target.size(1), target.stride(0), target.stride(1)};
}

// Validates the kernels' tensor contract and reads the layout off the tensors.
// logits: (B, C, S), or (B, C) read as its (B, C, 1) view (no view to make per call: host time); any strides.
// target: class indices (B, S) int64 ((B,) for (B, C) logits), or probabilities of the logits' shape in the
// logits' or the accumulation dtype; any strides.  weight: (C,) contiguous in the accumulation dtype.
inline RowLayout check_and_layout(const at::Tensor& logits, const at::Tensor& target,
                                  const c10::optional<at::Tensor>& weight, const char* op) {
  const bool flat = logits.dim() == 2;
  TORCH_CHECK(flat || logits.dim() == 3, op, ": expected logits (B, C) or viewed as (B, C, S), got ", logits.dim(),
              " dims");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": expected floating-point logits, got ",
              logits.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(), " but logits on ",
              logits.device());
  const bool prob = at::isFloatingType(target.scalar_type());
  if (prob) {
    const auto t = target.scalar_type();
    TORCH_CHECK((t == logits.scalar_type() || t == acc_dtype(logits.scalar_type())) &&
                    target.sizes() == logits.sizes(),
                op, ": expected probability targets of shape ", dims(logits.sizes()), " in ", logits.scalar_type(), " or ",
                acc_dtype(logits.scalar_type()), ", got ", dims(target.sizes()), " in ", t);
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, op, ": expected int64 class indices, got ",
                target.scalar_type());
    TORCH_CHECK(target.dim() == logits.dim() - 1 && target.size(0) == logits.size(0) &&
                    (flat || target.size(1) == logits.size(2)),
                op, ": expected class indices of shape ",
                flat ? dims({logits.size(0)}) : dims({logits.size(0), logits.size(2)}), ", got ", dims(target.sizes()));
  }
  if (weight.has_value()) {
    const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == logits.size(1) && weight->is_contiguous(), op,
                ": expected a contiguous weight of ", logits.size(1), " elements, got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == acc, op, ": expected weight in ", acc, ", got ", weight->scalar_type());
    TORCH_CHECK(weight->device() == logits.device(), op, ": weight is on ", weight->device(), " but logits on ",
                logits.device());
  }
  return RowLayout{logits.size(0),
                   logits.size(1),
                   positions_of(logits),
                   logits.stride(0),
                   logits.stride(1),
                   position_stride(logits),
                   target.stride(0),
                   prob ? target.stride(1) : 0,
                   prob ? position_stride(target) : index_rows(target).sS,
                   0,
                   0,
                   0};
}


// ---- Op bodies shared by the backends: checks and allocation here, the kernels behind `launch`. ----

enum class Mode { kStats, kStatsGrad, kGrad };  // loss+stats; loss+grad; grad from saved stats

// What a backend's launch(mode, layout, tensors) receives.  factor is the gradient's upstream multiplier:
// 0-d (broadcast to every row) or (B, S); both in the accumulation dtype.
// A kStats or kStatsGrad launch without a loss buffer (always so for kStatsGrad) wants only loss_sum, the 0-d sum
// of the row losses, summed in an order that does not depend on the thread count: the backend allocates what
// per-row buffers its kernels need (the K-dim kernel needs none).
// loss_divisor / loss_dtype: what loss_sum is divided by and cast to (undefined / nullopt: nothing); a backend
// whose sum kernel folds them in sets loss_finished, else forward_backward_op applies them.
struct OpTensors {
  at::Tensor logits, target, loss, stats, grad, factor, weight, weight_sum, status, loss_sum, loss_divisor;
  // The mean's training pass: the gradient's multiplier m (0-d, accumulation dtype; undefined: 1), the factor
  // m / d; grad_mul_used, m as read (0-d; a backend's mean_scale or fold writes it).
  at::Tensor grad_mul, grad_mul_used;
  int64_t* status_ptr = nullptr;  // where the kernels write status (a device pointer for mapped host memory)
  c10::optional<at::ScalarType> loss_dtype;
  bool loss_finished = false;
  bool after_mean_scale = false;  // launched right after mean_scale's kernels (CUDA pdl: Args::early)
  int64_t ignore_index;
  double eps;
};

// Whether a launch wants only the summed loss (see OpTensors).
inline bool sum_only(Mode mode, const OpTensors& o) { return mode != Mode::kGrad && !o.loss.defined(); }

// sum / divisor in dtype, by ATen ops (where no kernel folded them into the sum).
inline at::Tensor finish_loss(at::Tensor sum, const at::Tensor& divisor, c10::optional<at::ScalarType> dtype) {
  if (divisor.defined()) sum = sum / divisor;
  return dtype.has_value() ? sum.to(*dtype) : sum;
}

// A 0-d divisor in the sum's dtype on its device; a floating result dtype.
inline void check_loss_finish(const c10::optional<at::Tensor>& divisor, c10::optional<at::ScalarType> dtype,
                              at::ScalarType acc, const at::Device& device, const char* op) {
  if (divisor.has_value())
    TORCH_CHECK(divisor->dim() == 0 && divisor->scalar_type() == acc && divisor->device() == device, op,
                ": expected a 0-d divisor in ", acc, " on ", device, ", got ", dims(divisor->sizes()), " ",
                divisor->scalar_type(), " on ", divisor->device());
  if (dtype.has_value())
    TORCH_CHECK(at::isFloatingType(*dtype), op, ": expected a floating loss dtype, got ", *dtype);
}

// The gradient's multiplier of the mean's training pass: a 0-d tensor in the accumulation dtype on the logits' device.
inline void check_grad_mul(const c10::optional<at::Tensor>& m, at::ScalarType acc, const at::Device& device,
                           const char* op) {
  if (m.has_value())
    TORCH_CHECK(m->dim() == 0 && m->scalar_type() == acc && m->device() == device, op,
                ": expected a 0-d grad_mul in ", acc, " on ", device, ", got ", dims(m->sizes()), " ",
                m->scalar_type(), " on ", m->device());
}

// Upstream factor per row: a 0-d tensor broadcast (strides 0) or a (B, S) tensor.
template <typename acc_t>
struct Factor {
  const acc_t* p;
  int64_t sB, sS;
  C10_HOST_DEVICE acc_t at(int64_t b, int64_t s) const { return p[b * sB + s * sS]; }
};

template <typename acc_t>
Factor<acc_t> factor_of(const OpTensors& o) {
  if (!o.factor.defined()) return {nullptr, 0, 0};
  return {o.factor.data_ptr<acc_t>(), o.factor.dim() ? o.factor.stride(0) : 0, o.factor.dim() ? o.factor.stride(1) : 0};
}

// The kernels' view of the tensors (pointers may be device pointers).
template <typename scalar_t, typename acc_t, typename target_t>
RowParams<scalar_t, acc_t, target_t> row_params(const OpTensors& o, bool prob) {
  return {prob ? nullptr : o.target.data_ptr<int64_t>(),
          prob ? o.target.data_ptr<target_t>() : nullptr,
          o.weight.defined() ? o.weight.data_ptr<acc_t>() : nullptr,
          o.weight_sum.defined() ? o.weight_sum.data_ptr<acc_t>() : nullptr,
          o.ignore_index,
          static_cast<acc_t>(o.eps),
          o.status_ptr ? o.status_ptr : o.status.defined() ? o.status.data_ptr<int64_t>() : nullptr};
}

inline at::Tensor row_buffer(const at::Tensor& logits) {
  return at::empty({logits.size(0), positions_of(logits)}, logits.options().dtype(acc_dtype(logits.scalar_type())));
}

// The rows' statistics a later gradient needs (kStats writes them, kGrad reads them): (2, B, S) in the accumulation
// dtype, [0] the max m and [1] the sum s of e^(x - m), so that the gradient is e^(x - m) / s, the training pass's
// bits.  Not the lse: m + log(s) drops log(s) once |m| >> 1 (1e30 + log 2 == 1e30 in float32).
inline at::Tensor stats_buffer(const at::Tensor& logits) {
  return at::empty({2, logits.size(0), positions_of(logits)},
                   logits.options().dtype(acc_dtype(logits.scalar_type())));
}

// The stats' two planes, row r of each at [r] (nullptr where there are none: the training pass writes none).
template <typename acc_t>
struct StatsPtrs {
  acc_t* max;
  acc_t* sum;
};
template <typename acc_t>
inline StatsPtrs<acc_t> stats_ptrs(const OpTensors& o) {
  if (!o.stats.defined()) return {nullptr, nullptr};
  acc_t* p = o.stats.data_ptr<acc_t>();
  return {p, p + o.stats.size(1) * o.stats.size(2)};
}

// A backend's allocator for the gradient buffer (nullptr: at::empty_like).
using GradAlloc = at::Tensor (*)(const at::Tensor& logits);

// The gradient takes the logits' strides when they are dense (no copy-back for permuted inputs).
inline at::Tensor grad_like(const at::Tensor& logits, RowLayout& L, GradAlloc alloc) {
  at::Tensor grad = alloc ? alloc(logits) : at::empty_like(logits, at::MemoryFormat::Preserve);
  L.g_sB = grad.stride(0);
  L.g_sC = grad.stride(1);
  L.g_sS = position_stride(grad);
  return grad;
}

// The in-place ops write the gradient over the logits, with the logits' strides: every element is read, then
// overwritten, by the thread that owns it, so the kernels need no second buffer.
inline at::Tensor grad_over_logits(const at::Tensor& logits, const at::Tensor& target, RowLayout& L,
                                   const char* op) {
  TORCH_CHECK(at::has_internal_overlap(logits) != at::MemOverlap::Yes, op,
              ": expected logits whose elements do not overlap in memory (the gradient is written over them), got "
              "strides ", dims(logits.strides()));
  if (target.is_floating_point()) {
    const auto overlap = at::get_overlap_status(logits, target);
    TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
                ": expected probability targets in memory of their own, got targets that share the logits'");
  }
  L.g_sB = L.x_sB;
  L.g_sC = L.x_sC;
  L.g_sS = L.x_sS;
  return logits;
}

// status: on the logits' device, or for CUDA logits in pinned host memory that the kernels write directly (the
// CUDA backend checks that it is mapped).
inline void check_status(const c10::optional<at::Tensor>& maybe_status, const at::Tensor& logits) {
  if (!maybe_status.has_value()) return;
  const at::Tensor& status = *maybe_status;
  TORCH_CHECK(status.scalar_type() == at::kLong && status.numel() == 2 && status.is_contiguous() &&
                  (status.device() == logits.device() || (logits.is_cuda() && status.is_cpu())),
              "expected a contiguous 2-element int64 status on ", logits.device(),
              logits.is_cuda() ? " or in pinned host memory" : "", ", got ", dims(status.sizes()), " ",
              status.scalar_type(), " on ", status.device());
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

inline void check_class_indices(const at::Tensor& target, const char* op) {
  TORCH_CHECK(!target.is_floating_point(), op, ": expected class indices (B, S), got ", target.scalar_type(),
              " probabilities");
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> forward_rows_op(Launch launch, const at::Tensor& logits, const at::Tensor& target,
                                                   const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                   double eps, const c10::optional<at::Tensor>& status) {
  RowLayout L = check_and_layout(logits, target, weight, "forward_rows");
  check_status(status, logits);
  OpTensors o = op_tensors(logits, target, weight, ignore_index, eps);
  o.status = status.value_or(at::Tensor());
  o.loss = row_buffer(logits);
  o.stats = stats_buffer(logits);
  launch(Mode::kStats, L, o);
  return {o.loss, o.stats};
}

// The training pass's tensors (its gradient allocated, or the logits themselves in place), before the factor.
inline OpTensors training_tensors(RowLayout& L, const at::Tensor& logits, const at::Tensor& target,
                                  const c10::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                                  const c10::optional<at::Tensor>& status, c10::optional<at::ScalarType> loss_dtype,
                                  GradAlloc alloc, bool inplace, const char* op) {
  OpTensors o = op_tensors(logits, target, weight, ignore_index, eps);
  o.status = status.value_or(at::Tensor());
  o.grad = inplace ? grad_over_logits(logits, target, L, op) : grad_like(logits, L, alloc);
  o.loss_dtype = loss_dtype;
  return o;
}

// The summed loss of a sum-only launch, divided and cast where the backend's sum kernel did not do it.
inline void finish_loss_sum(OpTensors& o) {
  if (!o.loss_sum.defined()) o.loss_sum = at::zeros({}, o.logits.options().dtype(acc_dtype(o.logits.scalar_type())));
  if (!o.loss_finished) o.loss_sum = finish_loss(o.loss_sum, o.loss_divisor, o.loss_dtype);
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> forward_backward_op(Launch launch, const at::Tensor& logits, const at::Tensor& target,
                                                       const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                       double eps, const at::Tensor& grad_scale,
                                                       const c10::optional<at::Tensor>& status,
                                                       const c10::optional<at::Tensor>& loss_divisor,
                                                       c10::optional<at::ScalarType> loss_dtype,
                                                       GradAlloc alloc = nullptr, bool inplace = false) {
  const char* op = inplace ? "forward_backward_" : "forward_backward";
  RowLayout L = check_and_layout(logits, target, weight, op);
  check_status(status, logits);
  const auto acc = acc_dtype(logits.scalar_type());
  check_loss_finish(loss_divisor, loss_dtype, acc, logits.device(), op);
  TORCH_CHECK(grad_scale.dim() == 0 && grad_scale.scalar_type() == acc && grad_scale.device() == logits.device(),
              op, ": expected a 0-d grad_scale in ", acc, " on ", logits.device(), ", got ",
              dims(grad_scale.sizes()), " ", grad_scale.scalar_type(), " on ", grad_scale.device());
  OpTensors o = training_tensors(L, logits, target, weight, ignore_index, eps, status, loss_dtype, alloc, inplace, op);
  o.factor = grad_scale;
  o.loss_divisor = loss_divisor.value_or(at::Tensor());
  launch(Mode::kStatsGrad, L, o);
  finish_loss_sum(o);
  return {o.loss_sum, o.grad};
}

// reduction='mean' with class indices, the training pass in one op: (the loss sum / d in loss_dtype, the gradient
// times m / d, d, m as read), d the mean's denominator as mean_scale(target, weight, ignore_index, acc) gives it, m
// grad_mul's value (none: 1; the Function's guess of grad_output, function.py).  fold(L, o): a
// backend's pass that counts d itself (setting o.loss_divisor and the finished loss), or false, having launched
// nothing: then mean_scale_times(target, weight, ignore_index, acc, m) -> (d, m / d, m as read), and the training
// pass as forward_backward runs it.
template <typename Launch, typename MeanScale, typename Fold>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mean_forward_backward_op(
    Launch launch, MeanScale mean_scale_times, Fold fold, const at::Tensor& logits, const at::Tensor& target,
    const c10::optional<at::Tensor>& weight, int64_t ignore_index, double eps, const c10::optional<at::Tensor>& status,
    c10::optional<at::ScalarType> loss_dtype, const c10::optional<at::Tensor>& grad_mul, GradAlloc alloc = nullptr,
    bool inplace = false) {
  const char* op = inplace ? "mean_forward_backward_" : "mean_forward_backward";
  RowLayout L = check_and_layout(logits, target, weight, op);
  check_class_indices(target, op);
  check_status(status, logits);
  const auto acc = acc_dtype(logits.scalar_type());
  check_loss_finish(c10::nullopt, loss_dtype, acc, logits.device(), op);
  check_grad_mul(grad_mul, acc, logits.device(), op);
  OpTensors o = training_tensors(L, logits, target, weight, ignore_index, eps, status, loss_dtype, alloc, inplace, op);
  o.grad_mul = grad_mul.value_or(at::Tensor());
  if (!fold(L, o)) {  // a fold sets grad_mul_used itself
    std::tie(o.loss_divisor, o.factor, o.grad_mul_used) = mean_scale_times(target, weight, ignore_index, acc, o.grad_mul);
    o.after_mean_scale = true;
    launch(Mode::kStatsGrad, L, o);
  }
  finish_loss_sum(o);
  return {o.loss_sum, o.grad, o.loss_divisor, o.grad_mul_used};
}

// The summed loss of a pass without a gradient (no loss buffer: sum_only), / divisor (undefined: none) in loss_dtype.
template <typename Launch>
at::Tensor summed_loss(Launch launch, const RowLayout& L, const at::Tensor& logits, const at::Tensor& target,
                       const c10::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                       const c10::optional<at::Tensor>& status, const at::Tensor& divisor,
                       c10::optional<at::ScalarType> loss_dtype) {
  OpTensors o = op_tensors(logits, target, weight, ignore_index, eps);
  o.status = status.value_or(at::Tensor());
  o.loss_divisor = divisor;
  o.loss_dtype = loss_dtype;
  launch(Mode::kStats, L, o);
  finish_loss_sum(o);
  return o.loss_sum;
}

// The summed loss alone (no gradient): the sum of the row losses / loss_divisor, in loss_dtype.
template <typename Launch>
at::Tensor forward_sum_op(Launch launch, const at::Tensor& logits, const at::Tensor& target,
                          const c10::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                          const c10::optional<at::Tensor>& status, const c10::optional<at::Tensor>& loss_divisor,
                          c10::optional<at::ScalarType> loss_dtype) {
  const char* op = "forward_sum";
  const RowLayout L = check_and_layout(logits, target, weight, op);
  check_status(status, logits);
  check_loss_finish(loss_divisor, loss_dtype, acc_dtype(logits.scalar_type()), logits.device(), op);
  return summed_loss(launch, L, logits, target, weight, ignore_index, eps, status,
                     loss_divisor.value_or(at::Tensor()), loss_dtype);
}

// reduction='mean' with class indices, no gradient: (the loss sum / d in loss_dtype, d), d as mean_scale(target,
// weight, ignore_index, acc) counts it.
template <typename Launch, typename MeanScale>
std::tuple<at::Tensor, at::Tensor> mean_forward_op(Launch launch, MeanScale mean_scale, const at::Tensor& logits,
                                                   const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                                                   int64_t ignore_index, double eps,
                                                   const c10::optional<at::Tensor>& status,
                                                   c10::optional<at::ScalarType> loss_dtype) {
  const char* op = "mean_forward";
  const RowLayout L = check_and_layout(logits, target, weight, op);
  check_class_indices(target, op);
  check_status(status, logits);
  const auto acc = acc_dtype(logits.scalar_type());
  check_loss_finish(c10::nullopt, loss_dtype, acc, logits.device(), op);
  at::Tensor denom = std::get<0>(mean_scale(target, weight, ignore_index, acc, at::Tensor()));
  return {summed_loss(launch, L, logits, target, weight, ignore_index, eps, status, denom, loss_dtype), denom};
}

// The per-row buffers of a sum-only launch whose kernels write them: the loss, and the forward's stats.
inline void row_outputs(Mode mode, OpTensors& o) {
  o.loss = row_buffer(o.logits);
  if (mode == Mode::kStats) o.stats = stats_buffer(o.logits);
}

template <typename Launch>
at::Tensor backward_op(Launch launch, const at::Tensor& grad_rows, const at::Tensor& logits,
                       const at::Tensor& target, const c10::optional<at::Tensor>& weight, const at::Tensor& stats,
                       int64_t ignore_index, double eps, GradAlloc alloc = nullptr, bool inplace = false) {
  const char* op = inplace ? "backward_" : "backward";
  RowLayout L = check_and_layout(logits, target, weight, op);
  const auto acc = acc_dtype(logits.scalar_type());
  const std::vector<int64_t> rows{logits.size(0), positions_of(logits)};
  TORCH_CHECK(grad_rows.sizes() == rows && grad_rows.scalar_type() == acc && grad_rows.device() == logits.device(),
              op, ": expected grad_rows of shape ", dims(rows), " in ", acc, " on ", logits.device(), ", got ",
              dims(grad_rows.sizes()), " ", grad_rows.scalar_type(), " on ", grad_rows.device());
  const std::vector<int64_t> planes{2, rows[0], rows[1]};
  TORCH_CHECK(stats.sizes() == planes && stats.is_contiguous() && stats.scalar_type() == acc &&
                  stats.device() == logits.device(),
              op, ": expected contiguous stats (the forward's max and sum planes) of shape ", dims(planes), " in ", acc,
              " on ", logits.device(), ", got ", dims(stats.sizes()), " ", stats.scalar_type(), " on ", stats.device());
  OpTensors o = op_tensors(logits, target, weight, ignore_index, eps);
  o.stats = stats;
  o.grad = inplace ? grad_over_logits(logits, target, L, op) : grad_like(logits, L, alloc);
  o.factor = grad_rows;
  launch(Mode::kGrad, L, o);
  return o.grad;
}

inline void check_mean_scale(const at::Tensor& target, const c10::optional<at::Tensor>& weight, at::ScalarType dtype) {
  TORCH_CHECK((target.dim() == 2 || target.dim() == 1) && target.scalar_type() == at::kLong,
              "mean_scale: expected (B, S) or (B,) int64 class indices, got ", dims(target.sizes()), " ",
              target.scalar_type());
  TORCH_CHECK(!weight.has_value() || (weight->dim() == 1 && weight->is_contiguous() && weight->is_floating_point() &&
                                      weight->device() == target.device()),
              "mean_scale: expected a contiguous 1-d floating weight on ", target.device());
  TORCH_CHECK(at::isFloatingType(dtype), "mean_scale: expected a floating dtype for the result, got ", dtype);
}

// grad_mul_used: what the forward multiplied the gradient by (0-d, accumulation dtype); predictor: the guess's
// state, {guess, last grad_output, changes in a row (-1: none yet)} in the accumulation dtype, updated in place;
// changes: an int64 mirror of the last (host memory where the Function reads it without waiting: pinned, or the
// CPU's).
inline void check_scale_grad(const at::Tensor& grad, const at::Tensor& grad_output,
                             const c10::optional<at::Tensor>& grad_mul_used, const c10::optional<at::Tensor>& predictor,
                             const c10::optional<at::Tensor>& changes) {
  const auto acc = acc_dtype(grad.scalar_type());
  TORCH_CHECK(grad_output.numel() == 1 && at::isFloatingType(grad_output.scalar_type()) &&
                  grad_output.device() == grad.device(),
              "scale_grad_: expected a one-element floating grad_output (any dtype; ", acc, " is exact) on ",
              grad.device(), ", got ",
              dims(grad_output.sizes()), " ", grad_output.scalar_type(), " on ", grad_output.device());
  check_grad_mul(grad_mul_used, acc, grad.device(), "scale_grad_");
  if (predictor.has_value())
    TORCH_CHECK(predictor->dim() == 1 && predictor->numel() == 3 && predictor->is_contiguous() &&
                    predictor->scalar_type() == acc && predictor->device() == grad.device(),
                "scale_grad_: expected a contiguous (3,) predictor in ", acc, " on ", grad.device(), ", got ",
                dims(predictor->sizes()), " ", predictor->scalar_type(), " on ", predictor->device());
  if (changes.has_value())
    TORCH_CHECK(predictor.has_value() && changes->numel() == 1 && changes->scalar_type() == at::kLong &&
                    (changes->device() == grad.device() || changes->is_cpu()),  // CUDA: pinned (mapped_status)
                "scale_grad_: expected a one-element int64 changes on ", grad.device(),
                " or in pinned host memory, with a predictor, got ", dims(changes->sizes()), " ",
                changes->scalar_type(), " on ", changes->device());
}

// The predictor's rule (_predict.py): a grad_output seen twice in a row becomes the guess, if it is a finite
// factor within 2^-32..2^32 (bounded so that a wrong guess's rescaling cannot overflow a gradient entry; below
// 2^-32 of the smallest normal one may still flush before it is scaled back).  Each grad_output unlike the one
// before counts a change (up to 2; 0 when alike, and at the first: state[2] -1, none seen yet), mirrored into
// *changes for the Function's choice of route.
template <typename acc_t>
C10_HOST_DEVICE inline void update_predictor(acc_t* state, acc_t g, int64_t* changes) {
  const acc_t a = g < acc_t(0) ? -g : g;
  const bool same = g == state[1];
  if (same && a >= acc_t(2.3283064365386963e-10) && a <= acc_t(4294967296.0)) state[0] = g;
  state[1] = g;
  const acc_t n = same || state[2] < acc_t(0) ? acc_t(0) : state[2] < acc_t(2) ? state[2] + acc_t(1) : acc_t(2);
  state[2] = n;
  if (changes != nullptr) *changes = static_cast<int64_t>(n);  // a store only: no read of host memory
}

}  // namespace softmax_ce
