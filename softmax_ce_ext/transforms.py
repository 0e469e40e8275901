"""torch.func transforms (grad, vmap, jvp, jacrev, hessian, functional_call) and forward-mode AD.

The fused kernels are custom ops with no batching or forward-mode rules, and the autograd.Function writes its
gradient in the forward (state that functorch's ctx-free forward cannot hold).  Under a transform the loss is
PyTorch's own cross_entropy, which has every rule, computed in our accumulation dtype (float32, float64 for
float64) and rounded once to the loss's dtype, as the kernels do: the same numbers within float32 rounding,
at PyTorch's speed.  Outside transforms nothing here runs but `active`, two attribute reads.
"""

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from ._ops import acc_dtype


def active(input, target, weight) -> bool:
    """Whether a torch.func transform is running, or a forward-mode dual tensor came in."""
    if torch._C._are_functorch_transforms_active():
        return True
    if forward_ad._current_level < 0:  # no dual_level() open: no tangents anywhere
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in (input, target, weight))


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, out_dtype):
    """PyTorch's cross_entropy on the logits (and probabilities, weight) in the accumulation dtype; the loss in
    `out_dtype` (what the kernels' path returns: see function._Prepared).  The gradient flows back through the
    casts in each input's own dtype.  inplace_backward does not apply: transformed tensors are not written."""
    acc = acc_dtype(input.dtype)
    prob = input.shape == target.shape and target.is_floating_point()
    loss = F.cross_entropy(
        input.to(acc),
        target.to(acc) if prob else target,
        None if weight is None else weight.to(acc),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return loss.to(out_dtype)
