"""policylab.report: rliable statistics on score matrices, and the report folder of run directories."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

import policylab as pl
from policylab.checkpoint import atomic_write_text
from policylab.errors import PolicylabError
from policylab.logging import CONFIG_YAML, RunLog, new_run_dir
from policylab.report import _improvement_samples as improvement_samples
from policylab.report import (
    aggregate_intervals,
    aggregate_metrics,
    bootstrap_indices,
    build_score_set,
    curve_intervals,
    curve_matrix,
    improvement_interval,
    iqm,
    load_run_score,
    mean_score,
    median_score,
    optimality_gap,
    parse_ref,
    percentile_interval,
    performance_profile,
    performance_profile_intervals,
    probability_of_improvement,
    report,
    resample,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(
    root: Path,
    algo: str,
    env: str,
    seed: int,
    evals: list[float],
    *,
    every: int = 100,
    final: bool = True,
    config: dict | None = None,
    final_extra: dict | None = None,
) -> Path:
    """A run directory written through the same code as `policylab train`: config.yaml, eval.csv, eval.json."""
    run = new_run_dir(root, f"{algo}-{env}-s{seed}")
    atomic_write_text(run / CONFIG_YAML, yaml.safe_dump({"algo": algo, "env": env, "seed": seed, **(config or {})}))
    log = RunLog(run, tensorboard=False)
    for i, value in enumerate(evals):
        log.log_eval({"step": (i + 1) * every, "time": 0.1 * i, "episodes": 2, "return_mean": value})
    if final:
        final_eval = {"episodes": 2, "return_mean": evals[-1], "return_std": 1.0, "returns": [evals[-1]] * 2}
        final_eval.update(final_extra or {})
        log.write_summary(
            {"algo": algo, "env": env, "seed": seed, "steps": len(evals) * every, "final_eval": final_eval}
        )
    log.close()
    return run


@pytest.fixture
def two_algos(tmp_path: Path) -> list[Path]:
    """ppo (3 seeds) and sac (2 seeds) on CartPole-v1; sac's last evaluation is not its best."""
    root = tmp_path / "runs"
    return [
        fake_run(root, "ppo", "CartPole-v1", 0, [10.0, 50.0, 100.0]),
        fake_run(root, "ppo", "CartPole-v1", 1, [20.0, 60.0, 120.0]),
        fake_run(root, "ppo", "CartPole-v1", 2, [15.0, 40.0, 90.0]),
        fake_run(root, "sac", "CartPole-v1", 0, [30.0, 300.0, 200.0]),
        fake_run(root, "sac", "CartPole-v1", 1, [40.0, 250.0, 220.0]),
    ]


# ------------------------------------------------------------------------------------- point estimates


def test_point_estimates_by_hand() -> None:
    scores = np.array([[1.0, 8.0], [2.0, 7.0], [3.0, 6.0], [4.0, 5.0]])  # 4 runs x 2 tasks
    assert iqm(scores) == pytest.approx(4.5)  # 8 values, drop 2 low and 2 high: mean(3, 4, 5, 6)
    assert mean_score(scores) == pytest.approx(4.5)
    assert median_score(np.array([[0.0, 10.0, 100.0]])) == pytest.approx(10.0)  # of the per-task means
    assert median_score(np.array([[0.0, 10.0, 100.0], [2.0, 30.0, 50.0]])) == pytest.approx(20.0)  # means 1, 20, 75
    skewed = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [1000.0]])
    assert iqm(skewed) == pytest.approx(3.5)  # the outlier is trimmed: mean(2, 3, 4, 5)
    # Shortfall below 5: (5-1) + (5-2) + (5-3) + (5-4), and 0 for 5..8, over 8 scores.
    assert optimality_gap(scores, threshold=5.0) == pytest.approx(10 / 8)
    assert optimality_gap(scores, threshold=0.5) == pytest.approx(0.0)
    assert set(aggregate_metrics(scores, threshold=None)) == {"mean", "median", "iqm"}


