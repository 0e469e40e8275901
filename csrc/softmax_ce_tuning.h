// Which CUDA kernel family handles contiguous rows, and how the fast kernels stage them: settable at run time
// (softmax_ce_ext.tuning) so one GPU session can compare them; defaults from the environment
// (SOFTMAX_CE_CUDA_PATH = auto | stream | legacy, SOFTMAX_CE_CUDA_SLICE_KB, _CLUSTER_MAX, _PREFETCH, _RING_KB,
// _LEAN, _WARP_RING, _GRAD_PIECE_KB, _KDIM_FOLD, _WARP_KEEP, _CLUSTER_ASYNC, _WARP_GROUP, _DYNAMIC_ROWS, _PDL).  The defaults are the winners measured on the H200 (benchmarks/NOTES.md).
#pragma once

#include <cstdint>
#include <string>

namespace softmax_ce {

enum class CudaPath { kAuto, kStream, kLegacy };

struct CudaTuning {
  CudaPath path;
  int slice_kb;     // largest shared-memory slice of a row per CTA, KiB
  int cluster_max;  // largest cluster of CTAs sharing a row (1: no clusters)
  bool prefetch;    // slice kernel: copy the next row's slice during this row's gradient sweep
  int ring_kb;      // slice kernel: shared memory per CTA as a ring holding this row and the next one's start (0: off)
  bool lean;  // no smoothing, slices and streaming (forward, gradient from saved stats): no per-chunk tests,
              // the exponent argument by one FFMA
  int warp_ring;  // warp rows, loss + gradient of float rows of 129-256 chunks, no smoothing (0: off): rows
                  // staged per warp, 2-4 slots
  int grad_piece_kb;  // streaming gradient from saved stats (0: whole rows): rows cut into pieces of ~this many KiB
  bool kdim_fold;     // K-dim mean training: the denominator counted inside the columns kernel (a grid barrier)
  bool warp_keep;     // warp rows' loss + gradient: the sum sweep's exponentials kept for the gradient sweep
  bool cluster_async;  // slice kernel: the cluster's statistics exchanged by st.async + mbarriers, not cluster.sync()
  bool warp_group;     // warp rows' loss + gradient of rows of up to 128 chunks: 16, 8 or 4 lanes per row
  bool dynamic_rows;   // rows handed out by a counter, not a stride: the slice kernel (no smoothing, lean,
                       // cluster_async) and the unfolded K-dim kernel (tiles of its items)
  bool pdl;            // sm_90+: kernels launched programmatically after the one before (softmax_ce_launch.cuh)
};

// The slice kernel's phase stamps (benchmarks/slice_trace.py): where set, the default slice kernel's traced twin
// runs on `device`, stamping the first `rows` rows of the first `ctas` CTAs into `data`, memory of that device of
// ctas * (8 + 10 * rows) int64 that the caller keeps alive.  Off (data 0) by default.
struct SliceTrace {
  int64_t data;  // the buffer's device address, 0: off
  int ctas, rows, device;
};
SliceTrace slice_trace();
void set_slice_trace(int64_t data, int ctas, int rows, int device);

CudaTuning cuda_tuning();
void set_cuda_tuning(const std::string& path, int slice_kb, int cluster_max, bool prefetch, int ring_kb, bool lean,
                     int warp_ring, int grad_piece_kb, bool kdim_fold, bool warp_keep, bool cluster_async,
                     bool warp_group, bool dynamic_rows, bool pdl);

}  // namespace softmax_ce
