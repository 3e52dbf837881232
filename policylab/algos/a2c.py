"""A2C (Mnih et al. 2016, synchronous variant): one gradient step per rollout.

for each iteration:
    collect n_steps x num_envs transitions                        (the loop)
    A, R = GAE(lambda)(rewards, V)     (lambda = 1: n-step returns)
    L = -logpi(a|s) A + vf_coef (V(s) - R)^2 - ent_coef H[pi(.|s)]   (pg_surrogate without clipping)
    one RMSprop (or Adam) step on L with the gradient norm clipped
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.onpolicy import (
    Imitation,
    OnPolicyConfig,
    adam,
    annealed,
    build_actor_critic,
    make_learner,
    rollout_advantages,
    whole_rollout_step,
)
from policylab.algos.ppo import explained_variance
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ActorCritic
from policylab.optim import Optimizer, RMSprop, set_lr


@dataclass
class A2CConfig(OnPolicyConfig):
    """A2C. Defaults follow Stable-Baselines3 (RMSprop, 5-step rollouts, lambda = 1)."""

    n_steps: int = 5
    lr: float = 7e-4
    gae_lambda: float = 1.0
    normalize_advantage: bool = False
    optimizer: str = "rmsprop"
    """rmsprop or adam."""
    rms_alpha: float = 0.99
    optim_eps: float = 1e-5

    def validate(self) -> None:
        super().validate()
        if self.optimizer not in ("rmsprop", "adam"):
            raise ConfigError(f"optimizer={self.optimizer!r} is not rmsprop or adam", "use --set optimizer=rmsprop")
        if not self.optim_eps > 0:
            raise ConfigError(f"optim_eps={self.optim_eps} must be > 0", "set optim_eps to e.g. 1e-5 (the default)")


class A2C:
    name = "a2c"
    config_cls = A2CConfig

    def __init__(self, cfg: A2CConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.learner = make_learner(self.net, cfg, self._optimizer)
        self.optimizer, self.generator = self.learner.optimizer, self.learner.generator
        self.imitation: Imitation | None = None
        """Demonstrations mixed into every gradient step (set by the loop when the run has a dataset)."""

    def _optimizer(self, params: list[torch.nn.Parameter]) -> Optimizer:
        cfg = self.cfg
        if cfg.optimizer == "rmsprop":
            return RMSprop(params, lr=cfg.lr, alpha=cfg.rms_alpha, eps=cfg.optim_eps)
        return adam(params, cfg.lr, cfg.optim_eps)

    @staticmethod
    def build_policy(cfg: OnPolicyConfig, obs_space: gym.Space, act_space: gym.Space) -> ActorCritic:
        return build_actor_critic(cfg, obs_space, act_space, "a2c")

    def update(self, rollout: Batch, progress: float) -> dict[str, Tensor]:
        cfg = self.cfg
        set_lr(self.optimizer, annealed(cfg.lr, progress, cfg.anneal_lr))
        advantages, returns = rollout_advantages(rollout, "gae", cfg)
        metrics = whole_rollout_step(self.learner, rollout, advantages, returns, cfg, self.imitation, progress)
        metrics["explained_variance"] = explained_variance(rollout.values.flatten(), returns.flatten())
        return metrics
