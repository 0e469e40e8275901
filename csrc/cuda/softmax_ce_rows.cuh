// Fast CUDA kernels for rows whose classes are contiguous, with class-index targets and float, bfloat16 or
// half logits (the training case).  All of them move 16-byte chunks (softmax_ce_chunks.cuh).
//   warp_rows:   up to 32*8 chunks per row (C <= 2041 in 2-byte dtypes, 1021 in float32): a warp per row, the
//                row held in registers as loaded (16-byte chunks), read three times (max, sum, gradient).
//   slice_rows:  loss and gradient of longer rows: the row split over a cluster of CTAs (sm_90; one CTA
//                elsewhere), each staging its slice in shared memory, so the row is read from memory once;
//                the slices' statistics are exchanged through distributed shared memory.
//   stream_rows: the rest (forward only; gradient from saved stats; rows longer than the slices allow): a CTA
//                per row; with loss and gradient together, the gradient sweep re-reads the row from L2.
// Exponentials are ex2.approx of (x - max) * log2(e) (one special-function instruction, where expf costs
// six; at Hopper bandwidth in bfloat16 the arithmetic would otherwise be the bound); the subtraction comes
// first so that large logits lose no bits; max, sums and log are float32 as elsewhere.
#pragma once

#include <cooperative_groups.h>

#include <climits>
#include <cmath>
#include <type_traits>

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
  float* loss;     // per-row losses; nullptr when the kernel writes loss_partials instead
  // The forward's stats (softmax_ce.h), GradBase's b and q per row: the max (NaN where it is +inf) and the sum of
  // e^(x - max); written by kStats without kGrad, read by kGrad alone, else nullptr.  Two pointers: the sum's
  // plane as one pointer + rows took the float gradient-only warp rows of 4 chunks 64 -> 67 registers (4 -> 3 CTAs).
  float* row_max;
  float* row_sum;
  Factor<float> factor;
  float* loss_partials;  // one partial loss sum per CTA (the training pass of K-dim), or nullptr
  // Read by the warp rows alone (the others wait first): launched under tuning pdl right after mean_scale's kernels,
  // which let this grid launch only once the kernels before them were done, so its reads may start before its wait.
  bool early = false;
};

constexpr int kWarpRowThreads = 256;
constexpr int kStreamThreads = 256;  // 512 capped registers at 128 and spilled on sm_80
constexpr int kSliceThreads = 256;
constexpr int kMaxCluster = 16;
constexpr float kInf = INFINITY;

// The max over a group of `lanes` lanes (a power of 2 up to 32, aligned; mask: the group's lanes), every lane
// of it getting the result.  Lanes may end with +0 and -0 where both are the max: harmless (m is only compared or
// added to).
__device__ __forceinline__ float group_max(float v, int lanes, unsigned mask) {
#pragma unroll
  for (int off = lanes >> 1; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(mask, v, off);
    v = o > v ? o : v;
  }
  return v;
}
__device__ __forceinline__ float warp_max(float v) { return group_max(v, 32, 0xffffffffu); }

// Every lane of the group ends with the same bits: each step adds the same two partials, in either order.
__device__ __forceinline__ float group_sum(float v, int lanes, unsigned mask) {
#pragma unroll
  for (int off = lanes >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off);
  return v;
}
__device__ __forceinline__ float warp_sum(float v) { return group_sum(v, 32, 0xffffffffu); }

// The lanes of the group of `lanes` (a power of 2 up to 32) that holds `lane`.
__device__ __forceinline__ unsigned group_mask(int lane, int lanes) {
  return lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1) << (lane & ~(lanes - 1));
}

