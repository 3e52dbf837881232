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
from policylab.checkpoint import find_checkpoint, load_checkpoint
from policylab.errors import CheckpointError, TrainingDiverged
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
