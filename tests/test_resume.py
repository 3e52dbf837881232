"""Checkpoints: exact resume, round trip, corrupt files, Ctrl-C, divergence."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import policylab as pl
from policylab.algos import SACConfig
from policylab.checkpoint import find_checkpoint, load_checkpoint
from policylab.errors import CheckpointError, TrainingDiverged
from policylab.logging import read_csv
from tests.helpers import assert_same_params, params_of

SMALL = {"n_steps": 32, "num_envs": 4, "batch_size": 64, "epochs": 2, "eval_every": 0, "eval_episodes": 2}


def _stop_at(step: int):
    return lambda info: info.step < step


@pytest.mark.parametrize(
    ("env", "extra"),
    [
        ("CartPole-v1", {}),
        ("CartPole-v1", {"normalize_obs": True, "normalize_reward": True, "anneal_lr": True, "anneal_clip": True}),
        ("Pendulum-v1", {"normalize_obs": True}),
        ("Pendulum-v1", {"use_sde": True, "sde_sample_freq": 8}),  # noise matrices drawn from the saved generator
        ("InvertedPendulum-v5", {}),
    ],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path, env, extra):
    cfg = {**SMALL, **extra}
    kwargs = dict(env=env, steps=1536, seed=3, overrides=cfg, preset="none", runs_dir=tmp_path, verbose=False)
    full = pl.train("ppo", name="full", **kwargs)
    part = pl.train("ppo", name="part", callback=_stop_at(640), **kwargs)
    assert part.interrupted and part.steps < 1536
    resumed = pl.train("ppo", resume=part.dir, verbose=False)
    assert resumed.dir == part.dir and resumed.steps == full.steps
    assert_same_params(params_of(full.dir), params_of(resumed.dir))
    assert resumed.final_eval == full.final_eval


def test_resume_truncates_metrics_logged_after_the_checkpoint(tmp_path):
    kwargs = dict(
        env="CartPole-v1", steps=1024, seed=0, overrides=SMALL, preset="none", runs_dir=tmp_path, verbose=False
    )
    part = pl.train("ppo", callback=_stop_at(512), **kwargs)
    pl.train("ppo", resume=part.dir, verbose=False)
    steps = [float(line.split(",")[0]) for line in (part.dir / "train.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) == 8


def test_checkpoint_round_trip_holds_weights_optimizer_and_rng(tmp_path):
    run = pl.train(
        "ppo", env="CartPole-v1", steps=256, seed=0, overrides=SMALL, preset="none", runs_dir=tmp_path, verbose=False
    )
    tensors, state, path = load_checkpoint(run.dir)
    assert path.parent.name == "checkpoints" and state["step"] == 256 and state["algo"] == "ppo"
    assert any(k.startswith("optim/") for k in tensors) and "rng/generator" in tensors
    assert state["config"]["seed"] == 0 and state["env"] is not None
    policy = pl.load(run.dir)
    for k, v in policy.net.state_dict().items():
        assert torch.equal(v, tensors[f"policy/{k}"])
    # Nothing in a checkpoint is a pickle.
    for f in path.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f} looks like a pickle"


def _trained(tmp_path) -> Path:
    run = pl.train(
        "ppo", env="CartPole-v1", steps=256, seed=0, overrides=SMALL, preset="none", runs_dir=tmp_path, verbose=False
    )
    return run.dir


def test_checkpoint_files_get_the_umask_mode_so_other_users_can_load_the_policy(tmp_path):
    import os

    def modes() -> dict[str, int]:
        return {p.relative_to(run.dir).as_posix(): p.stat().st_mode & 0o777 for p in run.dir.rglob("*") if p.is_file()}

    old = os.umask(0o022)
    try:
        run = pl.train(
            "ppo", env="CartPole-v1", steps=128, seed=0, overrides={**SMALL, "eval_every": 128}, preset="none",
            runs_dir=tmp_path, verbose=False,
        )  # fmt: skip
        assert modes()["best/weights.safetensors"] == modes()["best/state.json"] == 0o644  # not safetensors' 0600
        assert modes()["checkpoints/step_000000000128/weights.safetensors"] == 0o644
        os.umask(0o027)
        pl.train("ppo", resume=run.dir, steps=256, verbose=False)
    finally:
        os.umask(old)
    assert modes()["checkpoints/step_000000000256/weights.safetensors"] == 0o640  # the umask of its writing
    assert modes()["checkpoints/step_000000000256/state.json"] == 0o640


def test_truncated_weights_give_a_clear_error_and_are_left_alone(tmp_path):
    run_dir = _trained(tmp_path)
    weights = find_checkpoint(run_dir) / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        pl.load(run_dir)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        pl.train("ppo", resume=run_dir, verbose=False)
    assert weights.read_bytes() == data[: len(data) // 2]


def test_corrupt_state_json_and_missing_checkpoint(tmp_path):
    run_dir = _trained(tmp_path)
    state = find_checkpoint(run_dir) / "state.json"
    state.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        pl.load(run_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        pl.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        pl.load(tmp_path / "empty")


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    overrides = {**SMALL, "checkpoint_every": 128, "num_envs": 2, "n_steps": 32, "keep_checkpoints": 10}
    with pytest.raises(TrainingDiverged, match="became NaN or inf") as info:
        pl.train(
            "ppo",
            env="tests.envs_for_tests:make_nan_env",
            steps=2048,
            seed=0,
            overrides=overrides,
            runs_dir=tmp_path,
            verbose=False,
        )
    assert "last good checkpoint is" in str(info.value) and "step_000000000512" in str(info.value)
    run_dir = next(tmp_path.iterdir())
    tensors, state, _ = load_checkpoint(run_dir)
    assert state["step"] == 512 and all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("policy/"))
    assert info.value.fix == (  # PPO takes each remedy (max_grad_norm is on: not suggested)
        "lower lr (overrides={'lr': 3e-05}), normalize observations (overrides={'normalize_obs': True}), or normalize "
        "rewards (overrides={'normalize_reward': True})"
    )


def test_divergence_advice_names_only_what_the_algorithm_takes(tmp_path):
    """Off-policy algorithms refuse normalize_reward: their divergence fix does not suggest it; gradient clipping
    is suggested where it is off, and an absurd lr gets the algorithm's default."""
    with pytest.raises(TrainingDiverged) as info:
        pl.train("dqn", env="tests.envs_for_tests:make_nan_env", steps=2000, preset="none", runs_dir=tmp_path,
                 verbose=False, overrides={"learning_starts": 100, "log_every": 200, "eval_every": 0})  # fmt: skip
    assert (
        info.value.fix
        == "lower lr (overrides={'lr': 1e-05}), or normalize observations (overrides={'normalize_obs': True})"
    )
    sac = SACConfig(lr=1e8).divergence_fix()
    assert sac == (
        "lower lr (--set lr=0.0003), clip gradients (--set max_grad_norm=10), or normalize observations "
        "(--set normalize_obs=true)"
    )
    assert "normalize_reward" not in sac


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "policylab.cli",
        "train",
        "ppo",
        "--env",
        "CartPole-v1",
        "--steps",
        "10M",
        "--seed",
        "0",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "sigint",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
    )
    run_dir = tmp_path / "sigint"
    deadline = time.time() + 60
    while not (run_dir / "train.csv").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume with: policylab train ppo --resume" in out
    _, state, _ = load_checkpoint(run_dir)
    assert 0 < state["step"] < 10_000_000


