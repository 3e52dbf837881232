"""The files of a report folder: PNG plots (matplotlib, Agg), report.csv with every number, and index.html.

index.html is one static page: tables, the PNGs by relative path and a link to the CSV; no scripts, no
external assets, so the folder can be copied anywhere and opened from disk.
"""

from __future__ import annotations

import csv
import html
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from policylab.report import METRIC_NAMES, METRICS, Interval, Report, percent

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CSV_NAME = "report.csv"
CSV_COLUMNS = ("kind", "algorithm", "versus", "env", "run", "statistic", "x", "value", "low", "high")


def write_report_files(result: Report, folder: Path) -> None:
    """Write the PNGs, report.csv and index.html of `result` into `folder` (paths recorded on `result`)."""
    images = {
        "aggregates": plot_aggregates(result, folder / "aggregates.png"),
        "profiles": plot_profiles(result, folder / "profiles.png"),
    }
    if result.improvements:
        images["improvement"] = plot_improvement(result, folder / "improvement.png")
    if result.curves:
        images["curves"] = plot_curves(result, folder / "curves.png")
    result.images = {name: result.dir / path.name for name, path in images.items()}
    write_csv(result, folder / CSV_NAME)
    (folder / "index.html").write_text(render_html(result), encoding="utf-8")


# ------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Figure:
    """A figure without pyplot (no global state, Agg canvas), as policylab.plot draws."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _color(result: Report, algo: str) -> str:
    return f"C{result.score_set.algorithms.index(algo) % 10}"


def _interval_bars(ax: Axes, labels: list[str], intervals: list[Interval], colors: list[str]) -> None:
    """rliable-style horizontal interval bars with a black tick at the point estimate, first label on top."""
    y = np.arange(len(labels))[::-1]
    for yi, interval, color in zip(y, intervals, colors):
        ax.barh(yi, max(interval.high - interval.low, 1e-9), left=interval.low, height=0.6, color=color, alpha=0.75)
        ax.vlines(interval.value, yi - 0.3, yi + 0.3, color="black", lw=2)
    ax.set_yticks(y, labels)
    ax.grid(axis="x", alpha=0.3)


def plot_aggregates(result: Report, path: Path) -> Path:
    """One panel per aggregate metric: each algorithm's point estimate and confidence interval."""
    algos = result.score_set.algorithms
    names = [m for m in METRICS if m in result.aggregates[algos[0]]]
    fig = _figure(3.2 * len(names), 0.6 * len(algos) + 1.6)
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, names):
        _interval_bars(ax, algos, [result.aggregates[a][name] for a in algos], [_color(result, a) for a in algos])
        ax.set_title(METRIC_NAMES[name] + (" (lower is better)" if name == "optimality_gap" else ""))
        ax.set_xlabel(_score_axis(result))
    fig.suptitle(f"Aggregate scores with {percent(result.confidence)} stratified bootstrap CIs")
    fig.savefig(path, format="png")
    return path


