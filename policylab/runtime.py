"""Process-level settings that make CPU training fast, applied by the training loops."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 256 << 20
_applied = False


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory in the heap instead of returning it to the OS.

    By default glibc serves blocks from about 128 KiB up with fresh mmap pages and unmaps them on free,
    so every large temporary tensor (a [2, 256, 256] activation is 512 KiB) costs page faults each time
    it is allocated: about 100-300 us, measured as a 15% slower SAC update on the benchmark machine.
    Raising the mmap and trim thresholds to 256 MiB keeps such blocks for reuse. Only glibc (Linux);
    returns whether it was applied.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    return _applied


def flush_denormals() -> bool:
    """Flush float32 denormals to zero on the CPU (x86 FTZ/DAZ); returns whether it is on.

    Adam's first moment of a parameter whose gradient is exactly zero (a weight of a dead ReLU unit) decays
    by beta1 = 0.9 per step into the denormal range (below 1.2e-38) and then stays there: 0.9 times the
    smallest denormal rounds back to it. Every operation on a denormal takes a slow microcode path. In the
    DQN CartPole preset 55% of the first moments end up denormal, and flushing them makes the loop 3-7%
    faster (552-577 -> 534-536 us per update, `benchmarks/micro.py --only denormal`); values below 1.2e-38
    become 0, nothing else changes. The setting is per thread: torch's worker threads inherit it when they
    are created after this call (in a fresh process, the first parallel operation creates them).
    `POLICYLAB_FLUSH_DENORMAL=0` leaves it off.
    """
    if os.environ.get("POLICYLAB_FLUSH_DENORMAL", "1") == "0":
        return False
    return bool(torch.set_flush_denormal(True))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure(threads: int, seed: int) -> int:
    """torch threads (never more than the usable cores: oversubscribed threads only slow a run down) and
    seed for a training run, and the allocator and denormal settings above; returns the thread count used."""
    flush_denormals()  # before set_num_threads, which may start worker threads that inherit it
    used = max(1, min(threads, usable_cores()))
    torch.set_num_threads(used)
    torch.manual_seed(seed)
    keep_freed_memory()
    return used
