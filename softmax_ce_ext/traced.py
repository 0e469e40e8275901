"""The loss in traced code without the autograd.Function: two Python custom ops with registered autograd
formulas, which Dynamo records as opaque calls instead of tracing a Function.

Who takes it:
- torch.export, always: export inlines a Function's forward and drops its backward, so an exported program's
  gradient was silently missing (None, with a warning) and `_export_forward_backward` failed; the custom ops
  carry their autograd formulas into the exported graph.
- torch.compile with SOFTMAX_CE_COMPILE_PATH=custom_op. torch 2.11's Dynamo got the Function's gradient wrong
  (zeros, H100 2026-11-27; pytorch#180642). The Function path (the default, 'function') has a fix for that, not
  yet run under 2.11: its output never aliases an intermediate when traced. This path avoids the mechanism
  altogether, so one GPU session can run both under 2.11 (benchmarks/compile_debug.py) and keep the one that is
  right.
"""

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._ops import _forward_backward_fake, _forward_fake, acc_dtype, ops
from .function import _fuses_gradient

PATH = os.environ.get("SOFTMAX_CE_COMPILE_PATH", "function")
if PATH not in ("function", "custom_op"):
    raise ValueError(f"SOFTMAX_CE_COMPILE_PATH: expected 'function' or 'custom_op', got {PATH!r}")


@torch.library.custom_op("softmax_ce_ext::train_loss", mutates_args=())
def train_loss(x3: Tensor, t: Tensor, weight: Optional[Tensor], ignore_index: int, eps: float, grad_scale: Tensor,
               divisor: Optional[Tensor], loss_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    """The training pass: (the summed loss, over divisor, in loss_dtype; its gradient times grad_scale)."""
    return ops.forward_backward(x3, t, weight, ignore_index, eps, grad_scale, None, divisor, loss_dtype)


@train_loss.register_fake
def _train_loss_fake(x3, t, weight, ignore_index, eps, grad_scale, divisor, loss_dtype):
    return _forward_backward_fake(x3, t, weight, ignore_index, eps, grad_scale, None, divisor, loss_dtype)


def _train_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.used = False


def _train_backward(ctx, g_loss, g_grad):
    if ctx.used:  # the gradient was scaled in place by the first backward
        raise RuntimeError("cross_entropy (torch.compile, SOFTMAX_CE_COMPILE_PATH=custom_op): a second backward "
                           "through the same loss is not supported on this path; use the default path")
    ctx.used = True
    (grad,) = ctx.saved_tensors
    ops.scale_grad_(grad, g_loss.reshape(()))  # skipped on the device when g_loss == 1
    return grad, None, None, None, None, None, None, None


train_loss.register_autograd(_train_backward, setup_context=_train_setup)


@torch.library.custom_op("softmax_ce_ext::rows_and_stats", mutates_args=())
def rows_and_stats(x3: Tensor, t: Tensor, weight: Optional[Tensor], ignore_index: int,
                   eps: float) -> Tuple[Tensor, Tensor]:
    """Per-row loss (B, S) and the rows' stats for backward (2, B, S: the max, the sum of e^(x - max)).  Named
    anew when the second output stopped being the lse: a cached or exported graph of the old op fails to match."""
    return ops.forward_rows(x3, t, weight, ignore_index, eps, None)


@rows_and_stats.register_fake
def _rows_and_stats_fake(x3, t, weight, ignore_index, eps):
    return _forward_fake(x3, t, weight, ignore_index, eps, None)


def _rows_setup(ctx, inputs, output):
    x3, t, weight, ctx.ignore_index, ctx.eps = inputs
    ctx.save_for_backward(x3, t, weight, output[1])


def _rows_backward(ctx, g_rows, g_stats):
    x3, t, weight, stats = ctx.saved_tensors
    grad = None
    if g_rows is not None:
        grad = ops.backward(g_rows.to(acc_dtype(x3.dtype)), x3, t, weight, stats, ctx.ignore_index, ctx.eps)
    return grad, None, None, None, None


rows_and_stats.register_autograd(_rows_backward, setup_context=_rows_setup)


def wanted(input, target, weight=None):
    """Whether a traced call takes this path: exported, every call but those wanting the targets' or the weight's
    gradient (the Function refuses those at export); compiled under custom_op, those wanting the logits' gradient
    and no other."""
    if not torch.compiler.is_compiling():
        return False
    others = (target.is_floating_point() and target.requires_grad) or (weight is not None and weight.requires_grad)
    if torch.compiler.is_exporting():  # also without a gradient: the program may be trained later
        return not (torch.is_grad_enabled() and others)
    return PATH == "custom_op" and torch.is_grad_enabled() and input.requires_grad and not others


def cross_entropy(p):
    """The loss for a function._Prepared `p`, through the custom ops above: the training pass where the logits'
    gradient is wanted; else the rows' losses (whose formula gives the gradient if the program is trained later)."""
    denom, inv_denom = p.mean_denominator()
    divisor, loss_dtype = p.loss_fold(denom)
    if p.reduction == "none":
        rows, _ = rows_and_stats(p.logits, p.t, p.weight, p.ignore_index, p.eps)
        total = rows.reshape(p.out_shape)
    elif not (_fuses_gradient(p.logits.dtype) and torch.is_grad_enabled() and p.logits.requires_grad):
        # float16 (the gradient from the rows' stats, grad_output in its factor), or no gradient wanted now
        rows, _ = rows_and_stats(p.logits, p.t, p.weight, p.ignore_index, p.eps)
        total = rows.sum() if divisor is None else rows.sum() / divisor
    else:
        grad_scale = p.grad_scale(inv_denom)
        if p.reduction == "mean" and denom is None:
            # A mean of probabilities: the op's loss must be the mean its gradient (scaled by 1 / positions) is of;
            # divided by finish() instead, autograd would apply 1 / positions a second time.
            denom = divisor = torch.full((), float(p.prob_count), dtype=p.acc, device=p.logits.device)
            loss_dtype = p.out_dtype
        total, _ = train_loss(p.logits, p.t, p.weight, p.ignore_index, p.eps, grad_scale, divisor, loss_dtype)
    return p.finish(total, denom).to(p.out_dtype)