// Block-wide statistics from each thread's (m, s and D relative to m, A): the block max first, then every
// partial re-based to it and summed; every thread gets the result, in a fixed order (the same bits every run).
// Two shuffle trees and one exponential per thread: the generic merge (two expf per step, every thread merging
// every warp's partial) was half of the slice kernel's instructions (H200 ncu, 2026-11-26).
// blockDim.x must be a multiple of 32 (every launcher's is).
template <bool kSpread>
__device__ __forceinline__ OnlineStats<float> block_stats(float m, float s, float A, float D) {
  __shared__ float sh[4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  float M = warp_max(m);
  if (lane == 0) sh[0][warp] = M;
  __syncthreads();
  M = warp_max(lane < nwarps ? sh[0][lane] : -FLT_MAX);
  if (m != M) {  // m == M needs no re-basing (also when both are +inf: inf - inf would make NaN)
    s *= ex2((m - M) * kLog2e);
    if (kSpread && A != 0.f) D += (M - m) * A;
  }
  s = warp_sum(s);
  if (kSpread) A = warp_sum(A), D = warp_sum(D);
  if (lane == 0) {
    sh[1][warp] = s;
    if (kSpread) sh[2][warp] = A, sh[3][warp] = D;
  }
  __syncthreads();
  OnlineStats<float> st;
  st.m = M;
  st.s = warp_sum(lane < nwarps ? sh[1][lane] : 0.f);
  st.A = kSpread ? warp_sum(lane < nwarps ? sh[2][lane] : 0.f) : 0.f;
  st.D = kSpread ? warp_sum(lane < nwarps ? sh[3][lane] : 0.f) : 0.f;
  __syncthreads();  // sh is reused by the next row
  return st;
}

// OnlineStats::merge with ex2 in place of expf (the slices of a cluster).
__device__ __forceinline__ void merge_ex2(OnlineStats<float>& st, float om, float os, float oA, float oD) {
  const float nm = fmaxf(st.m, om);
  st.s = (st.m == nm ? st.s : st.s * ex2((st.m - nm) * kLog2e)) + (om == nm ? os : os * ex2((om - nm) * kLog2e));
  st.D = st.D + (st.A != 0.f && st.m != nm ? (nm - st.m) * st.A : 0.f) + oD +
         (oA != 0.f && om != nm ? (nm - om) * oA : 0.f);
  st.A += oA;
  st.m = nm;
}

// Nanoseconds of the GPU's global timer.
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Phase stamps of the slice kernel (benchmarks/slice_trace.py; softmax_ce_tuning.h's SliceTrace): per CTA a
// header, then per row thread 0's SM clock at the phase boundaries below, and the last warp's at two of them.
struct TraceBuf {
  int64_t* p;  // null: off
  int ctas, rows;
};
enum : int { kTraceHeader = 8, kTraceStamps = 10 };
// Header: smid, cluster rank, cluster size, ns and clock at the start, ns and clock at the end, rows stamped.
// Row: start, own chunks landed, own max and sum done, block statistics, cluster exchange, own gradient sweep
// done, row end (clock); start (ns of the global timer, to line rows up across SMs); the last warp's chunks
// landed, the last warp's max and sum done (clock: block statistics wait for that warp).
// The last warp's clocks: each warp's lane 0 takes the max into a slot of this row's parity (clocks only grow, so
// a slot needs no reset; a warp can be one row ahead of thread 0, never two: block_stats has barriers).
__device__ __forceinline__ unsigned long long (&trace_last())[2][2] {
  __shared__ unsigned long long last[2][2];
  return last;
}
template <bool kOn>  // false: every member a no-op (the untraced kernels)
struct Tracer {
  // A store the compiler can neither move nor delay (nor keep its value live until later): a phase boundary.
  __device__ static void put(int64_t* p, int64_t v) {
    asm volatile("st.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
  }
  // Only the row count lives across the row loop; the rest is read again from the kernel's parameter (constant
  // memory) at each stamp, so that the twin keeps the default kernel's registers as far as it can.
  const TraceBuf& t;
  int row = 0;  // rows stamped or not, every thread (its parity picks the last-warp slots)
  __device__ Tracer(const TraceBuf& buf, unsigned rank, unsigned n) : t(buf) {
    if (!on()) return;
    if (threadIdx.x < 4) trace_last()[threadIdx.x / 2][threadIdx.x % 2] = 0;
    __syncthreads();  // the slots are zero before any warp takes a max
    if (threadIdx.x != 0) return;
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    int64_t* h = header();
    put(h, smid), put(h + 1, rank), put(h + 2, n);
    put(h + 3, static_cast<int64_t>(global_ns())), put(h + 4, clock64());
  }
  __device__ bool on() const { return kOn && t.p != nullptr && static_cast<int>(blockIdx.x) < t.ctas; }
  __device__ int64_t* header() const {
    return t.p + static_cast<int64_t>(blockIdx.x) * (kTraceHeader + t.rows * kTraceStamps);
  }
  // Thread 0's slot k of this row, or null.
  __device__ int64_t* slot(int k) const {
    if (!on() || threadIdx.x != 0 || row >= t.rows) return nullptr;
    return header() + kTraceHeader + row * kTraceStamps + k;
  }
  __device__ __forceinline__ void stamp(int k) {
    if (int64_t* p = slot(k)) put(p, clock64());
  }
  // Thread 0's stamp k (1 or 2), then every warp's clock into the last-warp slot of that phase (after the stamp:
  // thread 0's warp counts too, so the last warp's clock is never earlier than thread 0's).
  __device__ __forceinline__ void stamp_warps(int k) {
    stamp(k);
    if (on() && (threadIdx.x & 31) == 0)
      atomicMax(&trace_last()[row & 1][k - 1], static_cast<unsigned long long>(clock64()));
  }
  __device__ __forceinline__ void start_row() {
    stamp(0);
    if (int64_t* p = slot(7)) put(p, static_cast<int64_t>(global_ns()));
  }
  // After block_stats (whose barriers every warp has passed since its two maxima): the last warp's clocks.
  __device__ __forceinline__ void stamp_last() {
    if (int64_t* p = slot(8)) {
      put(p, static_cast<int64_t>(trace_last()[row & 1][0]));
      put(p + 1, static_cast<int64_t>(trace_last()[row & 1][1]));
    }
  }
  __device__ __forceinline__ void end_row() {
    stamp(6);
    ++row;
  }
  // The end, and the rows stamped (written once here: a store of the count per row took the bf16 twin from 77 to
  // 101 registers, sm_90a).
  __device__ __forceinline__ void finish() {
    if (!on() || threadIdx.x != 0) return;
    put(header() + 5, static_cast<int64_t>(global_ns())), put(header() + 6, clock64());
    put(header() + 7, row < t.rows ? row : t.rows);
  }
};

// The CTAs that share a row (a cluster on sm_90, else one CTA): this CTA's rank, their number, and the exchange
// of each one's statistics through distributed shared memory, in a `peer` array declared by the kernel and
// double-buffered by row parity (a CTA one exchange ahead never overwrites a slot still being read: it cannot
// start the next exchange before this CTA's statistics of the row between have reached it).
// Two ways (tuning cluster_async): cluster.sync() after plain remote stores (every thread of every CTA passes a
// MEMBAR.ALL.GPU, the barrier's release in the sm_90 SASS, then waits at the cluster barrier), or kAsync: each
// CTA's statistics stored into its peers' `peer` slots by st.async, completing their bytes on the peer's mbarrier
// for that slot; a CTA waits only on its own mbarrier (no fence, no cluster barrier per row).
template <bool kAsync>
struct SliceCluster {
  unsigned rank = 0, n = 1;
  int parity = 0;
  unsigned phases = 0;  // kAsync: the phase parity each of the two mbarriers waits for next (bit b: mbarrier b)
  __device__ explicit SliceCluster(uint64_t (&bars)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    rank = cluster.block_rank();
    n = cluster.num_blocks();
    if (kAsync && n > 1 && threadIdx.x == 0) {
      for (int b = 0; b < 2; ++b)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_address(&bars[b])) : "memory");
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if (n > 1) cluster.sync();  // every CTA of the cluster has started (and its mbarriers are set) before anyone
                                // writes to its shared memory
#endif
  }
  // This CTA's statistics -> the row's, merged in the same order in every CTA (the same bits).  Every CTA of the
  // cluster calls it once per row that it does not skip (they skip the same rows).
  __device__ OnlineStats<float> exchange(OnlineStats<float> st, float4 (&peer)[2][kMaxCluster],
                                        uint64_t (&bars)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (n > 1) {
      cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
      const int tid = threadIdx.x;
      const float4 mine = make_float4(st.m, st.s, st.A, st.D);
      if constexpr (kAsync) {
        uint64_t* bar = &bars[parity];
        if (tid == 0) {  // this phase ends when the n - 1 peers' 16 bytes have landed (they may come first)
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)),
                       "r"(16 * (n - 1)) : "memory");
        }
        if (tid < static_cast<int>(n) && tid != static_cast<int>(rank)) {
          const unsigned slot = map_rank(&peer[parity][rank], tid), remote_bar = map_rank(bar, tid);
          asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
                       ::"r"(slot), "r"(__float_as_uint(mine.x)), "r"(__float_as_uint(mine.y)),
                       "r"(__float_as_uint(mine.z)), "r"(__float_as_uint(mine.w)), "r"(remote_bar) : "memory");
        }
        wait_phase(bar, (phases >> parity) & 1u);
        phases ^= 1u << parity;
      } else {
        if (tid < static_cast<int>(n)) cluster.map_shared_rank(&peer[parity][0], tid)[rank] = mine;
        cluster.sync();  // release/acquire: every CTA's statistics are now in every CTA's `peer`
      }
      // Own statistics from registers (st.async leaves this CTA's slot unwritten), the others from `peer`.
      const auto at = [&](unsigned q) { return q == rank ? mine : peer[parity][q]; };
      const float4 p0 = at(0);
      st.m = p0.x, st.s = p0.y, st.A = p0.z, st.D = p0.w;
      for (unsigned q = 1; q < n; ++q) {
        const float4 pq = at(q);
        merge_ex2(st, pq.x, pq.y, pq.z, pq.w);
      }
      parity ^= 1;
    }
#endif
    return st;
  }
  // st.async: no CTA leaves while a peer's store to it may be in flight (once per kernel).
  __device__ void finish() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (kAsync && n > 1)
      asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;" ::: "memory");
#endif
  }

 private:
  // Until mbarrier `bar` completes its phase of parity `want`.  A peer that never sends (a bug: a cluster's CTAs run
  // together) would hang the kernel: past 60 s it traps instead, a launch error rather than a hung process.  60 s,
  // not 2 (the exchange takes microseconds): a GPU shared by time slices may hold the whole context off for seconds.
  __device__ static void wait_phase(uint64_t* bar, unsigned want) {
    unsigned done = 0;
    uint64_t start = 0;
    for (;;) {
      asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
                   " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(smem_address(bar)), "r"(want) : "memory");
      if (done) return;
      const uint64_t now = global_ns();
      if (start == 0) start = now;
      else if (now - start > 60000000000ull) __trap();
    }
  }
  __device__ static unsigned smem_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
  }
  // The address of the same shared object in CTA `q` of the cluster.
  __device__ static unsigned map_rank(const void* p, int q) {
    unsigned out;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(smem_address(p)), "r"(q));
    return out;
  }
};

// status is null for the gradient-only ops (the forward that came first already reported the target).  It is
// usually pinned host memory (no copy after each launch): plain stores, as PCIe has no atomics to host memory;
// the target before the flag, so a host that sees the flag sees a bad target (any row's: all are reported).
__device__ __forceinline__ void flag_bad_target(int64_t* status, int64_t t) {
  if (status == nullptr) return;
  volatile int64_t* s = status;
  s[1] = t;
  __threadfence_system();
  s[0] = 1;
}

// Elements of chunk `first .. first+E-1` outside [0, C) become -inf: they add e^-inf = 0 to every sum.
template <int E>
__device__ __forceinline__ void mask_chunk(float (&v)[E], int64_t first, int64_t C) {
  if (first >= 0 && first + E <= C) return;
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (first + e < 0 || first + e >= C) v[e] = -kInf;
}

// max(m, the chunk's values): the packed compare (chunk_max) where no lane is outside the row, else the masked
// values one by one.  NaN never becomes the max; it poisons the sum.
template <typename T>
__device__ __forceinline__ float chunk_max_masked(const uint4& u, float m, bool edge, int64_t first, int64_t C) {
  if (!edge) return chunk_max<T>(u, m);
  float v[Chunk<T>::E];
  Chunk<T>::unpack(u, v);
  mask_chunk(v, first, C);
#pragma unroll
  for (int e = 0; e < Chunk<T>::E; ++e) m = fmaxf(m, v[e]);
  return m;
}

