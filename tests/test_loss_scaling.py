"""Loss scaling (GradScaler's grad_output of 2^k) with half-precision logits: the gradient of a mean is
(p - y) / N, whose small entries float16 cannot hold, and the scaling exists to keep them.  PyTorch rounds
grad_output / N * (p - y) once; a gradient written in the forward and scaled afterwards had already lost them
(48% of the entries of a 4096 x 1000 mean were 0 at grad_output 1024).  float16 therefore takes the gradient
from the saved row stats in the backward; bfloat16 and float32 keep the fused pass (their range holds the entries)."""

import pytest
import torch

import softmax_ce_ext.function as function_mod
from helpers import OpSpy, assert_close, reference
from softmax_ce_ext import cross_entropy

# (shape, why): rows of 1000 classes (entries (p - y) / N down to ~1e-9 at N = 4096); K-dim positions
SHAPES = [((4096, 1000), "rows"), ((4, 21, 32, 32), "k-dim: (N, C, H, W)")]


def _case(device, dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).to(device)
    t.view(-1)[::7] = -100
    return x, t


@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[w for _, w in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("scale", [1024.0, 32768.0])
@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
def test_scaled_gradient_keeps_small_entries(device, shape, dtype, reduction, scale, inplace):
    x, t = _case(device, dtype, shape)
    if reduction == "sum":
        scale /= 4096  # a sum's entries are N times a mean's: the same magnitudes, and no overflow
    grad_out = torch.tensor(scale, device=device)
    xo = x.clone().requires_grad_()
    loss = cross_entropy(xo * 1 if inplace else xo, t, reduction=reduction, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, xo, grad_out.to(loss.dtype))
    ref_loss, ref_grad = reference(x, t, grad_out, reduction=reduction)
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=x.abs().max().item())
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=x.abs().max().item())
    # Entry by entry, not only within the tolerance of the largest: none that the dtype holds comes out 0.
    held = ref_grad.to(dtype) != 0
    lost = (grad == 0) & held
    assert int(lost.sum()) == 0, f"{int(lost.sum())} of {int(held.sum())} gradient entries lost to 0"


@pytest.mark.parametrize("dtype,calls", [(torch.float16, ["forward_rows", "backward"]),
                                         (torch.bfloat16, ["mean_forward_backward", "scale_grad_"])], ids=str)
def test_which_pass_each_dtype_takes(device, monkeypatch, dtype, calls):
    """float16: the loss and the rows' max and sum, then the gradient from them; bfloat16: the fused pass, then its scaling."""
    spy = OpSpy(function_mod.ops)
    monkeypatch.setattr(function_mod, "ops", spy)
    x, t = _case(device, dtype, (64, 100))
    cross_entropy(x.requires_grad_(), t).backward()
    assert spy.calls == calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "one-element-off"])
@pytest.mark.parametrize("grad_out", [0.5, 3.0])
def test_scaling_pass_over_any_buffer(device, dtype, offset, grad_out):
    """The backward's scaling of the fused gradient (grad_output != 1), in place over dense logits whose buffer
    starts on a 16-byte boundary (16-byte accesses, then the elements past the last whole chunk: 7 x 1001 is odd)
    or one element past it (element by element)."""
    n, c = 7, 1001
    g = torch.Generator().manual_seed(offset)
    flat = (torch.randn(n * c + offset, generator=g) * 2).to(dtype).to(device)
    x = flat[offset:].view(n, c)
    t = torch.randint(0, c, (n,), generator=g).to(device)
    ref_loss, ref_grad = reference(x, t, torch.tensor(grad_out, device=device), reduction="sum")
    leaf = flat.clone().requires_grad_()
    logits = (leaf * 1)[offset:].view(n, c)  # not a leaf (in place may write over it), the buffer's offset kept
    assert logits.data_ptr() % 16 == (0 if offset == 0 else dtype.itemsize)
    loss = cross_entropy(logits, t, reduction="sum", inplace_backward=True)  # the gradient now in that buffer
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=device))  # scaled there, then to the leaf
    grad = leaf.grad[offset:].view(n, c)
    assert_close(loss, ref_loss, dtype, "loss", logit_scale=x.abs().max().item())
    assert_close(grad, ref_grad, dtype, "grad", logit_scale=x.abs().max().item())


