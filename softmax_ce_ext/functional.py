"""Functional form: same signature and semantics as torch.nn.functional.cross_entropy."""

from typing import Optional

import torch
from torch.nn import _reduction as _Reduction

from . import traced, transforms
from .function import SoftmaxCrossEntropyFunction, _Prepared, loss_without_grad, transformed_loss


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Drop-in for torch.nn.functional.cross_entropy (class indices or probabilities), one fused kernel pass.

    inplace_backward=True (opt-in, not in PyTorch) writes the gradient over `input` instead of a new buffer:
    the logits are destroyed by the call (mean/sum) or by the backward ('none').  `input` must not be a leaf."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    if transforms.active(input, target, weight):  # torch.func / forward-mode AD: see transforms.py
        # Not through the Function's apply: Dynamo traces a Function's forward/backward, not its apply.
        return transformed_loss(input, target, weight, ignore_index, reduction, label_smoothing)
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and _requires_grad(input, target, weight)):
        # Nothing to differentiate (eval, no_grad): the loss alone, without an autograd.Function around it.
        return loss_without_grad(_Prepared(input, target, weight, ignore_index, reduction, label_smoothing))
    if traced.wanted(input, target, weight):  # exported; SOFTMAX_CE_COMPILE_PATH=custom_op (never in place)
        return traced.cross_entropy(_Prepared(input, target, weight, ignore_index, reduction, label_smoothing))
    return SoftmaxCrossEntropyFunction.apply(
        input, target, weight, ignore_index, reduction, label_smoothing, inplace_backward
    )


def _requires_grad(input, target, weight):
    return input.requires_grad or target.requires_grad or (weight is not None and weight.requires_grad)
