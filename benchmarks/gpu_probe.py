"""Where the CUDA time goes: the fwd+bwd kernels under each tuning (slice size, cluster limit, family), timed with
the launches queued behind a GPU spin, and each tuning's gradient compared with the default's.  --ncu: run one
call of each profiled configuration, once, for `ncu`; --profile: every kernel one call launches, with its
device time (torch.profiler), for the shapes where the small kernels around the main one weigh most
(benchmarks/gpu_check.sh, part 'probe'); --ceilings: what plain read+write kernels reach here (part 'ceilings')."""

import argparse
import statistics
import sys

import torch

import softmax_ce_ext
from softmax_ce_ext import tuning

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench import Case, copy_bandwidth, run_once, timed  # noqa: E402

DEFAULT = tuning.BUILT_IN
# Each tuning as its changes to DEFAULT: slice sizes, no clusters, the streaming family, no prefetch, the ring
# (ring_kb of shared memory per CTA: 72, the default, keeps 3 CTAs per SM, 108 two; 0 none); the cluster's exchange
# by cluster.sync() instead of st.async.
TUNINGS = [{}, dict(slice_kb=48), dict(slice_kb=32), dict(slice_kb=16), dict(cluster_max=1), dict(path="stream"),
           dict(prefetch=False), dict(ring_kb=0), dict(ring_kb=108), dict(cluster_async=False)]
# Warp rows (65536x1000: VPT 4 in bf16, 8 in fp32, where the rows are staged; 262144x256: VPT 2 / 4); by groups of
# lanes (warp_group, the default since 2026-11-28: 16 lanes per row at 1000 bf16 classes, 4 / 8 at 256 bf16 / fp32
# classes) or a warp per row.
WARP_TUNINGS = [{}, dict(warp_ring=0), dict(warp_ring=3), dict(warp_ring=4), dict(warp_group=False)]
SWEEP = [((8192, 32000), TUNINGS), ((8192, 128256), TUNINGS), ((4096, 256000), TUNINGS),
         ((65536, 1000), WARP_TUNINGS), ((262144, 256), [{}, dict(warp_group=False)]), ((16, 21, 512, 512), [{}])]


def label(tune):
    return ",".join(f"{k}={v}" for k, v in tune.items()) or "default"


# (shape, dtype, mode, why, tuning): one launch of each main kernel for the profiler.  32 KiB slices: clusters of
# 8, which lost 12-20 points on the H200 (2026-11-27) for reasons not yet seen (barrier stalls?).
NCU_CASES = [((8192, 128256), torch.bfloat16, "fwd+bwd", "slices, clusters of 4", {}),
             ((8192, 128256), torch.bfloat16, "fwd+bwd", "slices, clusters of 8", dict(slice_kb=36)),
             ((8192, 32000), torch.float32, "fwd+bwd", "slices, clusters of 2", {}),
             ((65536, 1000), torch.bfloat16, "fwd+bwd", "warp rows by groups of 16 lanes (the default)", {}),
             ((65536, 1000), torch.bfloat16, "fwd+bwd", "warp rows, a warp per row", dict(warp_group=False)),
             ((65536, 1000), torch.bfloat16, "fwd", "warp rows, forward only (55% of its floor: bytes in flight?)",
              {}),
             ((65536, 1000), torch.float32, "fwd+bwd", "warp rows, the next row staged per warp", {}),
             ((65536, 1000), torch.float32, "fwd+bwd", "warp rows, unstaged", dict(warp_ring=0)),
             ((16, 21, 512, 512), torch.float32, "fwd+bwd", "K-dim columns", {}),
             ((8192, 32000), torch.bfloat16, "fwd", "streaming forward", {})]


def call(case, mode):
    """One call of ours on the case's logits (bench.run_once: fwd under no_grad, else fwd + backward)."""
    return run_once(softmax_ce_ext.cross_entropy, case.inputs[0], case, mode)


