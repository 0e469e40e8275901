"""The CUDA row kernels' settings, for comparisons and tests (csrc/softmax_ce_tuning.h says what each does):
path ('auto', 'stream', 'legacy'), slice_kb, cluster_max, prefetch, ring_kb, lean, warp_ring, grad_piece_kb,
kdim_fold, warp_keep, cluster_async, warp_group, dynamic_rows, pdl.  Defaults come from the environment
(SOFTMAX_CE_CUDA_PATH, _SLICE_KB, _CLUSTER_MAX, _PREFETCH, _RING_KB, _LEAN, _WARP_RING, _GRAD_PIECE_KB, _KDIM_FOLD,
_WARP_KEEP, _CLUSTER_ASYNC, _WARP_GROUP, _DYNAMIC_ROWS, _PDL); they apply process-wide."""

import contextlib

from ._ops import _C

FIELDS = ("path", "slice_kb", "cluster_max", "prefetch", "ring_kb", "lean", "warp_ring", "grad_piece_kb",
          "kdim_fold", "warp_keep", "cluster_async", "warp_group", "dynamic_rows", "pdl")
# The defaults without environment variables (csrc/softmax_ce.cpp, TuningState): what tests and benchmarks set
# as their baseline, whatever the environment says.
BUILT_IN = dict(path="auto", slice_kb=72, cluster_max=16, prefetch=True, ring_kb=72, lean=True, warp_ring=2,
                grad_piece_kb=32, kdim_fold=True, warp_keep=False, cluster_async=True, warp_group=True,
                dynamic_rows=False, pdl=False)


def get() -> dict:
    """The current settings."""
    return dict(zip(FIELDS, _C.cuda_tuning()))


def set(**settings) -> dict:
    """Change the named settings (the others stay); returns all of them as they were."""
    unknown = sorted(k for k in settings if k not in FIELDS)
    if unknown:
        raise TypeError(f"tuning.set: expected settings among {FIELDS}, got {unknown}")
    old = get()
    new = {**old, **settings}
    _C.set_cuda_tuning(*(new[k] for k in FIELDS))  # checks every value before it sets any
    return old


@contextlib.contextmanager
def using(**settings):
    """Run the block under the named settings; the previous ones come back after it, even on error."""
    old = set(**settings)
    try:
        yield
    finally:
        set(**old)
