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


def cpu_isa() -> str:
    """The instruction set the CPU kernels use: "avx512", "avx2", "baseline" (plain vectors: NEON on ARM64) or
    "generic" (scalar); SOFTMAX_CE_CPU_ISA picks one."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Use another of this CPU's instruction sets (see _C.cpu_isas()); returns the previous one."""
    return _C.set_cpu_isa(name)


def empty_grad_cache() -> None:
    """Free the large CPU gradient blocks kept for reuse (SOFTMAX_CE_CPU_GRAD_CACHE=0 keeps none)."""
    _C.empty_grad_cache()


def build_info() -> dict:
    """What setup.py built: backend ('cuda' or 'cpu'), why, the CUDA archs, and the torch it was built against."""
    try:
        from ._build_info import BUILD
    except ImportError:  # built by something other than setup.py
        BUILD = {"backend": "cuda" if cuda_built() else "cpu", "why": "unknown", "archs": "", "torch": None}
    return dict(BUILD)


__all__ = [
    "cross_entropy",
    "CrossEntropyLoss",
    "SoftmaxCrossEntropyFunction",
    "check_errors",
    "cuda_built",
    "build_info",
    "cpu_isa",
    "set_cpu_isa",
    "empty_grad_cache",
]
