// Fast CUDA kernels for rows whose classes are contiguous, with class-index targets and float, bfloat16 or
// half logits (the training case).  All of them move 16-byte chunks (softmax_ce_chunks.cuh).
//   warp_rows:   up to 32*8 chunks per row (C <= 2041 in 2-byte dtypes, 1021 in float32): a warp per row, the
//                row held in registers as e^(x - max), so the gradient costs a multiply instead of a second exp.
//   slice_rows:  loss and gradient of longer rows: the row split over a cluster of CTAs (sm_90; one CTA
//                elsewhere), each staging its slice in shared memory, so the row is read from memory once;
//                the slices' statistics are exchanged through distributed shared memory.
//   stream_rows: the rest (forward only; gradient from a saved lse; rows longer than the slices allow): a CTA
//                per row; with loss and gradient together, the gradient sweep re-reads the row from L2.
// Exponentials are ex2.approx of (x - max) * log2(e) (one special-function instruction, where expf costs
// six; at Hopper bandwidth in bfloat16 the arithmetic would otherwise be the bound); the subtraction comes
// first so that large logits lose no bits; max, sums and log are float32 as elsewhere.
#pragma once

#include <cooperative_groups.h>

#include <cmath>

#include "softmax_ce_chunks.cuh"
#include "softmax_ce_stats.cuh"

