"""The torch.compile gradient failure seen on the H200 (2026-11-26, call 3): under torch.compile on CUDA the
gradient of every small case differed from PyTorch's in every element (relative difference 1.0: zero or
doubled), while the loss matched, eager CUDA passed, and the same tests pass on the CPU.  Prints, for each
case, how the compiled gradient relates to the reference; set TORCH_LOGS=output_code to see the generated
code (benchmarks/gpu_check.sh, part 'compile_debug')."""

import torch
import torch.nn.functional as F

from softmax_ce_ext import cross_entropy

CASES = [dict(reduction="sum"), dict(reduction="mean"), dict(reduction="none", label_smoothing=0.1)]


def main():
    for kw in CASES:
        for compiled in (False, True):
            torch._dynamo.reset()
            fn = lambda x, t: cross_entropy(x, t, **kw).sum()  # noqa: E731
            if compiled:
                fn = torch.compile(fn, fullgraph=True)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(6, 9, generator=g).cuda()
            t = torch.randint(0, 9, (6,), generator=g).cuda()
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            a = fn(xa, t)
            a.backward()
            b = F.cross_entropy(xb, t, **kw).sum()
            b.backward()
            ga, gb = xa.grad, xb.grad
            ratio = (ga * gb).sum() / (gb * gb).sum()  # 1: right, 0: zeros, 2: doubled
            print(f"{kw} compiled={compiled}: loss diff {(a - b).abs().item():.1e}, grad max diff "
                  f"{(ga - gb).abs().max().item():.3e}, <grad, ref> / |ref|^2 = {ratio.item():.4f}, "
                  f"grad zero: {bool((ga == 0).all())}", flush=True)


if __name__ == "__main__":
    main()
