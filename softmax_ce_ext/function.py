"""The autograd.Function: checks and views in Python, one fused kernel pass per row in C++/CUDA.

Training (mean/sum): the forward writes the gradient of the loss in the same pass that computes it, times a
guess of grad_output (_predict.py; 1 until a backward has seen a factor twice); the backward only multiplies it
by grad_output / guess, in place, and skips even that when they are equal (checked on the device, so the host
never waits).  reduction='none': the forward writes no gradient; the backward
recomputes it from the logits and the rows' saved max and sum (one read + one write instead of two of each).
float16 logits take the second way for mean/sum too (see _fuses_gradient).

inplace_backward=True (opt-in): the gradient is written over the logits instead of a new buffer (in the
forward for mean/sum, in the backward for 'none' and float16), so the logits are destroyed; they must not be a
leaf.
"""

import math

import torch

from . import _predict, _status, transforms
from ._ops import acc_dtype, ops

_REDUCTIONS = ("none", "mean", "sum")
_HALF = (torch.float16, torch.bfloat16)


def _shape(t):
    return list(t.shape)


class _Prepared:
    """Validated arguments: logits as the kernels take them, (B, C) as given or viewed as (B, C, S); targets as
    (B,) or (B, S) int64, or probabilities of the logits' shape.
    Errors carry PyTorch's exception classes, and say what was expected and what came."""

    def __init__(self, input, target, weight, ignore_index, reduction, label_smoothing, weight_grad=False):
        """weight_grad: a gradient of the weight is wanted (refused with class indices, as PyTorch refuses it)."""
        # Every call runs this: each attribute is read once into a local (host time of small calls, v0.20-dev).
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{reduction} is not a valid value for reduction")
        dtype = input.dtype
        if not dtype.is_floating_point:
            raise NotImplementedError(f"cross_entropy: expected floating-point logits, got {dtype}")
        if label_smoothing > 1.0:
            raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
        self.device = device = input.device  # one device object per call (each .device read makes one)
        if target.device != device:
            raise RuntimeError(f"cross_entropy: target is on {target.device} but input is on {device}")
        shape = input.shape
        self.prob = prob = shape == target.shape  # PyTorch's rule for class-probability targets
        if prob and not target.dtype.is_floating_point:
            raise RuntimeError("Expected floating point type for target with class probabilities, got "
                               f"{_scalar_type_name(target.dtype)}")
        dim = len(shape)
        if dim == 0:
            raise IndexError(  # PyTorch's class (its message: "Dimension out of range")
                "cross_entropy: expected input of shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
        # out_shape: 'none' keeps the target's layout, (N, d1..dk); an unbatched input gives a 0-d loss.
        if dim == 2:
            batch, classes, spatial = shape[0], shape[1], 1
            self.out_shape = (batch,)
        elif dim == 1:
            batch, classes, spatial = 1, shape[0], 1
            self.out_shape = ()
        else:
            batch, classes, spatial = shape[0], shape[1], math.prod(shape[2:])
            self.out_shape = (batch, *shape[2:])
        self.acc = acc_dtype(dtype)
        if prob:
            if ignore_index >= 0:
                raise RuntimeError("ignore_index is not supported for floating point target")
        else:
            _check_class_indices(dim, shape, target, batch, weight_grad)
            if classes == 0 and target.numel():
                _raise_no_classes(input, target, ignore_index)
        if weight is not None:
            if weight.dim() != 1 or weight.numel() != classes:
                raise RuntimeError(  # PyTorch's words (nll_loss's; its K-dim ones leave out the sizes)
                    f"{'cross_entropy: ' if prob else ''}weight tensor should be defined either for all "
                    f"{classes} classes or no classes but got weight tensor of shape: {_shape(weight)}"
                )
            if not weight.is_floating_point() and not prob:  # probabilities: PyTorch promotes an integer one
                raise RuntimeError(f"cross_entropy: expected a floating-point weight, got {weight.dtype}")
            if weight.device != device:
                raise RuntimeError(f"cross_entropy: weight is on {weight.device} but input is on {device}")
        self.x3_shape = (batch, classes, spatial)
        # (B, C) logits go to the kernels as they are: no view to make (host time).
        self.logits, self.t, self.weight = kernel_views(input, target, weight, self.x3_shape, prob, rows=dim == 2)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.eps = max(float(label_smoothing), 0.0)  # PyTorch treats a negative smoothing as none
        self.positions = batch * spatial
        # What PyTorch divides a mean of probabilities by (numel / C): no classes give 0, so the mean is NaN.
        self.prob_count = self.positions if classes else 0
        self.out_dtype = loss_dtype(input, target, prob, weight, device)
        # PyTorch's CUDA kernel for one (C,) row gives a mean of 0 where its target is ignored (its CPU one 0/0 = NaN)
        self.ignored_mean_is_0 = dim == 1 and not prob and self.eps == 0 and device.type == "cuda"

    def mean_denominator(self):
        """reduction='mean' with class indices: (denominator, 1 / denominator) as 0-d device tensors in the
        accumulation dtype, the denominator being the summed weight of the non-ignored targets (their count if
        unweighted).  Otherwise (None, None): probabilities (PyTorch divides by the number of positions), or
        no mean."""
        if self.reduction != "mean" or self.prob:
            return None, None
        # One read of the targets, no mask or gathered weights in memory (K-dim: they were ~0.1-0.4x the logits),
        # and two launches (the H200 profile of 65536x1000: each small launch costs a few % of such a call).
        return ops.mean_scale(self.t, self.weight, self.ignore_index, self.acc)

    def loss_fold(self, denom):
        """(divisor, dtype) for the sum kernels, which divide by the mean's denominator and cast to the loss's
        dtype in their own launch; (None, None) where finish() does it (probability targets, 'none')."""
        if self.reduction == "sum" or denom is not None:
            return denom, self.out_dtype
        return None, None

    def grad_scale(self, inv_denom):
        """The training pass's gradient factor: 1 / denominator for a mean, 1 for a sum (0-d, acc dtype)."""
        if inv_denom is not None:
            return inv_denom
        scale = 1.0 / max(self.positions, 1) if self.reduction == "mean" else 1.0
        return torch.full((), scale, dtype=self.acc, device=self.logits.device)

    def finish(self, total, denom):
        """The loss from the summed (or per-row) losses: the mean's division where no kernel did it (no
        denominator: see loss_fold), PyTorch's NaN where its two-term mean is 0/0, and its CUDA 0 for one
        ignored (C,) row."""
        if self.reduction == "mean":
            if denom is None:  # probability targets: PyTorch divides by the number of positions
                total = total / self.prob_count
            if denom is not None and self.weight is not None and self.eps > 0:
                # PyTorch divides the NLL and the smoothing term separately: with the targets' weights summing to
                # 0, its NLL mean is 0/0 = NaN, and so is the loss (ours would be the smoothing term / 0 = inf).
                total = torch.where(denom == 0, torch.full_like(total, float("nan")), total)
            if self.ignored_mean_is_0:  # not denom == 0: a target of weight 0 gives NaN there too
                total = torch.where(self.t.reshape(()) == self.ignore_index, torch.zeros_like(total), total)
        return total


def _check_class_indices(dim, shape, target, batch, weight_grad):
    """PyTorch's checks in PyTorch's order (torch 2.14: the batch first, then a weight that requires grad; then by
    input rank, as nll_loss, nll_loss2d and nll_loss_nd make them), so that each bad input gets PyTorch's message.
    dim and shape are the input's."""
    target_dim = target.dim()
    target_batch = target.shape[0] if target_dim else 0  # PyTorch reads a 0-d target's batch as 0
    if dim >= 2 and target_batch != batch:
        raise ValueError(f"Expected input batch_size ({batch}) to match target batch_size ({target_batch}).")
    if weight_grad:  # PyTorch's nll_loss (nll_loss2d from 3-D inputs on) is not differentiable in the weight
        raise RuntimeError(f"The function '{'nll_loss_forward' if dim <= 2 else 'nll_loss2d_forward'}' is not "
                           "differentiable with respect to argument 'weight'. This input cannot have requires_grad "
                           "True.")
    if dim <= 2:
        if target_dim > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if dim == 2 and target_dim == 0:  # with a batch of 0 (else the batch check raised): PyTorch's size(0)
            raise IndexError("Dimension specified as 0 but tensor has no dimensions")
        _check_index_dtype(target)
        if dim == 1 and target.numel() != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.numel()}")
    elif dim == 4:
        if target_dim != 3:
            raise RuntimeError(
                f"only batches of spatial targets supported (3D tensors) but got targets of dimension: {target_dim}")
        _check_index_dtype(target)
        if target.shape[1:] != shape[2:]:
            raise RuntimeError(f"size mismatch (got input: {list(shape)} , target: {_shape(target)}")
    else:
        expected = [batch, *shape[2:]]
        if _shape(target) != expected:
            raise RuntimeError(f"Expected target size {expected}, got {_shape(target)}")
        _check_index_dtype(target)


