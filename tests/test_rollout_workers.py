"""Rollout workers: Ray actors stepping slices of the envs compute the same run as the same slices in-process, a
run with workers resumes exactly, a killed worker is restarted without a partial rollout, a run with workers
learns, and bad settings are one clear error."""

from __future__ import annotations

import csv
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

import policylab as pl
from policylab.collectors import env_slices
from policylab.envs.normalize import RunningMeanStd
from policylab.errors import ConfigError, PolicylabError
from tests.helpers import assert_same_params, params_of, ray_process_pids, resumed_and_full_runs

SMALL = {"n_steps": 64, "num_envs": 4, "batch_size": 64, "epochs": 2, "eval_every": 0, "eval_episodes": 2}
NORMALIZED = {**SMALL, "normalize_obs": True, "normalize_reward": True, "rollout_workers": 2, "threads": 1}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def returns_logged(run_dir: Path) -> list[str]:
    with open(run_dir / "train.csv") as f:
        return [row["return_mean"] for row in csv.DictReader(f)]


def test_slices_and_merged_statistics():
    assert env_slices(8, 2) == [(0, 4), (4, 8)] and env_slices(5, 3) == [(0, 2), (2, 4), (4, 5)]
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(2.0, 3.0, size=(11, 3))
    whole, part = RunningMeanStd((3,)), RunningMeanStd((3,))
    whole.update(np.concatenate([a, b]))
    part.update(a)
    other = RunningMeanStd((3,), count=0.0)
    other.update(b)
    part.merge(other.state())
    np.testing.assert_allclose(part.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(part.var, whole.var, rtol=1e-12)
    assert part.count == pytest.approx(whole.count)


def test_ray_workers_compute_the_inline_run(local_ray, tmp_path):
    """Pendulum with observation and reward normalization (the statistics merge): the Ray actors' run and the same
    slices run inline log the same returns and end with the same parameters."""
    runs = {}
    for backend in ("ray", "inline"):
        overrides = {**NORMALIZED, "rollout_backend": backend}
        runs[backend] = pl.train(
            "ppo", env="Pendulum-v1", steps=2048, seed=4, overrides=overrides, preset="none", runs_dir=tmp_path,
            name=backend, verbose=False,
        )  # fmt: skip
    assert returns_logged(runs["ray"].dir) == returns_logged(runs["inline"].dir)
    assert len(returns_logged(runs["ray"].dir)) == 2048 // (64 * 4)
    assert_same_params(params_of(runs["ray"].dir), params_of(runs["inline"].dir))
    assert runs["ray"].final_eval == runs["inline"].final_eval


@pytest.mark.parametrize("backend", ["inline", "ray"])
def test_a_run_with_workers_resumes_exactly(local_ray, tmp_path, backend):
    resumed_and_full_runs(
        "ppo", stop=768, env="Pendulum-v1", steps=1536, seed=2, preset="none", runs_dir=tmp_path, verbose=False,
        overrides={**NORMALIZED, "rollout_backend": backend},
    )  # fmt: skip


def test_a_killed_worker_is_restarted_and_the_run_completes(local_ray, tmp_path):
    killed: list[int] = []

    def kill_one_worker_after_two_rollouts(info: pl.IterationInfo) -> None:
        if info.iteration == 2:
            pid = ray_process_pids("ray::RolloutSlice")[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    overrides = {**SMALL, "rollout_workers": 2, "threads": 1}
    run = pl.train(
        "ppo", env="CartPole-v1", steps=2048, seed=1, overrides=overrides, preset="none", runs_dir=tmp_path,
        callback=kill_one_worker_after_two_rollouts, verbose=False,
    )  # fmt: skip
    assert killed and not run.interrupted and run.steps == 2048
    with open(run.dir / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2048 // (64 * 4) and float(rows[-1]["worker_restarts"]) == 1.0
    assert float(rows[1]["worker_restarts"]) == 0.0 and float(rows[2]["worker_restarts"]) == 1.0


def test_ppo_learns_cartpole_with_ray_workers(local_ray, tmp_path):
    """The CartPole preset with its 8 envs in 2 workers: the deterministic evaluation reaches 475 within 100k."""
    bar = 475.0

    def stop_at_bar(info: pl.IterationInfo) -> bool:
        return not (info.eval_return is not None and info.eval_return >= bar)

    run = pl.train(
        "ppo", env="CartPole-v1", steps=100_000, seed=1, runs_dir=tmp_path, callback=stop_at_bar, verbose=False,
        overrides={"rollout_workers": 2, "threads": 1, "eval_every": 10_000, "eval_episodes": 5},
    )  # fmt: skip
    with open(run.dir / "eval.csv") as f:
        best = max(float(row["return_mean"]) for row in csv.DictReader(f))
    assert best >= bar


def test_bad_worker_settings_are_clear_errors(tmp_path, monkeypatch):
    base = dict(env="CartPole-v1", steps=256, preset="none", runs_dir=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="more than num_envs=4"):
        pl.train("ppo", overrides={**SMALL, "rollout_workers": 5}, **base)
    with pytest.raises(ConfigError, match="rollout_backend='threads' is not one of ray, inline"):
        pl.train("ppo", overrides={**SMALL, "rollout_workers": 2, "rollout_backend": "threads"}, **base)
    with pytest.raises(ConfigError, match="must be >= 0"):
        pl.train("ppo", overrides={**SMALL, "rollout_workers": -1}, **base)
    cpus = os.cpu_count() or 1
    with pytest.raises(PolicylabError, match=r"rollout_workers=\d+ is more than"):
        pl.train("ppo", overrides={**SMALL, "num_envs": cpus + 1, "rollout_workers": cpus + 1}, **base)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(PolicylabError, match="needs Ray, which is not installed") as info:
        pl.train("ppo", overrides={**SMALL, "rollout_workers": 2}, **base)
    assert "rollout_backend=inline" in info.value.fix


# --- off-policy ---------------------------------------------------------------------------------------------------

OFF = {"num_envs": 4, "learning_starts": 200, "eval_every": 0, "eval_episodes": 2, "log_every": 400, "threads": 1}


@pytest.mark.parametrize(
    ("algo", "env", "extra"),
    [
        ("sac", "Pendulum-v1", {"normalize_obs": True}),  # tanh-Gaussian exploration, running statistics
        ("dqn", "CartPole-v1", {"train_freq": 4, "gradient_steps": 1}),  # epsilon-greedy, segments of 4 steps
    ],
)
def test_off_policy_ray_workers_compute_the_inline_run(local_ray, tmp_path, algo, env, extra):
    runs = {}
    for backend in ("ray", "inline"):
        overrides = {**OFF, **extra, "rollout_workers": 2, "rollout_backend": backend}
        runs[backend] = pl.train(
            algo, env=env, steps=1200, seed=5, overrides=overrides, preset="none", runs_dir=tmp_path, name=backend,
            verbose=False,
        )  # fmt: skip
    assert returns_logged(runs["ray"].dir) == returns_logged(runs["inline"].dir)
    assert_same_params(params_of(runs["ray"].dir), params_of(runs["inline"].dir))
    with open(runs["ray"].dir / "train.csv") as f:  # the column on-policy runs with workers have too
        assert {float(row["worker_restarts"]) for row in csv.DictReader(f)} == {0.0}


@pytest.mark.parametrize(
    ("algo", "extra"),
    [("td3", {}), ("sac", {"use_sde": True, "train_freq": 7, "sde_sample_freq": 3})],  # gSDE: each worker's matrices
)
def test_an_off_policy_run_with_workers_resumes_exactly(tmp_path, algo, extra):
    resumed_and_full_runs(
        algo, stop=800, env="Pendulum-v1", steps=1600, seed=2, preset="none", runs_dir=tmp_path, verbose=False,
        overrides={**OFF, **extra, "rollout_workers": 2, "rollout_backend": "inline", "save_buffer": True},
    )  # fmt: skip


def test_sac_learns_pendulum_with_workers(tmp_path):
    """SAC's Pendulum preset ([64, 64] networks) with 2 envs in 2 workers (inline: the Ray backend computes the same
    run, above, at a Ray call per env step here): an evaluation reaches -250 within 12k env steps."""
    bar = -250.0

    def stop_at_bar(info: pl.IterationInfo) -> bool:
        return not (info.eval_return is not None and info.eval_return >= bar)

    run = pl.train(
        "sac", env="Pendulum-v1", steps=12_000, seed=1, runs_dir=tmp_path, callback=stop_at_bar, verbose=False,
        overrides={
            "num_envs": 2, "rollout_workers": 2, "rollout_backend": "inline", "threads": 1, "eval_every": 2000,
            "eval_episodes": 5, "hidden_sizes": [64, 64],
        },
    )  # fmt: skip
    with open(run.dir / "eval.csv") as f:
        best = max(float(row["return_mean"]) for row in csv.DictReader(f))
    assert best >= bar
