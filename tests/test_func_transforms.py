"""torch.func transforms and forward-mode AD: every transform gives what it gives PyTorch's cross_entropy (in
float64, the reference), in the dtypes our untransformed call returns; outside transforms the kernels still run."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

from helpers import OpSpy, assert_close
from softmax_ce_ext import CrossEntropyLoss, SoftmaxCrossEntropyFunction, cross_entropy
from softmax_ce_ext import function as function_mod

# (logits shape, what the case is for)
SHAPES = {
    "rows": ((6, 7), "(N, C) rows: the LLM / classifier layout"),
    "kdim": ((3, 5, 2, 4), "(N, C, d1, d2): classes strided, targets (N, d1, d2)"),
    "unbatched": ((7,), "(C,): a 0-d target, a 0-d 'none' loss"),
}
# Options and why: each changes the algebra a transform differentiates through.
OPTIONS = {
    "mean": dict(reduction="mean"),
    "sum-smoothed": dict(reduction="sum", label_smoothing=0.2),
    "none-ignored": dict(reduction="none", ignore_index=1),
    "mean-weighted-ignored-smoothed": dict(reduction="mean", ignore_index=0, label_smoothing=0.3, weighted=True),
    "probabilities": dict(reduction="mean", probabilities=True),
}


def inputs(shape, opts, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    classes = shape[0] if len(shape) == 1 else shape[1]
    kw = {k: v for k, v in opts.items() if k not in ("weighted", "probabilities")}
    if opts.get("probabilities"):
        target = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), dim=0 if len(shape) == 1 else 1)
        target = target.to(dtype)
    else:
        tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
        target = torch.randint(0, classes, tshape, generator=g)
    if opts.get("weighted"):
        kw["weight"] = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    return x, target, kw


def in_double(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def reference_loss(target, kw):
    """PyTorch's loss in float64, as a function of the logits."""
    t = target.double() if target.is_floating_point() else target
    return lambda x: F.cross_entropy(x.double(), t, **in_double(kw))


def check(actual, expected, dtype, what):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert_close(actual, expected, dtype, what, logit_scale=8.0)


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES.values()], ids=SHAPES.keys())
def test_grad_and_jacrev(shape, opts):
    x, target, kw = inputs(shape, opts)
    ours = lambda x: cross_entropy(x, target, **kw)  # noqa: E731
    ref = reference_loss(target, kw)
    if kw["reduction"] == "none":  # a vector (or 0-d) loss: its Jacobian
        check(jacrev(ours)(x), jacrev(ref)(x.double()), torch.float32, "jacrev")
    else:
        check(grad(ours)(x), grad(ref)(x.double()), torch.float32, "grad")


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_per_sample_gradients(opts):
    """vmap(grad): the per-sample gradients of the torch.func tutorial, each sample a batch of one."""
    x, target, kw = inputs((5, 6), opts)
    one = lambda x, t: cross_entropy(x[None], t[None], **kw).sum()  # noqa: E731  ('none': a 1-row loss)
    ref_one = lambda x, t: F.cross_entropy(  # noqa: E731
        x[None], (t.double() if t.is_floating_point() else t)[None], **in_double(kw)).sum()
    check(vmap(grad(one))(x, target), vmap(grad(ref_one))(x.double(), target), torch.float32, "vmap(grad)")


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("no_grad", [False, True], ids=["grad-mode", "no-grad"])
def test_vmap_loss(opts, no_grad):
    """vmap over a leading dimension of (B, N, C) logits: one loss per B, also under no_grad (its own path)."""
    x, target, kw = inputs((12, 6), opts)
    x, t = x.view(3, 4, 6), target.view(3, 4, *target.shape[1:])  # 3 batches of (4, 6) rows
    ref_t = t.double() if t.is_floating_point() else t
    try:
        expected = vmap(lambda x, t: F.cross_entropy(x, t, **in_double(kw)))(x.double(), ref_t)
    except RuntimeError as e:  # PyTorch's weighted, smoothed mean takes masked_select, which vmap refuses
        assert "masked_select" in str(e) and kw.get("label_smoothing") and "weight" in kw
        with pytest.raises(RuntimeError, match="masked_select"):  # ours is PyTorch's op there: the same error
            vmap(lambda x, t: cross_entropy(x, t, **kw))(x, t)
        return
    with torch.set_grad_enabled(not no_grad):
        got = vmap(lambda x, t: cross_entropy(x, t, **kw))(x, t)
    check(got, expected, torch.float32, "vmap")


@pytest.mark.parametrize("opts", [OPTIONS["mean"], OPTIONS["mean-weighted-ignored-smoothed"]], ids=["mean", "all"])
def test_jvp_and_forward_ad(opts):
    """Forward mode: torch.func.jvp and a dual tensor of torch.autograd.forward_ad (not a functorch transform)."""
    x, target, kw = inputs((6, 7), opts)
    tangent = torch.randn_like(x)
    ref = reference_loss(target, kw)
    _, expected = jvp(ref, (x.double(),), (tangent.double(),))
    _, got = jvp(lambda x: cross_entropy(x, target, **kw), (x,), (tangent,))
    check(got, expected, torch.float32, "jvp")
    with forward_ad.dual_level():
        loss = cross_entropy(forward_ad.make_dual(x, tangent), target, **kw)
        got = forward_ad.unpack_dual(loss).tangent
    check(got, expected, torch.float32, "forward_ad")