def _check_index_dtype(target):
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_scalar_type_name(target.dtype)}")


# c10's ScalarType names, which PyTorch's messages use, where they differ from the dtype's (torch.int32: "Int").
_SCALAR_TYPE_NAMES = {torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
                      torch.uint8: "Byte", torch.float16: "Half", torch.float32: "Float", torch.float64: "Double",
                      torch.bfloat16: "BFloat16", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _scalar_type_name(dtype):
    return _SCALAR_TYPE_NAMES.get(dtype) or str(dtype)[6:].capitalize()


def loss_dtype(input, target, prob, weight=None, device=None):
    """The loss's dtype: the logits' (promoted with probability targets' and the weight's, as PyTorch's product of
    the three is), float32 for half logits under autocast (autocast runs cross_entropy in float32; ours
    accumulates in it anyway)."""
    out = torch.promote_types(input.dtype, target.dtype) if prob else input.dtype
    if prob and weight is not None:
        out = torch.promote_types(out, weight.dtype)
    if out in _HALF and torch.is_autocast_enabled((device or input.device).type):
        out = torch.float32
    return out


def transformed_loss(input, target, weight, ignore_index, reduction, label_smoothing):
    """The loss under torch.func transforms and forward-mode AD (transforms.py), in the dtype ours returns."""
    out = loss_dtype(input, target, input.shape == target.shape, weight)
    return transforms.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, out)


