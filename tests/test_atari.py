"""Atari through ale-py: the preprocessing (84x84 grayscale frames, 4 stacked, uint8), its training-only parts
(lost lives end episodes, rewards clipped) kept out of evaluation, rl-zoo's presets found for every game, a short
PPO and DQN run on Pong from them, and the error without ale-py."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

import policylab as pl
from policylab.envs import make_vec_env
from policylab.envs.vec import make_single_env
from policylab.errors import EnvError
from policylab.presets import find_preset


def test_frames_are_stacked_84x84_uint8():
    env = make_vec_env("ALE/Pong-v5", 2, training=True)
    obs = env.reset(seed=0)
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    assert env.single_observation_space.shape == (4, 84, 84)
    res = env.step(np.zeros(2, np.int64))
    assert not res.episode_end.any()
    np.testing.assert_array_equal(res.obs[:, :3], obs[:, 1:])  # the stack moved on by one frame
    assert obs.max() > 0  # frames of the game, not blank
    env.close()


def test_lost_lives_and_clipped_rewards_are_for_training_only():
    """Breakout (5 lives): the training env ends its episode at the first lost life, the evaluation env plays on;
    rewards are clipped to their sign in training only."""
    train, play = make_single_env("ALE/Breakout-v5", training=True), make_single_env("ALE/Breakout-v5")
    rng = np.random.default_rng(0)
    for env, stops_at_first_life in ((train, True), (play, False)):
        env.reset(seed=1)
        lives, ended = 5, False
        for _ in range(2000):
            _, reward, terminated, truncated, info = env.step(int(rng.integers(4)))
            assert reward in (0.0, 1.0) if stops_at_first_life else reward >= 0.0
            if terminated or truncated:
                ended = True
                break
            lives = info["lives"]
        assert ended and (lives == 5 if stops_at_first_life else lives == 1)
        env.close()


def test_the_atari_presets_apply_to_every_game():
    for algo in ("ppo", "a2c", "dqn", "qrdqn"):
        for game in ("ALE/Pong-v5", "BreakoutNoFrameskip-v4"):
            preset = find_preset(algo, game)
            assert preset is not None and preset.values["encoder"] == "nature" and preset.values["hidden_sizes"] == []
    assert find_preset("ppo", "ALE/Pong-v5").values["clip_eps"] == 0.1  # type: ignore[union-attr]
    for algo in ("ppo", "a2c", "dqn", "qrdqn"):  # rl-zoo evaluates Atari policies with sampled actions
        assert find_preset(algo, "BreakoutNoFrameskip-v4").values["eval_deterministic"] is False  # type: ignore
    assert find_preset("sac", "ALE/Pong-v5") is None


@pytest.mark.parametrize(
    ("algo", "overrides"),
    [("ppo", {"num_envs": 4, "n_steps": 64}), ("dqn", {"learning_starts": 128, "buffer_size": 1000, "log_every": 256})],
)
def test_a_short_run_from_the_preset(tmp_path, algo, overrides):
    """The whole path (preset, preprocessing, uint8 storage, Nature-CNN, evaluation on whole games) on Pong."""
    run = pl.train(algo, env="ALE/Pong-v5", steps=512, seed=0, runs_dir=tmp_path, verbose=False,
                   overrides={"threads": 1, "eval_episodes": 1, **overrides})  # fmt: skip
    assert run.config.encoder == "nature" and run.config.hidden_sizes == []
    assert run.final_eval is not None and -21.0 <= run.final_eval["return_mean"] <= 21.0
    assert run.final_eval["length_mean"] > 500  # a whole game, not one point
    policy = pl.load(run.dir)
    frame = make_single_env("ALE/Pong-v5").reset(seed=0)[0]
    assert 0 <= policy.act(frame) < 6


def test_without_ale_py_the_error_names_the_extra(monkeypatch):
    import gymnasium as gym

    real_import = builtins.__import__

    def no_ale(name, *args, **kwargs):
        if name == "ale_py":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ale)
    monkeypatch.setattr(gym, "registry", {k: v for k, v in gym.registry.items() if "ale_py" not in str(v.entry_point)})
    with pytest.raises(EnvError, match=r"policylab\[atari\]"):
        make_single_env("ALE/Pong-v5")