# A loss multiplied before its backward (bfloat16/float32/float64 logits: the fused pass): the forward writes the
# gradient times its guess of grad_output, which the backwards set (softmax_ce_ext/_predict.py).
GUESS_DTYPES = [torch.bfloat16, torch.float32, torch.float64]


def _steps(device, dtype, factors, reduction="mean", inplace=False, weight=None, seed=0):
    """One training step per factor, the loss multiplied by it: (each step's gradient, each step's reference)."""
    x, t = _case(device, dtype, (300, 1000), seed)
    grads, refs = [], []
    for f in factors:
        xo = x.clone().requires_grad_()
        loss = cross_entropy(xo * 1 if inplace else xo, t, weight=weight, reduction=reduction,
                             inplace_backward=inplace)
        (loss * f).backward()
        grads.append(xo.grad)
        g = torch.tensor(torch.tensor(f, dtype=loss.dtype).item(), dtype=torch.float64, device=device)  # as it arrives
        refs.append(reference(x, t, g, reduction=reduction, weight=weight)[1])
    return x, t, grads, refs


def _state(device, dtype):
    from softmax_ce_ext import _predict
    return _predict.state_for(torch.device(device), torch.float64 if dtype == torch.float64 else torch.float32)


def _predictor(device, dtype):
    return _state(device, dtype).predictor


