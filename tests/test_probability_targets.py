"""Probability targets (the target has the input's shape): fused, with weight and label smoothing."""

import zlib

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, ours, reference
from softmax_ce_ext import cross_entropy

SHAPES = [
    ((6, 11), "odd class count"),
    ((4, 1000), "classification-sized rows"),
    ((7,), "unbatched"),
    ((3, 9, 5), "one extra dim: strided classes"),
    ((2, 5, 3, 4), "two extra dims"),
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make(shape, dtype, device, target_dtype=None):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    class_dim = 0 if len(shape) == 1 else 1
    y = torch.softmax(torch.randn(shape, generator=g) * 2, class_dim).to(target_dtype or dtype).to(device)
    w = (torch.rand(shape[class_dim], generator=g) + 0.2).to(dtype).to(device)
    return x, y, w, g


@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[str(s) for s, _ in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_matches_torch(device, shape, dtype, reduction, weighted, smoothing):
    x, y, w, g = make(shape, dtype, device)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    if weighted:
        kw["weight"] = w
    loss_shape = () if reduction != "none" or len(shape) == 1 else (shape[0], *shape[2:])
    grad_out = (torch.rand(loss_shape, generator=g) + 0.5).to(dtype).to(device)
    ref_loss, ref_grad = reference(x, y.double(), grad_out, **kw)
    loss, grad = ours(x, y, grad_out, **kw)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")
    with torch.no_grad():  # the loss alone: its own path (forward_sum for a sum or a mean)
        alone = cross_entropy(x, y, **kw)
    assert alone.dtype == dtype and alone.shape == ref_loss.shape
    assert_close(alone, ref_loss, dtype, "loss without a gradient")


def test_float32_targets_with_bfloat16_logits_are_not_rounded(device):
    """Targets finer than the logits are read as they are (the kernels take the accumulation dtype)."""
    x, y, _, g = make((5, 33), torch.bfloat16, device, target_dtype=torch.float32)
    expected = F.cross_entropy(x.double(), y.double())
    torch.testing.assert_close(cross_entropy(x, y).double(), expected, rtol=4e-3, atol=0)
    assert cross_entropy(x, y).dtype == torch.float32  # PyTorch promotes bf16 with fp32 to fp32
    assert F.cross_entropy(x, y).dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_flows_to_targets(device, reduction):
    x, y, w, _ = make((4, 6), torch.float64, device)
    y.requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y: cross_entropy(x, y, w, reduction=reduction, label_smoothing=0.1), (x, y)
    )


# Which inputs require grad, and why: PyTorch differentiates a probability-target loss in its class weight too
# (a learned weighting); ours came back None for the weight until 2026-11-28.
WEIGHT_GRADS = {"weight": ("w",), "weight-logits": ("w", "x"), "weight-logits-targets": ("w", "x", "y")}


@pytest.mark.parametrize("wants", list(WEIGHT_GRADS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 3)], ids=["rows", "kdim"])
def test_gradient_flows_to_the_weight(device, wants, reduction, shape):
    """gradcheck in float64 (the fused training pass for mean/sum when the logits require grad), smoothing on."""
    x, y, w, _ = make(shape, torch.float64, device)
    inputs = dict(x=x, y=y, w=w)
    for name in WEIGHT_GRADS[wants]:
        inputs[name].requires_grad_()
    names = WEIGHT_GRADS[wants]

    def loss(*args):
        given = {**inputs, **dict(zip(names, args))}
        return cross_entropy(given["x"], given["y"], given["w"], reduction=reduction, label_smoothing=0.1)

    assert torch.autograd.gradcheck(loss, tuple(inputs[n] for n in names))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradient_matches_torch(device, dtype):
    """The weight's gradient in the weight's dtype, against PyTorch in float64; the logits' gradient beside it."""
    x, y, w, _ = make((6, 33), dtype, device)
    w = w.float().requires_grad_()
    xg = x.clone().requires_grad_()
    loss = cross_entropy(xg, y, w, label_smoothing=0.2)
    gx, gw = torch.autograd.grad(loss, (xg, w))
    xr, wr = x.double().requires_grad_(), w.detach().double().requires_grad_()
    rx, rw = torch.autograd.grad(F.cross_entropy(xr, y.double(), wr, label_smoothing=0.2), (xr, wr))
    assert gw.dtype == torch.float32
    assert_close(gw, rw, dtype, "weight grad")
    assert_close(gx, rx, dtype, "grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_order_through_targets_and_weight(device, reduction):
    """create_graph=True: the gradients of the logits, the targets and the weight are differentiable again in all
    three (the composites keep the targets and the weight attached); gradgradcheck in float64."""
    x, y, w, _ = make((3, 5), torch.float64, device)
    for v in (x, y, w):
        v.requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x, y, w: cross_entropy(x, y, w, reduction=reduction, label_smoothing=0.2), (x, y, w))


