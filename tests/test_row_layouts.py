"""Rows the fast kernels treat specially (16-byte chunks, a warp or a cluster per row): sizes at the kernels'
boundaries, rows that do not start on 16 bytes, a gradient aligned differently from the logits, long rows
with special values.  Every kernel path of the device (conftest.KERNEL_PATHS)."""

import math

import pytest
import torch

from helpers import TOL, assert_close, ours, reference
from softmax_ce_ext import cross_entropy, tuning

# (N, C, why)
SIZES = [
    (6, 3, "fewer classes than a 16-byte chunk"),
    (5, 1021, "float32: the longest row a warp holds (256 chunks at the worst alignment)"),
    (5, 1022, "float32: one class more, the next kernel"),
    (5, 2041, "2-byte dtypes: the longest row a warp holds"),
    (5, 2042, "2-byte dtypes: one class more, the next kernel"),
    (3, 50257, "GPT-2's vocabulary: odd, so most rows start off a 16-byte boundary"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(n, c, dtype, device, offset, seed):
    """offset: the rows start `offset` elements into a wider buffer (misaligned starts, a row stride of
    c + offset); the gradient, allocated dense, is then aligned differently from the logits."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, c + offset, generator=g) * 3).to(dtype).to(device)
    x = base[:, offset:]
    t = torch.randint(0, c, (n,), generator=g).to(device)
    t[0] = c - 1  # the last class, in the last chunk
    if n > 1:
        t[1] = 0  # the first class, in the first chunk (masked lanes where rows start off 16 bytes)
    return x, t, g


@pytest.mark.parametrize("size", SIZES, ids=[f"{n}x{c}" for n, c, _ in SIZES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["dense", "offset-by-one"])
@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1, weighted=True)], ids=["plain", "smoothed-weighted"])
def test_training_and_none(device, kernel_path, size, dtype, offset, kw):
    n, c, _ = size
    x, t, g = _logits(n, c, dtype, device, offset, seed=c + offset)
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["weight"] = (torch.rand(c, generator=g) + 0.2).to(device)
    scale = x.abs().max().item()
    for reduction in ("mean", "none"):
        grad_out = (torch.rand(() if reduction == "mean" else (n,), generator=g) + 0.5).to(dtype).to(device)
        xo = x.detach().clone().requires_grad_()
        loss = cross_entropy(xo, t, reduction=reduction, **kw)
        (grad,) = torch.autograd.grad(loss, xo, grad_out)
        ref_loss, ref_grad = reference(x, t, grad_out, reduction=reduction, **kw)
        assert_close(loss, ref_loss, dtype, f"{reduction} loss", logit_scale=scale)
        assert_close(grad, ref_grad, dtype, f"{reduction} grad", logit_scale=scale)
    ref_rows, _ = reference(x, t, torch.ones(n, device=device), reduction="none", **kw)
    with torch.no_grad():  # the forward-only kernels
        rows = cross_entropy(x, t, reduction="none", **kw)
    assert_close(rows, ref_rows, dtype, "no-grad loss", logit_scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_written_over_misaligned_logits(device, kernel_path, dtype):
    """inplace_backward with rows off 16-byte boundaries: neighbouring rows share chunks."""
    x, t, _ = _logits(7, 50257, dtype, device, 1, seed=3)
    holder = torch.zeros(7, 50258, dtype=dtype, device=device)
    holder[:, 1:] = x
    out = holder.requires_grad_()[:, 1:]  # a non-leaf view: each row starts one element into its buffer row
    cross_entropy(out, t, inplace_backward=True, reduction="sum").backward()
    _, ref_grad = reference(x, t, torch.ones((), device=device), reduction="sum")
    scale = x.abs().max().item()
    assert_close(out.detach(), ref_grad, dtype, "gradient left in the logits", logit_scale=scale)
    assert_close(holder.grad[:, 1:], ref_grad, dtype, "grad", logit_scale=scale)
    assert torch.equal(holder.detach()[:, 0], torch.zeros_like(holder[:, 0]))  # the row heads are not touched


# A long row (several chunks per thread, several CTAs of a cluster) with the values of test_edge_cases'
# special rows placed in different chunks.
LONG_SPECIAL = {
    "-inf scattered": lambda x: x.index_fill_(0, torch.tensor([0, 7, 1000, 2999]), -math.inf),
    "all -inf": lambda x: x.fill_(-math.inf),
    "+inf": lambda x: x.index_fill_(0, torch.tensor([1500]), math.inf),
    "nan": lambda x: x.index_fill_(0, torch.tensor([2999]), math.nan),
    "+-3e38": lambda x: x.index_fill_(0, torch.tensor([5]), 3e38).index_fill_(0, torch.tensor([2000]), -3e38),
}


@pytest.mark.parametrize("case", list(LONG_SPECIAL), ids=list(LONG_SPECIAL))
@pytest.mark.parametrize("reduction", ["sum", "none"])
# Smoothed: the smoothing sums' sweeps; not: the lean sweeps (the default).
@pytest.mark.parametrize("smoothing", [0.1, 0.0], ids=["smoothed", "unsmoothed"])
def test_long_rows_special_values(device, kernel_path, case, reduction, smoothing):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3000, generator=g)
    LONG_SPECIAL[case](x[1])
    x = x.to(device)
    t = torch.tensor([4, 1000, 2999], device=device)
    results = []
    for fn in (cross_entropy, torch.nn.functional.cross_entropy):
        xi = x.clone().requires_grad_()
        loss = fn(xi, t, reduction=reduction, label_smoothing=smoothing)
        (gi,) = torch.autograd.grad(loss.sum(), xi)
        results.append((loss, gi))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, equal_nan=True, rtol=1e-5, atol=1e-6)


# Rows centred far from 0: where the lean sweeps fold the exponent's subtraction into one FFMA (|max| < 2^12,
# Exp2Base) and where they may not, on both sides of that bound; the target's class is the max.
CENTRES = {
    "near 0": 0.0,
    "30": 30.0,
    "-2000": -2000.0,
    "4000 (folded, 2^(+1.2) per term)": 4000.0,
    "5000 (past the bound: subtraction)": 5000.0,
}


@pytest.mark.parametrize("centre", list(CENTRES), ids=list(CENTRES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_centred_far_from_zero(device, kernel_path, centre, dtype):
    g = torch.Generator().manual_seed(9)
    c = 20000
    x = (torch.randn(4, c, generator=g) * 4 + CENTRES[centre]).to(dtype)
    t = torch.randint(0, c, (4,), generator=g)
    t[0] = int(x[0].float().argmax())
    x, t = x.to(device), t.to(device)
    scale = x.float().abs().max().item()
    for reduction in ("mean", "none"):
        grad_out = (torch.rand(() if reduction == "mean" else (4,), generator=g) + 0.5).to(device)
        loss, grad = ours(x, t, grad_out, reduction=reduction)
        ref_loss, ref_grad = reference(x, t, grad_out, reduction=reduction)
        assert_close(loss, ref_loss, dtype, f"{reduction} loss", logit_scale=scale)
        assert_close(grad, ref_grad, dtype, f"{reduction} grad", logit_scale=scale)


# How the slice kernel stages a cluster's rows, as (slice_kb, ring_kb, prefetch, rows), and why each is here.
# 3001 classes: 751 float32 chunks, 376 bfloat16 ones.
SLICE_SCHEDULES = {
    "no-prefetch": ((1, 0, False, 1000, 3001), "each row copied, waited for, then used (1 KiB slices: "
                    "clusters of 8-16)"),
    "prefetch": ((1, 0, True, 1000, 3001), "the next row copied into the slots the gradient sweep frees"),
    "ring-whole-row": ((1, 8, True, 1000, 3001), "a 512-slot ring: all of the next row's slice copied before "
                       "the statistics (64-chunk slices need 256 slots each)"),
    "ring-head-and-tail": ((6, 12, True, 12000, 3001), "a 768-slot ring, 376-chunk slices needing 512: the "
                           "next row's first 256 chunks before the statistics, the rest during the gradient sweep; "
                           "rows wrap around the ring (12000 rows: each CTA walks ~10 of them)"),
}


@pytest.mark.parametrize("schedule", list(SLICE_SCHEDULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["dense", "offset-by-one"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad-buffer", "inplace"])
@pytest.mark.parametrize("sweeps", ["smoothed", "plain", "lean"])
@pytest.mark.parametrize("variant", ["sync", "async"])
def test_slices_many_rows_per_cluster(device, schedule, dtype, offset, inplace, sweeps, variant):
    """Far more rows than clusters fit at once, so each cluster walks many rows, copying the next row's slice
    ahead as SLICE_SCHEDULES says.  Every 7th row is ignored (no copy for it: the row after is fetched afresh),
    and so are a run of rows in the middle and the last third (several skipped in a row; nothing left to fetch);
    offset-by-one rows alternate between chunk counts, so the next row's slice can be a chunk longer than this
    row's.  sweeps: label smoothing (the smoothing sums), or none under the plain sweeps (tuning lean off: per-chunk
    tests) or the lean ones (the default), whose interior trips skip the end chunks and step over the ring's wrap.
    variant: the cluster's statistics by plain remote stores and cluster.sync() (tuning cluster_async off); or by
    st.async (the default: each row's exchange on one of two mbarriers, in turn, so skipped rows and many rows test
    their phases)."""
    if device != "cuda":
        pytest.skip("the CUDA slice kernel")
    if sweeps == "plain" and variant == "async":
        pytest.skip("the plain sweeps have only the cluster.sync() exchange")
    slice_kb, ring_kb, prefetch, rows, classes = SLICE_SCHEDULES[schedule][0]
    smoothing = 0.1 if sweeps == "smoothed" else 0.0
    x, t, g = _logits(rows, classes, dtype, device, offset, seed=11)
    t[::7] = -100
    t[rows // 2:rows // 2 + 300] = -100
    t[-(rows // 3):] = -100  # with ~500-1000 clusters walking the rows: each skips its last few in a row
    with tuning.using(path="auto", slice_kb=slice_kb, cluster_max=16, prefetch=prefetch, ring_kb=ring_kb,
                      lean=sweeps == "lean", cluster_async=variant != "sync"):
        xo = x.detach().clone().requires_grad_()
        xi = xo * 1 if inplace else xo  # in place needs a non-leaf
        loss = cross_entropy(xi, t, label_smoothing=smoothing, inplace_backward=inplace)
        (grad,) = torch.autograd.grad(loss, xo)
    ref_loss, ref_grad = reference(x, t, torch.ones((), device=device), label_smoothing=smoothing)
    scale = x.abs().max().item()
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=scale)
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=scale)


# Warp rows by chunks per lane (VPT 2 / 4 / 8: up to 64 / 128 / 256 chunks), as class counts per dtype.
# Warp rows of 2, 4 and 8 chunks per lane; under warp_group the same rows (but vpt8) by groups of 8 and 16 lanes,
# and the shortest (25 chunks) by groups of 4.
WARP_ROW_CLASSES = {torch.float32: [100, 200, 500, 1000], torch.bfloat16: [200, 300, 1000, 2000]}
WARP_ROW_IDS = ["short", "vpt2", "vpt4", "vpt8"]


# How the warp-row kernel walks its rows, and why each is here.
# Staging applies to the loss + gradient (mean) of float rows of 129-256 chunks (vpt8) only; the other rows and
# the forward and gradient kernels of reduction='none' run unstaged under every setting.
WARP_STAGING = {
    "unstaged": (dict(warp_ring=0, warp_group=False), "a warp per row, the grid as large as the rows need"),
    "ring2": (dict(warp_ring=2, warp_group=False), "the default (rows past 128 chunks): a resident grid, each warp's next row staged in shared memory "
              "(cp.async)"),
    "ring4": (dict(warp_ring=4, warp_group=False), "the same, as many rows ahead as shared memory holds (2 at 1000 floats)"),
    "kept": (dict(warp_keep=True, warp_group=False), "the gradient sweep multiplying the sum sweep's exponentials, kept in registers "
             "or in shared memory by row width (the default recomputes them)"),
    "unstaged-kept": (dict(warp_ring=0, warp_keep=True, warp_group=False), "kept, not staged"),
    "grouped": (dict(warp_group=True), "the default: the loss + gradient of rows of up to 128 chunks by groups of "
                "16, 8 or 4 lanes, 2-8 rows per warp: groups of one warp on rows of different chunk counts, ignored or not"),
}


@pytest.mark.parametrize("staging", list(WARP_STAGING))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vpt", range(4), ids=WARP_ROW_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_warp_rows_many_rows_per_warp(device, staging, dtype, vpt, reduction):
    """20000 rows: staged (warp_ring), each resident warp walks several of them, staging the next ones while it
    computes this one (mean: the fused pass; none: the forward, then the gradient from its
    stats, each a warp-row kernel).  Every 7th row is ignored (its loads are wasted, its gradient zero); rows start
    one element off 16 bytes, so neighbouring rows differ in chunk count (and in the slot chunks they fill)."""
    if device != "cuda":
        pytest.skip("the CUDA warp-row kernel")
    c = WARP_ROW_CLASSES[dtype][vpt]
    x, t, g = _logits(20000, c, dtype, device, 1, seed=5)
    t[::7] = -100
    grad_out = torch.rand(20000, generator=g).to(device) if reduction == "none" else torch.ones((), device=device)
    # No smoothing: warp_ring leaves smoothed rows alone.
    with tuning.using(**{**tuning.BUILT_IN, **WARP_STAGING[staging][0]}):
        loss, grad = ours(x, t, grad_out, reduction=reduction)
    ref_loss, ref_grad = reference(x, t, grad_out, reduction=reduction)
    scale = x.abs().max().item()
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=scale)
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])
@pytest.mark.parametrize("offset", [0, 1], ids=["dense", "offset-by-one"])
def test_gradient_from_saved_stats_in_pieces(device, dtype, lean, offset):
    """reduction='none' under grad_piece_kb=16: the backward cuts rows of 20000 classes into pieces of 1024 chunks
    (5 in float32, 3 in bfloat16), each a work item of its own.  Peaks (logit 20) every 1500 classes hold ~1/14 of
    the probability each, in every piece: a piece left unwritten or scaled twice is far outside the tolerance; targets
    in the first, a middle and the last piece, ignored rows; rows that start off 16 bytes (pieces shifted)."""
    if device != "cuda":
        pytest.skip("the CUDA streaming kernel")
    n, c = 64, 20000
    x, t, g = _logits(n, c, dtype, device, offset, seed=11)
    x[:, torch.arange(5, c, 1500, device=device)] = 20.0
    t[2] = c // 2
    t[3] = 4100  # float32: the 2nd piece's first chunk at offset 0 (class 4096)
    t[5::7] = -100
    grad_out = (torch.rand(n, generator=g) + 0.5).to(device)
    with tuning.using(**{**tuning.BUILT_IN, "lean": lean, "grad_piece_kb": 16}):
        loss, grad = ours(x, t, grad_out, reduction="none")
    ref_loss, ref_grad = reference(x, t, grad_out, reduction="none")
    scale = x.float().abs().max().item()
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=scale)
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=scale)


# Special values in one row of a warp-row batch, and why each: the fused pass divides kept exponentials by the
# row's sum, or recomputes e^(x - max) / sum, and reduction='none' does so from the forward's saved max and sum,
# so these must still give what PyTorch gives.
WARP_SPECIAL_ROWS = {
    "-inf non-target": ([-math.inf], 0, "adds e^-inf = 0 to the sum, a 0 gradient"),
    "all -inf": (None, 0, "sum 0: NaN loss and gradient (0 / 0)"),
    "+inf": ([math.inf], 0, "the max is inf: NaN (inf - inf)"),
    "nan": ([math.nan], 0, "poisons the sum"),
    "+-1e30": ([1e30, -1e30], 2, "a huge max: the subtraction first, every other exponential 0"),
}


@pytest.mark.parametrize("row", list(WARP_SPECIAL_ROWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vpt", range(4), ids=WARP_ROW_IDS)
@pytest.mark.parametrize("setting,reduction", [(dict(warp_keep=True, warp_group=False), "sum"),
                                               (dict(warp_group=False), "sum"), (dict(warp_group=True), "sum"),
                                               (dict(), "none")],
                         ids=["kept", "unkept", "grouped", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_warp_rows_special_values(device, row, dtype, vpt, setting, reduction, smoothing):
    """64 warp rows, row 5 special (its values at the start and the end of the row: first and last chunks), the
    others normal; reduction='sum' (the fused pass, which keeps the exponentials under warp_keep) and 'none' (the
    forward's warp rows, then the gradient from their saved max and sum) against float64."""
    if device != "cuda":
        pytest.skip("the CUDA warp-row kernel")
    values, target, _ = WARP_SPECIAL_ROWS[row]
    c = WARP_ROW_CLASSES[dtype][vpt]
    x, t, g = _logits(64, c, dtype, device, 0, seed=c)
    if values is None:
        x[5] = -math.inf
    else:
        x[5, : len(values)] = torch.tensor(values, dtype=dtype)
        x[5, c - len(values):] = torch.tensor(values, dtype=dtype)
    t[5] = target
    one = torch.ones(t.shape if reduction == "none" else (), device=device)
    with tuning.using(**{**tuning.BUILT_IN, **setting}):
        loss, grad = ours(x, t, one, reduction=reduction, label_smoothing=smoothing)
    ref_loss, ref_grad = reference(x, t, one, reduction=reduction, label_smoothing=smoothing)
    # x - lse is off by ~|x| eps in any implementation: the loss's tolerance widens with the largest logit; the
    # gradient's stays that of the normal rows (its entries are e^(x - max) / sum, exactly 0 or 1/2 in the huge row).
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=x[x.isfinite()].float().abs().max().item())
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=x[6].float().abs().max().item())


