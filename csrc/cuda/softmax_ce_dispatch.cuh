// The kernel choice and launch for one logits dtype: included by softmax_ce_kernel_<dtype>.cu, one translation unit
// per dtype so that the build compiles them in parallel.  Contiguous rows with class-index targets in
// float/bfloat16/half: the fast kernels of softmax_ce_rows.cuh (K-dim: softmax_ce_columns.cuh).  Everything else
// (probability targets, float64, classes strided as in K-dim inputs or transposed logits), and all of it under path
// 'legacy': the general kernels here.  Contiguous classes: one block per row, an online max/sum (the gradient sweep
// re-reads the row from L2).  Strided classes: one thread per row, so neighbouring threads read neighbouring
// positions.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cfloat>
#include <limits>
#include <type_traits>

#include "softmax_ce_columns.cuh"
#include "softmax_ce_launch.cuh"
#include "softmax_ce_rows.cuh"
#include "softmax_ce_stats.cuh"

namespace softmax_ce {
namespace {

constexpr int kMaxThreads = 512;

// One row, its classes split over `lanes` cooperating threads (lane `lane`); reduce() combines them.
template <typename scalar_t, typename acc_t, typename target_t, bool kStats, bool kGrad, bool kProb, typename Reduce,
          typename Sum>
__device__ void ce_row(const scalar_t* x, const RowLayout& L, const RowParams<scalar_t, acc_t, target_t>& P,
                       acc_t* loss, StatsPtrs<acc_t> stats, scalar_t* grad, const Factor<acc_t>& factor,
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
      if (!ignored && lane == 0) rows::flag_bad_target(P.status, t);  // null in the gradient-only ops
      const acc_t v = ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
      if (kStats && lane == 0) loss[r] = v;
      if (kStats && !kGrad && lane == 0) stats.max[r] = stats.sum[r] = v;
      if (kGrad)
        for (int64_t c = lane; c < L.C; c += lanes) gr[c * L.g_sC] = static_cast<scalar_t>(v);
      return;
    }
  }
  const acc_t w_t = !kProb && P.weight ? P.weight[t] : acc_t(1);
  // Read before the block's barrier: an in-place gradient sweep may overwrite it afterwards.
  const acc_t x_t = !kProb && kStats && lane == 0 ? static_cast<acc_t>(xr[t * L.x_sC]) : acc_t(0);
  OnlineStats<acc_t> st;
  acc_t base, q;  // p = e^(x - base) / q: the max and the sum, taken here or saved by the forward (exact for any max)
  if (kStats) {
    for (int64_t c = lane; c < L.C; c += lanes) {
      const acc_t v = static_cast<acc_t>(xr[c * L.x_sC]);
      if (spread)
        st.add(v, class_coef<kProb>(P, yr, L.t_sC, c, L.C));
      else
        st.add(v);
    }
    reduce(st);
    base = st.grad_base(), q = st.s;
    if (lane == 0) {
      if (!kGrad) stats.max[r] = base, stats.sum[r] = q;
      loss[r] = row_loss<kProb>(st, st.log_s(), x_t, w_t, P.eps, L.C);
    }
  } else {
    base = stats.max[r], q = stats.sum[r];
    if (kProb) {
      for (int64_t c = lane; c < L.C; c += lanes) st.A += class_coef<kProb>(P, yr, L.t_sC, c, L.C);
      st.A = sum(st.A);
    }
  }
  if (kGrad) {
    const acc_t f = factor.at(b, s);
    const acc_t W = P.weight ? *P.weight_sum : acc_t(L.C);
    RowGrad<acc_t> g = kProb ? RowGrad<acc_t>::prob(f, st.A) : RowGrad<acc_t>::index(f, w_t, W, P.eps, L.C);
    g.p_mul /= q;
    for (int64_t c = lane; c < L.C; c += lanes) {
      const acc_t p = exp(static_cast<acc_t>(xr[c * L.x_sC]) - base);
      const acc_t a = spread ? class_coef<kProb>(P, yr, L.t_sC, c, L.C) : acc_t(0);
      gr[c * L.g_sC] = static_cast<scalar_t>(g.at(p, a, c == t));
    }
  }
}

// Classes contiguous: a block walks each row.
template <typename scalar_t, typename acc_t, typename target_t, bool kStats, bool kGrad, bool kProb>
__global__ void __launch_bounds__(kMaxThreads)
    ce_row_block_kernel(const scalar_t* x, RowLayout L, RowParams<scalar_t, acc_t, target_t> P, acc_t* loss,
                        StatsPtrs<acc_t> stats, scalar_t* grad, Factor<acc_t> factor) {
  chunks::pdl_start();
  for (int64_t r = blockIdx.x; r < L.rows(); r += gridDim.x)
    ce_row<scalar_t, acc_t, target_t, kStats, kGrad, kProb>(
        x, L, P, loss, stats, grad, factor, r, threadIdx.x, blockDim.x,
        [](OnlineStats<acc_t>& st) { block_reduce(st); }, [](acc_t v) { return block_sum(v); });
}

