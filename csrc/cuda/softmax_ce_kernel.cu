// CUDA kernels.  Rows whose classes are contiguous: one block per row, an online max/sum so the row is
// read once from memory (the gradient sweep re-reads it from L2).  Rows whose classes are strided (K-dim
// inputs, transposed logits): one thread per row, so neighbouring threads read neighbouring positions.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <limits>

#include "../softmax_ce.h"

namespace softmax_ce {
namespace {

constexpr int kMaxThreads = 512;

// Lowest finite value: an online max that starts here never computes (-inf) - (-inf).
template <typename T>
__device__ __forceinline__ T lowest();
template <>
__device__ __forceinline__ float lowest<float>() { return -FLT_MAX; }
template <>
__device__ __forceinline__ double lowest<double>() { return -DBL_MAX; }

// Running (max, sum of exp(x - max)) of a set of logits.
template <typename acc_t>
struct MaxSum {
  acc_t m, s;
  __device__ void add(acc_t v) {  // NaN compares false and poisons s, as in PyTorch
    if (v > m) {
      s = s * exp(m - v) + acc_t(1);
      m = v;
    } else {
      s += exp(v - m);
    }
  }
  __device__ void merge(acc_t om, acc_t os) {
    const acc_t nm = om > m ? om : m;
    s = (m == nm ? s : s * exp(m - nm)) + (om == nm ? os : os * exp(om - nm));
    m = nm;
  }
  // PyTorch subtracts the max: a +inf in the row makes inf - inf = NaN.
  __device__ acc_t lse() const {
    return m == std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::quiet_NaN() : m + log(s);
  }
};

template <typename acc_t>
struct Factor {
  const acc_t* p;
  int64_t sB, sS;
  __device__ acc_t at(int64_t b, int64_t s) const { return p[b * sB + s * sS]; }
};

// Reduce (m, s, sum_wx) over the block; every thread gets the result.
template <typename acc_t>
__device__ void block_reduce(MaxSum<acc_t>& ms, acc_t& swx) {
  __shared__ acc_t sh_m[32], sh_s[32], sh_w[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    ms.merge(__shfl_xor_sync(0xffffffffu, ms.m, off), __shfl_xor_sync(0xffffffffu, ms.s, off));
    swx += __shfl_xor_sync(0xffffffffu, swx, off);
  }
  if (lane == 0) sh_m[warp] = ms.m, sh_s[warp] = ms.s, sh_w[warp] = swx;
  __syncthreads();
  ms = {sh_m[0], sh_s[0]};
  swx = sh_w[0];
  for (int w = 1; w < nwarps; ++w) {  // same order in every thread: deterministic
    ms.merge(sh_m[w], sh_s[w]);
    swx += sh_w[w];
  }
  __syncthreads();  // the shared slots are reused by the next row
}

// Handles an ignored or out-of-range row; returns true when the row is done.
template <typename scalar_t, typename acc_t, bool kStats, bool kGrad>
__device__ bool skip_row(int64_t t, const RowParams<acc_t>& P, const RowLayout& L, int64_t r, acc_t* loss,
                         acc_t* lse_io, scalar_t* gr, int c0, int cstep) {
  const bool ignored = t == P.ignore_index;
  if (!ignored && !target_out_of_range(t, L.C)) return false;
  // An out-of-range target is never read; it turns the row to NaN.
  const acc_t v = ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
  if (kStats && c0 == 0) loss[r] = lse_io[r] = v;
  if (kGrad)
    for (int64_t c = c0; c < L.C; c += cstep) gr[c * L.g_sC] = static_cast<scalar_t>(v);
  return true;
}

template <typename scalar_t, typename acc_t, bool kStats, bool kGrad>
__global__ void __launch_bounds__(kMaxThreads)
    ce_row_block_kernel(const scalar_t* __restrict__ x, RowLayout L, RowParams<acc_t> P, acc_t* loss, acc_t* lse_io,
                        scalar_t* __restrict__ grad, Factor<acc_t> factor) {
  const acc_t W = P.weight ? *P.weight_sum : acc_t(L.C);
  for (int64_t r = blockIdx.x; r < L.rows(); r += gridDim.x) {
    const int64_t b = r / L.S, s = r - b * L.S;
    const scalar_t* xr = x + b * L.x_sB + s * L.x_sS;
    scalar_t* gr = kGrad ? grad + b * L.g_sB + s * L.g_sS : nullptr;
    const int64_t t = P.target[b * L.t_sB + s * L.t_sS];
    if (skip_row<scalar_t, acc_t, kStats, kGrad>(t, P, L, r, loss, lse_io, gr, threadIdx.x, blockDim.x)) continue;
    const acc_t w_t = P.weight ? P.weight[t] : acc_t(1);
    acc_t lse;
    if (kStats) {
      MaxSum<acc_t> ms{lowest<acc_t>(), acc_t(0)};
      acc_t swx = 0;
      for (int64_t c = threadIdx.x; c < L.C; c += blockDim.x) {
        const acc_t v = static_cast<acc_t>(xr[c * L.x_sC]);
        ms.add(v);
        if (P.eps != acc_t(0)) swx += (P.weight ? P.weight[c] : acc_t(1)) * v;
      }
      block_reduce(ms, swx);
      lse = ms.lse();
      if (threadIdx.x == 0) {
        lse_io[r] = lse;
        loss[r] = row_loss<acc_t>(lse, static_cast<acc_t>(xr[t * L.x_sC]), w_t, W, swx, P.eps, L.C);
      }
    } else {
      lse = lse_io[r];
    }
    if (kGrad) {
      const RowGrad<acc_t> g(factor.at(b, s), w_t, W, P.eps, L.C);
      for (int64_t c = threadIdx.x; c < L.C; c += blockDim.x) {
        const acc_t p = exp(static_cast<acc_t>(xr[c * L.x_sC]) - lse);
        gr[c * L.g_sC] = static_cast<scalar_t>(g.at(p, P.weight ? P.weight[c] : acc_t(1), c == t));
      }
    }
  }
}

template <typename scalar_t, typename acc_t, bool kStats, bool kGrad>
__global__ void ce_row_thread_kernel(const scalar_t* __restrict__ x, RowLayout L, RowParams<acc_t> P, acc_t* loss,
                                     acc_t* lse_io, scalar_t* __restrict__ grad, Factor<acc_t> factor) {
  const acc_t W = P.weight ? *P.weight_sum : acc_t(L.C);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < L.rows(); r += stride) {
    const int64_t b = r / L.S, s = r - b * L.S;
    const scalar_t* xr = x + b * L.x_sB + s * L.x_sS;
    scalar_t* gr = kGrad ? grad + b * L.g_sB + s * L.g_sS : nullptr;
    const int64_t t = P.target[b * L.t_sB + s * L.t_sS];
    if (skip_row<scalar_t, acc_t, kStats, kGrad>(t, P, L, r, loss, lse_io, gr, 0, 1)) continue;
    const acc_t w_t = P.weight ? P.weight[t] : acc_t(1);
    acc_t lse;
    if (kStats) {
      MaxSum<acc_t> ms{lowest<acc_t>(), acc_t(0)};
      acc_t swx = 0;
      for (int64_t c = 0; c < L.C; ++c) {
        const acc_t v = static_cast<acc_t>(xr[c * L.x_sC]);
        ms.add(v);
        if (P.eps != acc_t(0)) swx += (P.weight ? P.weight[c] : acc_t(1)) * v;
      }
      lse = ms.lse();
      lse_io[r] = lse;
      loss[r] = row_loss<acc_t>(lse, static_cast<acc_t>(xr[t * L.x_sC]), w_t, W, swx, P.eps, L.C);
    } else {
      lse = lse_io[r];
    }
    if (kGrad) {
      const RowGrad<acc_t> g(factor.at(b, s), w_t, W, P.eps, L.C);
      for (int64_t c = 0; c < L.C; ++c) {
        const acc_t p = exp(static_cast<acc_t>(xr[c * L.x_sC]) - lse);
        gr[c * L.g_sC] = static_cast<scalar_t>(g.at(p, P.weight ? P.weight[c] : acc_t(1), c == t));
      }
    }
  }
}

int row_block_threads(int64_t C) {
  int threads = 32;
  while (threads < kMaxThreads && threads * 8 < C) threads *= 2;  // about 8+ classes per thread
  return threads;
}

template <typename scalar_t, bool kStats, bool kGrad>
void launch_typed(const RowLayout& L, const OpTensors& o) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowParams<acc_t> P{o.target.data_ptr<int64_t>(), o.weight.defined() ? o.weight.data_ptr<acc_t>() : nullptr,
                           o.weight_sum.defined() ? o.weight_sum.data_ptr<acc_t>() : nullptr, o.ignore_index,
                           static_cast<acc_t>(o.eps)};
  Factor<acc_t> f{nullptr, 0, 0};
  if (kGrad)
    f = {o.factor.data_ptr<acc_t>(), o.factor.dim() ? o.factor.stride(0) : 0, o.factor.dim() ? o.factor.stride(1) : 0};
  const scalar_t* x = o.logits.data_ptr<scalar_t>();
  acc_t* loss = kStats ? o.loss.data_ptr<acc_t>() : nullptr;
  acc_t* lse = o.lse.data_ptr<acc_t>();
  scalar_t* grad = kGrad ? o.grad.data_ptr<scalar_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = L.rows();
  constexpr int64_t kMaxGrid = (1LL << 31) - 1;
  // Classes contiguous, or a single row: a block walks the row.  Otherwise neighbouring rows are neighbours
  // in memory, and a thread per row keeps the warp's loads coalesced.
  if (L.x_sC == 1 || rows < 1024) {
    const int threads = row_block_threads(L.C);
    const int64_t blocks = std::min<int64_t>(rows, kMaxGrid);
    ce_row_block_kernel<scalar_t, acc_t, kStats, kGrad>
        <<<blocks, threads, 0, stream>>>(x, L, P, loss, lse, grad, f);
  } else {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((rows + threads - 1) / threads, kMaxGrid);
    ce_row_thread_kernel<scalar_t, acc_t, kStats, kGrad>
        <<<blocks, threads, 0, stream>>>(x, L, P, loss, lse, grad, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_cuda(Mode mode, const RowLayout& L, const OpTensors& o) {
  if (L.rows() == 0) return;
  const c10::cuda::CUDAGuard guard(o.logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.logits.scalar_type(), "softmax_ce_cuda", [&] {
    switch (mode) {
      case Mode::kStats: return launch_typed<scalar_t, true, false>(L, o);
      case Mode::kStatsGrad: return launch_typed<scalar_t, true, true>(L, o);
      case Mode::kGrad: return launch_typed<scalar_t, false, true>(L, o);
    }
  });
}

// grad *= g unless g == 1; g is read on the device, so the host never waits for it.
template <typename scalar_t, typename acc_t>
__global__ void scale_grad_kernel(scalar_t* __restrict__ grad, int64_t n, const acc_t* g_ptr) {
  const acc_t g = *g_ptr;
  if (g == acc_t(1)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * g);
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                double eps) {
  return forward_op(launch_cuda, logits, target, weight, ignore_index, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_backward_cuda(const at::Tensor& logits,
                                                                     const at::Tensor& target,
                                                                     const c10::optional<at::Tensor>& weight,
                                                                     int64_t ignore_index, double eps,
                                                                     const at::Tensor& grad_scale) {
  return forward_backward_op(launch_cuda, logits, target, weight, ignore_index, eps, grad_scale);
}

at::Tensor backward_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                         const c10::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                         double eps) {
  return backward_op(launch_cuda, grad_rows, logits, target, weight, lse, ignore_index, eps);
}

void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_grad(grad, grad_output);
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const int threads = 256;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, grad.get_device()));
  const int64_t blocks = std::min<int64_t>((grad.numel() + threads - 1) / threads, int64_t{sms} * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scale_grad_kernel<scalar_t, acc_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), grad.numel(), grad_output.data_ptr<acc_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce_ext, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("forward_backward", &forward_backward_cuda);
  m.impl("backward", &backward_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
}

}  // namespace softmax_ce
