// Op schemas (defined once, here) and the Python module.  Each backend registers its own kernels.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/softmax_ce_cpu_isa.h"

TORCH_LIBRARY(softmax_ce_ext, m) {
  // Rows of logits (B, C, S), any strides.  target: class indices (B, S) int64, or probabilities (B, C, S) in
  // the logits' dtype.  weight: (C,) in the accumulation dtype (float32; float64 for float64 logits) or None.
  // Per-row outputs (B, S) are in the accumulation dtype.  status: {flag, value} of an out-of-range class
  // index, written by the CUDA kernels (which never read out of bounds); the CPU kernels raise IndexError.

  // Per-row loss and log-sum-exp, reading each row once; no gradient.
  m.def(
      "forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
      " Tensor(a!) status) -> (Tensor loss, Tensor lse)");
  // As forward, and in the same pass the gradient of the summed row losses times grad_scale (a 0-d tensor in
  // the accumulation dtype: 1, or 1/total weight for a mean).  grad has the logits' strides when dense.
  m.def(
      "forward_backward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
      " Tensor grad_scale, Tensor(a!) status) -> (Tensor loss, Tensor lse, Tensor grad)");
  // Gradient recomputed from the saved lse, each row times grad_rows (B, S) (accumulation dtype, any strides).
  m.def(
      "backward(Tensor grad_rows, Tensor logits, Tensor target, Tensor? weight, Tensor lse, int ignore_index,"
      " float label_smoothing) -> Tensor");
  // In-place forms for inplace_backward=True: the gradient is written over the logits (same strides), which
  // are destroyed; no gradient buffer is allocated.
  m.def(
      "forward_backward_(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index,"
      " float label_smoothing, Tensor grad_scale, Tensor(b!) status) -> (Tensor loss, Tensor lse)");
  m.def(
      "backward_(Tensor grad_rows, Tensor(a!) logits, Tensor target, Tensor? weight, Tensor lse,"
      " int ignore_index, float label_smoothing) -> ()");
  // grad *= grad_output (a 0-d tensor), skipping the pass when grad_output == 1: decided where the data lives.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // The sum of per-row values (a 0-d tensor of their dtype) in an order that does not depend on the thread count.
  m.def("sum_rows(Tensor values) -> Tensor");
}

namespace {
bool cuda_built() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_built", &cuda_built, "Whether the CUDA kernels were compiled into this build.");
  m.def("cpu_isa", &softmax_ce::cpu_isa, "The instruction set the CPU kernels use now.");
  m.def("cpu_isas", &softmax_ce::cpu_isas, "The instruction sets this CPU can run, best first.");
  m.def("set_cpu_isa", &softmax_ce::set_cpu_isa, "Use another instruction set; returns the previous one.");
  m.def("empty_grad_cache", &softmax_ce::empty_grad_cache, "Free the CPU gradient blocks kept for reuse.");
}
