// The CUDA side of the ops (registered by softmax_ce_ops.cpp): the choice of logits dtype, whose kernels
// softmax_ce_kernel_<dtype>.cu compile (softmax_ce_dispatch.cuh); the host-side launch facts; the summed loss, the
// mean's denominator and the gradient's scale, with their small kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <functional>
#include <map>
#include <mutex>
#include <tuple>

#include "softmax_ce_chunks.cuh"
#include "softmax_ce_launch.cuh"

namespace softmax_ce {
namespace {

template <typename V>
V cached_fact(int device, const void* key_ptr, int64_t a, int64_t b, const std::function<V()>& compute) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int64_t, int64_t>, V> facts;
  const auto key = std::make_tuple(device, key_ptr, a, b);
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = facts.find(key);
    if (it != facts.end()) return it->second;
  }
  const V value = compute();  // a throw caches nothing
  const std::lock_guard<std::mutex> lock(mu);
  facts.emplace(key, value);
  return value;
}

// One CTA sums up to kOneBlockRows values in a fixed order (strided per thread, then a shuffle tree): at 65536
// rows at::sum took 8.9 us on an H200 (2026-11-26), about 8% of a 65536x1000 training call.
constexpr int kSumThreads = 1024;
constexpr int64_t kOneBlockRows = 1 << 18;

// divisor (nullable) and out_t: the mean and the loss's dtype folded in (two launches fewer).
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kSumThreads) sum_rows_kernel(const acc_t* v, int64_t n, const acc_t* divisor,
                                                               out_t* out) {
  chunks::pdl_start();
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kSumThreads) acc += v[i];
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  __shared__ acc_t sh[kSumThreads / 32];
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
    for (int w = 0; w < kSumThreads / 32; ++w) total += sh[w];
    if (divisor != nullptr) total = total / *divisor;
    *out = static_cast<out_t>(total);
  }
}

// grad *= g / m unless g == m (m: the multiplier the forward applied, 1 where none); read on the device, so the
// host never waits for them.  g != m (a loss divided by the accumulation steps or the items, loss scaling, before
// the forward's guess has it) makes this a pass of its own over the gradient: 16-byte accesses where the buffer is
// 16-byte aligned (vec), as every other pass here (one 2-byte element per thread moved 64 bytes per warp
// instruction).  predictor: g recorded and the guess updated by one thread (the others read m, not the guess).
template <typename scalar_t, typename acc_t, typename g_t>
__global__ void scale_grad_kernel(scalar_t* __restrict__ grad, int64_t n, const g_t* g_ptr, const acc_t* used,
                                  acc_t* predictor, int64_t* changes, bool vec) {
  chunks::pdl_start();
  const acc_t g = static_cast<acc_t>(*g_ptr);  // grad_output in its own dtype: no cast launch before this one
  if (predictor != nullptr && blockIdx.x == 0 && threadIdx.x == 0) update_predictor(predictor, g, changes);
  const acc_t m = used != nullptr ? *used : acc_t(1);
  if (g == m) return;
  const acc_t r = g / m;
  constexpr int E = 16 / sizeof(scalar_t);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;  // elements scaled 16 bytes at a time
  if (vec) {
    uint4* chunks = reinterpret_cast<uint4*>(grad);
    for (int64_t i = first; i < n / E; i += stride) {
      uint4 u = chunks[i];
      scalar_t* e = reinterpret_cast<scalar_t*>(&u);
#pragma unroll
      for (int k = 0; k < E; ++k) e[k] = static_cast<scalar_t>(static_cast<acc_t>(e[k]) * r);
      chunks[i] = u;
    }
    done = n / E * E;
  }
  for (int64_t i = done + first; i < n; i += stride) grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * r);
}

// Partial counts / weight sums per CTA over a grid fixed by the size alone, then summed: no mask in memory,
// the same bits on any device.
template <typename sum_t, typename w_t>
__device__ __forceinline__ void mean_scale_add(sum_t& acc, int64_t c, const w_t* w, int64_t C, int64_t ignore_index) {
  if (c == ignore_index) return;
  if (w == nullptr)
    acc += 1;
  else if (c >= 0 && c < C)
    acc += static_cast<sum_t>(w[c]);
}

