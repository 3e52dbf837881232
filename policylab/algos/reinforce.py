"""REINFORCE with a learned baseline (Williams 1992; Sutton & Barto 13.4).

for each iteration:
    collect n_steps x num_envs transitions                         (the loop)
    G_t = r_t + gamma G_{t+1}  (Monte-Carlo; bootstrapped only at time limits
                                and at the cut where the rollout ends)       (objectives.mc_returns)
    L = -logpi(a_t|s_t) (G_t - b(s_t)) + vf_coef (b(s_t) - G_t)^2
    one Adam step on L
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
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
from policylab.data import Batch
from policylab.nets import ActorCritic
from policylab.optim import set_lr


@dataclass
class ReinforceConfig(OnPolicyConfig):
    """REINFORCE with a state-value baseline; long rollouts keep the Monte-Carlo returns mostly unbootstrapped."""

    n_steps: int = 128
    lr: float = 1e-3
    normalize_advantage: bool = True


class Reinforce:
    name = "reinforce"
    config_cls = ReinforceConfig

    def __init__(self, cfg: ReinforceConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.learner = make_learner(self.net, cfg, lambda params: adam(params, cfg.lr))
        self.optimizer, self.generator = self.learner.optimizer, self.learner.generator
        self.imitation: Imitation | None = None
        """Demonstrations mixed into every gradient step (set by the loop when the run has a dataset)."""

    @staticmethod
    def build_policy(cfg: OnPolicyConfig, obs_space: gym.Space, act_space: gym.Space) -> ActorCritic:
        return build_actor_critic(cfg, obs_space, act_space, "reinforce")

    def update(self, rollout: Batch, progress: float) -> dict[str, Tensor]:
        cfg = self.cfg
        set_lr(self.optimizer, annealed(cfg.lr, progress, cfg.anneal_lr))
        advantages, returns = rollout_advantages(rollout, "mc", cfg)
        return whole_rollout_step(self.learner, rollout, advantages, returns, cfg, self.imitation, progress)
