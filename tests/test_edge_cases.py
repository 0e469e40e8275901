"""Edge cases: the same values as PyTorch, NaN/inf exactly where PyTorch gives them; better where PyTorch's
half-precision intermediates overflow."""

import math

import pytest
import torch
import torch.nn.functional as F

from softmax_ce_ext import CrossEntropyLoss, cross_entropy

from helpers import assert_close, ours, reference

INF, NAN = math.inf, math.nan


def both(x, target, grad=True, **kw):
    """(ours, PyTorch's) loss and input gradient on the same input."""
    out = []
    for fn in (cross_entropy, F.cross_entropy):
        xi = x.detach().clone().requires_grad_(grad)
        loss = fn(xi, target, **kw)
        g = None
        if grad:
            (g,) = torch.autograd.grad(loss.sum(), xi)
        out.append((loss, g))
    with torch.no_grad():  # the loss alone takes its own path (no autograd.Function, one op for a mean)
        same(cross_entropy(x.detach(), target, **kw), out[0][0].detach())
    return out


def same(a, b):
    torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction,expected", [("mean", NAN), ("sum", 0.0)])
def test_empty_batch(device, reduction, expected):
    x = torch.randn(0, 5, device=device)
    t = torch.zeros(0, dtype=torch.long, device=device)
    (ours, g), (theirs, _) = both(x, t, reduction=reduction)
    same(ours, theirs)
    same(ours, torch.tensor(expected, device=device))
    assert g.shape == (0, 5)


