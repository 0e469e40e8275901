import pytest
import torch

import softmax_ce_ext
from softmax_ce_ext import _C

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
    """Every test starts from the same random state: failures reproduce."""
    torch.manual_seed(0)


CPU_ISAS = _C.cpu_isas()  # best first; "generic" (the portable kernel) always last

# CUDA kernel families for contiguous rows (softmax_ce_rows.cuh), as _C.set_cuda_tuning(path, slice_kb,
# cluster_max) selects them, and why each is in the grid.
CUDA_PATHS = {
    "auto": (("auto", 72, 16), "the defaults: warp rows for small C, shared-memory slices for larger C"),
    "clusters": (("auto", 1, 16), "1 KiB slices: rows of a few thousand classes split over clusters of CTAs"),
    "no-slices": (("auto", 1, 1), "no slice fits: loss+gradient by the streaming kernel (L2 re-read)"),
    "stream": (("stream", 72, 16), "the streaming kernel for every contiguous row, small C too"),
    "legacy": (("legacy", 72, 16), "the general kernels (scalar loads) for everything"),
}
KERNEL_PATHS = [("cpu", isa) for isa in CPU_ISAS] + [("cuda", name) for name in CUDA_PATHS]


@pytest.fixture(params=KERNEL_PATHS, ids=[f"{d}-{p}" for d, p in KERNEL_PATHS])
def kernel_path(request, device):
    """Runs a test once per kernel path of its device: each CPU instruction set this CPU has (AVX-512, AVX2,
    portable), each CUDA kernel family."""
    path_device, name = request.param
    if path_device != device:
        pytest.skip(f"{name}: a {path_device} path")
    if device == "cpu":
        previous = _C.set_cpu_isa(name)
        yield name
        _C.set_cpu_isa(previous)
    else:
        previous = _C.set_cuda_tuning(*CUDA_PATHS[name][0])
        yield name
        _C.set_cuda_tuning(*previous)
