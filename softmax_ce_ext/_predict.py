"""The training pass's guess of grad_output: a loss multiplied before its backward (1/accumulation steps, a weight
among several losses) gets a gradient written once, not written and then scaled.

The training pass (mean/sum, not float16) writes the gradient in the forward, before grad_output is known, and the
backward multiplies it by grad_output: a second read and write of the gradient unless grad_output is 1.  So the
forward multiplies the gradient by a guess m kept on the device, {m, last grad_output, changes in a row} per
device and accumulation dtype, and the backward by grad_output / m, skipped where they are equal (decided on the
device: the host never waits).  The backward records grad_output; one seen twice in a row, finite and within
2^-32..2^32, becomes the guess (softmax_ce.h's update_predictor): a constant factor costs its scaling pass on the
first two steps only, and losses with different factors in one step keep what they cost without a guess.  m = 1
until then, so an unscaled loss is unchanged.  Where the guess is right the gradient is rounded once
(grad_output * (p - y) / d) instead of twice; where it is wrong, the scaling by grad_output / m rounds once more;
for powers of two both are exact.

A factor that changes at every backward (a sum divided by a count of items that differs per batch) can never be
guessed: once grad_output has changed at each of the last two backwards, the forward takes float16's route instead
(the rows' max and sum kept, the gradient written in the backward with grad_output in its factor: three passes over
the logits where written-then-scaled is four; on the CPU from 2048 classes, function._defers_pay), and returns to
the guess when a factor repeats.  The backward mirrors the count of changes into host memory (`changes`, pinned on
CUDA), which the forward reads without waiting: on CUDA it lags by as many steps as the host runs ahead.
"""

import ctypes

import torch

_state = {}


class _State:
    """One device and accumulation dtype's guess: `predictor` (3,) on the device, `guess` its 0-d view, `changes`
    the host's mirror of the count of changes (read through ctypes: no torch op per call)."""

    def __init__(self, device, dtype):
        self.predictor = torch.tensor([1.0, float("nan"), -1.0], dtype=dtype, device=device)  # -1: none seen yet
        self.guess = self.predictor[0]
        self.changes = torch.zeros(1, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._count = ctypes.c_int64.from_address(self.changes.data_ptr())

    def varying(self) -> bool:
        """grad_output changed at each of the last two backwards (as far as they have run)."""
        return self._count.value >= 2


def state_for(device: torch.device, dtype: torch.dtype):
    """The _State for a training pass on `device` accumulating in `dtype`; None in traced code (whose graphs would
    mutate a tensor of ours; the guess stays 1 there) and during a CUDA graph capture before the state exists (it is
    made by a copy that the capture would defer)."""
    if torch.compiler.is_compiling():
        return None
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    key = (device.type, index, dtype)
    state = _state.get(key)
    if state is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        state = _state[key] = _State(torch.device(device.type, index) if index is not None else device, dtype)
    return state
