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

// Online row statistics (see RowStats): the max m, sum exp(x - m), and for the spread term A = sum a_c and
// D = sum a_c (m - x_c), re-based whenever the max grows.
template <typename acc_t>
struct OnlineStats : RowStats<acc_t> {
  using RowStats<acc_t>::m;
  using RowStats<acc_t>::s;
  using RowStats<acc_t>::A;
  using RowStats<acc_t>::D;
  __device__ OnlineStats() : RowStats<acc_t>{lowest<acc_t>(), acc_t(0), acc_t(0), acc_t(0)} {}
  __device__ void add(acc_t v) {  // NaN compares false and poisons s, as in PyTorch
    if (v > m) {
      s = s * exp(m - v) + acc_t(1);
      m = v;
    } else {
      s += exp(v - m);
    }
  }
  __device__ void add(acc_t v, acc_t a) {
    if (v > m && A != acc_t(0)) D += (v - m) * A;
    add(v);
    D += a * (m - v);
    A += a;
  }
  __device__ void merge(acc_t om, acc_t os, acc_t oA, acc_t oD) {
    const acc_t nm = om > m ? om : m;
    s = (m == nm ? s : s * exp(m - nm)) + (om == nm ? os : os * exp(om - nm));
    D = D + (A != acc_t(0) && m != nm ? (nm - m) * A : acc_t(0)) + oD +
        (oA != acc_t(0) && om != nm ? (nm - om) * oA : acc_t(0));
    A += oA;
    m = nm;
  }
  // PyTorch subtracts the max: a +inf in the row makes inf - inf = NaN.
  __device__ acc_t lse() const {
    return m == std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::quiet_NaN() : m + log(s);
  }
};

