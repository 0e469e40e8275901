"""Bad input: PyTorch's exception class, and a message that says what was expected and what came."""

import re

import pytest
import torch
import torch.nn.functional as F

import softmax_ce_ext
from softmax_ce_ext import CrossEntropyLoss, cross_entropy


def long(*values):
    return torch.tensor(values, dtype=torch.long)


# (name, input, target, kwargs, exception class, message pattern)
CASES = [
    ("target above C", torch.randn(3, 4), long(0, 5, 1), {}, IndexError, r"Target 5 is out of bounds\."),
    ("negative target", torch.randn(3, 4), long(0, -3, 1), {}, IndexError, r"Target -3 is out of bounds\."),
    ("huge target", torch.randn(3, 4), long(0, 2**40, 1), {}, IndexError, r"Target 1099511627776 is out of bounds\."),
    ("K-dim target above C", torch.randn(2, 4, 3), long(0, 1, 2, 3, 9, 1).view(2, 3), {}, IndexError, r"Target 9 "),
    ("float class target", torch.randn(3, 4), torch.rand(3), {}, RuntimeError, r"Long or Byte, but got Float"),
    ("int32 class target", torch.randn(3, 4), long(0, 1, 2).int(), {}, RuntimeError, r"Long or Byte, but got Int$"),
    ("int16 class target", torch.randn(3, 4), long(0, 1, 2).short(), {}, RuntimeError,
     r"Long or Byte, but got Short$"),
    ("int8 class target", torch.randn(3, 4), long(0, 1, 2).char(), {}, RuntimeError, r"Long or Byte, but got Char$"),
    ("bool class target", torch.randn(3, 4), long(0, 1, 0).bool(), {}, RuntimeError, r"Long or Byte, but got Bool$"),
    ("long target of the input's shape", torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.long), {},
     RuntimeError, r"Expected floating point type for target with class probabilities, got Long$"),
    ("bfloat16 class target", torch.randn(3, 4), long(0, 1, 2).bfloat16(), {}, RuntimeError,
     r"Long or Byte, but got BFloat16$"),
    ("float target of another shape", torch.randn(3, 4), torch.rand(3, 5), {}, RuntimeError,
     r"^0D or 1D target tensor expected, multi-target not supported$"),
    ("1-D input, 2 float targets", torch.randn(4), torch.rand(2), {}, RuntimeError, r"Long or Byte, but got Float$"),
    ("0-d input", torch.tensor(1.0), long(0), {}, IndexError, r"got a 0-d tensor"),
    ("0-d target for 2-D input", torch.randn(3, 4), long(1)[0], {}, ValueError,
     r"^Expected input batch_size \(3\) to match target batch_size \(0\).$"),
    ("0-d target for an empty 2-D input", torch.randn(0, 4), long(1)[0], {}, IndexError,
     r"^Dimension specified as 0 but tensor has no dimensions$"),
    ("batch size mismatch", torch.randn(3, 4), long(0, 1, 2, 3), {}, ValueError,
     r"Expected input batch_size \(3\) to match target batch_size \(4\)"),
    ("weight of the wrong size", torch.randn(3, 4), long(0, 1, 2), dict(weight=torch.ones(5)), RuntimeError,
     r"all 4 classes or no classes but got weight tensor of shape: \[5\]"),
    ("weight of the wrong shape", torch.randn(3, 4), long(0, 1, 2), dict(weight=torch.ones(2, 2)), RuntimeError,
     r"all 4 classes or no classes but got weight tensor of shape: \[2, 2\]"),
    ("weight of the wrong size, probabilities", torch.randn(3, 4), torch.rand(3, 4), dict(weight=torch.ones(5)),
     RuntimeError, r"^cross_entropy: weight tensor should be defined either for all 4 classes or no classes but got "
     r"weight tensor of shape: \[5\]$"),
    ("label_smoothing above 1", torch.randn(3, 4), long(0, 1, 2), dict(label_smoothing=1.5), RuntimeError,
     r"label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
    ("ignore_index with probabilities", torch.randn(3, 4), torch.rand(3, 4), dict(ignore_index=1), RuntimeError,
     r"ignore_index is not supported for floating point target"),
    ("unknown reduction", torch.randn(3, 4), long(0, 1, 2), dict(reduction="avg"), ValueError,
     r"avg is not a valid value for reduction"),
    ("K-dim spatial mismatch", torch.randn(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=torch.long), {}, RuntimeError,
     r"^size mismatch \(got input: \[2, 3, 4, 5\] , target: \[2, 4, 6\]$"),
    ("K-dim rank mismatch", torch.randn(2, 3, 4, 5), torch.zeros(2, 4, dtype=torch.long), {}, RuntimeError,
     r"^only batches of spatial targets supported \(3D tensors\) but got targets of dimension: 2$"),
    ("K-dim float target, spatial mismatch", torch.randn(2, 3, 4, 5), torch.zeros(2, 4, 6), {}, RuntimeError,
     r"Long or Byte, but got Float$"),
    ("3-D spatial mismatch", torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long), {}, RuntimeError,
     r"^Expected target size \[2, 4\], got \[2, 5\]$"),
    ("3-D rank mismatch", torch.randn(2, 3, 4), torch.zeros(2, 4, 1, dtype=torch.long), {}, RuntimeError,
     r"^Expected target size \[2, 4\], got \[2, 4, 1\]$"),
    ("5-D spatial mismatch", torch.randn(2, 3, 4, 2, 2), torch.zeros(2, 4, 2, 3, dtype=torch.long), {},
     RuntimeError, r"^Expected target size \[2, 4, 2, 2\], got \[2, 4, 2, 3\]$"),
    ("K-dim batch mismatch", torch.randn(2, 3, 4, 5), torch.zeros(3, 4, dtype=torch.long), {}, ValueError,
     r"^Expected input batch_size \(2\) to match target batch_size \(3\).$"),
    ("2-D target for 2-D input", torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long), {}, RuntimeError,
     r"0D or 1D target tensor expected, multi-target not supported"),
    ("integer logits", torch.ones(3, 4, dtype=torch.long), long(0, 1, 2), {}, NotImplementedError, r"Long|int64"),
    ("C = 0", torch.randn(3, 0), long(0, 0, 0), {}, IndexError, r"Target 0 is out of bounds\."),
    ("1-D input, 2 targets", torch.randn(4), long(1, 2), {}, ValueError,
     r"For 1D input, 1D target must have size 1, but got target size: 2"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("form", ["functional", "module", "torch"])
def test_bad_input(device, case, form):
    _, x, t, kw, exc, pattern = case
    x, t = x.to(device), t.to(device)
    if "weight" in kw:
        kw = dict(kw, weight=kw["weight"].to(device))
    if form == "torch":  # the reference: PyTorch raises the same class (CPU: CUDA asserts on bad targets)
        if device == "cuda":
            pytest.skip("PyTorch's CUDA kernels assert instead of raising")
        with pytest.raises(exc) as theirs:
            F.cross_entropy(x, t, **kw)
        if pattern.endswith("$"):  # PyTorch's own message (torch 2.14), which ours repeats
            assert re.search(pattern, str(theirs.value)), str(theirs.value)
        return
    with pytest.raises(exc, match=pattern):
        if form == "functional":
            cross_entropy(x, t, **kw)
        else:
            CrossEntropyLoss(**kw)(x, t)
        softmax_ce_ext.check_errors()  # CUDA reports out-of-range targets lazily; this waits for them


def test_cuda_out_of_range_target_keeps_the_context_alive():
    if not (softmax_ce_ext.cuda_built() and torch.cuda.is_available()):
        pytest.skip("needs CUDA")
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    bad = torch.randint(0, 1000, (64,), device="cuda")
    bad[17] = 1000
    loss = cross_entropy(x, bad)  # no host synchronisation here
    assert torch.isnan(loss).item()
    with pytest.raises(IndexError, match=r"Target 1000 is out of bounds\."):
        softmax_ce_ext.check_errors()
    # The context still works, and the error was consumed.
    good = torch.randint(0, 1000, (64,), device="cuda")
    torch.testing.assert_close(cross_entropy(x, good), F.cross_entropy(x, good))
    softmax_ce_ext.check_errors()


def test_cuda_error_surfaces_on_a_later_call_without_waiting():
    if not (softmax_ce_ext.cuda_built() and torch.cuda.is_available()):
        pytest.skip("needs CUDA")
    x = torch.randn(8, 10, device="cuda")
    cross_entropy(x, torch.full((8,), 12, device="cuda"))
    torch.cuda.synchronize()  # let the kernel finish; the next call sees its report without waiting itself
    with pytest.raises(IndexError, match=r"Target 12 is out of bounds\."):
        cross_entropy(x, torch.zeros(8, dtype=torch.long, device="cuda"))


@pytest.mark.parametrize("layout", ["rows", "k-dim"])
def test_cuda_gradient_ops_with_an_out_of_range_target(layout):
    """The gradient-only ops (reduction='none''s backward, called before the forward's report lands, and
    under torch.compile never polled) meet the bad target again: NaN rows, a live context, no second report."""
    if not (softmax_ce_ext.cuda_built() and torch.cuda.is_available()):
        pytest.skip("needs CUDA")
    from softmax_ce_ext._ops import ops

    shape, tshape = ((64, 1000), (64,)) if layout == "rows" else ((2, 5, 8, 8), (2, 8, 8))
    x = torch.randn(shape, device="cuda")
    bad = torch.zeros(tshape, dtype=torch.long, device="cuda")
    bad.view(-1)[17] = shape[1]
    x3 = x.reshape(shape[0], shape[1], -1)
    t2 = bad.reshape(shape[0], -1)
    stats = torch.stack([torch.zeros(t2.shape, device="cuda"), torch.ones(t2.shape, device="cuda")])  # max, sum
    grad = ops.backward(torch.ones(t2.shape, device="cuda"), x3, t2, None, stats, -100, 0.0)
    torch.cuda.synchronize()  # an illegal address would surface here
    row = grad.movedim(1, -1).reshape(-1, shape[1])[17]
    assert torch.isnan(row).all()
    softmax_ce_ext.check_errors()  # the gradient ops report nothing themselves
    torch.testing.assert_close(cross_entropy(x, torch.zeros_like(bad)), F.cross_entropy(x, torch.zeros_like(bad)))


def test_cuda_status_must_be_addressable_by_the_gpu():
    """The raw ops take the status in pinned host memory (what the Python path passes) or on the GPU; ordinary
    host memory, which the kernels could not write, is refused before any launch."""
    if not (softmax_ce_ext.cuda_built() and torch.cuda.is_available()):
        pytest.skip("needs CUDA")
    from softmax_ce_ext._ops import ops

    x3 = torch.randn(4, 10, 1, device="cuda")
    t2 = torch.full((4, 1), 12, device="cuda")  # out of range: each status below gets the report
    for status in (torch.zeros(2, dtype=torch.int64, pin_memory=True), torch.zeros(2, dtype=torch.int64, device="cuda")):
        ops.forward_rows(x3, t2, None, -100, 0.0, status)
        torch.cuda.synchronize()
        assert status.tolist() == [1, 12]
    with pytest.raises(RuntimeError, match="pinned host memory"):
        ops.forward_rows(x3, t2, None, -100, 0.0, torch.zeros(2, dtype=torch.int64))


# (logits shape, target, why): the weight that requires grad is refused after the batch check and before the
# target's own checks, named by the ATen op PyTorch would run.
WEIGHT_GRAD_CASES = {
    "2-D": ((4, 5), lambda d: torch.tensor([0, 1, 2, 3], device=d), "nll_loss_forward"),
    "K-dim": ((4, 5, 3), lambda d: torch.zeros(4, 3, dtype=torch.long, device=d), "nll_loss2d_forward from 3-D"),
    "int32 target": ((4, 5), lambda d: torch.zeros(4, dtype=torch.int32, device=d), "before the target's dtype"),
    "4-D, wrong rank": ((4, 5, 2, 2), lambda d: torch.zeros(4, 2, dtype=torch.long, device=d), "before its rank"),
}


@pytest.mark.parametrize("case", list(WEIGHT_GRAD_CASES))
@pytest.mark.parametrize("kw", [dict(), dict(reduction="sum", label_smoothing=0.1), dict(reduction="none")],
                         ids=["mean", "sum-smoothed", "none"])
def test_class_index_weight_requiring_grad_is_refused_like_torch(device, case, kw):
    """PyTorch's nll_loss is not differentiable in its weight: it refuses a weight that requires grad (with grad
    mode on), and so do we, with its class and message, instead of a silent None gradient."""
    shape, make_target, _ = WEIGHT_GRAD_CASES[case]
    x = torch.randn(shape, device=device, requires_grad=True)
    t = make_target(device)
    w = torch.rand(5, device=device, requires_grad=True)
    with pytest.raises(RuntimeError) as theirs:
        F.cross_entropy(x, t, w, **kw)
    with pytest.raises(RuntimeError) as ours:
        cross_entropy(x, t, w, **kw)
    assert str(ours.value) == str(theirs.value)
    if t.dtype == torch.long and t.dim() == x.dim() - 1:
        with torch.no_grad():  # nothing to differentiate: both compute the loss
            torch.testing.assert_close(cross_entropy(x, t, w, **kw), F.cross_entropy(x, t, w, **kw))