namespace softmax_ce {
namespace rows {
using namespace chunks;

template <typename T>
struct Args {
  const T* x;
  T* grad;  // may equal x (in-place ops): every element is read before its owner overwrites it
  RowLayout L;
  RowParams<T, float, T> P;
  float* loss;  // per-row outputs; both nullptr when the kernel writes loss_partials instead
  float* lse;
  Factor<float> factor;
  float* loss_partials;  // one partial loss sum per CTA (the K-dim training pass), or nullptr
};

constexpr int kWarpRowThreads = 256;
constexpr int kStreamThreads = 256;  // 512 capped registers at 128 and spilled on sm_80
constexpr int kSliceThreads = 256;
constexpr int kMaxCluster = 16;
constexpr float kInf = INFINITY;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Every lane ends with the same bits: each step adds the same two partials, in either order.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// status is null for the gradient-only ops (the forward that came first already reported the target).
__device__ __forceinline__ void flag_bad_target(int64_t* status, int64_t t) {
  if (status == nullptr) return;
  atomicExch(reinterpret_cast<unsigned long long*>(status + 1), static_cast<unsigned long long>(t));
  atomicExch(reinterpret_cast<unsigned long long*>(status), 1ull);
}

// Elements of chunk `first .. first+E-1` outside [0, C) become -inf: they add e^-inf = 0 to every sum.
template <int E>
__device__ __forceinline__ void mask_chunk(float (&v)[E], int64_t first, int64_t C) {
  if (first >= 0 && first + E <= C) return;
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (first + e < 0 || first + e >= C) v[e] = -kInf;
}

// a_c of the smoothing term (the class weight; 0 outside the row).
__device__ __forceinline__ float class_weight(const float* weight, int64_t c, int64_t C) {
  if (c < 0 || c >= C) return 0.f;
  return weight ? weight[c] : 1.f;
}

// Per-thread online statistics over whole chunks: the chunk's max first, so the running sums are re-based
// at most once per chunk.  Merged across threads with OnlineStats::merge.
struct ChunkStats {
  float m = -FLT_MAX, s = 0.f, A = 0.f, D = 0.f;
  template <int E>
  __device__ __forceinline__ void add(const float (&v)[E], int64_t first, int64_t C, bool spread, const float* w) {
    float cm = v[0];
#pragma unroll
    for (int e = 1; e < E; ++e) cm = v[e] > cm ? v[e] : cm;
    if (cm > m) {  // NaN compares false: it never becomes the max, and poisons s below, as in PyTorch
      s *= ex2((m - cm) * kLog2e);
      if (spread && A != 0.f) D += (cm - m) * A;
      m = cm;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) s += ex2((v[e] - m) * kLog2e);
    if (spread) {
#pragma unroll
      for (int e = 0; e < E; ++e) {  // lanes outside the row hold -inf: skipped, not 0 * inf
        const bool in_row = first + e >= 0 && first + e < C;
        const float a = class_weight(w, first + e, C);
        A += a;
        D += in_row ? a * (m - v[e]) : 0.f;
      }
    }
  }
  __device__ OnlineStats<float> online() const {
    OnlineStats<float> o;
    o.m = m, o.s = s, o.A = A, o.D = D;
    return o;
  }
};

// The gradient of one chunk: f * (p * p_mul - a_c * c_mul - [c == t] * t_sub).
template <int E>
__device__ __forceinline__ void grad_chunk(float (&out)[E], const float (&p)[E], int64_t first, int64_t C, int64_t t,
                                           const RowGrad<float>& g, bool spread, const float* w) {
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = p[e] * g.p_mul - (spread ? class_weight(w, first + e, C) * g.c_mul : 0.f);
  if (static_cast<uint64_t>(t - first) < static_cast<uint64_t>(E)) {
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] -= first + e == t ? g.t_sub : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ bool same_alignment(const T* x, const T* g) {
  return (reinterpret_cast<uintptr_t>(x) & 15) == (reinterpret_cast<uintptr_t>(g) & 15);
}

// Row r = (b, s).  The launcher sends only fewer than 2^31 rows here: a 32-bit division is a few instructions
// where a 64-bit one is a called subroutine (whose saved registers spilled).
struct RowIndex {
  int64_t b, s;
};
__device__ __forceinline__ RowIndex split_row(int64_t r, int64_t S) {
  const uint32_t b = static_cast<uint32_t>(r) / static_cast<uint32_t>(S);
  return {b, r - int64_t{b} * S};
}

// What every row kernel knows of row r: its (b, s), logits, gradient row, chunks and class-index target.
template <typename T, bool kGrad>
struct Row {
  int64_t b, s;
  const T* x;
  T* g;  // nullptr without a gradient
  RowChunks<T> xk;
  bool same_shift;  // the gradient row has the logits' 16-byte alignment
  int64_t t;
  __device__ Row(const Args<T>& a, int64_t r)
      : b(split_row(r, a.L.S).b),
        s(r - b * a.L.S),
        x(a.x + b * a.L.x_sB + s * a.L.x_sS),
        g(kGrad ? a.grad + b * a.L.g_sB + s * a.L.g_sS : nullptr),
        xk(x, a.L.C),
        same_shift(!kGrad || same_alignment(x, g)),
        t(a.P.index[b * a.L.t_sB + s * a.L.t_sS]) {}
};

// The row's class-index target; false (after writing what such a row gets) when it is ignored or out of range.
// writer: the thread that writes the row's loss/lse and status; [k0, k1) step dk: the chunks this thread fills.
template <typename T, bool kStats, bool kGrad>
__device__ __forceinline__ bool valid_row(const Args<T>& a, int64_t r, const Row<T, kGrad>& row, bool writer,
                                          int64_t k0, int64_t k1, int64_t dk) {
  const int64_t t = row.t;
  const bool ignored = t == a.P.ignore_index;
  if (!ignored && !target_out_of_range(t, a.L.C)) return true;
  const float fill = ignored ? 0.f : NAN;
  if (writer) {
    if (!ignored) flag_bad_target(a.P.status, t);
    if (kStats) a.loss[r] = a.lse[r] = fill;
  }
  if (kGrad) {
    float v[Chunk<T>::E];
#pragma unroll
    for (int e = 0; e < Chunk<T>::E; ++e) v[e] = fill;
    for (int64_t k = k0; k < k1; k += dk) store_chunk(row.g, row.xk, row.same_shift, k, a.L.C, v);
  }
  return false;
}

__device__ __forceinline__ float lse_of(float m, float s) { return m == kInf ? NAN : m + logf(s); }

// ---- warp_rows: a warp per row, VPT chunks per lane in registers.
template <typename T, int VPT, bool kStats, bool kGrad>
__global__ void __launch_bounds__(kWarpRowThreads) warp_rows_kernel(Args<T> a) {
  constexpr int E = Chunk<T>::E;
  const RowLayout& L = a.L;
  const int64_t C = L.C;
  const int lane = threadIdx.x & 31;
  const bool spread = a.P.eps != 0.f;
  const float* w = a.P.weight;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < L.rows(); r += warps) {
    const Row<T, kGrad> row(a, r);
    const auto& [b, s, xr, gr, xk, same_shift, t] = row;
    if (!valid_row<T, kStats, kGrad>(a, r, row, lane == 0, lane, xk.count, 32)) continue;
    const float x_t = kStats && lane == 0 ? static_cast<float>(xr[t]) : 0.f;  // before any lane overwrites it
    float v[VPT][E];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t k = j * 32 + lane;
      if (k < xk.count) {
        Chunk<T>::unpack(load_stream(xk.base + k), v[j]);
        mask_chunk(v[j], xk.first_class(k), C);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) v[j][e] = -kInf;
      }
    }
    const float w_t = w ? w[t] : 1.f;
    float lse, inv_s = 0.f;
    if (kStats) {
      float m = -FLT_MAX;  // the lowest finite value: an all -inf row never computes (-inf) - (-inf)
#pragma unroll
      for (int j = 0; j < VPT; ++j)
#pragma unroll
        for (int e = 0; e < E; ++e) m = v[j][e] > m ? v[j][e] : m;
      m = warp_max(m);
      float sum = 0.f, A = 0.f, D = 0.f;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const int64_t first = xk.first_class(j * 32 + lane);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          if (spread) {
            const float ac = class_weight(w, first + e, C);
            A += ac;
            D += first + e >= 0 && first + e < C ? ac * (m - v[j][e]) : 0.f;  // PyTorch: 0 * -inf is NaN
          }
          const float ev = ex2((v[j][e] - m) * kLog2e);
          sum += ev;
          if (kGrad) v[j][e] = ev;  // e^(x - m): the gradient's p is ev / sum
        }
      }
      sum = warp_sum(sum);
      if (spread) A = warp_sum(A), D = warp_sum(D);
      lse = lse_of(m, sum);
      inv_s = 1.f / sum;
      if (lane == 0) {
        a.lse[r] = lse;
        a.loss[r] = row_loss<false>(RowStats<float>{m, sum, A, D}, logf(sum), x_t, w_t, a.P.eps, C);
      }
    } else {
      lse = a.lse[r];
    }
    if (kGrad) {
      const float W = w ? *a.P.weight_sum : static_cast<float>(C);
      const RowGrad<float> g = RowGrad<float>::index(a.factor.at(b, s), w_t, W, a.P.eps, C);
      __syncwarp();  // in place: lane 0's read of x_t is ordered before the stores below
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const int64_t k = j * 32 + lane;
        if (k >= xk.count) continue;
        float p[E], out[E];
#pragma unroll
        for (int e = 0; e < E; ++e) p[e] = kStats ? v[j][e] * inv_s : ex2((v[j][e] - lse) * kLog2e);
        grad_chunk(out, p, xk.first_class(k), C, t, g, spread, w);
        store_chunk(gr, xk, same_shift, k, C, out);
      }
    }
  }
}

