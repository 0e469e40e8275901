// slice_pipe: the slice kernel (softmax_ce_rows.cuh) with its three sweeps over a staged row folded into one.
// Each trip over the slice writes row r's gradient from its staged chunks, copies row r+1's chunk into the slot
// just freed, and takes row r+1's statistics (online max/sum) from the chunk copied kLag trips earlier.  The
// CTA's reads and writes so run during all of its arithmetic, where slice_rows issues none in its max and sum
// sweeps (H200, 2026-11-27: ~3 us per row per CTA outside the memory's time, whatever the cluster size or the
// prefetch depth).  Left per row: the last copies' latency, the block reduction and the cluster barrier.
#pragma once

#include "softmax_ce_rows.cuh"

namespace softmax_ce {
namespace rows {

// One staged chunk into the online statistics: the max re-based only when this chunk raises it.
template <typename T, bool kSpread>
__device__ __forceinline__ void chunk_stats(float& m, float& sum, float& A, float& D, const uint4& u, bool edge,
                                            int64_t first, int64_t C, const float* w) {
  constexpr int E = Chunk<T>::E;
  const float cm = chunk_max_masked<T>(u, -kInf, edge, first, C);
  float v[E];
  Chunk<T>::unpack(u, v);
  if (edge) mask_chunk(v, first, C);
  if (cm > m) {  // from m = -FLT_MAX (0 * 2^-inf): an all -inf chunk never computes (-inf) - (-inf)
    sum *= ex2((m - cm) * kLog2e);
    if (kSpread && A != 0.f) D += (cm - m) * A;
    m = cm;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) sum += ex2((v[e] - m) * kLog2e);
  if (kSpread) chunk_spread(A, D, v, m, w, first, C);
}

// The slot plan is slice_rows' without a ring: chunk j of every row in slot j, thread j % 256's own.  3 CTAs per
// SM (80 registers): ptxas otherwise chose 64 for one instantiation and spilled.
// kLag: trips between a chunk's copy and its statistics, i.e. copies in flight per thread (each 16 bytes).
template <typename T, bool kSpread, int kLag>
__global__ void __launch_bounds__(kSliceThreads, 3) slice_pipe_kernel(Args<T> a, int slice) {
  extern __shared__ uint4 staged[];
  __shared__ float4 peer[2][kMaxCluster];  // each CTA's statistics, pushed by it; double-buffered by row parity
  const RowLayout& L = a.L;
  const int64_t C = L.C, rows = L.rows();
  const int tid = threadIdx.x;
  const float* w = a.P.weight;
  SliceCluster cl;
  const unsigned rank = cl.rank, n = cl.n;
  const int64_t step = gridDim.x / n;
  const int64_t k0 = rank * static_cast<int64_t>(slice);
  // This CTA's chunks of a row (may be <= 0) and its end chunks as slice indices (-1 where outside the slice).
  const auto slice_chunks = [&](const Row<T, true>& row) {
    return static_cast<int>(k0 + slice < row.xk.count ? slice : row.xk.count - k0);
  };
  const auto edge_of = [&](int64_t k, int nj) { return k >= k0 && k < k0 + nj ? static_cast<int>(k - k0) : -1; };
  // The first row from r on (step apart) with a valid target, t its target (read ahead by the caller); rows
  // skipped on the way get their outputs.  Every CTA of the cluster reads the same targets: they agree.
  const auto next_valid = [&](int64_t r, int64_t& t) {
    for (; r < rows; r += step) {
      const Row<T, true> row(a, r, t);
      const int nj = slice_chunks(row);
      if (valid_row<T, true, true>(a, r, row, rank == 0 && tid == 0, k0 + tid, k0 + (nj > 0 ? nj : 0),
                                   kSliceThreads))
        return r;
      if (r + step < rows) t = Row<T, true>::target_of(a, r + step);
    }
    return r;
  };

  int64_t r = blockIdx.x / n, t = r < rows ? Row<T, true>::target_of(a, r) : 0;
  r = next_valid(r, t);
  if (r >= rows) return;
  OnlineStats<float> st;
  float w_t;
  RowGrad<float> g;  // like w_t, read before the cluster barrier that precedes the row's sweep: loads in flight
  {  // The first row: copied, waited for, its statistics taken on their own.
    const Row<T, true> row(a, r, t);
    const int nj = slice_chunks(row);
    for (int j = tid; j < nj; j += kSliceThreads) copy_async16(&staged[j], row.xk.base + k0 + j);
    copy_async_commit();
    const int e0 = edge_of(row.head_edge(), nj), e1 = edge_of(row.tail_edge(C), nj);
    float m = -FLT_MAX, sum = 0.f, A = 0.f, D = 0.f;
    copy_async_wait_all();
    for (int j = tid; j < nj; j += kSliceThreads)
      chunk_stats<T, kSpread>(m, sum, A, D, staged[j], j == e0 || j == e1, row.xk.first_class(k0 + j), C, w);
    w_t = w ? w[t] : 1.f;
    g = row.grad_factors(a, w_t);
    st = cl.exchange(block_stats<kSpread>(m, sum, A, D), peer);
  }
  int64_t t_ahead = r + step < rows ? Row<T, true>::target_of(a, r + step) : 0;
  for (;;) {
    const Row<T, true> row(a, r, t);
    const int nj = slice_chunks(row);
    const int jt = edge_of(row.target_chunk(), nj);  // x_t's chunk, in this slice
    const int et = row.target_lane();
    const int e0 = edge_of(row.head_edge(), nj), e1 = edge_of(row.tail_edge(C), nj);
    const float lse = lse_of(st.m, st.s);
    if (jt >= 0 && jt % kSliceThreads == tid) {  // x_t's chunk is this thread's own, still staged
      float v[Chunk<T>::E], x_t = 0.f;
      Chunk<T>::unpack(staged[jt], v);
#pragma unroll
      for (int e = 0; e < Chunk<T>::E; ++e) x_t = e == et ? v[e] : x_t;  // a run-time index would use local memory
      a.loss[r] = row_loss<false>(st, logf(st.s), x_t, w_t, a.P.eps, C);
    }
    if (tid == 0 && rank == 0) a.lse[r] = lse;
    // The next row: its chunks (0 where there is none), its end chunks, its target's successor read ahead.
    int64_t tn = t_ahead;
    const int64_t rn = next_valid(r + step, tn);
    const bool more = rn < rows;
    if (more && rn + step < rows) t_ahead = Row<T, true>::target_of(a, rn + step);
    const Row<T, true> next(a, more ? rn : r, more ? tn : t);
    const int nn = more ? slice_chunks(next) : 0;
    const int n0 = edge_of(next.head_edge(), nn), n1 = edge_of(next.tail_edge(C), nn);
    const uint4* nbase = next.xk.base + k0;
    float m = -FLT_MAX, sum = 0.f, A = 0.f, D = 0.f;
    uint4* gk = row.grad_chunks() + k0;
    int trip = 0, js = tid;  // js: the next row's next chunk for the statistics
    for (int j = tid; j < max(nj, nn); j += kSliceThreads, ++trip) {
      if (j < nj) {
        float v[Chunk<T>::E], out[Chunk<T>::E];
        Chunk<T>::unpack(staged[j], v);
        chunk_grad<Chunk<T>::E, kSpread>(out, v, lse, g, w, row.xk.first_class(k0 + j), C, j == jt ? et : -1);
        if (row.same_shift && j != e0 && j != e1)
          store_stream(gk + j, Chunk<T>::pack(out));
        else
          store_chunk(row.g, row.xk, row.same_shift, k0 + j, C, out);
      }
      // After the store, which depends on the staged values: this thread's read of slot j is complete.
      if (j < nn) copy_async16(&staged[j], nbase + j);
      copy_async_commit();  // one group per trip (maybe empty): the wait below counts trips
      if (trip >= kLag) {
        if (js < nn) {
          copy_async_wait_all_but<kLag>();  // the copy of kLag trips ago (chunk js) has landed
          chunk_stats<T, kSpread>(m, sum, A, D, staged[js], js == n0 || js == n1, next.xk.first_class(k0 + js), C, w);
        }
        js += kSliceThreads;
      }
    }
    if (!more) break;
    copy_async_wait_all();
    for (; js < nn; js += kSliceThreads)
      chunk_stats<T, kSpread>(m, sum, A, D, staged[js], js == n0 || js == n1, next.xk.first_class(k0 + js), C, w);
    w_t = w ? w[tn] : 1.f;
    g = next.grad_factors(a, w_t);
    st = cl.exchange(block_stats<kSpread>(m, sum, A, D), peer);
    r = rn, t = tn;
  }
}

}  // namespace rows
}  // namespace softmax_ce