// a_c of the smoothing term (the class weight; 0 outside the row).
__device__ __forceinline__ float class_weight(const float* weight, int64_t c, int64_t C) {
  if (c < 0 || c >= C) return 0.f;
  return weight ? weight[c] : 1.f;
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
  __device__ Row(const Args<T>& a, int64_t r) : Row(a, r, target_of(a, r)) {}
  __device__ Row(const Args<T>& a, int64_t r, int64_t target)  // the target read ahead by the caller
      : b(split_row(r, a.L.S).b),
        s(r - b * a.L.S),
        x(a.x + b * a.L.x_sB + s * a.L.x_sS),
        g(kGrad ? a.grad + b * a.L.g_sB + s * a.L.g_sS : nullptr),
        xk(x, a.L.C),
        same_shift(!kGrad || same_alignment(x, g)),
        t(target) {}
  __device__ static int64_t target_of(const Args<T>& a, int64_t r) {
    const RowIndex i = split_row(r, a.L.S);
    return a.P.index[i.b * a.L.t_sB + i.s * a.L.t_sS];
  }
  // The chunks of this row that straddle its ends (masked lanes): 0 and/or count - 1, -1 where none.
  __device__ int64_t head_edge() const { return xk.shift != 0 ? 0 : -1; }
  __device__ int64_t tail_edge(int64_t C) const { return (C + xk.shift) % Chunk<T>::E != 0 ? xk.count - 1 : -1; }
  // The gradient's factors for this row: f * (p * p_mul - a_c * c_mul - [c == t] * t_sub).
  __device__ RowGrad<float> grad_factors(const Args<T>& a, float w_t) const {
    const float W = a.P.weight ? *a.P.weight_sum : static_cast<float>(a.L.C);
    return RowGrad<float>::index(a.factor.at(b, s), w_t, W, a.P.eps, a.L.C);
  }
  __device__ RowGrad<float> grad_factors(const Args<T>& a, float w_t, float f) const {  // f: factor.at(b, s)
    const float W = a.P.weight ? *a.P.weight_sum : static_cast<float>(a.L.C);
    return RowGrad<float>::index(f, w_t, W, a.P.eps, a.L.C);
  }
  // Where x_t sits: its chunk, and its lane in that chunk.
  __device__ int64_t target_chunk() const { return (t + xk.shift) / Chunk<T>::E; }
  __device__ int target_lane() const { return static_cast<int>((t + xk.shift) % Chunk<T>::E); }
  // The 16-byte chunks of the gradient row, when it has the logits' alignment (same_shift).
  __device__ uint4* grad_chunks() const {
    return reinterpret_cast<uint4*>(reinterpret_cast<uintptr_t>(g) & ~uintptr_t(15));
  }
};

// The row's class-index target; false (after writing what such a row gets) when it is ignored or out of range.
// writer: the thread that writes the row's loss/stats and status; [k0, k1) step dk: the chunks this thread fills.
template <typename T, bool kStats, bool kGrad>
__device__ __forceinline__ bool valid_row(const Args<T>& a, int64_t r, const Row<T, kGrad>& row, bool writer,
                                          int64_t k0, int64_t k1, int64_t dk) {
  const int64_t t = row.t;
  const bool ignored = t == a.P.ignore_index;
  if (!ignored && !target_out_of_range(t, a.L.C)) return true;
  const float fill = ignored ? 0.f : NAN;
  if (writer) {
    if (!ignored) flag_bad_target(a.P.status, t);
    if (kStats && a.loss) {  // else the caller adds fill to its partial sum
      a.loss[r] = fill;
      if (!kGrad) a.row_max[r] = a.row_sum[r] = fill;  // the forward's per-row buffers come together
    }
  }
  if (kGrad) {
    float v[Chunk<T>::E];
#pragma unroll
    for (int e = 0; e < Chunk<T>::E; ++e) v[e] = fill;
    for (int64_t k = k0; k < k1; k += dk) store_chunk(row.g, row.xk, row.same_shift, k, a.L.C, v);
  }
  return false;
}

// The base b of the gradient's exponentials e^(x - b) and the divisor q of its factor p_mul: the max and the sum,
// taken by this pass or saved by the forward (Args' stats), not the lse, whose m + log(s) drops log(s) once
// |m| >> 1 (1e30 + log 2 == 1e30 in float32: p = 1 where it is 1/2).
struct GradBase {
  float b, q;
  __device__ static GradBase of_stats(float m, float s) { return {m == kInf ? NAN : m, s}; }
  template <typename T>
  __device__ static GradBase saved(const Args<T>& a, int64_t r) { return {a.row_max[r], a.row_sum[r]}; }
  __device__ float p_mul(float f) const { return __fdividef(f, q); }  // q in [1, C] (or 0 / NaN: NaN rows)
};

// The kernels' per-element work, kept to a few instructions (the bound at Hopper bandwidth, see slice_rows):
// chunk values with the row's end chunks masked; the gradient of one chunk; its store.  Chunk indices I: int64_t,
// or int in the warp rows' loss + gradient (see there).
template <typename T, bool kGrad, typename I>
__device__ __forceinline__ void chunk_values(const Row<T, kGrad>& row, const uint4& u, I k, I he, I te, int64_t C,
                                             float (&v)[Chunk<T>::E]) {
  Chunk<T>::unpack(u, v);
  if (k == he || k == te) mask_chunk(v, row.xk.first_class(k), C);
}

// out (p * p_mul on entry) -= a_c * c_mul + [c == t] * t_sub: the gradient f * (p * p_mul - a_c * c_mul -
// [c == t] * t_sub); et: t's lane if this chunk holds it, else -1.
template <int E, bool kSpread>
__device__ __forceinline__ void chunk_grad_terms(float (&out)[E], const RowGrad<float>& g, const float* w,
                                                 int64_t first, int64_t C, int et) {
  if (kSpread) {
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] -= class_weight(w, first + e, C) * g.c_mul;
  }
  if (et >= 0) {
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] -= e == et ? g.t_sub : 0.f;
  }
}

// out = f * (p * p_mul - a_c * c_mul - [c == t] * t_sub), p = e^(x - b) (b: GradBase's); et: t's lane if this chunk
// holds it.
template <int E, bool kSpread>
__device__ __forceinline__ void chunk_grad(float (&out)[E], const float (&v)[E], float b, const RowGrad<float>& g,
                                           const float* w, int64_t first, int64_t C, int et) {
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = ex2((v[e] - b) * kLog2e) * g.p_mul;
  chunk_grad_terms<E, kSpread>(out, g, w, first, C, et);
}

// One 16-byte store for a chunk inside the row with the logits' alignment; element by element otherwise.
template <typename T, bool kGrad, typename I>
__device__ __forceinline__ void chunk_store(const Row<T, kGrad>& row, uint4* gk, I k, I he, I te, int64_t C,
                                            const float (&out)[Chunk<T>::E]) {
  if (row.same_shift && k != he && k != te)
    store_stream(gk + k, Chunk<T>::pack(out));
  else
    store_chunk(row.g, row.xk, row.same_shift, k, C, out);
}

// lean sweeps: chunk k's gradient as if no class were the target's, p * p_mul (folded or not) in one 16-byte
// store where `plain` (inside the row, the logits' alignment), else by the masked path, element by element.
template <bool kFolded, typename T, bool kGrad>
__device__ __forceinline__ void lean_chunk_store(const Row<T, kGrad>& row, uint4* gk, int64_t k, bool plain,
                                                 const float (&v)[Chunk<T>::E], float b, const Exp2Base& base,
                                                 float p_mul, const RowGrad<float>& g, const float* w, int64_t C) {
  float out[Chunk<T>::E];
  if (plain) {
    chunk_p<kFolded>(out, v, b, base, p_mul);
    store_stream(gk + k, Chunk<T>::pack(out));
  } else {
    chunk_grad<Chunk<T>::E, false>(out, v, b, g, w, row.xk.first_class(k), C, -1);
    store_chunk(row.g, row.xk, row.same_shift, k, C, out);
  }
}

// lean sweeps: the gradient of the target's class, stored again over the sweep's p * p_mul by the same thread
// (or after a __syncwarp).
__device__ __forceinline__ float target_grad(float x_t, float b, const RowGrad<float>& g) {
  return ex2((x_t - b) * kLog2e) * g.p_mul - g.t_sub;
}