template <typename sum_t, typename w_t>
__global__ void mean_scale_partial_kernel(const int64_t* t, int64_t S, int64_t sB, int64_t sS, int64_t n,
                                          const w_t* w, int64_t C, int64_t ignore_index, sum_t* partial) {
  chunks::pdl_start();  // wait, then trigger: the finish's early trigger and the rows' early reads rely on this order
  sum_t acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Dense, 16-byte aligned counts: pairs of targets, 4 loads in flight per thread (one 8-byte load at a time
  // read 4.2M targets at 1.8 TB/s, H100 2026-11-27).  Counts only: an integer sum has no order to keep.
  if (w == nullptr && sS == 1 && sB == S && (reinterpret_cast<uintptr_t>(t) & 15) == 0) {
    const longlong2* t2 = reinterpret_cast<const longlong2*>(t);
    const int64_t pairs = n / 2;
    for (; i + 3 * stride < pairs; i += 4 * stride) {
      longlong2 v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = t2[i + k * stride];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        mean_scale_add(acc, v[k].x, w, C, ignore_index);
        mean_scale_add(acc, v[k].y, w, C, ignore_index);
      }
    }
    for (; i < pairs; i += stride) {
      const longlong2 v = t2[i];
      mean_scale_add(acc, v.x, w, C, ignore_index);
      mean_scale_add(acc, v.y, w, C, ignore_index);
    }
    if ((n & 1) && blockIdx.x == 0 && threadIdx.x == 0) mean_scale_add(acc, t[n - 1], w, C, ignore_index);
  } else {
    for (; i < n; i += stride) {
      const int64_t c = sS == 1 && sB == S ? t[i] : t[(i / S) * sB + (i % S) * sS];  // dense: no division
      mean_scale_add(acc, c, w, C, ignore_index);
    }
  }
  __shared__ sum_t sh[32];
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    sum_t total = 0;
    for (int k = 0; k < static_cast<int>(blockDim.x >> 5); ++k) total += sh[k];
    partial[blockIdx.x] = total;
  }
}

// One warp sums the partials in a fixed order and writes {denominator, 1 / denominator} in out_t: with the
// partials kernel, two launches where a sum, a cast and a reciprocal took four.  Under pdl the kernel after it may
// launch before it waits (the partials kernel launched it only once the kernels before were done): a training
// pass's warp rows then read their first rows while these two kernels run (Args::early).
// num (nullable): the numerator m of {d, m / d, m}, the training pass's gradient multiplier.
template <typename sum_t, typename out_t>
__global__ void mean_scale_finish_kernel(const sum_t* partial, int64_t blocks, const out_t* num, out_t* denom,
                                         out_t* inv, out_t* used) {
  chunks::pdl_trigger();
  chunks::pdl_wait();
  sum_t acc = 0;
  for (int64_t b = threadIdx.x; b < blocks; b += 32) acc += partial[b];
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (threadIdx.x == 0) {
    const out_t d = static_cast<out_t>(acc);
    const out_t m = num != nullptr ? *num : out_t(1);
    *denom = d;
    *inv = static_cast<out_t>(m / d);
    *used = m;
  }
}

void launch_dtypes(Mode mode, const RowLayout& L, OpTensors& o) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.logits.scalar_type(), "softmax_ce_cuda", [&] {
    launch_logits<scalar_t>(mode, L, o);
  });
}

}  // namespace

int launch_fact(int device, const void* kernel, int64_t a, int64_t b, const std::function<int()>& compute) {
  return cached_fact<int>(device, kernel, a, b, compute);
}

int device_attr(int device, cudaDeviceAttr attr) {
  return launch_fact(device, nullptr, attr, 0, [&] {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
    return v;
  });
}

int sm_count(int device) { return device_attr(device, cudaDevAttrMultiProcessorCount); }

int kernel_ptx(int device, const void* kernel) {
  return launch_fact(device, kernel, kFactPtx, 0, [&] {
    cudaFuncAttributes fa;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
    return fa.ptxVersion;
  });
}

// Compiled for this build's code of `device`: griddepcontrol exists from sm_90 on, so PTX of an older arch,
// JIT-compiled for a Hopper (TORCH_CUDA_ARCH_LIST=8.0+PTX), has kernels that never wait: pdl must stay off there.
__global__ void pdl_code_probe_kernel() {}
bool pdl_code(int device) { return kernel_ptx(device, reinterpret_cast<const void*>(pdl_code_probe_kernel)) >= 90; }

