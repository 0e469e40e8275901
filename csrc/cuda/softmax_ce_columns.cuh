// Fast CUDA kernel for K-dim inputs (N, C, d1..dk): classes strided by S, positions contiguous.  A thread
// owns E neighbouring positions, i.e. one 16-byte chunk per class, and copies its C chunks into its own
// slots of shared memory (cp.async: all C loads in flight at once, no registers held); then walks them for
// an online max/sum per position and again for the gradient, so the logits are read from memory once.
// Class-index targets; float, bfloat16, half; logits and gradient aligned to 16 bytes with S*E-byte class
// strides (else the general thread-per-row kernel runs).  No barrier: each thread touches only its slots.
// kFold (tuning kdim_fold; mean training, unweighted): the mean's denominator counted here rather than by a kernel
// before (two launches reading the targets): each thread first reads its items' targets once, counts the ones not
// ignored and keeps them as bytes in shared memory for its main loop; one grid barrier (a cooperative launch: all
// CTAs resident) and every CTA sums the CTAs' counts, an exact integer, so every CTA has the same 1 / d.
#pragma once

#include <cooperative_groups.h>

#include <type_traits>

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
// kFold: at most this much shared memory per CTA for its threads' target bytes (else the unfolded path).
constexpr int kFoldBudget = 32 * 1024;
constexpr uint8_t kCodeIgnored = 255, kCodeBad = 254;  // a target byte: its class (< kMaxClasses), or these

// kFold's outputs: each CTA's count of targets that are not ignored; the denominator (CTA 0 writes it).
struct MeanFold {
  int* cta_counts;
  float* denom;
  const float* num;  // the gradient's multiplier m (nullptr: 1): the factor m / d
  float* used;       // m as read, by one thread (every CTA's m / d after the grid barrier)
};

// An item's E target bytes, one word (E = 4) or two (E = 8): [item i of the thread][thread].
template <int E>
using Codes = std::conditional_t<E == 4, uint32_t, uint2>;
template <int E>
__device__ __forceinline__ Codes<E> pack_codes(const uint8_t (&c)[E]) {
  uint32_t w[E / 4];
#pragma unroll
  for (int k = 0; k < E / 4; ++k)
    w[k] = c[4 * k] | c[4 * k + 1] << 8 | c[4 * k + 2] << 16 | uint32_t{c[4 * k + 3]} << 24;
  if constexpr (E == 4) return w[0]; else return make_uint2(w[0], w[1]);
}
template <int E>
__device__ __forceinline__ int code_at(const Codes<E>& v, int i) {
  uint32_t w;
  if constexpr (E == 4) w = v; else w = i < 4 ? v.x : v.y;
  return (w >> (8 * (i & 3))) & 0xff;
}