def _fuses_gradient(dtype):
    """Whether the training pass writes the gradient in the forward, before grad_output is known.  Not in float16:
    the gradient of a mean is (p - y) / N, whose small entries float16 cannot hold (below 2^-24 they are 0, below
    2^-14 they lose bits), and loss scaling (GradScaler's grad_output of 2^k), which exists to keep them, would then
    scale zeros: 48% of the entries of a 4096 x 1000 mean came out 0 at grad_output 1024 where PyTorch's were not.
    So the forward keeps the rows' stats and the backward writes grad_output / N * (p - y), rounded once, as PyTorch
    does: three passes over the logits where the fused two, and where loss scaling made the fused way four."""
    return dtype != torch.float16


def _defers_pay(device, classes):
    """Whether the gradient from the saved stats (3 passes) beats written-then-scaled (4) for a factor that keeps
    changing.  CUDA: the passes are memory-bound.  The CPU recomputes the exponentials there, which the scaling does
    not: measured (2 threads, 2026-11-28) it lost at 256-1536 classes (1.20 against 1.18x of an unscaled step in
    float32 at 256, 1.40 against 1.17x at 1000), broke even at 2048 and won from 4096 (1.18 against 1.31x)."""
    return device.type == "cuda" or classes >= 2048


def _rows_total(p, status, denom=None):
    """(the rows' losses, or their sum, over the mean's denominator where one is given; their stats for backward)."""
    divisor, loss_dtype = p.loss_fold(denom)
    rows, stats = ops.forward_rows(p.logits, p.t, p.weight, p.ignore_index, p.eps, status)
    return rows.reshape(p.out_shape) if p.reduction == "none" else ops.sum_rows(rows, divisor, loss_dtype), stats


def _loss_only(p, status):
    """(total, denom) for p.finish where no gradient is wanted: one op, and no per-row outputs but for 'none'."""
    if p.reduction == "mean" and not p.prob:
        return ops.mean_forward(p.logits, p.t, p.weight, p.ignore_index, p.eps, status, p.out_dtype)
    # 'none'; and traced, where torch 2.14's Inductor fails on forward_sum ("getitem is not an OpOverload": one
    # output, and its one mutable argument, the status, None there): the rows (and their sum).
    if p.reduction == "none" or torch.compiler.is_compiling():
        return _rows_total(p, status)[0], None
    divisor, loss_dtype = p.loss_fold(None)  # sum; or a mean of probabilities, which finish() divides
    return ops.forward_sum(p.logits, p.t, p.weight, p.ignore_index, p.eps, status, divisor, loss_dtype), None


