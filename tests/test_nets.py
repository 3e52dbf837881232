"""Networks: acting in numpy equals acting in torch; heads' log-probs against hand computations."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from policylab.nets import ActorCritic
from policylab.optim import ParameterBuffer

OBS = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)


@pytest.mark.parametrize(
    ("act_space", "activation", "shared", "squash"),
    [
        (gym.spaces.Discrete(3), "tanh", False, False),
        (gym.spaces.Discrete(4), "relu", True, False),
        (gym.spaces.Box(-2.0, 2.0, (2,), np.float32), "tanh", False, False),
        (gym.spaces.Box(-1.0, 3.0, (3,), np.float32), "tanh", True, True),
        (gym.spaces.MultiDiscrete([3, 2, 5], start=[0, 1, -2]), "tanh", False, False),
    ],
)
def test_numpy_acting_equals_torch_acting(act_space, activation, shared, squash):
    torch.manual_seed(0)
    net = ActorCritic(OBS, act_space, (32, 16), activation, shared=shared, squash=squash, log_std_init=-0.3)
    ParameterBuffer(net.parameters())  # the training layout: parameters are views of one buffer
    assert net.numpy_acting
    obs = np.random.default_rng(0).uniform(-1, 1, (7, 5)).astype(np.float32)
    noise = net.head.noise((7,), torch.Generator().manual_seed(1))
    with torch.no_grad():
        actions, logp, values = net.act(torch.from_numpy(obs), noise=noise)
        env_actions = net.head.to_env(actions).numpy()
    actions_np, logp_np, values_np = net.act_numpy(obs, noise.numpy())
    np.testing.assert_allclose(actions_np, actions.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logp_np, logp.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(values_np, values.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net.head.to_env_numpy(actions_np), env_actions, rtol=1e-5, atol=1e-5)
    # After an in-place parameter update the numpy views see the new values.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
        values_after = net.act(torch.from_numpy(obs), noise=noise)[2].numpy()
    np.testing.assert_allclose(net.act_numpy(obs, noise.numpy())[2], values_after, rtol=1e-5, atol=1e-5)


def test_categorical_log_prob_and_entropy_by_hand():
    net = ActorCritic(OBS, gym.spaces.Discrete(2), (8,))
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    logp, entropy = net.head.log_prob_entropy(logits, None, torch.tensor([1]))
    assert logp.item() == pytest.approx(math.log(0.75))
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_gaussian_log_prob_with_and_without_squashing_by_hand():
    space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    plain = ActorCritic(OBS, space, (8,), log_std_init=math.log(2.0))
    mean, u = torch.tensor([[0.5]]), torch.tensor([[1.5]])
    logp, entropy = plain.head.log_prob_entropy(mean, plain.log_std, u)
    # N(1.5; 0.5, 2): -0.5 * (1/2)^2 - log 2 - 0.5 log(2 pi)
    assert logp.item() == pytest.approx(-0.125 - math.log(2.0) - 0.5 * math.log(2 * math.pi), rel=1e-6)
    assert entropy.item() == pytest.approx(math.log(2.0) + 0.5 * (1 + math.log(2 * math.pi)), rel=1e-6)
    squashed = ActorCritic(OBS, space, (8,), log_std_init=math.log(2.0), squash=True)
    logp_sq, _ = squashed.head.log_prob_entropy(mean, squashed.log_std, u)
    # change of variables a = tanh(u): log pi(a) = log N(u) - log(1 - tanh(u)^2)
    assert logp_sq.item() == pytest.approx(logp.item() - math.log(1 - math.tanh(1.5) ** 2), rel=1e-5)
    assert squashed.head.to_env(torch.tensor([[100.0]])).item() == pytest.approx(1.0)
    assert plain.head.to_env(torch.tensor([[-7.0]])).item() == -1.0


def test_orthogonal_init_gains():
    torch.manual_seed(0)
    net = ActorCritic(gym.spaces.Box(-1, 1, (64,), np.float32), gym.spaces.Discrete(64), (64, 64))
    hidden = net.body.weight(1)[0]  # [in, out] of the actor's second layer
    np.testing.assert_allclose((hidden.T @ hidden).detach().numpy(), 2.0 * np.eye(64), atol=1e-4)  # gain sqrt(2)
    actor_out, critic_out = net.body.weight(2)[0].detach(), net.body.weight(2)[1].detach()
    assert float(actor_out.norm(dim=0).max()) == pytest.approx(0.01, rel=1e-3)  # policy head gain 0.01
    assert float(critic_out[:, 0].norm()) == pytest.approx(1.0, rel=1e-3)  # value head gain 1


def test_multi_categorical_log_prob_entropy_and_masking_by_hand():
    space = gym.spaces.MultiDiscrete([2, 3], start=[0, 10])
    net = ActorCritic(OBS, space, (8,))
    head = net.head
    assert head.n_outputs == 6  # a [2 dims, 3 choices] grid; the third entry of dimension 0 is masked
    logits = torch.tensor([[0.0, math.log(3.0), 100.0, 0.0, 0.0, 0.0]])
    logp, entropy = head.log_prob_entropy(logits, None, torch.tensor([[1, 2]]))
    # dim 0: p = (1/4, 3/4) (the masked logit 100 is ignored); dim 1: uniform over 3
    assert logp.item() == pytest.approx(math.log(0.75) + math.log(1 / 3), rel=1e-6)
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy.item() == pytest.approx(h0 + math.log(3.0), rel=1e-6)
    actions, _ = head.sample(logits.repeat(500, 1), None, torch.Generator().manual_seed(0))
    assert int(actions[:, 0].max()) <= 1 and 0.7 < float((actions[:, 0] == 1).float().mean()) < 0.8
    assert head.to_env(torch.tensor([[1, 2]])).tolist() == [[1, 12]]