def plot_profiles(result: Report, path: Path) -> Path:
    """Performance profiles: the fraction of runs scoring above tau, with bootstrap bands."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for algo, (value, low, high) in result.profiles.items():
        color = _color(result, algo)
        ax.plot(result.taus, value, color=color, lw=2, label=algo)
        ax.fill_between(result.taus, low, high, color=color, alpha=0.2, lw=0)
    ax.set_xlabel(f"{_score_axis(result)} (tau)")
    ax.set_ylabel("fraction of runs with score > tau")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title(f"Performance profiles ({percent(result.confidence)} CI bands)")
    fig.savefig(path, format="png")
    return path


def plot_improvement(result: Report, path: Path) -> Path:
    """P(X > Y) for every pair of algorithms, with its interval; 0.5 is a tie."""
    pairs = list(result.improvements)
    fig = _figure(7, 0.6 * len(pairs) + 1.4)
    ax = fig.add_subplot()
    labels = [f"P({x} > {y})" for x, y in pairs]
    _interval_bars(ax, labels, [result.improvements[p] for p in pairs], [_color(result, x) for x, _ in pairs])
    ax.axvline(0.5, color="gray", ls="--", lw=1, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of improvement")
    ax.set_title(f"Probability of improvement ({percent(result.confidence)} CIs)")
    fig.savefig(path, format="png")
    return path


def plot_curves(result: Report, path: Path) -> Path:
    """Learning curves from eval.csv: the IQM (or mean) over runs x envs per step, with bootstrap bands."""
    from matplotlib.ticker import EngFormatter

    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    for algo, curve in result.curves.items():
        color = _color(result, algo)
        marker = "o" if len(curve.steps) == 1 else None
        ax.plot(curve.steps, curve.value, color=color, lw=2, marker=marker, label=algo)
        ax.fill_between(curve.steps, curve.low, curve.high, color=color, alpha=0.2, lw=0)
    ax.set_xlabel(result.step_label)
    ax.set_ylabel(f"{_curve_statistic(result)} {_score_axis(result)}")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    ax.set_title(f"Learning curves ({percent(result.confidence)} CI bands)")
    fig.savefig(path, format="png")
    return path


def _score_axis(result: Report) -> str:
    return "normalized score" if result.score_set.normalized else result.metric


def _curve_statistic(result: Report) -> str:
    return "IQM" if result.curve_statistic == "iqm" else "mean"


# --------------------------------------------------------------------------------------------------- CSV


def write_csv(result: Report, path: Path) -> None:
    """Every number of the report, one per row (columns: CSV_COLUMNS; empty cells where one does not apply)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in csv_rows(result):
            writer.writerow(["" if row.get(c) is None else _cell(row[c]) for c in CSV_COLUMNS])


def _cell(value: Any) -> Any:
    return repr(float(value)) if isinstance(value, (float, np.floating)) else value


def csv_rows(result: Report) -> Iterator[dict[str, Any]]:
    """kind: run (raw and report score of each run), aggregate, profile (x = tau), improvement, curve (x = step)."""
    ss = result.score_set
    for algo in ss.algorithms:
        for column in ss.runs[algo]:
            for run in column:
                base = {"kind": "run", "algorithm": algo, "env": run.env, "run": str(run.dir), "x": run.step}
                yield {**base, "statistic": result.metric, "value": run.value}
                if ss.rescaled:
                    yield {**base, "statistic": "normalized_score", "value": ss.score(run)}
    for algo, estimates in result.aggregates.items():
        for name, e in estimates.items():
            yield {
                "kind": "aggregate",
                "algorithm": algo,
                "statistic": name,
                "value": e.value,
                "low": e.low,
                "high": e.high,
            }
    for algo, (value, low, high) in result.profiles.items():
        for tau, v, lo, hi in zip(result.taus, value, low, high):
            yield {
                "kind": "profile",
                "algorithm": algo,
                "statistic": "fraction_above",
                "x": tau,
                "value": v,
                "low": lo,
                "high": hi,
            }
    for (x, y), e in result.improvements.items():
        yield {
            "kind": "improvement",
            "algorithm": x,
            "versus": y,
            "statistic": "P(X>Y)",
            "value": e.value,
            "low": e.low,
            "high": e.high,
        }
    for algo, curve in result.curves.items():
        for step, v, lo, hi in zip(curve.steps, curve.value, curve.low, curve.high):
            yield {
                "kind": "curve",
                "algorithm": algo,
                "statistic": result.curve_statistic,
                "x": step,
                "value": v,
                "low": lo,
                "high": hi,
            }


