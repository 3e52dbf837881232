"""Algorithm-level behaviour: target-KL early stopping, annealing, the autograd and analytic paths agree."""

from __future__ import annotations

import pytest
import torch

from policylab.algos import get_algo
from policylab.train import OnPolicyLoop, resolve_config

BASE = {"num_envs": 4, "n_steps": 16, "batch_size": 64, "eval_every": 0}


def _loop(overrides: dict) -> OnPolicyLoop:
    spec = get_algo("ppo")
    cfg, _ = resolve_config(spec, "CartPole-v1", 10_000, 0, None, {**BASE, **overrides}, preset="none")
    return OnPolicyLoop(spec, cfg)


def _params(loop: OnPolicyLoop) -> list[torch.Tensor]:
    return [p.detach().clone() for p in loop.net.parameters()]


def test_target_kl_stops_after_the_first_step_when_tiny():
    stopped, single = _loop({"epochs": 10, "target_kl": 1e-9}), _loop({"epochs": 1})
    metrics = stopped.algo.update(stopped.collect(), progress=0.0)
    single.algo.update(single.collect(), progress=0.0)
    # Epoch 0's only step is taken (the ratio is 1, KL ~0); before epoch 1's step the KL exceeds the limit.
    assert float(metrics["early_stop_epoch"]) == 1.0 and float(metrics["approx_kl"]) > 1.5e-9
    for p, q in zip(_params(stopped), _params(single)):
        assert torch.equal(p, q)


def test_learning_rate_and_clip_anneal_linearly():
    loop = _loop({"anneal_lr": True, "anneal_clip": True, "lr": 1e-3, "epochs": 1})
    metrics = loop.algo.update(loop.collect(), progress=0.25)
    assert float(metrics["lr"]) == pytest.approx(0.00075)
    metrics = loop.algo.update(loop.collect(), progress=1.2)  # the last rollout may overshoot the budget
    assert float(metrics["lr"]) == 0.0


def test_a_budget_rounded_up_to_whole_rollouts_is_the_runs_total_and_anneals_over_it():
    """--steps 10,000 in rollouts of 4 x 16 = 64 steps runs 10,048: the loop's total (the progress bar's and the
    eval schedule's), and the annealing runs over it (the last update at progress 1, the first at 1/157), where
    it ran over 10,000 and clamped the overshoot to 0."""
    loop = _loop({"anneal_lr": True, "lr": 1e-3, "epochs": 1})
    assert loop.total == 10_048
    seen: list[float] = []
    update = loop.algo.update
    loop.algo.update = lambda rollout, progress: seen.append(progress) or update(rollout, progress)
    while loop.step < loop.total:
        loop.iterate()
    assert len(seen) == 157 and seen[0] == pytest.approx(1 / 157) and seen[-1] == 1.0
    assert seen == sorted(seen) and all(p <= 1.0 for p in seen)


def test_autograd_and_analytic_paths_train_alike():
    fast, slow = _loop({"epochs": 2, "batch_size": 32}), _loop({"epochs": 2, "batch_size": 32, "analytic_grads": False})
    assert type(fast.algo.learner.step).__name__ == "FusedActorCriticStep"
    assert type(slow.algo.learner.step).__name__ == "AutogradStep"
    m_fast = fast.algo.update(fast.collect(), progress=0.0)
    m_slow = slow.algo.update(slow.collect(), progress=0.0)
    for key in ("policy_loss", "value_loss", "approx_kl", "clip_frac", "entropy"):
        torch.testing.assert_close(m_fast[key], m_slow[key], atol=1e-4, rtol=1e-3, msg=key)
    for p, q in zip(_params(fast), _params(slow)):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)
