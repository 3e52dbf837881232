"""The run directory and what is written to it: config, CSV metrics, TensorBoard, console progress."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from policylab.checkpoint import atomic_write_text

TRAIN_CSV = "train.csv"
EVAL_CSV = "eval.csv"
CONFIG_YAML = "config.yaml"
SUMMARY_JSON = "eval.json"


def new_run_dir(runs_dir: str | Path, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3 ... if that exists already (never overwrite a run)."""
    root = Path(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    candidate = root / name
    n = 2
    while candidate.exists():
        candidate = root / f"{name}-{n}"
        n += 1
    candidate.mkdir()
    return candidate


class CsvLog:
    """Appends rows to a CSV. A row with a key not seen before (e.g. `early_stop_epoch`) adds a column:
    the file is rewritten once with the wider header (older rows get empty cells)."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.columns: list[str] | None = None
        if path.exists() and resume_step is not None:
            self._truncate_after(resume_step)
        elif path.exists():
            path.unlink()
        self._file: io.TextIOWrapper | None = None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint being resumed from."""
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        self.columns = list(rows[0].keys())
        kept = [r for r in rows if float(r["step"]) <= step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.path, buf.getvalue())

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            new = not self.path.exists() or self.columns is None
            self._file = self.path.open("a", newline="")
            if new:
                self.columns = list(row.keys())
                csv.DictWriter(self._file, fieldnames=self.columns).writeheader()
        assert self.columns is not None
        if any(k not in self.columns for k in row):
            self._widen([k for k in row if k not in self.columns])
        writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
        writer.writerow({k: _fmt(row.get(k)) for k in self.columns})
        self._file.flush()

    def _widen(self, new_columns: list[str]) -> None:
        assert self._file is not None and self.columns is not None
        self._file.close()
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        self.columns = self.columns + new_columns
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())
        self._file = self.path.open("a", newline="")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def fixed(value: float, digits: int = 1) -> str:
    """`value` with `digits` decimals, never "-0.0" (a mean of zero rewards, or a small negative one rounded)."""
    return f"{round(value, digits) + 0.0:.{digits}f}"


def read_csv(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in csv.DictReader(f)]


class Progress:
    """Progress output: `enabled=None` shows a live rich bar on a terminal and a line every 10%
    otherwise (e.g. in CI logs); True forces the bar, False prints nothing."""

    def __init__(
        self,
        total: int,
        description: str,
        enabled: bool | None = None,
        start: int = 0,
        metric: str = "return",
        digits: int = 1,
    ) -> None:
        self.total, self.metric, self.digits = total, metric, digits
        self.live = sys.stdout.isatty() if enabled is None else enabled
        self.silent = enabled is False
        self._next_tenth = 1
        """The next 10% mark to print a line at (an integer count of tenths: 0.1 added up drifts past 0.3)."""
        self._bar = None
        if self.silent:
            return
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[fps]} steps/s"),
                TextColumn(metric + " {task.fields[ret]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                refresh_per_second=5,
            )
            self._task = self._bar.add_task(description, total=total, completed=start, fps="-", ret="-")
            self._bar.start()
        else:
            print(f"{description}: {total:,} steps", flush=True)

    def update(self, step: int, fps: float, mean_return: float | None, evaluated: str | None = None) -> None:
        """`mean_return`: of the training episodes that ended lately; without one (an offline phase has no
        episodes) `evaluated`, the latest evaluation's text, is shown instead."""
        if self.silent:
            return
        ret = fixed(mean_return, self.digits) if mean_return is not None else evaluated or "-"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, fps=f"{fps:,.0f}", ret=ret)
        elif step * 10 >= self._next_tenth * self.total:
            print(f"  {step:>10,}/{self.total:,} steps  {fps:,.0f} steps/s  {self.metric} {ret}", flush=True)
            while self._next_tenth * self.total <= step * 10:
                self._next_tenth += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class JsonlLog:
    """Appends JSON rows (each with a "step") to a file, one per line; on resume, drops the rows logged after the
    checkpoint being resumed from, as CsvLog does."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if path.exists() and resume_step is not None:
            lines = path.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line)["step"] <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with self.path.open("a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))


class RunLog:
    """Everything a run writes besides checkpoints: train.csv, eval.csv, TensorBoard, eval.json."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None = None) -> None:
        self.dir = run_dir
        self.train = CsvLog(run_dir / TRAIN_CSV, resume_step)
        self.eval = CsvLog(run_dir / EVAL_CSV, resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed: pip install 'policylab[tensorboard]'; logging CSV only")
            else:
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
        self.started = time.perf_counter()

    def log_train(self, row: dict[str, Any]) -> None:
        self.train.write(row)
        self._tb(row, "train")

    def log_eval(self, row: dict[str, Any]) -> None:
        self.eval.write(row)
        self._tb(row, "eval")

    def _tb(self, row: dict[str, Any], prefix: str) -> None:
        if self.tb is None:
            return
        step = int(row["step"])
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.dir / SUMMARY_JSON, json.dumps(summary, indent=1))

    def close(self) -> None:
        self.train.close()
        self.eval.close()
        if self.tb is not None:
            self.tb.close()