// ---- stream_rows: a CTA per row, U chunks in flight per thread.
template <typename T, bool kStats, bool kGrad>
__global__ void __launch_bounds__(kStreamThreads) stream_rows_kernel(Args<T> a) {
  constexpr int E = Chunk<T>::E, U = 4;
  const RowLayout& L = a.L;
  const int64_t C = L.C;
  const int tid = threadIdx.x, nt = blockDim.x;
  const bool spread = a.P.eps != 0.f;
  const float* w = a.P.weight;
  for (int64_t r = blockIdx.x; r < L.rows(); r += gridDim.x) {
    const Row<T, kGrad> row(a, r);
    const auto& [b, s, xr, gr, xk, same_shift, t] = row;
    if (!valid_row<T, kStats, kGrad>(a, r, row, tid == 0, tid, xk.count, nt)) continue;
    const float w_t = w ? w[t] : 1.f;
    float lse;
    if (kStats) {
      const float x_t = tid == 0 ? static_cast<float>(xr[t]) : 0.f;  // before the barrier (in place)
      ChunkStats cs;
      for (int64_t k0 = tid; k0 < xk.count; k0 += static_cast<int64_t>(nt) * U) {
        uint4 u[U];
#pragma unroll
        for (int i = 0; i < U; ++i) {  // all U loads issued before the first is used
          const int64_t k = k0 + static_cast<int64_t>(i) * nt;
          if (k < xk.count) u[i] = kGrad ? __ldcg(xk.base + k) : load_stream(xk.base + k);  // kGrad: keep it in L2
        }
#pragma unroll
        for (int i = 0; i < U; ++i) {
          const int64_t k = k0 + static_cast<int64_t>(i) * nt;
          if (k >= xk.count) break;
          float v[E];
          Chunk<T>::unpack(u[i], v);
          mask_chunk(v, xk.first_class(k), C);
          cs.add(v, xk.first_class(k), C, spread, w);
        }
      }
      OnlineStats<float> st = cs.online();
      block_reduce(st);
      lse = lse_of(st.m, st.s);
      if (tid == 0) {
        a.lse[r] = lse;
        a.loss[r] = row_loss<false>(st, logf(st.s), x_t, w_t, a.P.eps, C);
      }
    } else {
      lse = a.lse[r];
    }
    if (kGrad) {
      const float W = w ? *a.P.weight_sum : static_cast<float>(C);
      const RowGrad<float> g = RowGrad<float>::index(a.factor.at(b, s), w_t, W, a.P.eps, C);
      for (int64_t k0 = tid; k0 < xk.count; k0 += static_cast<int64_t>(nt) * U) {
        uint4 u[U];
#pragma unroll
        for (int i = 0; i < U; ++i) {
          const int64_t k = k0 + static_cast<int64_t>(i) * nt;
          if (k < xk.count) u[i] = load_stream(xk.base + k);
        }
#pragma unroll
        for (int i = 0; i < U; ++i) {
          const int64_t k = k0 + static_cast<int64_t>(i) * nt;
          if (k >= xk.count) break;
          float v[E], p[E], out[E];
          Chunk<T>::unpack(u[i], v);
#pragma unroll
          for (int e = 0; e < E; ++e) p[e] = ex2((v[e] - lse) * kLog2e);
          grad_chunk(out, p, xk.first_class(k), C, t, g, spread, w);
          store_chunk(gr, xk, same_shift, k, C, out);
        }
      }
    }
  }
}