def test_infinite_logit_gives_torchs_nan_to_targets_and_weight(device):
    """A row holding +inf: PyTorch's log_softmax is NaN across it, so its gradients in the targets and the weight
    are NaN there; the composites use log_softmax too (they gave +-inf)."""
    x = torch.tensor([[1.0, float("inf"), 0.5, -1.0], [0.1, 0.2, 0.3, 0.4]], device=device)
    y = torch.softmax(torch.tensor([[0.3, 0.1, 2.0, -1.0], [1.0, 0.0, 0.5, 0.2]], device=device), 1)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], device=device)
    grads = []
    for fn in (cross_entropy, F.cross_entropy):
        yy, ww = y.clone().requires_grad_(), w.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(x, yy, ww, reduction="sum"), (yy, ww)))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_loss_dtype_follows_the_weight_too(device):
    """PyTorch's loss with probability targets is the product of logits, targets and weight: its dtype promotes all
    three (bfloat16 logits with a float32 weight: float32), and an integer weight is accepted."""
    x, y, _, _ = make((3, 7), torch.bfloat16, device)
    w = torch.rand(7, device=device) + 0.5
    ours, theirs = cross_entropy(x, y, w), F.cross_entropy(x, y, w)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=0)
    xf, yf = x.float(), y.float()
    w_int = torch.arange(1, 8, device=device)
    torch.testing.assert_close(cross_entropy(xf, yf, w_int), F.cross_entropy(xf, yf, w_int))


def test_no_classes_with_a_weight_requiring_grad(device):
    """C == 0: empty gradients for the logits and the weight (the composite divided eps by C)."""
    x = torch.randn(2, 0, device=device, requires_grad=True)
    w = torch.rand(0, device=device, requires_grad=True)
    gx, gw = torch.autograd.grad(cross_entropy(x, torch.rand(2, 0, device=device), w, label_smoothing=0.1), (x, w))
    assert gx.shape == x.shape and gw.shape == w.shape


def test_gradgradcheck(device):
    x, y, w, _ = make((3, 5), torch.float64, device)
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: cross_entropy(x, y, w, label_smoothing=0.2), (x,))


def test_edge_values(device):
    x = torch.tensor([[0.0, -float("inf"), 1.0], [3e38, -3e38, 0.0]], device=device)
    for y in (torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]], device=device),
              torch.tensor([[0.5, 0.2, 0.3], [1.0, 0.0, 0.0]], device=device)):
        torch.testing.assert_close(
            cross_entropy(x, y, reduction="none"), F.cross_entropy(x, y, reduction="none"), equal_nan=True
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_returns_float32_without_copying_the_logits(device, dtype, monkeypatch):
    from softmax_ce_ext import function as function_mod

    seen = []
    real = function_mod.ops

    class Spy:
        def __getattr__(self, name):
            op = getattr(real, name)

            def call(*args):
                if name in ("forward_rows", "forward_backward", "backward"):  # the logits are args[0] (args[1])
                    seen.append(args[0].dtype if name != "backward" else args[1].dtype)
                return op(*args)

            return call

    monkeypatch.setattr(function_mod, "ops", Spy())
    x, y, _, _ = make((6, 9), dtype, device)
    t = torch.randint(0, 9, (6,), device=device)
    x.requires_grad_()
    with torch.autocast(device_type=device, dtype=dtype):
        for target in (t, y):
            loss = cross_entropy(x, target)
            expected = F.cross_entropy(x, target)
            assert loss.dtype == expected.dtype == torch.float32
            torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == dtype
    assert seen and all(d == dtype for d in seen)  # the kernels saw the half-precision logits themselves
