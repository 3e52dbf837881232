"""Learning curves of run directories as a PNG: mean over seeds with a min-max band.

Runs are grouped by (algo, env) from their config.yaml. Within a group each run's metric
is interpolated onto a common step grid spanning the steps that every run reached, so
the mean and the band never extrapolate. Eval returns (eval.csv), when present, are drawn
as markers: the mean over the group's runs at the eval steps they share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from policylab.errors import PolicylabError
from policylab.logging import CONFIG_YAML, EVAL_CSV, TRAIN_CSV, read_csv

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Curve = tuple[np.ndarray, np.ndarray]  # (steps, values), NaN rows removed, sorted by step


@dataclass
class RunData:
    dir: Path
    algo: str
    env: str
    rows: list[dict[str, float]]  # the `source` CSV
    eval_rows: list[dict[str, float]]
    offline_steps: int = 0
    """An offline run's gradient steps before its online phase (`online_steps`), if any: its first steps are
    gradient steps, not env steps."""
    online_steps: int = 0
    language_model: bool = False
    """A `policylab llm` run (its config has a task, no env): steps are training steps, the metric a reward."""


def load_run(run_dir: Path, source: str = "train") -> RunData:
    """Read a run directory; raise a PolicylabError when it is not one."""
    if not run_dir.exists():
        raise PolicylabError(
            f"{str(run_dir)!r} does not exist",
            "pass directories written by `policylab train` (they are under runs/), e.g. runs/ppo-CartPole-v1-s1",
        )
    if not (run_dir / TRAIN_CSV).is_file():
        raise PolicylabError(
            f"{str(run_dir)!r} is not a run directory (it has no {TRAIN_CSV})",
            "pass directories written by `policylab train`, e.g. runs/ppo-CartPole-v1-s1",
        )
    config = _read_config(run_dir / CONFIG_YAML)
    eval_rows = read_csv(run_dir / EVAL_CSV) if (run_dir / EVAL_CSV).is_file() else []
    rows = eval_rows if source == "eval" else read_csv(run_dir / TRAIN_CSV)
    language_model = is_language_model_config(config)
    algo, env = str(config.get("algo", run_dir.name)), str(config.get("env", config.get("task", "?")))
    return RunData(run_dir, algo, env, rows, eval_rows, *offline_phases(config), language_model=language_model)


def is_language_model_config(config: dict[str, Any]) -> bool:
    """A `policylab llm` run's config: it names a task and no env."""
    return "env" not in config and "task" in config


def default_metric(runs: list[RunData], source: str) -> str:
    """The metric plotted unless one is given: the mean return; for language-model runs the reward of the
    sampled completions (train.csv; SFT runs: the loss) or the greedy exact match (eval.csv)."""
    if runs and all(run.language_model for run in runs):
        if source == "eval":
            return "accuracy"
        return "loss" if all(run.algo == "sft" for run in runs) else "reward"
    return "return_mean"


def offline_phases(config: dict[str, Any]) -> tuple[int, int]:
    """(gradient steps before the online phase, online env steps) of an offline run's config; (0, 0) for online
    and hybrid runs (a dataset with `offline_ratio`), whose steps are env steps throughout."""
    if config.get("dataset") is None or config.get("offline_ratio", 0) is not None:
        return 0, 0
    return int(config.get("steps", 0)), int(config.get("online_steps", 0) or 0)


def step_axis_label(phases: list[tuple[int, int]], language_model: bool = False) -> str:
    """What the x axis counts, from each run's `offline_phases`: env steps, gradient steps, or both (language-model
    runs: training steps)."""
    if language_model:
        return "training steps"
    if not any(offline for offline, _ in phases):
        return "environment steps"
    if all(offline and not online for offline, online in phases):
        return "gradient steps (offline)"
    return "gradient steps offline, then environment steps online (from the dotted line)"


def _read_config(path: Path) -> dict[str, Any]:
    """config.yaml as a dict; {} when missing or unreadable (the plot then labels the run by its folder)."""
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError:
        config = {}
    return config if isinstance(config, dict) else {}


def metric_curve(rows: list[dict[str, float]], metric: str) -> Curve:
    """The (step, value) pairs of `metric`, skipping NaN (not yet logged) cells."""
    pairs = np.array(sorted((r["step"], r[metric]) for r in rows if np.isfinite(r.get(metric, np.nan))), dtype=float)
    return (pairs[:, 0], pairs[:, 1]) if len(pairs) else (np.zeros(0), np.zeros(0))


