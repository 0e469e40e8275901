"""nn.Module form: a torch.nn.CrossEntropyLoss (same constructor, attributes, state_dict) run by our kernels."""

import torch

from .functional import cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss; isinstance checks and saved state_dicts carry over.

    inplace_backward=True (keyword-only, opt-in): the gradient is written over the logits; see cross_entropy."""

    def __init__(self, *args, inplace_backward: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.inplace_backward = inplace_backward

    def extra_repr(self) -> str:
        return "inplace_backward=True" if self.inplace_backward else ""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            inplace_backward=self.inplace_backward,
        )
