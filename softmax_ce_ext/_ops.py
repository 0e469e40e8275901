"""Loads the compiled ops and registers their fake (meta) kernels so torch.compile can trace them."""

import warnings

import torch


def _built_against():
    try:
        from ._build_info import BUILD
    except ImportError:  # built by something other than setup.py
        return None
    return BUILD.get("torch")


def _minor(version):
    return tuple(version.split("+")[0].split(".")[:2])


try:
    from . import _C  # noqa: F401  (registers the softmax_ce_ext ops with the dispatcher)
except ImportError as err:
    # Most often a torch upgraded (or swapped) after the build: the compiled kernels link to that torch's symbols.
    raise ImportError(
        f"softmax_ce_ext: the compiled kernels (_C) failed to load ({err}). They were built against torch "
        f"{_built_against() or '(unrecorded)'}; this is torch {torch.__version__}. A C++ extension must be rebuilt for "
        "the torch it runs with: `pip install --no-build-isolation .` (or `make build`) in its checkout"
    ) from err
_BUILT = _built_against()
if _BUILT and _minor(_BUILT) != _minor(torch.__version__):
    warnings.warn(f"softmax_ce_ext was built against torch {_BUILT} and runs under torch {torch.__version__}"
                  ": rebuild it (`pip install --no-build-isolation .`); across minor versions the C++ ABI changes",
                  RuntimeWarning, stacklevel=2)

ops = torch.ops.softmax_ce_ext


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels accumulate in float32, or float64 for float64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positions(logits):
    """Positions per row: S of (B, C, S) logits, 1 of (B, C) (csrc/softmax_ce.h's positions_of)."""
    return logits.shape[2] if logits.dim() == 3 else 1


def _row_buffer(logits):
    return logits.new_empty((logits.shape[0], _positions(logits)), dtype=acc_dtype(logits.dtype))


def _stats_buffer(logits):
    """The forward's stats for backward (csrc/softmax_ce.h's stats_buffer): (2, B, S), the max and the sum of
    e^(x - max)."""
    return logits.new_empty((2, logits.shape[0], _positions(logits)), dtype=acc_dtype(logits.dtype))


@torch.library.register_fake("softmax_ce_ext::forward_rows")
def _forward_fake(logits, target, weight, ignore_index, label_smoothing, status):
    return _row_buffer(logits), _stats_buffer(logits)


@torch.library.register_fake("softmax_ce_ext::forward_backward")
def _forward_backward_fake(logits, target, weight, ignore_index, label_smoothing, grad_scale, status,
                           loss_divisor=None, loss_dtype=None):
    return logits.new_empty((), dtype=loss_dtype or acc_dtype(logits.dtype)), torch.empty_like(logits)


@torch.library.register_fake("softmax_ce_ext::forward_sum")
def _forward_sum_fake(logits, target, weight, ignore_index, label_smoothing, status, loss_divisor=None,
                      loss_dtype=None):
    return logits.new_empty((), dtype=loss_dtype or acc_dtype(logits.dtype))


@torch.library.register_fake("softmax_ce_ext::mean_forward")
def _mean_forward_fake(logits, target, weight, ignore_index, label_smoothing, status, loss_dtype=None):
    acc = acc_dtype(logits.dtype)
    return logits.new_empty((), dtype=loss_dtype or acc), logits.new_empty((), dtype=acc)


@torch.library.register_fake("softmax_ce_ext::mean_forward_backward")
def _mean_forward_backward_fake(logits, target, weight, ignore_index, label_smoothing, status, loss_dtype=None,
                                grad_mul=None):
    acc = acc_dtype(logits.dtype)
    return (logits.new_empty((), dtype=loss_dtype or acc), torch.empty_like(logits), logits.new_empty((), dtype=acc),
            logits.new_empty((), dtype=acc))


@torch.library.register_fake("softmax_ce_ext::mean_forward_backward_")
def _mean_forward_backward_inplace_fake(logits, target, weight, ignore_index, label_smoothing, status,
                                        loss_dtype=None, grad_mul=None):
    acc = acc_dtype(logits.dtype)
    return logits.new_empty((), dtype=loss_dtype or acc), logits.new_empty((), dtype=acc), logits.new_empty((), dtype=acc)


@torch.library.register_fake("softmax_ce_ext::backward")
def _backward_fake(grad_rows, logits, target, weight, stats, ignore_index, label_smoothing):
    return torch.empty_like(logits)


@torch.library.register_fake("softmax_ce_ext::forward_backward_")
def _forward_backward_inplace_fake(logits, target, weight, ignore_index, label_smoothing, grad_scale, status,
                                   loss_divisor=None, loss_dtype=None):
    return logits.new_empty((), dtype=loss_dtype or acc_dtype(logits.dtype))


@torch.library.register_fake("softmax_ce_ext::backward_")
def _backward_inplace_fake(grad_rows, logits, target, weight, stats, ignore_index, label_smoothing):
    return None


@torch.library.register_fake("softmax_ce_ext::scale_grad_")
def _scale_grad_fake(grad, grad_output, grad_mul_used=None, predictor=None, changes=None):
    return None


@torch.library.register_fake("softmax_ce_ext::mean_scale")
def _mean_scale_fake(target, weight, ignore_index, dtype):
    return target.new_empty((), dtype=dtype), target.new_empty((), dtype=dtype)


@torch.library.register_fake("softmax_ce_ext::sum_rows")
def _sum_rows_fake(values, divisor=None, dtype=None):
    return values.new_empty((), dtype=dtype or values.dtype)
