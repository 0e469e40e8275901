"""The CPU's instruction-set paths and its gradient-buffer reuse."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, reference, training_against_float64
from softmax_ce_ext import _C, cross_entropy

CPU_PATHS = ("avx512", "avx2", "baseline", "generic")  # kernel_path names of the CPU (the rest are CUDA's)


def test_isa_list_and_choice():
    isas = _C.cpu_isas()
    assert isas[-2:] == ["baseline", "generic"] and set(isas) <= set(CPU_PATHS)
    assert _C.cpu_isa() in isas
    with pytest.raises(ValueError, match="expected one of this CPU's instruction sets"):
        _C.set_cpu_isa("sse9")


def test_environment_variable_picks_the_path():
    code = "from softmax_ce_ext import _C; print(_C.cpu_isa())"
    env = dict(os.environ, SOFTMAX_CE_CPU_ISA="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "generic"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_paths_agree(dtype):
    """Every path gives the same numbers up to the dtype's rounding (they differ only in how exp is computed)."""
    g = torch.Generator().manual_seed(5)
    cases = [(torch.randn(33, 517, generator=g), torch.randint(0, 517, (33,), generator=g)),
             (torch.randn(3, 11, 9, 21, generator=g), torch.randint(0, 11, (3, 9, 21), generator=g))]
    previous = _C.cpu_isa()
    try:
        for x, t in cases:
            results = []
            for isa in _C.cpu_isas():
                _C.set_cpu_isa(isa)
                xg = x.to(dtype).requires_grad_()
                loss = cross_entropy(xg, t, label_smoothing=0.1, reduction="sum")
                loss.backward()
                results.append((loss.float(), xg.grad.float()))
            for loss, grad in results[1:]:
                torch.testing.assert_close(loss, results[0][0], rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=0)
                torch.testing.assert_close(grad, results[0][1], rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                           atol=1e-3 if dtype != torch.float32 else 1e-7)
    finally:
        _C.set_cpu_isa(previous)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("factor", [0.5, 1.5, 1 / 3], ids=["half: subnormals, ties to even among them",
                                                          "1.5: ties to even, overflow (43680 * 1.5 = 65520: inf)",
                                                          "third: rounding up and down"])
