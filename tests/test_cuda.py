"""CUDA-only robustness: more than 2**31 elements, and no host synchronisation on the forward/backward path.
Skipped without a GPU; benchmarks/gpu_check.sh runs them on the GPU machine."""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce_ext
from softmax_ce_ext import cross_entropy, tuning

from helpers import training_against_float64

pytestmark = pytest.mark.skipif(
    not (softmax_ce_ext.cuda_built() and torch.cuda.is_available()), reason="CUDA kernels not built or no GPU"
)


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


@pytest.mark.parametrize(
    "shape",
    [(65536, 32769), (2, 8, 2**27 + 1)],
    ids=["rows-across-2^31", "k-dim-across-2^31"],
)
def test_more_than_2_31_elements(shape):
    """bf16 logits + gradient: 8.6 GB, plus int64 targets and, for the K-dim case (odd positions: the general
    kernel), per-position rows: ~13 GB.  Rows at the far end (offsets past 2**31) are checked against torch."""
    if _free_gib() < 14:
        pytest.skip("needs 14 GiB of free GPU memory")
    assert torch.Size(shape).numel() > 2**31
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_()
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), device="cuda")
    loss = cross_entropy(x, t, reduction="sum")
    loss.backward()
    softmax_ce_ext.check_errors()
    if len(shape) == 2:
        tail_x, tail_t, tail_g = x.detach()[-3:].float(), t[-3:], x.grad[-3:].float()
    else:
        tail_x, tail_t, tail_g = x.detach()[-1, :, -5:].float(), t[-1, -5:], x.grad[-1, :, -5:].float()
        tail_x, tail_g = tail_x.t(), tail_g.t()  # (positions, classes)
    expected = F.softmax(tail_x, 1) - F.one_hot(tail_t, tail_x.shape[1]).float()
    torch.testing.assert_close(tail_g, expected, rtol=2e-2, atol=2e-3)
    per_row = cross_entropy(x.detach(), t, reduction="none")
    torch.testing.assert_close(per_row.reshape(-1)[-3:].float(),
                               F.cross_entropy(tail_x[-3:], tail_t.reshape(-1)[-3:], reduction="none"),
                               rtol=2e-2, atol=2e-2)
    del x, loss, per_row
    torch.cuda.empty_cache()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "weighted-smoothed", "probability"])
