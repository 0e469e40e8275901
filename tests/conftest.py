import os

import pytest
import torch

import softmax_ce_ext
from softmax_ce_ext import _C, _predict, tuning

CUDA_OK = softmax_ce_ext.cuda_built() and torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not CUDA_OK, reason="CUDA kernels not built or no GPU visible"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, and with no guess of grad_output kept from another test
    (softmax_ce_ext/_predict.py): failures reproduce, whatever ran before."""
    torch.manual_seed(0)
    _predict._state.clear()


# pytest-xdist's workers (gpu_check.sh) share one GPU: a worker keeps no more than this cached between tests.
SHARED_GPU_CACHE = 2**30 if CUDA_OK and "PYTEST_XDIST_WORKER" in os.environ else None


@pytest.fixture(autouse=True)
def _share_the_gpu():
    """A worker's cached blocks would otherwise stay out of the other workers' reach (the 2**31-element tests
    need 14 GiB free)."""
    yield
    if SHARED_GPU_CACHE is not None and torch.cuda.memory_reserved() > SHARED_GPU_CACHE:
        torch.cuda.empty_cache()


CPU_ISAS = _C.cpu_isas()  # best first; "baseline" (plain vectors) and "generic" (the scalar kernel) always last

# CUDA kernel families for contiguous rows (softmax_ce_rows.cuh), as softmax_ce_ext.tuning selects them (every
# setting given, whatever the environment says), and why each is in the grid.
CUDA_PATHS = {
    "auto": (dict(), "the defaults: warp rows for small C (the fused pass of rows of up to 128 chunks by groups of "
             "lanes, of float rows of 129-256 chunks staged), shared-memory slices (in a ring, lean sweeps, the "
             "cluster's statistics by st.async) for larger C, the gradient from the saved stats in 32 KiB pieces, "
             "the K-dim mean's denominator counted in the K-dim kernel"),
    "clusters": (dict(slice_kb=1, ring_kb=0), "1 KiB slices: rows of a few thousand classes split over clusters of "
                 "CTAs, no ring"),
    "clusters-ring": (dict(slice_kb=1, ring_kb=8), "the same, each CTA's slots a ring holding the next row too"),
    "clusters-sync": (dict(slice_kb=1, ring_kb=8, cluster_async=False), "the same, the cluster's statistics "
                      "exchanged by plain remote stores and cluster.sync(), the alternative to st.async"),
    "plain": (dict(lean=False, warp_ring=0, grad_piece_kb=0, warp_group=False, kdim_fold=False), "the "
              "alternatives to the measured defaults: the general sweeps (per-chunk tests; their cluster exchange is "
              "cluster.sync()), no staged or grouped warp rows, the gradient from the saved stats by whole rows, "
              "the K-dim mean's denominator by a kernel of its own"),
    "plain-clusters": (dict(slice_kb=1, ring_kb=8, lean=False), "the general sweeps over clusters of 1 KiB slices, "
                       "a ring"),
    "warp-ring": (dict(warp_ring=4), "the loss + gradient of float warp rows of 129-256 chunks staging more of "
                  "each warp's next rows in shared memory (cp.async), a resident grid"),
    "grad-pieces": (dict(grad_piece_kb=16), "the gradient from the saved stats (reduction='none') by rows cut into "
                    "pieces of 1024 chunks (rows of 4096+ floats, 8192+ 2-byte values)"),
    "no-slices": (dict(slice_kb=1, cluster_max=1), "no slice fits: loss+gradient by the streaming kernel (L2 re-read)"),
    "warp-keep": (dict(warp_keep=True, warp_group=False), "warp rows' loss + gradient keeping the sum sweep's "
                  "exponentials (registers, or the warp's shared memory) for a gradient of one product per element"),
    "warp-ungrouped": (dict(warp_group=False), "the loss + gradient of rows of up to 128 chunks (no smoothing) by "
                       "a warp per row, the alternative to the default groups of 16, 8 or 4 lanes"),
    "kdim-unfolded": (dict(kdim_fold=False), "K-dim mean training (unweighted) with the denominator counted by a "
                      "kernel of its own, the alternative to the default count inside the K-dim kernel (a "
                      "cooperative launch, a grid barrier; targets kept as bytes in shared memory)"),
    "dynamic-rows": (dict(dynamic_rows=True, kdim_fold=False), "the default slice kernel's rows and the K-dim "
                     "kernel's tiles of items handed out by a counter instead of a stride (tuning dynamic_rows, off "
                     "until timed; these shapes have too few rows to draw any: test_dynamic_rows_change_no_bit and "
                     "test_kdim_dynamic_tiles draw them)"),
    "pdl": (dict(pdl=True), "every kernel launched programmatically after the one before it (sm_90+; tuning pdl, "
            "off until timed): each waits for its predecessor at its start, but the mean's training pass in warp rows, "
            "which reads its first rows while mean_scale's kernels run"),
    "stream": (dict(path="stream"), "the streaming kernel for every contiguous row, small C too (lean sweeps)"),
    "plain-stream": (dict(path="stream", lean=False), "the same with the general sweeps (per-chunk tests)"),
    "legacy": (dict(path="legacy"), "the general kernels (scalar loads) for everything"),
}
KERNEL_PATHS = [("cpu", isa) for isa in CPU_ISAS] + [("cuda", name) for name in CUDA_PATHS]


@pytest.fixture(params=KERNEL_PATHS, ids=[f"{d}-{p}" for d, p in KERNEL_PATHS])
def kernel_path(request, device):
    """Runs a test once per kernel path of its device: each CPU instruction set this CPU has (AVX-512, AVX2,
    portable), each CUDA kernel family."""
    _, name = request.param  # the path's device is the test's: pytest_collection_modifyitems deselects the rest
    if device == "cpu":
        previous = _C.set_cpu_isa(name)
        yield name
        _C.set_cpu_isa(previous)
    else:
        with tuning.using(**{**tuning.BUILT_IN, **CUDA_PATHS[name][0]}):
            yield name


def pytest_collection_modifyitems(config, items):
    """A kernel path of the other device never runs: deselected, not skipped (20 of 40 combinations of every
    kernel-path test; skipping them one by one cost ~1.2 ms each: the CPU suite took 269-343 s, now ~175)."""
    keep, other = [], []
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        mismatch = params and "kernel_path" in params and "device" in params and \
            params["kernel_path"][0] != params["device"]
        (other if mismatch else keep).append(item)
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = keep
