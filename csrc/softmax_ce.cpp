// Op schemas (defined once, here) and the Python module.  Each backend registers its own kernels.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/softmax_ce_cpu_isa.h"
#include "softmax_ce_tuning.h"

#include <atomic>
#include <cstdlib>
#include <mutex>

TORCH_LIBRARY(softmax_ce_ext, m) {
  // Rows of logits (B, C, S), or (B, C) read as (B, C, 1), any strides.  target: class indices (B, S) int64 ((B,)
  // with (B, C) logits), or probabilities of the logits' shape in the logits' dtype.  weight: (C,) in the
  // accumulation dtype (float32; float64 for float64 logits) or None.  Per-row outputs (B, S) ((B, 1) for (B, C)
  // logits) are in the accumulation dtype.  status: {flag, value} of an out-of-range class
  // index, written by the CUDA kernels (which never read out of bounds); the CPU kernels raise IndexError.  None:
  // not recorded (the CPU, and traced code, which then has no tensor of its own to mutate).

  // Per-row loss, reading each row once, and the rows' stats (2, B, S) for backward: [0] the max m, [1] the sum of
  // e^(x - m) (the lse is m + log of it); no gradient.  Was `forward`, returning the lse: renamed so that graphs
  // cached (Inductor) or exported with the old output fail to match instead of meeting the new shape.
  m.def(
      "forward_rows(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
      " Tensor(a!)? status) -> (Tensor loss, Tensor stats)");
  // The training pass: the sum of the row losses (0-d, accumulation dtype; no per-row buffers where the kernel
  // can avoid them), divided by loss_divisor and cast to loss_dtype where given, and, in the same pass, its
  // gradient times grad_scale (a 0-d tensor in the accumulation dtype: 1, or 1/total weight for a mean).
  // grad has the logits' strides when dense.
  m.def(
      "forward_backward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
      " Tensor grad_scale, Tensor(a!)? status, Tensor? loss_divisor=None, ScalarType? loss_dtype=None)"
      " -> (Tensor loss_sum, Tensor grad)");
  // reduction='mean' with class indices, the training pass in one op: the loss sum divided by the mean's
  // denominator d (as mean_scale counts it) and cast to loss_dtype, the gradient times 1/d, and d (0-d, accumulation
  // dtype).  A backend may count d inside its training kernel (CUDA K-dim, tuning kdim_fold).
  // grad_mul (0-d, accumulation dtype): the gradient's multiplier m, the factor m / d (the Function's guess of
  // grad_output; none: 1); grad_mul_used: m as read (function.py).
  m.def(
      "mean_forward_backward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
      " Tensor(a!)? status, ScalarType? loss_dtype=None, Tensor? grad_mul=None)"
      " -> (Tensor loss, Tensor grad, Tensor denominator, Tensor grad_mul_used)");
  // The summed loss alone (no gradient, no per-row outputs), divided by loss_divisor and cast to loss_dtype where
  // given: reduction='sum', or a mean of probabilities (divided by the caller); one op where forward and sum_rows
  // took two, and no per-row buffers where a kernel can sum as it goes (CUDA K-dim).
  m.def(
      "forward_sum(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
      " Tensor(a!)? status, Tensor? loss_divisor=None, ScalarType? loss_dtype=None) -> Tensor");
  // reduction='mean' with class indices and no gradient: (the loss sum / d in loss_dtype, d), d as in
  // mean_forward_backward.  One op where mean_scale, forward and sum_rows took three: a small call is host time.
  m.def(
      "mean_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing,"
      " Tensor(a!)? status, ScalarType? loss_dtype=None) -> (Tensor loss, Tensor denominator)");
  // Gradient recomputed from the forward's saved stats (e^(x - m) / s, the training pass's bits), each row times
  // grad_rows (B, S) (accumulation dtype, any strides).
  m.def(
      "backward(Tensor grad_rows, Tensor logits, Tensor target, Tensor? weight, Tensor stats, int ignore_index,"
      " float label_smoothing) -> Tensor");
  // In-place forms for inplace_backward=True: the gradient is written over the logits (same strides), which
  // are destroyed; no gradient buffer is allocated.
  m.def(
      "forward_backward_(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index,"
      " float label_smoothing, Tensor grad_scale, Tensor(b!)? status, Tensor? loss_divisor=None,"
      " ScalarType? loss_dtype=None) -> Tensor loss_sum");
  m.def(
      "mean_forward_backward_(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index,"
      " float label_smoothing, Tensor(b!)? status, ScalarType? loss_dtype=None, Tensor? grad_mul=None)"
      " -> (Tensor loss, Tensor denominator, Tensor grad_mul_used)");
  m.def(
      "backward_(Tensor grad_rows, Tensor(a!) logits, Tensor target, Tensor? weight, Tensor stats,"
      " int ignore_index, float label_smoothing) -> ()");
  // grad *= grad_output / grad_mul_used (a one-element tensor; the 0-d multiplier the forward applied, none: 1),
  // skipping the pass where they are equal: decided where the data lives.  predictor ({guess, last grad_output,
  // changes in a row}, in the accumulation dtype): grad_output recorded, the guess updated, the changes mirrored
  // into `changes` (int64, pinned host memory or the device's) (update_predictor in softmax_ce.h).
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output, Tensor? grad_mul_used=None, Tensor(b!)? predictor=None,"
        " Tensor(c!)? changes=None) -> ()");
  // The mean's denominator d and 1/d (0-d, in dtype) without a mask in memory: d is the number of class-index
  // targets != ignore_index, or with weight the sum of weight[t] over them (out-of-range targets count 0).
  // Two tensors, not views of one: torch.compile refuses intermediates that alias.  target: (B, S) or (B,).
  m.def("mean_scale(Tensor target, Tensor? weight, int ignore_index, ScalarType dtype) -> (Tensor, Tensor)");
  // The sum of per-row values (a 0-d tensor of their dtype) in an order that does not depend on the thread count.
  // divisor (0-d, the values' dtype) and dtype, as in forward_backward: the mean and the loss's dtype in the
  // same launch (each small launch was ~1-3% of a 65536x1000 call on the H100).
  m.def("sum_rows(Tensor values, Tensor? divisor=None, ScalarType? dtype=None) -> Tensor");
}

