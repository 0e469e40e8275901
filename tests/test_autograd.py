"""Autograd behaviour: gradcheck, gradient accumulation, upstream scaling, no-grad paths, inputs untouched."""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce_ext
from helpers import OpSpy
from softmax_ce_ext import CrossEntropyLoss, SoftmaxCrossEntropyFunction, cross_entropy
from softmax_ce_ext import function as function_mod

OPTIONS = [
    dict(reduction="mean"),
    dict(reduction="sum", label_smoothing=0.2),
    dict(reduction="none", ignore_index=1),
    dict(reduction="mean", ignore_index=0, label_smoothing=0.3, weighted=True),
]


def case(device, shape=(4, 5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).to(device)
    weight = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.1).to(device)
    return x, target, weight


def kwargs(opts, weight):
    kw = dict(opts)
    if kw.pop("weighted", False):
        kw["weight"] = weight
    return kw


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("form", ["function", "functional", "module"])
def test_gradcheck(device, opts, form):
    x, target, weight = case(device)
    kw = kwargs(opts, weight)
    if form == "function":
        fn = lambda x: SoftmaxCrossEntropyFunction.apply(  # noqa: E731
            x, target, kw.get("weight"), kw.get("ignore_index", -100), kw["reduction"], kw.get("label_smoothing", 0.0)
        )
    elif form == "functional":
        fn = lambda x: cross_entropy(x, target, **kw)  # noqa: E731
    else:
        module = CrossEntropyLoss(**kw).to(device)
        fn = lambda x: module(x, target)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_gradgradcheck(device, opts):
    x, target, weight = case(device, shape=(3, 4))
    kw = kwargs(opts, weight)
    assert torch.autograd.gradgradcheck(lambda x: cross_entropy(x, target, **kw), (x,))


def test_inputs_not_modified(device):
    x, target, weight = case(device)
    for kw in (dict(weight=weight, label_smoothing=0.1), dict(reduction="none")):
        before = (x.detach().clone(), target.clone(), weight.clone())
        loss = cross_entropy(x, target, **kw)
        loss.backward(torch.rand_like(loss) + 0.5)
        assert torch.equal(x.detach(), before[0])
        assert torch.equal(target, before[1])
        assert torch.equal(weight, before[2])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_accumulates_into_existing_grad(device, reduction):
    x, target, _ = case(device)
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref, target, reduction=reduction).sum().backward()
    x.grad = torch.full_like(x, 0.25)
    cross_entropy(x, target, reduction=reduction).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad + 0.25)


def test_scaled_and_summed_with_other_losses(device):
    x, target, weight = case(device)
    ref = x.detach().clone().requires_grad_()
    (3.5 * F.cross_entropy(ref, target, weight) + (ref**2).sum() - F.cross_entropy(ref, target, reduction="sum")).backward()
    (3.5 * cross_entropy(x, target, weight) + (x**2).sum() - cross_entropy(x, target, reduction="sum")).backward()
    torch.testing.assert_close(x.grad, ref.grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_with_retain_graph(device, reduction):
    x, target, _ = case(device)
    loss = cross_entropy(x, target, reduction=reduction).sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(64, 1000), (4, 21, 8, 8), (4, 40000)], ids=["rows", "k-dim", "long-rows"])
@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="sum", label_smoothing=0.1)],
                         ids=["mean", "sum-smoothed"])
def test_second_backward_gives_the_same_bits(device, dtype, shape, kw):
    """A second backward (retain_graph) runs the training pass again: the same bits as the first, whose gradient
    the forward wrote (recomputed from the lse, e^(x - lse), they differed from e^(x - max) / sum in the last
    bits: gradcheck's reentrancy check failed)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g).to(dtype).to(device).requires_grad_()
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).to(device)
    loss = cross_entropy(x, t, **kw)
    (first,) = torch.autograd.grad(loss, x, torch.tensor(0.75, device=device, dtype=loss.dtype), retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, torch.tensor(0.75, device=device, dtype=loss.dtype))
    assert torch.equal(first, second)


def test_upstream_gradient_of_one_returns_fused_gradient(device):
    x, target, _ = case(device)
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref, target).backward()
    cross_entropy(x, target).backward()  # grad_output == 1: the fused gradient as the forward wrote it
    torch.testing.assert_close(x.grad, ref.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 3)], ids=["rows", "k-dim"])
def test_logits_changed_after_the_forward(device, reduction, shape):
    """The training pass's backward unpacks nothing it saved: logits changed in place after the forward get the
    gradient of the logits as they were, as PyTorch's (its log_softmax saves its output, not the logits).  (Targets
    or a weight changed so raise in PyTorch, not here: README's differences.)"""
    x, target, _ = case(device, shape)
    grads = []
    for fn in (F.cross_entropy, cross_entropy):
        leaf = x.detach().clone().requires_grad_()
        logits = leaf * 1.0  # not a leaf, so it may be changed in place
        loss = fn(logits, target, reduction=reduction)
        with torch.no_grad():
            logits.mul_(-3.0)
        loss.backward(torch.tensor(0.5, device=device, dtype=loss.dtype))
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_targets_changed_after_the_forward(device, reduction):
    """Where PyTorch raises (nll_loss saved the targets and the weight), the training pass gives the gradient of the
    loss its forward computed (README: differences kept on purpose)."""
    x, target, weight = case(device)
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref, target, weight, reduction=reduction).backward()
    loss = cross_entropy(x, target, weight, reduction=reduction)
    target.fill_(0)
    weight.mul_(3.0)
    loss.backward()
    torch.testing.assert_close(x.grad, ref.grad)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "requires_grad_false"])