// Classes strided (K-dim or transposed logits): a thread per row, so a warp reads neighbouring positions.
template <typename scalar_t, typename acc_t, typename target_t, bool kStats, bool kGrad, bool kProb>
__global__ void ce_row_thread_kernel(const scalar_t* x, RowLayout L, RowParams<scalar_t, acc_t, target_t> P,
                                     acc_t* loss, StatsPtrs<acc_t> stats, scalar_t* grad, Factor<acc_t> factor) {
  chunks::pdl_start();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < L.rows(); r += stride)
    ce_row<scalar_t, acc_t, target_t, kStats, kGrad, kProb>(
        x, L, P, loss, stats, grad, factor, r, 0, 1, [](OnlineStats<acc_t>&) {}, [](acc_t v) { return v; });
}

int row_block_threads(int64_t C) {
  int threads = 32;
  while (threads < kMaxThreads && threads * 8 < C) threads *= 2;  // about 8+ classes per thread
  return threads;
}

// A slice kernel, with the smallest cluster whose slices fit the shared-memory budget; false if none does.
// launch(cfg, slice, ring) launches it (the kernels' parameters differ); ring_kb 0: no ring.
template <typename Kernel, typename Launch>
bool launch_slices(Kernel kernel, int64_t rows, int64_t chunks, const CudaTuning& tune, int ring_kb, int device,
                   cudaStream_t stream, const Launch& launch) {
  const int optin = smem_optin(device);
  const int64_t budget = std::min<int64_t>(int64_t{tune.slice_kb} * 1024, optin - 2048);  // 2 KiB static
  const void* key = reinterpret_cast<const void*>(kernel);
  // Clusters need the kernel's sm_90 code: PTX of an older arch, JIT-compiled, has the one-CTA version.
  const int ptx = kernel_ptx(device, key);
  const int max_cluster = device_attr(device, cudaDevAttrComputeCapabilityMajor) >= 9 && ptx >= 90 ? std::min(tune.cluster_max, rows::kMaxCluster) : 1;
  allow_smem(device, kernel, [&] { return optin - 2048; });
  for (int n = 1; n <= max_cluster; n *= 2) {
    const int64_t slice = (chunks + n - 1) / n;
    if (slice * 16 > budget) continue;
    // The ring: ring_kb of slots, at least the slice rounded up to 256 chunks (4 KiB); off where it would not fit.
    const int64_t rounded = (slice + rows::kSliceThreads - 1) / rows::kSliceThreads * rows::kSliceThreads;
    const int64_t wanted = int64_t{ring_kb} * 64 / rows::kSliceThreads * rows::kSliceThreads;
    int64_t ring = ring_kb > 0 ? std::max(rounded, wanted) : 0;
    if (ring * 16 > optin - 2048) ring = 0;
    const int bytes = static_cast<int>((ring ? ring : slice) * 16);
    const bool cluster16 = n <= 8 || launch_fact(device, key, kFactCluster16, 0, [&] {
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) return 1;
      (void)cudaGetLastError();  // no 16-CTA clusters here
      return 0;
    });
    if (!cluster16) break;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = n;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(n);
    cfg.blockDim = dim3(rows::kSliceThreads);
    cfg.dynamicSmemBytes = bytes;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = n > 1 ? 1 : 0;
    // Clusters (or CTAs) that fit on the device at once: the persistent grid.
    const int resident = launch_fact(device, key, n, bytes, [&] {
      int r = 0;
      if (n > 1) {
        if (cudaOccupancyMaxActiveClusters(&r, kernel, &cfg) != cudaSuccess) {
          (void)cudaGetLastError();  // this cluster size cannot run here: try a larger one
          r = 0;
        }
      } else {
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r, kernel, rows::kSliceThreads, bytes));
        r *= sm_count(device);
      }
      return r;
    });
    if (resident <= 0) continue;
    cfg.gridDim = dim3(static_cast<unsigned>(std::min<int64_t>(rows, resident) * n));
    if (pdl_launches(tune, device)) {  // after the occupancy query, which read the cluster attribute alone
      attr[cfg.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[cfg.numAttrs].val.programmaticStreamSerializationAllowed = 1;
      ++cfg.numAttrs;
    }
    C10_CUDA_CHECK(launch(cfg, static_cast<int>(slice), static_cast<int>(ring)));
    return true;
  }
  return false;
}