def test_no_host_synchronisation(reduction, kind):
    x = torch.randn(256, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if kind == "probability":
        target = torch.softmax(torch.randn(256, 1000, device="cuda"), 1).bfloat16()
        kw = dict(reduction=reduction)
    else:
        target = torch.randint(0, 1000, (256,), device="cuda")
        kw = dict(reduction=reduction)
        if kind == "weighted-smoothed":
            kw.update(weight=torch.rand(1000, device="cuda"), label_smoothing=0.1, ignore_index=3)
    for _ in range(2):  # the first call sets up the status buffer (pinned memory), outside the check
        loss = cross_entropy(x, target, **kw)
        grad_out = torch.rand_like(loss)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = cross_entropy(x, target, **kw)
            loss.backward(grad_out)
            with torch.no_grad():
                cross_entropy(x, target, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("layout", ["rows", "k-dim"])
@pytest.mark.parametrize("inplace", [False, True], ids=["gradient-buffer", "inplace"])
def test_peak_memory_of_a_training_step(layout, inplace):
    """Peak memory above the inputs during forward + backward, the logits being the output of a layer (as in a
    model): at most the gradient (1.0x the logits), or about nothing with inplace_backward=True."""
    torch.manual_seed(0)
    k = 8  # a thin layer, so that its own gradients are negligible next to the logits
    if layout == "rows":
        h = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(32000, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        t = torch.randint(0, 32000, (4096,), device="cuda")
        layer = lambda: h @ w.t()  # noqa: E731
    else:
        h = torch.randn(16, k, 256 * 256, device="cuda")
        w = torch.randn(21, k, device="cuda", requires_grad=True)
        t = torch.randint(0, 21, (16, 256, 256), device="cuda")
        # A 1x1 convolution as a batched product: no cuDNN workspace, and (unlike w @ h, which folds the batch
        # and copies the gradient back) no copy of the gradient in its backward.
        layer = lambda: torch.bmm(w.expand(16, -1, -1), h).view(16, 21, 256, 256)  # noqa: E731
    for _ in range(2):  # the second step runs with the allocator warm
        w.grad = None
        logits = layer()
        nbytes = logits.numel() * logits.element_size()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        cross_entropy(logits, t, inplace_backward=inplace).backward()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / nbytes
        del logits
    allowed = 0.01 if inplace else 1.01
    assert extra <= allowed, f"peak extra memory {extra:.3f}x the logits"


# Logits whose classes are strided where no fast kernel applies: copied row-major for the row kernels, the gradient
# copied back into its layout (softmax_ce_dispatch.cuh, launch_typed).  (make logits, why each.)
STRIDED_CLASSES = {
    "transposed-5": (lambda g, dt: torch.randn(5, 1500, generator=g).to(dt).t(), "5 classes: grouped warp rows"),
    "transposed-1000": (lambda g, dt: torch.randn(1000, 64, generator=g).to(dt).t(), "1000 classes: warp rows"),
    "transposed-4096": (lambda g, dt: torch.randn(4096, 300, generator=g).to(dt).t(), "4096 classes: slices"),
    "transposed-40000": (lambda g, dt: torch.randn(40000, 24, generator=g).to(dt).t(), "slices over clusters"),
    "k-dim-300": (lambda g, dt: torch.randn(2, 300, 6, 5, generator=g).to(dt), "past the K-dim kernel's classes"),
    "k-dim-odd": (lambda g, dt: torch.randn(3, 21, 5, 3, generator=g).to(dt)[:, :, :, 1:],
                  "positions not 16-byte aligned: no K-dim kernel"),
}


@pytest.mark.parametrize("case", list(STRIDED_CLASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="none", weighted=True, label_smoothing=0.2),
                                dict(reduction="sum", label_smoothing=0.1)], ids=["mean", "none-weighted", "sum"])
@pytest.mark.parametrize("inplace", [False, True], ids=["gradient-buffer", "inplace"])
def test_strided_classes_staged_rows(case, dtype, kw, inplace):
    """Loss and gradient against float64 (ignored targets; per-row upstream gradients for 'none'; in place: the
    gradient over the logits' own, strided, memory)."""
    g = torch.Generator().manual_seed(len(case))
    x = (STRIDED_CLASSES[case][0](g, dtype) * 3).cuda()
    assert x.stride(1) != 1  # the layout the test is about
    c = x.shape[1]
    t = torch.randint(0, c, (x.shape[0], *x.shape[2:]), generator=g)
    t.view(-1)[1::4] = -100
    training_against_float64(x, t.cuda(), g, kw, inplace)


# K-dim logits of more items (E positions of one batch item) than the K-dim kernel's resident grid has threads
# (132 SMs x 5 CTAs x 128 threads on an H100/H200), so each thread walks several.
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (8, 21, 256, 257)), (torch.bfloat16, (16, 21, 256, 264))],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kw", [dict(reduction="mean"), dict(reduction="none", label_smoothing=0.1),
                                dict(reduction="sum", weighted=True)], ids=["mean", "none-smoothed", "sum-weighted"])
@pytest.mark.parametrize("inplace", [False, True], ids=["gradient-buffer", "inplace"])
def test_kdim_items_walked_per_thread(dtype, shape, kw, inplace):
    """Loss and gradient against float64, every 5th target ignored; the mean folds its denominator in-kernel
    (kdim_fold, the default) or not (weighted)."""
    g = torch.Generator().manual_seed(17)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).cuda()
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    t.view(-1)[::5] = -100
    training_against_float64(x, t.cuda(), g, kw, inplace)


# dynamic_rows on the K-dim kernel (unfolded: kdim_fold off): tiles of 128 items from a counter.  Shapes of more
# tiles than the resident CTAs (~660 on an H100/H200), so tiles are drawn, whose last tile is partial (906.5 and
# 982.5 tiles); one partial tile alone.  The summed loss goes per tile.
KDIM_DYN_SHAPES = {"float32": ((7, 21, 256, 259), torch.float32), "bfloat16": ((15, 21, 256, 262), torch.bfloat16),
                   "one-tile": ((1, 21, 4, 100), torch.float32)}


