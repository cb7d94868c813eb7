"""Where a run happens: the device, the scan backend `--fast` picks, the process group, peak memory,
and a step's numbers read back without waiting for the device.

train_tiny.py and generate.py share these, so each flag is turned into a setting in one place.
Under torchrun (several processes), `dist_info` reports this process's rank and the world size.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; otherwise the named device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU: use --device cpu")
    return device


def scan_backend_for(fast: bool) -> str | None:
    """The one place `--fast` becomes a scan backend: the best one available here
    (`kernels.best_available`), else the reference. Without --fast: None (the
    MINIJAMBA_SCAN_BACKEND environment variable, else the reference)."""
    if not fast:
        return None
    from minijamba import kernels

    return kernels.best_available()


def dist_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless a torch.distributed process group is running."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def peak_memory(device: torch.device) -> int | None:
    """Peak memory of this process in bytes: the GPU allocator's on CUDA, else the resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def total_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device` (the GPU's, or the machine's RAM for the CPU), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on this platform
        return None


def check_training_fits(num_parameters: int, device: torch.device, world_size: int = 1) -> None:
    """Refuse, before allocating anything, a model whose AdamW training state cannot fit: fp32
    weights, gradients and two moments are 16 bytes per parameter (shared by `world_size` shards)."""
    need = 16 * num_parameters / world_size
    have = total_memory(device)
    if have is not None and need > have:
        raise ValueError(
            f"training {num_parameters / 1e9:.2f}B parameters with AdamW needs about {need / 2**30:,.0f} GiB "
            f"(fp32 weights, gradients, two moments) and this {device.type} has {have / 2**30:,.0f} GiB: "
            f"choose a smaller --preset or --override smaller sizes"
        )


class StopFlag:
    """Ctrl-C sets a flag that the loop checks after each step; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Readout:
    """A step's few numbers (loss, gradient norm), copied to the host without waiting for the device:
    `get` a step later, when the device is on the next one and the host has launched it (waiting
    right away would leave the device idle while the host launches each step)."""

    def __init__(self, values: torch.Tensor):
        self.ready = None
        self.host = values
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def get(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()
