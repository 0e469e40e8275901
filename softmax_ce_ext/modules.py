"""nn.Module form: a torch.nn.CrossEntropyLoss (same constructor, attributes, state_dict) run by our kernels."""

import torch

from .functional import cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss; isinstance checks and saved state_dicts carry over."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
