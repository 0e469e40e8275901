"""Out-of-range class indices on CUDA, reported without killing the CUDA context or waiting on the GPU.

PyTorch's CUDA kernels assert on a bad target, which poisons the whole CUDA context.  Ours never read out of
bounds: they turn that row's loss into NaN and record the target in a small device status buffer.  After each
launch the buffer is copied (non-blocking) to pinned host memory behind an event; the next call on that device
(or the backward) looks at the copy once the event has completed and raises IndexError.  The host never
waits for the GPU, so the error can surface one call late.  `check_errors()` waits and raises at once;
SOFTMAX_CE_SYNC_CHECK=1 does that after every forward (one host synchronisation per call).
"""

import os

import torch

SYNC_CHECK = os.environ.get("SOFTMAX_CE_SYNC_CHECK", "0") == "1"


class _DeviceStatus:
    def __init__(self, device):
        self.device = device
        self.buffer = torch.zeros(2, dtype=torch.int64, device=device)  # {flag, target}
        self.host = torch.zeros(2, dtype=torch.int64).pin_memory()
        self.event = torch.cuda.Event()
        self.pending = False

    def raise_if_flagged(self, wait):
        if not self.pending:
            return
        if wait:
            self.event.synchronize()
        elif not self.event.query():
            return
        self.pending = False
        flag, target = self.host.tolist()
        if flag:
            self.buffer.zero_()
            self.host.zero_()
            raise IndexError(f"Target {target} is out of bounds.")


_cuda = {}


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


def _tracing():
    return torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()


def buffer_for(device: torch.device):
    """The status tensor to hand to the forward ops on `device` (raising any error already flagged there), or
    None where nothing is recorded: on the CPU (its kernels raise directly) and in traced code, which then
    mutates no tensor of its own and has no lazy check (rows turn NaN)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return None
    index = _index(device)
    status = _cuda.get(index)
    if status is None:
        status = _cuda[index] = _DeviceStatus(torch.device("cuda", index))
    if not torch.cuda.is_current_stream_capturing():
        status.raise_if_flagged(wait=False)
    return status.buffer


def launched(device: torch.device) -> None:
    """After a forward launch on `device`: start the non-blocking copy of its status."""
    if device.type != "cuda" or _tracing():
        return
    status = _cuda[_index(device)]
    status.host.copy_(status.buffer, non_blocking=True)
    status.event.record()
    status.pending = True
    if SYNC_CHECK:
        status.raise_if_flagged(wait=True)


def poll(device: torch.device) -> None:
    """Raise a flagged error on `device` if its copy has already arrived (never waits)."""
    if device.type == "cuda" and not _tracing():
        status = _cuda.get(_index(device))
        if status is not None:
            status.raise_if_flagged(wait=False)


def check_errors() -> None:
    """Wait for every pending CUDA status and raise IndexError if a target was out of bounds."""
    for status in _cuda.values():
        status.raise_if_flagged(wait=True)