// The smoothing sums of one chunk: A += a_c, D += a_c (m - x_c) over the classes in the row.
template <int E>
__device__ __forceinline__ void chunk_spread(float& A, float& D, const float (&v)[E], float m, const float* w,
                                             int64_t first, int64_t C) {
#pragma unroll
  for (int e = 0; e < E; ++e) {  // lanes outside the row hold -inf: skipped, not 0 * inf
    const float ac = class_weight(w, first + e, C);
    A += ac;
    D += first + e >= 0 && first + e < C ? ac * (m - v[e]) : 0.f;
  }
}

// The CTAs per SM a warp-row kernel is compiled for (its launch bounds: the registers each thread may take).
template <typename T, int VPT, bool kSpread>
constexpr int warp_rows_ctas() {
  return kSpread || (VPT == 8 && sizeof(T) == 4) ? 2 : 3;
}

// Where warp rows keep their exponentials (kKeep): in registers, or in the warp's shared memory where registers
// spilled at the kernel's CTAs per SM (sm_90, 2026-11-27: 2-byte rows of 4+ chunks per lane, float rows of 4
// without smoothing; all at 3 CTAs, 80 registers, but the 2-byte rows of 4 or 8 with smoothing, at 2).
template <typename T, int VPT, bool kSpread>
constexpr bool keep_shared() {
  return (sizeof(T) == 2 && VPT >= 4) || (VPT == 4 && !kSpread);
}
// 16-byte slots of shared memory per warp for kept exponentials (a float per element of its 32 * VPT chunks).
template <typename T, int VPT>
constexpr int kept_smem_chunks() {
  return VPT * 32 * Chunk<T>::E / 4;
}

// One lane's kept values, E per chunk j < VPT: in registers, or in float4 slots of its warp's shared memory laid
// out [chunk][quarter][lane] (a warp's 16-byte accesses consecutive: no bank conflicts).  Each lane reads back
// only what it wrote: no barrier.
template <int VPT, int E, bool kSmem>
struct Kept {
  float reg[kSmem ? 1 : VPT][E];
  float4* lane_slots;  // kSmem: this lane's first slot
  __device__ void put(int j, const float (&p)[E]) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if constexpr (kSmem) {
        if (e % 4 == 0) lane_slots[(j * (E / 4) + e / 4) * 32] = make_float4(p[e], p[e + 1], p[e + 2], p[e + 3]);
      } else {
        reg[j][e] = p[e];
      }
    }
  }
  __device__ void get(int j, float (&p)[E]) const {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if constexpr (kSmem) {
        if (e % 4 == 0) {
          const float4 q = lane_slots[(j * (E / 4) + e / 4) * 32];
          p[e] = q.x, p[e + 1] = q.y, p[e + 2] = q.z, p[e + 3] = q.w;
        }
      } else {
        p[e] = reg[j][e];
      }
    }
  }
};

// ---- warp_rows: a warp per row, VPT chunks per lane held in registers as loaded (16 bytes each), so that
// enough warps fit per SM to keep the loads in flight (the float copy of the row took 84 registers: 16 warps).
// kG < 32 (tuning warp_group; the loss + gradient of rows of up to 8 * kG chunks, no smoothing): each row taken by
// a group of kG lanes (16, 8 or 4), 32 / kG rows per warp, 8 chunks per lane: a row's set-up, reductions and loss
// (~300 instructions per warp and row, against ~110 per chunk of 8 values; sm_90a SASS of the bf16 rows of 4
// chunks per lane) are shared by as many rows, and a warp has twice (or more) the bytes in flight.
// kRing (tuning warp_ring; the loss + gradient of float rows of 129-256 chunks without smoothing, where the
// registers allow 2 CTAs per SM; the launcher sizes the grid to the resident CTAs): each warp stages its next
// ring - 1 rows in shared memory (cp.async, `slot` chunks per row) while it works on this one, so that its reads
// stay in flight through its arithmetic; each lane copies and reads back only its own chunks (no barrier), and a
// row's slot is refilled one row later, once read.
// kKeep (tuning warp_keep; the loss + gradient): the sum sweep keeps each e^(x - max), and the gradient is that
// times p_mul / sum: one product per element where the gradient sweep repeated the unpacking, the subtraction,
// the scaling and the exponential (these rows are issue-bound in bfloat16).  Kept in registers or in this warp's
// shared memory (keep_shared).
template <typename T, int VPT, bool kStats, bool kGrad, bool kSpread, bool kRing, bool kKeep, int kG = 32>
__global__ void __launch_bounds__(kWarpRowThreads, (warp_rows_ctas<T, VPT, kSpread>()))
    warp_rows_kernel(Args<T> a, int ring, int slot) {
  static_assert(!(kRing && (!kStats || !kGrad || kSpread || VPT != 8 || sizeof(T) != 4)),
                "staged: the loss + gradient of float rows of 129-256 chunks, no smoothing");
  static_assert(!kKeep || (kStats && kGrad), "kept exponentials: the loss + gradient only");
  static_assert(kG == 32 || (kStats && kGrad && !kSpread && !kRing && !kKeep && (kG == 16 || kG == 8 || kG == 4)),
                "grouped rows: the loss + gradient, no smoothing, unstaged, 16, 8 or 4 lanes per row");
  constexpr bool kSmem = kKeep && keep_shared<T, VPT, kSpread>();
  static_assert(!(kRing && kSmem), "the ring and kept exponentials share `staged`");
  // Args::early where it can pay: the mean's training pass without smoothing (elsewhere its code cost registers:
  // the forward of 2-byte rows of 4 chunks 56 -> 71 on sm_90, the kept exponentials with smoothing spilled).
  const bool early = kStats && kGrad && !kSpread && !kKeep && a.early;
  if (!early) pdl_start();
  extern __shared__ uint4 staged[];  // kRing: per warp, `ring` slots of `slot` chunks; else the kept exponentials
  constexpr int E = Chunk<T>::E;
  // Chunk indices (at most 32 * VPT): 32-bit in the loss + gradient (64-bit compares were a tenth of its sum
  // sweep's SASS); 64-bit in the others, which took more registers with 32-bit ones (a spill on sm_80 in the
  // forward of 2-byte rows of 8 chunks; 4 -> 3 CTAs per SM for the gradient of float rows of 4).
  using I = std::conditional_t<kStats && kGrad, int, int64_t>;
  const RowLayout& L = a.L;
  const int64_t C = L.C;
  const int lane = threadIdx.x & 31;
  constexpr int G = kG;                                  // the lanes of a row
  const int sub = lane & (G - 1);                        // this lane's place among them
  const unsigned gmask = group_mask(lane, G);
  const float* w = a.P.weight;
  // Rows in flight over the grid (the row step); this lane's first row.
  const int64_t warps = ((static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5) * (32 / G);
  int64_t r = ((static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5) * (32 / G) + lane / G;
  uint4* const slots = staged + (threadIdx.x >> 5) * ring * slot;
  // The chunks of another row than this lane's current one (kRing's staging).
  const auto chunks_of = [&](int64_t row_index) {
    const RowIndex i = split_row(row_index, L.S);
    return RowChunks<T>(a.x + i.b * L.x_sB + i.s * L.x_sS, C);
  };
  // kRing: this lane's chunks of row `row_index` into slot q, one commit group per row (empty past the last row,
  // so that the waits count rows).
  const auto stage = [&](int64_t row_index, int q) {
    if (row_index < L.rows()) {
      const RowChunks<T> k = chunks_of(row_index);
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (j * 32 + lane < k.count) copy_async16(slots + q * slot + j * 32 + lane, k.base + j * 32 + lane);
    }
    copy_async_commit();
  };
  int q = 0;            // kRing: row r's slot
  int64_t t_next = 0;   // kRing: row r's target, read one row ahead
  if (early) pdl_trigger();
  if (kRing) {
    for (int p = 0; p + 1 < ring; ++p) stage(r + p * warps, p);
    if (r < L.rows()) t_next = Row<T, kGrad>::target_of(a, r);
  }
  if (early) {  // while mean_scale's kernels run: this lane's first row on its way (kRing: staged above), only read
    if (!kRing && r < L.rows()) {
      const RowChunks<T> k = chunks_of(r);
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (j * G + sub < k.count) prefetch_l2(k.base + j * G + sub);
    }
    pdl_wait();  // before the factor they write, and before any store (a buffer freed by them may be ours now)
  }
  uint4 u[VPT];
  for (; r < L.rows(); r += warps, q = q + 1 == ring ? 0 : q + 1) {
    int64_t t_r = 0;
    if (kRing) {
      t_r = t_next;
      stage(r + (ring - 1) * warps, q == 0 ? ring - 1 : q - 1);  // the previous row's slot: read, now free
      if (r + warps < L.rows()) t_next = Row<T, kGrad>::target_of(a, r + warps);
      switch (ring) {  // this lane's copies of row r have landed; the later rows' stay in flight
        case 2: copy_async_wait_all_but<1>(); break;
        case 3: copy_async_wait_all_but<2>(); break;
        default: copy_async_wait_all_but<3>(); break;
      }
    }
    const Row<T, kGrad> row(a, r, kRing ? t_r : Row<T, kGrad>::target_of(a, r));
    const auto& [b, s, xr, gr, xk, same_shift, t] = row;
    if (!valid_row<T, kStats, kGrad>(a, r, row, sub == 0, sub, xk.count, G)) continue;
    const float x_t = kStats && sub == 0 ? static_cast<float>(xr[t]) : 0.f;  // before any lane overwrites it
    const I count = static_cast<I>(xk.count);
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      if (j * G + sub < count)
        u[j] = kRing ? slots[q * slot + j * 32 + lane] : load_stream(xk.base + j * G + sub);
    const I he = static_cast<I>(row.head_edge()), te = static_cast<I>(row.tail_edge(C));
    const float w_t = w ? w[t] : 1.f;
    // The row's gradient factor, loaded with its logits: read after the loss's stores, it was a load the compiler
    // could not move above them (they may alias), waited for just before the gradient sweep.
    const float f_row = kGrad ? a.factor.at(b, s) : 0.f;
    float sum = 0.f;
    GradBase gb;
    // kKeep: e^(x - max) of this lane's chunks (0 outside the row)
    Kept<kKeep ? VPT : 1, E, kSmem> kept;
    kept.lane_slots = reinterpret_cast<float4*>(staged) + (threadIdx.x >> 5) * kept_smem_chunks<T, VPT>() + lane;
    if (kStats) {
      float m = -FLT_MAX;  // the lowest finite value: an all -inf row never computes (-inf) - (-inf)
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const I k = j * G + sub;
        if (k < count) m = chunk_max_masked<T>(u[j], m, k == he || k == te, xk.first_class(k), C);
      }
      m = group_max(m, G, gmask);
      float A = 0.f, D = 0.f;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const I k = j * G + sub;
        if (k >= count) continue;
        float v[E];
        chunk_values(row, u[j], k, he, te, C, v);
        float p[E];
#pragma unroll
        for (int e = 0; e < E; ++e) sum += p[e] = ex2((v[e] - m) * kLog2e);
        if (kKeep) kept.put(kKeep ? j : 0, p);
        if (kSpread) chunk_spread(A, D, v, m, w, xk.first_class(k), C);
      }
      sum = group_sum(sum, G, gmask);
      if (kSpread) A = group_sum(A, G, gmask), D = group_sum(D, G, gmask);
      const float log_s = logf(sum);
      gb = GradBase::of_stats(m, sum);
      // Every lane computes it, one lane stores it (inside the branch it once spilled a 16-lane kernel at 80 registers).
      const float loss_r = row_loss<false>(RowStats<float>{m, sum, A, D}, log_s, x_t, w_t, a.P.eps, C);
      if (sub == 0) {
        if constexpr (!kGrad) a.row_max[r] = gb.b, a.row_sum[r] = gb.q;
        a.loss[r] = loss_r;
      }
    } else {
      gb = GradBase::saved(a, r);
    }
    if (kGrad) {
      RowGrad<float> g = row.grad_factors(a, w_t, f_row);
      g.p_mul = gb.p_mul(g.p_mul);  // p * p_mul = e^(x - max) * p_mul / sum (kKeep: the kept e^(x - max))
      const I kt = static_cast<I>(row.target_chunk());
      const int et = row.target_lane();
      uint4* gk = row.grad_chunks();
      __syncwarp(gmask);  // in place: the first lane's read of x_t is ordered before the stores below
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const I k = j * G + sub;
        if (k >= count) continue;
        float out[E];
        if (kKeep) {
          kept.get(kKeep ? j : 0, out);
#pragma unroll
          for (int e = 0; e < E; ++e) out[e] *= g.p_mul;
          chunk_grad_terms<E, kSpread>(out, g, w, xk.first_class(k), C, k == kt ? et : -1);
        } else {
          float v[E];
          Chunk<T>::unpack(u[j], v);
          chunk_grad<E, kSpread>(out, v, gb.b, g, w, xk.first_class(k), C, k == kt ? et : -1);
        }
        chunk_store(row, gk, k, he, te, C, out);
      }
    }
  }
  if (kRing) copy_async_wait_all();  // only empty groups can be left (rows past the last)
}

