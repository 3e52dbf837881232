"""Multi-seed reports as "Deep RL at the edge of the statistical precipice" (Agarwal et al. 2021) recommends.

Pure statistics on a score matrix [runs x tasks] (one matrix per algorithm): mean, median, IQM and optimality
gap with stratified percentile-bootstrap intervals, performance profiles, probability of improvement and
learning curves. They reproduce rliable 1.2.0's numbers: the point estimates are its formulas, and the
bootstrap draws its resamples from `np.random.RandomState(seed)` in the order rliable's `StratifiedBootstrap`
draws them from the global NumPy generator (`np.random.choice(runs, (runs, tasks))` per resample), so
`np.random.seed(seed)` before an rliable call gives the same intervals. Every resample is drawn in one call
and evaluated as an array: no Python loop per resample.

`report(run_dirs, out)` (and `policylab report`) reads run directories, pools them by algorithm (task = env),
and writes a static folder: index.html, PNG plots and report.csv with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from numpy.typing import ArrayLike

from policylab.errors import PolicylabError, suggest
from policylab.logging import CONFIG_YAML, EVAL_CSV, SUMMARY_JSON, read_csv

METRICS = ("mean", "median", "iqm", "optimality_gap")
METRIC_NAMES = {"mean": "Mean", "median": "Median", "iqm": "IQM", "optimality_gap": "Optimality gap"}
RETURN_METRICS = ("return_mean", "return_min", "return_max")
"""Metrics in return units: the ones reference returns normalize."""
NORMALIZED_METRICS = ("score",)
"""Metrics already normalized by the run (its dataset's reference returns): 100 is the expert."""
WHICH = ("final", "best")
CURVE_STATISTICS = ("iqm", "mean")

# ------------------------------------------------------------------------------------------ statistics
# Every statistic takes scores of shape (..., runs, tasks) and returns shape (...): one value per resample.


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval."""

    value: float
    low: float
    high: float


def mean_score(scores: ArrayLike) -> np.ndarray:
    """The mean over tasks of the per-task mean over runs (rliable's aggregate_mean)."""
    return np.asarray(scores, dtype=float).mean(axis=-2).mean(axis=-1)


def median_score(scores: ArrayLike) -> np.ndarray:
    """The median over tasks of the per-task mean over runs (rliable's aggregate_median)."""
    return np.median(np.asarray(scores, dtype=float).mean(axis=-2), axis=-1)


def iqm(scores: ArrayLike) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% of all runs x tasks scores (25% trimmed from each end).

    The same partition and slice as scipy.stats.trim_mean(..., 0.25), which rliable's aggregate_iqm calls."""
    flat = _flatten(scores)
    n = flat.shape[-1]
    cut = int(0.25 * n)
    kept = np.partition(flat, (cut, n - cut - 1), axis=-1)[..., cut : n - cut]
    return kept.mean(axis=-1)


def optimality_gap(scores: ArrayLike, threshold: float = 100.0) -> np.ndarray:
    """How far scores fall short of `threshold` on average (scores above it count as `threshold`)."""
    return threshold - np.minimum(_flatten(scores), threshold).mean(axis=-1)


def aggregate_metrics(scores: ArrayLike, threshold: float | None = 100.0) -> dict[str, np.ndarray]:
    """Mean, median, IQM and (with a threshold) optimality gap of (..., runs, tasks) scores."""
    out = {"mean": mean_score(scores), "median": median_score(scores), "iqm": iqm(scores)}
    if threshold is not None:
        out["optimality_gap"] = optimality_gap(scores, threshold)
    return out


def performance_profile(scores: ArrayLike, taus: ArrayLike) -> np.ndarray:
    """The fraction of runs x tasks scores above each tau (rliable's score distribution): (..., len(taus))."""
    flat = _flatten(scores)
    return (flat[..., :, None] > np.asarray(taus, dtype=float)).mean(axis=-2)


def probability_of_improvement(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """P(X > Y): per task the chance that a run of X scores above a run of Y (ties count half: the Mann-Whitney
    U statistic over runs_x * runs_y), averaged over tasks. x: (..., runs_x, tasks), y: (..., runs_y, tasks)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    diff = x[..., :, None, :] - y[..., None, :, :]
    wins = (diff > 0) + 0.5 * (diff == 0)
    return wins.mean(axis=(-3, -2)).mean(axis=-1)


def bootstrap_indices(n_runs: int, n_tasks: int, reps: int, rng: np.random.RandomState | int = 0) -> np.ndarray:
    """Stratified resampling: (reps, n_runs, n_tasks) run indices drawn with replacement within each task.

    Drawn in one call from a legacy RandomState in the order rliable's StratifiedBootstrap draws them."""
    rng = rng if isinstance(rng, np.random.RandomState) else np.random.RandomState(rng)
    return rng.randint(0, n_runs, size=(reps, n_runs, n_tasks))


def resample(scores: ArrayLike, indices: np.ndarray) -> np.ndarray:
    """The bootstrap samples of a (runs, tasks) matrix: scores[indices[r, n, m], m] for every r, n, m."""
    scores = np.asarray(scores, dtype=float)
    return scores[indices, np.arange(scores.shape[1])]


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile bootstrap interval over the first axis (NumPy's linear percentiles, as arch computes)."""
    _check_confidence(confidence)
    alpha = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [alpha, 100 - alpha], axis=0)
    return low, high


def aggregate_intervals(
    scores: ArrayLike,
    threshold: float | None = 100.0,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Each aggregate metric of a (runs, tasks) matrix with its stratified percentile-bootstrap interval.

    Equals rliable's get_interval_estimates(..., method="percentile") after np.random.seed(seed)."""
    scores = _check_matrix(scores)
    points = aggregate_metrics(scores, threshold)
    n_runs, n_tasks = scores.shape
    indices = bootstrap_indices(n_runs, n_tasks, _check_reps(reps), seed)
    samples = aggregate_metrics(resample(scores, indices), threshold)
    out = {}
    for name, point in points.items():
        low, high = percentile_interval(samples[name], confidence)
        out[name] = Interval(float(point), float(low), float(high))
    return out


def performance_profile_intervals(
    scores: ArrayLike, taus: ArrayLike, reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(profile, low, high) at each tau. Each resample's profile is its run counts times the indicator
    score > tau (one matrix product), so memory stays (reps x runs x tasks), not (reps x runs x tasks x taus)."""
    scores = _check_matrix(scores)
    taus = np.asarray(taus, dtype=float)
    n_runs, n_tasks = scores.shape
    counts = _counts(bootstrap_indices(n_runs, n_tasks, _check_reps(reps), seed), n_runs)
    above = (scores[:, :, None] > taus).reshape(n_runs * n_tasks, len(taus))
    samples = counts.reshape(len(counts), -1) @ above / (n_runs * n_tasks)
    low, high = percentile_interval(samples, confidence)
    return performance_profile(scores, taus), low, high


def improvement_interval(
    x: ArrayLike, y: ArrayLike, reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """P(X > Y) with a percentile interval from resampling the runs of X and of Y independently within each
    task (rliable's StratifiedIndependentBootstrap; all of X's resamples are drawn first, then Y's)."""
    x, y = _check_matrix(x, "x"), _check_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise PolicylabError(
            f"x has {x.shape[1]} tasks and y {y.shape[1]}", "give both algorithms' scores on the same tasks"
        )
    rng = np.random.RandomState(seed)
    reps = _check_reps(reps)
    ix = bootstrap_indices(x.shape[0], x.shape[1], reps, rng)
    iy = bootstrap_indices(y.shape[0], y.shape[1], reps, rng)
    samples = _improvement_samples(x, y, ix, iy)
    low, high = percentile_interval(samples, confidence)
    return Interval(float(probability_of_improvement(x, y)), float(low), float(high))


def _improvement_samples(x: np.ndarray, y: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """probability_of_improvement(resample(x, ix), resample(y, iy)) without the (reps, nx, ny, tasks) array:
    sum over run pairs of count_x * count_y * win(x_i, y_j), per task."""
    diff = x[:, None, :] - y[None, :, :]
    wins = (diff > 0) + 0.5 * (diff == 0)
    cx, cy = _counts(ix, x.shape[0]), _counts(iy, y.shape[0])
    per_task = np.einsum("rim,ijm,rjm->rm", cx, wins, cy, optimize=True) / (x.shape[0] * y.shape[0])
    return per_task.mean(axis=-1)


def curve_intervals(
    curves: ArrayLike,
    statistic: str = "iqm",
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, low, high) per step of (runs, tasks, steps) learning curves: IQM or mean over runs x tasks at
    each step. A resample picks whole runs (the same runs at every step), so a band is a pointwise interval."""
    if statistic not in CURVE_STATISTICS:
        raise PolicylabError(f"unknown curve statistic {statistic!r}", f"use one of: {', '.join(CURVE_STATISTICS)}")
    curves = np.asarray(curves, dtype=float)
    if curves.ndim != 3 or 0 in curves.shape:
        raise PolicylabError(f"curves have shape {curves.shape}", "pass a non-empty (runs, tasks, steps) array")
    func = iqm if statistic == "iqm" else mean_score
    indices = bootstrap_indices(curves.shape[0], curves.shape[1], _check_reps(reps), seed)
    value = np.empty(curves.shape[2])
    low, high = np.empty_like(value), np.empty_like(value)
    for t in range(curves.shape[2]):  # one vectorized bootstrap per step
        value[t] = func(curves[:, :, t])
        low[t], high[t] = percentile_interval(func(resample(curves[:, :, t], indices)), confidence)
    return value, low, high


def profile_taus(matrices: Sequence[ArrayLike], points: int = 101) -> np.ndarray:
    """Thresholds spanning every score (a little beyond a constant one)."""
    values = np.concatenate([np.ravel(m) for m in matrices])
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    return np.linspace(lo, hi, points)


def _flatten(scores: ArrayLike) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    return scores.reshape(*scores.shape[:-2], scores.shape[-2] * scores.shape[-1])


def _counts(indices: np.ndarray, n_runs: int) -> np.ndarray:
    """How often each run was drawn: (reps, n_runs, n_tasks) counts from (reps, draws, n_tasks) indices."""
    reps, _, n_tasks = indices.shape
    cell = (np.arange(reps)[:, None, None] * n_tasks + np.arange(n_tasks)) * n_runs + indices
    counts = np.bincount(cell.ravel(), minlength=reps * n_tasks * n_runs)
    return counts.reshape(reps, n_tasks, n_runs).transpose(0, 2, 1).astype(float)


def _check_matrix(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or 0 in scores.shape:
        raise PolicylabError(f"{name} has shape {scores.shape}", "pass a non-empty (runs, tasks) matrix")
    if not np.isfinite(scores).all():
        raise PolicylabError(f"{name} holds NaN or inf", "drop or fix the runs whose scores are not finite")
    return scores


def _check_reps(reps: int) -> int:
    if int(reps) < 1:
        raise PolicylabError(f"bootstrap repetitions must be positive, not {reps}", "use e.g. 2000 (the default)")
    return int(reps)


def percent(level: float) -> str:
    """A confidence level as its labels show it: 0.95 -> 95%, 0.975 -> 97.5% (not rounded to 98%)."""
    return f"{100 * level:.4g}%"


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise PolicylabError(f"confidence {confidence} is not between 0 and 1", "use e.g. 0.95")


# ---------------------------------------------------------------------------------------- run directories


@dataclass(frozen=True)
class RunScore:
    """One run directory as a report sees it: its score (raw metric value) and its eval curve."""

    dir: Path
    algo: str
    """Its group in the report: the algorithm, or the `group_by` label (e.g. "sac lr=0.001")."""
    env: str
    seed: int | None
    value: float
    step: float | None
    """The step of the evaluation that gave `value` (None when the summary does not say)."""
    curve_steps: np.ndarray
    curve_values: np.ndarray
    refs: tuple[float, float] | None = None
    ref_source: str | None = None
    phases: tuple[int, int] = (0, 0)
    """An offline run's (gradient steps, online env steps) (plot.offline_phases): what its curve's steps count."""


def _is_language_model_run(run_dir: Path) -> bool:
    """A `policylab llm` run (plot.is_language_model_config)."""
    from policylab.plot import is_language_model_config

    return (run_dir / CONFIG_YAML).is_file() and is_language_model_config(_read_config(run_dir))


def load_run_score(
    run_dir: str | Path, metric: str = "return_mean", which: str = "final", group_by: Sequence[str] = ("algo",)
) -> RunScore:
    """Read a run directory's score: its final evaluation (eval.json) or its best one (eval.csv); its group is
    labelled by the config values of `group_by` (`run_label`)."""
    if which not in WHICH:
        raise PolicylabError(f"unknown --which {which!r}", "use --which final or --which best")
    path = Path(run_dir)
    _check_run_dir(path)
    config = _read_config(path)
    algo, env = config.get("algo"), config.get("env") or config.get("task")
    if not algo or not env:
        raise PolicylabError(
            f"{path / CONFIG_YAML} names no {'algo' if not algo else 'env'}",
            "pass run directories written by `policylab train` (their config.yaml has algo and env)",
        )
    steps, values = _eval_curve(path, metric)
    if which == "final":
        value, step = _final_value(path, metric)
    elif len(values):
        best = int(np.argmax(values))
        value, step = float(values[best]), float(steps[best])
    else:
        raise PolicylabError(
            f"{path / EVAL_CSV} has no evaluation of {metric!r}, so --which best has nothing to choose from",
            "use --which final (eval.json), or train with periodic evaluations (eval_every > 0)",
        )
    refs, source = _run_refs(config)
    seed = config.get("seed")
    label = run_label(config, group_by, path)
    from policylab.plot import offline_phases

    return RunScore(
        path, label, str(env), seed if isinstance(seed, int) else None, value, step, steps, values, refs, source,
        offline_phases(config),
    )  # fmt: skip


def run_label(config: dict[str, Any], group_by: Sequence[str], path: Path) -> str:
    """The group a run is pooled into: its config's values of `group_by`, e.g. ("algo", "lr") -> "sac lr=0.001"
    (variants of one algorithm compared as if they were algorithms)."""
    if not group_by:
        raise PolicylabError("--group-by names no config key", "group by algo (the default) or e.g. algo,lr")
    parts = []
    for key in group_by:
        if key not in config:
            known = sorted(k for k in config if not isinstance(config[k], dict | list))
            raise PolicylabError(
                f"{path / CONFIG_YAML} has no {key!r} to group by.{suggest(key, known)}",
                f"group by keys every run's config has; this run's: {', '.join(known)}",
            )
        parts.append(str(config[key]) if key == "algo" else f"{key}={config[key]}")
    return " ".join(parts)


def _check_run_dir(path: Path) -> None:
    if not path.exists():
        raise PolicylabError(
            f"{str(path)!r} does not exist", "check the path (a glob that matched nothing is passed on unexpanded)"
        )
    if not path.is_dir() or not (path / CONFIG_YAML).is_file():
        raise PolicylabError(
            f"{str(path)!r} is not a run directory (it has no {CONFIG_YAML})",
            "pass directories written by `policylab train`, e.g. runs/ppo-CartPole-v1-s1",
        )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((path / CONFIG_YAML).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicylabError(f"cannot read {path / CONFIG_YAML}: {exc}", "restore the run's config.yaml") from None
    if not isinstance(config, dict):
        raise PolicylabError(f"{path / CONFIG_YAML} is not a mapping", "restore the run's config.yaml")
    return config


def _final_value(path: Path, metric: str) -> tuple[float, float | None]:
    summary_path = path / SUMMARY_JSON
    if not summary_path.is_file():
        try:
            algo = str(_read_config(path).get("algo") or "ALGO")
        except PolicylabError:
            algo = "ALGO"
        evaluated = (path / EVAL_CSV).is_file() and bool(read_csv(path / EVAL_CSV))
        best = f", or score every run by its best evaluation in {EVAL_CSV} with --which best" if evaluated else ""
        raise PolicylabError(
            f"{str(path)!r} has no final evaluation ({SUMMARY_JSON}): the run has not finished",
            f"finish it (`policylab train {algo} --resume {path}`) or leave it out{best}",
        )
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        raise PolicylabError(
            f"cannot read {summary_path}: {exc}", "re-run the final evaluation or leave the run out"
        ) from None
    if not isinstance(summary, dict):
        raise PolicylabError(f"{summary_path} is not a JSON object", "re-run the final evaluation or leave the run out")
    nested = summary.get("final_eval")  # a control run's eval.json; a language-model run's is flat
    final: dict[str, Any] = nested if isinstance(nested, dict) else summary
    value = final.get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        choices = [k for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        raise PolicylabError(
            f"{summary_path} has no number {metric!r}.{suggest(metric, choices)}",
            f"use --metric with one of: {', '.join(choices) or '(none)'}",
        )
    step = summary.get("steps", summary.get("step"))
    return float(value), float(step) if isinstance(step, (int, float)) else None


def _eval_curve(path: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `metric` in eval.csv, sorted by step; empty without the file or column."""
    csv_path = path / EVAL_CSV
    rows = read_csv(csv_path) if csv_path.is_file() else []
    pairs = sorted((r["step"], r[metric]) for r in rows if math.isfinite(r.get(metric, math.nan)))
    array = np.array(pairs, dtype=float).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def _run_refs(config: dict[str, Any]) -> tuple[tuple[float, float] | None, str | None]:
    """Reference returns from config.yaml (ref_min_score, ref_max_score) or from the run's dataset."""
    lo, hi = config.get("ref_min_score"), config.get("ref_max_score")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return (float(lo), float(hi)), CONFIG_YAML
    dataset = config.get("dataset")
    if isinstance(dataset, str) and dataset:
        refs = _dataset_refs(dataset)
        return refs, (f"dataset {dataset}" if refs else None)
    return None, None


@lru_cache(maxsize=64)
def _dataset_refs(source: str) -> tuple[float, float] | None:
    """A dataset's (ref_min_score, ref_max_score) from its metadata only (data/metadata.json, or a D4RL-style
    file's attributes); for a Minari id, through load_dataset. None when unknown or unreadable."""
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            meta_file = next((p for p in (path / "data" / "metadata.json", path / "metadata.json") if p.is_file()))
            meta = json.loads(meta_file.read_text())
            ours = meta.get("policylab") or {}
            return _refs_pair(
                meta.get("ref_min_score", ours.get("ref_min_score")),
                meta.get("ref_max_score", ours.get("ref_max_score")),
            )
        if path.is_file():
            import h5py

            with h5py.File(path, "r") as f:
                return _refs_pair(f.attrs.get("ref_min_score"), f.attrs.get("ref_max_score"))
        from policylab.data.dataset import load_dataset

        dataset = load_dataset(source, validate=False)
        return _refs_pair(dataset.ref_min_score, dataset.ref_max_score)
    except (PolicylabError, OSError, ValueError, StopIteration):
        return None


def _refs_pair(lo: Any, hi: Any) -> tuple[float, float] | None:
    try:
        pair = (float(lo), float(hi))
    except (TypeError, ValueError):
        return None
    return pair if all(map(math.isfinite, pair)) and pair[1] != pair[0] else None


def parse_ref(text: str) -> tuple[str, tuple[float, float]]:
    """`ENV=MIN,MAX` -> (env, (min, max))."""
    env, _, pair = text.rpartition("=")
    parts = pair.split(",")
    fix = "write --ref ENV=MIN,MAX, e.g. --ref Hopper-v5=-20,3234 (MIN: a random policy's return, MAX: an expert's)"
    try:
        if not env or len(parts) != 2:
            raise ValueError
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise PolicylabError(f"cannot read --ref {text!r}", fix) from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise PolicylabError(f"--ref {text!r}: MAX must be a number above MIN", fix)
    return env, (lo, hi)


# ------------------------------------------------------------------------------------------ score sets


@dataclass
class ScoreSet:
    """Runs pooled by algorithm, one (runs, tasks) matrix each, normalized where reference returns are known."""

    algorithms: list[str]
    tasks: list[str]
    matrices: dict[str, np.ndarray]
    runs: dict[str, list[list[RunScore]]]
    """Per algorithm, per task: the runs behind each matrix column, in row order (by seed)."""
    normalized: bool
    """Scores are on a normalized scale (100: an expert): rescaled with reference returns, or a `score` metric."""
    rescaled: bool
    """Scores are returns rescaled with each env's reference returns: 100 (R - min) / (max - min)."""
    refs: dict[str, tuple[float, float]]
    ref_sources: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def score(self, run: RunScore) -> float:
        """A run's report score: its value, rescaled when the set is."""
        return _normalize(run.value, self.refs[run.env]) if self.rescaled else run.value


def build_score_set(
    runs: Sequence[RunScore], metric: str = "return_mean", refs: dict[str, tuple[float, float]] | None = None
) -> ScoreSet:
    """Group runs by algorithm and env; decide on normalization; check that the matrices are rectangular."""
    if not runs:
        raise PolicylabError("no run directories given", "pass run directories, e.g. `policylab report runs/ppo-*`")
    algorithms = list(dict.fromkeys(r.algo for r in runs))
    tasks = list(dict.fromkeys(r.env for r in runs))
    env_refs, sources = _resolve_refs(runs, tasks, metric, dict(refs or {}))
    normalized = metric in NORMALIZED_METRICS or (metric in RETURN_METRICS and set(env_refs) >= set(tasks))
    if len(tasks) > 1 and not normalized:
        raise _mixed_envs_error(tasks, env_refs, metric)
    grouped = _group(runs, algorithms, tasks)
    rescaled = normalized and metric in RETURN_METRICS
    score_set = ScoreSet(algorithms, tasks, {}, grouped, normalized, rescaled, env_refs, sources, _count_notes(grouped))
    score_set.matrices = {
        a: np.array([[score_set.score(r) for r in column] for column in grouped[a]], dtype=float).T for a in algorithms
    }
    return score_set


def _resolve_refs(
    runs: Sequence[RunScore], tasks: list[str], metric: str, given: dict[str, tuple[float, float]]
) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Reference returns per env: --ref first, else the ones the env's runs record (they must agree)."""
    for env in given:
        if env not in tasks:
            raise PolicylabError(
                f"--ref names {env!r}, but no run is in that env.{suggest(env, tasks)}",
                f"use the env ids of the runs: {', '.join(tasks)}",
            )
    if given and metric not in RETURN_METRICS:
        raise PolicylabError(
            f"--ref normalizes returns, and --metric {metric!r} is not a return",
            f"drop --ref, or use --metric {' / '.join(RETURN_METRICS)}",
        )
    refs, sources = dict(given), {env: "--ref" for env in given}
    for env in tasks:
        if env in refs:
            continue
        found = {(r.refs, r.ref_source) for r in runs if r.env == env and r.refs is not None}
        pairs = {pair for pair, _ in found}
        if len(pairs) > 1:
            listed = "; ".join(f"{lo:g}..{hi:g} ({src})" for (lo, hi), src in sorted(found, key=str))
            raise PolicylabError(
                f"runs in {env} record different reference returns: {listed}",
                f"choose one pair for all of them: --ref {env}=MIN,MAX",
            )
        if pairs:
            refs[env] = pairs.pop()
            sources[env] = sorted(str(src) for _, src in found)[0]
    return refs, sources


def _mixed_envs_error(tasks: list[str], refs: dict[str, tuple[float, float]], metric: str) -> PolicylabError:
    if metric not in RETURN_METRICS:
        return PolicylabError(
            f"runs of different envs ({', '.join(tasks)}) cannot be pooled on {metric!r}, which is not normalized",
            "report one env at a time, or use --metric return_mean with --ref ENV=MIN,MAX for each env",
        )
    missing = [env for env in tasks if env not in refs]
    return PolicylabError(
        f"runs of different envs ({', '.join(tasks)}) cannot be pooled on raw returns, and no reference returns "
        f"are known for {', '.join(missing)}",
        "normalize them: " + " ".join(f"--ref {env}=MIN,MAX" for env in missing) + " (MIN: a random policy's "
        "return, MAX: an expert's; score = 100 (R - MIN) / (MAX - MIN)), or report one env at a time",
    )


def _group(runs: Sequence[RunScore], algorithms: list[str], tasks: list[str]) -> dict[str, list[list[RunScore]]]:
    """algo -> per task its runs by seed; every algorithm needs the same number of runs on every task."""
    grouped: dict[str, list[list[RunScore]]] = {}
    for algo in algorithms:
        columns = [
            sorted(
                (r for r in runs if r.algo == algo and r.env == env), key=lambda r: (r.seed is None, r.seed, str(r.dir))
            )
            for env in tasks
        ]
        counts = {env: len(c) for env, c in zip(tasks, columns)}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{env}: {n}" for env, n in counts.items())
            missing = [env for env, n in counts.items() if n == 0]
            raise PolicylabError(
                f"{algo} has {'no runs in ' + ', '.join(missing) if missing else 'different numbers of runs per env'} "
                f"({listed}); a score matrix needs the same number of runs of an algorithm in every env",
                "pass the same number of seeds of each algorithm in every env, or report the envs separately",
            )
        grouped[algo] = columns
    return grouped


def _count_notes(grouped: dict[str, list[list[RunScore]]]) -> list[str]:
    notes = []
    counts = {algo: len(columns[0]) for algo, columns in grouped.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{a}: {n}" for a, n in counts.items())
        notes.append(
            f"Runs per env differ between algorithms ({listed}). That is fine for these statistics: each "
            "algorithm's intervals resample its own runs within each env (stratified bootstrap), and fewer runs "
            "give wider intervals."
        )
    single = [algo for algo, n in counts.items() if n == 1]
    if single:
        notes.append(
            f"{', '.join(single)} has one run per env: its intervals have zero width and say nothing about "
            "seed-to-seed variation; pass several seeds per env."
        )
    for algo, columns in grouped.items():
        for column in columns:
            seeds = [r.seed for r in column if r.seed is not None]
            if len(seeds) != len(set(seeds)):
                dup = sorted({s for s in seeds if seeds.count(s) > 1})
                notes.append(
                    f"{algo} in {column[0].env} has seed {', '.join(map(str, dup))} more than once: if those runs "
                    "are different variants, report them separately."
                )
    return notes


def _normalize(value: float, refs: tuple[float, float]) -> float:
    lo, hi = refs
    return 100.0 * (value - lo) / (hi - lo)


# ----------------------------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """An algorithm's learning curve: a statistic over runs x tasks at each step, with a bootstrap band."""

    steps: np.ndarray
    value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    interpolated: bool


def curve_matrix(
    columns: list[list[RunScore]], score_set: ScoreSet, points: int = 50
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(steps, curves (runs, tasks, steps), interpolated) of an algorithm's eval curves (normalized like its
    scores). The eval steps every run logged when they all logged the same ones; else a grid over the steps all
    runs reached, each curve interpolated linearly (never extrapolated)."""
    runs = [r for column in columns for r in column]
    if any(len(r.curve_steps) == 0 for r in runs):
        return np.zeros(0), np.zeros((0, 0, 0)), False
    first = runs[0].curve_steps
    same = all(np.array_equal(r.curve_steps, first) for r in runs)
    if same:
        steps = first
    else:
        start = max(float(r.curve_steps[0]) for r in runs)
        end = min(float(r.curve_steps[-1]) for r in runs)
        if end < start:
            return np.zeros(0), np.zeros((0, 0, 0)), True
        steps = np.linspace(start, end, points if end > start else 1)

    def values(run: RunScore) -> np.ndarray:
        raw = run.curve_values if same else np.interp(steps, run.curve_steps, run.curve_values)
        return _normalize_array(raw, score_set.refs[run.env]) if score_set.rescaled else raw

    return steps, np.array([[values(r) for r in column] for column in columns]).transpose(1, 0, 2), not same


def _normalize_array(values: np.ndarray, refs: tuple[float, float]) -> np.ndarray:
    lo, hi = refs
    return 100.0 * (values - lo) / (hi - lo)


# ----------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """What `report` computed and where it wrote it."""

    dir: Path
    index: Path
    csv: Path
    images: dict[str, Path]
    metric: str
    which: str
    threshold: float | None
    reps: int
    confidence: float
    seed: int
    score_set: ScoreSet
    aggregates: dict[str, dict[str, Interval]]
    taus: np.ndarray
    profiles: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    improvements: dict[tuple[str, str], Interval]
    curves: dict[str, Curve]
    curve_statistic: str
    notes: list[str]

    @property
    def step_label(self) -> str:
        """What the curves' steps count (env steps, or an offline run's gradient steps; plot.step_axis_label)."""
        from policylab.plot import step_axis_label

        runs = [run for by_task in self.score_set.runs.values() for column in by_task for run in column]
        return step_axis_label([run.phases for run in runs])

    @property
    def score_label(self) -> str:
        """What a score is, in words (the report says it)."""
        which = (
            f"the final evaluation ({SUMMARY_JSON}, {self.metric})"
            if self.which == "final"
            else f"the best evaluation in {EVAL_CSV} (the highest {self.metric} over a run's evaluations)"
        )
        if self.score_set.rescaled:
            return f"{which}, normalized: 100 (R - min) / (max - min) with each env's reference returns"
        return which + (" (already normalized by the run's dataset)" if self.score_set.normalized else "")


def report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    metric: str | None = None,
    which: str = "final",
    refs: dict[str, tuple[float, float]] | None = None,
    threshold: float | None = None,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    curve_statistic: str = "iqm",
    overwrite: bool = False,
    group_by: Sequence[str] = ("algo",),
) -> Report:
    """Write a multi-seed report of `run_dirs` to the folder `out`: index.html, PNG plots and report.csv.

    A run's score is its final evaluation (eval.json) of `metric`, or with which="best" the highest `metric`
    in its eval.csv. Runs are pooled by algorithm (or by the config values of `group_by`, e.g. ("algo", "lr"));
    each env is a task. Scores are normalized with reference
    returns where they are known (`refs` {env: (min, max)}, else the run's dataset); runs of several envs need
    them. `threshold` is the optimality gap's target (default 100 for normalized scores; none otherwise). `metric`
    None: return_mean, or for `policylab llm` runs their exact match, `accuracy` (then the threshold defaults to 1).
    `out` is written to a temporary folder and renamed into place; a non-empty one needs `overwrite=True`."""
    if isinstance(run_dirs, str | Path):  # one run given as itself, not as a list of one
        run_dirs = [run_dirs]
    if isinstance(group_by, str):  # "algo,lr" as the CLI's --group-by takes it
        group_by = [key.strip() for key in group_by.split(",") if key.strip()]
    _check_confidence(confidence)
    _check_reps(reps)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise PolicylabError(
            f"seed={seed!r}: the bootstrap seed is a whole number from 0 to 2**32 - 1", "pass e.g. --seed 0 (seed=0)"
        )
    if threshold is not None and not math.isfinite(threshold):
        raise PolicylabError(
            f"threshold={threshold}: the optimality gap's target must be a finite score", "pass e.g. --threshold 100"
        )
    if curve_statistic not in CURVE_STATISTICS:
        raise PolicylabError(
            f"unknown curve statistic {curve_statistic!r}", f"use one of: {', '.join(CURVE_STATISTICS)}"
        )
    out = Path(out)
    if not run_dirs:
        raise PolicylabError(
            "no run directories given", "pass run directories, e.g. `policylab report runs/ppo-*-s* --out report/`"
        )
    dirs, repeated = _unique_dirs(run_dirs)
    _check_out(out, dirs, overwrite)
    language_models = bool(dirs) and all(_is_language_model_run(d) for d in dirs)
    if metric is None:
        metric = "accuracy" if language_models else "return_mean"
    if threshold is None and language_models and metric == "accuracy":
        threshold = 1.0  # exact match's natural target
    runs = [load_run_score(d, metric, which, group_by) for d in dirs]
    score_set = build_score_set(runs, metric, refs)
    result = _compute(score_set, out, metric, which, threshold, reps, confidence, seed, curve_statistic)
    if repeated:
        result.notes.append(f"Given more than once, counted once: {', '.join(map(str, repeated))}.")
    from policylab.report_html import write_report_files

    _write_atomically(out, lambda tmp: write_report_files(result, tmp))
    return result


def _compute(
    score_set: ScoreSet,
    out: Path,
    metric: str,
    which: str,
    threshold: float | None,
    reps: int,
    confidence: float,
    seed: int,
    curve_statistic: str,
) -> Report:
    notes = list(score_set.notes)
    if threshold is None and score_set.normalized:
        threshold = 100.0
    if threshold is None:
        notes.append("No optimality gap: raw scores have no natural target; set one with --threshold.")
    matrices = score_set.matrices
    aggregates = {a: aggregate_intervals(m, threshold, reps, confidence, seed) for a, m in matrices.items()}
    taus = profile_taus(list(matrices.values()))
    profiles = {a: performance_profile_intervals(m, taus, reps, confidence, seed) for a, m in matrices.items()}
    algos = score_set.algorithms
    improvements = {
        (x, y): improvement_interval(matrices[x], matrices[y], reps, confidence, seed)
        for i, x in enumerate(algos)
        for y in algos[i + 1 :]
    }
    curves: dict[str, Curve] = {}
    for algo in algos:
        steps, data, interpolated = curve_matrix(score_set.runs[algo], score_set)
        if len(steps) == 0:
            notes.append(
                f"No learning curve for {algo}: a run has no {metric} in {EVAL_CSV}, or the runs' steps do not overlap."
            )
            continue
        curves[algo] = Curve(steps, *curve_intervals(data, curve_statistic, reps, confidence, seed), interpolated)
        if interpolated:
            notes.append(
                f"{algo}'s runs were evaluated at different steps: its learning curve interpolates each run linearly "
                "onto a grid over the steps that all of them reached."
            )
    if which == "best":
        notes.append(
            "Scores are each run's best evaluation: the maximum over noisy evaluations is biased upward; the final "
            "evaluation (--which final) is the unbiased choice."
        )
    return Report(
        out, out / "index.html", out / "report.csv", {}, metric, which, threshold, reps, confidence, seed,
        score_set, aggregates, taus, profiles, improvements, curves, curve_statistic, notes,
    )  # fmt: skip


def _unique_dirs(run_dirs: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """The run directories without repeats (overlapping globs), and the repeated ones."""
    seen: dict[Path, Path] = {}
    repeated = []
    for d in map(Path, run_dirs):
        key = d.resolve()
        if key in seen:
            repeated.append(d)
        else:
            seen[key] = d
    return list(seen.values()), repeated


def _check_out(out: Path, run_dirs: list[Path], overwrite: bool) -> None:
    """Refuse to replace a non-empty folder without overwrite, or one holding (or inside) a run directory."""
    if out.exists() and not out.is_dir():
        raise PolicylabError(f"{out} exists and is not a folder", "choose another --out")
    resolved = out.resolve()
    for run in run_dirs:
        r = run.resolve()
        if r == resolved or resolved in r.parents or r in resolved.parents:
            raise PolicylabError(
                f"--out {out} would hold or be inside the run directory {run}", "write the report to another folder"
            )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PolicylabError(
            f"{out} exists and is not empty", "pass --overwrite (overwrite=True) to replace it, or choose another --out"
        )


def _write_atomically(out: Path, write: Any) -> None:
    """Write into a temporary folder beside `out`, then swap it in; a failure leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    new, old = work / "new", work / "old"
    try:
        new.mkdir()  # not mkdtemp's 0700: the folder gets the usual permissions
        write(new)
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(new, out)
        except BaseException:
            if old.exists():
                os.replace(old, out)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- CLI


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """`policylab report RUN_DIR... --out DIR`."""
    p = sub.add_parser(
        "report", help="multi-seed report (IQM, profiles, P(improvement), curves with bootstrap CIs) as HTML"
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, e.g. runs/ppo-*-s* runs/sac-*-s*")
    p.add_argument("--out", required=True, help="the folder to write (index.html, PNGs, report.csv)")
    p.add_argument(
        "--metric", help="the evaluation value to score (default return_mean; `policylab llm` runs: accuracy)"
    )
    p.add_argument("--which", choices=WHICH, default="final", help="final evaluation (eval.json) or best (eval.csv)")
    p.add_argument(
        "--ref", action="append", default=[], metavar="ENV=MIN,MAX", help="reference returns to normalize an env"
    )
    p.add_argument(
        "--threshold", type=float, help="optimality gap target (default 100 for normalized scores, 1 for accuracy)"
    )
    p.add_argument(
        "--group-by",
        default="algo",
        metavar="KEY[,KEY...]",
        help="config keys that name a group (default algo; e.g. algo,lr compares variants of an algorithm)",
    )
    p.add_argument("--bootstrap", type=int, default=2000, metavar="REPS", help="bootstrap resamples (default 2000)")
    p.add_argument(
        "--confidence", type=float, default=0.95, help="level of the bootstrap intervals, in (0, 1) (default 0.95)"
    )
    p.add_argument(
        "--curve-statistic",
        choices=CURVE_STATISTICS,
        default="iqm",
        help="the statistic of the learning curves: iqm or mean over runs (default iqm)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.set_defaults(func=run_report_command)


def run_report_command(args: argparse.Namespace) -> int:
    refs = dict(parse_ref(text) for text in args.ref)
    result = report(
        args.runs,
        args.out,
        metric=args.metric,
        which=args.which,
        refs=refs,
        threshold=args.threshold,
        reps=args.bootstrap,
        confidence=args.confidence,
        seed=args.seed,
        curve_statistic=args.curve_statistic,
        overwrite=args.overwrite,
        group_by=[key.strip() for key in args.group_by.split(",") if key.strip()],
    )
    print_summary(result)
    return 0


def print_summary(result: Report) -> None:
    """A rich table of the aggregate metrics, the notes, and where index.html is."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"score: {result.score_label}", title_justify="left")
    table.add_column("algorithm")
    table.add_column("runs x envs", justify="right")
    names = [m for m in METRICS if m in next(iter(result.aggregates.values()))]
    for name in names:
        table.add_column(f"{METRIC_NAMES[name]} [{percent(result.confidence)} CI]", justify="right")
    for algo, estimates in result.aggregates.items():
        n_runs, n_tasks = result.score_set.matrices[algo].shape
        cells = [f"{e.value:.4g} [{e.low:.4g}, {e.high:.4g}]" for e in (estimates[m] for m in names)]
        table.add_row(algo, f"{n_runs} x {n_tasks}", *cells)
    console = Console()
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    print(f"report: {result.index}")
