"""Bitwise determinism: the same inputs give the same loss and gradient bits, run after run, and on the CPU
whatever the thread count."""

import pytest
import torch

from softmax_ce_ext import cross_entropy

# (the first has enough rows that at::sum itself would split its reduction by thread count)
SHAPES = [(200_000, 3), (64, 5000), (8, 7, 31, 29)]


def run(x, t, **kw):
    xg = x.clone().requires_grad_()
    loss = cross_entropy(xg, t, **kw)
    loss.backward(torch.ones_like(loss) if loss.dim() else None)
    return loss.detach(), xg.grad


def _case(shape, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).to(device)
    return x, t, torch.rand(shape[1], generator=g).to(device)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_same_bits_run_after_run(device, kernel_path, shape, reduction):
    x, t, w = _case(shape, device)
    first = run(x, t, weight=w, reduction=reduction, label_smoothing=0.1)
    for _ in range(3):
        again = run(x, t, weight=w, reduction=reduction, label_smoothing=0.1)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", ["cpu"])
def test_cpu_bits_do_not_depend_on_thread_count(device, kernel_path, shape, dtype):
    x, t, w = _case(shape, "cpu", dtype)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 8):
            torch.set_num_threads(threads)
            results.append(run(x, t, weight=w, label_smoothing=0.1))
    finally:
        torch.set_num_threads(before)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