// The loss + gradient of rows staged in shared memory (slice_rows: ring, prefetch, lean where no smoothing).
template <typename T>
bool launch_slice_rows(const rows::Args<T>& a, int64_t chunks, const CudaTuning& tune, int device,
                       cudaStream_t stream) {
  const bool spread = a.P.eps != 0.f;
  // cluster_async: only the smoothing and lean sweeps (the defaults) have that exchange compiled.
  const bool async = tune.cluster_async;
  const SliceTrace trace = slice_trace();
  // The default kernel's twin, on the buffer's device only.
  const bool traced = trace.data != 0 && trace.device == device && !spread && tune.lean && async;
  // dynamic_rows: the default kernel's twin (its row counter and after[] in 32 bits: rows <= kMaxRows)
  const bool dyn = tune.dynamic_rows && !spread && tune.lean && async;
  auto kernel = traced      ? dyn ? rows::slice_rows_kernel<T, false, true, true, true, true>
                                  : rows::slice_rows_kernel<T, false, true, true, true>
                : dyn       ? rows::slice_rows_kernel<T, false, true, true, false, true>
                : spread    ? async ? rows::slice_rows_kernel<T, true, false, true>
                                    : rows::slice_rows_kernel<T, true, false, false>
                : tune.lean ? async ? rows::slice_rows_kernel<T, false, true, true>
                                    : rows::slice_rows_kernel<T, false, true, false>
                            : rows::slice_rows_kernel<T, false, false, false>;
  return launch_slices(kernel, a.L.rows(), chunks, tune, tune.ring_kb, device, stream,
                       [&](cudaLaunchConfig_t& cfg, int slice, int ring) {
                         const rows::TraceBuf tr{traced ? reinterpret_cast<int64_t*>(trace.data) : nullptr,
                                                 trace.ctas, trace.rows};
                         // dynamic_rows: the counter and after[], zeroed in stream order before the kernel (the
                         // caching allocator reuses the memory only for work queued after it)
                         at::Tensor sched;
                         if (dyn) sched = at::zeros({a.L.rows() + 1}, at::dtype(at::kInt).device(at::kCUDA, device));
                         uint32_t* sp = dyn ? reinterpret_cast<uint32_t*>(sched.data_ptr<int32_t>()) : nullptr;
                         return cudaLaunchKernelEx(&cfg, kernel, a, slice, ring, tune.prefetch, tr, sp);
                       });
}
// Whether warp rows stage rows in shared memory (warp_ring): the fused loss + gradient of float rows of 129-256
// chunks without smoothing, whose registers (94) allow only 2 CTAs per SM.  On the H200 (2026-11-27) staging
// gained 3.5 points there (65536x1000 float32 fwd+bwd, 73.4 -> 76.9% at depth 2) and lost elsewhere: the forward
// alone 74.3 -> 61.6% (80 registers: 3 CTAs per SM unstaged, 2 staged), reduction='none' 88.6 -> 80.8%, 2-byte
// or shorter rows 5-8 points (3 CTAs per SM: enough loads in flight without it).
template <typename T, bool kStats, bool kGrad, bool kSpread>
constexpr bool kWarpRingRows = kStats && kGrad && !kSpread && sizeof(T) == 4;

// warp_ring: rows staged per warp, as many of tune.warp_ring as fit in an SM's shared memory beside the 2 CTAs
// (the kernel's launch bounds); 0 where off or not applying.
template <typename T, bool kStats, bool kGrad, bool kSpread>
int warp_ring_depth(int64_t chunks, const CudaTuning& tune, int device) {
  if (!kWarpRingRows<T, kStats, kGrad, kSpread> || tune.warp_ring < 2 || chunks <= 128) return 0;
  const int64_t per_cta = device_attr(device, cudaDevAttrMaxSharedMemoryPerMultiprocessor) / 2 - 1024;
  const int64_t fits = per_cta / (rows::kWarpRowThreads / 32 * chunks * 16);
  const int ring = static_cast<int>(std::min<int64_t>(tune.warp_ring, fits));
  return ring >= 2 ? ring : 0;
}

// The shared memory per CTA of warp rows that keep their exponentials there (rows::keep_shared), and whether
// the device holds it for as many CTAs per SM as the kernel is compiled for (sm_86/89's 100 KiB would not: one CTA
// of the 2-byte rows of 8 chunks, where the unkept kernel runs three).
template <typename T, int VPT, bool kSpread>
constexpr int warp_kept_smem() {
  constexpr int kWarps = rows::kWarpRowThreads / 32;
  return rows::keep_shared<T, VPT, kSpread>() ? rows::kept_smem_chunks<T, VPT>() * kWarps * 16 : 0;
}
template <typename T, int VPT, bool kSpread>
bool warp_kept_fits(int device) {
  constexpr int kBytes = warp_kept_smem<T, VPT, kSpread>(), kCtas = rows::warp_rows_ctas<T, VPT, kSpread>();
  constexpr int kReserve = 1024;  // per CTA, the runtime's
  return kCtas * (kBytes + kReserve) <= device_attr(device, cudaDevAttrMaxSharedMemoryPerMultiprocessor);
}

