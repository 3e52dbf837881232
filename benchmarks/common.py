"""Shared helpers for policylab's benchmarks (protocol: benchmarks/README.md).

Not run on its own: benchmark scripts such as `benchmarks/ppo_cartpole.py` import it
(`from common import ...`; a script's own folder is first on `sys.path`). It provides

* `machine_info()` / `package_versions()` / `git_state()` / `command_line()`: the provenance
  every results file records (CPU model from /proc/cpuinfo, core counts, versions, commit);
* `run_worker()`: one measured run in a fresh Python subprocess, timed from launch to exit
  by the parent, with the worker's own JSON record read back;
* `summarize()` / `ratio()` / `fmt_summary()`: median and min-max over seeds, treating a
  missing value (None: e.g. a run that never reached the threshold) as missing, counted apart;
* `print_table()` and `write_results()` (JSON into `benchmarks/results/<name>-<date>.json`).

Only the standard library is imported, so a worker subprocess that imports this module pays
no measurable start-up cost for it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# On Linux time.perf_counter() reads CLOCK_MONOTONIC, one clock for all processes, so a parent's
# launch time and a child's first perf_counter() can be subtracted (interpreter start-up).
SHARED_CLOCK = sys.platform.startswith("linux")


# --- provenance ----------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average_at_start": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict[str, Any]:
    """The commit of the checkout and whether it has uncommitted changes (None outside git)."""

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def command_line() -> str:
    """The exact command this process was started with, shell-quoted."""
    return shlex.join([sys.executable, *sys.argv])


# --- running one measured subprocess -------------------------------------------------------------


@dataclass
class WorkerResult:
    args: list[str]
    returncode: int
    wall_s: float
    """Whole-process wall clock, from just before launch to exit, measured by the parent."""
    launched_at: float
    """The parent's time.perf_counter() just before launch."""
    record: dict[str, Any] | None
    """The JSON the worker wrote to its --out file (None if it failed)."""
    stderr_tail: str


def run_worker(script: str | Path, args: Sequence[str], out: Path, timeout: float | None = None) -> WorkerResult:
    """Run `python script *args --out out` in a fresh interpreter, from the repository root."""
    cmd = [sys.executable, str(script), *args, "--out", str(out)]
    out.unlink(missing_ok=True)
    launched = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    wall = time.perf_counter() - launched
    record = json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else None
    if record is not None and SHARED_CLOCK and isinstance(record.get("t0_abs"), float):
        record["startup_s"] = record["t0_abs"] - launched  # interpreter start-up before the worker's first line
    tail = (proc.stdout + proc.stderr).decode(errors="replace")[-4000:]
    return WorkerResult(list(args), proc.returncode, wall, launched, record, tail)


# --- summaries -----------------------------------------------------------------------------------


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Median and min-max over the values present; None values are counted as missing."""
    present = [float(v) for v in values if v is not None]
    return {
        "n": len(present),
        "missing": len(values) - len(present),
        "median": statistics.median(present) if present else None,
        "min": min(present) if present else None,
        "max": max(present) if present else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def fmt_summary(s: dict[str, Any], spec: str = ".2f") -> str:
    """'1.23 [1.01-1.50]' plus '(k missing)' when some runs had no value."""
    if s["median"] is None:
        text = "-"
    elif s["n"] == 1:
        text = fmt(s["median"], spec)
    else:
        text = f"{fmt(s['median'], spec)} [{fmt(s['min'], spec)}-{fmt(s['max'], spec)}]"
    return text + (f" ({s['missing']} missing)" if s["missing"] else "")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


# --- results -------------------------------------------------------------------------------------


def results_path(name: str, date: str | None = None) -> Path:
    """benchmarks/results/<name>-<YYYY-MM-DD>.json; an existing file is never overwritten (-2, -3 ...)."""
    date = date or _dt.date.today().isoformat()
    path = RESULTS_DIR / f"{name}-{date}.json"
    n = 2
    while path.exists():
        path = RESULTS_DIR / f"{name}-{date}-{n}.json"
        n += 1
    return path


def write_results(name: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    path = path or results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