def test_statistics_are_batched_over_resamples() -> None:
    batch = np.random.default_rng(0).normal(size=(7, 5, 3))
    for func in (mean_score, median_score, iqm, lambda s: optimality_gap(s, 0.3)):
        assert np.allclose(func(batch), [func(m) for m in batch], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- bootstrap


def test_resamples_stay_within_each_task() -> None:
    scores = np.array([[1.0, 10.0, 100.0], [2.0, 20.0, 200.0], [3.0, 30.0, 300.0], [4.0, 40.0, 400.0]])
    indices = bootstrap_indices(4, 3, reps=500, rng=1)
    assert indices.shape == (500, 4, 3) and indices.min() == 0 and indices.max() == 3
    samples = resample(scores, indices)
    for task in range(3):
        assert set(np.unique(samples[:, :, task])) == set(scores[:, task])
    assert not np.array_equal(indices[0], indices[1])  # resamples differ
    assert np.array_equal(bootstrap_indices(4, 3, 500, 1), indices)  # and a seed fixes them


def test_interval_for_the_mean_covers_the_true_mean() -> None:
    """200 experiments of 10 runs x 3 tasks from N(50, 20): the 95% interval covers 50 in about 95% of them
    (the percentile bootstrap is a little narrow with 10 runs); a fixed seed makes this exact."""
    rng = np.random.default_rng(0)
    covered = []
    for seed in range(200):
        estimate = aggregate_intervals(rng.normal(50.0, 20.0, size=(10, 3)), reps=500, seed=seed)["mean"]
        assert estimate.low <= estimate.value <= estimate.high
        covered.append(estimate.low <= 50.0 <= estimate.high)
    assert 0.85 <= np.mean(covered) <= 0.99


def test_performance_profile_is_monotone() -> None:
    scores = np.random.default_rng(1).normal(size=(6, 4))
    taus = np.linspace(-3, 3, 61)
    value, low, high = performance_profile_intervals(scores, taus, reps=300)
    assert value[0] == 1.0 and value[-1] == 0.0  # every score is above -3, none above 3
    assert np.all(np.diff(value) <= 0) and np.all(np.diff(low) <= 0) and np.all(np.diff(high) <= 0)
    assert np.all(low <= value + 1e-12) and np.all(value <= high + 1e-12)
    assert np.allclose(performance_profile(scores, [0.0]), np.mean(scores > 0))


def test_probability_of_improvement() -> None:
    x = np.random.default_rng(2).normal(size=(5, 3))
    assert probability_of_improvement(x, x.copy()) == pytest.approx(0.5)
    assert improvement_interval(x, x.copy(), reps=300).value == pytest.approx(0.5)
    dominating = improvement_interval(x + 100.0, x, reps=300)
    assert (dominating.value, dominating.low, dominating.high) == (1.0, 1.0, 1.0)
    assert improvement_interval(x, x + 100.0, reps=300).high == 0.0
    # One task: x = [1, 3], y = [2, 2, 3]: pairs won 1>2? no x2, 3>2 yes x2, 3=3 half, 1<3 no -> 2.5 / 6.
    assert probability_of_improvement(np.array([[1.0], [3.0]]), np.array([[2.0], [2.0], [3.0]])) == pytest.approx(
        2.5 / 6
    )


def test_improvement_samples_from_counts_equal_direct_resamples() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, size=(4, 3)).astype(float), rng.integers(0, 4, size=(6, 3)).astype(float)  # ties
    ix, iy = bootstrap_indices(4, 3, 200, 0), bootstrap_indices(6, 3, 200, 1)
    direct = probability_of_improvement(resample(x, ix), resample(y, iy))
    assert np.allclose(improvement_samples(x, y, ix, iy), direct, rtol=0, atol=1e-12)


