"""The torch.compile gradient failure under torch 2.11 (H200 2026-11-26, H100 2026-11-27): the loss matched,
the gradient came back all zeros, on the CPU as on CUDA and with backend='eager' (Dynamo alone), while torch
2.14 was right.  AOTAutograd's backward graph (H100, CPU) ignored its tangent and scaled the gradient by a
zeros constant.  Cause, by pytorch#180642: the Function's output aliased an intermediate (a no-op .to() of
float32 losses, the view of the 'none' rows), and 2.11's Dynamo routed the gradient to that intermediate.  The
fix copies the output when traced; the other path (traced.py, SOFTMAX_CE_COMPILE_PATH=custom_op) takes custom
ops with registered autograd formulas and no Function.  Prints, per device, path, dtype and backend, how the
compiled gradient relates to PyTorch's (<grad, ref> / |ref|^2: 1 right, 0 zeros); float32 was the failing
case, bfloat16 (whose .to() copies anyway) the control; then the graphs AOTAutograd hands over for one case."""

import argparse

import torch
import torch.nn.functional as F

from softmax_ce_ext import cross_entropy, traced

CASES = [dict(reduction="sum"), dict(reduction="mean"), dict(reduction="none", label_smoothing=0.1)]


def _aot_print():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def show(kind):
        def compiler(gm, example_inputs):
            print(f"---- {kind} graph\n{gm.code}", flush=True)
            return make_boxed_func(gm.forward)
        return compiler
    return aot_autograd(fw_compiler=show("forward"), bw_compiler=show("backward"))


def run(device, dtype, backend, kw):
    try:
        torch._dynamo.reset()
        be = _aot_print() if backend == "aot_print" else backend
        fn = torch.compile(lambda x, t: cross_entropy(x, t, **kw).sum(), fullgraph=True, backend=be)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(6, 9, generator=g).to(device, dtype)
        t = torch.randint(0, 9, (6,), generator=g).to(device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a = fn(xa, t)
        a.backward()
        b = F.cross_entropy(xb, t, **kw).sum()
        b.backward()
        ga, gb = xa.grad.double(), xb.grad.double()
        ratio = ((ga * gb).sum() / (gb * gb).sum()).item()
        return f"loss diff {(a - b).abs().item():.1e}  grad ratio {ratio:.4f}"
    except Exception as e:  # noqa: BLE001  (a variant that cannot trace is a result too)
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:150]}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    ap.add_argument("--backends", nargs="+", default=["eager", "aot_eager", "inductor"])
    args = ap.parse_args()
    print(f"torch {torch.__version__}", flush=True)
    for path in ("function", "custom_op"):
        traced.PATH = path
        for device in args.devices:
            for dtype in (torch.float32, torch.bfloat16):
                for backend in args.backends:
                    for kw in CASES:
                        print(f"compiled {path:9s} {device:4s} {str(dtype)[6:]:8s} {backend:9s} {str(kw):45s} "
                              f"{run(device, dtype, backend, kw)}", flush=True)
    for path in ("function", "custom_op"):
        traced.PATH = path
        print(f"==== aot graphs: {path} {args.devices[0]} float32 {CASES[0]}", flush=True)
        print(run(args.devices[0], torch.float32, "aot_print", CASES[0]), flush=True)


if __name__ == "__main__":
    main()