// The gradient sweeps of stream_rows: this thread's chunks k = k_lo + tid + nt i below k_hi, U loads issued before
// the first of them is used, then body(k, chunk) for each.
template <int U, typename T, class F>
__device__ __forceinline__ void stream_chunks(const RowChunks<T>& xk, int64_t k_lo, int64_t k_hi, int tid, int nt,
                                              F&& body) {
  for (int64_t k0 = k_lo + tid; k0 < k_hi; k0 += static_cast<int64_t>(nt) * U) {
    uint4 u[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int64_t k = k0 + static_cast<int64_t>(i) * nt;
      if (k < k_hi) u[i] = load_stream(xk.base + k);
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int64_t k = k0 + static_cast<int64_t>(i) * nt;
      if (k >= k_hi) break;
      body(k, u[i]);
    }
  }
}

// ---- stream_rows: a CTA per row, U chunks in flight per thread; the sum is re-based once per U chunks.
// kSpread: a minimum of 1 CTA per SM lets ptxas keep the smoothing sums in registers (it spilled at 64).
// U: 16-byte loads issued per thread before the first is used (8 gained nothing over 4 on the H200, 2026-11-27).
// kLean (tuning lean, no smoothing; the forward or the gradient from saved stats): the forward's
// groups of U chunks inside the row without per-chunk tests; the gradient's exponent arguments as one FFMA
// (Exp2Base), the target's class not tested per chunk but stored again by the thread whose chunk holds it.
// pieces (the gradient from saved stats only; else 1): each row's chunks as that many work items of `piece` chunks
// (a multiple of blockDim.x), so that the grid's last CTAs hold pieces, not whole rows (tuning grad_piece_kb).
template <typename T, bool kStats, bool kGrad, bool kSpread, bool kLean>
__global__ void __launch_bounds__(kStreamThreads, kSpread ? 1 : 0)
    stream_rows_kernel(Args<T> a, int64_t pieces, int64_t piece) {
  static_assert(!(kLean && (kSpread || (kStats && kGrad))), "lean: the forward or the gradient, no smoothing");
  constexpr int E = Chunk<T>::E, U = kSpread && kStats && kGrad ? 2 : 4;  // U = 4 spilled there
  pdl_start();
  const RowLayout& L = a.L;
  const int64_t C = L.C;
  const int tid = threadIdx.x, nt = blockDim.x;
  const float* w = a.P.weight;
  for (int64_t item = blockIdx.x; item < L.rows() * pieces; item += gridDim.x) {
    const int64_t r = kStats || pieces == 1 ? item : item / pieces;
    const Row<T, kGrad> row(a, r);
    const auto& [b, s, xr, gr, xk, same_shift, t] = row;
    // This item's chunks [k_lo, k_hi): the whole row, or one piece of it (the last ones may be short or empty).
    const int64_t k_lo = kStats ? 0 : (item - r * pieces) * piece;
    const int64_t k_hi = kStats ? xk.count : min(xk.count, k_lo + piece);  // one piece: piece >= count
    if (!valid_row<T, kStats, kGrad>(a, r, row, tid == 0 && k_lo == 0, k_lo + tid, k_hi, nt)) continue;
    const int64_t he = row.head_edge(), te = row.tail_edge(C);
    const float w_t = w ? w[t] : 1.f;
    GradBase gb;
    if (kStats) {
      const float x_t = tid == 0 ? static_cast<float>(xr[t]) : 0.f;  // before the barrier (in place)
      float m = -FLT_MAX, sum = 0.f, A = 0.f, D = 0.f;
      // lean: Exp2Base of base_m, the max it was made for (re-made when m has grown, by either kind of group: a few
      // times per row, then rarely).
      Exp2Base base;
      float base_m = NAN;
      bool folded = false;
      for (int64_t k0 = tid; k0 < xk.count; k0 += static_cast<int64_t>(nt) * U) {
        uint4 u[U];
#pragma unroll
        for (int i = 0; i < U; ++i) {  // all U loads issued before the first is used
          const int64_t k = k0 + static_cast<int64_t>(i) * nt;
          if (k < xk.count) u[i] = kGrad ? __ldcg(xk.base + k) : load_stream(xk.base + k);  // kGrad: keep it in L2
        }
        // lean: a group with no chunk past the row's end and neither end chunk needs no per-chunk test.
        if (kLean && k0 + static_cast<int64_t>(U - 1) * nt < (te >= 0 ? te : xk.count) && k0 > he) {
          float gm = m;
#pragma unroll
          for (int i = 0; i < U; ++i) gm = chunk_max<T>(u[i], gm);
          if (gm > m) {
            sum *= ex2((m - gm) * kLog2e);
            m = gm;
          }
          if (m != base_m) {
            base_m = m;
            folded = Exp2Base::fits(m);
            if (folded) base = Exp2Base(m);
          }
          // The group's terms folded (sum stays relative to m: the group's part times base.k), or not.
          folded_or_not(folded, [&](auto fold) {
            float part = 0.f;
#pragma unroll
            for (int i = 0; i < U; ++i) {
              float v[E];
              Chunk<T>::unpack(u[i], v);
#pragma unroll
              for (int e = 0; e < E; ++e) part += base.term<decltype(fold)::value>(v[e], m);
            }
            sum = fold ? fmaf(part, base.k, sum) : sum + part;
          });
          continue;
        }
        // Unpacked twice (max, then sum) rather than held as U*E floats: registers for the loads in flight.
        float gm = m;
#pragma unroll
        for (int i = 0; i < U; ++i) {
          const int64_t k = k0 + static_cast<int64_t>(i) * nt;
          if (k >= xk.count) break;
          gm = chunk_max_masked<T>(u[i], gm, k == he || k == te, xk.first_class(k), C);
        }
        if (gm > m) {
          sum *= ex2((m - gm) * kLog2e);
          if (kSpread && A != 0.f) D += (gm - m) * A;
          m = gm;
        }
#pragma unroll
        for (int i = 0; i < U; ++i) {
          const int64_t k = k0 + static_cast<int64_t>(i) * nt;
          if (k >= xk.count) break;
          float v[E];
          chunk_values(row, u[i], k, he, te, C, v);
#pragma unroll
          for (int e = 0; e < E; ++e) sum += ex2((v[e] - m) * kLog2e);
          if (kSpread) chunk_spread(A, D, v, m, w, xk.first_class(k), C);
        }
      }
      const OnlineStats<float> st = block_stats<kSpread>(m, sum, A, D);
      const float log_s = logf(st.s);
      gb = GradBase::of_stats(st.m, st.s);
      if (tid == 0) {
        if constexpr (!kGrad) a.row_max[r] = gb.b, a.row_sum[r] = gb.q;
        a.loss[r] = row_loss<false>(st, log_s, x_t, w_t, a.P.eps, C);
      }
    } else {
      gb = GradBase::saved(a, r);
    }
    const float pb = gb.b;  // the gradient's base: the max, taken here or saved by the forward
    if (kLean && kGrad) {
      RowGrad<float> g = row.grad_factors(a, w_t);
      g.p_mul = gb.p_mul(g.p_mul);
      // x_t's chunk is this thread's (chunk k is thread k mod nt's; nt is 64, 128 or 256; pieces start at multiples
      // of nt) and this item's: only it writes there.
      const int64_t kt = row.target_chunk();
      const bool holds_t = (kt & (nt - 1)) == tid && kt >= k_lo && kt < k_hi;
      const float x_t = holds_t ? static_cast<float>(xr[t]) : 0.f;  // before this thread's stores (in place)
      uint4* gk = row.grad_chunks();
      folded_or_not(Exp2Base::fits(pb), [&](auto folded) {  // pb is the row's: the same choice in every thread
        const Exp2Base base(folded ? pb : 0.f);
        const float p_mul = folded ? g.p_mul * base.k : g.p_mul;
        stream_chunks<U>(xk, k_lo, k_hi, tid, nt, [&](int64_t k, const uint4& chunk) {
          float v[E];
          Chunk<T>::unpack(chunk, v);
          lean_chunk_store<decltype(folded)::value>(row, gk, k, same_shift && k != he && k != te, v, pb, base,
                                                    p_mul, g, w, C);
        });
      });
      if (holds_t) gr[t] = static_cast<T>(target_grad(x_t, pb, g));
    } else if (kGrad) {
      RowGrad<float> g = row.grad_factors(a, w_t);
      g.p_mul = gb.p_mul(g.p_mul);
      const int64_t kt = row.target_chunk();
      const int et = row.target_lane();
      uint4* gk = row.grad_chunks();
      stream_chunks<U>(xk, k_lo, k_hi, tid, nt, [&](int64_t k, const uint4& chunk) {
        float v[E], out[E];
        Chunk<T>::unpack(chunk, v);
        chunk_grad<E, kSpread>(out, v, pb, g, w, xk.first_class(k), C, k == kt ? et : -1);
        chunk_store(row, gk, k, he, te, C, out);
      });
    }
  }
}

