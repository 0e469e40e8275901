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


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request, device):
    """Runs a CPU test once per instruction-set path this CPU has (AVX-512, AVX2, portable)."""
    if device != "cpu" and request.param != CPU_ISAS[0]:
        pytest.skip("instruction-set paths are a CPU matter")
    previous = _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(previous)
