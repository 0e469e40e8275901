// Which CUDA kernel family handles contiguous rows, and the shared-memory slice limits: settable at run time
// (softmax_ce_ext._C.set_cuda_tuning) so one GPU session can compare them; defaults from the environment
// (SOFTMAX_CE_CUDA_PATH = auto | stream | legacy, SOFTMAX_CE_CUDA_SLICE_KB, SOFTMAX_CE_CUDA_CLUSTER_MAX,
// SOFTMAX_CE_CUDA_PREFETCH, SOFTMAX_CE_CUDA_RING_KB).
#pragma once

#include <string>
#include <tuple>

namespace softmax_ce {

enum class CudaPath { kAuto, kStream, kLegacy };

struct CudaTuning {
  CudaPath path;
  int slice_kb;     // largest shared-memory slice of a row per CTA, KiB
  int cluster_max;  // largest cluster of CTAs sharing a row (1: no clusters)
  bool prefetch;    // slice kernel: copy the next row's slice during this row's gradient sweep
  int ring_kb;      // slice kernel: shared memory per CTA as a ring holding this row and the next one's start (0: off)
};

CudaTuning cuda_tuning();
// Returns the previous (path, slice_kb, cluster_max).
std::tuple<std::string, int, int> set_cuda_tuning(const std::string& path, int slice_kb, int cluster_max);
// Returns the previous setting.
bool set_cuda_prefetch(bool on);
int set_cuda_ring(int kb);

}  // namespace softmax_ce
