"""Functional form: same signature and semantics as torch.nn.functional.cross_entropy."""

from typing import Optional

import torch
from torch.nn import _reduction as _Reduction

from .function import SoftmaxCrossEntropyFunction


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Drop-in for torch.nn.functional.cross_entropy (class indices or probabilities), one fused kernel pass."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    return SoftmaxCrossEntropyFunction.apply(input, target, weight, ignore_index, reduction, label_smoothing)
