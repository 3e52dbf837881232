"""C51: the categorical projection and the loss against hand computations, acting on the distributions' means
(numpy and torch paths alike), CartPole learned, exact resume, its options."""

from __future__ import annotations

import csv

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.algos.c51 import C51, C51Config
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.objectives.q_targets import categorical_projection
from policylab.presets import _ZOO_DQN_CARTPOLE
from tests.helpers import resumed_and_full_runs

ATOMS = torch.tensor([0.0, 1.0, 2.0, 3.0])


def test_the_projection_splits_each_moved_atom_between_its_neighbours():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3)
    rewards, keep = torch.tensor([0.5, 1.25, -5.0]), torch.tensor([1.0, 0.0, 1.0])
    expected = torch.tensor(
        [
            # atoms moved to 0.5, 1.5, 2.5, 3 (3.5 clipped): halves to both neighbours, the last all to atom 3
            [0.05, 0.05 + 0.1, 0.1 + 0.15, 0.15 + 0.4],
            # terminal: every atom at r = 1.25, three quarters to atom 1, a quarter to atom 2
            [0.0, 0.75, 0.25, 0.0],
            # every atom below the support: all to atom 0
            [1.0, 0.0, 0.0, 0.0],
        ]
    )
    projected = categorical_projection(probs, ATOMS, rewards, keep)
    torch.testing.assert_close(projected, expected)
    torch.testing.assert_close(projected.sum(-1), torch.ones(3))


def _two_action_c51() -> C51:
    """Logits of p(s, 0) = log [0.5, 0.5, 0, 0] (Q 0.5) and p(s, 1) = log [0, 0, 0.5, 0.5] (Q 2.5), everywhere."""
    cfg = C51Config(env="CartPole-v1", n_atoms=4, v_min=0.0, v_max=3.0, hidden_sizes=[4])
    algo = C51(cfg, gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(2))
    with torch.no_grad():
        for w in algo.net.body.weights:
            w.zero_()
        for b in algo.net.body.biases:
            b.zero_()
        logits = torch.tensor([[0.0, 0.0, -30.0, -30.0], [-30.0, -30.0, 0.0, 0.0]]).log_softmax(-1)
        algo.net.body.biases[-1].copy_(logits.reshape(algo.net.body.biases[-1].shape))
    algo.q_target.update(1.0)
    return algo


def test_the_loss_is_the_cross_entropy_to_the_projected_target_of_the_best_next_action():
    """The target acts by the larger mean (action 1: atoms 2 and 3, half each); r = 0.5, d = 0.5: they move to 1.5
    and 2, so m = [0, 0.25, 0.75, 0]; the data's action 0 has p = [0.5, 0.5, ~0, ~0]: loss = -0.25 log 0.5 - 0.75
    log(~0), dominated by the second term, checked against the formula with the network's own log-probabilities."""
    algo = _two_action_c51()
    batch = Batch(
        obs=torch.zeros(1, 3), actions=torch.zeros(1, dtype=torch.long), rewards=torch.full((1,), 0.5),
        next_obs=torch.zeros(1, 3), terminated=torch.zeros(1, dtype=torch.bool), discounts=torch.full((1,), 0.5),
    )  # fmt: skip
    target = algo.projected_target(batch)
    torch.testing.assert_close(target, torch.tensor([[0.0, 0.25, 0.75, 0.0]]), atol=1e-6, rtol=0)
    log_p = algo.net(batch.obs)[0, 0].log_softmax(-1)
    metrics = algo.update(batch, 0)
    assert metrics["loss"].item() == pytest.approx(-(target[0] * log_p).sum().item(), rel=1e-6)
    assert metrics["q"].item() == pytest.approx(0.5, abs=1e-6)


def test_acting_takes_the_largest_mean_on_both_paths_and_action_masks_apply():
    algo = _two_action_c51()
    obs = np.zeros((3, 3), np.float32)
    torch.testing.assert_close(algo.net.q_values(algo.net(torch.from_numpy(obs))), torch.tensor([[0.5, 2.5]] * 3))
    assert algo.net.greedy_numpy(obs).tolist() == [1, 1, 1]
    assert algo.net.env_action(torch.from_numpy(obs)).tolist() == [1, 1, 1]
    forbid_1 = np.array([[0.0, -1e9]] * 3, np.float32)
    assert algo.net.greedy_numpy(obs, forbid_1).tolist() == [0, 0, 0]


def test_c51_learns_cartpole(tmp_path):
    """rl-zoo's DQN CartPole values with 51 atoms in [0, 100] (the discounted returns CartPole gives): seeds 1-3
    reach 475 by 15k, 25k and 30k steps; the first evaluation at the bar stops the run."""

    def stop_at_bar(info: pl.IterationInfo) -> bool:
        return not (info.eval_return is not None and info.eval_return >= 475)

    overrides = {k: v for k, v in _ZOO_DQN_CARTPOLE.items() if k != "steps"}
    overrides.update(n_atoms=51, v_min=0.0, v_max=100.0, eval_every=5000, eval_episodes=5, threads=1)
    run = pl.train("c51", env="CartPole-v1", steps=40_000, seed=1, runs_dir=tmp_path, callback=stop_at_bar,
                   verbose=False, preset="none", overrides=overrides)  # fmt: skip
    with open(run.dir / "eval.csv") as f:
        assert max(float(r["return_mean"]) for r in csv.DictReader(f)) >= 475
    policy = pl.load(run.dir)
    torch.testing.assert_close(policy.net.atoms, torch.linspace(0.0, 100.0, 51))
    assert policy.act(gym.make("CartPole-v1").reset(seed=0)[0]) in (0, 1)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    overrides = {"learning_starts": 100, "train_freq": 4, "batch_size": 32, "target_update_interval": 100}
    overrides.update(save_buffer=True, log_every=200, eval_every=0, checkpoint_every=0, n_atoms=11)
    resumed_and_full_runs("c51", 400, env="CartPole-v1", steps=800, seed=3, overrides=overrides, preset="none",
                          runs_dir=tmp_path, verbose=False)  # fmt: skip


def test_bad_settings_are_clear_errors():
    for key in ("double_q", "dueling", "prioritized"):
        with pytest.raises(ConfigError, match=f"{key} is not part of c51") as info:
            C51Config(env="CartPole-v1", **{key: True}).validate()
        assert "use dqn" in info.value.fix
    with pytest.raises(ConfigError, match="n_atoms=1 must be >= 2"):
        C51Config(env="CartPole-v1", n_atoms=1).validate()
    with pytest.raises(ConfigError, match="v_min=10.0 below v_max=-10.0"):
        C51Config(env="CartPole-v1", v_min=10.0, v_max=-10.0).validate()
