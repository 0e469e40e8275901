"""The training pass's guess of grad_output: a loss multiplied before its backward (1/accumulation steps, a weight
among several losses) gets a gradient written once, not written and then scaled.

The training pass (mean/sum, not float16) writes the gradient in the forward, before grad_output is known, and the
backward multiplies it by grad_output: a second read and write of the gradient unless grad_output is 1.  So the
forward multiplies the gradient by a guess m kept on the device, {m, last grad_output} per device and accumulation
dtype, and the backward by grad_output / m, skipped where they are equal (decided on the device: the host never
waits).  The backward records grad_output; one seen twice in a row, finite and within 2^-32..2^32, becomes the
guess (softmax_ce.h's update_predictor): a constant factor costs its scaling pass on the first two steps only, and
losses with different factors in one step keep what they cost without a guess.  m = 1 until then, so an unscaled
loss is unchanged.  Where the guess is right the gradient is rounded once (grad_output * (p - y) / d) instead of
twice; where it is wrong, the scaling by grad_output / m rounds once more; for powers of two both are exact.
"""

import torch

_state = {}


def state_for(device: torch.device, dtype: torch.dtype):
    """(predictor, guess) for a training pass on `device` accumulating in `dtype`: the (2,) state the backward
    updates and a 0-d view of its guess, which the forward reads.  (None, None) in traced code (whose graphs would
    mutate a tensor of ours; the guess stays 1 there) and during a CUDA graph capture before the state exists (it is
    made by a copy that the capture would defer)."""
    if torch.compiler.is_compiling():
        return None, None
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    key = (device.type, index, dtype)
    state = _state.get(key)
    if state is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None, None
        where = torch.device(device.type, index) if index is not None else device
        predictor = torch.tensor([1.0, float("nan")], dtype=dtype, device=where)
        state = _state[key] = (predictor, predictor[0])
    return state