def sweep(reps):
    bw = copy_bandwidth("cuda")
    print(f"sweep: fwd+bwd, mean; copy bandwidth {bw:.0f} GB/s; floor = 2*N*C*E bytes / bandwidth")
    print(f"{'shape':>12} {'dtype':>8} {'tuning':>28} {'ms':>7} {'%floor':>7} {'grad diff':>9}")
    for shape, tunings in SWEEP:
        for dtype in (torch.bfloat16, torch.float32):
            case = Case(shape, dtype, "cuda", 0.0, 0)
            floor = 2 * case.nbytes / bw / 1e6
            with tuning.using(**DEFAULT):
                _, ref = call(case, "fwd+bwd")
            for tune in tunings:
                with tuning.using(**{**DEFAULT, **tune}):
                    _, g = call(case, "fwd+bwd")
                    diff = (g.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
                    del g
                    ms = statistics.median(timed(lambda: call(case, "fwd+bwd"), "cuda", 1.0) for _ in range(reps))
                print(f"{'x'.join(map(str, shape)):>12} {str(dtype)[6:]:>8} {label(tune):>28} "
                      f"{ms:7.3f} {100 * floor / ms:6.1f}% {diff:9.1e}", flush=True)
            del case, ref
            torch.cuda.empty_cache()


def ncu_cases():
    for shape, dtype, mode, why, tune in NCU_CASES:
        case = Case(shape, dtype, "cuda", 0.0, 0)
        torch.cuda.synchronize()
        print(f"ncu case: {'x'.join(map(str, shape))} {str(dtype)[6:]} {mode} ({why})", flush=True)
        with tuning.using(**tune):
            call(case, mode)
        torch.cuda.synchronize()
        del case
        torch.cuda.empty_cache()


PROFILE_CASES = [((65536, 1000), torch.bfloat16, "fwd+bwd"), ((65536, 1000), torch.float32, "fwd"),
                 ((16, 21, 512, 512), torch.float32, "fwd+bwd"), ((8192, 128256), torch.bfloat16, "fwd+bwd"),
                 ((4096, 256000), torch.float32, "fwd+bwd")]  # 16-CTA clusters, or the streaming fallback?


def profile_cases():
    from torch.profiler import ProfilerActivity, profile

    for shape, dtype, mode in PROFILE_CASES:
        case = Case(shape, dtype, "cuda", 0.0, 0)
        for _ in range(2):
            call(case, mode)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call(case, mode)
            torch.cuda.synchronize()
        print(f"profile: {'x'.join(map(str, shape))} {str(dtype)[6:]} {mode}, 5 calls; device us per call:")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if e.device_time_total > 0:
                print(f"  {e.device_time_total / 5:9.1f}  x{e.count // 5:<2} {e.key[:110]}")
        del case
        torch.cuda.empty_cache()


CEILING_SHAPES = [(8192, 128256), (8192, 32000)]


def ceilings(reps):
    """What a kernel that reads N*C elements and writes N*C reaches on this card, beside our fused pass: torch's
    copy, torch.exp into a second buffer (one exponential per element), our gradient from the saved row stats (the
    backward of reduction='none': rows in pieces or whole, lean sweeps or not), our fwd+bwd (lean sweeps or not),
    and the backward's scaling of the fused gradient where grad_output != 1 (a pass of its own, in place).
    Floor: 2*N*C*E bytes."""
    bw = copy_bandwidth("cuda")
    print(f"ceilings: read + write N*C elements; copy bandwidth {bw:.0f} GB/s; floor = 2*N*C*E bytes / bandwidth")
    for shape in CEILING_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            case = Case(shape, dtype, "cuda", 0.0, 0)
            x, t = case.inputs[0], case.target
            y = torch.empty_like(x)
            floor = 2 * case.nbytes / bw / 1e6
            xg = x.detach().requires_grad_()
            rows = softmax_ce_ext.cross_entropy(xg, t, reduction="none")
            up = torch.ones_like(rows)

            def grad_from_stats():
                return torch.autograd.grad(rows, xg, up, retain_graph=True)

            def fwd_bwd():
                return call(case, "fwd+bwd")

            half = torch.full((), 0.5, dtype=dtype, device="cuda")

            def scale_grad():  # y *= 0.5 (y is overwritten each run; its values do not matter here)
                return torch.ops.softmax_ce_ext.scale_grad_(y, half)

            runs = [("torch copy_", lambda: y.copy_(x), {}), ("torch.exp(out=)", lambda: torch.exp(x, out=y), {}),
                    # rows in pieces (32 KiB, lean: the defaults): the grid's last CTAs hold a piece each
                    ("ours: grad from stats", grad_from_stats, {}),
                    ("ours: grad, 64K pieces", grad_from_stats, dict(grad_piece_kb=64)),
                    ("ours: grad, not lean", grad_from_stats, dict(lean=False)),
                    ("ours: grad, whole rows", grad_from_stats, dict(grad_piece_kb=0)),
                    ("ours: fwd+bwd", fwd_bwd, {}), ("ours: fwd+bwd, not lean", fwd_bwd, dict(lean=False)),
                    ("ours: scale_grad_ x0.5", scale_grad, {})]
            for name, fn, tune in runs:
                with tuning.using(**tune):
                    fn()
                    ms = statistics.median(timed(fn, "cuda", 1.0) for _ in range(reps))
                print(f"{'x'.join(map(str, shape)):>12} {str(dtype)[6:]:>8} {name:>22} {ms:7.3f} {100 * floor / ms:6.1f}%",
                      flush=True)
            del case, x, t, y, xg, rows, up
            torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ncu", action="store_true", help="one call of each profiled configuration")
    p.add_argument("--profile", action="store_true", help="the kernels of one call, with device times")
    p.add_argument("--ceilings", action="store_true", help="read+write kernels of torch and ours, side by side")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    if args.ceilings:
        ceilings(args.reps)
    elif args.ncu:
        ncu_cases()
    elif args.profile:
        profile_cases()
    else:
        sweep(args.reps)


if __name__ == "__main__":
    main()
