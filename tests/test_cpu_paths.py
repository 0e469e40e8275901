"""The CPU's instruction-set paths and its gradient-buffer reuse."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, reference
from softmax_ce_ext import _C, cross_entropy


def test_isa_list_and_choice():
    isas = _C.cpu_isas()
    assert isas[-1] == "generic" and set(isas) <= {"avx512", "avx2", "generic"}
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


# Rows of few classes take the SIMD paths 16 (AVX-512) or 8 (AVX2) rows at a time, one row per lane, through
# transposed copies (whole blocks by W x W tiles in registers, the rest element by element): the number of rows
# against the block, the classes against the tiles and the limits (64 float, 96 2-byte), and why.
SMALL_ROWS = [(1, 10, "one row: a block of 1 lane"), (17, 10, "one full block of 16 and one lane: no whole tile"),
              (100, 1, "a single class: every loss 0, every gradient 0"),
              (39, 31, "odd rows; 1 tile + 15 classes element-wise (AVX-512), 3 + 7 (AVX2)"),
              (40, 32, "whole tiles only: 2 (AVX-512), 4 (AVX2); the last 8 rows element-wise (AVX-512)"),
              (33, 50, "3 tiles + 2 classes (AVX-512), 6 + 2 (AVX2); a last block of 1 row"),
              (40, 64, "float's largest class count on the path: 4 / 8 tiles"),
              (40, 65, "float: one row at a time; 2-byte: 4 / 8 tiles + 1 class"),
              (40, 96, "2-byte's largest class count on the path: 6 / 12 tiles"),
              (40, 97, "one more: one row at a time for every dtype")]


@pytest.mark.parametrize("size", SMALL_ROWS, ids=[f"{n}x{c}" for n, c, _ in SMALL_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="none", weighted=True, label_smoothing=0.2)],
                         ids=["mean", "none-weighted-smoothed"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "in-place"])
def test_small_rows_blocks(kernel_path, size, dtype, kw, inplace):
    """Every CPU path against float64: ignored and valid targets mixed within a block, per-row upstream
    gradients ('none'), the gradient written over the logits (in place)."""
    if kernel_path not in ("avx512", "avx2", "generic"):
        pytest.skip("a CPU path")
    n, c, _ = size
    g = torch.Generator().manual_seed(n * 100 + c)
    x = (torch.randn(n, c, generator=g) * 3).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[2::5] = -100  # not the first row: a mean over one ignored row is 0/0
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand(c, generator=g) + 0.2
    grad_out = torch.rand(n, generator=g) + 0.5 if kw["reduction"] == "none" else torch.ones(())
    leaf = x.clone().requires_grad_()
    logits = leaf * 1 if inplace else leaf  # not a leaf: in place needs one
    loss = cross_entropy(logits, t, inplace_backward=inplace, **kw)
    (grad,) = torch.autograd.grad(loss, leaf, grad_out.to(loss.dtype))
    ref, ref_grad = reference(x, t, grad_out, **kw)
    scale = x.float().abs().max().item()
    assert_close(loss, ref, dtype, "loss", logit_scale=scale)
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=scale)