// Reduce the statistics over the block; every thread gets the result.
template <typename acc_t>
__device__ void block_reduce(OnlineStats<acc_t>& st) {
  __shared__ acc_t sh[4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  for (int off = 16; off > 0; off >>= 1)
    st.merge(__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
             __shfl_xor_sync(0xffffffffu, st.A, off), __shfl_xor_sync(0xffffffffu, st.D, off));
  if (lane == 0) sh[0][warp] = st.m, sh[1][warp] = st.s, sh[2][warp] = st.A, sh[3][warp] = st.D;
  __syncthreads();
  st.m = sh[0][0], st.s = sh[1][0], st.A = sh[2][0], st.D = sh[3][0];
  for (int w = 1; w < nwarps; ++w) st.merge(sh[0][w], sh[1][w], sh[2][w], sh[3][w]);  // fixed order: deterministic
  __syncthreads();  // the shared slots are reused by the next row
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = sh[0];
  for (int w = 1; w < nwarps; ++w) v += sh[w];
  __syncthreads();
  return v;
}

// One row, its classes split over `lanes` cooperating threads (lane `lane`); reduce() combines them.
template <typename scalar_t, typename acc_t, typename target_t, bool kStats, bool kGrad, bool kProb, typename Reduce,
          typename Sum>
__device__ void ce_row(const scalar_t* __restrict__ x, const RowLayout& L, const RowParams<scalar_t, acc_t, target_t>& P,
                       acc_t* loss, acc_t* lse_io, scalar_t* __restrict__ grad, const Factor<acc_t>& factor,
                       int64_t r, int lane, int lanes, Reduce reduce, Sum sum) {
  const int64_t b = r / L.S, s = r - b * L.S;
  const scalar_t* xr = x + b * L.x_sB + s * L.x_sS;
  const target_t* yr = kProb ? P.prob + b * L.t_sB + s * L.t_sS : nullptr;
  scalar_t* gr = kGrad ? grad + b * L.g_sB + s * L.g_sS : nullptr;
  const bool spread = kProb || P.eps != acc_t(0);
  int64_t t = -1;
  if (!kProb) {
    t = P.index[b * L.t_sB + s * L.t_sS];
    const bool ignored = t == P.ignore_index;
    if (ignored || target_out_of_range(t, L.C)) {
      // An out-of-range target is never read: its row turns NaN and status records it.
      if (!ignored && lane == 0) {
        atomicExch(reinterpret_cast<unsigned long long*>(P.status + 1), static_cast<unsigned long long>(t));
        atomicExch(reinterpret_cast<unsigned long long*>(P.status), 1ull);
      }
      const acc_t v = ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
      if (kStats && lane == 0) loss[r] = lse_io[r] = v;
      if (kGrad)
        for (int64_t c = lane; c < L.C; c += lanes) gr[c * L.g_sC] = static_cast<scalar_t>(v);
      return;
    }
  }
  const acc_t w_t = !kProb && P.weight ? P.weight[t] : acc_t(1);
  // Read before the block's barrier: an in-place gradient sweep may overwrite it afterwards.
  const acc_t x_t = !kProb && kStats && lane == 0 ? static_cast<acc_t>(xr[t * L.x_sC]) : acc_t(0);
  OnlineStats<acc_t> st;
  acc_t lse;
  if (kStats) {
    for (int64_t c = lane; c < L.C; c += lanes) {
      const acc_t v = static_cast<acc_t>(xr[c * L.x_sC]);
      if (spread)
        st.add(v, class_coef<kProb>(P, yr, L.t_sC, c, L.C));
      else
        st.add(v);
    }
    reduce(st);
    lse = st.lse();
    if (lane == 0) {
      lse_io[r] = lse;
      loss[r] = row_loss<kProb>(st, lse, x_t, w_t, P.eps, L.C);
    }
  } else {
    lse = lse_io[r];
    if (kProb) {
      for (int64_t c = lane; c < L.C; c += lanes) st.A += class_coef<kProb>(P, yr, L.t_sC, c, L.C);
      st.A = sum(st.A);
    }
  }
  if (kGrad) {
    const acc_t f = factor.at(b, s);
    const acc_t W = P.weight ? *P.weight_sum : acc_t(L.C);
    const RowGrad<acc_t> g = kProb ? RowGrad<acc_t>::prob(f, st.A) : RowGrad<acc_t>::index(f, w_t, W, P.eps, L.C);
    for (int64_t c = lane; c < L.C; c += lanes) {
      const acc_t p = exp(static_cast<acc_t>(xr[c * L.x_sC]) - lse);
      const acc_t a = spread ? class_coef<kProb>(P, yr, L.t_sC, c, L.C) : acc_t(0);
      gr[c * L.g_sC] = static_cast<scalar_t>(g.at(p, a, c == t));
    }
  }
}

// Classes contiguous: a block walks each row.
template <typename scalar_t, typename acc_t, typename target_t, bool kStats, bool kGrad, bool kProb>
__global__ void __launch_bounds__(kMaxThreads)
    ce_row_block_kernel(const scalar_t* __restrict__ x, RowLayout L, RowParams<scalar_t, acc_t, target_t> P, acc_t* loss,
                        acc_t* lse_io, scalar_t* __restrict__ grad, Factor<acc_t> factor) {
  for (int64_t r = blockIdx.x; r < L.rows(); r += gridDim.x)
    ce_row<scalar_t, acc_t, target_t, kStats, kGrad, kProb>(
        x, L, P, loss, lse_io, grad, factor, r, threadIdx.x, blockDim.x,
        [](OnlineStats<acc_t>& st) { block_reduce(st); }, [](acc_t v) { return block_sum(v); });
}

// Classes strided (K-dim or transposed logits): a thread per row, so a warp reads neighbouring positions.
template <typename scalar_t, typename acc_t, typename target_t, bool kStats, bool kGrad, bool kProb>
__global__ void ce_row_thread_kernel(const scalar_t* __restrict__ x, RowLayout L, RowParams<scalar_t, acc_t, target_t> P,
                                     acc_t* loss, acc_t* lse_io, scalar_t* __restrict__ grad, Factor<acc_t> factor) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < L.rows(); r += stride)
    ce_row<scalar_t, acc_t, target_t, kStats, kGrad, kProb>(
        x, L, P, loss, lse_io, grad, factor, r, 0, 1, [](OnlineStats<acc_t>&) {}, [](acc_t v) { return v; });
}

int row_block_threads(int64_t C) {
  int threads = 32;
  while (threads < kMaxThreads && threads * 8 < C) threads *= 2;  // about 8+ classes per thread
  return threads;
}

