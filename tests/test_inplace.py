"""inplace_backward=True: the gradient is written over the logits (no gradient buffer), with the same numbers
as the default path, and every use that would read the destroyed logits refused."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, reference
from softmax_ce_ext import CrossEntropyLoss, cross_entropy

# Each layout reaches a different kernel path: contiguous rows, K-dim (classes strided), transposed logits.
LAYOUTS = {
    "rows": lambda g, dtype: torch.randn(37, 300, generator=g).to(dtype),
    "k-dim": lambda g, dtype: torch.randn(3, 11, 5, 7, generator=g).to(dtype),
    "transposed": lambda g, dtype: torch.randn(300, 37, generator=g).to(dtype).t(),
}
OPTIONS = [
    dict(),
    dict(label_smoothing=0.1, ignore_index=2),
    dict(weighted=True, label_smoothing=0.2),
]


def _case(device, layout, dtype, opts, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = LAYOUTS[layout](g, dtype).to(device)
    classes = x.shape[1]
    target = torch.randint(0, classes, (x.shape[0], *x.shape[2:]), generator=g).to(device)
    kw = {k: v for k, v in opts.items() if k != "weighted"}
    if opts.get("weighted"):
        kw["weight"] = (torch.rand(classes, generator=g) + 0.1).to(device)
    return x, target, kw


@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "smoothing-ignore", "weight-smoothing"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gradient_written_over_the_logits(device, kernel_path, dtype, layout, reduction, opts):
    x, target, kw = _case(device, layout, dtype, opts)
    kw["reduction"] = reduction
    leaf = x.clone().requires_grad_()
    logits = leaf.clone()  # a non-leaf, as the output of a model's last layer is
    version = logits._version
    loss = cross_entropy(logits, target, inplace_backward=True, **kw)
    if reduction != "none":  # the forward already wrote the gradient
        assert logits._version > version
    grad_out = torch.rand_like(loss.detach()) + 0.5
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    assert grad.data_ptr() == logits.data_ptr() and grad.stride() == logits.stride()  # no second buffer
    ref_loss, ref_grad = reference(x, target, grad_out, **kw)
    scale = x.abs().max().item()
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=scale)
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=scale)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_same_bits_as_the_default_path(device, reduction):
    x, target, kw = _case(device, "rows", torch.float32, dict(label_smoothing=0.1))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = cross_entropy(a.clone(), target, reduction=reduction, inplace_backward=True, **kw)
    lb = cross_entropy(b, target, reduction=reduction, **kw)
    la.sum().backward()
    lb.sum().backward()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)


def test_probability_targets(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 40, generator=g).to(device)
    y = torch.softmax(torch.randn(9, 40, generator=g), 1).to(device)
    logits = x.clone().requires_grad_().clone()
    loss = cross_entropy(logits, y, label_smoothing=0.1, inplace_backward=True)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_loss, ref_grad = reference(x, y, torch.ones(()), label_smoothing=0.1)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


def test_without_a_gradient_the_logits_are_left_alone(device):
    x, target, _ = _case(device, "rows", torch.float32, {})
    kept = x.clone()
    with torch.no_grad():
        cross_entropy(x, target, inplace_backward=True)
    cross_entropy(x, target, inplace_backward=True)  # x does not require grad
    assert torch.equal(x, kept)


def test_module(device):
    x, target, _ = _case(device, "rows", torch.float32, {})
    module = CrossEntropyLoss(label_smoothing=0.1, inplace_backward=True)
    assert "inplace_backward=True" in repr(module)
    assert module.state_dict().keys() == torch.nn.CrossEntropyLoss(label_smoothing=0.1).state_dict().keys()
    leaf = x.clone().requires_grad_()
    module(leaf.clone(), target).backward()
    expected = x.clone().requires_grad_()
    F.cross_entropy(expected, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(leaf.grad, expected.grad)


class TestRefusals:
    def test_leaf(self, device):
        x, target, _ = _case(device, "rows", torch.float32, {})
        with pytest.raises(RuntimeError, match="must not be a leaf"):
            cross_entropy(x.requires_grad_(), target, inplace_backward=True)

    def test_target_that_requires_grad(self, device):
        x = torch.randn(4, 6, device=device, requires_grad=True)
        y = torch.softmax(torch.randn(4, 6, device=device), 1).requires_grad_()
        with pytest.raises(RuntimeError, match="probability targets"):
            cross_entropy(x.clone(), y, inplace_backward=True)

    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_double_backward(self, device, reduction):
        x, target, _ = _case(device, "rows", torch.float64, {})
        logits = x.requires_grad_().clone()
        loss = cross_entropy(logits, target, reduction=reduction, inplace_backward=True).sum()
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, logits, create_graph=True)

    @pytest.mark.parametrize(
        "reduction, message",
        [("mean", "second backward"), ("none", "modified by an inplace operation")],
    )
    def test_second_backward(self, device, reduction, message):
        x, target, _ = _case(device, "rows", torch.float32, {})
        logits = x.requires_grad_().clone()
        loss = cross_entropy(logits, target, reduction=reduction, inplace_backward=True).sum()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match=message):
            loss.backward()

    def test_logits_another_op_saved(self, device):
        """exp saves its output for its own backward: autograd's version check catches the overwrite."""
        x, target, _ = _case(device, "rows", torch.float32, {})
        logits = x.requires_grad_().exp()
        loss = cross_entropy(logits, target, inplace_backward=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()

    def test_logits_that_cannot_be_viewed(self, device):
        x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
        logits = x.clone().transpose(2, 3)  # (N, C, 5, 4): the spatial dims cannot be merged without a copy
        target = torch.randint(0, 3, (2, 5, 4), device=device)
        with pytest.raises(RuntimeError, match="without a copy"):
            cross_entropy(logits, target, inplace_backward=True)

    def test_overlapping_logits(self, device):
        x = torch.randn(1, 7, device=device, requires_grad=True)
        logits = x.clone().expand(5, 7)  # five rows sharing one row of memory
        target = torch.randint(0, 7, (5,), device=device)
        with pytest.raises(RuntimeError, match="do not overlap"):
            cross_entropy(logits, target, inplace_backward=True)