def test_empty_batch_none(device):
    x, t = torch.randn(0, 5, 3, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)
    (ours, _), (theirs, _) = both(x, t, reduction="none")
    assert ours.shape == theirs.shape == (0, 3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_every_target_ignored(device, kernel_path, reduction, smoothing):
    x, t = torch.randn(4, 6, device=device), torch.full((4,), -100, device=device)
    (ours, g), (theirs, gt) = both(x, t, reduction=reduction, label_smoothing=smoothing)
    same(ours, theirs)
    assert torch.equal(g, torch.zeros_like(g))
    same(g, gt)


@pytest.mark.parametrize("weights", [[0.0] * 5, [1.0, -2.0, 0.5, -1.0, 3.0]], ids=["all-zero", "negative"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_unusual_weights(device, kernel_path, weights, reduction, smoothing):
    # float64: mixed-sign weights make the weighted sums cancel, which float32 would blur for both sides.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device)
    t = torch.tensor([0, 1, 2, 3, 4, 1], device=device)
    w = torch.tensor(weights, dtype=torch.float64, device=device)
    (ours, g), (theirs, gt) = both(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
    same(ours, theirs)
    same(g, gt)


@pytest.mark.parametrize("smoothing", [-0.5, 1.0])
def test_smoothing_limits(device, smoothing):
    x, t = torch.randn(5, 7, device=device), torch.randint(0, 7, (5,), device=device)
    (ours, g), (theirs, gt) = both(x, t, label_smoothing=smoothing)
    same(ours, theirs)
    same(g, gt)


@pytest.mark.parametrize("shape", [(3, 0), (0,), (2, 0, 3)], ids=["rows", "unbatched", "k-dim"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_classes_with_probability_targets(device, kernel_path, shape, reduction):
    """C == 0 with probability targets (empty rows): PyTorch's zeros, an empty gradient. The SIMD paths crashed
    on them (a segmentation fault, found by fuzzing 2026-11-28)."""
    x = torch.randn(shape, device=device, requires_grad=True)
    y = torch.randn(shape, device=device)
    loss = cross_entropy(x, y, reduction=reduction)
    expected = F.cross_entropy(x.detach(), y, reduction=reduction)
    same(loss.detach(), expected)  # a mean is NaN: PyTorch divides by numel / C
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert grad.shape == x.shape
    with torch.no_grad():  # the loss alone: its own path
        same(cross_entropy(x, y, reduction=reduction), expected)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unbatched_input(device, reduction):
    x = torch.randn(5, device=device)
    (ours, g), (theirs, gt) = both(x, torch.tensor(2, device=device), reduction=reduction, label_smoothing=0.1)
    assert ours.shape == theirs.shape == ()
    same(ours, theirs)
    same(g, gt)
    # A 1-element target is accepted too (PyTorch's forward does; its backward fails, ours matches the 0-d form).
    (ours1, g1), _ = both(x, torch.tensor([2], device=device), grad=False, reduction=reduction)
    same(ours1, F.cross_entropy(x, torch.tensor([2], device=device), reduction=reduction))
    xg = x.clone().requires_grad_()
    cross_entropy(xg, torch.tensor([2], device=device), reduction=reduction).sum().backward()
    same(xg.grad, F.softmax(x, 0) - F.one_hot(torch.tensor(2, device=device), 5))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_unbatched_ignored_target(device, weighted, smoothing):
    """A (C,) input whose target is ignored: PyTorch's mean is 0 on CUDA (its one-row kernel) but 0/0 = NaN on the
    CPU, and NaN on both with smoothing; a target of weight 0 gives NaN on both.  Ours gives the device's."""
    x = torch.randn(5, device=device)
    weight = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.5], device=device) if weighted else None
    for target in (-100, 1):  # ignored; class 1 (weight 0 when weighted)
        t = torch.tensor(target, device=device)
        (ours, g), (theirs, gt) = both(x, t, weight=weight, label_smoothing=smoothing)
        same(ours, theirs)
        same(g, gt)
        if not smoothing:  # the 1-element target's forward (PyTorch's backward refuses it, and smoothing its forward)
            (ours1, _), (theirs1, _) = both(x, t.reshape(1), grad=False, weight=weight)
            same(ours1, theirs1)
    # That the case tells the devices apart: PyTorch's CUDA 0, where the CPU's 0/0 is NaN.
    ignored = cross_entropy(x, torch.tensor(-100, device=device), weight=weight, label_smoothing=smoothing)
    assert ignored.isnan() if device == "cpu" or smoothing else ignored == 0


def test_single_class(device):
    x, t = torch.randn(4, 1, 3, device=device), torch.zeros(4, 3, dtype=torch.long, device=device)
    (ours, g), (theirs, gt) = both(x, t, label_smoothing=0.2)
    same(ours, theirs)
    same(g, gt)


# Rows of logits and target, for PyTorch's IEEE behaviour.
SPECIAL_ROWS = {
    "-inf non-target": ([0.0, -INF, 1.0, 2.0], 0),
    "-inf target": ([0.0, -INF, 1.0, 2.0], 1),
    "all -inf": ([-INF] * 4, 1),
    "+inf": ([0.0, INF, 1.0, 2.0], 0),
    "nan": ([0.0, NAN, 1.0, 2.0], 0),
    "+-1e4": ([1e4, -1e4, 0.0, 3.0], 1),
    "+-3e38": ([3e38, -3e38, 1.0, 2.0], 2),
    "+-3e38 target max": ([3e38, -3e38, 1.0, 2.0], 0),
    # exp(x - max) around float32's smallest normal (e^-87.3): the CPU kernels give 0 under e^-87 (no subnormals)
    "tiny exponentials": ([0.0, -86.9, -87.2, -110.0], 0),
    "tiny exponentials, target": ([0.0, -86.9, -87.2, -110.0], 3),
}


@pytest.mark.parametrize("row", list(SPECIAL_ROWS), ids=list(SPECIAL_ROWS))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_special_values(device, kernel_path, row, smoothing, reduction):
    values, target = SPECIAL_ROWS[row]
    x = torch.tensor([values, [0.5, 0.25, -1.0, 2.0]], device=device)  # a normal second row
    t = torch.tensor([target, 3], device=device)
    (ours, g), (theirs, gt) = both(x, t, reduction=reduction, label_smoothing=smoothing)
    same(ours, theirs)
    same(g, gt)


# (B, C, S) logits and why: each takes a different kernel of the fused loss + gradient.
HUGE_MAX_SHAPES = {
    "7 classes": ((64, 7), "CPU 16-row blocks; CUDA warp rows (groups of lanes)"),
    "1000 classes": ((16, 1000), "CPU rows with kept exponentials; CUDA warp rows"),
    "40000 classes": ((4, 40000), "CPU rows past the kept classes; CUDA slices (clusters) or streaming rows"),
    "K-dim": ((2, 21, 64), "CPU and CUDA K-dim blocks of positions"),
}


@pytest.mark.parametrize("shape", list(HUGE_MAX_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_huge_max_gradient_is_exact(device, kernel_path, shape, dtype, reduction, smoothing):
    """Two maxima of 1e30 in one row: softmax is 1/2 at each.  The fused pass's gradient is e^(x - max) / sum; as
    e^(x - lse) it would be 1, since 1e30 + log 2 == 1e30 in float32 (PyTorch subtracts the max first, too).
    reduction='none' takes the gradient in its backward from the forward's saved max and sum: the same formula
    (it was e^(x - lse) from a saved lse, and gave 1).  float16 cannot hold such logits."""
    size, _ = HUGE_MAX_SHAPES[shape]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(size, generator=g).to(dtype)
    t = torch.randint(0, size[1], (size[0],) + size[2:], generator=g)
    row = x[1] if len(size) == 2 else x[1, :, 5]  # row 1 (K-dim: item 1, position 5)
    row[0], row[1], row[-2], row[-1] = 1e30, -1e30, 1e30, -1e30
    if len(size) == 2:
        t[1] = 2
    else:
        t[1, 5] = 2
    x, t = x.to(device), t.to(device)
    one = torch.ones(t.shape if reduction == "none" else (), device=device)
    loss, grad = ours(x, t, one, reduction=reduction, label_smoothing=smoothing)
    ref_loss, ref_grad = reference(x, t, one, reduction=reduction, label_smoothing=smoothing)
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=1e30)
    # The gradient's tolerance is the normal rows' (its entries in the huge row are 0 or 1/2 times the factor).
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=x[0].float().abs().max().item())


def test_half_precision_beats_pytorch_overflow(device, kernel_path):
    """PyTorch's float16 intermediates overflow here; the true loss, 3000, fits float16."""
    x = torch.tensor([[0.0, -3000.0]] * 40, dtype=torch.float16, device=device)
    t = torch.ones(40, dtype=torch.long, device=device)
    assert cross_entropy(x, t).item() == 3000.0
    assert torch.equal(cross_entropy(x, t, reduction="none"), torch.full((40,), 3000.0, dtype=torch.float16, device=device))


@pytest.mark.parametrize("layout", ["transposed", "permuted-4d"])
def test_strided_logits_and_expanded_target(device, kernel_path, layout):
    g = torch.Generator().manual_seed(1)
    if layout == "transposed":
        x = torch.randn(9, 6, generator=g).to(device).t()  # (6, 9), the class dim strided (stride 6)
        t = torch.tensor([4], device=device).expand(6)
    else:
        x = torch.randn(3, 5, 4, 7, generator=g).to(device).permute(0, 3, 1, 2)  # (3, 7, 5, 4), class stride 1
        t = torch.tensor([[[2]]], device=device).expand(3, 5, 4)
    assert not x.is_contiguous() and 0 in t.stride()
    for kw in (dict(), dict(label_smoothing=0.2, reduction="none")):
        xa = x.detach().clone().requires_grad_()
        xb = x.detach().contiguous().requires_grad_()
        a = cross_entropy(xa, t, **kw)
        b = cross_entropy(xb, t.contiguous(), **kw)
        torch.testing.assert_close(a, b)
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)


def test_module_edge_case_matches(device):
    m = CrossEntropyLoss(ignore_index=0, label_smoothing=0.1, reduction="sum").to(device)
    x, t = torch.randn(5, 3, 2, device=device), torch.zeros(5, 2, dtype=torch.long, device=device)
    same(m(x, t), torch.nn.CrossEntropyLoss(ignore_index=0, label_smoothing=0.1, reduction="sum")(x, t))


@pytest.mark.parametrize("shape", [(4, 4), (2, 4, 3)], ids=["rows", "k-dim"])
def test_mean_over_targets_of_zero_weight_with_smoothing(device, kernel_path, shape):
    """Every target's weight is 0: PyTorch's NLL mean is 0/0 = NaN, so its smoothed loss is NaN, not inf."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g).to(device)
    t = torch.full((shape[0], *shape[2:]), 2, dtype=torch.long, device=device)
    w = torch.tensor([0.0, 1.0, 0.0, 2.0], device=device)
    (ours, g_ours), (theirs, g_theirs) = both(x, t, weight=w, label_smoothing=0.1)
    same(ours, theirs)
    same(g_ours, g_theirs)


# Target layouts for the denominator kernel (built on the device: a copy there would be aligned again): the CUDA
# kernel reads dense 16-byte-aligned targets in pairs, 4 loads in flight per thread, anything else one at a time.
MEAN_LAYOUTS = {
    "dense": lambda t: t,
    "strided": lambda t: t.t(),
    "empty": lambda t: t[:0],
    "odd-count": lambda t: t[:5, :69].contiguous(),  # 345 targets: the last one has no pair
    "off-by-one": lambda t: t.reshape(-1)[1:415].view(6, 69),  # 8 bytes past a 16-byte boundary: one at a time
    "large": lambda t: t.repeat(3, 7143)[:17, :-1].contiguous(),  # 17 x 500,009: the 4-loads loop, an odd count
}


@pytest.mark.parametrize("layout", list(MEAN_LAYOUTS))
def test_mean_denominator_op(device, layout):
    """mean_scale: {d, 1/d} for d the count (or summed weight) of the targets that are not ignore_index, with no
    mask in memory, in the asked dtype; an out-of-range target counts, and weighs 0 (its row is an error
    anyway); no targets: d = 0, 1/d = inf."""
    from softmax_ce_ext._ops import ops

    g = torch.Generator().manual_seed(2)
    t = torch.randint(-1, 8, (6, 70), generator=g)  # -1: ignore_index below; 7: out of range for 7 classes
    t = MEAN_LAYOUTS[layout](t.to(device))
    w = (torch.rand(7, generator=g, dtype=torch.float64)).to(device)
    count = (t != -1).sum().item()
    for dtype in (torch.float32, torch.float64):
        scale = torch.stack(ops.mean_scale(t, None, -1, dtype))
        assert scale.dtype == dtype and scale.shape == (2,)
        expected = torch.tensor([count, 1.0 / count if count else float("inf")], dtype=dtype)
        torch.testing.assert_close(scale.cpu(), expected, rtol=0, atol=0)
    valid = (t != -1) & (t < 7)
    total = torch.where(valid, w[t.clamp(0, 6)], 0).sum().item()
    scale = torch.stack(ops.mean_scale(t, w, -1, torch.float64))
    expected = torch.tensor([total, 1.0 / total if total else float("inf")], dtype=torch.float64)
    torch.testing.assert_close(scale.cpu(), expected, rtol=1e-12, atol=0)


# Targets of the mean's one-op training pass, and why each.
MEAN_PASS_TARGETS = {
    "some ignored": ("every 5th position ignored: the count is not the number of positions"),
    "all ignored": ("d = 0: the loss 0 / 0 = NaN, the gradient 0"),
    "smoothed": ("label smoothing: the same count, the smoothing sums in the kernel"),
    "bad target": ("an out-of-range class counts in d, its position NaN (CUDA: flagged, not raised)"),
}


def _mean_case(device, case, dtype, shape, seed):
    """Logits (B, C, S), targets with every 5th position ignored, and the smoothing, for a MEAN_PASS_TARGETS case;
    and the generator, to draw more."""
    if case == "bad target" and device != "cuda":
        pytest.skip("the CPU raises IndexError on an out-of-range class (test_errors)")
    g = torch.Generator().manual_seed(seed)
    B, C, S = shape
    x = torch.randn(B, C, S, generator=g).to(dtype).to(device)
    t = torch.randint(0, C, (B, S), generator=g)
    t[:, ::5] = -100
    if case == "all ignored":
        t[:] = -100
    if case == "bad target":
        t[1, min(7, S - 1)] = C
    return x, t.to(device), 0.1 if case == "smoothed" else 0.0, g


@pytest.mark.parametrize("case", list(MEAN_PASS_TARGETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "in-place"])
@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "kdim-fold"])
@pytest.mark.parametrize("mul", [None, 0.3], ids=["no-multiplier", "times-0.3"])
def test_mean_forward_backward_op(device, case, dtype, inplace, fold, mul):
    """mean_forward_backward (reduction='mean' with class indices, training) gives what mean_scale and then
    forward_backward give: the same denominator and gradient bits, the same loss but for the order of its sum.
    K-dim logits (B, C, S) of the K-dim kernel's layout; kdim_fold: that kernel counts d itself (CUDA).  With a
    multiplier m (the Function's guess of grad_output) the gradient's factor is m / d, and m comes back as read."""
    from softmax_ce_ext import tuning
    from softmax_ce_ext._ops import ops

    if fold and device != "cuda":
        pytest.skip("the CUDA K-dim kernel's fold")
    # CUDA: 262144 or 131072 items of 4 float / 8 bf16 positions, ~2-4 per thread of the resident grid
    x, t, eps, _ = _mean_case(device, case, dtype, (4, 21, 262144) if device == "cuda" else (3, 21, 4000), seed=3)
    m = None if mul is None else torch.tensor(mul, dtype=torch.float32, device=device)
    with tuning.using(**{**tuning.BUILT_IN, "kdim_fold": fold}):
        if inplace:
            grad = x.clone()
            loss, d, used = ops.mean_forward_backward_(grad, t, None, -100, eps, None, torch.float32, m)
        else:
            loss, grad, d, used = ops.mean_forward_backward(x, t, None, -100, eps, None, torch.float32, m)
    d_ref, inv = ops.mean_scale(t, None, -100, torch.float32)
    if m is not None:
        inv = m / d_ref  # float32, rounded once, as the kernels divide
    loss_ref, grad_ref = ops.forward_backward(x, t, None, -100, eps, inv, None, d_ref, torch.float32)
    assert used.dtype == torch.float32 and used.item() == (1.0 if m is None else m.item())
    assert d.dtype == torch.float32 and d.shape == ()
    assert d.item() == d_ref.item() == (t != -100).sum().item()
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0, equal_nan=True)
    if case == "all ignored":
        assert loss.isnan().item() and not grad.any().item()


@pytest.mark.parametrize("case", list(MEAN_PASS_TARGETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("layout", ["rows", "kdim"])
def test_mean_forward_and_forward_sum_ops(device, case, dtype, weighted, layout):
    """mean_forward (reduction='mean' with class indices, no gradient) is mean_scale, forward and sum_rows in
    one op, forward_sum (the summed loss alone) forward and sum_rows: the same denominator, the same loss in the
    dtype asked for (the same bits on the CPU; CUDA's K-dim kernel sums a partial per CTA instead of writing
    per-position rows: another order)."""
    from softmax_ce_ext._ops import ops

    x, t, eps, g = _mean_case(device, case, dtype, (3, 21, 4000) if layout == "kdim" else (3000, 1000, 1), seed=5)
    w = (torch.rand(x.shape[1], generator=g) + 0.5).to(device) if weighted else None
    loss, d = ops.mean_forward(x, t, w, -100, eps, None, dtype)
    d_ref, _ = ops.mean_scale(t, w, -100, torch.float32)
    rows, _ = ops.forward_rows(x, t, w, -100, eps, None)
    loss_ref = ops.sum_rows(rows, d_ref, dtype)
    assert loss.dtype == dtype and loss.shape == () and d.dtype == torch.float32 and d.shape == ()
    torch.testing.assert_close(d, d_ref, rtol=0, atol=0)
    exact = device == "cpu" or layout == "rows"
    rtol = 0 if exact else 1e-6 if dtype == torch.float32 else 2.0**-8  # another order: a bf16 ulp at most
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=0, equal_nan=True)
    if case == "all ignored":
        assert d.item() == 0 and loss.isnan().item()
    # forward_sum: the same pass, divided by what it is given (the same bits as mean_forward), or not at all
    torch.testing.assert_close(ops.forward_sum(x, t, w, -100, eps, None, d, dtype), loss, rtol=0, atol=0,
                               equal_nan=True)
    total = ops.forward_sum(x, t, w, -100, eps, None)
    assert total.dtype == torch.float32 and total.shape == ()
    torch.testing.assert_close(total, ops.sum_rows(rows), rtol=0 if exact else 1e-6, atol=0, equal_nan=True)


# (B, C, S) logits and why: each takes another kernel of the forward, and of the gradient from its stats.
STATS_SHAPES = {
    "7 classes": ((64, 7, 1), "CPU 16-row blocks; CUDA warp rows of one chunk per lane"),
    "rows": ((50, 1000, 1), "CPU rows; CUDA warp rows"),
    "long rows": ((3, 40000, 1), "CPU rows past the kept classes; CUDA streaming rows (grad pieces by default)"),
    "k-dim": ((3, 21, 40), "CPU and CUDA K-dim blocks of positions, a partial block"),
    "strided": ((1, 7, 300), "a class stride of 300 over 7 classes: the K-dim kernels, or the general ones"),
}


@pytest.mark.parametrize("shape", list(STATS_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_forward_saves_max_and_sum_for_the_gradient(device, kernel_path, shape, dtype):
    """The forward op's second output, what reduction='none' saves for its backward: (2, B, S), the rows' max and
    their sum of e^(x - max) (the lse is m + log(s)); ignored rows 0.  The backward op then gives the gradient as
    the training pass writes it, e^(x - max) / sum (to ~1e-5 relative: the training pass may keep its exponentials,
    or sum in another order).  An lse of the old form is refused."""
    from softmax_ce_ext._ops import ops

    size, _ = STATS_SHAPES[shape]
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(size, generator=g) * 4).to(dtype)
    t = torch.randint(0, size[1], (size[0], size[2]), generator=g)
    t[0, 0] = -100
    x, t = x.to(device), t.to(device)
    rows, stats = ops.forward_rows(x, t, None, -100, 0.0, None)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.shape == (2, size[0], size[2]) and stats.dtype == acc and stats.is_contiguous()
    xd = x.double()
    m_ref = xd.amax(1)
    s_ref = (xd - m_ref.unsqueeze(1)).exp().sum(1)
    live = t != -100
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-5, atol=0)  # float sums of C terms
    torch.testing.assert_close(stats[0][live].double(), m_ref[live], rtol=0, atol=0)  # the max is one of the logits
    torch.testing.assert_close(stats[1][live].double(), s_ref[live], **tol)
    assert not stats[:, ~live].any()
    torch.testing.assert_close((stats[0] + stats[1].log())[live].double(), torch.logsumexp(xd, 1)[live], **tol)
    # The gradient from them, beside the training pass's (grad_scale 1, a sum: the same factor per row)
    grad = ops.backward(torch.ones_like(rows), x, t, None, stats, -100, 0.0)
    _, fused = ops.forward_backward(x, t, None, -100, 0.0, torch.ones((), dtype=acc, device=device), None)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad, fused, rtol=rtol, atol=rtol * 1e-2)
    with pytest.raises(RuntimeError, match=r"expected contiguous stats .* of shape \[2, "):
        ops.backward(torch.ones_like(rows), x, t, None, stats[0] + stats[1].log(), -100, 0.0)


@pytest.mark.parametrize("n", [0, 1, 1023, 1025, 65536, 1 << 18, (1 << 18) + 1],
                         ids=["empty", "one", "under-a-block", "over-a-block", "65536-rows", "one-block-max",
                              "at-sum-path"])
def test_sum_rows_op(device, n):
    """sum_rows: the fixed-order sum of per-row values (CUDA: one CTA up to 2^18 rows, at::sum above)."""
    from softmax_ce_ext._ops import ops

    g = torch.Generator().manual_seed(n)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        got = ops.sum_rows(v.to(device=device, dtype=dtype))
        assert got.shape == () and got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), v.sum(), rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-4 if dtype == torch.float32 else 1e-10)
        assert torch.equal(got, ops.sum_rows(v.to(device=device, dtype=dtype)))  # the same bits again


@pytest.mark.parametrize("n", [0, 1000, (1 << 18) + 1], ids=["empty", "one-block", "at-sum-path"])
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sum_rows_divisor_and_dtype(device, n, out):
    """sum_rows(values, divisor, dtype): the sum over the divisor, then cast, with the bits of doing it in three
    ATen steps (the mean's division and the loss's cast folded into the sum's launch); an empty sum is 0."""
    from softmax_ce_ext._ops import ops

    g = torch.Generator().manual_seed(n + 1)
    v = (torch.randn(n, generator=g) * 3).to(device)
    d = torch.tensor(float(max(n, 1)) * 0.7, device=device)
    plain = ops.sum_rows(v)
    got = ops.sum_rows(v, d, out)
    assert got.shape == () and got.dtype == out
    assert torch.equal(got, (plain / d).to(out))
    assert torch.equal(ops.sum_rows(v, None, out), plain.to(out))
    with pytest.raises(RuntimeError, match="expected a 0-d divisor in Float"):
        ops.sum_rows(v, d.double(), out)
