"""Where the engine computes, and giving memory back when it is done."""

from __future__ import annotations

import ctypes
import functools
import gc
import sys

import torch

from .distributed import process_device
from .errors import PersonalizeError


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """``auto``: the CUDA GPU when torch sees one, else the CPU; an explicit device must exist. Under accelerate
    launch, each process's own GPU."""
    if str(requested) == "auto":
        return process_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PersonalizeError("device 'cuda' was requested, but this PyTorch sees no CUDA GPU; use 'auto' or 'cpu'")
    return process_device(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        # glibc keeps freed blocks below its mmap threshold (which grows to 32 MB: most weights) in the heap, so
        # a dropped model would stay in the process's RSS, the host server's included, until trimmed.
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # another C library (musl) has none
        return None
