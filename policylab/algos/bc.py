"""Behaviour cloning: supervised learning of the dataset's actions, the baseline of every offline table.

Box actions (in [-1, 1] units, as the replay buffer holds them):
    deterministic (CORL's BC):  a = tanh(mu(s)),  loss = mean (a - a_data)^2
    gaussian=true:              a ~ N(tanh(mu(s)), std),  loss = -mean log pi(a_data | s)
Discrete actions: a softmax policy, loss = cross-entropy with the dataset's actions; it acts greedily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policylab.algos.offpolicy import (
    FlatAdam,
    OfflineConfig,
    box_bounds,
    obs_dim,
    seeded_generator,
    uniform_box_actions,
    uniform_discrete_actions,
)
from policylab.data import Batch
from policylab.nets import DeterministicActor, DiscreteBCActor, GaussianActor


@dataclass
class BCConfig(OfflineConfig):
    """Behaviour cloning; CORL's values (lr 3e-4, [256, 256] ReLU, batch 256, observations normalized)."""

    gaussian: bool = False
    """Box actions: a Gaussian policy trained by likelihood instead of a deterministic one by squared error."""
    action_noise: float = 0.1
    """Std of the exploration noise (Box) or epsilon (Discrete) when the run continues online."""


class BC:
    name = "bc"
    config_cls = BCConfig

    def __init__(self, cfg: BCConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net: Any = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.discrete = isinstance(act_space, gym.spaces.Discrete)
        self.n_actions = int(act_space.n) if isinstance(act_space, gym.spaces.Discrete) else 0
        self.act_dim = 0 if self.discrete else int(np.prod(act_space.shape or ()))
        self.opt = FlatAdam(self.net, cfg.lr, cfg.max_grad_norm)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers = {"actor": self.opt.optimizer}
        self.action_shape = () if self.discrete else (self.act_dim,)
        self.action_dtype = torch.long if self.discrete else torch.float32

    @staticmethod
    def build_policy(cfg: BCConfig, obs_space: gym.Space, act_space: gym.Space) -> nn.Module:
        if isinstance(act_space, gym.spaces.Discrete):
            return DiscreteBCActor(obs_dim(obs_space), int(act_space.n), cfg.hidden_sizes, cfg.activation)
        low, high = box_bounds(act_space, "bc")
        actor = GaussianActor if cfg.gaussian else DeterministicActor
        return actor(obs_dim(obs_space), low, high, cfg.hidden_sizes, cfg.activation)

    def random_actions(self, n: int) -> np.ndarray:
        if self.discrete:
            return uniform_discrete_actions(n, self.n_actions, self.generator)
        return uniform_box_actions(n, self.act_dim, self.generator)

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        with torch.inference_mode():
            x = torch.as_tensor(obs, device=self.cfg.device)
            if self.discrete:
                greedy = self.net.env_action(x, True)
                explore = torch.rand(len(obs), generator=self.generator, device=self.generator.device)
                random = torch.from_numpy(self.random_actions(len(obs))).to(greedy.device)
                return torch.where(explore < self.cfg.action_noise, random, greedy).cpu().numpy()
            mean = self.net(x)
            noise = torch.randn(mean.shape, generator=self.generator, device=mean.device)
            return (mean + self.cfg.action_noise * noise).clamp(-1.0, 1.0).cpu().numpy()

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return actions if self.discrete else self.net.to_env_numpy(actions)

    def after_step(self, step: int) -> None:
        pass

    def loss(self, batch: Batch) -> Tensor:
        if self.discrete:
            return F.cross_entropy(self.net(batch.obs), batch.actions.long())
        if self.cfg.gaussian:
            return -self.net.log_prob(batch.obs, batch.actions).mean()
        return (self.net(batch.obs) - batch.actions).pow(2).mean()

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        loss = self.loss(batch)
        self.opt.step(loss)
        return {"bc_loss": loss.detach()}
