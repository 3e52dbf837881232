"""Off-policy targets against hand-computed values."""

from __future__ import annotations

import torch

from policylab.objectives.q_targets import (
    discrete_sac_target,
    dqn_target,
    polyak_update,
    quantile_huber_loss,
    sac_target,
    target_policy_smoothing,
    td3_target,
    tqc_target,
)

R = torch.tensor([1.0, 1.0])
D = torch.tensor([0.9, 0.81])  # a 1-step and a 2-step transition
TERM = torch.tensor([False, True])
LIVE = torch.tensor([False, False])


def test_dqn_and_double_dqn_targets():
    next_target = torch.tensor([[1.0, 5.0, 3.0], [2.0, 0.0, 4.0]])
    next_online = torch.tensor([[0.0, 1.0, 9.0], [7.0, 0.0, 0.0]])  # online prefers actions 2 and 0
    # max: 1 + 0.9 * 5 = 5.5; terminated: 1
    assert dqn_target(R, D, TERM, next_target).tolist() == [5.5, 1.0]
    # double: Q_target(s', 2) = 3 -> 1 + 0.9 * 3 = 3.7
    assert torch.allclose(dqn_target(R, D, LIVE, next_target, next_online), torch.tensor([3.7, 1.0 + 0.81 * 2.0]))


def test_td3_smoothing_and_clipped_double_q():
    actions = torch.tensor([[0.95], [-0.5]])
    smoothed = target_policy_smoothing(actions, 10.0, 0.5, torch.tensor([-1.0]), torch.tensor([1.0]), None)
    assert bool((smoothed <= 1.0).all() and (smoothed >= -1.0).all())
    assert bool(((smoothed - actions).abs() <= 0.5 + 1e-6).all())  # the noise is clipped to 0.5
    next_q = torch.tensor([[3.0, 2.0], [4.0, 1.0]])  # min over 2 critics: (3, 1)
    assert torch.allclose(td3_target(R, D, LIVE, next_q), torch.tensor([1 + 0.9 * 3, 1 + 0.81 * 1]))


def test_sac_soft_targets_continuous_and_discrete():
    next_q = torch.tensor([[3.0, 2.0], [4.0, 1.0]])
    next_logp = torch.tensor([-1.0, 0.5])
    # 1 + 0.9 * (3 - 0.2 * -1) = 3.88; terminated: 1
    assert torch.allclose(sac_target(R, D, TERM, next_q, next_logp, 0.2), torch.tensor([3.88, 1.0]))
    q = torch.tensor([[[1.0, 3.0]], [[2.0, 0.0]]])  # K=2, B=1, A=2: min = (1, 0)
    probs = torch.tensor([[0.25, 0.75]])
    logp = probs.log()
    # sum_a pi (minQ - alpha log pi) = 0.25 (1 - 0.5 log .25) + 0.75 (0 - 0.5 log .75)
    expected = 0.25 * (1 - 0.5 * torch.log(torch.tensor(0.25))) + 0.75 * (0 - 0.5 * torch.log(torch.tensor(0.75)))
    target = discrete_sac_target(R[:1], D[:1], TERM[:1], q, probs, logp, 0.5)
    assert torch.allclose(target, 1 + 0.9 * expected)


def test_tqc_drops_the_largest_pooled_quantiles():
    quantiles = torch.tensor([[[1.0, 5.0, 9.0]], [[2.0, 3.0, 8.0]]])  # K=2, B=1, M=3; pooled sorted 1 2 3 5 8 9
    target = tqc_target(R[:1], D[:1], TERM[:1], quantiles, drop_per_critic=1, next_logp=torch.tensor([0.0]), alpha=0.1)
    # keep 6 - 2 = 4 atoms: 1 2 3 5 -> 1 + 0.9 z
    assert torch.allclose(target, torch.tensor([[1.9, 2.8, 3.7, 5.5]]))
    shifted = tqc_target(R[:1], D[:1], TERM[:1], quantiles, 1, torch.tensor([-2.0]), 0.1)  # - alpha logp = +0.2
    assert torch.allclose(shifted, target + 0.9 * 0.2)


def test_quantile_huber_loss_by_hand():
    # one quantile at tau = 0.5, prediction 0, targets 2 (above) and -0.5 (below), kappa 1:
    # above: |0.5 - 0| * (2 - 0.5) = 0.75; below: |0.5 - 1| * 0.5 * 0.25 = 0.0625; mean = 0.40625
    loss = quantile_huber_loss(torch.zeros(1, 1, 1), torch.tensor([[2.0, -0.5]]))
    assert loss.item() == 0.40625


def test_quantile_huber_gradients_by_hand_and_against_autograd_of_the_formula():
    # the case above: d/dz of 0.5 * [0.5 * huber(2 - z) + 0.5 * huber(-0.5 - z)] at z = 0 is
    # 0.5 * [0.5 * -1 (clipped) + 0.5 * 0.5] = -0.125
    z = torch.zeros(1, 1, 1, requires_grad=True)
    quantile_huber_loss(z, torch.tensor([[2.0, -0.5]])).backward()
    assert z.grad is not None and z.grad.item() == -0.125
    # random shapes, kappa 2, gradients for the quantiles and the targets: the plain formula under autograd
    gen = torch.Generator().manual_seed(0)
    quantiles = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    target = (2 * torch.randn(5, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    diff = target.unsqueeze(0).unsqueeze(-2) - quantiles.unsqueeze(-1)
    huber = torch.where(diff.abs() <= 2.0, 0.5 * diff * diff, 2.0 * (diff.abs() - 1.0))
    taus = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    expected = ((taus.view(1, 1, 4, 1) - (diff < 0).double()).abs() * huber).mean()
    expected_grads = torch.autograd.grad(expected, (quantiles, target))
    loss = quantile_huber_loss(quantiles, target, kappa=2.0)
    grads = torch.autograd.grad(loss, (quantiles, target))
    assert torch.allclose(loss, expected)
    assert all(torch.allclose(g, e) for g, e in zip(grads, expected_grads))


def test_polyak_update():
    target, online = [torch.zeros(3)], [torch.ones(3)]
    polyak_update(target, online, 0.005)
    assert torch.allclose(target[0], torch.full((3,), 0.005))
    polyak_update(target, online, 1.0)
    assert torch.equal(target[0], online[0])