def loss_without_grad(p):
    """The loss of a _Prepared `p` outside autograd (nothing requires a gradient): no Function, nothing saved."""
    device = p.device
    total, denom = _loss_only(p, _status.buffer_for(device))
    _status.launched(device)
    total = p.finish(total, denom)
    return total if total.dtype == p.out_dtype else total.to(p.out_dtype)


def kernel_views(input, target, weight, x3_shape, prob, detach=True, rows=False):
    """What the kernels take: logits (B, C, S); targets (B, S) int64 or (B, C, S) in the logits' or the
    accumulation dtype; weight contiguous in the accumulation dtype.  Views where possible, never of the logits
    a copy.  rows: (B, C) logits and their (B,) or (B, C) targets as they are (the kernels read them as the
    (B, C, 1) view; no view to make per call).  Rebuilt in backward from the saved inputs (torch.compile cannot
    save views of inputs) as (B, C, S), which the composites there index; detach=False there under
    create_graph, for the composites to differentiate through the targets and the weight."""
    batch, classes, spatial = x3_shape
    if prob:
        acc = acc_dtype(input.dtype)
        if target.dtype not in (input.dtype, acc):
            target = target.to(acc)  # the kernels read either dtype; never round a finer target
        if detach:
            target = target.detach()
        if not rows:
            target = target.reshape(batch, classes, spatial)
    else:
        if not rows:
            target = target.reshape(batch, spatial)
        if target.dtype != torch.int64:
            target = target.long()  # uint8 class indices
    if weight is not None:
        weight = (weight.detach() if detach else weight).to(acc_dtype(input.dtype)).contiguous()
    return (input if rows else input.reshape(x3_shape)), target, weight


