// The interface between the CPU dispatcher and the per-instruction-set kernels: plain data only, so the
// files built with AVX2/AVX-512 flags share no inline code (and no linker choice) with the rest.
#pragma once

#include <cstdint>

namespace softmax_ce {

enum class SimdDtype : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// Class-index targets, float accumulation (float32 / bfloat16 / float16 logits).
struct SimdArgs {
  SimdDtype dtype;
  bool stats, grad;  // compute the loss and statistics from the logits (else read the saved ones); write the gradient
  const void* x;
  void* g;
  const int64_t* target;  // class indices (B, S), or nullptr with probabilities
  const void* prob;       // probability targets (B, C, S) laid out as the logits' kernel needs, or nullptr
  bool prob_float;        // prob in float32 (else in the logits' dtype)
  const float* weight;  // C class weights, or nullptr
  float weight_sum;     // sum of weight (C when unweighted)
  float eps;            // label smoothing in [0, 1]
  int64_t ignore_index;
  float* loss;          // (B, S) contiguous
  float* row_max;       // (B, S) contiguous: the forward's stats (the max, the sum of e^(x - max)), which it
  float* row_sum;       // writes and the gradient from them reads; nullptr in the training pass
  const float* factor;  // upstream factor, read at b * f_sB + s * f_sS
  int64_t f_sB, f_sS;
  int64_t B, C, S;
  int64_t x_sB, x_sC, x_sS, t_sB, t_sC, t_sS, g_sB, g_sC, g_sS;  // t_sC: probabilities only
  int* bad;  // set to 1 when a target is outside [0, C) and not ignore_index
  bool staged;  // columns: transposed rows (B == 1) staged row-major in W-row blocks (class indices only)
};

// rows(a, begin, end): rows r in [begin, end) whose classes are contiguous (x_sC == g_sC == 1; probabilities:
// theirs too).
// columns(a, begin, end): blocks of `width` positions, block k = (b, s0 = (k % blocks_per_b) * width), for
// inputs whose positions are contiguous (x_sS == g_sS == 1; probabilities: theirs too) and classes strided.
// small_rows(a, begin, end): blocks of `width` rows, rows k * width .., of at most small_row_classes() contiguous
// classes each, one position per row (S == 1); class indices only.
// f64_*: the portable kernel's sweeps over a float64 row of C contiguous classes (softmax_ce_simd_f64.h): its max,
// its sum of e^(x - m), and e^(x_c - base) * mul written to a contiguous row g; f64_col_*: the same over a block
// of contiguous positions.
struct SimdKernels {
  const char* name;
  int width;
  void (*rows)(const SimdArgs&, int64_t, int64_t);
  void (*columns)(const SimdArgs&, int64_t, int64_t);
  void (*small_rows)(const SimdArgs&, int64_t, int64_t);
  double (*f64_max)(const double* x, int64_t C);
  double (*f64_sum_exp)(const double* x, int64_t C, double m);
  void (*f64_exp_scale)(const double* x, double* g, int64_t C, double base, double mul);
  void (*scale)(SimdDtype dtype, void* g, int64_t n, float r);  // g[i] *= r, n contiguous elements, in place
  // f64_max's, f64_sum_exp's and f64_exp_scale's work over n <= kF64Block contiguous positions at once, their
  // classes at stride sC (K-dim float64; g's at g_sC).
  void (*f64_col_max)(const double* x, int64_t sC, int64_t C, int n, double* m);
  void (*f64_col_sum_exp)(const double* x, int64_t sC, int64_t C, int n, const double* m, double* s);
  void (*f64_col_exp_scale)(const double* x, int64_t sC, double* g, int64_t g_sC, int64_t C, int n,
                            const double* base, const double* mul);
};
// The limits by element size, measured (2026-11-27, 16384 rows, 1 thread, W x W tiles transposed in registers)
// against one row at a time; again once both kept their exponentials (same day): float forward 1.3-1.6x and
// fwd+bwd 1.14-1.2x at 72-96 classes, at 112-128 the forward 1.2-1.3x but fwd+bwd even or 0.93x; bfloat16 at
// 112-128 forward 1.14-1.4x, fwd+bwd 1.08-1.22x (both slower in fwd+bwd from 160 before).
constexpr int64_t kSmallRowClasses = 128;  // the larger of the two: the blocks' buffers
inline int64_t small_row_classes(int elem_bytes) { return elem_bytes == 4 ? 96 : kSmallRowClasses; }

// Positions per float64 column block (f64_col_*): 32 doubles, a 256-byte line of each class, 4, 8 or 16 vectors.
constexpr int kF64Block = 32;

// Data, not functions: looking them up runs no code built for an instruction set the CPU may lack.
extern const SimdKernels kSimdAvx2;    // AVX2 + FMA + F16C, 8 lanes
extern const SimdKernels kSimdAvx512;  // AVX-512 F/BW/VL/DQ, 16 lanes
extern const SimdKernels kSimdBaseline;  // plain vectors for the build's baseline (NEON, SSE2), 4 lanes

}  // namespace softmax_ce
