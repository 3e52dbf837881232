"""Sweeps on a local Ray: a grid x seeds sweep equals the same runs started alone, an interrupted sweep resumes
without rerunning finished runs, a failed run does not stop the others, and bad input fails before anything
starts."""

from __future__ import annotations

import csv
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

import policylab as pl
from policylab.cli import main
from policylab.cluster import check_address
from policylab.errors import ConfigError, PolicylabError
from policylab.sweep import (
    RUNS_CSV,
    SWEEP_YAML,
    SweepSpec,
    parse_grid,
    parse_point,
    parse_seeds,
)
from tests.helpers import ray_process_pids

SHORT = {"eval_every": 1024, "eval_episodes": 2}
GRID = {"lr": ["0.001", "0.0003"], "ent_coef": ["0.0", "0.05"]}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pl.load(run_dir).net.state_dict().items()}


def alone(
    tmp_path: Path, seed: int, params: dict[str, str], steps: int, settings: dict = SHORT
) -> dict[str, torch.Tensor]:
    """The same run started on its own with pl.train (what `policylab train` runs)."""
    overrides = {**settings, **params, "threads": 1}
    run = pl.train(
        "ppo", env="CartPole-v1", steps=steps, seed=seed, overrides=overrides, runs_dir=tmp_path, verbose=False
    )
    return weights(run.dir)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --- parsing ----------------------------------------------------------------------------------------------------


