"""The autograd.Function: checks and views in Python, one fused kernel pass per row in C++/CUDA.

Training (mean/sum): the forward writes the gradient of the loss in the same pass that computes it; the
backward only multiplies it by grad_output, in place, and skips even that when grad_output == 1 (checked
on the device, so the host never waits).  reduction='none': the forward writes no gradient; the backward
recomputes it from the logits and the saved log-sum-exp (one read + one write instead of two of each).
"""

import math

import torch

from ._ops import acc_dtype, ops

_REDUCTIONS = ("none", "mean", "sum")


class _Prepared:
    """Validated arguments, with the logits viewed as (B, C, S) and the target as (B, S) int64."""

    __slots__ = ("x3", "t2", "weight", "ignore_index", "reduction", "eps", "acc")

    def __init__(self, input, target, weight, ignore_index, reduction, label_smoothing):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{reduction} is not a valid value for reduction")
        if not input.is_floating_point():
            raise RuntimeError(f"cross_entropy: expected floating-point input, got {input.dtype}")
        if target.dtype not in (torch.int64, torch.uint8):
            raise RuntimeError(
                f"cross_entropy: expected target of scalar type Long (class indices) or Byte, got {target.dtype}"
            )
        if label_smoothing > 1.0:
            raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
        if input.dim() == 0:
            raise RuntimeError("cross_entropy: expected input of shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
        if input.dim() == 1:
            if target.dim() != 0:
                raise RuntimeError(
                    f"cross_entropy: an unbatched input of shape {tuple(input.shape)} expects a 0-d target, "
                    f"got shape {tuple(target.shape)}"
                )
            batch, classes, spatial = 1, input.shape[0], 1
        else:
            batch, classes = input.shape[0], input.shape[1]
            spatial = math.prod(input.shape[2:])
            if target.dim() != input.dim() - 1:
                raise RuntimeError(
                    f"cross_entropy: input of shape {tuple(input.shape)} expects a target of shape "
                    f"{(batch, *input.shape[2:])}, got {tuple(target.shape)}"
                )
            if target.shape[0] != batch:
                raise ValueError(
                    f"Expected input batch_size ({batch}) to match target batch_size ({target.shape[0]})."
                )
            if target.shape[1:] != input.shape[2:]:
                raise RuntimeError(
                    f"cross_entropy: expected target spatial size {tuple(input.shape[2:])}, "
                    f"got {tuple(target.shape[1:])}"
                )
        if target.device != input.device:
            raise RuntimeError(f"cross_entropy: target is on {target.device} but input is on {input.device}")
        self.acc = acc_dtype(input.dtype)
        if weight is not None:
            if weight.dim() != 1 or weight.numel() != classes:
                raise RuntimeError(
                    "weight tensor should be defined either for all "
                    f"{classes} classes or no classes but got weight tensor of shape: {list(weight.shape)}"
                )
            if weight.device != input.device:
                raise RuntimeError(f"cross_entropy: weight is on {weight.device} but input is on {input.device}")
            weight = weight.detach().to(self.acc).contiguous()
        self.x3 = input.reshape(batch, classes, spatial)
        self.t2 = target.reshape(batch, spatial).long()
        self.weight = weight
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.eps = max(float(label_smoothing), 0.0)  # PyTorch treats a negative smoothing as none

    def total_weight(self):
        """The mean's denominator: the summed weight of the non-ignored targets (their count if unweighted)."""
        valid = self.t2 != self.ignore_index
        if self.weight is None:
            return valid.sum(dtype=self.acc)
        safe = torch.where(valid, self.t2, 0).clamp_(0, self.weight.numel() - 1)  # never index out of range
        return torch.where(valid, self.weight[safe], 0).sum()


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """apply(input, target, weight=None, ignore_index=-100, reduction='mean', label_smoothing=0.0)."""

    @classmethod
    def apply(cls, input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        # forward runs with grad mode off, so whether a gradient will be wanted is read here.
        grad_wanted = torch.is_grad_enabled() and input.requires_grad
        return super().apply(input, target, weight, ignore_index, reduction, label_smoothing, grad_wanted)

    @staticmethod
    def forward(ctx, input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                grad_wanted=None):
        p = _Prepared(input, target, weight, ignore_index, reduction, label_smoothing)
        # torch.compile calls forward without going through apply above: then needs_input_grad decides.
        want_grad = ctx.needs_input_grad[0] and grad_wanted is not False
        grad = None
        denom = p.total_weight() if reduction == "mean" else None
        if want_grad and reduction != "none":
            grad_scale = denom.reciprocal() if denom is not None else torch.ones((), dtype=p.acc, device=input.device)
            rows, lse, grad = ops.forward_backward(p.x3, p.t2, p.weight, p.ignore_index, p.eps, grad_scale)
        else:
            rows, lse = ops.forward(p.x3, p.t2, p.weight, p.ignore_index, p.eps)

        if reduction == "none":
            out = rows.reshape(target.shape)
        elif reduction == "sum":
            out = rows.sum()
        else:
            out = rows.sum() / denom
        out = out.to(input.dtype)

        if want_grad:
            ctx.save_for_backward(input, p.t2, p.weight, lse, denom)
            ctx.grad_buf = grad  # consumed (scaled in place) by the first backward
            ctx.reduction, ctx.ignore_index, ctx.eps = reduction, p.ignore_index, p.eps
            ctx.x3_shape = tuple(p.x3.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, t2, weight, lse, denom = ctx.saved_tensors
        acc = acc_dtype(input.dtype)
        x3 = input.reshape(ctx.x3_shape)
        g = grad_out.to(acc)
        if ctx.reduction == "none":
            factor = g.reshape(t2.shape)
        else:
            factor = (g / denom if ctx.reduction == "mean" else g).expand(t2.shape)

        if torch.is_grad_enabled():  # create_graph=True: a composite that autograd can differentiate again
            grad = _composite_grad(x3, t2, weight, factor, ctx.ignore_index, ctx.eps).to(input.dtype)
        elif ctx.grad_buf is not None:
            grad, ctx.grad_buf = ctx.grad_buf, None
            ops.scale_grad_(grad, g.reshape(()))
        else:  # reduction='none', or a second backward (retain_graph=True) after the buffer was used
            grad = ops.backward(factor, x3, t2, weight, lse, ctx.ignore_index, ctx.eps)
        return grad.reshape(input.shape), None, None, None, None, None, None


def _composite_grad(x3, t2, weight, factor, ignore_index, eps):
    """The gradient as plain torch ops (for double backward); same algebra as RowGrad in csrc/softmax_ce.h."""
    x = x3.to(factor.dtype)
    classes = x.shape[1]
    valid = t2 != ignore_index
    tc = torch.where(valid, t2, 0)
    p = torch.exp(x - torch.logsumexp(x, dim=1, keepdim=True))
    onehot = torch.nn.functional.one_hot(tc, classes).movedim(-1, 1).to(x.dtype)
    if weight is None:
        w_c, w_t, w_sum = 1.0, torch.ones_like(factor), float(classes)
    else:
        w_c, w_t, w_sum = weight.view(1, classes, 1), weight[tc], weight.sum()
    t_sub = factor * (1.0 - eps) * w_t
    c_mul = factor * (eps / classes)
    p_mul = t_sub + c_mul * w_sum
    grad = p * p_mul.unsqueeze(1) - w_c * c_mul.unsqueeze(1) - onehot * t_sub.unsqueeze(1)
    return grad * valid.unsqueeze(1)