def _raise_no_classes(input, target, ignore_index):
    """C == 0 with targets: PyTorch's errors (a host read of the targets is fine on this degenerate path)."""
    if input.dim() > 2:
        raise RuntimeError(f"size mismatch (got input: {_shape(input)} , target: {_shape(target)}")
    live = target.reshape(-1)[target.reshape(-1) != ignore_index]
    if live.numel():
        raise IndexError(f"Target {int(live[0])} is out of bounds.")


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """apply(input, target, weight=None, ignore_index=-100, reduction='mean', label_smoothing=0.0,
    inplace_backward=False)."""

    @classmethod
    def apply(cls, input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              inplace_backward=False):
        if transforms.active(input, target, weight):  # torch.func / forward-mode AD: see transforms.py
            return transformed_loss(input, target, weight, ignore_index, reduction, label_smoothing)
        # forward runs with grad mode off, so whether a gradient can be wanted is read here.
        return super().apply(input, target, weight, ignore_index, reduction, label_smoothing, bool(inplace_backward),
                             torch.is_grad_enabled())

    @staticmethod
    def forward(ctx, input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                inplace_backward=False, grad_wanted=None):
        if transforms.active(input, target, weight):
            # Only torch.compile gets here under a transform (apply routes first): its trace of this forward and
            # backward gave a wrong gradient (fullgraph), so refuse it.
            raise RuntimeError(
                "SoftmaxCrossEntropyFunction inside torch.compile under a torch.func transform (grad, vmap...): "
                "expected a call through softmax_ce_ext.cross_entropy or CrossEntropyLoss, which handle "
                "transforms; got the Function itself"
            )
        # torch.compile calls forward without going through apply above: then needs_input_grad decides.
        needs = ctx.needs_input_grad if grad_wanted is not False else (False, False, False)
        want_weight_grad = weight is not None and needs[2]
        # With class indices _Prepared refuses it, in PyTorch's order.
        p = _Prepared(input, target, weight, ignore_index, reduction, label_smoothing, weight_grad=want_weight_grad)
        want_input_grad = needs[0]
        want_target_grad = p.prob and needs[1]
        # The gradients of probability targets and of the weight come from composites of the saved logits.
        want_composite = want_target_grad or want_weight_grad
        if (want_input_grad or want_composite) and torch.compiler.is_exporting():
            _refuse_export(want_composite)
        inplace = bool(inplace_backward) and want_input_grad  # without a gradient the logits are left alone
        if inplace:
            p.logits = _inplace_view(input, p.logits, p.x3_shape, want_composite)
        device = p.device
        status = _status.buffer_for(device)
        grad = None
        fused = want_input_grad and reduction != "none" and _fuses_gradient(input.dtype)
        # The gradient written times the guess of grad_output (_predict.py), and the guess as read; None: 1.  A
        # factor that changes at every backward: the gradient in the backward instead, which records grad_output.
        predictor = grad_mul = guess = state = None
        if fused and (reduction == "sum" or not p.prob):
            state = _predict.state_for(device, p.acc)
            if state is not None and state.varying() and _defers_pay(device, p.x3_shape[1]):
                fused = False
            elif state is not None:
                predictor, guess = state.predictor, state.guess
        if fused and reduction == "mean" and not p.prob:
            # One op: the mean's denominator, the loss and its gradient (CUDA may count the denominator in-kernel).
            stats = None
            if inplace:  # the input now holds the gradient, and is saved as such below
                total, denom, grad_mul = ops.mean_forward_backward_(p.logits, p.t, p.weight, p.ignore_index, p.eps,
                                                                    status, p.out_dtype, guess)
                torch.autograd.graph.increment_version(input)
            else:
                total, grad, denom, grad_mul = ops.mean_forward_backward(p.logits, p.t, p.weight, p.ignore_index,
                                                                         p.eps, status, p.out_dtype, guess)
        elif fused:  # sum, or a mean of probabilities
            denom, inv_denom = p.mean_denominator()
            divisor, loss_dtype = p.loss_fold(denom)
            # a sum: the guess's value now (one copy, where the factor 1 took one fill)
            grad_scale = grad_mul = guess.clone() if predictor is not None else p.grad_scale(inv_denom)
            # The summed loss only: no per-row loss or stats buffers (a second backward runs this pass again).
            stats = None
            if inplace:
                total = ops.forward_backward_(p.logits, p.t, p.weight, p.ignore_index, p.eps, grad_scale, status,
                                              divisor, loss_dtype)
                torch.autograd.graph.increment_version(input)
            else:
                total, grad = ops.forward_backward(p.logits, p.t, p.weight, p.ignore_index, p.eps, grad_scale,
                                                   status, divisor, loss_dtype)
            ctx.grad_scale = grad_scale
        elif want_input_grad or want_composite:
            # reduction='none', probabilities, float16 mean/sum (see _fuses_gradient), a factor that keeps changing:
            # the rows' max and sum kept
            denom, _ = p.mean_denominator()  # float16's mean over class indices; else None
            total, stats = _rows_total(p, status, denom)
        else:
            stats = None
            total, denom = _loss_only(p, status)
        _status.launched(device)

        total = p.finish(total, denom)
        # Traced, the output must not alias an intermediate (a no-op .to, the 'none' rows' view): torch 2.11's
        # Dynamo then added the intermediate as a second output of the same tensor and routed the gradient to
        # it (pytorch#180642): the loss was right, the gradient zeros (H100, 2026-11-27).  One small copy.
        compiling = torch.compiler.is_compiling()
        out = total if total.dtype == p.out_dtype and not compiling else total.to(p.out_dtype, copy=compiling)

        if want_input_grad or want_composite:
            ctx.save_for_backward(input, target, weight, stats, denom)
            # consumed (scaled in place) by the first backward; in the input's shape already for (B, C) logits,
            # else viewed so here, where a view costs less host time than in the backward (~0.8 against ~2.3 us)
            ctx.grad_buf = grad if grad is None or grad.dim() == input.dim() else grad.view(input.shape)
            ctx.fused = fused  # the forward wrote the gradient
            ctx.grad_mul = grad_mul if predictor is not None else None  # what it multiplied it by (None: 1)
            ctx.predictor = None if state is None else state.predictor  # the guess's state, and its host mirror
            ctx.changes = None if state is None else state.changes
            ctx.record = state is not None and not fused  # the deferred gradient records grad_output itself
            ctx.grad_in_input = inplace and fused  # the saved input is the gradient, once
            ctx.reduction, ctx.ignore_index, ctx.eps, ctx.prob = reduction, p.ignore_index, p.eps, p.prob
            ctx.x3_shape, ctx.positions, ctx.inplace = p.x3_shape, p.positions, inplace
            ctx.weight_dtype = None if weight is None else weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # probabilities' and the weight's gradients: composites of the saved logits (class indices refuse the weight's)
        prob_grads = ctx.prob and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        grad = ctx.grad_buf  # set by the fused forward (not in place), until the first backward takes it
        if grad is not None and not prob_grads and not torch.is_grad_enabled():
            # The training path: the forward's gradient times grad_out, in place (skipped when it is 1).  Nothing
            # saved is unpacked: the gradient was written from the logits as they were (PyTorch's log_softmax
            # saves its output, so it too lets the logits change after the forward).
            ctx.grad_buf = None
            _status.poll(grad.device)
            # times grad_out / the guess, skipped where they are equal; grad_out (the 0-d loss's gradient, read in its
            # own dtype: no cast, no view) recorded for the next guess
            ops.scale_grad_(grad, grad_out, ctx.grad_mul, ctx.predictor, ctx.changes)
            return grad, None, None, None, None, None, None, None
        input, target, weight, stats, denom = ctx.saved_tensors
        _status.poll(input.device)
        if ctx.inplace:
            _check_inplace_backward(ctx)
        fused = ctx.needs_input_grad[0] and not torch.is_grad_enabled()
        fused = fused and (ctx.grad_buf is not None or ctx.grad_in_input)
        grad_input = grad_target = None
        if fused:  # the training path: the forward's gradient, times grad_out in place (skipped when it is 1)
            if ctx.grad_in_input:
                grad, ctx.grad_in_input = input, False
            else:
                grad, ctx.grad_buf = ctx.grad_buf, None
            ops.scale_grad_(grad, grad_out, ctx.grad_mul, ctx.predictor, ctx.changes)
            grad_input = grad  # the input's shape: viewed so in the forward, or the input itself
            if not prob_grads:
                return grad_input, None, None, None, None, None, None, None
        graph = torch.is_grad_enabled()  # create_graph=True: composites to differentiate again, targets attached
        # (B, C) logits as they are where only a kernel reads them; the composites index (B, C, S)
        rows = input.dim() == 2 and not (graph or prob_grads or ctx.inplace)
        x3, t, weight = kernel_views(input, target, weight, ctx.x3_shape, ctx.prob, detach=not graph, rows=rows)
        rows_shape = (ctx.x3_shape[0], ctx.x3_shape[2])
        g = grad_out.to(acc_dtype(input.dtype))
        if ctx.reduction == "none":
            factor = g.reshape(rows_shape)
        elif ctx.reduction == "mean":
            factor = (g / denom if denom is not None else g / ctx.positions).expand(rows_shape)
        else:
            factor = g.expand(rows_shape)
        if ctx.needs_input_grad[0] and not fused:
            if torch.is_grad_enabled():  # create_graph=True: a composite that autograd can differentiate again
                grad = _composite_grad(x3, t, weight, factor, ctx.ignore_index, ctx.eps, ctx.prob).to(input.dtype)
            elif ctx.fused:  # a second backward (retain_graph=True): the forward's fused pass again, the same bits
                if ctx.reduction == "mean" and not ctx.prob:
                    _, grad, _, _ = ops.mean_forward_backward(x3, t, weight, ctx.ignore_index, ctx.eps, None, None,
                                                              ctx.grad_mul)
                else:
                    _, grad = ops.forward_backward(x3, t, weight, ctx.ignore_index, ctx.eps, ctx.grad_scale, None,
                                                   None, None)
                ops.scale_grad_(grad, grad_out, ctx.grad_mul)
            elif ctx.inplace:  # reduction='none', in place: the gradient overwrites the saved logits
                ops.backward_(factor, x3, t, weight, stats, ctx.ignore_index, ctx.eps)
                torch.autograd.graph.increment_version(input)  # a second backward now fails autograd's check
                grad = x3
            else:  # reduction='none'; probabilities; float16; a factor that keeps changing
                grad = ops.backward(factor, x3, t, weight, stats, ctx.ignore_index, ctx.eps)
            if ctx.record and not torch.is_grad_enabled():  # grad_output recorded: a scaling over no elements
                ops.scale_grad_(grad.new_empty(0), grad_out, None, ctx.predictor, ctx.changes)
            grad_input = grad if rows else grad.reshape(input.shape)
        grad_weight = None
        if prob_grads:
            # Both are -f * (their other factor) * log_softmax(x): one log_softmax for the two.
            x = x3.to(factor.dtype)
            f_logp = factor.unsqueeze(1) * torch.log_softmax(x, dim=1)  # PyTorch's: NaN across a row holding +inf
            if ctx.needs_input_grad[1]:  # d loss / d y_c = -f (1 - eps) w_c log p_c
                grad_target = -(1.0 - ctx.eps) * _class_weights(weight, x.shape[1], x) * f_logp
                grad_target = grad_target.to(target.dtype).reshape(input.shape)
            if ctx.needs_input_grad[2]:  # d loss / d w_c = -sum over rows of f ((1 - eps) y_c + eps / C) log p_c
                grad_weight = -(_prob_share(t.to(x.dtype), ctx.eps, x.shape[1]) * f_logp).sum(dim=(0, 2))
                grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_input, grad_target, grad_weight, None, None, None, None, None


