// The CUDA kernels of float16 logits: a translation unit of their own, compiled in parallel with the other dtypes'.
#include "softmax_ce_dispatch.cuh"

SOFTMAX_CE_LOGITS_DTYPE(at::Half)
