"""Process-level settings that make CPU training fast, applied by the training loops."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from policylab.config import AUTO_THREADS

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
    """The cores this process may run on: its CPU affinity, and the cgroup's CPU quota when that is lower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def _cgroup_cpu_quota(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """cgroup v2 `cpu.max` as a number of cores (e.g. `docker --cpus=2`), or None without a quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def memory_available(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still allocate: the machine's available memory and free swap (/proc/meminfo), or
    what its cgroup's `memory.max` leaves where that is lower; None where neither can be read (not Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        machine: int | None = sum(int(fields[key].split()[0]) * 1024 for key in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        machine = None
    try:
        limit, used = ((cgroup / name).read_text().strip() for name in ("memory.max", "memory.current"))
        in_group: int | None = None if limit == "max" else max(0, int(limit) - int(used))
    except (OSError, ValueError):
        in_group = None
    known = [n for n in (machine, in_group) if n is not None]
    return min(known) if known else None


def check_memory(nbytes: int, what: str, per_item: int, fix: Callable[[int], str]) -> None:
    """Refuse storage that cannot fit before allocating it: torch writes every page of a new tensor, so too large a
    buffer ends the process at once (the kernel's OOM killer: no message) or fails inside torch. `per_item`: bytes
    per item, so that `fix` gets the number of items that would fit in half of what is available (the rest is
    left for the networks, the envs and the batches)."""
    available = memory_available()
    if available is None or nbytes <= available:
        return
    from policylab.errors import ConfigError

    raise ConfigError(
        f"{what} needs {_gigabytes(nbytes)} of memory, and {_gigabytes(available)} is available here",
        fix(max(1, available // 2 // max(1, per_item))),
    )


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


class CoreLoad:
    """How many cores other processes kept busy since the last reading: the busy time of this process's
    cores (/proc/stat, the cores in its affinity mask) minus this process's own CPU time, over the wall
    clock. None where /proc/stat cannot be read (not Linux)."""

    def __init__(self) -> None:
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._read()

    def _busy_seconds(self) -> float | None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        wanted = {f"cpu{i}" for i in self.cpus}
        busy = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if name in wanted:
                # user nice system idle iowait irq softirq steal (guest time is already in user)
                v = [int(x) for x in rest.split()[:8]]
                busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        return busy / self.tick if wanted else None

    def _read(self) -> tuple[float, float, float] | None:
        busy = self._busy_seconds()
        if busy is None:
            return None
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def others(self) -> float | None:
        """Cores kept busy by other processes since the previous call (or since construction)."""
        now = self._read()
        if now is None or self.last is None:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self.last, now
        self.last = now
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-6)


class Threads:
    """The torch thread count of a training run, and `threads=auto`.

    A number is used as it is (capped at the usable cores). `auto` uses up to the algorithm's preferred
    count (1 on-policy, 2 off-policy: what measured fastest alone) but only as many threads as there are
    cores that other processes leave free. The OpenMP threads of a parallel product wait for each other,
    so a thread that shares its core with another busy process stalls its whole team: two 2-thread SAC runs
    on 2 cores took 3.3x (an Intel Xeon) and 2.7-8.5x (an AMD EPYC, `benchmarks/concurrent_runs.py`) as
    long as two 1-thread runs. So an `auto` run starts with 1 thread, measures how
    busy other processes kept its cores (`CoreLoad`) every `interval` seconds, and uses
    `floor(cores - others + 0.3)` threads, between 1 and the preferred count: a second thread only where a
    core is at least 70% free. Changing the count between updates did not change the off-policy runs'
    parameters on the benchmark machines (`benchmarks/micro.py --only thread-invariance`), but for
    bit-for-bit reproducibility on any machine and load, set a number.
    """

    SLACK = 0.3

    def __init__(self, threads: int | str, preferred: int, interval: float = 0.5) -> None:
        self.cores = usable_cores()
        self.auto = threads == AUTO_THREADS
        self.limit = max(1, min(preferred if self.auto else int(threads), self.cores))
        self.interval = interval
        self.load = CoreLoad() if self.auto and self.limit > 1 else None
        self.count = 1 if self.load is not None else self.limit
        self.next_check = time.perf_counter() + interval
        torch.set_num_threads(self.count)

    def update(self) -> int:
        """Re-check the free cores (at most every `interval` seconds; call it between updates) and return the
        thread count in use."""
        if self.load is None or time.perf_counter() < self.next_check:
            return self.count
        self.next_check = time.perf_counter() + self.interval
        others = self.load.others()
        if others is None:  # no /proc/stat: the preferred count, as before auto existed
            self.load, wanted = None, self.limit
        else:
            wanted = max(1, min(self.limit, math.floor(self.cores - others + self.SLACK)))
        if wanted != self.count:
            self.count = wanted
            torch.set_num_threads(wanted)
        return self.count


def limit_numpy_blas(threads: int) -> None:
    """numpy's own BLAS (OpenBLAS, apart from torch's MKL) to `threads` threads. Its default is every core,
    and its threads, like OpenMP's, wait for each other: a product of LLM sampling (64x64 by 64x384) took about
    twice as long with a second process busy on another core as on one thread (`benchmarks/small_ops.py`). The
    products numpy runs here (acting, sampling small models) are small."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def configure(threads: int | str, seed: int, preferred: int = 1) -> Threads:
    """torch threads (`Threads`: never more than the usable cores, `auto` as many as are free) and seed for a
    training run, numpy's BLAS on one thread (`limit_numpy_blas`: only acting uses it, on a few rows), and the
    allocator and denormal settings above; returns the `Threads` to update."""
    flush_denormals()  # before set_num_threads, which may start worker threads that inherit it
    limit_numpy_blas(1)
    used = Threads(threads, preferred)
    torch.manual_seed(seed)
    keep_freed_memory()
    return used
