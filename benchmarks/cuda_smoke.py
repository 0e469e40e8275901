"""A quick look at every CUDA kernel family before the full tests: one line per (family, shape, dtype) with
the largest loss and gradient errors against float64 PyTorch.  Small enough to run under compute-sanitizer
(gpu_check.sh's 'sanitize' part).  Exit code 1 if any error exceeds its dtype's tolerance."""

import sys

import torch
import torch.nn.functional as F

import softmax_ce_ext
from softmax_ce_ext import tuning

FAMILIES = {"auto": {}, "clusters": dict(slice_kb=1, ring_kb=0), "ring": dict(slice_kb=1, ring_kb=8),
            "ahead": dict(ring_kb=72, warp_ahead=True, l2_keep=True), "pipeline": dict(pipeline=8),
            "pipeline-clusters": dict(slice_kb=1, pipeline=4),
            "lean": dict(lean=True), "lean-ring": dict(slice_kb=1, ring_kb=8, lean=True),
            "lean-stream": dict(path="stream", lean=True), "warp-ring": dict(warp_ring=4),
            "warp-ring-lean": dict(warp_ring=4, lean=True),
            "no-slices": dict(slice_kb=1, cluster_max=1), "stream": dict(path="stream"),
            "stream8": dict(path="stream", stream_loads=8), "legacy": dict(path="legacy")}
# (shape, why): a warp row; a row that the 'clusters' family (1 KiB slices) splits over 8-16 CTAs; a misaligned
# odd vocabulary; slices of 64 KiB (one CTA in bf16, a cluster of 2 in fp32); K-dim (the columns kernel)
SHAPES = [((64, 1000), "warp rows"), ((16, 4000), "clusters of 16 (fp32) / 8 (bf16) under 1 KiB slices"),
          ((8, 50257), "odd vocabulary"), ((4, 32000), "slices"), ((2, 21, 16, 16), "k-dim"),
          ((2048, 3001), "many rows per CTA: the next row's copies (prefetch, ring, pipeline) at work"),
          ((16384, 300), "more rows than resident warps: warp_ahead's next-row loads, warp_ring's staging at work")]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def errors(shape, dtype, inplace):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).cuda()
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g).cuda()
    ref_x = x.double().requires_grad_()
    ref = F.cross_entropy(ref_x, t, label_smoothing=0.1)
    ref.backward()
    leaf = x.clone().requires_grad_()
    logits = leaf.clone() if inplace else leaf
    loss = softmax_ce_ext.cross_entropy(logits, t, label_smoothing=0.1, inplace_backward=inplace)
    loss.backward()
    softmax_ce_ext.check_errors()
    torch.cuda.synchronize()
    scale = ref_x.grad.abs().max().item()
    return abs(loss.item() - ref.item()) / abs(ref.item()), (leaf.grad.double() - ref_x.grad).abs().max().item() / scale


def main():
    bad = False
    for family, settings in FAMILIES.items():
        tuning.set(**{**tuning.BUILT_IN, **settings})
        for shape, why in SHAPES:
            for dtype in TOL:
                for inplace in (False, True):
                    le, ge = errors(shape, dtype, inplace)
                    ok = le <= TOL[dtype] and ge <= TOL[dtype]
                    bad |= not ok
                    print(f"{family:>17} {'x'.join(map(str, shape)):>12} {str(dtype)[6:]:>8} {'inplace' if inplace else '':>7}"
                          f" loss {le:.1e} grad {ge:.1e} {'' if ok else 'MISMATCH'}  ({why})", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