// lean sweeps (slice_rows): this thread's chunks j = tid + 256 i of a slice of nj chunks whose chunk 0 sits at
// ring slot `first`.  first and the ring are multiples of 256, so the ring wraps between two trips (at trip iw);
// the row's end chunks (masked lanes) can only be the slice's first and last, so they are a thread's first and
// last trips: the interior trips [i0, i1) need no test, and the end chunks are done apart (edges).
struct OwnChunks {
  int first, wrap, iw, i0, i1;
  int e0, e1;  // the end chunks that are this thread's own (slice indices), or -1
  __device__ OwnChunks(int first_slot, int ring, int nj, int head_end, int tail_end)
      : first(first_slot), wrap(ring), iw(ring ? (ring - first_slot) / kSliceThreads : INT_MAX) {
    const int tid = threadIdx.x;
    const int n = nj > tid ? (nj - 1 - tid) / kSliceThreads + 1 : 0;
    e0 = head_end >= 0 && head_end % kSliceThreads == tid ? head_end : -1;  // head_end is 0 here
    e1 = tail_end >= 0 && tail_end % kSliceThreads == tid && tail_end != head_end ? tail_end : -1;  // nj - 1
    i0 = e0 >= 0 ? 1 : 0;
    i1 = e1 >= 0 ? n - 1 : n;
  }
  template <class F>
  __device__ __forceinline__ void interior(F&& body) const {  // body(slot, j)
    const int tid = threadIdx.x;
    int i = i0;
    for (; i < min(i1, iw); ++i) body(first + tid + i * kSliceThreads, tid + i * kSliceThreads);
    for (; i < i1; ++i) body(first - wrap + tid + i * kSliceThreads, tid + i * kSliceThreads);
  }
  template <class F>
  __device__ __forceinline__ void edges(F&& body) const {  // body(j)
    if (e0 >= 0) body(e0);
    if (e1 >= 0) body(e1);
  }
};