def _refuse_export(want_composite):
    """torch.export inlines a Function's forward and drops its backward: the exported gradient would be missing."""
    got = ("probability targets or a class weight that require grad" if want_composite
           else "SoftmaxCrossEntropyFunction itself")
    raise RuntimeError(
        "cross_entropy under torch.export with a gradient: expected a call through softmax_ce_ext.cross_entropy or "
        f"CrossEntropyLoss wanting the logits' gradient only (exported as custom ops with autograd formulas); got {got}"
        ", whose gradient an exported program would silently lack"
    )


def _inplace_view(input, logits, x3_shape, want_composite):
    """The logits that inplace_backward=True writes the gradient into: the input itself where the kernels take it
    as it is (`logits`, (B, C)), else its (B, C, S) view; refuses what it would corrupt."""
    if input.is_leaf:
        raise RuntimeError(
            "cross_entropy: inplace_backward=True writes the gradient over the logits, so they must not be a leaf "
            "tensor that requires grad (its .grad would share their memory); got a leaf. Pass the output of the "
            "last layer, or use inplace_backward=False"
        )
    if want_composite:
        raise RuntimeError(
            "cross_entropy: inplace_backward=True destroys the logits, which the gradients of probability targets "
            "and of the class weight need; got targets or a weight that require grad"
        )
    if logits is input:
        return input
    try:
        return input.view(x3_shape)
    except RuntimeError:
        raise RuntimeError(
            f"cross_entropy: inplace_backward=True needs logits viewable as {tuple(x3_shape)} without a copy, got "
            f"shape {_shape(input)} with strides {input.stride()}"
        ) from None