def test_every_16_bit_value_converts_as_torch(kernel_path, dtype, factor):
    """Each of the 65536 bit patterns read, multiplied in float and written back by a path's own conversions (the
    baseline's float16 is integer steps, or ARM's instructions): PyTorch's bits, NaN for NaN.  Through the scaling
    pass, with a tail of 3 past the whole vectors."""
    if kernel_path not in CPU_PATHS:
        pytest.skip("a CPU path")
    from softmax_ce_ext._ops import ops

    bits = torch.cat([torch.arange(-(2**15), 2**15, dtype=torch.int32), torch.tensor([1, 0x7C00, -1])])
    grad = bits.to(torch.int16).view(dtype).clone()
    expected = (grad.float() * torch.tensor(factor, dtype=torch.float32)).to(dtype)
    ops.scale_grad_(grad, torch.tensor(factor, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32))
    nan = expected.isnan()
    assert torch.equal(grad.isnan(), nan)
    assert torch.equal(grad[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_reused_gradient_blocks_hold_the_right_values():
    """Large gradients come from reused blocks: a block is handed out again only after its tensor died."""
    x = torch.randn(512, 8192, requires_grad=True)  # 16 MiB: large enough for the block path
    t = torch.randint(0, 8192, (512,))
    kept = []
    for step in range(4):
        x.grad = None
        cross_entropy(x * (step + 1), t).backward()
        kept.append(x.grad.clone() if step % 2 else x.grad)  # keep some buffers alive across steps
    for step, grad in enumerate(kept):
        ref = x.detach().clone().requires_grad_()
        F.cross_entropy(ref * (step + 1), t).backward()
        torch.testing.assert_close(grad, ref.grad)
    _C.empty_grad_cache()


def test_gradient_blocks_follow_the_sizes_asked_for():
    """The kept blocks are the most recently freed, and a smaller request reuses a block up to twice its size: the
    cache kept its first two sizes forever, so a loop that moved to a third size faulted in a fresh buffer per call
    (512x32000 float32 fwd+bwd 14 -> 120 ms)."""
    mib = 1 << 20
    _C.empty_grad_cache()
    try:
        def step(rows):  # float32 rows of 2048 classes: 8 KiB each, 128 rows per MiB
            x = torch.randn(rows, 2048, requires_grad=True)
            cross_entropy(x, torch.randint(0, 2048, (rows,))).backward()
            return x.grad

        a, b = step(2048), step(4096)  # 16 and 32 MiB, both alive
        del a, b
        assert _C.grad_cache_sizes() == [16 * mib, 32 * mib]
        step(8192)  # 64 MiB: no kept block holds it; freed, it replaces the oldest
        assert _C.grad_cache_sizes() == [32 * mib, 64 * mib]
        grad = step(1792)  # 14 MiB: the smallest kept block that holds it at most twice over is none (32 > 28)
        assert _C.grad_cache_sizes() == [32 * mib, 64 * mib]
        del grad
        assert _C.grad_cache_sizes() == [64 * mib, 14 * mib]
        grad = step(3584)  # 28 MiB: not the 14, the 64 is over twice; a new block
        del grad
        assert _C.grad_cache_sizes() == [14 * mib, 28 * mib]
        x = torch.randn(3200, 2048, requires_grad=True)  # 25 MiB -> 26: the kept 28 MiB block, values right
        t = torch.randint(0, 2048, (3200,))
        cross_entropy(x, t).backward()
        assert _C.grad_cache_sizes() == [14 * mib]
        ref = x.detach().clone().requires_grad_()
        F.cross_entropy(ref, t).backward()
        torch.testing.assert_close(x.grad, ref.grad)
    finally:
        _C.empty_grad_cache()


# Rows of few classes take the SIMD paths 16 (AVX-512), 8 (AVX2) or 4 (baseline) rows at a time, one row per lane, through
# transposed copies (whole blocks by W x W tiles in registers, the rest element by element): the number of rows
# against the block, the classes against the tiles and the limits (96 float, 128 2-byte), and why.
SMALL_ROWS = [(1, 10, "one row: a block of 1 lane"), (17, 10, "one full block of 16 and one lane: no whole tile"),
              (100, 1, "a single class: every loss 0, every gradient 0"),
              (39, 31, "odd rows; 1 tile + 15 classes element-wise (AVX-512), 3 + 7 (AVX2)"),
              (40, 32, "whole tiles only: 2 (AVX-512), 4 (AVX2); the last 8 rows element-wise (AVX-512)"),
              (33, 50, "3 tiles + 2 classes (AVX-512), 6 + 2 (AVX2); a last block of 1 row"),
              (40, 64, "4 / 8 tiles"),
              (40, 96, "float's largest class count on the path: 6 / 12 tiles"),
              (40, 97, "float: one row at a time; 2-byte: 6 / 12 tiles + 1 class"),
              (40, 128, "2-byte's largest class count on the path: 8 / 16 tiles"),
              (40, 129, "one more: one row at a time for every dtype")]


@pytest.mark.parametrize("size", SMALL_ROWS, ids=[f"{n}x{c}" for n, c, _ in SMALL_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="none", weighted=True, label_smoothing=0.2)],
                         ids=["mean", "none-weighted-smoothed"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "in-place"])
def test_small_rows_blocks(kernel_path, size, dtype, kw, inplace):
    """Every CPU path against float64: ignored and valid targets mixed within a block, per-row upstream
    gradients ('none'), the gradient written over the logits (in place)."""
    if kernel_path not in CPU_PATHS:
        pytest.skip("a CPU path")
    n, c, _ = size
    g = torch.Generator().manual_seed(n * 100 + c)
    x = (torch.randn(n, c, generator=g) * 3).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[2::5] = -100  # not the first row: a mean over one ignored row is 0/0
    training_against_float64(x, t, g, kw, inplace)


# Channels-last K-dim logits (each position a row of contiguous classes): where the batch continues the positions'
# stride, the rows are one (B*S, C) matrix, which the 16-row blocks take; elsewhere one (b, s) row at a time. Why each.
CHANNELS_LAST = [((3, 21, 9, 7), "whole", "a segmentation's class count: 16-row blocks over all B*S rows"),
                 ((2, 97, 5, 6), "whole", "past float's block limit: one row at a time, over the flattened rows"),
                 ((3, 21, 9, 7), "cropped", "rows 0-8 of a 12-row map: the batch does not continue the positions"),
                 ((3, 21, 9, 7), "shared-target", "one target map expanded over the batch (its batch stride 0)")]


@pytest.mark.parametrize("case", CHANNELS_LAST, ids=[f"{'x'.join(map(str, s))}-{k}" for s, k, _ in CHANNELS_LAST])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="none", weighted=True, label_smoothing=0.2)],
                         ids=["mean", "none-weighted-smoothed"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "in-place"])
