"""QR-DQN: the quantile loss against a hand computation, CartPole learned with rl-zoo's preset, and its options."""

from __future__ import annotations

import csv

import gymnasium as gym
import pytest
import torch

import policylab as pl
from policylab.algos.qrdqn import QRDQN, QRDQNConfig
from policylab.data import Batch
from policylab.errors import ConfigError


def test_quantile_loss_against_a_hand_computation():
    """Z(s, 0) = [0, 1], Z(s, 1) = [2, 4] (both networks); action 0, r = 1, d = 0.5, not terminal. The target
    acts by the largest mean (action 1): y = 1 + 0.5 [2, 4] = [2, 3]. With tau = [0.25, 0.75] and kappa 1:
    quantile 0 (u = [2, 3]): 0.25 x [1.5, 2.5], mean 0.5; quantile 1 (u = [1, 2]): 0.75 x [0.5, 1.5], mean 0.75;
    summed over the quantiles, 1.25."""
    cfg = QRDQNConfig(env="CartPole-v1", n_quantiles=2, hidden_sizes=[4])
    algo = QRDQN(cfg, gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(2))
    with torch.no_grad():
        for w in algo.net.body.weights:
            w.zero_()
        for b in algo.net.body.biases:
            b.zero_()
        algo.net.body.biases[-1].copy_(torch.tensor([[0.0, 1.0, 2.0, 4.0]]).view_as(algo.net.body.biases[-1]))
    algo.q_target.update(1.0)
    batch = Batch(
        obs=torch.zeros(1, 3), actions=torch.zeros(1, dtype=torch.long), rewards=torch.ones(1),
        next_obs=torch.zeros(1, 3), terminated=torch.zeros(1, dtype=torch.bool), discounts=torch.full((1,), 0.5),
    )  # fmt: skip
    loss, z = algo.quantile_loss(batch)
    assert loss.item() == pytest.approx(1.25)
    torch.testing.assert_close(z, torch.tensor([[0.0, 1.0]]))


def test_qrdqn_learns_cartpole_with_its_preset(tmp_path):
    """The CartPole-v1 preset (rl-zoo's entry with 3-step returns and a decaying learning rate, 40k steps): an
    evaluation reaches 475 within the budget; the loaded policy acts greedily on the quantiles' mean."""

    def stop_at_bar(info: pl.IterationInfo) -> bool:
        return not (info.eval_return is not None and info.eval_return >= 475)

    run = pl.train(
        "qrdqn", env="CartPole-v1", seed=1, runs_dir=tmp_path, callback=stop_at_bar, verbose=False,
        overrides={"eval_every": 5000, "eval_episodes": 5, "threads": 1},
    )  # fmt: skip
    with open(run.dir / "eval.csv") as f:
        assert max(float(r["return_mean"]) for r in csv.DictReader(f)) >= 475
    policy = pl.load(run.dir)
    assert policy.act(gym.make("CartPole-v1").reset(seed=0)[0]) in (0, 1)
    assert policy.net.sample_epsilon == run.config.eps_final  # sampled actions: epsilon-greedy at the final rate


def test_options_qrdqn_does_not_have_are_clear_errors():
    for key in ("double_q", "dueling", "prioritized"):
        with pytest.raises(ConfigError, match=f"{key} is not part of qrdqn") as info:
            QRDQNConfig(env="CartPole-v1", **{key: True}).validate()
        assert "use dqn" in info.value.fix
    with pytest.raises(ConfigError, match="n_quantiles=0"):
        QRDQNConfig(env="CartPole-v1", n_quantiles=0).validate()
    with pytest.raises(ConfigError, match="adam_eps=0"):
        QRDQNConfig(env="CartPole-v1", adam_eps=0.0).validate()


def test_adam_epsilon_is_the_papers_unless_set():
    """0.01 / batch_size (the QR-DQN paper's 0.01 / 32, SB3-contrib's default), or `adam_eps`."""
    env = gym.make("CartPole-v1")
    for overrides, eps in (({"batch_size": 64}, 0.01 / 64), ({"batch_size": 64, "adam_eps": 1e-8}, 1e-8)):
        algo = QRDQN(QRDQNConfig(env="CartPole-v1", **overrides), env.observation_space, env.action_space)
        assert algo.q_opt.optimizer.param_groups[0]["eps"] == eps