def _check_inplace_backward(ctx):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "cross_entropy: inplace_backward=True destroys the logits, which a double backward (create_graph=True) "
            "needs; use inplace_backward=False"
        )
    if ctx.fused and not ctx.grad_in_input:
        raise RuntimeError(
            "cross_entropy: inplace_backward=True wrote the gradient over the logits and the first backward handed "
            "it out; a second backward (retain_graph=True) cannot recompute it"
        )


def _class_weights(weight, classes, like):
    return torch.ones((), dtype=like.dtype, device=like.device) if weight is None else weight.view(1, classes, 1)


def _composite_grad(x3, t, weight, factor, ignore_index, eps, prob):
    """The input gradient as plain torch ops (for double backward); the same algebra as RowGrad in
    csrc/softmax_ce.h: f * (p * p_mul - a_c * c_mul - [c == t] * t_sub)."""
    x = x3.to(factor.dtype)
    classes = x.shape[1]
    if classes == 0:
        return x * 0  # no classes: an empty gradient (one_hot and eps / C need a class)
    p = torch.softmax(x, dim=1)  # x - max first: PyTorch's accuracy at large logits, and its NaN for +inf
    w = _class_weights(weight, classes, x)
    f = factor.unsqueeze(1)
    if prob:
        a = w * _prob_share(t.to(x.dtype), eps, classes)
        return f * (p * a.sum(1, keepdim=True) - a)
    valid = t != ignore_index
    tc = torch.where(valid, t, 0)
    onehot = torch.nn.functional.one_hot(tc, classes).movedim(-1, 1).to(x.dtype)
    w_t = (onehot * w).sum(1, keepdim=True)
    w_sum = w.sum() if weight is not None else float(classes)
    t_sub = f * (1.0 - eps) * w_t
    c_mul = f * (eps / classes)
    grad = p * (t_sub + c_mul * w_sum) - w * c_mul - onehot * t_sub
    # Ignored rows are 0 even where their factor is not finite (a mean whose denominator is 0), as PyTorch's.
    return torch.where(valid.unsqueeze(1), grad, 0.0)


def _prob_share(y, eps, classes):
    """A probability target's smoothed share of each class, (1 - eps) y_c + eps / C (no classes: no eps term)."""
    return (1.0 - eps) * y + (eps / classes if classes else 0.0)
