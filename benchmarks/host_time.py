"""Host time per call: how long the host takes to issue one call, ours piece by piece beside torch's.

On CUDA the calls are issued behind a GPU spin (torch.cuda._sleep), so no launch waits for the GPU: what is
measured is the host's own work (Python, dispatch, allocation, driver calls). The H200 bench's host column had
our forward at 0.15-0.44 ms a call against torch's 0.03 (2026-11-27): this names the piece that costs it.
Each row: the median over rounds of (time of `calls` calls) / calls, in microseconds.  --profile then lists, for
ours without a gradient and ours fwd+bwd at the first shape, the host events of 10 calls by self time (torch.profiler;
on CUDA with the runtime's API calls, so a driver call made on every call shows by name).
    python benchmarks/host_time.py [--device cuda] [--shapes 8x100 64x1000 8192x32000] [--dtype bfloat16] [--profile]
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import softmax_ce_ext
from softmax_ce_ext._ops import ops
from softmax_ce_ext.function import _Prepared

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench import _sleep_cycles_per_ms, parse_shape, sync  # noqa: E402

SPIN_MS = 50.0


def per_call_us(fn, device, calls, rounds):
    for _ in range(3):
        fn()
    sync(device)
    samples = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda._sleep(int(SPIN_MS * _sleep_cycles_per_ms()))
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        sync(device)
    return statistics.median(samples)


def pieces(shape, dtype, device):
    """(name, callable) in the order a call runs them: the whole calls, then ours piece by piece."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g, device=device)
    xg = x.detach().requires_grad_()
    p = _Prepared(x, t, None, -100, "mean", 0.0)
    rows, _ = ops.forward_rows(p.logits, p.t, None, -100, 0.0, None)
    denom, _ = ops.mean_scale(p.t, None, -100, torch.float32)
    grad = torch.empty_like(p.logits)
    one = torch.ones((), device=device)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn(x, t)
        return run

    def train(fn):
        def run():
            xg.grad = None
            fn(xg, t).backward()
        return run

    return [
        ("torch F.cross_entropy, no_grad", no_grad(F.cross_entropy)),
        ("ours cross_entropy, no_grad", no_grad(softmax_ce_ext.cross_entropy)),
        ("torch forward with grad", lambda: F.cross_entropy(xg, t)),
        ("ours forward with grad", lambda: softmax_ce_ext.cross_entropy(xg, t)),
        ("torch fwd+bwd", train(F.cross_entropy)),
        ("ours fwd+bwd", train(softmax_ce_ext.cross_entropy)),
        ("  _Prepared (checks, views)", lambda: _Prepared(x, t, None, -100, "mean", 0.0)),
        ("  op mean_forward", lambda: ops.mean_forward(p.logits, p.t, None, -100, 0.0, None, x.dtype)),
        ("  op forward_rows", lambda: ops.forward_rows(p.logits, p.t, None, -100, 0.0, None)),
        ("  op mean_scale", lambda: ops.mean_scale(p.t, None, -100, torch.float32)),
        ("  op sum_rows", lambda: ops.sum_rows(rows, denom, x.dtype)),
        ("  op mean_forward_backward", lambda: ops.mean_forward_backward(p.logits, p.t, None, -100, 0.0, None, x.dtype)),
        ("  op scale_grad_ (g == 1)", lambda: ops.scale_grad_(grad, one)),
        ("  torch.empty_like(logits)", lambda: torch.empty_like(p.logits)),
    ]


def profile_calls(shape, dtype, device):
    """The host events of 10 calls of ours (no gradient; fwd+bwd), by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    wanted = ("ours cross_entropy, no_grad", "ours fwd+bwd")
    for name, fn in pieces(shape, dtype, device):
        if name not in wanted:
            continue
        for _ in range(3):
            fn()
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(10):
                fn()
            sync(device)
        print(f"profile: {name}, {'x'.join(map(str, shape))}, 10 calls")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=[(8, 100), (64, 1000), (8192, 32000)])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--calls", type=int, default=50, help="calls per round (behind one spin on CUDA)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="then the host events of ours at the first shape")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not (torch.cuda.is_available() and softmax_ce_ext.cuda_built()):
        print("host_time.py: --device cuda needs a GPU and a CUDA build", file=sys.stderr)
        return 2
    dtype = getattr(torch, a.dtype)
    print(f"host us per call ({a.device}, {a.dtype}; median of {a.rounds} rounds of {a.calls} calls"
          f"{', behind a GPU spin' if a.device == 'cuda' else ''}); torch {torch.__version__}")
    for shape in a.shapes:
        print("x".join(map(str, shape)))
        for name, fn in pieces(shape, dtype, a.device):
            print(f"  {name:<36} {per_call_us(fn, a.device, a.calls, a.rounds):9.1f}")
    if a.profile:
        profile_calls(a.shapes[0], dtype, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