def test_channels_last_rows(kernel_path, case, dtype, kw, inplace):
    """Every CPU path against float64; ignored targets; per-position upstream gradients ('none'); the gradient
    comes back channels-last, as the logits are, or over them (in place)."""
    if kernel_path not in CPU_PATHS:
        pytest.skip("a CPU path")
    (n, c, h, w), kind, _ = case
    g = torch.Generator().manual_seed(c * 10 + len(kind))
    rows = h + 3 if kind == "cropped" else h
    x = (torch.randn(n, c, rows, w, generator=g) * 3).to(dtype).contiguous(memory_format=torch.channels_last)
    x = x[:, :, :h]
    t = torch.randint(0, c, (1 if kind == "shared-target" else n, h, w), generator=g)
    t[..., 1::4, ::3] = -100
    t = t.expand(n, h, w)
    leaf = training_against_float64(x, t, g, kw, inplace)
    assert leaf.stride(1) == 1  # the layout the test is about


# Transposed (N, C) logits (`logits.t()`, e.g. CLIP's symmetric loss): the batch dimension contiguous, so the rows
# are taken W at a time as the positions of one K-dim item (the column blocks). Why each.
TRANSPOSED = [((37, 5), "a few classes; 2 blocks and a partial one (AVX-512)"),
              ((40, 21), "a segmentation's class count, kept exponentials"),
              ((33, 300), "past the kept 256: the gradient sweep recomputes"),
              ((20, 2100), "past 512: rows staged row-major by 16-row tiles (4 tails: rows and classes)"),
              ((1, 9), "one row: not transposed for the kernels (a single row's classes are strided)")]


@pytest.mark.parametrize("size", [s for s, _ in TRANSPOSED], ids=[f"{n}x{c}" for (n, c), _ in TRANSPOSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="none", weighted=True, label_smoothing=0.2)],
                         ids=["mean", "none-weighted-smoothed"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "in-place"])
def test_transposed_rows(kernel_path, size, dtype, kw, inplace):
    """Every CPU path against float64; ignored targets; per-row upstream gradients ('none'); in place."""
    if kernel_path not in CPU_PATHS:
        pytest.skip("a CPU path")
    n, c = size
    g = torch.Generator().manual_seed(n * 1000 + c)
    x = (torch.randn(c, n, generator=g) * 3).to(dtype).t()
    t = torch.randint(0, c, (n,), generator=g)
    t[1::4] = -100
    leaf = training_against_float64(x, t, g, kw, inplace)
    assert leaf.stride() == x.stride() == (1, n)  # the layout the test is about


@pytest.mark.parametrize("kw", [dict(), dict(weighted=True, label_smoothing=0.2)], ids=["plain", "weighted-smoothed"])
@pytest.mark.parametrize("targets", ["transposed", "rows"])
def test_transposed_rows_with_probabilities(kernel_path, kw, targets):
    """Soft labels with transposed logits: targets transposed too (the column blocks), or row-major (the portable
    kernel)."""
    if kernel_path not in CPU_PATHS:
        pytest.skip("a CPU path")
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(23, 35, generator=g) * 3).t()
    y = torch.softmax(torch.randn(23, 35, generator=g), 0)
    y = y.t() if targets == "transposed" else y.t().contiguous()
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand(23, generator=g) + 0.2
    _mean_and_none_against_float64(x, y, g, **kw)


