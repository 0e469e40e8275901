"""The CUDA row kernels' settings, for comparisons and tests (csrc/softmax_ce_tuning.h says what each does):
path ('auto', 'stream', 'legacy'), slice_kb, cluster_max, prefetch, ring_kb. Defaults come from the
environment (SOFTMAX_CE_CUDA_PATH, _SLICE_KB, _CLUSTER_MAX, _PREFETCH, _RING_KB); they apply process-wide."""

import contextlib

from ._ops import _C

FIELDS = ("path", "slice_kb", "cluster_max", "prefetch", "ring_kb")


def get() -> dict:
    """The current settings."""
    return dict(zip(FIELDS, _C.cuda_tuning()))


def set(**settings) -> dict:
    """Change the named settings (the others stay); returns all of them as they were."""
    unknown = sorted(k for k in settings if k not in FIELDS)
    if unknown:
        raise TypeError(f"tuning.set: expected settings among {FIELDS}, got {unknown}")
    old = get()
    try:
        _apply({**old, **settings})
    except Exception:
        _apply(old)  # a rejected value changes nothing
        raise
    return old


def _apply(s):
    _C.set_cuda_tuning(s["path"], s["slice_kb"], s["cluster_max"])
    _C.set_cuda_prefetch(bool(s["prefetch"]))
    _C.set_cuda_ring(s["ring_kb"])


@contextlib.contextmanager
def using(**settings):
    """Run the block under the named settings; the previous ones come back after it, even on error."""
    old = set(**settings)
    try:
        yield
    finally:
        set(**old)