// The warp-row kernel for rows of `chunks` chunks: 2, 4 or 8 per lane, staged (ring > 0) or not, keeping its
// exponentials (the loss + gradient, tuning warp_keep, where they fit) in registers or in *kept_smem bytes of shared
// memory per CTA.
template <typename T, bool kStats, bool kGrad, bool kSpread>
auto warp_rows_for(int64_t chunks, int ring, bool warp_keep, int device, int* kept_smem) {
  constexpr bool kRing = kWarpRingRows<T, kStats, kGrad, kSpread>, kKeep = kStats && kGrad;
  const int vpt = chunks <= 64 ? 2 : chunks <= 128 ? 4 : 8;
  const bool keep = kKeep && warp_keep &&
                    (vpt == 2   ? warp_kept_fits<T, 2, kSpread>(device)
                     : vpt == 4 ? warp_kept_fits<T, 4, kSpread>(device) : warp_kept_fits<T, 8, kSpread>(device));
  *kept_smem = !keep ? 0 : vpt == 2 ? warp_kept_smem<T, 2, kSpread>() : vpt == 4 ? warp_kept_smem<T, 4, kSpread>()
                                                                                  : warp_kept_smem<T, 8, kSpread>();
  if (vpt == 2) return keep ? rows::warp_rows_kernel<T, 2, kStats, kGrad, kSpread, false, kKeep>
                            : rows::warp_rows_kernel<T, 2, kStats, kGrad, kSpread, false, false>;
  if (vpt == 4) return keep ? rows::warp_rows_kernel<T, 4, kStats, kGrad, kSpread, false, kKeep>
                            : rows::warp_rows_kernel<T, 4, kStats, kGrad, kSpread, false, false>;
  if (ring) return keep ? rows::warp_rows_kernel<T, 8, kStats, kGrad, kSpread, kRing, kKeep>
                        : rows::warp_rows_kernel<T, 8, kStats, kGrad, kSpread, kRing, false>;
  return keep ? rows::warp_rows_kernel<T, 8, kStats, kGrad, kSpread, false, kKeep>
              : rows::warp_rows_kernel<T, 8, kStats, kGrad, kSpread, false, false>;
}

// warp_group: the lanes per row of grouped warp rows (the loss + gradient of rows of up to 128 chunks, no
// smoothing), the fewest of 16, 8 and 4 whose 8 chunks each cover the row; 0 (a warp per row) where off or not
// applying.
template <bool kStats, bool kGrad, bool kSpread>
int warp_group_lanes(int64_t chunks, const CudaTuning& tune) {
  if (!(kStats && kGrad) || kSpread || !tune.warp_group || chunks > 128) return 0;
  return chunks > 64 ? 16 : chunks > 32 ? 8 : 4;
}
template <typename T, bool kStats, bool kGrad, bool kSpread>
auto grouped_rows_kernel(int lanes) {
  if constexpr (kStats && kGrad && !kSpread) {
    return lanes == 16  ? rows::warp_rows_kernel<T, 8, true, true, false, false, false, 16>
           : lanes == 8 ? rows::warp_rows_kernel<T, 8, true, true, false, false, false, 8>
                        : rows::warp_rows_kernel<T, 8, true, true, false, false, false, 4>;
  } else {  // never launched (warp_group_lanes is 0 here): the same type, an instantiation compiled anyway
    return rows::warp_rows_kernel<T, 8, kStats, kGrad, kSpread, false, false>;
  }
}

