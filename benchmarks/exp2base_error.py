"""How exact the lean sweeps' exponent argument is (csrc/cuda/softmax_ce_chunks.cuh, Exp2Base), on the CPU.

The kernels compute e^(x - b) (b: a row's max; a saved log-sum-exp until 2026-11-28) as 2^((x - b) * L), L = log2(e) rounded to
float32.  The plain sweeps round x - b, then the product (two roundings); the lean ones take one FFMA,
fma(x, L, c) with c = -b' * L_hi exact (b' = b cut to 11 bits, L_hi = L's top 12 bits), times one per-row
factor k = 2^(b' L_hi - b L).  This emulates both in float32 arithmetic (an FFMA is the float64 result of
x * L + c rounded once: the product is exact in float64) and prints the largest relative error of each
against e^(x - b) in float64, before ex2.approx's own ~2^-22.  Run: python benchmarks/exp2base_error.py
"""

import torch

F32, F64 = torch.float32, torch.float64
L = torch.tensor(1.4426950408889634, dtype=F32)
L_HI = torch.tensor(float.fromhex("0x1.714p+0"), dtype=F32)
L_LO = torch.tensor(float.fromhex("0x1.476p-12"), dtype=F32)


def f32(t):
    return t.to(F32)


def cut11(b):
    """b with its low 13 mantissa bits cleared: 11 significant bits."""
    return (b.view(torch.int32) & -8192).view(F32)


def plain(x, b):
    return torch.exp2(f32(f32(x - b) * L).double())


def lean(x, b):
    b11 = cut11(b)
    c = f32(-b11.double() * L_HI.double())  # exact: 11 x 12 bits
    arg = f32(x.double() * L.double() + c.double())  # the FFMA, rounded once
    k_arg = f32(f32(b11 - b).double() * L.double() - f32(b11 * L_LO).double())
    k = torch.exp2(k_arg.double())  # exp2f is accurate to ~1 ulp: float64 here
    return torch.exp2(arg.double()) * f32(k).double()


def main():
    assert L_HI.item() + L_LO.item() == L.item(), "L = L_hi + L_lo exactly"
    g = torch.Generator().manual_seed(0)
    print("largest relative error against e^(x - b) in float64 (terms above 1e-30), before ex2.approx's")
    print(f"{'logits':>6} {'centre':>8} {'base':>4} {'plain':>9} {'lean':>9}")
    for centre in (0.0, 30.0, -2000.0, 4000.0):
        for dtype in (torch.bfloat16, torch.float32):
            x = f32((torch.randn(100000, generator=g, dtype=F64) * 4 + centre).to(dtype))
            m = x.max()
            lse = f32(torch.logsumexp(x.double(), 0))
            for name, b in (("max", m), ("lse", lse)):
                exact = torch.exp(x.double() - b.double())
                keep = exact > 1e-30
                errs = [((fn(x, b) / exact - 1).abs()[keep]).max().item() for fn in (plain, lean)]
                print(f"{str(dtype)[6:]:>6} {centre:8.0f} {name:>4} {errs[0]:9.2e} {errs[1]:9.2e}")


if __name__ == "__main__":
    main()
