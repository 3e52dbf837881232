"""Off-policy networks: ensembles in one call equal separate critics; dueling; SAC's log-probability."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from policylab.nets import CategoricalActor, ContinuousCritic, DeterministicActor, QNetwork, TanhGaussianActor


def _member_forward(mlp, k: int, x: torch.Tensor) -> torch.Tensor:
    """Member k of a StackedMLP evaluated alone, layer by layer with F.linear (relu)."""
    h = x
    for i in range(len(mlp.weights)):
        h = F.linear(h, mlp.weight(i)[k].T, mlp.biases[i][k, 0])
        if i < len(mlp.weights) - 1:
            h = torch.relu(h)
    return h


def test_critic_ensemble_in_one_call_equals_separate_critics():
    torch.manual_seed(0)
    critic = ContinuousCritic(obs_dim=5, act_dim=2, hidden_sizes=(32, 32), members=4)
    obs, actions = torch.randn(16, 5), torch.randn(16, 2)
    q = critic(obs, actions)
    assert q.shape == (4, 16)
    x = torch.cat([obs, actions], -1)
    for k in range(4):
        torch.testing.assert_close(q[k], _member_forward(critic.body, k, x)[:, 0])
    assert ContinuousCritic(5, 2, (8,), members=2, quantiles=25)(obs, actions).shape == (2, 16, 25)


def test_layer_norm_critic_normalizes_hidden_features():
    torch.manual_seed(0)
    critic = ContinuousCritic(3, 1, (64,), members=2, layer_norm=True, activation="tanh")
    assert not critic.body.analytic_backward
    obs, actions = torch.randn(8, 3) * 100, torch.randn(8, 1) * 100
    q = critic(obs, actions)
    assert q.shape == (2, 8) and bool(torch.isfinite(q).all())
    q.sum().backward()
    assert critic.body.norm_scales[0].grad is not None


def test_dueling_q_values_by_hand():
    net = QNetwork(obs_dim=3, n_actions=3, hidden_sizes=(4,), dueling=True)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.body.biases[-1][0, 0] = torch.tensor([2.0, 1.0, 2.0, 6.0])  # V = 2, A = (1, 2, 6), mean A = 3
    q = net(torch.zeros(1, 3))
    assert q[0, 0].tolist() == [0.0, 1.0, 5.0]  # 2 + A - 3


def test_tanh_gaussian_log_prob_matches_torch_distributions_and_bounds():
    torch.manual_seed(0)
    low, high = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0])
    actor = TanhGaussianActor(obs_dim=4, low=low, high=high, hidden_sizes=(16,))
    obs = torch.randn(32, 4)
    actions, logp = actor.sample(obs, torch.Generator().manual_seed(1))
    assert bool(((actions >= -1) & (actions <= 1)).all())
    mean, log_std = actor._mean_log_std(obs)
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform(cache_size=1)])
    reference = dist.log_prob(actions.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1)
    torch.testing.assert_close(logp, reference, atol=2e-3, rtol=1e-4)
    logp.sum().backward()  # reparameterized: gradients reach the network
    assert actor.body.weights[0].grad is not None
    env_actions = actor.env_action(obs)
    assert bool(((env_actions >= low) & (env_actions <= high)).all())
    torch.testing.assert_close(env_actions, low + (actor(obs) + 1) / 2 * (high - low))
    # the numpy acting path draws the same actions from the same noise
    noise = torch.randn(32, 2)
    expected = torch.tanh(mean + log_std.exp() * noise).detach().numpy()
    np.testing.assert_allclose(actor.sample_numpy(obs.numpy(), noise.numpy()), expected, atol=1e-5)


def test_deterministic_and_categorical_actors():
    actor = DeterministicActor(3, torch.tensor([-1.0]), torch.tensor([3.0]), hidden_sizes=(8,))
    with torch.no_grad():
        for p in actor.parameters():
            p.zero_()
    assert actor(torch.zeros(2, 3)).tolist() == [[0.0], [0.0]]
    assert actor.env_action(torch.zeros(2, 3)).tolist() == [[1.0], [1.0]]  # tanh(0) = 0: the middle of [-1, 3]
    categorical = CategoricalActor(3, 4, hidden_sizes=(8,))
    probs, logp = categorical(torch.randn(5, 3))
    assert probs.shape == (5, 4) and torch.allclose(probs.sum(-1), torch.ones(5))
    assert torch.allclose(logp.exp(), probs)
    # inverse-CDF numpy draws follow the probabilities (chi-square, fixed seed)
    obs = np.zeros((20_000, 3), dtype=np.float32)
    draws = categorical.sample_numpy(obs, np.random.default_rng(0).random(20_000))
    expected = categorical(torch.zeros(1, 3))[0][0].detach().numpy() * 20_000
    chi2 = (((np.bincount(draws, minlength=4) - expected) ** 2) / expected).sum()
    assert chi2 < 16.3  # p = 0.001 with 3 degrees of freedom


@pytest.mark.parametrize("members", [1, 3])
def test_q_network_shapes(members):
    assert QNetwork(6, 4, (16,), members=members)(torch.randn(7, 6)).shape == (members, 7, 4)


def test_numpy_forward_of_one_member_equals_the_torch_member():
    torch.manual_seed(0)
    critic = ContinuousCritic(obs_dim=5, act_dim=2, hidden_sizes=(32, 16), members=3)
    x = torch.randn(7, 7)
    with torch.no_grad():
        stacked = critic.body(x)
    np.testing.assert_allclose(critic.body.numpy_forward(x.numpy()), stacked.numpy(), rtol=1e-5, atol=1e-6)
    for k in range(3):
        np.testing.assert_allclose(critic.body.numpy_forward(x.numpy(), member=k), stacked[k].numpy(), atol=1e-6)


def test_a_q_networks_sampled_action_is_epsilon_greedy_at_its_rate():
    """env_action(deterministic=False): the greedy action, replaced by a uniform one with probability
    sample_epsilon (SB3's predict(deterministic=False)); deterministic, or at rate 0, always greedy."""
    torch.manual_seed(0)
    obs = torch.randn(1, 4).expand(20_000, 4)
    net = QNetwork(4, 5, (16,), sample_epsilon=0.2)
    greedy = int(net(obs[:1])[0].argmax(-1))
    gen = torch.Generator().manual_seed(1)
    counts = torch.bincount(net.env_action(obs, False, gen), minlength=5).float() / len(obs)
    expected = torch.full((5,), 0.2 / 5)
    expected[greedy] += 0.8
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)
    assert torch.all(net.env_action(obs, True, gen) == greedy)
    net.sample_epsilon = 0.0
    assert torch.all(net.env_action(obs, False, gen) == greedy)
    # DQN's policy network samples at its run's final exploration rate
    from policylab.algos.dqn import DQN, DQNConfig

    space = gym.spaces.Box(-1.0, 1.0, (4,))
    assert DQN.build_policy(DQNConfig(eps_final=0.07), space, gym.spaces.Discrete(3)).sample_epsilon == 0.07