// Warp rows for short rows, slices for loss + gradient of longer ones, else the streaming kernel; the
// smoothing sums are compiled in only where label smoothing is on (kSpread).
template <typename T, bool kStats, bool kGrad, bool kSpread>
void launch_row_kernels(const rows::Args<T>& a, int64_t chunks, const CudaTuning& tune, int device,
                        cudaStream_t stream) {
  const int64_t rows_n = a.L.rows();
  constexpr int64_t kMaxGrid = (1LL << 31) - 1;
  if (tune.path == CudaPath::kAuto && chunks <= 32 * 8) {  // a warp per row (or a group of lanes)
    const int group = warp_group_lanes<kStats, kGrad, kSpread>(chunks, tune);
    const int lanes = group ? group : 32;
    const int ring = group ? 0 : warp_ring_depth<T, kStats, kGrad, kSpread>(chunks, tune, device);
    int kept = 0;  // bytes
    auto kernel = group ? grouped_rows_kernel<T, kStats, kGrad, kSpread>(group)
                        : warp_rows_for<T, kStats, kGrad, kSpread>(chunks, ring, tune.warp_keep, device, &kept);
    const int smem = ring * rows::kWarpRowThreads / 32 * static_cast<int>(chunks) * 16 + kept;
    if (kept) allow_smem(device, kernel, [&] { return kept; });
    const int64_t cta_rows = rows::kWarpRowThreads / lanes;
    int64_t blocks = std::min<int64_t>((rows_n + cta_rows - 1) / cta_rows, int64_t{sm_count(device)} * 64);
    if (ring) {  // a resident grid: the CTAs that fit at once
      allow_smem(device, kernel, [&] { return smem_dynamic_max(device, kernel); });
      const int per_sm = blocks_per_sm(device, kernel, rows::kWarpRowThreads, smem);
      blocks = std::min<int64_t>((rows_n + 7) / 8, int64_t{sm_count(device)} * std::max(per_sm, 1));
    }
    launch_kernel(pdl_launches(tune, device), kernel, dim3(static_cast<unsigned>(blocks)), dim3(rows::kWarpRowThreads), smem,
                  stream, a, ring, static_cast<int>(chunks));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (kStats && kGrad && tune.path == CudaPath::kAuto && launch_slice_rows<T>(a, chunks, tune, device, stream)) return;
  int threads = 64;  // about 4+ chunks per thread, up to kStreamThreads; a power of two (the lean gradient's rule)
  while (threads < rows::kStreamThreads && threads * 4 < chunks) threads *= 2;
  constexpr bool kCanLean = !kSpread && !(kStats && kGrad);  // lean: the forward, or the gradient from saved stats
  auto kernel = kCanLean && tune.lean ? rows::stream_rows_kernel<T, kStats, kGrad, kSpread, kCanLean>
                                      : rows::stream_rows_kernel<T, kStats, kGrad, kSpread, false>;
  // grad_piece_kb (the gradient from saved stats): rows cut into pieces of about that many KiB, a multiple of
  // threads * 4 chunks, so that the last CTAs of the grid hold a piece each rather than a whole row.
  int64_t piece = chunks, pieces = 1;
  if (!kStats && tune.grad_piece_kb > 0) {
    const int64_t group = int64_t{threads} * 4;
    piece = std::max<int64_t>(group, int64_t{tune.grad_piece_kb} * 64 / group * group);
    pieces = (chunks + piece - 1) / piece;
  }
  launch_kernel(pdl_launches(tune, device), kernel, dim3(static_cast<unsigned>(std::min<int64_t>(rows_n * pieces, kMaxGrid))),
                dim3(threads), 0, stream, a, pieces, piece);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fast kernels (softmax_ce_rows.cuh) for contiguous rows; false leaves the work to the general ones.  The
// training pass (no loss buffer given) gets a per-row loss buffer.
template <typename scalar_t, bool kStats, bool kGrad>
bool launch_fast_rows(const RowLayout& L, OpTensors& o) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return false;
  } else {
    const CudaTuning tune = cuda_tuning();
    constexpr int64_t kMaxRows = (1LL << 31) - 1;  // the fast kernels index rows in 32 bits (split_row)
    if (tune.path == CudaPath::kLegacy || L.x_sC != 1 || (kGrad && L.g_sC != 1) || L.rows() > kMaxRows) return false;
    using T = scalar_t;
    constexpr int E = chunks::Chunk<T>::E;
    const int64_t chunks = (L.C + 2 * E - 2) / E;  // 16-byte chunks covering a row, however it is aligned
    const int device = o.logits.get_device();
    if (kStats && !o.loss.defined()) row_outputs(kGrad ? Mode::kStatsGrad : Mode::kStats, o);
    const StatsPtrs<float> stats = stats_ptrs<float>(o);  // none in the training pass
    const rows::Args<T> a{o.logits.data_ptr<T>(), kGrad ? o.grad.data_ptr<T>() : nullptr, L,
                          row_params<T, float, T>(o, false), kStats ? o.loss.data_ptr<float>() : nullptr,
                          stats.max, stats.sum, factor_of<float>(o), nullptr,
                          o.after_mean_scale && pdl_launches(tune, device)};
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (a.P.eps != 0.f)
      launch_row_kernels<T, kStats, kGrad, true>(a, chunks, tune, device, stream);
    else
      launch_row_kernels<T, kStats, kGrad, false>(a, chunks, tune, device, stream);
    return true;
  }
}

// The K-dim kernel (softmax_ce_columns.cuh) applies: positions contiguous, every chunk 16-byte aligned.
// Threads per CTA of the K-dim kernel: C chunks of shared memory each, within its budget.
inline int columns_threads(int64_t C) {
  int threads = 128;
  while (threads > 32 && int64_t{threads} * C * 16 > columns::kBlockBudget) threads /= 2;
  return threads;
}

