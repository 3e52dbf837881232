"""PQN: its Q(lambda) returns against CleanRL's recursion by hand, epsilon-greedy acting from the pre-drawn noise
(numpy and torch alike), the epsilon schedule, learning CartPole, exact resume, bad settings."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.algos import get_algo
from policylab.algos.pqn import PQNConfig
from policylab.data import Batch
from policylab.errors import ConfigError, EnvError
from policylab.nets.epsilon_greedy import EpsilonGreedyQNetwork
from policylab.train import OnPolicyLoop, resolve_config
from tests.helpers import resumed_and_full_runs, train_until

CARTPOLE_OBS = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)


def _net(epsilon: float = 0.3) -> EpsilonGreedyQNetwork:
    torch.manual_seed(0)
    return EpsilonGreedyQNetwork(4, 3, [16, 8], "relu", True, epsilon, 0.05)


def test_q_lambda_returns_are_cleanrls_recursion():
    """G_t = r_t + gamma ((1 - lambda) max Q(s_{t+1}) + lambda G_{t+1}), cut at episode ends, bootstrapped from the
    value after the rollout: the returns PQN regresses on, computed by hand for one env of 4 steps with an
    episode end after step 1."""
    spec = get_algo("pqn")
    cfg, _ = resolve_config(spec, "CartPole-v1", 512, 0, overrides={"gamma": 0.9, "gae_lambda": 0.5})
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # max_a Q(s_t, a) as stored while acting
    rewards = torch.tensor([[1.0], [0.5], [2.0], [1.0]])
    ended = torch.tensor([[False], [True], [False], [False]])
    rollout = Batch(rewards=rewards, values=values, next_values=torch.tensor([[2.0], [0.0], [4.0], [5.0]]),
                    terminated=ended, episode_end=ended)  # fmt: skip
    from policylab.algos.onpolicy import rollout_advantages

    _, returns = rollout_advantages(rollout, "gae", cfg)
    g3 = 1.0 + 0.9 * 5.0  # the last step: the value after the rollout
    g2 = 2.0 + 0.9 * (0.5 * 4.0 + 0.5 * g3)
    g1 = 0.5  # the episode ended here
    g0 = 1.0 + 0.9 * (0.5 * 2.0 + 0.5 * g1)
    torch.testing.assert_close(returns[:, 0], torch.tensor([g0, g1, g2, g3]))


def test_acting_explores_where_the_first_draw_is_below_epsilon_in_numpy_and_torch():
    net = _net(epsilon=0.3)
    obs = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    noise = np.array([[0.1, 0.0], [0.5, 0.0], [0.29, 0.99], [0.31, 0.5], [0.0, 0.5], [0.9, 0.9]], np.float32)
    q = net.values_of(torch.from_numpy(obs)).detach()
    greedy = q.argmax(-1).numpy()
    expected = np.where(noise[:, 0] < 0.3, [0, 0, 2, 1, 1, 2], greedy)
    actions, logp, values = net.act_numpy(obs, noise)
    np.testing.assert_array_equal(actions, expected)
    np.testing.assert_allclose(values, q.amax(-1).numpy(), rtol=1e-6)
    assert not logp.any()
    with torch.no_grad():
        t_actions, _, t_values = net.act(torch.from_numpy(obs), noise=torch.from_numpy(noise))
    np.testing.assert_array_equal(t_actions.numpy(), expected)
    torch.testing.assert_close(t_values, q.amax(-1))


def test_epsilon_falls_linearly_over_the_exploration_fraction_and_is_saved_with_the_policy(tmp_path):
    spec = get_algo("pqn")
    cfg, _ = resolve_config(spec, "CartPole-v1", 2048, 0, overrides={"threads": 1, "exploration_fraction": 0.5})
    loop = OnPolicyLoop(spec, cfg)
    rates = [float(loop.net.epsilon)]
    for _ in range(4):
        loop.iterate()
        rates.append(float(loop.net.epsilon))
    loop.close()
    np.testing.assert_allclose(rates, [1.0, 0.525, 0.05, 0.05, 0.05], rtol=1e-6)
    run = pl.train("pqn", env="CartPole-v1", steps=1024, seed=0, runs_dir=tmp_path, verbose=False,
                   overrides={"eval_every": 0})  # fmt: skip
    policy = pl.load(run.dir)
    assert float(policy.net.epsilon) == pytest.approx(0.05)  # the run's last rate, saved with the network
    assert policy.net.sample_epsilon == 0.05


def test_pqn_learns_cartpole(tmp_path):
    """CleanRL's defaults reach 500 near 200k steps of their 500k; with lr 1e-3 and epsilon falling over a fifth of
    the run, 100k steps are enough."""
    run, evaluations = train_until(
        475.0, "pqn", env="CartPole-v1", steps=100_000, seed=1, runs_dir=tmp_path,
        overrides={"lr": 1e-3, "exploration_fraction": 0.2, "eval_every": 10_000, "eval_episodes": 5, "threads": 1},
    )  # fmt: skip
    assert evaluations[-1][1] >= 475.0, evaluations


def test_resumed_pqn_run_equals_uninterrupted_run(tmp_path):
    """The optimizer's state, the generator, the envs and epsilon (a buffer of the network) all resume."""
    resumed_and_full_runs("pqn", 1024, env="CartPole-v1", steps=2048, seed=3, runs_dir=tmp_path, verbose=False,
                          overrides={"n_steps": 64, "eval_every": 0, "exploration_fraction": 0.5})  # fmt: skip


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(EnvError, match="pqn needs a Discrete action space"):
        pl.train("pqn", env="Pendulum-v1", steps=512, runs_dir=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="pqn does not take recurrent"):
        pl.train("pqn", env="CartPole-v1", steps=512, runs_dir=tmp_path, overrides={"recurrent": True})
    with pytest.raises(ConfigError, match=r"batch_size=1024 must be in 1..n_steps\*num_envs=512"):
        PQNConfig(batch_size=1024).validate()
    with pytest.raises(ConfigError, match="action masks"):
        pl.train("pqn", env="CartPole-v1", steps=512, runs_dir=tmp_path, overrides={"action_masks": True})