def test_channels_last_gradient_blocks():
    """A channels-last gradient of 8+ MiB comes from the reused 2 MiB-page blocks with the logits' strides."""
    x = torch.randn(2, 21, 256, 256).contiguous(memory_format=torch.channels_last).requires_grad_()  # 10.5 MiB
    t = torch.randint(0, 21, (2, 256, 256))
    _C.empty_grad_cache()
    try:
        for step in range(2):
            x.grad = None
            cross_entropy(x * (step + 1), t).backward()
        assert x.grad.stride() == x.stride()
        ref = x.detach().contiguous().requires_grad_()
        F.cross_entropy(ref * 2, t).backward()
        torch.testing.assert_close(x.grad, ref.grad)
        x.grad = None  # its block is kept for the next step (an ordinary tensor would be freed)
        assert _C.grad_cache_sizes() == [12 << 20]
    finally:
        _C.empty_grad_cache()


def _mean_and_none_against_float64(x, t, g, **kw):
    """Loss and gradient of reduction='mean', then 'none' with random per-position upstream gradients, against
    float64 (the tolerance widened by the largest finite logit); t: class indices or probabilities."""
    prob = t.is_floating_point()
    rows = (t.shape[0], *t.shape[2:]) if prob else t.shape
    for reduction in ("mean", "none"):
        grad_out = torch.rand(rows, generator=g) + 0.5 if reduction == "none" else torch.ones(())
        leaf = x.clone().requires_grad_()
        loss = cross_entropy(leaf, t, reduction=reduction, **kw)
        (grad,) = torch.autograd.grad(loss, leaf, grad_out.to(loss.dtype))
        ref, ref_grad = reference(x, t.double() if prob else t, grad_out, reduction=reduction, **kw)
        scale = x[x.isfinite()].float().abs().max().item()
        assert_close(loss, ref, x.dtype, f"{reduction} loss", logit_scale=scale)
        assert_close(grad, ref_grad, x.dtype, f"{reduction} grad", logit_scale=scale)


# K-dim blocks (classes strided, W positions per block): the loss + gradient keeps each exponential of the sum
# sweep for up to 256 classes and recomputes them past it; smoothing and weights; a position past the last
# block (S not a multiple of W); why each.
KDIM_CLASSES = [(21, "a segmentation's class count: kept"), (256, "the most classes kept"),
                (257, "one more: the gradient sweep recomputes the exponentials")]


@pytest.mark.parametrize("classes", KDIM_CLASSES, ids=[str(c) for c, _ in KDIM_CLASSES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(weighted=True, label_smoothing=0.2)], ids=["plain", "weighted-smoothed"])
def test_kdim_blocks_kept_exponentials(kernel_path, classes, dtype, kw):
    """Every CPU path against float64, mean and 'none' (whose backward recomputes from the saved max and sum); a row with
    -inf and one with NaN among normal ones."""
    if kernel_path not in CPU_PATHS:
        pytest.skip("a CPU path")
    c, _ = classes
    g = torch.Generator().manual_seed(c)
    x = (torch.randn(2, c, 37, generator=g) * 3).to(dtype)
    x[0, 3, 5] = -float("inf")
    x[1, :, 9] = float("nan")
    t = torch.randint(0, c, (2, 37), generator=g)
    t[:, ::6] = -100
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand(c, generator=g) + 0.2
    _mean_and_none_against_float64(x, t, g, **kw)


# Contiguous rows: the loss + gradient keeps the sum sweep's exponentials (each chunk of 256 / 128 classes relative
# to the running max it was summed at) for rows of up to 32768 classes; why each size.
KEPT_ROWS = [(300, "a chunk, a short chunk and a tail (AVX-512)"), (512, "whole chunks only, no tail"),
             (32768, "the most classes kept"), (32769, "one more: the gradient sweep recomputes")]