template <typename T, bool kGrad>
bool columns_apply(const RowLayout& L, const OpTensors& o, const CudaTuning& tune) {
  auto aligned = [](const void* p, int64_t sC, int64_t sB) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (sC * sizeof(T)) % 16 == 0 && (sB * sizeof(T)) % 16 == 0;
  };
  constexpr int64_t E = 16 / sizeof(T);
  const int64_t items = L.B * ((L.S + E - 1) / E);  // indexed in 32 bits by the kernel
  return !std::is_same_v<T, double> && tune.path != CudaPath::kLegacy && L.S >= 2 && L.C >= 1 &&
         items < (1LL << 31) &&
         L.C <= columns::kMaxClasses && L.x_sS == 1 && aligned(o.logits.data_ptr(), L.x_sC, L.x_sB) &&
         (!kGrad || (L.g_sS == 1 && aligned(o.grad.data_ptr(), L.g_sC, L.g_sB))) &&
         // the CTA's chunks in this GPU's shared memory (up to 96 KiB: more than a Turing CTA may have), beside the
         // kernel's static block sums (~0.1-0.5 KiB; the launch checks the exact figure)
         int64_t{columns_threads(L.C)} * L.C * 16 <= smem_optin(o.logits.get_device()) - 1024;
}

// The K-dim kernel.  Where only the summed loss is wanted (the training pass, a no-grad mean: no per-row buffers)
// each CTA writes one partial loss sum: the positions' loss and stats rows would add ~10% to the training floor's
// bytes (~20% to the forward's) and their memory to the peak, and their sum two more launches.
template <typename scalar_t, bool kStats, bool kGrad>
bool launch_fast_columns(const RowLayout& L, OpTensors& o) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return false;
  } else {
    using T = scalar_t;
    const CudaTuning tune = cuda_tuning();  // one reading for the whole launch
    if (!columns_apply<T, kGrad>(L, o, tune)) return false;
    const int threads = columns_threads(L.C);
    const int smem = static_cast<int>(int64_t{threads} * L.C * 16);
    const int device = o.logits.get_device();
    // dynamic_rows: the twin taking tiles of items from a counter (rows handed out as in the slices)
    const bool dyn = tune.dynamic_rows;
    auto kernel = dyn ? columns::columns_kernel<T, kStats, kGrad, false, true>
                      : columns::columns_kernel<T, kStats, kGrad, false>;
    const int smem_cap = std::min(columns::kBlockBudget, smem_dynamic_max(device, kernel));
    if (smem > smem_cap) return false;  // launched nothing: the general kernel instead
    allow_smem(device, kernel, [&] { return smem_cap; });
    const int per_sm = blocks_per_sm(device, kernel, threads, smem);
    constexpr int E = chunks::Chunk<T>::E;
    const int64_t items = L.B * ((L.S + E - 1) / E);
    const int64_t blocks = std::min<int64_t>((items + threads - 1) / threads, int64_t{std::max(per_sm, 1)} * sm_count(device));
    const bool partial = kStats && !o.loss.defined();  // the summed loss only: a partial sum per CTA (dyn: tile)
    const int64_t tiles = (items + threads - 1) / threads;
    at::Tensor partials, sched;
    if (partial) partials = at::empty({dyn ? tiles : blocks}, o.logits.options().dtype(at::kFloat));
    if (dyn) sched = at::zeros({1}, o.logits.options().dtype(at::kInt));  // the tile counter, in stream order
    const StatsPtrs<float> stats = stats_ptrs<float>(o);  // none where partial, nor in the training pass
    const rows::Args<T> a{o.logits.data_ptr<T>(), kGrad ? o.grad.data_ptr<T>() : nullptr, L,
                          row_params<T, float, T>(o, false), kStats && !partial ? o.loss.data_ptr<float>() : nullptr,
                          stats.max, stats.sum, factor_of<float>(o), partial ? partials.data_ptr<float>() : nullptr};
    launch_kernel(pdl_launches(tune, device), kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), smem,
                  c10::cuda::getCurrentCUDAStream(), a, columns::MeanFold{},
                  dyn ? reinterpret_cast<uint32_t*>(sched.data_ptr<int32_t>()) : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (partial) {  // a fixed grid on a given device (dyn: fixed tiles): a fixed order
      o.loss_sum = sum_values(partials, o.loss_divisor, o.loss_dtype);
      o.loss_finished = true;
    }
    return true;
  }
}

