"""Loss scaling (GradScaler's grad_output of 2^k) with half-precision logits: the gradient of a mean is
(p - y) / N, whose small entries float16 cannot hold, and the scaling exists to keep them.  PyTorch rounds
grad_output / N * (p - y) once; a gradient written in the forward and scaled afterwards had already lost them
(48% of the entries of a 4096 x 1000 mean were 0 at grad_output 1024).  float16 therefore takes the gradient
from the saved row stats in the backward; bfloat16 and float32 keep the fused pass (their range holds the entries)."""

import pytest
import torch

import softmax_ce_ext.function as function_mod
from helpers import OpSpy, assert_close, reference
from softmax_ce_ext import cross_entropy

# (shape, why): rows of 1000 classes (entries (p - y) / N down to ~1e-9 at N = 4096); K-dim positions
SHAPES = [((4096, 1000), "rows"), ((4, 21, 32, 32), "k-dim: (N, C, H, W)")]


def _case(device, dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).to(device)
    t.view(-1)[::7] = -100
    return x, t


@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[w for _, w in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("scale", [1024.0, 32768.0])
@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
def test_scaled_gradient_keeps_small_entries(device, shape, dtype, reduction, scale, inplace):
    x, t = _case(device, dtype, shape)
    if reduction == "sum":
        scale /= 4096  # a sum's entries are N times a mean's: the same magnitudes, and no overflow
    grad_out = torch.tensor(scale, device=device)
    xo = x.clone().requires_grad_()
    loss = cross_entropy(xo * 1 if inplace else xo, t, reduction=reduction, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, xo, grad_out.to(loss.dtype))
    ref_loss, ref_grad = reference(x, t, grad_out, reduction=reduction)
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=x.abs().max().item())
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=x.abs().max().item())
    # Entry by entry, not only within the tolerance of the largest: none that the dtype holds comes out 0.
    held = ref_grad.to(dtype) != 0
    lost = (grad == 0) & held
    assert int(lost.sum()) == 0, f"{int(lost.sum())} of {int(held.sum())} gradient entries lost to 0"


@pytest.mark.parametrize("dtype,calls", [(torch.float16, ["forward_rows", "backward"]),
                                         (torch.bfloat16, ["mean_forward_backward", "scale_grad_"])], ids=str)
def test_which_pass_each_dtype_takes(device, monkeypatch, dtype, calls):
    """float16: the loss and the rows' max and sum, then the gradient from them; bfloat16: the fused pass, then its scaling."""
    spy = OpSpy(function_mod.ops)
    monkeypatch.setattr(function_mod, "ops", spy)
    x, t = _case(device, dtype, (64, 100))
    cross_entropy(x.requires_grad_(), t).backward()
    assert spy.calls == calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "one-element-off"])
@pytest.mark.parametrize("grad_out", [0.5, 3.0])
def test_scaling_pass_over_any_buffer(device, dtype, offset, grad_out):
    """The backward's scaling of the fused gradient (grad_output != 1), in place over dense logits whose buffer
    starts on a 16-byte boundary (16-byte accesses, then the elements past the last whole chunk: 7 x 1001 is odd)
    or one element past it (element by element)."""
    n, c = 7, 1001
    g = torch.Generator().manual_seed(offset)
    flat = (torch.randn(n * c + offset, generator=g) * 2).to(dtype).to(device)
    x = flat[offset:].view(n, c)
    t = torch.randint(0, c, (n,), generator=g).to(device)
    ref_loss, ref_grad = reference(x, t, torch.tensor(grad_out, device=device), reduction="sum")
    leaf = flat.clone().requires_grad_()
    logits = (leaf * 1)[offset:].view(n, c)  # not a leaf (in place may write over it), the buffer's offset kept
    assert logits.data_ptr() % 16 == (0 if offset == 0 else dtype.itemsize)
    loss = cross_entropy(logits, t, reduction="sum", inplace_backward=True)  # the gradient now in that buffer
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=device))  # scaled there, then to the leaf
    grad = leaf.grad[offset:].view(n, c)
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=x.abs().max().item())
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=x.abs().max().item())