def test_hessian():
    """Second order through a transform (the composite's double backward)."""
    x, target, kw = inputs((3, 4), OPTIONS["sum-smoothed"])
    got = hessian(lambda x: cross_entropy(x, target, **kw))(x)
    check(got, hessian(reference_loss(target, kw))(x.double()), torch.float32, "hessian")


def test_functional_call_of_a_model():
    """grad over a module's parameters (functional_call): the logits are a transformed intermediate."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 7).double()
    data, target = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 7, (8,))
    params = dict(model.named_parameters())
    loss = CrossEntropyLoss(label_smoothing=0.1)
    got = grad(lambda p: loss(functional_call(model, p, (data,)), target))(params)
    expected = grad(lambda p: F.cross_entropy(functional_call(model, p, (data,)), target, label_smoothing=0.1))(params)
    for name in params:
        assert_close(got[name], expected[name], torch.float64, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", [OPTIONS["mean"], OPTIONS["probabilities"]], ids=["indices", "probabilities"])
def test_half_logits_dtypes(dtype, opts):
    """Half logits: the loss in the dtype of our untransformed call, computed in float32 (PyTorch's half
    intermediates are not used), the gradient in the logits' dtype."""
    x, target, kw = inputs((6, 7), opts, dtype=dtype)
    plain = cross_entropy(x, target, **kw)
    got_loss = vmap(lambda x: cross_entropy(x, target, **kw))(x[None])[0]
    assert got_loss.dtype == plain.dtype
    assert_close(got_loss, reference_loss(target, kw)(x), dtype, "loss")
    got = grad(lambda x: cross_entropy(x, target, **kw).float())(x)
    check(got, grad(reference_loss(target, kw))(x.double()), dtype, "grad")


def test_function_apply_under_grad():
    """The autograd.Function called directly routes too (functorch would refuse its ctx-style forward)."""
    x, target, _ = inputs((6, 7), OPTIONS["mean"])
    got = grad(lambda x: SoftmaxCrossEntropyFunction.apply(x, target))(x)
    check(got, grad(reference_loss(target, {}))(x.double()), torch.float32, "apply")


def test_kernels_outside_transforms_only(monkeypatch):
    """Outside a transform the fused kernels run (and nothing of PyTorch's cross_entropy); inside, none of ours."""
    spy = OpSpy(function_mod.ops)
    monkeypatch.setattr(function_mod, "ops", spy)
    x, target, _ = inputs((6, 7), OPTIONS["mean"])
    x.requires_grad_()
    cross_entropy(x, target).backward()
    with forward_ad.dual_level():  # a dual level open, no dual tensor: still our kernels
        with torch.no_grad():
            cross_entropy(x, target)
    assert spy.calls == ["mean_forward_backward", "scale_grad_", "mean_forward"]
    spy.calls.clear()
    grad(lambda x: cross_entropy(x, target))(x.detach())
    vmap(lambda x: cross_entropy(x, target))(x.detach()[None])
    assert spy.calls == []


def test_tolerances_bind():
    """The comparison above can fail: a float32 gradient off by 1% is caught."""
    x, target, kw = inputs((6, 7), OPTIONS["mean"])
    good = grad(reference_loss(target, kw))(x.double())
    with pytest.raises(AssertionError):
        check((good * 1.01).float(), good, torch.float32, "perturbed")


def test_float16_mean_past_its_sum_range():
    """PyTorch's float16 mean sums in float16 (8192 rows of loss 30: inf); ours, transformed too, sums in float32."""
    x = torch.zeros(8192, 10, dtype=torch.float16)
    x[:, 0] = 30
    target = torch.ones(8192, dtype=torch.int64)
    assert F.cross_entropy(x, target).isinf()  # what this test is about; ours untransformed: 30
    got = vmap(lambda x: cross_entropy(x, target))(x[None])
    assert got.dtype == torch.float16 and got.item() == 30.0


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("transform", ["grad", "vmap(grad)"])
def test_compiled_transform(transform):
    """torch.compile of a transform: Dynamo traces an autograd.Function's forward and backward, never its apply,
    so routing through the Function would be invisible to it (that gave a zero gradient); the functional routes
    before the Function."""
    torch._dynamo.reset()
    x, target, kw = inputs((6, 7), OPTIONS["sum-smoothed"])
    if transform == "grad":
        got = torch.compile(grad(lambda x: cross_entropy(x, target, **kw)))(x)
        expected = grad(reference_loss(target, kw))(x.double())
    else:
        one = lambda x, t: cross_entropy(x[None], t[None], **kw)  # noqa: E731
        got = torch.compile(vmap(grad(one)))(x, target)
        expected = vmap(grad(lambda x, t: F.cross_entropy(x[None], t[None], **in_double(kw))))(x.double(), target)
    check(got, expected, torch.float32, transform)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_transform_of_the_function_itself():
    """The Function called directly, compiled under a transform: fullgraph traced its forward/backward and gave a
    wrong gradient; now it refuses, with a message; with graph breaks allowed it runs eagerly, and right."""
    torch._dynamo.reset()
    x, target, _ = inputs((6, 7), OPTIONS["mean"])
    f = lambda x: SoftmaxCrossEntropyFunction.apply(x, target, None, -100, "sum")  # noqa: E731
    with pytest.raises(Exception, match="under a torch.func transform"):
        torch.compile(grad(f), fullgraph=True)(x)
    torch._dynamo.reset()
    expected = grad(reference_loss(target, dict(reduction="sum")))(x.double())
    check(torch.compile(grad(f))(x), expected, torch.float32, "graph breaks")