// K-dim mean training with the mean's denominator counted by the K-dim kernel itself (kFold, tuning kdim_fold):
// class indices, unweighted, the kernel's layout.  A cooperative launch (all CTAs resident, or the launch fails
// rather than the grid barrier hanging) of as many CTAs as fit with their threads' target bytes beside the logits'
// slots.  Sets the denominator (o.loss_divisor) and the finished loss; false, with nothing launched, where it does
// not apply (then mean_scale and the plain training pass run).
template <typename T>
bool launch_folded_columns(const RowLayout& L, OpTensors& o, const CudaTuning& tune) {
  if (!columns_apply<T, true>(L, o, tune)) return false;
  const int device = o.logits.get_device();
  if (!device_attr(device, cudaDevAttrCooperativeLaunch)) return false;
  // Under graph capture a launch that cannot be co-resident fails at replay, not here: no fallback, so no fold.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;
  constexpr int E = chunks::Chunk<T>::E;
  const int threads = columns_threads(L.C);
  const int logit_smem = static_cast<int>(int64_t{threads} * L.C * 16);
  auto kernel = columns::columns_kernel<T, true, true, true>;
  const void* key = reinterpret_cast<const void*>(kernel);
  // sm_86/89 (99 KiB) and Turing (64 KiB) hold less than the two budgets: fewer codes per thread, or no fold
  const int smem_cap = std::min(columns::kBlockBudget + columns::kFoldBudget, smem_dynamic_max(device, kernel));
  allow_smem(device, kernel, [&] { return smem_cap; });
  auto per_sm_at = [&](int smem) { return blocks_per_sm(device, kernel, threads, smem); };
  const int64_t items = L.B * ((L.S + E - 1) / E);
  // Fewer CTAs give each thread more items, so more target bytes: from the most CTAs per SM the logits allow
  // down, the first count at which the CTAs still fit with their bytes.
  for (int per_sm = per_sm_at(logit_smem); per_sm >= 1; --per_sm) {
    const int64_t blocks = std::min<int64_t>((items + threads - 1) / threads, int64_t{per_sm} * sm_count(device));
    const int64_t per_thread = (items + blocks * threads - 1) / (blocks * threads);
    const int64_t code_smem = (per_thread * threads * E + 15) / 16 * 16;
    if (code_smem > columns::kFoldBudget) return false;  // fewer CTAs would only need more
    const int smem = logit_smem + static_cast<int>(code_smem);
    if (smem > smem_cap) return false;  // Turing's 64 KiB; fewer CTAs would only need more
    if (int64_t{per_sm_at(smem)} * sm_count(device) < blocks) continue;
    at::Tensor counts = at::empty({blocks}, o.logits.options().dtype(at::kInt));
    at::Tensor denom = at::empty({}, o.logits.options().dtype(at::kFloat));
    at::Tensor partials = at::empty({blocks}, o.logits.options().dtype(at::kFloat));
    if (o.status.defined() && o.status.is_cpu()) o.status_ptr = mapped_status(o.status, device);
    rows::Args<T> a{o.logits.data_ptr<T>(), o.grad.data_ptr<T>(), L, row_params<T, float, T>(o, false), nullptr,
                    nullptr, nullptr, Factor<float>{nullptr, 0, 0}, partials.data_ptr<float>()};
    o.grad_mul_used = at::empty({}, o.logits.options().dtype(at::kFloat));  // m as this kernel reads it
    columns::MeanFold fold{counts.data_ptr<int>(), denom.data_ptr<float>(),
                           o.grad_mul.defined() ? o.grad_mul.data_ptr<float>() : nullptr,
                           o.grad_mul_used.data_ptr<float>()};
    uint32_t* no_sched = nullptr;
    void* args[] = {&a, &fold, &no_sched};
    const cudaError_t err = cudaLaunchCooperativeKernel(key, dim3(static_cast<unsigned>(blocks)), dim3(threads), args,
                                                        smem, c10::cuda::getCurrentCUDAStream());
    if (err != cudaSuccess) {  // e.g. fewer SMs than the occupancy said (MPS): the unfolded path instead
      (void)cudaGetLastError();
      return false;
    }
    o.loss_divisor = denom;
    o.loss_sum = sum_values(partials, denom, o.loss_dtype);  // a fixed grid on a given device: a fixed order
    o.loss_finished = true;
    return true;
  }
  return false;
}

