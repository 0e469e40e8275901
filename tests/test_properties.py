"""Property tests (hypothesis): random shapes, dtypes and options against a float64 PyTorch reference on
the same rounded inputs, plus invariants.  SCE_HYPOTHESIS_EXAMPLES raises the draw count (default 40)."""

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_close
from softmax_ce_ext import cross_entropy

EXAMPLES = int(os.environ.get("SCE_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@st.composite
def problems(draw):
    extra = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    n, c = draw(st.integers(1, 64)), draw(st.integers(1, 300))
    shape = (n, c, *extra)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** draw(st.floats(-3, 3))
    dtype = draw(st.sampled_from(DTYPES))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, c, (n, *extra), generator=g)
    ignore_index = draw(st.sampled_from([-100, 0, c + 7]))
    frac = draw(st.sampled_from([0.0, 0.3]))
    target = torch.where(torch.rand(target.shape, generator=g) < frac, torch.tensor(ignore_index), target)
    kw = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        ignore_index=ignore_index,
        label_smoothing=draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),
    )
    if draw(st.booleans()):
        kw["weight"] = (torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    return x, target, kw, g


def _grad(fn, x, target, grad_out, **kw):
    xg = x.clone().requires_grad_()
    loss = fn(xg, target, **kw)
    (grad,) = torch.autograd.grad(loss, xg, grad_out.to(loss.dtype))
    return loss.detach(), grad


@SETTINGS
@given(problem=problems())
def test_matches_float64_reference(device, kernel_path, problem):
    x, target, kw, g = problem
    loss_shape = target.shape if kw["reduction"] == "none" else ()
    grad_out = (torch.rand(loss_shape, generator=g, dtype=torch.float64) + 0.5).to(x.dtype)
    ref_kw = dict(kw, weight=kw["weight"].double()) if "weight" in kw else kw
    ref_loss, ref_grad = _grad(F.cross_entropy, x.double(), target, grad_out.double(), **ref_kw)
    on_device = dict(kw, weight=kw["weight"].to(device)) if "weight" in kw else kw
    loss, grad = _grad(cross_entropy, x.to(device), target.to(device), grad_out.to(device), **on_device)
    logit_scale = x.double().abs().max().item()
    assert_close(loss, ref_loss, x.dtype, "loss", logit_scale)
    assert_close(grad, ref_grad, x.dtype, "grad", logit_scale, scale_floor=_row_factor(kw, grad_out, target))


def _row_factor(kw, grad_out, target):
    """The largest upstream factor on a row's gradient terms (p_c and the one-hot/smoothing terms are <= 1)."""
    w = kw["weight"].double() if "weight" in kw else None
    factor = grad_out.double().abs().max().item() * (w.abs().max().item() if w is not None else 1.0)
    if kw["reduction"] == "mean":
        valid = target != kw["ignore_index"]
        denom = w[target[valid]].sum().item() if w is not None else valid.sum().item()
        factor /= max(denom, 1e-30)
    return factor


@SETTINGS
@given(problem=problems(), shift=st.floats(-50, 50))
def test_invariants(problem, shift):
    x, target, kw, _ = problem
    x = x.double()
    kw = dict(kw, reduction="none")
    if "weight" in kw:
        kw["weight"] = kw["weight"].double()
    loss, grad = _grad(cross_entropy, x, target, torch.ones(target.shape, dtype=torch.float64), **kw)
    # A per-row constant added to the logits changes neither the loss nor the gradient.
    shifted, shifted_grad = _grad(cross_entropy, x + shift, target, torch.ones(target.shape, dtype=torch.float64), **kw)
    torch.testing.assert_close(shifted, loss, rtol=1e-9, atol=1e-9 * (1 + abs(shift)))
    torch.testing.assert_close(shifted_grad, grad, rtol=1e-9, atol=1e-9)
    # Each row's gradient sums to zero over the classes; ignored rows have none at all.
    torch.testing.assert_close(grad.sum(1), torch.zeros_like(grad.sum(1)), rtol=0, atol=1e-9)
    ignored = (target == kw["ignore_index"]).unsqueeze(1).expand_as(grad)
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
