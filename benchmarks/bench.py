"""First benchmark: softmax_ce_ext against torch eager, forward and forward+backward (mean reduction).

Bytes the op must move (the floor), with E the logits' element size:
  fwd      N*C*E      read the logits once
  fwd+bwd  2*N*C*E    read the logits once, write the gradient once
% of floor = (bytes / copy bandwidth) / measured time, the copy bandwidth being measured in this run
(a large copy, counting bytes read + written).  The full CLI has its own issue; this is the first cut.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import softmax_ce_ext

GPU_SHAPES = ["8192x32000", "8192x128256", "65536x1000", "16x21x512x512"]
CPU_SHAPES = ["4096x32000", "65536x1000", "8x21x128x128"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(device):
    """GB/s of a large copy, counting bytes read + written."""
    n = (1 << 28) if device == "cuda" else (1 << 26)  # 1 GiB / 256 MiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * src.numel() * 4 / ms / 1e6


def parse_shape(text):
    dims = tuple(int(v) for v in text.lower().split("x"))
    if len(dims) < 2:
        raise argparse.ArgumentTypeError(f"expected a shape like 8192x32000, got {text!r}")
    return dims


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, help="N x C [x d1 ...]; default fits the device")
    ap.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    args = ap.parse_args()

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and softmax_ce_ext.cuda_built() else "cpu"
    if device == "cuda" and not (torch.cuda.is_available() and softmax_ce_ext.cuda_built()):
        ap.error("--device cuda needs a visible GPU and a CUDA build of softmax_ce_ext")
    shapes = args.shapes or [parse_shape(s) for s in (GPU_SHAPES if device == "cuda" else CPU_SHAPES)]
    dtypes = [DTYPES[d] for d in (args.dtype or (["bfloat16", "float32"] if device == "cuda" else ["float32"]))]
    reps = args.reps or (20 if device == "cuda" else 3)

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    bw = copy_bandwidth(device)
    print(f"softmax_ce_ext {softmax_ce_ext.__version__} build {softmax_ce_ext.build_info()}")
    print(f"torch {torch.__version__} on {name}; copy bandwidth {bw:.1f} GB/s (read + write)")
    print("floor bytes: fwd = N*C*E (read logits once), fwd+bwd = 2*N*C*E (+ write gradient once)")
    print(f"{'shape':>16} {'dtype':>9} {'mode':>8} {'provider':>9} {'ms':>9} {'GB/s':>7} {'% floor':>8} {'vs eager':>8} {'max rel err':>11}")

    for shape in shapes:
        classes = shape[1]
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(shape, device=device, dtype=dtype, generator=g)
            target = torch.randint(0, classes, (shape[0], *shape[2:]), device=device, generator=g)
            nbytes = x.numel() * x.element_size()
            for mode, passes in (("fwd", 1), ("fwd+bwd", 2)):
                results = {}
                for provider, fn_ce in (("torch", F.cross_entropy), ("ours", softmax_ce_ext.cross_entropy)):
                    if mode == "fwd":
                        def run(fn_ce=fn_ce):
                            with torch.no_grad():
                                return fn_ce(x, target)
                    else:
                        xg = x.detach().requires_grad_()

                        def run(fn_ce=fn_ce, xg=xg):
                            xg.grad = None
                            loss = fn_ce(xg, target)
                            loss.backward()
                            return loss
                    results[provider] = (time_ms(run, device, reps), run().float())
                ref = results["torch"][1]
                for provider, (ms, loss) in results.items():
                    err = ((loss - ref).abs() / ref.abs().clamp_min(1e-30)).item()
                    floor_ms = passes * nbytes / bw / 1e6
                    print(
                        f"{'x'.join(map(str, shape)):>16} {str(dtype)[6:]:>9} {mode:>8} {provider:>9} {ms:9.3f} "
                        f"{passes * nbytes / ms / 1e6:7.1f} {100 * floor_ms / ms:7.1f}% "
                        f"{results['torch'][0] / ms:7.2f}x {err:11.2e}"
                    )


if __name__ == "__main__":
    main()
