import pytest
import torch

import softmax_ce_ext

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
