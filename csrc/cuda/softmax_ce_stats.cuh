// Row statistics on the GPU: an online max/sum that can merge partial results, and the block reductions.
#pragma once

#include <cfloat>
#include <limits>

#include "../softmax_ce.h"

namespace softmax_ce {

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
  // PyTorch subtracts the max: a +inf in the row makes inf - inf = NaN (add() kept s finite instead).
  __device__ acc_t log_s() const {
    return m == std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::quiet_NaN() : log(s);
  }
  // The gradient's base where these statistics were taken: e^(x - max) / s, exact for any max (rows' GradBase).
  __device__ acc_t grad_base() const {
    return m == std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::quiet_NaN() : m;
  }
};

// Reduce the statistics over the block; every thread gets the result.
template <typename acc_t>
__device__ __forceinline__ void block_reduce(OnlineStats<acc_t>& st) {
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
__device__ __forceinline__ acc_t block_sum(acc_t v) {
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

}  // namespace softmax_ce
