"""AWAC: advantage-weighted actor-critic (Nair et al. 2020, arXiv:2006.09359), Box actions; made for offline
pre-training followed by online fine-tuning (`--online-steps`).

for each gradient step on a batch (s, a, r, s', done, d = gamma^n):
    y = r + d (1 - done) min_k Q'_k(s', a'),  a' ~ pi(.|s')
    Q step on 1/2 sum_k mean (Q_k(s, a) - y)^2
    A = min_k Q_k(s, a) - min_k Q_k(s, a~),  a~ ~ pi(.|s)                (critics after their step)
    actor step on -mean min(exp(A / lambda), 100) log pi(a | s)         (objectives.offline.advantage_weights)
    Q' <- (1 - tau) Q' + tau Q

Defaults are CORL's (lambda 1, lr 3e-4, [256, 256], batch 256, tau 0.005). The actor is IQL's Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.fused_offpolicy import fused_awac_applies, fused_awac_update
from policylab.algos.iql import IQL, IQLConfig
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import GaussianActor
from policylab.objectives.offline import advantage_weights
from policylab.objectives.q_targets import td3_target


@dataclass
class AWACConfig(IQLConfig):
    """AWAC with CORL's values (IQL's fields `expectile` and `beta` are not used: `awac_lambda` is)."""

    awac_lambda: float = 1.0
    """Temperature of the advantage weights exp(A / lambda)."""

    def validate(self) -> None:
        super().validate()
        if self.awac_lambda <= 0:
            raise ConfigError(f"awac_lambda={self.awac_lambda} must be > 0", "set awac_lambda to e.g. 1.0")


class AWAC(IQL):
    """IQL's actor, critics and exploration without its value network; its own update."""

    name = "awac"
    config_cls = AWACConfig
    cfg: AWACConfig

    uses_value = False

    def __init__(self, cfg: AWACConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.fused = fused_awac_applies(self)

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_awac_update(self, batch) if self.fused else self.autograd_update(batch)

    def autograd_update(self, batch: Batch) -> dict[str, Tensor]:
        cfg, actor, critic = self.cfg, self.net, self.critic
        obs, next_obs = batch.obs.flatten(1), batch.next_obs.flatten(1)
        with torch.no_grad():
            next_actions = (
                actor.sample(next_obs, self.generator) if isinstance(actor, GaussianActor) else actor(next_obs)
            )
            next_q = self.critic_target(next_obs, next_actions)
            target = td3_target(batch.rewards, batch.discounts, batch.terminated, next_q)
        td = critic(obs, batch.actions) - target
        critic_loss = 0.5 * (td * td).mean(-1).sum()
        self.critic_opt.step(critic_loss)
        with torch.no_grad():
            policy_actions = actor.sample(obs, self.generator) if isinstance(actor, GaussianActor) else actor(obs)
            q = critic(torch.cat([obs, obs]), torch.cat([batch.actions, policy_actions])).min(0).values
            q_data, v = q.chunk(2)  # one critic call for both
            weights = advantage_weights(q_data - v, 1.0 / cfg.awac_lambda, cfg.max_weight)
        if isinstance(actor, GaussianActor):
            bc_losses = -actor.log_prob(obs, batch.actions)
        else:
            bc_losses = (actor(obs) - batch.actions).pow(2).sum(-1)
        actor_loss = (weights * bc_losses).mean()
        self.actor_opt.step(actor_loss)
        self.critic_target.update(cfg.tau)
        return {
            "critic_loss": critic_loss.detach(),
            "actor_loss": actor_loss.detach(),
            "q": q_data.mean(),
            "adv_weight": weights.mean(),
        }
