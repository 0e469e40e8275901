"""torch.compile (fullgraph, dynamic shapes), torch.library.opcheck on every op, CUDA graph capture."""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce_ext
from helpers import assert_close, reference
from softmax_ce_ext import cross_entropy, traced
from softmax_ce_ext._ops import ops

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _case(device, shape=(6, 9), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype).to(device)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).to(device)
    return x, t


@pytest.mark.parametrize("kw", [dict(), dict(reduction="none", label_smoothing=0.1), dict(reduction="sum")],
                         ids=["mean", "none-smoothing", "sum"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("path", ["function", "custom_op"])
def test_compile_fullgraph_forward_and_backward(device, kw, dynamic, path, monkeypatch):
    """Both ways traced code can take (softmax_ce_ext/traced.py): the autograd.Function, and custom ops with
    registered autograd formulas."""
    monkeypatch.setattr(traced, "PATH", path)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: cross_entropy(x, t, **kw).sum(), fullgraph=True, dynamic=dynamic)
    for shape in ((6, 9), (11, 9), (4, 9, 3)):  # a new batch size, then a K-dim input
        x, t = _case(device, shape)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a = fn(xa, t)
        b = F.cross_entropy(xb, t, **kw).sum()
        torch.testing.assert_close(a, b)
        a.backward()
        b.backward()
        torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("kw", [dict(), dict(reduction="sum"), dict(reduction="none", label_smoothing=0.1),
                                dict(weight="w", ignore_index=2)], ids=["mean", "sum", "none-smoothing", "mean-weighted"])
def test_compile_without_gradient(device, kw):
    """Traced under no_grad (evaluation): the loss alone (mean_forward for a mean of class indices, through its
    fake kernel), fullgraph, as eager PyTorch computes it."""
    torch._dynamo.reset()
    x, t = _case(device, (6, 9))
    if kw.get("weight") == "w":
        kw = {**kw, "weight": torch.rand(9, device=device) + 0.5}
    fn = torch.compile(lambda x, t: cross_entropy(x, t, **kw), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, t), F.cross_entropy(x, t, **kw))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_bfloat16(device, reduction):
    """bfloat16 losses come back through a real cast (float32 ones, whose .to() was a no-op, are the case that
    torch 2.11 got wrong): both must be right; checked against float64."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: cross_entropy(x, t, reduction=reduction).sum(), fullgraph=True)
    x, t = _case(device, (6, 9), dtype=torch.bfloat16)
    xa = x.clone().requires_grad_()
    a = fn(xa, t)
    a.backward()
    ref_loss, ref_grad = reference(x, t, torch.ones(6 if reduction == "none" else (), device=device),
                                   reduction=reduction)
    assert_close(a, ref_loss.sum(), torch.bfloat16, "loss", logit_scale=x.abs().max().item())
    assert_close(xa.grad, ref_grad, torch.bfloat16, "grad", logit_scale=x.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_inplace_backward(device, reduction):
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: cross_entropy(x * 2, t, reduction=reduction, inplace_backward=True).sum(),
                       fullgraph=True)
    x, t = _case(device, (6, 9))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = fn(xa, t)
    b = F.cross_entropy(xb * 2, t, reduction=reduction).sum()
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("path", ["function", "custom_op"])
def test_compile_probability_targets(device, path, reduction, monkeypatch):
    """Soft labels traced both ways, the gradient too (a mean of probabilities divides by the positions outside
    the kernel: on the custom-op way that division must not be differentiated on top of the op's own 1/N)."""
    monkeypatch.setattr(traced, "PATH", path)
    torch._dynamo.reset()
    x, _ = _case(device)
    y = torch.softmax(torch.randn_like(x), 1)
    kw = dict(label_smoothing=0.1, reduction=reduction)
    fn = torch.compile(lambda x, y: cross_entropy(x, y, **kw).sum(), fullgraph=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = fn(xa, y), F.cross_entropy(xb, y, **kw).sum()
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def _op_samples(device):
    """Arguments for every op, in each target kind and dtype family."""
    samples = []
    # (B, C, S) logits, and (B, C) ones with (B,) class indices (taken as they are: no view per call)
    for dtype, positions in ((torch.float32, (3,)), (torch.bfloat16, (3,)), (torch.float64, (3,)),
                             (torch.float32, ()), (torch.bfloat16, ())):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.randn(4, 7, *positions, dtype=dtype, device=device)
        idx = torch.randint(0, 7, (4, *positions), device=device)
        prob = torch.softmax(torch.randn(4, 7, *positions, device=device), 1).to(dtype)
        w = torch.rand(7, dtype=acc, device=device)
        status = torch.zeros(2, dtype=torch.int64, device=device)
        scale = torch.tensor(0.5, dtype=acc, device=device)
        for target, weight in ((idx, None), (idx, w), (prob, w)):
            ignore = 2 if target is idx else -100
            samples.append((ops.forward_rows, (x, target, weight, ignore, 0.1, status)))
            samples.append((ops.forward_backward, (x, target, weight, ignore, 0.1, scale, status)))
            _, stats = ops.forward_rows(x, target, weight, ignore, 0.1, status)
            rows = torch.rand(4, *(positions or (1,)), dtype=acc, device=device)
            samples.append((ops.backward, (rows, x, target, weight, stats, ignore, 0.1)))
            samples.append((ops.forward_backward_, (x.clone(), target, weight, ignore, 0.1, scale, status)))
            samples.append((ops.forward_sum, (x, target, weight, ignore, 0.1, status)))
            samples.append((ops.forward_sum, (x, target, weight, ignore, 0.1, None, scale, dtype)))
            # status=None: what traced code passes (nothing recorded, no mutated tensor in the graph)
            samples.append((ops.forward_rows, (x, target, weight, ignore, 0.1, None)))
            samples.append((ops.forward_backward, (x, target, weight, ignore, 0.1, scale, None)))
            # the mean's divisor and the loss's dtype folded into the sum
            samples.append((ops.forward_backward, (x, target, weight, ignore, 0.1, scale, status, scale, dtype)))
            samples.append((ops.forward_backward_, (x.clone(), target, weight, ignore, 0.1, scale, status, scale,
                                                    dtype)))
            samples.append((ops.backward_, (rows, x.clone(), target, weight, stats, ignore, 0.1)))
            if target is idx:  # the mean's ops take class indices only
                samples.append((ops.mean_forward, (x, target, weight, ignore, 0.1, status)))
                samples.append((ops.mean_forward, (x, target, weight, ignore, 0.1, None, dtype)))
                samples.append((ops.mean_forward_backward, (x, target, weight, ignore, 0.1, status)))
                samples.append((ops.mean_forward_backward, (x, target, weight, ignore, 0.1, None, dtype)))
                samples.append((ops.mean_forward_backward_, (x.clone(), target, weight, ignore, 0.1, status)))
                samples.append((ops.mean_forward_backward_, (x.clone(), target, weight, ignore, 0.1, None, dtype)))
                # the gradient's multiplier (the Function's guess of grad_output)
                samples.append((ops.mean_forward_backward, (x, target, weight, ignore, 0.1, status, None, scale)))
                samples.append((ops.mean_forward_backward_, (x.clone(), target, weight, ignore, 0.1, None, dtype,
                                                             scale)))
        if not positions:
            continue
        samples.append((ops.scale_grad_, (torch.randn(4, 7, 3, dtype=dtype, device=device), scale)))
        samples.append((ops.scale_grad_, (torch.randn(4, 7, 3, dtype=dtype, device=device), scale.to(torch.bfloat16))))
        # over the multiplier the forward applied, the predictor recording grad_output
        predictor = torch.tensor([1.0, 0.5, 0.0], dtype=acc, device=device)
        changes = torch.zeros(1, dtype=torch.int64, device=device)
        samples.append((ops.scale_grad_, (torch.randn(4, 7, 3, dtype=dtype, device=device), scale, scale * 2,
                                          predictor, changes)))
        samples.append((ops.sum_rows, (torch.randn(4, 3, dtype=acc, device=device),)))
        samples.append((ops.sum_rows, (torch.randn(4, 3, dtype=acc, device=device), scale, dtype)))
        t2 = torch.randint(0, 7, (4, 3), device=device)
        for w in (None, torch.rand(7, dtype=acc, device=device)):
            samples.append((ops.mean_scale, (t2, w, 2, acc)))
            samples.append((ops.mean_scale, (t2.t(), w, 2, acc)))  # strided targets
            samples.append((ops.mean_scale, (t2[:, 0], w, 2, acc)))  # (B,) targets of (B, C) logits, strided
    return samples


def test_opcheck_traced_ops(device):
    """The custom ops of traced.py (SOFTMAX_CE_COMPILE_PATH=custom_op), with their autograd formulas."""
    for dtype in (torch.float32, torch.bfloat16):
        acc = torch.float32
        x = torch.randn(4, 7, 3, dtype=dtype, device=device, requires_grad=True)
        idx = torch.randint(0, 7, (4, 3), device=device)
        scale = torch.tensor(0.5, dtype=acc, device=device)
        torch.library.opcheck(traced.rows_and_stats, (x, idx, None, 2, 0.1))
        # Not test_aot_dispatch_*: they hand the op's gradient output to the caller, whom the backward would
        # then scale in place; traced.cross_entropy keeps that output to itself (the compile tests run it).
        torch.library.opcheck(traced.train_loss, (x, idx, None, 2, 0.1, scale, scale * 4, dtype),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_every_op(device):
    samples = _op_samples(device)
    assert {op for op, _ in samples} == {ops.forward_rows, ops.forward_sum, ops.forward_backward, ops.backward,
                                         ops.forward_backward_, ops.backward_, ops.scale_grad_, ops.sum_rows,
                                         ops.mean_scale, ops.mean_forward, ops.mean_forward_backward,
                                         ops.mean_forward_backward_}
    # ... which are all the library's C++ ops (traced.py's two are opchecked below): a new op cannot be left out.
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("softmax_ce_ext::")}
    traced_ops = {"softmax_ce_ext::train_loss", "softmax_ce_ext::rows_and_stats"}
    assert {op._qualified_op_name for op, _ in samples} == registered - traced_ops
    for op, args in samples:
        torch.library.opcheck(op, args)


# (shape, loss keywords, tuning, why)
GRAPH_CASES = {
    "rows-smoothed": ((64, 1000), dict(label_smoothing=0.1), dict(), "warp rows, the smoothing sums"),
    "slices-clusters": ((8, 50000), dict(), dict(), "rows of 195 KiB in float32: slices over clusters of 4 CTAs, "
                        "the statistics exchanged by st.async and mbarriers (the default, tuning cluster_async)"),
    "slices-sync": ((8, 50000), dict(), dict(cluster_async=False), "the same, the statistics exchanged by plain "
                    "remote stores and cluster.sync()"),
    "kdim-mean-fold": ((4, 21, 16, 16), dict(), dict(kdim_fold=True), "K-dim mean training under kdim_fold: "
                       "captured without its cooperative launch (the unfolded path), which replays right"),
}


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_cuda_graph_captures_forward_and_backward(case):
    if not (softmax_ce_ext.cuda_built() and torch.cuda.is_available()):
        pytest.skip("needs CUDA")
    from softmax_ce_ext import tuning

    shape, kw, settings, _ = GRAPH_CASES[case]
    with tuning.using(**{**tuning.BUILT_IN, **settings}):
        _graph_matches_eager(shape, kw)


def _graph_matches_eager(shape, kw):
    x, t = _case("cuda", shape)
    x.requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (allocations, lazy init) outside the capture
        for _ in range(2):
            x.grad = None
            cross_entropy(x, t, **kw).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = cross_entropy(x, t, **kw)
        loss.backward()
    x.data.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = x.detach().clone().requires_grad_()
    expected = F.cross_entropy(ref, t, **kw)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, ref.grad)
