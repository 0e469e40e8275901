"""Reference values: PyTorch's own cross_entropy in float64 on the same (already rounded) inputs."""

import torch
import torch.nn.functional as F

import softmax_ce_ext

# (rtol, atol as a fraction of the largest reference magnitude) for losses and gradients stored in each dtype.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}


def reference(x, target, grad_out, **kw):
    """Loss and d(loss . grad_out)/dx from PyTorch in float64."""
    xr = x.detach().double().requires_grad_()
    weight = kw.pop("weight", None)
    loss = F.cross_entropy(xr, target, None if weight is None else weight.double(), **kw)
    (grad,) = torch.autograd.grad(loss, xr, grad_out.double())
    return loss.detach(), grad


def ours(x, target, grad_out, **kw):
    xo = x.detach().clone().requires_grad_()
    loss = softmax_ce_ext.cross_entropy(xo, target, **kw)
    (grad,) = torch.autograd.grad(loss, xo, grad_out.to(loss.dtype))
    return loss, grad


def assert_close(actual, expected, dtype, what, logit_scale=0.0, scale_floor=0.0):
    """logit_scale: the largest |logit|.  x - lse carries an absolute error of about |x| * eps of the
    accumulation dtype in any implementation, so large logits widen the tolerance by that much.
    scale_floor: the magnitude the absolute tolerance is relative to, when cancellation makes the expected
    values smaller than the terms they are computed from."""
    rtol, atol = TOL[dtype]
    acc_eps = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    logit_atol = 8 * acc_eps * logit_scale  # absolute, like the error it bounds (not scaled by the result)
    too_big = expected.abs() > torch.finfo(dtype).max  # beyond the dtype's range the right answer is inf
    expected = torch.where(too_big, expected.sign() * float("inf"), expected)
    finite = expected[expected.isfinite()]
    scale = max(finite.abs().max().item() if finite.numel() else 0.0, scale_floor)
    torch.testing.assert_close(
        actual.double().cpu(),
        expected.cpu(),
        rtol=rtol,
        atol=atol * max(scale, 1e-30) + logit_atol,
        equal_nan=True,  # e.g. a mean over targets that are all ignored is NaN in both
        msg=lambda m: f"{what}: {m}",
    )


def training_against_float64(x, t, g, kw, inplace):
    """Loss and gradient of x (its layout kept, on its device) against float64: kw's 'weighted' draws a class
    weight, 'none' a per-position upstream gradient (from g, on the CPU); in place writes the gradient over a
    non-leaf copy.  Returns the leaf."""
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["weight"] = (torch.rand(x.shape[1], generator=g) + 0.2).to(x.device)
    grad_out = (torch.rand(t.shape, generator=g) + 0.5 if kw["reduction"] == "none" else torch.ones(())).to(x.device)
    leaf = x.clone(memory_format=torch.preserve_format).requires_grad_()
    logits = leaf * 1 if inplace else leaf  # not a leaf: in place needs one
    loss = softmax_ce_ext.cross_entropy(logits, t, inplace_backward=inplace, **kw)
    (grad,) = torch.autograd.grad(loss, leaf, grad_out.to(loss.dtype))
    ref, ref_grad = reference(x, t, grad_out, **kw)
    scale = x.float().abs().max().item()
    assert_close(loss, ref, x.dtype, "loss", logit_scale=scale)
    assert_close(grad, ref_grad, x.dtype, "grad", logit_scale=scale)
    return leaf


class OpSpy:
    """Records which row kernels ran (not the small reductions), passing the calls through: stands in for
    softmax_ce_ext.function's `ops` (monkeypatch.setattr(function_mod, "ops", OpSpy(function_mod.ops)))."""

    KERNELS = ("forward_rows", "forward_sum", "mean_forward", "forward_backward", "mean_forward_backward", "backward",
               "scale_grad_")

    def __init__(self, ops):
        self._ops, self.calls = ops, []

    def __getattr__(self, name):
        if name in self.KERNELS:
            self.calls.append(name)
        return getattr(self._ops, name)