@pytest.mark.parametrize("classes", KEPT_ROWS, ids=[str(c) for c, _ in KEPT_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(weighted=True, label_smoothing=0.2)], ids=["plain", "weighted-smoothed"])
def test_rows_kept_exponentials(kernel_path, classes, dtype, kw):
    """Every CPU path against float64, mean and 'none': a row whose maximum grows chunk after chunk (every chunk's
    kept values re-based by a different factor), one whose maximum is in its tail, -inf and NaN rows."""
    if kernel_path not in CPU_PATHS:
        pytest.skip("a CPU path")
    c, _ = classes
    g = torch.Generator().manual_seed(c)
    x = torch.randn(6, c, generator=g) * 3
    x[1] += torch.linspace(0, 30, c)  # the max moves up through every chunk
    x[2, -1] = 25.0  # the max in the last class (the tail where there is one)
    x[3, c // 2] = -float("inf")
    x[4, 7] = float("nan")
    x = x.to(dtype)
    t = torch.randint(0, c, (6,), generator=g)
    t[5] = -100
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand(c, generator=g) + 0.2
    _mean_and_none_against_float64(x, t, g, **kw)


# Probability targets on contiguous rows (the vectorised rows kernel; other layouts take the portable one): why
# each class count.
PROB_ROWS = [(5, "fewer classes than a vector: the tail alone"), (16, "one whole vector, no tail"),
             (300, "chunks, a short chunk and a tail"), (32769, "past the kept exponentials: recomputed")]
PROB_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
               (torch.float16, torch.float16)]