// The sum of `values`, divided by `divisor` (0-d, their dtype; undefined: none) and cast to `dtype` where given.
// A plain tensor, not an optional: an undefined one converted to an optional reads as given (H200, 2026-11-27:
// every reduction='sum' training call failed with "tensor does not have a device").
at::Tensor sum_values(const at::Tensor& values, const at::Tensor& div, c10::optional<at::ScalarType> dtype) {
  if (values.numel() > kOneBlockRows || !values.is_contiguous() || !at::isFloatingType(values.scalar_type()) ||
      values.scalar_type() == at::kHalf || values.scalar_type() == at::kBFloat16)
    return finish_loss(values.sum(), div, dtype);  // CUDA's reduction order is fixed for a given size and device
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({}, values.options().dtype(dtype.value_or(values.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sum_rows_cuda", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sum_rows_cuda", [&] {
      launch_kernel(pdl_launches(values.get_device()), sum_rows_kernel<acc_t, scalar_t>, dim3(1), dim3(kSumThreads), 0,
                    c10::cuda::getCurrentCUDAStream(), values.data_ptr<acc_t>(), values.numel(),
                    div.defined() ? div.data_ptr<acc_t>() : nullptr, out.data_ptr<scalar_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The device's address of a status in host memory: it must be pinned and mapped (torch's pinned memory is).
// Looked up once per buffer and device, so that no driver call runs per launch (nor during CUDA graph capture,
// after the first call); pinned blocks keep their address (torch's host allocator caches them).
int64_t* mapped_status(const at::Tensor& status, int device) {
  void* host_ptr = status.data_ptr();
  return static_cast<int64_t*>(cached_fact<void*>(device, host_ptr, kFactMapped, 0, [&] {
    void* device_ptr = nullptr;
    const cudaError_t err = cudaHostGetDevicePointer(&device_ptr, host_ptr, 0);
    if (err != cudaSuccess) (void)cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "expected a status or a count of changes in pinned host memory that the GPU "
                "can address (e.g. torch.zeros(2, dtype=torch.int64, pin_memory=True)), got host memory it cannot: ",
                cudaGetErrorString(err));
    return device_ptr;
  }));
}

bool fold_mean_cuda(const RowLayout& L, OpTensors& o) {
  if (o.weight.defined() || L.rows() == 0 || o.target.is_floating_point()) return false;
  const CudaTuning tune = cuda_tuning();  // one reading for the whole launch
  if (!tune.kdim_fold) return false;
  const c10::cuda::CUDAGuard guard(o.logits.device());
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.logits.scalar_type(), "fold_mean_cuda", [&] {
    done = fold_mean_logits<scalar_t>(L, o, tune);
  });
  return done;
}

at::Tensor sum_rows_cuda(const at::Tensor& values, const c10::optional<at::Tensor>& divisor,
                         c10::optional<at::ScalarType> dtype) {
  check_loss_finish(divisor, dtype, values.scalar_type(), values.device(), "sum_rows");
  return sum_values(values, divisor.value_or(at::Tensor()), dtype);
}

void launch_cuda(Mode mode, const RowLayout& L, OpTensors& o) {
  if (L.rows() == 0) return;
  const c10::cuda::CUDAGuard guard(o.logits.device());
  if (o.status.defined() && o.status.is_cpu()) o.status_ptr = mapped_status(o.status, o.logits.get_device());
  const bool sum = sum_only(mode, o);  // before the launch, which may allocate per-row buffers
  launch_dtypes(mode, L, o);
  if (sum && !o.loss_sum.defined()) {  // fixed order; the mean and dtype in the same launch
    o.loss_sum = sum_values(o.loss, o.loss_divisor, o.loss_dtype);
    o.loss_finished = true;
  }
}

void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& grad_output,
                     const c10::optional<at::Tensor>& grad_mul_used, const c10::optional<at::Tensor>& predictor,
                     const c10::optional<at::Tensor>& changes) {
  check_scale_grad(grad, grad_output, grad_mul_used, predictor, changes);
  const c10::cuda::CUDAGuard guard(grad.device());
  int64_t* changes_ptr = !changes.has_value()  ? nullptr
                         : changes->is_cpu() ? mapped_status(*changes, grad.get_device())  // pinned, mapped
                                             : changes->data_ptr<int64_t>();
  // Strided (in place over strided logits): ATen walks the strides, and the kernel, over no elements, keeps the
  // predictor.  Empty: the kernel for the predictor alone, or nothing.
  const bool dense = grad.is_non_overlapping_and_dense();
  if (!dense) {  // g / m in the accumulation dtype, not rounded to a 2-byte grad's (ATen casts a 0-d operand so)
    const auto acc = acc_dtype(grad.scalar_type());
    const at::Tensor g = grad_output.reshape({}).to(acc);
    const at::Tensor r = grad_mul_used.has_value() ? g / *grad_mul_used : g;
    if (acc != grad.scalar_type())
      grad.copy_(grad.to(acc).mul_(r));
    else
      grad.mul_(r);
  }
  const int64_t n = dense ? grad.numel() : 0;
  if (n == 0 && !predictor.has_value()) return;
  const int threads = 256;
  const bool vec = reinterpret_cast<uintptr_t>(grad.data_ptr()) % 16 == 0;
  const int64_t items = std::max<int64_t>(1, vec ? (n * grad.element_size() + 15) / 16 : n);
  const int64_t blocks = std::min<int64_t>((items + threads - 1) / threads, int64_t{sm_count(grad.get_device())} * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cuda", [&] {
    using grad_t = scalar_t;
    using acc_t = at::opmath_type<grad_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "scale_grad_cuda", [&] {
      launch_kernel(pdl_launches(grad.get_device()), scale_grad_kernel<grad_t, acc_t, scalar_t>,
                    dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, c10::cuda::getCurrentCUDAStream(),
                    grad.data_ptr<grad_t>(), n, grad_output.data_ptr<scalar_t>(),
                    grad_mul_used.has_value() ? grad_mul_used->data_ptr<acc_t>() : nullptr,
                    predictor.has_value() ? predictor->data_ptr<acc_t>() : nullptr, changes_ptr, vec);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mean_scale_cuda(const at::Tensor& target,
                                                               const c10::optional<at::Tensor>& weight,
                                                               int64_t ignore_index, at::ScalarType dtype,
                                                               const at::Tensor& numerator) {
  check_mean_scale(target, weight, dtype);
  const IndexRows rows = index_rows(target);
  const int64_t S = rows.S, sB = rows.sB, sS = rows.sS, n = rows.B * S;
  const c10::cuda::CUDAGuard guard(target.device());
  constexpr int kThreads = 256;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 1024));
  const auto sum_dtype = weight.has_value() ? weight->scalar_type() : at::kLong;
  at::Tensor partial = at::empty({blocks}, target.options().dtype(sum_dtype));
  at::Tensor denom = at::empty({}, target.options().dtype(dtype)), inv = at::empty({}, target.options().dtype(dtype));
  at::Tensor used = at::empty({}, target.options().dtype(dtype));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool pdl = pdl_launches(target.get_device());
  const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
  auto finish = [&](auto sum_tag) {
    using sum_t = decltype(sum_tag);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mean_scale_cuda", [&] {
      launch_kernel(pdl, mean_scale_finish_kernel<sum_t, scalar_t>, dim3(1), dim3(32), 0, stream,
                    partial.data_ptr<sum_t>(), blocks, numerator.defined() ? numerator.data_ptr<scalar_t>() : nullptr,
                    denom.data_ptr<scalar_t>(), inv.data_ptr<scalar_t>(), used.data_ptr<scalar_t>());
    });
  };
  if (!weight.has_value()) {
    launch_kernel(pdl, mean_scale_partial_kernel<int64_t, float>, grid, block, 0, stream, target.data_ptr<int64_t>(),
                  S, sB, sS, n, static_cast<const float*>(nullptr), int64_t{0}, ignore_index,
                  partial.data_ptr<int64_t>());
    finish(int64_t{});
  } else {
    AT_DISPATCH_FLOATING_TYPES(weight->scalar_type(), "mean_scale_cuda", [&] {
      launch_kernel(pdl, mean_scale_partial_kernel<scalar_t, scalar_t>, grid, block, 0, stream,
                    target.data_ptr<int64_t>(), S, sB, sS, n, weight->data_ptr<scalar_t>(), weight->numel(),
                    ignore_index, partial.data_ptr<scalar_t>());
      finish(scalar_t{});
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {denom, inv, used};
}

}  // namespace softmax_ce