def test_seeds_grid_and_points_parse():
    assert parse_seeds("1-4") == [1, 2, 3, 4] and parse_seeds("1-2,7") == [1, 2, 7] and parse_seeds("5") == [5]
    assert parse_grid(["lr=1e-4,3e-4", "tau=0.005"]) == {"lr": ["1e-4", "3e-4"], "tau": ["0.005"]}
    assert parse_point("lr=1e-4,tau=0.02") == {"lr": "1e-4", "tau": "0.02"}
    for bad in ("", "1-x", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    for bad_grid in (["lr"], ["lr="], ["lr=1", "lr=2"]):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(bad_grid)
    with pytest.raises(ConfigError, match="--point"):
        parse_point("lr")
    spec = SweepSpec("sac", "Hopper-v5", 1000, [1, 2], {"lr": ["1", "2"]}, [{"tau": "0.01"}, {"tau": "0.02"}])
    runs = spec.runs()
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[0].name == "sac-Hopper-v5-tau=0.01-lr=1-s1" and runs[0].params == {"tau": "0.01", "lr": "1"}


def test_parse_errors_name_the_flag_the_repeated_key_and_empty_items():
    with pytest.raises(ConfigError, match=r"--grid 'lr=3e-4' repeats the key 'lr' \(already --grid lr=1e-3\)") as info:
        parse_grid(["lr=1e-3", "lr=3e-4"])
    assert info.value.fix == "give each key once, with all its values: --grid lr=1e-3,3e-4"
    for bad in ("lr=1e-3,,3e-4", "lr=1e-3,", "lr=,1e-3"):
        with pytest.raises(ConfigError, match=f"--grid '{bad}' has an empty item"):
            parse_grid([bad])
    for bad in ("1,,2", "1,", ",1"):
        with pytest.raises(ConfigError, match=f"--seeds '{bad}' has an empty item"):
            parse_seeds(bad)
    with pytest.raises(ConfigError, match="--point 'lr=1,,tau=2' has an empty item"):
        parse_point("lr=1,,tau=2")
    with pytest.raises(ConfigError, match="sets 'lr' twice"):
        parse_point("lr=1,lr=2")


def test_a_sweep_without_env_is_named_after_the_env_its_runs_train():
    # `policylab train ppo` without --env trains the config's default env, CartPole-v1: so do the sweep's runs
    spec = SweepSpec("ppo", None, 1000, [1, 2])
    assert spec.name() == "ppo-CartPole-v1"
    assert [r.name for r in spec.runs()] == ["ppo-CartPole-v1-s1", "ppo-CartPole-v1-s2"]
    assert SweepSpec("ppo", None, 1000, [1], overrides={"env": "Acrobot-v1"}).name() == "ppo-Acrobot-v1"
    assert SweepSpec("iql", None, 1000, [1], dataset="/data/hopper-medium").name() == "iql-hopper-medium"
    assert SweepSpec("iql", "Hopper-v5", 1000, [1], dataset="/data/hopper-medium").name() == "iql-Hopper-v5"


# --- bad input: one error, nothing started ----------------------------------------------------------------------


def test_bad_input_fails_before_anything_starts(tmp_path, monkeypatch):
    base = {"env": "CartPole-v1", "steps": 512, "sweeps_dir": tmp_path / "sweeps"}
    with pytest.raises(ConfigError, match="'lrr' is not a config field of ppo") as info:
        pl.sweep("ppo", grid={"lrr": [1, 2]}, **base)
    assert "Did you mean: lr" in str(info.value) and info.value.fix
    with pytest.raises(ConfigError, match="bad value for 'lr' in --grid"):
        pl.sweep("ppo", grid={"lr": ["0.001", "fast"]}, **base)
    with pytest.raises(ConfigError, match="seed=-1: a seed is a whole number >= 0"):  # not only the first seed
        pl.sweep("ppo", **{**base, "seeds": [1, -1]})
    with pytest.raises(ConfigError, match="bad value for 'ent_coef' in --point"):
        pl.sweep("ppo", points=[{"lr": "0.001", "ent_coef": "none"}], **base)
    with pytest.raises(ConfigError, match="grid axis 'lr' has no values"):
        pl.sweep("ppo", grid={"lr": []}, **base)
    with pytest.raises(ConfigError, match="rollout_workers=2 inside a sweep"):
        pl.sweep("ppo", overrides={"rollout_workers": 2}, **base)
    with pytest.raises(PolicylabError, match="this machine has"):
        pl.sweep("ppo", workers=(os.cpu_count() or 1) + 1, **base)
    with pytest.raises(PolicylabError, match="cannot reach the Ray cluster"):
        pl.sweep("ppo", address="127.0.0.1:1", **base)
    with pytest.raises(PolicylabError, match="cannot reach"):
        check_address("ray://127.0.0.1:1")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(PolicylabError, match="Ray, which is not installed") as info:
        pl.sweep("ppo", **base)
    assert "policylab[ray]" in info.value.fix
    assert not (tmp_path / "sweeps").exists()
    assert main(["sweep", "ppo", "--env", "CartPole-v1", "--grid", "lrr=1", "--sweeps-dir", str(tmp_path)]) == 2
    for argv in (["--grid", "lr=abc"], ["--grid", "lr=1e-3,,3e-4"], ["--seeds", "1,,2"]):
        assert main(["sweep", "ppo", *argv, "--sweeps-dir", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


# --- a sweep on local Ray ---------------------------------------------------------------------------------------


def test_grid_sweep_runs_equal_the_runs_started_alone(local_ray, tmp_path):
    """2x2 grid x 2 seeds of a short CartPole PPO: every run ends, and its parameters equal the same run alone."""
    out = pl.sweep(
        "ppo", env="CartPole-v1", steps=1024, seeds="1-2", grid=GRID, overrides=SHORT, workers=2,
        sweeps_dir=tmp_path / "sweeps", verbose=False,
    )  # fmt: skip
    assert out.dir == tmp_path / "sweeps" / "ppo-CartPole-v1-1" and not out.interrupted and not out.failed
    assert len(out.runs) == 8 and all(r["status"] == "done" for r in out.results.values())
    assert (out.dir / SWEEP_YAML).is_file() and out.report is not None and out.report.is_file()
    html = out.report.read_text()
    assert "lr=0.001" in html or "0.001" in html
    rows = list(csv.DictReader((out.dir / RUNS_CSV).open()))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"done"} and {r["lr"] for r in rows} == set(GRID["lr"])
    sweep_weights = {r.name: weights(out.run_dir(r.name)) for r in out.runs}
    for run in out.runs:
        assert_same(sweep_weights[run.name], alone(tmp_path / "alone", run.seed, run.params, 1024))
    first, other = out.runs[0], next(r for r in out.runs if r.seed == 1 and r.params["ent_coef"] != "0.0")
    assert any(
        not torch.equal(a, b) for a, b in zip(sweep_weights[first.name].values(), sweep_weights[other.name].values())
    )


def test_interrupted_sweep_resumes_without_rerunning_finished_runs(local_ray, tmp_path):
    """Ctrl-C once the first run has finished: the run in flight checkpoints, the rest never start. --resume then
    skips the finished run, continues the stopped one from its checkpoint and ends with the uninterrupted result."""
    # runs of about 2 s (evaluations only in the middle and at the end): well above the stop file's check interval
    steps, grid, settings = 16_384, {"lr": ["0.001"]}, {**SHORT, "eval_every": 8192}
    sweeps = tmp_path / "sweeps"
    first_done = sweeps / "ppo-CartPole-v1-1" / "runs" / "ppo-CartPole-v1-lr=0.001-s1" / "eval.json"

    def interrupt_after_first_run() -> None:  # once the second run has logged its first iteration
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            logs = [p for p in sweeps.glob("*/runs/*/train.csv") if p.parent != first_done.parent]
            if first_done.exists() and any(p.stat().st_size > 0 for p in logs):
                break
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_first_run, daemon=True).start()
    kwargs = {"env": "CartPole-v1", "steps": steps, "grid": grid, "overrides": settings, "sweeps_dir": sweeps}
    out = pl.sweep("ppo", seeds="1-3", workers=1, verbose=False, **kwargs)
    statuses = [out.results[r.name]["status"] for r in out.runs]
    assert out.interrupted and statuses[0] == "done" and statuses[-1] == "not started", statuses
    assert "stopped" in statuses, statuses  # the second run was in flight: it saved a checkpoint
    finished_at = first_done.stat().st_mtime_ns
    resumed = pl.sweep(resume=out.dir, verbose=False)
    assert not resumed.interrupted and all(r["status"] == "done" for r in resumed.results.values())
    assert resumed.results[out.runs[0].name].get("skipped") and first_done.stat().st_mtime_ns == finished_at
    stopped = [r for r, s in zip(out.runs, statuses, strict=True) if s == "stopped"]
    assert all(resumed.results[r.name]["resumed"] for r in stopped)
    for run in stopped:  # runs that never stopped equal runs started alone: test_grid_sweep_runs_equal_the_runs_...
        expected = alone(tmp_path / "alone", run.seed, run.params, steps, settings)
        assert_same(weights(resumed.run_dir(run.name)), expected)


def test_a_failed_run_does_not_stop_the_others(local_ray, tmp_path):
    out = pl.sweep(
        "ppo", env="CartPole-v1", steps=1024, grid={"lr": ["1e30", "0.001"]}, overrides=SHORT, workers=2,
        sweeps_dir=tmp_path, verbose=False, report=False,
    )  # fmt: skip
    failed, ok = out.runs
    assert out.failed == [failed.name] and "TrainingDiverged" in out.results[failed.name]["error"]
    assert out.results[ok.name]["status"] == "done"
    rows = {r["name"]: r for r in csv.DictReader((out.dir / RUNS_CSV).open())}
    assert rows[failed.name]["status"] == "failed" and "diverged" in rows[failed.name]["error"]
    assert "Traceback" in (out.run_dir(failed.name) / "error.txt").read_text()


def test_a_killed_worker_is_retried_and_its_run_resumes_from_the_checkpoint(local_ray, tmp_path):
    """kill -9 of the worker running a sweep's run after its first checkpoint: Ray reruns the task, which resumes
    from that checkpoint, and the run ends with the parameters of the same run never killed."""
    steps, overrides = 24_576, {**SHORT, "checkpoint_every": 4096}
    checkpoints = tmp_path / "sweeps" / "ppo-CartPole-v1-1" / "runs" / "ppo-CartPole-v1-s1" / "checkpoints"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while not (checkpoints / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in ray_process_pids("ray::execute_run"):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
    out = pl.sweep(
        "ppo", env="CartPole-v1", steps=steps, overrides=overrides, workers=1, sweeps_dir=tmp_path / "sweeps",
        verbose=False, report=False,
    )  # fmt: skip
    (run,) = out.runs
    assert killed, "no worker was running the task"
    assert out.results[run.name]["status"] == "done" and out.results[run.name]["resumed"]
    overrides = {**overrides, "threads": 1}
    twin = pl.train("ppo", env="CartPole-v1", steps=steps, seed=1, overrides=overrides, runs_dir=tmp_path / "alone")
    assert_same(weights(out.run_dir(run.name)), weights(twin.dir))
