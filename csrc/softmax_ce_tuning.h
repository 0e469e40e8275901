// Which CUDA kernel family handles contiguous rows, and how the fast kernels stage them: settable at run time
// (softmax_ce_ext.tuning) so one GPU session can compare them; defaults from the environment
// (SOFTMAX_CE_CUDA_PATH = auto | stream | legacy, SOFTMAX_CE_CUDA_SLICE_KB, _CLUSTER_MAX, _PREFETCH, _RING_KB,
// _WARP_AHEAD, _L2_KEEP, _PIPELINE, _STREAM_LOADS, _LEAN, _WARP_RING, _GRAD_PIECE_KB).
#pragma once

#include <string>

namespace softmax_ce {

enum class CudaPath { kAuto, kStream, kLegacy };

struct CudaTuning {
  CudaPath path;
  int slice_kb;     // largest shared-memory slice of a row per CTA, KiB
  int cluster_max;  // largest cluster of CTAs sharing a row (1: no clusters)
  bool prefetch;    // slice kernel: copy the next row's slice during this row's gradient sweep
  int ring_kb;      // slice kernel: shared memory per CTA as a ring holding this row and the next one's start (0: off)
  bool warp_ahead;  // warp rows: a resident grid, each warp loading its next row before computing this one
  bool l2_keep;     // K-dim: the mean's denominator keeps the targets in L2 for the loss kernel (cache hints)
  int pipeline;     // slice kernel (0: off): one sweep writes a row's gradient, copies the next row and takes its
                    // statistics this many copies behind, 4 or 8 (prefetch and ring_kb do not apply)
  int stream_loads;  // streaming kernel, gradient from a saved lse, no smoothing: 16-byte loads per thread (4 or 8)
  bool lean;  // no smoothing: slices, warp rows, streaming, K-dim: no per-chunk tests, exponent by one FFMA
  int warp_ring;  // warp rows, no smoothing (0: off): up to this many rows per warp staged in shared memory, 2-4
  int grad_piece_kb;  // streaming gradient from a saved lse (0: whole rows): rows cut into pieces of ~this many KiB
};

CudaTuning cuda_tuning();
void set_cuda_tuning(const std::string& path, int slice_kb, int cluster_max, bool prefetch, int ring_kb,
                     bool warp_ahead, bool l2_keep, int pipeline, int stream_loads, bool lean, int warp_ring,
                     int grad_piece_kb);

}  // namespace softmax_ce