# -------------------------------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
.note { background: #fff8e0; padding: 0.4em 0.8em; border-left: 3px solid #e0b000; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def render_html(result: Report) -> str:
    """The static index.html."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>policylab report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>policylab report</h1>",
        f"<p><b>Score</b>: {e(result.score_label)}.</p>",
        _settings_html(result),
        *(f'<p class="note">{e(note)}</p>' for note in result.notes),
        "<h2>Aggregate metrics</h2>",
        _aggregate_table(result),
        "<p>Mean and median: over envs, of each env's mean over runs. IQM: the mean of the middle 50% of all run "
        "scores (robust to outliers, with smaller intervals than the median). Optimality gap: how far scores fall "
        "short of the threshold on average (lower is better).</p>",
        _image(result, "aggregates", "aggregate metrics with confidence intervals"),
        "<h2>Performance profiles</h2>",
        "<p>The fraction of runs (over all envs) whose score is above each threshold tau.</p>",
        _image(result, "profiles", "performance profiles"),
    ]
    if result.improvements:
        parts += ["<h2>Probability of improvement</h2>", _improvement_table(result)]
        parts.append(_image(result, "improvement", "probability of improvement"))
    if result.curves:
        stat = _curve_statistic(result)
        parts += [f"<h2>Learning curves</h2><p>{e(stat)} over runs and envs of each evaluation in eval.csv.</p>"]
        parts.append(_image(result, "curves", "learning curves"))
    parts += ["<h2>Runs</h2>", _runs_table(result)]
    parts.append(f'<p>Every number on this page: <a href="{CSV_NAME}">{CSV_NAME}</a>.</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _settings_html(result: Report) -> str:
    e = html.escape
    ss = result.score_set
    items = [
        f"{len(ss.algorithms)} algorithm(s), {len(ss.tasks)} env(s) (each env is a task): {e(', '.join(ss.tasks))}",
        f"{percent(result.confidence)} percentile intervals from a stratified bootstrap (runs resampled within each "
        f"env) with {result.reps} resamples, seed {result.seed}",
    ]
    if result.threshold is not None:
        items.append(f"optimality gap threshold: {result.threshold:g}")
    if ss.rescaled:
        refs = ", ".join(
            f"{env}: {lo:g} .. {hi:g} ({ss.ref_sources.get(env, '?')})" for env, (lo, hi) in ss.refs.items()
        )
        items.append(f"reference returns (min .. max): {e(refs)}")
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(interval: Interval) -> str:
    return f"{interval.value:.4g} [{interval.low:.4g}, {interval.high:.4g}]"


def _aggregate_table(result: Report) -> str:
    algos = result.score_set.algorithms
    names = [m for m in METRICS if m in result.aggregates[algos[0]]]
    header = ["algorithm", "runs x envs", *(f"{METRIC_NAMES[n]} [{percent(result.confidence)} CI]" for n in names)]
    rows = []
    for algo in algos:
        n_runs, n_tasks = result.score_set.matrices[algo].shape
        rows.append([algo, f"{n_runs} x {n_tasks}", *(_fmt(result.aggregates[algo][n]) for n in names)])
    return _table(header, rows)


def _improvement_table(result: Report) -> str:
    rows = [[x, y, _fmt(e)] for (x, y), e in result.improvements.items()]
    return _table(["X", "Y", f"P(X > Y) [{percent(result.confidence)} CI]"], rows)


def _runs_table(result: Report) -> str:
    ss = result.score_set
    header = ["run directory", "algorithm", "env", "seed", "step", result.metric]
    if ss.rescaled:
        header.append("normalized score")
    rows = []
    for algo in ss.algorithms:
        for column in ss.runs[algo]:
            for run in column:
                row = [str(run.dir), algo, run.env, "" if run.seed is None else str(run.seed)]
                row += ["" if run.step is None else f"{run.step:,.0f}", f"{run.value:.6g}"]
                if ss.rescaled:
                    row.append(f"{ss.score(run):.4g}")
                rows.append(row)
    return _table(header, rows)


def _image(result: Report, name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}.png" alt="{html.escape(alt)}"></p>'