template <typename T, bool kStats, bool kGrad, bool kFold, bool kDyn = false>
__global__ void __launch_bounds__(128, 5) columns_kernel(Args<T> a, MeanFold fold, uint32_t* sched) {
  static_assert(!kFold || (kStats && kGrad), "the mean's denominator: the training pass only");
  static_assert(!(kFold && kDyn), "the fold keeps the targets of its own items: a fixed order");
  pdl_start();
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
  const int64_t items = L.B * per_b, first = static_cast<int64_t>(blockIdx.x) * nt + tid;
  // Item -> (b, s0), its logits, its gradient, and n: its positions inside the row.
  auto locate = [&](int64_t item, int64_t& b, int64_t& s0, int& n) {
    b = static_cast<uint32_t>(item) / static_cast<uint32_t>(per_b);  // < 2^31 items: see the launcher
    s0 = (item - b * per_b) * E;
    n = S - s0 < E ? static_cast<int>(S - s0) : E;
  };
  auto copy_item = [&](int64_t b, int64_t s0) {
    const T* x = a.x + b * L.x_sB + s0;
    for (int c = 0; c < Ci; ++c) copy_async16(&staged[c * nt + tid], x + c * L.x_sC);
  };
  // Per position: its class (C <= kMaxClasses fits an int), or kIgnored / kBad.  One register each: the
  // flags, fill values and weights derive from it (an int64 and four more arrays spilled for E = 8).
  constexpr int kIgnored = -1, kBad = -2;
  auto target_class = [&](int64_t b, int64_t s, bool inside) -> int {
    const int64_t ti = inside ? a.P.index[b * L.t_sB + s * L.t_sS] : a.P.ignore_index;
    const bool ignored = ti == a.P.ignore_index, bad = !ignored && target_out_of_range(ti, C);
    if (bad) rows::flag_bad_target(a.P.status, ti);
    return ignored ? kIgnored : bad ? kBad : static_cast<int>(ti);
  };
  Codes<E>* const codes = reinterpret_cast<Codes<E>*>(staged + Ci * nt);  // kFold: after the logits' slots
  float inv_denom = 0.f;  // kFold: 1 / the mean's denominator
  if constexpr (kFold) {
    int64_t b, s0;
    int n;
    if (first < items) locate(first, b, s0, n), copy_item(b, s0);  // in flight while the targets are read
    int count = 0;
    for (int64_t item = first, k = 0; item < items; item += stride, ++k) {
      locate(item, b, s0, n);
      uint8_t c[E];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const int ti = target_class(b, s0 + i, i < n);
        count += ti != kIgnored;  // as mean_scale counts: every target but ignore_index
        c[i] = ti == kIgnored ? kCodeIgnored : ti == kBad ? kCodeBad : static_cast<uint8_t>(ti);
      }
      codes[k * nt + tid] = pack_codes<E>(c);
    }
    const int cta_count = block_sum(count);
    if (tid == 0) fold.cta_counts[blockIdx.x] = cta_count;
    // m read once, by one thread: another stream's backward may change the guess while this grid runs
    if (blockIdx.x == 0 && tid == 0) *fold.used = fold.num != nullptr ? *fold.num : 1.f;
    cooperative_groups::this_grid().sync();  // every CTA's count is written, and m
    int64_t d = 0;
    for (int q = tid; q < static_cast<int>(gridDim.x); q += nt) d += __ldcg(fold.cta_counts + q);
    const float denom = static_cast<float>(block_sum(d));  // exact: the same bits as mean_scale's
    inv_denom = __ldcg(fold.used) / denom;
    if (blockIdx.x == 0 && tid == 0) *fold.denom = denom;
  }
  // One item of this thread (k: its count so far, for kFold's codes).
  const auto pass = [&](int64_t item, int64_t k) {
    int64_t b, s0;
    int n;
    locate(item, b, s0, n);
    T* g = kGrad ? a.grad + b * L.g_sB + s0 : nullptr;
    if (k > 0 || !kFold) copy_item(b, s0);  // kFold: the first item's copies went out before the targets' reads
    auto chunk = [&](int c, float (&v)[E]) { Chunk<T>::unpack(staged[c * nt + tid], v); };
    int t[E];
    if constexpr (kFold) {
      const Codes<E> cv = codes[k * nt + tid];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const int ci = code_at<E>(cv, i);
        t[i] = ci == kCodeIgnored ? kIgnored : ci == kCodeBad ? kBad : ci;
      }
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) t[i] = target_class(b, s0 + i, i < n);
    }
    auto ok = [&](int i) { return t[i] >= 0; };
    auto fill = [&](int i) { return t[i] == kBad ? NAN : 0.f; };
    auto w_t = [&](int i) { return ok(i) && w ? w[t[i]] : 1.f; };
    copy_async_wait_all();
    rows::GradBase gb[E];  // the gradient's base per position: the max and the sum, taken here or saved
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
      auto loss_at = [&](int i) {
        const float x_t = ok(i) ? static_cast<float>(reinterpret_cast<const T*>(&staged[t[i] * nt + tid])[i]) : 0.f;
        return ok(i) ? row_loss<false>(RowStats<float>{m[i], s[i], W, D[i]}, logf(s[i]), x_t, w_t(i), a.P.eps, C)
                     : fill(i);
      };
      // The rows' stores after the loop, 16 bytes at a time.  Registers (sm_90): 96 / 88 in the bf16 / fp32 training
      // pass (was 88 / 87), 96 / 92 in the forward (80 / 75): 5 CTAs per SM still (their shared memory's limit).
      float loss[E];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        if (i < n) {
          const float l = loss_at(i);
          if (partial)
            loss_acc += l;
          else
            loss[i] = l;  // stored below: all E (16-byte stores) only where n == E
        }
      }
      if (!partial) {  // the rows' losses, and the forward's stats (rows::Args)
        auto max_at = [&](int i) { return !ok(i) ? fill(i) : rows::GradBase::of_stats(m[i], s[i]).b; };
        auto sum_at = [&](int i) { return !ok(i) ? fill(i) : s[i]; };
        auto put4 = [&](float* p, int k, float (&v)[4]) {
          reinterpret_cast<float4*>(p)[k] = make_float4(v[0], v[1], v[2], v[3]);
        };
        const int64_t r0 = b * S + s0;
        uintptr_t at = reinterpret_cast<uintptr_t>(a.loss + r0);
        if constexpr (!kGrad)
          at |= reinterpret_cast<uintptr_t>(a.row_max + r0) | reinterpret_cast<uintptr_t>(a.row_sum + r0);
        const bool aligned = (at & 15) == 0;
        if (n == E && aligned) {  // 16-byte stores: a warp fills whole sectors (4-byte ones, a slice of each)
#pragma unroll
          for (int k = 0; k < E / 4; ++k) {
            const int i = 4 * k;
            float l4[4] = {loss[i], loss[i + 1], loss[i + 2], loss[i + 3]};
            put4(a.loss + r0, k, l4);
            if constexpr (!kGrad) {
              float m4[4] = {max_at(i), max_at(i + 1), max_at(i + 2), max_at(i + 3)};
              float s4[4] = {sum_at(i), sum_at(i + 1), sum_at(i + 2), sum_at(i + 3)};
              put4(a.row_max + r0, k, m4);
              put4(a.row_sum + r0, k, s4);
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < E; ++i) {
            if (i >= n) continue;
            a.loss[r0 + i] = loss[i];
            if constexpr (!kGrad) a.row_max[r0 + i] = max_at(i), a.row_sum[r0 + i] = sum_at(i);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < E; ++i) gb[i] = rows::GradBase::of_stats(m[i], s[i]);
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) gb[i] = i < n ? rows::GradBase::saved(a, b * S + s0 + i) : rows::GradBase{0.f, 1.f};
    }
    RowGrad<float> rg[E];
    if (kGrad) {
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const float f = i >= n ? 0.f : kFold ? inv_denom : a.factor.at(b, s0 + i);
        rg[i] = RowGrad<float>::index(f, w_t(i), W, a.P.eps, C);
        rg[i].p_mul = gb[i].p_mul(rg[i].p_mul);
      }
    }
    if (kGrad) {
      for (int c = 0; c < Ci; ++c) {
        float v[E];
        chunk(c, v);
        const float ac = spread ? (w ? w[c] : 1.f) : 0.f;
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const float gv = ex2((v[i] - gb[i].b) * kLog2e) * rg[i].p_mul - ac * rg[i].c_mul - (c == t[i] ? rg[i].t_sub : 0.f);
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
  };
  if constexpr (!kDyn) {
    for (int64_t item = first, k = 0; item < items; item += stride, ++k) pass(item, k);
    if (partial) {  // every thread of the CTA gets here: the loop above has no early exit
      const float total = block_sum(loss_acc);
      if (tid == 0) a.loss_partials[blockIdx.x] = total;
    }
  } else {
    // Tiles of nt items (tile q: items q * nt + tid) from a counter instead of every gridDim.x-th: the CTA's first
    // tile is blockIdx.x, each later one drawn by thread 0 during the tile before it and passed on in shared
    // memory by parity (read after the tile's barrier; written again two tiles later, past the next barrier).
    // The summed loss goes per tile (loss_partials[q]): a fixed order whichever CTA takes the tile.
    __shared__ int64_t next_tile[2];
    const int64_t tiles = (items + nt - 1) / nt;
    for (int64_t q = blockIdx.x, parity = 0; q < tiles; parity ^= 1) {
      const uint32_t drawn = tid == 0 ? atomicAdd(sched, 1u) : 0u;  // in flight during the tile
      const int64_t item = q * nt + tid;
      if (item < items) pass(item, 0);
      if (tid == 0) next_tile[parity] = gridDim.x + static_cast<int64_t>(drawn);
      if (partial) {
        const float total = block_sum(loss_acc);  // its barriers pass next_tile on
        if (tid == 0) a.loss_partials[q] = total;
        loss_acc = 0.f;
      } else {
        __syncthreads();
      }
      q = next_tile[parity];
    }
  }
}

}  // namespace columns
}  // namespace softmax_ce