@pytest.mark.parametrize("dtype", GUESS_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
def test_repeated_factor_is_written_in_the_forward(device, dtype, reduction, inplace):
    """loss * 0.3 at every step (gradient accumulation's 1/steps): after two backwards the guess is 0.3, so from
    the third step the forward writes 0.3 * (p - y) / d rounded once and the backward leaves it: the same bits at
    every later step, those of the op given that multiplier.  Every step is PyTorch's gradient within the tolerance."""
    from softmax_ce_ext._ops import ops

    f = 0.3
    x, t, grads, refs = _steps(device, dtype, [f] * 4, reduction, inplace)
    for grad, ref in zip(grads, refs):
        assert_close(grad, ref, dtype, "grad", logit_scale=x.abs().max().item())
    g = torch.tensor(f, dtype=dtype).item()  # grad_output arrives in the loss's dtype
    state = _predictor(device, dtype)
    assert state.tolist() == [g, g, 0.0]  # the guess, the last grad_output, no change at the last backward
    assert torch.equal(grads[2], grads[3])
    acc = state.dtype
    mul = torch.tensor(g, dtype=acc, device=device)
    if reduction == "mean":
        _, written, _, used = ops.mean_forward_backward(x, t, None, -100, 0.0, None, None, mul)
        assert used.item() == g
    else:
        _, written = ops.forward_backward(x, t, None, -100, 0.0, mul, None)
    assert torch.equal(grads[3], written)


@pytest.mark.parametrize("dtype", GUESS_DTYPES, ids=str)
def test_power_of_two_factor_gives_the_same_bits_at_every_step(device, dtype):
    """loss / 4 after an unscaled step (one change of factor: the guess, not the deferred route): scaling by a power
    of two is exact, so the first steps (written, then scaled) and the later ones (written times the guess) agree bit
    for bit, and with the unscaled gradient / 4."""
    x, t, grads, _ = _steps(device, dtype, [1.0, 0.25, 0.25, 0.25, 0.25])
    assert _predictor(device, dtype)[0].item() == 0.25
    for grad in grads[1:]:
        assert torch.equal(grad, grads[0] * 0.25)


@pytest.mark.parametrize("dtype", GUESS_DTYPES, ids=str)
def test_changing_factors_stay_right(device, dtype):
    """A guess that turns out wrong costs the scaling pass by grad_output / guess (one more rounding), never a
    wrong gradient: a factor that settles, then changes, returns to 1, alternates; zero, negative, huge, NaN."""
    factors = [0.3, 0.3, 0.3, 1.0, 1.0, 0.7, 0.3, 0.7, -2.0, -2.0, 0.0, 1.0, 2.0**40, 2.0**40, 0.5]
    x, t, grads, refs = _steps(device, dtype, factors, weight=None)
    for f, grad, ref in zip(factors, grads, refs):
        assert_close(grad, ref, dtype, f"grad at factor {f}", logit_scale=x.abs().max().item(),
                     scale_floor=ref.abs().max().item())
    assert _predictor(device, dtype)[0].item() == -2.0  # the last factor seen twice in a row (2^40: not taken)
    _, _, grads, _ = _steps(device, dtype, [float("nan")] * 3)
    assert grads[2].isnan().all()


def test_losses_with_different_factors_in_one_step(device):
    """Two losses of one graph, weighted 1 and 0.3 (an auxiliary loss): their backwards alternate the factors, so
    no guess settles and each gradient is the sum's, step after step."""
    dtype = torch.float32
    x, t = _case(device, dtype, (200, 500))
    x2, t2 = _case(device, dtype, (200, 500), seed=1)
    for _ in range(4):
        a, b = x.clone().requires_grad_(), x2.clone().requires_grad_()
        (cross_entropy(a, t) + 0.3 * cross_entropy(b, t2, reduction="sum")).backward()
        assert_close(a.grad, reference(x, t, torch.tensor(1.0, device=device))[1], dtype, "first")
        assert_close(b.grad, reference(x2, t2, torch.tensor(0.3, device=device), reduction="sum")[1], dtype, "second")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_predictor_rule(device, dtype):
    """scale_grad_'s predictor {guess, last grad_output}: a grad_output seen twice in a row becomes the guess if it
    is finite and within 2^-32..2^32 in magnitude; the gradient is scaled by grad_output / the multiplier the
    forward used, and left as it is where they are equal."""
    from softmax_ce_ext._ops import ops

    state = torch.tensor([1.0, float("nan"), -1.0], dtype=dtype, device=device)
    grad = torch.ones(5, dtype=dtype, device=device)
    expected_guess = [(0.3, 1.0), (0.3, 0.3), (1.0, 0.3), (-0.5, 0.3), (-0.5, -0.5), (float("inf"), -0.5),
                      (float("inf"), -0.5), (2.0**33, -0.5), (2.0**33, -0.5), (2.0**-32, -0.5), (2.0**-32, 2.0**-32)]
    as_dtype = lambda v: torch.tensor(v, dtype=dtype).item()  # noqa: E731
    for g, guess in expected_guess:
        ops.scale_grad_(grad, torch.tensor(g, dtype=dtype, device=device), None, state)
        assert state[0].item() == as_dtype(guess) and state[1].item() == as_dtype(g), (g, state.tolist())
    used = torch.tensor(0.25, dtype=dtype, device=device)
    buf = torch.full((3, 7), 2.0, dtype=dtype, device=device)
    ops.scale_grad_(buf, torch.tensor(0.25, dtype=dtype, device=device), used)
    assert (buf == 2.0).all()  # equal: skipped
    ops.scale_grad_(buf, torch.tensor(1.0, dtype=dtype, device=device), used)
    assert (buf == 8.0).all()  # times 1 / 0.25
    strided = torch.full((4, 6), 2.0, dtype=dtype, device=device)[:, ::2]
    ops.scale_grad_(strided, torch.tensor(0.5, dtype=dtype, device=device), used, state)
    assert (strided == 4.0).all() and state[1].item() == 0.5


def test_second_backward_repeats_a_guessed_gradient(device):
    """retain_graph: a second backward runs the forward's pass again with the multiplier the forward used, so its
    gradient has the first one's bits, whatever the guess is by then."""
    x, t = _case(device, torch.float32, (100, 300))
    _steps(device, torch.float32, [0.3, 0.3])  # the guess is now 0.3
    xo = x.clone().requires_grad_()
    loss = cross_entropy(xo, t) * 0.3
    (first,) = torch.autograd.grad(loss, xo, retain_graph=True)
    (second,) = torch.autograd.grad(loss, xo)
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["dense", "offset-by-one", "permuted", "strided"])
def test_scaling_pass_rounds_once(device, kernel_path, dtype, layout):
    """scale_grad_ where the guess missed: each entry times grad_output / the multiplier, computed in the
    accumulation dtype and rounded to the gradient's once (every CPU instruction set's loop, its tail of fewer than
    a vector's elements, the CUDA kernel's 16-byte and element passes, ATen for strided ones)."""
    from softmax_ce_ext._ops import ops

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(5)
    flat = (torch.randn(7 * 1001 + 1, generator=g) * 100).to(dtype).to(device)
    grad = {"dense": flat[:-1].view(7, 1001), "offset-by-one": flat[1:].view(7, 1001),
            "permuted": flat[:-1].view(7, 1001).t(), "strided": flat[:-1].view(7, 1001)[:, ::2]}[layout]
    expected = (grad.to(acc) * (torch.tensor(0.3, dtype=acc) / torch.tensor(0.7, dtype=acc)).item()).to(dtype)
    ops.scale_grad_(grad, torch.tensor(0.3, dtype=acc, device=device), torch.tensor(0.7, dtype=acc, device=device))
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("dtype", GUESS_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
def test_factor_changing_every_step_takes_the_deferred_gradient(device, monkeypatch, dtype, reduction, inplace):
    """A factor that changes at every backward (a sum over a count of items that differs per batch) is never
    guessed: after two changes in a row the forward keeps the rows' max and sum and the backward writes the
    gradient with grad_output in it (float16's route: 3 passes where written-then-scaled is 4), recording
    grad_output; once a factor repeats, the written gradient and its guess return.  Right gradients throughout."""
    spy = OpSpy(function_mod.ops)
    monkeypatch.setattr(function_mod, "ops", spy)
    # (the spy names the ops that are not in place)
    fused = ([] if inplace else ["mean_forward_backward" if reduction == "mean" else "forward_backward"]) + ["scale_grad_"]
    deferred = ["forward_rows"] + ([] if inplace else ["backward"]) + ["scale_grad_"]
    factors = [0.3, 0.5, 0.7, 0.9, 0.9, 0.9, 0.9]
    routes = [fused, fused, fused, deferred, deferred, fused, fused]  # changes: 0 (the first), 1, 2, 2, 0, 0, 0
    x, t = _case(device, dtype, (300, 2048))  # the CPU defers from 2048 classes on (function._defers_pay)
    for f, route in zip(factors, routes):
        spy.calls.clear()
        xo = x.clone().requires_grad_()
        loss = cross_entropy(xo * 1 if inplace else xo, t, reduction=reduction, inplace_backward=inplace)
        (loss * f).backward()
        if device == "cuda":
            torch.cuda.synchronize()  # the backward's count of changes in host memory before the next forward
        assert spy.calls == route, (f, spy.calls)
        g = torch.tensor(torch.tensor(f, dtype=loss.dtype).item(), dtype=torch.float64, device=device)
        ref = reference(x, t, g, reduction=reduction)[1]
        assert_close(xo.grad, ref, dtype, f"grad at factor {f}", logit_scale=x.abs().max().item())
    assert _predictor(device, dtype)[0].item() == torch.tensor(0.9, dtype=dtype).item()


def test_cpu_rows_under_2048_classes_keep_the_written_gradient(monkeypatch):
    """On the CPU the deferred route recomputes the exponentials, which lost to the scaling pass below 2048 classes:
    a factor that keeps changing there stays written-then-scaled (and right)."""
    spy = OpSpy(function_mod.ops)
    monkeypatch.setattr(function_mod, "ops", spy)
    x, t = _case("cpu", torch.float32, (300, 1000))
    for f in (0.3, 0.5, 0.7, 0.9):
        spy.calls.clear()
        xo = x.clone().requires_grad_()
        (cross_entropy(xo, t) * f).backward()
        assert spy.calls == ["mean_forward_backward", "scale_grad_"]
        assert_close(xo.grad, reference(x, t, torch.tensor(f, dtype=torch.float64))[1], torch.float32, f"factor {f}")


def test_deferred_route_over_strided_logits_in_place(device):
    """The deferred route in place over strided logits (a slice of a wider buffer: the gradient written in their
    strides), then a factor of 0: the gradient is 0, as PyTorch's, not NaN from a scaling by g / g (its recording
    of grad_output touches no gradient)."""
    g = torch.Generator().manual_seed(7)
    wide = (torch.randn(64, 2100, generator=g) * 2).to(device)
    t = torch.randint(0, 2048, (64,), generator=g).to(device)
    t[::5] = -100
    for f in (0.3, 0.5, 0.7, 0.0):  # two changes in a row before the last step: it is deferred
        leaf = wide.clone().requires_grad_()
        logits = (leaf * 1)[:, :2048]
        (cross_entropy(logits, t, inplace_backward=True) * f).backward()
        if device == "cuda":
            torch.cuda.synchronize()
    assert (leaf.grad == 0).all()