def test_curve_intervals() -> None:
    curves = np.random.default_rng(4).normal(size=(5, 2, 4)) + np.arange(4)  # runs x tasks x steps
    value, low, high = curve_intervals(curves, "iqm", reps=300)
    assert np.allclose(value, [iqm(curves[:, :, t]) for t in range(4)])
    assert np.all(low <= value) and np.all(value <= high)
    assert np.allclose(curve_intervals(curves, "mean", reps=10)[0], curves.mean(axis=(0, 1)))
    with pytest.raises(PolicylabError, match="curve statistic"):
        curve_intervals(curves, "median")


def test_bad_matrices_are_clear_errors() -> None:
    with pytest.raises(PolicylabError, match="shape"):
        aggregate_intervals(np.zeros((0, 3)))
    with pytest.raises(PolicylabError, match="NaN"):
        aggregate_intervals(np.array([[1.0, np.nan]]))
    with pytest.raises(PolicylabError, match="same tasks"):
        improvement_interval(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(PolicylabError, match="between 0 and 1"):
        percentile_interval(np.zeros(5), confidence=95)


# --------------------------------------------------------------------------------- agreement with rliable


@pytest.fixture(scope="module")
def rliable():
    pytest.importorskip("rliable", reason="rliable is installed for tests by the dev extra")
    from rliable import library, metrics

    return library, metrics


def test_aggregates_equal_rliable(rliable) -> None:
    """Same seed, same resamples: rliable's StratifiedBootstrap draws np.random.choice(runs, (runs, tasks)) from
    the global generator per resample; we draw them all at once from RandomState(seed)."""
    library, metrics = rliable
    scores = np.random.default_rng(5).normal(60.0, 30.0, size=(7, 4))

    def aggregate(x: np.ndarray) -> np.ndarray:
        return np.array(
            [
                metrics.aggregate_mean(x),
                metrics.aggregate_median(x),
                metrics.aggregate_iqm(x),
                metrics.aggregate_optimality_gap(x, 100.0),
            ]
        )

    np.random.seed(11)
    points, cis = library.get_interval_estimates({"a": scores}, aggregate, reps=1000)
    ours = aggregate_intervals(scores, threshold=100.0, reps=1000, seed=11)
    names = ("mean", "median", "iqm", "optimality_gap")
    assert [ours[n].value for n in names] == pytest.approx(points["a"], rel=1e-12, abs=0)
    assert np.allclose([ours[n].low for n in names], cis["a"][0], rtol=1e-12, atol=0)
    assert np.allclose([ours[n].high for n in names], cis["a"][1], rtol=1e-12, atol=0)


def test_performance_profiles_equal_rliable(rliable) -> None:
    library, _ = rliable
    scores = np.random.default_rng(6).normal(size=(5, 3))
    taus = np.linspace(-2, 2, 21)
    np.random.seed(3)
    profiles, cis = library.create_performance_profile({"a": scores}, taus, reps=300)
    value, low, high = performance_profile_intervals(scores, taus, reps=300, seed=3)
    assert np.array_equal(value, profiles["a"])
    assert np.allclose(low, cis["a"][0], rtol=1e-12, atol=0) and np.allclose(high, cis["a"][1], rtol=1e-12, atol=0)


def test_probability_of_improvement_equals_rliable(rliable) -> None:
    """Point estimates are equal. For the interval, rliable draws X's and Y's resamples alternately, one pair per
    resample (a loop we do not copy): given those same resamples our statistic gives its interval exactly; with
    our order (all of X's, then all of Y's) the two are independent bootstraps of the same distribution. Their
    2.5% and 97.5% percentiles over 2000 resamples differ by Monte Carlo error only: for this data, over seeds
    0-4, by at most 0.017 (P here takes values on a grid of 1/240); the tolerance is 0.03."""
    library, metrics = rliable
    rng = np.random.default_rng(7)
    x, y = rng.normal(0.3, 1.0, size=(5, 3)), rng.normal(0.0, 1.0, size=(8, 3))
    assert probability_of_improvement(x, y) == pytest.approx(metrics.probability_of_improvement(x, y), abs=1e-12)
    assert probability_of_improvement(x, x) == metrics.probability_of_improvement(x, x) == 0.5

    def poi(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.array([metrics.probability_of_improvement(a, b)])

    reps = 2000
    np.random.seed(9)
    _, cis = library.get_interval_estimates({"xy": [x, y]}, poi, reps=reps)
    np.random.seed(9)
    draws = [(np.random.choice(5, (5, 3)), np.random.choice(8, (8, 3))) for _ in range(reps)]
    ix, iy = np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])
    low, high = percentile_interval(improvement_samples(x, y, ix, iy))
    assert np.allclose([low, high], cis["xy"][:, 0], rtol=1e-12, atol=0)
    ours = improvement_interval(x, y, reps=reps, seed=9)
    assert ours.low == pytest.approx(cis["xy"][0, 0], abs=0.03)
    assert ours.high == pytest.approx(cis["xy"][1, 0], abs=0.03)


