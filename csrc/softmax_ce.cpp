// Op schemas (defined once, here) and the Python module.  Each backend registers its own kernels.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(softmax_ce_ext, m) {
  // Per-row loss and log-sum-exp, reading each row once; no gradient.
  // logits (B, C, S) any strides; target (B, S) int64; weight (C,) in the accumulation dtype or None.
  // Returns loss (B, S) and lse (B, S) in the accumulation dtype (float32, or float64 for float64 logits).
  m.def(
      "forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing)"
      " -> (Tensor loss, Tensor lse)");
  // As forward, and in the same pass the gradient d(sum of row losses)/d logits times grad_scale
  // (a 0-d tensor in the accumulation dtype: 1, or 1/total weight for a mean).  grad is contiguous (B, C, S).
  m.def(
      "forward_backward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
      " Tensor grad_scale) -> (Tensor loss, Tensor lse, Tensor grad)");
  // Gradient recomputed from saved lse, each row times grad_rows (B, S) (accumulation dtype, any strides).
  m.def(
      "backward(Tensor grad_rows, Tensor logits, Tensor target, Tensor? weight, Tensor lse, int ignore_index,"
      " float label_smoothing) -> Tensor");
  // grad *= grad_output (a 0-d tensor), skipping the pass when grad_output == 1: decided where the data lives.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
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
}