# (dtype, classes): the lanes per row that warp_group gives them (at one element off 16 bytes)
GROUPED_ROWS = [(torch.float32, 100), (torch.float32, 200), (torch.bfloat16, 200), (torch.bfloat16, 400),
                (torch.bfloat16, 1000)]


@pytest.mark.parametrize("dtype,classes", GROUPED_ROWS, ids=["float32-g4", "float32-g8", "bfloat16-g4",
                                                             "bfloat16-g8", "bfloat16-g16"])
def test_grouped_rows_walk_the_grid(device, dtype, classes):
    """warp_group with more rows than its grid holds (64 CTAs per SM): each group of lanes walks 2-3 rows, the
    grid's last groups fewer (rows not a multiple of the groups), rows one element off 16 bytes (chunk counts
    differ between neighbours), every 5th row ignored; mean training against float64."""
    if device != "cuda":
        pytest.skip("the CUDA warp-row kernel")
    chunks = (classes * dtype.itemsize + 30) // 16  # at the worst alignment
    lanes = 16 if chunks > 64 else 8 if chunks > 32 else 4
    groups = torch.cuda.get_device_properties(0).multi_processor_count * 64 * (256 // lanes)
    n = 2 * groups + 37  # 0.3-0.5 GB of logits: drawn and compared on the GPU (on the CPU, seconds per case)
    gen = torch.Generator(device=device).manual_seed(n)
    x = (torch.randn(n, classes + 1, generator=gen, device=device) * 3).to(dtype)[:, 1:]  # one element off 16 bytes
    t = torch.randint(0, classes, (n,), generator=gen, device=device)
    t[::5] = -100
    one = torch.ones((), device=device)
    with tuning.using(**{**tuning.BUILT_IN, "warp_group": True}):
        loss, grad = ours(x, t, one, reduction="mean")
    ref_loss, ref_grad = reference(x, t, one, reduction="mean")
    scale = x.abs().max().item()
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=scale)
    rtol, atol = TOL[dtype]  # assert_close's bound, entry by entry, on the device
    bound = atol * ref_grad.abs().max() + 8 * 2.0**-24 * scale + rtol * ref_grad.abs()
    bad = (grad.double() - ref_grad).abs() > bound
    assert not bool(bad.any()), f"grad: {int(bad.sum())} of {bad.numel()} entries outside the tolerance"