template <typename scalar_t, typename target_t, bool kStats, bool kGrad, bool kProb>
void launch_typed(const RowLayout& L, const OpTensors& o) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto P = row_params<scalar_t, acc_t, target_t>(o, kProb);
  const Factor<acc_t> f = factor_of<acc_t>(o);
  const scalar_t* x = o.logits.data_ptr<scalar_t>();
  acc_t* loss = kStats ? o.loss.data_ptr<acc_t>() : nullptr;
  acc_t* lse = o.lse.data_ptr<acc_t>();
  scalar_t* grad = kGrad ? o.grad.data_ptr<scalar_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = L.rows();
  constexpr int64_t kMaxGrid = (1LL << 31) - 1;
  // Classes contiguous, or few rows: a block walks a row.  Otherwise neighbouring rows are neighbours in
  // memory, and a thread per row keeps the warp's loads coalesced.
  if (L.x_sC == 1 || rows < 1024) {
    const int threads = row_block_threads(L.C);
    const int64_t blocks = std::min<int64_t>(rows, kMaxGrid);
    ce_row_block_kernel<scalar_t, acc_t, target_t, kStats, kGrad, kProb>
        <<<blocks, threads, 0, stream>>>(x, L, P, loss, lse, grad, f);
  } else {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((rows + threads - 1) / threads, kMaxGrid);
    ce_row_thread_kernel<scalar_t, acc_t, target_t, kStats, kGrad, kProb>
        <<<blocks, threads, 0, stream>>>(x, L, P, loss, lse, grad, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename target_t, bool kProb>
void launch_modes(Mode mode, const RowLayout& L, const OpTensors& o) {
  switch (mode) {
    case Mode::kStats: return launch_typed<scalar_t, target_t, true, false, kProb>(L, o);
    case Mode::kStatsGrad: return launch_typed<scalar_t, target_t, true, true, kProb>(L, o);
    case Mode::kGrad: return launch_typed<scalar_t, target_t, false, true, kProb>(L, o);
  }
}

// Probability targets come in the logits' dtype or in the accumulation dtype (no rounding of float32 targets).
void launch_dtypes(Mode mode, const RowLayout& L, const OpTensors& o) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.logits.scalar_type(), "softmax_ce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!o.target.is_floating_point())
      launch_modes<scalar_t, scalar_t, false>(mode, L, o);
    else if (o.target.scalar_type() == o.logits.scalar_type())
      launch_modes<scalar_t, scalar_t, true>(mode, L, o);
    else
      launch_modes<scalar_t, acc_t, true>(mode, L, o);
  });
}

void launch_cuda(Mode mode, const RowLayout& L, const OpTensors& o) {
  if (L.rows() == 0) return;
  const c10::cuda::CUDAGuard guard(o.logits.device());
  launch_dtypes(mode, L, o);
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
                                                double eps, const at::Tensor& status) {
  return forward_op(launch_cuda, logits, target, weight, ignore_index, eps, status);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_backward_cuda(const at::Tensor& logits,
                                                                     const at::Tensor& target,
                                                                     const c10::optional<at::Tensor>& weight,
                                                                     int64_t ignore_index, double eps,
                                                                     const at::Tensor& grad_scale,
                                                                     const at::Tensor& status) {
  return forward_backward_op(launch_cuda, logits, target, weight, ignore_index, eps, grad_scale, status);
}

at::Tensor backward_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                         const c10::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                         double eps) {
  return backward_op(launch_cuda, grad_rows, logits, target, weight, lse, ignore_index, eps);
}

std::tuple<at::Tensor, at::Tensor> forward_backward_inplace_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                                const c10::optional<at::Tensor>& weight,
                                                                int64_t ignore_index, double eps,
                                                                const at::Tensor& grad_scale,
                                                                const at::Tensor& status) {
  auto out = forward_backward_op(launch_cuda, logits, target, weight, ignore_index, eps, grad_scale, status, nullptr,
                                 /*inplace=*/true);
  return {std::get<0>(out), std::get<1>(out)};
}

void backward_inplace_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                         const c10::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                         double eps) {
  backward_op(launch_cuda, grad_rows, logits, target, weight, lse, ignore_index, eps, nullptr, /*inplace=*/true);
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

at::Tensor sum_rows_cuda(const at::Tensor& values) {
  return values.sum();  // CUDA's reduction order is fixed for a given size and device
}

}  // namespace

TORCH_LIBRARY_IMPL(softmax_ce_ext, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("forward_backward", &forward_backward_cuda);
  m.impl("backward", &backward_cuda);
  m.impl("forward_backward_", &forward_backward_inplace_cuda);
  m.impl("backward_", &backward_inplace_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
  m.impl("sum_rows", &sum_rows_cuda);
}

}  // namespace softmax_ce
