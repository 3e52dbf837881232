"""Sweeps on a local Ray: a grid x seeds sweep equals the same runs started alone, an interrupted sweep resumes
without rerunning finished runs, a failed run does not stop the others, and bad input fails before anything
starts."""

from __future__ import annotations

import csv
import os
import re
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
from policylab.errors import ConfigError, DatasetError, PolicylabError
from policylab.sweep import (
    RUNS_CSV,
    SWEEP_YAML,
    SweepSpec,
    parse_grid,
    parse_point,
    parse_seeds,
    write_sweep_yaml,
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
        with pytest.raises(ConfigError, match="seeds"):
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
        with pytest.raises(ConfigError, match=re.escape(f"seeds={bad!r} has an empty item")):  # pl.sweep's wording
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


@pytest.fixture
def no_ray(monkeypatch):
    """Bad input must fail before Ray starts: starting it fails the test."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray started: the error should have come before")

    monkeypatch.setattr(sys.modules["policylab.sweep"], "start_ray", refuse)  # the module: pl.sweep is the function


BASE = {"env": "CartPole-v1", "steps": 512}


def cli_error(capsys, *argv: str) -> str:
    """`policylab sweep ARGV`: exit 2 with one error (no traceback); its stderr."""
    assert main(["sweep", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_a_repeated_grid_value_or_point_is_an_error(tmp_path, no_ray, capsys):
    """Both copies would run in one run directory at once."""
    sweeps = tmp_path / "sweeps"
    with pytest.raises(ConfigError, match="--grid lr=1e-3,1e-3 gives the value 1e-3 twice") as info:
        pl.sweep("ppo", grid={"lr": ["1e-3", "1e-3"]}, sweeps_dir=sweeps, **BASE)
    assert info.value.fix == "give each value once: --grid lr=1e-3"
    with pytest.raises(ConfigError, match="1e-3 and 0.001, the same value") as info:  # equal values, other spellings
        pl.sweep("ppo", grid={"lr": ["1e-3", "0.001", "3e-4"]}, sweeps_dir=sweeps, **BASE)
    assert info.value.fix == "give each value once: --grid lr=1e-3,3e-4"
    with pytest.raises(ConfigError, match="--point lr=1e-3 is given twice"):
        pl.sweep("ppo", points=[{"lr": "1e-3"}, {"lr": "1e-3"}], sweeps_dir=sweeps, **BASE)
    with pytest.raises(ConfigError, match="are the same grid point"):
        pl.sweep("ppo", points=[{"lr": "1e-3", "ent_coef": "0"}, {"ent_coef": 0.0, "lr": 0.001}], sweeps_dir=sweeps)
    assert "gives the value 1e-3 twice" in cli_error(
        capsys, "ppo", "--grid", "lr=1e-3,1e-3", "--sweeps-dir", str(sweeps)
    )
    argv = ["ppo", "--point", "lr=1e-3", "--point", "lr=1e-3", "--sweeps-dir", str(sweeps)]
    assert "--point lr=1e-3 is given twice" in cli_error(capsys, *argv)
    assert not sweeps.exists()


def test_a_key_given_by_two_flags_is_an_error(tmp_path, no_ray, capsys):
    """--grid would silently win over --point or --set (and --point over --set)."""
    sweeps = tmp_path / "sweeps"
    for kwargs, flags in (
        ({"grid": {"lr": ["1e-3"]}, "points": [{"lr": "5e-4"}]}, "--grid and --point"),
        ({"grid": {"lr": ["1e-3"]}, "overrides": {"lr": "5e-4"}}, "--grid and --set"),
        ({"points": [{"lr": "1e-3"}], "overrides": {"lr": "5e-4"}}, "--point and --set"),
    ):
        with pytest.raises(ConfigError, match=f"'lr' is given by both {flags}") as info:
            pl.sweep("ppo", sweeps_dir=sweeps, **BASE, **kwargs)
        assert "give lr in one of them" in info.value.fix
    with pytest.raises(ConfigError, match="'threads' in --grid/--point/--set: the sweep sets it"):  # not dropped
        pl.sweep("ppo", overrides={"threads": 2}, sweeps_dir=sweeps, **BASE)
    err = cli_error(capsys, "ppo", "--grid", "lr=1e-3", "--point", "lr=5e-4", "--sweeps-dir", str(sweeps))
    assert "'lr' is given by both --grid and --point" in err
    assert not sweeps.exists()


def test_steps_parse_as_for_train(tmp_path, no_ray, capsys):
    sweeps = tmp_path / "sweeps"
    err = cli_error(capsys, "ppo", "--env", "CartPole-v1", "--steps", "1x", "--sweeps-dir", str(sweeps))
    assert "bad value for 'steps' in the arguments: '1x' is not a count" in err and "fix: give a positive count" in err
    train_err = cli_error(capsys, "ppo", "--env", "CartPole-v1", "--steps", "1x")  # the same error as train's
    assert train_err == err
    with pytest.raises(ConfigError, match="steps=-5 must be > 0"):
        pl.sweep("ppo", env="CartPole-v1", steps="-5", sweeps_dir=sweeps)
    assert not sweeps.exists()


def test_a_missing_dataset_fails_before_ray(tmp_path, no_ray):
    sweeps = tmp_path / "sweeps"
    for algo in ("sac", "ppo"):  # hybrid and demonstrations: their runs read the dataset only once started
        with pytest.raises(DatasetError, match="no dataset at .*nope.hdf5: the path does not exist"):
            pl.sweep(algo, env="Pendulum-v1", steps=512, dataset=tmp_path / "nope.hdf5", sweeps_dir=sweeps)
    with pytest.raises(DatasetError, match="no dataset 'nope/thing-v0'"):  # a Minari id, resolved as load_dataset does
        pl.sweep("iql", env="Pendulum-v1", steps=512, dataset="nope/thing-v0", sweeps_dir=sweeps)
    assert not sweeps.exists()


def saved_sweep(tmp_path: Path) -> Path:
    """A sweep directory as a new sweep leaves it (no runs yet)."""
    sweep_dir = tmp_path / "sweeps" / "ppo-CartPole-v1-1"
    sweep_dir.mkdir(parents=True)
    write_sweep_yaml(sweep_dir, SweepSpec("ppo", "CartPole-v1", 512, [1, 2], {"lr": ["1e-3"]}), 1, None)
    return sweep_dir


def test_resume_takes_the_saved_settings_only_workers_and_address_change(tmp_path, no_ray, capsys):
    sweep_dir = saved_sweep(tmp_path)
    saved = (sweep_dir / SWEEP_YAML).read_text()
    with pytest.raises(ConfigError, match="resume continues a sweep with its saved settings") as info:
        pl.sweep(resume=sweep_dir, steps=2048)
    assert info.value.fix.startswith("drop steps (on resume only workers and address may change)")
    for argv, named in (
        (["ppo"], "the algorithm 'ppo'"),
        (["--steps", "2k"], "--steps"),
        (["--grid", "lr=3e-4"], "--grid"),
        (["--point", "lr=3e-4"], "--point"),
        (["--set", "ent_coef=0.01"], "--set"),
        (["--preset", "none"], "--preset"),
        (["--dataset", "d.hdf5"], "--dataset"),
        (["--threads", "1"], "--threads"),
        (["--seeds", "1-5"], "--seeds"),
    ):
        err = cli_error(capsys, *argv, "--resume", str(sweep_dir))
        assert "--resume continues a sweep with its saved settings" in err and f"fix: drop {named} " in err
    cpus = os.cpu_count() or 1
    with pytest.raises(PolicylabError, match="this machine has"):  # --workers is taken (and checked)
        pl.sweep(resume=sweep_dir, workers=cpus + 1)
    assert (sweep_dir / SWEEP_YAML).read_text() == saved and sorted(sweep_dir.iterdir()) == [sweep_dir / SWEEP_YAML]


def test_a_damaged_sweep_yaml_is_one_error_naming_it(tmp_path, no_ray, capsys):
    sweep_dir = saved_sweep(tmp_path)
    for text, problem in (
        ("algo: [\n", "is not valid YAML at line 2"),
        ("foo: 1\n", "is not a sweep's settings: unknown key foo; no algo, env, steps, seeds"),
        ("- ppo\n", "holds a list, not a sweep's settings"),
        ("algo: ppo\nenv: null\nsteps: 512\nseeds: [1]\nthreads: two\n", "threads is 'two', not a whole number"),
    ):
        (sweep_dir / SWEEP_YAML).write_text(text)
        err = cli_error(capsys, "--resume", str(sweep_dir))
        assert f"error: {sweep_dir / SWEEP_YAML} " in err or f"error: {sweep_dir / SWEEP_YAML}:" in err, err
        assert problem in err and "fix: restore" in err


def test_resume_takes_the_sweep_yaml_for_its_directory(tmp_path, no_ray, capsys):
    sweep_dir = saved_sweep(tmp_path)
    cpus = os.cpu_count() or 1
    with pytest.raises(PolicylabError, match="this machine has"):  # past the path: the same sweep as its directory
        pl.sweep(resume=sweep_dir / SWEEP_YAML, workers=cpus + 1)
    err = cli_error(capsys, "--resume", str(tmp_path))
    assert "is not a sweep directory (no sweep.yaml in it)" in err and "the one holding sweep.yaml" in err


def test_an_unusable_sweeps_dir_fails_before_ray(tmp_path, no_ray, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"--sweeps-dir {tmp_path / 'file' / 'sub'} cannot hold sweeps: .* is not"):
        pl.sweep("ppo", sweeps_dir=tmp_path / "file" / "sub", **BASE)
    err = cli_error(capsys, "ppo", "--steps", "512", "--sweeps-dir", str(tmp_path / "file"))
    assert "cannot hold sweeps (it is not a directory)" in err
    assert sorted(tmp_path.iterdir()) == [tmp_path / "file"]


def test_fix_lines_name_the_flag_to_change(tmp_path, no_ray):
    sweeps, cpus = tmp_path / "sweeps", os.cpu_count() or 1
    with pytest.raises(PolicylabError, match="this machine has") as info:  # one worker: only fewer threads fit
        pl.sweep("ppo", threads=cpus + 1, workers=1, sweeps_dir=sweeps, **BASE)
    assert info.value.fix.startswith(f"pass --threads {cpus}")
    with pytest.raises(PolicylabError, match="this machine has") as info:
        pl.sweep("ppo", workers=cpus + 1, sweeps_dir=sweeps, **BASE)
    assert info.value.fix.startswith(f"pass workers={cpus}")  # pl.sweep's argument; the CLI's is --workers
    # a value of the right type that fails the config's range check names the flag it came from
    with pytest.raises(ConfigError, match=r"lr=-1.0 must be > 0 \(from lr=-1 in --grid\)"):
        pl.sweep("ppo", grid={"lr": ["1e-3", "-1"]}, sweeps_dir=sweeps, **BASE)
    with pytest.raises(ConfigError, match=r"gamma=2.0 is outside \[0, 1\] \(from gamma=2 in --point\)"):
        pl.sweep("ppo", points=[{"gamma": "2"}], sweeps_dir=sweeps, **BASE)
    with pytest.raises(ConfigError, match=r"gamma=2.0 is outside \[0, 1\]\n"):  # --set's own error: not a grid point's
        pl.sweep("ppo", overrides={"gamma": "2"}, grid={"lr": ["1e-3"]}, sweeps_dir=sweeps, **BASE)
    for bad in ("-1", "1,-2"):
        with pytest.raises(ConfigError, match="seeds are whole numbers >= 0"):
            parse_seeds(bad)
    with pytest.raises(ConfigError, match="the range '3-1' is empty") as info:
        parse_seeds("3-1")
    assert info.value.fix == "write it upwards: 1-3"
    assert not sweeps.exists()


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