// The rows a cluster of slice_rows takes, in order: the current one and `next`.  Static: every `step`-th row (step:
// the clusters in the grid), so each cluster gets the same count however fast its SMs move bytes; the H200's trace
// (2026-11-28) had the CTAs' ends spread over 20-33% of the kernel while each row ran at 90-96% of its SMs' floor.
// kDyn (tuning dynamic_rows): rows handed out by a counter, so clusters that run faster take more.  A cluster's
// first two rows are static; during row r (its current), rank 0's thread 0 draws the row after `next`
// (2 * step + ticket) and publishes it in after[r] (+1: a zeroed entry is "not yet"); every thread of the
// cluster's CTAs reads it after the exchange and waits for it at the row's end only if it was not there yet: each
// entry written once and read only by its cluster, so the row loop needs no barrier for it.  sched: [0] the counter, [1 + r] after[r], zeroed before the launch.
// Only `next` and two 32-bit values live across the loop; the rest is passed in where used (held as members, the
// bf16 twin took 106 registers to the default kernel's 64: 2 CTAs per SM, not 3).
template <bool kDyn>
struct RowOrder {
  int64_t next;        // the row after the current one
  uint32_t drawn = 0;  // kDyn, the drawing thread: its last ticket
  uint32_t seen = 0;   // kDyn: an early read of after[r] (0: not there yet)
  __device__ explicit RowOrder(int64_t second) : next(second) {}
  // Whether this cluster draws the row after `next` (the same in all its threads): rows past every cluster's first
  // two, and a row after this one.
  __device__ __forceinline__ bool drawing(int64_t step, int64_t rows) const {
    return kDyn && 2 * step < rows && next < rows;
  }
  // At the row's start (rank 0's thread 0): the row after `next`, published once the row's sweeps have covered
  // the draw's return (or at once for a skipped row).
  __device__ __forceinline__ void draw(uint32_t* sched, bool leader, int64_t step, int64_t rows) {
    if (leader && drawing(step, rows)) drawn = atomicAdd(sched, 1u);
  }
  __device__ __forceinline__ void publish(uint32_t* sched, int64_t r, bool leader, int64_t step, int64_t rows) const {
    if (leader && drawing(step, rows))
      asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(sched + 1 + r), "r"(drawn + 1) : "memory");
  }
  // After the exchange: a read of after[r] that lands during the gradient sweep.
  __device__ __forceinline__ void peek(const uint32_t* sched, int64_t r, int64_t step, int64_t rows) {
    if (drawing(step, rows)) seen = load_after(sched, r);
  }
  // The loop's step: the current row becomes `next`, and `next` the row after it.
  __device__ __forceinline__ int64_t advance(const uint32_t* sched, int64_t r, int64_t step, int64_t rows) {
    const int64_t cur = next;
    if constexpr (!kDyn) {
      next = cur + step;
    } else if (drawing(step, rows)) {
      uint32_t v = seen;
      const uint64_t start = v ? 0 : global_ns();
      while (v == 0) {  // a bug would hang here: past 60 s (see SliceCluster) a launch error instead
        v = load_after(sched, r);
        if (v == 0 && global_ns() - start > 60000000000ull) __trap();
      }
      next = 2 * step + (v - 1);
      seen = 0;
    } else {
      next = rows;  // no row after `cur`
    }
    return cur;
  }

 private:
  __device__ __forceinline__ static uint32_t load_after(const uint32_t* sched, int64_t r) {
    uint32_t v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(sched + 1 + r) : "memory");
    return v;
  }
};