def test_resuming_a_complete_run_says_so_and_writes_nothing(tmp_path, capsys):
    from policylab.cli import main

    run = pl.train(
        "ppo", env="CartPole-v1", steps=256, seed=0, overrides={**SMALL, "eval_every": 128}, preset="none",
        runs_dir=tmp_path, verbose=False,
    )  # fmt: skip
    files = {p: p.read_bytes() for p in run.dir.rglob("*") if p.is_file()}
    for _ in range(2):
        assert main(["train", "ppo", "--resume", str(run.dir)]) == 0
        out = capsys.readouterr().out
        assert f"{run.dir} is already complete at 256 steps: nothing to train" in out
        assert f"--resume {run.dir} --steps N, with N above 256" in out
        assert {p: p.read_bytes() for p in run.dir.rglob("*") if p.is_file()} == files  # no eval row, no checkpoint
    again = pl.train("ppo", resume=run.dir, verbose=False)
    assert again.steps == 256 and again.final_eval == run.final_eval and not again.interrupted
    assert main(["train", "ppo", "--resume", str(run.dir), "--steps", "100"]) == 2
    assert "is at step 256, past --steps 100" in capsys.readouterr().err
    more = pl.train("ppo", resume=run.dir, steps=384, verbose=False)  # --steps N trains on to N
    assert more.steps == 384 and [r["step"] for r in read_csv(run.dir / "eval.csv")] == [128, 256, 384]


def test_resume_refuses_a_new_runs_place_and_online_phase(tmp_path, capsys):
    """--runs-dir, --name and --online-steps with --resume were dropped silently (the run continues in its own
    directory with its own phases); each is now an error naming it, and nothing is written."""
    from policylab.cli import main
    from policylab.errors import ConfigError

    run = pl.train("ppo", env="CartPole-v1", steps=128, overrides=SMALL, preset="none", runs_dir=tmp_path,
                   verbose=False)  # fmt: skip
    files = {p: p.read_bytes() for p in run.dir.rglob("*") if p.is_file()}
    elsewhere = tmp_path / "elsewhere"
    assert main(["train", "--resume", str(run.dir), "--steps", "256", "--runs-dir", str(elsewhere)]) == 2
    err = capsys.readouterr().err
    assert f"error: --runs-dir does not apply to --resume: the run continues in {run.dir}" in err
    assert "fix: drop --runs-dir" in err and not elsewhere.exists()
    with pytest.raises(ConfigError, match="name and runs_dir do not apply to resume"):
        pl.train("ppo", resume=run.dir, name="other", runs_dir=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="online_steps does not apply to resume"):
        pl.train("ppo", resume=run.dir, online_steps=100, verbose=False)
    assert {p: p.read_bytes() for p in run.dir.rglob("*") if p.is_file()} == files


def test_config_yaml_records_the_rounded_budget_and_a_resume_that_changes_it(tmp_path):
    import yaml

    def saved_steps() -> int:
        return yaml.safe_load((run.dir / "config.yaml").read_text())["steps"]

    kwargs = dict(env="CartPole-v1", seed=3, overrides=SMALL, preset="none", runs_dir=tmp_path, verbose=False)
    full = pl.train("ppo", steps=1500, name="full", **kwargs)  # whole rollouts of 32 x 4: 1,536
    run = pl.train("ppo", steps=1500, name="part", callback=_stop_at(640), **kwargs)
    assert saved_steps() == 1536 == run.config.steps and load_checkpoint(run.dir)[1]["config"]["steps"] == 1536
    resumed = pl.train("ppo", resume=run.dir, verbose=False)  # reads 1,536 back: the same run
    assert resumed.steps == full.steps == 1536 and saved_steps() == 1536
    assert_same_params(params_of(full.dir), params_of(resumed.dir))
    longer = pl.train("ppo", resume=run.dir, steps="2k", verbose=False)
    assert longer.steps == 2048 == saved_steps() == load_checkpoint(run.dir)[1]["config"]["steps"]