// ---- slice_rows: loss + gradient; a cluster of n CTAs per row, CTA `rank` holding chunks
// [rank * slice, (rank + 1) * slice) in shared memory.
template <typename T>
__global__ void __launch_bounds__(kSliceThreads) slice_rows_kernel(Args<T> a, int64_t slice) {
  constexpr int E = Chunk<T>::E;
  extern __shared__ uint4 staged[];
  __shared__ float4 peer[2][kMaxCluster];  // each CTA's statistics, pushed by it; double-buffered by row parity
  const RowLayout& L = a.L;
  const int64_t C = L.C;
  const int tid = threadIdx.x;
  const bool spread = a.P.eps != 0.f;
  const float* w = a.P.weight;
  unsigned rank = 0, n = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  rank = cluster.block_rank();
  n = cluster.num_blocks();
  if (n > 1) cluster.sync();  // every CTA of the cluster has started before anyone writes to its shared memory
#endif
  int parity = 0;  // flips once per exchange, so a CTA two exchanges ahead never overwrites a slot in use
  for (int64_t r = blockIdx.x / n; r < L.rows(); r += gridDim.x / n) {
    const Row<T, true> row(a, r);
    const auto& [b, s, xr, gr, xk, same_shift, t] = row;
    const int64_t k0 = rank * slice, k1 = k0 + slice < xk.count ? k0 + slice : xk.count;
    // Every CTA of the cluster reads the same target, so all of them skip the exchange below together.
    if (!valid_row<T, true, true>(a, r, row, rank == 0 && tid == 0, k0 + tid, k1, kSliceThreads)) continue;
    for (int64_t k = k0 + tid; k < k1; k += kSliceThreads) copy_async16(&staged[k - k0], xk.base + k);
    copy_async_wait_all();
    __syncthreads();
    ChunkStats cs;
    for (int64_t k = k0 + tid; k < k1; k += kSliceThreads) {
      float v[E];
      Chunk<T>::unpack(staged[k - k0], v);
      mask_chunk(v, xk.first_class(k), C);
      cs.add(v, xk.first_class(k), C, spread, w);
    }
    OnlineStats<float> st = cs.online();
    block_reduce(st);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (n > 1) {
      if (tid < static_cast<int>(n)) cluster.map_shared_rank(&peer[parity][0], tid)[rank] = make_float4(st.m, st.s, st.A, st.D);
      cluster.sync();  // release/acquire: every CTA's statistics are now in every CTA's `peer`
      const float4 p0 = peer[parity][0];
      st.m = p0.x, st.s = p0.y, st.A = p0.z, st.D = p0.w;
      for (unsigned q = 1; q < n; ++q) {  // the same order in every CTA: the same bits
        const float4 pq = peer[parity][q];
        st.merge(pq.x, pq.y, pq.z, pq.w);
      }
      parity ^= 1;
    }
#endif
    const float lse = lse_of(st.m, st.s);
    const float w_t = w ? w[t] : 1.f;
    const int64_t kt = (t + xk.shift) / E;
    if (tid == 0 && kt >= k0 && kt < k1) {  // the CTA holding x_t writes the loss; its staged copy is intact
      const float x_t = static_cast<float>(reinterpret_cast<const T*>(staged)[(kt - k0) * E + (t + xk.shift) % E]);
      a.loss[r] = row_loss<false>(st, logf(st.s), x_t, w_t, a.P.eps, C);
    }
    if (tid == 0 && rank == 0) a.lse[r] = lse;
    const float W = w ? *a.P.weight_sum : static_cast<float>(C);
    const RowGrad<float> g = RowGrad<float>::index(a.factor.at(b, s), w_t, W, a.P.eps, C);
    for (int64_t k = k0 + tid; k < k1; k += kSliceThreads) {
      float v[E], out[E];
      Chunk<T>::unpack(staged[k - k0], v);
#pragma unroll
      for (int e = 0; e < E; ++e) v[e] = ex2((v[e] - lse) * kLog2e);
      grad_chunk(out, v, xk.first_class(k), C, t, g, spread, w);
      store_chunk(gr, xk, same_shift, k, C, out);
    }
    __syncthreads();  // the staged slice is refilled by the next row
  }
}

}  // namespace rows
}  // namespace softmax_ce