template <typename scalar_t, typename target_t, bool kStats, bool kGrad, bool kProb>
void launch_typed(const RowLayout& L, OpTensors& o) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (!kProb) {
    if (kStats && !o.loss.defined() && launch_fast_columns<scalar_t, kStats, kGrad>(L, o)) return;
  }
  if constexpr (!kProb) {
    if (launch_fast_rows<scalar_t, kStats, kGrad>(L, o)) return;  // allocates the row outputs it needs
  }
  // Every other kernel writes per-row losses (and the forward's stats).
  if (kStats && !o.loss.defined()) row_outputs(kGrad ? Mode::kStatsGrad : Mode::kStats, o);
  if constexpr (!kProb) {
    if (launch_fast_columns<scalar_t, kStats, kGrad>(L, o)) return;
  }
  if constexpr (!kProb && !std::is_same_v<scalar_t, double>) {
    // Classes strided where no fast kernel applies (transposed N x C logits, K-dim past the K-dim kernel's
    // classes or alignment): the general kernels' strided reads ran at 1-6% of the floor (H200, 4096x4096: a
    // thread per row is 16 warps per SM).  So the logits are copied row-major once, the row kernels run on the
    // copy (the gradient written over it) and the gradient is copied into its layout: ~3x the bytes of the
    // floor, one logits-size buffer more.  Rows keep their (b, s) index: loss, stats, factor rows as they were.
    if (L.x_sC != 1 && L.C > 1 && cuda_tuning().path == CudaPath::kAuto) {
      const at::Tensor logits = o.logits, grad = o.grad;
      const at::Tensor rows =  // (B, S, C) row-major, seen as (B, C, S) as the ops pass logits
          logits.as_strided({L.B, L.S, L.C}, {L.x_sB, L.x_sS, L.x_sC}, logits.storage_offset()).contiguous();
      RowLayout Lr = L;
      Lr.x_sB = Lr.g_sB = L.S * L.C, Lr.x_sS = Lr.g_sS = L.C, Lr.x_sC = Lr.g_sC = 1;
      o.logits = rows.transpose(1, 2);
      if (kGrad) o.grad = o.logits;  // in place over the copy
      o.after_mean_scale = false;      // the copy's kernel comes between
      launch_typed<scalar_t, target_t, kStats, kGrad, kProb>(Lr, o);
      o.logits = logits, o.grad = grad;
      if (kGrad) grad.as_strided({L.B, L.S, L.C}, {L.g_sB, L.g_sS, L.g_sC}, grad.storage_offset()).copy_(rows);
      return;
    }
  }
  const auto P = row_params<scalar_t, acc_t, target_t>(o, kProb);
  const Factor<acc_t> f = factor_of<acc_t>(o);
  const scalar_t* x = o.logits.data_ptr<scalar_t>();
  acc_t* loss = kStats ? o.loss.data_ptr<acc_t>() : nullptr;
  const StatsPtrs<acc_t> stats = stats_ptrs<acc_t>(o);
  scalar_t* grad = kGrad ? o.grad.data_ptr<scalar_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool pdl = pdl_launches(o.logits.get_device());
  const int64_t rows = L.rows();
  constexpr int64_t kMaxGrid = (1LL << 31) - 1;
  // Classes contiguous, or few rows: a block walks a row.  Otherwise neighbouring rows are neighbours in
  // memory, and a thread per row keeps the warp's loads coalesced.
  if (L.x_sC == 1 || rows < 1024) {
    const int threads = row_block_threads(L.C);
    const int64_t blocks = std::min<int64_t>(rows, kMaxGrid);
    launch_kernel(pdl, ce_row_block_kernel<scalar_t, acc_t, target_t, kStats, kGrad, kProb>,
                  dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, stream, x, L, P, loss, stats, grad, f);
  } else {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((rows + threads - 1) / threads, kMaxGrid);
    launch_kernel(pdl, ce_row_thread_kernel<scalar_t, acc_t, target_t, kStats, kGrad, kProb>,
                  dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, stream, x, L, P, loss, stats, grad, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename target_t, bool kProb>
void launch_modes(Mode mode, const RowLayout& L, OpTensors& o) {
  switch (mode) {
    case Mode::kStats: return launch_typed<scalar_t, target_t, true, false, kProb>(L, o);
    case Mode::kStatsGrad: return launch_typed<scalar_t, target_t, true, true, kProb>(L, o);
    case Mode::kGrad: return launch_typed<scalar_t, target_t, false, true, kProb>(L, o);
  }
}

// The K-dim mean's fold where the dtype has the K-dim kernel (not float64).
template <typename T>
bool fold_columns(const RowLayout& L, OpTensors& o, const CudaTuning& tune) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    return launch_folded_columns<T>(L, o, tune);
  }
}

}  // namespace
}  // namespace softmax_ce

// The entry points of one logits dtype (declared in softmax_ce_launch.cuh): probability targets come in the
// logits' dtype or in the accumulation dtype (no rounding of float32 targets).
#define SOFTMAX_CE_LOGITS_DTYPE(T)                                                                          \
  namespace softmax_ce {                                                                                   \
  template <>                                                                                              \
  void launch_logits<T>(Mode mode, const RowLayout& L, OpTensors& o) {                                     \
    if (!o.target.is_floating_point())                                                                     \
      launch_modes<T, T, false>(mode, L, o);                                                               \
    else if (o.target.scalar_type() == o.logits.scalar_type())                                             \
      launch_modes<T, T, true>(mode, L, o);                                                                \
    else                                                                                                   \
      launch_modes<T, at::opmath_type<T>, true>(mode, L, o);                                               \
  }                                                                                                        \
  template <>                                                                                              \
  bool fold_mean_logits<T>(const RowLayout& L, OpTensors& o, const CudaTuning& tune) {                     \
    return fold_columns<T>(L, o, tune);                                                                    \
  }                                                                                                        \
  }
