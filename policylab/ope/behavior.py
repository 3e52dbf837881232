"""The behaviour policy estimated by behaviour cloning, for datasets that did not record its log-probs.

Discrete actions: a softmax classifier (cross-entropy). Box actions: a Gaussian with a state-dependent mean
and a state-independent standard deviation (negative log-likelihood), in [-1, 1] units, its density returned
in env units like `collect`'s. Both are the off-policy family's networks (DiscreteBCActor, GaussianActor), fitted
on every step of the dataset, and the log-probs returned are of those same steps: an estimate whose error the
importance-sampling estimators inherit (the OPE report says so).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from policylab.data.dataset import Dataset
from policylab.nets.critics import DiscreteBCActor, GaussianActor
from policylab.optim import Adam


def estimate_behavior_log_probs(
    dataset: Dataset, *, steps: int = 3000, batch_size: int = 256, lr: float = 1e-3, seed: int = 0
) -> np.ndarray:
    """log mu_hat(a_t | s_t) [N] of each logged step under a behaviour-cloned policy (float64)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    observations = dataset.observations[dataset.obs_index()]
    obs = torch.as_tensor(observations, dtype=torch.float32).reshape(len(observations), -1)
    mean, std = obs.mean(0), obs.std(0).clamp_min(1e-6)
    obs = (obs - mean) / std
    space: Any = dataset.action_space
    if isinstance(space, gym.spaces.Discrete):
        actions = torch.as_tensor(np.asarray(dataset.actions).reshape(-1) - int(space.start), dtype=torch.long)
        classifier = DiscreteBCActor(obs.shape[1], int(space.n), (256, 256))
        _fit(classifier, lambda o, a: torch.log_softmax(classifier(o), -1).gather(-1, a[:, None]).squeeze(-1),
             obs, actions, steps, batch_size, lr, generator)  # fmt: skip
        with torch.no_grad():
            logp = torch.log_softmax(classifier(obs), -1).gather(-1, actions[:, None]).squeeze(-1)
        return logp.double().numpy()
    low = torch.as_tensor(space.low, dtype=torch.float32).reshape(-1)
    high = torch.as_tensor(space.high, dtype=torch.float32).reshape(-1)
    env = torch.as_tensor(np.asarray(dataset.actions), dtype=torch.float32).reshape(len(obs), -1)
    unit = (2.0 * (env - low) / (high - low) - 1.0).clamp(-1.0, 1.0)
    actor = GaussianActor(obs.shape[1], low, high, (256, 256))
    _fit(actor, actor.log_prob, obs, unit, steps, batch_size, lr, generator)
    with torch.no_grad():
        logp = actor.log_prob(obs, unit) - ((high - low) / 2.0).log().sum()
    return logp.double().numpy()


def _fit(model, log_prob, obs, actions, steps, batch_size, lr, generator) -> None:  # type: ignore[no-untyped-def]
    """Maximum likelihood by Adam on minibatches."""
    optimizer = Adam(list(model.parameters()), lr=lr)
    for _ in range(steps):
        index = torch.randint(len(obs), (min(batch_size, len(obs)),), generator=generator)
        loss = -log_prob(obs[index], actions[index]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
