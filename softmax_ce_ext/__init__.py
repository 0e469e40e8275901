"""Fused softmax cross-entropy for PyTorch: a drop-in for F.cross_entropy / nn.CrossEntropyLoss."""

from ._ops import _C
from ._status import check_errors
from .function import SoftmaxCrossEntropyFunction
from .functional import cross_entropy
from .modules import CrossEntropyLoss

__version__ = "0.1.0"


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return bool(_C.cuda_built())


def build_info() -> dict:
    """What setup.py built: backend ('cuda' or 'cpu'), why, and the CUDA archs."""
    try:
        from ._build_info import BUILD
    except ImportError:  # built by something other than setup.py
        BUILD = {"backend": "cuda" if cuda_built() else "cpu", "why": "unknown", "archs": ""}
    return dict(BUILD)


__all__ = [
    "cross_entropy",
    "CrossEntropyLoss",
    "SoftmaxCrossEntropyFunction",
    "check_errors",
    "cuda_built",
    "build_info",
]
