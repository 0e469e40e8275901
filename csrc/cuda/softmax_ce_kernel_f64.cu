// The CUDA kernels of float64 logits: a translation unit of their own, compiled in parallel with the other dtypes'.
#include "softmax_ce_dispatch.cuh"

SOFTMAX_CE_LOGITS_DTYPE(double)
