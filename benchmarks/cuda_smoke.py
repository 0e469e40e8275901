"""A quick look at every CUDA kernel family before the full tests: one line per (family, shape, dtype) with
the largest loss (with a gradient, and alone under no_grad) and gradient errors against float64 PyTorch.  Small
enough to run under compute-sanitizer (gpu_check.sh's 'sanitize' part).  Exit code 1 if any error exceeds its
dtype's tolerance."""

import sys

import torch
import torch.nn.functional as F

import softmax_ce_ext
from softmax_ce_ext import tuning

FAMILIES = {"auto": {}, "clusters": dict(slice_kb=1, ring_kb=0), "ring": dict(slice_kb=1, ring_kb=8),
            "plain": dict(lean=False, warp_ring=0, grad_piece_kb=0, warp_group=False, kdim_fold=False),
            "plain-ring": dict(slice_kb=1, ring_kb=8, lean=False), "warp-ring": dict(warp_ring=4),
            "grad-pieces": dict(grad_piece_kb=4), "no-slices": dict(slice_kb=1, cluster_max=1),
            "stream": dict(path="stream"), "plain-stream": dict(path="stream", lean=False),
            "legacy": dict(path="legacy"), "kdim-unfolded": dict(kdim_fold=False),
            "warp-keep": dict(warp_keep=True, warp_group=False),
            "ring-sync": dict(slice_kb=1, ring_kb=8, cluster_async=False), "warp-ungrouped": dict(warp_group=False),
            "dynamic-rows": dict(dynamic_rows=True), "kdim-dynamic": dict(dynamic_rows=True, kdim_fold=False),
            "pdl": dict(pdl=True)}
# (shape, why): a warp row; a row that the 'clusters' family (1 KiB slices) splits over 8-16 CTAs; a misaligned
# odd vocabulary; slices of 64 KiB (one CTA in bf16, a cluster of 2 in fp32); K-dim (the columns kernel)
SHAPES = [((64, 1000), "warp rows"), ((16, 4000), "clusters of 16 (fp32) / 8 (bf16) under 1 KiB slices"),
          ((8, 50257), "odd vocabulary"), ((4, 32000), "slices"), ((2, 21, 16, 16), "k-dim"),
          ((2048, 3001), "many rows per CTA: the next row's copies (prefetch, ring) at work"),
          ((16384, 700), "more rows than resident warps: warp_ring's staging (mean, float rows of 176 chunks) at work")]
# (label, smoothing, reduction): the smoothing sums in the fused pass; the fused pass without them (lean slices,
# staged float warp rows); the forward and the gradient from the saved stats (lean streaming, pieces)
MODES = [("mean, smoothed", 0.1, "mean"), ("mean", 0.0, "mean"), ("none", 0.0, "none")]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def errors(shape, dtype, inplace, smoothing, reduction):
    """Normalised max errors of the loss and the gradient against float64 PyTorch."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).cuda()
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).cuda()
    ref_x = x.double().requires_grad_()
    up = torch.rand(t.shape, generator=g).double().cuda() + 0.5 if reduction == "none" else None
    ref = F.cross_entropy(ref_x, t, label_smoothing=smoothing, reduction=reduction)
    ref.backward(up)
    leaf = x.clone().requires_grad_()
    logits = leaf.clone() if inplace else leaf
    loss = softmax_ce_ext.cross_entropy(logits, t, label_smoothing=smoothing, reduction=reduction,
                                        inplace_backward=inplace)
    loss.backward(None if up is None else up.to(loss.dtype))
    with torch.no_grad():  # the loss alone: its own path (a mean: mean_forward, the K-dim kernel's partial sums)
        alone = softmax_ce_ext.cross_entropy(x, t, label_smoothing=smoothing, reduction=reduction)
    softmax_ce_ext.check_errors()
    torch.cuda.synchronize()
    scale = ref_x.grad.abs().max().item()
    loss_err = max(((out.double() - ref).abs().max() / ref.abs().max()).item() for out in (loss, alone))
    return loss_err, (leaf.grad.double() - ref_x.grad).abs().max().item() / scale


def main():
    bad = False
    for family, settings in FAMILIES.items():
        tuning.set(**{**tuning.BUILT_IN, **settings})
        for shape, why in SHAPES:
            for dtype in TOL:
                for inplace in (False, True):
                    for label, smoothing, reduction in MODES:
                        le, ge = errors(shape, dtype, inplace, smoothing, reduction)
                        ok = le <= TOL[dtype] and ge <= TOL[dtype]
                        bad |= not ok
                        print(f"{family:>13} {'x'.join(map(str, shape)):>12} {str(dtype)[6:]:>8} "
                              f"{'inplace' if inplace else '':>7} {label:>14}"
                              f" loss {le:.1e} grad {ge:.1e} {'' if ok else 'MISMATCH'}  ({why})", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