@pytest.mark.parametrize("classes", PROB_ROWS, ids=[str(c) for c, _ in PROB_ROWS])
@pytest.mark.parametrize("dtypes", PROB_DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("kw", [dict(), dict(weighted=True, label_smoothing=0.2)], ids=["plain", "weighted-smoothed"])
def test_probability_rows(kernel_path, classes, dtypes, kw):
    """Every CPU path against float64: mean (the fused pass), 'none' (the gradient from the saved stats, which needs
    the targets' sum again) and the no-grad sum; a row whose max grows chunk after chunk, a row of one hot target,
    targets that do not sum to 1, a -inf logit and a NaN row."""
    if kernel_path not in CPU_PATHS:
        pytest.skip("a CPU path")
    c, _ = classes
    dtype, target_dtype = dtypes
    g = torch.Generator().manual_seed(c)
    x = torch.randn(6, c, generator=g) * 3
    x[1] += torch.linspace(0, 30, c)
    x[3, c // 2] = -float("inf")
    x[4, 1] = float("nan")
    x = x.to(dtype)
    y = torch.softmax(torch.randn(6, c, generator=g) * 2, 1)
    y[2] = 0.0
    y[2, c - 1] = 1.0  # one-hot in the last class (the tail where there is one)
    y[5] *= 1.7  # not a distribution: the loss is linear in y
    y = y.to(target_dtype)
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand(c, generator=g) + 0.2
    _mean_and_none_against_float64(x, y, g, **kw)
    scale = x[x.isfinite()].float().abs().max().item()
    with torch.no_grad():
        summed = cross_entropy(x, y, reduction="sum", **kw)
    assert_close(summed, reference(x, y.double(), torch.ones(()), reduction="sum", **kw)[0], dtype, "sum",
                 logit_scale=scale)


@pytest.mark.parametrize("classes", [(5, "a few"), (21, "a segmentation's, kept"), (257, "past the kept: recomputed")],
                         ids=["5", "21", "257"])
@pytest.mark.parametrize("dtypes", PROB_DTYPES[:3], ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("kw", [dict(), dict(weighted=True, label_smoothing=0.2)], ids=["plain", "weighted-smoothed"])
def test_probability_kdim_blocks(kernel_path, classes, dtypes, kw):
    """K-dim probability targets (the vectorised blocks of W positions) against float64: 35 positions per image (two
    whole blocks and a partial one), a -inf and a NaN logit, a one-hot position, mean and 'none'."""
    if kernel_path not in CPU_PATHS:
        pytest.skip("a CPU path")
    c, _ = classes
    dtype, target_dtype = dtypes
    g = torch.Generator().manual_seed(c + 1)
    x = torch.randn(2, c, 5, 7, generator=g) * 3
    x[0, c // 2, 1, 1] = -float("inf")
    x[1, 0, 4, 6] = float("nan")
    y = torch.softmax(torch.randn(2, c, 5, 7, generator=g) * 2, 1)
    y[1, :, 2, 3] = 0.0
    y[1, c - 1, 2, 3] = 1.0
    x, y = x.to(dtype), y.to(target_dtype)
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand(c, generator=g) + 0.2
    _mean_and_none_against_float64(x, y, g, **kw)


# (N, C, why) for the float64 rows' vectorised sweeps (softmax_ce_simd_f64.h; the portable kernel without an
# instruction set)
F64_ROWS = [
    (33, 1, "one class: a row shorter than a vector"),
    (33, 7, "a vector's tail only (8 or 4 lanes)"),
    (9, 1003, "whole vectors and a tail of 3"),
    (69, 5, "k-dim-wide: two blocks of 32 positions (f64_col_*) and one of 5"),
]


# (name, the (N, C) rows laid out as the kernels meet them, why)
F64_LAYOUTS = {
    "rows": (lambda x: x, "classes contiguous: up to 32 gathered 32 rows at a time, longer rows swept where they lie"),
    "k-dim": (lambda x: x.view(-1, 3, x.shape[1]).permute(0, 2, 1).contiguous(),
              "(N/3, C, 3): positions contiguous, classes strided: blocks of 3 positions a class at a time"),
    "k-dim-wide": (lambda x: x.t().unsqueeze(0).contiguous(),
                   "(1, C, N): positions contiguous, swept 32 at a time a class at a time (f64_col_*)"),
    "transposed": (lambda x: x.t().contiguous().t(), "column-major rows: one item of N positions, as k-dim-wide"),
    "channels-last": (lambda x: x.view(-1, 3, x.shape[1]).permute(0, 2, 1).unsqueeze(-1)
                      .contiguous(memory_format=torch.channels_last),
                      "(N/3, C, 3, 1) channels-last: rows of contiguous classes at a stride, gathered 32 at a time"),
}


@pytest.mark.parametrize("size", F64_ROWS, ids=[f"{n}x{c}" for n, c, _ in F64_ROWS])
@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="none", weighted=True, label_smoothing=0.2),
                                dict(reduction="sum", probabilities=True), dict(reduction="none", probabilities=True),
                                dict(reduction="mean", label_smoothing=0.1, ignored=True)],
                         ids=["mean", "none-weighted-smoothed", "sum-probabilities", "none-probabilities",
                              "mean-smoothed-ignored"])
@pytest.mark.parametrize("layout", list(F64_LAYOUTS))
def test_float64_rows_match_torch(kernel_path, size, kw, layout):
    """float64 rows against PyTorch's float64, entry by entry to 1e-13 relative or 4e-16 absolute (p_t - 1 and a
    single class's 1 - 1 cancel): e^x to about an ulp, rows spread over 200 (exponentials from 1 to ~1e-87), one
    reaching e^-720 (subnormal in PyTorch, 0 here), special values."""
    n, c, _ = size
    g = torch.Generator().manual_seed(n * c)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * 30
    x[1, c // 2] = -720.0 + x[1].max()  # an exponential below DBL_MIN
    x[2, 0] = float("-inf")
    x[3, c - 1] = float("nan")
    kw = dict(kw)
    if kw.pop("probabilities", False):
        t = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), 1)
    else:
        t = torch.randint(0, c, (n,), generator=g)
    if kw.pop("ignored", False):
        t[::4] = -100  # the first position of each block among them
    lay = F64_LAYOUTS[layout][0]
    x = lay(x)
    if t.dim() == 2:  # probabilities: laid out as the logits
        t = lay(t)
    elif layout in ("k-dim", "channels-last"):
        t = t.view(-1, 3, *([1] if layout == "channels-last" else []))
    elif layout == "k-dim-wide":
        t = t.unsqueeze(0)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand(c, generator=g, dtype=torch.float64) + 0.2
    grad_out = torch.rand(n, generator=g, dtype=torch.float64).view(x.shape[:1] + x.shape[2:]) + 0.5 \
        if kw["reduction"] == "none" else None
    losses, grads = [], []
    for fn in (F.cross_entropy, cross_entropy):
        xo = x.clone().requires_grad_()
        loss = fn(xo, t, **kw)
        loss.backward(grad_out)
        losses.append(loss.detach())
        grads.append(xo.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-13, atol=4e-16, equal_nan=True)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-13, atol=4e-16, equal_nan=True)


