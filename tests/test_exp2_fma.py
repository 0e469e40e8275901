"""CUDA's ex2_fma (softmax_ce_chunks.cuh: 2^y on the FMA pipe, tuning fma_exp2), emulated step by step in float32 on
the CPU from the header's own constants: the polynomial's coefficients as written, the 1.5 * 2^23 split, the clamp,
the exponent bits.  The CUDA tests run the kernel itself; this one fails here when a constant or a step is wrong."""

import math
import re
from pathlib import Path

import pytest
import torch

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "softmax_ce_chunks.cuh"


def _body():
    text = HEADER.read_text()
    start = text.index("__device__ __forceinline__ float ex2_fma(float y)")
    return text[start:text.index("\n}\n", start)]


def _coefficients():
    """[c0 .. c5] from the Horner lines, highest first in the source."""
    body = _body()
    first = re.search(r"fmaf\(([0-9.e+-]+)f, f, ([0-9.e+-]+)f\)", body)
    rest = re.findall(r"fmaf\(p, f, ([0-9.e+-]+)f\)", body)
    high_to_low = [first.group(1), first.group(2), *rest]
    return [float(c) for c in reversed(high_to_low)]


def _split_and_clamp():
    """The rounding constant (1.5 * 2^23) and the clamp (-127), as written."""
    body = _body()
    magic = float(re.search(r"__fadd_rn\(yc, ([0-9.]+)f\)", body).group(1))
    clamp = float(re.search(r'"f"\((-[0-9.]+)f\)', body).group(1))
    return magic, clamp


def _f32(x):
    return x.to(torch.float32)


def _emulate(y):
    """ex2_fma in float32: each fmaf as one rounding of the exact float64 result (exact here: 24 x 24 bits)."""
    c = [torch.tensor(v, dtype=torch.float32) for v in _coefficients()]
    magic, clamp = (torch.tensor(v, dtype=torch.float32) for v in _split_and_clamp())
    yc = torch.where(torch.isnan(y), y, torch.maximum(y, clamp))  # max.NaN
    t = _f32(yc + magic)
    f = _f32(yc - _f32(t - magic))
    p = _f32(c[5].double() * f.double() + c[4].double())
    for k in (3, 2, 1, 0):
        p = _f32(p.double() * f.double() + c[k].double())
    bits = (t.view(torch.int32).to(torch.int64) << 23) + 0x3F800000
    scale = (bits & 0xFFFFFFFF).to(torch.int64)
    scale = torch.where(scale >= 2**31, scale - 2**32, scale).to(torch.int32).view(torch.float32)
    return _f32(p * scale)


def test_constants_are_read():
    c = _coefficients()
    assert len(c) == 6 and c[0] == 1.0 and abs(c[1] - math.log(2)) < 1e-6
    assert _split_and_clamp() == (1.5 * 2**23, -127.0)


@pytest.mark.parametrize("lo, hi, why", [(-0.5, 0.5, "one polynomial interval: the fit's own error"),
                                         (-30.0, 8.0, "where a sum's terms matter, up to Exp2Base's folded ~+7"),
                                         (-126.0, -100.0, "the smallest normal results")])
def test_relative_error_as_ex2_approx(lo, hi, why):
    y = torch.linspace(lo, hi, 400001, dtype=torch.float32)
    got = _emulate(y).double()
    ref = torch.exp2(y.double())
    assert (((got - ref).abs() / ref).max().item()) < 2.0**-22  # ex2.approx.f32's bound (PTX ISA)


def test_special_values():
    y = torch.tensor([0.0, -math.inf, math.nan, -127.0, -200.0, -126.6], dtype=torch.float32)
    out = _emulate(y)
    assert out[0].item() == 1.0  # the max element adds exactly 1 to its sum, as ex2.approx does
    assert out[1].item() == 0.0 and out[3].item() == 0.0 and out[4].item() == 0.0  # as ftz would flush
    assert math.isnan(out[2].item())
    assert 0.0 <= out[5].item() < 2.0**-126