@pytest.mark.parametrize("case", list(KDIM_DYN_SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kdim_dynamic_tiles(case, reduction):
    """The K-dim kernel's tiles from a counter: the gradient (and 'none''s per-position losses) equal the static
    kernel's bit for bit; the summed loss, added per tile instead of per CTA, within float rounding of it and the
    same bits on a second call (a fixed order whichever CTA takes a tile); the kernel names say which twin ran."""
    shape, dtype = KDIM_DYN_SHAPES[case]
    g = torch.Generator().manual_seed(31)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).cuda()
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    t.view(-1)[::7] = -100
    t = t.cuda()
    grad_out = (torch.rand(t.shape, generator=g) + 0.5).cuda() if reduction == "none" else None

    def run():
        xi = x.detach().clone().requires_grad_()
        loss = cross_entropy(xi, t, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, xi, grad_out.to(loss.dtype) if grad_out is not None else None)
        return loss, grad

    out = {}
    for dyn in (False, True):
        with tuning.using(**{**tuning.BUILT_IN, "kdim_fold": False, "dynamic_rows": dyn}):
            out[dyn], kernels = kernels_of("columns_kernel<", run)
            if dyn:
                again = run()
        assert kernels and all(k[-1] == ("true" if dyn else "false") for k in kernels), kernels
    (l0, g0), (l1, g1) = out[False], out[True]
    assert torch.equal(g0, g1)
    if reduction == "none":
        assert torch.equal(l0, l1)
    else:  # another order of float32 sums, then the loss's dtype: within one of its steps
        torch.testing.assert_close(l1.float(), l0.float(), rtol=1e-6 if dtype == torch.float32 else 2**-7, atol=0)
    assert torch.equal(again[0], l1) and torch.equal(again[1], g1)


# Slice rows with more rows than twice the resident clusters (~396 CTAs on an H100/H200), so that tuning
# dynamic_rows draws rows from its counter: one CTA per row, clusters of 4 (float32) and of 8 (16 KiB slices); and
# row counts about the resident clusters (one CTA per row: ~396 on an H100/H200), where the first or second static
# row is the last (rows <= step, step < rows <= 2 * step, 2 * step + 1).
DYN_CASES = {"one-CTA-per-row": ((3000, 32000), torch.bfloat16, 72), "clusters": ((1024, 50000), torch.float32, 72),
             "clusters-of-8": ((2048, 40000), torch.bfloat16, 16), "rows-300": ((300, 32000), torch.bfloat16, 72),
             "rows-600": ((600, 32000), torch.bfloat16, 72), "rows-793": ((793, 32000), torch.bfloat16, 72),
             "rows-1000": ((1000, 32000), torch.bfloat16, 72)}
DYN_VARIANTS = [(c, v) for c in DYN_CASES for v in ("dense", "offset-by-one", "inplace", "sum")
                if v == "dense" or not c.startswith("rows-")]


def kernels_of(prefix, fn):
    """fn's result, and the template arguments of the kernels named `prefix...` (e.g. "slice_rows_kernel<") that
    it launches (torch.profiler's kernel names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if prefix in e.name]
    return out, {tuple(n.split(prefix, 1)[1].split(">(", 1)[0].split(", ")) for n in names}


@pytest.mark.parametrize("case, variant", DYN_VARIANTS, ids=[f"{c}-{v}" for c, v in DYN_VARIANTS])
def test_dynamic_rows_change_no_bit(case, variant):
    """tuning dynamic_rows hands the slice kernel's rows out by a counter instead of a stride: each row is computed
    the same way wherever it runs, so loss and gradient equal the static kernel's bit for bit.  The targets skip
    rows singly (every 9th), in a run of 200 (the skipped rows' own publish-and-wait path) and at both ends.  The
    kernel names say which twin ran (its last template argument, kDyn)."""
    shape, dtype, slice_kb = DYN_CASES[case]
    offset = variant == "offset-by-one"  # rows not 16-byte aligned: the kernel's masked end chunks
    g = torch.Generator().manual_seed(29)
    x = (torch.randn(shape[0], shape[1] + offset, generator=g) * 3).to(dtype).cuda()[:, offset:]
    t = torch.randint(0, shape[1], (shape[0],), generator=g)
    t[::9] = -100
    t[300:500] = -100
    t[0] = t[-1] = -100
    t = t.cuda()

    def step():
        xi = x.detach().clone().requires_grad_() if variant == "inplace" else x.detach().requires_grad_()
        loss = cross_entropy(xi * 1 if variant == "inplace" else xi, t, reduction="sum" if variant == "sum" else "mean",
                             inplace_backward=variant == "inplace")
        (grad,) = torch.autograd.grad(loss, xi)
        return loss, grad

    results = []
    for dyn in (False, True):
        with tuning.using(**{**tuning.BUILT_IN, "slice_kb": slice_kb, "dynamic_rows": dyn}):
            out, kernels = kernels_of("slice_rows_kernel<", step)
        assert kernels and all(k[-1] == ("true" if dyn else "false") for k in kernels), kernels
        results.append(out)
    assert torch.isfinite(results[0][0]) and torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert (results[1][1][t.cpu() == -100] == 0).all()


# Warp rows of the mean's training pass after mean_scale's kernels: groups of 16 lanes (2-byte rows of up to 128
# chunks), float rows of 129-256 chunks staged in shared memory (their early reads are the staging), groups of 4.
EARLY_CASES = {"grouped-bf16": (20000, 1000, torch.bfloat16), "staged-float32": (12000, 1000, torch.float32),
               "groups-of-4": (30000, 100, torch.float32)}
EARLY_VARIANTS = [(c, v) for c in EARLY_CASES for v in ("dense", "offset-by-one", "inplace", "weighted")]


@pytest.mark.parametrize("case, variant", EARLY_VARIANTS, ids=[f"{c}-{v}" for c, v in EARLY_VARIANTS])
def test_pdl_early_reads_change_no_bit(case, variant):
    """Under tuning pdl the mean's training pass in warp rows starts while mean_scale's two kernels run (their
    finish lets it launch at once) and reads its first rows before it waits for them (Args::early): loss and
    gradient must equal the plain launches' bit for bit, the first row ignored too (its writes wait)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic launches need sm_90+: elsewhere pdl is off")
    rows, C, dtype = EARLY_CASES[case]
    offset = variant == "offset-by-one"
    g = torch.Generator().manual_seed(31)
    x = (torch.randn(rows, C + offset, generator=g) * 4).to(dtype).cuda()[:, offset:]
    t = torch.randint(0, C, (rows,), generator=g)
    t[0] = t[::7] = -100
    t = t.cuda()
    w = torch.rand(C, generator=g).cuda() if variant == "weighted" else None

    def step():
        x.detach().mul_(1)  # a kernel writing the logits just before the call: the early reads must wait for none
        xi = x.detach().clone().requires_grad_() if variant == "inplace" else x.detach().requires_grad_()
        loss = cross_entropy(xi * 1 if variant == "inplace" else xi, t, weight=w, inplace_backward=variant == "inplace")
        (grad,) = torch.autograd.grad(loss, xi)
        return loss, grad

    results = []
    for pdl in (False, True, True, True):  # repeated: a race would show now and then
        with tuning.using(**{**tuning.BUILT_IN, "pdl": pdl}):
            results.append(step())  # outside the profiler, whose tracing may space the launches apart
    with tuning.using(**{**tuning.BUILT_IN, "pdl": True}):
        _, kernels = kernels_of("warp_rows_kernel<", step)
    # Args::early applies to the training pass without smoothing or kept exponentials: <T, VPT, true, true, false,
    # kRing, false[, kG]>
    assert any(k[2:5] == ("true", "true", "false") and k[6] == "false" for k in kernels), kernels
    assert torch.isfinite(results[0][0])
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
    assert (results[1][1][t.cpu() == -100] == 0).all()


@pytest.mark.parametrize(
    "dtype, C, slice_kb",
    [(torch.bfloat16, 32000, 72), (torch.bfloat16, 40000, 16), (torch.float32, 20000, 72)],
    ids=["one-CTA-per-row", "clusters", "float32"],
)
@pytest.mark.parametrize("dyn", [False, True], ids=["static-rows", "dynamic-rows"])
def test_slice_trace_stamps_without_changing_results(dtype, C, slice_kb, dyn):
    """benchmarks/slice_trace.py's traced twin of the default slice kernel: the same loss and gradient bits as the
    untraced kernel, and for every CTA that stamped, its header (cluster size as launched), each row's 7 clock
    stamps in order and the last warp's two between them.  One CTA per row at 32000 bf16 classes in 72 KiB slices;
    clusters where 16 KiB slices need several CTAs (sm_90); float32."""
    from softmax_ce_ext import _C

    HEADER, STAMPS, rows, ctas = 8, 10, 6, 2048
    torch.manual_seed(0)
    x = torch.randn(1536, C, device="cuda", dtype=dtype)  # rows past twice the resident clusters: dynamic ones drawn
    t = torch.randint(0, C, (1536,), device="cuda")
    buf = torch.zeros(ctas * (HEADER + STAMPS * rows), dtype=torch.int64, device="cuda")
    results = []
    with tuning.using(**{**tuning.BUILT_IN, "slice_kb": slice_kb, "dynamic_rows": dyn}):
        for trace in (False, True):
            xi = x.clone().requires_grad_()
            _C.set_slice_trace(buf.data_ptr() if trace else 0, ctas, rows, buf.device.index)
            try:
                loss = cross_entropy(xi, t)
                loss.backward()
            finally:
                _C.set_slice_trace(0, 0, 0, -1)
            results.append((loss, xi.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    rec = buf.view(ctas, HEADER + STAMPS * rows).cpu()
    stamped = rec[rec[:, 7] > 0]
    assert len(stamped) > 0, "the traced kernel stamped nothing"
    sizes = set(stamped[:, 2].tolist())
    expect_clusters = slice_kb * 1024 < ((C * x.element_size() + 15) // 16) * 16
    if torch.cuda.get_device_capability()[0] >= 9:
        assert (min(sizes) > 1) == expect_clusters, sizes
    for h in stamped.tolist():
        assert 0 <= h[1] < h[2] and h[5] > h[3] and h[6] > h[4], h[:8]
        for i in range(h[7]):
            s = h[HEADER + STAMPS * i: HEADER + STAMPS * (i + 1)]
            assert all(a <= b for a, b in zip(s[:7], s[1:7])), (h[:8], i, s)
            # the last warp's chunks landed and sweeps done: no earlier than thread 0's, before the block statistics
            assert s[1] <= s[8] <= s[3] and s[2] <= s[9] <= s[3], (h[:8], i, s)
