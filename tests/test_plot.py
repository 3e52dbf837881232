"""policylab.plot: learning curves from hand-written run directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from policylab.cli import main
from policylab.errors import PolicylabError
from policylab.plot import aggregate_curves, group_runs, load_run, metric_curve, plot_runs, shared_eval_points

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_HEADER = "step,time,fps,return_mean,length_mean,episodes,loss"
EVAL_HEADER = "step,time,episodes,return_mean,return_std"


def make_run(root: Path, name: str, algo: str, seed: int, returns: dict[int, str], evals: dict[int, float]) -> Path:
    """A run directory as `policylab train` writes it: config.yaml, train.csv, eval.csv."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(f"algo: {algo}\nenv: CartPole-v1\nseed: {seed}\nsteps: 400\n")
    rows = [f"{s},{s / 1000},1000,{r},{r},{s // 100},0.5" for s, r in returns.items()]
    (run / "train.csv").write_text("\n".join([TRAIN_HEADER, *rows]) + "\n")
    rows = [f"{s},{s / 1000},10,{r},1.0" for s, r in evals.items()]
    (run / "eval.csv").write_text("\n".join([EVAL_HEADER, *rows]) + "\n")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """Three ppo seeds (one without a return at first, one that stopped early) and one a2c run."""
    root = tmp_path / "runs"
    root.mkdir()
    return [
        make_run(root, "ppo-s0", "ppo", 0, {100: "", 200: "10", 300: "20", 400: "30"}, {200: 50.0, 400: 90.0}),
        make_run(root, "ppo-s1", "ppo", 1, {100: "20", 200: "30", 300: "40", 400: "50"}, {200: 70.0, 400: 100.0}),
        make_run(root, "ppo-s2", "ppo", 2, {100: "5", 200: "15", 300: "25"}, {200: 60.0}),
        make_run(root, "a2c-s0", "a2c", 0, {100: "8", 200: "9", 300: "12"}, {}),
    ]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000