# (name, (float64 logits (2, 5, 40) or (80, 5) -> the layout, targets (2, 40) -> theirs), why)
F64_BLOCK_LAYOUTS = {
    "k-dim": (lambda x: x, lambda t: t, "positions contiguous: blocks of 32 positions as they lie"),
    "rows": (lambda x: x.permute(0, 2, 1).reshape(80, 5), lambda t: t.reshape(80),
             "(80, 5): rows of few classes gathered 32 at a time"),
    "transposed": (lambda x: x.permute(0, 2, 1).reshape(80, 5).t().contiguous().t(), lambda t: t.reshape(80),
                   "(80, 5) column-major: one item of 80 positions"),
}


@pytest.mark.parametrize("layout", list(F64_BLOCK_LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_float64_blocks_out_of_range_target(kernel_path, layout, reduction, grad):
    """float64 in blocks of 32 rows: a target outside [0, C) in the second block raises PyTorch's IndexError, as the
    rows' kernels do; the ignored ones beside it do not."""
    lay_x, lay_t, _ = F64_BLOCK_LAYOUTS[layout]
    x = lay_x(torch.randn(2, 5, 40, dtype=torch.float64)).requires_grad_(grad)
    t = torch.randint(0, 5, (2, 40))
    t[1, 30:34] = -100
    t[1, 35] = 5
    with pytest.raises(IndexError, match=r"Target 5 is out of bounds\."):
        cross_entropy(x, lay_t(t), reduction=reduction)


# (name, (N, C) float64 rows -> the layout the blocks meet, the targets' layout for probabilities, why)
F64_THREADED = {
    "rows-gathered": (lambda x: x, "7000 rows of 5 classes: 219 blocks, split across the threads"),
    "channels-last": (lambda x: x.view(70, 100, 5).permute(0, 2, 1).unsqueeze(-1)
                      .contiguous(memory_format=torch.channels_last), "70 items of 100 positions, gathered"),
    "k-dim": (lambda x: x.view(70, 100, 5).permute(0, 2, 1).contiguous(), "70 items of 100 positions as they lie"),
    "transposed": (lambda x: x.t().contiguous().t(), "one item of 7000 positions"),
}


@pytest.mark.parametrize("layout", list(F64_THREADED))
@pytest.mark.parametrize("kw", [dict(reduction="mean", label_smoothing=0.1), dict(reduction="none", weighted=True),
                                dict(reduction="sum", probabilities=True, weighted=True)],
                         ids=["mean-smoothed", "none-weighted", "sum-probabilities-weighted"])
def test_float64_blocks_in_place_and_across_threads(kernel_path, layout, kw):
    """float64 blocks over enough rows for several tasks: PyTorch's float64 numbers, the same bits in place (the
    gradient written over the logits: gathered rows are copied back only after the whole block was read) and with
    one thread; probabilities laid out contiguously whatever the logits' layout."""
    g = torch.Generator().manual_seed(17)
    x = F64_THREADED[layout][0](torch.randn(7000, 5, generator=g, dtype=torch.float64) * 10)
    kw = dict(kw)
    if kw.pop("probabilities", False):
        t = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64), 1).contiguous()
    else:
        t = torch.randint(0, 5, (x.shape[0], *x.shape[2:]), generator=g)
        t.view(-1)[::13] = -100
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand(5, generator=g, dtype=torch.float64) + 0.2
    grad_out = torch.rand(t.shape if t.dtype == torch.int64 else t.shape[:1] + t.shape[2:], generator=g,
                          dtype=torch.float64) if kw["reduction"] == "none" else None

    def run(fn, inplace=False, threads=None):
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            leaf = x.clone().requires_grad_()
            logits = leaf.clone() if inplace else leaf
            extra = dict(inplace_backward=True) if inplace else {}
            loss = fn(logits, t, **kw, **extra)
            (grad,) = torch.autograd.grad(loss, logits, grad_out)
            return loss.detach(), grad
        finally:
            torch.set_num_threads(before)

    ref_loss, ref_grad = run(F.cross_entropy)
    loss, grad = run(cross_entropy)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-13, atol=4e-16)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-13, atol=4e-16)
    for other in (run(cross_entropy, inplace=True), run(cross_entropy, threads=1)):
        assert torch.equal(other[0], loss) and torch.equal(other[1], grad)