// ---- slice_rows: loss + gradient; a cluster of n CTAs per row, CTA `rank` holding chunks
// [rank * slice, (rank + 1) * slice) of its row in shared memory.  Each thread copies, and later reads, only its
// own chunks (j = tid, tid + 256, ...), so the staged slice needs no barrier.  Instruction count is the bound here
// (H200, 2026-11-26: the first version issued ~33 instructions per bf16 element, near the issue limit at
// half the memory floor), so the loops run over 32-bit slice indices, mask only the row's two end chunks,
// and take the max in a pass of its own instead of re-basing the sum per chunk.
// prefetch: the gradient sweep, as it frees each staged chunk, copies the same chunk of the cluster's next row
// into it, so that row's reads overlap this row's gradient stores (without it a CTA reads, then computes, then
// writes: H100 2026-11-27, fwd+bwd 83-88% of the 2-pass floor where the 3-pass none+bwd reached 93-97%).
// ring (0: off): the staged chunks live in a ring of `ring` slots (a multiple of 256), each row placed after
// the last at a multiple of 256 (so chunk j stays thread j % 256's own), and the next row's first chunks go
// into the free slots *before* this row's max and sum sweeps: the CTA has reads in flight while it computes
// its statistics and waits for the cluster, the phase in which the prefetch alone leaves it idle.
// kAsync (tuning cluster_async): the statistics exchanged by st.async (SliceCluster).  Measured and removed
// (H200, 2026-11-28, NOTES v0.17-dev): the CTAs of an SM put out of step after their first row (-0.6 points), a
// quarter of the sum's exponentials on the FMA pipe (-0.7).
// kTrace: thread 0 stamps the phases of its rows into tr (Tracer); the default kernel's twin (and kDyn's).
// kDyn (tuning dynamic_rows; the default kernel's twin): rows handed out by a counter in sched (RowOrder).  Bound
// to 3 CTAs per SM, the default kernel's count (float32 took 83 registers unbound, sm_90: 2 CTAs).
template <typename T, bool kSpread, bool kLean, bool kAsync, bool kTrace = false, bool kDyn = false>
__global__ void __launch_bounds__(kSliceThreads, kDyn ? 3 : 0)
    slice_rows_kernel(Args<T> a, int slice, int ring, bool prefetch, TraceBuf tr, uint32_t* sched) {
  static_assert(!(kSpread && kLean), "the lean sweeps have no smoothing sums");
  pdl_start();
  constexpr int E = Chunk<T>::E;
  extern __shared__ uint4 staged[];
  __shared__ float4 peer[2][kMaxCluster];  // each CTA's statistics, pushed by it; double-buffered by row parity
  __shared__ uint64_t peer_bars[2];        // kAsync: the mbarrier of each `peer` buffer
  const RowLayout& L = a.L;
  const int64_t C = L.C;
  const int tid = threadIdx.x;
  const float* w = a.P.weight;
  const int wrap = ring ? ring : slice;  // without the ring every row starts at slot 0 and never wraps
  // The slot of chunk j of a row that starts at slot `first` (both < wrap).
  const auto at = [wrap](int first, int j) { return first + j >= wrap ? first + j - wrap : first + j; };
  SliceCluster<kAsync> cl(peer_bars);
  const unsigned rank = cl.rank, n = cl.n;
  Tracer<kTrace> trace(tr, rank, n);  // tr: the kernel's parameter, read where stamped
  int64_t r = blockIdx.x / n;
  RowOrder<kDyn> order(r + gridDim.x / n);
  // Read where used (kDyn): the clusters (the static step), the drawing thread (also the row's writer below).
  const auto step = [&] { return static_cast<int64_t>(gridDim.x / n); };
  const auto leader = [&] { return rank == 0 && tid == 0; };
  int64_t t_next = r < L.rows() ? Row<T, true>::target_of(a, r) : 0;
  int64_t staged_row = -1;  // the row whose slice the copies in flight (or landed) hold
  int first = 0;            // the slot of the current row's chunk 0
  for (; r < L.rows(); r = order.advance(sched, r, step(), L.rows())) {
    order.draw(sched, leader(), step(), L.rows());
    const Row<T, true> row(a, r, t_next);
    const auto& [b, s, xr, gr, xk, same_shift, t] = row;
    const int64_t k0 = rank * static_cast<int64_t>(slice);
    const int nj = static_cast<int>(k0 + slice < xk.count ? slice : xk.count - k0);  // may be <= 0
    const int64_t rn = order.next;
    if (rn < L.rows()) t_next = Row<T, true>::target_of(a, rn);  // in flight during this row
    // Every CTA of the cluster reads the same target, so all of them skip the exchange below together.
    if (!valid_row<T, true, true>(a, r, row, leader(), k0 + tid, k0 + (nj > 0 ? nj : 0), kSliceThreads)) {
      order.publish(sched, r, leader(), step(), L.rows());
      continue;
    }
    if constexpr (kTrace) trace.start_row();
    if (staged_row != r) {
      if (staged_row >= 0) copy_async_wait_all();  // a prefetched row that was skipped: its copies land first
      for (int j = tid; j < nj; j += kSliceThreads) copy_async16(&staged[at(first, j)], xk.base + k0 + j);
      copy_async_commit();
    }
    staged_row = -1;
    // The next row's slice (0 chunks where there is none to fetch: past the end, ignored or out of range):
    // its chunks [0, head) go to the free slots now, the rest into this row's slots as the gradient frees them.
    const bool fetch = prefetch && rn < L.rows() && t_next != a.P.ignore_index && !target_out_of_range(t_next, C);
    const int reserved = ring ? (max(nj, 0) + kSliceThreads - 1) / kSliceThreads * kSliceThreads : 0;
    const int head = ring - reserved;  // 0 without the ring
    const int next_first = at(first, reserved);
    const uint4* nbase = xk.base;
    int nn = 0;
    if (fetch) {
      const Row<T, true> next(a, rn, t_next);
      nbase = next.xk.base + k0;
      nn = static_cast<int>(k0 + slice < next.xk.count ? slice : next.xk.count - k0);
      staged_row = rn;
    }
    for (int j = tid; j < min(head, nn); j += kSliceThreads) copy_async16(&staged[at(next_first, j)], nbase + j);
    copy_async_commit();
    // The end chunks, as slice indices (-1, or out of [0, nj), where this slice has none).
    const int64_t he = row.head_edge(), te = row.tail_edge(C);
    const int e0 = he >= k0 && he < k0 + nj ? static_cast<int>(he - k0) : -1;
    const int e1 = te >= k0 && te < k0 + nj ? static_cast<int>(te - k0) : -1;
    copy_async_wait_prior();  // this row's chunks have landed; the next row's first ones may still be in flight
    if constexpr (kTrace) trace.stamp_warps(1);
    const OwnChunks own(first, ring, nj, e0, e1);  // kLean only
    const auto edge_values = [&](int j, float (&v)[E]) {
      Chunk<T>::unpack(staged[at(first, j)], v);
      mask_chunk(v, xk.first_class(k0 + j), C);
    };
    float m = -FLT_MAX;  // the lowest finite value: an all -inf slice never computes (-inf) - (-inf)
    float sum = 0.f, A = 0.f, D = 0.f;
    if constexpr (kLean) {
      own.interior([&](int p, int) { m = chunk_max<T>(staged[p], m); });
      own.edges([&](int j) { m = chunk_max_masked<T>(staged[at(first, j)], m, true, xk.first_class(k0 + j), C); });
      // The sum with its exponent arguments as one FFMA (Exp2Base) where this thread's max allows it.
      const auto sweep = [&](auto folded) {
        const Exp2Base base(folded ? m : 0.f);
        const auto add = [&](const float (&v)[E]) {
#pragma unroll
          for (int e = 0; e < E; ++e) sum += base.term<decltype(folded)::value>(v[e], m);
        };
        own.interior([&](int p, int) {
          float v[E];
          Chunk<T>::unpack(staged[p], v);
          add(v);
        });
        own.edges([&](int j) {
          float v[E];
          edge_values(j, v);
          add(v);
        });
        if (folded) sum *= base.k;
      };
      folded_or_not(Exp2Base::fits(m), sweep);
    } else {
      for (int j = tid; j < nj; j += kSliceThreads)
        m = chunk_max_masked<T>(staged[at(first, j)], m, j == e0 || j == e1, xk.first_class(k0 + j), C);
      for (int j = tid; j < nj; j += kSliceThreads) {
        float v[E];
        Chunk<T>::unpack(staged[at(first, j)], v);
        if (j == e0 || j == e1) mask_chunk(v, xk.first_class(k0 + j), C);
#pragma unroll
        for (int e = 0; e < E; ++e) sum += ex2((v[e] - m) * kLog2e);
        if (kSpread) chunk_spread(A, D, v, m, w, xk.first_class(k0 + j), C);
      }
    }
    if constexpr (kTrace) trace.stamp_warps(2);
    OnlineStats<float> st = block_stats<kSpread>(m, sum, A, D);
    order.publish(sched, r, leader(), step(), L.rows());  // the draw has had the sweeps' time to come back
    if constexpr (kTrace) trace.stamp(3), trace.stamp_last();
    // What does not need the row's statistics (global loads among it): in flight while the cluster waits.
    const float w_t = w ? w[t] : 1.f;
    RowGrad<float> g = row.grad_factors(a, w_t);
    const int64_t kt = row.target_chunk();
    const int jt = kt >= k0 && kt < k0 + nj ? static_cast<int>(kt - k0) : -1;  // x_t's chunk, in this slice
    const int et = row.target_lane();
    st = cl.exchange(st, peer, peer_bars);
    order.peek(sched, r, step(), L.rows());
    if constexpr (kTrace) trace.stamp(4);
    const float log_s = logf(st.s);
    const GradBase gb = GradBase::of_stats(st.m, st.s);
    const float pb = gb.b;  // the gradient's base: the max
    g.p_mul = gb.p_mul(g.p_mul);
    const bool holds_t = jt >= 0 && jt % kSliceThreads == tid;
    float x_t = 0.f;
    if (holds_t) {  // x_t's chunk is this thread's own: its staged copy is intact
      float v[E];
      Chunk<T>::unpack(staged[at(first, jt)], v);
#pragma unroll
      for (int e = 0; e < E; ++e) x_t = e == et ? v[e] : x_t;  // a run-time index would put v in local memory
      a.loss[r] = row_loss<false>(st, log_s, x_t, w_t, a.P.eps, C);
    }
    uint4* gk = row.grad_chunks() + k0;
    if (kLean && same_shift) {
      // Every chunk as if it held no target (p * p_mul), x_t's gradient stored again after it by the same thread.
      folded_or_not(Exp2Base::fits(pb), [&](auto folded) {
        const Exp2Base base(folded ? pb : 0.f);
        const float p_mul = folded ? g.p_mul * base.k : g.p_mul;
        // 64-bit pointers stepped per trip: from the 32-bit j, each address cost 4 instructions (sm_90 SASS).
        const int j0 = tid + own.i0 * kSliceThreads, copy_end = nn - head;
        uint4* gp = gk + j0;
        const uint4* np = nbase + head + j0;
        own.interior([&](int p, int j) {
          float v[E], out[E];
          Chunk<T>::unpack(staged[p], v);
          chunk_p<decltype(folded)::value>(out, v, pb, base, p_mul);
          store_stream(gp, Chunk<T>::pack(out));
          if (j < copy_end) copy_async16(&staged[p], np);
          gp += kSliceThreads, np += kSliceThreads;
        });
        own.edges([&](int j) {
          float v[E];
          edge_values(j, v);
          lean_chunk_store<decltype(folded)::value>(row, gk, k0 + j, false, v, pb, base, p_mul, g, w, C);
          if (j + head < nn) copy_async16(&staged[at(first, j)], nbase + j + head);
        });
      });
      if (holds_t) gr[t] = static_cast<T>(target_grad(x_t, pb, g));
    }
    for (int j = tid; !(kLean && same_shift) && j < nj; j += kSliceThreads) {
      const int p = at(first, j);
      float v[E], out[E];
      Chunk<T>::unpack(staged[p], v);
      chunk_grad<E, kSpread>(out, v, pb, g, w, xk.first_class(k0 + j), C, j == jt ? et : -1);
      if (same_shift && j != e0 && j != e1)
        store_stream(gk + j, Chunk<T>::pack(out));
      else
        store_chunk(gr, xk, same_shift, k0 + j, C, out);
      // After the store, which depends on the staged values: this thread's read of staged[p] is complete.
      if (j + head < nn) copy_async16(&staged[p], nbase + j + head);
    }
    if constexpr (kTrace) trace.stamp(5);
    // The next row's chunks past this row's (its slice can be a chunk longer): this thread's own, j = tid mod 256.
    for (int j = nj > tid ? tid + (nj - tid + kSliceThreads - 1) / kSliceThreads * kSliceThreads : tid;
         j + head < nn; j += kSliceThreads)
      copy_async16(&staged[at(first, j)], nbase + j + head);
    copy_async_commit();
    if constexpr (kTrace) trace.end_row();
    first = next_first;
    // No barrier: the staged chunks are each thread's own, block_stats ends with one, `peer` has parity.
  }
  if constexpr (kTrace) trace.finish();
  cl.finish();
}

}  // namespace rows
}  // namespace softmax_ce
