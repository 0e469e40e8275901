"""The CPU's instruction-set paths and its gradient-buffer reuse."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from softmax_ce_ext import _C, cross_entropy


def test_isa_list_and_choice():
    isas = _C.cpu_isas()
    assert isas[-1] == "generic" and set(isas) <= {"avx512", "avx2", "generic"}
    assert _C.cpu_isa() in isas
    with pytest.raises(ValueError, match="expected one of this CPU's instruction sets"):
        _C.set_cpu_isa("sse9")


def test_environment_variable_picks_the_path():
    code = "from softmax_ce_ext import _C; print(_C.cpu_isa())"
    env = dict(os.environ, SOFTMAX_CE_CPU_ISA="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "generic"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_paths_agree(dtype):
    """Every path gives the same numbers up to the dtype's rounding (they differ only in how exp is computed)."""
    g = torch.Generator().manual_seed(5)
    cases = [(torch.randn(33, 517, generator=g), torch.randint(0, 517, (33,), generator=g)),
             (torch.randn(3, 11, 9, 21, generator=g), torch.randint(0, 11, (3, 9, 21), generator=g))]
    previous = _C.cpu_isa()
    try:
        for x, t in cases:
            results = []
            for isa in _C.cpu_isas():
                _C.set_cpu_isa(isa)
                xg = x.to(dtype).requires_grad_()
                loss = cross_entropy(xg, t, label_smoothing=0.1, reduction="sum")
                loss.backward()
                results.append((loss.float(), xg.grad.float()))
            for loss, grad in results[1:]:
                torch.testing.assert_close(loss, results[0][0], rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=0)
                torch.testing.assert_close(grad, results[0][1], rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                           atol=1e-3 if dtype != torch.float32 else 1e-7)
    finally:
        _C.set_cpu_isa(previous)


def test_reused_gradient_blocks_hold_the_right_values():
    """Large gradients come from reused blocks: a block is handed out again only after its tensor died."""
    x = torch.randn(512, 8192, requires_grad=True)  # 16 MiB: large enough for the block path
    t = torch.randint(0, 8192, (512,))
    kept = []
    for step in range(4):
        x.grad = None
        cross_entropy(x * (step + 1), t).backward()
        kept.append(x.grad.clone() if step % 2 else x.grad)  # keep some buffers alive across steps
    for step, grad in enumerate(kept):
        ref = x.detach().clone().requires_grad_()
        F.cross_entropy(ref * (step + 1), t).backward()
        torch.testing.assert_close(grad, ref.grad)
    _C.empty_grad_cache()