namespace {
bool cuda_built() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

namespace softmax_ce {
namespace {
const char* const kPathNames[] = {"auto", "stream", "legacy"};

CudaPath parse_path(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kPathNames[i]) return static_cast<CudaPath>(i);
  TORCH_CHECK_VALUE(false, "set_cuda_tuning: expected path 'auto', 'stream' or 'legacy', got '", name, "'");
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

struct TuningState {
  std::atomic<int> path, slice_kb, cluster_max, prefetch, ring_kb, lean, warp_ring, grad_piece_kb, kdim_fold, warp_keep,
      cluster_async, warp_group, dynamic_rows, pdl;
  TuningState()
      : path(static_cast<int>(std::getenv("SOFTMAX_CE_CUDA_PATH") ? parse_path(std::getenv("SOFTMAX_CE_CUDA_PATH"))
                                                                    : CudaPath::kAuto)),
        slice_kb(env_int("SOFTMAX_CE_CUDA_SLICE_KB", 72)),
        cluster_max(env_int("SOFTMAX_CE_CUDA_CLUSTER_MAX", 16)),
        prefetch(env_int("SOFTMAX_CE_CUDA_PREFETCH", 1) != 0),
        ring_kb(env_int("SOFTMAX_CE_CUDA_RING_KB", 72)),
        lean(env_int("SOFTMAX_CE_CUDA_LEAN", 1) != 0),
        warp_ring(env_int("SOFTMAX_CE_CUDA_WARP_RING", 2)),
        grad_piece_kb(env_int("SOFTMAX_CE_CUDA_GRAD_PIECE_KB", 32)),
        kdim_fold(env_int("SOFTMAX_CE_CUDA_KDIM_FOLD", 1) != 0),
        warp_keep(env_int("SOFTMAX_CE_CUDA_WARP_KEEP", 0) != 0),
        cluster_async(env_int("SOFTMAX_CE_CUDA_CLUSTER_ASYNC", 1) != 0),
        warp_group(env_int("SOFTMAX_CE_CUDA_WARP_GROUP", 1) != 0),
        dynamic_rows(env_int("SOFTMAX_CE_CUDA_DYNAMIC_ROWS", 0) != 0),
        pdl(env_int("SOFTMAX_CE_CUDA_PDL", 0) != 0) {}
};

TuningState& state() {
  static TuningState s;
  return s;
}

std::mutex g_trace_mu;
std::atomic<bool> g_trace_on{false};  // read on every slice launch: no lock while tracing is off
SliceTrace g_trace{0, 0, 0, -1};
}  // namespace

SliceTrace slice_trace() {
  if (!g_trace_on.load(std::memory_order_acquire)) return {0, 0, 0, -1};
  const std::lock_guard<std::mutex> lock(g_trace_mu);
  return g_trace;
}

void set_slice_trace(int64_t data, int ctas, int rows, int device) {
  TORCH_CHECK_VALUE(data == 0 || (ctas > 0 && rows > 0 && device >= 0), "set_slice_trace: expected a buffer with "
                    "ctas > 0, rows > 0 and a CUDA device index (or data 0: off), got ctas ", ctas, ", rows ", rows,
                    ", device ", device);
  const std::lock_guard<std::mutex> lock(g_trace_mu);
  g_trace = data ? SliceTrace{data, ctas, rows, device} : SliceTrace{0, 0, 0, -1};
  g_trace_on.store(data != 0, std::memory_order_release);
}

CudaTuning cuda_tuning() {
  TuningState& s = state();
  return {static_cast<CudaPath>(s.path.load()), s.slice_kb.load(), s.cluster_max.load(), s.prefetch.load() != 0,
          s.ring_kb.load(), s.lean.load() != 0, s.warp_ring.load(), s.grad_piece_kb.load(), s.kdim_fold.load() != 0,
          s.warp_keep.load() != 0, s.cluster_async.load() != 0, s.warp_group.load() != 0,
          s.dynamic_rows.load() != 0, s.pdl.load() != 0};
}

void set_cuda_tuning(const std::string& path, int slice_kb, int cluster_max, bool prefetch, int ring_kb, bool lean,
                     int warp_ring, int grad_piece_kb, bool kdim_fold, bool warp_keep, bool cluster_async,
                     bool warp_group, bool dynamic_rows, bool pdl) {
  const CudaPath p = parse_path(path);
  TORCH_CHECK_VALUE(slice_kb >= 1 && slice_kb <= 227, "set_cuda_tuning: expected slice_kb in [1, 227], got ",
                    slice_kb);
  TORCH_CHECK_VALUE(cluster_max == 1 || cluster_max == 2 || cluster_max == 4 || cluster_max == 8 || cluster_max == 16,
                    "set_cuda_tuning: expected cluster_max 1, 2, 4, 8 or 16, got ", cluster_max);
  TORCH_CHECK_VALUE(ring_kb >= 0 && ring_kb <= 227, "set_cuda_tuning: expected ring_kb in [0, 227] (0: off), got ",
                    ring_kb);
  TORCH_CHECK_VALUE(warp_ring == 0 || (warp_ring >= 2 && warp_ring <= 4),
                    "set_cuda_tuning: expected warp_ring 0 (off) or 2-4 rows staged per warp, got ", warp_ring);
  TORCH_CHECK_VALUE(grad_piece_kb == 0 || (grad_piece_kb >= 4 && grad_piece_kb <= 4096),
                    "set_cuda_tuning: expected grad_piece_kb 0 (whole rows) or 4-4096 KiB, got ", grad_piece_kb);
  TuningState& s = state();
  s.path = static_cast<int>(p);
  s.slice_kb = slice_kb;
  s.cluster_max = cluster_max;
  s.prefetch = prefetch;
  s.ring_kb = ring_kb;
  s.lean = lean;
  s.warp_ring = warp_ring;
  s.grad_piece_kb = grad_piece_kb;
  s.kdim_fold = kdim_fold;
  s.warp_keep = warp_keep;
  s.cluster_async = cluster_async;
  s.warp_group = warp_group;
  s.dynamic_rows = dynamic_rows;
  s.pdl = pdl;
}
}  // namespace softmax_ce

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_built", &cuda_built, "Whether the CUDA kernels were compiled into this build.");
  m.def("cpu_isa", &softmax_ce::cpu_isa, "The instruction set the CPU kernels use now.");
  m.def("cpu_isas", &softmax_ce::cpu_isas, "The instruction sets this CPU can run, best first.");
  m.def("set_cpu_isa", &softmax_ce::set_cpu_isa, "Use another instruction set; returns the previous one.");
  m.def("set_cuda_tuning", &softmax_ce::set_cuda_tuning, "CUDA row kernels: path ('auto', 'stream', 'legacy'), "
        "slice_kb, cluster_max, prefetch, ring_kb, lean, warp_ring, grad_piece_kb, kdim_fold, warp_keep, cluster_async, "
        "warp_group, dynamic_rows, pdl "
        "(softmax_ce_ext.tuning wraps this; "
        "all checked before any is set).");
  m.def("cuda_tuning", [] {
    const auto t = softmax_ce::cuda_tuning();
    return std::make_tuple(std::string(softmax_ce::kPathNames[static_cast<int>(t.path)]), t.slice_kb, t.cluster_max,
                           t.prefetch, t.ring_kb, t.lean, t.warp_ring, t.grad_piece_kb, t.kdim_fold, t.warp_keep,
                           t.cluster_async, t.warp_group, t.dynamic_rows, t.pdl);
  }, "The current (path, slice_kb, cluster_max, prefetch, ring_kb, lean, warp_ring, grad_piece_kb, kdim_fold, "
     "warp_keep, cluster_async, warp_group, dynamic_rows, pdl).");
  m.def("set_slice_trace", &softmax_ce::set_slice_trace, "The slice kernel's phase stamps into a buffer of "
        "ctas * (8 + 10 * rows) int64 on a CUDA device (address, ctas, rows, device index; address 0: off). For "
        "benchmarks/slice_trace.py.");
  m.def("empty_grad_cache", &softmax_ce::empty_grad_cache, "Free the CPU gradient blocks kept for reuse.");
  m.def("grad_cache_sizes", &softmax_ce::grad_cache_sizes, "The kept CPU gradient blocks' bytes, oldest first.");
}
