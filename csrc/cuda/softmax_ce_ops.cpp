// The CUDA dispatch key's ops: the shared op bodies of softmax_ce.h over launch_cuda (softmax_ce_kernel.cu).
// A C++ file, not CUDA: torch/library.h costs nvcc ~35 s per architecture pass, the host compiler one parse.
#include "../softmax_ce_register.h"
#include "softmax_ce_launch.cuh"

namespace softmax_ce {
namespace {

// The CUDA parts of the ops (softmax_ce_register.h builds the ops from them).
struct CudaParts {
  static constexpr auto launch = &launch_cuda;
  static constexpr auto mean_scale = &mean_scale_cuda;
  static constexpr auto fold = &fold_mean_cuda;  // the K-dim mean in one cooperative launch, where it applies
  static constexpr GradAlloc grad_alloc = nullptr;  // at::empty_like: PyTorch's caching allocator
  static constexpr auto scale_grad = &scale_grad_cuda;
  static constexpr auto sum_rows = &sum_rows_cuda;
};

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce_ext, CUDA, m) { register_backend<CudaParts>(m); }

}  // namespace softmax_ce
