"""Parity with torch.nn.functional.cross_entropy: loss and gradient, every dtype, reduction and option."""

import zlib

import pytest
import torch

import softmax_ce_ext
from helpers import assert_close, ours, reference

# (input shape, why it is in the grid)
SHAPES = [
    ((2, 3), "tiny rows, fewer classes than a warp"),
    ((7, 33), "odd sizes: not a multiple of any vector or warp width"),
    ((16, 1000), "classification-sized rows"),
    ((3, 4099), "long odd rows: several strided sweeps per thread"),
    ((13,), "unbatched (C,) input with a 0-d target"),
    ((5, 33, 3), "one extra dim: the class dim is strided"),
    ((3, 17, 5, 7), "two extra dims (segmentation layout)"),
    ((2, 9, 3, 4, 5), "three extra dims"),
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (ignore_index, fraction of targets set to it, why)
IGNORES = [
    (-100, 0.0, "default ignore_index, nothing ignored"),
    (-100, 0.3, "~30% ignored with the default ignore_index"),
    (1, 0.3, "ignore_index that is a valid class"),
    (1000003, 0.3, "ignore_index above the class range"),
]


def make_case(shape, dtype, device, ignore_index, frac, seed):
    g = torch.Generator().manual_seed(seed)
    classes = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    target = torch.randint(0, classes, tshape, generator=g)
    if frac:
        mask = torch.rand(tshape, generator=g) < frac
        target = torch.where(mask, torch.tensor(ignore_index), target)
    weight = (torch.rand(classes, generator=g) + 0.2).to(dtype)
    return x.to(device), target.to(device), weight.to(device), g


@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[str(s) for s, _ in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ignore", IGNORES, ids=[f"ignore{i}-{f}" for i, f, _ in IGNORES])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_torch(device, kernel_path, shape, dtype, reduction, weighted, ignore, smoothing):
    ignore_index, frac, _ = ignore
    x, target, weight, g = make_case(shape, dtype, device, ignore_index, frac, seed=zlib.crc32(repr((shape, reduction, ignore)).encode()))
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing)
    if weighted:
        kw["weight"] = weight
    loss_shape = target.shape if reduction == "none" else ()
    # A random upstream gradient (never 1), rounded to the loss dtype so both sides see the same value.
    grad_out = (torch.rand(loss_shape, generator=g) + 0.5).to(dtype).to(device)
    ref_loss, ref_grad = reference(x, target, grad_out, **kw)
    loss, grad = ours(x, target, grad_out, **kw)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")
    # The loss alone (no_grad) takes a path of its own: no autograd.Function, one op for a mean of class indices.
    with torch.no_grad():
        alone = softmax_ce_ext.cross_entropy(x, target, **kw)
    assert alone.dtype == dtype and alone.shape == ref_loss.shape
    assert_close(alone, ref_loss, dtype, "loss without a gradient")
