// The CUDA kernels of bfloat16 logits: a translation unit of their own, compiled in parallel with the other dtypes'.
#include "softmax_ce_dispatch.cuh"

SOFTMAX_CE_LOGITS_DTYPE(at::BFloat16)