def test_plot_runs_writes_a_png(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder" / "curves.png"
    assert plot_runs(runs, out) == out
    assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left behind
    plot_runs(runs[:1], out, metric="loss")  # overwrites in place
    assert_png(out)


def test_plot_runs_from_eval_csv(runs: list[Path], tmp_path: Path) -> None:
    assert_png(plot_runs(runs[:3], tmp_path / "eval.png", metric="return_std", source="eval"))


def test_metric_curve_skips_nan_and_sorts() -> None:
    rows = [{"step": 300.0, "m": 3.0}, {"step": 100.0, "m": float("nan")}, {"step": 200.0, "m": 2.0}]
    steps, values = metric_curve(rows, "m")
    np.testing.assert_array_equal(steps, [200, 300])
    np.testing.assert_array_equal(values, [2, 3])
    assert len(metric_curve(rows, "missing")[0]) == 0


def test_aggregate_curves_by_hand(runs: list[Path]) -> None:
    loaded = [load_run(r) for r in runs]
    groups = group_runs(loaded, "return_mean")
    assert {k: len(v) for k, v in groups.items()} == {("ppo", "CartPole-v1"): 3, ("a2c", "CartPole-v1"): 1}
    curves = [metric_curve(r.rows, "return_mean") for r in groups["ppo", "CartPole-v1"]]
    # s0 has returns from step 200, s2 stops at 300: the grid spans 200..300 only.
    grid, mean, low, high = aggregate_curves(curves, points=3)
    np.testing.assert_allclose(grid, [200, 250, 300])
    np.testing.assert_allclose(mean, [(10 + 30 + 15) / 3, (15 + 35 + 20) / 3, (20 + 40 + 25) / 3])
    np.testing.assert_allclose(low, [10, 15, 20])
    np.testing.assert_allclose(high, [30, 35, 40])
    assert len(aggregate_curves(curves)[0]) == 200


def test_aggregate_single_curve_is_its_own_band() -> None:
    grid, mean, low, high = aggregate_curves([(np.array([0.0, 10.0]), np.array([1.0, 3.0]))], points=5)
    np.testing.assert_allclose(grid, [0, 2.5, 5, 7.5, 10])
    np.testing.assert_allclose(mean, [1, 1.5, 2, 2.5, 3])
    np.testing.assert_array_equal(low, mean)
    np.testing.assert_array_equal(high, mean)


def test_shared_eval_points(runs: list[Path]) -> None:
    steps, values = shared_eval_points([load_run(r) for r in runs[:3]], "return_mean")
    np.testing.assert_array_equal(steps, [200])  # 400 is missing from ppo-s2
    np.testing.assert_allclose(values, [60.0])
    steps, values = shared_eval_points([load_run(r) for r in runs[:2]], "return_mean")
    np.testing.assert_allclose(values, [60.0, 95.0])


@pytest.mark.parametrize(
    ("make_path", "problem"),
    [
        (lambda tmp: tmp, "is not a run directory"),
        (lambda tmp: tmp / "does-not-exist", "does-not-exist' does not exist"),
    ],
)
def test_not_a_run_directory(tmp_path: Path, make_path, problem: str) -> None:
    with pytest.raises(PolicylabError, match=problem) as info:
        plot_runs([make_path(tmp_path)], tmp_path / "out.png")
    assert info.value.fix is not None and "policylab train" in info.value.fix


def test_missing_metric_lists_the_columns(runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(PolicylabError, match="no column 'reward'") as info:
        plot_runs(runs, tmp_path / "out.png", metric="reward")
    assert info.value.fix is not None
    for column in ("return_mean", "length_mean", "loss"):
        assert column in info.value.fix
    assert not (tmp_path / "out.png").exists()


def test_no_data_yet(tmp_path: Path) -> None:
    run = make_run(tmp_path, "early", "ppo", 0, {100: "", 200: ""}, {})
    with pytest.raises(PolicylabError, match="no run has any data for 'return_mean'"):
        plot_runs([run], tmp_path / "out.png")


def test_cli_plot(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.png"
    assert main(["plot", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"plot: {out}"
    assert_png(out)


def test_runs_of_different_lengths_get_a_note(runs: list[Path], tmp_path: Path, capsys) -> None:
    notes: list[str] = []
    plot_runs(runs, tmp_path / "p.png", notes=notes)  # ppo-s2 stops at 300, the other seeds go on to 400
    assert notes == [
        "ppo on CartPole-v1: the runs end at different steps (300 to 400); its mean and band are drawn over the "
        "steps that all of them reached (to 300)"
    ]
    plot_runs(runs[:2], tmp_path / "p.png", notes=notes)  # the same lengths: no note
    assert len(notes) == 1
    assert main(["plot", *map(str, runs[:3]), "--out", str(tmp_path / "cli.png")]) == 0
    assert capsys.readouterr().out.startswith("note: ppo on CartPole-v1: the runs end at different steps")


def test_cli_plot_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and "not a run directory" in lines[0]
    assert all(line.strip().startswith("fix:") for line in lines[1:])  # at most the fix follows, no traceback
    assert "Traceback" not in err


def test_the_step_axis_says_what_offline_runs_count(tmp_path):
    from policylab.plot import step_axis_label

    online = make_run(tmp_path, "sac-s0", "sac", 0, {100: "1"}, {})
    offline = make_run(tmp_path, "iql-s0", "iql", 0, {100: ""}, {100: 5.0})
    config = offline / "config.yaml"
    config.write_text(config.read_text() + "dataset: data/d\noffline_ratio: null\nonline_steps: 0\n")
    hybrid = make_run(tmp_path, "sac-s1", "sac", 1, {100: "1"}, {})
    (hybrid / "config.yaml").write_text((hybrid / "config.yaml").read_text() + "dataset: d\noffline_ratio: 0.5\n")

    def label(*dirs):
        return step_axis_label([(run.offline_steps, run.online_steps) for run in map(load_run, dirs)])

    assert label(online, hybrid) == "environment steps"  # a hybrid run counts env steps
    assert load_run(offline).offline_steps == 400 and label(offline) == "gradient steps (offline)"
    config.write_text(config.read_text().replace("online_steps: 0", "online_steps: 200"))
    assert load_run(offline).online_steps == 200
    assert label(offline, online).startswith("gradient steps offline, then environment steps online")
    assert plot_runs([offline], tmp_path / "p.png", source="eval").read_bytes().startswith(PNG_MAGIC)