@pytest.mark.parametrize("reduction,kernel", [("mean", "mean_forward"), ("sum", "forward_sum"), ("none", "forward_rows")])
def test_no_gradient_buffer_without_autograd(device, monkeypatch, mode, reduction, kernel):
    """Without a gradient to compute: one row kernel, no gradient buffer, and no autograd.Function (a small
    call is mostly host time; a mean of class indices or a sum is one op, the sum included)."""
    spy = OpSpy(function_mod.ops)
    monkeypatch.setattr(function_mod, "ops", spy)

    def no_function(*args, **kwargs):
        raise AssertionError("the autograd.Function ran without a gradient to compute")

    monkeypatch.setattr(SoftmaxCrossEntropyFunction, "forward", staticmethod(no_function))
    x, target, _ = case(device)
    if mode == "no_grad":
        with torch.no_grad():
            loss = cross_entropy(x, target, reduction=reduction)
    elif mode == "inference_mode":
        with torch.inference_mode():
            loss = cross_entropy(x, target, reduction=reduction)
    else:
        loss = cross_entropy(x.detach(), target, reduction=reduction)
    assert spy.calls == [kernel]
    assert not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), target, reduction=reduction))


@pytest.mark.parametrize("reduction,fused", [("mean", "mean_forward_backward"), ("sum", "forward_backward")])
def test_training_uses_one_fused_pass(device, monkeypatch, reduction, fused):
    """mean: the denominator, the loss and the gradient in one op (no separate mean_scale call)."""
    spy = OpSpy(function_mod.ops)
    monkeypatch.setattr(function_mod, "ops", spy)
    x, target, _ = case(device)
    cross_entropy(x, target, reduction=reduction).backward()
    assert spy.calls == [fused, "scale_grad_"]


def test_reduction_none_recomputes_from_saved_stats(device, monkeypatch):
    spy = OpSpy(function_mod.ops)
    monkeypatch.setattr(function_mod, "ops", spy)
    x, target, _ = case(device)
    cross_entropy(x, target, reduction="none").sum().backward()
    assert spy.calls == ["forward_rows", "backward"]


def test_cuda_built_flag_is_bool():
    assert isinstance(softmax_ce_ext.cuda_built(), bool)


# create_graph=True takes the composite formulas (function._composite_*); cases where they must agree with
# PyTorch's own double-backward graph (found by differential fuzzing, 2026-11-28), and why each.
CREATE_GRAPH_CASES = {
    "all-ignored-mean": (dict(), "a mean whose denominator is 0: the ignored rows' gradient 0, not 0 * inf = NaN"),
    "zero-weights-smoothed": (dict(weight="zeros", label_smoothing=0.1), "weights summing to 0 over the targets: "
                              "PyTorch's NaN on the valid rows, 0 on the ignored one"),
    "large-logits": (dict(scale=300.0), "64 x 50 logits of ~300: softmax with its max subtracted (exp(x - lse) was "
                     "off by 4e-7 where PyTorch's own is by 1e-9)"),
}


@pytest.mark.parametrize("case", list(CREATE_GRAPH_CASES))
def test_create_graph_gradient_matches_torch(device, case):
    kw, _ = CREATE_GRAPH_CASES[case]
    kw = dict(kw)
    g = torch.Generator().manual_seed(3)
    if case == "large-logits":
        x = (torch.randn(64, 50, generator=g) * kw.pop("scale")).to(device)
        t = torch.randint(0, 50, (64,), generator=g).to(device)
    else:
        x = torch.randn(6, 5, generator=g).to(device)
        t = torch.tensor([0, 1, -100, 2, 4, 3], device=device)
    if case == "all-ignored-mean":
        t = torch.full_like(t, -100)
    if kw.get("weight") == "zeros":
        kw["weight"] = torch.zeros(5, device=device)
    xo, xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    (ours,) = torch.autograd.grad(cross_entropy(xo, t, **kw), xo, create_graph=True)
    (theirs,) = torch.autograd.grad(F.cross_entropy(xt, t, **kw), xt, create_graph=True)
    kw64 = {**kw, "weight": kw["weight"].double()} if "weight" in kw else kw
    (exact,) = torch.autograd.grad(F.cross_entropy(xr, t, **kw64), xr)
    assert torch.equal(ours.isnan(), theirs.isnan())
    torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.double(), exact, equal_nan=True, rtol=1e-6, atol=1e-8)