# (B, C) logits go to the kernels as they are (no view per call: host time); the kernels read them as the
# (B, C, 1) view reshape makes.  (why, logits from a (B, C) draw, class indices from a (B,) draw)
ROWS_FORMS = {
    "dense": ("contiguous rows, contiguous targets", lambda x: x, lambda t: t),
    "transposed": ("column-major logits (the CPU's transposed rows), strided targets",
                   lambda x: x.t().contiguous().t(), lambda t: torch.stack([t, t], 1)[:, 0]),
    "sliced": ("rows one element into a wider buffer, targets every other element",
               lambda x: torch.cat([x[:, :1], x], 1)[:, 1:], lambda t: torch.stack([t, t], 1).reshape(-1)[::2]),
}


@pytest.mark.parametrize("form", list(ROWS_FORMS))
@pytest.mark.parametrize("shape", [(37, 7), (9, 1000), (1, 7), (5, 1)],
                         ids=["few-classes", "warp-rows", "one-row", "one-class"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_as_given_equal_their_view(device, kernel_path, form, shape, dtype):
    """Every op on (B, C) logits with (B,) class indices (or (B, C) probabilities) gives the bits of the same op on
    their (B, C, 1) and (B, 1) views, in each layout of ROWS_FORMS."""
    _, logits_of, target_of = ROWS_FORMS[form]
    b, c = shape
    g = torch.Generator().manual_seed(b * c)
    x = logits_of((torch.randn(b, c, generator=g) * 3).to(dtype).to(device))
    idx = target_of(torch.randint(0, c, (b,), generator=g).to(device))
    idx[b // 2] = -100
    prob = logits_of(torch.softmax(torch.randn(b, c, generator=g), 1).to(dtype).to(device))
    w = (torch.rand(c, generator=g) + 0.2).to(device)
    scale = torch.tensor(0.25, device=device)
    rows = torch.rand(b, 1, generator=g).to(device)
    ops = torch.ops.softmax_ce_ext

    def same(a, b3, what):  # the same bits; NaN equals NaN (one ignored row's mean is 0/0)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b3 if isinstance(b3, tuple) else (b3,)):
            assert u.shape == v.shape or u.shape == v.shape[:2], what
            torch.testing.assert_close(u, v.reshape(u.shape), rtol=0, atol=0, equal_nan=True, msg=what)

    def written(fn):  # an in-place op's outputs, then the copy of the logits it wrote the gradient over
        def run(x, t):
            y = x.clone()
            out = fn(y, t)
            return (*(out if isinstance(out, tuple) else () if out is None else (out,)), y)
        return run

    for target, weight in ((idx, None), (idx, w), (prob, w)):
        x3, t3 = x.view(b, c, 1), target.view(b, 1) if target is idx else target.view(b, c, 1)
        ignore = -100 if target is idx else -1
        cases = {
            "forward_rows": lambda x, t: ops.forward_rows(x, t, weight, ignore, 0.1, None),
            "forward_backward": lambda x, t: ops.forward_backward(x, t, weight, ignore, 0.1, scale, None),
            "forward_sum": lambda x, t: ops.forward_sum(x, t, weight, ignore, 0.1, None, scale, dtype),
            "forward_backward_": written(lambda y, t: ops.forward_backward_(y, t, weight, ignore, 0.1, scale, None)),
        }
        if target is idx:
            cases["mean_forward"] = lambda x, t: ops.mean_forward(x, t, weight, ignore, 0.1, None, dtype)
            cases["mean_forward_backward"] = lambda x, t: ops.mean_forward_backward(x, t, weight, ignore, 0.1, None)
            cases["mean_scale"] = lambda x, t: ops.mean_scale(t, weight, ignore, torch.float32)
            cases["mean_forward_backward_"] = written(lambda y, t: ops.mean_forward_backward_(y, t, weight, ignore,
                                                                                             0.1, None))
        for name, op in cases.items():
            same(op(x, target), op(x3, t3), f"{name}, {'indices' if target is idx else 'probabilities'}")
        _, stats = ops.forward_rows(x, target, weight, ignore, 0.1, None)
        same(ops.backward(rows, x, target, weight, stats, ignore, 0.1),
             ops.backward(rows, x3, t3, weight, stats, ignore, 0.1), "backward")
        backward_ = written(lambda y, t: ops.backward_(rows, y, t, weight, stats, ignore, 0.1))
        same(backward_(x, target), backward_(x3, t3), "backward_")