# ------------------------------------------------------------------------------------------ run directories


def test_report_folder(two_algos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = report(two_algos, out, reps=200)
    names = {p.name for p in out.iterdir()}
    assert names == {"index.html", "report.csv", "aggregates.png", "profiles.png", "improvement.png", "curves.png"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    for png in names - {"index.html", "report.csv"}:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    page = (out / "index.html").read_text()
    for run in two_algos:
        assert str(run) in page
    for ref in ('src="aggregates.png"', 'src="profiles.png"', 'src="improvement.png"', 'src="curves.png"'):
        assert ref in page
    assert 'href="report.csv"' in page and "http" not in page  # relative links, no external assets
    assert "final evaluation (eval.json, return_mean)" in page
    assert "Runs per env differ between algorithms (ppo: 3, sac: 2)" in page

    # Raw returns (one env, no references): ppo's finals are 100, 120, 90; sac's 200, 220.
    assert result.aggregates["ppo"]["mean"].value == pytest.approx(310 / 3)
    assert result.aggregates["sac"]["iqm"].value == pytest.approx(210.0)
    assert "optimality_gap" not in result.aggregates["ppo"]  # raw scores need --threshold for it
    assert result.improvements[("ppo", "sac")].value == 0.0
    assert np.allclose(result.curves["ppo"].steps, [100, 200, 300])
    assert result.curves["sac"].value[1] == pytest.approx(275.0)  # IQM of 2 runs is their mean

    rows = list(csv.DictReader((out / "report.csv").open()))
    run_rows = [r for r in rows if r["kind"] == "run"]
    assert sorted(float(r["value"]) for r in run_rows) == [90.0, 100.0, 120.0, 200.0, 220.0]
    assert {r["run"] for r in run_rows} == {str(r) for r in two_algos}
    ppo_mean = next(
        r for r in rows if r["kind"] == "aggregate" and r["algorithm"] == "ppo" and r["statistic"] == "mean"
    )
    e = result.aggregates["ppo"]["mean"]
    assert (float(ppo_mean["value"]), float(ppo_mean["low"]), float(ppo_mean["high"])) == (e.value, e.low, e.high)
    assert {r["kind"] for r in rows} == {"run", "aggregate", "profile", "improvement", "curve"}


def test_the_curves_step_axis_says_what_offline_runs_count(two_algos: list[Path], tmp_path: Path) -> None:
    assert report(two_algos, tmp_path / "online", reps=50).step_label == "environment steps"
    offline = {"dataset": "data/d", "offline_ratio": None, "steps": 300, "online_steps": 0}
    runs = [fake_run(tmp_path / "runs", "iql", "Pendulum-v1", s, [1.0, 2.0, 3.0], config=offline) for s in (0, 1)]
    assert report(runs, tmp_path / "offline", reps=50).step_label == "gradient steps (offline)"


def test_which_best_and_threshold(two_algos: list[Path], tmp_path: Path) -> None:
    result = report(two_algos, tmp_path / "best", which="best", threshold=250.0, reps=100)
    assert result.aggregates["sac"]["mean"].value == pytest.approx(275.0)  # best evaluations 300 and 250
    assert result.aggregates["sac"]["optimality_gap"].value == pytest.approx(0.0)
    assert result.aggregates["ppo"]["optimality_gap"].value == pytest.approx(250 - 310 / 3)
    page = (tmp_path / "best" / "index.html").read_text()
    assert "best evaluation in eval.csv" in page and "biased upward" in page


def test_overwrite(two_algos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    report(two_algos[:3], out, reps=50)  # an empty folder is fine
    with pytest.raises(PolicylabError, match="not empty") as err:
        report(two_algos, out, reps=50)
    assert "--overwrite" in str(err.value)
    assert "sac" not in (out / "index.html").read_text()  # untouched
    report(two_algos, out, reps=50, overwrite=True)
    assert "sac" in (out / "index.html").read_text()
    with pytest.raises(PolicylabError, match="run directory"):
        report(two_algos, two_algos[0].parent, reps=50, overwrite=True)  # would replace the runs themselves
    assert all(run.is_dir() for run in two_algos)


def test_mixing_envs_needs_normalization(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runs = [
        fake_run(root, "ppo", "CartPole-v1", 0, [200.0]),
        fake_run(root, "ppo", "Pendulum-v1", 0, [-400.0]),
        fake_run(root, "sac", "CartPole-v1", 0, [400.0]),
        fake_run(root, "sac", "Pendulum-v1", 0, [-200.0]),
    ]
    with pytest.raises(PolicylabError) as err:
        report(runs, tmp_path / "out", reps=50)
    message = str(err.value)
    assert "CartPole-v1" in message and "Pendulum-v1" in message
    assert "--ref CartPole-v1=MIN,MAX --ref Pendulum-v1=MIN,MAX" in message and "one env at a time" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(PolicylabError, match="Pendulum-v1=MIN,MAX"):
        report(runs, tmp_path / "out", refs={"CartPole-v1": (0.0, 500.0)}, reps=50)

    refs = dict(map(parse_ref, ["CartPole-v1=0,500", "Pendulum-v1=-1600,0"]))
    result = report(runs, tmp_path / "out", refs=refs, reps=50)
    assert result.score_set.matrices["ppo"].tolist() == [[40.0, 75.0]]  # 100 * (R - min) / (max - min)
    assert result.score_set.matrices["sac"].tolist() == [[80.0, 87.5]]
    assert result.threshold == 100.0 and result.aggregates["sac"]["optimality_gap"].value == pytest.approx(16.25)
    page = (tmp_path / "out" / "index.html").read_text()
    assert "normalized" in page and "CartPole-v1: 0 .. 500 (--ref)" in page


def test_refs_from_the_runs_dataset(tmp_path: Path) -> None:
    from policylab.collect import collect
    from tests.helpers import cartpole_expert

    dataset = collect(
        "CartPole-v1", cartpole_expert, 2, seed=0, out=tmp_path / "ds", ref_min_score=20.0, ref_max_score=420.0
    )
    root = tmp_path / "runs"
    runs = [
        fake_run(root, "iql", "CartPole-v1", 0, [120.0], config={"dataset": str(dataset.path)}),
        fake_run(root, "iql", "CartPole-v1", 1, [220.0], config={"dataset": str(dataset.path)}),
        fake_run(root, "ppo", "CartPole-v1", 0, [420.0]),  # online: the env's references apply to it too
        fake_run(root, "ppo", "CartPole-v1", 1, [320.0]),
    ]
    score_set = build_score_set([load_run_score(r) for r in runs])
    assert score_set.rescaled and score_set.refs == {"CartPole-v1": (20.0, 420.0)}
    assert score_set.ref_sources["CartPole-v1"] == f"dataset {dataset.path}"
    assert score_set.matrices["iql"].ravel().tolist() == [25.0, 50.0]
    assert score_set.matrices["ppo"].ravel().tolist() == [100.0, 75.0]
    other = fake_run(root, "iql", "CartPole-v1", 2, [1.0], config={"ref_min_score": 0.0, "ref_max_score": 500.0})
    with pytest.raises(PolicylabError, match="different reference returns") as err:
        build_score_set([load_run_score(r) for r in [*runs, other]])
    assert "--ref CartPole-v1=MIN,MAX" in str(err.value)


def test_a_metric_the_runs_normalized_already(tmp_path: Path) -> None:
    """`score` (eval.json's normalized score of a run with a dataset) pools envs without --ref."""
    root = tmp_path / "runs"
    runs = [
        fake_run(root, "iql", "Hopper-v5", 0, [1000.0], final_extra={"score": 30.0}),
        fake_run(root, "iql", "Walker2d-v5", 0, [2000.0], final_extra={"score": 50.0}),
    ]
    result = report([*runs, runs[0]], tmp_path / "out", metric="score", reps=50)
    assert result.score_set.matrices["iql"].tolist() == [[30.0, 50.0]]
    assert result.threshold == 100.0 and result.aggregates["iql"]["optimality_gap"].value == pytest.approx(60.0)
    page = (tmp_path / "out" / "index.html").read_text()
    assert "already normalized" in page and f"counted once: {runs[0]}" in page
    assert "No learning curve for iql" in page  # eval.csv has no score column
    assert "iql has one run per env: its intervals have zero width" in page
    with pytest.raises(PolicylabError, match="not a return"):
        report(runs, tmp_path / "out2", metric="score", refs={"Hopper-v5": (0.0, 1.0)})


def test_bad_input_is_one_clear_error_each(two_algos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(PolicylabError, match="no run directories given") as err:
        report([], out)
    assert "policylab report runs/" in str(err.value)
    (tmp_path / "notes").mkdir()
    with pytest.raises(PolicylabError, match="is not a run directory") as err:
        report([*two_algos, tmp_path / "notes"], out)
    assert "policylab train" in str(err.value)
    with pytest.raises(PolicylabError, match="does not exist"):
        report([tmp_path / "runs" / "ppo-*"], out)
    unfinished = fake_run(tmp_path / "runs", "ppo", "CartPole-v1", 3, [5.0], final=False)
    with pytest.raises(PolicylabError, match="has no final evaluation") as err:
        report([*two_algos, unfinished], out)
    assert f"policylab train ppo --resume {unfinished}" in str(err.value) and "--which best" in str(err.value)
    unevaluated = fake_run(tmp_path / "runs", "sac", "CartPole-v1", 4, [], final=False)
    with pytest.raises(PolicylabError, match="has no final evaluation") as err:
        report([*two_algos, unevaluated], out)
    assert "--which best" not in str(err.value)  # it has no evaluation to choose from either
    with pytest.raises(PolicylabError, match="return_maen") as err:
        report(two_algos, out, metric="return_maen")
    assert "Did you mean: return_mean" in str(err.value)
    with pytest.raises(PolicylabError, match="--ref"):
        parse_ref("CartPole-v1=500")
    with pytest.raises(PolicylabError, match="MAX must be"):
        parse_ref("CartPole-v1=500,0")
    with pytest.raises(PolicylabError, match="no run is in that env") as err:
        report(two_algos, out, refs={"CartPole-v2": (0.0, 1.0)})
    assert "Did you mean: CartPole-v1" in str(err.value)
    assert not out.exists()


def test_every_algorithm_needs_the_same_runs_per_env(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runs = [
        fake_run(root, "ppo", "CartPole-v1", 0, [100.0]),
        fake_run(root, "ppo", "CartPole-v1", 1, [100.0]),
        fake_run(root, "ppo", "Acrobot-v1", 0, [-100.0]),
        fake_run(root, "sac", "CartPole-v1", 0, [100.0]),
    ]
    refs = {"CartPole-v1": (0.0, 500.0), "Acrobot-v1": (-500.0, 0.0)}
    with pytest.raises(PolicylabError, match=r"ppo has different numbers of runs per env \(CartPole-v1: 2, Acrobot"):
        build_score_set([load_run_score(r) for r in runs], refs=refs)
    with pytest.raises(PolicylabError, match="sac has no runs in Acrobot-v1"):
        build_score_set([load_run_score(r) for r in (runs[0], runs[2], runs[3])], refs=refs)


def test_curves_on_different_eval_steps_are_interpolated(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runs = [
        fake_run(root, "ppo", "CartPole-v1", 0, [0.0, 100.0, 200.0], every=100),  # steps 100..300
        fake_run(root, "ppo", "CartPole-v1", 1, [0.0, 100.0], every=150),  # steps 150, 300
    ]
    score_set = build_score_set([load_run_score(r) for r in runs])
    steps, curves, interpolated = curve_matrix(score_set.runs["ppo"], score_set, points=3)
    assert interpolated and steps.tolist() == [150.0, 225.0, 300.0]
    assert curves.shape == (2, 1, 3)
    assert curves[:, 0, :].tolist() == [[50.0, 125.0, 200.0], [0.0, 50.0, 100.0]]


def test_cli(two_algos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from policylab.report import add_report_parser

    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli-report"
    args = parser.parse_args(["report", *map(str, two_algos), "--out", str(out), "--bootstrap", "100", "--seed", "3"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'index.html'}" in printed and "IQM" in printed and "sac" in printed
    args = parser.parse_args(["report", str(two_algos[0]), "--out", str(out), "--which", "best", "--threshold", "50"])
    with pytest.raises(PolicylabError, match="not empty"):
        args.func(args)
    args = parser.parse_args(
        ["report", *map(str, two_algos[:3]), "--out", str(out), "--overwrite", "--ref", "CartPole-v1=0,500"]
    )
    assert args.func(args) == 0
    assert "normalized" in capsys.readouterr().out


def test_cli_confidence_and_curve_statistic_reach_report(
    two_algos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import inspect

    from policylab.report import add_report_parser

    module = importlib.import_module("policylab.report")
    seen: dict = {}

    def spy(*args, **kwargs):
        seen.clear()
        seen.update(kwargs)
        return report(*args, **kwargs)

    monkeypatch.setattr(module, "report", spy)
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    runs = [str(r) for r in two_algos]
    args = parser.parse_args(["report", *runs, "--out", str(tmp_path / "a"), "--bootstrap", "50"])
    assert args.func(args) == 0
    defaults = {k: v.default for k, v in inspect.signature(report).parameters.items()}
    for key in ("confidence", "curve_statistic", "seed", "threshold", "which", "metric", "overwrite"):
        assert seen[key] == defaults[key], key
    assert "[95% CI]" in capsys.readouterr().out
    out = tmp_path / "b"
    argv = [
        "report",
        *runs,
        "--out",
        str(out),
        "--bootstrap",
        "50",
        "--confidence",
        "0.975",
        "--curve-statistic",
        "mean",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert seen["confidence"] == 0.975 and seen["curve_statistic"] == "mean"
    assert "[97.5% CI]" in capsys.readouterr().out  # not rounded to 98%
    curve_rows = [r for r in csv.DictReader((out / "report.csv").open()) if r["kind"] == "curve"]
    assert curve_rows and {r["statistic"] for r in curve_rows} == {"mean"}
    for bad in ("0", "1.5", "nan"):
        args = parser.parse_args(["report", *runs, "--out", str(tmp_path / "c"), "--confidence", bad])
        with pytest.raises(PolicylabError, match="not between 0 and 1"):
            args.func(args)
    with pytest.raises(SystemExit) as info:  # argparse: one of the choices, exit 2
        parser.parse_args(["report", *runs, "--out", str(tmp_path / "c"), "--curve-statistic", "median"])
    assert info.value.code == 2 and "invalid choice: 'median'" in capsys.readouterr().err
    for flag, value in (("--seed", "-1"), ("--threshold", "nan")):
        args = parser.parse_args(["report", *runs, "--out", str(tmp_path / "c"), flag, value])
        with pytest.raises(PolicylabError, match=f"{flag[2:]}=-1|{flag[2:]}=nan"):
            args.func(args)
    assert not (tmp_path / "c").exists()


def test_report_of_real_runs(tmp_path: Path) -> None:
    small = {"n_steps": 16, "num_envs": 2, "batch_size": 32, "epochs": 1, "eval_every": 128, "eval_episodes": 2}
    runs = [
        pl.train(
            "ppo",
            env="CartPole-v1",
            steps=256,
            seed=s,
            overrides=small,
            preset="none",
            runs_dir=tmp_path,
            verbose=False,
        )
        for s in (0, 1)
    ]
    result = report([r.dir for r in runs], tmp_path / "report", reps=100)
    finals = sorted(r.final_eval["return_mean"] for r in runs if r.final_eval is not None)
    assert len(finals) == 2
    assert sorted(result.score_set.matrices["ppo"].ravel()) == pytest.approx(finals)
    assert result.curves["ppo"].steps.tolist() == [128.0, 256.0]
    page = (tmp_path / "report" / "index.html").read_text()
    assert all(str(r.dir) in page for r in runs)


def test_group_by_config_keys_compares_variants_of_one_algorithm(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runs = [
        fake_run(root, "sac", "Pendulum-v1", seed, [value], config={"lr": lr, "precision": "fp32"})
        for seed, lr, value in [(0, 0.001, -200.0), (1, 0.001, -180.0), (0, 0.0003, -400.0), (1, 0.0003, -420.0)]
    ]
    result = report(runs, tmp_path / "by-lr", reps=100, group_by=["algo", "lr"])
    assert set(result.score_set.algorithms) == {"sac lr=0.0003", "sac lr=0.001"}
    assert result.aggregates["sac lr=0.001"]["mean"].value == pytest.approx(-190.0)
    assert result.aggregates["sac lr=0.0003"]["mean"].value == pytest.approx(-410.0)
    assert [set(pair) for pair in result.improvements] == [{"sac lr=0.0003", "sac lr=0.001"}]
    assert (tmp_path / "by-lr" / "improvement.png").is_file()
    pooled = report(runs, tmp_path / "by-algo", reps=100)  # the default pools the four runs as one algorithm
    assert pooled.score_set.algorithms == ["sac"]
    assert not pooled.improvements and not (tmp_path / "by-algo" / "improvement.png").exists()  # no pair to compare
    with pytest.raises(PolicylabError, match="no 'gamma' to group by") as error:
        report(runs, tmp_path / "bad", reps=100, group_by=["algo", "gamma"])
    assert "lr" in error.value.fix


def test_one_run_and_a_comma_list_of_keys_are_taken_as_given(tmp_path: Path) -> None:
    """A string is one run directory (not its characters) and group_by="algo,lr" the CLI's comma list."""
    run = fake_run(tmp_path / "runs", "sac", "Pendulum-v1", 0, [-200.0], config={"lr": 0.001})
    result = report(str(run), tmp_path / "one", reps=100, group_by="algo,lr")
    assert list(result.aggregates) == ["sac lr=0.001"]


def test_an_unknown_group_by_key_lists_every_key_the_run_has(tmp_path: Path) -> None:
    many = {f"key_{i:02d}": i for i in range(20)}
    run = fake_run(tmp_path / "runs", "ppo", "CartPole-v1", 0, [1.0], config={**many, "nested": {"a": 1}})
    with pytest.raises(PolicylabError, match="no 'key_2' to group by") as error:
        report([run], tmp_path / "bad", reps=100, group_by=["algo", "key_2"])
    fix = error.value.fix or ""
    assert all(key in fix for key in [*many, "algo", "env", "seed"]) and "nested" not in fix
    assert "Did you mean" in str(error.value)
