"""The cross-entropy implementations the benchmark compares: ours, torch eager, torch.compile, and fused peers
found installed (Liger's Triton kernel, flash-attn's Triton kernel).  Each builds a loss function
fn(logits, target) -> loss for given options, or says why it cannot run here."""

import contextlib
import importlib.util

import torch
import torch.nn.functional as F

import softmax_ce_ext
from softmax_ce_ext import tuning


class Provider:
    name = ""
    inplace = False  # the backward overwrites the logits with the gradient

    def unavailable(self, device, shape, opts, prob=False):
        """None when it can run; else the reason it is skipped."""
        return None

    def scope(self):
        """A context every call runs in, its backward included (autograd runs that after fn returned)."""
        return contextlib.nullcontext()

    def make(self, opts):
        raise NotImplementedError


class Ours(Provider):
    name = "ours"

    def make(self, opts):
        return lambda x, t: softmax_ce_ext.cross_entropy(x, t, **opts)


class OursInplace(Provider):
    """inplace_backward=True: the gradient overwrites the logits (a view stands in for the last layer's output,
    which is not a leaf)."""

    name = "ours_inplace"
    inplace = True

    def make(self, opts):
        return lambda x, t: softmax_ce_ext.cross_entropy(x.view_as(x), t, inplace_backward=True, **opts)


class OursTuned(Provider):
    """Ours under other CUDA settings (softmax_ce_ext.tuning: kernel family, slices, ring, ...), to compare them in
    one run.  The settings hold through the whole step (scope), so a backward-only setting is timed too."""

    def __init__(self, name, **settings):
        self.name, self.settings = name, settings

    def unavailable(self, device, shape, opts, prob=False):
        return None if device == "cuda" else "a CUDA kernel family"

    def scope(self):
        return tuning.using(**self.settings)

    def make(self, opts):
        return lambda x, t: softmax_ce_ext.cross_entropy(x, t, **opts)


class TorchEager(Provider):
    name = "torch"

    def make(self, opts):
        return lambda x, t: F.cross_entropy(x, t, **opts)


class TorchCompile(Provider):
    name = "compile"

    def make(self, opts):
        import torch._dynamo

        # Every shape/dtype recompiles; a low limit would silently fall back to eager and time that instead.
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, 1024)
        return torch.compile(lambda x, t: F.cross_entropy(x, t, **opts))


class _TritonPeer(Provider):
    module = ""

    def unavailable(self, device, shape, opts, prob=False):
        if importlib.util.find_spec(self.module.split(".")[0]) is None:
            return f"{self.module.split('.')[0]} not installed"
        if device != "cuda":
            return "Triton kernel: CUDA only"
        if len(shape) != 2:
            return "2-D logits only"
        if opts.get("weight") is not None:
            return "no class weights"
        if prob:
            return "class indices only"
        return None


class Liger(_TritonPeer):
    name = "liger"
    module = "liger_kernel"
    inplace = True

    def make(self, opts):
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

        def fn(x, t):
            out = LigerCrossEntropyFunction.apply(x, t, None, opts["ignore_index"], 0.0, opts["label_smoothing"],
                                                  opts["reduction"])
            return out[0] if isinstance(out, tuple) else out

        return fn


class FlashAttn(_TritonPeer):
    name = "flash_attn"
    module = "flash_attn"

    def make(self, opts):
        from flash_attn.losses.cross_entropy import CrossEntropyLoss

        return CrossEntropyLoss(
            ignore_index=opts["ignore_index"], label_smoothing=opts["label_smoothing"], reduction=opts["reduction"]
        )


VARIANTS = (OursTuned("ours_stream", path="stream"), OursTuned("ours_legacy", path="legacy"),
            OursTuned("ours_nocluster", cluster_max=1), OursTuned("ours_noprefetch", prefetch=False),
            # the ring (72 KiB, the default since 2026-11-27: 3 CTAs per SM, 8 KiB of the next row ahead at 62.5
            # KiB slices): none, or 108 KiB (2 CTAs, 44 KiB ahead)
            OursTuned("ours_noring", ring_kb=0), OursTuned("ours_ring108", ring_kb=108),
            # the general sweeps (per-chunk tests) where the lean ones are the default (slices, streaming)
            OursTuned("ours_nolean", lean=False),
            # the gradient from the saved stats (reduction='none') by whole rows, or by 64 KiB pieces (default 32)
            OursTuned("ours_whole_rows", grad_piece_kb=0), OursTuned("ours_pieces64", grad_piece_kb=64),
            # the fused pass of float warp rows of 129-256 chunks unstaged, or staging up to 3 rows ahead per warp as
            # shared memory allows (default: 1)
            OursTuned("ours_unstaged", warp_ring=0), OursTuned("ours_warp_ring4", warp_ring=4),
            # on by default since the H200 of 2026-11-28 (NOTES v0.17-dev): K-dim mean training with the
            # denominator counted in the K-dim kernel; the slices' cluster exchange by st.async and mbarriers (no
            # per-row cluster barrier); the loss + gradient of rows of up to 128 chunks by groups of 16, 8 or 4
            # lanes.  Their alternatives, off:
            OursTuned("ours_kdim_unfolded", kdim_fold=False), OursTuned("ours_cluster_sync", cluster_async=False),
            OursTuned("ours_warp_ungrouped", warp_group=False),
            # off by default (within a point): warp rows' loss + gradient keeping the sum sweep's exponentials
            OursTuned("ours_warp_keep", warp_keep=True),
            # off until timed (v0.21-dev): the slices' rows handed out by a counter (the trace's end spread)
            OursTuned("ours_dynamic_rows", dynamic_rows=True),
            # the K-dim kernel unfolded (kdim_fold off) taking tiles of items from a counter: beside ours_kdim_unfolded
            OursTuned("ours_kdim_dynamic", kdim_fold=False, dynamic_rows=True),
            # off until timed (v0.21-dev): every kernel launched programmatically after the one before (sm_90+)
            OursTuned("ours_pdl", pdl=True))
PROVIDERS = {p.name: p for p in (Ours(), OursInplace(), *VARIANTS, TorchEager(), TorchCompile(), Liger(), FlashAttn())}
