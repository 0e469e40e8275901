// What the CUDA files share: softmax_ce_kernel.cu defines the launch (launch_cuda), its host-side facts and the
// small ops; softmax_ce_kernel_<dtype>.cu each compile the kernels of one logits dtype (softmax_ce_dispatch.cuh);
// softmax_ce_ops.cpp registers the ops.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <functional>
#include <tuple>

#include "../softmax_ce.h"
#include "../softmax_ce_tuning.h"

namespace softmax_ce {

// Host-side launch facts (function attributes, occupancy, mapped addresses) computed once per device, kernel (or
// pointer) and configuration: the driver calls behind them cost microseconds on every launch otherwise.
int launch_fact(int device, const void* kernel, int64_t a, int64_t b, const std::function<int()>& compute);
enum : int64_t { kFactPtx = -1, kFactSmem = -2, kFactCluster16 = -3, kFactMapped = -4, kFactSmemMax = -5 };

int device_attr(int device, cudaDeviceAttr attr);
// The PTX version `kernel`'s code for `device` came from (90: sm_90 code; lower: an older arch's, JIT-compiled).
int kernel_ptx(int device, const void* kernel);
int sm_count(int device);

// tuning pdl (sm_90+): our kernels launched with programmatic stream serialization, so that each one's launch
// (CTAs placed, parameters loaded) overlaps the end of the kernel before it; every kernel of ours waits for that
// kernel's completion and memory before its first global access (chunks::pdl_start), so the order of effects is the
// plain launch's, whatever the kernel before it is, and then lets the kernel after it launch at once.  Two work
// before waiting, where the kernel before is known: mean_scale's finish lets the next launch first (it writes only
// its own outputs), and the mean's training pass in warp rows then reads its first rows (rows::Args::early).
bool pdl_code(int device);  // the build's kernels for `device` come from sm_90+ code (their waits exist)
inline bool pdl_launches(const CudaTuning& tune, int device) {
  return tune.pdl && device_attr(device, cudaDevAttrComputeCapabilityMajor) >= 9 && pdl_code(device);
}
inline bool pdl_launches(int device) { return pdl_launches(cuda_tuning(), device); }
#ifdef __CUDACC__
template <typename... Params, typename... Args>
void launch_kernel(bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}
#endif
// The most dynamic shared memory a CTA may have (Turing: 64 KiB; Ampere: 163; Hopper: 227).
inline int smem_optin(int device) { return device_attr(device, cudaDevAttrMaxSharedMemoryPerBlockOptin); }

// The kernel's dynamic shared-memory limit raised to bytes() once per device: one value for every launch (never
// lowered under another thread's launch or a captured graph).
template <typename Kernel, typename Bytes>
void allow_smem(int device, Kernel kernel, const Bytes& bytes) {
  launch_fact(device, reinterpret_cast<const void*>(kernel), kFactSmem, 0, [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes()));
    return 1;
  });
}

// The most dynamic shared memory `kernel` may ask for here: the opt-in limit less its static shared memory, which
// counts against the same limit (cached).
template <typename Kernel>
int smem_dynamic_max(int device, Kernel kernel) {
  return launch_fact(device, reinterpret_cast<const void*>(kernel), kFactSmemMax, 0, [&] {
    cudaFuncAttributes fa;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
    return smem_optin(device) - static_cast<int>(fa.sharedSizeBytes);
  });
}

// CTAs of `threads` threads and `smem` bytes of dynamic shared memory that fit on one SM at once (cached).
template <typename Kernel>
int blocks_per_sm(int device, Kernel kernel, int threads, int smem) {
  return launch_fact(device, reinterpret_cast<const void*>(kernel), threads, smem, [&] {
    int r = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r, kernel, threads, smem));
    return r;
  });
}

// The device's address of a status in pinned host memory (cached per buffer and device).
int64_t* mapped_status(const at::Tensor& status, int device);

// The sum of `values`, divided by `divisor` (0-d, their dtype; undefined: none) and cast to `dtype` where given.
at::Tensor sum_values(const at::Tensor& values, const at::Tensor& divisor, c10::optional<at::ScalarType> dtype);

// One logits dtype's kernels, specialised in softmax_ce_kernel_<dtype>.cu (SOFTMAX_CE_LOGITS_DTYPE).
template <typename scalar_t>
void launch_logits(Mode mode, const RowLayout& L, OpTensors& o);
// The K-dim mean folded into one cooperative launch (tuning kdim_fold); false where it does not apply.
template <typename scalar_t>
bool fold_mean_logits(const RowLayout& L, OpTensors& o, const CudaTuning& tune);
// The specialisations declared where they are called (the standard wants that; the dtype files define them).
#define SOFTMAX_CE_DECLARE_LOGITS_DTYPE(T)                                    \
  template <>                                                                 \
  void launch_logits<T>(Mode mode, const RowLayout& L, OpTensors& o);         \
  template <>                                                                 \
  bool fold_mean_logits<T>(const RowLayout& L, OpTensors& o, const CudaTuning& tune);
SOFTMAX_CE_DECLARE_LOGITS_DTYPE(at::BFloat16)
SOFTMAX_CE_DECLARE_LOGITS_DTYPE(at::Half)
SOFTMAX_CE_DECLARE_LOGITS_DTYPE(float)
SOFTMAX_CE_DECLARE_LOGITS_DTYPE(double)
#undef SOFTMAX_CE_DECLARE_LOGITS_DTYPE

// The ops' CUDA parts (softmax_ce_kernel.cu), as softmax_ce_ops.cpp registers them or passes them to softmax_ce.h.
void launch_cuda(Mode mode, const RowLayout& L, OpTensors& o);
bool fold_mean_cuda(const RowLayout& L, OpTensors& o);
at::Tensor sum_rows_cuda(const at::Tensor& values, const c10::optional<at::Tensor>& divisor,
                         c10::optional<at::ScalarType> dtype);
void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& grad_output,
                     const c10::optional<at::Tensor>& grad_mul_used, const c10::optional<at::Tensor>& predictor,
                     const c10::optional<at::Tensor>& changes);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mean_scale_cuda(const at::Tensor& target,
                                                               const c10::optional<at::Tensor>& weight,
                                                               int64_t ignore_index, at::ScalarType dtype,
                                                               const at::Tensor& numerator);

}  // namespace softmax_ce