def aggregate_curves(curves: list[Curve], points: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Interpolate curves onto a shared grid over the steps all of them reached: (grid, mean, low, high).

    If the curves' step ranges do not overlap, the grid is the single step where the earliest-ending one ends."""
    start = max(float(s[0]) for s, _ in curves)
    end = min(float(s[-1]) for s, _ in curves)
    grid = np.linspace(min(start, end), end, points if end > start else 1)
    ys = np.stack([np.interp(grid, s, v) for s, v in curves])
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def shared_eval_points(runs: list[RunData], metric: str) -> Curve:
    """Mean of `metric` over the runs at the eval steps that every run logged."""
    tables = [{s: v for s, v in zip(*metric_curve(r.eval_rows, metric))} for r in runs]
    common = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    return np.array(common, dtype=float), np.array([np.mean([t[s] for t in tables]) for s in common], dtype=float)


def group_runs(runs: list[RunData], metric: str) -> dict[tuple[str, str], list[RunData]]:
    """Runs with data for `metric`, grouped by (algo, env) in first-seen order."""
    groups: dict[tuple[str, str], list[RunData]] = {}
    for run in runs:
        if len(metric_curve(run.rows, metric)[0]):
            groups.setdefault((run.algo, run.env), []).append(run)
    return groups


def _check_metric(run: RunData, metric: str, source: str) -> None:
    path = run.dir / (EVAL_CSV if source == "eval" else TRAIN_CSV)
    columns = path.read_text().partition("\n")[0].strip().split(",") if path.is_file() else []
    if metric not in columns:
        choices = ", ".join(c for c in columns if c != "step") or "(none yet)"
        raise PolicylabError(f"{path} has no column {metric!r}", f"use --metric with one of: {choices}")


def plot_runs(
    run_dirs: list[Path],
    out: Path,
    metric: str | None = None,
    source: str = "train",
    notes: list[str] | None = None,
) -> Path:
    """Draw the learning curves of `run_dirs` into the PNG `out` (written atomically); return its path (`metric`
    None: `default_metric`). `notes`, if given, gets a line for each group whose runs end at different steps (its
    curve stops where the first ends)."""
    if source not in ("train", "eval"):
        raise PolicylabError(f"unknown source {source!r}", "use source='train' or source='eval'")
    runs = [load_run(Path(d), source) for d in run_dirs]
    metric = metric or default_metric(runs, source)
    for run in runs:
        _check_metric(run, metric, source)
    groups = group_runs(runs, metric)
    if not groups:
        raise PolicylabError(
            f"no run has any data for {metric!r} yet",
            "train longer (returns appear once the first episodes end) or choose another --metric",
        )
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(10, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, ((algo, env), members) in enumerate(groups.items()):
        _draw_group(ax, f"C{i % 10}", f"{algo} on {env}", members, metric, with_eval=source == "train")
        ends = [float(metric_curve(r.rows, metric)[0][-1]) for r in members]
        if notes is not None and min(ends) < max(ends):
            notes.append(
                f"{algo} on {env}: the runs end at different steps ({min(ends):,.0f} to {max(ends):,.0f}); its mean "
                f"and band are drawn over the steps that all of them reached (to {min(ends):,.0f})"
            )
    phases = [(run.offline_steps, run.online_steps) for run in runs]
    ax.set_xlabel(step_axis_label(phases, all(run.language_model for run in runs)))
    for boundary in sorted({run.offline_steps for run in runs if run.offline_steps and run.online_steps}):
        ax.axvline(boundary, color="0.4", ls=":", lw=1)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({source})")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return _save_png(fig, Path(out))


def _draw_group(ax: Axes, color: str, label: str, runs: list[RunData], metric: str, with_eval: bool) -> None:
    """Mean line, min-max band (with several runs) and eval markers (mean at shared eval steps)."""
    grid, mean, low, high = aggregate_curves([metric_curve(r.rows, metric) for r in runs])
    n = len(runs)
    marker = "o" if len(grid) == 1 else None
    ax.plot(grid, mean, color=color, lw=2, marker=marker, label=f"{label} ({n} seed{'s' if n > 1 else ''})")
    if n > 1:
        ax.fill_between(grid, low, high, color=color, alpha=0.2, lw=0, label=f"{label}: min-max over seeds")
    steps, values = shared_eval_points([r for r in runs if r.eval_rows], metric) if with_eval else (grid[:0], grid[:0])
    if len(steps):
        ax.plot(steps, values, "o", color=color, mec="black", ms=6, label=f"{label}: eval (mean)")


def _save_png(fig: Figure, out: Path) -> Path:
    """Save to a temporary file beside `out`, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
