"""Out-of-range class indices on CUDA, reported without killing the CUDA context or waiting on the GPU.

PyTorch's CUDA kernels assert on a bad target, which poisons the whole CUDA context.  Ours never read out of
bounds: they turn that row's loss into NaN and write the target into a small status buffer in pinned host
memory, mapped into the GPU's address space, so no copy or event follows each launch.  The next call on that
device (or the backward) reads the buffer and raises IndexError if a kernel has flagged a target by then (waiting
for the GPU only then, before it reads and clears the buffer): otherwise the host never waits for the GPU, so
the error can surface one call late.  `check_errors()` waits and raises at once; SOFTMAX_CE_SYNC_CHECK=1 does
that after every forward (one host synchronisation per call).
"""

import ctypes
import os

import torch

SYNC_CHECK = os.environ.get("SOFTMAX_CE_SYNC_CHECK", "0") == "1"


class _DeviceStatus:
    def __init__(self, device):
        self.device = device
        self.buffer = torch.zeros(2, dtype=torch.int64, pin_memory=True)  # {flag, target}, written by the kernels
        # Read and cleared through ctypes: a plain memory access, no torch op (and no CUDA call) per check.
        self.flag = ctypes.c_int64.from_address(self.buffer.data_ptr())
        self.target = ctypes.c_int64.from_address(self.buffer.data_ptr() + 8)

    def raise_if_flagged(self, wait):
        if wait:
            torch.cuda.synchronize(self.device)
        if self.flag.value:
            # The flagging kernel may still be running (more bad rows to write): let it finish before the target
            # is read and the buffer cleared, or a late write would report again, or report a cleared target.
            # A wait on the error path only.
            if not wait:
                torch.cuda.synchronize(self.device)
            target = self.target.value
            self.flag.value = self.target.value = 0
            raise IndexError(f"Target {target} is out of bounds.")


_cuda = {}


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


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
    # The flag first (a memory read): the capture query is a CUDA call, on every forward otherwise.
    if status.flag.value and not torch.cuda.is_current_stream_capturing():
        status.raise_if_flagged(wait=False)
    return status.buffer


def launched(device: torch.device) -> None:
    """After a forward launch on `device`: with SOFTMAX_CE_SYNC_CHECK=1, wait for it and raise what it flagged."""
    if SYNC_CHECK and device.type == "cuda" and not torch.compiler.is_compiling() \
            and not torch.cuda.is_current_stream_capturing():
        _cuda[_index(device)].raise_if_flagged(wait=True)


def poll(device: torch.device) -> None:
    """Raise a flagged error on `device` if a finished kernel has flagged one (never waits)."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        status = _cuda.get(_index(device))
        if status is not None:
            status.raise_if_flagged(wait=False)


def check_errors() -> None:
    """Wait for every CUDA device in use and raise IndexError if a target was out of bounds."""
    for status in _cuda.values():
        status.raise_if_flagged(wait=True)
