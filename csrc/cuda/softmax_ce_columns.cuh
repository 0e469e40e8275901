// Fast CUDA kernel for K-dim inputs (N, C, d1..dk): classes strided by S, positions contiguous.  A thread
// owns E neighbouring positions, i.e. one 16-byte chunk per class, and copies its C chunks into its own
// slots of shared memory (cp.async: all C loads in flight at once, no registers held); then walks them for
// an online max/sum per position and again for the gradient, so the logits are read from memory once.
// Class-index targets; float, bfloat16, half; logits and gradient aligned to 16 bytes with S*E-byte class
// strides (else the general thread-per-row kernel runs).  No barrier: each thread touches only its slots.
#pragma once

#include "softmax_ce_chunks.cuh"
#include "softmax_ce_rows.cuh"

namespace softmax_ce {
namespace columns {
using namespace chunks;
using rows::Args;
using rows::kInf;

// Shared memory per thread: C chunks.  Threads per block shrink as C grows; beyond kMaxClasses, the general kernel.
constexpr int kMaxClasses = 192;
constexpr int kBlockBudget = 96 * 1024;

template <typename T, bool kStats, bool kGrad>
__global__ void __launch_bounds__(128, 1) columns_kernel(Args<T> a) {
  constexpr int E = Chunk<T>::E;
  extern __shared__ uint4 staged[];  // staged[c * blockDim.x + threadIdx.x]: this thread's chunk of class c
  const RowLayout& L = a.L;
  const int64_t C = L.C, S = L.S, per_b = (S + E - 1) / E;
  const int Ci = static_cast<int>(C);  // <= kMaxClasses: class loops in 32 bits
  const int tid = threadIdx.x, nt = blockDim.x;
  const bool spread = a.P.eps != 0.f;
  const float* w = a.P.weight;
  const float W = w ? *a.P.weight_sum : static_cast<float>(C);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * nt;
  const bool partial = a.loss_partials != nullptr;
  float loss_acc = 0.f;  // this thread's positions, in its fixed order
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * nt + tid; item < L.B * per_b; item += stride) {
    const int64_t b = static_cast<uint32_t>(item) / static_cast<uint32_t>(per_b);  // < 2^31 items: see the launcher
    const int64_t s0 = (item - b * per_b) * E;
    const int n = S - s0 < E ? static_cast<int>(S - s0) : E;  // positions of this chunk inside the row
    const T* x = a.x + b * L.x_sB + s0;
    T* g = kGrad ? a.grad + b * L.g_sB + s0 : nullptr;
    for (int c = 0; c < Ci; ++c) copy_async16(&staged[c * nt + tid], x + c * L.x_sC);
    auto chunk = [&](int c, float (&v)[E]) { Chunk<T>::unpack(staged[c * nt + tid], v); };
    // Per position: its class (C <= kMaxClasses fits an int), or kIgnored / kBad.  One register each: the
    // flags, fill values and weights derive from it (an int64 and four more arrays spilled for E = 8).
    constexpr int kIgnored = -1, kBad = -2;
    int t[E];
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int64_t* tp = a.P.index + b * L.t_sB + (s0 + i) * L.t_sS;
      const int64_t ti = i >= n ? a.P.ignore_index : *tp;
      const bool ignored = ti == a.P.ignore_index, bad = !ignored && target_out_of_range(ti, C);
      if (bad) rows::flag_bad_target(a.P.status, ti);
      t[i] = ignored ? kIgnored : bad ? kBad : static_cast<int>(ti);
    }
    auto ok = [&](int i) { return t[i] >= 0; };
    auto fill = [&](int i) { return t[i] == kBad ? NAN : 0.f; };
    auto w_t = [&](int i) { return ok(i) && w ? w[t[i]] : 1.f; };
    copy_async_wait_all();
    float lse[E];
    if (kStats) {
      float m[E], s[E], D[E];
#pragma unroll
      for (int i = 0; i < E; ++i) m[i] = -FLT_MAX, s[i] = 0.f, D[i] = 0.f;
      // The max in a pass of its own, then the sum: one exponential per element instead of two.
      for (int c = 0; c < Ci; ++c) {
        float v[E];
        chunk(c, v);
#pragma unroll
        for (int i = 0; i < E; ++i) m[i] = fmaxf(m[i], v[i]);  // NaN never becomes the max; it poisons s
      }
      for (int c = 0; c < Ci; ++c) {
        float v[E];
        chunk(c, v);
#pragma unroll
        for (int i = 0; i < E; ++i) s[i] += ex2((v[i] - m[i]) * kLog2e);
      }
      if (spread) {  // the smoothing term, sum_c a_c (m - x_c), once each max is final
        for (int c = 0; c < Ci; ++c) {
          float v[E];
          chunk(c, v);
          const float ac = w ? w[c] : 1.f;
#pragma unroll
          for (int i = 0; i < E; ++i) D[i] += ac * (m[i] - v[i]);  // 0 * -inf is NaN, as in PyTorch
        }
      }
#pragma unroll
      for (int i = 0; i < E; ++i) {
        lse[i] = rows::lse_of(m[i], s[i]);
        if (i < n) {
          const int64_t r = b * S + s0 + i;
          const float x_t = ok(i) ? static_cast<float>(reinterpret_cast<const T*>(&staged[t[i] * nt + tid])[i]) : 0.f;
          const float loss =
              ok(i) ? row_loss<false>(RowStats<float>{m[i], s[i], W, D[i]}, logf(s[i]), x_t, w_t(i), a.P.eps, C) : fill(i);
          if (partial) {
            loss_acc += loss;
          } else {
            a.loss[r] = loss;
            a.lse[r] = ok(i) ? lse[i] : fill(i);
          }
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) lse[i] = i < n ? a.lse[b * S + s0 + i] : 0.f;
    }
    RowGrad<float> rg[E];
    if (kGrad) {
#pragma unroll
      for (int i = 0; i < E; ++i) rg[i] = RowGrad<float>::index(i < n ? a.factor.at(b, s0 + i) : 0.f, w_t(i), W, a.P.eps, C);
    }
    if (kGrad) {
      for (int c = 0; c < Ci; ++c) {
        float v[E];
        chunk(c, v);
        const float ac = spread ? (w ? w[c] : 1.f) : 0.f;
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const float gv = ex2((v[i] - lse[i]) * kLog2e) * rg[i].p_mul - ac * rg[i].c_mul - (c == t[i] ? rg[i].t_sub : 0.f);
          v[i] = ok(i) ? gv : fill(i);
        }
        if (n == E) {
          store_stream(reinterpret_cast<uint4*>(g + c * L.g_sC), Chunk<T>::pack(v));
        } else {
#pragma unroll
          for (int i = 0; i < E; ++i)
            if (i < n) g[c * L.g_sC + i] = static_cast<T>(v[i]);
        }
      }
    }
  }
  if (partial) {  // every thread of the CTA gets here: the loop above has no early exit
    const float total = block_sum(loss_acc);
    if (tid == 0) a.loss_partials[blockIdx.x] = total;
  }
}

}  // namespace columns
}  // namespace softmax_ce
